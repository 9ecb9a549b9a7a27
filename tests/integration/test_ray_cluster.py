"""A simulation on a two-node Ray cluster: a head and a worker in two emulated hosts
(network namespaces of :mod:`fedpeft.netfed`, each with its own address and Ray temp
dir). Needs root and iproute2; skipped with the reason otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from fedpeft import netfed
from fedpeft.netfed import Link, NetFed, NetFedUnavailable
from fedpeft.procs import RunWorkspace, tool_path
from fedpeft.reporting import RunDir
from tests.integration.conftest import leftovers, process_snapshot, tiny_overrides

pytestmark = pytest.mark.slow
GCS_PORT = 6379


@pytest.fixture()
def cluster() -> Iterator[tuple[NetFed, list[int]]]:
    """Head on host ``head`` and a worker on host ``worker``, 1 CPU each; yields the
    emulation and the PIDs of both ``ray start --block`` processes; stops them by PID."""
    try:
        netfed.check_requirements()
    except NetFedUnavailable as exc:
        pytest.skip(str(exc))
    base = Path(tempfile.mkdtemp(prefix="fprc-", dir="/tmp"))  # Ray's socket paths are short
    ws = RunWorkspace(prefix="fprw-")
    env = ws.env()
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_TMPDIR")
    with NetFed(["head", "worker"], [Link(), Link()]) as net:
        head = net.hosts["head"].addr
        common = ["--num-cpus", "1", "--object-store-memory", str(80 * 2**20),
                  "--disable-usage-stats", "--block"]
        starts = [
            ["head", ["--head", "--node-ip-address", head, "--port", str(GCS_PORT),
                      "--temp-dir", str(base / "h"), "--include-dashboard", "false"]],
            ["worker", ["--address", f"{head}:{GCS_PORT}", "--node-ip-address",
                        net.hosts["worker"].addr, "--temp-dir", str(base / "w")]]]
        try:
            pids = [_start(ws, net, env, host, args + common) for host, args in starts]
            _wait_nodes(net, env, 2)
            yield net, pids
        finally:
            for pid in ws.stop():
                assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
            ws.remove()
            subprocess.run(["rm", "-rf", str(base)], check=False)


def _start(ws: RunWorkspace, net: NetFed, env: dict, host: str, args: list[str]) -> int:
    proc = subprocess.Popen(net.exec(host, [tool_path("ray"), "start", *args]), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ws.started.append(proc)
    if host == "head":
        netfed.wait_port_in(net, "head", GCS_PORT, proc=proc, addr=net.hosts["head"].addr)
    return proc.pid


def _wait_nodes(net: NetFed, env: dict, n: int) -> None:
    head = f"{net.hosts['head'].addr}:{GCS_PORT}"
    script = (f"import ray,time\nray.init(address='{head}')\nfor _ in range(120):\n"
              f" if len([x for x in ray.nodes() if x['Alive']])>={n}: break\n"
              " time.sleep(0.5)\nprint(len([x for x in ray.nodes() if x['Alive']]))")
    out = subprocess.run(net.exec("head", [sys.executable, "-c", script]), env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith(str(n)), out.stdout + out.stderr[-2000:]


def _simulate(net: NetFed, app: Path, out: Path, run_id: str, extra: list[str]) -> RunDir:
    """``fedpeft simulate`` inside the head host, whose shell points RAY_ADDRESS at the
    cluster (as a user's might): only ``sim.ray_address`` may make the run join it."""
    env = {**os.environ, "RAY_ADDRESS": f"{net.hosts['head'].addr}:{GCS_PORT}"}
    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", *tiny_overrides(out, run_id),
           "sim.num_clients=4", "sim.client_cpus=1", "run.num_rounds=2", *extra]
    done = subprocess.run(net.exec("head", cmd), env=env, capture_output=True, text=True,
                          timeout=900, cwd=app)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return RunDir(out / run_id)


def _ray_nodes_used(run: RunDir) -> set[str]:
    return {w["ray_node"] for r in run.records()[1:] for w in r["placement"].values()}


def _final_adapter(run: RunDir) -> dict:
    return load_file(str(run.checkpoint_dir(2) / "adapter_model.safetensors"))


def test_simulation_runs_on_both_nodes_and_matches_a_private_run(
        cluster: tuple[NetFed, list[int]], tmp_path: Path, app_dir: Path) -> None:
    net, ray_pids = cluster
    before = process_snapshot()
    head = f"{net.hosts['head'].addr}:{GCS_PORT}"
    joined = _simulate(net, app_dir, tmp_path / "runs", "joined", [f"sim.ray_address={head}"])
    private = _simulate(net, app_dir, tmp_path / "runs", "private", [])

    nodes = json.loads((joined.path / "config.json").read_text())["cluster"]["nodes"]
    assert sorted(n["ip"] for n in nodes) == sorted(h.addr for h in net.hosts.values())
    assert _ray_nodes_used(joined) == {n["node_id"] for n in nodes}  # clients on both
    mine = json.loads((private.path / "config.json").read_text())["cluster"]["nodes"]
    assert len(mine) == 1 and _ray_nodes_used(private) == {mine[0]["node_id"]}
    assert not _ray_nodes_used(private) & {n["node_id"] for n in nodes}  # did not join
    a, b = _final_adapter(joined), _final_adapter(private)
    assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)  # bit for bit
    assert all(psutil.pid_exists(p) for p in ray_pids)  # the cluster outlived both runs
    assert leftovers(before | set(_cluster_pids(ray_pids))) == []


def _cluster_pids(roots: list[int]) -> list[int]:
    found = []
    for pid in roots:
        proc = psutil.Process(pid)
        found += [pid, *(c.pid for c in proc.children(recursive=True))]
    return found
