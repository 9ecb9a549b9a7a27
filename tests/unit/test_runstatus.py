"""Run status tells a live run from a dead one: pid, host, process start time and a
heartbeat are recorded, a signal ends the run as ``failed`` naming it, and
``fedpeft status`` maps the verdict to its exit code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from fedpeft.cli import main as cli
from fedpeft.reporting import RunDir
from fedpeft.runstatus import StatusWriter, verdict

ROOT = Path(__file__).resolve().parents[2]


def _status(tmp_path: Path, **fields: object) -> Path:
    run = RunDir(tmp_path / "r")
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_json("status.json", fields)
    return run.path


def test_writer_records_identity_and_beats(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    writer = StatusWriter(run, heartbeat_s=0.05)
    writer.set("running", start_round=0)
    first = run.status()["heartbeat"]
    writer.start_heartbeat()
    time.sleep(0.3)
    status = run.status()
    assert status["pid"] == os.getpid() and status["start_round"] == 0
    assert status["heartbeat"] > first
    assert verdict(status) == ("running", verdict(status)[1])
    writer.set("completed", rounds=3)
    time.sleep(0.2)
    assert run.status()["state"] == "completed" and "rounds" in run.status()


def test_stale_heartbeat_of_a_live_pid_is_dead(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    writer = StatusWriter(run, heartbeat_s=1.0)
    writer.set("running")
    status = run.status()
    assert verdict(status, now=status["heartbeat"] + 5)[0] == "running"
    state, why = verdict(status, now=status["heartbeat"] + 7)
    assert state == "dead" and "heartbeat" in why


def test_a_pid_that_is_gone_or_reused_is_dead(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    StatusWriter(run).set("running")
    mine = run.status()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    state, why = verdict({**mine, "pid": child.pid})
    assert state == "dead" and str(child.pid) in why
    assert verdict({**mine, "pid_started": mine["pid_started"] - 100})[0] == "dead"
    assert verdict({**mine, "host": "elsewhere", "pid": child.pid})[0] == "running"


def test_sigterm_ends_the_run_failed_naming_the_signal(tmp_path: Path) -> None:
    """A real process whose previous SIGTERM handler raises SystemExit(0), as Flower's
    ``flwr-serverapp`` does: the status names SIGTERM, not ``SystemExit: 0``."""
    code = textwrap.dedent(f"""
        import signal, sys, time
        from pathlib import Path
        from fedpeft.reporting import RunDir
        from fedpeft.runstatus import StatusWriter
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        w = StatusWriter(RunDir(Path({str(tmp_path)!r})))
        w.install_signal_handlers()
        w.set("running")
        try:
            time.sleep(60)
        except BaseException as exc:
            w.set("failed", error=repr(exc))
            raise
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    deadline = time.monotonic() + 30
    while RunDir(tmp_path).status().get("state") != "running":
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    status = RunDir(tmp_path).status()
    assert status["state"] == "failed" and status["signal"] == "SIGTERM"
    assert "SIGTERM" in status["error"] and "SystemExit" not in status["error"]


def test_a_signal_after_completion_leaves_completed(tmp_path: Path) -> None:
    """A deployment stops the federation right after the run ends; the ServerApp may
    still be exiting then and get SIGTERM: the run stays ``completed``."""
    w = StatusWriter(RunDir(tmp_path))
    w.set("running")
    w.set("completed", rounds=2)
    w.on_signal(signal.SIGTERM)
    status = RunDir(tmp_path).status()
    assert status["state"] == "completed" and "signal" not in status


def test_status_command_exit_codes(tmp_path: Path, capsys) -> None:
    assert cli(["status", str(_status(tmp_path, state="completed", rounds=2))]) == 0
    assert cli(["status", str(_status(tmp_path, state="failed", error="boom"))]) == 1
    assert "boom" in capsys.readouterr().out
    old = {"state": "running", "heartbeat": time.time() - 3600, "heartbeat_s": 5}
    assert cli(["status", str(_status(tmp_path, **old)), "--json"]) == 3
    assert json.loads(capsys.readouterr().out)["verdict"] == "dead"
    fresh = {**old, "heartbeat": time.time()}
    assert cli(["status", str(_status(tmp_path, **fresh))]) == 4
    assert cli(["status", str(tmp_path / "nope")]) == 2
