"""Turn one captured run into attack inputs, run attacks, and score them.

:class:`Harness` reads a finished run directory: its config (to rebuild the public
model, tokenizer, client method and codec exactly as the server had them), the server's
captures (:mod:`fedpeft.capture`) and its privacy ledger. Observations are built from the
captures alone; the victims' records are kept apart and used only for scoring.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attacks.base import ATTACKS, AttackContext, Observation, Reconstruction
from attacks.metrics import Truth, score_batch, summarize
from attacks.victims import PROMPT, Record
from fedpeft.errors import ConfigError


@dataclass(frozen=True)
class Outcome:
    """One attack over every observation of a run: summary metrics (mean and CI per
    metric), sample count, wall time, and example (truth, reconstruction) pairs."""

    summary: dict[str, dict[str, float]]
    samples: int
    seconds: float
    examples: list[dict[str, Any]]


class Harness:
    """Attack inputs of one run and the ground truth to score them."""

    def __init__(self, cfg: Any, observations: list[Observation],
                 truths: dict[int, list[Record]], ledger: dict[str, Any],
                 noise_multiplier: float | None = None) -> None:
        self.cfg, self.observations, self.truths = cfg, observations, truths
        self.delta = run_delta(cfg)
        self.epsilon = _worst(ledger, "rdp")
        self.epsilon_prv = _worst(ledger, "prv")
        self.noise_multiplier = noise_multiplier
        self._ctx: AttackContext | None = None

    @classmethod
    def from_run(cls, run_dir: Path, records: Sequence[Record]) -> Harness:
        """Read ``run_dir`` (config, captures, ledger); ``records`` are the victims'."""
        from fedpeft.capture import read_observations
        from fedpeft.config import compose

        raw = json.loads((run_dir / "config.json").read_text())
        cfg = compose(raw["overrides"])
        captured = read_observations(_capture_dir(cfg, run_dir))
        if not captured:
            raise ConfigError(f"audit: run {run_dir} captured no client update; expected "
                              f"captures under {_capture_dir(cfg, run_dir)}")
        observations = [observation(c, cfg) for c in captured if c.partition is not None]
        return cls(cfg, observations, partition_truths(cfg, records),
                   _ledger(run_dir, run_delta(cfg)), _sigma(captured))

    def context(self) -> AttackContext:
        """The public model with the client method's adapter, built once per run."""
        if self._ctx is None:
            from fedpeft.methods import build_method, build_model
            from fedpeft.models import get_tokenizer

            method = build_method(self.cfg.method.name, self.cfg.method)
            model = build_model(method, self.cfg.model, seed=self.cfg.run.seed,
                                data_cfg=self.cfg.data)
            self._ctx = AttackContext(model=model, tokenizer=get_tokenizer(self.cfg.model),
                                      method=method, prompt=PROMPT)
        return self._ctx

    def attack(self, name: str, batch_size: int) -> Outcome:
        """Run attack ``name`` on every observation; score against each partition."""
        ctx = self.context()
        cls = ATTACKS.get(name)
        attack = cls(attack_config(name), ctx)
        t0, samples, examples = time.perf_counter(), [], []
        for obs in self.observations[:cls.max_observations]:
            recons = attack.run(obs, batch_size)
            truths = [truth(ctx.tokenizer, r) for r in self.truths[obs.partition]]
            samples += score_batch(recons, truths)
            examples += _pairs(recons, truths)
        return Outcome(summary=summarize(samples), samples=len(samples),
                       seconds=time.perf_counter() - t0, examples=examples)


def truth(tokenizer: Any, record: Record) -> Truth:
    """The scorer's view of a record: text, its token ids as trained, its PII."""
    ids = tokenizer(" " + record.text, add_special_tokens=False)["input_ids"]
    return Truth(text=record.text, token_ids=tuple(ids), pii=record.pii)


def _pairs(recons: list[Reconstruction], truths: list[Truth]) -> list[dict[str, Any]]:
    from attacks.metrics import match

    return [{"truth": truths[j].text, "reconstruction": recons[i].text,
             "pii": list(truths[j].pii)}
            for i, j in match([r.text for r in recons], [t.text for t in truths])]


def observation(captured: Any, cfg: Any) -> Observation:
    """What the attacker holds of one capture: compressed replies decoded with the run's
    codec against the global tensors' shapes (as the server's decoder does)."""
    update = dict(captured.received)
    kind = captured.kind
    if kind == "compressed":
        from fedpeft.compression import build_compressor
        from fedpeft.wire import COMPRESSED_KEY

        shapes = {k: tuple(v.shape) for k, v in captured.sent_global.items()}
        blob = memoryview(np.asarray(update[COMPRESSED_KEY], np.uint8).reshape(-1))
        update = build_compressor(cfg.compression).decode(blob, shapes)
    return Observation(round=captured.round, partition=captured.partition, kind=kind,
                       update=update, sent_global=dict(captured.sent_global),
                       num_examples=int(captured.metrics.get("num-examples", 0)),
                       hparams={"method": cfg.method.name, "prompt": PROMPT})


def partition_truths(cfg: Any, records: Sequence[Record]) -> dict[int, list[Record]]:
    """Each client's records, rebuilt with the run's own data split and partitioner."""
    from fedpeft.data import load_task_data, partition_rows

    by_text = {r.text: r for r in records}
    train = load_task_data(cfg.data).train
    out = {}
    for pid in range(cfg.sim.num_clients):
        rows = partition_rows(train, cfg.data.partition, cfg.sim.num_clients, pid)
        out[pid] = [by_text[train[i]["response"]] for i in rows]
    return out


def _capture_dir(cfg: Any, run_dir: Path) -> Path:
    return Path(cfg.capture.dir) if cfg.capture.dir else run_dir / "observations"


def run_delta(cfg: Any) -> float:
    """The δ the run's privacy mechanism accounts at (1e-5 when the run is not private)."""
    return float(getattr(cfg.privacy, "delta", None) or 1e-5)


def _ledger(run_dir: Path, delta: float) -> dict[str, Any]:
    from fedpeft.privacy.accounting import PrivacyLedger

    path = run_dir / "privacy.json"
    if not path.is_file():
        return {}
    return PrivacyLedger.load(path).summary(delta)


def _worst(ledger: dict[str, Any], accountant: str) -> float | None:
    found = (ledger.get("worst") or {}).get(accountant)
    value = found.get("epsilon") if found else None
    return float(value) if isinstance(value, (int, float)) else None


def _sigma(captured: list[Any]) -> float | None:
    """The largest DP-SGD noise multiplier the clients reported (None without DP)."""
    found = [float(c.metrics["dp_noise_multiplier"]) for c in captured
             if isinstance(c.metrics.get("dp_noise_multiplier"), (int, float))]
    return max(found) if found else None


def attack_config(name: str, config_dir: Path | None = None) -> Any:
    """Attack ``name``'s options from ``configs/attack/<name>.yaml`` (defaults if absent)."""
    import yaml

    from fedpeft.config import default_config_dir
    from fedpeft.schema import build

    path = (config_dir or default_config_dir()) / "attack" / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text()) if path.is_file() else {"name": name}
    return build(ATTACKS.get(name).config_cls, raw, f"attack {name}")
