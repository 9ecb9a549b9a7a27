"""Client-side state for seed-based methods (FedKSeed, Ferret): bring this node's copy of the
global model to the round the server expects, exactly, before local training.

The global model is the replay of every round's aggregate from the base weights, and every
party that replays round r holds the same bits. So snapshots are keyed by *round*, not by
node: ``seed-state/<run>/round-NNNNN.safetensors`` (written atomically). A node asked to
train at round r with history "after round s" loads the newest snapshot v with
s <= v <= r-1, replays rounds v+1 .. r-1 from the message and writes snapshot r-1 if nobody
has yet. In simulation, where many virtual clients share one disk, only the first client of
a round replays and the disk holds one copy per round (the newest few are kept) instead of
one per node; a SuperNode on its own machine keeps its own. Local training then changes the
model in place; the next message restores from a snapshot, so no exact undo is needed. If no
usable snapshot exists (pruned, or the disk was wiped) the client fails with a clear error;
the strategy then forgets the node's sync point and sends it the full history next time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedpeft import wire
from fedpeft.errors import ConfigError
from fedpeft.models import cache_root

KEEP_ROUNDS = 3  # newest round snapshots kept besides the base (round 0)


def state_dir(model_cfg: Any, run_id: int) -> Path:
    return cache_root(model_cfg) / "seed-state" / str(run_id)


def snapshot_path(directory: Path, version: int) -> Path:
    return directory / f"round-{version:05d}.safetensors"


def base_path(model_cfg: Any, key: str) -> Path:
    """Where a process keeps the untouched trainable state of its attached model."""
    digest = hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
    return cache_root(model_cfg) / "seed-state" / f"base-{digest}.safetensors"


def save_base(method: Any, model: Any, path: Path) -> None:
    """Snapshot the freshly attached model (before any training in this process), so a
    run's round 0 is the true base even if this process trained for an earlier run.
    Written on every process start (atomically; concurrent writers write the same bits)."""
    _save(method, model, path, 0)


def _versions(directory: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in directory.glob("round-*.safetensors"))


def _save(method: Any, model: Any, path: Path, version: int) -> None:
    """Write the tuned tensors with the round they hold, atomically (tmp + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tensors = {k: v.detach().contiguous() for k, v in method.params(model).items()}
    save_file(tensors, str(tmp), metadata={"version": str(version)})
    os.replace(tmp, path)


def _load(method: Any, model: Any, path: Path) -> int:
    """Restore the snapshot at ``path``; returns the round it holds."""
    with safe_open(str(path), framework="pt") as f:
        version = int((f.metadata() or {}).get("version", 0))
    method.set_state(model, {k: v.numpy() for k, v in load_file(str(path)).items()})
    return version


def _prune(directory: Path) -> None:
    for version in _versions(directory)[1:-KEEP_ROUNDS]:
        snapshot_path(directory, version).unlink(missing_ok=True)


def sync_node(method: Any, model: Any, msg: Any, model_cfg: Any, run_id: int,
              node_id: int, base: Path) -> dict[str, np.ndarray]:
    """Restore + catch up + snapshot; returns the message arrays (e.g. Pro ``probs``).

    ``base`` is the :func:`save_base` snapshot of this (model, method, seed)."""
    arrays = wire.from_arrayrecord(msg.content[wire.ARRAYS_KEY])
    conf = msg.content[wire.CONFIG_KEY]
    since, target = int(conf["since"]), int(conf["target"])
    directory = state_dir(model_cfg, run_id)
    if not snapshot_path(directory, 0).exists():  # first use in this run: the untouched base
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".base.{os.getpid()}.tmp"
        shutil.copyfile(base, tmp)
        os.replace(tmp, snapshot_path(directory, 0))
    usable = [v for v in _versions(directory) if since <= v <= target]
    if not usable:
        raise ConfigError(f"node {node_id}: no snapshot of a round in [{since}, {target}] "
                          f"under {directory} (have {_versions(directory)}); the server will "
                          "send the full history next round")
    version = _load(method, model, snapshot_path(directory, usable[-1]))
    method.catch_up(model, arrays, version, target)
    if version != target:
        _save(method, model, snapshot_path(directory, target), target)
        _prune(directory)
    return arrays
