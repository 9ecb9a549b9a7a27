"""Seed-based methods (FedKSeed, Ferret) over a real `flwr run` simulation: clients replay
exactly the server's model, and a resumed run continues from the checkpointed history."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedpeft import cli
from fedpeft.reporting import RunDir
from tests.integration.conftest import tiny_overrides

pytestmark = pytest.mark.slow


METHOD_OVERRIDES = {
    "fedkseed": ["method.num_seeds=64", "method.local_steps=4", "method.lr=0.0001"],
    "ferret": ["method.num_bases=256", "method.block_size=65536", "method.local_steps=2",
               "method.batch_size=2", "strategy.global_lr=1.0"],
}
PAYLOAD_LIMIT = {"fedkseed": 4 * 8, "ferret": 8 + 4 * 256 + 4 * 256}


@pytest.mark.parametrize("method", sorted(METHOD_OVERRIDES))
def test_seed_simulation_clients_match_server_bit_for_bit(
    tmp_path: Path, flwr_home: Path, app_dir: Path, method: str
) -> None:
    out, cache = tmp_path / "runs", tmp_path / "cache"
    overrides = [o for o in tiny_overrides(out, "ks") if not o.startswith("method.")]
    overrides += [f"method={method}", f"strategy={method}", *METHOD_OVERRIDES[method],
                  "run.num_rounds=3", "sim.num_clients=2", "sim.client_cpus=1",
                  f"model.cache_dir={cache}"]

    code = cli.main(["simulate", *overrides, "--app", str(app_dir)])

    assert code == 0
    run = RunDir(out / "ks")
    records = run.records()
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    for rec in records[1:]:
        assert rec["num_clients"] == 2 and rec["num_rejected"] == 0
        assert all(0 < p <= PAYLOAD_LIMIT[method] for p in rec["payload_bytes_up"].values())
        assert all(b < PAYLOAD_LIMIT[method] + 4096 for b in rec["bytes_up"].values())
        assert set(rec["payload_bytes_down"]) == set(rec["bytes_down"])
        assert all(0 <= rec["payload_bytes_down"][n] < b for n, b in rec["bytes_down"].items())
    # Before training round 3 a client replayed round 2 from the server's history onto its
    # round-1 snapshot: the round-2 snapshot must equal the server's checkpoint bit for bit.
    server = load_file(str(run.checkpoint_dir(2) / "trainable.safetensors"))
    snapshots = {p.name: p for p in (cache / "seed-state").glob("*/round-*.safetensors")}
    assert "round-00002.safetensors" in snapshots
    client = load_file(str(snapshots["round-00002.safetensors"]))
    assert set(client) == set(server)
    assert all(torch.equal(client[k], server[k]) for k in server)
    base = load_file(str(snapshots["round-00000.safetensors"]))
    assert any(not torch.equal(base[k], server[k]) for k in server)  # the model did move

    if method != "fedkseed":  # resuming is the shared replay code: checked once
        return
    # Resume from round 3 for one more round: clients of the new run start from the base
    # and catch up on the checkpointed history (rounds 1..3) before training round 4.
    code = cli.main(["simulate", *overrides, "run.num_rounds=4",
                     f"run.resume={out / 'ks'}", "--app", str(app_dir)])

    assert code == 0
    records = RunDir(out / "ks").records()
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4]
    assert records[-1]["num_clients"] == 2 and records[-1]["num_rejected"] == 0
    server3 = load_file(str(run.checkpoint_dir(3) / "trainable.safetensors"))
    new_runs = {p.parent for p in (cache / "seed-state").glob("*/round-00003.safetensors")}
    assert len(new_runs) == 1  # only the resumed run replays round 3 on the client side
    client3 = load_file(str(next(iter(new_runs)) / "round-00003.safetensors"))
    assert all(torch.equal(client3[k], server3[k]) for k in server3)
