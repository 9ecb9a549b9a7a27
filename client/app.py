"""Flower ClientApp: decode the global state, train locally with the configured method
on this node's partition, and reply with the encoded update.

The base model is loaded once per process and reused for every message (in simulation a
worker serves many virtual clients; only the trainable state is swapped). The partition
comes from the node config (``partition-id``, ``num-partitions``), which Flower's
simulation sets automatically and SuperNodes take from ``--node-config``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client import secagg
from client.downlink import global_arrays
from client.seed_sync import base_path, save_base, sync_node
from fedpeft import cluster, wire
from fedpeft.compression import build_compressor
from fedpeft.compression.base import residual_update
from fedpeft.config import FedPeftConfig, compose
from fedpeft.data import DataConfig, encode_dataset, load_task_data, partition_rows
from fedpeft.errors import ConfigError
from fedpeft.methods import METHODS, ClientMethod, TrainContext, build_method, build_model
from fedpeft.methods.base import cached_model
from fedpeft.models import ModelConfig, get_tokenizer
from fedpeft.schema import fingerprint
from fedpeft.types import DenseUpdate, TrainResult

app = ClientApp()
log = logging.getLogger("flwr")


def _guarded(handler: Any) -> Any:
    """A handler whose failures become error replies (Flower's
    ``CLIENT_APP_RAISED_EXCEPTION``) with reason ``partition-id=<pid>: <Type>: <message>``:
    the server can name the partition, and the run's console gets one line per failed
    client instead of a traceback (logged at debug level in this process)."""

    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            pid = context.node_config.get(wire.PARTITION_ID_KEY)
            reason = wire.failure_message(pid, exc)
            log.warning("fedpeft client: %s", reason)
            log.debug("fedpeft client failure", exc_info=True)
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
            return Message(error, reply_to=msg)

    return run


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training on this node's partition (see :func:`_guarded`)."""
    return _guarded(_train)(msg, context)


# SecAgg+ stages (client/secagg.py); the masked update itself is the training reply.
app.train("secagg_keys")(_guarded(secagg.keys))
app.train("secagg_share")(_guarded(secagg.share))
app.train("secagg_unmask")(_guarded(secagg.unmask))


def _train(msg: Message, context: Context) -> Message:
    cfg = _config(context.run_config.get("overrides", ""),
                  context.run_config.get("config-dir") or "")
    pid, nparts = _partition_ids(context.node_config)
    method, model = _runtime(cfg)
    extra: dict = {}
    extra_metrics: dict = {}
    if getattr(method, "replays", False):
        extra = sync_node(method, model, msg, cfg.model, context.run_id, context.node_id,
                          base_path(cfg.model, _runtime_key(cfg)))
    else:
        arrays, held = global_arrays(msg.content, build_compressor(cfg.compression),
                                     context.state)
        method.set_state(model, arrays)
        if held is not None:  # the round of the model this node now holds
            extra_metrics[wire.DOWN_ROUND_KEY] = held
    conf = msg.content[wire.CONFIG_KEY]
    ctx = TrainContext(
        server_round=int(conf.get("round", conf.get("server-round", 0))),
        partition_id=pid,
        seed=cfg.run.seed,
        pad_token_id=int(get_tokenizer(cfg.model).pad_token_id),
        proximal_mu=float(conf.get("proximal-mu", 0.0)),
        extra=extra,
        privacy=cfg.privacy if cfg.privacy.name != "none" else None,
        num_rounds=cfg.run.num_rounds,
    )
    result = method.train(model, _examples(cfg.overrides, cfg.data, cfg.model, pid, nparts), ctx)
    if getattr(cfg.privacy, "name", "none") == "client":
        result = _clip_update(result, cfg.privacy.clip)
    content = wire.reply_content(_reply_arrays(result, cfg, msg, context), result.num_examples,
                                 {**result.metrics, **extra_metrics}, partition_id=pid,
                                 placement=cluster.placement())
    return Message(content=content, reply_to=msg)


RESIDUAL_KEY = "compression-residual"


def _reply_arrays(result: TrainResult, cfg: FedPeftConfig, msg: Message,
                  context: Context) -> Any:
    """The update as the run sends it: masked under secure aggregation (weight: the
    example count, or 1 with client-level DP, whose mean is unweighted), else encoded."""
    if wire.SECAGG_KEY not in msg.content:
        return _encode(result, cfg, context)
    if not isinstance(result.update, DenseUpdate):
        raise ConfigError(f"secure aggregation needs dense updates, found "
                          f"{type(result.update).__name__}")
    weight = 1.0 if cfg.privacy.name == "client" else float(result.num_examples)
    return secagg.mask_update(result.update.deltas, weight, msg, context)


def _encode(result: TrainResult, cfg: FedPeftConfig, context: Context) -> Any:
    """The reply's arrays: the update as is, or the configured codec's blob. With error
    feedback the residual (what the codec dropped, added back next round) lives in this
    node's ``context.state``, which Flower keeps across rounds in simulation and on
    SuperNodes."""
    if cfg.compression.name == "identity" or not isinstance(result.update, DenseUpdate):
        return wire.encode_update(result.update)
    codec = build_compressor(cfg.compression)
    ef = cfg.compression.error_feedback
    deltas = residual_update(result.update.deltas,
                             wire.load_arrays(context.state, RESIDUAL_KEY) if ef else None)
    blob = codec.encode(deltas)
    if ef:
        sent = codec.decode(blob, {k: v.shape for k, v in deltas.items()})
        wire.store_arrays(context.state, RESIDUAL_KEY, {k: deltas[k] - sent[k] for k in sent})
    return wire.encode_compressed(blob)


def _clip_update(result: TrainResult, bound: float) -> TrainResult:
    """Client-level DP: the update scaled to L2 norm <= ``bound`` before it leaves."""
    from strategies.client_dp import clip

    clipped, norm = clip(dict(result.update.deltas), bound)
    return dataclasses.replace(result, update=DenseUpdate(clipped),
                               metrics={**result.metrics, "dp_update_norm": norm})


@functools.lru_cache(maxsize=8)
def _config(overrides: str, config_dir: str) -> FedPeftConfig:
    return compose(overrides, config_dir or None)


def _partition_ids(node_config: Any) -> tuple[int, int]:
    try:
        pid, nparts = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except KeyError:
        raise ConfigError(
            "node config needs 'partition-id' and 'num-partitions' (simulation sets them; "
            "for SuperNodes pass --node-config \"partition-id=0 num-partitions=2\"); "
            f"found keys {sorted(node_config)}"
        ) from None
    if not 0 <= pid < nparts:
        raise ConfigError(f"partition-id must be in [0, {nparts}), found {pid}")
    return pid, nparts


def _runtime(cfg: FedPeftConfig) -> tuple[ClientMethod, Any]:
    """The (method, attached model) pair of this process, built once per config."""

    def build() -> tuple[ClientMethod, Any]:
        method = build_method(cfg.method.name, cfg.method)
        model = build_model(method, cfg.model, seed=cfg.run.seed, data_cfg=cfg.data)
        if getattr(method, "replays", False):
            save_base(method, model, base_path(cfg.model, _runtime_key(cfg)))
        return method, model

    return cached_model((_runtime_key(cfg),), build)


def _runtime_key(cfg: FedPeftConfig) -> str:
    task = fingerprint(cfg.data) if METHODS.get(cfg.method.name).needs_task else ""
    return f"{fingerprint(cfg.model)}|{fingerprint(cfg.method)}|{cfg.run.seed}|{task}"


def _examples(
    _overrides: tuple[str, ...], data_cfg: DataConfig, model_cfg: ModelConfig, pid: int,
    nparts: int,
) -> list:
    """This client's encoded examples, sliced by index from the training split that the
    process encodes once: the cost per client stays flat however many clients a
    simulation worker serves."""
    rows = partition_rows(load_task_data(data_cfg).train, data_cfg.partition, nparts, pid)
    encoded = _encoded_train(data_cfg, model_cfg)
    return [encoded[i] for i in rows]


@functools.lru_cache(maxsize=4)
def _encoded_train(data_cfg: DataConfig, model_cfg: ModelConfig) -> list:
    data = load_task_data(data_cfg)
    return encode_dataset(data.train, get_tokenizer(model_cfg), data.label_names, data_cfg)
