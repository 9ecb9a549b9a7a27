from __future__ import annotations

import os
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
