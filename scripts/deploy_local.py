#!/usr/bin/env python3
"""Loopback deployment: a real ``flower-superlink`` and N ``flower-supernode`` processes
talking gRPC (Fleet API, grpc-rere) on 127.0.0.1, then ``flwr run <app> <connection>``.

    python scripts/deploy_local.py --clients 2 -- model=tiny-llama run.num_rounds=2

Everything started here is stopped on exit. Exit status is 0 only if the run's
``status.json`` says it completed (``flwr run`` can exit 0 on a failed run).
Insecure (no TLS) by design: it is a local smoke test; see README for TLS and
SuperNode authentication flags.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

from fedpeft.cli import run_config_string, tool_path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} not listening after {timeout:.0f}s")


def start(cmd: list[str], log: Path, env: dict[str, str], stack: ExitStack) -> subprocess.Popen:
    fh = stack.enter_context(log.open("w"))
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    stack.callback(_stop, proc)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_connection(flwr_home: Path, control_port: int) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "local-deployment"\n\n'
        f'[superlink.local-deployment]\naddress = "127.0.0.1:{control_port}"\ninsecure = true\n'
    )


def run(args: argparse.Namespace) -> int:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fedpeft-deploy-"))
    work.mkdir(parents=True, exist_ok=True)
    fleet, control = free_port(), free_port()
    env = {**os.environ, "FLWR_HOME": str(work / "flwr_home"), "HF_HUB_OFFLINE": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    write_connection(work / "flwr_home", control)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-deploy"
    out = Path(args.output_dir).resolve()
    overrides = [*args.overrides, f"run.output_dir={out}", f"run.run_id={run_id}"]
    with ExitStack() as stack:
        link = start([tool_path("flower-superlink"), "--insecure", "--fleet-api-address",
                      f"127.0.0.1:{fleet}", "--host", "127.0.0.1", "--port", str(control),
                      "--disable-runtime-dependency-installation"],
                     work / "superlink.log", env, stack)
        wait_port(fleet, link)
        wait_port(control, link)
        for i in range(args.clients):
            start([tool_path("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{fleet}",
                   "--port", str(free_port()), "--node-config",
                   f"partition-id={i} num-partitions={args.clients}"],
                  work / f"supernode-{i}.log", env, stack)
        cmd = [tool_path("flwr"), "run", str(args.app), "local-deployment", "--stream",
               "--run-config", f"overrides={run_config_string(overrides)}"]
        print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
        code = subprocess.call(cmd, env=env, timeout=args.timeout)
    return _check(out / run_id, code, work)


def _check(run_dir: Path, code: int, work: Path) -> int:
    status = run_dir / "status.json"
    state = status.read_text() if status.exists() else "missing"
    if '"completed"' not in state:
        print(f"deployment run failed (flwr exit {code}); status: {state}; logs in {work}",
              file=sys.stderr)
        return 1
    print(f"deployment run completed; metrics in {run_dir / 'metrics.jsonl'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--app", default=str(ROOT))
    p.add_argument("--output-dir", default="runs")
    p.add_argument("--workdir", default=None, help="logs + FLWR_HOME (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("overrides", nargs="*")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
