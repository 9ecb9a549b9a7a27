"""Who was left out of a round: replies the decoder refused and updates a robust strategy
dropped, each recorded with round, node and partition id."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Error, Message, Metadata
from flwr.serverapp.strategy import FedAvg

from fedpeft import wire
from fedpeft.reporting import RunDir
from strategies import build_strategy
from strategies.decoding import DecodingStrategy

GLOBAL = {"a": np.zeros((8, 16), np.float32), "b": np.zeros(40, np.float32)}
OFFSET, SERVER_ROUND = 3, 2  # a resumed run: the record's round is 5


def _node(pid: int) -> int:
    return 100 + pid  # node ids differ from partition ids


def _meta(node: int) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=0.0, ttl=60.0,
                    message_type="train")


def _reply(pid: int, deltas: dict, partition_id: int | None = -1) -> Message:
    partition_id = pid if partition_id == -1 else partition_id
    content = wire.reply_content(wire.to_arrayrecord(deltas), 10, {"train_loss": 1.0},
                                 partition_id=partition_id)
    return Message(content=content, metadata=_meta(_node(pid)))


def _failed(pid: int, reason: str) -> Message:
    return Message(metadata=_meta(_node(pid)), error=Error(code=2, reason=reason))


def _flower_reason(exc: Exception) -> str:
    """The error reason Flower builds from an exception raised in a ClientApp."""
    return str(type(exc)) + ":<'" + str(exc) + "'>"


def _deltas(n_honest: int, seed: int = 0) -> list[dict]:
    """``n_honest`` small random deltas, then one that is 100x the first of them."""
    rng = np.random.default_rng(seed)
    honest = [{k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in GLOBAL.items()}
              for _ in range(n_honest)]
    return [*honest, {k: 100 * v for k, v in honest[0].items()}]


def _decoding(inner) -> DecodingStrategy:
    strat = DecodingStrategy(inner, round_offset=OFFSET)
    strat._global = {k: v.copy() for k, v in GLOBAL.items()}
    return strat


ROBUST = [  # name, options, honest clients, only the x100 client is excluded, reason text
    ("krum", {"num_malicious_nodes": 1}, 4, False, "lowest Krum scores (Krum score"),
    ("multikrum", {"num_malicious_nodes": 1, "num_nodes_to_select": 4}, 4, True,
     "not among the 4 lowest Krum scores (Krum score"),
    ("bulyan", {"num_malicious_nodes": 1}, 6, False, "5 updates Bulyan's select_multikrum"),
    ("fedmedian", {}, 5, True, "% of coordinates"),
    ("fedtrimmedavg", {"beta": 0.2}, 5, True, "% of coordinates"),
]


@pytest.mark.parametrize(("name", "options", "n_honest", "only_bad", "text"), ROBUST)
def test_robust_strategy_records_the_x100_client_with_its_partition(
    name: str, options: dict, n_honest: int, only_bad: bool, text: str
) -> None:
    strat = _decoding(build_strategy(name, options))
    replies = [_reply(pid, d) for pid, d in enumerate(_deltas(n_honest))]

    arrays, metrics = strat.aggregate_train(SERVER_ROUND, replies)

    assert arrays is not None and wire.PARTITION_ID_KEY not in metrics
    bad = [e for e in strat.traffic.excluded if e["partition"] == n_honest]
    assert len(bad) == 1 and text in bad[0]["reason"]
    assert bad[0] == {"node": str(_node(n_honest)), "partition": n_honest,
                      "round": OFFSET + SERVER_ROUND, "by": name, "reason": bad[0]["reason"]}
    if only_bad:
        assert strat.traffic.excluded == bad
    assert not strat.traffic.rejected  # exclusions are not rejections


def _brute_krum_scores(deltas: list[dict], f: int) -> list[float]:
    """Sum of squared distances to the n - f - 2 nearest other updates, by hand."""
    flat = [np.concatenate([d[k].ravel() for k in sorted(d)]).astype(np.float64)
            for d in deltas]
    near = len(flat) - f - 2
    return [sum(sorted(float(((x - y) ** 2).sum()) for j, y in enumerate(flat) if j != i)[:near])
            for i, x in enumerate(flat)]


def test_krum_lists_every_unselected_client_with_score_and_rule() -> None:
    deltas = _deltas(4)
    strat = _decoding(build_strategy("krum", {"num_malicious_nodes": 1}))

    strat.aggregate_train(SERVER_ROUND, [_reply(p, d) for p, d in enumerate(deltas)])

    reasons = {e["partition"]: e["reason"] for e in strat.traffic.excluded}
    expected = _brute_krum_scores(deltas, f=1)
    (kept,) = set(range(5)) - set(reasons)  # Krum keeps exactly one update: the lowest
    assert kept == int(np.argmin(expected))
    assert all(r.endswith(f"vs selected {expected[kept]:.3g}), n=5 f=1")
               for r in reasons.values())
    scores = {p: float(r.split("(Krum score ")[1].split(" ")[0]) for p, r in reasons.items()}
    assert scores == pytest.approx({p: expected[p] for p in reasons}, rel=2e-3)
    assert scores[4] > 1000 * expected[kept]


def test_identical_updates_exclude_no_one() -> None:
    same = _deltas(1)[0]
    for name in ("fedmedian", "fedtrimmedavg"):
        strat = _decoding(build_strategy(name, {}))
        strat.aggregate_train(SERVER_ROUND, [_reply(p, same) for p in range(6)])
        assert strat.traffic.excluded == []


def test_rejected_and_failed_clients_are_recorded_with_round_node_and_partition() -> None:
    good, _ = _deltas(1)
    nan = {k: np.full_like(v, np.nan) for k, v in GLOBAL.items()}
    # as Flower words it when an exception escapes the ClientApp before fedpeft's handler
    failure = RuntimeError(wire.failure_message(2, ValueError("disk full")))
    strat = _decoding(FedAvg())

    strat.aggregate_train(SERVER_ROUND, [_reply(0, good), _reply(1, nan),
                                         _failed(2, _flower_reason(failure)), _reply(3, good)])

    rnd = OFFSET + SERVER_ROUND
    got = {e["node"]: e for e in strat.traffic.excluded}
    assert set(got) == {str(_node(1)), str(_node(2))} == set(strat.traffic.rejected)
    assert got[str(_node(1))]["partition"] == 1 and "NaN" in got[str(_node(1))]["reason"]
    assert got[str(_node(2))]["partition"] == 2 and "disk full" in got[str(_node(2))]["reason"]
    assert {(e["round"], e["by"]) for e in got.values()} == {(rnd, "decoder")}


def test_partition_is_remembered_across_rounds_and_none_when_never_sent() -> None:
    good, _ = _deltas(1)
    strat = _decoding(FedAvg())
    strat.aggregate_train(1, [_reply(0, good), _reply(1, good)])

    strat.aggregate_train(2, [_failed(0, "lost"), _reply(1, good),
                              _reply(5, {"a": good["a"]}, partition_id=None)])

    assert {e["node"]: e["partition"] for e in strat.traffic.excluded} == {
        str(_node(0)): 0, str(_node(5)): None}


def test_round_record_carries_the_exclusions_into_metrics_jsonl(tmp_path) -> None:
    from server.state import GlobalModel

    strat = _decoding(build_strategy("fedmedian", {}))
    strat.aggregate_train(SERVER_ROUND, [_reply(p, d) for p, d in enumerate(_deltas(5))])
    state = SimpleNamespace(strategy=strat, _t_last=time.perf_counter(), _eval_s=None,
                            _apply_s=None, arrivals={"train": {"7": 1.5}})

    record = GlobalModel._record(state, OFFSET + SERVER_ROUND, SERVER_ROUND, None)
    RunDir(tmp_path).append(record)

    (line,) = RunDir(tmp_path).records()
    assert line["excluded"] == [dict(e) for e in strat.traffic.excluded]
    assert [(e["partition"], e["by"]) for e in line["excluded"]] == [(5, "fedmedian")]
    assert line["reply_s"] == {"7": 1.5}
    assert line["partitions"] == {n: strat.partitions.get(n) for n in line["bytes_up"]}
    assert sorted(line["partitions"].values()) == list(range(len(line["bytes_up"])))


def test_client_reports_partition_id_and_failures_name_it(monkeypatch) -> None:
    from client import app

    def broken(msg, context):
        raise ValueError("no data")

    monkeypatch.setattr(app, "_train", broken)
    context = SimpleNamespace(node_config={"partition-id": 3, "num-partitions": 4})
    request = _reply(3, GLOBAL)  # any message with metadata will do as the request

    reply = app.train(request, context)

    assert reply.has_error() and reply.error.reason == "partition-id=3: ValueError: no data"
    assert wire.partition_from_text(reply.error.reason) == 3
    metrics = _reply(3, GLOBAL).content[wire.METRICS_KEY]
    assert metrics[wire.PARTITION_ID_KEY] == 3 and isinstance(metrics["partition-id"], int)
