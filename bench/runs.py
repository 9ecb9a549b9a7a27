"""Shared by the benchmarks that start real runs: one ``fedpeft simulate`` and what its
run directory says (final quality, ε, bytes on the wire)."""

from __future__ import annotations

import time
from pathlib import Path

from fedpeft import cli
from fedpeft.reporting import RunDir

ROOT = Path(__file__).resolve().parents[1]


def simulate(overrides: list[str], out: Path, tag: str) -> dict:
    """Run ``fedpeft simulate`` with ``overrides`` into ``out/<tag>-<time>``; its final
    quality, ε and traffic. Stops the caller's sweep on an interrupted run (exit 130)."""
    run_id = f"{tag}-{int(time.time())}"
    t0 = time.perf_counter()
    code = cli.main(["simulate", *overrides, f"run.output_dir={out}", f"run.run_id={run_id}",
                     "--app", str(ROOT)])
    if code == 130:  # interrupted (Ctrl-C, SIGTERM): stop the sweep, keep what is written
        raise SystemExit(130)
    run = RunDir(out / run_id)
    records = run.records()
    last = records[-1] if records else {}
    privacy = last.get("privacy") or {}
    return {"overrides": overrides, "run_id": run_id, "exit": code,
            "seconds": time.perf_counter() - t0, "rounds": last.get("round"),
            "eval_accuracy": last.get("eval_accuracy"), "eval_loss": last.get("eval_loss"),
            "epsilon_rdp": privacy.get("epsilon_rdp"), "epsilon_prv": privacy.get("epsilon_prv"),
            **traffic(records), "status": run.status().get("state")}


def traffic(records: list[dict]) -> dict:
    """Bytes summed over every round and client: framed and payload, up and down."""
    keys = ("bytes_up", "payload_bytes_up", "bytes_down", "payload_bytes_down")
    return {f"total_{k}": sum(sum((r.get(k) or {}).values()) for r in records) for k in keys}
