from __future__ import annotations

import numpy as np
import pytest

from fedpeft import wire
from fedpeft.errors import UpdateRejected
from fedpeft.types import DenseUpdate


def _state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"b.lora_A.weight": rng.standard_normal((4, 16)).astype(np.float32),
            "a.lora_B.weight": rng.standard_normal((16, 4)).astype(np.float32)}


def test_dense_update_round_trip_is_exact() -> None:
    update = DenseUpdate(_state(1))

    decoded = wire.decode_update(wire.encode_update(update), _state(0))

    assert sorted(decoded.deltas) == sorted(update.deltas)
    for k, v in update.deltas.items():
        np.testing.assert_array_equal(decoded.deltas[k], v)


def test_arrayrecord_keys_are_sorted() -> None:
    assert list(wire.to_arrayrecord(_state())) == ["a.lora_B.weight", "b.lora_A.weight"]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda s: s.pop("a.lora_B.weight"), "missing"),
        (lambda s: s.__setitem__("extra", np.zeros(2, np.float32)), "unexpected"),
        (lambda s: s.__setitem__("a.lora_B.weight", np.zeros((4, 4), np.float32)), "shape"),
        (lambda s: s.__setitem__("a.lora_B.weight", np.zeros((16, 4), np.int32)), "float"),
        (lambda s: s["a.lora_B.weight"].__setitem__((0, 0), np.nan), "NaN"),
        (lambda s: s["a.lora_B.weight"].__setitem__((0, 0), np.inf), "NaN or Inf"),
        (lambda s: s["a.lora_B.weight"].__setitem__((0, 0), 1e9), "exceeds"),
    ],
)
def test_malformed_updates_are_rejected_with_reason(mutate, reason: str) -> None:
    bad = _state(2)
    mutate(bad)

    with pytest.raises(UpdateRejected, match=reason):
        wire.decode_update(wire.to_arrayrecord(bad), _state(0))


def test_payload_bytes_counts_array_buffers() -> None:
    state = _state()
    record = wire.to_arrayrecord(state)

    raw = sum(a.nbytes for a in state.values())
    assert wire.payload_bytes(record) == raw  # values only, no npy headers
    assert wire.content_bytes(wire.reply_content(record, 3, {})) > wire.payload_bytes(record)
