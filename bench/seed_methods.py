"""LoRA-FedAvg vs FedKSeed vs Ferret on bbc-news (Dirichlet non-IID), one script, one machine.

Each method runs as a real ``fedpeft simulate`` (Flower simulation: SuperLink + Ray) on the
bundled SmolLM2-135M with the same clients, partitions, rounds and held-out split, and the
script reads each run's ``metrics.jsonl``:

- bytes per client per round, up and down: serialized Flower messages (framing included),
  and the raw payload of the upload;
- seconds per round: client (local training, plus projection for Ferret, mean over
  clients), server aggregation (strategy) and server apply (bringing the server's model to
  the new global: LoRA loads arrays, FedKSeed/Ferret replay seeds);
- held-out answer loss and topic accuracy at round 0 and after the last round.

Usage::

    python bench/seed_methods.py --rounds 3 --clients 3 --out bench/results/seed_methods.json

Per-method settings are in ``METHODS`` below (sized for a 2-core CPU; see the README).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> overrides. FedKSeed and Ferret tune full parameters of a subset that a CPU can
# perturb/project hundreds of times per round; LoRA uses the default adapter.
METHODS: dict[str, list[str]] = {
    "lora-fedavg": ["method=lora", "strategy=fedavg"],
    "fedkseed": ["method=fedkseed", "strategy=fedkseed", "method.num_seeds=4096",
                 "method.local_steps=200", "method.lr=2e-5", "method.eps=1e-3",
                 "method.trainable='layers\\.2[4-9]\\.mlp\\.down_proj'"],
    "ferret": ["method=ferret", "strategy=ferret", "method.num_bases=8192",
               "method.local_steps=10", "method.batch_size=4", "method.lr=1e-3",
               "strategy.global_lr=3.0"],
}


def run(name: str, extra: list[str], args: argparse.Namespace) -> dict:
    """One ``fedpeft simulate`` run; returns its per-round records and wall time."""
    run_id = f"bench-{name}-{int(time.time())}"
    overrides = [*extra, f"run.num_rounds={args.rounds}", f"sim.num_clients={args.clients}",
                 f"strategy.min_train_nodes={args.clients}",
                 f"strategy.min_available_nodes={args.clients}", "sim.client_cpus=1",
                 f"run.output_dir={args.runs}", f"run.run_id={run_id}", "run.checkpoint=false"]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedpeft.cli", "simulate", *overrides,
                    "--app", str(ROOT)], check=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    lines = (Path(args.runs) / run_id / "metrics.jsonl").read_text().splitlines()
    return {"overrides": extra, "wall_s": wall, "records": [json.loads(x) for x in lines]}


def summarize(result: dict) -> dict:
    """Per-client-per-round means over training rounds, and first/last evaluation."""
    rounds = [r for r in result["records"] if r["round"] > 0]

    def mean_of(key: str) -> float:
        values = [v for r in rounds for v in r.get(key, {}).values()]
        return statistics.fmean(values) if values else float("nan")

    def mean_field(key: str) -> float | None:
        values = [r[key] for r in rounds if r.get(key) is not None]
        return statistics.fmean(values) if values else None

    first, last = result["records"][0], result["records"][-1]
    return {
        "bytes_up": mean_of("bytes_up"), "payload_up": mean_of("payload_bytes_up"),
        "bytes_down": mean_of("bytes_down"),
        "payload_down": mean_of("payload_bytes_down"), "client_s": mean_field("client_train_s"),
        "server_aggregate_s": mean_field("server_aggregate_s"),
        "server_apply_s": mean_field("server_apply_s"),
        "round_wall_s": mean_field("wall_time_s"),
        "loss_0": first["eval_loss"], "loss_last": last["eval_loss"],
        "acc_0": first["eval_accuracy"], "acc_last": last["eval_accuracy"],
        "losses": [r["eval_loss"] for r in result["records"]],
    }


def table(summary: dict[str, dict], rounds: int) -> str:
    """Markdown table (bytes per client per round; seconds per round)."""
    head = ("| method | up B/client (payload) | down B/client (payload) | client s | server agg s "
            f"| server apply s | loss r0→r{rounds} | acc r0→r{rounds} |")
    rows = [head, "|" + "---|" * 8]
    for name, s in summary.items():
        rows.append(
            f"| {name} | {s['bytes_up']:,.0f} ({s['payload_up']:,.0f}) "
            f"| {s['bytes_down']:,.0f} ({s.get('payload_down', float('nan')):,.0f}) "
            f"| {s['client_s']:.1f} | {s['server_aggregate_s']:.3f} | {s['server_apply_s']:.2f} "
            f"| {s['loss_0']:.3f}→{s['loss_last']:.3f} | {s['acc_0']:.3f}→{s['acc_last']:.3f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every method")
    parser.add_argument("--merge", action="store_true",
                        help="re-run --methods only and keep the others' results from --out")
    parser.add_argument("--runs", default=str(ROOT / "bench" / "results" / "runs"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "seed_methods.json"))
    args = parser.parse_args()
    out = Path(args.out)
    previous = json.loads(out.read_text()) if args.merge and out.exists() else {}
    if previous and (previous["rounds"], previous["clients"]) != (args.rounds, args.clients):
        raise SystemExit(f"--merge: {out} has other rounds/clients")
    results = previous.get("runs", {})
    for name in args.methods.split(","):
        results[name] = run(name, [*METHODS[name], *args.extra], args)
    results = {n: results[n] for n in METHODS if n in results}  # table order
    summary = {n: summarize(r) for n, r in results.items()}
    md = table(summary, args.rounds)
    print(md)
    out.write_text(json.dumps({"rounds": args.rounds, "clients": args.clients,
                               "summary": summary, "table": md, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
