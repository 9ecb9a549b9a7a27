"""Run reports: one run's (or several runs') metrics as plots in a self-contained HTML file.

``fedpeft report RUN_DIR...`` and the end of every ``fedpeft simulate`` call
:func:`write_report`. Each plot is written as a PNG next to ``report.html`` *and* embedded in
it as base64, so the HTML opens offline and can be sent on its own while the PNGs stay usable
elsewhere. Several runs are overlaid on the same axes (one colour per run, one line style per
quantity) and a table gives each run's final numbers. A plot no run has data for is left out
with a one-line note, so a report never shows empty axes.

Inputs are only what a run directory holds (``metrics.jsonl``, ``status.json``,
``config.json``; see :mod:`fedpeft.reporting`), so reports can be made for old runs and for
runs that failed. matplotlib is imported inside the drawing function (Agg canvas, no display):
``import fedpeft`` and the CLI's other commands stay fast.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedpeft.errors import ConfigError
from fedpeft.reporting import RunDir

MB = 1e6
Record = dict[str, Any]
Extract = Callable[[Record], Any]
# Overrides every run has with its own value; they never tell runs apart in a legend.
_NOT_LABELS = ("run.output_dir", "run.run_id", "run.resume")
_MAX_LABEL = 48
_STYLES = ("-", "--", ":", "-.")
_MISSING = "-"  # a table cell with no value


@dataclass(frozen=True)
class RunData:
    """One run directory as the report reads it: rounds in order, status, overrides."""

    path: Path
    records: list[Record]
    status: dict[str, Any]
    overrides: list[str]
    label: str = ""

    @property
    def run_id(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class Curve:
    """One plotted quantity: a value per round record, optionally summed over rounds."""

    name: str
    value: Extract
    cumulative: bool = False


@dataclass(frozen=True)
class Plot:
    """One PNG: its curves for every run, against the round (or against ``x``)."""

    name: str
    title: str
    ylabel: str
    curves: tuple[Curve, ...]
    empty_note: str
    x: Curve | None = None
    xlabel: str = "round"
    nonzero: bool = False  # all-zero data counts as none (e.g. nothing was rejected)


@dataclass(frozen=True)
class Line:
    """The points of one curve of one run, ready to draw."""

    label: str
    run: int
    curve: int
    xs: list[float]
    ys: list[float]


# ---------------------------------------------------------------- reading run directories


def load_run(path: str | Path) -> RunData:
    """Read a run directory; its records are keyed by round (a resumed run's repeats of a
    round keep the last one) and sorted."""
    run = RunDir(Path(path).expanduser().resolve())
    if not run.metrics_path.is_file():
        raise ConfigError(f"{path}: not a run directory (no metrics.jsonl); expected "
                          "runs/<run-id> as written by fedpeft simulate")
    by_round = {rec.get("round", 0): rec for rec in run.records()}
    records = [by_round[r] for r in sorted(by_round)]
    return RunData(run.path, records, run.status(), _overrides(run.path))


def _overrides(path: Path) -> list[str]:
    """The overrides recorded in ``config.json`` (none if it is missing or unreadable)."""
    try:
        return [str(o) for o in json.loads((path / "config.json").read_text())["overrides"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def run_labels(runs: Sequence[RunData]) -> list[str]:
    """Legend labels: the overrides in which the runs differ (``strategy=krum
    method.lr=0.0003``) when they name every run distinctly and briefly, else the run ids."""
    settings = [_settings(run.overrides) for run in runs]
    keys = list(dict.fromkeys(k for s in settings for k in s))
    differing = [k for k in keys if len({s.get(k) for s in settings}) > 1]
    labels = [" ".join(f"{k}={s[k]}" for k in differing if k in s) for s in settings]
    clear = (len(runs) > 1 and all(labels) and len(set(labels)) == len(labels)
             and max(map(len, labels)) <= _MAX_LABEL)
    return labels if clear else [run.run_id for run in runs]


def _settings(overrides: Sequence[str]) -> dict[str, str]:
    """``key -> value`` of ``key=value`` overrides (the last one wins, as in Hydra)."""
    pairs = (o.split("=", 1) for o in overrides if "=" in o)
    found = {key.lstrip("+~"): value for key, value in pairs}
    return {k: v for k, v in found.items() if k not in _NOT_LABELS}


# ---------------------------------------------------------------- what is plotted


def _number(value: Any) -> float | None:
    """A finite float, or None for missing, non-numeric and non-finite values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _field(name: str) -> Extract:
    return lambda rec: rec.get(name)


def _mb(name: str) -> Extract:
    """Sum over clients of a per-client byte map, in MB; None when no client reported."""
    return lambda rec: sum((rec.get(name) or {}).values()) / MB if rec.get(name) else None


def _total_mb(rec: Record) -> float | None:
    """Framed bytes up + down of a round, in MB."""
    up, down = _mb("bytes_up")(rec), _mb("bytes_down")(rec)
    return None if up is None and down is None else (up or 0.0) + (down or 0.0)


def _training(get: Extract) -> Extract:
    """``get`` for training rounds only: round 0 evaluates the initial model."""
    return lambda rec: get(rec) if rec.get("round", 0) > 0 else None


def excluded_by_strategy(rec: Record) -> int:
    """Updates a robust strategy left out (the decoder's refusals are ``num_rejected``)."""
    return sum(1 for e in rec.get("excluded") or [] if e.get("by") != "decoder")


def _epsilon(key: str) -> Extract:
    return lambda rec: (rec.get("privacy") or {}).get(key)


PLOTS = (
    Plot("loss", "Loss per round", "loss",
         (Curve("eval loss", _field("eval_loss")), Curve("train loss", _field("train_loss"))),
         "no run recorded an eval or train loss"),
    Plot("accuracy", "Eval accuracy per round", "accuracy",
         (Curve("eval accuracy", _field("eval_accuracy")),), "no run recorded an eval accuracy"),
    Plot("traffic", "Traffic per round (sum over clients)", "MB",
         (Curve("up", _mb("bytes_up")), Curve("down", _mb("bytes_down")),
          Curve("payload up", _mb("payload_bytes_up")),
          Curve("payload down", _mb("payload_bytes_down"))), "no run recorded traffic"),
    Plot("traffic_cumulative", "Cumulative traffic (sum over clients)", "MB",
         (Curve("up", _mb("bytes_up"), True), Curve("down", _mb("bytes_down"), True),
          Curve("up + down", _total_mb, True)), "no run recorded traffic"),
    Plot("accuracy_vs_traffic", "Eval accuracy against cumulative traffic", "accuracy",
         (Curve("eval accuracy", _field("eval_accuracy")),),
         "no run recorded both traffic and an eval accuracy",
         x=Curve("MB", _total_mb, True), xlabel="cumulative MB (up + down)"),
    Plot("rejected", "Updates rejected or excluded per round", "updates",
         (Curve("rejected by the decoder", _training(_field("num_rejected"))),
          Curve("excluded by the strategy", _training(excluded_by_strategy))),
         "no update was rejected or excluded in any round", nonzero=True),
    Plot("privacy", "Privacy spent so far (worst client)", "ε",
         (Curve("ε (RDP)", _epsilon("epsilon_rdp")), Curve("ε (PRV)", _epsilon("epsilon_prv"))),
         "no run recorded privacy accounting (privacy=none)"),
)


def _column(records: Sequence[Record], curve: Curve) -> list[float | None]:
    """The curve's value per record; a cumulative curve counts missing values as 0."""
    values = [_number(curve.value(rec)) for rec in records]
    if not curve.cumulative:
        return values
    total, sums = 0.0, []
    for value in values:
        total += value or 0.0
        sums.append(total)
    return sums


def _line(run: RunData, curve: Curve, x: Curve | None) -> tuple[list, list]:
    """(xs, ys) of a curve for one run; empty when the run never recorded the curve (or x)."""
    raw = [c for c in (curve, x) if c is not None]
    if any(all(_number(c.value(rec)) is None for rec in run.records) for c in raw):
        return [], []
    xs = _column(run.records, x) if x else [rec.get("round", 0) for rec in run.records]
    pairs = [(a, b) for a, b in zip(xs, _column(run.records, curve), strict=True) if b is not None]
    return [a for a, _ in pairs], [b for _, b in pairs]


def plot_lines(plot: Plot, runs: Sequence[RunData]) -> list[Line]:
    """Every (run, curve) line of a plot that has data; [] when the plot is to be skipped."""
    lines = []
    for r, run in enumerate(runs):
        for c, curve in enumerate(plot.curves):
            xs, ys = _line(run, curve, plot.x)
            if ys:
                lines.append(Line(_line_label(plot, runs, run, curve), r, c, xs, ys))
    if plot.nonzero and not any(any(line.ys) for line in lines):
        return []
    return lines


def _line_label(plot: Plot, runs: Sequence[RunData], run: RunData, curve: Curve) -> str:
    if len(runs) == 1:
        return curve.name
    return run.label if len(plot.curves) == 1 else f"{run.label}: {curve.name}"


# ---------------------------------------------------------------- drawing


def draw(plot: Plot, lines: Sequence[Line]) -> bytes:
    """The plot as PNG bytes (matplotlib's Agg canvas; no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for line in lines:
        ax.plot(line.xs, line.ys, color=f"C{line.run % 10}", marker="o", markersize=3,
                linestyle=_STYLES[line.curve % len(_STYLES)], label=line.label)
    ax.set(title=plot.title, xlabel=plot.xlabel, ylabel=plot.ylabel)
    if plot.x is None:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", useOffset=False)  # 10.745, not 0.005 + 1.074e1
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ---------------------------------------------------------------- the summary table


def _last(run: RunData, get: Extract) -> float | None:
    """The last recorded value of a quantity (e.g. the final eval accuracy)."""
    values = [v for rec in run.records if (v := _number(get(rec))) is not None]
    return values[-1] if values else None


def _fmt(value: float | None, digits: int = 4) -> str:
    return _MISSING if value is None else f"{value:.{digits}g}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f}s"


def summary_row(run: RunData) -> dict[str, str]:
    """The run's final numbers, as shown in the report's table."""
    totals = {name: sum(_number(_mb(name)(rec)) or 0.0 for rec in run.records)
              for name in ("bytes_up", "bytes_down")}
    eps = [_fmt(_last(run, _epsilon(k))) for k in ("epsilon_rdp", "epsilon_prv")]
    return {
        "run": run.run_id, "label": run.label, "status": str(run.status.get("state", "?")),
        "rounds": str(max((rec.get("round", 0) for rec in run.records), default=0)),
        "final eval accuracy": _fmt(_last(run, _field("eval_accuracy"))),
        "final eval loss": _fmt(_last(run, _field("eval_loss"))),
        "MB up": f"{totals['bytes_up']:.2f}", "MB down": f"{totals['bytes_down']:.2f}",
        "final ε (RDP / PRV)": " / ".join(eps) if eps != [_MISSING] * 2 else _MISSING,
        "rejected": str(sum(int(rec.get("num_rejected") or 0) for rec in run.records)),
        "excluded": str(sum(excluded_by_strategy(rec) for rec in run.records)),
        "wall time": _duration(sum(_number(rec.get("wall_time_s")) or 0.0
                                   for rec in run.records)),
    }


# ---------------------------------------------------------------- HTML

_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;color:#222}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.3em .6em}
th{background:#f3f3f3}td{text-align:right}td:first-child,td:nth-child(2){text-align:left}
td:first-child{white-space:nowrap}
img{max-width:100%}.note{color:#666;font-style:italic}.error{color:#a00}"""


def _table(runs: Sequence[RunData]) -> str:
    rows = [summary_row(run) for run in runs]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row.values())
                   + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _errors(runs: Sequence[RunData]) -> str:
    """One line per run that did not complete, with the reason from its status."""
    lines = [f"<p class='error'>{html.escape(run.run_id)} {html.escape(str(state))}: "
             f"{html.escape(str(run.status.get('error', '')))}</p>"
             for run in runs if (state := run.status.get("state")) != "completed"]
    return "".join(lines)


def _section(plot: Plot, png: bytes | None) -> str:
    """A plot's heading and its embedded PNG, or the note saying why it is left out."""
    if png is None:
        return f"<p class='note'>{html.escape(plot.title)}: skipped, {plot.empty_note}.</p>"
    data = base64.b64encode(png).decode("ascii")
    return (f"<h2>{html.escape(plot.title)}</h2>"
            f"<img alt='{plot.name}' src='data:image/png;base64,{data}'>")


def render_html(title: str, runs: Sequence[RunData], pngs: Sequence[bytes | None]) -> str:
    """The whole report: table of final numbers, then every plot (or its skip note)."""
    paths = "".join(f"<li>{html.escape(str(run.path))}</li>" for run in runs)
    sections = "".join(_section(plot, png) for plot, png in zip(PLOTS, pngs, strict=True))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<ul>{paths}</ul>{_table(runs)}{_errors(runs)}{sections}</body></html>\n")


# ---------------------------------------------------------------- writing


def default_out(paths: Sequence[Path]) -> Path:
    """``RUN_DIR/report`` for one run; ``<parent>/compare-<hash of the runs>`` for several."""
    if len(paths) == 1:
        return paths[0] / "report"
    digest = hashlib.sha1("\n".join(sorted(map(str, paths))).encode()).hexdigest()[:8]
    return paths[0].parent / f"compare-{digest}"


def write_report(run_dirs: Sequence[str | Path], out: str | Path | None = None,
                 title: str | None = None, labels: Sequence[str] | None = None) -> Path:
    """Write ``report.html`` and one PNG per plot with data into ``out``; return the HTML's
    path. PNGs of plots now skipped are removed so the folder matches the HTML. ``labels``
    names the runs (default: their differing overrides, else their run ids)."""
    loaded = [load_run(p) for p in dict.fromkeys(Path(p) for p in run_dirs)]
    if not loaded:
        raise ConfigError("fedpeft report needs at least one run directory")
    if labels is not None and len(labels) != len(loaded):
        raise ConfigError(f"fedpeft report: {len(labels)} labels for {len(loaded)} runs")
    labels = list(labels) if labels is not None else run_labels(loaded)
    runs = [replace(run, label=label) for run, label in zip(loaded, labels, strict=True)]
    folder = Path(out).expanduser() if out else default_out([run.path for run in runs])
    folder.mkdir(parents=True, exist_ok=True)
    pngs = [_write_png(plot, runs, folder) for plot in PLOTS]
    name = title or f"fedpeft report: {', '.join(run.run_id for run in runs)}"
    page = folder / "report.html"
    page.write_text(render_html(name, runs, pngs), encoding="utf-8")
    return page


def _write_png(plot: Plot, runs: Sequence[RunData], folder: Path) -> bytes | None:
    """Draw one plot to ``folder/<name>.png``; None (and no file) when it has no data."""
    target = folder / f"{plot.name}.png"
    lines = plot_lines(plot, runs)
    if not lines:
        target.unlink(missing_ok=True)
        return None
    png = draw(plot, lines)
    target.write_bytes(png)
    return png
