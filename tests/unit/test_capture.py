"""Captured observations: the strategies save exactly what crossed the wire, for the
configured rounds and partitions only; the file format round-trips without pickle; bad
``capture.*`` values fail with what was expected; a failing disk never fails a round."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, Metadata
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedpeft import wire
from fedpeft.capture import CapturedUpdate, read_observations, write_observation
from fedpeft.compression import build_compressor
from fedpeft.compression.compeft import ComPEFTConfig
from fedpeft.config import CaptureConfig, compose
from fedpeft.errors import ConfigError
from fedpeft.methods.fedkseed import FedKSeedConfig
from fedpeft.preflight import check_federation
from strategies.decoding import DecodingStrategy
from strategies.downlink import Downlink
from strategies.fedkseed import FedKSeedStrategy
from strategies.ferret import FerretStrategy
from strategies.observer import Observer

GLOBAL = {"w": np.ones((3, 2), np.float32), "v": np.zeros(4, np.float32)}
NODES = {11: 0, 12: 1, 13: 2}  # node id -> partition id


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("_run_id", "_node_id", "_task_id"):  # Flower sets them in a live run
        monkeypatch.setattr(TaskIdentity, key, 1)


def _meta(node: int) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=0.0, ttl=60.0,
                    message_type="train")


def _reply(node: int, arrays: dict | ArrayRecord, n: int = 10, **metrics: float) -> Message:
    record = arrays if isinstance(arrays, ArrayRecord) else wire.to_arrayrecord(arrays)
    content = wire.reply_content(record, n, {"train_loss": 0.5, **metrics}, NODES[node])
    return Message(content=content, metadata=_meta(node))


def _failed(node: int) -> Message:
    reason = wire.failure_message(NODES[node], MemoryError("out of memory"))
    return Message(metadata=_meta(node), error=Error(code=0, reason=reason))


def _deltas(value: float, dtype: type = np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(int(value * 10))
    return {k: (value + rng.normal(0, 1, v.shape)).astype(dtype) for k, v in GLOBAL.items()}


def _grid() -> SimpleNamespace:
    return SimpleNamespace(get_node_ids=lambda: list(NODES))


def _dense(tmp_path: Path, **capture) -> DecodingStrategy:
    strat = DecodingStrategy(FedAvg(min_train_nodes=3, min_available_nodes=3))
    strat.observer = Observer(CaptureConfig(**capture), tmp_path)
    return strat


def _train_round(strat, rnd: int, global_arrays: dict, replies: list[Message]):
    list(strat.configure_train(rnd, wire.to_arrayrecord(global_arrays),
                               ConfigRecord({"seed": 7}), _grid()))
    return strat.aggregate_train(rnd, replies)


# ---------------------------------------------------------------- dense (DecodingStrategy)
def test_dense_captures_received_arrays_and_global_only_for_chosen_rounds_and_partitions(
    tmp_path: Path,
) -> None:
    strat = _dense(tmp_path, rounds=(2,), partitions=(0, 2))
    half = _deltas(0.1, np.float16)  # a client may send another float dtype: kept as sent
    arrays1, _ = _train_round(strat, 1, GLOBAL, [_reply(n, _deltas(0.1)) for n in NODES])
    global2 = wire.from_arrayrecord(arrays1)

    _train_round(strat, 2, global2, [_reply(11, half, n=5, dp_noise=1.5),
                                     _reply(12, _deltas(0.3)), _reply(13, _deltas(0.4))])

    found = read_observations(tmp_path / "observations")
    assert [(u.round, u.partition, u.node) for u in found] == [(2, 0, 11), (2, 2, 13)]
    first = found[0]
    assert first.kind == "dense" and first.rejected is None
    for name, sent in half.items():
        assert np.array_equal(first.received[name], sent)
        assert first.received[name].dtype == np.float16
    for name, value in global2.items():
        assert np.array_equal(first.sent_global[name], value)
    assert first.metrics["num-examples"] == 5 and first.metrics["dp_noise"] == 1.5
    assert first.config["round"] == 2 and first.config["seed"] == 7
    assert np.array_equal(found[1].received["w"], _deltas(0.4)["w"])


def test_rejected_replies_are_captured_with_the_reason_and_errors_are_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    strat = _dense(tmp_path, rounds=(1,))
    nan = _deltas(0.2)
    nan["w"][0, 0] = np.nan

    with caplog.at_level(logging.WARNING, logger="fedpeft.strategy"):
        _train_round(strat, 1, GLOBAL, [_reply(11, _deltas(0.1)), _reply(12, nan),
                                        _failed(13)])
        strat.observer.observe(1, _failed(13), 2, "dense")  # also when handed one directly
        strat.observer.flush({})

    found = read_observations(tmp_path / "observations")
    assert [u.partition for u in found] == [0, 1]
    assert found[0].rejected is None and "NaN" in found[1].rejected
    assert np.array_equal(found[1].received["w"], nan["w"], equal_nan=True)
    assert not [r for r in caplog.records if "capture" in r.message]  # skipped, not failed


def test_resumed_runs_capture_absolute_rounds(tmp_path: Path) -> None:
    strat = _dense(tmp_path, rounds=(4,))
    strat.round_offset = 3  # resumed after round 3: Flower's round 1 is the run's round 4

    _train_round(strat, 1, GLOBAL, [_reply(n, _deltas(0.1)) for n in NODES])

    found = read_observations(tmp_path / "observations")
    assert {u.round for u in found} == {4} and len(found) == 3
    assert all(u.config["round"] == 4 for u in found)
    assert (tmp_path / "observations" / "round-0004" / "partition-0001.npz").is_file()


def test_compressed_replies_are_captured_as_the_blob_and_global_as_the_servers_state(
    tmp_path: Path,
) -> None:
    codec = build_compressor(ComPEFTConfig(density=0.5))
    strat = _dense(tmp_path, rounds=(2,), partitions=(1,), dir=str(tmp_path / "seen"))
    strat.compressor, strat.downlink = codec, Downlink(codec)
    blobs = {n: wire.encode_compressed(codec.encode(_deltas(0.1 * n))) for n in NODES}
    held = {wire.DOWN_ROUND_KEY: 0}  # each node reports the broadcast round it holds
    arrays1, _ = _train_round(strat, 1, GLOBAL, [_reply(n, blobs[n], **held) for n in NODES])
    global2 = wire.from_arrayrecord(arrays1)

    sent = list(strat.configure_train(2, arrays1, ConfigRecord({"seed": 7}), _grid()))
    strat.aggregate_train(2, [_reply(n, blobs[n], **{wire.DOWN_ROUND_KEY: 1}) for n in NODES])

    (only,) = read_observations(tmp_path / "seen")
    assert only.kind == "compressed" and only.partition == 1
    sent_blob = blobs[12][wire.COMPRESSED_KEY].numpy()
    assert only.received[wire.COMPRESSED_KEY].dtype == np.uint8
    assert np.array_equal(only.received[wire.COMPRESSED_KEY], sent_blob)
    assert all(k.startswith("round-") for m in sent for k in m.content[wire.ARRAYS_KEY])
    for name, value in global2.items():  # the state, though the wire carried deltas
        assert np.array_equal(only.sent_global[name], value)
    assert only.config[wire.DOWN_BASE_KEY] == 0


def test_a_failing_disk_is_a_warning_and_the_round_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "blocked").write_text("a file where the observations folder should be")
    strat = _dense(tmp_path, rounds=(1,), dir=str(tmp_path / "blocked"))

    with caplog.at_level(logging.WARNING, logger="fedpeft.strategy"):
        arrays, _ = _train_round(strat, 1, GLOBAL, [_reply(n, _deltas(0.1)) for n in NODES])

    assert arrays is not None and strat.traffic.accepted == 3
    assert sum("could not save the observation" in r.message for r in caplog.records) == 3


# ---------------------------------------------------------------- seed methods (replay)
def _fedkseed(tmp_path: Path, **capture) -> FedKSeedStrategy:
    strat = FedKSeedStrategy(min_train_nodes=3, min_available_nodes=3)
    strat.bind_method(SimpleNamespace(cfg=FedKSeedConfig(num_seeds=8, pro=True)))
    strat.observer = Observer(CaptureConfig(**capture), tmp_path)
    return strat


def _seeds(idx: list[int], vals: list[float]) -> dict[str, np.ndarray]:
    return {wire.SEED_IDX_KEY: np.array(idx, np.int32),
            wire.SEED_GRAD_KEY: np.array(vals, np.float32)}


def test_seed_replies_and_the_history_each_node_was_sent_are_captured(
    tmp_path: Path,
) -> None:
    strat = _fedkseed(tmp_path, rounds=(2,), partitions=(0, 1))
    list(strat.configure_train(1, ArrayRecord(), ConfigRecord({"seed": 7}), _grid()))
    strat.aggregate_train(1, [_reply(11, _seeds([1], [1.0])), _reply(12, _seeds([2], [2.0])),
                              _failed(13)])
    sent = {m.metadata.dst_node_id: wire.from_arrayrecord(m.content[wire.ARRAYS_KEY])
            for m in strat.configure_train(2, ArrayRecord(), ConfigRecord({"seed": 7}),
                                           _grid())}

    strat.aggregate_train(2, [_reply(11, _seeds([3, 4], [0.5, -0.5])),
                              _reply(12, _seeds([9], [1.0])), _reply(13, _seeds([5], [1.0]))])

    found = read_observations(tmp_path / "observations")
    assert [(u.round, u.partition) for u in found] == [(2, 0), (2, 1)]
    assert all(u.kind == "seed" for u in found)
    for name, value in _seeds([3, 4], [0.5, -0.5]).items():
        assert np.array_equal(found[0].received[name], value)
        assert found[0].received[name].dtype == value.dtype
    assert "outside" in found[1].rejected  # seed 9 of 8: refused, still observed
    for update in found:
        assert sent[update.node].keys() == update.sent_global.keys() and "probs" in sent[11]
        for name, value in sent[update.node].items():
            assert np.array_equal(update.sent_global[name], value)
    assert found[0].config == {"seed": 7, "round": 2, "since": 0, "target": 1}
    assert found[0].sent_global["hist_round"].tolist() == [1]  # round 1: not seen yet


def test_ferret_observations_are_projected() -> None:
    assert FerretStrategy.kind == "projected" and FedKSeedStrategy.kind == "seed"


# ---------------------------------------------------------------- wiring and config
def test_the_server_attaches_an_observer_only_when_rounds_are_set(tmp_path: Path) -> None:
    from server.app import _strategy

    state = SimpleNamespace(run=SimpleNamespace(path=tmp_path),
                            privacy=SimpleNamespace(mechanism=SimpleNamespace(level="none")))
    off = _strategy(compose(), state, 0)
    on = _strategy(compose(["capture.rounds=[2]"]), state, 0)

    assert off.observer is None
    assert on.observer.root == tmp_path / "observations" and on.observer.wants(2, 5)
    assert not on.observer.wants(1, 5)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["capture.rounds=[0,1]"], "capture.rounds must be round numbers >= 1"),
    (["capture.rounds=[2,5]", "run.num_rounds=3"], r"round\(s\) \[5\] after the last round"),
    (["capture.partitions=[-1]"], "capture.partitions must be partition ids >= 0"),
    (["capture.rounds=1"], "'capture.rounds' expects a list"),
    (["capture.dirr=x"], "did you mean dir"),
])
def test_bad_capture_values_fail_naming_what_was_expected(overrides, expected) -> None:
    with pytest.raises(ConfigError, match=expected):
        compose(overrides)


def test_partitions_are_checked_against_a_known_federation_size() -> None:
    cfg = compose(["capture.rounds=[1]", "capture.partitions=[0,4]"])  # no size: accepted

    check_federation(cfg, 5)
    with pytest.raises(ConfigError, match=r"partition\(s\) \[4\].*has 4 clients"):
        check_federation(cfg, 4)


def test_capture_is_off_by_default() -> None:
    cfg = compose()

    assert cfg.capture == CaptureConfig() and cfg.capture.rounds == ()
    assert not Observer(cfg.capture, "runs/x").wants(1, 0)


# ---------------------------------------------------------------- file format
def _update(rnd: int, partition: int | None, node: int = 7) -> CapturedUpdate:
    return CapturedUpdate(
        round=rnd, partition=partition, node=node, kind="dense",
        received={"layers.0.lora_A.weight": np.arange(6, dtype=np.float16).reshape(2, 3),
                  wire.COMPRESSED_KEY: np.array([1, 255], np.uint8)},
        sent_global={"layers.0.lora_A.weight": np.ones((2, 3), np.float32)},
        metrics={"num-examples": 12, "train_loss": float("nan"), "dp_steps": 4},
        config={"round": rnd, "seed": 0}, rejected="too big" if partition == 1 else None)


def test_observations_round_trip_sorted_by_round_and_partition(tmp_path: Path) -> None:
    written = [_update(2, 1), _update(1, None, node=99), _update(1, 3), _update(1, 0)]
    for update in written:
        write_observation(tmp_path, update)

    found = read_observations(tmp_path)

    assert [(u.round, u.partition) for u in found] == [(1, 0), (1, 3), (1, None), (2, 1)]
    for got in found:
        want = next(w for w in written if (w.round, w.partition) == (got.round, got.partition))
        for name in want.received:
            assert np.array_equal(got.received[name], want.received[name])
            assert got.received[name].dtype == want.received[name].dtype
        assert np.array_equal(got.sent_global["layers.0.lora_A.weight"], np.ones((2, 3)))
        assert got.metrics == {**want.metrics, "train_loss": None}  # strict JSON
        assert (got.config, got.rejected, got.node) == (want.config, want.rejected, want.node)
    names = sorted(p.name for p in tmp_path.rglob("*"))
    assert names == sorted(["round-0001", "round-0002", "node-99.json", "node-99.npz",
                            *(f"partition-000{i}.{s}" for i in (0, 3, 1) for s in
                              ("json", "npz"))])  # no temporary files left


def test_files_hold_no_pickles_and_the_sidecar_is_plain_json(tmp_path: Path) -> None:
    npz = write_observation(tmp_path, _update(1, 3))

    with zipfile.ZipFile(npz) as archive:
        assert sorted(archive.namelist()) == [
            "global/layers.0.lora_A.weight.npy", "received/compressed.npy",
            "received/layers.0.lora_A.weight.npy"]
    with np.load(npz, allow_pickle=False) as data:  # would raise on an object array
        assert all(data[k].dtype != object for k in data.files)
    meta = json.loads(npz.with_suffix(".json").read_text())
    assert meta["round"] == 1 and meta["partition"] == 3 and meta["kind"] == "dense"
    bad = CapturedUpdate(1, 4, 7, "dense", {"x": np.array([{"a": 1}], dtype=object)}, {})
    with pytest.raises(ValueError, match="allow_pickle=False"):
        write_observation(tmp_path, bad)
    assert not [p for p in (tmp_path / "round-0001").iterdir() if "0004" in p.name]
