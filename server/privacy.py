"""The server's privacy book: every client's privacy events, composed across rounds.

Sample-level mechanisms (DP-SGD, DP-ZO) run on clients; each reply reports what its
mechanism did (σ, q, steps) and the strategy collects those per partition
(``traffic.privacy``). Client-level DP is run by the server, which records one event per
round for the whole federation. After every round the ledger is written to
``runs/<id>/privacy.json`` (atomically) *before* the round's checkpoint, and a resumed run
continues from that file, so ε is never reset: rounds replayed after a crash are counted
again, which can only over-report.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedpeft.errors import BudgetExhausted
from fedpeft.privacy import build_privacy
from fedpeft.privacy.accounting import PrivacyEvent, PrivacyLedger, _atomic_write, _json_eps
from fedpeft.privacy.client import LEDGER_KEY
from fedpeft.reporting import RunDir

log = logging.getLogger("flwr")
LEDGER_FILE = "privacy.json"


class PrivacyBook:
    """The run's ledger plus what the configured mechanism says about it."""

    def __init__(self, cfg: Any, run: RunDir, resume: bool) -> None:
        self.mechanism = build_privacy(cfg.privacy)
        self.delta = float(getattr(cfg.privacy, "delta", 0.0))
        self.path: Path = run.path / LEDGER_FILE
        self.ledger = PrivacyLedger.load(self.path, missing_ok=True) if resume \
            else PrivacyLedger()

    @property
    def active(self) -> bool:
        """Whether the run has a privacy mechanism (and so reports ε)."""
        return self.mechanism.level != "none"

    def record_round(self, rnd: int, events: Mapping[str, PrivacyEvent]) -> dict[str, Any]:
        """Compose this round's events, write the ledger, return the round's ε summary."""
        if not self.active:
            return {}
        for key, event in sorted(events.items()):
            self.ledger.record(key, event, rnd)
        rdp = self.rdp_by_client()
        prv = worst_prv(self.ledger, rdp, self.delta)
        self.save(rdp, prv)
        return self.round_summary(rdp, prv)

    def round_summary(self, rdp: dict[str, float] | None = None,
                      prv: tuple[str, float] | None = None) -> dict[str, Any]:
        """Worst ε over clients (RDP and PRV), the worst client, and how many are tracked
        (from ``rdp``/``prv`` when the caller has just computed them)."""
        if rdp is None:
            rdp = self.rdp_by_client()
            prv = worst_prv(self.ledger, rdp, self.delta)
        worst_key = max(rdp, key=lambda k: rdp[k]) if rdp else None
        return {"mechanism": self.mechanism.name, "level": self.mechanism.level,
                "delta": self.delta, "clients": len(rdp), "worst_client": worst_key,
                "epsilon_rdp": _json_eps(rdp[worst_key]) if worst_key else 0.0,
                "epsilon_prv": _json_eps(prv[1]) if prv else 0.0}

    def rdp_by_client(self) -> dict[str, float]:
        """RDP ε(δ) of every tracked client (cheap: per-step RDP is cached)."""
        return {k: self.ledger.epsilon(k, self.delta, "rdp") for k in self.ledger.keys()}  # noqa: SIM118 (a method)

    def admit(self, nodes: list[int], partition_of: Callable[[int], int | None],
              rnd: int) -> list[int]:
        """The nodes whose next round keeps them within ``privacy.max_epsilon`` (RDP, the
        larger of the two accountants). A client's next round is assumed to cost what its
        last round did; clients never seen cost nothing yet. None left: BudgetExhausted."""
        budget = getattr(self.mechanism.cfg, "max_epsilon", None)
        if not self.active or budget is None:
            return nodes
        kept = [n for n in nodes if self._fits(self._key(partition_of(n)), budget)]
        for node in sorted(set(nodes) - set(kept)):
            log.warning("fedpeft: round %d: node %s (partition %s) left out: its next round "
                        "would take epsilon above privacy.max_epsilon=%g", rnd, node,
                        partition_of(node), budget)
        if nodes and not kept:
            raise BudgetExhausted(f"privacy budget exhausted before round {rnd}: every "
                                  f"client's next round would exceed max_epsilon={budget}")
        return kept

    def _key(self, partition: int | None) -> str | None:
        if self.mechanism.level == "client":
            return LEDGER_KEY
        return None if partition is None else str(partition)

    def _fits(self, key: str | None, budget: float) -> bool:
        event = None if key is None else self._next_event(key)
        return event is None or self.ledger.epsilon_if(key, event, self.delta, "rdp") <= budget

    def _next_event(self, key: str) -> PrivacyEvent | None:
        """Client level: the configured event; sample level: the client's last one."""
        if self.mechanism.level == "client":
            return self.mechanism.cfg.event()
        known = key in self.ledger.keys()  # noqa: SIM118 (a method)
        return self.ledger.events(key)[-1] if known else None

    def save(self, rdp: dict[str, float], prv: tuple[str, float] | None) -> None:
        """Events, per-client RDP ε and the worst PRV ε, in one atomically replaced file."""
        doc = {**self.ledger.to_dict(), "mechanism": self.mechanism.name,
               "level": self.mechanism.level, "delta": self.delta,
               "epsilon_rdp": {k: _json_eps(v) for k, v in sorted(rdp.items())},
               "worst_prv": None if prv is None else {"client": prv[0],
                                                      "epsilon": _json_eps(prv[1])}}
        _atomic_write(self.path, json.dumps(doc, indent=1, allow_nan=False))


def worst_prv(ledger: PrivacyLedger, rdp: Mapping[str, float],
              delta: float) -> tuple[str, float] | None:
    """The largest PRV ε over clients without computing PRV for each: clients are tried
    in decreasing RDP ε, and the search stops once the next client's RDP ε (an upper
    bound of its PRV ε, which the ledger falls back to) is below the best PRV found."""
    best: tuple[str, float] | None = None
    for key in sorted(rdp, key=lambda k: -rdp[k]):
        if best is not None and rdp[key] <= best[1]:
            break
        eps = min(ledger.epsilon(key, delta, "prv"), rdp[key])
        if best is None or eps > best[1]:
            best = (key, eps)
    return best
