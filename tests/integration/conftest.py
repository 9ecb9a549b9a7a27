from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _kill_started_by(marker: str) -> None:
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if marker in cmdline and "flower-superlink" in cmdline:
            proc.kill()


@pytest.fixture
def flwr_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private FLWR_HOME; the local SuperLink `flwr run` starts there is stopped after."""
    home = tmp_path / "flwr_home"
    home.mkdir()
    monkeypatch.setenv("FLWR_HOME", str(home))
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield home
    _kill_started_by(str(home))


@pytest.fixture
def app_dir() -> Path:
    return ROOT


def tiny_overrides(out: Path, run_id: str) -> list[str]:
    return ["model=tiny-llama", "data.test_size=20", "data.max_examples=400",
            "method.local_steps=2", "method.batch_size=2", f"run.output_dir={out}",
            f"run.run_id={run_id}", "eval.batch_size=20"]


os.environ.setdefault("HF_HUB_OFFLINE", "1")


_RUN_PROCESS = ("flower-superlink", "flower-superexec", "flower-supernode", "flwr-simulation",
                "flwr-serverapp", "flwr-clientapp", "bin/flwr", "raylet", "gcs_server",
                "ray::", "default_worker.py", "dashboard", "log_monitor")


def process_snapshot() -> set[int]:
    """PIDs alive now (take before a run starts)."""
    return set(psutil.pids())


def leftovers(before: set[int], settle_s: float = 5.0) -> list[str]:
    """Run processes (Flower's, Ray's, or any carrying a run workspace marker) that
    appeared after ``before`` and are still alive ``settle_s`` seconds later."""
    from fedpeft.procs import MARKER_ENV

    time.sleep(settle_s)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.pid in before or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmd = " ".join(proc.info.get("cmdline") or [])
        try:
            marked = MARKER_ENV in proc.environ()
        except psutil.Error:
            marked = False
        if marked or any(tag in cmd for tag in _RUN_PROCESS):
            found.append(f"{proc.pid}: {cmd[:150]}")
    return found
