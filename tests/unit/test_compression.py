"""Codec properties (hypothesis): exact sizes, exact round trips of what each codec keeps,
density and scale honoured, edge inputs, and hostile blobs."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedpeft import wire
from fedpeft.compression import bits, build_compressor
from fedpeft.compression.base import _HEADER, CompressionConfig, residual_update
from fedpeft.compression.compeft import _BODY, ComPEFTConfig
from fedpeft.compression.quantize import QuantizeConfig
from fedpeft.compression.topk import TopKConfig
from fedpeft.errors import UpdateRejected

FLOATS = st.floats(-1e3, 1e3, allow_nan=False, width=32)
VECTORS = arrays(np.float32, st.integers(0, 600), elements=FLOATS)
DENSITY = st.floats(0.001, 1.0)
CONFIGS = [CompressionConfig(), ComPEFTConfig(density=0.1), QuantizeConfig(bits=8, block=64),
           QuantizeConfig(bits=4, block=7), TopKConfig(density=0.2)]
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _split(flat: np.ndarray) -> dict[str, np.ndarray]:
    """Two tensors (one 2-D) so name order and shapes matter."""
    cut = flat.size // 3
    return {"b.weight": flat[:cut].copy(), "a.weight": flat[cut:].reshape(-1, 1).copy()}


def _flat(deltas: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([deltas[k].ravel() for k in sorted(deltas)])


@SETTINGS
@given(flat=VECTORS, which=st.integers(0, len(CONFIGS) - 1))
def test_blob_size_is_the_payload_on_the_wire(flat: np.ndarray, which: int) -> None:
    blob = build_compressor(CONFIGS[which]).encode(_split(flat))
    record = wire.encode_compressed(blob)
    assert wire.payload_bytes(record) == len(blob)
    framed = wire.content_bytes(wire.reply_content(record, 1, {}))
    assert len(blob) < framed <= len(blob) + 1024  # Flower's framing, not a copy


@SETTINGS
@given(flat=VECTORS, density=DENSITY, alpha=st.floats(0.1, 4.0),
       scale=st.sampled_from(["std", "kept_mean"]))
def test_compeft_decodes_to_the_ternarised_update(flat: np.ndarray, density: float,
                                                  alpha: float, scale: str) -> None:
    deltas = _split(flat)
    out = _flat(build_compressor(ComPEFTConfig(density=density, alpha=alpha, scale=scale))
                .roundtrip(deltas))
    kept = np.flatnonzero(out)
    nnz = int(np.count_nonzero(flat_sorted := _flat(deltas)))
    k = min(math.ceil(density * flat.size), nnz)
    sigma = float(np.std(flat_sorted, dtype=np.float64)) if flat.size else 0.0
    if (sigma == 0 or scale == "kept_mean") and k:
        top = np.argsort(-np.abs(flat_sorted), kind="stable")[:k]
        sigma = float(np.abs(flat_sorted[top]).mean(dtype=np.float64))
    expected = np.float32(alpha * sigma)
    assert kept.size == (k if expected > 0 else 0)  # density honoured
    np.testing.assert_array_equal(np.abs(out[kept]), expected)  # one scale, exactly
    np.testing.assert_array_equal(np.sign(out[kept]), np.sign(flat_sorted[kept]))
    dropped = np.setdiff1d(np.arange(flat.size), kept)
    if kept.size and dropped.size:  # kept entries are a top-k set by magnitude
        assert np.abs(flat_sorted[kept]).min() >= np.abs(flat_sorted[dropped]).max()


@SETTINGS
@given(flat=VECTORS, density=DENSITY)
def test_compeft_blob_is_header_signs_and_rice_code_only(flat: np.ndarray,
                                                         density: float) -> None:
    deltas = _split(flat)
    codec = build_compressor(ComPEFTConfig(density=density))
    blob = codec.encode(deltas)
    _, k = _BODY.unpack_from(blob, _HEADER.size)
    chunks = -(-k // bits.CHUNK)
    bs = np.frombuffer(blob[_HEADER.size + _BODY.size:][:chunks], np.uint8)
    pos = np.flatnonzero(_flat(codec.decode(blob, {n: v.shape for n, v in deltas.items()})))
    if pos.size != k:  # a zero scale erases the kept entries; nothing more to measure
        return
    gaps = bits.gaps_of(pos)
    for c in range(chunks):  # each chunk's parameter is its cheapest one
        part = gaps[c * bits.CHUNK:(c + 1) * bits.CHUNK]
        assert bits.rice_bits(part, int(bs[c])) == min(
            bits.rice_bits(part, b) for b in range(bits.MAX_B + 1))
    width = bits.widths(bs, k)
    unary = int((gaps >> width).sum()) + k
    assert len(blob) == (_HEADER.size + _BODY.size + chunks + (k + 7) // 8
                         + (int(width.sum()) + 7) // 8 + (unary + 7) // 8)


@SETTINGS
@given(flat=VECTORS, density=DENSITY)
def test_topk_keeps_exact_values_of_a_top_k_set(flat: np.ndarray, density: float) -> None:
    out = _flat(build_compressor(TopKConfig(density=density)).roundtrip(_split(flat)))
    src = _flat(_split(flat))
    kept = np.flatnonzero(out)
    assert kept.size == min(math.ceil(density * flat.size), int(np.count_nonzero(src)))
    np.testing.assert_array_equal(out[kept], src[kept])


@SETTINGS
@given(flat=VECTORS, num_bits=st.sampled_from([4, 8]), block=st.integers(1, 100))
def test_quantize_error_is_within_half_a_level(flat: np.ndarray, num_bits: int,
                                               block: int) -> None:
    src = _flat(_split(flat))
    out = _flat(build_compressor(QuantizeConfig(bits=num_bits, block=block))
                .roundtrip(_split(flat)))
    levels = (1 << (num_bits - 1)) - 1
    for start in range(0, src.size, block):
        part = slice(start, start + block)
        bound = np.abs(src[part]).max() / levels / 2 * (1 + 1e-5) + 1e-30
        assert np.abs(out[part] - src[part]).max() <= bound


@SETTINGS
@given(flat=VECTORS)
def test_identity_is_lossless(flat: np.ndarray) -> None:
    out = build_compressor(CompressionConfig()).roundtrip(_split(flat))
    np.testing.assert_array_equal(_flat(out), _flat(_split(flat)))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.name}")
def test_edge_inputs(cfg) -> None:
    codec = build_compressor(cfg)
    assert codec.roundtrip({}) == {}
    zeros = codec.roundtrip({"w": np.zeros(50, np.float32)})["w"]
    np.testing.assert_array_equal(zeros, 0.0)
    one = codec.roundtrip({"w": np.array([-2.5], np.float32)})["w"]
    assert one.shape == (1,) and one[0] < 0  # one value survives every codec
    with pytest.raises(ValueError, match="NaN or Inf"):
        codec.encode({"w": np.array([1.0, np.nan], np.float32)})


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.name}")
@settings(max_examples=80, deadline=None)
@given(junk=st.binary(max_size=200), n=st.integers(0, 64))
def test_hostile_blobs_are_rejected_never_crash(cfg, junk: bytes, n: int) -> None:
    codec = build_compressor(cfg)
    header = _HEADER.pack(b"FPC1", codec.codec_id, n)
    for blob in (junk, header + junk):
        try:
            out = codec.decode(blob, {"w": (n,)})
        except UpdateRejected:
            continue
        assert out["w"].shape == (n,) and out["w"].dtype == np.float32


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.name}")
def test_blob_of_another_codec_or_size_is_rejected(cfg) -> None:
    blob = build_compressor(cfg).encode({"w": np.arange(10, dtype=np.float32)})
    with pytest.raises(UpdateRejected, match="global state has 11"):
        build_compressor(cfg).decode(blob, {"w": (11,)})
    other = CONFIGS[(CONFIGS.index(cfg) + 1) % len(CONFIGS)]
    if other.name != cfg.name:
        with pytest.raises(UpdateRejected, match="is not a"):
            build_compressor(other).decode(blob, {"w": (10,)})


def _crafted() -> list[tuple[object, bytes, str]]:
    """Well-framed blobs whose contents lie: each must be refused with its reason."""
    head = _HEADER.pack
    topk_past = head(b"FPC1", 3, 4) + struct.pack("<Q", 1) + struct.pack("<I", 9) + b"\0" * 4
    topk_nan = (head(b"FPC1", 3, 4) + struct.pack("<Q", 1) + struct.pack("<I", 1)
                + struct.pack("<f", float("nan")))
    low, unary = bits.encode(np.array([9]), np.array([0]))
    compeft_past = head(b"FPC1", 1, 4) + _BODY.pack(1.0, 1) + b"\0\0" + low + unary
    compeft_many = head(b"FPC1", 1, 4) + _BODY.pack(1.0, 5) + b"\0" * 8
    compeft_inf = head(b"FPC1", 1, 4) + _BODY.pack(float("inf"), 0)
    compeft_b = head(b"FPC1", 1, 4) + _BODY.pack(1.0, 1) + b"\x50\0" + b"\0" * 12
    quant_nan = head(b"FPC1", 2, 4) + struct.pack("<f", float("nan")) + b"\1" * 4
    return [(TopKConfig(), topk_past, "out of range"), (TopKConfig(), topk_nan, "non-finite"),
            (ComPEFTConfig(), compeft_past, "past 4 values"),
            (ComPEFTConfig(), compeft_many, "5 kept of 4"),
            (ComPEFTConfig(), compeft_inf, "out of range"),
            (ComPEFTConfig(), compeft_b, "Rice parameter above"),
            (QuantizeConfig(), quant_nan, "non-finite")]


@pytest.mark.parametrize(("cfg", "blob", "reason"), _crafted())
def test_lying_blobs_are_rejected_with_their_reason(cfg, blob: bytes, reason: str) -> None:
    with pytest.raises(UpdateRejected, match=reason):
        build_compressor(cfg).decode(blob, {"w": (4,)})


def test_error_feedback_sends_everything_eventually() -> None:
    rng = np.random.default_rng(0)
    codec = build_compressor(ComPEFTConfig(density=0.05))
    residual, sent_total, true_total = None, np.zeros(1000), np.zeros(1000)
    for _ in range(30):
        delta = {"w": rng.normal(size=1000).astype(np.float32)}
        full = residual_update(delta, residual)
        sent = codec.roundtrip(full)
        residual = {"w": full["w"] - sent["w"]}
        sent_total += sent["w"]
        true_total += delta["w"]
    # What was sent plus what is still owed is what was trained, up to float32 rounding.
    np.testing.assert_allclose(sent_total + residual["w"], true_total, atol=1e-3)


def test_rice_streams_round_trip_and_reject_short_codes() -> None:
    gaps = np.array([0, 5, 1, 100, 3, 0, 0, 64], np.int64)
    for b in [np.full(8, w) for w in range(8)] + [np.array([0, 3, 1, 7, 2, 0, 5, 6])]:
        low, unary = bits.encode(gaps, b)
        np.testing.assert_array_equal(bits.decode(memoryview(low), memoryview(unary), b),
                                      gaps)
        assert 8 * (len(low) + len(unary)) - bits.rice_bits(gaps, b) < 16
    with pytest.raises(UpdateRejected, match="does not hold"):
        bits.decode(memoryview(low), memoryview(unary[:-1]), b)
