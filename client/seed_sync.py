"""Client-side state for seed-based methods (FedKSeed): bring this node's copy of the
global model to the round the server expects, exactly, before local training.

The global model is the replay of every round's aggregate from the base weights. A node
keeps, on local disk, its tuned tensors at the last round it replayed (one snapshot per
node, written atomically), so a fresh ClientApp process (deployment) or a worker shared
by many virtual clients (simulation) restores the node's state, applies only the rounds it
missed (sent by the server) and snapshots again. Local training then perturbs the model in
place; the next message restores from the snapshot, so no exact undo is needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load_file, save_file

from fedpeft import wire
from fedpeft.errors import ConfigError
from fedpeft.models import cache_root
from strategies.seed_accumulator import split_rounds

HIST_KEYS = ("hist_round", "hist_idx", "hist_val")


def node_dir(model_cfg: Any, run_id: int, node_id: int) -> Path:
    return cache_root(model_cfg) / "seed-state" / str(run_id) / str(node_id)


def _save(method: Any, model: Any, path: Path, version: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tensors = {k: v.detach().contiguous() for k, v in method.params(model).items()}
    save_file(tensors, str(tmp), metadata={"version": str(version)})
    os.replace(tmp, path)


def _load(method: Any, model: Any, path: Path) -> int:
    state = load_file(str(path))
    method.set_state(model, {k: v.numpy() for k, v in state.items()})
    return int(json.loads((path.parent / "version.json").read_text())["version"]) if (
        path.parent / "version.json").exists() else 0


def sync_node(method: Any, model: Any, msg: Any, model_cfg: Any, run_id: int,
              node_id: int) -> dict[str, np.ndarray]:
    """Restore + catch up + snapshot; returns the message arrays (e.g. Pro ``probs``)."""
    arrays = wire.from_arrayrecord(msg.content[wire.ARRAYS_KEY])
    conf = msg.content[wire.CONFIG_KEY]
    since, target = int(conf["since"]), int(conf["target"])
    base = node_dir(model_cfg, run_id, "base")
    node = node_dir(model_cfg, run_id, node_id)
    if not (base / "w.safetensors").exists():  # first use in this run: the untouched base
        _save(method, model, base / "w.safetensors", 0)
    version = _load(method, model, node / "w.safetensors") if (
        node / "w.safetensors").exists() else _load(method, model, base / "w.safetensors")
    if since > version:
        raise ConfigError(f"node {node_id} holds round {version} but the server sent rounds "
                          f"after {since}; its local state was lost")
    for rnd, idx, vals in split_rounds(*(arrays[k] for k in HIST_KEYS)):
        if version < rnd <= target:
            method.replay(model, idx, vals)
    _save(method, model, node / "w.safetensors", target)
    (node / "version.json").write_text(json.dumps({"version": target}))
    return arrays
