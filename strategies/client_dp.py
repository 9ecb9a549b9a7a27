"""Server side of client-level DP (``privacy=client``) for the dense strategies.

:class:`~strategies.decoding.DecodingStrategy` calls these when the run is private at
client level: Poisson sampling of the messages a mean strategy built for every node, and
the noisy equal-weight mean (see :mod:`fedpeft.privacy.client`), handed to the wrapped
strategy as one reply, so FedAvg returns it as is and the server optimisers (FedAdam,
FedYogi, FedAvgM, ...) treat it as their pseudo-gradient (post-processing).
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm

from fedpeft import wire
from fedpeft.privacy.client import ClientDPConfig, noisy_mean, poisson_sample, secure_rng

log = logging.getLogger("fedpeft.strategy")


def sample(messages: list[Message], cfg: ClientDPConfig) -> tuple[list[Message], float]:
    """Keep each node's message with probability q; also return q·N, the expected count."""
    nodes = [m.metadata.dst_node_id for m in messages]
    kept = set(poisson_sample(nodes, cfg.sample_rate))
    return [m for m in messages if m.metadata.dst_node_id in kept], cfg.sample_rate * len(nodes)


def clip(delta: dict[str, np.ndarray], bound: float) -> tuple[dict[str, np.ndarray], float]:
    """``delta`` scaled to L2 norm <= bound (all tensors together), and its norm before.
    Flower's clipping helper divides by the norm, so a zero update is returned as is."""
    arrays = [np.array(delta[k], dtype=np.float32) for k in sorted(delta)]
    norm = get_norm(arrays)
    if norm > 0:
        clip_inputs_inplace(arrays, bound)
    return dict(zip(sorted(delta), arrays, strict=True)), norm


def aggregate(decoded: list[Message], global_arrays: dict[str, np.ndarray],
              cfg: ClientDPConfig, expected: float) -> list[Message]:
    """One reply carrying global + noisy mean of the clipped deltas (num-examples 1)."""
    deltas, norms = [], []
    for reply in decoded:
        full = wire.from_arrayrecord(reply.content[wire.ARRAYS_KEY])
        clipped, norm = clip({k: full[k] - global_arrays[k] for k in global_arrays}, cfg.clip)
        deltas.append(clipped)
        norms.append(norm)
    mean = noisy_mean(deltas, cfg, expected, secure_rng())
    metrics = _mean_metrics(decoded)
    metrics.update({wire.NUM_EXAMPLES_KEY: 1, "dp_clipped_fraction":
                    float(np.mean([n > cfg.clip for n in norms]))})
    first = decoded[0]
    first.content = RecordDict({
        wire.ARRAYS_KEY: wire.to_arrayrecord({k: global_arrays[k] + mean[k] for k in mean}),
        wire.METRICS_KEY: MetricRecord(metrics)})
    log.info("client-level DP: %d clients (expected %.1f), %.0f%% clipped", len(decoded),
             expected, 100 * metrics["dp_clipped_fraction"])
    return [first]


def _mean_metrics(replies: list[Message]) -> dict[str, float]:
    """Equal-weight mean of the scalar metrics every reply carries."""
    records = [r.content.metric_records[wire.METRICS_KEY] for r in replies]
    common = set.intersection(*(set(m.keys()) for m in records))
    return {k: float(np.mean([float(m[k]) for m in records])) for k in sorted(common)
            if all(isinstance(m[k], (int, float)) for m in records)}
