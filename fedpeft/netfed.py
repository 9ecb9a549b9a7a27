"""Hosts and links, emulated on one Linux machine: a network namespace per host, a switch.

:class:`NetFed` builds, for hosts ``h0..hn``:

- one namespace per host with its loopback and an ``eth0`` holding an address from
  :data:`SUBNET` (198.18.0.0/24, inside the 198.18.0.0/15 benchmarking range of RFC 2544)
  and its default route (so tools that find "this host's address" by routing, like Ray,
  find that one);
- one switch namespace with a Linux bridge; each host's ``eth0`` is one end of a veth
  pair whose other end is a bridge port there;
- per host, a ``tbf`` rate limit on ``eth0`` (its uplink) and on its bridge port (its
  downlink), from a :class:`Link`.

Nothing is added to the machine's own namespace: no address, no route, no link. The build
refuses to start when the subnet is already in use (by the machine or by any namespace)
or a namespace of the same name exists, and :meth:`NetFed.down` kills every process left
in its namespaces and deletes them (which deletes their links), on exit, error or Ctrl-C.

iproute2 and tc do the work (there is no maintained Python library for namespaces that
also drives tc); this module only sequences their commands and checks the result.
Interface byte counters come from ``ip -s -j link`` (the kernel's ``stats64``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

SUBNET = ipaddress.ip_network("198.18.0.0/24")
_RANGE = ipaddress.ip_network("198.18.0.0/15")


class NetFedUnavailable(RuntimeError):
    """This machine cannot build namespaces (no root, no iproute2/tc)."""


@dataclass(frozen=True)
class Link:
    """A host's access link in kbit/s (None: unlimited)."""

    up_kbit: float | None = None
    down_kbit: float | None = None

    def describe(self) -> str:
        def one(rate: float | None) -> str:
            return "unlimited" if rate is None else f"{rate / 1000:g} Mbit/s"
        return f"up {one(self.up_kbit)}, down {one(self.down_kbit)}"


PROFILES = {
    "phone": Link(1_000, 10_000),
    "edge": Link(10_000, 50_000),
    "lan": Link(None, None),
}
MIXED = ("lan", "edge", "phone", "phone")  # the ``mixed`` profile, cycled over the nodes


def parse_link(spec: str) -> Link:
    """``phone``/``edge``/``lan`` or ``<up>/<down>`` in Mbit/s (``2/10``; ``-``: unlimited)."""
    if spec in PROFILES:
        return PROFILES[spec]
    parts = spec.split("/")
    try:
        up, down = (None if p == "-" else float(p) * 1000 for p in parts)
    except ValueError:
        raise ValueError(f"link {spec!r}: expected one of {sorted(PROFILES)} or "
                         "'<up>/<down>' in Mbit/s, e.g. '2/10' ('-' for unlimited)") from None
    return Link(up, down)


def links_for(spec: str, n: int) -> list[Link]:
    """Links of ``n`` nodes: one profile for all, ``mixed``, or a comma list (cycled)."""
    names = list(MIXED) if spec == "mixed" else spec.split(",")
    return [parse_link(names[i % len(names)]) for i in range(n)]


@dataclass
class Host:
    """One emulated host: its namespace, address and access link."""

    name: str
    ns: str
    addr: str
    link: Link
    port: str  # the bridge port (in the switch namespace) that leads to it


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def _tc(ns: str, dev: str, link_kbit: float | None) -> None:
    """Rate-limit ``dev``'s egress in ``ns`` with a token bucket (nothing when None)."""
    if link_kbit is None:
        return
    burst = max(16_000, int(link_kbit * 1000 / 8 / 100))  # >= 10 ms of traffic
    cmd = ["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate",
           f"{link_kbit:g}kbit", "burst", str(burst), "latency", "400ms"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")


def check_requirements() -> None:
    """Fail with the reason when namespaces cannot be built here."""
    if os.geteuid() != 0:
        raise NetFedUnavailable("emulated hosts need root (network namespaces, veth, tc); "
                                f"running as uid {os.geteuid()}")
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        raise NetFedUnavailable(f"emulated hosts need iproute2; not found: {missing}")


def subnet_users() -> list[str]:
    """Where :data:`SUBNET` (or the /15 around it) is already used: addresses and routes
    of the machine and of every namespace."""
    found = []
    for ns in [None, *namespaces()]:
        where = f"namespace {ns}" if ns else "this machine"
        for kind in ("addr", "route"):
            args = (["-n", ns] if ns else []) + ["-j", kind]
            done = _ip(*args, check=False)
            for net in _networks(done.stdout, kind):
                if net.overlaps(_RANGE):
                    found.append(f"{where}: {kind} {net}")
    return found


def _networks(text: str, kind: str) -> Iterator[ipaddress.IPv4Network]:
    with contextlib.suppress(json.JSONDecodeError):
        for entry in json.loads(text or "[]"):
            items = entry.get("addr_info", []) if kind == "addr" else [entry]
            for a in items:
                dst = (f"{a['local']}/{a['prefixlen']}" if kind == "addr"
                       else a.get("dst", ""))
                with contextlib.suppress(ValueError):
                    net = ipaddress.ip_network(dst, strict=False)
                    if net.version == 4:
                        yield net


def namespaces() -> list[str]:
    """Names of the machine's network namespaces."""
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@dataclass
class NetFed:
    """Namespaces ``<prefix>-<host>`` joined by the bridge of ``<prefix>-sw``."""

    names: Sequence[str]
    links: Sequence[Link]
    prefix: str = field(default_factory=lambda: f"fpn{os.getpid() % 100000}")
    hosts: dict[str, Host] = field(default_factory=dict)

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def __enter__(self) -> NetFed:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        """Build the switch and every host; tear down what was built if any step fails."""
        check_requirements()
        self._refuse_conflicts()
        try:
            self._add_ns(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, (name, link) in enumerate(zip(self.names, self.links, strict=True)):
                self._add_host(i, name, link)
        except BaseException:
            self.down()
            raise

    def _refuse_conflicts(self) -> None:
        ours = [ns for ns in namespaces() if ns.startswith(f"{self.prefix}-")]
        if ours:
            raise RuntimeError(f"namespaces {ours} already exist; remove them with "
                               "`ip netns del <name>` or pick another prefix")
        users = subnet_users()
        if users:
            raise RuntimeError(f"the emulation subnet {SUBNET} (benchmarking range {_RANGE})"
                               f" is already in use: {'; '.join(users)}")

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _add_host(self, i: int, name: str, link: Link) -> None:
        ns, port = f"{self.prefix}-{name}", f"{self.prefix}-p{i}"
        addr = str(SUBNET.network_address + 1 + i)
        self._add_ns(ns)
        _ip("link", "add", "name", "eth0", "netns", ns, "type", "veth", "peer", "name", port,
            "netns", self.switch)
        _ip("-n", ns, "addr", "add", f"{addr}/{SUBNET.prefixlen}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "route", "add", "default", "dev", "eth0")  # "this host's address" lookups
        _ip("-n", self.switch, "link", "set", port, "master", "br0")
        _ip("-n", self.switch, "link", "set", port, "up")
        _tc(ns, "eth0", link.up_kbit)
        _tc(self.switch, port, link.down_kbit)
        self.hosts[name] = Host(name, ns, addr, link, port)

    def exec(self, name: str, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside host ``name``'s namespace."""
        return ["ip", "netns", "exec", self.hosts[name].ns, *cmd]

    def counters(self) -> dict[str, tuple[int, int]]:
        """Bytes (received, sent) on each host's ``eth0`` so far."""
        out = {}
        for name, host in self.hosts.items():
            stats = json.loads(_ip("-n", host.ns, "-s", "-j", "link", "show", "dev",
                                   "eth0").stdout)[0]["stats64"]
            out[name] = (int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"]))
        return out

    def pids(self) -> list[int]:
        """Processes running in any of this emulation's namespaces."""
        found = []
        for ns in self._ours():
            out = _ip("netns", "pids", ns, check=False).stdout
            found += [int(p) for p in out.split() if p.isdigit()]
        return found

    def _ours(self) -> list[str]:
        return [ns for ns in namespaces() if ns.startswith(f"{self.prefix}-")]

    def down(self, grace_s: float = 5.0) -> None:
        """Kill what still runs in the namespaces (TERM, then KILL), delete them."""
        _kill(self.pids(), signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        _kill(self.pids(), signal.SIGKILL)
        for ns in self._ours():
            _ip("netns", "del", ns, check=False)
        self.hosts.clear()
        left = self._ours()
        if left:
            raise RuntimeError(f"namespaces {left} could not be deleted")


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def wait_port_in(net: NetFed, host: str, port: int, timeout: float = 60.0,
                 proc: subprocess.Popen | None = None, addr: str = "127.0.0.1") -> None:
    """Wait until something listens on ``addr:port`` inside ``host``'s namespace."""
    probe = net.exec(host, ["bash", "-c", f"exec 3<>/dev/tcp/{addr}/{port}"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with code {proc.returncode} before "
                               f"listening on port {port} in {host}")
        if subprocess.run(probe, capture_output=True, timeout=10).returncode == 0:
            return
        time.sleep(0.3)
    raise TimeoutError(f"port {port} in {host} not listening after {timeout:.0f}s")
