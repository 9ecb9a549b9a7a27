"""Client side of compressed broadcasts (see ``strategies/downlink.py``): rebuild the
global model from the compressed deltas the server sent, on top of the copy this node
keeps in its Flower ``context.state`` (persisted across rounds in simulation and on
SuperNodes)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedpeft import wire

MODEL_KEY, ROUND_KEY = "downlink-model", "downlink-model-round"


def global_arrays(content: Any, codec: Any, state: Any) -> tuple[dict[str, np.ndarray],
                                                                  int | None]:
    """The global state this message carries, and its round (None: a plain broadcast)."""
    conf = content[wire.CONFIG_KEY]
    if wire.DOWN_ROUND_KEY not in conf:
        return wire.from_arrayrecord(content[wire.ARRAYS_KEY]), None
    rnd, base = int(conf[wire.DOWN_ROUND_KEY]), int(conf[wire.DOWN_BASE_KEY])
    if base < 0:
        model = {k: np.asarray(v, np.float32) for k, v in
                 wire.from_arrayrecord(content[wire.ARRAYS_KEY]).items()}
    else:
        model = _apply(state, codec, wire.decode_blobs(content[wire.ARRAYS_KEY]), base, rnd)
    wire.store_arrays(state, MODEL_KEY, model)
    wire.store_arrays(state, ROUND_KEY, {"round": np.array([rnd], np.int64)})
    return model, rnd


def _apply(state: Any, codec: Any, blobs: list[tuple[int, memoryview]], base: int,
           rnd: int) -> dict[str, np.ndarray]:
    """The kept model advanced by every delta after its round, up to ``rnd``."""
    model, held = _held(state)
    if held < base or held > rnd or [r for r, _ in blobs if r > held] != list(
            range(held + 1, rnd + 1)):
        raise RuntimeError(f"downlink: this node holds round {held}, the server sent deltas "
                           f"{[r for r, _ in blobs]} on top of round {base} up to {rnd}; "
                           "the server sends the full state next round")
    shapes = {k: v.shape for k, v in model.items()}
    for r, blob in blobs:
        if r > held:
            sent = codec.decode(blob, shapes)
            model = {k: model[k] + sent[k] for k in model}
    return model


def _held(state: Any) -> tuple[dict[str, np.ndarray], int]:
    model, rnd = wire.load_arrays(state, MODEL_KEY), wire.load_arrays(state, ROUND_KEY)
    if model is None or rnd is None:
        return {}, -1
    return model, int(rnd["round"][0])
