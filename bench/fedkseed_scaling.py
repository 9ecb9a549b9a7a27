"""FedKSeed wire size and server cost as the number of clients grows.

Two measurements, both through fedpeft's own strategy and Flower message objects:

1. **Bytes per client per round** (K=4096, tau=200 by default) for N clients: every client
   draws its tau seed indices exactly as ``zo_train`` does (uniform over K), the strategy
   aggregates the round, and the next round's download to a client that synced last round
   is built by ``FedKSeedStrategy`` itself; sizes are ``wire.message_bytes`` (Flower's
   serialized objects, framing included) next to the raw array payload. The scalar values
   are random: sizes depend only on how many seeds are touched.
2. **Server time per round vs seeds touched**, at two client counts: aggregation
   (``aggregate_train``) plus the replay of the round on the bundled SmolLM2-135M
   (``apply_global``: one regeneration per touched seed), for a pool of S distinct seeds
   shared by N clients. The replay dominates and scales with S, not N.

Usage: ``python bench/fedkseed_scaling.py --out bench/results/fedkseed_scaling-cpu.json``
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, Metadata
from flwr.supercore.task_identity import TaskIdentity

from fedpeft import wire
from fedpeft.methods import build_model
from fedpeft.methods.fedkseed import FedKSeedConfig, FedKSeedMethod
from fedpeft.models import ModelConfig
from strategies.fedkseed import FedKSeedStrategy

ROOT = Path(__file__).resolve().parents[1]


def _reply(node: int, idx: np.ndarray, vals: np.ndarray) -> Message:
    meta = Metadata(run_id=1, message_id=str(node), src_node_id=node, dst_node_id=0,
                    reply_to_message_id="m", group_id="1", created_at=0.0, ttl=60.0,
                    message_type="train")
    arrays = wire.to_arrayrecord({wire.SEED_IDX_KEY: idx.astype(np.int32),
                                  wire.SEED_GRAD_KEY: vals.astype(np.float32)})
    content = wire.reply_content(arrays, 100, {"train_loss": 1.0, "train_time_s": 1.0,
                                               "skipped_steps": 0})
    return Message(content=content, metadata=meta)


def _client_update(rng: np.random.Generator, k: int, tau: int, pool: int | None = None):
    """Seeds of tau ZO steps (as zo_train draws them) and their summed scalars."""
    draws = rng.integers(pool or k, size=tau)
    idx = np.unique(draws)
    vals = np.array([rng.normal(size=(draws == i).sum()).sum() for i in idx])
    return idx, vals


def bytes_vs_clients(k: int, tau: int, counts: list[int]) -> list[dict]:
    rows = []
    for n in counts:
        rng = np.random.default_rng(n)
        strategy = FedKSeedStrategy()
        strategy.bind_method(SimpleNamespace(cfg=FedKSeedConfig(num_seeds=k, local_steps=tau)))
        replies = [_reply(i + 1, *_client_update(rng, k, tau)) for i in range(n)]
        strategy.aggregate_train(1, replies)  # round 1; node i synced at round 0
        for node in range(1, n + 1):
            strategy.synced[node] = 1  # as after replying in round 2
        up = [wire.message_bytes(r) for r in replies]
        up_payload = [wire.payload_bytes(r.content[wire.ARRAYS_KEY]) for r in replies]
        # round 2's download to a node synced at round 1 carries round 1's ΔA
        strategy.synced = {1: 0}
        down = strategy._message(1, 2, ConfigRecord({"seed": 0}), {})
        touched = int(strategy.acc.history[0][0].size)
        rows.append({
            "clients": n, "touched_seeds": touched,
            "up_bytes_max": max(up), "up_payload_max": max(up_payload),
            "down_bytes": wire.message_bytes(down),
            "down_payload": wire.payload_bytes(down.content[wire.ARRAYS_KEY]),
            "down_encoding": "dense" if "dense_val" in down.content[wire.ARRAYS_KEY] else "sparse",
        })
        print(rows[-1], flush=True)
    return rows


def server_time(k: int, tau: int, pools: list[int], clients: list[int], trainable: str,
                repeats: int) -> list[dict]:
    cfg = FedKSeedConfig(num_seeds=k, local_steps=tau, trainable=trainable)
    method = FedKSeedMethod(cfg)
    model = build_model(method, ModelConfig(), seed=0)
    numel = sum(p.numel() for p in method.params(model).values())
    rows = []
    for pool in pools:
        for n in clients:
            times_agg, times_apply, touched = [], [], 0
            for rep in range(repeats):
                rng = np.random.default_rng([pool, n, rep])
                strategy = FedKSeedStrategy()
                strategy.bind_method(method)
                replies = [_reply(i + 1, *_client_update(rng, k, tau, pool)) for i in range(n)]
                t0 = time.perf_counter()
                arrays, _ = strategy.aggregate_train(1, replies)
                t1 = time.perf_counter()
                method.apply_global(model, wire.from_arrayrecord(arrays))
                t2 = time.perf_counter()
                times_agg.append(t1 - t0)
                times_apply.append(t2 - t1)
                touched = int(strategy.acc.history[0][0].size)
            rows.append({"seed_pool": pool, "clients": n, "touched_seeds": touched,
                         "aggregate_s": float(np.median(times_agg)),
                         "apply_s": float(np.median(times_apply)),
                         "trainable_params": numel})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--tau", type=int, default=200)
    parser.add_argument("--trainable", default=r"layers\.2[4-9]\.mlp\.down_proj")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench/results/fedkseed_scaling-cpu.json"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as in a ServerApp
    result = {
        "device": f"cpu ({platform.processor() or platform.machine()}, "
                  f"{torch.get_num_threads()} threads)",
        "k": args.k, "tau": args.tau,
        "bytes": bytes_vs_clients(args.k, args.tau, [1, 2, 4, 8, 16, 32, 64]),
        "server": server_time(args.k, args.tau, [16, 64, 256], [4, 16], args.trainable,
                              args.repeats),
        "trainable": args.trainable,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
