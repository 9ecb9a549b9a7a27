#!/usr/bin/env python3
"""Peak memory of FedKSeed local training vs a forward-only pass vs first-order training.

Each mode runs in a fresh subprocess on the bundled SmolLM2-135M (all 134.5M parameters
trainable for FedKSeed and for the AdamW baseline), batch 1 x 64 tokens of bbc-news, and
reports the process's peak RSS. FedKSeed perturbs weights in place, so its peak should be
the forward pass's; full-parameter AdamW (what FedAvg fine-tuning would run) needs
gradients and two moment buffers on top.

    python bench/fedkseed_memory.py [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _batch():
    from fedpeft.data import DataConfig, collate, encode_dataset, load_task_data
    from fedpeft.models import ModelConfig, get_tokenizer

    dcfg = DataConfig(max_input_tokens=48)
    data = load_task_data(dcfg)
    tok = get_tokenizer(ModelConfig())
    enc = encode_dataset(data.train.select(range(1)), tok, data.label_names, dcfg)
    return collate(enc, tok.pad_token_id)


def child(mode: str, steps: int) -> dict:
    import numpy as np
    import torch

    from fedpeft.methods.fedkseed import (
        FedKSeedConfig,
        candidate_seeds,
            zo_train,
    )
    from fedpeft.methods.replay import trainable_params
    from fedpeft.models import ModelConfig, load_causal_lm

    model, batch = load_causal_lm(ModelConfig()), _batch()
    t0 = time.perf_counter()
    if mode == "forward":
        with torch.no_grad():
            for _ in range(steps):
                model(**batch)
    elif mode == "fedkseed":
        cfg = FedKSeedConfig(local_steps=steps)
        params = trainable_params(model, "all")
        zo_train(params, lambda _: float(model(**batch).loss), candidate_seeds(0, 4096), cfg,
                 np.random.default_rng(0))
    else:  # full-parameter first-order AdamW
        for p in model.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        for _ in range(steps):
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
    seconds = (time.perf_counter() - t0) / steps
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "peak_rss_mib": peak_mib, "seconds_per_step": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--child", default=None)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    rows = {}
    for mode in ("forward", "fedkseed", "adamw-full"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--steps",
                              str(args.steps)], capture_output=True, text=True, check=True)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(rows[mode], flush=True)
    fwd = rows["forward"]["peak_rss_mib"]
    result = {"device": "CPU (2 cores), SmolLM2-135M fp32, batch 1x~70 tokens",
              "steps": args.steps, "rows": rows,
              "ratio_fedkseed_over_forward": rows["fedkseed"]["peak_rss_mib"] / fwd,
              "ratio_adamw_over_forward": rows["adamw-full"]["peak_rss_mib"] / fwd}
    (ROOT / "bench" / "results" / "fedkseed_memory-cpu.json").write_text(
        json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
