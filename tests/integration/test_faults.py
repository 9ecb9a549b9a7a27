"""Faults on a real loopback deployment (SuperLink with a state file + 3 SuperNodes over
gRPC, the run submitted with plain ``flwr run``), one after another on one federation:

1. ``kill -9`` of a SuperNode mid-round: the round completes with the other two, and
   the dead node is named (node id and partition) with the time it was given up;
2. ``kill -9`` of the SuperLink: Flower stops the ServerApp (its SuperExec parent dies),
   and ``status.json`` says ``failed``, naming the signal and the dead parent; the
   SuperLink restarts on the same ``--database``, the SuperNodes reconnect, and
   ``run.resume`` trains on both survivors;
3. SIGTERM to the resumed ServerApp: ``failed`` with the signal, ``fedpeft status``
   exits 1; a second resume completes the run.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from fedpeft.cli import main as cli
from fedpeft.deploy import CONNECTION, start_federation, start_superlink
from fedpeft.launch import run_config_string
from fedpeft.procs import RunWorkspace, tool_path
from fedpeft.reporting import RunDir
from tests.integration.conftest import leftovers, process_snapshot, tiny_overrides

pytestmark = pytest.mark.slow


def _wait(what: str, done: Callable[[], bool], timeout: float = 240) -> float:
    t0 = time.monotonic()
    while not done():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.5)
    return time.monotonic() - t0


def _kill_tree(pid: int) -> None:
    proc = psutil.Process(pid)
    for p in [proc, *proc.children(recursive=True)]:
        p.kill()


def _submit(ws: RunWorkspace, app: Path, overrides: list[str]) -> None:
    cmd = [tool_path("flwr"), "run", str(app), CONNECTION, "--run-config",
           f"overrides={run_config_string(overrides)}"]
    done = subprocess.run(cmd, env=ws.env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _rounds(run: RunDir, n: int) -> Callable[[], bool]:
    return lambda: len(run.records()) > n


def _server(run: RunDir) -> psutil.Process:
    """The ServerApp process that wrote the current status."""
    server = psutil.Process(run.status()["pid"])
    assert "flwr-serverapp" in " ".join(server.cmdline())
    return server


def test_node_crash_superlink_restart_sigterm_then_resume(tmp_path: Path,
                                                          app_dir: Path) -> None:
    out, logs = tmp_path / "runs", tmp_path / "logs"
    logs.mkdir()
    overrides = [*tiny_overrides(out, "faults"), "strategy.min_train_nodes=2",
                 "strategy.min_available_nodes=2", "run.num_rounds=4"]
    run = RunDir(out / "faults")
    failed = lambda: run.status()["state"] == "failed"  # noqa: E731
    before, ws = process_snapshot(), RunWorkspace(prefix="fedpeft-faults-")
    try:
        fed = start_federation(ws, 3, logs)
        _submit(ws, app_dir, overrides)
        _wait("round 1", _rounds(run, 1))
        _kill_tree(ws.started[3].pid)  # SuperNode of partition 2, while round 2 runs
        node_s = _wait("round 2 without the dead node", _rounds(run, 2))

        fed.link.kill()  # kill -9 of the SuperLink while round 3 runs
        fed.link.wait()
        time.sleep(2)
        start_superlink(ws, fed, logs)  # on the same --database
        _wait("round 3 or a truthful end", lambda: _rounds(run, 3)() or failed())
        crashed = run.status() if failed() else None
        if crashed is not None:  # Flower stopped the ServerApp with its SuperExec
            _submit(ws, app_dir, [*overrides, f"run.resume={run.path}"])
            _wait("round 3 of the resumed run", _rounds(run, 3))

        _server(run).send_signal(signal.SIGTERM)  # round 4 is in progress
        _wait("the signal in status.json", failed, timeout=60)
        stopped, code = run.status(), cli(["status", str(run.path)])
        _submit(ws, app_dir, [*overrides, f"run.resume={run.path}"])
        _wait("the run's completion", lambda: run.status()["state"] == "completed")
    finally:
        ws.stop()
        ws.remove()
    records = run.records()
    dead = records[2]
    assert dead["num_clients"] == 2 and dead["num_rejected"] == 1, dead
    (node, reason), = dead["rejected"].items()
    assert node != "1" and f"SuperLink for node {node}" in reason, reason
    assert [e["partition"] for e in dead["excluded"]] == [2]
    if crashed is not None:
        assert crashed["reason"] == "signal" and "parent process" in crashed["error"], crashed
    assert stopped["signal"] == "SIGTERM" and "SIGTERM" in stopped["error"] and code == 1
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4], records
    assert all(r["num_clients"] == 2 for r in records[3:])  # both survivors, after restart
    assert leftovers(before) == []
    after = crashed["error"] if crashed else "the ServerApp went on with the restarted SuperLink"
    print(f"round 2 ended {node_s:.1f}s after the node was killed: {reason}; SuperLink "
          f"kill -9: {after}")
