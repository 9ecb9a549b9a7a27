"""Privacy audits of what a server observes: reconstruction attacks on captured client
updates (:mod:`attacks.recit`, :mod:`attacks.baselines`, :mod:`attacks.optimization`),
their scoring (:mod:`attacks.metrics`), a one-run membership audit (:mod:`attacks.canary`)
and the audit report (:mod:`attacks.report`)."""

from attacks import baselines, optimization, recit  # noqa: F401  (register the attacks)
from attacks.base import ATTACKS, Attack, AttackContext, Observation, Reconstruction

__all__ = ["ATTACKS", "Attack", "AttackContext", "Observation", "Reconstruction"]
