"""The same app on a real SuperLink + 2 SuperNodes over gRPC on 127.0.0.1: FedKSeed in
the clear, LoRA over TLS with SuperNode authentication and secure aggregation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedpeft import netfed
from fedpeft.netfed import NetFedUnavailable
from fedpeft.reporting import RunDir
from tests.integration.conftest import leftovers, process_snapshot, tiny_overrides
from tests.plugins import faulty

pytestmark = pytest.mark.slow


SEED_METHOD = ["method=fedkseed", "strategy=fedkseed", "method.num_seeds=64",
               "method.local_steps=4", "method.lr=0.0001",
               "method.trainable='layers\\.[0-9]+\\.mlp\\.(up|down)_proj'"]


def _namespaces_available() -> bool:
    try:
        netfed.check_requirements()
    except NetFedUnavailable:
        return False
    return True


@pytest.mark.skipif(_namespaces_available(), reason="FedKSeed over a deployment runs across "
                    "emulated hosts in tests/integration/test_netfed.py on this machine")
@pytest.mark.parametrize("method", ["fedkseed"])  # LoRA: the TLS test below
def test_loopback_grpc_deployment_two_supernodes(tmp_path: Path, app_dir: Path,
                                                 method: str) -> None:
    out = tmp_path / "runs"
    overrides = [o for o in tiny_overrides(out, "x") if not o.startswith(("run.run_id",
                                                                           "run.output_dir"))]
    if method == "fedkseed":  # separate ClientApp processes catch up from disk snapshots
        overrides = [o for o in overrides if not o.startswith("method.")] + [
            *SEED_METHOD, f"model.cache_dir={tmp_path / 'cache'}"]
    cmd = [sys.executable, str(app_dir / "scripts" / "deploy_local.py"), "--clients", "2",
           "--output-dir", str(out), "--workdir", str(tmp_path / "deploy"), "--timeout", "600",
           "--", *overrides, "run.num_rounds=2"]

    before = process_snapshot()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert leftovers(before) == []  # SuperLink, SuperNodes and app processes all stopped
    (run_dir,) = list(out.iterdir())
    records = RunDir(run_dir).records()
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["num_clients"] == 2 and len(r["bytes_up"]) == 2 for r in records[1:])
    assert all(r["num_rejected"] == 0 for r in records[1:])
    if method == "fedkseed":  # the quoted regex arrived intact; replay is exact across nodes
        config = json.loads((run_dir / "config.json").read_text())["config"]
        assert config["method"]["trainable"] == r"layers\.[0-9]+\.mlp\.(up|down)_proj"
        server = load_file(str(RunDir(run_dir).checkpoint_dir(1) / "trainable.safetensors"))
        (client_path,) = (tmp_path / "cache" / "seed-state").glob("*/round-00001.safetensors")
        client = load_file(str(client_path))
        assert set(client) == set(server)
        assert all(torch.equal(client[k], server[k]) for k in server)


def test_tls_node_auth_and_secure_aggregation_over_real_supernodes(
        tmp_path: Path, app_dir: Path) -> None:
    """TLS + SuperNode auth: 4 registered nodes run one SecAgg+ round (every stage over
    the real Fleet API) in which partition 0 drops out after key sharing (it raises in
    training); the other 3 are summed. A node with an unknown key and one with none are
    refused."""
    out = tmp_path / "runs"
    overrides = [o for o in tiny_overrides(out, "x") if not o.startswith(("run.run_id",
                                                                           "run.output_dir"))]
    logs = tmp_path / "deploy"
    cmd = [sys.executable, str(app_dir / "scripts" / "deploy_local.py"), "--auth",
           "--clients", "4", "--unregistered", "2", "--output-dir", str(out), "--workdir",
           str(logs), "--timeout", "600", "--", *overrides, "run.num_rounds=1",
           "secagg.enabled=true", "method.name=fail_first"]
    before = process_snapshot()
    env = {**os.environ, "FEDPEFT_PLUGINS": faulty.PATH}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert leftovers(before) == []
    (run_dir,) = list(out.iterdir())
    records = RunDir(run_dir).records()
    assert [r["round"] for r in records] == [0, 1]
    rec = records[1]
    assert rec["num_clients"] == 3 and len(rec["bytes_up"]) == 3, rec
    (reason,) = rec["rejected"].values()
    assert "injected dropout of partition 0" in reason
    assert [e["partition"] for e in rec["excluded"]] == [0]
    assert rec["extra"]["secagg_bytes_share"] > 0 and rec["extra"]["secagg_bytes_unmask"] > 0
    unknown_key, no_key = ((logs / f"unregistered-{i}.log").read_text() for i in (4, 5))
    assert "Failed to activate SuperNode" in unknown_key, unknown_key[-2000:]
    assert "All SuperNodes must be registered" in no_key, no_key[-2000:]
    link = (logs / "superlink.log").read_text()
    assert "https://127.0.0.1" in link
