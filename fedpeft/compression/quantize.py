"""Blockwise absmax quantisation to 8 or 4 bits: the dense baseline a user would try
first (as in QSGD-style or bitsandbytes-style codecs, with round-to-nearest).

Paper: Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient Quantization and
Encoding", NeurIPS 2017, arXiv 1610.02132 (deterministic rounding, per-block scales).

Each block of ``block`` values is sent as its max |x| (float32) and round(x/max·L) in
``bits``-bit two's complement, L = 2^(bits-1) - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedpeft.compression.base import COMPRESSORS, CompressionConfig, Compressor, need
from fedpeft.errors import ConfigError, UpdateRejected


@dataclass(frozen=True)
class QuantizeConfig(CompressionConfig):
    """``bits``: 8 or 4; ``block``: values sharing one float32 scale."""

    name: str = "quantize"
    bits: int = 8
    block: int = 4096

    def validate(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"compression.bits must be 4 or 8, found {self.bits!r}")
        if self.block < 1:
            raise ConfigError(f"compression.block must be >= 1, found {self.block!r}")


def quantized(flat: np.ndarray, num_bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(per-block scales, integer levels) of ``flat``."""
    levels = (1 << (num_bits - 1)) - 1
    pad = (-flat.size) % block
    blocks = np.pad(flat.astype(np.float32), (0, pad)).reshape(-1, block)
    scales = np.abs(blocks).max(axis=1).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1))
    q = np.rint(blocks / safe[:, None] * levels).astype(np.int8)
    return scales, q.ravel()[:flat.size]


def dequantized(scales: np.ndarray, q: np.ndarray, num_bits: int, block: int) -> np.ndarray:
    """float32 values of integer levels ``q`` with per-block ``scales``."""
    levels = np.float32((1 << (num_bits - 1)) - 1)
    per_value = np.repeat(scales, block)[:q.size]
    return (q.astype(np.float32) * (per_value / levels)).astype(np.float32)


@COMPRESSORS.register("quantize")
class Quantize(Compressor):
    """8- or 4-bit blockwise quantisation; see the module docstring."""

    name = "quantize"
    config_cls = QuantizeConfig
    codec_id = 2

    def encode_flat(self, flat: np.ndarray) -> bytes:
        scales, q = quantized(flat, self.cfg.bits, self.cfg.block)
        if self.cfg.bits == 4:  # two's complement nibbles, two per byte
            nib = (q.astype(np.uint8) & 0x0F)
            nib = np.pad(nib, (0, nib.size % 2))
            packed = (nib[0::2] << 4) | nib[1::2]
        else:
            packed = q.view(np.uint8)
        return scales.astype("<f4").tobytes() + packed.tobytes()

    def decode_flat(self, body: memoryview, n: int) -> np.ndarray:
        nblocks = -(-n // self.cfg.block)
        size = n if self.cfg.bits == 8 else (n + 1) // 2
        need(body, 4 * nblocks + size, f"{nblocks} scales and {n} {self.cfg.bits}-bit values")
        scales = np.frombuffer(body[:4 * nblocks], "<f4")
        if not np.isfinite(scales).all():
            raise UpdateRejected("compressed update: non-finite quantisation scale")
        raw = np.frombuffer(body[4 * nblocks:], np.uint8)
        return dequantized(scales, _levels(raw, n, self.cfg.bits), self.cfg.bits,
                           self.cfg.block)


def _levels(raw: np.ndarray, n: int, num_bits: int) -> np.ndarray:
    if num_bits == 8:
        return raw.view(np.int8)
    nib = np.stack([raw >> 4, raw & 0x0F], axis=1).ravel()[:n].astype(np.int8)
    return np.where(nib > 7, nib - 16, nib).astype(np.int8)
