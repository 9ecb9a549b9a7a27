"""Observations: what the server saw of one client in one round, on disk.

A privacy audit attacks exactly what an honest-but-curious server observes, so the
server can save it (``capture:`` config; ``strategies/observer.py`` does the saving).
One observation per (round, partition)::

    <dir>/round-0001/partition-0003.npz    arrays: received/<name>  (the reply's arrays as
                                                   they crossed the wire, dtype kept)
                                                   global/<name>    (what the server sent
                                                   that client for that round)
    <dir>/round-0001/partition-0003.json   round, partition, node, kind, rejected,
                                           metrics (the reply's: num-examples, train_loss,
                                           dp_* ...), config (the round's train config)

A reply from a client whose partition is unknown is stored as ``node-<id>``. ``kind`` says
how to read ``received``: ``dense`` (tensor deltas), ``compressed`` (one ``uint8`` blob
of the run's codec), ``seed`` (FedKSeed seed indices and scalars) or ``projected``
(Ferret seed, block counts, coordinates). ``rejected`` is the server's reason when it
refused the update (it was still observed).

Arrays are written with ``np.savez`` without pickling and read back with
``allow_pickle=False``; each file is written to a temporary name and renamed, so a reader
never sees half a file, and the JSON sidecar is written last. **Observations hold the
clients' updates as received: they are as sensitive as the updates themselves** (under no
or weak DP they can reveal training text); keep them where the updates may be kept.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

OBSERVATIONS_DIR = "observations"  # default location inside a run directory
KINDS = ("dense", "compressed", "seed", "projected")
RECEIVED, GLOBAL = "received/", "global/"
FORMAT = 1


@dataclass(frozen=True)
class CapturedUpdate:
    """One observation: a client's reply in one round and what it had been sent."""

    round: int
    partition: int | None
    node: int
    kind: str
    received: dict[str, np.ndarray]
    sent_global: dict[str, np.ndarray]
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    rejected: str | None = None  # the server's reason for refusing it (None: accepted)

    @property
    def stem(self) -> str:
        """File name without suffix: ``partition-0003`` (``node-<id>`` if unknown)."""
        return f"partition-{self.partition:04d}" if self.partition is not None else (
            f"node-{self.node}")


def round_dir(root: str | Path, rnd: int) -> Path:
    """``<root>/round-0001``: the observations of round ``rnd``."""
    return Path(root) / f"round-{rnd:04d}"


def write_observation(root: str | Path, update: CapturedUpdate) -> Path:
    """Write ``update`` under ``root`` (see module docstring); return the ``.npz`` path."""
    if update.kind not in KINDS:
        raise ValueError(f"observation kind must be one of {KINDS}, found {update.kind!r}")
    folder = round_dir(root, update.round)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {**{RECEIVED + k: v for k, v in update.received.items()},
              **{GLOBAL + k: v for k, v in update.sent_global.items()}}
    npz = folder / f"{update.stem}.npz"
    _atomic(npz, lambda fh: np.savez(fh, allow_pickle=False, **arrays))
    text = json.dumps(_sidecar(update), indent=1, allow_nan=False)
    _atomic(folder / f"{update.stem}.json", lambda fh: fh.write(text.encode()))
    return npz


def _sidecar(update: CapturedUpdate) -> dict[str, Any]:
    return {"format": FORMAT, "round": update.round, "partition": update.partition,
            "node": update.node, "kind": update.kind, "rejected": update.rejected,
            "metrics": _json_safe(update.metrics), "config": _json_safe(update.config),
            "arrays": f"{update.stem}.npz"}


def _atomic(path: Path, write: Any) -> None:
    """Write ``path`` through a temporary file in the same folder, then rename it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _json_safe(value: Any) -> Any:
    """Plain JSON: non-finite floats become null, numpy scalars Python numbers, bytes
    hex text, tuples lists."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return value.hex()
    return value


def read_observations(root: str | Path) -> list[CapturedUpdate]:
    """Every observation under ``root``, sorted by (round, partition); an unknown
    partition sorts last in its round."""
    found = [read_observation(p) for p in sorted(Path(root).glob("round-*/*.json"))]
    return sorted(found, key=lambda u: (u.round, u.partition is None, u.partition or 0,
                                        u.node))


def read_observation(sidecar: str | Path) -> CapturedUpdate:
    """One observation from its JSON sidecar and the ``.npz`` next to it."""
    path = Path(sidecar)
    meta = json.loads(path.read_text())
    with np.load(path.with_name(meta["arrays"]), allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return CapturedUpdate(
        round=meta["round"], partition=meta["partition"], node=meta["node"],
        kind=meta["kind"], received=_strip(arrays, RECEIVED),
        sent_global=_strip(arrays, GLOBAL), metrics=meta["metrics"], config=meta["config"],
        rejected=meta["rejected"])


def _strip(arrays: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
