"""Exception types raised by fedpeft.

Every error names what was expected, what was found and, where there is a finite set,
the valid choices, so a user can fix a run without reading the source.
"""

from __future__ import annotations

from collections.abc import Iterable


def _choices(valid: Iterable[str]) -> str:
    return ", ".join(sorted(valid)) or "(none)"


class FedPeftError(Exception):
    """Base class of all fedpeft errors."""


class ConfigError(FedPeftError, ValueError):
    """A configuration value, key or group name is invalid."""

    @classmethod
    def unknown(cls, what: str, found: str, valid: Iterable[str]) -> ConfigError:
        """Build the standard 'unknown X' message listing the valid choices."""
        return cls(f"unknown {what} {found!r}; valid choices: {_choices(valid)}")


class IncompatibleComponentsError(ConfigError):
    """Two configured components cannot work together (e.g. method vs strategy)."""


class ModelNotFoundError(FedPeftError, FileNotFoundError):
    """A model name/path could not be resolved to weights on this machine."""


class DatasetNotFoundError(FedPeftError, FileNotFoundError):
    """A dataset name/path could not be resolved on this machine."""


class UpdateRejected(FedPeftError):
    """A client update failed validation (shape, dtype, non-finite, oversize, keys)."""


class RunFailed(FedPeftError, RuntimeError):
    """A federated run did not complete."""


class BudgetExhausted(FedPeftError):
    """No client has privacy budget left for another round: the run ends cleanly."""
