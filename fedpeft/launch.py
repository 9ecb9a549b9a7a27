"""Launch one local simulation on a control plane of its own, watch it, stop all of it.

``fedpeft simulate`` never submits to a SuperLink it did not start: each run starts
``flower-superlink --simulation`` on a free port inside a :class:`RunWorkspace`, points a
private ``FLWR_HOME`` connection at it and runs ``flwr run <app> <that connection>``.
When ``flwr run`` returns, fails, or the user interrupts (SIGINT/SIGTERM), every
process of the run is stopped and the workspace removed. A run whose ServerApp never
writes its status within max(``run.stall_timeout_s``, 120 s) is stopped and marked failed, and a run
left ``running`` by a dead server is marked failed or interrupted with the reason.
"""

from __future__ import annotations

import shlex
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from fedpeft.errors import RunFailed
from fedpeft.procs import RunWorkspace, free_port, tool_path, wait_port
from fedpeft.reporting import RunDir

CONNECTION = "fedpeft-local"
_FINAL = ("completed", "failed", "interrupted")


class Interrupted(Exception):
    """The user (or a supervisor) sent SIGINT or SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def signals_raise() -> Iterator[None]:
    """Turn SIGINT/SIGTERM into :class:`Interrupted` inside the block."""

    def handler(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def signals_ignored() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM inside the block (so cleanup itself is not cut short)."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_guarded(body: Callable[[], int | None],
                cleanup: Callable[[], None]) -> tuple[int | None, str | None]:
    """``(exit code, None)`` of ``body`` run with SIGINT/SIGTERM raising, or ``(None,
    reason)`` when it was interrupted or failed; ``cleanup`` always runs, with the signals
    ignored so that stopping everything is not itself cut short."""
    code, reason = None, None
    try:
        with signals_raise():
            code = body()
    except Interrupted as exc:
        reason = f"interrupted by {exc} while the run was in progress"
    except Exception as exc:  # a failed start or a timeout still stops everything
        reason = f"{type(exc).__name__}: {exc}"
    finally:
        with signals_ignored():
            cleanup()
    return code, reason


def flwr_run_command(app: Path, overrides: list[str], sim: Any,
                     connection: str = CONNECTION) -> list[str]:
    """The ``flwr run`` invocation for a local simulation with ``overrides``."""
    fed = (f"num-supernodes={sim.num_clients} client-resources-num-cpus={sim.client_cpus} "
           f"client-resources-num-gpus={sim.client_gpus}")
    config = f"overrides={run_config_string(overrides)}"
    return [tool_path("flwr"), "run", str(app), connection, "--stream", "--run-config",
            config, "--federation-config", fed]


def run_config_string(overrides: list[str]) -> str:
    """``overrides`` as one TOML basic string that ``flwr run --run-config`` accepts.

    Flower's parser takes a quoted value only if it contains no quote character, so the
    shell-quoted override line is escaped with TOML's \\u0022 for every double quote; the
    apps get back the exact text and ``shlex.split`` recovers each override unchanged.
    """
    text = shlex.join(overrides)
    return '"' + text.replace("\\", "\\\\").replace('"', "\\u0022") + '"'


def write_connection(flwr_home: Path, address: str, name: str = CONNECTION,
                     root_certificates: Path | None = None) -> None:
    """A Flower CLI config whose only (and default) connection is ``address``: over TLS
    checked against ``root_certificates`` when given, else insecure."""
    tls = (f'root-certificates = "{root_certificates}"\n' if root_certificates
           else "insecure = true\n")
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n'
        f'[superlink.{name}]\naddress = "{address}"\n{tls}')


def start_superlink(ws: RunWorkspace, log: Path) -> int:
    """Start a simulation SuperLink of this run on a free port; return the port."""
    port = free_port()
    link = ws.start([tool_path("flower-superlink"), "--insecure", "--simulation",
                     "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port),
                     "--disable-runtime-dependency-installation"], log)
    wait_port(port, link)
    owner = listener_pid(port)
    if owner not in {p.pid for p in ws.members()}:
        raise RunFailed(f"port {port} is served by process {owner}, not by the SuperLink "
                        "this run started; refusing to submit to it")
    write_connection(ws.flwr_home, f"127.0.0.1:{port}")
    return port


def listener_pid(port: int) -> int | None:
    """PID listening on TCP ``port`` on this machine (None if unknown)."""
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            return conn.pid
    return None


def run_local(ws: RunWorkspace, cmd: list[str], run: RunDir, startup_s: float,
              exit_grace_s: float = 5.0) -> int | None:
    """Run ``flwr run`` to its end and return its exit code.

    Fails the run if its ServerApp never writes a status within ``startup_s``. Once the
    status is final, ``flwr run`` gets ``exit_grace_s`` to return: it streams until the
    simulation engine stops, which a hung client can prevent forever (None is returned
    and the caller stops everything).
    """
    proc = ws.start_foreground(cmd)
    t0, final_at = time.monotonic(), None
    while proc.poll() is None:
        state = run.status().get("state")
        if state in ("missing", "starting") and time.monotonic() - t0 > startup_s:
            raise RunFailed(f"the ServerApp did not start within {startup_s:g}s (the larger "
                            f"of run.stall_timeout_s and 120 s; {run.path / 'status.json'} "
                            "was not written); see the SuperLink log in the run directory's "
                            "logs/")
        if state in _FINAL:
            final_at = final_at or time.monotonic()
            if time.monotonic() - final_at > exit_grace_s:
                return None
        time.sleep(0.5)
    return int(proc.returncode)


def wait_final(run: RunDir, timeout_s: float = 60.0) -> None:
    """Give the ServerApp up to ``timeout_s`` to write its final status: ``flwr run``
    can return (its log stream closed) while the ServerApp is still saving and exiting,
    and stopping the federation then would kill it before it says ``completed``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and run.status().get("state") not in _FINAL:
        time.sleep(0.5)


def stop_state(reason: str | None) -> str:
    """The final state of a run that stopped for ``reason``: ``interrupted`` when the user
    stopped it (SIGINT/SIGTERM; callers exit 130), else ``failed``."""
    return "interrupted" if reason and reason.startswith("interrupted") else "failed"


def settle_status(run: RunDir, code: int | None, reason: str | None) -> dict[str, Any]:
    """The run's final status; a run left ``running``/``missing`` is marked with why."""
    status = run.status()
    stopped_by_us = reason is not None and reason.startswith("interrupted")
    if status.get("state") in _FINAL and not (stopped_by_us and status.get("reason") == "signal"):
        return status  # a server that died of the signal we relayed was interrupted
    if reason is None:
        reason = (f"the server process ended without a final status (flwr run exit code "
                  f"{code}); last state {status.get('state')!r}")
    state = stop_state(reason)
    run.path.mkdir(parents=True, exist_ok=True)
    run.set_status(state, error=reason)
    return run.status()
