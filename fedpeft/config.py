"""Compose and validate the whole configuration tree before anything heavy happens.

Hydra's compose API merges ``configs/config.yaml`` with its groups (model, data,
method, strategy) and the user's overrides; this module then builds frozen, typed
config objects, checking every key, every registered name and the compatibility of
components, so a typo fails in milliseconds with the valid choices instead of after a
model has loaded. The same overrides string drives ``fedpeft simulate`` and
``flwr run --run-config "overrides='...'"``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft import schema
from fedpeft.cluster import check_ray_address
from fedpeft.compression import COMPRESSORS
from fedpeft.compression.base import CompressionConfig, build_compressor, check_update_kind
from fedpeft.data import DataConfig
from fedpeft.errors import ConfigError, IncompatibleComponentsError
from fedpeft.methods import METHODS
from fedpeft.models import ModelConfig
from fedpeft.privacy import PRIVACY, build_privacy
from fedpeft.privacy.base import NoPrivacyConfig

CONFIG_DIR_ENV = "FEDPEFT_CONFIG_DIR"
# Component packages outside ``fedpeft/`` that take part in validation. They are loaded
# by name (no static import keeps the core independent of them) and register checks.
COMPONENT_PACKAGES = ("strategies",)
# Extra modules that register components (e.g. a site's own method), loaded in every
# process of a run: ``FEDPEFT_PLUGINS=/path/to/file.py,package.module``.
PLUGINS_ENV = "FEDPEFT_PLUGINS"
StrategyCheck = Callable[..., None]  # (name, params, update_kind, *, secagg: bool)
FederationCheck = Callable[[str, dict[str, Any], int], None]
_STRATEGY_CHECKS: list[StrategyCheck] = []
_FEDERATION_CHECKS: list[FederationCheck] = []


def register_strategy_check(check: StrategyCheck) -> StrategyCheck:
    """Register ``check(strategy_name, params, update_kind, *, secagg)``; it raises
    ConfigError."""
    _STRATEGY_CHECKS.append(check)
    return check


def register_federation_check(check: FederationCheck) -> FederationCheck:
    """Register ``check(strategy_name, params, num_nodes)`` run by the preflight when the
    federation size is known (node counts, Krum/Bulyan bounds); it raises ConfigError."""
    _FEDERATION_CHECKS.append(check)
    return check


def federation_checks() -> list[FederationCheck]:
    """The registered federation-size checks (after :func:`load_components`)."""
    load_components()
    return list(_FEDERATION_CHECKS)


def load_components() -> None:
    """Import the component packages (and ``$FEDPEFT_PLUGINS``) so registries exist."""
    for name in COMPONENT_PACKAGES:
        importlib.import_module(name)
    load_plugins()


def load_plugins() -> None:
    """Import each module named in ``$FEDPEFT_PLUGINS`` (file paths or dotted names)."""
    for item in filter(None, os.environ.get(PLUGINS_ENV, "").split(",")):
        _import_plugin(item.strip())


def _import_plugin(item: str) -> None:
    import importlib.util
    import sys

    if not item.endswith(".py"):
        importlib.import_module(item)
        return
    name = f"fedpeft_plugin_{Path(item).stem}"
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, item)
    if spec is None or spec.loader is None or not Path(item).is_file():
        raise ConfigError(f"${PLUGINS_ENV} names {item!r}, which is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


@dataclass(frozen=True)
class RunConfig:
    """Run-level options: rounds, seed, where metrics/checkpoints go, resume."""

    seed: int = 0
    num_rounds: int = 3
    output_dir: str = "runs"
    run_id: str | None = None
    resume: str | None = None  # run directory (or checkpoint directory) to continue
    checkpoint: bool = True
    round_timeout_s: float = 900.0  # a round ends this long after it was sent
    progress: bool = True
    max_empty_rounds: int = 1  # rounds in a row without an accepted update -> failed
    stall_timeout_s: float = 600.0  # no client reply for this long -> failed
    node_wait_s: float = 300.0  # waiting for enough nodes longer than this -> failed

    def validate(self) -> None:
        positive = {"num_rounds": self.num_rounds, "max_empty_rounds": self.max_empty_rounds,
                    "round_timeout_s": self.round_timeout_s,
                    "stall_timeout_s": self.stall_timeout_s, "node_wait_s": self.node_wait_s}
        for key, value in positive.items():
            if not value > 0:
                raise ConfigError(f"run.{key} must be > 0, found {value!r}")


@dataclass(frozen=True)
class EvalConfig:
    """Server-side evaluation of the global model on the held-out split."""

    batch_size: int = 16
    max_examples: int | None = None
    every: int = 1  # evaluate every N rounds (the last round is always evaluated); 0 = never

    def validate(self) -> None:
        if self.batch_size < 1 or self.every < 0:
            raise ConfigError("eval.batch_size must be >= 1 and eval.every >= 0")


@dataclass(frozen=True)
class SimConfig:
    """Simulation size and per-client resources (``fedpeft simulate`` passes them to
    ``flwr run --federation-config``; deployments ignore them)."""

    num_clients: int = 4
    client_cpus: int = 2
    client_gpus: float = 0.0
    ray_address: str | None = None  # null: private Ray; 'auto' or host:port: join a cluster

    def validate(self) -> None:
        check_ray_address(self.ray_address)
        if self.num_clients < 1:
            raise ConfigError(f"sim.num_clients must be >= 1 (one simulated client per data "
                              f"partition), found {self.num_clients}")
        if self.client_cpus <= 0:
            raise ConfigError(f"sim.client_cpus must be > 0, found {self.client_cpus}")
        if self.client_gpus < 0:
            raise ConfigError(f"sim.client_gpus must be >= 0, found {self.client_gpus}")


@dataclass(frozen=True)
class SecAggConfig:
    """SecAgg+ secure aggregation (:mod:`fedpeft.secagg`): the server sees only the sum.

    ``degree`` is k of the k-regular communication graph (null: every other sampled
    client, i.e. SecAgg); ``threshold`` is t of the t-of-k sharing (null: k//2 + 1, the
    least that keeps a server from collecting both secrets of one node, and the most
    dropouts survived); ``frac_bits`` the fixed-point precision; ``stage_timeout_s`` how
    long each of the three extra exchanges waits for replies.
    """

    enabled: bool = False
    degree: int | None = None
    threshold: int | None = None
    frac_bits: int = 24
    stage_timeout_s: float = 300.0

    def validate(self) -> None:
        if self.degree is not None and self.degree < 2:
            raise ConfigError(f"secagg.degree must be >= 2 or null, found {self.degree!r}")
        if self.threshold is not None and self.threshold < 2:
            raise ConfigError(f"secagg.threshold must be >= 2 or null, found "
                              f"{self.threshold!r}")
        if not 8 <= self.frac_bits <= 40:
            raise ConfigError(f"secagg.frac_bits must be in [8, 40], found {self.frac_bits!r}")
        if not self.stage_timeout_s > 0:
            raise ConfigError(f"secagg.stage_timeout_s must be > 0, found "
                              f"{self.stage_timeout_s!r}")


@dataclass(frozen=True)
class ScreenConfig:
    """Server-side screening of replies that are well-formed but out of proportion.

    The decoder already refuses malformed updates (names, shapes, NaN/Inf, ``max_abs``);
    a finite, well-shaped update scaled up a hundredfold passes it, and a mean strategy
    follows it. ``norm_k`` rejects any update whose L2 norm (over all its delta tensors)
    exceeds ``norm_k`` times the median norm of the round's decoded updates (only with
    at least 3 of them, else there is no meaningful median); ``max_reply_bytes`` rejects
    a reply whose serialized size exceeds it. ``None`` turns either off (the default).
    """

    norm_k: float | None = None
    max_reply_bytes: int | None = None

    def validate(self) -> None:
        if self.norm_k is not None and not self.norm_k > 1:
            raise ConfigError(
                f"screen.norm_k must be > 1 (a multiple of the round's median update norm; "
                f"null turns the norm screen off), found {self.norm_k!r}")
        if self.max_reply_bytes is not None and not self.max_reply_bytes > 0:
            raise ConfigError(
                f"screen.max_reply_bytes must be > 0 (bytes of one serialized reply; null "
                f"turns the cap off), found {self.max_reply_bytes!r}")


@dataclass(frozen=True)
class CaptureConfig:
    """Save what the server observes from chosen clients in chosen rounds, for audits.

    Off by default (``rounds`` empty). ``rounds`` are absolute round numbers (a resumed
    run keeps counting from its checkpoint); ``partitions`` are data partition ids
    (``None``: every client); ``dir`` is where the observations go (``None``:
    ``<run dir>/observations``). Layout and format: ``fedpeft.capture``. The files hold
    clients' updates as received, so they are as sensitive as the updates themselves.
    """

    rounds: tuple[int, ...] = ()
    partitions: tuple[int, ...] | None = None
    dir: str | None = None

    def validate(self) -> None:
        bad = [r for r in self.rounds if r < 1]
        if bad:
            raise ConfigError(
                f"capture.rounds must be round numbers >= 1 (round 1 is the first trained "
                f"round; an empty list turns capture off), found {list(self.rounds)}")
        if self.partitions is not None and any(p < 0 for p in self.partitions):
            raise ConfigError(
                f"capture.partitions must be partition ids >= 0 (null captures every "
                f"client), found {list(self.partitions)}")
        if self.dir is not None and not self.dir.strip():
            raise ConfigError("capture.dir must be a directory path or null (default: "
                              f"<run dir>/observations), found {self.dir!r}")


@dataclass(frozen=True)
class StrategyConfig:
    """``name`` picks a registered strategy; ``params`` are its keyword arguments."""

    name: str = "fedavg"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FedPeftConfig:
    """The validated configuration tree."""

    model: ModelConfig
    data: DataConfig
    method: Any
    strategy: StrategyConfig
    run: RunConfig
    eval: EvalConfig
    sim: SimConfig = field(default_factory=SimConfig)
    privacy: Any = field(default_factory=NoPrivacyConfig)
    compression: Any = field(default_factory=CompressionConfig)
    screen: ScreenConfig = field(default_factory=ScreenConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    overrides: tuple[str, ...] = ()


_TOP = {"model", "data", "method", "strategy", "privacy", "compression", "run", "eval", "sim",
        "screen", "secagg", "capture"}


def default_config_dir() -> Path:
    """``$FEDPEFT_CONFIG_DIR`` or the ``configs/`` folder next to the package."""
    env = os.environ.get(CONFIG_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parent.parent / "configs"


def parse_overrides(text: str | Sequence[str] | None) -> list[str]:
    """Split an overrides string (shell-style quoting) into a list."""
    if text is None:
        return []
    return shlex.split(text) if isinstance(text, str) else [str(t) for t in text]


def compose(
    overrides: str | Sequence[str] | None = None, config_dir: str | Path | None = None
) -> FedPeftConfig:
    """Compose configs with Hydra and validate the result (see module docstring)."""
    items = parse_overrides(overrides)
    for item in items:
        _check_override_key(item)
    hydra_items = [_add_or_set(o) for o in items]
    raw = _hydra_compose(hydra_items, Path(config_dir) if config_dir else default_config_dir())
    return from_dict(raw, overrides=tuple(items))


_DOTTED = re.compile(r"^[A-Za-z_][\w-]*\.[\w.-]+=")


def _add_or_set(override: str) -> str:
    """``a.b=v`` -> ``++a.b=v``: every schema field is settable even when the YAML leaves
    it at its default; typos are still caught by schema validation, listing valid keys."""
    return f"++{override}" if _DOTTED.match(override) else override


_GROUPS = ("model", "data", "method", "strategy", "privacy", "compression")


def _check_override_key(override: str) -> None:
    """An override's first key must be a group (``method=...``) or a top-level key
    (``run.x=...``); anything else fails here, with close matches, not in Hydra."""
    key = override.lstrip("+~").split("=", 1)[0].split(".", 1)[0]
    if "=" not in override or key in _TOP:
        return
    close = difflib.get_close_matches(key, sorted(_TOP), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"unknown config key {key!r} in override {override!r}.{hint} Valid: component "
        f"groups {', '.join(f'{g}=<name>' for g in _GROUPS)}, and keys under "
        f"{', '.join(f'{k}.' for k in sorted(_TOP))} (list them with `fedpeft config show "
        "<group>`)")


def _hydra_compose(overrides: list[str], config_dir: Path) -> dict[str, Any]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not (config_dir / "config.yaml").is_file():
        raise ConfigError(f"no config.yaml in config directory {str(config_dir)!r}")
    try:
        with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        text = str(exc).split("\nConfig search path")[0].strip()
        raise ConfigError(f"invalid overrides {overrides}: {text}") from None
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def from_dict(raw: dict[str, Any], overrides: tuple[str, ...] = ()) -> FedPeftConfig:
    """Validate a plain config tree (what Hydra composed) into a :class:`FedPeftConfig`."""
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; valid keys: {sorted(_TOP)}")
    method_raw = dict(raw.get("method") or {})
    load_plugins()
    method_cls = METHODS.get(_component_name(method_raw, "method", METHODS.names())).config_cls
    cfg = FedPeftConfig(
        model=schema.build(ModelConfig, raw.get("model"), "model"),
        data=schema.build(DataConfig, raw.get("data"), "data"),
        method=schema.build(method_cls, method_raw, "method"),
        strategy=_strategy(raw.get("strategy") or {}),
        run=schema.build(RunConfig, raw.get("run"), "run"),
        eval=schema.build(EvalConfig, raw.get("eval"), "eval"),
        sim=schema.build(SimConfig, raw.get("sim"), "sim"),
        privacy=_privacy(raw.get("privacy")),
        compression=_compression(raw.get("compression")),
        screen=schema.build(ScreenConfig, raw.get("screen"), "screen"),
        secagg=schema.build(SecAggConfig, raw.get("secagg"), "secagg"),
        capture=schema.build(CaptureConfig, raw.get("capture"), "capture"),
        overrides=overrides,
    )
    check_compatibility(cfg)
    return dataclasses.replace(cfg, privacy=build_privacy(cfg.privacy).resolve(cfg.run))


def _privacy(raw: dict[str, Any] | None) -> Any:
    """The privacy mechanism's config (``privacy: none`` when the tree has none)."""
    data = dict(raw or {"name": "none"})
    cls = PRIVACY.get(_component_name(data, "privacy", PRIVACY.names())).config_cls
    return schema.build(cls, data, "privacy")


def _compression(raw: dict[str, Any] | None) -> Any:
    """The codec's config (``compression: identity`` when the tree has none)."""
    data = dict(raw or {"name": "identity"})
    cls = COMPRESSORS.get(_component_name(data, "compression", COMPRESSORS.names())).config_cls
    return schema.build(cls, data, "compression")


def _strategy(raw: dict[str, Any]) -> StrategyConfig:
    load_components()
    registry = importlib.import_module(COMPONENT_PACKAGES[0]).STRATEGIES  # by name: no cycle
    params = dict(raw)
    name = _component_name(params, "strategy", registry.names())
    params.pop("name")
    return StrategyConfig(name=name, params=params)


def _component_name(raw: dict[str, Any], group: str, valid: list[str]) -> str:
    """The ``name:`` of a component YAML; required, never defaulted."""
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"the {group} config has no 'name:' (found keys {sorted(raw)}); every "
            f"configs/{group}/<file>.yaml must say which registered {group} it configures, "
            f"e.g. 'name: {valid[0] if valid else '...'}'; registered: {', '.join(valid)}")
    return name


def check_compatibility(cfg: FedPeftConfig) -> None:
    """Run the registered strategy checks: known name, valid options, and that the
    strategy can aggregate the method's update kind (errors name what would fit)."""
    load_components()
    method = METHODS.get(cfg.method.name)
    kind = getattr(method, "update_kind", "dense")
    for check in _STRATEGY_CHECKS:
        check(cfg.strategy.name, dict(cfg.strategy.params), kind, secagg=cfg.secagg.enabled)
    build_privacy(cfg.privacy).check(method, cfg.strategy.name, dict(cfg.strategy.params),
                                     cfg.method)
    check_update_kind(cfg.compression, method)
    build_compressor(cfg.compression)
    check_capture_rounds(cfg.capture, cfg.run)
    if cfg.secagg.enabled:
        check_secagg(cfg)


def check_secagg(cfg: FedPeftConfig) -> None:
    """SecAgg+ hides individual updates: what needs them cannot be combined with it."""
    conflicts = {
        "compression": (cfg.compression.name != "identity",
                        f"compression={cfg.compression.name} (a masked vector cannot be "
                        "sparsified or entropy-coded; use compression=identity)"),
        "screen.norm_k": (cfg.screen.norm_k is not None,
                          "screen.norm_k (the server never sees one client's norm)"),
        "capture.rounds": (bool(cfg.capture.rounds),
                           "capture.rounds (the server observes only masked vectors)"),
    }
    found = [why for bad, why in conflicts.values() if bad]
    if found:
        raise IncompatibleComponentsError(
            "secagg.enabled=true cannot be combined with " + "; ".join(found))


def check_capture_rounds(capture: CaptureConfig, run: RunConfig) -> None:
    """Captured rounds must be rounds the run has (``1..run.num_rounds``)."""
    late = sorted(r for r in capture.rounds if r > run.num_rounds)
    if late:
        raise ConfigError(
            f"capture.rounds={list(capture.rounds)} names round(s) {late} after the last "
            f"round (run.num_rounds={run.num_rounds}); use rounds 1..{run.num_rounds} or "
            "raise run.num_rounds")


def check_capture_partitions(capture: CaptureConfig, num_clients: int) -> None:
    """With a known federation size, captured partitions must exist (``0..n-1``)."""
    parts = capture.partitions or ()
    missing = sorted(p for p in parts if p >= num_clients)
    if missing:
        raise ConfigError(
            f"capture.partitions={list(parts)} names partition(s) {missing}, but the "
            f"federation has {num_clients} clients (partition ids 0..{num_clients - 1}); "
            "use ids below sim.num_clients or null for every client")
