"""Every registered codec: one YAML naming it that composes, a ``Paper:`` line, a refusal
of update kinds it cannot encode, and a server that aggregates what it sends."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import Message, Metadata
from flwr.serverapp.strategy import FedAvg

from fedpeft import wire
from fedpeft.compression import COMPRESSORS, build_compressor
from fedpeft.config import compose
from fedpeft.errors import IncompatibleComponentsError
from strategies.decoding import DecodingStrategy

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
YAMLS = {p.stem: yaml.safe_load(p.read_text()) for p in (CONFIGS / "compression").glob("*.yaml")}
GLOBAL = {"a": np.zeros((4, 3), np.float32), "b": np.ones(5, np.float32)}


@pytest.mark.parametrize("name", COMPRESSORS.names())
def test_every_codec_has_a_yaml_that_composes_and_a_paper(name: str) -> None:
    (yaml_name,) = [y for y, doc in YAMLS.items() if doc["name"] == name]
    cfg = compose(f"compression={yaml_name}").compression
    codec = COMPRESSORS.get(name)
    docs = (importlib.import_module(codec.__module__).__doc__ or "") + (codec.__doc__ or "")
    assert cfg.name == name and "Paper:" in docs
    assert set(YAMLS[yaml_name]) == {f.name for f in cfg.__dataclass_fields__.values()}


@pytest.mark.parametrize("name", sorted(set(YAMLS) - {"identity"}))
@pytest.mark.parametrize("method", ["fedkseed", "ferret"])
def test_seed_and_projected_updates_are_refused(name: str, method: str) -> None:
    with pytest.raises(IncompatibleComponentsError, match=f"compression={name}.*{method}"):
        compose(f"compression={name} method={method} strategy={method}")


@pytest.mark.parametrize("name", sorted(YAMLS))
def test_server_aggregates_what_the_codec_sends(name: str) -> None:
    codec = build_compressor(compose(f"compression={name}").compression)
    rng = np.random.default_rng(1)
    deltas = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in GLOBAL.items()}
              for _ in range(2)]
    strat = DecodingStrategy(FedAvg())
    strat.compressor = codec if name != "identity" else None
    strat._global = {k: v.copy() for k, v in GLOBAL.items()}
    replies = [_reply(i + 1, codec.encode(d) if name != "identity" else None, d)
               for i, d in enumerate(deltas)]
    arrays, _ = strat.aggregate_train(1, replies)
    sent = [codec.roundtrip(d) for d in deltas]
    out = wire.from_arrayrecord(arrays)
    for k in GLOBAL:
        np.testing.assert_allclose(out[k], GLOBAL[k] + (sent[0][k] + sent[1][k]) / 2,
                                   rtol=1e-6, atol=1e-7)
    assert strat.traffic.accepted == 2


def test_dense_reply_under_compression_is_rejected_not_fatal() -> None:
    strat = DecodingStrategy(FedAvg())
    strat.compressor = build_compressor(compose("compression=compeft").compression)
    strat._global = {k: v.copy() for k, v in GLOBAL.items()}
    good = strat.compressor.encode({k: np.full(v.shape, 0.5, np.float32) for k, v in
                                    GLOBAL.items()})
    arrays, _ = strat.aggregate_train(1, [_reply(1, good, None), _reply(2, None, GLOBAL)])
    assert arrays is not None and strat.traffic.accepted == 1
    assert "expected one uint8 array" in strat.traffic.rejected["2"]


def _reply(node: int, blob: bytes | None, dense: dict | None) -> Message:
    arrays = wire.encode_compressed(blob) if blob is not None else wire.to_arrayrecord(dense)
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=0.0, ttl=60.0,
                    message_type="train")
    return Message(content=wire.reply_content(arrays, 10, {"train_loss": 1.0}), metadata=meta)


def test_client_error_feedback_lives_in_the_node_state() -> None:
    from flwr.app import Context, RecordDict

    from client.app import RESIDUAL_KEY, _encode
    from fedpeft.types import DenseUpdate, TrainResult

    cfg = compose("compression=compeft compression.density=0.25 "
                  "compression.error_feedback=true")
    codec, shapes = build_compressor(cfg.compression), {"w": (8,)}
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    delta = {"w": np.arange(1, 9, dtype=np.float32)}
    first = codec.decode(_blob(_encode(TrainResult(DenseUpdate(delta), 1), cfg, ctx)), shapes)
    residual = wire.load_arrays(ctx.state, RESIDUAL_KEY)
    np.testing.assert_array_equal(residual["w"], delta["w"] - first["w"])
    second = codec.decode(_blob(_encode(TrainResult(DenseUpdate(delta), 1), cfg, ctx)), shapes)
    assert not np.array_equal(first["w"], second["w"])  # the residual was added back
    np.testing.assert_array_equal(second["w"], codec.roundtrip(
        {"w": delta["w"] + residual["w"]})["w"])


def _blob(record) -> bytes:
    return record[wire.COMPRESSED_KEY].numpy().tobytes()


def test_validate_names_the_codec_and_its_options() -> None:
    from fedpeft.preflight import PreflightReport

    line = PreflightReport(cfg=compose("compression=topk compression.density=0.05"),
                           model="m").summary()
    assert "compression topk" in line and "density=0.05" in line
    assert "compression" not in PreflightReport(cfg=compose(""), model="m").summary()
