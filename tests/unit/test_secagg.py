"""SecAgg+ core (:mod:`fedpeft.secagg`): the unmasked sum equals the plain weighted sum
within fixed-point error, a single client's masked vector looks uniform, dropouts after key
sharing are recovered and too many abort cleanly, masks use the whole 256-bit seed, and
shares are authenticated."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from fedpeft.secagg import (
    ClientRound,
    SecAggAborted,
    SecAggParams,
    ServerRound,
    check_params,
    encode,
    expand_mask,
    local_round,
    neighbours,
)

RNG = np.random.default_rng(7)


def _updates(n: int, size: int, seed: int = 0) -> dict[int, tuple[np.ndarray, float]]:
    rng = np.random.default_rng(seed)
    return {100 + i: (rng.normal(size=size).astype(np.float32), float(rng.integers(1, 50)))
            for i in range(n)}


def _plain(updates, skip=()) -> tuple[np.ndarray, float]:
    kept = [(x.astype(np.float64), w) for i, (x, w) in updates.items() if i not in skip]
    return sum(x * w for x, w in kept), sum(w for _, w in kept)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(3, 9), size=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_unmasked_sum_equals_the_weighted_sum_within_fixed_point_error(n, size, seed) -> None:
    updates = _updates(n, size, seed)
    k = min(n - 1, 4)
    total, weight = local_round(updates, SecAggParams(degree=k, threshold=k // 2 + 1))
    expected, expected_w = _plain(updates)
    assert weight == expected_w
    assert np.abs(total - expected).max() <= n * 2.0 ** -25 * 1.01


def _masked_alone(vector: np.ndarray) -> np.ndarray:
    """What the server receives from client 1 of a 5-client round."""
    clients = {i: ClientRound(i, 3) for i in range(1, 6)}
    server = ServerRound(3, 3, neighbours(clients, 4, RNG))
    server.keys = {i: c.advertise() for i, c in clients.items()}
    inbox = server.route({i: c.share(server.peers_of(i), 3) for i, c in clients.items()})
    return clients[1].mask(encode(vector, 1.0, 24, 5), inbox[1])


def _uniform_p(words: np.ndarray) -> float:
    counts = np.bincount(words.view(np.uint8), minlength=256)
    return float(chisquare(counts).pvalue)


def test_one_clients_masked_vector_is_indistinguishable_from_uniform() -> None:
    zeros, ones = np.zeros(20_000), np.full(20_000, 0.5)
    assert _uniform_p(encode(ones, 1.0, 24, 5)) < 1e-6  # the unmasked encoding is not
    for vector in (zeros, ones):
        masked = _masked_alone(vector)
        assert _uniform_p(masked) > 1e-4
        bits = np.unpackbits(masked.view(np.uint8)).mean()
        assert abs(bits - 0.5) < 0.005
    assert not np.array_equal(_masked_alone(zeros), _masked_alone(zeros))  # fresh each round


def test_a_round_survives_dropouts_after_key_sharing_and_aborts_below_threshold() -> None:
    updates = _updates(8, 50)
    params = SecAggParams(degree=4, threshold=3)
    total, weight = local_round(updates, params, drop_after_share=[101])
    expected, expected_w = _plain(updates, skip=(101,))
    assert weight == expected_w and np.abs(total - expected).max() < 1e-5
    with pytest.raises(SecAggAborted, match=r"share\(s\) of node \d+'s .* 3 needed"):
        local_round(updates, params, drop_after_share=[100, 101, 102, 103, 104])


def test_masks_depend_on_all_256_bits_of_the_seed() -> None:
    """Two seeds with the same 32-bit XOR fold (Flower's RandomState seed) give unrelated
    masks here; a 32-bit-seeded generator would give identical ones."""
    seed = bytearray(RNG.bytes(32))
    other = bytearray(seed)
    for pos in (0, 4):  # the same change in two 4-byte words keeps their XOR fold
        other[pos] ^= 0x5A
    fold = [int.from_bytes(bytes(s[i:i + 4]), "little") for s in (seed, other)
            for i in range(0, 32, 4)]
    assert np.bitwise_xor.reduce(fold[:8]) == np.bitwise_xor.reduce(fold[8:])
    a, b = expand_mask(bytes(seed), 4096), expand_mask(bytes(other), 4096)
    assert np.mean(a == b) < 0.01
    assert np.array_equal(a, expand_mask(bytes(seed), 4096))  # deterministic per seed


def test_parameters_graph_and_protocol_violations_fail_with_the_reason() -> None:
    with pytest.raises(SecAggAborted, match=r"threshold must be in \(2, 4\]"):
        check_params(10, 4, 2)
    graph = neighbours(range(10), 4, RNG)
    assert all(len(v) == 4 and all(a in graph[b] for b in v) for a, v in graph.items())
    big = [17139739380951909927, 7779486201788493592, 12345]  # Flower node ids are uint64
    assert sorted(neighbours(big, 2, RNG)) == sorted(big)
    client = ClientRound(1, 1)
    with pytest.raises(SecAggAborted, match="inconsistent unmask request"):
        client.reveal([2, 3], [3])
    with pytest.raises(SecAggAborted, match="fixed-point range"):
        encode(np.array([np.inf]), 1.0, 24, 4)


def test_shares_are_authenticated_and_addressed() -> None:
    clients = {i: ClientRound(i, 1) for i in range(1, 5)}
    server = ServerRound(1, 2, neighbours(clients, 3, RNG))
    server.keys = {i: c.advertise() for i, c in clients.items()}
    sealed = {i: c.share(server.peers_of(i), 2) for i, c in clients.items()}
    ct = bytearray(sealed[2][1])
    ct[-1] ^= 1  # a server that alters a share in transit
    sealed[2][1] = bytes(ct)
    inbox = server.route(sealed)
    clients[1].mask(encode(np.zeros(3), 1.0, 24, 4), inbox[1])
    with pytest.raises(InvalidTag):
        clients[1].reveal([1, 2, 3, 4], [])
