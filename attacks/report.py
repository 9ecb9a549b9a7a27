"""Privacy audit reports: one audit's outcome as ``report.json``, PNG plots and ``report.html``.

:func:`write_audit_report` takes the audit result (a plain dict, shape defined by
``attacks/audit_schema.json``), validates it, and writes into one folder:

- ``report.json``: the result plus ``schema_version`` and ``pii_masked``; it validates against
  the same schema, so later tools can read old reports;
- ``recovery_vs_epsilon.png``, ``metrics_by_batch.png`` and, when there are canary rows,
  ``canary_epsilon.png`` (a plot without data is left out, and its stale PNG removed);
- ``report.html``: threat model, accountant, results table, plots, canary audit, example
  reconstructions, notes and the exact config. As in the run report
  (:mod:`fedpeft.report`) each PNG is embedded in the HTML as base64 *and* written beside it,
  so the HTML opens offline and can be sent on its own.

PII stays out of the report by default: every PII value of the examples is replaced by a
``[PII#n]`` mask in the HTML and in ``report.json`` alike (see :func:`mask_pii`). Nothing else
in the result is expected to hold PII (rows hold only metrics). matplotlib and jsonschema are
imported inside the functions that need them, so importing this module stays cheap.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import re
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from fedpeft.errors import ConfigError
from fedpeft.report import _CSS as _RUN_CSS

SCHEMA_VERSION = 1
Result = dict[str, Any]
Row = dict[str, Any]
METRICS = ("pii_exact", "token_precision", "token_recall", "rouge1", "rouge2", "rougeL")
METRIC_NAMES = dict(zip(METRICS, ("PII exact", "token P", "token R", "ROUGE-1", "ROUGE-2",
                                  "ROUGE-L"), strict=True))
BUG = "BUG: empirical bound above the accountant's ε"
NO_DP = "no DP"
PLOT_TITLES = {
    "recovery_vs_epsilon": "PII exact recovery against the accountant's ε",
    "metrics_by_batch": "Reconstruction metrics per batch size (no DP)",
    "canary_epsilon": "Canary audit: accountant ε beside the empirical lower bound",
}
_SKIPPED = {
    "recovery_vs_epsilon": "no row has a pii_exact metric",
    "metrics_by_batch": "no row without DP has metrics",
    "canary_epsilon": "the audit has no canary rows",
}
_MISSING = "-"
_STYLES = ("-", "--", ":", "-.")  # one line style per method, so equal lines stay visible
_MAX_ERRORS = 5
_CSS = _RUN_CSS + """
h2{margin-top:1.6em}.bug,tr.bug td{color:#b00;font-weight:bold}.meta{color:#555}
table.text td{text-align:left;white-space:pre-wrap;vertical-align:top;max-width:28em}
pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:.85em}"""


# ---------------------------------------------------------------- validation


@cache
def audit_schema() -> dict[str, Any]:
    """The audit result's JSON schema (draft 2020-12), shipped as package data."""
    text = resources.files("attacks").joinpath("audit_schema.json").read_text(encoding="utf-8")
    return json.loads(text)


@cache
def _validator() -> Any:
    """One validator for the schema (building it checks the schema itself)."""
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(audit_schema())
    return Draft202012Validator(audit_schema())


def _where(path: Iterable[Any]) -> str:
    """A JSON path as ``rows/0/metrics``; the top level is named as such."""
    return "/".join(map(str, path)) or "(top level)"


def validate_result(result: Any) -> None:
    """Raise :class:`ConfigError` naming each failing path (up to five) when ``result`` does
    not match the schema or refers to rows that do not exist."""
    errors = sorted(_validator().iter_errors(result),
                    key=lambda err: [str(p) for p in err.absolute_path])
    if errors:
        found = "; ".join(f"at {_where(err.absolute_path)}: {err.message}"
                          for err in errors[:_MAX_ERRORS])
        more = f" (and {len(errors) - _MAX_ERRORS} more)" if len(errors) > _MAX_ERRORS else ""
        raise ConfigError(f"invalid audit result {found}{more}")
    _check_consistency(result)


def _check_consistency(result: Result) -> None:
    """What the schema cannot say: examples point at existing rows, correct <= guesses."""
    count = len(result["rows"])
    for i, example in enumerate(result["examples"]):
        if example["row"] >= count:
            raise ConfigError(f"invalid audit result at examples/{i}/row: {example['row']} is "
                              f"not an index into rows ({count} rows)")
    for i, canary in enumerate(result["canary"]):
        if canary["num_correct"] > canary["num_guesses"]:
            raise ConfigError(f"invalid audit result at canary/{i}: num_correct "
                              f"{canary['num_correct']} > num_guesses {canary['num_guesses']}")


def _scalar(value: Any) -> Any:
    """numpy scalars (and the like) as plain Python numbers, for ``json.dumps``."""
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _plain(result: Any) -> Any:
    """A deep copy of ``result`` as plain JSON values; NaN, infinity and objects fail."""
    try:
        return json.loads(json.dumps(result, allow_nan=False, default=_scalar))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid audit result: not plain JSON ({err})") from err


# ---------------------------------------------------------------- PII masking


def _masks(values: Iterable[str]) -> dict[str, str]:
    """``value (lower case) -> [PII#n]``, numbered in order of first appearance."""
    unique = dict.fromkeys(value.lower() for value in values)
    return {value: f"[PII#{n}]" for n, value in enumerate(unique, 1)}


def mask_example(example: dict[str, Any], others: Sequence[str] = ()) -> dict[str, Any]:
    """The example with each of its PII values (then each of ``others``) replaced by its mask
    in truth and reconstruction, matched case-insensitively and longest first (so ``Jane Doe``
    is masked whole, not as ``Jane`` plus ``Doe``); ``pii`` becomes the example's masks."""
    masks = _masks([*example["pii"], *others])
    if not masks:
        return dict(example)
    longest_first = sorted(masks, key=len, reverse=True)
    pattern = re.compile("|".join(map(re.escape, longest_first)), re.IGNORECASE)

    def hide(text: str) -> str:
        return pattern.sub(lambda found: masks.get(found.group(0).lower(), "[PII]"), text)

    own = list(dict.fromkeys(masks[value.lower()] for value in example["pii"]))
    return {**example, "truth": hide(example["truth"]),
            "reconstruction": hide(example["reconstruction"]), "pii": own}


def mask_pii(result: Result) -> Result:
    """The result with every example masked. Each example is masked with its own PII values
    first (``[PII#1]``... in the order of its ``pii`` list) and then with the other examples'
    values, so a value shared between examples never leaks through an example that did not
    list it. Only the examples change: they are the only part of a result that holds text."""
    everyone = [value for example in result["examples"] for value in example["pii"]]
    return {**result, "examples": [mask_example(ex, everyone) for ex in result["examples"]]}


def _recovered(example: dict[str, Any]) -> list[str]:
    """The example's PII values (or masks) that appear in its reconstruction."""
    found = example["reconstruction"].lower()
    return [value for value in dict.fromkeys(example["pii"]) if value.lower() in found]


# ---------------------------------------------------------------- plot helpers


def _unique(values: Iterable[Any]) -> list[Any]:
    """The distinct values in order of first appearance."""
    return list(dict.fromkeys(values))


_FIELD_TEXT: dict[str, Callable[[Any], str]] = {
    "method": str, "codec": str, "privacy": str, "attack": str,
    "batch_size": lambda v: f"B={v}", "local_steps": lambda v: f"{v} steps",
}


def _fields(rows: Sequence[Row], always: tuple[str, ...],
            varying: tuple[str, ...]) -> tuple[str, ...]:
    """``always`` plus those of ``varying`` whose value differs between rows: the fields
    that tell the plotted settings apart (a single codec is not worth a legend entry)."""
    return always + tuple(f for f in varying if len({row[f] for row in rows}) > 1)


def _key(row: Row, fields: Sequence[str]) -> tuple:
    return tuple(row[f] for f in fields)


def _label(key: Sequence[Any], fields: Sequence[str]) -> str:
    return " ".join(_FIELD_TEXT[f](v) for f, v in zip(fields, key, strict=True))


def _figure(nrows: int, ncols: int, width: float = 4.4,
            height: float = 3.4) -> tuple[Any, Any]:
    """A figure on matplotlib's Agg canvas (no display, no pyplot state) and its axes grid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols + 2.4, height * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    return fig, axes


def _legend(fig: Any, axes: Any) -> None:
    """One legend for the whole figure, each label once, outside the panels."""
    entries: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    fig.legend(list(entries.values()), list(entries), loc="outside right upper",
               fontsize="small")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _yerr(intervals: Sequence[dict[str, float]], scale: float = 1.0) -> list[list[float]]:
    """matplotlib's asymmetric error bars [below, above] from [lo, hi] (never negative)."""
    below = [max(0.0, m["mean"] - m["lo"]) * scale for m in intervals]
    above = [max(0.0, m["hi"] - m["mean"]) * scale for m in intervals]
    return [below, above]


# ---------------------------------------------------------------- recovery against ε


def _thin(values: Iterable[float], factor: float = 1.3) -> list[float]:
    """Sorted values without those within ``factor`` of the previous kept one, so ε ticks
    of runs that reached nearly the same ε (2.98, 3.01) do not overlap."""
    kept: list[float] = []
    for value in sorted(set(values)):
        if not kept or value >= kept[-1] * factor:
            kept.append(value)
    return kept


_EPS_FLOOR = 1e-2  # ε = 0 on the log axis


def _eps_axis(rows: Sequence[Row]) -> tuple[float, list[float], list[str]]:
    """Where no-DP rows go (right of every finite ε, log axis), tick positions and labels."""
    finite = _thin(max(row["epsilon"], _EPS_FLOOR) for row in rows
                   if row["epsilon"] is not None)
    no_dp = finite[-1] * 4 if finite else 1.0
    return no_dp, [*finite, no_dp], [*(f"{e:.2g}" for e in finite), NO_DP]


def _eps_x(row: Row, no_dp: float) -> float:
    return no_dp if row["epsilon"] is None else max(row["epsilon"], _EPS_FLOOR)


def _recovery_panel(ax: Any, rows: Sequence[Row], fields: Sequence[str], keys: Sequence[tuple],
                    no_dp: float) -> None:
    """One attack: a line with CI error bars per setting, ε increasing to the right."""
    methods = _unique(key[0] for key in keys)
    for i, key in enumerate(keys):
        points = sorted((_eps_x(r, no_dp), r["metrics"]["pii_exact"])
                        for r in rows if _key(r, fields) == key)
        if not points:
            continue
        xs, ms = [x for x, _ in points], [m for _, m in points]
        ax.errorbar(xs, [100 * m["mean"] for m in ms], yerr=_yerr(ms, 100), capsize=3,
                    marker="o", markersize=4, color=f"C{i % 10}", label=_label(key, fields),
                    linestyle=_STYLES[methods.index(key[0]) % len(_STYLES)])


def _style_eps(ax: Any, no_dp: float, ticks: list[float], labels: list[str]) -> None:
    """Log ε axis with the finite ε values and a labelled 'no DP' position set apart."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log")
    ax.set_xticks(ticks, labels)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.axvline(no_dp / 2, color="#999", linestyle=":", linewidth=1)
    ax.set_xlim(min(ticks) / 1.6, no_dp * 1.6)
    ax.set_xlabel("accountant's ε")
    ax.grid(alpha=0.3)


def plot_recovery(rows: Sequence[Row]) -> bytes | None:
    """PII exact recovery (mean, CI) against ε, one panel per attack and one line per
    (method, batch size[, codec, steps]); None when no row has a pii_exact metric."""
    rows = [row for row in rows if "pii_exact" in row["metrics"]]
    if not rows:
        return None
    attacks = _unique(row["attack"] for row in rows)
    fields = _fields(rows, ("method", "batch_size"), ("codec", "local_steps"))
    keys = _unique(_key(row, fields) for row in rows)
    no_dp, ticks, labels = _eps_axis(rows)
    fig, axes = _figure(1, len(attacks))
    for ax, attack in zip(axes[0], attacks, strict=True):
        _recovery_panel(ax, [r for r in rows if r["attack"] == attack], fields, keys, no_dp)
        _style_eps(ax, no_dp, ticks, labels)
        ax.set_title(f"attack: {attack}")
    axes[0][0].set(ylabel="PII exact recovery (%)", ylim=(0, 105))
    _legend(fig, axes)
    return _png(fig)


# ---------------------------------------------------------------- metrics per batch size


def _metric_bars(ax: Any, rows: Sequence[Row], sizes: Sequence[int],
                 metrics: Sequence[str]) -> None:
    """Grouped bars: one group per metric, one bar (with CI) per batch size."""
    width = 0.8 / len(sizes)
    for k, size in enumerate(sizes):
        row = next((r for r in rows if r["batch_size"] == size), None)
        present = [i for i, m in enumerate(metrics) if row and m in row["metrics"]]
        if row is None or not present:
            continue
        values = [row["metrics"][metrics[i]] for i in present]
        xs = [i + (k - (len(sizes) - 1) / 2) * width for i in present]
        ax.bar(xs, [v["mean"] for v in values], width, yerr=_yerr(values), capsize=2,
               color=f"C{k % 10}", label=f"batch size {size}")


def plot_metrics_by_batch(rows: Sequence[Row]) -> bytes | None:
    """For the rows without DP: every metric per batch size, one panel per (attack,
    setting); None when no such row has metrics."""
    rows = [row for row in rows if row["epsilon"] is None and row["metrics"]]
    if not rows:
        return None
    attacks = _unique(row["attack"] for row in rows)
    fields = _fields(rows, ("method",), ("codec", "local_steps", "privacy"))
    settings = _unique(_key(row, fields) for row in rows)
    sizes = sorted({row["batch_size"] for row in rows})
    metrics = [m for m in METRICS if any(m in row["metrics"] for row in rows)]
    fig, axes = _figure(len(attacks), len(settings))
    for (i, attack), (j, key) in itertools.product(enumerate(attacks), enumerate(settings)):
        same = [r for r in rows if r["attack"] == attack and _key(r, fields) == key]
        _metric_bars(axes[i][j], same, sizes, metrics)
        axes[i][j].set_title(f"{attack}: {_label(key, fields)}", fontsize="medium")
    for ax in axes.flat:
        ax.set_xticks(range(len(metrics)), [METRIC_NAMES[m] for m in metrics], rotation=30)
        ax.set(ylim=(0, 1.05))
        ax.grid(axis="y", alpha=0.3)
    for row_axes in axes:
        row_axes[0].set_ylabel("mean with CI")
    _legend(fig, axes)
    return _png(fig)


# ---------------------------------------------------------------- canary audit


def is_bug(canary: dict[str, Any]) -> bool:
    """True when the empirical lower bound exceeds the accountant's ε: the accountant (or
    the mechanism) promises less leakage than the canaries show. No DP is never a bug."""
    return canary["epsilon"] is not None and canary["epsilon_lower_bound"] > canary["epsilon"]


def _canary_bars(ax: Any, index: int, canary: dict[str, Any]) -> None:
    """The accountant's ε (or '∞, no DP') beside the lower bound; red when it is a bug."""
    if canary["epsilon"] is None:
        ax.text(index - 0.2, 0, "∞\n(no DP)", ha="center", va="bottom", fontsize="small")
    else:
        ax.bar(index - 0.2, canary["epsilon"], 0.4, color="C0", label="accountant ε")
    bug = is_bug(canary)
    ax.bar(index + 0.2, canary["epsilon_lower_bound"], 0.4, color="#c00" if bug else "C1",
           label="lower bound above ε (bug)" if bug else "empirical lower bound")


def plot_canary(canary: Sequence[dict[str, Any]]) -> bytes | None:
    """Accountant ε against the canaries' empirical lower bound, a pair of bars per canary
    row; None when there are no canary rows."""
    if not canary:
        return None
    fig, axes = _figure(1, 1, width=max(4.4, 1.3 * len(canary)))
    ax = axes[0][0]
    for i, row in enumerate(canary):
        _canary_bars(ax, i, row)
    ax.set_xticks(range(len(canary)), [f"{c['method']}\n{c['privacy']}" for c in canary])
    ax.set(ylabel="ε", title="accountant ε vs empirical lower bound")
    ax.grid(axis="y", alpha=0.3)
    _legend(fig, axes)
    return _png(fig)


def draw_plots(report: Result) -> dict[str, bytes | None]:
    """Every plot's PNG bytes by name; None for a plot without data."""
    return {
        "recovery_vs_epsilon": plot_recovery(report["rows"]),
        "metrics_by_batch": plot_metrics_by_batch(report["rows"]),
        "canary_epsilon": plot_canary(report["canary"]),
    }


# ---------------------------------------------------------------- HTML


def _e(value: Any) -> str:
    return html.escape(str(value))


def _eps(value: float | None) -> str:
    return "∞ (no DP)" if value is None else f"{value:.3g}"


def _num(value: float | None, digits: int = 3) -> str:
    return _MISSING if value is None else f"{value:.{digits}g}"


def _pct_ci(metric: dict[str, float] | None) -> str:
    """``42.0% [35.1, 49.3]``: a mean and its interval as percentages."""
    if metric is None:
        return _MISSING
    return f"{100 * metric['mean']:.1f}% [{100 * metric['lo']:.1f}, {100 * metric['hi']:.1f}]"


def _mean(metric: dict[str, float] | None) -> str:
    return _MISSING if metric is None else f"{metric['mean']:.3f}"


def _tr(cells: Sequence[str], css: str = "") -> str:
    """One table row of plain-text cells (escaped here), with an optional CSS class."""
    mark = f" class='{css}'" if css else ""
    return f"<tr{mark}>" + "".join(f"<td>{_e(cell)}</td>" for cell in cells) + "</tr>"


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], classes: Sequence[str] = (),
           css: str = "") -> str:
    """A table of plain-text cells; ``classes`` are per-row CSS classes (e.g. ``bug``)."""
    heading = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join(_tr(row, classes[i] if i < len(classes) else "")
                   for i, row in enumerate(rows))
    mark = f" class='{css}'" if css else ""
    return f"<table{mark}><tr>{heading}</tr>{body}</table>"


def _paragraphs(text: str) -> str:
    """Text with blank-line separated paragraphs as <p> elements."""
    parts = [part.strip() for part in re.split(r"\n\s*\n", text) if part.strip()]
    return "".join(f"<p>{_e(part)}</p>" for part in parts) or f"<p>{_MISSING}</p>"


def _accountant(accountant: dict[str, Any]) -> str:
    rows = [("name", accountant["name"]), ("δ", f"{accountant['delta']:.3g}"),
            ("notes", accountant["notes"] or _MISSING)]
    return _table(("setting", "value"), rows, css="text")


_RESULT_HEAD = ("#", "method", "batch", "steps", "codec", "privacy", "noise σ", "ε", "attack",
                "PII exact recovery [CI]", "token P / R", "ROUGE-1", "ROUGE-2", "ROUGE-L",
                "samples", "seconds")


def result_cells(index: int, row: Row) -> list[str]:
    """One results-table row, as text."""
    metric = row["metrics"].get
    return [str(index), row["method"], str(row["batch_size"]), str(row["local_steps"]),
            row["codec"], row["privacy"], _num(row["noise_multiplier"]), _eps(row["epsilon"]),
            row["attack"], _pct_ci(metric("pii_exact")),
            f"{_mean(metric('token_precision'))} / {_mean(metric('token_recall'))}",
            _mean(metric("rouge1")), _mean(metric("rouge2")), _mean(metric("rougeL")),
            str(row["samples"]), f"{row['seconds']:.1f}"]


def _results(rows: Sequence[Row]) -> str:
    if not rows:
        return "<p class='note'>The audit has no result rows.</p>"
    return _table(_RESULT_HEAD, (result_cells(i, row) for i, row in enumerate(rows)))


def _plots(pngs: dict[str, bytes | None]) -> str:
    """Each plot embedded as base64 under its title, or a note saying why it is left out."""
    parts = []
    for name, png in pngs.items():
        if png is None:
            parts.append(f"<p class='note'>{_e(PLOT_TITLES[name])}: skipped, "
                         f"{_e(_SKIPPED[name])}.</p>")
            continue
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<h3>{_e(PLOT_TITLES[name])}</h3>"
                     f"<img alt='{name}' src='data:image/png;base64,{data}'>")
    return "".join(parts)


_CANARY_HEAD = ("method", "privacy", "accountant ε", "empirical ε lower bound", "canaries",
                "guesses", "correct", "TPR at 0.1% FPR", "TPR at 1% FPR", "check")


def _check(canary: dict[str, Any]) -> str:
    """The verdict on one canary row: the bug flag, ok, or nothing to check without DP."""
    if canary["epsilon"] is None:
        return "n/a (no DP)"
    return BUG if is_bug(canary) else "ok"


def canary_cells(canary: dict[str, Any]) -> list[str]:
    """One canary-table row, as text; the last cell flags a bound above the accountant's ε."""
    return [canary["method"], canary["privacy"], _eps(canary["epsilon"]),
            f"{canary['epsilon_lower_bound']:.3g}", str(canary["num_canaries"]),
            str(canary["num_guesses"]), str(canary["num_correct"]),
            f"{canary['tpr_at_0.1%_fpr']:.3f}", f"{canary['tpr_at_1%_fpr']:.3f}",
            _check(canary)]


def _canary(canary: Sequence[dict[str, Any]]) -> str:
    if not canary:
        return "<p class='note'>No canary audit was run.</p>"
    bugs = sum(map(is_bug, canary))
    summary = (f"<p class='bug'>{bugs} of {len(canary)} canary rows show more leakage than "
               "the accountant allows: its ε is wrong for these runs.</p>" if bugs else
               "<p>Every empirical lower bound is at or below the accountant's ε.</p>")
    classes = ["bug" if is_bug(c) else "" for c in canary]
    return summary + _table(_CANARY_HEAD, map(canary_cells, canary), classes)


def _example_cells(report: Result, example: dict[str, Any]) -> list[str]:
    row = report["rows"][example["row"]]
    recovered = _recovered(example)
    setting = (f"{row['method']}, batch {row['batch_size']}, {row['local_steps']} steps, "
               f"codec {row['codec']}, privacy {row['privacy']}, ε {_eps(row['epsilon'])}, "
               f"attack {row['attack']}")
    return [str(example["row"]), setting, example["truth"], example["reconstruction"],
            f"{len(recovered)} of {len(set(example['pii']))}: {', '.join(recovered) or 'none'}"]


_MASK_NOTE = ("PII masking is on: in the example reconstructions (and in report.json) every "
              "PII value is replaced by a mask [PII#n], matched case-insensitively; the same "
              "value has the same mask within an example, so a mask in the reconstruction "
              "is a recovered value. Write the report with show_pii=True to see the values.")
_SHOW_NOTE = "PII masking is off (show_pii=True): the examples show real PII values."


def _examples(report: Result) -> str:
    if not report["examples"]:
        return "<p class='note'>The audit kept no example reconstructions.</p>"
    note = _MASK_NOTE if report["pii_masked"] else _SHOW_NOTE
    head = ("row", "setting", "truth", "reconstruction", "PII recovered")
    body = (_example_cells(report, ex) for ex in report["examples"])
    return f"<p class='note'>{_e(note)}</p>" + _table(head, body, css="text")


def _notes(report: Result) -> str:
    notes = [*report["notes"], _MASK_NOTE if report["pii_masked"] else _SHOW_NOTE]
    return "<ul>" + "".join(f"<li>{_e(note)}</li>" for note in notes) + "</ul>"


def _config(config: dict[str, Any]) -> str:
    return f"<pre>{_e(json.dumps(config, indent=2, ensure_ascii=False))}</pre>"


def render_html(report: Result, pngs: dict[str, bytes | None]) -> str:
    """The whole page for a prepared report (validated, masked unless shown, versioned)."""
    sections = (
        ("Threat model", _paragraphs(report["threat_model"])),
        ("Accountant", _accountant(report["accountant"])),
        ("Results", _results(report["rows"])),
        ("Plots", _plots(pngs)),
        ("Canary audit", _canary(report["canary"])),
        ("Example reconstructions", _examples(report)),
        ("Notes", _notes(report)),
        ("Config", _config(report["config"])),
    )
    meta = (f"audit {report['id']}, created {report['created']}, schema version "
            f"{report['schema_version']}, PII masking {'on' if report['pii_masked'] else 'off'}")
    body = "".join(f"<h2>{_e(title)}</h2>{part}" for title, part in sections)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(report['title'])}"
            f"</title><style>{_CSS}</style></head><body><h1>{_e(report['title'])}</h1>"
            f"<p class='meta'>{_e(meta)}</p>{body}</body></html>\n")


# ---------------------------------------------------------------- writing


def prepare(result: Result, *, show_pii: bool = False) -> Result:
    """The validated result as ``report.json`` holds it: a copy, masked unless ``show_pii``,
    with ``schema_version`` first and ``pii_masked`` last."""
    plain = _plain(result)
    validate_result(plain)
    shown = plain if show_pii else mask_pii(plain)
    rest = {k: v for k, v in shown.items() if k not in ("schema_version", "pii_masked")}
    report = {"schema_version": SCHEMA_VERSION, **rest, "pii_masked": not show_pii}
    validate_result(report)
    return report


def _write_pngs(pngs: dict[str, bytes | None], folder: Path) -> None:
    """Each plot with data as ``<name>.png``; the PNG of a plot now skipped is removed."""
    for name, png in pngs.items():
        target = folder / f"{name}.png"
        if png is None:
            target.unlink(missing_ok=True)
        else:
            target.write_bytes(png)


def write_audit_report(result: Result, out_dir: str | Path, *, show_pii: bool = False) -> Path:
    """Validate ``result`` against ``audit_schema.json`` (:class:`ConfigError` naming the
    failing path if it does not match), then write ``report.json``, the PNG plots and
    ``report.html`` into ``out_dir`` and return the HTML's path.

    Unless ``show_pii``, the examples' PII values are masked as ``[PII#n]`` in both the HTML
    and ``report.json`` (which records ``pii_masked``), so neither file leaks PII by default.
    The PNGs are embedded in the HTML as base64 and also written beside it."""
    report = prepare(result, show_pii=show_pii)
    folder = Path(out_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, ensure_ascii=False)
    (folder / "report.json").write_text(text + "\n", encoding="utf-8")
    pngs = draw_plots(report)
    _write_pngs(pngs, folder)
    page = folder / "report.html"
    page.write_text(render_html(report, pngs), encoding="utf-8")
    return page
