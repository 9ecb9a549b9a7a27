#!/usr/bin/env python3
"""Every method on one device and precision: seconds per local round, peak memory, replay.

For each method (``lora``, ``dora``, ``ia3``, ``fedkseed`` over LoRA, ``ferret``) and each
base precision, one process builds the model with ``build_model`` on ``--device``, runs a
warm-up round and then timed local rounds on bbc-news, and (seed methods) times the
server's replay of the round's update. Reported per row: seconds per round, seconds per
local step, peak accelerator memory (CUDA) or peak RSS (CPU), and the bf16/fp32 ratio.
Flower is not needed, so it runs where only torch/transformers/peft are installed.

    python bench/device_methods.py --device cuda          # -> bench/results/methods-cuda.json
    python bench/device_methods.py --device cpu --model tiny-llama --rounds 1
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from fedpeft.data import DataConfig, encode_dataset, load_task_data
from fedpeft.methods import TrainContext, build_method, build_model
from fedpeft.methods.fedkseed import FedKSeedConfig
from fedpeft.methods.ferret import FerretConfig
from fedpeft.methods.lora import LoraConfig
from fedpeft.models import ModelConfig, get_tokenizer, resolve_device

ROOT = Path(__file__).resolve().parents[1]
LORA_QV = {"peft_type": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
METHODS = {
    "lora": lambda s: LoraConfig(local_steps=s),
    "dora": lambda s: LoraConfig(adapter={**LORA_QV, "use_dora": True}, local_steps=s),
    "ia3": lambda s: LoraConfig(adapter={"peft_type": "ia3"}, local_steps=s),
    "fedkseed": lambda s: FedKSeedConfig(local_steps=4 * s, adapter=LORA_QV, lr=1e-4),
    "ferret": lambda s: FerretConfig(local_steps=s, trainable="self_attn"),
}


def one(name: str, dtype: str, args: argparse.Namespace, examples: list, pad: int) -> dict:
    """Warm-up round, then ``args.rounds`` timed rounds of ``name`` in ``dtype``."""
    cfg = METHODS[name](args.steps)
    method = build_method(cfg.name, cfg)
    model_cfg = ModelConfig(name=args.model, dtype=dtype, device=args.device)
    model = build_model(method, model_cfg, seed=0)
    device = resolve_device(args.device)
    ctx = TrainContext(server_round=1, partition_id=0, seed=0, pad_token_id=pad)
    method.train(model, examples, ctx)  # warm-up: kernels, allocator, compiled generators
    _reset_peak(device)
    times, result = [], None
    for rnd in range(args.rounds):
        t0 = _sync(device)
        result = method.train(model, examples, TrainContext(rnd + 2, 0, 0, pad))
        times.append(_sync(device) - t0)
    row = {"method": name, "dtype": dtype, "s_per_round": sorted(times)[len(times) // 2],
           "local_steps": getattr(cfg, "local_steps", None), "peak_mib": _peak_mib(device),
           "train_loss": result.metrics.get("train_loss") if result else None}
    row["s_per_step"] = row["s_per_round"] / row["local_steps"]
    if getattr(method, "replays", False) and result is not None:
        row["replay_s"] = _replay_s(method, model, result.update, device)
    return row


def _replay_s(method, model, update, device: torch.device) -> float:
    if hasattr(update, "indices"):
        arrays = {"idx": update.indices, "vals": update.values}
    else:
        from fedpeft.methods.ferret import Contribution, encode_round

        arrays = encode_round([Contribution(update.seed, 1.0, update.counts, update.gammas)])
    t0 = _sync(device)
    method.apply_global(model, arrays)
    return _sync(device) - t0


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = resolve_device(args.device)  # fails here, clearly, without CUDA
    tok = get_tokenizer(ModelConfig(name=args.model))
    data_cfg = DataConfig(max_examples=512)
    data = load_task_data(data_cfg)
    examples = encode_dataset(data.train, tok, data.label_names, data_cfg)
    rows = [one(m, d, args, examples, tok.pad_token_id) for m in args.methods for d in args.dtypes]
    report = {"benchmark": "local rounds per method on one device", "model": args.model,
              "device": str(device), "device_name": _device_name(device),
              "torch": torch.__version__, "rows": rows, "bf16_vs_fp32": _ratios(rows)}
    out = args.out or ROOT / "bench" / "results" / f"methods-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for r in rows:
        print(f"{r['method']:9s} {r['dtype']:9s} {r['s_per_round']:.3f} s/round "
              f"{r['peak_mib']:.0f} MiB")
    return report


def _ratios(rows: list[dict]) -> dict[str, float]:
    by = {(r["method"], r["dtype"]): r["s_per_round"] for r in rows}
    return {m: by[(m, "bfloat16")] / by[(m, "float32")] for m, d in by
            if d == "float32" and (m, "bfloat16") in by}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


if __name__ == "__main__":
    main()
