"""ComPEFT: keep the global top-k entries of the update by magnitude, send only their
signs and one scale, and entropy-code the positions.

Paper: Yadav et al., "ComPEFT: Compression for Communicating Parameter Efficient Updates
via Sparsification and Quantization", arXiv 2311.13171.

τ is the flat update (all tensors, name order); σ = std(τ) before pruning; the
ceil(density·n) entries of largest |τ| (non-zero ones only) become α·σ·sign(τ), every
other entry 0 (:func:`ternarize`). Body: scale (float32), k (uint64), one Rice parameter
byte per 128 gaps, one sign bit per kept entry, then the adaptive Rice code of the gaps
between kept positions (:mod:`fedpeft.compression.bits`).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from fedpeft.compression import bits
from fedpeft.compression.base import (
    COMPRESSORS,
    CompressionConfig,
    Compressor,
    check_density,
    need,
)
from fedpeft.errors import ConfigError, UpdateRejected

_BODY = struct.Struct("<fQ")  # scale, kept entries
SCALES = ("std", "kept_mean")


@dataclass(frozen=True)
class ComPEFTConfig(CompressionConfig):
    """``density``: fraction of entries kept; ``alpha``: multiplier of the scale;
    ``scale``: ``std`` (σ of the whole update, as in ComPEFT) or ``kept_mean`` (the mean
    |τ| of the kept entries, as in sparse ternary compression, Sattler et al., arXiv
    1903.02891: it keeps the kept entries' L1 mass, so a sparse update is not shrunk)."""

    name: str = "compeft"
    density: float = 0.1
    alpha: float = 1.0
    scale: str = "std"

    def validate(self) -> None:
        check_density(self.density, "compression.density")
        if self.scale not in SCALES:
            raise ConfigError(f"compression.scale must be one of {', '.join(SCALES)}, "
                              f"found {self.scale!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"compression.alpha must be a finite number > 0, found "
                             f"{self.alpha!r}")


def top_k(flat: np.ndarray, density: float) -> np.ndarray:
    """Sorted positions of the ceil(density·n) largest |values|, non-zero ones only."""
    k = min(math.ceil(density * flat.size), int(np.count_nonzero(flat)))
    if k == 0:
        return np.zeros(0, np.int64)
    mag = np.abs(flat)
    return np.sort(np.argpartition(-mag, k - 1)[:k]).astype(np.int64)


def ternarize(flat: np.ndarray, density: float, alpha: float,
              scale: str = "std") -> tuple[np.ndarray, float]:
    """(kept positions, scale α·σ): the ternary update is scale·sign(τ) there, 0
    elsewhere. σ is std(τ) (``scale="std"``) or the kept entries' mean |τ|
    (``"kept_mean"``). When σ is 0 but entries are kept (a constant or one-value update),
    σ is replaced by their mean |τ|, so such an update is not silently erased."""
    pos = top_k(flat, density)
    sigma = float(np.std(flat, dtype=np.float64)) if flat.size and scale == "std" else 0.0
    if sigma == 0 and pos.size:
        sigma = float(np.abs(flat[pos]).mean(dtype=np.float64))
    return pos, float(np.float32(alpha * sigma))


@COMPRESSORS.register("compeft")
class ComPEFT(Compressor):
    """Ternary top-k with entropy-coded positions; see the module docstring."""

    name = "compeft"
    config_cls = ComPEFTConfig
    codec_id = 1

    def encode_flat(self, flat: np.ndarray) -> bytes:
        pos, scale = ternarize(flat, self.cfg.density, self.cfg.alpha, self.cfg.scale)
        gaps = bits.gaps_of(pos)
        bs = bits.chunk_bs(gaps)
        signs = np.packbits(flat[pos] < 0).tobytes()
        low, unary = bits.encode(gaps, bits.widths(bs, gaps.size))
        return _BODY.pack(scale, pos.size) + bs.tobytes() + signs + low + unary

    def decode_flat(self, body: memoryview, n: int) -> np.ndarray:
        if len(body) < _BODY.size:
            raise UpdateRejected("compressed update: compeft body is truncated")
        scale, k = _BODY.unpack_from(body)
        if k > n or not math.isfinite(scale):
            raise UpdateRejected(f"compressed update: {k} kept of {n}, scale {scale} are "
                                 "out of range")
        pos, signs = _positions_and_signs(body[_BODY.size:], k)
        if k and pos[-1] >= n:
            raise UpdateRejected(f"compressed update: position {pos[-1]} is past {n} values")
        out = np.zeros(n, np.float32)
        out[pos] = np.where(signs == 1, -np.float32(scale), np.float32(scale))
        return out


def _positions_and_signs(body: memoryview, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Kept positions and sign bits from what follows the scale and count."""
    nchunks = -(-k // bits.CHUNK)
    need(body[:nchunks], nchunks, f"Rice parameters of {k} entries")
    bs = np.frombuffer(body[:nchunks], np.uint8)
    if (bs > bits.MAX_B).any():
        raise UpdateRejected(f"compressed update: Rice parameter above {bits.MAX_B}")
    b = bits.widths(bs, k)
    signs_end = nchunks + (k + 7) // 8
    low_end = signs_end + bits.low_bytes(b)
    need(body[:low_end], low_end, f"signs and positions of {k} entries")
    pos = bits.positions_of(bits.decode(body[signs_end:low_end], body[low_end:], b))
    signs = np.unpackbits(np.frombuffer(body[nchunks:signs_end], np.uint8))[:k]
    return pos, signs
