"""The bad-input table: every case fails in the preflight, in-process, in under 2 s,
before any process starts and before any model loads, with a message that names the
key, the value and what would work."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

import fedpeft.models
from fedpeft.config import default_config_dir
from fedpeft.errors import FedPeftError
from fedpeft.preflight import preflight

CASES: list[tuple[str, str]] = [
    # impossible partitions
    ("sim.num_clients=512", "cannot split 2165 training examples"),
    ("sim.num_clients=1000", "Remedies: a larger data.partition.alpha"),
    ("data.partition.type=iid sim.num_clients=3000", "more clients than examples"),
    ("data.partition.type=pathological data.partition.num_classes_per_partition=9",
     "exceeds the 5 classes"),
    ("data=chatterbot-qa data.partition.type=dirichlet", "valid types here: iid"),
    # node counts that would wait forever or make robust rules meaningless
    ("strategy.min_available_nodes=10", "strategy.min_available_nodes=10 but the federation"),
    ("strategy=krum strategy.min_train_nodes=7", "strategy.min_train_nodes=7"),
    ("strategy=krum strategy.num_malicious_nodes=1", "n >= 2f + 3"),
    ("strategy=bulyan strategy.num_malicious_nodes=1 sim.num_clients=6", "n >= 4f + 3"),
    ("strategy.fraction_train=0.1 strategy.min_train_nodes=0", "samples no client"),
    ("strategy=multikrum strategy.num_nodes_to_select=9 sim.num_clients=5",
     "num_nodes_to_select=9 exceeds"),
    # option types and ranges
    ("strategy=krum strategy.num_malicious_nodes=abc", "expected an integer"),
    ("strategy.fraction_train=1.5", "strategy.fraction_train must be in [0.0, 1.0]"),
    ("strategy=fedtrimmedavg strategy.beta=0.6", "must be in [0.0, 0.5)"),
    ("strategy=bulyan strategy.selection_rule=x", "cannot be set from config"),
    ("method.adapter.r=0", "method.adapter.r (peft_type=lora) must be an integer >= 1"),
    ("method.adapter.lora_dropout=1.5", "method.adapter.lora_dropout"),
    ("method.lr=abc", "expects a number"),
    ("sim.num_clients=0", "sim.num_clients must be >= 1"),
    ("run.num_rounds=0", "run.num_rounds must be > 0, found 0"),
    ("run.stall_timeout_s=-1", "run.stall_timeout_s must be > 0"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("data.test_size=0", "data.test_size must be >= 1"),
    ("data.partition.alpha=0", "data.partition.alpha must be > 0"),
    ("model.dtype=float8", "model.dtype"),
    ("model.device=gpu", "unknown model.device 'gpu'; valid choices: auto, cpu, cuda, cuda:N"),
    # unknown keys and names, with what would work
    ("foo=1", "unknown config key 'foo'"),
    ("strategy.fraction_trian=0.5", "did you mean fraction_train"),
    ("run.num_round=2", "did you mean num_rounds"),
    ("data.partition.type=zipf", "valid choices: dirichlet, iid, pathological"),
    ("method.adapter.peft_type=nosuch", "valid choices"),
    ("method=ferret strategy=fedavg", "strategies that can: ferret"),
    ("method=nosuch", "nosuch"),
    # files and models that are not there
    ("data=local data.name=/no/such/file.jsonl", "does not exist"),
    ("run.resume=/no/such/run", "run.resume='/no/such/run': no such directory"),
    ("model=hf model.name=nobody/no-such-model", "not in the local Hugging Face cache"),
    ("model=hf model.name=./no/such/dir", "no such directory"),
]


@pytest.fixture(scope="module", autouse=True)
def _warm() -> None:
    """Imports and the bundled data's first read happen once, outside the timing."""
    preflight([], federation_size="sim")


@pytest.fixture
def no_processes_or_models(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("preflight must not start processes or load models")

    monkeypatch.setattr(subprocess, "Popen", forbidden)
    monkeypatch.setattr(fedpeft.models, "load_causal_lm", forbidden)
    monkeypatch.setattr(fedpeft.models, "_from_pretrained", forbidden)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_table_has_at_least_25_cases() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize(("overrides", "fragment"), CASES, ids=[c[0][:40] for c in CASES])
def test_bad_input_fails_in_preflight(overrides: str, fragment: str,
                                      no_processes_or_models: None) -> None:
    t0 = time.perf_counter()
    with pytest.raises(FedPeftError) as info:
        preflight(overrides.split(), federation_size="sim")
    elapsed = time.perf_counter() - t0
    assert fragment in str(info.value), str(info.value)
    assert elapsed < 2.0, f"preflight took {elapsed:.2f}s"


def test_component_yaml_without_name_is_an_error(tmp_path: Path,
                                                 no_processes_or_models: None) -> None:
    configs = tmp_path / "configs"
    shutil.copytree(default_config_dir(), configs)
    text = (configs / "method" / "lora.yaml").read_text()
    (configs / "method" / "noname.yaml").write_text(text.replace("name: lora\n", ""))
    with pytest.raises(FedPeftError, match=r"has no 'name:'.*registered: "):
        preflight(["method=noname"], configs)


def test_good_config_reports_each_clients_partition_size() -> None:
    report = preflight(["sim.num_clients=8"], federation_size="sim")
    assert report.num_clients == 8 and len(report.partition_sizes) == 8
    assert sum(report.partition_sizes) == 2165 and min(report.partition_sizes) >= 2
    assert "8 clients" in report.summary()


@pytest.mark.parametrize(("overrides", "fragment"), [
    ("privacy=dpsgd privacy.max_epsilon=1 privacy.noise_multiplier=0.5",
     "the smallest client (391 examples; q=0.01023, 4 steps, sigma=0.5) reaches epsilon 5.09"),
    ("method=fedkseed strategy=fedkseed privacy=dpzo privacy.max_epsilon=0.2",
     "q=0.002558, 200 steps, sigma=1) reaches epsilon 0.819"),
    ("privacy=client privacy.max_epsilon=0.5 privacy.noise_multiplier=0.8",
     "a client (q=0.5, 1 steps, sigma=0.8) reaches epsilon 5.24"),
])
def test_a_budget_one_round_would_spend_fails_in_preflight(
        overrides: str, fragment: str, no_processes_or_models: None) -> None:
    with pytest.raises(FedPeftError, match="is spent by one round") as info:
        preflight(overrides.split(), federation_size="sim")
    assert fragment in str(info.value)


def test_a_budget_that_fits_one_round_passes() -> None:
    for ok in ("privacy=dpsgd privacy.max_epsilon=8",
               "privacy=dpsgd privacy.max_epsilon=3 privacy.target_epsilon=3"):
        assert "privacy dpsgd" in preflight(ok.split(), federation_size="sim").summary()
