#!/usr/bin/env python3
"""Privacy benchmarks: DP-SGD's step cost, and held-out quality against ε, in one run.

Parts (``--parts``, all by default):

- ``step``: LoRA on ``--model`` (bbc-news, r=8 on q/k/v/o, batch 4): seconds per local
  step without privacy and with DP-SGD (Opacus hooks), same process, same examples; ratio.
- ``sample``: the default federation (``fedpeft simulate``: 4 clients, Dirichlet 0.5,
  LoRA) without privacy and with ``privacy=dpsgd`` at each ``--eps`` target: held-out
  accuracy and loss after ``--rounds`` rounds, and the worst client's reported ε.
- ``client``: ``privacy=client`` with ``--clients`` simulated clients (Poisson rate
  ``--client-rate``) at each target, and without privacy.
- ``dpzo``: FedKSeed (tuning the q_proj weights) with ``privacy=dpzo`` at the last
  target, and without privacy.

Every number comes from the runs this script starts; results go to
``bench/results/privacy.json`` (``--out``), with the exact overrides of each run.

    python bench/privacy.py --parts step sample --eps 1 3 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from runs import simulate  # bench/runs.py (the script's own directory is on sys.path)

from fedpeft.config import compose
from fedpeft.data import encode_dataset, load_task_data
from fedpeft.methods import TrainContext, build_method, build_model
from fedpeft.models import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def step_time(args: argparse.Namespace) -> dict:
    """Median seconds per local step, plain vs DP-SGD, on the same model and data."""
    out = {}
    for label, extra in (("plain", ""), ("dpsgd", " privacy=dpsgd")):
        cfg = compose(f"model={args.model} method.local_steps={args.steps}{extra}")
        method = build_method(cfg.method.name, cfg.method)
        model = build_model(method, cfg.model, seed=0)
        tok, data = get_tokenizer(cfg.model), load_task_data(cfg.data)
        examples = encode_dataset(data.train.select(range(400)), tok, data.label_names,
                                  cfg.data)
        privacy = cfg.privacy if cfg.privacy.name != "none" else None
        times = []
        for rnd in range(args.repeats + 1):  # the first round warms up
            ctx = TrainContext(rnd + 1, 0, 0, tok.pad_token_id, privacy=privacy, num_rounds=1)
            t0 = time.perf_counter()
            method.train(model, examples, ctx)
            times.append((time.perf_counter() - t0) / args.steps)
        out[label] = statistics.median(times[1:])
    out["ratio_dpsgd_over_plain"] = out["dpsgd"] / out["plain"]
    return out


def sweep(base: list[str], private: list[str], eps: list[float], out: Path,
          tag: str) -> list[dict]:
    """Without privacy, then at each target ε."""
    rows = [{"target_epsilon": None, **simulate(base, out, f"{tag}-none")}]
    for e in eps:
        rows.append({"target_epsilon": e, **simulate([*base, *private,
                                                 f"privacy.target_epsilon={e}"],
                                                out, f"{tag}-{e:g}")})
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["step", "sample", "client", "dpzo"],
                    choices=["step", "sample", "client", "dpzo"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--client-rate", type=float, default=0.5)
    ap.add_argument("--client-model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "privacy.json")
    args = ap.parse_args(argv)
    runs = args.out.parent / "runs"
    common = [f"model={args.model}", f"run.num_rounds={args.rounds}", "run.checkpoint=false"]
    report: dict = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch "
                               "threads, CPU", "parts": {}}
    if args.out.exists():  # parts run separately accumulate in one file
        report["parts"] = json.loads(args.out.read_text()).get("parts", {})
    jobs = {
        "step": lambda: step_time(args),
        "sample": lambda: sweep(common, ["privacy=dpsgd"], args.eps, runs, "dpsgd"),
        "client": lambda: sweep(
            [f"model={args.client_model}", f"run.num_rounds={args.rounds}",
             "run.checkpoint=false", f"sim.num_clients={args.clients}", "sim.client_cpus=1",
             "data.partition.type=iid", "run.max_empty_rounds=3"],
            ["privacy=client", f"privacy.sample_rate={args.client_rate}"], args.eps, runs,
            "client"),
        "dpzo": lambda: sweep(
            [*common, "method=fedkseed", "strategy=fedkseed", "method.local_steps=20",
             "method.num_seeds=1024", "method.trainable=q_proj", "method.batch_size=4",
             "method.lr=1e-5"], ["privacy=dpzo"], [args.eps[-1]], runs, "dpzo"),
    }
    for part in args.parts:
        report["parts"][part] = jobs[part]()
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(part, json.dumps(report["parts"][part], indent=1)[:2000], flush=True)
    return report


if __name__ == "__main__":
    main()
