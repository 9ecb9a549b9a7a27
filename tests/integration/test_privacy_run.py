"""A private run end to end (real `flwr run` simulation): client-level DP with a budget
ends cleanly, says why, and leaves ε in metrics.jsonl and runs/<id>/privacy.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedpeft.reporting import RunDir
from tests.integration.conftest import tiny_overrides

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_budget_stops_a_client_level_dp_run_cleanly(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", *tiny_overrides(tmp_path, "dp"),
           "sim.num_clients=4", "sim.client_cpus=1", "run.num_rounds=4", "privacy=client",
           "privacy.sample_rate=1.0", "privacy.noise_multiplier=2.0", "privacy.clip=0.5",
           "privacy.max_epsilon=3.5"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "run completed early (privacy budget exhausted before round 3" in proc.stdout
    run = RunDir(tmp_path / "dp")
    status = run.status()
    assert status["state"] == "completed" and status["rounds"] == 2
    rounds = [r for r in run.records() if r["round"] > 0]
    eps = [r["privacy"]["epsilon_rdp"] for r in rounds]
    assert len(rounds) == 2 and 0 < eps[0] < eps[1] <= 3.5
    assert all(r["num_clients"] == 4 for r in rounds)  # q=1: everyone, every round
    assert all(r["privacy"]["epsilon_prv"] <= r["privacy"]["epsilon_rdp"] for r in rounds)
    ledger = json.loads((run.path / "privacy.json").read_text())
    assert [e["round"] for e in ledger["entries"]["clients"]] == [1, 2]
    assert ledger["epsilon_rdp"]["clients"] == eps[1]
