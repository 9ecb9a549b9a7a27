"""The identity codec: float32 values as they are (today's dense wire, as one blob).

Paper: none (the uncompressed baseline every codec is compared against).
"""

from __future__ import annotations

import numpy as np

from fedpeft.compression.base import COMPRESSORS, CompressionConfig, Compressor, need


@COMPRESSORS.register("identity")
class Identity(Compressor):
    """No compression: 4 bytes per value; decode(encode(x)) == x."""

    name = "identity"
    config_cls = CompressionConfig
    codec_id = 0
    lossless = True

    def encode_flat(self, flat: np.ndarray) -> bytes:
        return flat.astype("<f4").tobytes()

    def decode_flat(self, body: memoryview, n: int) -> np.ndarray:
        need(body, 4 * n, f"{n} float32 values")
        return np.frombuffer(body, "<f4").astype(np.float32)
