"""Differential-privacy bookkeeping for federated runs.

:mod:`fedpeft.privacy.accounting` keeps a per-participant ledger of privacy events and turns
it into (ε, δ) with Opacus's RDP and PRV accountants. Import it directly; this package
imports nothing itself so that ``import fedpeft.privacy`` stays cheap.
"""
