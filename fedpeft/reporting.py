"""Run directories: metrics JSONL, run status, resolved config, checkpoints.

Layout of ``<output_dir>/<run-id>/``::

    config.json        the validated config tree and the overrides that produced it
    metrics.jsonl      one RoundRecord per line (round 0 = the model before training)
    status.json        {"state": "starting" | "running" | "completed" | "failed" |
                        "interrupted", ...}
    checkpoints/round-0003/   the global trainable state after round 3 (method format)
    observations/round-0003/  what the server saw of each captured client in round 3
                              (only with ``capture.rounds``; format: ``fedpeft.capture``)

``status.json`` is what entry points check: ``flwr run`` can exit 0 when a run failed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedpeft.errors import ConfigError, RunFailed
from fedpeft.types import RoundRecord

_CKPT = re.compile(r"round-(\d+)$")


class RunDir:
    """One run's output directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, output_dir: str, run_id: str | None, tag: str) -> RunDir:
        """Create ``output_dir/run_id`` (default id: UTC timestamp + tag)."""
        if run_id is None:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
            run_id = f"{stamp}-{tag}"
        path = Path(output_dir).expanduser().resolve() / run_id
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_json(self, name: str, obj: Any) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        tmp.replace(self.path / name)

    def set_status(self, state: str, **info: Any) -> None:
        self.write_json("status.json", {"state": state, "time": time.time(), **info})

    def status(self) -> dict[str, Any]:
        path = self.path / "status.json"
        return json.loads(path.read_text()) if path.exists() else {"state": "missing"}

    def append(self, record: RoundRecord) -> None:
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(_clean(dataclasses.asdict(record))) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def checkpoint_dir(self, server_round: int) -> Path:
        return self.path / "checkpoints" / f"round-{server_round:04d}"

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        root = self.path / "checkpoints"
        found = [(int(m.group(1)), p) for p in root.glob("round-*")
                 if (m := _CKPT.search(p.name)) and (p / ".complete").exists()]
        return max(found) if found else None


def resolve_resume(resume: str) -> tuple[RunDir, int, Path]:
    """``run.resume`` -> (run dir, last completed round, checkpoint path)."""
    path = Path(resume).expanduser().resolve()
    if _CKPT.search(path.name):  # a checkpoint directory was given
        run = RunDir(path.parent.parent)
        return run, int(_CKPT.search(path.name).group(1)), path  # type: ignore[union-attr]
    run = RunDir(path)
    latest = run.latest_checkpoint()
    if latest is None:
        raise ConfigError(f"run.resume={resume!r}: no completed checkpoint under {path}")
    return run, latest[0], latest[1]


def check_completed(run: RunDir) -> None:
    """Raise RunFailed unless the run's status says it completed."""
    status = run.status()
    if status.get("state") != "completed":
        raise RunFailed(f"run {run.path.name} did not complete: {status}")


def format_progress(rec: RoundRecord, num_rounds: int) -> str:
    """One human line per round."""
    parts = [f"[round {rec.round}/{num_rounds}]"]
    for key in ("train_loss", "eval_loss", "eval_accuracy"):
        val = getattr(rec, key)
        if val is not None:
            parts.append(f"{key}={val:.4f}")
    up, down = sum(rec.bytes_up.values()), sum(rec.bytes_down.values())
    if up or down:
        parts.append(f"up={up / 2**20:.2f}MiB down={down / 2**20:.2f}MiB")
    if rec.num_rejected:
        parts.append(f"rejected={rec.num_rejected}")
    if rec.privacy:
        parts.append(f"eps={_eps(rec.privacy.get('epsilon_rdp'))}(rdp)/"
                     f"{_eps(rec.privacy.get('epsilon_prv'))}(prv)")
    dropped = [e for e in getattr(rec, "excluded", []) if e.get("by") != "decoder"]
    if dropped:
        parts.append(f"excluded={len(dropped)}")
    parts.append(f"{rec.wall_time_s:.1f}s")
    return " ".join(parts)


def _eps(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj
