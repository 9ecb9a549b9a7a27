from __future__ import annotations

import pytest

from fedpeft.config import compose
from fedpeft.errors import ConfigError, IncompatibleComponentsError


def test_default_tree_composes_with_typed_values() -> None:
    cfg = compose()

    assert cfg.model.name == "smollm2-135m"
    assert cfg.data.name == "bbc-news"
    assert cfg.data.partition.type == "dirichlet"
    assert cfg.method.name == "lora" and cfg.method.adapter["r"] == 8
    assert cfg.strategy.name == "fedavg"
    assert cfg.sim.num_clients >= 4


def test_cli_style_overrides_reach_every_group() -> None:
    cfg = compose("method=lora strategy=fedadam data.partition.alpha=0.1 "
                  "method.adapter.r=4 run.num_rounds=7 strategy.eta=0.01")

    assert cfg.strategy.name == "fedadam" and cfg.strategy.params["eta"] == 0.01
    assert cfg.data.partition.alpha == 0.1
    assert cfg.method.adapter["r"] == 4
    assert cfg.run.num_rounds == 7


def test_unknown_group_option_lists_valid_choices() -> None:
    with pytest.raises(ConfigError) as err:
        compose("strategy=fedavgg")
    assert "fedavg" in str(err.value) and "fedadam" in str(err.value)


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as err:
        compose("+run.num_round=3")
    msg = str(err.value)
    assert "num_round" in msg and "num_rounds" in msg and "seed" in msg


def test_unknown_strategy_option_lists_valid_options() -> None:
    with pytest.raises(ConfigError) as err:
        compose("strategy=fedadam +strategy.etaa=1.0")
    msg = str(err.value)
    assert "etaa" in msg and "eta" in msg and "beta_1" in msg


def test_unknown_adapter_field_and_type_are_rejected() -> None:
    with pytest.raises(ConfigError, match="lora_alpha"):
        compose("+method.adapter.lora_alhpa=3")
    with pytest.raises(ConfigError) as err:
        compose("method.adapter.peft_type=lorra")
    assert "ia3" in str(err.value) and "lora" in str(err.value)


def test_wrong_value_type_names_expected_type() -> None:
    with pytest.raises(ConfigError, match="expects an integer"):
        compose("run.num_rounds=three")


def test_bad_values_fail_before_any_model_loads() -> None:
    with pytest.raises(ConfigError):
        compose("run.num_rounds=0")
    with pytest.raises(ConfigError):
        compose("method.lr=-1")


def test_incompatible_update_kind_names_fitting_strategies(monkeypatch) -> None:
    from fedpeft.methods.lora import LoraMethod

    monkeypatch.setattr(LoraMethod, "update_kind", "seeds")
    with pytest.raises(IncompatibleComponentsError) as err:
        compose()
    assert "fedavg" in str(err.value) and "seeds" in str(err.value)


@pytest.mark.parametrize(("method", "right"), [("fedkseed", "fedkseed"), ("ferret", "ferret")])
def test_seed_methods_with_a_dense_strategy_fail_naming_the_right_one(method, right) -> None:
    with pytest.raises(IncompatibleComponentsError) as err:
        compose(f"method={method} strategy=fedavg")
    assert f"strategies that can: {right}" in str(err.value)
    with pytest.raises(IncompatibleComponentsError, match=r"strategies that can: .*fedavg"):
        compose(f"method=lora strategy={method}")
