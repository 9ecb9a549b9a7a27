"""1000 virtual clients on one machine: seconds per round and per-client overhead.

Runs ``fedpeft simulate`` (real Flower simulation: SuperLink + Ray, tiny model, iid
partitions) with ``--clients`` virtual clients and 8, 64 and 256 of them sampled per round,
and reports for the rounds after the first (which includes the workers' start-up):

- seconds per round (server evaluation is off, ``eval.every=0``);
- per-client overhead beyond its own training: the client slots' busy time
  (``(round wall - server aggregate/apply) x workers``) over the clients' summed training
  time (``client_train_s`` x sampled), minus 1;
- peak RSS per simulation worker (Ray ``ClientAppActor`` processes, sampled every 0.5 s).

Usage::

    python bench/scale.py --clients 1000 --sampled 8 64 256 --rounds 3 \
        --out bench/results/scale-cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


class RssSampler(threading.Thread):
    """Peak RSS (MiB) of every Ray client actor seen while it runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak: dict[int, float] = {}
        self.gpu_peak_mib = 0.0  # all processes on the GPU together (nvidia-smi), if any
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.gpu_peak_mib = max(self.gpu_peak_mib, _gpu_used_mib())
            for p in psutil.process_iter(["pid", "cmdline"]):
                cmd = " ".join(p.info.get("cmdline") or [])
                if "ClientAppActor" in cmd:
                    try:
                        rss = p.memory_info().rss / 2**20
                    except psutil.Error:
                        continue
                    self.peak[p.pid] = max(self.peak.get(p.pid, 0.0), rss)
            time.sleep(0.5)


def _gpu_used_mib() -> float:
    """Memory used by compute processes on the GPUs, from nvidia-smi (0 without one)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0.0
    return float(sum(float(x) for x in out.split() if x.strip().isdigit()))


def simulate(k: int, args: argparse.Namespace) -> dict:
    """One run with ``k`` of ``args.clients`` sampled per round."""
    run_id = f"scale-{args.clients}-{k}-{int(time.time())}"
    overrides = [f"model={args.model}", f"model.device={args.device}",
                 f"model.dtype={args.dtype}", "data.partition.type=iid", "data.test_size=20",
                 f"sim.num_clients={args.clients}", f"sim.client_cpus={args.client_cpus}",
                 f"sim.client_gpus={args.client_gpus}",
                 f"strategy.fraction_train={k / args.clients}", f"strategy.min_train_nodes={k}",
                 f"strategy.min_available_nodes={args.clients}", f"run.num_rounds={args.rounds}",
                 "eval.every=0", "run.checkpoint=false", "method.local_steps=2",
                 "method.batch_size=2", f"run.output_dir={args.runs}", f"run.run_id={run_id}"]
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedpeft.cli", "simulate", *overrides], check=True,
                   cwd=ROOT)
    wall = time.perf_counter() - t0
    sampler.done.set()
    lines = (Path(args.runs) / run_id / "metrics.jsonl").read_text().splitlines()
    row = summarize(k, [json.loads(x) for x in lines], sampler.peak, wall, args)
    row["gpu_peak_mib"] = sampler.gpu_peak_mib or None
    return row


def summarize(k: int, records: list[dict], peak: dict[int, float], wall: float,
              args: argparse.Namespace) -> dict:
    """Rounds 2.. only: round 1 includes starting the workers and loading the model."""
    later = [r for r in records if r["round"] >= 2]
    workers = max(1, len(peak))
    busy = [(r["wall_time_s"] - (r["server_aggregate_s"] or 0) - (r["server_apply_s"] or 0))
            * workers for r in later]
    train = [r["client_train_s"] * r["num_clients"] for r in later]
    return {"sampled": k, "clients": args.clients, "workers": workers,
            "accepted_per_round": [r["num_clients"] for r in records if r["round"] >= 1],
            "s_per_round": statistics.median(r["wall_time_s"] for r in later),
            "clients_per_hour": 3600 * k / statistics.median(r["wall_time_s"] for r in later),
            "client_train_s_mean": statistics.median(r["client_train_s"] for r in later),
            "overhead_ratio": statistics.median(b / t - 1 for b, t in zip(busy, train,
                                                                          strict=True)),
            "peak_rss_mib_per_worker": round(max(peak.values()), 1) if peak else None,
            "run_wall_s": wall}


def _machine(args: argparse.Namespace) -> str:
    import os

    import torch

    if args.client_gpus > 0 and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"{os.cpu_count()}-core CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--sampled", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--client-cpus", type=int, default=1)
    p.add_argument("--client-gpus", type=float, default=0.0)
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--runs", default=str(ROOT / "bench" / "results" / "runs"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale-cpu.json"))
    args = p.parse_args()
    rows = [simulate(k, args) for k in args.sampled]
    Path(args.out).write_text(json.dumps({"machine": _machine(args), "model": args.model,
                                          "rows": rows}, indent=2))
    print("| sampled / clients | s per round | client train s | overhead beyond training "
          "| peak RSS per worker |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sampled']} / {r['clients']} | {r['s_per_round']:.1f} | "
              f"{r['client_train_s_mean']:.3f} | {100 * r['overhead_ratio']:.0f}% | "
              f"{r['peak_rss_mib_per_worker']} MiB |")


if __name__ == "__main__":
    main()
