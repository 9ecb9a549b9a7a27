"""``fedpeft audit`` options: the grid, its validation, and the runs it asks for."""

from __future__ import annotations

from pathlib import Path

import pytest

from attacks.audit import (
    Point,
    boost_config,
    boosted_overrides,
    canary_applies,
    grid,
    run_overrides,
    split_overrides,
    victim_records,
)
from attacks.victims import load_records
from fedpeft.cli import main, plugin_commands
from fedpeft.config import compose
from fedpeft.errors import ConfigError


def test_audit_keys_build_the_grid_and_the_rest_reach_the_runs() -> None:
    cfg, rest = split_overrides(["audit.batch_sizes=[1,4,16]", "audit.epsilons=[null,3]",
                                 "model=tiny-llama"])
    assert rest == ["model=tiny-llama"]
    points = grid(cfg)
    assert len(points) == 6 and Point("lora", 16, 3.0, "identity") in points
    assert {p.label for p in points} >= {"lora-b1-nodp-identity", "lora-b16-eps3-identity"}


@pytest.mark.parametrize(("override", "message"), [
    ("audit.batchsizes=[1]", "did you mean batch_sizes"),
    ("audit.attacks=[dlg]", "valid"),
    ("audit.epsilons=[0]", "null \\(no DP\\) or > 0"),
    ("audit.batch_sizes=[]", "non-empty"),
    ("audit.canary_guesses=80", "canary_guesses"),
    ("audit.boost_steps=0", "boost_steps must be >= 1"),
    ("audit.lora_rank=0", "lora_rank must be null or >= 1"),
])
def test_bad_audit_options_fail_early(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        split_overrides([override])


def test_each_point_is_a_valid_fedpeft_run(tmp_path: Path) -> None:
    cfg, _ = split_overrides(["audit.epsilons=[3]", "audit.codecs=[compeft]"])
    point = grid(cfg)[0]
    overrides = run_overrides(cfg, point, tmp_path / "d.jsonl", tmp_path, ["model=tiny-llama"])
    run = compose(overrides)
    assert (run.privacy.name, run.privacy.target_epsilon) == ("dpsgd", 3.0)
    assert run.compression.name == "compeft" and tuple(run.capture.rounds) == (cfg.rounds,)
    assert (run.method.batch_size, run.method.local_steps) == (point.batch_size, 1)
    assert run.method.optimizer == "sgd" and run.method.adapter["r"] == cfg.lora_rank
    assert run.method.adapter["lora_dropout"] == 0.0


def test_the_default_lora_point_keeps_the_method_settings(tmp_path: Path) -> None:
    cfg, _ = split_overrides(["audit.optimizer=adamw", "audit.lora_rank=null"])
    run = compose(run_overrides(cfg, grid(cfg)[0], tmp_path / "d.jsonl", tmp_path, []))
    assert run.method.optimizer == "adamw" and run.method.adapter["r"] == 8


def test_canary_audit_runs_only_on_dense_updates() -> None:
    assert canary_applies("lora")
    assert not canary_applies("fedkseed") and not canary_applies("ferret")


@pytest.mark.parametrize("method", ["fedkseed", "ferret"])
def test_seed_methods_get_their_own_strategy(tmp_path: Path, method: str) -> None:
    cfg, _ = split_overrides([f"audit.methods=[{method}]", "audit.epsilons=[null]"])
    run = compose(run_overrides(cfg, grid(cfg)[0], tmp_path / "d.jsonl", tmp_path, []))
    assert (run.method.name, run.strategy.name) == (method, method)


def test_victims_fill_every_partition_and_user_data_is_checked(tmp_path: Path) -> None:
    cfg, _ = split_overrides(["audit.clients=3"])
    assert len(victim_records(cfg, 4)) == 3 * 4 + 4
    bad = tmp_path / "v.jsonl"
    bad.write_text('{"text": "Ann lives here", "pii": ["Bob"]}\n')
    with pytest.raises(ConfigError, match="do not occur in the text"):
        load_records(bad)
    short, _ = split_overrides([f"audit.data={bad}"])
    bad.write_text('{"text": "Ann lives here", "pii": ["Ann"]}\n')
    with pytest.raises(ConfigError, match="need"):
        victim_records(short, 1)


def test_audit_is_a_fedpeft_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert "audit" in plugin_commands()
    assert main(["audit", "audit.bogus=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err


def test_boost_makes_every_run_load_the_boosted_model(tmp_path: Path) -> None:
    cfg, extra = split_overrides(["audit.boost=true", "audit.boost_steps=7", "model=hf",
                                  "model.name=org/base", "model.device=cpu",
                                  "model.dtype=bfloat16"])
    assert (cfg.boost, boost_config(cfg).steps, boost_config(cfg).seed) == (True, 7, cfg.seed)
    assert boosted_overrides(extra, None) == extra
    model_dir = tmp_path / "boosted"
    model_dir.mkdir()
    overrides = run_overrides(cfg, grid(cfg)[0], tmp_path / "d.jsonl", tmp_path,
                              boosted_overrides(extra, model_dir))
    model = compose(overrides).model
    assert (model.name, model.device, model.dtype) == (str(model_dir), "cpu", "bfloat16")


class _Stop(Exception):
    """Raised by a stand-in federated run to end the audit early."""


def test_run_audit_boosts_the_runs_base_once(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import attacks.audit as audit
    import attacks.boost

    built: list[tuple] = []
    runs: list[list[str]] = []

    def fake_boost(model_cfg: object, cfg: object) -> Path:
        built.append((model_cfg, cfg))
        return tmp_path / "boosted"

    def stop(cfg: object, point: object, root: Path, extra: list[str], app: Path) -> Path:
        runs.append(extra)
        raise _Stop  # before any real run

    monkeypatch.setattr(attacks.boost, "boost", fake_boost)
    monkeypatch.setattr(audit, "federated_run", stop)
    with pytest.raises(_Stop):
        audit.run_audit(["audit.boost=true", "audit.boost_steps=3", "model=tiny-llama",
                         f"audit.out={tmp_path}"], tmp_path)
    ((model_cfg, boost_cfg),) = built
    assert (model_cfg.name, boost_cfg.steps) == ("tiny-llama", 3)
    assert runs == [["model=tiny-llama", "model=hf", f"model.name={tmp_path / 'boosted'}"]]
