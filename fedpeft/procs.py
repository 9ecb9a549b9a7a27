"""The processes a local run starts, in a private workspace, and stopping every one of them.

A simulation or loopback deployment starts a SuperLink, which starts a SuperExec, which
starts the simulation process, which starts Ray (GCS, raylet, workers). Some of them
detach into their own sessions and outlive their parents, and Ray by default joins
whatever cluster an old ``ray_current_cluster`` file names. :class:`RunWorkspace`
therefore gives each run:

- a private temp directory (short, so Ray's Unix socket paths fit) that holds
  ``FLWR_HOME`` and Ray's temp dir, and is removed at the end;
- an environment in which Ray starts its own instance (``RAY_ADDRESS=local``) unless the
  run names a cluster (``sim.ray_address``, :mod:`fedpeft.cluster`),
  every Flower executable resolves to this interpreter's environment, and a unique
  marker variable is inherited by every descendant;
- :meth:`RunWorkspace.stop`, which finds the run's processes by PID tree *and* by the
  marker (so re-parented, detached ones are found too), sends SIGTERM, waits a grace
  period and SIGKILLs what is left. Processes without the marker are never touched.

psutil does the process-table reads; the escalation policy is ours.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from fedpeft.cluster import ray_env

MARKER_ENV = "FEDPEFT_RUN_WORKSPACE"
# Ray's socket paths under its temp dir add ~70 characters; Unix sockets allow 107.
_MAX_BASE_LEN = 24


def env_bin_dir() -> Path:
    """The directory holding this interpreter and its environment's console scripts."""
    return Path(sys.executable).parent


def tool_path(name: str) -> str:
    """A console script of this environment (next to the interpreter) or from PATH."""
    local = env_bin_dir() / name
    return str(local) if local.exists() else name


def temp_base() -> Path:
    """Where run workspaces go: ``$TMPDIR`` when short enough for Ray's sockets, else /tmp."""
    base = os.environ.get("TMPDIR") or tempfile.gettempdir()
    return Path(base) if len(base) <= _MAX_BASE_LEN else Path("/tmp")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class RunWorkspace:
    """Private temp space, environment and process bookkeeping of one local run."""

    def __init__(self, prefix: str = "fedpeft-", ray_address: str | None = None) -> None:
        self.ray_address = ray_address  # None: a private Ray instance (fedpeft.cluster)
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=temp_base()))
        self.flwr_home = self.path / "flwr_home"
        self.flwr_home.mkdir()
        self.started: list[subprocess.Popen] = []

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for every process of the run (see module docstring)."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = os.pathsep.join([str(env_bin_dir()), env.get("PATH", "")])
        env.update({MARKER_ENV: str(self.path), "FLWR_HOME": str(self.flwr_home),
                    **ray_env(self.ray_address)})
        if self.ray_address is None:
            env["RAY_TMPDIR"] = str(self.path)
        env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        return env

    def start(self, cmd: list[str], log: Path | None = None) -> subprocess.Popen:
        """Start ``cmd`` in its own session with the run's environment; output to ``log``."""
        out = log.open("ab") if log else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    env=self.env(), start_new_session=True)
        finally:
            if log:
                out.close()  # type: ignore[union-attr]
        self.started.append(proc)
        return proc

    def start_foreground(self, cmd: list[str]) -> subprocess.Popen:
        """Start ``cmd`` with the run's environment, printing to this console."""
        proc = subprocess.Popen(cmd, env=self.env(), start_new_session=True)
        self.started.append(proc)
        return proc

    def members(self) -> list[psutil.Process]:
        """Every live process of this run: started ones, their descendants, and any
        process whose environment carries this run's marker."""
        found: dict[int, psutil.Process] = {}
        for proc in self.started:
            for p in _tree(proc.pid):
                found[p.pid] = p
        for p in marked_processes(str(self.path)):
            found[p.pid] = p
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self, grace_s: float = 5.0) -> list[int]:
        """SIGTERM every member, SIGKILL those alive after ``grace_s``; PIDs signalled."""
        procs = self.members()
        _signal_all(procs, signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        _signal_all(alive, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5)
        late = self.members()  # anything spawned while we were stopping
        _signal_all(late, signal.SIGKILL)
        for proc in self.started:
            _reap(proc)
        return sorted({p.pid for p in procs + late})

    def remove(self) -> None:
        """Delete the workspace (after :meth:`stop`)."""
        shutil.rmtree(self.path, ignore_errors=True)


def marked_processes(marker: str) -> list[psutil.Process]:
    """Processes whose environment has ``MARKER_ENV == marker`` (unreadable ones skipped)."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARKER_ENV) == marker and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            continue


def _reap(proc: subprocess.Popen) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1)


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0,
              host: str = "127.0.0.1") -> None:
    """Wait until ``proc`` listens on ``port``; fail if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{Path(str(proc.args[0])).name} exited with code "
                               f"{proc.returncode} before listening on port {port}")
        if port_open(host, port, timeout=0.2):
            return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} not listening after {timeout:.0f}s")
