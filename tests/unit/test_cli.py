"""`fedpeft simulate` hands overrides to `flwr run` without losing quoting."""

from __future__ import annotations

import shlex
from types import SimpleNamespace

import pytest
from flwr.common.config import parse_config_args

from fedpeft.cli import flwr_run_command, run_config_string
from fedpeft.config import compose

TRICKY = [
    "method=fedkseed",
    "strategy=fedkseed",
    "method.trainable='layers\\.2[4-9]\\.mlp\\.(up|down)_proj'",  # Hydra-quoted regex
    "run.output_dir=/tmp/with space",
    'run.run_id="quoted"',
]


def test_overrides_survive_flowers_run_config_parser() -> None:
    got = parse_config_args(["overrides=" + run_config_string(TRICKY)])["overrides"]
    assert shlex.split(got) == TRICKY


def test_the_apps_compose_the_same_config_as_the_cli() -> None:
    items = TRICKY[:3]
    cmd = flwr_run_command("app", items, SimpleNamespace(num_clients=2, client_cpus=1,
                                                         client_gpus=0))
    text = parse_config_args([cmd[cmd.index("--run-config") + 1]])["overrides"]
    assert compose(text) == compose(items)
    assert compose(text).method.trainable == r"layers\.2[4-9]\.mlp\.(up|down)_proj"


@pytest.mark.parametrize("bad", ['x="', "a=b'c"])
def test_unbalanced_quotes_still_round_trip(bad: str) -> None:
    got = parse_config_args(["overrides=" + run_config_string([bad])])["overrides"]
    assert shlex.split(got) == [bad]


def test_validate_runs_the_partition_preflight_and_exits_2(capsys: pytest.CaptureFixture) -> None:
    from fedpeft.cli import main

    assert main(["validate", "sim.num_clients=512"]) == 2
    err = capsys.readouterr().err
    assert "cannot split 2165 training examples" in err and "over 512 clients" in err


def test_config_show_lists_strategy_options_from_flower_signatures(
        capsys: pytest.CaptureFixture) -> None:
    from fedpeft.cli import main

    assert main(["config", "show", "strategy"]) == 0
    out = capsys.readouterr().out
    assert "strategy=krum:" in out and "strategy.num_malicious_nodes: int = 0" in out
    assert "selection_rule" not in out  # callables cannot be set from config
