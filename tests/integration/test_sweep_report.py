"""`fedpeft simulate --multirun`: every grid point is a real run with its own report, and
one comparison report lists them all."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft import cli
from fedpeft.reporting import RunDir
from tests.integration.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def test_multirun_over_two_learning_rates_compares_both_runs(
        tmp_path: Path, flwr_home: Path, app_dir: Path) -> None:
    out = tmp_path / "runs"
    overrides = [*tiny_overrides(out, "sw"), "sim.num_clients=2", "sim.client_cpus=1",
                 "run.num_rounds=1", "method.lr=1e-4,3e-4"]

    code = cli.main(["simulate", "--multirun", *overrides, "--app", str(app_dir)])

    assert code == 0
    for run_id in ("sw-0", "sw-1"):
        run = RunDir(out / run_id)
        assert run.status()["state"] == "completed"
        assert [r["round"] for r in run.records()] == [0, 1]
        assert (run.path / "report" / "report.html").is_file()
        assert (run.path / "report" / "traffic.png").stat().st_size > 1024
    text = (out / "sw-report" / "report.html").read_text()
    for label in ("sw-0", "sw-1", "method.lr=0.0001", "method.lr=0.0003"):
        assert f"<td>{label}</td>" in text
    assert text.count("<img ") >= 5
