"""``bench/scale_cost.py`` at a tiny size: each update kind's aggregate is the weighted
mean computed here independently, the timings and memory readings are real, a SuperLink
object store keeps what was pushed, and the fit and bottleneck logic do what they say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import scale_cost as sc

TINY = sc.Shapes(lora={"layer.lora_A": [4, 16], "layer.lora_B": [16, 4]}, num_seeds=64,
                 local_steps=20, num_blocks=8, num_bases=64, min_bases=2, density=0.25)
N, SEED = 3, 7


def weights() -> np.ndarray:
    w = np.array([sc.num_examples(node) for node in sc.nodes(N)], float)
    return w / w.sum()


def expected(kind: str) -> dict[str, np.ndarray]:
    """The aggregate each strategy must return, from the same synthetic updates."""
    rngs = [sc.rng_for(SEED, node) for node in sc.nodes(N)]
    if kind in ("dense", "compressed"):
        deltas = [sc.dense_update(TINY, r, 0).deltas for r in rngs]
        if kind == "compressed":
            deltas = [sc.codec(TINY).roundtrip(d) for d in deltas]
        glob = sc.global_state(TINY, SEED)
        return {k: glob[k] + sum(w * d[k] for w, d in zip(weights(), deltas, strict=True))
                for k in glob}
    if kind == "seeds":
        total = np.zeros(TINY.num_seeds)
        for w, r in zip(weights(), rngs, strict=True):
            u = sc.seed_update(TINY, r, 0)
            total[u.indices] += w * u.values.astype(np.float64)
        idx = np.flatnonzero(total)
        return {"idx": idx, "vals": total[idx]}
    ups = [sc.projected_update(TINY, r, node) for r, node in zip(rngs, sc.nodes(N), strict=True)]
    return {"seed": np.array([u.seed for u in ups]), "coef": np.full(N, 10.0 / N),
            "gamma": np.concatenate([u.gammas for u in ups])}


@pytest.mark.parametrize("kind", sc.KINDS)
def test_each_kind_aggregates_to_the_independent_weighted_mean(kind: str) -> None:
    point, aggregate = sc.run_point(kind, N, TINY, seed=SEED)
    for key, want in expected(kind).items():
        np.testing.assert_allclose(aggregate[key], want, rtol=1e-5, atol=1e-7, err_msg=key)
    assert point["aggregate_s"] > 0 and point["build_s"] > 0
    # RSS deltas inside a shared test process move with what earlier tests freed; the
    # reading itself is checked by the allocation test below.
    assert point["base_rss_mib"] > 0 and np.isfinite(point["peak_mib"])
    assert point["payload_bytes_per_client"] > 0


PEAK_PROBE = """
import sys; sys.path.insert(0, {bench!r})
import numpy as np, scale_cost as sc
block = np.ones(256 * sc.MIB // 8)
del block
sc.reset_peak()
before = sc.peak_mib()
block = np.ones(64 * sc.MIB // 8)
print(sc.peak_mib() - before)
"""


def test_peak_reading_sees_an_allocation_after_a_reset() -> None:
    """In a fresh process (an allocator that earlier tests left warm could hand back pages
    already resident): after a reset, the peak sees a new 64 MiB block, and not the
    256 MiB one freed before the reset."""
    code = PEAK_PROBE.format(bench=str(Path(sc.__file__).parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert 60 <= float(out.stdout.split()[-1]) < 200


@pytest.mark.parametrize("backend", sc.STORES)
def test_a_superlink_store_keeps_every_object_pushed(backend: str) -> None:
    row = sc.store_point(backend, "dense", N, TINY, seed=SEED)
    one = sc.serialize(sc.reply(sc.FIRST_NODE, next(sc.update_arrays("dense", TINY, 1, SEED))))
    assert row["objects"] == N * len(one[1])
    assert row["pushed_bytes"] >= N * TINY.lora_params * 4 and row["store_s"] > 0
    assert (row["disk_mib"] > 0) == (backend == "sqlite")


def test_fit_recovers_a_line_and_names_the_first_resource_to_fill() -> None:
    fit = sc.fit_line([10, 100, 1000], [5 + 2 * 10, 5 + 2 * 100, 5 + 2 * 1000])
    assert fit["a"] == pytest.approx(5) and fit["b"] == pytest.approx(2)
    assert sc.reach(fit, 2005) == pytest.approx(1000)
    line = {"a": 0.0, "b": 4.0, "max_rel_miss": 0.0}
    models = {"kinds": {"dense": {"peak_mib": line, "base_rss_mib": 24.0},
                        "seeds": {"peak_mib": {**line, "b": 0.01}, "base_rss_mib": 24.0}},
              "store": {"memory/dense": {"growth": {**line, "b": 2.0}, "store_s": line}}}
    found = sc.limits(models, {"memory_gib": 1.0, "disk_free_gib": 10.0})
    assert found["first"] == "server memory, dense updates"
    assert found["first_clients"] == pytest.approx(250)
