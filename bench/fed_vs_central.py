#!/usr/bin/env python3
"""Federated LoRA (real `flwr run` simulation) vs a centralized peft loop, one run.

Both train the same adapter on the same data with the same optimizer, batch size and
total number of optimizer steps (rounds x clients x local_steps), and are scored on the
same held-out split. Reported: seconds per round, bytes per round on the wire, and the
ratios, plus what the centralized alternative must upload instead (the raw training text).

    python bench/fed_vs_central.py                      # default config (SmolLM2 + bbc-news)
    python bench/fed_vs_central.py model=tiny-llama     # any Hydra overrides
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from fedpeft import cli
from fedpeft.config import FedPeftConfig, compose
from fedpeft.data import encode_dataset, load_task_data
from fedpeft.evaluation import evaluate
from fedpeft.methods import TrainContext, build_method, build_model
from fedpeft.models import get_tokenizer, resolve_device
from fedpeft.reporting import RunDir

ROOT = Path(__file__).resolve().parent.parent


def federated(overrides: list[str], out: Path) -> dict:
    run_id = f"fed-{int(time.time())}"
    t0 = time.perf_counter()
    code = cli.main(["simulate", *overrides, f"run.output_dir={out}", f"run.run_id={run_id}",
                     "--app", str(ROOT)])
    total = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"federated run failed (exit {code})")
    recs = RunDir(out / run_id).records()
    rounds = [r for r in recs if r["round"] > 0]
    return {
        "run_dir": str(out / run_id),
        "total_s": total,
        "zero_shot_accuracy": recs[0]["eval_accuracy"],
        "zero_shot_loss": recs[0]["eval_loss"],
        "final_accuracy": rounds[-1]["eval_accuracy"],
        "final_loss": rounds[-1]["eval_loss"],
        "seconds_per_round": sum(r["wall_time_s"] for r in rounds) / len(rounds),
        "eval_seconds_per_round": sum(r["eval_time_s"] or 0 for r in rounds) / len(rounds),
        "bytes_up_per_round": sum(sum(r["bytes_up"].values()) for r in rounds) / len(rounds),
        "bytes_down_per_round": sum(sum(r["bytes_down"].values()) for r in rounds) / len(rounds),
        "rounds": len(rounds),
    }


def central(cfg: FedPeftConfig) -> dict:
    steps_per_round = cfg.sim.num_clients * cfg.method.local_steps
    method = build_method(cfg.method.name, cfg.method)
    model = build_model(method, cfg.model, seed=cfg.run.seed)
    tok, data = get_tokenizer(cfg.model), load_task_data(cfg.data)
    examples = encode_dataset(data.train, tok, data.label_names, cfg.data)
    central_cfg = type(cfg.method)(**{**cfg.method.__dict__, "local_steps": steps_per_round})
    trainer = build_method(cfg.method.name, central_cfg)
    round_s = []
    for rnd in range(1, cfg.run.num_rounds + 1):
        ctx = TrainContext(server_round=rnd, partition_id=0, seed=cfg.run.seed,
                           pad_token_id=tok.pad_token_id)
        t0 = time.perf_counter()
        trainer.train(model, examples, ctx)  # the optimizer restarts each round, as on clients
        round_s.append(time.perf_counter() - t0)
    ev = evaluate(model, tok, data.test, data.label_names, cfg.data,
                  batch_size=cfg.eval.batch_size, max_examples=cfg.eval.max_examples)
    text_bytes = sum(len((t + r).encode()) for t, r in zip(data.train["text"],
                                                          data.train["response"], strict=True))
    del method
    return {"seconds_per_round": sum(round_s) / len(round_s), "final_accuracy": ev.accuracy,
            "final_loss": ev.loss, "steps_per_round": steps_per_round,
            "raw_training_text_bytes": text_bytes}


def _machine(cfg: FedPeftConfig) -> str:
    device = resolve_device(cfg.model.device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {cfg.model.dtype} base"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch " \
           "threads, CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results folder")
    p.add_argument("--name", default=None, help="result file (default: by overrides)")
    args = p.parse_args()
    out = Path(args.out)
    cfg = compose(args.overrides)
    fed = federated(args.overrides, out / "runs")
    cen = central(cfg)
    result = {
        "config_overrides": args.overrides,
        "machine": _machine(cfg),
        "federated": fed,
        "centralized": cen,
        # Both sides without held-out evaluation (the federated round time includes it).
        "ratio_seconds_per_round_fed_over_central":
            (fed["seconds_per_round"] - fed["eval_seconds_per_round"])
            / cen["seconds_per_round"],
        "ratio_bytes_per_round_over_raw_text":
            (fed["bytes_up_per_round"] + fed["bytes_down_per_round"])
            / cen["raw_training_text_bytes"],
    }
    name = args.name or "fed_vs_central" + ("" if not args.overrides else "-custom") + ".json"
    (out / name).write_text(json.dumps(result, indent=2))
    shutil.copy(Path(fed["run_dir"]) / "metrics.jsonl", out / name.replace(".json", ".jsonl"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
