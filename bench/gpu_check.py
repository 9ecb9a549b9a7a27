#!/usr/bin/env python3
"""The GPU check in one command: CUDA tests, then the GPU benchmarks, results named by device.

``bash scripts/dev.sh gpu-check`` runs this. With a CUDA device it runs, in order, each
step below with its own time limit, and writes ``bench/results/gpu-check-cuda.json``
(device name, torch/CUDA versions, each step's exit code, seconds and output tail) next
to the steps' own ``*-cuda.json`` files. A step whose prerequisites are missing (Flower
or Ray for the simulations) is recorded as skipped with the reason, never as passed.
Without CUDA it says so, lists the steps it would run, and exits 0: CI runs that mode.

    python bench/gpu_check.py            # exit 1 if any step that ran failed
    python bench/gpu_check.py --list     # the steps, without running them
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
SIM = ["model=smollm2-135m", "model.device=cuda", "model.dtype=bfloat16"]


@dataclass(frozen=True)
class Step:
    """One command of the check, what it needs importable, and its time limit."""

    name: str
    argv: list[str]
    needs: tuple[str, ...] = ()
    timeout_s: int = 600


STEPS = [
    Step("cuda-tests", [PY, "-m", "pytest", "-q", "-rs", "tests/unit/test_cuda.py",
                        "tests/unit/test_seeding.py", "-k", "cuda"], ("pytest", "flwr")),
    Step("perturbation", [PY, "bench/perturbation.py", "--device", "cuda", "--skip-eager"]),
    Step("methods", [PY, "bench/device_methods.py", "--device", "cuda"]),
    Step("demo", [PY, "-m", "fedpeft.cli", "simulate", *SIM, "sim.client_gpus=0.25",
                  "run.output_dir=bench/results/runs"], ("flwr", "ray")),
    Step("fed-vs-central", [PY, "bench/fed_vs_central.py", *SIM, "sim.client_gpus=0.25",
                            "--name", "fed_vs_central-cuda.json"], ("flwr", "ray")),
    Step("scale", [PY, "bench/scale.py", "--model", "smollm2-135m", "--device", "cuda",
                   "--client-gpus", "0.1", "--clients", "1000", "--sampled", "16",
                   "--out", "bench/results/scale-cuda.json"], ("flwr", "ray"), 1200),
]


def missing(step: Step) -> list[str]:
    """Modules a step needs that this interpreter cannot import."""
    return [m for m in step.needs if importlib.util.find_spec(m) is None]


def run(step: Step) -> dict:
    """Run one step; a missing prerequisite is a skip with its reason."""
    lacking = missing(step)
    if lacking:
        return {"step": step.name, "status": "skipped", "reason": f"not installed: {lacking}"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(step.argv, cwd=ROOT, capture_output=True, text=True,
                              timeout=step.timeout_s)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = 124, f"timed out after {step.timeout_s}s\n{exc.stdout or ''}{exc.stderr or ''}"
    status = "passed" if rc == 0 else "failed"
    return {"step": step.name, "status": status, "rc": rc, "argv": step.argv[1:],
            "seconds": round(time.perf_counter() - t0, 1), "tail": out[-3000:]}


def no_cuda_message() -> str:
    return (f"gpu-check: no CUDA device here (torch {torch.__version__}, "
            f"torch.cuda.is_available()={torch.cuda.is_available()}); nothing measured, "
            "and the GPU numbers stay owed. On a CUDA machine it runs: "
            + ", ".join(s.name for s in STEPS))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="print the steps and exit")
    ap.add_argument("--only", nargs="+", choices=[s.name for s in STEPS])
    args = ap.parse_args(argv)
    steps = [s for s in STEPS if not args.only or s.name in args.only]
    if args.list or not torch.cuda.is_available():
        print(no_cuda_message() if not torch.cuda.is_available() else "gpu-check steps:")
        for s in steps:
            lacking = missing(s)
            print(f"  {s.name:15s} {' '.join(s.argv[1:])}"
                  + (f"  [would skip: not installed {lacking}]" if lacking else ""))
        return 0
    results = []
    for step in steps:
        results.append(run(step))
        print(f"gpu-check: {step.name}: {results[-1]['status']}", flush=True)
    write_report(results)
    return 1 if any(r["status"] == "failed" for r in results) else 0


def write_report(results: list[dict]) -> Path:
    report = {"device_name": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "cuda": torch.version.cuda, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                time.gmtime()),
              "steps": results}
    out = RESULTS / "gpu-check-cuda.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
