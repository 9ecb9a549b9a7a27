"""``bash scripts/dev.sh gpu-check`` in the mode CI can run: without CUDA it says so and
exits 0, and every benchmark it would run accepts the arguments it would be given."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import gpu_check

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA mode")
def test_without_cuda_it_says_so_and_exits_zero() -> None:
    proc = subprocess.run(["bash", "scripts/dev.sh", "gpu-check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device here" in proc.stdout and "stay owed" in proc.stdout
    for step in gpu_check.STEPS:
        assert step.name in proc.stdout
    assert not (ROOT / "bench" / "results" / "gpu-check-cpu.json").exists()


@pytest.mark.parametrize("step", [s for s in gpu_check.STEPS if s.argv[1].startswith("bench/")],
                         ids=lambda s: s.name)
def test_each_benchmark_accepts_its_arguments(step: gpu_check.Step, monkeypatch,
                                              capsys) -> None:
    """Parse the exact argv with ``--help`` appended (in this process: the imports are
    shared): a renamed flag fails here, not on the GPU machine."""
    monkeypatch.setattr(sys, "argv", [step.argv[1], *step.argv[2:], "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / step.argv[1]), run_name="__main__")
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_a_missing_prerequisite_is_a_skip_with_its_reason() -> None:
    step = gpu_check.Step("x", [sys.executable, "-c", "raise SystemExit(3)"],
                          ("no_such_module_here",))
    result = gpu_check.run(step)
    assert result == {"step": "x", "status": "skipped",
                      "reason": "not installed: ['no_such_module_here']"}


def test_a_failing_step_is_recorded_as_failed_with_its_output() -> None:
    step = gpu_check.Step("y", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"])
    result = gpu_check.run(step)
    assert result["status"] == "failed" and result["rc"] == 3 and "boom" in result["tail"]
