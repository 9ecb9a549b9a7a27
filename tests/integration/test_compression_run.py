"""A compressed run end to end (real `flwr run` simulation): ComPEFT with error feedback
up and compressed broadcasts down; the clients' replies are a fraction of the dense
upload, later broadcasts are compressed deltas, and the run ends with its report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedpeft.reporting import RunDir
from tests.integration.conftest import tiny_overrides

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_compeft_up_and_down_trains_and_reports(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", *tiny_overrides(tmp_path, "c"),
           "run.num_rounds=3", "compression=compeft", "compression.density=0.1",
           "compression.error_feedback=true", "compression.downlink=true"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = RunDir(tmp_path / "c")
    rounds = [r for r in run.records() if r["round"] > 0]
    assert run.status()["state"] == "completed" and len(rounds) == 3
    assert all(r["num_rejected"] == 0 and r["num_clients"] >= 2 for r in rounds)
    dense = rounds[0]["payload_bytes_down"]  # round 1: every node gets the full state
    for rec in rounds:
        assert all(0 < up < min(dense.values()) / 15 for up in rec["payload_bytes_up"].values())
    for rec in rounds[1:]:  # then one compressed delta per round
        assert all(down < min(dense.values()) / 15 for down in rec["payload_bytes_down"].values())
    assert rounds[-1]["eval_loss"] != rounds[0]["eval_loss"]  # the model moved
    assert (run.path / "report" / "report.html").stat().st_size > 10_000
