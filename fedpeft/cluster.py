"""Where a simulation runs: the Ray cluster it attaches to, and the node each client ran on.

Flower 1.39's simulation runtime starts Ray with ``ray.init(**init_args)`` from the
federation's backend config, and only if Ray is not initialised yet. The init args that
``flwr run --federation-config`` can carry are ``num_cpus``, ``num_gpus``,
``logging_level`` and ``log_to_driver``; an address is not among them. ``ray.init``
without an address reads ``RAY_ADDRESS`` from its environment, so the address travels
there: ``fedpeft simulate`` sets ``RAY_ADDRESS`` for the processes it starts, and Flower's
``ray.init`` call picks it up.

- ``sim.ray_address: null`` (default): ``RAY_ADDRESS=local``: Ray starts a private
  instance and never joins a running cluster, whatever ``RAY_ADDRESS`` or Ray's
  latest-cluster file says.
- ``auto``: Ray's own resolution (``RAY_ADDRESS`` of the user's shell, else the cluster
  last started on this machine with ``ray start``).
- ``host:port``: the GCS of that cluster's head.

:func:`placement` names the Ray node (and host) a client reply came from;
:func:`ray_nodes` lists the cluster's nodes and resources for ``config.json``. Neither
imports Ray into a process that has not already done so: in a deployment the ClientApp
does not run on Ray and reports only its host.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from typing import Any

from fedpeft.errors import ConfigError

_HOST_PORT = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")


def check_ray_address(address: str | None) -> None:
    """Fail early on a ``sim.ray_address`` that is neither null, ``auto`` nor host:port."""
    if address is None or address == "auto":
        return
    if address == "local":
        raise ConfigError("sim.ray_address: 'local' is the default; write null for a "
                          "private Ray instance")
    if not _HOST_PORT.match(address):
        raise ConfigError(f"sim.ray_address must be null (a private Ray instance), 'auto' or "
                          f"'<head-host>:<gcs-port>' (e.g. 10.0.0.5:6379), found {address!r}")


def ray_env(address: str | None) -> dict[str, str]:
    """Environment that makes Flower's ``ray.init()`` start or join what ``address`` says.

    With an address, ``RAY_TMPDIR`` is left alone: Ray's ``auto`` looks for the latest
    cluster under its default temp dir, and a joined cluster keeps its own session dir."""
    if address is None:
        return {"RAY_ADDRESS": "local"}
    if address == "auto":  # the user's RAY_ADDRESS, else Ray's search for a running cluster
        return {"RAY_ADDRESS": os.environ.get("RAY_ADDRESS") or "auto"}
    return {"RAY_ADDRESS": address}


def _ray() -> Any | None:
    """The ``ray`` module if this process already imported and initialised it."""
    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


def placement() -> dict[str, str]:
    """Where this process runs: ``host`` always, and ``ray_node``/``ray_ip`` on Ray."""
    where = {"host": socket.gethostname()}
    ray = _ray()
    if ray is not None:
        where["ray_node"] = ray.get_runtime_context().get_node_id()
        where["ray_ip"] = ray.util.get_node_ip_address()
    return where


def ray_nodes() -> list[dict[str, Any]] | None:
    """The Ray cluster's nodes (id, address, alive, resources), or None when this process
    is not a Ray driver."""
    ray = _ray()
    if ray is None:
        return None
    return [{"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "alive": bool(n["Alive"]),
             "resources": {k: float(v) for k, v in n.get("Resources", {}).items()
                           if not k.startswith("node:")}}
            for n in ray.nodes()]
