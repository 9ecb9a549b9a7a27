"""DP-SGD local training (fedpeft.privacy.dpsgd) on the tiny model: per-example gradients
and clipping as Opacus computes them, noise of the right scale, Poisson batches (empty
ones included), and a cached model left clean for the next client."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer
from torch import nn

from fedpeft.config import compose
from fedpeft.data import Encoded, collate, encode_dataset, load_task_data
from fedpeft.errors import ConfigError
from fedpeft.methods import build_method, build_model
from fedpeft.models import get_tokenizer
from fedpeft.privacy import dpsgd
from fedpeft.privacy.dpsgd import (
    DPSGDConfig,
    DPSGDResult,
    dp_sgd_train,
    secure_generator,
    sequence_losses,
)

BASE = "model=tiny-llama data.max_examples=200 data.test_size=20 "
SETUPS = {  # lora dropout off: runs compare bit for bit without seeding torch
    "lora": "method.adapter.lora_dropout=0",
    "ferret-attn": "method=ferret strategy=ferret method.trainable=self_attn",
    "ferret-all": "method=ferret strategy=ferret",  # tied embeddings, RMSNorm by functorch
    "lora-bf16": "method.adapter.lora_dropout=0 model.dtype=bfloat16",  # under autocast
    "ssf": "method=ssf",  # SSF sites by Opacus's functorch fallback
    # pool sites by fedpeft's registered rule, keys by functorch; 4 entries so the batch's
    # instances pick different ones
    "ssf-pool": "method=ssf_pool method.pool.entries=4 method.pool.top_n=2 "
                "method.pool.combine=weighted method.pool.temperature=0.05",
}
OPACUS_PARAM_ATTRS = ("grad_sample", "summed_grad", "_forward_counter",
                      "_current_grad_sample", "_norm_sample")
OPACUS_MODULE_ATTRS = ("activations", "max_batch_len", "ft_compute_sample_grad",
                       "autograd_grad_sample_hooks")


@dataclass
class Setup:
    model: nn.Module
    names: list[str]
    params: list[nn.Parameter]
    examples: list[Encoded]
    pad: int
    start: list[torch.Tensor]

    def reset(self) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, self.start, strict=True):
                p.copy_(s)

    def weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def train(self, *, steps: int = 1, batch_size: int = 4, sigma: float = 0.0,
              clip: float = 1e6, lr: float = 1.0, seed: int = 0, mode: str = "hooks",
              noise_seed: int = 1, n: int = 4, opt: Any = None,
              params: list[nn.Parameter] | None = None) -> DPSGDResult:
        gen = torch.Generator(self.params[0].device)
        gen.manual_seed(noise_seed)
        return dp_sgd_train(
            self.model, params or self.params, self.examples[:n], steps=steps,
            batch_size=batch_size,
            make_optimizer=opt or (lambda ps: torch.optim.SGD(ps, lr=lr)),
            cfg=DPSGDConfig(clip=clip, grad_sample_mode=mode), noise_multiplier=sigma,
            pad_token_id=self.pad, generator=gen, sampling_rng=np.random.default_rng(seed))


@pytest.fixture(scope="module")
def data_and_tok():
    cfg = compose(BASE)
    tok = get_tokenizer(cfg.model)
    data = load_task_data(cfg.data)
    return encode_dataset(data.train.select(range(16)), tok, data.label_names, cfg.data), tok


def _build(name: str, data_and_tok) -> Setup:
    examples, tok = data_and_tok
    cfg = compose(BASE + SETUPS[name])
    method = build_method(cfg.method.name, cfg.method)
    model = build_model(method, cfg.model, seed=0, data_cfg=cfg.data)
    names, params = zip(*method.tuned(model).items(), strict=True)
    return Setup(model, list(names), list(params), examples, tok.pad_token_id,
                 [p.detach().clone() for p in params])


@pytest.fixture(scope="module")
def built() -> dict[str, Setup]:
    return {}


@pytest.fixture
def setup_of(built, data_and_tok):
    """Setups built once per module, reset to their start weights for every test."""
    def get(name: str) -> Setup:
        if name not in built:
            built[name] = _build(name, data_and_tok)
        built[name].reset()
        return built[name]
    yield get
    built.pop("ferret-all", None)  # 3M float32 trainables: do not keep them around


@pytest.fixture
def lora(setup_of) -> Setup:
    return setup_of("lora")


@pytest.fixture
def spy(monkeypatch) -> Iterator[dict[str, list]]:
    """Record, at every DP step, the per-example gradients Opacus computed (before
    clipping) and the clipped sum it hands on to the noise."""
    rec: dict[str, list] = {"samples": [], "summed": []}
    original = DPOptimizer.clip_and_accumulate

    def wrapped(self: DPOptimizer) -> None:
        rec["samples"].append([g.detach().clone() for g in self.grad_samples])
        original(self)
        rec["summed"].append([p.summed_grad.detach().clone() for p in self.params])

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", wrapped)
    yield rec


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).float() for t in tensors])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _autograd(s: Setup, examples: list[Encoded]) -> torch.Tensor:
    """Flat gradient of the mean sequence loss of ``examples``, computed plainly."""
    s.model.train()
    for p in s.params:
        p.grad = None
    sequence_losses(s.model, collate(examples, s.pad)).mean().backward()
    out = _flat([p.grad for p in s.params])
    for p in s.params:
        p.grad = None
    s.model.eval()
    return out


@pytest.mark.parametrize("name", list(SETUPS))
def test_per_example_gradients_match_autograd_and_one_step_equals_plain_sgd(
        name, setup_of, spy) -> None:
    s = setup_of(name)
    tol = 1e-2 if "bf16" in name else 1e-4  # bfloat16 matmuls: ~3 significant digits
    singles = [_autograd(s, [e]) for e in s.examples[:4]]
    plain = _autograd(s, s.examples[:4])
    result = s.train(batch_size=4, n=4)  # q = 1: the batch is all 4 examples
    assert (result.steps, result.empty_steps, result.sample_rate) == (1, 0, 1.0)
    samples = spy["samples"][0]  # per parameter: (4, *shape)
    for i in range(4):
        assert _rel(_flat([g[i] for g in samples]), singles[i]) < tol
    step = _flat(s.weights()) - _flat(s.start)
    assert _rel(-step, plain) < tol  # sigma = 0, huge C, lr 1: w - mean grad


def test_per_example_gradients_are_clipped_to_c(lora, spy) -> None:
    clip = 1e-3
    lora.train(batch_size=4, n=4, clip=clip)
    raw = [_flat([g[i] for g in spy["samples"][0]]) for i in range(4)]
    assert min(float(r.norm()) for r in raw) > clip  # clipping bites on every example
    factors = [min(1.0, clip / (float(r.norm()) + 1e-6)) for r in raw]
    clipped = [f * r for f, r in zip(factors, raw, strict=True)]
    assert all(float(c.norm()) <= clip * (1 + 1e-5) for c in clipped)
    summed = _flat(spy["summed"][0])
    assert _rel(summed, torch.stack(clipped).sum(0)) < 1e-4
    step = _flat(lora.weights()) - _flat(lora.start)  # sigma = 0, lr 1: -summed / E[B]
    assert _rel(-step * 4, summed) < 1e-4


def test_noise_has_std_sigma_times_c_on_the_summed_gradient(lora) -> None:
    clip, sigma, batch = 0.5, 2.0, 8  # q = 8/16: Opacus divides by E[B] = 8, not |B|
    lora.train(batch_size=batch, n=16, clip=clip, seed=3)
    clean = _flat(lora.weights())
    lora.reset()
    result = lora.train(batch_size=batch, n=16, clip=clip, seed=3, sigma=sigma)
    noise = -(_flat(lora.weights()) - clean) * batch  # lr 1: w_noisy - w_clean = -z / E[B]
    assert result.noise_multiplier == sigma and noise.numel() > 5000
    assert abs(float(noise.std()) / (sigma * clip) - 1) < 0.1
    assert abs(float(noise.mean())) < 5 * sigma * clip / noise.numel() ** 0.5


@pytest.mark.parametrize("name", ["lora", "ferret-attn"])
def test_trainable_weights_all_change_and_frozen_ones_do_not(name, setup_of) -> None:
    s = setup_of(name)
    chosen = {id(p) for p in s.params}
    frozen = {n: p.detach().clone() for n, p in s.model.named_parameters()
              if id(p) not in chosen}
    s.train(steps=3, batch_size=4, n=8, clip=1.0,
            opt=lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    for p, before in zip(s.params, s.start, strict=True):
        assert not torch.equal(p.detach(), before)  # LoRA A too (B is zero at step 1)
    for n, p in s.model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n


def test_ghost_clipping_matches_hooks(lora) -> None:
    lora.train(batch_size=4, n=4, clip=0.05)
    hooks = _flat(lora.weights())
    lora.reset()
    lora.train(batch_size=4, n=4, clip=0.05, mode="ghost")
    assert not torch.equal(hooks, _flat(lora.start))
    assert _rel(_flat(lora.weights()) - _flat(lora.start), hooks - _flat(lora.start)) < 1e-3
    assert _opacus_leftovers(lora.model) == []


def test_only_the_given_params_train_and_their_flags_come_back(setup_of) -> None:
    s = setup_of("ferret-attn")  # all self_attn weights trainable; train q_proj alone
    chosen = [p for n, p in zip(s.names, s.params, strict=True) if "q_proj" in n]
    assert 0 < len(chosen) < len(s.params)
    deltas = []
    for mode in ("hooks", "ghost"):  # ghost clips by the norm over all trainable tensors
        s.reset()
        s.train(batch_size=4, n=4, clip=1e-3, mode=mode, params=chosen)
        deltas.append(_flat(s.weights()) - _flat(s.start))
        for p, before in zip(s.params, s.start, strict=True):
            assert torch.equal(p.detach(), before) != any(p is c for c in chosen)
        assert all(p.requires_grad for p in s.params)
    assert _rel(deltas[1], deltas[0]) < 1e-3


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_batches_are_noise_only_steps(lora, mode, monkeypatch) -> None:
    monkeypatch.setattr(dpsgd, "poisson_batch", lambda rng, n, q: np.array([], np.int64))
    result = lora.train(steps=3, batch_size=1, n=16, sigma=1.0, clip=1.0, mode=mode)
    assert (result.steps, result.empty_steps, result.losses) == (3, 3, [])
    assert not torch.equal(_flat(lora.weights()), _flat(lora.start))  # noise was released
    lora.reset()
    lora.train(steps=2, batch_size=1, n=16, sigma=0.0, clip=1.0, mode=mode)
    assert torch.equal(_flat(lora.weights()), _flat(lora.start))  # and nothing else


def test_real_poisson_sampling_counts_empty_batches(lora) -> None:
    steps, n, q = 12, 16, 1 / 16  # batch_size 1 of 16: about 37% of batches are empty
    result = lora.train(steps=steps, batch_size=1, n=n, sigma=1.0, clip=1.0, seed=5)
    replay = np.random.default_rng(5)
    sizes = [dpsgd.poisson_batch(replay, n, q).size for _ in range(steps)]
    assert 0 < result.empty_steps == sizes.count(0) < steps
    assert result.steps == steps and len(result.losses) == steps - result.empty_steps
    assert result.sample_rate == q


def _opacus_leftovers(model: nn.Module) -> list[str]:
    found = [f"{n}.{a}" for n, p in model.named_parameters() for a in OPACUS_PARAM_ATTRS
             if hasattr(p, a)]
    found += [f"{n}.{a}" for n, m in model.named_modules() for a in OPACUS_MODULE_ATTRS
              if a in m.__dict__]
    return found + [n for n, p in model.named_parameters() if p.grad is not None]


def _hook_counts(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
            for m in model.modules()]


def test_reproducible_and_the_model_is_clean_and_reusable(lora) -> None:
    ids = [id(p) for p in lora.model.parameters()]
    flags = [p.requires_grad for p in lora.model.parameters()]
    mode = lora.model.training
    hooks_before = _hook_counts(lora.model)
    first = lora.train(steps=2, batch_size=4, n=8, sigma=1.0, clip=1.0, lr=0.1)
    after_first = lora.weights()
    assert _opacus_leftovers(lora.model) == [] and _hook_counts(lora.model) == hooks_before
    assert [id(p) for p in lora.model.parameters()] == ids and lora.model.training == mode
    assert [p.requires_grad for p in lora.model.parameters()] == flags
    lora.reset()
    second = lora.train(steps=2, batch_size=4, n=8, sigma=1.0, clip=1.0, lr=0.1)
    assert first == second
    assert all(torch.equal(a, b) for a, b in zip(after_first, lora.weights(), strict=True))
    lora.reset()
    lora.train(steps=2, batch_size=4, n=8, sigma=1.0, clip=1.0, lr=0.1, noise_seed=2)
    assert not torch.equal(_flat(after_first), _flat(lora.weights()))
    plain = _autograd(lora, lora.examples[:2])  # plain forward/backward still works
    assert torch.isfinite(plain).all() and plain.norm() > 0
    assert _opacus_leftovers(lora.model) == []


def test_secure_generator_is_seeded_from_the_os() -> None:
    a, b = secure_generator(), secure_generator("cpu")
    assert a.initial_seed() != b.initial_seed() and a.device.type == "cpu"
    assert not torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b))


def test_loss_is_a_mean_of_per_sequence_means(lora) -> None:
    short = Encoded(lora.examples[0].input_ids[:20], lora.examples[0].labels[:20])
    short = Encoded(short.input_ids, [-100] * 10 + short.input_ids[10:])
    long = lora.examples[1]
    with torch.no_grad():
        both = sequence_losses(lora.model, collate([short, long], lora.pad))
        alone = [sequence_losses(lora.model, collate([e], lora.pad))[0] for e in (short, long)]
    torch.testing.assert_close(both, torch.stack(alone), rtol=1e-4, atol=1e-5)


def test_unsupported_layers_fail_clearly_and_leave_the_model_clean(setup_of,
                                                                   data_and_tok) -> None:
    s = setup_of("ferret-all")
    with pytest.raises(ConfigError, match=r"ghost.*tied.*embed_tokens"):
        s.train(mode="ghost")
    assert _opacus_leftovers(s.model) == []
    examples, tok = data_and_tok
    cfg = compose(BASE + "method=ia3")
    method = build_method(cfg.method.name, cfg.method)
    model = build_model(method, cfg.model, seed=0)
    with pytest.raises(ConfigError, match=r"ia3_l"):
        dp_sgd_train(model, list(method.tuned(model).values()), examples, steps=1,
                     batch_size=2, make_optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0),
                     cfg=DPSGDConfig(), pad_token_id=tok.pad_token_id,
                     generator=secure_generator(next(model.parameters()).device))
    assert _opacus_leftovers(model) == []


@pytest.mark.parametrize(("override", "match"), [
    ({"grad_sample_mode": "fast"}, r"grad_sample_mode 'fast'.*ghost, hooks"),
    ({"clip": 0.0}, r"privacy.clip must be .*> 0, found 0.0"),
    ({"noise_multiplier": None}, r"set privacy.noise_multiplier or privacy.target_epsilon"),
    ({"max_epsilon": 0.0}, r"privacy.max_epsilon must be > 0"),
    ({"noise_multiplier": -1.0}, r"privacy.noise_multiplier must be"),
    ({"noise_multiplier": None, "target_epsilon": float("inf")}, r"target_epsilon must"),
    ({"delta": 1.0}, r"privacy.delta must be in \(0, 1\), found 1.0"),
])
def test_config_errors_name_key_value_and_choices(override, match) -> None:
    DPSGDConfig().validate()
    DPSGDConfig(noise_multiplier=None, target_epsilon=8.0).validate()
    with pytest.raises(ConfigError, match=match):
        DPSGDConfig(**override).validate()


def test_call_errors() -> None:
    p = nn.Parameter(torch.zeros(2))
    common: dict[str, Any] = dict(steps=1, batch_size=1, make_optimizer=torch.optim.SGD,
                                  cfg=DPSGDConfig(noise_multiplier=None, target_epsilon=1.0),
                                  pad_token_id=0, generator=secure_generator())
    with pytest.raises(ValueError, match=r"resolve privacy\.target_epsilon"):
        dp_sgd_train(nn.Linear(2, 2), [p], [Encoded([1, 2], [1, 2])], **common)
    with pytest.raises(ValueError, match="at least one example"):
        dp_sgd_train(nn.Linear(2, 2), [p], [], **common)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_non_finite_loss_becomes_a_noise_only_step(lora, mode, monkeypatch) -> None:
    real, calls = dpsgd.sequence_losses, []

    def first_nan(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        calls.append(1)
        out = real(model, batch)
        return out * float("nan") if len(calls) == 1 else out

    monkeypatch.setattr(dpsgd, "sequence_losses", first_nan)
    result = lora.train(steps=2, batch_size=4, n=4, sigma=1.0, clip=1.0, mode=mode)
    assert np.isnan(result.losses[0]) and np.isfinite(result.losses[1])
    assert (result.steps, result.empty_steps) == (2, 0)
    assert torch.isfinite(_flat(lora.weights())).all()
    assert _opacus_leftovers(lora.model) == []


@pytest.mark.parametrize("method_name", ["lora", "ferret", "ssf_pool"])
def test_methods_train_privately_and_report_the_event_not_the_loss(method_name: str) -> None:
    from fedpeft.methods import TrainContext
    from fedpeft.privacy.accounting import event_from_metrics

    strategy = "ferret" if method_name == "ferret" else "fedavg"
    extra = " method.trainable=self_attn method.num_bases=64" if method_name == "ferret" else ""
    cfg = compose(f"method={method_name} strategy={strategy} model=tiny-llama privacy=dpsgd "
                  f"privacy.target_epsilon=4 data.max_examples=200 data.test_size=16 "
                  f"method.local_steps=3 method.batch_size=2{extra}")
    method = build_method(cfg.method.name, cfg.method)
    model = build_model(method, cfg.model, seed=0, data_cfg=cfg.data)
    tok, data = get_tokenizer(cfg.model), load_task_data(cfg.data)
    examples = encode_dataset(data.train.select(range(20)), tok, data.label_names, cfg.data)
    start = method.get_state(model)
    ctx = TrainContext(1, 0, 0, tok.pad_token_id, privacy=cfg.privacy, num_rounds=5)
    result = method.train(model, examples, ctx)
    event = event_from_metrics(result.metrics)
    assert event is not None and event.sample_rate == 0.1 and event.steps == 3
    assert event.noise_multiplier > 0 and event.noise_multiplier != 1.0  # from the target
    assert "train_loss" not in result.metrics
    end = method.get_state(model)
    assert any(not np.array_equal(start[k], end[k]) for k in start)


def test_adapters_opacus_cannot_handle_are_refused_at_validation() -> None:
    from fedpeft.errors import IncompatibleComponentsError

    for method in ("dora", "ia3"):
        with pytest.raises(IncompatibleComponentsError, match=f"peft_type={method}"):
            compose(f"method={method} privacy=dpsgd")
    with pytest.raises(IncompatibleComponentsError, match="strategy=fedprox"):
        compose("privacy=dpsgd strategy=fedprox")
