#!/usr/bin/env python3
"""The cost of scale: server time and memory against clients per round, measured on this
machine, fitted with straight lines and extrapolated to 10^5 clients per round.

Why: every other benchmark here runs a handful of clients. This one asks what runs out
first when a round has 10^3-10^5 of them. It runs the real server code on synthetic update
values of the real shapes (SmolLM2-135M). There is no training: the server's work does not
depend on how the values were found.

Part ``points``: aggregation per update kind and cohort size (10, 100, 1,000, 10,000):

- ``dense``: LoRA r=8 q/k/v/o deltas (921,600 float32), DecodingStrategy around Flower's
  FedAvg;
- ``seeds``: FedKSeed replies (τ=200 seed draws over K=4,096: indices and summed scalars),
  FedKSeedStrategy;
- ``projections``: Ferret replies (a fresh seed, 2,048 block counts, ≤8,192
  coordinates), FerretStrategy;
- ``compressed``: ComPEFT blobs (top 10% + ternary, Rice-coded positions) of the dense
  deltas, decoded by DecodingStrategy. Encoding takes ~0.1 s per update, so a point of
  this part encodes at most ``POOL`` distinct updates and gives each reply its own copy
  of one (decoding costs the same whatever the values).

Each point runs in a fresh interpreter. It builds every reply as a Flower ``Message`` with
fedpeft's wire helpers (timed: build), runs the strategy's ``configure_train`` for the
cohort (timed: configure, which includes measuring every message sent), then
``aggregate_train`` on all replies (timed: aggregate). Memory is the process's resident
set from ``/proc/self/status``. ``inputs`` is VmRSS after building minus VmRSS before.
``peak`` is VmHWM during aggregation (reset through ``/proc/self/clear_refs`` just before
it) minus VmRSS before building: everything the server process holds for the round, at its
worst. A point is not run, and the reason is recorded, when a line fitted to the kind's
smaller points predicts a peak beyond the memory free at that moment.

Part ``store``: the objects of n replies of each kind go into Flower's own SuperLink
object stores, as the Fleet API's PushMessages/PushObject handlers put them (preregister
the object tree, then put and verify every object's bytes; only that is timed as
``store``). ``memory`` is InMemoryObjectStore (a SuperLink without ``--database``, and
every simulation); ``sqlite`` is SqlObjectStore (with ``--database``). The result is
resident bytes or bytes on disk per stored reply. Every reply here is distinct (the stores
keep one copy of identical objects). A point that the seconds per reply of the kind's
largest point so far say would take longer than ``--store-budget-s`` is not run.

Part ``link``: one ``flower-superlink --insecure --database <temp file>`` and idle
``flower-supernode --insecure`` processes (no run submitted), added in steps (0, 5, 10,
20, 40 by default). After each step every node must be activated, then the processes
settle; psutil then samples the SuperLink's RSS/USS and CPU% and each node's RSS/USS (node
plus the SuperExec it starts). The steps stop early, saying why, when the nodes' measured
USS says the next step would leave less than ``RESERVE_MIB`` free or when the SuperLink
starts re-activating nodes (missed heartbeats). Every process is started in a
``RunWorkspace`` and stopped by PID tree, also on SIGTERM. Ports: 42100 (Fleet), 42101
(Control/Runtime API), 42200-42999 (nodes).

Fits are ``a + b·n``, by least squares on relative error. The report extrapolates them to
10^5 clients per round and names the first server-side resource to run out. Results:
``bench/results/scale_cost.json`` and ``bench/results/scale_cost.png``.

    python bench/scale_cost.py                             # all parts (~20 min, 2 cores)
    python bench/scale_cost.py --parts points --clients 10 100 --kinds dense seeds
    python bench/scale_cost.py --table --refit             # tables, fits, plot from the JSON
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import flwr
import numpy as np
import psutil
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, Metadata
from flwr.proto.message_pb2 import ObjectTree
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
from flwr.supercore.object_store.object_store import ObjectStore
from flwr.supercore.object_store.sql_object_store import SqlObjectStore
from flwr.supercore.task_identity import TaskIdentity

from fedpeft import wire
from fedpeft.compression.compeft import ComPEFT, ComPEFTConfig
from fedpeft.deploy import Federation, start_superlink, supernode_command
from fedpeft.launch import Interrupted, signals_ignored, signals_raise
from fedpeft.procs import RunWorkspace, port_open
from fedpeft.types import DenseUpdate, ProjectedUpdate, SeedUpdate

# fedpeft.methods, fedpeft.config and strategies import torch (~6 s on this machine): they
# are imported where needed, so a store point (a fresh interpreter each) starts in ~1 s.

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
KINDS = ("dense", "seeds", "projections", "compressed")
STORES = ("memory", "sqlite")
MIB, GIB = 2**20, 2**30
FIRST_NODE = 1000  # node ids of a synthetic cohort: FIRST_NODE, FIRST_NODE + 1, ...
POOL = 32  # distinct ComPEFT encodings per point (each reply holds its own copy of one)
RESERVE_MIB = 3 * 1024  # memory left to the machine's other users when deciding what fits
FLEET_PORT, API_PORT, NODE_PORTS = 42100, 42101, range(42200, 43000)
TARGET = 100_000  # clients per round the fits are extrapolated to
ACTIVATED = re.compile(r"Activated node_id=(\d+)")  # the SuperLink's log line per node


# ----------------------------------------------------------------------------- shapes

@dataclass(frozen=True)
class Shapes:
    """The update shapes: LoRA tensors (name -> shape), FedKSeed's K and τ, Ferret's
    blocks, K and minimum bases per block, ComPEFT's density."""

    lora: dict[str, list[int]]
    num_seeds: int = 4096
    local_steps: int = 200
    num_blocks: int = 2048
    num_bases: int = 8192
    min_bases: int = 2
    density: float = 0.1

    @property
    def lora_params(self) -> int:
        """Values in one dense LoRA update."""
        return int(sum(np.prod(s) for s in self.lora.values()))


def real_shapes(model: str) -> Shapes:
    """The shapes fedpeft's methods give ``model`` under their default configs: LoRA
    r=8 on q/k/v/o, FedKSeed, Ferret's block layout over all parameters, ComPEFT."""
    from fedpeft.config import compose
    from fedpeft.methods import build_method
    from fedpeft.models import load_causal_lm

    cfg = compose([f"model={model}", "method=lora", "compression=compeft"])
    lora = build_method("lora", cfg.method)
    state = lora.get_state(lora.attach(load_causal_lm(cfg.model), seed=0))
    fcfg = compose([f"model={model}", "method=ferret", "strategy=ferret"]).method
    ferret = build_method("ferret", fcfg)
    ferret.attach(load_causal_lm(cfg.model), seed=0)
    kseed = compose([f"model={model}", "method=fedkseed", "strategy=fedkseed"]).method
    return Shapes({k: list(v.shape) for k, v in state.items()}, kseed.num_seeds,
                  kseed.local_steps, ferret.layout.num_blocks, fcfg.num_bases,
                  fcfg.min_bases, cfg.compression.density)


# ----------------------------------------------------------------------------- memory

def _status_mib(field: str) -> float:
    """A field of ``/proc/self/status`` in MiB (VmRSS: resident now; VmHWM: peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def rss_mib() -> float:
    """This process's resident set now, MiB."""
    return _status_mib("VmRSS")


def peak_mib() -> float:
    """This process's peak resident set since start or :func:`reset_peak`, MiB."""
    return _status_mib("VmHWM")


def reset_peak() -> None:
    """Restart the peak (VmHWM) from the resident set now (Linux ``clear_refs`` 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and its wall time in seconds."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------- updates

def nodes(n: int) -> range:
    """Node ids of a cohort of ``n`` clients."""
    return range(FIRST_NODE, FIRST_NODE + n)


def rng_for(seed: int, node: int) -> np.random.Generator:
    """The generator of one node's synthetic update (node 0: the global state)."""
    return np.random.default_rng([seed, node])


def num_examples(node: int) -> int:
    """Unequal example counts, so that FedAvg's weighting is exercised."""
    return 8 + node % 5


def global_state(shapes: Shapes, seed: int) -> dict[str, np.ndarray]:
    """The global LoRA arrays the server sends (random, LoRA-init scale)."""
    rng = rng_for(seed, 0)
    return {k: rng.standard_normal(tuple(s), dtype=np.float32) * np.float32(0.02)
            for k, s in sorted(shapes.lora.items())}


def dense_update(shapes: Shapes, rng: np.random.Generator, node: int) -> DenseUpdate:
    """A LoRA delta: every adapter tensor, N(0, 1e-3²) float32."""
    return DenseUpdate({k: rng.standard_normal(tuple(s), dtype=np.float32) * np.float32(1e-3)
                        for k, s in sorted(shapes.lora.items())})


def seed_update(shapes: Shapes, rng: np.random.Generator, node: int) -> SeedUpdate:
    """τ uniform seed draws over K (as ``zo_train`` draws them), each drawn seed's scalars
    summed."""
    draws = rng.integers(shapes.num_seeds, size=shapes.local_steps)
    idx, inverse = np.unique(draws, return_inverse=True)
    vals = np.bincount(inverse, weights=rng.standard_normal(draws.size))
    return SeedUpdate(idx.astype(np.int32), vals.astype(np.float32))


def projected_update(shapes: Shapes, rng: np.random.Generator, node: int) -> ProjectedUpdate:
    """A fresh basis seed (the node id), Ferret's allocation of K bases over the blocks
    for random block norms, and that many coordinates."""
    from fedpeft.methods.ferret import allocate

    counts = allocate(rng.random(shapes.num_blocks), shapes.num_bases, shapes.min_bases)
    gammas = rng.standard_normal(int(counts.sum()), dtype=np.float32) * np.float32(1e-3)
    return ProjectedUpdate(node, counts, gammas)


UPDATES: dict[str, Callable[[Shapes, np.random.Generator, int], Any]] = {
    "dense": dense_update, "seeds": seed_update, "projections": projected_update}


def codec(shapes: Shapes) -> ComPEFT:
    """The ComPEFT codec clients encode with (and the server decodes with)."""
    return ComPEFT(ComPEFTConfig(density=shapes.density))


def update_arrays(kind: str, shapes: Shapes, n: int, seed: int,
                  pool: int = POOL) -> Iterator[ArrayRecord]:
    """The reply arrays of ``n`` clients, one at a time, in the wire's form (ComPEFT:
    ``pool`` distinct encodings, each reply with its own copy of one)."""
    if kind == "compressed":
        enc = codec(shapes)

        def blob(node: int) -> bytes:
            return enc.encode(dense_update(shapes, rng_for(seed, node), node).deltas)

        if pool >= n:  # one at a time, as for the other kinds
            return (wire.encode_compressed(blob(node)) for node in nodes(n))
        blobs = [blob(node) for node in nodes(pool)]
        return (wire.encode_compressed(blobs[i % pool]) for i in range(n))
    make = UPDATES[kind]
    return (wire.encode_update(make(shapes, rng_for(seed, node), node)) for node in nodes(n))


def reply(node: int, arrays: ArrayRecord) -> Message:
    """A client's train reply as the server receives it (fedpeft's reply content)."""
    meta = Metadata(run_id=1, message_id=str(node), src_node_id=node, dst_node_id=0,
                    reply_to_message_id=f"ins-{node}", group_id="1", created_at=time.time(),
                    ttl=3600.0, message_type=MessageType.TRAIN)
    content = wire.reply_content(arrays, num_examples(node), {"train_loss": 1.0}, node)
    return Message(content=content, metadata=meta)


def replies(kind: str, shapes: Shapes, n: int, seed: int, pool: int = POOL,
            ) -> Iterator[Message]:
    """The ``n`` replies of a cohort, built lazily."""
    return (reply(node, arrays) for node, arrays
            in zip(nodes(n), update_arrays(kind, shapes, n, seed, pool), strict=True))


# ----------------------------------------------------------------------------- server

class NodeGrid:
    """What a strategy's ``configure_train`` asks of Flower's ``Grid``: the node ids."""

    def __init__(self, n: int) -> None:
        self.ids = list(nodes(n))

    def get_node_ids(self) -> list[int]:
        """The connected nodes: the whole cohort."""
        return self.ids


HEAVY = ("strategies", "strategies.decoding", "fedpeft.methods.ferret")


def preload() -> None:
    """Import the server side's modules (torch among them) before memory is measured."""
    for name in HEAVY:
        importlib.import_module(name)


def serverapp_identity() -> None:
    """Set the task identity a live ServerApp has (Flower's messages read it)."""
    for key in ("_run_id", "_node_id", "_task_id"):
        setattr(TaskIdentity, key, 1)


def replay_strategy(kind: str, shapes: Shapes, n: int) -> Any:
    """FedKSeed's or Ferret's strategy, bound to the method settings it reads."""
    from fedpeft.methods.fedkseed import FedKSeedConfig
    from fedpeft.methods.ferret import FerretConfig
    from strategies.fedkseed import FedKSeedStrategy
    from strategies.ferret import FerretStrategy

    if kind == "seeds":
        seeds = FedKSeedStrategy(min_train_nodes=n, min_available_nodes=n)
        seeds.bind_method(SimpleNamespace(cfg=FedKSeedConfig(
            num_seeds=shapes.num_seeds, local_steps=shapes.local_steps)))
        return seeds
    ferret = FerretStrategy(min_train_nodes=n, min_available_nodes=n)
    ferret.bind_method(SimpleNamespace(
        layout=SimpleNamespace(num_blocks=shapes.num_blocks),
        cfg=FerretConfig(num_bases=shapes.num_bases, min_bases=shapes.min_bases)))
    return ferret


def make_strategy(kind: str, shapes: Shapes, n: int, seed: int) -> tuple[Any, ArrayRecord]:
    """The server's strategy for ``kind`` and the global arrays it sends."""
    from strategies import build_strategy
    from strategies.decoding import DecodingStrategy

    if kind in ("seeds", "projections"):
        return replay_strategy(kind, shapes, n), ArrayRecord()
    strategy = DecodingStrategy(build_strategy("fedavg", {"min_train_nodes": n,
                                                          "min_available_nodes": n}))
    if kind == "compressed":
        strategy.compressor = codec(shapes)
    return strategy, wire.to_arrayrecord(global_state(shapes, seed))


def run_point(kind: str, n: int, shapes: Shapes, seed: int = 0,
              ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One cohort of one kind, in this process: build, configure, aggregate. Returns the
    measured point and the aggregate's arrays."""
    preload()
    serverapp_identity()
    gc.collect()
    base = rss_mib()
    received, build_s = timed(lambda: list(replies(kind, shapes, n, seed)))
    inputs = rss_mib() - base
    strategy, arrays = make_strategy(kind, shapes, n, seed)
    _, configure_s = timed(lambda: list(strategy.configure_train(
        1, arrays, ConfigRecord(), NodeGrid(n))))
    gc.collect()
    reset_peak()
    (out, _), aggregate_s = timed(lambda: strategy.aggregate_train(1, received))
    peak = peak_mib() - base
    traffic = strategy.traffic
    if traffic.accepted != n or out is None:
        raise RuntimeError(f"{kind}: {traffic.accepted} of {n} accepted: {traffic.rejected}")
    point = {"run": True, "build_s": build_s, "configure_s": configure_s,
             "aggregate_s": aggregate_s, "base_rss_mib": base, "inputs_mib": inputs,
             "peak_mib": peak, "up_bytes_per_client": _mean(traffic.bytes_up),
             "payload_bytes_per_client": _mean(traffic.payload_bytes_up),
             "load_avg_1m": os.getloadavg()[0]}
    return point, wire.from_arrayrecord(out)


def _mean(per_node: dict[str, int]) -> float:
    return float(np.mean(list(per_node.values())))


# ----------------------------------------------------------------------------- store

def open_store(backend: str, path: Path) -> ObjectStore:
    """The SuperLink's object store: in memory, or SQLite at ``path``."""
    if backend == "memory":
        return InMemoryObjectStore()
    store = SqlObjectStore(str(path))
    store.initialize()
    return store


def serialize(message: Message) -> tuple[ObjectTree, dict[str, bytes]]:
    """What a SuperNode sends for a reply: its object tree and every object's bytes."""
    objects = get_all_nested_objects(message)
    return get_object_tree(message), {oid: obj.deflate() for oid, obj in objects.items()}


def push(store: ObjectStore, tree: ObjectTree, blobs: dict[str, bytes]) -> None:
    """What the SuperLink does with them (PushMessages, then PushObject per object):
    preregister the tree, then put (and verify) every object."""
    store.preregister(1, tree)
    for oid, blob in blobs.items():
        store.put(oid, blob)


def fill(store: ObjectStore, messages: Iterable[Message]) -> tuple[int, float, float]:
    """Push every message into ``store``: (bytes pushed, seconds serializing on the
    nodes' side, seconds storing on the SuperLink's side)."""
    pushed, send_s, store_s = 0, 0.0, 0.0
    for message in messages:
        (tree, blobs), s1 = timed(lambda m=message: serialize(m))
        _, s2 = timed(lambda t=tree, b=blobs: push(store, t, b))
        pushed += sum(map(len, blobs.values()))
        send_s += s1
        store_s += s2
    return pushed, send_s, store_s


def store_point(backend: str, kind: str, n: int, shapes: Shapes, seed: int = 0,
                ) -> dict[str, Any]:
    """``n`` replies of ``kind`` pushed into one SuperLink object store: its resident and
    on-disk growth, and the seconds it spent storing them."""
    if kind == "projections":  # its replies are built with Ferret's own allocation
        preload()
    serverapp_identity()
    with tempfile.TemporaryDirectory(prefix="scale-store-") as tmp:
        warm = open_store(backend, Path(tmp) / "warm.db")  # first-use costs: not counted
        fill(warm, replies(kind, shapes, 1, seed + 1, pool=1))
        store = open_store(backend, Path(tmp) / "objects.db")
        gc.collect()
        base = rss_mib()
        # every reply distinct: the store keeps one copy of identical objects
        (pushed, send_s, store_s), total_s = timed(
            lambda: fill(store, replies(kind, shapes, n, seed, pool=n)))
        gc.collect()
        disk = sum(f.stat().st_size for f in Path(tmp).glob("objects.db*"))
        return {"run": True, "objects": len(store), "pushed_bytes": pushed,
                "resident_mib": rss_mib() - base, "disk_mib": disk / MIB,
                "store_s": store_s, "serialize_s": send_s,
                "build_s": total_s - store_s - send_s, "load_avg_1m": os.getloadavg()[0]}


# ----------------------------------------------------------------------------- children

def child(args: Sequence[str], timeout_s: float) -> dict[str, Any]:
    """Run this file with ``args`` in a fresh interpreter; its last stdout line is JSON.
    A failure or a timeout is a point not run, with the reason."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"run": False, "reason": f"did not finish within {timeout_s:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"run": False, "reason": f"exit {done.returncode}: {tail[0][:300]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def too_big(done: list[dict], n: int) -> str | None:
    """Why cohort ``n`` is not run: the line through the kind's measured points predicts
    a peak resident set beyond the memory free now (less ``RESERVE_MIB``)."""
    if len(done) < 2:
        return None
    fit = fit_line([p["clients"] for p in done], [p["peak_mib"] for p in done])
    need = predict(fit, n) + done[-1]["base_rss_mib"]
    free = psutil.virtual_memory().available / MIB - RESERVE_MIB
    if need <= free:
        return None
    return (f"needs ~{need / 1024:.1f} GiB resident (line through the measured points) but "
            f"{free / 1024:.1f} GiB are free ({psutil.virtual_memory().total / GIB:.0f} GiB "
            f"machine, {RESERVE_MIB // 1024} GiB left to others)")


def measure_points(kinds: Iterable[str], cohorts: Iterable[int], shapes_file: Path,
                   timeout_s: float) -> list[dict]:
    """Every (kind, cohort) point in its own interpreter, smallest cohort first."""
    points: list[dict] = []
    for kind in kinds:
        for n in sorted(cohorts):
            done = [p for p in points if p["kind"] == kind and p["run"]]
            why = too_big(done, n)
            point = ({"run": False, "reason": why} if why else
                     child(["--point", kind, str(n), "--shapes", str(shapes_file)], timeout_s))
            points.append({"kind": kind, "clients": n, **point})
            print(json.dumps(points[-1]), flush=True)
    return points


def too_slow(done: list[dict], n: int, budget_s: float) -> str | None:
    """Why ``n`` replies are not stored: at the seconds per reply of the largest point so
    far, storing them would take longer than ``budget_s``."""
    if not done:
        return None
    per = done[-1]["store_s"] / done[-1]["replies"]
    return None if per * n <= budget_s else (
        f"would take ~{per * n:.0f} s to store at the measured {per:.3f} s per reply "
        f"(limit {budget_s:.0f} s per point)")


def measure_store(counts: dict[str, Sequence[int]], kinds: Iterable[str], shapes_file: Path,
                  timeout_s: float, budget_s: float) -> list[dict]:
    """Every (backend, kind, replies) store point in its own interpreter."""
    rows: list[dict] = []
    for backend, kind in ((b, k) for b in STORES for k in kinds):
        for n in sorted(counts[backend]):
            done = [r for r in rows if (r["backend"], r["kind"]) == (backend, kind) and r["run"]]
            why = too_slow(done, n, budget_s)
            row = ({"run": False, "reason": why} if why else child(
                ["--store", backend, kind, str(n), "--shapes", str(shapes_file)], timeout_s))
            rows.append({"backend": backend, "kind": kind, "replies": n, **row})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# ----------------------------------------------------------------------------- link

def free_node_port(taken: set[int]) -> int:
    """A port of ``NODE_PORTS`` that nothing listens on and no node of ours holds."""
    for port in NODE_PORTS:
        if port not in taken and not port_open("127.0.0.1", port, timeout=0.1):
            taken.add(port)
            return port
    raise RuntimeError(f"no free port in {NODE_PORTS.start}-{NODE_PORTS.stop - 1}")


def start_node(ws: RunWorkspace, fed: Federation, i: int, port: int) -> subprocess.Popen:
    """Idle SuperNode ``i`` (deploy's command, with its Runtime API on ``port``)."""
    cmd = supernode_command(fed, i, 1)
    cmd[cmd.index("--port") + 1] = str(port)
    return ws.start(cmd, ws.path / f"supernode-{i}.log")


def activations(log: Path) -> dict[str, int]:
    """Distinct nodes the SuperLink has activated, and re-activations (a node that missed
    its heartbeats is deactivated and registers again)."""
    ids = ACTIVATED.findall(log.read_text(errors="replace"))
    return {"activated": len(set(ids)), "reactivations": len(ids) - len(set(ids))}


def wait_activated(log: Path, n: int, timeout_s: float) -> None:
    """Wait until the SuperLink has activated ``n`` distinct nodes."""
    deadline = time.monotonic() + timeout_s
    while activations(log)["activated"] < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {n} SuperNodes activated after {timeout_s:.0f} s")
        time.sleep(1)


def memory_mib(proc: psutil.Process) -> tuple[float, float]:
    """(RSS, USS) of ``proc`` plus its descendants, MiB."""
    rss = uss = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        info = p.memory_full_info()
        rss, uss = rss + info.rss / MIB, uss + info.uss / MIB
    return rss, uss


def cpu_percent(procs: list[psutil.Process], window_s: float) -> list[float]:
    """CPU% of each process over the next ``window_s`` seconds (100 = one core)."""
    for p in procs:
        p.cpu_percent(None)
    time.sleep(window_s)
    return [p.cpu_percent(None) for p in procs]


def sample(link: subprocess.Popen, started: list[subprocess.Popen],
           window_s: float) -> dict[str, Any]:
    """The SuperLink's and the nodes' memory and CPU, now."""
    server, nodes_ = psutil.Process(link.pid), [psutil.Process(p.pid) for p in started]
    cpu = cpu_percent([server, *nodes_], window_s)
    own, with_superexec = server.memory_full_info(), memory_mib(server)
    per_node = [memory_mib(p) for p in nodes_]
    return {"nodes": len(started), "superlink_rss_mib": own.rss / MIB,
            "superlink_uss_mib": own.uss / MIB, "superlink_cpu_pct": cpu[0],
            "superlink_with_superexec_rss_mib": with_superexec[0],
            "node_rss_mib": float(np.mean([m[0] for m in per_node])) if per_node else None,
            "node_uss_mib": float(np.mean([m[1] for m in per_node])) if per_node else None,
            "nodes_cpu_pct_total": float(sum(cpu[1:])),
            "available_mib": psutil.virtual_memory().available / MIB,
            "load_avg_1m": os.getloadavg()[0]}


def no_room(rows: list[dict], n: int) -> str | None:
    """Why the step to ``n`` nodes is not taken: the nodes' measured USS says it would
    leave less than ``RESERVE_MIB`` free."""
    if not rows or not rows[-1]["node_uss_mib"]:
        return None
    need = (n - rows[-1]["nodes"]) * rows[-1]["node_uss_mib"]
    free = psutil.virtual_memory().available / MIB - RESERVE_MIB
    return None if need <= free else (
        f"{n} nodes need ~{need / 1024:.1f} GiB more (measured USS per node) but "
        f"{free / 1024:.1f} GiB are free beyond the {RESERVE_MIB // 1024} GiB left to others")


def grow(ws: RunWorkspace, fed: Federation, started: list[subprocess.Popen], n: int,
         ports: set[int], settle_s: float) -> float:
    """Start nodes until ``n`` run, wait until all are activated, then settle. Returns
    the seconds until the last was activated."""
    t0 = time.monotonic()
    while len(started) < n:
        started.append(start_node(ws, fed, len(started), free_node_port(ports)))
    wait_activated(ws.path / "superlink.log", n, 120 + 5 * n)
    up = time.monotonic() - t0
    time.sleep(settle_s)
    return up


def grow_and_sample(ws: RunWorkspace, counts: Sequence[int], settle_s: float,
                    window_s: float, rows: list[dict]) -> str | None:
    """Start the SuperLink, then for each count: add nodes, settle, sample into ``rows``.
    Returns why it stopped before the last count (None if it did not)."""
    fed = Federation(FLEET_PORT, API_PORT, ws.path / "superlink.db")
    start_superlink(ws, fed, ws.path)
    started: list[subprocess.Popen] = []
    ports: set[int] = set()
    for n in counts:
        if (why := no_room(rows, n)) is not None:
            return why
        up_s = grow(ws, fed, started, n, ports, settle_s)
        rows.append({**sample(fed.link, started, window_s), "start_s": up_s,
                     **activations(ws.path / "superlink.log")})
        print(json.dumps(rows[-1]), flush=True)
        if rows[-1]["reactivations"]:
            return (f"at {n} nodes the SuperLink deactivated and re-activated nodes "
                    f"{rows[-1]['reactivations']} times (missed heartbeats)")
    return None


def measure_link(counts: Sequence[int], settle_s: float, window_s: float) -> dict[str, Any]:
    """SuperLink cost per idle SuperNode at each node count of ``counts``. Stops early,
    saying why, when memory would run short, nodes miss heartbeats or it is interrupted;
    every process it started is stopped in any case."""
    for port in (FLEET_PORT, API_PORT):
        if port_open("127.0.0.1", port):
            raise RuntimeError(f"port {port} is in use; the SuperLink needs it")
    ws, rows = RunWorkspace(prefix="scale-link-"), []
    try:
        with signals_raise():
            why = grow_and_sample(ws, sorted(counts), settle_s, window_s, rows)
    except Interrupted as exc:
        why = f"interrupted by {exc}"
    finally:
        with signals_ignored():
            stopped = ws.stop()
            left = [p.pid for p in ws.members()]
            ws.remove()
    return {"points": rows, "settle_s": settle_s, "cpu_window_s": window_s,
            "stopped_because": why or f"reached the largest count asked for ({max(counts)})",
            "pids_stopped": len(stopped), "left_running": left}


# ----------------------------------------------------------------------------- model

def fit_line(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """y ≈ a + b·x by least squares on relative error; with its largest relative miss."""
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    w = 1 / np.maximum(np.abs(ys), 1e-9)
    (a, b), *_ = np.linalg.lstsq(np.stack([w, w * xs], 1), w * ys, rcond=None)
    miss = np.abs(a + b * xs - ys) * w
    return {"a": float(a), "b": float(b), "max_rel_miss": float(miss.max())}


def predict(fit: dict[str, float], x: float) -> float:
    """The fitted line at ``x``."""
    return fit["a"] + fit["b"] * x


def reach(fit: dict[str, float], budget: float) -> float | None:
    """The x at which the fitted line reaches ``budget`` (None if it never grows)."""
    return (budget - fit["a"]) / fit["b"] if fit["b"] > 0 else None


def kind_models(points: list[dict]) -> dict[str, dict]:
    """Per kind: lines for aggregate seconds and peak MiB against clients per round."""
    out = {}
    for kind in dict.fromkeys(p["kind"] for p in points):
        done = [p for p in points if p["kind"] == kind and p["run"]]
        if len(done) < 2:
            continue
        n = [p["clients"] for p in done]
        time_fit = fit_line(n, [p["aggregate_s"] for p in done])
        mem_fit = fit_line(n, [p["peak_mib"] for p in done])
        payload = done[-1]["payload_bytes_per_client"] / MIB
        out[kind] = {"aggregate_s": time_fit, "peak_mib": mem_fit,
                     "base_rss_mib": max(p["base_rss_mib"] for p in done),
                     "payload_mib_per_client": payload,
                     "peak_per_client_in_payloads": mem_fit["b"] / payload,
                     "at_target": {"aggregate_s": predict(time_fit, TARGET),
                                   "peak_gib": predict(mem_fit, TARGET) / 1024}}
    return out


def held_mib(row: dict) -> float:
    """What a store point holds: on disk for SQLite; in memory, the resident growth but
    at least the bytes pushed (the store keeps each object's bytes as received; a smaller
    RSS growth means freed build buffers were reused)."""
    if row["backend"] == "sqlite":
        return row["disk_mib"]
    return max(row["resident_mib"], row["pushed_bytes"] / MIB)


def store_models(rows: list[dict]) -> dict[str, dict]:
    """Per ``backend/kind``: lines for the store's growth (resident MiB in memory, MiB on
    disk for SQLite) and its storing seconds against replies."""
    out = {}
    for key in dict.fromkeys(f"{r['backend']}/{r['kind']}" for r in rows):
        done = [r for r in rows if f"{r['backend']}/{r['kind']}" == key and r["run"]]
        if len(done) < 2:
            continue
        n = [r["replies"] for r in done]
        growth, store_s = fit_line(n, [held_mib(r) for r in done]), fit_line(
            n, [r["store_s"] for r in done])
        what = "resident_mib" if key.startswith("memory") else "disk_mib"
        out[key] = {"what": what, "growth": growth, "store_s": store_s,
                    "at_target": {"gib": predict(growth, TARGET) / 1024,
                                  "store_s": predict(store_s, TARGET)}}
    return out


def link_model(link: dict) -> dict[str, Any]:
    """Lines for the SuperLink's RSS and CPU% against idle nodes; mean memory per node."""
    rows = link.get("points", [])
    if len(rows) < 2:
        return {}
    n = [r["nodes"] for r in rows]
    rss, cpu = (fit_line(n, [r[k] for r in rows])
                for k in ("superlink_rss_mib", "superlink_cpu_pct"))
    with_nodes = [r for r in rows if r["nodes"]]
    return {"superlink_rss_mib": rss, "superlink_cpu_pct": cpu,
            "node_rss_mib": float(np.mean([r["node_rss_mib"] for r in with_nodes])),
            "node_uss_mib": float(np.mean([r["node_uss_mib"] for r in with_nodes])),
            "at_target": {"superlink_rss_gib": predict(rss, TARGET) / 1024,
                          "superlink_cpu_cores": predict(cpu, TARGET) / 100}}


PULL_S = 1.0  # fedpeft's WatchedGrid pulls again at once while replies arrive, else after 1 s
RAY_NOTE = ("Flower's simulation engine hands a message to Ray only while one of its "
            "backend.num_workers worker threads runs that ClientApp (flwr/server/superlink/"
            "fleet/vce/vce_api.py); replies go on into the in-memory SuperLink state, so "
            "Ray's object store holds about 2 x workers messages whatever the cohort size")


def server_limits(kinds: dict, mem: float) -> dict[str, dict]:
    """Clients per round at which the server process's peak fills ``mem`` MiB: it holds
    every reply of the round (Flower's grid returns them all) until aggregation ends."""
    return {f"server memory, {kind} updates": {
        "clients": reach(m["peak_mib"], mem - m["base_rss_mib"]), "whole_round": True}
        for kind, m in kinds.items()}


def store_limits(stores: dict, mem: float, disk: float) -> dict[str, dict]:
    """Replies at which each SuperLink store fills memory (or disk, for SQLite). It holds
    replies until the ServerApp pulls them: at its measured storing rate, about
    ``PULL_S`` seconds' worth; the whole round only if the ServerApp stops pulling."""
    out = {}
    for key, m in stores.items():
        backend, kind = key.split("/")
        rate = 1 / m["store_s"]["b"] if m["store_s"]["b"] > 0 else None
        out[f"SuperLink store ({backend}), {kind} replies"] = {
            "clients": reach(m["growth"], mem if backend == "memory" else disk),
            "whole_round": False, "replies_per_s": rate,
            "held_between_pulls": PULL_S * rate if rate else None}
    return out


def limits(models: dict, machine: dict) -> dict[str, Any]:
    """Where each server-side resource runs out, and the first to run out among those
    that hold a whole round."""
    mem, disk = machine["memory_gib"] * 1024, machine["disk_free_gib"] * 1024
    found = {**server_limits(models["kinds"], mem),
             **store_limits(models["store"], mem, disk),
             "Ray's object store": {"clients": None, "whole_round": False, "note": RAY_NOTE}}
    whole = {k: v["clients"] for k, v in found.items() if v["whole_round"] and v["clients"]}
    first = min(whole, key=whole.get) if whole else None
    return {"resources": found, "first": first, "first_clients": whole.get(first),
            "memory_gib": machine["memory_gib"], "disk_free_gib": machine["disk_free_gib"]}


def analyse(results: dict) -> dict[str, Any]:
    """Every fit, the extrapolation to ``TARGET`` and the first bottleneck."""
    models = {"kinds": kind_models(results.get("points", [])),
              "store": store_models(results.get("store", [])),
              "link": link_model(results.get("link", {}))}
    return {**models, "limits": limits(models, results["machine"]), "target": TARGET}


# ----------------------------------------------------------------------------- plot

COLORS = {"dense": "C0", "seeds": "C1", "projections": "C2", "compressed": "C3"}


def _fit_line(ax: Any, fit: dict[str, float], xs: np.ndarray, color: str,
              scale: float = 1.0, style: str = "--") -> None:
    ax.plot(xs, (fit["a"] + fit["b"] * xs) * scale, style, color=color, lw=1)


def _plot_server(ax_t: Any, ax_m: Any, results: dict) -> None:
    xs = np.logspace(1, np.log10(TARGET), 60)
    for kind, model in results["fits"]["kinds"].items():
        done = [p for p in results["points"] if p["kind"] == kind and p["run"]]
        n, c = [p["clients"] for p in done], COLORS[kind]
        ax_t.plot(n, [p["aggregate_s"] for p in done], "o", color=c, label=kind)
        ax_m.plot(n, [p["peak_mib"] / 1024 for p in done], "o", color=c, label=kind)
        _fit_line(ax_t, model["aggregate_s"], xs, c)
        _fit_line(ax_m, model["peak_mib"], xs, c, 1 / 1024)
    store = results["fits"]["store"].get("memory/dense")
    if store:
        rows = [r for r in results["store"]
                if (r["backend"], r["kind"]) == ("memory", "dense") and r["run"]]
        ax_m.plot([r["replies"] for r in rows], [held_mib(r) / 1024 for r in rows], "s",
                  color="C7", label="SuperLink store in memory, dense")
        _fit_line(ax_m, store["growth"], xs, "C7", 1 / 1024)
    ax_m.axhline(results["machine"]["memory_gib"], color="k", lw=0.8)
    ax_m.text(12, results["machine"]["memory_gib"] * 1.2, "this machine's memory", size=7)
    ax_t.set(title="server: aggregate_train seconds", ylabel="seconds per round")
    ax_m.set(title="server: peak resident GiB above baseline", ylabel="GiB")


def _plot_store(ax: Any, results: dict) -> None:
    xs = np.logspace(1, np.log10(TARGET), 60)
    for key, model in results["fits"]["store"].items():
        backend, kind = key.split("/")
        rows = [r for r in results["store"]
                if (r["backend"], r["kind"]) == (backend, kind) and r["run"]]
        style = "s" if backend == "sqlite" else "o"
        ax.plot([r["replies"] for r in rows], [r["store_s"] for r in rows], style,
                color=COLORS[kind], label=f"{backend}, {kind}")
        _fit_line(ax, model["store_s"], xs, COLORS[kind], style=":" if style == "s" else "--")
    ax.set(title="SuperLink object store: seconds to store a round's replies",
           ylabel="seconds")


def _plot_link(ax: Any, link: dict, model: dict) -> None:
    rows = link.get("points", [])
    n = np.array([r["nodes"] for r in rows], float)
    ax.plot(n, [r["superlink_rss_mib"] for r in rows], "o", color="C0", label="RSS MiB")
    ax2 = ax.twinx()
    ax2.plot(n, [r["superlink_cpu_pct"] for r in rows], "^", color="C3", label="CPU %")
    if model:
        xs = np.linspace(0, max(n.max(), 1), 20)
        _fit_line(ax, model["superlink_rss_mib"], xs, "C0")
        _fit_line(ax2, model["superlink_cpu_pct"], xs, "C3")
    ax.set(xlabel="idle SuperNodes connected", ylabel="SuperLink RSS (MiB)",
           title="SuperLink with idle SuperNodes")
    ax2.set_ylabel("SuperLink CPU % (100 = one core)")
    ax.legend(loc="upper left", fontsize=7)
    ax2.legend(loc="lower right", fontsize=7)


def plot(results: dict, path: Path) -> None:
    """Measured points (markers) and fitted lines (dashed, out to ``TARGET``)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 9), layout="constrained")
    (ax_t, ax_m), (ax_s, ax_l) = fig.subplots(2, 2)
    _plot_server(ax_t, ax_m, results)
    _plot_store(ax_s, results)
    for ax, where in ((ax_t, "upper left"), (ax_m, "lower right"), (ax_s, "upper left")):
        ax.set(xscale="log", yscale="log", xlabel="clients (replies) per round")
        ax.axvline(TARGET, color="grey", lw=0.6)
        ax.legend(fontsize=7, loc=where)
    _plot_link(ax_l, results.get("link", {}), results["fits"]["link"])
    fig.suptitle(f"{results['machine']['cpus']}-core CPU, "
                 f"{results['machine']['memory_gib']:.0f} GiB: measured (markers), "
                 "fitted a + b·n (dashed, extrapolated to 10^5)")
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------- tables

def points_table(results: dict) -> str:
    """The README table of part ``points``."""
    rows = ["| update | clients | build s | configure s | **aggregate s** | inputs MiB | "
            "**peak MiB** | B up/client (payload) |", "|---|---|---|---|---|---|---|---|"]
    for p in results["points"]:
        if not p["run"]:
            rows.append(f"| {p['kind']} | {p['clients']:,} | not run: {p['reason']} ||||||")
            continue
        rows.append(f"| {p['kind']} | {p['clients']:,} | {p['build_s']:.2f} | "
                    f"{p['configure_s']:.2f} | **{p['aggregate_s']:.3f}** | "
                    f"{p['inputs_mib']:,.1f} | **{p['peak_mib']:,.1f}** | "
                    f"{p['up_bytes_per_client']:,.0f} ({p['payload_bytes_per_client']:,.0f}) |")
    return "\n".join(rows)


def store_table(results: dict) -> str:
    """The README table of part ``store``."""
    rows = ["| SuperLink store | replies of | replies | objects | pushed MiB | resident MiB | "
            "on disk MiB | store s |", "|---|---|---|---|---|---|---|---|"]
    for r in results.get("store", []):
        head = f"| {r['backend']} | {r['kind']} | {r['replies']:,} |"
        rows.append(f"{head} not run: {r['reason']} |||||" if not r["run"] else
                    f"{head} {r['objects']:,} | {r['pushed_bytes'] / MIB:,.2f} | "
                    f"{r['resident_mib']:,.1f} | {r['disk_mib']:,.1f} | {r['store_s']:.2f} |")
    return "\n".join(rows)


def link_table(results: dict) -> str:
    """The README table of part ``link``."""
    rows = ["| idle SuperNodes | SuperLink RSS MiB (USS) | SuperLink CPU % | per node RSS "
            "MiB (USS) | all nodes' CPU % | s until all activated |",
            "|---|---|---|---|---|---|"]
    for r in results.get("link", {}).get("points", []):
        node = (f"{r['node_rss_mib']:.0f} ({r['node_uss_mib']:.0f})" if r["nodes"]
                else "—")
        rows.append(f"| {r['nodes']} | {r['superlink_rss_mib']:.1f} "
                    f"({r['superlink_uss_mib']:.1f}) | {r['superlink_cpu_pct']:.1f} | "
                    f"{node} | {r['nodes_cpu_pct_total']:.1f} | {r['start_s']:.0f} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- main

def machine() -> dict[str, Any]:
    """What this machine is (the numbers are only about it)."""
    return {"cpus": os.cpu_count(), "memory_gib": psutil.virtual_memory().total / GIB,
            "disk_free_gib": shutil.disk_usage(tempfile.gettempdir()).free / GIB,
            "processor": platform.processor() or platform.machine(),
            "platform": platform.platform(), "python": platform.python_version(),
            "flwr": flwr.__version__, "device": "cpu"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["points", "store", "link"],
                   choices=["points", "store", "link"])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000, 10_000])
    p.add_argument("--memory-replies", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--sqlite-replies", type=int, nargs="+", default=[10, 30, 100])
    p.add_argument("--store-budget-s", type=float, default=90.0,
                   help="skip a store point predicted to take longer than this")
    p.add_argument("--nodes", type=int, nargs="+", default=[0, 5, 10, 20, 40])
    p.add_argument("--settle-s", type=float, default=30.0)
    p.add_argument("--cpu-window-s", type=float, default=10.0)
    p.add_argument("--point-timeout-s", type=float, default=900.0)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", type=Path, default=RESULTS / "scale_cost.json")
    p.add_argument("--table", action="store_true", help="print the README tables of --out")
    p.add_argument("--refit", action="store_true",
                   help="recompute the fits and the plot from the points in --out")
    p.add_argument("--point", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    p.add_argument("--store", nargs=3, metavar=("BACKEND", "KIND", "N"),
                   help=argparse.SUPPRESS)
    p.add_argument("--shapes", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_child(args: argparse.Namespace) -> None:
    """Inside a fresh interpreter: one point, printed as the last stdout line."""
    shapes = Shapes(**json.loads(args.shapes.read_text()))
    if args.point:
        point, _ = run_point(args.point[0], int(args.point[1]), shapes)
    else:
        point = store_point(args.store[0], args.store[1], int(args.store[2]), shapes)
    print(json.dumps(point), flush=True)


def merged(old: list[dict], new: list[dict], kinds: Sequence[str]) -> list[dict]:
    """``new`` rows in place of the old rows of ``kinds``; the others kept; in table order
    (store backend, then kind, then size)."""
    rows = [r for r in old if r["kind"] not in kinds] + new
    return sorted(rows, key=lambda r: (STORES.index(r.get("backend", "memory")),
                                       KINDS.index(r["kind"]), r.get("clients", 0),
                                       r.get("replies", 0)))


def run_parts(args: argparse.Namespace, results: dict, shapes_file: Path) -> None:
    """Measure the parts asked for into ``results``; each invocation's seconds per part
    are appended to ``results["runs"]``."""
    elapsed = {}
    for part in args.parts:
        t0 = time.monotonic()
        if part == "points":
            rows = measure_points(args.kinds, args.clients, shapes_file, args.point_timeout_s)
            results["points"] = merged(results.get("points", []), rows, args.kinds)
        elif part == "store":
            counts = {"memory": args.memory_replies, "sqlite": args.sqlite_replies}
            rows = measure_store(counts, args.kinds, shapes_file, args.point_timeout_s,
                                 args.store_budget_s)
            results["store"] = merged(results.get("store", []), rows, args.kinds)
        else:
            results["link"] = measure_link(args.nodes, args.settle_s, args.cpu_window_s)
        elapsed[part] = time.monotonic() - t0
    results.setdefault("runs", []).append({"parts": args.parts, "kinds": args.kinds,
                                           "elapsed_s": elapsed})


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.point or args.store:
        run_child(args)
        return
    if args.table or args.refit:
        results = json.loads(args.out.read_text())
        if args.refit:
            results["fits"] = analyse(results)
            args.out.write_text(json.dumps(results, indent=1))
            plot(results, args.out.with_suffix(".png"))
        if args.table:
            print("\n\n".join([points_table(results), store_table(results),
                                link_table(results)]))
        return
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    shapes = real_shapes(args.model)
    results.update(model_name=args.model, shapes=asdict(shapes), machine=machine(),
                   lora_params=shapes.lora_params)
    with tempfile.TemporaryDirectory(prefix="scale-cost-") as tmp:
        shapes_file = Path(tmp) / "shapes.json"
        shapes_file.write_text(json.dumps(asdict(shapes)))
        run_parts(args, results, shapes_file)
    results["fits"] = analyse(results)
    args.out.write_text(json.dumps(results, indent=1))
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps(results["fits"], indent=1))


if __name__ == "__main__":
    main()
