"""Federations across emulated hosts: network namespaces, a bridge and tbf-limited links
(``scripts/netfed.py``). Needs root and iproute2; skipped with the reason otherwise."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedpeft import netfed
from fedpeft.netfed import Link, NetFed, NetFedUnavailable
from fedpeft.reporting import RunDir
from tests.integration.conftest import leftovers, process_snapshot, tiny_overrides

pytestmark = pytest.mark.slow

SEED_METHOD = ["method=fedkseed", "strategy=fedkseed", "method.num_seeds=64",
               "method.local_steps=4", "method.lr=0.0001",
               "method.trainable='layers\\.[0-9]+\\.mlp\\.(up|down)_proj'"]


@pytest.fixture(autouse=True)
def _needs_namespaces() -> None:
    try:
        netfed.check_requirements()
    except NetFedUnavailable as exc:
        pytest.skip(str(exc))


def _ours() -> list[str]:
    """Namespaces and host links this module's emulations could have left behind."""
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [ns for ns in netfed.namespaces() if ns.startswith("fpn")] + [
        line for line in links.splitlines() if "fpn" in line]


def test_links_are_rate_limited_and_everything_is_torn_down() -> None:
    """1 Mbit/s up: 250 kB take >= 2 s; unlimited: well under; nothing left after."""
    payload = 250_000
    recv = ["python3", "-c", "import socket\ns=socket.create_server(('0.0.0.0',5001))\n"
            "while True:\n c,_=s.accept();n=0\n while (b:=c.recv(65536)): n+=len(b)\n"
            " if n: print(n); break"]  # the readiness probe's empty connection is skipped
    with NetFed(["a", "b", "c"], [Link(1000, None), Link(), Link()]) as net:
        def send(src: str) -> float:
            server = subprocess.Popen(net.exec("c", recv), stdout=subprocess.PIPE, text=True)
            netfed.wait_port_in(net, "c", 5001, proc=server, addr="0.0.0.0")
            t0 = time.monotonic()
            subprocess.run(net.exec(src, ["python3", "-c", "import socket;s=socket."
                                          f"create_connection(('{net.hosts['c'].addr}',5001));"
                                          f"s.sendall(b'x'*{payload});s.close()"]), check=True)
            assert int(server.communicate(timeout=30)[0]) == payload
            return time.monotonic() - t0
        slow, fast = send("a"), send("b")
        counters = net.counters()
        host = subprocess.run(["ip", "addr"], capture_output=True, text=True).stdout + \
            subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
        assert "198.18." not in host  # the machine's own namespace gets nothing
    assert slow >= payload * 8 / 1e6 * 0.9 and fast < slow / 3, (slow, fast)
    assert counters["a"][1] >= payload and counters["c"][0] >= 2 * payload
    assert _ours() == []


def test_refuses_a_subnet_in_use_and_leaves_it_alone() -> None:
    other = "fpnx-busy"
    subprocess.run(["ip", "netns", "add", other], check=True)
    try:
        subprocess.run(["ip", "-n", other, "link", "add", "d0", "type", "veth", "peer",
                        "name", "d1"], check=True)
        subprocess.run(["ip", "-n", other, "addr", "add", "198.18.0.7/24", "dev", "d0"],
                       check=True)
        with pytest.raises(RuntimeError, match=r"198\.18\.0\.0/24.*in use.*fpnx-busy"):
            NetFed(["a"], [Link()], prefix="fpnt").up()
        assert netfed.namespaces().count(other) == 1  # not touched
    finally:
        subprocess.run(["ip", "netns", "del", other], check=True)
    assert _ours() == []


def _netfed_run(tmp_path: Path, app_dir: Path, run_id: str, extra: list[str]) -> RunDir:
    out = tmp_path / "runs"
    overrides = [o for o in tiny_overrides(out, run_id)
                 if not o.startswith(("run.run_id", "run.output_dir"))]
    cmd = [sys.executable, str(app_dir / "scripts" / "netfed.py"), "--nodes", "3", "--links",
           "2/-", "--output-dir", str(out), "--run-id", run_id, "--timeout", "600", "--",
           *overrides, "run.num_rounds=2", *extra]
    before = process_snapshot()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "interfaces / fedpeft messages" in proc.stdout
    assert leftovers(before) == [] and _ours() == []
    return RunDir(out / run_id)


def _check_traffic(run: RunDir) -> dict:
    summary = json.loads((run.path / "netfed.json").read_text())
    assert summary["secure"] is True
    assert [summary["links"][f"n{i}"] for i in range(3)] == ["up 2 Mbit/s, down unlimited"] * 3
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert r["iface_bytes_up"] >= r["fedpeft_bytes_up"] > 0, r
        assert r["iface_bytes_down"] >= r["fedpeft_bytes_down"] > 0, r
        assert r["overhead_bytes"] == (r["iface_bytes_up"] + r["iface_bytes_down"]
                                       - r["fedpeft_bytes_up"] - r["fedpeft_bytes_down"])
    assert summary["overhead_ratio"] > 1
    return summary


def test_lora_over_tls_and_node_auth_across_emulated_hosts(tmp_path: Path,
                                                          app_dir: Path) -> None:
    run = _netfed_run(tmp_path, app_dir, "lora", [])
    _check_traffic(run)
    records = run.records()
    assert all(r["num_clients"] == 3 and r["num_rejected"] == 0 for r in records[1:])
    assert {w["host"] for w in records[1]["placement"].values()} != set()  # where each ran
    for r in records[1:]:  # when each node's reply came: within the round, one per node
        assert set(r["reply_s"]) == set(r["bytes_up"]), r
        assert sorted(r["partitions"].values()) == [0, 1, 2], r
        assert 0 < max(r["reply_s"].values()) <= r["wall_time_s"], r


def test_fedkseed_across_emulated_hosts_replays_bit_exactly(tmp_path: Path,
                                                           app_dir: Path) -> None:
    """Separate ClientApp processes in separate namespaces catch up from disk snapshots;
    the quoted regex override arrives intact."""
    run = _netfed_run(tmp_path, app_dir, "seed",
                      [*SEED_METHOD, f"model.cache_dir={tmp_path / 'cache'}"])
    summary = _check_traffic(run)
    assert all(r["fedpeft_bytes_up"] < 20_000 for r in summary["rounds"])  # scalars only
    config = json.loads((run.path / "config.json").read_text())["config"]
    assert config["method"]["trainable"] == r"layers\.[0-9]+\.mlp\.(up|down)_proj"
    server = load_file(str(run.checkpoint_dir(1) / "trainable.safetensors"))
    clients = list((tmp_path / "cache" / "seed-state").glob("*/round-00001.safetensors"))
    assert clients
    for path in clients:
        client = load_file(str(path))
        assert set(client) == set(server)
        assert all(torch.equal(client[k], server[k]) for k in server)
