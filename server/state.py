"""The server's copy of the global model and what happens at the end of each round:
load the aggregated state, evaluate on the held-out split, checkpoint, record metrics."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, MetricRecord

from fedpeft import cluster, wire
from fedpeft.config import FedPeftConfig
from fedpeft.data import load_task_data
from fedpeft.evaluation import evaluate
from fedpeft.methods import build_method, build_model
from fedpeft.models import get_tokenizer
from fedpeft.reporting import RunDir, format_progress, resolve_resume
from fedpeft.types import RoundRecord
from server.health import RunHealth
from server.privacy import PrivacyBook

log = logging.getLogger("flwr")


class GlobalModel:
    """Holds the attached model on the server; ``end_of_round`` is Flower's evaluate_fn."""

    def __init__(self, cfg: FedPeftConfig, run: RunDir, start_round: int) -> None:
        self.cfg, self.run, self.start_round = cfg, run, start_round
        self.method = build_method(cfg.method.name, cfg.method)
        self.tokenizer = get_tokenizer(cfg.model)
        self.model = build_model(self.method, cfg.model, seed=cfg.run.seed,
                                 data_cfg=cfg.data)
        self.data = load_task_data(cfg.data)
        self.strategy: Any = None
        self.history: list[RoundRecord] = []
        self._t_last = time.perf_counter()
        self._eval_s: float | None = None
        self._apply_s: float | None = None
        self.checkpoint = None
        self.health = RunHealth(cfg.run.max_empty_rounds)
        self.arrivals: Mapping[str, Mapping[str, float]] = {}  # the grid's, once serving
        self.privacy = PrivacyBook(cfg, run, resume=bool(start_round))
        if start_round:
            _, _, self.checkpoint = resolve_resume(cfg.run.resume or "")
            self.method.load(self.model, self.checkpoint)

    def initial_state(self) -> dict:
        return self.method.initial_global(self.model)

    def end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate + checkpoint + record. Round 0 is the model before any training
        (skipped when resuming: it was recorded by the original run)."""
        rnd = server_round + self.start_round
        if server_round == 0 and self.start_round:
            self._t_last = time.perf_counter()
            return None
        t_apply = time.perf_counter()
        self.method.apply_global(self.model, wire.from_arrayrecord(arrays))
        t_eval = time.perf_counter()
        self._apply_s = t_eval - t_apply
        ev = self._evaluate(rnd)
        self._eval_s = time.perf_counter() - t_eval if ev else None
        if rnd > 0 and self.cfg.run.checkpoint:
            self._checkpoint(rnd)
        record = self._record(rnd, server_round, ev, self._privacy(rnd, server_round))
        self.run.append(record)
        self.history.append(record)
        if self.cfg.run.progress:
            log.info("fedpeft %s", format_progress(record, self.cfg.run.num_rounds))
        if server_round > 0:
            self.health.check(record)
        if server_round == 1:
            self._note_cluster()
        self._t_last = time.perf_counter()
        if ev is None:
            return None
        return MetricRecord({k: v for k, v in (("eval_loss", ev.loss),
                                                ("eval_accuracy", ev.accuracy)) if v is not None})

    def _note_cluster(self) -> None:
        """Add the Ray cluster's nodes and resources to ``config.json`` (simulations only:
        by the end of the first round the engine has started or joined it)."""
        nodes = cluster.ray_nodes()
        path = self.run.path / "config.json"
        if nodes is None or not path.exists():
            return
        data = json.loads(path.read_text())
        data["cluster"] = {"ray_address": self.cfg.sim.ray_address, "nodes": nodes}
        self.run.write_json("config.json", data)
        log.info("fedpeft: Ray cluster of %d node(s): %s", len(nodes),
                 ", ".join(f"{n['ip']} {n['resources'].get('CPU', 0):g} CPU" for n in nodes))

    def _evaluate(self, rnd: int):
        every = self.cfg.eval.every
        due = every > 0 and (rnd % every == 0 or rnd == self.cfg.run.num_rounds)
        if not due:
            return None
        return evaluate(self.model, self.tokenizer, self.data.test, self.data.label_names,
                        self.cfg.data, batch_size=self.cfg.eval.batch_size,
                        max_examples=self.cfg.eval.max_examples)

    def _checkpoint(self, rnd: int) -> None:
        path = self.run.checkpoint_dir(rnd)
        path.mkdir(parents=True, exist_ok=True)
        self.method.save(self.model, path)
        if hasattr(self.strategy, "save"):  # replay strategies: history for catch-up
            self.strategy.save(path)
        (path / ".complete").write_text(str(rnd))

    def _record(self, rnd: int, server_round: int, ev: Any,
                privacy: dict | None = None) -> RoundRecord:
        traffic = self.strategy.traffic if (self.strategy and server_round > 0) else None
        train = getattr(self.strategy, "last_train_metrics", None) if traffic else None
        return RoundRecord(
            round=rnd,
            wall_time_s=time.perf_counter() - self._t_last,
            train_loss=_metric(train, "train_loss"),
            eval_loss=ev.loss if ev else None,
            eval_accuracy=ev.accuracy if ev else None,
            eval_time_s=self._eval_s,
            client_train_s=_client_seconds(train),
            server_aggregate_s=traffic.aggregate_s if traffic else None,
            server_apply_s=self._apply_s,
            num_clients=traffic.accepted if traffic else 0,
            num_rejected=len(traffic.rejected) if traffic else 0,
            bytes_up=dict(traffic.bytes_up) if traffic else {},
            bytes_down=dict(traffic.bytes_down) if traffic else {},
            payload_bytes_up=dict(traffic.payload_bytes_up) if traffic else {},
            payload_bytes_down=dict(traffic.payload_bytes_down) if traffic else {},
            rejected=dict(traffic.rejected) if traffic else {},
            excluded=list(traffic.excluded) if traffic else [],
            privacy=privacy or {},
            extra=dict(getattr(traffic, "extra", {})) if traffic else {},
            placement=_placement(self.strategy, traffic),
            reply_s=dict(self.arrivals.get("train", {})) if traffic else {},
            partitions=_partitions(self.strategy, traffic),
        )

    def _privacy(self, rnd: int, server_round: int) -> dict:
        """Compose the round's privacy events into the ledger; the worst ε so far."""
        traffic = self.strategy.traffic if (self.strategy and server_round > 0) else None
        return self.privacy.record_round(rnd, traffic.privacy) if traffic else {}

    def log_summary(self) -> None:
        evals = [r for r in self.history if r.eval_accuracy is not None]
        if len(evals) >= 2:
            log.info("fedpeft: held-out accuracy %.4f (round %d) -> %.4f (round %d)",
                     evals[0].eval_accuracy, evals[0].round,
                     evals[-1].eval_accuracy, evals[-1].round)
        if self.privacy.active:
            p = self.privacy.round_summary()
            log.info("fedpeft: privacy (%s, %s-level) worst client %s: epsilon %s (RDP) / %s "
                     "(PRV) at delta=%g; per-client ledger in %s", p["mechanism"], p["level"],
                     p["worst_client"], p["epsilon_rdp"], p["epsilon_prv"], p["delta"],
                     self.privacy.path)
        log.info("fedpeft: metrics in %s", self.run.metrics_path)


def _client_seconds(train: Any) -> float | None:
    """Mean client seconds of local work: training plus projection (Ferret)."""
    parts = [_metric(train, k) for k in ("train_time_s", "project_time_s")]
    return None if parts[0] is None else parts[0] + (parts[1] or 0.0)


def _placement(strategy: Any, traffic: Any) -> dict:
    """Where the round's replying clients ran (host, Ray node), by partition."""
    partitions = getattr(strategy, "partitions", None)
    return partitions.placement(traffic.bytes_up) if traffic and partitions else {}


def _partitions(strategy: Any, traffic: Any) -> dict[str, int]:
    """Node id -> partition id for the round's replying nodes, where known: ties the
    node-keyed columns (bytes, reply times) to partitions and so to hosts and links."""
    partitions = getattr(strategy, "partitions", None)
    if not traffic or not partitions:
        return {}
    return {n: p for n in traffic.bytes_up if (p := partitions.get(n)) is not None}


def _metric(record: Any, key: str) -> float | None:
    if record is None or key not in record:
        return None
    return float(record[key])
