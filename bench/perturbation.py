#!/usr/bin/env python3
"""Time one full seeded perturbation (w += eps * z over all trainable parameters).

Model: the bundled SmolLM2-135M in fp32, all 134.5M parameters trainable (FedKSeed's
setting). Compared in one run, each warmed up and timed as the median of ``--runs`` calls:

- ``hash_eager``:    fedpeft.seeding.perturb_ without torch.compile (many passes);
- ``hash_compiled``: the same with the fused torch.compile kernel (the default);
- ``native``:        torch's own generator doing the same work,
                     ``p.add_(torch.randn(p.shape, generator=g), alpha=eps)`` per tensor;
- ``torch_cuda``:    (CUDA only) seeding's opt-in ``backend="torch-cuda"``.

Also reported: ms per 10M samples for bare ``torch.randn`` and bare ``seeding.normal_``
(DESIGN §5 quotes its targets per 10M). The sign of eps alternates so weights stay put.

    python bench/perturbation.py                   # CPU -> bench/results/perturbation-cpu.json
    python bench/perturbation.py --device cuda     # -> bench/results/perturbation-cuda.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedpeft import seeding
from fedpeft.models import ModelConfig, load_causal_lm

ROOT = Path(__file__).resolve().parent.parent
EPS = 5e-4  # FedKSeed's default perturbation scale
SEED = 1234


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[float], None], device: torch.device, runs: int, warmup: int) -> dict:
    """Median/min/all wall times in ms of ``fn(±EPS)`` after ``warmup`` untimed calls."""
    sign = 1.0
    for _ in range(warmup):
        fn(sign * EPS)
        sign = -sign
    times = []
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        fn(sign * EPS)
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
        sign = -sign
    return {"median_ms": statistics.median(times), "min_ms": min(times), "all_ms": times}


def _native(params: dict[str, torch.Tensor], device: torch.device) -> Callable[[float], None]:
    def run(scale: float) -> None:
        generator = torch.Generator(device=device).manual_seed(SEED)
        for name in sorted(params):
            p = params[name]
            p.add_(torch.randn(p.shape, generator=generator, device=device), alpha=scale)

    return run


def _hash(params: dict[str, torch.Tensor], **kwargs: object) -> Callable[[float], None]:
    return lambda scale: seeding.perturb_(params, SEED, scale, **kwargs)


def _first_call_s(fn: Callable[[float], None], device: torch.device) -> float:
    """Seconds of the first call (includes torch.compile's compilation, if any)."""
    start = time.perf_counter()
    fn(EPS)
    fn(-EPS)
    _sync(device)
    return time.perf_counter() - start


def _per_10m(device: torch.device, runs: int) -> dict:
    """ms per 10M samples: bare torch.randn vs bare seeding.normal_ (compiled)."""
    out = torch.empty(10_000_000, device=device)
    generator = torch.Generator(device=device).manual_seed(SEED)
    randn = _time(lambda s: torch.randn(out.shape, generator=generator, device=device, out=out),
                  device, runs, 2)
    hashed = _time(lambda s: seeding.normal_(out, SEED, compile=True), device, runs, 2)
    return {"randn_ms": randn["median_ms"], "hash_normal_compiled_ms": hashed["median_ms"]}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--skip-eager", action="store_true", help="skip the slow eager hash path")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    model = load_causal_lm(ModelConfig(name="smollm2-135m", dtype="float32")).to(device)
    params = dict(model.named_parameters())
    numel = sum(p.numel() for p in params.values())
    methods: dict[str, Callable[[float], None]] = {
        "native": _native(params, device),
        "hash_compiled": _hash(params, compile=True),
    }
    if not args.skip_eager:
        methods["hash_eager"] = _hash(params, compile=False)
    if device.type == "cuda":
        methods["torch_cuda"] = _hash(params, backend="torch-cuda")

    first = {name: _first_call_s(fn, device) for name, fn in methods.items()}
    with torch.no_grad():
        results = {name: _time(fn, device, args.runs, 1) for name, fn in methods.items()}
    native = results["native"]["median_ms"]
    report = {
        "benchmark": "one full perturbation w += eps*z over all trainable params (fp32)",
        "model": "smollm2-135m",
        "num_params": numel,
        "num_tensors": len(params),
        "device": args.device,
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "runs": args.runs,
        "results": results,
        "first_call_s": first,
        "ratio_vs_native": {k: v["median_ms"] / native for k, v in results.items()},
        "per_10m_samples": _per_10m(device, args.runs),
        "compile_fell_back": sorted(map(list, seeding._COMPILE_FAILED)),
    }
    out = args.out or ROOT / "bench" / "results" / f"perturbation-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("ratio_vs_native", "per_10m_samples")}, indent=2))
    print({k: round(v["median_ms"], 1) for k, v in results.items()}, "->", out)
    return report


if __name__ == "__main__":
    main()
