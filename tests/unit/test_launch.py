"""The launcher's signal handling and final status: SIGINT and SIGTERM both become
:class:`Interrupted`, and a run the user interrupted is ``interrupted`` even when its
server recorded the SIGTERM the launcher relayed to it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from fedpeft.launch import Interrupted, settle_status, signals_raise
from fedpeft.reporting import RunDir


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_become_interrupted_and_handlers_are_restored(sig: int) -> None:
    before = signal.getsignal(sig)
    with pytest.raises(Interrupted, match=signal.Signals(sig).name), signals_raise():
        os.kill(os.getpid(), sig)
    assert signal.getsignal(sig) is before


def test_interrupted_run_is_not_reported_as_a_server_failure(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.set_status("failed", error="the server received SIGTERM and stopped",
                   reason="signal", signal="SIGTERM")
    status = settle_status(run, 0, "interrupted by SIGINT while the run was in progress")
    assert status["state"] == "interrupted" and "SIGINT" in status["error"]
    run.set_status("failed", error="boom", reason="NothingTrained")
    assert settle_status(run, 0, "interrupted by SIGINT")["state"] == "failed"


def test_a_deployment_interrupted_before_its_server_started_exits_130(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C while the SuperNodes register: no run directory yet, still ``interrupted``
    (exit 130, so a benchmark looping over runs stops too); a failed start exits 1."""
    from fedpeft.deploy import finish

    never = RunDir(tmp_path / "never-started")
    assert finish(never, None, "interrupted by SIGINT while the run was in progress",
                  tmp_path) == 130
    assert finish(never, None, "TimeoutError: the SuperLink did not start", tmp_path) == 1
    assert "interrupted by SIGINT" in capsys.readouterr().err
