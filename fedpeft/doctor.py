"""``fedpeft doctor``: what on this machine could make a run hang or go to the wrong place.

Reports, without starting anything:

- stale Ray cluster files (``<tmp>/ray/ray_current_cluster``) and whether the address
  they name still answers: Ray's default ``ray.init()`` joins that cluster, and hangs
  when it is gone (fedpeft's own runs use a private Ray and are not affected);
- servers listening on Flower's default ports, with their process and environment:
  a plain ``flwr run`` would submit to them;
- whether ``flwr`` and ``flower-superlink`` on PATH are this interpreter's;
- where the next run's temp space goes (its ports are chosen free at start).

The same findings are printed as warnings at the start of every ``fedpeft simulate``.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from fedpeft.procs import env_bin_dir, port_open, temp_base

# Flower 1.39: runtime/control HTTP API, Fleet gRPC, legacy ServerAppIo/Control, and the
# managed local SuperLink of plain `flwr run`.
FLOWER_PORTS = (8000, 9091, 9092, 9093, 39091, 39093)
_TOOLS = ("flwr", "flower-superlink", "flower-supernode")


@dataclass(frozen=True)
class Finding:
    """One observation: ``ok``, ``warning`` (may bite plain flwr/Ray use) or ``problem``."""

    level: str
    message: str

    def __str__(self) -> str:
        return f"[{self.level}] {self.message}"


def diagnose() -> list[Finding]:
    """All findings (see module docstring)."""
    return [*ray_files(), *flower_listeners(), *tool_paths(), *flwr_home(), next_run()]


def ray_dirs() -> list[Path]:
    """Where Ray's default ``ray.init()`` would look for a current-cluster file."""
    bases = [os.environ.get("RAY_TMPDIR"), os.environ.get("TMPDIR"), "/tmp"]
    return list(dict.fromkeys(Path(b) / "ray" for b in bases if b))


def ray_files() -> list[Finding]:
    """Stale or live Ray cluster files."""
    out = []
    for folder in ray_dirs():
        path = folder / "ray_current_cluster"
        if path.is_file():
            address = path.read_text().strip()
            out.append(_ray_file(path, address))
    return out or [Finding("ok", "no Ray cluster file in " + ", ".join(map(str, ray_dirs())))]


def _ray_file(path: Path, address: str) -> Finding:
    host, _, port = address.rpartition(":")
    alive = port.isdigit() and port_open(host or "127.0.0.1", int(port))
    if alive:
        return Finding("warning", f"{path} names a running Ray cluster at {address}; a plain "
                       "ray.init() joins it (fedpeft runs start their own Ray)")
    return Finding("warning", f"stale Ray cluster file {path} names {address!r}, which does "
                   "not answer: plain Flower simulations hang joining it (fedpeft runs set "
                   f"RAY_ADDRESS=local and are not affected); remove it: rm {path}")


def flower_listeners() -> list[Finding]:
    """Processes listening on Flower's default ports, and whose they are."""
    out = []
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port in FLOWER_PORTS:
            out.append(_listener(conn.laddr.port, conn.pid))
    return out or [Finding("ok", "nothing listens on Flower's default ports "
                           f"{', '.join(map(str, FLOWER_PORTS))}")]


def _listener(port: int, pid: int | None) -> Finding:
    try:
        proc = psutil.Process(pid) if pid else None
        cmd = " ".join(proc.cmdline()) if proc else "unknown process"
    except psutil.Error:
        cmd = "unknown process"
    ours = str(env_bin_dir()) in cmd
    whose = "this environment" if ours else "another environment"
    return Finding("warning", f"port {port} is served by pid {pid} ({cmd[:160]}), from "
                   f"{whose}: a plain `flwr run` may submit to it; fedpeft simulate uses "
                   "its own SuperLink on a free port")


def tool_paths() -> list[Finding]:
    """Whether Flower's executables on PATH belong to this interpreter's environment."""
    out = []
    for tool in _TOOLS:
        found, mine = shutil.which(tool), env_bin_dir() / tool
        if found and Path(found).resolve() == mine.resolve():
            out.append(Finding("ok", f"{tool} on PATH is this environment's ({found})"))
        elif mine.exists():
            out.append(Finding("warning", f"{tool} on PATH is {found or 'missing'}, not this "
                               f"environment's {mine}; fedpeft runs use {mine} (activate the "
                               "environment for plain flwr commands)"))
        else:
            out.append(Finding("problem", f"{tool} is not installed next to {sys.executable}"))
    return out


def flwr_home() -> list[Finding]:
    """A ``FLWR_HOME`` inside the current (app) directory gets packed into plain uploads."""
    home = os.environ.get("FLWR_HOME")
    if not home or not Path(home).resolve().is_relative_to(Path.cwd().resolve()):
        return []
    return [Finding("warning", f"FLWR_HOME={home} is inside the app directory {Path.cwd()}: "
                    "a plain `flwr run .` may pack it into the app upload; move it out or "
                    "name it flwr_home/ (ignored); fedpeft simulate uses a private FLWR_HOME")]


def next_run() -> Finding:
    """Where the next run's temp space and ports come from."""
    return Finding("ok", f"next run: private workspace under {temp_base()} (FLWR_HOME and "
                   "Ray temp dir inside, removed at the end), SuperLink on a free 127.0.0.1 "
                   "port chosen at start, RAY_ADDRESS=local")


def warn_before_run() -> None:
    """Print the non-ok findings to stderr (start of every simulation)."""
    for finding in diagnose():
        if finding.level != "ok":
            print(f"fedpeft: {finding}", file=sys.stderr)
