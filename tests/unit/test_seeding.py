"""Tests for fedpeft.seeding: exact regeneration, statistics, fused vs eager, CPU vs CUDA.

Compiled-path tests use float32 and a handful of graphs so the whole file stays fast once
inductor's on-disk cache is warm (the first run on a machine compiles for ~1 minute).
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import ndtri

from fedpeft import seeding
from fedpeft.errors import ConfigError

N_STATS = 1_000_000
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
_M64 = (1 << 64) - 1


def _draw(n: int, seed: int = 1, offset: int = 0, dtype: torch.dtype = torch.float32,
          compile: bool = False) -> torch.Tensor:
    return seeding.normal_(torch.empty(n, dtype=dtype), seed, offset, compile=compile)


def _reference(seed: int, index: int) -> float:
    """Element ``index`` of stream ``seed`` with Python ints (no int64 wrap-around at all)."""
    key, gamma = (v & _M64 for v in seeding._stream_constants(seed))
    x = (key + index * gamma) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    h = x ^ (x >> 31)
    v = h & ((1 << 63) - 1)
    zeros = 63 - v.bit_length()
    v = (v << zeros) & ((1 << 63) - 1) if v else 0
    j = max((62 - zeros) * 256 + ((v >> 54) & 255), 0)
    frac = (v >> 34) & ((1 << 20) - 1)
    knots = seeding._normal_knots()
    magnitude = knots[j] + (((knots[j + 1] - knots[j]) * frac) >> 20)
    return (-magnitude if h >> 63 else magnitude) * 2.0**-20


# --------------------------------------------------------------------------- derive_seed


def test_derive_seed_golden_values_are_stable() -> None:
    # Prepare / Execute: values computed once when the scheme was fixed; they must never
    # change, since every party of every run derives its seeds this way.
    got = (seeding.derive_seed(0), seeding.derive_seed(42, "ferret", 3, 7, 11),
           seeding.derive_seed("fedkseed"))
    # Assert
    assert got == (1813274425164086583, 5283676919804898987, 8129363435115426135)


def test_derive_seed_same_in_a_fresh_process() -> None:
    code = "from fedpeft.seeding import derive_seed; print(derive_seed(7, 'block', 2**70 % 2**64))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "123"})
    assert int(out.stdout) == seeding.derive_seed(7, "block", 2**70 % 2**64)


def test_derive_seed_distinct_for_distinct_parts() -> None:
    tuples = [(r, "ferret", c, b, k) for r in range(3) for c in range(4) for b in range(5)
              for k in range(20)]
    tuples += [(1,), ("1",), (1, 2), (2, 1), (1, 2, 0), ("a", "b"), ("ab",), (-1,)]
    seeds = [seeding.derive_seed(*t) for t in tuples]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("parts", [(), (1.5,), (True,), (2**64,), (None,)])
def test_derive_seed_rejects_bad_parts(parts: tuple) -> None:
    with pytest.raises(ValueError):
        seeding.derive_seed(*parts)


# --------------------------------------------------------------------------- exactness


def test_golden_values_of_the_normal_stream() -> None:
    # Values are integer multiples of 2^-20; these pin the generator across versions.
    a = _draw(4, seed=12345, dtype=torch.float64) * 2**20
    b = _draw(2, seed=2**63 + 5, offset=2**40, dtype=torch.float64) * 2**20
    assert a.tolist() == [-432678.0, -563919.0, 373674.0, -350203.0]
    assert b.tolist() == [-188990.0, 2437558.0]


@pytest.mark.parametrize("offset", [0, 12_345, 2**40 - 3, 2**61])
def test_int64_kernel_matches_python_integer_reference(offset: int) -> None:
    # Prepare: Python ints never overflow, so agreement shows int64 ops wrap mod 2^64
    seed = seeding.derive_seed(offset, "ref")
    # Execute
    got = _draw(300, seed, offset, dtype=torch.float64).tolist()
    # Assert
    assert got == [_reference(seed, offset + i) for i in range(300)]


def test_same_seed_same_bits_and_dtypes_agree() -> None:
    a, b = _draw(10_001, seed=9), _draw(10_001, seed=9)
    wide = _draw(10_001, seed=9, dtype=torch.float64)
    half = _draw(10_001, seed=9, dtype=torch.bfloat16)
    assert torch.equal(a, b)
    assert torch.equal(wide, a.double())  # multiples of 2^-20: exact in both dtypes
    assert torch.equal(half, a.bfloat16())
    assert not torch.equal(a, _draw(10_001, seed=10))
    assert (a != _draw(10_001, seed=10)).float().mean() > 0.99


def test_offset_splits_agree_with_one_draw() -> None:
    whole = _draw(1000, seed=3, offset=17)
    for k in (1, 333, 999):
        parts = torch.cat([_draw(k, seed=3, offset=17), _draw(1000 - k, seed=3, offset=17 + k)])
        assert torch.equal(whole, parts)


def test_eager_chunk_boundaries_are_invisible(monkeypatch: pytest.MonkeyPatch) -> None:
    whole = _draw(5000, seed=4, offset=11)
    monkeypatch.setattr(seeding, "_EAGER_CHUNK", 777)
    assert torch.equal(_draw(5000, seed=4, offset=11), whole)


def test_non_contiguous_output_uses_row_major_order() -> None:
    expected = _draw(6 * 5, seed=8).view(6, 5)
    out = torch.empty(5, 6).t()  # (6, 5) view, column-major in memory
    seeding.normal_(out, 8, compile=False)
    assert torch.equal(out, expected)


def test_global_rng_untouched() -> None:
    cpu_state = torch.random.get_rng_state()
    params = {"w": torch.zeros(1000)}
    _draw(1000)
    seeding.perturb_(params, 5, 0.1, compile=False)
    seeding.truncated_normal_(torch.empty(100), 5, 0.5, compile=False)
    assert torch.equal(torch.random.get_rng_state(), cpu_state)


# --------------------------------------------------------------------------- statistics


def test_normal_statistics_on_one_million_samples() -> None:
    z = _draw(N_STATS, seed=seeding.derive_seed(2024, "stats"), dtype=torch.float64).numpy()
    assert abs(z.mean()) < 0.005
    assert abs(z.std() - 1.0) < 0.005
    assert abs(stats.skew(z)) < 0.01
    assert abs(stats.kurtosis(z)) < 0.02  # excess kurtosis
    assert stats.kstest(z, "norm").pvalue > 0.01
    assert z.max() > 4.0 and z.min() < -4.0  # the tails are there


def test_normal_table_matches_exact_quantiles() -> None:
    knots = np.array(seeding._normal_knots(), dtype=np.float64)
    j = np.arange(knots.size)
    p = 2.0 ** (j // 256 - 63) * (1 + (j % 256) / 256)
    exact = -ndtri(p / 2) * 2**20
    assert np.max(np.abs(knots - exact)) <= 0.5 + 1e-6  # correctly rounded to the grid


# --------------------------------------------------------------------------- perturb_


def test_perturb_then_negative_restores_weights() -> None:
    torch.manual_seed(0)
    params = {"b": torch.randn(300, 7), "a": torch.randn(1001)}
    before = {k: v.clone() for k, v in params.items()}
    seeding.perturb_(params, 77, 5e-4, compile=False)
    changed = max((params[k] - before[k]).abs().max().item() for k in params)
    seeding.perturb_(params, 77, -5e-4, compile=False)
    error = max((params[k] - before[k]).abs().max().item() for k in params)
    assert changed > 1e-3
    assert error <= 2 * torch.finfo(torch.float32).eps * 8  # one rounding per step, |w| < 8


def test_perturb_is_one_vector_over_sorted_names() -> None:
    params = {"b": torch.zeros(4, 3), "a": torch.zeros(5)}
    seeding.perturb_(params, 21, 1.0, compile=False)
    z = _draw(17, seed=21)
    assert torch.equal(params["a"], z[:5])
    assert torch.equal(params["b"], z[5:].view(4, 3))


def test_add_normal_is_exact_float64_arithmetic() -> None:
    base = torch.linspace(-2, 2, 4096)
    out = base.clone()
    seeding.add_normal_(out, 6, 0.37, 5, compile=False)
    scale = float(np.float32(0.37))
    expected = (base.double() + _draw(4096, 6, 5, torch.float64) * scale).float()
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------- truncated


@pytest.mark.parametrize("bound", [0.5, 2.0])
def test_truncated_normal_bounds_and_variance(bound: float) -> None:
    z = seeding.truncated_normal_(torch.empty(N_STATS, dtype=torch.float64), 31, bound,
                                  compile=False)
    phi = math.exp(-bound * bound / 2) / math.sqrt(2 * math.pi)
    rho = 1 - 2 * bound * phi / math.erf(bound / math.sqrt(2))
    assert z.abs().max().item() <= bound
    assert abs(z.mean().item()) < 0.002 * bound
    assert abs(z.var().item() / rho - 1) < 0.006
    assert seeding.truncated_normal_variance(bound) == pytest.approx(rho, rel=1e-12)


def test_truncated_normal_small_bound_and_golden_values() -> None:
    bound = 1 / math.sqrt(1_000_000)  # Ferret: bound = 1/sqrt(d)
    z = seeding.truncated_normal_(torch.empty(200_000), 3, bound, compile=False)
    rho = seeding.truncated_normal_variance(bound)
    assert z.abs().max().item() <= bound
    assert abs(z.double().var().item() / rho - 1) < 0.02
    assert rho == pytest.approx(1 / (3 * 1_000_000), rel=1e-5)
    golden = seeding.truncated_normal_(torch.empty(3, dtype=torch.float64), 7, 0.5) * 2**23
    assert golden.tolist() == [-2178173.0, -488021.0, -620664.0]


def test_add_truncated_equals_exact_reference() -> None:
    bound, scale = 1 / math.sqrt(4096), -0.37
    base = torch.linspace(-1, 1, 5000)
    v = seeding.truncated_normal_(torch.empty(5000, dtype=torch.float64), 9, bound, 17)
    expected = (base.double() + v * seeding._float32_scale(scale)).float()
    got = base.clone()
    seeding.add_truncated_(got, 9, bound, scale, 17, compile=False)
    assert torch.equal(got, expected)
    acc = torch.zeros(5000, dtype=torch.float64)  # float64 accumulator: exact products
    seeding.add_truncated_(acc, 9, bound, 0.5, 17)
    assert torch.equal(acc, v * 0.5)


def test_add_truncated_compiled_equals_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seeding, "_COMPILED_CHUNK", 4099)
    base = torch.linspace(-1, 1, 20_000)
    eager, fused = base.clone(), base.clone()
    seeding.add_truncated_(eager, 4, 0.01, 2.5e-3, 3, compile=False)
    seeding.add_truncated_(fused, 4, 0.01, 2.5e-3, 3, compile=True)
    assert ("add_truncated", "cpu") not in seeding._COMPILE_FAILED
    assert torch.equal(eager, fused) and not torch.equal(eager, base)


# --------------------------------------------------------------------------- compiled path


def test_compiled_equals_eager_bitwise(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: small fused chunks so chunk boundaries fall inside the tensor
    monkeypatch.setattr(seeding, "_COMPILED_CHUNK", 4099)
    base = torch.linspace(-1, 1, 20_000)
    eager, fused = base.clone(), base.clone()
    # Execute
    seeding.add_normal_(eager, 12, 3e-4, 999, compile=False)
    seeding.add_normal_(fused, 12, 3e-4, 999, compile=True)
    # Assert
    assert not seeding._COMPILE_FAILED, "compilation fell back to eager"
    assert torch.equal(eager, fused)


def test_compiled_normal_fill_equals_eager() -> None:
    assert torch.equal(_draw(20_000, 5, 3, compile=True), _draw(20_000, 5, 3))
    assert ("normal", "cpu") not in seeding._COMPILE_FAILED


def test_compile_failure_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(seeding, "_COMPILED", {})
    monkeypatch.setattr(seeding, "_COMPILE_FAILED", set())
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    with caplog.at_level(logging.WARNING, logger="fedpeft.seeding"):
        got = _draw(100, 2, compile=True)
        again = _draw(100, 2, compile=True)
    assert torch.equal(got, _draw(100, 2)) and torch.equal(again, got)
    assert ("normal", "cpu") in seeding._COMPILE_FAILED
    assert sum("using eager" in r.message for r in caplog.records) == 1


def test_compile_env_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(seeding.COMPILE_ENV, "0")
    assert not seeding.compile_enabled()
    assert not seeding._use_compiled(None, 10**9)
    monkeypatch.setenv(seeding.COMPILE_ENV, "1")
    assert seeding._use_compiled(None, 10**9) and not seeding._use_compiled(None, 10)
    assert seeding._use_compiled(True, 10)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: seeding.normal_(torch.empty(3, dtype=torch.int64), 1), ValueError),
        (lambda: seeding.normal_(torch.empty(3), -1), ValueError),
        (lambda: seeding.normal_(torch.empty(3), 2**64), ValueError),
        (lambda: seeding.normal_(torch.empty(3), 1, offset=-2), ValueError),
        (lambda: seeding.normal_(torch.empty(3), 1, backend="numpy"), ConfigError),
        (lambda: seeding.normal_(torch.empty(3), 1, backend="torch-cuda"), ConfigError),
        (lambda: seeding.add_normal_(torch.empty(3), 1, float("nan")), ValueError),
        (lambda: seeding.truncated_normal_(torch.empty(3), 1, 0.0), ValueError),
        (lambda: seeding.truncated_normal_(torch.empty(3), 1, 3.5), ValueError),
    ],
)
def test_invalid_inputs_raise(call, error: type[Exception]) -> None:
    with pytest.raises(error):
        call()


# --------------------------------------------------------------------------- CUDA


@CUDA
def test_cuda_matches_cpu_bitwise() -> None:
    n, seed, offset = 1 << 20, seeding.derive_seed(1, "cuda"), 12_345
    cpu = _draw(n, seed, offset)
    for compile in (False, True):
        gpu = seeding.normal_(torch.empty(n, device="cuda"), seed, offset, compile=compile)
        assert torch.equal(gpu.cpu(), cpu)
    base = torch.linspace(-1, 1, n)
    on_cpu, on_gpu = base.clone(), base.cuda()
    seeding.add_normal_(on_cpu, seed, 5e-4, offset, compile=False)
    seeding.add_normal_(on_gpu, seed, 5e-4, offset, compile=True)
    assert torch.equal(on_gpu.cpu(), on_cpu)
    trunc_cpu = seeding.truncated_normal_(torch.empty(n), seed, 1e-3, compile=False)
    trunc_gpu = seeding.truncated_normal_(torch.empty(n, device="cuda"), seed, 1e-3)
    assert torch.equal(trunc_gpu.cpu(), trunc_cpu)
    acc_cpu, acc_gpu = base.clone(), base.cuda()
    seeding.add_truncated_(acc_cpu, seed, 1e-3, -0.7, offset, compile=False)
    seeding.add_truncated_(acc_gpu, seed, 1e-3, -0.7, offset, compile=True)
    assert torch.equal(acc_gpu.cpu(), acc_cpu)


@CUDA
def test_torch_cuda_backend_is_reproducible_on_one_gpu() -> None:
    params = {"a": torch.zeros(1000, device="cuda"), "b": torch.zeros(77, device="cuda")}
    again = {k: v.clone() for k, v in params.items()}
    seeding.perturb_(params, 3, 1.0, backend="torch-cuda")
    seeding.perturb_(again, 3, 1.0, backend="torch-cuda")
    assert all(torch.equal(params[k], again[k]) for k in params)
    assert abs(params["a"].std().item() - 1) < 0.1
