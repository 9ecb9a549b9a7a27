"""``fedpeft audit``: attack what a server observes in real federated runs, and report.

For every point of the grid (method x batch size x privacy x codec) the audit runs a real
fedpeft simulation (``fedpeft simulate``: SuperLink, Flower's simulation engine, our
ServerApp and ClientApp) on victim records, with the server-side capture on for the last
round; then it attacks each captured client update with every configured attack, scores
the reconstructions against the client's records (only the scorer sees them), reads ε
from the run's privacy ledger, and writes ``<out>/<id>/report.html``, ``report.json``
and PNG plots (:mod:`attacks.report`).

Each client holds exactly ``batch_size`` records, so its batch in the captured round is
its whole partition and the ground truth of an observation is that partition.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from dataclasses import fields as fields_of
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from attacks.victims import PROMPT, Record, faker_records, load_records, write_client_data
from fedpeft.errors import ConfigError
from fedpeft.schema import build, to_dict

if TYPE_CHECKING:  # the booster pulls in torch; the CLI imports this module at startup
    from attacks.boost import BoostConfig

_NO_DP = "none"
_STRATEGIES = {"fedkseed": "fedkseed", "ferret": "ferret"}  # seed methods need their own
THREAT_MODEL = (
    "A malicious server that (a) distributes the base model and the global adapter state "
    "and (b) observes each sampled client's upload for one round, after the client's codec "
    "and privacy mechanism, exactly as the fedpeft strategy receives it. It knows every "
    "hyperparameter it configured (method, adapter rank and dropout, optimizer, learning "
    "rate, local steps, batch size, prompt template), and may choose them to help the "
    "attack (a LoRA rank above the batch's token count, no adapter dropout). It never sees "
    "client data; ground truth is used only to score the attack.")


@dataclass(frozen=True)
class AuditConfig:
    """The audit grid and its victim data (``audit.<key>=<value>`` overrides).

    ``epsilons``: ``null`` = no DP, a number = DP-SGD with that target ε per client over
    the run; ``data``: a JSONL of records (``text`` + ``pii`` list) instead of the Faker
    set; ``show_pii``: unmask PII in the report's examples; ``canaries``: canaries of
    the one-run membership audit per (method, privacy) pair (0 = off), each
    ``canary_tokens`` random tokens, trained for ``canary_steps`` steps of
    ``canary_batch`` (null: all included canaries in one batch, FedSGD) with
    ``canary_guesses`` guesses each way;
    ``boost``: the server distributes a base model it first pre-trained for
    ``boost_steps`` steps on ReCIT's "Personal Notes" (:mod:`attacks.boost`);
    ``optimizer``: the lora clients' local optimizer (``sgd`` with ``local_steps: 1`` is
    FedSGD, the worst case; ``adamw`` is the default of ``method=lora``);
    ``lora_rank``: the LoRA rank the (malicious) server configures, without adapter
    dropout (null keeps the method's own adapter settings).
    """

    methods: list[str] = field(default_factory=lambda: ["lora"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    epsilons: list[float | None] = field(default_factory=lambda: [None, 3.0])
    codecs: list[str] = field(default_factory=lambda: ["identity"])
    attacks: list[str] = field(default_factory=lambda: ["recit", "memorize"])
    clients: int = 2
    rounds: int = 2
    local_steps: int = 1
    data: str | None = None
    seed: int = 0
    show_pii: bool = False
    canaries: int = 100
    canary_guesses: int = 40
    canary_steps: int = 1
    canary_batch: int | None = None
    canary_tokens: int = 1
    out: str = "audit"
    id: str | None = None
    boost: bool = False
    boost_steps: int = 60
    optimizer: str = "sgd"
    lora_rank: int | None = 256

    def validate(self) -> None:
        from attacks.base import ATTACKS

        for name in self.attacks:
            ATTACKS.get(name)
        for key in ("clients", "rounds", "local_steps", "boost_steps", "canary_steps",
                    "canary_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"audit.{key} must be >= 1, found {getattr(self, key)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"audit.batch_sizes must be a non-empty list of integers >= 1, "
                              f"found {self.batch_sizes}")
        if self.canaries and not 0 < 2 * self.canary_guesses <= self.canaries:
            raise ConfigError(f"audit.canary_guesses must be in [1, canaries/2] "
                              f"({self.canaries // 2}), found {self.canary_guesses}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ConfigError(f"audit.lora_rank must be null or >= 1, found {self.lora_rank}")
        if any(e is not None and not e > 0 for e in self.epsilons):
            raise ConfigError(f"audit.epsilons: each must be null (no DP) or > 0, found "
                              f"{self.epsilons}")


@dataclass(frozen=True)
class Point:
    """One grid point: the federated run whose last round is attacked."""

    method: str
    batch_size: int
    epsilon: float | None
    codec: str

    @property
    def label(self) -> str:
        eps = "nodp" if self.epsilon is None else f"eps{self.epsilon:g}"
        return f"{self.method}-b{self.batch_size}-{eps}-{self.codec}"


def split_overrides(overrides: list[str]) -> tuple[AuditConfig, list[str]]:
    """``audit.*`` overrides become the :class:`AuditConfig`; the rest go to every run."""
    audit: dict[str, Any] = {}
    run: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if key.startswith("audit.") and sep:
            audit[key.removeprefix("audit.")] = yaml.safe_load(value)
        else:
            run.append(item)
    return build(AuditConfig, audit, "audit"), run


def grid(cfg: AuditConfig) -> list[Point]:
    """Every combination, in a stable order (method, batch, ε, codec)."""
    return [Point(m, b, e, c) for m in cfg.methods for b in cfg.batch_sizes
            for e in cfg.epsilons for c in cfg.codecs]


def victim_records(cfg: AuditConfig, batch_size: int) -> list[Record]:
    """One partition of ``batch_size`` records per client plus a small held-out split."""
    need = cfg.clients * batch_size + _held_out(batch_size)
    if cfg.data is None:
        return faker_records(need, seed=cfg.seed)
    records = load_records(Path(cfg.data).expanduser())
    if len(records) < need:
        raise ConfigError(f"audit.data: {cfg.clients} clients x batch {batch_size} need "
                          f"{need} records (with {_held_out(batch_size)} held out), found "
                          f"{len(records)}")
    return records[:need]


def _held_out(batch_size: int) -> int:
    return max(2, batch_size)


def boost_config(cfg: AuditConfig) -> BoostConfig:
    """The booster's options: ``boost_steps`` steps, records from the audit's seed offset
    far from the victims' (see :func:`attacks.boost.boost_records`)."""
    from attacks.boost import BoostConfig

    return BoostConfig(steps=cfg.boost_steps, seed=cfg.seed)


def boosted_overrides(extra: list[str], model_dir: Path | None) -> list[str]:
    """Every run's extra overrides, loading the distributed base from ``model_dir`` when
    the server boosted it. They come after the user's, so they win over a ``model=``
    choice while the user's ``model.dtype``/``model.device`` still apply."""
    if model_dir is None:
        return list(extra)
    return [*extra, "model=hf", f"model.name={model_dir}"]


def boosted_model(cfg: AuditConfig, extra: list[str]) -> Path | None:
    """The boosted copy of the runs' base model (built once, then cached), or None when
    ``audit.boost`` is off."""
    if not cfg.boost:
        return None
    from attacks.boost import boost
    from fedpeft.config import compose

    _progress(f"Personal Notes pre-training of the base model ({cfg.boost_steps} steps)")
    return boost(compose(extra).model, boost_config(cfg))


def run_overrides(cfg: AuditConfig, point: Point, data: Path, out: Path,
                  extra: list[str]) -> list[str]:
    """The ``fedpeft simulate`` overrides of one grid point."""
    privacy = ["privacy=none"] if point.epsilon is None else [
        "privacy=dpsgd", f"privacy.target_epsilon={point.epsilon}"]
    return [
        f"method={point.method}", f"method.batch_size={point.batch_size}",
        f"method.local_steps={cfg.local_steps}", f"compression={point.codec}",
        "data=local", f"data.name={data}", "data.label_field=null",
        "data.response_field=response", f"data.test_size={_held_out(point.batch_size)}",
        "data.partition.type=iid", f"data.partition.seed={cfg.seed}",
        "data.partition.min_partition_size=1",
        "data.max_input_tokens=16", f"strategy={_STRATEGIES.get(point.method, 'fedavg')}",
        *privacy,
        *_lora_overrides(cfg, point.method),
        f"sim.num_clients={cfg.clients}", f"run.num_rounds={cfg.rounds}",
        f"capture.rounds=[{cfg.rounds}]", f"run.output_dir={out}",
        f"run.run_id={point.label}", "run.checkpoint=false", "eval.max_examples=2",
        *extra]


def _lora_overrides(cfg: AuditConfig, method: str) -> list[str]:
    """The clients' optimizer (methods that take one: lora, ssf, ssf_pool) and the
    server's adapter choice (lora only)."""
    from fedpeft.methods import METHODS

    fields = {f.name for f in fields_of(METHODS.get(method).config_cls)}
    optimizer = [f"method.optimizer={cfg.optimizer}"] if "optimizer" in fields else []
    if method != "lora" or cfg.lora_rank is None:
        return optimizer
    return [*optimizer, f"method.adapter.r={cfg.lora_rank}",
            f"method.adapter.lora_alpha={2 * cfg.lora_rank}", "method.adapter.lora_dropout=0.0"]


def command(argv: list[str] | None = None) -> int:
    """Entry point of ``fedpeft audit [overrides...]``."""
    parser = argparse.ArgumentParser(prog="fedpeft audit", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*",
                        help="audit.<key>=<value> for the grid, anything else for every run")
    parser.add_argument("--app", default=".", help="Flower app directory (default: .)")
    args = parser.parse_args(argv)
    try:
        report = run_audit(args.overrides, Path(args.app))
    except ConfigError as exc:
        print(f"fedpeft: error: {exc}", file=sys.stderr)
        return 2
    print(f"fedpeft audit: report in {report}")
    return 0


def run_audit(overrides: list[str], app: Path) -> Path:
    """Run the whole grid and write the report; returns the report's HTML path."""
    from attacks.report import write_audit_report

    cfg, extra = split_overrides(overrides)
    model_dir = boosted_model(cfg, extra)
    extra = boosted_overrides(extra, model_dir)
    audit_id = cfg.id or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    root = Path(cfg.out).expanduser().resolve() / audit_id
    points, rows, examples, canaries, delta = grid(cfg), [], [], {}, 1e-5
    for i, point in enumerate(points, 1):
        _progress(f"[{i}/{len(points)}] {point.label}: federated run")
        run_dir = federated_run(cfg, point, root, extra, app)
        _progress(f"[{i}/{len(points)}] {point.label}: attacking the captured updates")
        harness, point_rows, point_examples = attack_run(cfg, point, run_dir, len(rows))
        rows += point_rows
        examples += point_examples
        delta = harness.delta
        key = (point.method, point.epsilon)
        if cfg.canaries and key not in canaries and canary_applies(point.method):
            _progress(f"[{i}/{len(points)}] {point.label}: canary membership audit")
            canaries[key] = canary_row(cfg, point, harness)
    result = _result(cfg, audit_id, overrides, rows, examples, delta)
    result["canary"] = list(canaries.values())
    result["config"]["boosted_model"] = str(model_dir) if model_dir else None
    return write_audit_report(result, root, show_pii=cfg.show_pii)


def canary_applies(method: str) -> bool:
    """Whether the canary audit can score ``method``'s updates: it compares each canary
    with tensor deltas, which seed methods (scalars per seed or coordinate) do not send."""
    from fedpeft.methods import METHODS

    return METHODS.get(method).update_kind == "dense"


def canary_row(cfg: AuditConfig, point: Point, harness: Any) -> dict:
    """The one-run canary audit with the run's method and privacy mechanism."""
    import dataclasses

    from attacks.membership import membership_audit
    from fedpeft.methods import build_method

    ctx = dataclasses.replace(harness.context())
    ctx.method = build_method(harness.cfg.method.name, dataclasses.replace(
        harness.cfg.method, local_steps=cfg.canary_steps,
        batch_size=cfg.canary_batch or cfg.canaries))
    privacy = harness.cfg.privacy if point.epsilon is not None else None
    res = membership_audit(ctx, cfg.canaries, cfg.canary_guesses, seed=cfg.seed,
                           privacy=privacy, length=cfg.canary_tokens)
    return {"method": point.method, "privacy": "dpsgd" if privacy else _NO_DP,
            "epsilon": res.epsilon, "epsilon_lower_bound": res.epsilon_lower_bound,
            "num_canaries": res.num_canaries, "num_guesses": res.num_guesses,
            "num_correct": res.num_correct, "tpr_at_0.1%_fpr": res.tpr_at_0_1_fpr,
            "tpr_at_1%_fpr": res.tpr_at_1_fpr}


def _progress(text: str) -> None:
    print(f"fedpeft audit {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def federated_run(cfg: AuditConfig, point: Point, root: Path, extra: list[str],
                  app: Path) -> Path:
    """Run one grid point's simulation; fail (naming the run) unless it completed."""
    from fedpeft.cli import simulate

    data = write_client_data(victim_records(cfg, point.batch_size),
                             root / "data" / f"b{point.batch_size}.jsonl")
    overrides = run_overrides(cfg, point, data, root / "runs", extra)
    if simulate(overrides, app) != 0:
        raise ConfigError(f"audit: the federated run {point.label} did not complete; see "
                          f"{root / 'runs' / point.label}/status.json")
    return root / "runs" / point.label


def attack_run(cfg: AuditConfig, point: Point, run_dir: Path,
               first_row: int) -> tuple[Any, list[dict], list[dict]]:
    """Attack every captured observation of one run with every attack; table rows and
    up to two example reconstructions per row."""
    from attacks.harness import Harness

    harness = Harness.from_run(run_dir, victim_records(cfg, point.batch_size))
    rows, examples = [], []
    for name in cfg.attacks:
        outcome = harness.attack(name, point.batch_size)
        rows.append(_row(point, cfg, harness, name, outcome))
        examples += [dict(e, row=first_row + len(rows) - 1) for e in outcome.examples[:2]]
    return harness, rows, examples


def _row(point: Point, cfg: AuditConfig, harness: Any, attack: str, outcome: Any) -> dict:
    return {"method": point.method, "batch_size": point.batch_size,
            "local_steps": cfg.local_steps, "codec": point.codec,
            "privacy": "dpsgd" if point.epsilon is not None else _NO_DP,
            "noise_multiplier": harness.noise_multiplier, "epsilon": harness.epsilon,
            "attack": attack, "samples": outcome.samples, "seconds": outcome.seconds,
            "metrics": outcome.summary}


def _result(cfg: AuditConfig, audit_id: str, overrides: list[str], rows: list[dict],
            examples: list[dict], delta: float) -> dict:
    return {
        "id": audit_id, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "title": f"fedpeft privacy audit {audit_id}", "threat_model": THREAT_MODEL,
        "config": {"overrides": overrides, "audit": to_dict(cfg), "prompt": PROMPT},
        "accountant": {"name": "rdp (Opacus), prv beside it", "delta": delta,
                       "notes": "ε per client over all rounds, from the run's ledger "
                                "(the worst client); sample-level DP-SGD"},
        "rows": rows, "examples": examples, "canary": [],
        "notes": [json.dumps({"grid_points": len(grid(cfg))})]}
