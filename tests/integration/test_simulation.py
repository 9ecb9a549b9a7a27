"""A real `flwr run` simulation (local SuperLink + Ray) on the tiny model, and resume;
the same run captures what the server observed and checks it is what FedAvg aggregated,
and its round 1 is repeated under SecAgg+ to the same global model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft import cli, wire
from fedpeft.capture import read_observations
from fedpeft.config import compose
from fedpeft.methods import build_method
from fedpeft.models import load_causal_lm
from fedpeft.reporting import RunDir
from tests.integration.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def test_flwr_simulation_three_clients_two_rounds_then_resume(
    tmp_path: Path, flwr_home: Path, app_dir: Path
) -> None:
    out = tmp_path / "runs"
    base = [*tiny_overrides(out, "sim"), "sim.num_clients=3", "sim.client_cpus=1"]

    code = cli.main(["simulate", *base, "run.num_rounds=2", "capture.rounds=[1,2]",
                     "--app", str(app_dir)])

    assert code == 0
    run = RunDir(out / "sim")
    records = run.records()
    assert [r["round"] for r in records] == [0, 1, 2]
    for rec in records[1:]:
        assert rec["num_clients"] == 3 and rec["num_rejected"] == 0
        assert len(rec["bytes_up"]) == 3 and len(rec["bytes_down"]) == 3
        assert np.isfinite(rec["train_loss"]) and np.isfinite(rec["eval_loss"])
    # Round 2 broadcasts a trained adapter (round 1's has LoRA B == 0, whose identical
    # chunks Flower deduplicates, so it is legitimately smaller than the raw tensors).
    _assert_payload_matches_adapter(records[2], tmp_path, base)

    # Resume from the round-2 checkpoint and run one more round.
    code = cli.main(["simulate", *base, "run.num_rounds=3", f"run.resume={out / 'sim'}",
                     "capture.rounds=[3]", "--app", str(app_dir)])

    assert code == 0
    assert [r["round"] for r in run.records()] == [0, 1, 2, 3]
    assert run.latest_checkpoint()[0] == 3
    _assert_checkpoint_loads_with_peft(run, base)
    _assert_captures_are_what_fedavg_aggregated(run, rounds=3, clients=3)
    _assert_secure_round_equals_the_plain_round(run, out, app_dir)


def _assert_secure_round_equals_the_plain_round(plain: RunDir, out: Path, app_dir: Path
                                                ) -> None:
    """The same round 1 under SecAgg+ (keys, shares, masked updates, unmasking over the
    simulation's messages) gives the same global adapter within fixed-point error."""
    from safetensors.numpy import load_file

    base = [*tiny_overrides(out, "secure"), "sim.num_clients=3", "sim.client_cpus=1"]
    assert cli.main(["simulate", *base, "run.num_rounds=1", "secagg.enabled=true",
                     "--app", str(app_dir)]) == 0
    secure = RunDir(out / "secure")
    rec = secure.records()[1]
    assert rec["num_clients"] == 3 and rec["num_rejected"] == 0
    assert rec["extra"]["secagg_bytes_keys"] > 0 and rec["extra"]["secagg_bytes_unmask"] > 0
    name = "adapter_model.safetensors"
    a = load_file(str(plain.checkpoint_dir(1) / name))
    b = load_file(str(secure.checkpoint_dir(1) / name))
    assert set(a) == set(b)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-6


def _assert_captures_are_what_fedavg_aggregated(run: RunDir, rounds: int, clients: int) -> None:
    """Round r's captured global plus the num-examples-weighted mean of its captured deltas
    is the global the server sent in round r+1 and the adapter it checkpointed after r."""
    from safetensors.numpy import load_file

    found = read_observations(run.path / "observations")
    assert [(u.round, u.partition) for u in found] == [
        (r, p) for r in range(1, rounds + 1) for p in range(clients)]
    sent = {u.round: u.sent_global for u in found}
    for rnd in range(1, rounds + 1):
        updates = [u for u in found if u.round == rnd]
        assert all(u.kind == "dense" and u.rejected is None and u.config["round"] == rnd
                   for u in updates)
        weights = np.array([u.metrics[wire.NUM_EXAMPLES_KEY] for u in updates], np.float64)
        assert len(set(weights)) > 1  # unequal sizes: weighting matters
        glob = updates[0].sent_global
        assert all(np.array_equal(u.sent_global[k], glob[k]) for u in updates for k in glob)
        pairs = list(zip(weights / weights.sum(), updates, strict=True))
        expected = {k: glob[k] + sum(w * u.received[k] for w, u in pairs) for k in glob}
        ckpt = load_file(str(run.checkpoint_dir(rnd) / "adapter_model.safetensors"))
        for after in (sent.get(rnd + 1), ckpt):
            if after is None:
                continue
            assert sorted(after) == sorted(expected)
            for k in expected:
                np.testing.assert_allclose(after[k], expected[k], rtol=1e-6, atol=1e-8)


def _assert_checkpoint_loads_with_peft(run: RunDir, overrides: list[str]) -> None:
    from peft import PeftModel, get_peft_model_state_dict

    cfg = compose(overrides)
    _, path = run.latest_checkpoint()
    model = PeftModel.from_pretrained(load_causal_lm(cfg.model), str(path))
    method = build_method("lora", cfg.method)
    ours = method.attach(load_causal_lm(cfg.model), seed=0)
    method.load(ours, path)
    theirs = get_peft_model_state_dict(model)
    for key, value in get_peft_model_state_dict(ours).items():
        assert torch.equal(value, theirs[key])
    assert any(float(v.abs().sum()) > 0 for k, v in theirs.items() if "lora_B" in k)


def _assert_payload_matches_adapter(rec: dict, tmp_path: Path, overrides: list[str]) -> None:
    cfg = compose(overrides)
    method = build_method("lora", cfg.method)
    state = method.get_state(method.attach(load_causal_lm(cfg.model), seed=0))
    expected_payload = wire.payload_bytes(wire.to_arrayrecord(state))
    raw = sum(a.nbytes for a in state.values())
    framing = 1024 * len(state) + 4096  # Flower object headers/ids per tensor + message
    for node, payload in rec["payload_bytes_up"].items():
        assert payload == expected_payload
        assert raw == payload < rec["bytes_up"][node] < raw + framing  # values only
    for down in rec["bytes_down"].values():
        assert raw < down < raw + framing


def test_simulate_exits_nonzero_when_the_run_fails(
    tmp_path: Path, flwr_home: Path, app_dir: Path
) -> None:
    out = tmp_path / "runs"
    # A config that validates but fails inside the ServerApp: the held-out split asks
    # for more examples than the capped dataset has.
    overrides = [*tiny_overrides(out, "bad"), "run.num_rounds=1", "sim.num_clients=2",
                 "sim.client_cpus=1", "data.test_size=5000"]

    code = cli.main(["simulate", *overrides, "--app", str(app_dir)])

    assert code != 0
