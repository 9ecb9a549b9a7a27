"""``fedpeft`` command line: check a config, check the machine, or run a simulation.

``fedpeft validate [overrides...]`` runs the preflight (config, partition, files, model,
node counts) and prints the composed tree; ``fedpeft doctor`` reports what could make a
run hang or attach to the wrong server; ``fedpeft simulate [overrides...]`` runs the
same preflight, then a real local SuperLink + simulation engine of its own
(:mod:`fedpeft.launch`), stops every process it started, and exits 0 only when the run's
``status.json`` says ``completed`` (``flwr run`` can exit 0 when the run failed), and
writes the run's report (:mod:`fedpeft.report`); ``fedpeft simulate --multirun`` runs
every point of a Hydra sweep grid (:mod:`fedpeft.sweep`) in turn and compares them in one
report; ``fedpeft report RUN_DIR...`` plots existing runs; ``fedpeft predict RUN_DIR --input
F.jsonl`` labels texts with a run's final model (and says which SSF pool entries each
used); ``fedpeft export RUN_DIR --out DIR`` writes it merged into a plain checkpoint
(:mod:`fedpeft.predict`); ``fedpeft status RUN_DIR`` says whether a run is running,
completed, failed or dead (:mod:`fedpeft.runstatus`); ``fedpeft certs`` makes the TLS
files and SuperNode keys of a deployment (:mod:`fedpeft.pki`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedpeft.errors import FedPeftError, RunFailed
from fedpeft.launch import (
    Interrupted,
    flwr_run_command,
    run_config_string,
    run_local,
    settle_status,
    signals_ignored,
    signals_raise,
    start_superlink,
)
from fedpeft.procs import RunWorkspace, tool_path
from fedpeft.reporting import RunDir

# The ServerApp writes its status a few seconds after launch; a small run.stall_timeout_s
# (meant for silent clients) must not fail a normal start.
STARTUP_S = 120.0

__all__ = ["flwr_run_command", "main", "run_config_string", "simulate", "tool_path"]


PLUGIN_GROUP = "fedpeft.commands"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedpeft", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a Flower simulation on a private SuperLink")
    sim.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. strategy=fedadam")
    sim.add_argument("--app", default=".", help="Flower app directory (default: .)")
    sim.add_argument("-m", "--multirun", action="store_true",
                     help="run every point of a Hydra sweep (a=1,2 b=x,y: 4 runs) in turn, "
                          "then write one comparison report")
    rep = sub.add_parser("report", help="plot runs' metrics into one self-contained HTML file")
    rep.add_argument("runs", nargs="+", metavar="RUN_DIR", help="runs/<run-id> directories")
    rep.add_argument("--out", default=None,
                     help="output folder (default: RUN_DIR/report for one run, "
                          "<parent>/compare-<hash> for several)")
    rep.add_argument("--title", default=None, help="the report's title")
    val = sub.add_parser("validate", help="preflight a config and print it",
                         description=_groups_help(), formatter_class=_Raw)
    val.add_argument("overrides", nargs="*")
    show = sub.add_parser("config", help="show a config group's options and valid keys")
    show.add_argument("action", choices=["show"])
    show.add_argument("group", nargs="?", default=None)
    sub.add_parser("doctor", help="report stale Ray files, foreign SuperLinks, tool paths")
    pred = sub.add_parser("predict", help="label texts with a run's final global model")
    pred.add_argument("run", type=Path, metavar="RUN_DIR")
    pred.add_argument("--input", type=Path, required=True, help="JSON lines with a text field")
    pred.add_argument("--output", type=Path, default=None, help="JSON lines (default: stdout)")
    exp = sub.add_parser("export", help="write a run's final model merged into the base")
    exp.add_argument("run", type=Path, metavar="RUN_DIR")
    exp.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    crt = sub.add_parser("certs", help="make a CA, a SuperLink certificate and SuperNode keys")
    crt.add_argument("--out", type=Path, required=True, help="folder for the files")
    crt.add_argument("--host", action="append", default=[],
                     help="a name or IP the nodes dial (repeat; localhost/127.0.0.1 added)")
    crt.add_argument("--nodes", type=int, default=2, help="SuperNode keys to make")
    st = sub.add_parser("status", help="is a run running, completed, failed or dead?")
    st.add_argument("run", type=Path, metavar="RUN_DIR")
    st.add_argument("--json", action="store_true", help="print the status with the verdict")
    for name, entry in sorted(plugin_commands().items()):
        sub.add_parser(name, help=f"{entry.value} (`fedpeft {name} --help`)")
    return p


def plugin_commands() -> dict[str, Any]:
    """Subcommands other packages provide through the ``fedpeft.commands`` entry-point
    group (name -> entry point): how ``fedpeft audit`` reaches the attacks package
    without ``fedpeft`` importing it."""
    from importlib.metadata import entry_points

    return {e.name: e for e in entry_points(group=PLUGIN_GROUP)}


class _Raw(argparse.RawDescriptionHelpFormatter):
    pass


def _groups_help() -> str:
    from fedpeft.configinfo import groups_text

    return groups_text()


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    argv = sys.argv[1:] if argv is None else argv
    plugin = plugin_commands().get(argv[0]) if argv else None
    try:
        if plugin is not None:  # e.g. ``audit``, which lives in the attacks package
            return int(plugin.load()(argv[1:]))
        args = _parser().parse_args(argv)
        return _COMMANDS[args.command](args)
    except FedPeftError as exc:
        print(f"fedpeft: error: {exc}", file=sys.stderr)
        return 2


def _validate(args: argparse.Namespace) -> int:
    from fedpeft.preflight import preflight
    from fedpeft.schema import to_dict

    report = preflight(args.overrides, federation_size="sim")
    print(json.dumps(to_dict(report.cfg), indent=2, default=str))
    print(report.summary(), file=sys.stderr)
    return 0


def _config_show(args: argparse.Namespace) -> int:
    from fedpeft.configinfo import group_text, groups_text

    print(group_text(args.group) if args.group else groups_text())
    return 0


def _doctor(_args: argparse.Namespace) -> int:
    from fedpeft.doctor import diagnose

    findings = diagnose()
    for f in findings:
        print(f)
    return 1 if any(f.level == "problem" for f in findings) else 0


def _predict(args: argparse.Namespace) -> int:
    from fedpeft.predict import predict_file

    rows = predict_file(args.run, args.input, args.output)
    if args.output is None:
        for row in rows:
            print(json.dumps(row))
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedpeft.predict import export_merged

    print(export_merged(args.run, args.out))
    return 0


def _certs(args: argparse.Namespace) -> int:
    from fedpeft.errors import ConfigError
    from fedpeft.pki import make_deployment

    if args.nodes < 0:
        raise ConfigError(f"--nodes must be >= 0, found {args.nodes}")
    files = make_deployment(args.out, args.host, args.nodes)
    print(f"CA certificate      {files.ca_cert}\nSuperLink cert/key  {files.server_cert} "
          f"{files.server_key}")
    for i in range(args.nodes):
        print(f"SuperNode {i} key     {files.node_key(i)} (register {files.node_public_key(i)})")
    return 0


def _status(args: argparse.Namespace) -> int:
    """Exit 0 completed, 1 failed, 2 no status, 3 dead, 4 running, 130 interrupted."""
    from fedpeft.runstatus import EXIT_CODES, verdict

    if not args.run.is_dir():
        raise RunFailed(f"{args.run} is not a run directory (expected runs/<run-id>)")
    status = RunDir(args.run).status()
    state, why = verdict(status)
    if args.json:
        print(json.dumps({**status, "verdict": state, "why": why}, indent=2, default=str))
    else:
        print(f"{args.run.name}: {state}" + (f" ({why})" if why else ""))
    return EXIT_CODES.get(state, 1)


def _report(args: argparse.Namespace) -> int:
    from fedpeft.report import write_report

    print(write_report(args.runs, args.out, args.title))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    if args.multirun:
        return multirun(args.overrides, Path(args.app))
    return simulate(args.overrides, Path(args.app))


def simulate(overrides: list[str], app: Path) -> int:
    """Preflight, run on a private control plane, stop it all; 0 only if completed."""
    from fedpeft.doctor import warn_before_run
    from fedpeft.preflight import preflight

    report = preflight(overrides, federation_size="sim")
    cfg = report.cfg
    print(report.summary(), file=sys.stderr)
    warn_before_run()
    run_id = cfg.run.run_id or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + (
        f"-{cfg.method.name}-{cfg.strategy.name}")
    out = Path(cfg.run.output_dir).expanduser().resolve()
    run = RunDir(Path(cfg.run.resume).expanduser().resolve() if cfg.run.resume
                 else out / run_id)
    full = [*overrides, f"run.output_dir={out}", f"run.run_id={run_id}"]
    if cfg.capture.dir:  # relative to where the user ran the command, not the server's cwd
        full.append(f"capture.dir={Path(cfg.capture.dir).expanduser().resolve()}")
    run.path.mkdir(parents=True, exist_ok=True)
    run.set_status("starting", pid=os.getpid())  # a resumed run's old status is not ours
    code, reason = _launch(app, full, cfg, run)
    status = settle_status(run, code, reason)
    _report_run(run, status)
    if status.get("state") != "completed":
        print(f"fedpeft: error: run {run.path.name} {status.get('state')}: "
              f"{status.get('error', status)}", file=sys.stderr)
        return 130 if status.get("state") == "interrupted" else 1
    stopped = f" early ({status['stopped']})" if status.get("stopped") else ""
    print(f"fedpeft: run completed{stopped}; metrics in {run.metrics_path}")
    return 0


def _report_run(run: RunDir, status: dict) -> None:
    """Write the run's report. Interrupted runs are not plotted: the user asked to stop."""
    if status.get("state") != "interrupted" and run.records():
        path = _try_report([run.path])
        if path:
            print(f"fedpeft: report in {path}")


def _try_report(dirs: list[Path], out: Path | None = None, title: str | None = None
                ) -> Path | None:
    """:func:`fedpeft.report.write_report`, any failure turned into a warning: a run's
    result and exit code never depend on its plots."""
    try:
        from fedpeft.report import write_report

        return write_report(dirs, out, title)
    except Exception as exc:  # any plotting problem: the runs' results stand
        print(f"fedpeft: warning: could not write the report of {', '.join(d.name for d in dirs)}"
              f": {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def multirun(overrides: list[str], app: Path) -> int:
    """Run each point of the sweep grid as a normal simulate (run id
    ``<sweep-id>-<i>``), then write one comparison report; nonzero if any point failed."""
    from fedpeft.sweep import check_grid, expand_grid

    grid = expand_grid(overrides)
    configs = check_grid(grid)
    sweep_id = configs[0].run.run_id or datetime.now(timezone.utc).strftime(
        "%Y%m%d-%H%M%S-sweep")
    print(f"fedpeft: sweep {sweep_id}: {len(grid)} runs", file=sys.stderr)
    codes = _run_points(grid, app, sweep_id)
    dirs = [Path(cfg.run.output_dir).expanduser().resolve() / f"{sweep_id}-{i}"
            for i, cfg in enumerate(configs[:len(codes)])]
    _compare(dirs, dirs[0].parent / f"{sweep_id}-report", sweep_id)
    failed = [d.name for d, code in zip(dirs, codes, strict=True) if code]
    if failed:
        print(f"fedpeft: error: sweep {sweep_id}: {len(failed)} of {len(grid)} runs did not "
              f"complete: {', '.join(failed)}", file=sys.stderr)
    return 130 if 130 in codes else (1 if failed else 0)


def _run_points(grid: list[list[str]], app: Path, sweep_id: str) -> list[int]:
    """Simulate each point in turn (stopping after an interrupted one); exit codes."""
    from fedpeft.sweep import point_label

    codes = []
    for i, point in enumerate(grid):
        print(f"fedpeft: sweep run {i + 1}/{len(grid)} ({sweep_id}-{i}): "
              f"{point_label(grid, point)}", file=sys.stderr)
        try:
            codes.append(simulate([*point, f"run.run_id={sweep_id}-{i}"], app))
        except FedPeftError as exc:
            print(f"fedpeft: error: {exc}", file=sys.stderr)
            codes.append(2)
        if codes[-1] == 130:
            break
    return codes


def _compare(dirs: list[Path], out: Path, sweep_id: str) -> None:
    """The comparison report over the sweep's runs that wrote metrics."""
    with_metrics = [d for d in dirs if (d / "metrics.jsonl").is_file()]
    path = _try_report(with_metrics, out, f"fedpeft sweep {sweep_id}") if with_metrics else None
    if path:
        print(f"fedpeft: sweep report in {path}")
    elif not with_metrics:
        print(f"fedpeft: warning: sweep {sweep_id}: no run wrote metrics, so no report",
              file=sys.stderr)


def _launch(app: Path, overrides: list[str], cfg: object,
            run: RunDir) -> tuple[int | None, str | None]:
    """Start the control plane and ``flwr run``; always stop everything started."""
    ws = RunWorkspace(ray_address=cfg.sim.ray_address)  # type: ignore[attr-defined]
    logs = run.path / "logs"
    code, reason = None, None
    try:
        with signals_raise():
            logs.mkdir(parents=True, exist_ok=True)
            start_superlink(ws, logs / "superlink.log")
            cmd = flwr_run_command(app, overrides, cfg.sim)  # type: ignore[attr-defined]
            code = run_local(ws, cmd, run, max(cfg.run.stall_timeout_s, STARTUP_S))  # type: ignore
    except Interrupted as exc:
        reason = f"interrupted by {exc} while the run was in progress"
    except (RunFailed, RuntimeError, TimeoutError) as exc:
        reason = str(exc)
    finally:
        with signals_ignored():
            ws.stop()
            ws.remove()
    return code, reason


_COMMANDS = {"simulate": _simulate, "validate": _validate, "config": _config_show,
             "doctor": _doctor, "report": _report, "predict": _predict, "export": _export,
             "status": _status, "certs": _certs}


if __name__ == "__main__":
    raise SystemExit(main())
