"""FedKSeed algorithm: exact replay, catch-up, Pro probabilities, ZO steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedpeft.methods.fedkseed import (
    FedKSeedConfig,
    apply_round,
    candidate_seeds,
    pro_probabilities,
    zo_train,
)
from fedpeft.methods.replay import trainable_params
from fedpeft.models import ModelConfig, load_causal_lm
from fedpeft.seeding import normal_

K = 64


def _rounds(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    out = []
    for _ in range(n):
        idx = np.unique(rng.integers(0, K, size=10)).astype(np.int32)
        out.append((rng.permutation(idx), rng.normal(size=idx.size).astype(np.float32)))
    return out


def test_server_and_client_replays_are_bit_identical() -> None:
    cfg = ModelConfig(name="tiny-llama")
    server = trainable_params(load_causal_lm(cfg), "all")
    client = trainable_params(load_causal_lm(cfg), "all")
    seeds = candidate_seeds(0, K)

    for idx, vals in _rounds(3):
        apply_round(server, seeds, idx, vals, lr=1e-3)
        apply_round(client, seeds, idx, vals, lr=1e-3)

    assert all(torch.equal(server[n], client[n]) for n in server)
    norm = server["model.norm.weight"]
    assert not torch.equal(norm, torch.ones_like(norm))


def test_client_that_skipped_three_rounds_catches_up_exactly() -> None:
    cfg = ModelConfig(name="tiny-llama")
    server = trainable_params(load_causal_lm(cfg), "all")
    client = trainable_params(load_causal_lm(cfg), "all")
    seeds, history = candidate_seeds(0, K), _rounds(5)
    for idx, vals in history[:2]:  # both at round 2
        apply_round(server, seeds, idx, vals, lr=1e-3)
        apply_round(client, seeds, idx, vals, lr=1e-3)
    for idx, vals in history[2:]:  # the client is offline for rounds 3..5
        apply_round(server, seeds, idx, vals, lr=1e-3)

    for idx, vals in history[2:]:  # catch-up: the missed per-round deltas, in order
        apply_round(client, seeds, idx, vals, lr=1e-3)

    assert all(torch.equal(server[n], client[n]) for n in server)


def test_pro_probabilities_match_hand_computation() -> None:
    # H: seed0 -> [2], seed1 -> [0], seed2 -> [5000 (clipped to 1000), -2000 (clipped)]
    clip = 1000.0
    sums = np.array([2.0, 0.0, min(5000, clip) + min(2000, clip)])
    counts = np.array([1, 1, 2])

    p = pro_probabilities(sums, counts, temperature=1.0)

    psi = np.array([2.0, 0.0, 1000.0])
    norm = (psi - 0.0) / 1000.0  # min-max to [0, 1]
    expected = np.exp(norm) / np.exp(norm).sum()
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    assert p.sum() == pytest.approx(1.0) and p.argmax() == 2


def test_pro_probabilities_are_uniform_without_history() -> None:
    p = pro_probabilities(np.zeros(4), np.zeros(4), temperature=0.5)
    np.testing.assert_allclose(p, 0.25)


def _quadratic(n: int = 1000):
    w = torch.zeros(n, dtype=torch.float64)
    target = torch.linspace(-1, 1, n, dtype=torch.float64)
    return {"w": w}, target


def test_two_point_estimate_equals_directional_derivative_on_a_quadratic() -> None:
    params, target = _quadratic()
    seeds = candidate_seeds(1, 4)
    cfg = FedKSeedConfig(num_seeds=4, local_steps=1, eps=1e-3, lr=1e-4)

    res = zo_train(params, lambda _: float(((params["w"] - target) ** 2).sum()), seeds, cfg,
                   np.random.default_rng(0))

    k = int(res.indices[0])
    z = normal_(torch.empty(1000, dtype=torch.float64), seeds[k])
    expected = float(2 * ((torch.zeros(1000, dtype=torch.float64) - target) * z).sum())
    assert res.values[0] == pytest.approx(expected, rel=1e-5)


def test_zo_training_lowers_the_loss_and_skips_non_finite_steps() -> None:
    # K must exceed the dimension here: updates live in the span of the K directions.
    params, target = _quadratic(50)
    seeds = candidate_seeds(2, 256)
    cfg = FedKSeedConfig(num_seeds=256, local_steps=300, eps=1e-3, lr=5e-3)
    calls = {"n": 0}

    def loss(step: int) -> float:
        calls["n"] += 1
        return math.nan if step == 5 else float(((params["w"] - target) ** 2).sum())

    before = float((target**2).sum())
    res = zo_train(params, loss, seeds, cfg, np.random.default_rng(0))

    after = float(((params["w"] - target) ** 2).sum())
    assert res.skipped == 1 and calls["n"] == 2 * 300
    assert after < 0.5 * before
    assert list(res.indices) == sorted(set(res.indices.tolist()))
