"""Test-only client methods, loaded into every process of a run via ``$FEDPEFT_PLUGINS``.

Each is the LoRA method with one fault injected; select with ``method.name=<name>`` on
top of the lora YAML:

- ``fail``: every client raises in local training;
- ``stall``: every client sleeps forever in local training (watchdog tests);
- ``scaled``: partition 0 sends its real update multiplied by 100 (robust strategies);
- ``fail_first``: partition 0 raises, the others train (a dropout mid-round).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from torch import nn

from fedpeft.methods import METHODS, TrainContext
from fedpeft.methods.lora import LoraMethod
from fedpeft.types import DenseUpdate, TrainResult

PATH = __file__


@METHODS.register("fail")
class FailingMethod(LoraMethod):
    """Raises on every client."""

    name = "fail"

    def train(self, model: nn.Module, examples: Sequence[Any], ctx: TrainContext) -> TrainResult:
        raise RuntimeError(f"injected failure in local training (round {ctx.server_round})")


@METHODS.register("stall")
class StallingMethod(LoraMethod):
    """Never returns."""

    name = "stall"

    def train(self, model: nn.Module, examples: Sequence[Any], ctx: TrainContext) -> TrainResult:
        while True:
            time.sleep(1)


@METHODS.register("scaled")
class ScaledMethod(LoraMethod):
    """Partition 0 is a model-poisoning client: its update is 100 times larger."""

    name = "scaled"

    def train(self, model: nn.Module, examples: Sequence[Any], ctx: TrainContext) -> TrainResult:
        result = super().train(model, examples, ctx)
        if ctx.partition_id != 0:
            return result
        scaled = DenseUpdate({k: v * 100.0 for k, v in result.update.deltas.items()})
        return TrainResult(scaled, result.num_examples, result.metrics)


@METHODS.register("fail_first")
class FailFirstMethod(LoraMethod):
    """Partition 0 raises in local training (after any key exchange that came before the
    training message: a dropout after key sharing, for secure aggregation)."""

    name = "fail_first"

    def train(self, model: nn.Module, examples: Sequence[Any], ctx: TrainContext) -> TrainResult:
        if ctx.partition_id == 0:
            raise RuntimeError("injected dropout of partition 0 in local training")
        return super().train(model, examples, ctx)
