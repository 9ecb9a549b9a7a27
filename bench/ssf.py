#!/usr/bin/env python3
"""SSF pools against a single SSF and LoRA on strongly non-IID bbc-news.

One federation per point (``fedpeft simulate``: bundled SmolLM2-135M, ``--clients``
clients, Dirichlet ``--alpha`` label skew, FedAvg, ``--rounds`` rounds, equal for every
method): ``ssf_pool``, ``ssf``, ``lora`` and ``ssf_pool`` with ComPEFT. Per point:

- held-out accuracy of the final global model (all 60 test articles), and per client on
  that client's own label mix (per-label accuracy weighted by the client's label shares);
- uplink bytes per round (framed, summed over clients) and trainable parameters;
- for pools: which entries each topic's test articles selected (top-1 counts), each
  client's top-1 entry shares on its own training data and the pairwise overlap of those
  shares (does averaging combine entries that different clients use for different data?).

``--reuse`` re-analyses the runs recorded in ``--out`` without training again.

Every number comes from the runs this script starts; results go to
``bench/results/ssf.json`` (``--out``).

    python bench/ssf.py --rounds 5 --clients 8 --alpha 0.1
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from runs import ROOT, simulate

from fedpeft.config import compose
from fedpeft.data import load_task_data, partition_rows
from fedpeft.evaluation import label_scores
from fedpeft.methods import build_method, build_model
from fedpeft.models import get_tokenizer
from fedpeft.reporting import RunDir

POINTS = {"ssf_pool": ["method=ssf_pool"], "ssf": ["method=ssf"], "lora": ["method=lora"],
          "ssf_pool+compeft": ["method=ssf_pool", "compression=compeft"],
          # ablation: no key-matching term, so the keys stay at their random init
          "ssf_pool-fixed-keys": ["method=ssf_pool", "method.pool.key_weight=0"]}
DEFAULT_POINTS = ["ssf_pool", "ssf", "lora", "ssf_pool+compeft"]


def common(args: argparse.Namespace) -> list[str]:
    return [f"sim.num_clients={args.clients}", f"data.partition.alpha={args.alpha}",
            f"run.num_rounds={args.rounds}", f"model={args.model}"]


def final_model(overrides: list[str], run_dir: Path):
    """The run's final global model (latest checkpoint), its method and config."""
    cfg = compose(overrides)
    method = build_method(cfg.method.name, cfg.method)
    model = build_model(method, cfg.model, seed=cfg.run.seed, data_cfg=cfg.data)
    _, path = RunDir(run_dir).latest_checkpoint()
    method.load(model, path)
    return cfg, method, model


def per_client(cfg, model, clients: int) -> dict:
    """Accuracy per label on the held-out split, then per client on its own label mix."""
    tok, data = get_tokenizer(cfg.model), load_task_data(cfg.data)
    model.eval()
    pred = label_scores(model, tok, list(data.test["text"]), data.label_names,
                        cfg.data).argmax(dim=1).numpy()
    truth = np.asarray(data.test["label"])
    per_label = [float((pred[truth == c] == c).mean()) for c in range(len(data.label_names))]
    train = np.asarray(data.train["label"])
    mixes, accs = [], []
    for pid in range(clients):
        counts = np.bincount(train[partition_rows(data.train, cfg.data.partition, clients,
                                                  pid)], minlength=len(per_label))
        mixes.append((counts / counts.sum()).round(3).tolist())
        accs.append(float(np.dot(counts / counts.sum(), per_label)))
    return {"global_accuracy": float((pred == truth).mean()), "per_label": per_label,
            "client_label_mix": mixes, "client_accuracy": accs,
            "client_accuracy_mean": float(np.mean(accs)),
            "client_accuracy_min": float(np.min(accs))}


@torch.inference_mode()
def entry_usage(cfg, model) -> dict:
    """Top-1 entry of each held-out article, counted per topic."""
    from fedpeft.data import collate, encode_dataset

    tok, data = get_tokenizer(cfg.model), load_task_data(cfg.data)
    enc = encode_dataset(data.test, tok, data.label_names, cfg.data)
    batch = collate(enc, tok.pad_token_id)
    _, idx, _ = model.choose(batch["input_ids"], batch["attention_mask"], batch["labels"])
    usage: dict[str, Counter] = {n: Counter() for n in data.label_names}
    for label, top in zip(data.test["label"], idx[:, 0].tolist(), strict=True):
        usage[data.label_names[label]][top] += 1
    return {k: dict(v.most_common()) for k, v in usage.items()}


@torch.inference_mode()
def client_usage(cfg, model, clients: int) -> dict:
    """Per client: the share of its training examples whose top-1 entry is each entry,
    and the overlap of every two clients' usage (sum of min shares: 1 = same entries)."""
    from fedpeft.data import collate, encode_dataset

    tok, data = get_tokenizer(cfg.model), load_task_data(cfg.data)
    shares = []
    for pid in range(clients):
        rows = partition_rows(data.train, cfg.data.partition, clients, pid)
        enc = encode_dataset(data.train.select(rows), tok, data.label_names, cfg.data)
        top = torch.cat([model.choose(**_ids(collate(enc[i:i + 64], tok.pad_token_id)))[1][:, 0]
                         for i in range(0, len(enc), 64)])
        shares.append(np.bincount(top.numpy(), minlength=cfg.method.pool.entries) / len(top))
    overlap = [[float(np.minimum(a, b).sum()) for b in shares] for a in shares]
    return {"client_top1_share": [np.round(x, 3).tolist() for x in shares],
            "client_overlap": np.round(overlap, 3).tolist()}


def _ids(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def run_point(name: str, args: argparse.Namespace, out: Path) -> dict:
    overrides = POINTS[name] + common(args)
    row = _reused(args, name) or simulate(overrides, out, name.replace("+", "-"))
    cfg, method, model = final_model(overrides, out / row["run_id"])
    row.update(name=name, trainable_params=int(sum(v.size for v in
                                                   method.get_state(model).values())))
    row["uplink_bytes_per_round"] = row["total_bytes_up"] / max(row["rounds"] or 1, 1)
    row.update(per_client(cfg, model, args.clients))
    if cfg.method.name == "ssf_pool":
        row["entry_usage_top1"] = entry_usage(cfg, model)
        row.update(client_usage(cfg, model, args.clients))
    return row


def _reused(args: argparse.Namespace, name: str) -> dict | None:
    """With ``--reuse``, the finished run of ``name`` recorded in ``--out`` (re-analysed,
    not re-trained)."""
    return next(({k: r[k] for k in _SIM_KEYS if k in r} for r in args.previous
                 if r["name"] == name), None)


_SIM_KEYS = ("overrides", "run_id", "exit", "seconds", "rounds", "eval_accuracy", "eval_loss",
             "epsilon_rdp", "epsilon_prv", "total_bytes_up", "payload_bytes_up",
             "total_bytes_down", "total_payload_bytes_up", "total_payload_bytes_down",
             "status")


def table(result: dict) -> str:
    """The README table of a result: one line per point."""
    clients = result["args"]["clients"]
    lines = ["| method | held-out acc. | per-client acc. mean / min | uplink per round "
             f"({clients} clients) | vs LoRA | trainable params |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['global_accuracy']:.3f} | "
                     f"{r['client_accuracy_mean']:.3f} / {r['client_accuracy_min']:.3f} | "
                     f"{r['uplink_bytes_per_round'] / 2**20:.2f} MiB | "
                     f"{r.get('uplink_vs_lora', float('nan')):.3f}x | "
                     f"{r['trainable_params']:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--points", nargs="*", default=DEFAULT_POINTS, choices=list(POINTS))
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-ssf")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ssf.json")
    p.add_argument("--reuse", action="store_true",
                   help="re-analyse the runs recorded in --out instead of training again")
    p.add_argument("--table", action="store_true", help="print --out as a table and stop")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return {}
    args.previous = (json.loads(args.out.read_text())["rows"]
                     if args.reuse and args.out.is_file() else [])
    t0, rows = time.time(), []
    for name in args.points:
        rows.append(run_point(name, args, args.runs))
        _write(args, rows, t0)
        print(json.dumps({k: rows[-1][k] for k in ("name", "global_accuracy",
                          "client_accuracy_mean", "uplink_bytes_per_round",
                          "trainable_params", "seconds")}), flush=True)
    result = _write(args, rows, t0)
    print(table(result))
    return result


def _write(args: argparse.Namespace, rows: list[dict], t0: float) -> dict:
    lora = next((r for r in rows if r["name"] == "lora"), None)
    for r in rows:
        if lora:
            r["uplink_vs_lora"] = r["uplink_bytes_per_round"] / lora["uplink_bytes_per_round"]
    result = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads (CPU)",
              "args": {k: str(v) for k, v in vars(args).items() if k != "previous"},
              "wall_s": time.time() - t0, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
