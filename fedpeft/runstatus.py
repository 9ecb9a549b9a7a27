"""Truthful run status: the ServerApp's heartbeat, its signals, and a liveness verdict.

A ``status.json`` that says ``running`` proves nothing once the server process is gone
(``kill -9``, a crashed SuperLink that took its ServerApp with it, a lost machine). So
the ServerApp writes, through :class:`StatusWriter`:

- its pid, host name and process start time (so a reused pid is not mistaken for it);
- a ``heartbeat`` timestamp every ``HEARTBEAT_S`` seconds from a daemon thread;
- on SIGTERM/SIGINT, ``failed`` with the signal named, before Flower's own exit handler
  turns the signal into ``SystemExit(0)`` (which must not be reported as an error text).

:func:`verdict` reads a status back and says ``running``, ``completed``, ``failed``,
``interrupted`` or ``dead`` (pid gone on this host, or heartbeat older than
``STALE_BEATS`` beats); ``fedpeft status RUN_DIR`` prints it and exits with
:data:`EXIT_CODES`.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from fedpeft.reporting import RunDir

HEARTBEAT_S = 5.0
STALE_BEATS = 6  # a heartbeat older than 6 beats (30 s) means the server is gone
FINAL = ("completed", "failed", "interrupted")
EXIT_CODES = {"completed": 0, "failed": 1, "dead": 3, "running": 4, "starting": 4,
              "interrupted": 130, "missing": 2}


def process_identity(pid: int | None = None) -> dict[str, Any]:
    """pid, host and process start time of ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "host": socket.gethostname(),
            "pid_started": psutil.Process(pid).create_time()}


class StatusWriter:
    """Writes one run's ``status.json`` from several threads; beats while ``running``."""

    def __init__(self, run: RunDir, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.run, self.heartbeat_s = run, heartbeat_s
        self.current: dict[str, Any] = {}
        self.signal: str | None = None
        self._lock = threading.RLock()  # a signal handler may interrupt a write
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._parent: int | None = None

    def set(self, state: str, **info: Any) -> None:
        """Write ``state``; nothing after a signal has ended the run as failed."""
        with self._lock:
            if self.signal is not None:
                return
            now = time.time()
            self.current = {"state": state, **info, **process_identity(),
                            "heartbeat": now, "heartbeat_s": self.heartbeat_s}
            self.run.set_status(state, **{k: v for k, v in self.current.items()
                                          if k != "state"})
        if state in FINAL:
            self._stop.set()

    def beat(self) -> None:
        """Refresh the heartbeat of a ``running`` status."""
        with self._lock:
            if self.current.get("state") != "running":
                return
            self.current["heartbeat"] = time.time()
            self.run.write_json("status.json", {**self.current, "time": time.time()})

    def start_heartbeat(self) -> None:
        """Beat every ``heartbeat_s`` seconds on a daemon thread until a final state."""
        def loop() -> None:
            while not self._stop.wait(self.heartbeat_s):
                self.beat()

        self._thread = threading.Thread(target=loop, name="fedpeft-heartbeat", daemon=True)
        self._thread.start()

    def on_signal(self, signum: int) -> None:
        """Record that ``signum`` ended the run (the first signal wins; a signal after the
        run reached a final state changes nothing: it only stopped an exiting process). Flower's app
        processes send themselves SIGINT when their parent dies (a SuperLink or SuperExec
        killed), so a changed parent is named too."""
        name = signal.Signals(signum).name
        if self.current.get("state") in FINAL:  # the run had ended; the process was exiting
            return
        if self.signal is None:
            error = f"the server received {name} and stopped" + self._orphaned()
            self.set("failed", error=error, reason="signal", signal=name)
            with self._lock:
                self.signal = name

    def _orphaned(self) -> str:
        if self._parent is None or os.getppid() == self._parent:
            return ""
        return (f"; its parent process {self._parent} (the Flower process that started "
                "it: SuperExec or simulation runtime) had died, which makes Flower stop "
                "its apps")

    def install_signal_handlers(self) -> None:
        """Record SIGTERM/SIGINT in the status, then run the handler that was there
        (Flower's graceful exit in ``flwr-serverapp``); a no-op off the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._parent = os.getppid()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _chain(self.on_signal, signal.getsignal(sig)))


def _chain(record: Callable[[int], None], previous: Any) -> Callable[[int, Any], None]:
    def handler(signum: int, frame: Any) -> None:
        record(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
    return handler


def verdict(status: dict[str, Any], now: float | None = None) -> tuple[str, str]:
    """(state, why) for a status read back: a non-final state is ``dead`` when its
    process is gone from this host or its heartbeat is stale."""
    state = status.get("state", "missing")
    if state in FINAL or state == "missing":
        return state, status.get("error") or status.get("stopped") or ""
    gone = _process_gone(status)
    if gone:
        return "dead", gone
    return _heartbeat_verdict(state, status, time.time() if now is None else now)


def _heartbeat_verdict(state: str, status: dict[str, Any], now: float) -> tuple[str, str]:
    beat = status.get("heartbeat")
    if beat is None:
        return state, "no heartbeat recorded (written by an older fedpeft or a launcher)"
    limit = STALE_BEATS * float(status.get("heartbeat_s") or HEARTBEAT_S)
    age = now - float(beat)
    if age > limit:
        return "dead", (f"last heartbeat {age:.0f}s ago (stale after {limit:.0f}s); the "
                        f"server process on {status.get('host', '?')} stopped beating")
    return state, f"heartbeat {age:.0f}s ago"


def _process_gone(status: dict[str, Any]) -> str | None:
    """Why the recorded server process is known to be gone, or None if unknown/alive."""
    pid = status.get("pid")
    if pid is None or status.get("host") != socket.gethostname():
        return None
    try:
        started = psutil.Process(int(pid)).create_time()
    except psutil.NoSuchProcess:
        return f"server process {pid} is gone (status left {status.get('state')!r})"
    recorded = status.get("pid_started")
    if recorded is not None and abs(started - float(recorded)) > 1.0:
        return f"server process {pid} is gone (the pid now belongs to another process)"
    return None
