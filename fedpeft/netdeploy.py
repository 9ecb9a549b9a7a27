"""A fedpeft deployment across emulated hosts: the SuperLink (with the ServerApp and the
``flwr run`` control side) in one network namespace, each SuperNode in its own, joined by a
bridge, with per-node ``tbf`` rate limits (:mod:`fedpeft.netfed`).

    python scripts/netfed.py --nodes 3 --links phone -- model=tiny-llama run.num_rounds=2
    python scripts/netfed.py --nodes 4 --links mixed --plain -- method=fedkseed

By default the deployment uses TLS and SuperNode authentication (certificates and keys
made by :mod:`fedpeft.pki`, nodes registered with ``flwr supernode register``); ``--plain``
turns both off, for trials. While it runs, every host's interface counters are sampled;
each time the ServerApp appends a round to ``metrics.jsonl`` the counters are cut, so each
round gets the bytes that crossed the interfaces beside fedpeft's own message bytes. The
difference (gRPC framing, TLS, TCP/IP headers, heartbeats, app download) is reported as
overhead. The result goes to ``<run dir>/netfed.json``. Everything started is stopped and
the namespaces deleted on exit, error, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedpeft.deploy import CONNECTION, ROOT, Federation, finish, register, superlink_command
from fedpeft.deploy import supernode_command as _supernode_command
from fedpeft.launch import run_config_string, run_guarded, wait_final, write_connection
from fedpeft.netfed import Link, NetFed, links_for, wait_port_in
from fedpeft.pki import make_deployment
from fedpeft.procs import RunWorkspace, tool_path
from fedpeft.reporting import RunDir

FLEET_PORT, CONTROL_PORT = 9092, 9093
SERVER = "link"


def node_name(i: int) -> str:
    return f"n{i}"


class Meter(threading.Thread):
    """Samples every host's counters; cuts them whenever ``metrics.jsonl`` grows."""

    def __init__(self, net: NetFed, metrics: Path, every_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.net, self.metrics, self.every_s = net, metrics, every_s
        self.cuts: list[dict[str, tuple[int, int]]] = []  # cuts[r]: counters as round r landed
        self.start_counters = net.counters()
        self.done = threading.Event()

    def _lines(self) -> int:
        return len(self.metrics.read_text().splitlines()) if self.metrics.exists() else 0

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            time.sleep(self.every_s)

    def sample(self) -> None:
        lines, now = self._lines(), self.net.counters()
        while len(self.cuts) < lines:
            self.cuts.append(now)

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)
        self.sample()


def threads_env(threads: int | None) -> list[str]:
    """``env`` prefix capping a node's math threads (None: leave the default)."""
    if threads is None:
        return []
    return ["env", f"OMP_NUM_THREADS={threads}", f"MKL_NUM_THREADS={threads}"]


def start_federation(ws: RunWorkspace, net: NetFed, nodes: int, logs: Path,
                     secure: bool = True, threads: int | None = None,
                     memory_state: bool = False) -> Federation:
    """SuperLink in the server namespace, ``nodes`` SuperNodes in theirs; with ``secure``
    TLS (certificate for the server's emulated address) and registered node keys. Each
    node's ClientApps use ``threads`` math threads: emulated hosts share this machine's
    cores, and more threads than cores slow every one of them down. ``memory_state`` runs
    the SuperLink without ``--database``: no restart survival, but no SQLite write lock
    (under heavy load Flower 1.39's SQLite state can fail a node's reply push with
    ``database is locked``, and that reply is lost)."""
    addr = net.hosts[SERVER].addr
    pki = make_deployment(ws.path / "pki", ["127.0.0.1", addr], nodes) if secure else None
    db = None if memory_state else ws.path / "superlink.db"
    fed = Federation(FLEET_PORT, CONTROL_PORT, db, pki, secure, host=addr)
    fed.link = ws.start(net.exec(SERVER, superlink_command(fed)), logs / "superlink.log")
    wait_port_in(net, SERVER, CONTROL_PORT, proc=fed.link)
    wait_port_in(net, SERVER, FLEET_PORT, proc=fed.link, addr=addr)
    write_connection(ws.flwr_home, f"127.0.0.1:{CONTROL_PORT}", CONNECTION,
                     pki.ca_cert if pki else None)
    for i in range(nodes):
        if secure:
            register(ws, fed, i, wrap=lambda cmd: net.exec(SERVER, cmd))
        cmd = [*threads_env(threads), *_supernode_command(fed, i, nodes)]
        ws.start(net.exec(node_name(i), cmd), logs / f"supernode-{i}.log")
    return fed


def traffic(records: list[dict[str, Any]], cuts: list[dict[str, tuple[int, int]]],
            start: dict[str, tuple[int, int]], nodes: list[str]) -> list[dict[str, Any]]:
    """Per round: fedpeft's message bytes up/down beside the nodes' interface bytes
    (sent = up, received = down) between the previous round's line and this one's."""
    rows = []
    for r, rec in enumerate(records):
        before = cuts[r - 1] if r > 0 else start
        if r >= len(cuts):
            break
        up = sum(cuts[r][n][1] - before[n][1] for n in nodes)
        down = sum(cuts[r][n][0] - before[n][0] for n in nodes)
        msg_up, msg_down = sum(rec["bytes_up"].values()), sum(rec["bytes_down"].values())
        rows.append({"round": rec["round"], "wall_time_s": rec["wall_time_s"],
                     "client_train_s": rec.get("client_train_s"),
                     "fedpeft_bytes_up": msg_up, "fedpeft_bytes_down": msg_down,
                     "iface_bytes_up": up, "iface_bytes_down": down,
                     "overhead_bytes": (up + down) - (msg_up + msg_down)})
    return rows


def summarize(run: RunDir, meter: Meter, net_links: dict[str, Link], secure: bool) -> dict:
    """``netfed.json``: links, per-round traffic, totals."""
    nodes = [n for n in net_links if n != SERVER]
    records = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    rows = traffic(records, meter.cuts, meter.start_counters, nodes)
    total_msg = sum(r["fedpeft_bytes_up"] + r["fedpeft_bytes_down"] for r in rows)
    total_if = sum(r["iface_bytes_up"] + r["iface_bytes_down"] for r in rows)
    return {"secure": secure, "links": {n: link.describe() for n, link in net_links.items()},
            "rounds": rows, "fedpeft_bytes": total_msg, "iface_bytes": total_if,
            "overhead_ratio": (total_if / total_msg) if total_msg else None}


def run(args: argparse.Namespace) -> int:
    """Build the hosts, deploy, run, measure, tear everything down; 0 only if completed."""
    out = Path(args.output_dir).resolve()
    run_id = args.run_id or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-netfed"
    run_dir, logs = RunDir(out / run_id), out / f"{run_id}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    links = {SERVER: Link(), **{node_name(i): link for i, link in
                                enumerate(links_for(args.links, args.nodes))}}
    net, ws = NetFed(list(links), list(links.values())), RunWorkspace(prefix="fedpeft-nf-")
    overrides = [*args.overrides, f"run.output_dir={out}", f"run.run_id={run_id}"]
    meters: list[Meter] = []

    def body() -> int:
        net.up()
        start_federation(ws, net, args.nodes, logs, secure=not args.plain,
                         threads=args.threads or max(1, (os.cpu_count() or 1) // args.nodes),
                         memory_state=args.memory_state)
        meters.append(Meter(net, run_dir.metrics_path))
        meters[0].start()
        code = _flwr_run(ws, net, args, overrides)
        wait_final(run_dir)
        return code

    def cleanup() -> None:
        for meter in meters:
            meter.stop()
        ws.stop()
        net.down()
        ws.remove()

    code, reason = run_guarded(body, cleanup)
    meter = meters[0] if meters else None
    return _report(run_dir, meter, links, not args.plain, code, reason, logs)


def _flwr_run(ws: RunWorkspace, net: NetFed, args: argparse.Namespace,
              overrides: list[str]) -> int:
    cmd = [tool_path("flwr"), "run", str(args.app), CONNECTION, "--stream", "--run-config",
           f"overrides={run_config_string(overrides)}"]
    proc = ws.start_foreground(net.exec(SERVER, cmd))
    return proc.wait(timeout=args.timeout)


def _report(run_dir: RunDir, meter: Meter | None, links: dict[str, Link], secure: bool,
            code: int | None, reason: str | None, logs: Path) -> int:
    result = finish(run_dir, code, reason, logs)
    if meter is not None and run_dir.metrics_path.exists():
        summary = summarize(run_dir, meter, links, secure)
        run_dir.write_json("netfed.json", summary)
        print(format_table(summary))
    return result


def format_table(summary: dict) -> str:
    """The per-round traffic as text."""
    lines = ["round  wall s  fedpeft up/down (B)    interfaces up/down (B)   overhead"]
    for r in summary["rounds"]:
        lines.append(f"{r['round']:>5}  {r['wall_time_s']:6.1f}  {r['fedpeft_bytes_up']:>10} /"
                     f"{r['fedpeft_bytes_down']:>10}  {r['iface_bytes_up']:>10} /"
                     f"{r['iface_bytes_down']:>10}  {r['overhead_bytes']:>10}")
    ratio = summary["overhead_ratio"]
    lines.append(f"interfaces / fedpeft messages: {ratio:.3f}" if ratio else "no traffic")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--links", default="lan", help="phone, edge, lan, mixed, '<up>/<down>' "
                   "in Mbit/s ('-' unlimited), or a comma list cycled over the nodes")
    p.add_argument("--plain", action="store_true", help="no TLS, no node authentication")
    p.add_argument("--app", default=str(ROOT))
    p.add_argument("--output-dir", default="runs")
    p.add_argument("--run-id", default=None)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--memory-state", action="store_true", help="SuperLink state in memory "
                   "instead of a SQLite file (benchmarks: no write-lock stalls under load)")
    p.add_argument("--threads", type=int, default=None, help="math threads per node's "
                   "ClientApp (default: this machine's CPUs / nodes, at least 1)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        links_for(args.links, args.nodes)
    except ValueError as exc:
        p.error(str(exc))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
