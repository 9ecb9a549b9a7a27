"""Loopback deployment: a real ``flower-superlink`` and N ``flower-supernode`` processes
talking gRPC (Fleet API, grpc-rere) on 127.0.0.1, then ``flwr run <app> <connection>``.

    python scripts/deploy_local.py --clients 2 -- model=tiny-llama run.num_rounds=2
    python scripts/deploy_local.py --tls --auth --clients 2 -- run.num_rounds=2

(``scripts/deploy_local.py`` runs :func:`main`; tests drive the pieces directly.)

The SuperLink keeps its state in a SQLite file (``--database``), so SuperNodes survive a
SuperLink restart. ``--tls`` makes a CA and a server certificate for 127.0.0.1 with
:mod:`fedpeft.pki` and serves the Fleet and Control APIs over TLS; ``--auth`` also gives
each SuperNode an ECDSA key, registers it with ``flwr supernode register`` and turns on
SuperNode authentication; ``--unregistered K`` starts K more nodes whose keys were never
registered, alternately with a key the SuperLink never saw and with no key (it must
refuse both). Every process started here runs in a private
:class:`~fedpeft.procs.RunWorkspace` and is stopped on exit, on error, on Ctrl-C and on
SIGTERM. Exit status is 0 only if the run's ``status.json`` says it completed (``flwr
run`` can exit 0 on a failed run).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fedpeft.launch import (
    run_config_string,
    run_guarded,
    settle_status,
    stop_state,
    wait_final,
    write_connection,
)
from fedpeft.pki import Deployment, make_deployment
from fedpeft.procs import RunWorkspace, free_port, tool_path, wait_port
from fedpeft.reporting import RunDir

ROOT = Path(__file__).resolve().parent.parent  # the app, when run from a checkout
CONNECTION = "fedpeft-local"


@dataclass
class Federation:
    """What one loopback federation was started with."""

    fleet: int
    api: int
    database: Path | None  # None: state in memory (nodes do not survive a restart)
    pki: Deployment | None = None
    auth: bool = False
    link: subprocess.Popen | None = None  # the SuperLink process now serving
    host: str = "127.0.0.1"  # the Fleet API's address (SuperNodes connect there)


def superlink_command(fed: Federation) -> list[str]:
    """``flower-superlink`` for ``fed``: persistent state, TLS and node auth as asked."""
    cmd = [tool_path("flower-superlink"), "--fleet-api-address", f"{fed.host}:{fed.fleet}",
           "--host", "127.0.0.1", "--port", str(fed.api),
           "--disable-runtime-dependency-installation"]
    if fed.database is not None:
        cmd += ["--database", str(fed.database)]
    if fed.pki is None:
        return [*cmd, "--insecure"]
    cmd += ["--ssl-ca-certfile", str(fed.pki.ca_cert), "--ssl-certfile",
            str(fed.pki.server_cert), "--ssl-keyfile", str(fed.pki.server_key)]
    return [*cmd, "--enable-supernode-auth"] if fed.auth else cmd


def supernode_command(fed: Federation, i: int, clients: int, keyed: bool = True) -> list[str]:
    """``flower-supernode`` number ``i`` (partition ``i`` of ``clients``); with node auth
    it signs with its key unless ``keyed`` is False."""
    cmd = [tool_path("flower-supernode"), "--superlink", f"{fed.host}:{fed.fleet}", "--port",
           str(free_port()), "--node-config", f"partition-id={i % clients} "
           f"num-partitions={clients}"]
    if fed.pki is None:
        return [*cmd, "--insecure"]
    cmd += ["--root-certificates", str(fed.pki.ca_cert)]
    key = ["--auth-supernode-private-key", str(fed.pki.node_key(i))]
    return [*cmd, *key] if fed.auth and keyed else cmd


def start_superlink(ws: RunWorkspace, fed: Federation, logs: Path) -> None:
    """Start (or restart, on the same state file) the SuperLink of ``fed``."""
    fed.link = ws.start(superlink_command(fed), logs / "superlink.log")
    wait_port(fed.fleet, fed.link)
    wait_port(fed.api, fed.link)


def start_federation(ws: RunWorkspace, clients: int, logs: Path, *, tls: bool = False,
                     auth: bool = False, unregistered: int = 0) -> Federation:
    """SuperLink (Fleet gRPC + Control API on free ports), ``clients`` registered
    SuperNodes and ``unregistered`` ones that are not."""
    pki = make_deployment(ws.path / "pki", ["127.0.0.1"], clients + unregistered) if tls else None
    fed = Federation(free_port(), free_port(), ws.path / "superlink.db", pki, auth)
    start_superlink(ws, fed, logs)
    write_connection(ws.flwr_home, f"127.0.0.1:{fed.api}", CONNECTION,
                     pki.ca_cert if pki else None)
    for i in range(clients):
        if auth:
            register(ws, fed, i)
        ws.start(supernode_command(fed, i, clients), logs / f"supernode-{i}.log")
    for i in range(clients, clients + unregistered):  # alternately: a key never registered, none
        ws.start(supernode_command(fed, i, clients, keyed=(i - clients) % 2 == 0),
                 logs / f"unregistered-{i}.log")
    return fed


def register(ws: RunWorkspace, fed: Federation, i: int,
             wrap: Callable[[list[str]], list[str]] = list) -> None:
    """``flwr supernode register`` node ``i``'s public key with the SuperLink (the command
    wrapped by ``wrap``, e.g. to run it in another network namespace)."""
    cmd = wrap([tool_path("flwr"), "supernode", "register", str(fed.pki.node_public_key(i)),
                CONNECTION])
    done = subprocess.run(cmd, env=ws.env(), capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"registering SuperNode {i} failed: {done.stdout}{done.stderr}")


def run(args: argparse.Namespace) -> int:
    logs = Path(args.workdir or (Path(args.output_dir) / "deploy-logs")).resolve()
    logs.mkdir(parents=True, exist_ok=True)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-deploy"
    out = Path(args.output_dir).resolve()
    overrides = [*args.overrides, f"run.output_dir={out}", f"run.run_id={run_id}"]
    ws = RunWorkspace(prefix="fedpeft-deploy-")

    def body() -> int:
        start_federation(ws, args.clients, logs, tls=args.tls or args.auth, auth=args.auth,
                         unregistered=args.unregistered)
        cmd = [tool_path("flwr"), "run", str(args.app), CONNECTION, "--stream",
               "--run-config", f"overrides={run_config_string(overrides)}"]
        print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
        code = ws.start_foreground(cmd).wait(timeout=args.timeout)
        wait_final(RunDir(out / run_id))
        return code

    def cleanup() -> None:
        ws.stop()
        ws.remove()

    code, reason = run_guarded(body, cleanup)
    return finish(RunDir(out / run_id), code, reason, logs)


def finish(run_dir: RunDir, code: int | None, reason: str | None, logs: Path) -> int:
    status = settle_status(run_dir, code, reason) if run_dir.path.exists() else {
        "state": stop_state(reason), "error": reason or "the ServerApp never started"}
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
    p.add_argument("--tls", action="store_true", help="TLS with a CA made for this run")
    p.add_argument("--auth", action="store_true",
                   help="SuperNode authentication with registered keys (implies --tls)")
    p.add_argument("--unregistered", type=int, default=0,
                   help="also start this many SuperNodes that are not registered (alternately "
                        "with an unknown key and with none)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.unregistered and not args.auth:
        p.error(f"--unregistered {args.unregistered} needs --auth: without SuperNode "
                "authentication every node is accepted")
    return run(args)
