#!/usr/bin/env python3
"""Loopback deployment: a real ``flower-superlink`` and N ``flower-supernode`` processes
talking gRPC (Fleet API, grpc-rere) on 127.0.0.1, then ``flwr run <app> <connection>``.

    python scripts/deploy_local.py --clients 2 -- model=tiny-llama run.num_rounds=2

Every process started here (SuperLink, SuperNodes, their SuperExecs and app processes)
runs in a private :class:`~fedpeft.procs.RunWorkspace` and is stopped on exit, on error,
on Ctrl-C and on SIGTERM. Exit status is 0 only if the run's ``status.json`` says it
completed (``flwr run`` can exit 0 on a failed run). Insecure (no TLS) by design: it is
a local smoke test; see README for TLS and SuperNode authentication flags.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from fedpeft.launch import (
    Interrupted,
    run_config_string,
    settle_status,
    signals_ignored,
    signals_raise,
    write_connection,
)
from fedpeft.procs import RunWorkspace, free_port, tool_path, wait_port
from fedpeft.reporting import RunDir

ROOT = Path(__file__).resolve().parent.parent


def start_federation(ws: RunWorkspace, clients: int, logs: Path) -> None:
    """SuperLink (Fleet gRPC + HTTP API on free ports) and ``clients`` SuperNodes."""
    fleet, api = free_port(), free_port()
    link = ws.start([tool_path("flower-superlink"), "--insecure", "--fleet-api-address",
                     f"127.0.0.1:{fleet}", "--host", "127.0.0.1", "--port", str(api),
                     "--disable-runtime-dependency-installation"], logs / "superlink.log")
    wait_port(fleet, link)
    wait_port(api, link)
    for i in range(clients):
        ws.start([tool_path("flower-supernode"), "--insecure", "--superlink",
                  f"127.0.0.1:{fleet}", "--port", str(free_port()), "--node-config",
                  f"partition-id={i} num-partitions={clients}"], logs / f"supernode-{i}.log")
    write_connection(ws.flwr_home, f"127.0.0.1:{api}")


def run(args: argparse.Namespace) -> int:
    logs = Path(args.workdir or (Path(args.output_dir) / "deploy-logs")).resolve()
    logs.mkdir(parents=True, exist_ok=True)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-deploy"
    out = Path(args.output_dir).resolve()
    overrides = [*args.overrides, f"run.output_dir={out}", f"run.run_id={run_id}"]
    ws, code, reason = RunWorkspace(prefix="fedpeft-deploy-"), None, None
    try:
        with signals_raise():
            start_federation(ws, args.clients, logs)
            cmd = [tool_path("flwr"), "run", str(args.app), "fedpeft-local", "--stream",
                   "--run-config", f"overrides={run_config_string(overrides)}"]
            print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
            proc = ws.start_foreground(cmd)
            code = proc.wait(timeout=args.timeout)
    except Interrupted as exc:
        reason = f"interrupted by {exc} while the run was in progress"
    except Exception as exc:  # a failed start or a timeout still stops everything
        reason = f"{type(exc).__name__}: {exc}"
    finally:
        with signals_ignored():
            ws.stop()
            ws.remove()
    return _check(RunDir(out / run_id), code, reason, logs)


def _check(run_dir: RunDir, code: int | None, reason: str | None, logs: Path) -> int:
    status = settle_status(run_dir, code, reason) if run_dir.path.exists() else {
        "state": "failed", "error": reason or "the ServerApp never started"}
    if status.get("state") != "completed":
        print(f"deployment run failed (flwr exit {code}); status: {status}; logs in {logs}",
              file=sys.stderr)
        return 130 if status.get("state") == "interrupted" else 1
    print(f"deployment run completed; metrics in {run_dir.metrics_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--app", default=str(ROOT))
    p.add_argument("--output-dir", default="runs")
    p.add_argument("--workdir", default=None, help="where logs go (default: <output-dir>/"
                   "deploy-logs)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("overrides", nargs="*")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
