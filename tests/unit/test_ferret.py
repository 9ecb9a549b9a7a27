"""Ferret: unbiased reconstruction, fresh per-block seeds, exact replay and catch-up,
allocation, validation, and one real local round on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft import wire
from fedpeft.config import compose
from fedpeft.data import encode_dataset, load_task_data
from fedpeft.errors import ConfigError, UpdateRejected
from fedpeft.methods import TrainContext, build_method
from fedpeft.methods.ferret import (
    BlockLayout,
    Contribution,
    FerretConfig,
    allocate,
    apply_contributions,
    basis_seed,
    client_seed,
    encode_round,
    make_layout,
    project,
)
from fedpeft.models import get_tokenizer, load_causal_lm
from fedpeft.seeding import truncated_normal_
from strategies.ferret import FerretStrategy, check_projection


def _reconstruct(delta: torch.Tensor, layout: BlockLayout, seed: int,
                 counts: np.ndarray) -> torch.Tensor:
    """Δ̂ = V γ via the production replay (coef -1 turns w - c·Δ̂ into +Δ̂ from zero)."""
    gammas = project(delta, layout, seed, counts)
    out = {"w": torch.zeros_like(delta)}
    apply_contributions(out, layout, [Contribution(seed, -1.0, counts, gammas)])
    return out["w"]


def test_reconstruction_is_unbiased() -> None:
    # Prepare: 3 blocks of 32, few bases each, so single reconstructions are very noisy
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(96, generator=gen)
    layout = BlockLayout(("w",), (96,), 32)
    counts = allocate(np.array([delta[i:i + 32].norm() for i in (0, 32, 64)]), 12, 2)
    n = 1500
    # Execute
    samples = torch.stack([_reconstruct(delta, layout, s, counts) for s in range(n)]).double()
    # Assert: every coordinate's mean is within 4.5 standard errors of Δ, and a single
    # reconstruction is far from Δ (the test would pass trivially for an exact method)
    mean, se = samples.mean(0), samples.std(0) / n**0.5
    z = ((mean - delta.double()) / se).abs()
    assert z.max().item() < 4.5, f"max |z| {z.max().item():.2f}"
    assert (samples[0] - delta).norm() > 0.5 * delta.norm()
    assert counts.sum() <= 12 and counts.min() >= 2


def test_reconstruction_has_unit_scale_on_average() -> None:
    # A scaling slip (e.g. 1/(dK) for 1/(rho K), off by ~3x) shows up as a mean ratio far
    # from 1 over 300 reconstructions of an all-ones vector.
    delta = torch.ones(64)
    layout = BlockLayout(("w",), (64,), 64)
    counts = np.array([8], np.int32)
    recon = torch.stack([_reconstruct(delta, layout, s, counts) for s in range(300)])
    ratio = recon.mean(0).mean().item()
    assert 0.8 < ratio < 1.2


def test_basis_seeds_never_repeat_across_blocks_clients_and_rounds() -> None:
    seeds = [basis_seed(client_seed(7, r, p), b, k)
             for r in range(1, 4) for p in range(5) for b in range(6) for k in range(20)]
    assert len(set(seeds)) == len(seeds)
    # two equal-size blocks of one client get different bases
    one = truncated_normal_(torch.empty(100), basis_seed(11, 0, 0), 0.1)
    two = truncated_normal_(torch.empty(100), basis_seed(11, 1, 0), 0.1)
    assert not torch.equal(one, two)


def _contributions(layout: BlockLayout, rnd: int, n: int) -> list[Contribution]:
    rng = np.random.default_rng(rnd)
    out = []
    for p in range(n):
        counts = rng.integers(2, 5, size=layout.num_blocks).astype(np.int32)
        gammas = rng.normal(scale=1e-3, size=int(counts.sum())).astype(np.float32)
        out.append(Contribution(client_seed(0, rnd, p), 10.0 / n, counts, gammas))
    return out


@pytest.fixture(scope="module")
def tiny_method():
    cfg = compose("method=ferret strategy=ferret model=tiny-llama method.block_size=4096 "
                  "method.num_bases=4096")
    return cfg, build_method(cfg.method.name, cfg.method)


def test_server_replay_and_client_catch_up_are_bit_identical(tiny_method) -> None:
    # Prepare: a server model and a client that was offline for rounds 2..4
    cfg, method = tiny_method
    server = method.attach(load_causal_lm(cfg.model), seed=0)
    client = method.attach(load_causal_lm(cfg.model), seed=0)
    strategy = FerretStrategy()
    strategy.bind_method(method)
    rounds = [_contributions(method.layout, r, 3) for r in range(1, 5)]
    # Execute: the server applies each round's aggregate as the strategy returns it
    for rnd, contribs in enumerate(rounds, 1):
        strategy.history.append(contribs)
        method.apply_global(server, encode_round(contribs))
        if rnd == 1:
            method.catch_up(client, strategy.history_since(0), 0, 1)
    method.catch_up(client, strategy.history_since(1), 1, 4)
    # Assert
    s, c = method.params(server), method.params(client)
    assert all(torch.equal(s[k], c[k]) for k in s)
    base = method.params(load_causal_lm(cfg.model))
    assert any(not torch.equal(s[k], base[k]) for k in s)


def test_blocks_pack_small_tensors_and_split_large_ones() -> None:
    params = {"a": torch.zeros(10), "b": torch.zeros(3, 7), "c": torch.zeros(5)}
    layout = make_layout(params, FerretConfig(block_size=8, num_bases=64))
    assert layout.num_blocks == 5  # 36 elements
    assert layout.pieces(1) == [("a", 8, 2, 0), ("b", 0, 6, 2)]
    assert layout.pieces(4) == [("c", 1, 4, 0)]
    covered = sum(n for b in range(layout.num_blocks) for _, _, n, _ in layout.pieces(b))
    assert covered == 36
    with pytest.raises(ConfigError, match="raise num_bases or block_size"):
        make_layout(params, FerretConfig(block_size=2, num_bases=8))


def test_allocation_is_proportional_with_a_floor() -> None:
    counts = allocate(np.array([0.0, 1.0, 3.0]), 100, 2)
    assert counts.tolist() == [2, 2 + 23, 2 + 70]
    assert allocate(np.zeros(4), 20, 2).tolist() == [5, 5, 5, 5]
    assert allocate(np.array([np.nan, 1.0]), 10, 2).tolist() == [2, 8]


@pytest.mark.parametrize(
    ("seed", "counts", "gammas", "reason"),
    [
        (np.array([1.5]), np.array([2, 2], np.int32), np.zeros(4, np.float32), "integer seed"),
        (np.array([1]), np.array([2], np.int32), np.zeros(2, np.float32), "2 integer block"),
        (np.array([1]), np.array([0, 2], np.int32), np.zeros(2, np.float32), ">= 1"),
        (np.array([1]), np.array([50, 2], np.int32), np.zeros(52, np.float32), "<= 32"),
        (np.array([1]), np.array([2, 2], np.int32), np.zeros(3, np.float32), "4 float"),
        (np.array([1]), np.array([2, 2], np.int32), np.full(4, np.inf, np.float32),
         "non-finite"),
    ],
)
def test_malformed_projections_are_rejected(seed, counts, gammas, reason: str) -> None:
    with pytest.raises(UpdateRejected, match=reason):
        check_projection(seed, counts, gammas, num_blocks=2, max_bases=32)


def test_strategy_rejects_a_reused_seed_and_weights_by_global_lr(tiny_method) -> None:
    _, method = tiny_method
    strategy = FerretStrategy(global_lr=4.0, weighting="examples")
    strategy.bind_method(method)
    counts = np.full(method.layout.num_blocks, 2, np.int32)
    arrays = {wire.PROJ_SEED_KEY: np.array([5]), wire.PROJ_COUNTS_KEY: counts,
              wire.PROJ_GAMMA_KEY: np.zeros(int(counts.sum()), np.float32)}
    first, payload = strategy.parse(arrays, {})
    with pytest.raises(UpdateRejected, match="already used"):
        strategy.parse(arrays, {})
    other = strategy.parse({**arrays, wire.PROJ_SEED_KEY: np.array([6])}, {})[0]
    agg = strategy.add_round([first, other], np.array([30.0, 10.0]))
    assert agg["coef"].tolist() == [3.0, 1.0]
    assert payload == 8 + counts.nbytes + 4 * int(counts.sum())
    again = FerretStrategy()
    again.bind_method(method)
    again.load_state(strategy.state())
    assert again.seen == {5, 6} and len(again.history) == 1
    assert np.array_equal(again.history_since(0)["gamma"], strategy.history_since(0)["gamma"])


def test_local_round_on_tiny_model(tiny_method) -> None:
    cfg, method = tiny_method
    model = method.attach(load_causal_lm(cfg.model), seed=0)
    before = {k: v.clone() for k, v in method.params(model).items()}
    tok = get_tokenizer(cfg.model)
    data = load_task_data(cfg.data)
    examples = encode_dataset(data.train.select(range(8)), tok, data.label_names, cfg.data)
    ctx = TrainContext(server_round=1, partition_id=0, seed=0, pad_token_id=tok.pad_token_id)

    result = method.train(model, examples, ctx)

    update = result.update
    assert update.seed == client_seed(0, 1, 0)
    assert update.counts.shape == (method.layout.num_blocks,)
    assert update.gammas.size == update.counts.sum() <= cfg.method.num_bases
    assert np.isfinite(update.gammas).all() and np.abs(update.gammas).max() > 0
    assert result.metrics["delta_norm"] > 0 and np.isfinite(result.metrics["train_loss"])
    check_projection(np.array([update.seed]), update.counts, update.gammas,
                     method.layout.num_blocks, cfg.method.num_bases)
    assert any(not torch.equal(p, before[k]) for k, p in method.params(model).items())
