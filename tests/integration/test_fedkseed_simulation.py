"""FedKSeed over a real `flwr run` simulation: clients replay exactly the server's model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedpeft import cli
from fedpeft.reporting import RunDir
from tests.integration.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def test_fedkseed_simulation_clients_match_server_bit_for_bit(
    tmp_path: Path, flwr_home: Path, app_dir: Path
) -> None:
    out, cache = tmp_path / "runs", tmp_path / "cache"
    overrides = [o for o in tiny_overrides(out, "ks") if not o.startswith("method.")]
    overrides += ["method=fedkseed", "strategy=fedkseed", "method.num_seeds=64",
                  "method.local_steps=4", "method.lr=0.0001", "run.num_rounds=3",
                  "sim.num_clients=2", "sim.client_cpus=1", f"model.cache_dir={cache}"]

    code = cli.main(["simulate", *overrides, "--app", str(app_dir)])

    assert code == 0
    run = RunDir(out / "ks")
    records = run.records()
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    for rec in records[1:]:
        assert rec["num_clients"] == 2 and rec["num_rejected"] == 0
        assert all(p <= 4 * 8 + 2 * 128 for p in rec["payload_bytes_up"].values())
        assert all(b < 4096 for b in rec["bytes_up"].values())
    # Before training round 3 each node replayed rounds 1..2 from the server's history:
    # its snapshot must equal the server's round-2 checkpoint bit for bit.
    server = load_file(str(run.checkpoint_dir(2) / "trainable.safetensors"))
    nodes = list((cache / "seed-state").glob("*/*/w.safetensors"))
    nodes = [p for p in nodes if p.parent.name != "base"]
    assert len(nodes) == 2
    for path in nodes:
        client = load_file(str(path))
        assert set(client) == set(server)
        assert all(torch.equal(client[k], server[k]) for k in server)
    base = load_file(str(next((cache / "seed-state").glob("*/base/w.safetensors"))))
    assert any(not torch.equal(base[k], server[k]) for k in server)  # the model did move
