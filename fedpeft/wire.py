"""Flower records <-> fedpeft values, and exact byte accounting.

The only module inside ``fedpeft/`` that imports ``flwr``. Updates travel as an
``ArrayRecord`` (one array per trainable tensor, sorted by name) plus a ``MetricRecord``
(``num-examples``, ``partition-id`` and training metrics), which is the reply shape
Flower's built-in strategies expect. Byte counts are measured on what Flower actually
serialises: the deflated bytes of every object in a message's object tree (message,
record dict, records, arrays, array chunks), so they include Flower's own framing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedpeft.errors import UpdateRejected
from fedpeft.types import ArrayDict, DenseUpdate, ProjectedUpdate, SeedUpdate, compact_counts

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
NUM_EXAMPLES_KEY = "num-examples"
PARTITION_ID_KEY = "partition-id"
_FLOAT_KINDS = ("f",)


def to_arrayrecord(arrays: ArrayDict) -> ArrayRecord:
    """Pack named numpy arrays (sorted by name) into an ArrayRecord."""
    items = {name: Array(np.ascontiguousarray(arrays[name])) for name in sorted(arrays)}
    return ArrayRecord(items)


def from_arrayrecord(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unpack an ArrayRecord into named numpy arrays."""
    return {name: record[name].numpy() for name in record}


SEED_IDX_KEY, SEED_GRAD_KEY = "seed_idx", "seed_grad"
PROJ_SEED_KEY, PROJ_COUNTS_KEY, PROJ_GAMMA_KEY = "proj_seed", "proj_counts", "proj_gamma"


def encode_update(update: DenseUpdate | SeedUpdate | ProjectedUpdate) -> ArrayRecord:
    """Wire form of an update: one array per tensor delta, the two seed vectors, or a
    projection (seed, counts, coordinates)."""
    if isinstance(update, SeedUpdate):
        return to_arrayrecord({SEED_IDX_KEY: update.indices.astype(np.int32),
                               SEED_GRAD_KEY: update.values.astype(np.float32)})
    if isinstance(update, ProjectedUpdate):
        return to_arrayrecord({PROJ_SEED_KEY: np.array([update.seed], np.int64),
                               PROJ_COUNTS_KEY: compact_counts(update.counts),
                               PROJ_GAMMA_KEY: update.gammas.astype(np.float32)})
    return to_arrayrecord(update.deltas)


COMPRESSED_KEY = "compressed"
Decoder = Callable[[memoryview, Mapping[str, tuple[int, ...]]], dict[str, np.ndarray]]


def encode_compressed(blob: bytes) -> ArrayRecord:
    """Wire form of a compressed update: one ``uint8`` array holding the codec's blob."""
    return to_arrayrecord({COMPRESSED_KEY: np.frombuffer(blob, np.uint8)})


def decode_compressed(
    record: ArrayRecord, decoder: Decoder, reference: ArrayDict, *, max_abs: float = 1e6
) -> DenseUpdate:
    """Decode a compressed reply with ``decoder`` (the configured codec) against the
    global state's names and shapes, then check it like a dense update."""
    names = list(record.keys())
    if names != [COMPRESSED_KEY] or record[COMPRESSED_KEY].dtype != "uint8":
        raise UpdateRejected(f"compression is on: expected one uint8 array "
                             f"{COMPRESSED_KEY!r}, found {names[:3]}")
    blob = memoryview(record[COMPRESSED_KEY].numpy().reshape(-1))
    deltas = decoder(blob, {k: tuple(v.shape) for k, v in reference.items()})
    for name, delta in deltas.items():
        _check_tensor(name, delta, reference[name], max_abs)
    return DenseUpdate(deltas)


DOWN_ROUND_KEY, DOWN_BASE_KEY = "downlink-round", "downlink-base"
_BLOB_PREFIX = "round-"


def encode_blobs(blobs: Mapping[int, bytes]) -> ArrayRecord:
    """Compressed global deltas keyed by the round that produced them (``round-000007``)."""
    return to_arrayrecord({f"{_BLOB_PREFIX}{r:06d}": np.frombuffer(b, np.uint8)
                           for r, b in blobs.items()})


def decode_blobs(record: ArrayRecord) -> list[tuple[int, memoryview]]:
    """(round, blob) pairs of :func:`encode_blobs`, in round order."""
    if not all(k.startswith(_BLOB_PREFIX) for k in record):
        raise UpdateRejected(f"downlink: expected compressed deltas {_BLOB_PREFIX}<round>, "
                             f"found {sorted(record)[:3]}")
    return sorted((int(k[len(_BLOB_PREFIX):]), memoryview(record[k].numpy().reshape(-1)))
                  for k in record)


def with_arrays(content: RecordDict, arrays: ArrayRecord, **config: int) -> RecordDict:
    """``content`` with its arrays replaced and ``config`` entries added to its config."""
    conf = dict(content.config_records[CONFIG_KEY]) if CONFIG_KEY in content else {}
    return RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({**conf, **config})})


def load_arrays(state: RecordDict, key: str) -> dict[str, np.ndarray] | None:
    """Arrays a node kept in its Flower ``context.state`` under ``key`` (None if none)."""
    record = state.array_records.get(key)
    return from_arrayrecord(record) if record is not None else None


def store_arrays(state: RecordDict, key: str, arrays: ArrayDict) -> None:
    """Keep ``arrays`` in a node's ``context.state`` (persists across rounds)."""
    state[key] = to_arrayrecord(arrays)


def decode_update(
    record: ArrayRecord, reference: ArrayDict, *, max_abs: float = 1e6
) -> DenseUpdate:
    """Check an incoming dense update against the global state and return it.

    Rejects (``UpdateRejected``) missing/extra tensors, wrong shapes, non-float dtypes,
    non-finite values and absurd magnitudes, so one bad client cannot poison a round.
    """
    try:
        deltas = from_arrayrecord(record)
    except Exception as exc:  # malformed bytes from a client
        raise UpdateRejected(f"undecodable arrays: {exc}") from None
    _check_keys(deltas, reference)
    for name, delta in deltas.items():
        _check_tensor(name, delta, reference[name], max_abs)
    return DenseUpdate({k: deltas[k].astype(reference[k].dtype, copy=False) for k in deltas})


def _check_keys(found: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise UpdateRejected(
            f"tensor names differ from the global state: missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
            f"{'...' if len(extra) > 3 else ''} (expected {len(expected)} tensors)"
        )


def _check_tensor(name: str, delta: np.ndarray, ref: np.ndarray, max_abs: float) -> None:
    if delta.shape != ref.shape:
        raise UpdateRejected(f"{name}: expected shape {ref.shape}, found {delta.shape}")
    if delta.dtype.kind not in _FLOAT_KINDS:
        raise UpdateRejected(f"{name}: expected a float dtype, found {delta.dtype}")
    if not np.isfinite(delta).all():
        raise UpdateRejected(f"{name}: contains NaN or Inf values")
    if delta.size and float(np.abs(delta).max()) > max_abs:
        raise UpdateRejected(f"{name}: |value| exceeds {max_abs:g}")


def reply_content(
    arrays: ArrayRecord, num_examples: int, metrics: Mapping[str, float],
    partition_id: int | None = None, placement: Mapping[str, str] | None = None,
) -> RecordDict:
    """Client reply: one ArrayRecord and one MetricRecord carrying ``num-examples`` and,
    when given, the client's ``partition-id`` (so the server can say who sent what), plus
    a ConfigRecord of where it ran (host, Ray node) when ``placement`` is given."""
    values: dict[str, float | int] = {k: float(v) for k, v in metrics.items()}
    values[NUM_EXAMPLES_KEY] = int(num_examples)
    if partition_id is not None:
        values[PARTITION_ID_KEY] = int(partition_id)
    content = RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: MetricRecord(values)})
    if placement:
        content[PLACEMENT_KEY] = ConfigRecord({k: str(v) for k, v in placement.items()})
    return content


PLACEMENT_KEY = "placement"


def placement_of(reply: Message) -> dict[str, str]:
    """Where a reply's client ran (``{}`` for errors and replies that do not say)."""
    if reply.has_error() or PLACEMENT_KEY not in reply.content.config_records:
        return {}
    return {k: str(v) for k, v in reply.content.config_records[PLACEMENT_KEY].items()}


_PARTITION_IN_TEXT = re.compile(rf"{PARTITION_ID_KEY}=(\d+):")


def failure_message(partition_id: object, exc: BaseException) -> str:
    """Text of a client failure: ``partition-id=<pid>: <ExceptionType>: <message>``."""
    return f"{PARTITION_ID_KEY}={partition_id}: {type(exc).__name__}: {exc}"


def partition_from_text(text: str) -> int | None:
    """The partition id in a failure text (Flower wraps it in its error reason), or None."""
    found = _PARTITION_IN_TEXT.search(text)
    return int(found.group(1)) if found else None


def message_bytes(message: Message) -> int:
    """Bytes Flower serialises for ``message``: all deflated objects of its tree."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def content_bytes(content: RecordDict) -> int:
    """Bytes Flower serialises for a record dict (message metadata excluded)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of the values in ``record``: the arrays' buffers, without the npy headers
    Flower adds or any other framing (``message_bytes`` counts everything)."""
    return int(sum(np.dtype(record[name].dtype).itemsize * int(np.prod(record[name].shape))
                   for name in record))  # from shape and dtype: no copy of the buffers


# --- secure aggregation (fedpeft.secagg) -------------------------------------------------------

SECAGG_KEY = "secagg"
MASKED_KEY = "secagg-masked"


def secagg_content(fields: Mapping[str, object]) -> RecordDict:
    """A SecAgg+ stage message or reply: one ConfigRecord of bytes, strings and ints."""
    return RecordDict({SECAGG_KEY: ConfigRecord(dict(fields))})  # type: ignore[arg-type]


def secagg_fields(content: RecordDict) -> dict[str, object]:
    """The SecAgg+ fields of a message (``UpdateRejected`` when it carries none)."""
    record = content.config_records.get(SECAGG_KEY)
    if record is None:
        raise UpdateRejected(f"expected a '{SECAGG_KEY}' record, found {sorted(content.keys())}")
    return dict(record)


def with_secagg(content: RecordDict, fields: Mapping[str, object]) -> RecordDict:
    """A training message's content plus its node's SecAgg+ fields, as a new record dict
    (Flower's strategies share one content object among all of a round's messages)."""
    records = dict(content.items())
    records[SECAGG_KEY] = ConfigRecord(dict(fields))  # type: ignore[arg-type]
    return RecordDict(records)


def masked_arrays(masked: np.ndarray) -> ArrayRecord:
    """A client's masked vector (uint64) as the reply's arrays."""
    return ArrayRecord({MASKED_KEY: Array(np.ascontiguousarray(masked, dtype=np.uint64))})


def masked_vector(content: RecordDict, size: int) -> np.ndarray:
    """The masked uint64 vector of a reply, checked for dtype and length."""
    record = content.array_records.get(ARRAYS_KEY)
    if record is None or MASKED_KEY not in record:
        raise UpdateRejected(f"secure aggregation expects a '{MASKED_KEY}' array in "
                             f"'{ARRAYS_KEY}'; found {sorted(content.keys())}")
    vec = record[MASKED_KEY].numpy()
    if vec.dtype != np.uint64 or vec.shape != (size,):
        raise UpdateRejected(f"masked vector must be uint64 of shape ({size},), found "
                             f"{vec.dtype} {vec.shape}")
    return vec
