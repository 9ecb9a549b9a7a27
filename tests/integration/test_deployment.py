"""The same app on a real SuperLink + 2 SuperNodes over gRPC on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedpeft.reporting import RunDir
from tests.integration.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def test_loopback_grpc_deployment_two_supernodes(tmp_path: Path, app_dir: Path) -> None:
    out = tmp_path / "runs"
    overrides = [o for o in tiny_overrides(out, "x") if not o.startswith(("run.run_id",
                                                                           "run.output_dir"))]
    cmd = [sys.executable, str(app_dir / "scripts" / "deploy_local.py"), "--clients", "2",
           "--output-dir", str(out), "--workdir", str(tmp_path / "deploy"), "--timeout", "600",
           "--", *overrides, "run.num_rounds=2"]

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = list(out.iterdir())
    records = RunDir(run_dir).records()
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["num_clients"] == 2 and len(r["bytes_up"]) == 2 for r in records[1:])
