"""Run health: a run in which nothing was accepted ends ``failed``, and bad rounds are loud.

After every round the server checks what its strategy accepted. A round in which more
than half of the sampled clients failed or were rejected logs one warning with the
reasons (grouped, not one traceback per client). ``run.max_empty_rounds`` consecutive
rounds without a single accepted update end the run with :class:`NothingTrained`, whose
message carries the first client error, so ``status.json`` and the CLI can show it.
"""

from __future__ import annotations

import logging
from collections import Counter

from fedpeft.errors import RunFailed
from fedpeft.types import RoundRecord

log = logging.getLogger("flwr")


class NothingTrained(RunFailed):
    """No client update was accepted for ``run.max_empty_rounds`` rounds in a row."""

    def __init__(self, message: str, first_error: str | None) -> None:
        super().__init__(message)
        self.first_error = first_error


class RunHealth:
    """Counts consecutive empty rounds and keeps the run's first client error."""

    def __init__(self, max_empty_rounds: int) -> None:
        self.max_empty_rounds = max_empty_rounds
        self.empty = 0
        self.first_error: str | None = None

    def check(self, rec: RoundRecord) -> None:
        """Warn on a mostly-failed round; raise once too many rounds trained nothing."""
        reasons = list(rec.rejected.values())
        if reasons and self.first_error is None:
            self.first_error = reasons[0]
        sampled = rec.num_clients + rec.num_rejected
        if sampled and rec.num_rejected * 2 > sampled:
            log.warning("round %d: %d of %d clients failed or were rejected: %s", rec.round,
                        rec.num_rejected, sampled, summarize(reasons))
        self.empty = self.empty + 1 if rec.num_clients == 0 else 0
        if self.empty >= self.max_empty_rounds:
            raise NothingTrained(self._message(rec, sampled), self.first_error)

    def _message(self, rec: RoundRecord, sampled: int) -> str:
        first = self.first_error or "no client replied"
        return (f"no client update was accepted for {self.empty} round(s) in a row (round "
                f"{rec.round}; {rec.num_rejected} of {sampled} sampled clients failed or were "
                f"rejected; run.max_empty_rounds={self.max_empty_rounds}); the run trained "
                f"nothing more. First client error: {first}")


def summarize(reasons: list[str], limit: int = 3) -> str:
    """Distinct reasons with their counts, most common first."""
    counts = Counter(reasons).most_common()
    text = "; ".join(f"{n}x {r}" for r, n in counts[:limit])
    return text + (f"; and {len(counts) - limit} other reason(s)" if len(counts) > limit else "")
