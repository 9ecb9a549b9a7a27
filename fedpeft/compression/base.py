"""Compressors: the ABC, its registry, the shared blob header and error feedback.

A compressor encodes the delta of every trainable tensor (a name -> array mapping) into
one ``bytes`` blob and decodes it back given the names and shapes the receiver already
knows (the global state), so only values, positions and scales travel. ``len(blob)`` is
the exact payload; the wire adds Flower's framing, which the server measures.

Decoding is hostile-input safe: the header is checked against the expected layout before
anything is allocated, and every malformed blob raises :class:`UpdateRejected`.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fedpeft.errors import ConfigError, IncompatibleComponentsError, UpdateRejected
from fedpeft.registry import Registry

COMPRESSORS: Registry[type[Compressor]] = Registry("compression")
Shapes = Mapping[str, tuple[int, ...]]
_HEADER = struct.Struct("<4sBQ")  # magic, codec id, number of values
MAGIC = b"FPC1"


@dataclass(frozen=True)
class CompressionConfig:
    """Options every codec shares. ``error_feedback``: the client adds what the previous
    round's compression dropped (its residual, kept in Flower's ``context.state``);
    ``downlink``: the server also broadcasts compressed global deltas (with server-side
    error feedback) instead of the full state."""

    name: str = "identity"
    error_feedback: bool = False
    downlink: bool = False


class Compressor(ABC):
    """One way of encoding a dense update.

    Class attributes:
        name: registry name (``compression.name``).
        config_cls: frozen dataclass of its options.
        codec_id: byte written in the blob header, so a blob cannot be decoded as another
            codec's.
        lossless: decode(encode(x)) == x (the identity codec only).
    """

    name: ClassVar[str]
    config_cls: ClassVar[type]
    codec_id: ClassVar[int]
    lossless: ClassVar[bool] = False

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    @abstractmethod
    def encode_flat(self, flat: np.ndarray) -> bytes:
        """Body of the blob for the float32 vector ``flat`` (finite, tensors in name
        order)."""

    @abstractmethod
    def decode_flat(self, body: memoryview, n: int) -> np.ndarray:
        """The float32 vector of length ``n`` that ``body`` encodes (raise
        :class:`UpdateRejected` on anything malformed)."""

    def encode(self, deltas: Mapping[str, np.ndarray]) -> bytes:
        """The blob for ``deltas``: header, then the codec's body."""
        flat = flatten(deltas)
        if not np.isfinite(flat).all():
            raise ValueError(f"compression={self.name}: the update contains NaN or Inf "
                             "values; refusing to encode it")
        return _HEADER.pack(MAGIC, self.codec_id, flat.size) + self.encode_flat(flat)

    def decode(self, blob: bytes | memoryview, shapes: Shapes) -> dict[str, np.ndarray]:
        """The update ``blob`` encodes, as float32 tensors of the given names and shapes."""
        view = memoryview(blob)
        n = sum(int(np.prod(s)) for s in shapes.values())
        self._check_header(view, n)
        flat = self.decode_flat(view[_HEADER.size:], n)
        return unflatten(flat, shapes)

    def roundtrip(self, deltas: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What the receiver will get for ``deltas`` (encode, then decode)."""
        return self.decode(self.encode(deltas), {k: v.shape for k, v in deltas.items()})

    def _check_header(self, view: memoryview, n: int) -> None:
        if len(view) < _HEADER.size:
            raise UpdateRejected(f"compressed update of {len(view)} bytes is shorter than "
                                 f"its {_HEADER.size}-byte header")
        magic, codec, count = _HEADER.unpack_from(view)
        if magic != MAGIC or codec != self.codec_id:
            raise UpdateRejected(f"compressed update is not a {self.name} blob (header "
                                 f"{magic!r}/{codec}, expected {MAGIC!r}/{self.codec_id})")
        if count != n:
            raise UpdateRejected(f"compressed update holds {count} values, the global "
                                 f"state has {n}")


def flatten(deltas: Mapping[str, np.ndarray]) -> np.ndarray:
    """All tensors as one float32 vector, in sorted-name order (the wire's order)."""
    if not deltas:
        return np.zeros(0, np.float32)
    return np.concatenate([np.asarray(deltas[k], np.float32).ravel() for k in sorted(deltas)])


def unflatten(flat: np.ndarray, shapes: Shapes) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten` for the given names and shapes."""
    out, start = {}, 0
    for name in sorted(shapes):
        size = int(np.prod(shapes[name]))
        out[name] = flat[start:start + size].reshape(shapes[name])
        start += size
    return out


def need(view: memoryview, size: int, what: str) -> None:
    """Fail unless ``view`` holds exactly ``size`` bytes (``what`` names the part)."""
    if len(view) != size:
        raise UpdateRejected(f"compressed update: {what} needs {size} bytes, found "
                             f"{len(view)}")


def build_compressor(cfg: Any) -> Compressor:
    """The codec ``cfg.name`` with its validated config."""
    return COMPRESSORS.get(cfg.name)(cfg)


def check_update_kind(cfg: Any, method: type) -> None:
    """Codecs encode dense deltas; seed and projected updates are already a few numbers
    per step and have their own exact encoding."""
    kind = getattr(method, "update_kind", "dense")
    if (cfg.name != "identity" or cfg.downlink) and kind != "dense":
        raise IncompatibleComponentsError(
            f"compression={cfg.name} encodes dense tensor deltas, but method="
            f"{method.name} sends {kind!r} updates (already compact); use "
            "compression=identity with it")


def check_density(density: float, key: str) -> None:
    """A density in (0, 1], named by its key."""
    if not 0 < density <= 1:
        raise ConfigError(f"{key} must be in (0, 1] (the fraction of entries kept), "
                          f"found {density!r}")


def residual_update(deltas: Mapping[str, np.ndarray], residual: Mapping[str, np.ndarray]
                    | None) -> dict[str, np.ndarray]:
    """Error feedback: this round's delta plus what compression dropped last round."""
    if not residual:
        return {k: np.asarray(v, np.float32) for k, v in deltas.items()}
    return {k: np.asarray(v, np.float32) + residual[k] for k, v in deltas.items()}
