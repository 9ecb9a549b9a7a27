"""Runs that go wrong end ``failed`` or ``interrupted`` with the reason, never hang, and
leave no process behind: a stale Ray cluster file, clients that all raise, a client that
never answers, SIGINT/SIGTERM during round 1, and the loopback deployment script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fedpeft.procs import port_open, tool_path, wait_port
from fedpeft.reporting import RunDir
from tests.integration.conftest import leftovers, process_snapshot, tiny_overrides
from tests.plugins import faulty

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
FLWR_LOCAL_PORT = 39091  # plain `flwr run`'s managed local SuperLink


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short TMPDIR (Ray's socket paths must fit) that the test owns."""
    path = Path(tempfile.mkdtemp(prefix="fpt-", dir="/tmp"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def _foreign_path() -> str:
    """PATH without this environment's bin directory: the run must still use its own
    Flower executables (a user calling .venv/bin/fedpeft without activating the venv)."""
    mine = str(Path(sys.executable).parent)
    return os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and p != mine)


def _simulate(out: Path, run_id: str, *extra: str, tmp: Path | None = None,
              **kw: object) -> subprocess.Popen:
    env = {**os.environ, "FEDPEFT_PLUGINS": faulty.PATH, "HF_HUB_OFFLINE": "1",
           "PATH": _foreign_path()}
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", *tiny_overrides(out, run_id),
           "sim.num_clients=2", "sim.client_cpus=1", "run.num_rounds=1", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the CLI stops every process of its run on SIGTERM
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out = "(no output: the CLI did not stop)"
        pytest.fail(f"run did not finish within {timeout:.0f}s:\n{out[-3000:]}")
    return out


def _wait_round_one(run: RunDir, proc: subprocess.Popen, timeout: float = 240) -> float:
    """Block until round 1 is in progress (round 0 recorded); return that time."""
    deadline = time.monotonic() + timeout
    while not run.records():
        assert proc.poll() is None, "run ended before round 1"
        assert time.monotonic() < deadline, "round 1 never started"
        time.sleep(0.5)
    return time.monotonic()


@pytest.fixture
def foreign_superlink(tmp_path: Path) -> Iterator[Path]:
    """Another checkout's SuperLink on the port a plain `flwr run` would use; its log."""
    if port_open("127.0.0.1", FLWR_LOCAL_PORT):
        pytest.skip(f"port {FLWR_LOCAL_PORT} is already in use")
    log = tmp_path / "foreign-superlink.log"
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "foreign-home"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with log.open("w") as fh:
        link = subprocess.Popen([tool_path("flower-superlink"), "--insecure", "--simulation",
                                 "--host", "127.0.0.1", "--port", str(FLWR_LOCAL_PORT)],
                                env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    wait_port(FLWR_LOCAL_PORT, link)
    time.sleep(3)  # its SuperExec starts too; both predate the test's process snapshot
    yield log
    for proc in psutil.Process(link.pid).children(recursive=True):
        proc.kill()
    link.kill()
    link.wait()


def test_clients_that_all_raise_fail_the_run_despite_stale_ray_and_foreign_superlink(
        tmp_path: Path, short_tmp: Path, foreign_superlink: Path) -> None:
    """A stale Ray cluster file and a foreign SuperLink on Flower's default port do not
    touch the run (its clients do run: they raise); the run ends ``failed`` with the
    client's error, one error line and no traceback per client, and nothing is left."""
    stale = short_tmp / "ray" / "ray_current_cluster"
    stale.parent.mkdir()
    stale.write_text("127.0.0.1:1")  # a closed port: a plain ray.init() hangs joining it
    before, stat = process_snapshot(), stale.stat()
    proc = _simulate(tmp_path / "runs", "fail", "method.name=fail", tmp=short_tmp)

    out = _finish(proc, timeout=400)

    assert proc.returncode == 1, out[-3000:]
    status = RunDir(tmp_path / "runs" / "fail").status()
    assert status["state"] == "failed"
    assert "injected failure in local training" in status["first_client_error"]
    assert "no client update was accepted" in status["error"]
    final = [line for line in out.splitlines() if line.startswith("fedpeft: error:")]
    assert len(final) == 1 and "injected failure" in final[0]
    assert out.count("Traceback") == 0, out[-4000:]  # no traceback per client
    assert "start-run" not in foreign_superlink.read_text()  # submitted to its own
    assert stale.read_text() == "127.0.0.1:1" and stale.stat().st_mtime == stat.st_mtime
    assert sorted(p.name for p in short_tmp.iterdir()) == ["ray"]  # workspace removed
    assert leftovers(before) == []


def test_stalled_client_fails_the_run_naming_phase_and_silent_nodes(tmp_path: Path) -> None:
    before = process_snapshot()
    proc = _simulate(tmp_path / "runs", "stall", "method.name=stall", "run.stall_timeout_s=10")
    run = RunDir(tmp_path / "runs" / "stall")
    started = _wait_round_one(run, proc)

    out = _finish(proc, timeout=10 + 30 + 30)

    assert time.monotonic() - started < 10 + 30
    assert proc.returncode == 1
    status = run.status()
    assert status["state"] == "failed" and "stalled in phase 'train'" in status["error"]
    assert "silent nodes [" in status["error"] and "silent nodes [" in out
    assert leftovers(before) == []


def test_signal_during_round_one_stops_every_process(tmp_path: Path) -> None:
    """SIGTERM (SIGINT takes the same handler: tests/unit/test_launch.py) to the CLI."""
    sig = signal.SIGTERM
    before = process_snapshot()
    proc = _simulate(tmp_path / "runs", "sig", "method.name=stall")
    run = RunDir(tmp_path / "runs" / "sig")
    _wait_round_one(run, proc)
    time.sleep(2)

    proc.send_signal(sig)
    _finish(proc, timeout=60)

    assert proc.returncode == 130
    status = run.status()
    assert status["state"] == "interrupted"
    assert signal.Signals(sig).name in status["error"]
    assert leftovers(before) == []


def test_deploy_local_stops_everything_when_clients_fail(tmp_path: Path) -> None:
    before = process_snapshot()
    out = tmp_path / "runs"
    overrides = [o for o in tiny_overrides(out, "x") if not o.startswith(("run.run_id",
                                                                           "run.output_dir"))]
    cmd = [sys.executable, str(ROOT / "scripts" / "deploy_local.py"), "--clients", "2",
           "--output-dir", str(out), "--workdir", str(tmp_path / "logs"), "--timeout", "400",
           "--", *overrides, "method.name=fail", "run.num_rounds=1"]
    env = {**os.environ, "FEDPEFT_PLUGINS": faulty.PATH}

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)

    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed"
    assert "injected failure" in status["first_client_error"]
    assert leftovers(before) == []


def test_krum_excludes_the_scaled_client_by_partition_every_round(tmp_path: Path) -> None:
    proc = _simulate(tmp_path / "runs", "krum", "method.name=scaled", "strategy=krum",
                     "strategy.num_malicious_nodes=1", "sim.num_clients=5",
                     "run.num_rounds=2")

    out = _finish(proc, timeout=600)

    assert proc.returncode == 0, out[-3000:]
    records = RunDir(tmp_path / "runs" / "krum").records()
    assert [r["round"] for r in records] == [0, 1, 2]
    for rec in records[1:]:
        krum = {e["partition"]: e for e in rec["excluded"] if e["by"] == "krum"}
        assert 0 in krum, rec["excluded"]
        assert "Krum score" in krum[0]["reason"] and krum[0]["round"] == rec["round"]
        assert len(krum) == 4  # Krum keeps exactly one of the 5 updates
