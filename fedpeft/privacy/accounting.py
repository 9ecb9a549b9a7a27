"""Per-participant privacy ledger: ε over all rounds a client (or the cohort) took part in.

Paper: Mironov, "Rényi Differential Privacy", CSF 2017, arXiv 1702.07476 (RDP accountant);
Gopi, Lee and Wutschitz, "Numerical Composition of Differential Privacy", NeurIPS 2021,
arXiv 2106.02848 (PRV accountant).

Why: a federated client spends privacy in every round it is sampled for, at that round's
noise multiplier sigma, sampling rate q and number of noisy steps. A single Opacus accountant
per process forgets that history when the client process ends, and a server-wide accountant
mixes clients that took part in different rounds. The server therefore records one
:class:`PrivacyEvent` per (participant, round) in a :class:`PrivacyLedger` and composes, for
each participant key, exactly the events that key took part in.

What:

- **Keys** are plain strings: a partition id (``"17"``) for sample-level DP (DP-SGD or DP-ZO
  on the client's own data), or one cohort key such as ``"*"`` for client-level DP, where
  the server's aggregate is the mechanism. Each key holds events of one ``level`` only:
  sample- and client-level ε bound different neighbouring relations and are never composed.
- **Composition is exact**: a key's events become an Opacus history
  ``[(sigma, q, steps), ...]`` (consecutive entries with the same (sigma, q) merged by summing
  steps, Opacus's own format) given to a fresh ``PRVAccountant``, or composed with
  ``RDPAccountant``'s own arithmetic (bit-identical results; the per-step RDP of each
  (sigma, q) is cached). Splitting the same steps over more rounds or more ``record`` calls
  gives the same ε. Events with ``steps == 0`` release nothing and are dropped.
- **Never under-reported**: RDP is a rigorous upper bound. PRV is tighter and returns
  Opacus's *upper* error bound; if it raises, returns a non-finite value, or its grid would
  be too large to compute in reasonable time (ε in the hundreds), the RDP value is reported
  instead and the reason is kept (``prv_fallback`` in :meth:`PrivacyLedger.summary`).
  Any event with sigma = 0 (no noise) makes that key's ε infinite.
- **JSON**: an infinite ε is written as the string ``"inf"`` (``float("inf")`` reads it
  back); every document is dumped with ``allow_nan=False`` so ``Infinity`` is never emitted.
- **Resume**: :meth:`PrivacyLedger.save` writes atomically and :meth:`PrivacyLedger.load`
  continues from the saved events, so a resumed run never resets ε.
- Results are cached on the composed history (not on the key), so keys with the same
  history (common when every client uses the same sigma and q) share one computation.

The Gaussian-DP accountant (``opacus.accountants.GaussianAccountant``) is deliberately not
offered: its CLT approximation can under-report ε for the step counts used here.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.errors import ConfigError

log = logging.getLogger(__name__)

LEVELS = ("sample", "client")
ACCOUNTANTS = ("rdp", "prv")  # never "gdp": Opacus's GaussianAccountant can under-report ε
LEDGER_FORMAT = "fedpeft-privacy-ledger"
LEDGER_VERSION = 1
PRV_EPS_ERROR = 0.01  # Opacus's default; the reported PRV ε is the upper end of this band
PRV_MAX_GRID = 10_000_000  # ~1.2 µs per point measured: ≈ 12 s and ~100 MB at the limit
INF = "inf"  # JSON spelling of an infinite ε

History = tuple[tuple[float, float, int], ...]


def _real(name: str, value: Any, expected: str, ok: Callable[[float], bool]) -> float:
    """``value`` as a finite float satisfying ``ok``, else a ConfigError naming ``name``."""
    valid = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not valid or not math.isfinite(float(value)) or not ok(float(value)):
        raise ConfigError(f"{name}: expected {expected}, found {value!r}")
    return float(value)


def _count(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (bools and floats rejected)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name}: expected an integer >= {minimum}, found {value!r}")
    return int(value)


def _check_delta(delta: Any) -> float:
    return _real("delta", delta, "a number in (0, 1)", lambda d: 0 < d < 1)


def _check_accountant(accountant: Any) -> str:
    if accountant not in ACCOUNTANTS:
        raise ConfigError.unknown("privacy accountant", str(accountant), ACCOUNTANTS)
    return accountant


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"ledger key: expected a non-empty string, found {key!r}")
    return key


def _json_eps(eps: float) -> float | str:
    """ε for JSON: the string ``"inf"`` when infinite (``json`` would write ``Infinity``)."""
    return INF if math.isinf(eps) else eps


@dataclass(frozen=True)
class PrivacyEvent:
    """One participation: ``steps`` releases of a Poisson-subsampled Gaussian mechanism.

    ``noise_multiplier`` is sigma (noise std / clipping norm; 0 means no privacy), ``sample_rate``
    is q (the Poisson sampling probability of one record, or of one client for
    ``level="client"``), ``level`` is ``"sample"`` (DP-SGD/DP-ZO on a client) or ``"client"``.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    level: str = "sample"

    def __post_init__(self) -> None:
        sigma = _real("PrivacyEvent.noise_multiplier", self.noise_multiplier,
                      "a finite number >= 0", lambda s: s >= 0)
        rate = _real("PrivacyEvent.sample_rate", self.sample_rate,
                     "a number in (0, 1]", lambda q: 0 < q <= 1)
        object.__setattr__(self, "noise_multiplier", sigma)
        object.__setattr__(self, "sample_rate", rate)
        object.__setattr__(self, "steps", _count("PrivacyEvent.steps", self.steps, 0))
        if self.level not in LEVELS:
            raise ConfigError.unknown("PrivacyEvent.level", str(self.level), LEVELS)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> PrivacyEvent:
        """Inverse of :meth:`to_dict`; missing or unknown fields raise ConfigError."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"privacy event: expected a JSON object, found {data!r}")
        fields = {"noise_multiplier", "sample_rate", "steps", "level"}
        if set(data) != fields:
            raise ConfigError(f"privacy event: expected fields {sorted(fields)}, "
                              f"found {sorted(map(str, data))}")
        return cls(**data)


# How a client reports what its mechanism did, in its reply's metrics (floats only).
EVENT_METRICS = ("dp_noise_multiplier", "dp_sample_rate", "dp_steps")


def event_metrics(event: PrivacyEvent) -> dict[str, float]:
    """The reply metrics describing ``event`` (see :func:`event_from_metrics`)."""
    values = (event.noise_multiplier, event.sample_rate, float(event.steps))
    return dict(zip(EVENT_METRICS, values, strict=True))


def event_from_metrics(metrics: Mapping[str, Any], level: str = "sample") -> PrivacyEvent | None:
    """The event a client reported, None if it reported none; a partial or malformed
    report raises ConfigError (the server must not account for less than happened)."""
    present = [k for k in EVENT_METRICS if k in metrics]
    if not present:
        return None
    if len(present) != len(EVENT_METRICS):
        raise ConfigError(f"privacy event metrics: expected all of {list(EVENT_METRICS)}, "
                          f"found {present}")
    sigma, rate, steps = (float(metrics[k]) for k in EVENT_METRICS)
    if steps != int(steps):
        raise ConfigError(f"privacy event metrics: dp_steps must be whole, found {steps}")
    return PrivacyEvent(sigma, rate, int(steps), level)


def _merge(events: Iterable[PrivacyEvent]) -> History:
    """Opacus history of ``events``: equal consecutive (sigma, q) merged, zero steps dropped."""
    out: list[tuple[float, float, int]] = []
    for e in events:
        if e.steps == 0:
            continue
        if out and out[-1][:2] == (e.noise_multiplier, e.sample_rate):
            out[-1] = (e.noise_multiplier, e.sample_rate, out[-1][2] + e.steps)
        else:
            out.append((e.noise_multiplier, e.sample_rate, e.steps))
    return tuple(out)


@lru_cache(maxsize=1024)
def _rdp_per_step(sigma: float, q: float) -> np.ndarray:
    """RDP of one step at RDPAccountant's default orders (Opacus multiplies it by steps)."""
    from opacus.accountants import RDPAccountant  # Opacus imports in ~1-4 s: only when used
    from opacus.accountants.analysis import rdp as rdp_analysis

    return rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1,
                                    orders=RDPAccountant.DEFAULT_ALPHAS)


def _rdp(history: History, delta: float) -> float:
    """RDP ε of ``history`` (an upper bound; NaN is reported as inf).

    The same arithmetic as ``RDPAccountant(history).get_epsilon(delta)``, bit for bit, with
    the per-step RDP of each (sigma, q) cached: Opacus recomputes it (~10-80 ms at q ≳ 0.01)
    for every entry of every history.
    """
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    rdp = sum([_rdp_per_step(sigma, q) * steps for sigma, q, steps in history])
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp,
                                            delta=delta)
    return math.inf if math.isnan(eps) else float(eps)


def _prv_grid_points(history: History, delta: float) -> float:
    """Points of the grid PRVAccountant would discretise on (mirrors its ``_get_domain``)."""
    from opacus.accountants.analysis.prv import (
        PoissonSubsampledGaussianPRV,
        compute_safe_domain_size,
    )

    delta_error = delta / 1000  # PRVAccountant.get_epsilon's default
    steps = [n for _, _, n in history]
    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history]
    half_width = compute_safe_domain_size(prvs, steps, PRV_EPS_ERROR, delta_error)
    mesh = PRV_EPS_ERROR / math.sqrt(sum(steps) * math.log(12 / delta_error) / 2)
    return 2 * half_width / mesh


@contextmanager
def _quiet_numpy() -> Iterator[None]:
    """Silence numpy's RuntimeWarnings (PRV takes log(0) at q = 1 and in far tails)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _prv(history: History, delta: float) -> float:
    """PRV ε of ``history`` (Opacus's upper error bound)."""
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = list(history)
    with _quiet_numpy():
        return float(accountant.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))


def _prv_or_rdp(history: History, delta: float, max_grid: float) -> tuple[float, str | None]:
    """PRV ε, or RDP ε and the reason when PRV cannot give a trustworthy finite value."""
    try:
        points = _prv_grid_points(history, delta)
        if points > max_grid:
            reason = f"PRV grid of {points:.3g} points exceeds the limit of {max_grid:.3g}"
        else:
            eps = _prv(history, delta)
            if math.isfinite(eps):
                return max(eps, 0.0), None
            reason = f"PRV returned {eps}"
    except Exception as exc:  # any numerical failure: RDP is a valid (looser) upper bound
        reason = f"PRV failed: {type(exc).__name__}: {exc}"
    log.warning("privacy ledger: %s for history %s; reporting the RDP ε", reason, history)
    return _rdp(history, delta), reason


@lru_cache(maxsize=4096)
def _compose(history: History, delta: float, accountant: str,
             max_grid: float) -> tuple[float, str | None]:
    """ε of ``history`` and, for PRV, why RDP's value stands in (None when it does not)."""
    if not history:
        return 0.0, None
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf, None
    if accountant == "rdp":
        return _rdp(history, delta), None
    return _prv_or_rdp(history, delta, max_grid)


class PrivacyLedger:
    """Server-side record of privacy events per participant key, composed into ε on demand.

    ``prv_max_grid`` bounds the PRV discretisation grid; beyond it the RDP ε is reported
    (see the module docstring). A key with no events has ε = 0.
    """

    def __init__(self, prv_max_grid: int = PRV_MAX_GRID) -> None:
        self.prv_max_grid = _count("prv_max_grid", prv_max_grid, 1)
        self._entries: dict[str, list[tuple[int, PrivacyEvent]]] = {}

    def _checked_event(self, key: str, event: Any) -> PrivacyEvent:
        """``event`` if it is a PrivacyEvent of the level ``key`` already holds."""
        if not isinstance(event, PrivacyEvent):
            raise ConfigError(f"privacy event: expected a PrivacyEvent, found {event!r}")
        level = self.level(_check_key(key))
        if level is not None and event.level != level:
            raise ConfigError(f"ledger key {key!r} holds {level}-level events; found a "
                              f"{event.level}-level event (use a separate key per level)")
        return event

    def record(self, key: str, event: PrivacyEvent, round: int) -> None:
        """Add ``event`` to ``key``'s history, as taking place in server round ``round``."""
        event = self._checked_event(key, event)
        self._entries.setdefault(key, []).append((_count("round", round, 0), event))

    def keys(self) -> list[str]:
        """Keys with at least one recorded event, sorted."""
        return sorted(self._entries)

    def level(self, key: str) -> str | None:
        """The level of ``key``'s events, or None for a key with no events."""
        entries = self._entries.get(key)
        return entries[0][1].level if entries else None

    def rounds(self, key: str) -> list[int]:
        """Sorted distinct rounds in which ``key`` recorded events."""
        return sorted({r for r, _ in self._entries.get(key, [])})

    def events(self, key: str) -> list[PrivacyEvent]:
        """``key``'s events in recording order."""
        return [e for _, e in self._entries.get(key, [])]

    def history(self, key: str) -> list[tuple[float, float, int]]:
        """``key``'s composed history in Opacus's format ``[(sigma, q, steps), ...]``."""
        return list(_merge(self.events(key)))

    def _account(self, events: list[PrivacyEvent], delta: float,
                 accountant: str) -> tuple[float, str | None]:
        history = _merge(events)
        return _compose(history, _check_delta(delta), _check_accountant(accountant),
                        self.prv_max_grid)

    def epsilon(self, key: str, delta: float, accountant: str = "rdp") -> float:
        """ε(δ) of all events ``key`` took part in, by ``accountant`` ("rdp" or "prv")."""
        return self._account(self.events(_check_key(key)), delta, accountant)[0]

    def epsilon_if(self, key: str, event: PrivacyEvent, delta: float,
                   accountant: str = "rdp") -> float:
        """ε(δ) ``key`` would have after also taking part in ``event`` (nothing is recorded)."""
        event = self._checked_event(key, event)
        return self._account([*self.events(key), event], delta, accountant)[0]

    def worst(self, delta: float, accountant: str = "rdp",
              level: str | None = None) -> tuple[str, float] | None:
        """(key, ε) of the key with the largest ε (of ``level``, if given); None if no keys.

        Ties go to the first key in sorted order.
        """
        keys = [k for k in self.keys() if level is None or self.level(k) == level]
        if not keys:
            return None
        return max(((k, self.epsilon(k, delta, accountant)) for k in keys), key=lambda x: x[1])

    def _key_summary(self, key: str, delta: float) -> dict[str, Any]:
        prv, fallback = self._account(self.events(key), delta, "prv")
        return {"level": self.level(key), "rounds": self.rounds(key),
                "steps": sum(e.steps for e in self.events(key)),
                "rdp": _json_eps(self.epsilon(key, delta, "rdp")), "prv": _json_eps(prv),
                "prv_fallback": fallback}

    def summary(self, delta: float) -> dict[str, Any]:
        """JSON-ready report: per key ε by both accountants, and the worst key of each.

        Infinite ε is the string ``"inf"``; ``prv_fallback`` is null, or why ``prv`` holds
        the RDP value; ``worst`` entries are null for an empty ledger. Layout::

            {"delta": 1e-05,
             "keys": {"3": {"level": "sample", "rounds": [1, 4], "steps": 20,
                            "rdp": 2.21, "prv": 1.99, "prv_fallback": null}},
             "worst": {"rdp": {"key": "3", "epsilon": 2.21},
                       "prv": {"key": "3", "epsilon": 1.99}}}
        """
        keys = {k: self._key_summary(k, delta) for k in self.keys()}
        worst: dict[str, Any] = {}
        for accountant in ACCOUNTANTS:
            found = self.worst(delta, accountant)
            worst[accountant] = None if found is None else {
                "key": found[0], "epsilon": _json_eps(found[1])}
        return {"delta": _check_delta(delta), "keys": keys, "worst": worst}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready events of every key (what :meth:`save` writes)."""
        entries = {k: [{"round": r, **e.to_dict()} for r, e in self._entries[k]]
                   for k in self.keys()}
        return {"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "entries": entries}

    @classmethod
    def from_dict(cls, data: Any, prv_max_grid: int = PRV_MAX_GRID) -> PrivacyLedger:
        """Inverse of :meth:`to_dict`, validating every field (ConfigError on any defect)."""
        entries = _ledger_entries(data)
        ledger = cls(prv_max_grid)
        for key, items in entries.items():
            if not isinstance(items, list):
                raise ConfigError(f"privacy ledger key {key!r}: expected a list of events, "
                                  f"found {items!r}")
            for i, item in enumerate(items):
                try:
                    round_, event = _ledger_item(item)
                    ledger.record(key, event, round_)
                except ConfigError as exc:
                    raise ConfigError(f"privacy ledger key {key!r}, event {i}: {exc}") from exc
        return ledger

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as JSON atomically (temporary file, then ``os.replace``)."""
        _atomic_write(Path(path), json.dumps(self.to_dict(), indent=1, allow_nan=False))

    @classmethod
    def load(cls, path: str | os.PathLike[str], missing_ok: bool = False,
             prv_max_grid: int = PRV_MAX_GRID) -> PrivacyLedger:
        """Read a ledger written by :meth:`save`; a missing file is an error unless
        ``missing_ok`` (then the ledger starts empty)."""
        path = Path(path)
        if not path.exists():
            if missing_ok:
                return cls(prv_max_grid)
            raise ConfigError(f"privacy ledger {path}: expected an existing file to resume "
                              "from, found none (missing_ok=True starts an empty ledger)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"privacy ledger {path}: expected JSON, found {exc}") from exc
        try:
            return cls.from_dict(data, prv_max_grid)
        except ConfigError as exc:
            raise ConfigError(f"privacy ledger {path}: {exc}") from exc


def _ledger_entries(data: Any) -> dict[str, Any]:
    """The ``entries`` mapping of a ledger document, after checking format and version."""
    if not isinstance(data, Mapping) or data.get("format") != LEDGER_FORMAT:
        found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
        raise ConfigError(f"expected a JSON object with format {LEDGER_FORMAT!r}, "
                          f"found {found!r}")
    if data.get("version") != LEDGER_VERSION:
        raise ConfigError(f"privacy ledger version: expected {LEDGER_VERSION}, "
                          f"found {data.get('version')!r}")
    entries = data.get("entries")
    if not isinstance(entries, Mapping):
        raise ConfigError(f"privacy ledger entries: expected a JSON object, found {entries!r}")
    return dict(entries)


def _ledger_item(item: Any) -> tuple[int, PrivacyEvent]:
    """(round, event) of one saved entry ``{"round": r, <PrivacyEvent fields>}``."""
    if not isinstance(item, Mapping) or "round" not in item:
        raise ConfigError(f"expected a JSON object with a 'round' field, found {item!r}")
    fields = {k: v for k, v in item.items() if k != "round"}
    return item["round"], PrivacyEvent.from_dict(fields)


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new file, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _search_sigma(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                  accountant: str) -> float:
    """Opacus's bisection for sigma; its 'budget too low' ValueError becomes a ConfigError."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with _quiet_numpy():
            return float(get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                steps=steps, accountant=accountant))
    except ValueError as exc:
        raise ConfigError(
            f"target ε = {target_epsilon} at δ = {delta}: expected a budget reachable with "
            f"sigma ≤ 1e6 over {steps} steps at q = {sample_rate}, found it is not ({exc})"
        ) from exc


def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     accountant: str = "rdp") -> float:
    """Smallest sigma (to Opacus's 0.01 ε tolerance) whose ε(δ) after ``steps`` steps at
    ``sample_rate`` is at most ``target_epsilon``, by ``accountant``.

    The result is re-checked; if PRV's value at the returned sigma is not finite and within the
    target, the (larger, RDP-certified) sigma is returned instead.
    """
    target = _real("target_epsilon", target_epsilon, "a finite number > 0", lambda e: e > 0)
    delta = _check_delta(delta)
    rate = _real("sample_rate", sample_rate, "a number in (0, 1]", lambda q: 0 < q <= 1)
    steps = _count("steps", steps, 1)
    sigma = _search_sigma(target, delta, rate, steps, _check_accountant(accountant))
    check = _compose(((sigma, rate, steps),), delta, accountant, PRV_MAX_GRID)[0]
    if accountant == "prv" and not check <= target:
        log.warning("PRV could not certify sigma = %s for ε = %s; using RDP's sigma", sigma, target)
        sigma = _search_sigma(target, delta, rate, steps, "rdp")
    return sigma
