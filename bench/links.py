"""Wall-clock over real (emulated) links: what each method costs in seconds per round when
every node sits behind a rate-limited access link, not just in bytes.

For each method and link profile, a real deployment (SuperLink + 4 SuperNodes, TLS and
node authentication) runs across emulated hosts (``scripts/netfed.py``: one network
namespace per host, ``tbf`` rate limits) on the default task (bundled SmolLM2-135M,
bbc-news, Dirichlet 0.5). Per round it records the server's round time, the clients'
training time, fedpeft's message bytes and the bytes on the interfaces.

Compute and transfer are split by running every method once on ``lan`` (no limit): a
round's *compute* is its ``lan`` time (training, evaluation, aggregation; transfers at
bridge speed), and its *transfer* at a profile is the extra time over ``lan`` for the same
method and round. Accuracy is the held-out accuracy after each round; with a fixed
budget of rounds the best reached is reported (and the seconds to reach a target when
``--target`` is given and reached).

The SuperLink keeps its state in memory here: with its SQLite file, a reply push under
this load once failed with ``database is locked`` and that round waited for the round
timeout. Profiles (up/down, Mbit/s): ``phone`` 1/10, ``edge`` 10/50, ``lan`` unlimited, ``mixed``
lan, edge, phone, phone. Needs root and iproute2.

    python bench/links.py --rounds 2 --fedkseed-steps 50 --out bench/results/links.json \
        --plot bench/results/links.png -- eval.max_examples=30
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpeft import netdeploy  # noqa: E402
from fedpeft.netfed import MIXED, PROFILES, links_for  # noqa: E402

METHODS = {
    "lora": ["method=lora", "strategy=fedavg"],
    "lora+compeft": ["method=lora", "strategy=fedavg", "compression=compeft"],
    "fedkseed": ["method=fedkseed", "strategy=fedkseed"],
    "ferret": ["method=ferret", "strategy=ferret"],
}
PROFILE_NAMES = ["lan", "edge", "phone", "mixed"]
TIMES = "\u00d7"


def run_one(method: str, profile: str, args: argparse.Namespace) -> dict[str, Any]:
    """One deployment; its per-round rows from ``netfed.json`` and ``metrics.jsonl``."""
    run_id = f"links-{method.replace('+', '-')}-{profile}-{int(time.time())}"
    extra = [*METHODS[method], *args.method_overrides.get(method, []), *args.overrides,
             f"run.num_rounds={args.rounds}"]
    argv = ["--nodes", str(args.nodes), "--links", profile, "--output-dir", str(args.runs),
            "--run-id", run_id, "--memory-state", "--", *extra]
    t0 = time.perf_counter()
    code = netdeploy.main(argv)
    wall = time.perf_counter() - t0
    if code == 130:  # the user stopped this run: stop the benchmark, not just the run
        raise KeyboardInterrupt(f"{method} at {profile} was interrupted")
    run = Path(args.runs) / run_id
    if code != 0 or not (run / "netfed.json").exists():
        return {"method": method, "profile": profile, "failed": True, "exit": code}
    return summarize_run(method, profile, run, wall)


def summarize_run(method: str, profile: str, run: Path, wall: float) -> dict[str, Any]:
    """Per-round time, bytes and accuracy of one finished run."""
    net = json.loads((run / "netfed.json").read_text())
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rounds = [_round_row(rec, row) for rec, row in zip(records, net["rounds"], strict=False)
              if rec["round"] > 0]
    return {"method": method, "profile": profile, "run": run.name, "total_s": wall,
            "nodes": len(net["links"]) - 1,
            "links": net["links"], "acc0": records[0].get("eval_accuracy"),
            "rounds": rounds, "overhead_ratio": net["overhead_ratio"]}


def _round_row(rec: dict, row: dict) -> dict[str, Any]:
    return {"round": rec["round"], "wall_s": rec["wall_time_s"],
            "client_train_s": rec.get("client_train_s"), "eval_s": rec.get("eval_time_s"),
            "accuracy": rec.get("eval_accuracy"),
            "fedpeft_bytes": row["fedpeft_bytes_up"] + row["fedpeft_bytes_down"],
            "iface_bytes": row["iface_bytes_up"] + row["iface_bytes_down"],
            "iface_up": row["iface_bytes_up"], "iface_down": row["iface_bytes_down"],
            "reply_s": sorted(rec.get("reply_s", {}).values()),
            "reply_by_partition": _by_partition(rec)}


def _by_partition(rec: dict) -> dict[int, float]:
    """Reply seconds keyed by partition: partition ``i`` ran on host ``n<i>``."""
    parts = rec.get("partitions", {})
    return {int(parts[n]): s for n, s in rec.get("reply_s", {}).items() if n in parts}


def rebuild(runs: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Results of the finished runs under ``runs`` (the latest per method and profile)."""
    found: dict[tuple[str, str], Path] = {}
    for run in sorted(runs.glob("links-*"), key=lambda p: p.name.rsplit("-", 1)[-1]):
        if (run / "netfed.json").exists():
            method, profile = run.name[len("links-"):].rsplit("-", 2)[:2]
            found[(method.replace("lora-compeft", "lora+compeft"), profile)] = run
    return [summarize_run(m, p, found[(m, p)], float("nan"))
            for m in args.methods for p in args.profiles if (m, p) in found]


def split(results: list[dict], target: float | None) -> list[dict[str, Any]]:
    """The table: per method and profile, seconds per round split against ``lan``."""
    lan = {r["method"]: r for r in results if r["profile"] == "lan" and not r.get("failed")}
    table = []
    for r in results:
        if r.get("failed"):
            table.append({"method": r["method"], "profile": r["profile"], "failed": True})
            continue
        table.append(_split_row(r, lan.get(r["method"]), target))
    return table


def _steady(rounds: list[dict]) -> list[dict]:
    """Rounds after the first: round 1 of a deployment also starts every ClientApp
    process and loads the model there."""
    return rounds[1:] or rounds


def _split_row(r: dict, base: dict | None, target: float | None) -> dict[str, Any]:
    walls = [x["wall_s"] for x in _steady(r["rounds"])]
    compute = statistics.mean(x["wall_s"] for x in _steady(base["rounds"])) if base else None
    accs = [x["accuracy"] for x in r["rounds"] if x["accuracy"] is not None]
    return {"method": r["method"], "profile": r["profile"],
            "round_s": statistics.mean(walls), "compute_s": compute,
            "transfer_s": statistics.mean(walls) - compute if compute is not None else None,
            "round1_s": r["rounds"][0]["wall_s"],
            "link_bound_s": statistics.mean(link_bound(x, r["profile"], r["nodes"])
                                            for x in _steady(r["rounds"])),
            "client_train_s": statistics.mean(x["client_train_s"] or 0
                                              for x in _steady(r["rounds"])),
            "iface_mib_per_round": statistics.mean(x["iface_bytes"]
                                                   for x in _steady(r["rounds"])) / 2**20,
            "fedpeft_mib_per_round": statistics.mean(x["fedpeft_bytes"]
                                                     for x in _steady(r["rounds"])) / 2**20,
            **_replies(_steady(r["rounds"])),
            "reply_by_link": _by_link(_steady(r["rounds"]), r["profile"], r["nodes"]),
            "acc0": r["acc0"], "best_acc": max(accs) if accs else None,
            "rounds_to_target": _to_target(r["rounds"], target),
            "seconds_to_target": _seconds_to_target(r["rounds"], target)}


def _replies(rounds: list[dict]) -> dict[str, float | None]:
    """Mean seconds from the train push to the first and to the last reply. The round
    waits for the last; ``straggler_s`` (last - first) is how long the fastest node's
    finished update sat idle: what the slowest link or device costs everyone else."""
    got = [x["reply_s"] for x in rounds if x.get("reply_s")]
    if not got:  # runs recorded before reply times were
        return {"first_reply_s": None, "last_reply_s": None, "straggler_s": None}
    first, last = statistics.mean(g[0] for g in got), statistics.mean(g[-1] for g in got)
    return {"first_reply_s": first, "last_reply_s": last, "straggler_s": last - first}


def link_names(profile: str, nodes: int) -> list[str]:
    """The link profile name of each node (partition) ``0..nodes-1``."""
    names = list(MIXED) if profile == "mixed" else profile.split(",")
    return [names[i % len(names)] for i in range(nodes)]


def _by_link(rounds: list[dict], profile: str, nodes: int) -> dict[str, float]:
    """Mean reply seconds of the nodes on each link kind, over ``rounds``."""
    names, got = link_names(profile, nodes), {}
    for x in rounds:
        for pid, sec in x.get("reply_by_partition", {}).items():
            got.setdefault(names[int(pid) % nodes], []).append(sec)
    return {name: statistics.mean(v) for name, v in got.items()}


def straggler_markdown(table: list[dict]) -> str:
    """Heterogeneous links: when the nodes on each link kind replied, and how long their
    finished update waited for the round's last reply."""
    lines = ["| method | profile | node link | reply after s | waits for the last s |",
             "|---|---|---|---|---|"]
    for t in (t for t in table if len(t.get("reply_by_link") or {}) > 1):
        last = t["last_reply_s"]
        for name, sec in t["reply_by_link"].items():
            lines.append(f"| {t['method']} | {t['profile']} | {name} | {sec:.1f} | "
                         f"{last - sec:.1f} |")
    return "\n".join(lines)


def link_bound(row: dict, profile: str, nodes: int) -> float:
    """Seconds the slowest node needs to move its share of the round's interface bytes at
    its link's rates (each node's share taken as equal): the transfer time a round cannot
    beat, free of compute noise."""
    up, down = row["iface_up"] / nodes, row["iface_down"] / nodes
    return max((up * 8 / (link.up_kbit * 1000) if link.up_kbit else 0.0)
               + (down * 8 / (link.down_kbit * 1000) if link.down_kbit else 0.0)
               for link in links_for(profile, nodes))


def _to_target(rounds: list[dict], target: float | None) -> int | None:
    for x in rounds:
        if target is not None and (x["accuracy"] or 0) >= target:
            return x["round"]
    return None


def _seconds_to_target(rounds: list[dict], target: float | None) -> float | None:
    hit = _to_target(rounds, target)
    return None if hit is None else sum(x["wall_s"] for x in rounds if x["round"] <= hit)


def markdown(table: list[dict]) -> str:
    """The README table."""
    lines = ["| method | link | round 1 s | s/round after | compute s | transfer s (link bound)"
             " | vs LoRA | replies first → last s | MiB/round on the interfaces (fedpeft's)"
             " | acc r0 → best |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lora = {t["profile"]: t for t in table if t["method"] == "lora" and not t.get("failed")}
    for t in table:
        if t.get("failed"):
            lines.append(f"| {t['method']} | {t['profile']} | failed | | | | | | | |")
            continue
        ratio = t["round_s"] / lora[t["profile"]]["round_s"] if t["profile"] in lora else None
        times = f"{ratio:.2f}" + TIMES if ratio else ""
        lines.append(
            f"| {t['method']} | {t['profile']} | {t['round1_s']:.1f} | {t['round_s']:.1f} | "
            f"{_num(t['compute_s'])} | "
            f"{_num(t['transfer_s'], '+.1f')} ({t['link_bound_s']:.1f}) | {times} | "
            f"{_spread(t)} | "
            f"{t['iface_mib_per_round']:.2f} ({t['fedpeft_mib_per_round']:.2f}) | "
            f"{t['acc0']:.3f} → {t['best_acc']:.3f} |")
    return "\n".join(lines)


def target_markdown(table: list[dict], target: float) -> str:
    """Rounds and seconds (round 1 included) each run took to reach ``target``."""
    lines = [f"| method | link | rounds to {target:g} | seconds to {target:g} | best |",
             "|---|---|---|---|---|"]
    for t in (t for t in table if not t.get("failed")):
        hit = t["rounds_to_target"]
        lines.append(f"| {t['method']} | {t['profile']} | {hit or 'not reached'} | "
                     f"{_num(t['seconds_to_target'])} | {t['best_acc']:.3f} |")
    return "\n".join(lines)


def _spread(t: dict) -> str:
    if t.get("first_reply_s") is None:
        return ""
    return f"{t['first_reply_s']:.1f} → {t['last_reply_s']:.1f}"


def _num(value: float | None, fmt: str = ".1f") -> str:
    return "" if value is None else format(value, fmt)


def plot(table: list[dict], path: Path) -> None:
    """Stacked bars: compute and transfer seconds per round, per method, per profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [t for t in table if not t.get("failed")]
    methods = list(dict.fromkeys(t["method"] for t in rows))
    profiles = [p for p in PROFILE_NAMES if any(t["profile"] == p for t in rows)]
    fig, axes = plt.subplots(1, len(profiles), figsize=(4.5 * len(profiles), 3.8),
                             sharey=True, squeeze=False)
    for ax, profile in zip(axes[0], profiles, strict=True):
        got = {t["method"]: t for t in rows if t["profile"] == profile}
        # a round faster than its lan run (compute noise) is drawn at its measured height
        comp = [min(got[m]["compute_s"] or 0, got[m]["round_s"]) if m in got else 0
                for m in methods]
        trans = [max(got[m]["transfer_s"] or 0, 0) if m in got else 0 for m in methods]
        ax.bar(methods, comp, label="compute")
        ax.bar(methods, trans, bottom=comp, label="transfer (over lan)")
        unsplit = [got[m]["round_s"] if m in got and got[m]["compute_s"] is None else 0
                   for m in methods]
        if any(unsplit):
            ax.bar(methods, unsplit, color="grey", label="round (no lan run to split)")
        bound = [(got[m]["compute_s"] or 0) + got[m]["link_bound_s"] if m in got else 0
                 for m in methods]
        known = [m for m in methods if m in got and got[m]["compute_s"] is not None]
        ax.scatter(known, [b for b, m in zip(bound, methods, strict=True) if m in known],
                   marker="_", s=400, color="black", label="compute + link bound")
        ax.set_title(profile)
        ax.tick_params(axis="x", rotation=30)
    axes[0][0].set_ylabel("seconds per round (after round 1)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--profiles", nargs="+", default=PROFILE_NAMES)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--target", type=float, default=None, help="eval accuracy to reach")
    p.add_argument("--fedkseed-steps", type=int, default=None,
                   help="FedKSeed's local steps (default: its config's 200)")
    p.add_argument("--runs", default="runs/links")
    p.add_argument("--rebuild", action="store_true",
                   help="no new runs: rebuild the table from the run directories in --runs")
    p.add_argument("--out", default="bench/results/links.json")
    p.add_argument("--plot", default="bench/results/links.png")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = p.parse_args(argv)
    steps = [f"method.local_steps={args.fedkseed_steps}"] if args.fedkseed_steps else []
    args.method_overrides = {"fedkseed": steps}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.rebuild:
        results = rebuild(Path(args.runs), args)
    else:
        results = [run_one(m, p, args) for m in args.methods for p in args.profiles]
    table = split(results, args.target)
    out = {"machine": {"cpus": 2, "platform": platform.platform()},
           "profiles": {k: v.describe() for k, v in PROFILES.items()}, "mixed": list(MIXED),
           "nodes": args.nodes, "rounds": args.rounds, "target": args.target,
           "overrides": args.overrides,
           "method_overrides": args.method_overrides, "table": table, "runs": results}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(markdown(table))
    if args.target is not None:
        print(target_markdown(table, args.target))
    print(straggler_markdown(table))
    plot(table, Path(args.plot))
    return 0 if not any(t.get("failed") for t in table) else 1


if __name__ == "__main__":
    sys.exit(main())
