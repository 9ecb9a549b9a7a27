"""Hostile replies that are well-formed or nearly so, under FedAvg, FedMedian and Krum:
what the decoder refuses, what the ``screen:`` config refuses, and what each strategy
does with a x100 update when nothing screens it."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Message, Metadata

from fedpeft import wire
from fedpeft.config import ScreenConfig, compose
from fedpeft.errors import ConfigError
from strategies import build_strategy
from strategies.decoding import DecodingStrategy

GLOBAL = {"a": np.full((8, 16), 0.5, np.float32), "b": np.zeros(40, np.float32)}
N_HONEST = 5
SCALED, NAN, SHAPE, OVERSIZED = 10, 11, 12, 13  # partition ids of the hostile replies
OPTIONS = {"fedavg": {}, "fedmedian": {}, "krum": {"num_malicious_nodes": 1}}


def _meta(node: int) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=0.0, ttl=60.0,
                    message_type="train")


def _reply(pid: int, deltas: dict, padding: int = 0) -> Message:
    content = wire.reply_content(wire.to_arrayrecord(deltas), 10, {"train_loss": 1.0},
                                 partition_id=pid)
    if padding:  # an extra record the decoder ignores: only the size is off
        content["padding"] = wire.to_arrayrecord({"x": np.zeros(padding, np.float32)})
    return Message(content=content, metadata=_meta(100 + pid))


def _honest(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in GLOBAL.items()}
            for _ in range(N_HONEST + 1)]  # the last one travels in the oversized reply


def _federation(honest: list[dict]) -> list[Message]:
    """Five honest replies, then: x100 of the first, NaN, wrong shape, oversized."""
    nan = {k: v.copy() for k, v in honest[0].items()}
    nan["a"][0, 0] = np.nan
    shape = {"a": np.zeros((16, 8), np.float32), "b": honest[0]["b"]}
    return [*(_reply(pid, d) for pid, d in enumerate(honest[:N_HONEST])),
            _reply(SCALED, {k: 100 * v for k, v in honest[0].items()}),
            _reply(NAN, nan), _reply(SHAPE, shape),
            _reply(OVERSIZED, honest[N_HONEST], padding=4096)]


CAP = wire.message_bytes(_reply(0, _honest()[0])) + 1024  # honest size + 1 KiB
SCREEN = ScreenConfig(norm_k=5.0, max_reply_bytes=CAP)


def _run(name: str, screen: ScreenConfig | None) -> tuple[DecodingStrategy, dict, list[dict]]:
    strat = DecodingStrategy(build_strategy(name, OPTIONS[name]), name=name, screen=screen)
    strat._global = {k: v.copy() for k, v in GLOBAL.items()}
    honest = _honest()
    arrays, _ = strat.aggregate_train(1, _federation(honest))
    assert arrays is not None
    out = wire.from_arrayrecord(arrays)
    assert all(np.all(np.isfinite(v)) for v in out.values())  # the global stays finite
    return strat, {k: out[k] - GLOBAL[k] for k in GLOBAL}, honest


def _rejected(strat: DecodingStrategy) -> dict[int, str]:
    return {e["partition"]: e["reason"] for e in strat.traffic.excluded
            if e["by"] == "decoder"}


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("screen", [None, SCREEN], ids=["no-screen", "screen"])
def test_decoder_rejects_nan_and_wrong_shape_in_every_strategy(
    name: str, screen: ScreenConfig | None
) -> None:
    strat, _, _ = _run(name, screen)

    rejected = _rejected(strat)
    assert "NaN" in rejected[NAN] and "shape" in rejected[SHAPE]
    assert set(strat.traffic.rejected) >= {str(100 + NAN), str(100 + SHAPE)}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_screen_rejects_the_scaled_and_the_oversized_reply(name: str) -> None:
    strat, moved, honest = _run(name, SCREEN)

    rejected = _rejected(strat)
    assert set(rejected) == {SCALED, NAN, SHAPE, OVERSIZED}
    assert f"screen.max_reply_bytes={CAP}" in rejected[OVERSIZED]
    assert str(strat.traffic.bytes_up[str(100 + OVERSIZED)]) in rejected[OVERSIZED]
    assert "update norm" in rejected[SCALED] and "median" in rejected[SCALED]
    assert "screen.norm_k=5" in rejected[SCALED]
    assert strat.traffic.accepted == N_HONEST
    if name == "fedavg":  # equal weights: the plain mean of the honest deltas
        for k in GLOBAL:
            np.testing.assert_allclose(moved[k], np.mean([h[k] for h in honest[:N_HONEST]],
                                                         axis=0), atol=1e-6)


def test_without_the_screen_the_oversized_honest_reply_is_accepted() -> None:
    strat, _, _ = _run("fedavg", None)

    assert set(_rejected(strat)) == {NAN, SHAPE}
    assert strat.traffic.accepted == N_HONEST + 2  # the x100 and the oversized one


def _honest_spread(honest: list[dict], k: str) -> tuple[np.ndarray, np.ndarray]:
    stack = np.stack([h[k] for h in honest])  # the oversized reply's delta is honest too
    return stack.min(axis=0), stack.max(axis=0)


def test_unscreened_x100_pulls_fedavg_far_off() -> None:
    _, moved, honest = _run("fedavg", None)

    for k in GLOBAL:
        low, high = _honest_spread(honest, k)
        outside = np.maximum(moved[k] - high, low - moved[k])
        # honest deltas have std 0.01; the x100 one moves the mean by 100/7 of its value
        assert float(np.max(outside)) > 0.1
        np.testing.assert_allclose(
            moved[k], (sum(h[k] for h in honest) + 100 * honest[0][k]) / 7, atol=1e-5)


def test_unscreened_x100_leaves_fedmedian_within_the_honest_range() -> None:
    _, moved, honest = _run("fedmedian", None)

    for k in GLOBAL:
        low, high = _honest_spread(honest, k)
        assert np.all(moved[k] >= low - 1e-6) and np.all(moved[k] <= high + 1e-6)


def test_unscreened_x100_is_excluded_by_krum() -> None:
    strat, moved, honest = _run("krum", None)

    by_krum = {e["partition"]: e["reason"] for e in strat.traffic.excluded
              if e["by"] == "krum"}
    assert SCALED in by_krum and "Krum score" in by_krum[SCALED]
    # Krum keeps one update, and it is one of the honest ones
    assert any(all(np.allclose(moved[k], h[k], atol=1e-6) for k in GLOBAL) for h in honest)


def test_norm_screen_needs_three_updates(caplog: pytest.LogCaptureFixture) -> None:
    strat = DecodingStrategy(build_strategy("fedavg", {}), screen=ScreenConfig(norm_k=2.0))
    strat._global = {k: v.copy() for k, v in GLOBAL.items()}
    honest = _honest()
    replies = [_reply(0, honest[0]), _reply(SCALED, {k: 100 * v for k, v in honest[0].items()})]

    with caplog.at_level(logging.DEBUG, logger="fedpeft.strategy"):
        strat.aggregate_train(1, replies)

    assert strat.traffic.accepted == 2 and not strat.traffic.rejected
    assert "norm screen skipped: 2 update(s)" in caplog.text


def test_all_zero_updates_give_no_scale_and_are_not_screened() -> None:
    strat = DecodingStrategy(build_strategy("fedavg", {}), screen=ScreenConfig(norm_k=2.0))
    strat._global = {k: v.copy() for k, v in GLOBAL.items()}
    zero = {k: np.zeros_like(v) for k, v in GLOBAL.items()}
    one = {k: np.full_like(v, 0.01) for k, v in GLOBAL.items()}

    strat.aggregate_train(1, [_reply(0, zero), _reply(1, zero), _reply(2, one)])

    assert strat.traffic.accepted == 3


@pytest.mark.parametrize(("override", "text"), [
    ("screen.norm_k=1", "screen.norm_k must be > 1"),
    ("screen.norm_k=0.5", "found 0.5"),
    ("screen.max_reply_bytes=0", "screen.max_reply_bytes must be > 0"),
    ("screen.max_reply_bytes=abc", "expects an integer"),
    ("screen.norm_kk=3", "did you mean norm_k"),
])
def test_bad_screen_values_fail_at_config_time(override: str, text: str) -> None:
    with pytest.raises(ConfigError, match=text):
        compose(override)


def test_screen_config_composes_and_defaults_off() -> None:
    assert compose("").screen == ScreenConfig(norm_k=None, max_reply_bytes=None)
    cfg = compose("screen.norm_k=4 screen.max_reply_bytes=1000000")
    assert cfg.screen == ScreenConfig(norm_k=4.0, max_reply_bytes=1_000_000)
