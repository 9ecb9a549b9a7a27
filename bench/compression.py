#!/usr/bin/env python3
"""Compression benchmarks: codec sizes on real LoRA updates, and a federated comparison.

Parts (``--parts``, all by default):

- ``codec``: LoRA (r=8 on q/k/v/o) trains ``--steps`` local steps on two bbc-news
  partitions of the bundled SmolLM2-135M; each real update is encoded by ComPEFT at each
  ``--densities`` value and by the baselines. Reported per codec: bytes, ratio to fp32
  dense (4n bytes) and to 16-bit dense (2n), and for ComPEFT the ratio to the entropy
  bound n·H(p) + k bits (positions of a random k-subset, plus one sign bit each), headers
  included; encode and decode seconds.
- ``federated``: the default federation (``fedpeft simulate``: 4 clients, Dirichlet 0.5,
  LoRA, FedAvg) for ``--rounds`` rounds: uncompressed, ComPEFT at each density with and
  without error feedback, 8-bit quantisation and float top-k at 10%, and ComPEFT at 10%
  with error feedback and compressed broadcasts, and with STC's scale (``--points`` runs
  some). Reported: held-out
  accuracy and loss, total bytes up and down (framed and payload), and the ratios to the
  uncompressed run. The comparison report of these runs (``fedpeft report``) is
  written to ``bench/results/compression-report/``.

Every number comes from the runs this script starts; results go to
``bench/results/compression.json`` (``--out``).

    python bench/compression.py --parts codec --densities 0.01 0.05 0.1 0.2
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from runs import ROOT, simulate

from fedpeft.compression import build_compressor
from fedpeft.config import compose
from fedpeft.data import encode_dataset, load_task_data, partition_rows
from fedpeft.methods import TrainContext, build_method, build_model
from fedpeft.models import get_tokenizer
from fedpeft.report import write_report


def lora_updates(model: str, steps: int, clients: int) -> list[dict[str, np.ndarray]]:
    """Real LoRA deltas: ``steps`` local steps on each of the first ``clients`` partitions
    of the default federation (each from the same initial adapter)."""
    cfg = compose(f"model={model} method.local_steps={steps}")
    method = build_method(cfg.method.name, cfg.method)
    net = build_model(method, cfg.model, seed=0)
    start = method.get_state(net)
    tok, data = get_tokenizer(cfg.model), load_task_data(cfg.data)
    out = []
    for pid in range(clients):
        rows = partition_rows(data.train, cfg.data.partition, cfg.sim.num_clients, pid)
        examples = encode_dataset(data.train.select(rows), tok, data.label_names, cfg.data)
        method.set_state(net, start)
        ctx = TrainContext(1, pid, 0, tok.pad_token_id)
        out.append(dict(method.train(net, examples, ctx).update.deltas))
    return out


def entropy_bound_bytes(n: int, k: int) -> float:
    """n·H(k/n) + k bits, in bytes: the cost of an unstructured k-subset plus signs."""
    p = k / n
    h = 0.0 if p in (0, 1) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    return (n * h + k) / 8


def codec_row(spec: str, deltas: dict[str, np.ndarray]) -> dict:
    """Bytes and times of one codec (``spec``: compose overrides) on one update."""
    codec = build_compressor(compose(spec).compression)
    n = sum(v.size for v in deltas.values())
    t0 = time.perf_counter()
    blob = codec.encode(deltas)
    t1 = time.perf_counter()
    codec.decode(blob, {k: v.shape for k, v in deltas.items()})
    row = {"codec": spec, "n": n, "bytes": len(blob), "fp32_ratio": 4 * n / len(blob),
           "fp16_ratio": 2 * n / len(blob), "encode_s": t1 - t0,
           "decode_s": time.perf_counter() - t1}
    if "compeft" in spec:
        k = int(np.count_nonzero(np.concatenate([v.ravel() for v in
                                                 codec.roundtrip(deltas).values()])))
        row.update(kept=k, bound_bytes=entropy_bound_bytes(n, k),
                   over_bound=len(blob) / entropy_bound_bytes(n, k))
    return row


def codec_part(args: argparse.Namespace) -> list[dict]:
    specs = [f"compression=compeft compression.density={d}" for d in args.densities]
    specs += ["compression=quantize", "compression=quantize compression.bits=4",
              "compression=topk compression.density=0.1"]
    rows = []
    for client, deltas in enumerate(lora_updates(args.model, args.steps, args.clients)):
        rows += [{"client": client, **codec_row(s, deltas)} for s in specs]
    return rows


def federated_grid(args: argparse.Namespace) -> list[list[str]]:
    """Uncompressed; ComPEFT at each density without and with error feedback; the
    baselines; ComPEFT at 10% with error feedback up and compressed broadcasts down; and
    ComPEFT at 10% with error feedback and STC's scale (mean |τ| of the kept entries)."""
    grid = [["compression=identity"]]
    grid += [["compression=compeft", f"compression.density={d}",
              f"compression.error_feedback={ef}"] for d in args.fed_densities
             for ef in ("false", "true")]
    grid += [["compression=quantize"], ["compression=topk", "compression.density=0.1"]]
    ef10 = ["compression=compeft", "compression.density=0.1", "compression.error_feedback=true"]
    return [*grid, [*ef10, "compression.downlink=true"], [*ef10, "compression.scale=kept_mean"]]


def federated_part(args: argparse.Namespace, done: list[dict]) -> list[dict]:
    """Run the grid points ``--points`` (default all); rows of earlier runs of the other
    points are kept, so a point can be added or rerun alone."""
    runs = args.out.parent / "runs"
    base = [f"model={args.model}", f"run.num_rounds={args.rounds}", "run.checkpoint=false"]
    grid = federated_grid(args)
    rows = {json.dumps(r["overrides"][len(base):]): r for r in done}
    for i in args.points if args.points is not None else range(len(grid)):
        rows[json.dumps(grid[i])] = simulate([*base, *grid[i]], runs, f"comp-{i}")
    ordered = [rows[json.dumps(g)] for g in grid if json.dumps(g) in rows]
    for row in ordered:
        row.update(_ratios(row, ordered[0]))
    for row in ordered:
        row["label"] = label(row["overrides"][len(base):])
    write_report([runs / r["run_id"] for r in ordered], args.out.parent / "compression-report",
                 title="Compression on bbc-news (SmolLM2-135M, LoRA, 4 clients)",
                 labels=[r["label"] for r in ordered])
    return ordered


def label(point: list[str]) -> str:
    """Short name of a grid point, e.g. ``compeft 10% +EF +down``."""
    opts = dict(o.split("=", 1) for o in point)
    name = opts.pop("compression")
    text = {"identity": "dense fp32", "quantize": "quantize 8-bit"}.get(name, name)
    if "compression.density" in opts:
        text += f" {float(opts.pop('compression.density')) * 100:g}%"
    flags = {"compression.error_feedback": "+EF", "compression.downlink": "+down"}
    text += "".join(f" {v}" for k, v in flags.items() if opts.get(k) == "true")
    return text + (" STC scale" if opts.get("compression.scale") == "kept_mean" else "")


def _ratios(row: dict, dense: dict) -> dict:
    return {"uplink_payload_ratio": dense["total_payload_bytes_up"]
            / row["total_payload_bytes_up"],
            "uplink_framed_ratio": dense["total_bytes_up"] / row["total_bytes_up"],
            "downlink_framed_ratio": dense["total_bytes_down"] / row["total_bytes_down"],
            "accuracy_gap": dense["eval_accuracy"] - row["eval_accuracy"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["codec", "federated"],
                    choices=["codec", "federated"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.2])
    ap.add_argument("--fed-densities", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--points", type=int, nargs="+", default=None,
                    help="federated grid points to run (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compression.json")
    args = ap.parse_args(argv)
    report: dict = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch "
                               "threads, CPU", "parts": {}}
    if args.out.exists():  # parts run separately accumulate in one file
        report["parts"] = json.loads(args.out.read_text()).get("parts", {})
    for part in args.parts:
        report["parts"][part] = (codec_part(args) if part == "codec" else
                                 federated_part(args, report["parts"].get(part, [])))
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(part, json.dumps(report["parts"][part], indent=1)[:3000], flush=True)
    return report


if __name__ == "__main__":
    main()
