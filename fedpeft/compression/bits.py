"""Adaptive Golomb-Rice coding of the gaps between sorted positions, vectorised with numpy.

Written here because no maintained Python library offers a vectorised Rice coder over
numpy arrays (per-symbol Python coders run ~100x slower on a million positions). Gaps are
coded in chunks of :data:`CHUNK`; each chunk has its own Rice parameter b (one byte,
chosen for the fewest bits), because the kept entries of a real update are denser in
some tensors than in others and one global b costs ~4% over the entropy bound there. The
code of a gap g is the usual Rice code (⌊g/2^b⌋ in unary, then the low b bits of g), so
the size is exactly Σ(⌊g/2^b⌋ + 1 + b) bits plus one byte per chunk; the two parts are
stored as two streams (all low bits first; then all unary parts) instead of interleaved,
which keeps decoding a handful of vector operations.
"""

from __future__ import annotations

import numpy as np

from fedpeft.errors import UpdateRejected

MAX_B = 40
CHUNK = 128


def gaps_of(positions: np.ndarray) -> np.ndarray:
    """Zero-based gaps of strictly increasing ``positions``: p0, p1-p0-1, ..."""
    pos = positions.astype(np.int64)
    return np.diff(pos, prepend=-1) - 1


def positions_of(gaps: np.ndarray) -> np.ndarray:
    """Inverse of :func:`gaps_of`."""
    return np.cumsum(gaps.astype(np.int64) + 1) - 1


def best_b(gaps: np.ndarray) -> int:
    """The Rice parameter with the fewest total bits for these gaps (exact search)."""
    if gaps.size == 0:
        return 0
    top = min(MAX_B, max(0, int(gaps.max()).bit_length()))
    costs = [rice_bits(gaps, b) for b in range(top + 1)]
    return int(np.argmin(costs))


def chunk_bs(gaps: np.ndarray) -> np.ndarray:
    """The best Rice parameter of each chunk of :data:`CHUNK` gaps (uint8)."""
    return np.array([best_b(gaps[i:i + CHUNK]) for i in range(0, gaps.size, CHUNK)],
                    np.uint8)


def rice_bits(gaps: np.ndarray, b: int | np.ndarray) -> int:
    """Exact size in bits of the Rice code of ``gaps`` with parameter(s) ``b`` (one per
    gap, or one for all)."""
    return int((gaps >> b).sum() + gaps.size + np.broadcast_to(b, gaps.shape).sum())


def widths(bs: np.ndarray, k: int) -> np.ndarray:
    """Each gap's Rice parameter, from the per-chunk ones."""
    return np.repeat(bs.astype(np.int64), CHUNK)[:k]


def encode(gaps: np.ndarray, b: np.ndarray) -> tuple[bytes, bytes]:
    """(low-bits stream, unary stream) of the Rice code of non-negative ``gaps``, gap i
    coded with parameter ``b[i]``."""
    g, b = gaps.astype(np.int64), np.broadcast_to(np.asarray(b, np.int64), gaps.shape)
    j = np.arange(int(b.max()) if b.size else 0, dtype=np.int64)
    used = j[None, :] < b[:, None]
    shifts = np.maximum(b[:, None] - 1 - j[None, :], 0)
    low = ((g[:, None] >> shifts) & 1).astype(np.uint8)[used]
    q = g >> b
    unary = np.zeros(int(q.sum()) + g.size, np.uint8)
    starts = np.cumsum(q + 1) - 1 - q  # first bit of each code; its terminating 0 at +q
    run = np.arange(int(q.sum()), dtype=np.int64) - np.repeat(np.cumsum(q) - q, q)
    unary[np.repeat(starts, q) + run] = 1
    return np.packbits(low).tobytes(), np.packbits(unary).tobytes()


def low_bytes(b: np.ndarray) -> int:
    """Size of the low-bits stream for gaps with parameters ``b``."""
    return (int(b.sum()) + 7) // 8


def decode(low: memoryview, unary: memoryview, b: np.ndarray) -> np.ndarray:
    """The gaps of a Rice code with per-gap parameters ``b`` (their count is the number
    of gaps); malformed streams raise :class:`UpdateRejected`."""
    k = b.size
    if k == 0:
        if len(unary):
            raise UpdateRejected("compressed update: trailing bytes after an empty code")
        return np.zeros(0, np.int64)
    bits = np.unpackbits(np.frombuffer(unary, np.uint8))
    ends = np.flatnonzero(bits == 0)[:k]
    if ends.size < k or bits.size - ends[-1] - 1 >= 8 or bits[ends[-1] + 1:].any():
        raise UpdateRejected(f"compressed update: position code does not hold {k} entries")
    q = np.diff(ends, prepend=-1) - 1
    return (q << b) | _low_values(np.unpackbits(np.frombuffer(low, np.uint8)), b)


def _low_values(stream: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The low ``b[i]`` bits of every gap, read MSB first from ``stream``."""
    j = np.arange(int(b.max()), dtype=np.int64)
    used = j[None, :] < b[:, None]
    at = (np.cumsum(b) - b)[:, None] + j[None, :]
    got = np.where(used, stream[np.where(used, at, 0)], 0).astype(np.int64)
    return (got << np.maximum(b[:, None] - 1 - j[None, :], 0) * used).sum(axis=1)
