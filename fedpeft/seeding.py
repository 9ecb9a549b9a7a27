"""Random directions regenerated exactly from integer seeds (DESIGN §5; FedKSeed, Ferret).

FedKSeed and Ferret never send a direction, only its seed: every party regenerates
``z(seed)`` and must get the *same bits*, whether it runs on a CPU or a GPU, eagerly or
through ``torch.compile``. torch's own generators cannot promise that (the CPU and CUDA
generators give different numbers for one seed, and the CUDA one can even depend on the GPU's
SM count), so this module builds a counter-based generator from integer hashing:

- **Stream.** Element ``i`` of stream ``seed`` is a pure function of ``(seed, i)``:
  ``h_i = mix64(key + i * gamma)`` in wrapping 64-bit arithmetic, where ``mix64`` is the
  SplitMix64 finaliser and ``key``/``gamma`` (odd, SplittableRandom-style) are derived from
  the seed. Different seeds use different Weyl increments, so two streams are never shifted
  copies of each other. Nothing reads or advances torch's global RNG.
- **Normal values (integer inverse CDF, no libm).** The top bit of ``h_i`` is the sign; the
  other 63 bits are a two-sided tail probability ``p``. ``|z| = Φ⁻¹(1 - p/2)`` is read from
  a table with 256 knots per binary octave of ``p`` (63 octaves, down to ``p = 2⁻⁶³``, so
  the tails reach |z| ≈ 9.4) and linearly interpolated **in integer arithmetic** on a fixed
  grid of 2⁻²⁰. The result is an integer below 2²⁴, so converting it to float32/float64 is
  exact. Hence the values are bit-identical on every device, compiler and backend by
  construction: no ``log``/``cos``/``sqrt`` (whose last ulp differs between CPU and CUDA
  libm), no FMA-contraction hazard. Box-Muller was the alternative considered; computed in
  float64 and rounded it still mismatches CPU vs CUDA with probability ~2⁻²⁸ per element
  (about one element per perturbation of a 135M-parameter model), so it was not used.
  The table's interpolation error is at most 1.2e-6 in z (CDF error < 4e-7), i.e. invisible to
  any test short of ~10¹² samples; values are multiples of 2⁻²⁰ ≈ 9.5e-7.
- **Tables** are computed once per process with AS241 (Wichura 1988) in plain Python floats
  (IEEE +, -, *, / and ``sqrt`` are correctly rounded everywhere) and ``decimal`` for logarithms,
  so they are identical on every platform (no libm anywhere).
- **Updates.** :func:`add_normal_` computes ``param + float32(scale) · z`` in float64, where
  the product is exact (24 x 24 bits), then rounds once to float64 and once to ``param``'s
  dtype. Both roundings are correctly rounded IEEE operations, so the update is also
  bit-identical on every device, with or without FMA contraction. (``scale`` is used at
  float32 precision, a relative change below 6e-8.)
- **Speed.** The eager path makes ~40 passes over int64 temporaries; with ``torch.compile``
  (inductor: C++/OpenMP on CPU, Triton on CUDA) it becomes one fused kernel that reads and
  writes each parameter once (measured, 2 CPU threads, SmolLM2-135M: 1.15 s per full
  perturbation vs 1.10 s for torch.randn + add_ and 8.2 s eager; see
  bench/perturbation.py). Compilation is on by default for tensors of at least 65,536
  elements (``FEDPEFT_SEEDING_COMPILE=0`` or ``compile=False`` turns it off), and falls back
  to eager once, with a warning, if it fails. Compiled and eager results are bit-identical.
- **``backend="torch-cuda"``** is an opt-in fast path: ``torch.randn`` with a CUDA generator
  seeded from ``(seed, offset)``. It is reproducible only across parties with the *same GPU
  model and torch version* (CUDA randn's element-to-counter mapping can depend on the SM count),
  and its values depend on how a request is split into calls (``offset`` only reseeds). Use
  it only when every party is known to be such a GPU.

A direction over a parameter set (:func:`perturb_`) is one vector over the concatenation of
the tensors in sorted-name order: tensor ``k`` starts at element offset ``Σ_{j<k} numel_j``.
Element order within a tensor is row-major (``reshape(-1)``), independent of memory layout.
"""

from __future__ import annotations

import decimal
import hashlib
import logging
import math
import operator
import os
import struct
import threading
from collections.abc import Callable, Mapping
from functools import lru_cache

import torch

from fedpeft.errors import ConfigError

__all__ = [
    "BACKENDS",
    "COMPILE_ENV",
    "MAX_TRUNCATION_BOUND",
    "add_normal_",
    "add_truncated_",
    "compile_enabled",
    "derive_seed",
    "normal_",
    "perturb_",
    "truncated_normal_",
    "truncated_normal_variance",
]

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("hash", "torch-cuda")
COMPILE_ENV = "FEDPEFT_SEEDING_COMPILE"
MAX_TRUNCATION_BOUND = 3.0  # beyond this the truncation is immaterial; use normal_

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1
_MAX_INDEX = 1 << 62  # offset + numel must stay below this (int64 indices, no overflow)
_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, SplitMix64's Weyl increment
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # SplitMix64 finaliser multipliers
_SEED_INIT, _INT_TAG, _STR_TAG = 0x6665647065667453, 0x1, 0x2  # "fedpeftS", part kinds
_KEY_SALT, _GAMMA_SALT = 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1

_FRAC_BITS = 20  # interpolation weight bits (both tables)
_NORMAL_GRID_BITS = 20  # normal values are multiples of 2^-20 (|z| < 9.5 < 2^4)
_NORMAL_STEP = 2.0**-_NORMAL_GRID_BITS
_OCTAVE_BITS = 8  # 256 knots per octave of the two-sided tail probability
_OCTAVES = 63
_TRUNC_BITS = 14  # 16,384 uniform intervals for the truncated-normal table
_TRUNC_GRID_BITS = 23  # truncated values: bound * 2^S < 2^23 (exact in float32)

_EAGER_CHUNK = 1 << 18  # eager int64 temporaries of 2 MiB stay in cache (fastest measured)
_COMPILED_CHUNK = 1 << 26  # the fused kernel has no temporaries; this bounds index math
_AUTO_COMPILE_MIN = 1 << 16  # compile=None: smaller requests run eagerly (no compile wait)

_DEC = decimal.Context(prec=40)  # explicit context: independent of the caller's settings
_PI = decimal.Decimal("3.14159265358979323846264338327950288419716939937510582097494459")


def _signed(x: int) -> int:
    """Reinterpret a 64-bit unsigned integer as the int64 torch stores."""
    return x - (1 << 64) if x >> 63 else x


_MIX1_S, _MIX2_S = _signed(_MIX1), _signed(_MIX2)


# --------------------------------------------------------------------------- seeds


def _mix64(x: int) -> int:
    """SplitMix64 finaliser on Python ints (a bijection of 64-bit words)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


def _part_word(part: object) -> tuple[int, int]:
    """(kind tag, 64-bit word) of one seed part; strings go through BLAKE2b, not hash()."""
    if isinstance(part, str):
        digest = hashlib.blake2b(part.encode("utf-8"), digest_size=8, person=b"fedpeft-seed")
        return _STR_TAG, int.from_bytes(digest.digest(), "little")
    if isinstance(part, bool):
        raise ValueError(f"seed parts must be int or str, found bool {part!r}")
    try:
        value = operator.index(part)
    except TypeError:
        raise ValueError(
            f"seed parts must be int or str, found {type(part).__name__} {part!r}"
        ) from None
    if not -(1 << 63) <= value < (1 << 64):
        raise ValueError(f"integer seed parts must lie in [-2**63, 2**64), found {value}")
    return _INT_TAG, value & _MASK64


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from ``parts``, e.g. ``derive_seed(run_seed, "ferret", cid, l, k)``.

    The parts are chained through the SplitMix64 finaliser (a bijection): each step mixes in
    a kind tag (int vs str, so ``1`` and ``"1"`` differ) and the part's 64-bit word (ints
    modulo 2**64, strings via an 8-byte BLAKE2b digest), and the part count is mixed in last.
    The result is the same in every process, Python version and platform (no ``hash()``),
    and distinct part tuples give distinct seeds with overwhelming probability (a collision
    needs a 64-bit state collision, ~2⁻⁶³ per pair).
    """
    if not parts:
        raise ValueError("derive_seed needs at least one part (e.g. the run seed), found none")
    state = _SEED_INIT
    for part in parts:
        tag, word = _part_word(part)
        state = _mix64(_mix64(state ^ tag) + word)
    return _mix64(state ^ len(parts)) >> 1


def _check_seed(seed: object) -> int:
    """The seed as a Python int in [0, 2**64), or a ValueError naming what was found."""
    if isinstance(seed, bool):
        raise ValueError(f"seed must be an integer in [0, 2**64), found bool {seed!r}")
    try:
        value = operator.index(seed)
    except TypeError:
        raise ValueError(f"seed must be an integer in [0, 2**64), found {seed!r}") from None
    if not 0 <= value < (1 << 64):
        raise ValueError(f"seed must be an integer in [0, 2**64), found {value}")
    return value


@lru_cache(maxsize=8192)
def _stream_constants(seed: int) -> tuple[int, int]:
    """(key, gamma) of stream ``seed`` as int64; gamma is odd with many bit transitions.

    The gamma fix-up is Java SplittableRandom's ``mixGamma``: increments with few 01/10
    transitions make poor Weyl sequences, so they are flipped to a well-mixed pattern.
    """
    key = _mix64(seed + _KEY_SALT)
    gamma = _mix64(seed ^ _GAMMA_SALT) | 1
    if bin(gamma ^ (gamma >> 1)).count("1") < 24:
        gamma ^= 0xAAAAAAAAAAAAAAAA
    return _signed(key), _signed(gamma)


# --------------------------------------------------------------------------- tables


def _horner(coefficients: tuple[float, ...], x: float) -> float:
    """Polynomial with coefficients from the highest degree down, in plain IEEE floats."""
    acc = 0.0
    for c in coefficients:
        acc = acc * x + c
    return acc


_A = (2.5090809287301226727e3, 3.3430575583588128105e4, 6.7265770927008700853e4,
      4.5921953931549871457e4, 1.3731693765509461125e4, 1.9715909503065514427e3,
      1.3314166789178437745e2, 3.3871328727963666080e0)
_B = (5.2264952788528545610e3, 2.8729085735721942674e4, 3.9307895800092710610e4,
      2.1213794301586595867e4, 5.3941960214247511077e3, 6.8718700749205790830e2,
      4.2313330701600911252e1, 1.0)
_C = (7.74545014278341407640e-4, 2.27238449892691845833e-2, 2.41780725177450611770e-1,
      1.27045825245236838258e0, 3.64784832476320460504e0, 5.76949722146069140550e0,
      4.63033784615654529590e0, 1.42343711074968357734e0)
_D = (1.05075007164441684324e-9, 5.47593808499534494600e-4, 1.51986665636164571966e-2,
      1.48103976427480074590e-1, 6.89767334985100004550e-1, 1.67638483018380384940e0,
      2.05319162663775882187e0, 1.0)
_E = (2.01033439929228813265e-7, 2.71155556874348757815e-5, 1.24266094738807843860e-3,
      2.65321895265761230930e-2, 2.96560571828504891230e-1, 1.78482653991729133580e0,
      5.46378491116411436990e0, 6.65790464350110377720e0)
_F = (2.04426310338993978564e-15, 1.42151175831644588870e-7, 1.84631831751005468180e-5,
      7.86869131145613259100e-4, 1.48753612908506148525e-2, 1.36929880922735805310e-1,
      5.99832206555887937690e-1, 1.0)


def _upper_quantile(q: float, log_r: Callable[[], float]) -> float:
    """Φ⁻¹(1/2 + q) for 0 <= q < 1/2 by AS241 (Wichura 1988), relative error ~1e-16.

    ``log_r()`` returns ln(1/2 - q), the upper-tail probability; it is only called in the
    tails (q > 0.425), so callers can supply an exact decimal logarithm cheaply.
    """
    if q <= 0.425:
        s = 0.180625 - q * q
        return q * _horner(_A, s) / _horner(_B, s)
    r = math.sqrt(-log_r())  # sqrt is correctly rounded (IEEE), so platform-independent
    if r <= 5.0:
        return _horner(_C, r - 1.6) / _horner(_D, r - 1.6)
    return _horner(_E, r - 5.0) / _horner(_F, r - 5.0)


@lru_cache(maxsize=1)
def _normal_knots() -> tuple[int, ...]:
    """Φ⁻¹(1 - p/2) · 2²⁰ at p_j = 2^(o-63)(1 + m/256), j = 256·o + m (ascending p).

    ln(p/2) = ln(256 + m) + (o - 72)·ln 2 is assembled in ``decimal`` from 257 logarithms,
    so no libm call is involved and the table is identical on every platform.
    """
    ln2 = _DEC.ln(decimal.Decimal(2))
    ln_m = [_DEC.ln(decimal.Decimal(256 + m)) for m in range(256)]
    knots = []
    for j in range(_OCTAVES * 256 + 1):
        octave, m = divmod(j, 256)
        tail = (256 + m) * 2.0 ** (octave - 72)  # one-sided tail p/2, exact
        z = _upper_quantile(
            0.5 - tail, lambda o=octave, m=m: float(_DEC.add(ln_m[m], _DEC.multiply(o - 72, ln2)))
        )
        knots.append(round(z * 2**_NORMAL_GRID_BITS))
    return tuple(knots)


def _erf(x: decimal.Decimal) -> decimal.Decimal:
    """erf(x) = 2/√π · e^(-x²) · Σₙ 2ⁿ x^(2n+1) / (2n+1)!! in ``decimal`` (all terms > 0)."""
    ctx = decimal.Context(prec=50)
    x2 = ctx.multiply(x, x)
    term = total = x
    n = 0
    while term > total * decimal.Decimal("1e-45"):
        n += 1
        term = ctx.divide(ctx.multiply(term, 2 * x2), 2 * n + 1)
        total = ctx.add(total, term)
    return ctx.multiply(ctx.divide(2 * ctx.exp(-x2), ctx.sqrt(_PI)), total)


def _check_bound(bound: object) -> float:
    """The truncation bound as a float in (0, MAX_TRUNCATION_BOUND], else ValueError."""
    try:
        value = float(bound)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"bound must be a number in (0, 3], found {bound!r}") from None
    if not 0.0 < value <= MAX_TRUNCATION_BOUND:
        raise ValueError(
            f"bound must lie in (0, {MAX_TRUNCATION_BOUND}], found {value}; beyond 3 the "
            "truncation removes < 0.3% of the mass, so use normal_ instead"
        )
    return value


@lru_cache(maxsize=64)
def _truncated_knots(bound: float) -> tuple[tuple[int, ...], int]:
    """(knots, S): Φ⁻¹(1/2 + P·k/2N)·2^S for k = 0..N, P = P(|Z| <= bound), capped at bound.

    S is chosen so that bound · 2^S < 2^23: values are exact in float32 and keep 23 bits of
    resolution relative to the bound however small it is (Ferret uses bound = 1/√d).
    """
    grid_bits = _TRUNC_GRID_BITS - math.frexp(bound)[1]
    cap = math.floor(bound * 2.0**grid_bits)
    half_mass = float(_erf(_DEC.divide(decimal.Decimal(bound), _DEC.sqrt(2)))) / 2
    n = 1 << _TRUNC_BITS
    knots = []
    for k in range(n + 1):
        q = half_mass * k / n
        z = _upper_quantile(q, lambda q=q: float(_DEC.ln(decimal.Decimal(0.5 - q))))
        knots.append(min(round(z * 2.0**grid_bits), cap))
    return tuple(knots), grid_bits


def truncated_normal_variance(bound: float) -> float:
    """Var of N(0,1) truncated to [-b, b]: 1 - 2bφ(b)/(2Φ(b) - 1) (Ferret's rho for b = 1/√d).

    Evaluated in ``decimal`` so every party computes the same float.
    """
    b = decimal.Decimal(_check_bound(bound))
    ctx = decimal.Context(prec=50)
    density = ctx.divide(ctx.exp(-ctx.multiply(b, b) / 2), ctx.sqrt(2 * _PI))
    mass = _erf(ctx.divide(b, ctx.sqrt(2)))
    return float(1 - ctx.divide(2 * b * density, mass))


_TABLES: dict[tuple[object, torch.device], torch.Tensor] = {}
_TABLES_LOCK = threading.Lock()


def _table(name: object, knots: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The knot table as an int64 tensor on ``device`` (cached per table and device)."""
    with _TABLES_LOCK:
        cached = _TABLES.get((name, device))
        if cached is None:
            cached = torch.tensor(knots, dtype=torch.int64, device=device)
            _TABLES[(name, device)] = cached
        return cached


# --------------------------------------------------------------------------- tensor kernels


def _lsr(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` on int64 is arithmetic)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def _hash(consts: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """h_i = mix64(key + i·gamma) for i = start..start+n; consts = [start, key, gamma]."""
    x = (torch.arange(n, dtype=torch.int64, device=device) + consts[0]) * consts[2] + consts[1]
    x = (x ^ _lsr(x, 30)) * _MIX1_S  # int64 mul/add wrap modulo 2^64 (checked by tests)
    x = (x ^ _lsr(x, 27)) * _MIX2_S
    return x ^ _lsr(x, 31)


def _interpolate(table: torch.Tensor, j: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
    """table[j] + (table[j+1] - table[j]) · frac / 2^FRAC_BITS, floored, in integers."""
    lo = table[j]
    return lo + (((table[j + 1] - lo) * frac) >> _FRAC_BITS)


def _normal_fixed(h: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Signed normal values in units of 2^-20 from hashes (top bit = sign, 63 bits = p)."""
    v = h & _MASK63
    zeros = torch.zeros_like(v)
    for shift in (32, 16, 8, 4, 2, 1):  # branch-free count of leading zeros, normalising v
        limit = 1 << (63 - shift)
        small = v < limit
        v = torch.where(small, (v & (limit - 1)) << shift, v)
        zeros = zeros + small.to(torch.int64) * shift
    mantissa = (v >> (62 - _OCTAVE_BITS)) & ((1 << _OCTAVE_BITS) - 1)
    j = ((62 - zeros) * (1 << _OCTAVE_BITS) + mantissa).clamp_min(0)  # v == 0: first knot
    frac = (v >> (62 - _OCTAVE_BITS - _FRAC_BITS)) & ((1 << _FRAC_BITS) - 1)
    magnitude = _interpolate(table, j, frac)
    return torch.where(h < 0, -magnitude, magnitude)


def _truncated_fixed(h: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Signed truncated-normal values in units of 2^-S (uniform knots in probability)."""
    v = h & _MASK63
    j = v >> (63 - _TRUNC_BITS)
    frac = (v >> (63 - _TRUNC_BITS - _FRAC_BITS)) & ((1 << _FRAC_BITS) - 1)
    magnitude = _interpolate(table, j, frac)
    return torch.where(h < 0, -magnitude, magnitude)


def _fill_normal_kernel(out: torch.Tensor, consts: torch.Tensor, table: torch.Tensor) -> None:
    """out[:] = z (out is 1-D contiguous); int → float32 is exact, times 2^-20 is exact."""
    fixed = _normal_fixed(_hash(consts, out.numel(), out.device), table)
    out.copy_((fixed.to(torch.float32) * _NORMAL_STEP).to(out.dtype))


def _add_normal_kernel(
    param: torch.Tensor, consts: torch.Tensor, scale: torch.Tensor, table: torch.Tensor
) -> None:
    """param[:] += scale · z via float64 (scale·z exact, then two correct roundings)."""
    fixed = _normal_fixed(_hash(consts, param.numel(), param.device), table)
    step = fixed.to(torch.float64) * (scale * _NORMAL_STEP)  # scale is float32-exact
    param.copy_((param.to(torch.float64) + step).to(param.dtype))


def _fill_truncated_kernel(
    out: torch.Tensor, consts: torch.Tensor, table: torch.Tensor, unit: torch.Tensor
) -> None:
    """out[:] = truncated z = fixed · 2^-S (exact in float32 and float64)."""
    fixed = _truncated_fixed(_hash(consts, out.numel(), out.device), table)
    out.copy_((fixed.to(torch.float64) * unit).to(out.dtype))


def _add_truncated_kernel(
    param: torch.Tensor, consts: torch.Tensor, table: torch.Tensor, unit: torch.Tensor,
    scale: torch.Tensor,
) -> None:
    """param[:] += scale · truncated z via float64 (the product is exact: 24 x 23 bits)."""
    fixed = _truncated_fixed(_hash(consts, param.numel(), param.device), table)
    step = fixed.to(torch.float64) * (scale * unit)  # scale·2^-S is exact (power of two)
    param.copy_((param.to(torch.float64) + step).to(param.dtype))


_KERNELS: dict[str, Callable[..., None]] = {
    "normal": _fill_normal_kernel,
    "add_normal": _add_normal_kernel,
    "truncated": _fill_truncated_kernel,
    "add_truncated": _add_truncated_kernel,
}


# --------------------------------------------------------------------------- compilation

_COMPILED: dict[str, Callable[..., None]] = {}
_COMPILE_FAILED: set[tuple[str, str]] = set()
_COMPILE_LOCK = threading.Lock()


def compile_enabled() -> bool:
    """Whether ``compile=None`` may use torch.compile (env ``FEDPEFT_SEEDING_COMPILE``)."""
    return os.environ.get(COMPILE_ENV, "1").strip().lower() not in {"0", "false", "no", "off"}


def _use_compiled(compile: bool | None, numel: int) -> bool:
    """compile=None: env switch and size threshold; True/False: as asked."""
    if compile is None:
        return compile_enabled() and numel >= _AUTO_COMPILE_MIN
    return bool(compile)


def _compiled(name: str) -> Callable[..., None]:
    """The torch.compile'd kernel ``name`` (built lazily; dynamic shapes, one graph)."""
    with _COMPILE_LOCK:
        fn = _COMPILED.get(name)
        if fn is None:
            fn = torch.compile(_KERNELS[name], dynamic=True, fullgraph=True)
            _COMPILED[name] = fn
        return fn


def _run_kernel(name: str, use_compiled: bool, *args: torch.Tensor) -> None:
    """Run kernel ``name`` compiled when asked and not known broken, else eagerly.

    A compile failure (no C++ compiler, Triton missing, an inductor bug) is logged once per
    (kernel, device type) and remembered; results are identical either way.
    """
    device_type = args[0].device.type
    if use_compiled and (name, device_type) not in _COMPILE_FAILED:
        try:
            _compiled(name)(*args)
            return
        except Exception as exc:  # compile errors have many types; eager is always correct
            _COMPILE_FAILED.add((name, device_type))
            log.warning("seeding: torch.compile of %r on %s failed (%s: %s); using eager",
                        name, device_type, type(exc).__name__, exc)
    _KERNELS[name](*args)


# --------------------------------------------------------------------------- public API


def _check_float_tensor(tensor: object, what: str) -> torch.Tensor:
    """``tensor`` if it is a floating-point torch.Tensor, else ValueError."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, found {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{what} must have a floating dtype, found {tensor.dtype}")
    return tensor


def _check_offset(offset: object, numel: int) -> int:
    """The element offset as an int with offset + numel <= 2**62, else ValueError."""
    try:
        value = operator.index(offset) if not isinstance(offset, bool) else -1
    except TypeError:
        value = -1
    if not 0 <= value <= _MAX_INDEX - numel:
        raise ValueError(f"offset must be an integer in [0, 2**62 - numel], found {offset!r}")
    return value


def _check_backend(backend: str, device: torch.device) -> None:
    """Reject unknown backends and torch-cuda on a non-CUDA tensor."""
    if backend not in BACKENDS:
        raise ConfigError.unknown("seeding backend", backend, BACKENDS)
    if backend == "torch-cuda" and device.type != "cuda":
        raise ConfigError(f"backend 'torch-cuda' needs CUDA tensors, found device {device}; "
                          "use backend 'hash' (exact on every device)")


def _float32_scale(scale: object) -> float:
    """``scale`` rounded to float32 (so scale·z is exact in float64), finite, else ValueError."""
    try:
        value = struct.unpack("f", struct.pack("f", float(scale)))[0]  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"scale must be a finite float32-range number, found {scale!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite, found {scale!r}")
    return value


def _for_each_chunk(
    flat: torch.Tensor, seed: int, offset: int, name: str, compile: bool | None,
    *extra: torch.Tensor,
) -> None:
    """Run kernel ``name`` over 1-D contiguous ``flat`` in chunks, indices from ``offset``."""
    key, gamma = _stream_constants(seed)
    use_compiled = _use_compiled(compile, flat.numel())
    chunk = _COMPILED_CHUNK if use_compiled else _EAGER_CHUNK
    for start in range(0, flat.numel(), chunk):
        piece = flat[start : start + chunk]
        consts = torch.tensor([offset + start, key, gamma], dtype=torch.int64, device=flat.device)
        _run_kernel(name, use_compiled, piece, consts, *extra)


def _in_place_flat(tensor: torch.Tensor, body: Callable[[torch.Tensor], None]) -> None:
    """Apply ``body`` to a 1-D contiguous row-major view of ``tensor`` (copying if needed)."""
    with torch.no_grad():
        if tensor.is_contiguous():
            body(tensor.view(-1))
            return
        flat = tensor.contiguous().view(-1)
        body(flat)
        tensor.copy_(flat.view(tensor.shape))


def _torch_cuda_normal(like: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """torch.randn shaped like ``like`` from a CUDA generator seeded by (seed, offset)."""
    generator = torch.Generator(device=like.device)
    generator.manual_seed(derive_seed(seed, "torch-cuda", offset))
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def normal_(
    out: torch.Tensor, seed: int, offset: int = 0, *, backend: str = "hash",
    compile: bool | None = None,
) -> torch.Tensor:
    """Fill ``out`` with elements ``offset .. offset+numel`` of the N(0,1) stream ``seed``.

    Any float dtype and device; values are the same multiples of 2⁻²⁰ for every dtype that
    can hold them (bfloat16/float16 round them). Returns ``out``.
    """
    _check_float_tensor(out, "out")
    seed, offset = _check_seed(seed), _check_offset(offset, out.numel())
    _check_backend(backend, out.device)
    if backend == "torch-cuda":
        with torch.no_grad():
            return out.copy_(_torch_cuda_normal(out, seed, offset))
    table = _table("normal", _normal_knots(), out.device)
    _in_place_flat(out, lambda flat: _for_each_chunk(flat, seed, offset, "normal", compile, table))
    return out


def add_normal_(
    param: torch.Tensor, seed: int, scale: float, offset: int = 0, *, backend: str = "hash",
    compile: bool | None = None,
) -> None:
    """``param += scale · z`` with z = elements ``offset ..`` of stream ``seed``, fused.

    With the hash backend the result is ``round(param + float32(scale) · z)``, computed so
    that it is bit-identical on every device and with or without torch.compile.
    """
    _check_float_tensor(param, "param")
    seed, offset = _check_seed(seed), _check_offset(offset, param.numel())
    _check_backend(backend, param.device)
    value = _float32_scale(scale)
    if backend == "torch-cuda":
        with torch.no_grad():
            param.add_(_torch_cuda_normal(param, seed, offset), alpha=value)
        return
    table = _table("normal", _normal_knots(), param.device)
    scale_t = torch.tensor(value, dtype=torch.float64, device=param.device)
    _in_place_flat(
        param,
        lambda flat: _for_each_chunk(flat, seed, offset, "add_normal", compile, scale_t, table),
    )


def truncated_normal_(
    out: torch.Tensor, seed: int, bound: float, offset: int = 0, *,
    compile: bool | None = None,
) -> torch.Tensor:
    """Fill ``out`` with N(0,1) truncated to [-bound, bound] (Ferret bases, bound = 1/√d).

    Inverse CDF: a uniform draw of the mass P(|Z| <= bound) is mapped through Φ⁻¹ by a
    per-bound table (16,384 intervals, interpolated in integers), so it is exact in
    distribution up to < 1e-5·bound (worst at bound = 3), branch-free and bit-identical on
    every device. Values lie in [-bound, bound] on a grid of ~bound·2⁻²³. ``bound`` must
    lie in (0, 3]; its table (~0.1 s to build) is cached per bound.
    """
    _check_float_tensor(out, "out")
    seed, offset = _check_seed(seed), _check_offset(offset, out.numel())
    knots, grid_bits = _truncated_knots(_check_bound(bound))
    table = _table(("truncated", float(bound)), knots, out.device)
    unit = torch.tensor(2.0**-grid_bits, dtype=torch.float64, device=out.device)
    _in_place_flat(
        out, lambda flat: _for_each_chunk(flat, seed, offset, "truncated", compile, table, unit)
    )
    return out


def add_truncated_(
    param: torch.Tensor, seed: int, bound: float, scale: float, offset: int = 0, *,
    compile: bool | None = None,
) -> None:
    """``param += scale · v`` with v the truncated-normal stream of :func:`truncated_normal_`.

    Fused like :func:`add_normal_` and exact the same way: ``round(param + float32(scale)·v)``
    with the product formed exactly in float64, so it is bit-identical on every device. On a
    float64 ``param`` the only rounding is the float64 add (Ferret accumulates block
    reconstructions that way, then rounds once into the weights).
    """
    _check_float_tensor(param, "param")
    seed, offset = _check_seed(seed), _check_offset(offset, param.numel())
    knots, grid_bits = _truncated_knots(_check_bound(bound))
    table = _table(("truncated", float(bound)), knots, param.device)
    unit = torch.tensor(2.0**-grid_bits, dtype=torch.float64, device=param.device)
    scale_t = torch.tensor(_float32_scale(scale), dtype=torch.float64, device=param.device)
    _in_place_flat(
        param, lambda flat: _for_each_chunk(flat, seed, offset, "add_truncated", compile, table,
                                            unit, scale_t)
    )


def perturb_(
    params: Mapping[str, torch.Tensor], seed: int, scale: float, *, backend: str = "hash",
    compile: bool | None = None,
) -> None:
    """``w += scale · z(seed)`` over all ``params``, z one vector over their concatenation.

    Tensors are visited in sorted-name order and tensor k covers stream elements
    ``Σ_{j<k} numel_j ..``, so any party holding the same names and shapes regenerates the
    same direction. Calling again with ``-scale`` undoes it up to one rounding per element.
    """
    offset = 0
    for name in sorted(params):
        tensor = params[name]
        add_normal_(tensor, seed, scale, offset, backend=backend, compile=compile)
        offset += tensor.numel()
