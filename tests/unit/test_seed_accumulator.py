"""FedKSeed server bookkeeping: weighted aggregation, catch-up history, validation, Pro."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.errors import UpdateRejected
from fedpeft.methods.fedkseed import apply_round, candidate_seeds, decode_history
from strategies.seed_accumulator import SeedAccumulator, SeedReply, check_reply


def _reply(idx, vals, w=1.0) -> SeedReply:
    return SeedReply(np.array(idx, np.int32), np.array(vals, np.float32), w)


def test_round_delta_is_example_weighted_sum_over_clients() -> None:
    acc = SeedAccumulator(num_seeds=8)

    idx, vals = acc.add_round([_reply([1, 3], [2.0, 4.0], w=30), _reply([3, 5], [-4.0, 1.0], w=10)])

    assert idx.tolist() == [1, 3, 5]
    np.testing.assert_allclose(vals, [2.0 * 0.75, 4.0 * 0.75 - 4.0 * 0.25, 1.0 * 0.25])
    np.testing.assert_allclose(acc.total[[1, 3, 5]], vals)


def test_since_returns_exactly_the_missed_rounds_in_order() -> None:
    acc = SeedAccumulator(num_seeds=8)
    for r in range(1, 6):
        acc.add_round([_reply([r], [float(r)])])

    got = decode_history(acc.since(2))

    assert [r for r, _, _ in got] == [3, 4, 5]
    assert [i.tolist() for _, i, _ in got] == [[3], [4], [5]]
    assert [v.tolist() for _, _, v in got] == [[3.0], [4.0], [5.0]]
    assert acc.since(5) == {}


def test_catch_up_from_history_equals_server_replay_bit_for_bit() -> None:
    seeds = candidate_seeds(0, 16)
    acc = SeedAccumulator(num_seeds=16)
    server = {"w": torch.zeros(5000)}
    rng = np.random.default_rng(0)
    for _ in range(4):
        idx = rng.choice(16, size=5, replace=False)
        d_idx, d_vals = acc.add_round([_reply(idx, rng.normal(size=5), w=rng.integers(1, 9))])
        apply_round(server, seeds, d_idx, d_vals, lr=0.01)
    client = {"w": torch.zeros(5000)}

    for _, idx, vals in decode_history(acc.since(0)):  # a never-seen client: all rounds
        apply_round(client, seeds, idx, vals, lr=0.01)

    assert torch.equal(client["w"], server["w"])


@pytest.mark.parametrize(
    ("idx", "vals", "reason"),
    [
        (np.array([0.5]), np.array([1.0], np.float32), "integer"),
        (np.array([1, 2], np.int32), np.array([1.0], np.float32), "equal-length"),
        (np.array([9], np.int32), np.array([1.0], np.float32), "outside"),
        (np.array([1, 1], np.int32), np.array([1.0, 2.0], np.float32), "duplicate"),
        (np.array([1], np.int32), np.array([np.nan], np.float32), "non-finite"),
    ],
)
def test_malformed_seed_updates_are_rejected(idx, vals, reason: str) -> None:
    with pytest.raises(UpdateRejected, match=reason):
        check_reply(idx, vals, num_seeds=8)


def test_pro_statistics_use_clipped_absolute_scalars() -> None:
    acc = SeedAccumulator(num_seeds=3, pro_clip=1000.0)
    acc.add_round([_reply([0, 2], [2.0, 5000.0]), _reply([1, 2], [0.0, -2000.0])])

    p = acc.probabilities()

    norm = np.array([2.0, 0.0, 1000.0]) / 1000.0
    np.testing.assert_allclose(p, np.exp(norm) / np.exp(norm).sum(), rtol=1e-12)


def test_dense_rounds_are_smaller_and_decode_identically() -> None:
    k = 64
    acc = SeedAccumulator(num_seeds=k)
    acc.add_round([_reply([1, 2, 3], [1.0, -2.0, 3.0])])  # few seeds: sparse
    many = np.arange(0, k, 1)
    acc.add_round([_reply(many, np.linspace(-1, 1, k) + 0.01)])  # > K/2 seeds: dense
    acc.add_round([_reply([0], [1e-50])])  # underflows to 0 in float32: nothing to send

    arrays = acc.since(0)

    assert arrays["hist_round"].tolist() == [1] and arrays["hist_size"].tolist() == [3]
    assert arrays["hist_idx"].dtype == np.uint16  # K <= 65536: 6 bytes per touched seed
    assert arrays["dense_round"].tolist() == [2] and arrays["dense_val"].shape == (1, k)
    assert acc.history[2][0].size == 0
    decoded = decode_history(arrays)
    assert [r for r, _, _ in decoded] == [1, 2]
    for (idx, vals), (_, d_idx, d_vals) in zip(acc.history[:2], decoded, strict=True):
        assert np.array_equal(idx, d_idx) and np.array_equal(vals, d_vals)
    assert arrays["dense_val"].nbytes < 6 * k  # the sparse form of round 2 would be larger


def test_encoding_switches_to_dense_where_it_is_smaller() -> None:
    k = 90
    acc = SeedAccumulator(num_seeds=k)
    acc.add_round([_reply(np.arange(60), np.ones(60))])  # 6*60 = 360 <= 4*90: sparse
    acc.add_round([_reply(np.arange(61), np.ones(61))])  # 6*61 = 366 > 360: dense
    arrays = acc.since(0)
    assert arrays["hist_round"].tolist() == [1] and arrays["dense_round"].tolist() == [2]
    big = SeedAccumulator(num_seeds=70_000)
    big.add_round([_reply([69_999], [1.0])])
    assert big.since(0)["hist_idx"].dtype == np.int32
    assert decode_history(big.since(0))[0][1].tolist() == [69_999]


def test_state_round_trip_restores_history_and_pro_statistics() -> None:
    acc = SeedAccumulator(num_seeds=8)
    acc.add_round([_reply([1, 3], [2.0, 4.0])])
    acc.add_round([_reply([3, 5], [-4.0, 1.0])])
    again = SeedAccumulator(num_seeds=8)

    again.load_state(acc.state())

    assert again.rounds == 2 and np.array_equal(again.total, acc.total)
    np.testing.assert_array_equal(again.probabilities(), acc.probabilities())
    assert decode_history(again.since(1))[0][1].tolist() == [3, 5]
