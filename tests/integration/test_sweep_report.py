"""`fedpeft simulate --multirun` over compressed runs: every grid point is a real run with
its own report, one comparison report lists them all, and ComPEFT with error feedback up
and compressed broadcasts down moves a fraction of the dense bytes each way."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft import cli
from fedpeft.reporting import RunDir
from tests.integration.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def test_multirun_over_two_densities_compresses_and_compares_both_runs(
        tmp_path: Path, flwr_home: Path, app_dir: Path) -> None:
    out = tmp_path / "runs"
    overrides = [*tiny_overrides(out, "sw"), "sim.num_clients=2", "sim.client_cpus=1",
                 "run.num_rounds=2", "compression=compeft", "compression.error_feedback=true",
                 "compression.downlink=true", "compression.density=0.05,0.1"]

    code = cli.main(["simulate", "--multirun", *overrides, "--app", str(app_dir)])

    assert code == 0
    for run_id in ("sw-0", "sw-1"):
        run = RunDir(out / run_id)
        assert run.status()["state"] == "completed"
        assert [r["round"] for r in run.records()] == [0, 1, 2]
        assert (run.path / "report" / "report.html").is_file()
        assert (run.path / "report" / "traffic.png").stat().st_size > 1024
        _assert_compressed_both_ways([r for r in run.records() if r["round"] > 0])
    text = (out / "sw-report" / "report.html").read_text()
    for label in ("sw-0", "sw-1", "compression.density=0.05", "compression.density=0.1"):
        assert f"<td>{label}</td>" in text
    assert text.count("<img ") >= 5


def _assert_compressed_both_ways(rounds: list[dict]) -> None:
    dense = min(rounds[0]["payload_bytes_down"].values())  # round 1: the full state
    assert all(r["num_rejected"] == 0 and r["num_clients"] == 2 for r in rounds)
    for rec in rounds:
        assert all(0 < up < dense / 15 for up in rec["payload_bytes_up"].values())
    for rec in rounds[1:]:  # then one compressed delta per round
        assert all(0 < down < dense / 15 for down in rec["payload_bytes_down"].values())
    assert rounds[-1]["eval_loss"] != rounds[0]["eval_loss"]  # the model moved
