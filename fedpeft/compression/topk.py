"""Float top-k: the ``density`` share of entries with the largest |x|, sent as int32
indices and float32 values (the sparsification baseline a user would pick).

Paper: Aji & Heafield, "Sparse Communication for Distributed Gradient Descent", EMNLP
2017, arXiv 1704.05021.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from fedpeft.compression.base import (
    COMPRESSORS,
    CompressionConfig,
    Compressor,
    check_density,
    need,
)
from fedpeft.compression.compeft import top_k
from fedpeft.errors import UpdateRejected

_COUNT = struct.Struct("<Q")


@dataclass(frozen=True)
class TopKConfig(CompressionConfig):
    """``density``: fraction of entries kept (exact float32 values)."""

    name: str = "topk"
    density: float = 0.1

    def validate(self) -> None:
        check_density(self.density, "compression.density")


@COMPRESSORS.register("topk")
class TopK(Compressor):
    """Top-k by magnitude, raw indices and values; see the module docstring."""

    name = "topk"
    config_cls = TopKConfig
    codec_id = 3

    def encode_flat(self, flat: np.ndarray) -> bytes:
        if flat.size >= 1 << 32:
            raise ValueError("compression=topk sends uint32 indices; the update has "
                             f"{flat.size} values")
        pos = top_k(flat, self.cfg.density)
        return (_COUNT.pack(pos.size) + pos.astype("<u4").tobytes()
                + flat[pos].astype("<f4").tobytes())

    def decode_flat(self, body: memoryview, n: int) -> np.ndarray:
        if len(body) < _COUNT.size:
            raise UpdateRejected("compressed update: topk body is truncated")
        (k,) = _COUNT.unpack_from(body)
        if k > n:
            raise UpdateRejected(f"compressed update: {k} kept entries of {n} values")
        need(body, _COUNT.size + 8 * k, f"{k} indices and values")
        idx = np.frombuffer(body[_COUNT.size:_COUNT.size + 4 * k], "<u4").astype(np.int64)
        vals = np.frombuffer(body[_COUNT.size + 4 * k:], "<f4")
        if k and (idx.max() >= n or (np.diff(idx) <= 0).any() or not np.isfinite(vals).all()):
            raise UpdateRejected("compressed update: topk indices out of range or unsorted, "
                                 "or non-finite values")
        out = np.zeros(n, np.float32)
        out[idx] = vals
        return out
