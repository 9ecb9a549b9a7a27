"""Screen client replies that are well-formed but out of proportion (``screen:`` config).

The decoder (:mod:`strategies.decoding`) refuses what is malformed: wrong tensor names or
shapes, NaN/Inf, values beyond ``max_abs``, a bad ``num-examples``. A reply can pass all of
that and still be hostile: an honest-looking update scaled up a hundredfold moves a mean
strategy (FedAvg and the server optimisers) as far as it likes, and an oversized reply
costs the server memory and time. Two screens run before any strategy sees the replies:

- ``max_reply_bytes``: a reply whose serialized size (``wire.message_bytes``, the
  ``bytes_up`` of the round's record) exceeds the cap is rejected.
- ``norm_k``: a decoded update whose L2 norm over all its delta tensors exceeds ``norm_k``
  times the median norm of the round's decoded updates is rejected. The median is the
  honest scale as long as most updates are honest; it needs at least ``MIN_UPDATES``
  updates, and a median of 0 (most updates are all zeros) gives no scale, so in both cases
  the round is not screened (logged at debug level).

Both reject through the same path as the decoder, so every screened reply lands in
``metrics.jsonl`` (``rejected``, ``excluded`` with ``by: decoder``) with the numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from flwr.app import Message

from fedpeft import wire
from fedpeft.errors import UpdateRejected

log = logging.getLogger("fedpeft.strategy")
MIN_UPDATES = 3  # fewer decoded updates than this: no meaningful median, no norm screen


def check_size(reply_bytes: int, max_reply_bytes: int | None) -> None:
    """Raise :class:`UpdateRejected` when a reply of ``reply_bytes`` exceeds the cap."""
    if max_reply_bytes is not None and reply_bytes > max_reply_bytes:
        raise UpdateRejected(f"reply is {reply_bytes} bytes serialized, over the cap "
                             f"screen.max_reply_bytes={max_reply_bytes}")


def delta_norm(reply: Message, global_arrays: Mapping[str, np.ndarray]) -> float:
    """L2 norm, over all tensors, of a decoded reply's update (its arrays minus the
    global arrays: the decoder hands on ``global + delta``)."""
    arrays = wire.from_arrayrecord(reply.content[wire.ARRAYS_KEY])
    squares = sum(float(np.sum(np.square(arrays[k].astype(np.float64) - g, dtype=np.float64)))
                  for k, g in global_arrays.items())
    return float(np.sqrt(squares))


def screen_norms(replies: Sequence[Message], global_arrays: Mapping[str, np.ndarray],
                 norm_k: float | None, reject: Callable[[Message, str], None],
                 rnd: int = 0) -> list[Message]:
    """The replies whose update norm is at most ``norm_k`` times the median norm; each
    other one is passed to ``reject(reply, reason)``. All are kept when ``norm_k`` is
    None, with fewer than ``MIN_UPDATES`` replies, or when the median norm is 0."""
    if norm_k is None:
        return list(replies)
    if len(replies) < MIN_UPDATES:
        log.debug("round %d: norm screen skipped: %d update(s), a median needs >= %d",
                  rnd, len(replies), MIN_UPDATES)
        return list(replies)
    norms = [delta_norm(r, global_arrays) for r in replies]
    median = float(np.median(norms))
    if median == 0.0:
        log.debug("round %d: norm screen skipped: the median update norm is 0", rnd)
        return list(replies)
    kept = []
    for reply, norm in zip(replies, norms, strict=True):
        if norm > norm_k * median:
            reject(reply, f"update norm {norm:.4g} is {norm / median:.3g}x the round's median "
                          f"{median:.4g} (> screen.norm_k={norm_k:g}, n={len(replies)})")
        else:
            kept.append(reply)
    return kept
