#!/usr/bin/env python3
"""What SecAgg+ costs per round: LoRA updates of the bundled SmolLM2-135M, 4/16/64 clients.

Each point runs one round's aggregation path twice on real Flower ``Message`` objects, in
one process: the server's decoding wrapper around Flower's FedAvg and the clients' reply
code, once plain and once under SecAgg+ (keys, shares, masked updates, unmasking; the
client stage handlers of ``client/secagg.py``). Training is left out on purpose: it is the
same with or without SecAgg+ (the update is computed first, then masked), and on this
machine one client's LoRA round on SmolLM2 takes tens of seconds, so 64 clients could not
be trained here. The updates have the real adapter's tensor names and shapes (random
values; cost does not depend on them). Measured per point:

- client seconds: the slowest and the mean client's time in its SecAgg+ handlers (key
  generation, sharing, fixed-point + masks, revealing shares) vs the plain reply's
  encoding;
- server seconds: configure + aggregate with SecAgg+ (graph, routing, unmasking, Shamir
  reconstruction) vs plain FedAvg's decode + aggregate;
- bytes per round: every message both ways (framed, as Flower serialises them).

Degrees: ``complete`` (k = n - 1, classic SecAgg) and, for 64 clients, SecAgg+'s sparse
graph (``--sparse-degree``). Results: ``bench/results/secagg.json``.

    python bench/secagg.py --clients 4 16 64
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client import secagg as stages
from fedpeft import wire
from fedpeft.config import SecAggConfig, compose
from fedpeft.methods import build_method
from fedpeft.models import load_causal_lm
from fedpeft.types import DenseUpdate
from strategies import build_strategy
from strategies.decoding import DecodingStrategy
from strategies.secagg import SecAggServer

ROOT = Path(__file__).resolve().parent.parent
HANDLERS = {"train.secagg_keys": stages.keys, "train.secagg_share": stages.share,
            "train.secagg_unmask": stages.unmask}


class TimedGrid:
    """Hands each message to its client's code at once and times the client side."""

    def __init__(self, updates: dict[int, dict], secure: bool) -> None:
        self.updates, self.secure = updates, secure
        self.ctx = {n: Context(1, n, {}, RecordDict(), {}) for n in updates}
        self.client_s: dict[int, float] = defaultdict(float)
        self.bytes = 0

    def get_node_ids(self) -> list[int]:
        return list(self.updates)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            msg.metadata.__dict__["_message_id"] = f"{node}-{msg.metadata.message_type}"
            t0 = time.perf_counter()
            handler = HANDLERS.get(msg.metadata.message_type, self._train)
            reply = handler(msg, self.ctx[node])
            self.client_s[node] += time.perf_counter() - t0
            self.bytes += wire.message_bytes(msg) + wire.message_bytes(reply)
            out.append(reply)
        return out

    def _train(self, msg: Message, context: Context) -> Message:
        deltas = self.updates[msg.metadata.dst_node_id]
        arrays = (stages.mask_update(deltas, 32.0, msg, context) if self.secure
                  else wire.encode_update(DenseUpdate(deltas)))
        return Message(wire.reply_content(arrays, 32, {"train_loss": 1.0}), reply_to=msg)


def adapter_state(model: str) -> dict[str, np.ndarray]:
    """The LoRA adapter's tensors on ``model`` (default method config)."""
    cfg = compose([f"model={model}", "method=lora"])
    method = build_method("lora", cfg.method)
    return method.get_state(method.attach(load_causal_lm(cfg.model), seed=0))


def one_round(state: dict, n: int, degree: int | None, rng: np.random.Generator) -> dict:
    updates = {10_000 + i: {k: (rng.normal(size=v.shape) * 1e-3).astype(v.dtype)
                            for k, v in state.items()} for i in range(n)}
    point = {}
    for name, secure in (("plain", False), ("secagg", True)):
        grid = TimedGrid(updates, secure)
        strategy = DecodingStrategy(build_strategy("fedavg", {"min_train_nodes": n,
                                                              "min_available_nodes": n}))
        if secure:
            strategy.secagg = SecAggServer(SecAggConfig(enabled=True, degree=degree))
        t0 = time.perf_counter()
        sent = strategy.configure_train(1, wire.to_arrayrecord(state), ConfigRecord(), grid)
        replies = grid.send_and_receive(sent)
        arrays, _ = strategy.aggregate_train(1, replies)
        total = time.perf_counter() - t0
        assert arrays is not None and strategy.traffic.accepted == n, strategy.traffic.rejected
        client = list(grid.client_s.values())
        point[name] = {"server_s": total - sum(client), "client_max_s": max(client),
                       "client_mean_s": float(np.mean(client)), "bytes": grid.bytes,
                       "bytes_per_client": grid.bytes / n}
    point["ratio"] = {k: point["secagg"][k] / point["plain"][k] for k in
                      ("server_s", "client_mean_s", "bytes")}
    return point


X = "\u00d7"  # the multiplication sign of the README tables


def table(results: dict) -> str:
    rows = ["| clients | graph degree | client s (plain → SecAgg+) | server s (plain → "
            "SecAgg+) | MiB per round (plain → SecAgg+) |", "|---|---|---|---|---|"]
    for p in results["points"]:
        a, b = p["plain"], p["secagg"]
        rows.append(
            f"| {p['clients']} | {p['degree']} | {a['client_mean_s']:.3f} → "
            f"{b['client_mean_s']:.3f} ({p['ratio']['client_mean_s']:.1f}{X}) | "
            f"{a['server_s']:.2f} → {b['server_s']:.2f} ({p['ratio']['server_s']:.1f}{X}) | "
            f"{a['bytes'] / 2**20:.1f} → {b['bytes'] / 2**20:.1f} "
            f"({p['ratio']['bytes']:.2f}{X}) |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--sparse-degree", type=int, default=12,
                   help="SecAgg+ graph degree also measured at the largest client count")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "secagg.json")
    p.add_argument("--table", action="store_true", help="print the README table of --out")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    for key in ("_run_id", "_node_id", "_task_id"):  # what a live ServerApp has set
        setattr(TaskIdentity, key, 1)
    state = adapter_state(args.model)
    size = sum(v.size for v in state.values())
    rng = np.random.default_rng(0)
    points = []
    plan = [(n, None) for n in args.clients] + [(max(args.clients), args.sparse_degree)]
    for n, degree in plan:
        point = one_round(state, n, degree, rng)
        point.update(clients=n, degree=degree or n - 1)
        points.append(point)
        print(json.dumps({k: point[k] for k in ("clients", "degree", "ratio")}), flush=True)
    results = {"model": args.model, "adapter_params": int(size), "points": points,
               "machine": platform.platform(), "processor": platform.processor(),
               "cpus": __import__("os").cpu_count()}
    args.out.write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
