"""``fedpeft`` command line: validate a config, or run a simulation and fail loudly.

``fedpeft simulate [hydra overrides...]`` validates the composed config in-process
(milliseconds), then launches the app with ``flwr run <app> --stream`` (a real local
SuperLink + simulation engine) and finally checks the run's ``status.json``: ``flwr run``
can exit 0 when the run failed, this command does not.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from fedpeft.config import compose
from fedpeft.errors import FedPeftError, RunFailed
from fedpeft.reporting import RunDir, check_completed
from fedpeft.schema import to_dict


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedpeft", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a Flower simulation (flwr run)")
    sim.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. strategy=fedadam")
    sim.add_argument("--app", default=".", help="Flower app directory (default: .)")
    val = sub.add_parser("validate", help="compose + validate a config and print it")
    val.add_argument("overrides", nargs="*")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "validate":
            import json

            print(json.dumps(to_dict(compose(args.overrides)), indent=2, default=str))
            return 0
        return simulate(args.overrides, Path(args.app))
    except FedPeftError as exc:
        print(f"fedpeft: error: {exc}", file=sys.stderr)
        return 2


def simulate(overrides: list[str], app: Path) -> int:
    """Validate, run ``flwr run`` and check the run completed (exit code 0 only then)."""
    cfg = compose(overrides)
    run_id = cfg.run.run_id or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + (
        f"-{cfg.method.name}-{cfg.strategy.name}")
    out = Path(cfg.run.output_dir).expanduser().resolve()
    if cfg.run.resume:
        run = RunDir(Path(cfg.run.resume).expanduser().resolve())
    else:
        run = RunDir(out / run_id)
    full = [*overrides, f"run.output_dir={out}", f"run.run_id={run_id}"]
    code = subprocess.call(flwr_run_command(app, full, cfg.sim), env=_env())
    try:
        check_completed(run)
    except RunFailed as exc:
        print(f"fedpeft: error: {exc} (flwr run exit code {code})", file=sys.stderr)
        return 1
    print(f"fedpeft: run completed; metrics in {run.metrics_path}")
    return 0


def flwr_run_command(app: Path, overrides: list[str], sim: object) -> list[str]:
    """The ``flwr run`` invocation for a local simulation with ``overrides``."""
    fed = (f"num_supernodes={sim.num_clients} client_resources_num_cpus={sim.client_cpus} "
           f"client_resources_num_gpus={sim.client_gpus}")
    config = f"overrides={run_config_string(overrides)}"
    return [tool_path("flwr"), "run", str(app), "--stream", "--run-config", config,
            "--federation-config", fed]


def run_config_string(overrides: list[str]) -> str:
    """``overrides`` as one TOML basic string that ``flwr run --run-config`` accepts.

    Flower's parser takes a quoted value only if it contains no quote character, so the
    shell-quoted override line is escaped with TOML's \\u0022 for every double quote; the
    apps get back the exact text and ``shlex.split`` recovers each override unchanged.
    """
    text = shlex.join(overrides)
    return '"' + text.replace("\\", "\\\\").replace('"', "\\u0022") + '"'


def tool_path(name: str) -> str:
    """A console script of this environment (next to the interpreter) or from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


if __name__ == "__main__":
    raise SystemExit(main())
