"""Exact span recovery (attacks.span via the recit attack): the rank cut, exact records
from a FedSGD LoRA update, and no exact signal from AdamW steps or noisy updates."""

from __future__ import annotations

import numpy as np
import torch

from attacks.base import Observation
from attacks.recit import RecitAttack, RecitConfig
from attacks.span import row_space
from tests.unit.attack_setup import client_update, tiny_context

RECORDS = ["Ann Lee, 555-0100, Oslo.", "Bo Kim at bo@x.org."]


def test_row_space_cuts_at_the_rounding_gap() -> None:
    rng = np.random.default_rng(0)
    low = rng.standard_normal((20, 5)) @ rng.standard_normal((5, 30))
    basis = row_space(low + 1e-9 * rng.standard_normal((20, 30)))
    assert basis is not None and basis.shape == (5, 30)
    assert np.allclose(basis @ basis.T, np.eye(5), atol=1e-8)
    assert row_space(rng.standard_normal((20, 30))) is None  # no clear rank: noise
    assert row_space(np.zeros((20, 30))) is None


def _observation(update: dict, sent: dict, n: int) -> Observation:
    return Observation(round=1, partition=0, kind="dense", update=update, sent_global=sent,
                       num_examples=n)


def _attack(texts: list[str], optimizer: type = torch.optim.SGD, noise: float = 0.0,
            ) -> tuple[list[str], list[str]]:
    """What the exact stage and the whole attack recover from one client step."""
    ctx = tiny_context(len(texts), rank=96, hidden=128)
    sent = ctx.method.get_state(ctx.model)  # round 1: LoRA-B zero, LoRA-A random
    update = client_update(ctx, sent, texts, optimizer)
    rng = np.random.default_rng(0)
    update = {k: v + noise * float(np.abs(v).max()) * rng.standard_normal(v.shape)
              for k, v in update.items()}
    attack = RecitAttack(RecitConfig(max_new_tokens=4), ctx)
    obs = _observation(update, sent, len(texts))
    exact = [r.text for r in attack.exact(obs, len(texts))]
    return exact, [r.text for r in attack.reconstruct(obs, len(texts))]


def test_fedsgd_update_gives_the_record_exactly() -> None:
    exact, full = _attack(RECORDS[:1])
    assert exact == RECORDS[:1] and full == exact


def test_exact_recovery_of_a_batch_ignores_its_order() -> None:
    forward, _ = _attack(RECORDS)
    backward, _ = _attack(RECORDS[::-1])
    assert sorted(forward) == sorted(backward) == sorted(RECORDS)


def test_adamw_steps_and_noise_leave_no_exact_signal() -> None:
    exact, full = _attack(RECORDS[:1], optimizer=torch.optim.AdamW)
    assert exact == [] and len(full) == 1  # the inexact stages still answer
    noisy, _ = _attack(RECORDS[:1], noise=1e-2)
    assert noisy == []
