"""DP-ZO (privacy=dpzo) on FedKSeed: clipping, noise scale, replay exactness, empty Poisson
batches, the reported privacy event, and noise that the run seed cannot reproduce."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from fedpeft.config import compose
from fedpeft.data import collate, encode_dataset, load_task_data
from fedpeft.errors import ConfigError, IncompatibleComponentsError
from fedpeft.methods import TrainContext, build_method, build_model
from fedpeft.methods.fedkseed import FedKSeedConfig, encode_history
from fedpeft.models import get_tokenizer
from fedpeft.privacy.accounting import PrivacyEvent, event_from_metrics
from fedpeft.privacy.dpzo import (
    DPZOConfig,
    clip_scalars,
    dpzo_train,
    noisy_estimate,
    sequence_losses,
)
from fedpeft.types import TrainResult

N = 8  # examples of the client
STEPS = 3
# Seed-tuning only the attention weights and short inputs keep each local round well
# under a second on a CPU; the mechanism does not depend on which tensors are tuned.
BASE = (f"method=fedkseed strategy=fedkseed privacy=dpzo model=tiny-llama "
        f"method.num_seeds=64 method.local_steps={STEPS} method.batch_size=2 method.lr=0.01 "
        "method.trainable=self_attn data.max_examples=200 data.test_size=20 "
        "data.max_input_tokens=24")


@pytest.fixture(scope="module")
def setup():
    cfg = compose(BASE)
    tok = get_tokenizer(cfg.model)
    data = load_task_data(cfg.data)
    examples = encode_dataset(data.train.select(range(N)), tok, data.label_names, cfg.data)
    return cfg, examples, tok.pad_token_id


def _fresh(cfg, method_cfg: FedKSeedConfig | None = None):
    method = build_method("fedkseed", method_cfg or cfg.method)
    return method, build_model(method, cfg.model, seed=0)


def _train(setup, privacy, method_cfg: FedKSeedConfig | None = None) -> TrainResult:
    cfg, examples, pad = setup
    method, model = _fresh(cfg, method_cfg)
    ctx = TrainContext(server_round=1, partition_id=0, seed=0, pad_token_id=pad,
                       privacy=privacy)
    return method.train(model, examples, ctx)


# --- the pieces -----------------------------------------------------------------------


def test_clip_scalars_bounds_each_value_and_zeroes_non_finite() -> None:
    g = np.array([-5.0, -0.2, 0.0, 0.3, 7.0, np.nan, np.inf])
    out = clip_scalars(g, 0.5)
    np.testing.assert_array_equal(out, [-0.5, -0.2, 0.0, 0.3, 0.5, 0.0, 0.0])


def test_noise_has_std_sigma_c_on_the_clipped_sum() -> None:
    cfg = DPZOConfig(clip=0.5, noise_multiplier=1.5)
    g = np.array([0.3, -5.0, 2.0])  # clipped sum: 0.3 - 0.5 + 0.5 = 0.3
    rng = np.random.default_rng(0)
    draws = np.array([noisy_estimate(g, cfg, 4.0, rng) for _ in range(20000)]) * 4.0
    assert draws.std() == pytest.approx(1.5 * 0.5, rel=0.05)  # sigma·C (2x off fails)
    assert draws.mean() == pytest.approx(0.3, abs=0.03)


def test_sequence_losses_match_the_models_own_loss_per_sequence(setup) -> None:
    cfg, examples, pad = setup
    _, model = _fresh(cfg)
    batch = collate(examples[:3], pad)
    labels = batch.pop("labels")
    with torch.no_grad():
        per_seq = sequence_losses(model(**batch).logits, labels)
        alone = [float(model(**collate([e], pad)).loss) for e in examples[:3]]
    np.testing.assert_allclose(per_seq.numpy(), alone, rtol=1e-4)


def _linear_problem(slopes: np.ndarray):
    """Per-example losses L_i(w) = slope_i · w[0]; the seed's z moves w[0], so every g_i
    is slope_i · z_0 (huge slopes: clipping must bound it)."""
    params = {"w": torch.zeros(4, dtype=torch.float64)}
    sizes: list[int] = []

    def losses(idx: np.ndarray) -> torch.Tensor:
        sizes.append(int(idx.size))
        return torch.as_tensor(slopes[idx]) * params["w"][0]

    return params, losses, sizes


def _run(losses, params, n, cfg, steps=20, batch_size=2, seed=0, noise_rng=None):
    mcfg = FedKSeedConfig(num_seeds=steps, local_steps=steps, batch_size=batch_size,
                          eps=1e-3, lr=1e-6)
    pick = itertools.count().__next__  # a distinct seed per step: each value is one ĝ
    seeds = list(range(1000, 1000 + steps))
    return dpzo_train(params, losses, n, seeds, pick, mcfg, cfg,
                      np.random.default_rng(seed), noise_rng)


def test_each_step_is_bounded_by_c_times_the_realised_batch_over_qn() -> None:
    n, clip = 10, 1e-3
    params, losses, sizes = _linear_problem(np.full(n, 1e4))
    res = _run(losses, params, n, DPZOConfig(clip=clip, noise_multiplier=0.0, sampling="seeded"))

    calls = iter(sizes[::2])  # two forwards per non-empty step; sigma=0: an empty step gives 0
    realised = np.array([next(calls) if v != 0 else 0 for v in res.values])
    bound = clip * realised / 2.0  # q N = batch_size = 2
    assert np.all(np.abs(res.values) <= bound * (1 + 1e-6))
    np.testing.assert_allclose(np.abs(res.values), bound, rtol=1e-6)  # clipping engaged


def test_end_to_end_values_are_clipped_without_noise(setup) -> None:
    cfg, _, _ = setup
    full = dataclasses.replace(cfg.method, batch_size=N)  # q = 1: the batch is all N
    res = _train(setup, DPZOConfig(clip=1e-6, noise_multiplier=0.0), full)
    assert res.update.values.size > 0
    assert np.all(np.abs(res.update.values) <= STEPS * 1e-6 * (1 + 1e-5))


def test_empty_poisson_batches_are_survived_and_counted() -> None:
    n = 5000  # q = 1/n: a batch is empty with probability ≈ 1/e
    params, losses, sizes = _linear_problem(np.ones(n))
    res = _run(losses, params, n, DPZOConfig(noise_multiplier=1.0, sampling="seeded"),
               batch_size=1, noise_rng=np.random.default_rng(1))
    assert res.empty_steps > 0 and res.steps == 20
    assert len(sizes) == 2 * (20 - res.empty_steps)  # no forward for an empty batch
    assert res.values.size == 20 and np.all(res.values != 0)  # noise-only steps taken


def test_empty_batches_are_reported_end_to_end(setup) -> None:
    cfg, _, _ = setup
    one = dataclasses.replace(cfg.method, batch_size=1, local_steps=8)
    res = _train(setup, DPZOConfig(sampling="seeded"), one)
    assert res.metrics["dp_empty_steps"] > 0
    assert event_from_metrics(res.metrics) == PrivacyEvent(1.0, 1.0, 8)  # empties count
    assert np.isfinite(res.update.values).all()


# --- the method's private path ---------------------------------------------------------


def test_reported_event_is_sigma_q_and_local_steps(setup) -> None:
    res = _train(setup, DPZOConfig(noise_multiplier=0.7))
    assert event_from_metrics(res.metrics) == PrivacyEvent(0.7, 2 / N, STEPS)
    assert "train_loss" not in res.metrics  # an unnoised loss would leak
    seeded = _train(setup, DPZOConfig(noise_multiplier=0.7, sampling="seeded"))
    assert event_from_metrics(seeded.metrics) == PrivacyEvent(0.7, 1.0, STEPS)


def test_server_replay_of_private_values_is_bit_identical_to_client_catch_up(setup) -> None:
    cfg, _, _ = setup
    private = _train(setup, DPZOConfig(noise_multiplier=1.0))
    plain = _train(setup, None)
    idx, vals = private.update.indices, private.update.values
    server_method, server = _fresh(cfg)
    client_method, client = _fresh(cfg)

    server_method.apply_global(server, {"idx": idx, "vals": vals})
    client_method.catch_up(client, encode_history([(1, idx, vals)], 64), after=0, upto=1)

    assert all(torch.equal(a, b) for a, b in zip(server.parameters(), client.parameters(),
                                                 strict=True))
    assert not np.array_equal(vals, plain.update.values[: vals.size])


def test_noise_is_not_reproducible_from_the_run_seed_but_noiseless_runs_are(setup) -> None:
    noisy = DPZOConfig(noise_multiplier=1.0, sampling="seeded")
    one, two = (_train(setup, noisy) for _ in range(2))
    assert np.array_equal(one.update.indices, two.update.indices)  # seed picks are public
    assert not np.array_equal(one.update.values, two.update.values)
    a, b = (_train(setup, DPZOConfig(noise_multiplier=0.0, sampling="seeded")) for _ in range(2))
    assert np.array_equal(a.update.values, b.update.values)


def test_non_private_path_is_taken_without_a_dpzo_config(setup) -> None:
    res = _train(setup, None)
    assert "dp_steps" not in res.metrics and np.isfinite(res.metrics["train_loss"])


# --- configuration ---------------------------------------------------------------------


def test_dpzo_composes_with_fedkseed_and_rejects_dense_methods() -> None:
    assert isinstance(compose("method=fedkseed strategy=fedkseed privacy=dpzo").privacy,
                      DPZOConfig)
    with pytest.raises(IncompatibleComponentsError,
                       match=r"privacy=dpzo cannot protect method=lora.*privacy=dpsgd"):
        compose("method=lora privacy=dpzo")


@pytest.mark.parametrize("key, value", [("clip", 0), ("noise_multiplier", -1),
                                        ("target_epsilon", 0), ("sampling", "'x'"),
                                        ("delta", 2)])
def test_bad_values_name_their_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"privacy.{key}"):
        compose(f"method=fedkseed strategy=fedkseed privacy=dpzo privacy.{key}={value}")


def test_target_epsilon_picks_sigma_for_this_client_over_the_planned_steps() -> None:
    from fedpeft.privacy.accounting import PrivacyLedger
    from fedpeft.privacy.base import with_target_sigma

    cfg = DPZOConfig(target_epsilon=2.0, noise_multiplier=1.0)
    tuned = with_target_sigma(cfg, 0.05, 40)
    assert tuned.noise_multiplier > 1.0 and with_target_sigma(DPZOConfig(), 0.05, 40) == \
        DPZOConfig()
    ledger = PrivacyLedger()
    for rnd in range(4):
        ledger.record("0", PrivacyEvent(tuned.noise_multiplier, 0.05, 10), rnd)
    assert 1.9 < ledger.epsilon("0", cfg.delta) <= 2.0
    with pytest.raises(ConfigError, match="planned number of steps"):
        with_target_sigma(cfg, 0.05, 0)
