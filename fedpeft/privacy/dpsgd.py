"""Sample-level DP-SGD for a client's local steps: per-example clipping plus Gaussian noise.

Paper: Abadi et al., "Deep Learning with Differential Privacy", CCS 2016, arXiv 1607.00133.

What a step does: draw a Poisson batch (each example independently with probability
q = batch_size / |D|), compute every example's gradient of the trainable tensors, clip each
to L2 norm C, sum, add N(0, sigma²·C²) to every coordinate, divide by the *expected* batch size
q·|D| and hand the result to the method's own optimizer (AdamW for LoRA, SGD for Ferret).
Why this shape: it is exactly what the privacy accountant assumes (Poisson rate q, noise
multiplier sigma, one accountant step per optimizer step), so every step counts — including a
step whose Poisson batch is empty, which still releases noise (``DPSGDResult.empty_steps``).

Opacus does the per-example work (no hand-written per-sample gradients). Its hooks are
attached to the model in place (``GradSampleHooks``, not a wrapping module, so parameter
names, ``peft`` save/load and the method's state code stay unchanged) and its
``DPOptimizer`` wraps the method's optimizer; both are removed before returning, because a
worker reuses one cached model object for every client it serves. There is no
``PrivacyEngine``: ε is accounted per client across rounds by the caller's ledger (a
fresh engine per round would silently restart ε from zero).

The loss is computed per sequence (token-mean over the sequence's answer tokens), then
averaged over the batch: the privacy unit is one example, and a token mean over the
whole batch would weight long examples more. ``grad_sample_mode="ghost"`` (ghost
clipping: per-example gradient *norms* without materialising per-example gradients)
clips the same quantity with two backward passes; it refuses tied trainable tensors.

Randomness: noise comes from a ``torch.Generator`` seeded with 63 bits from the OS's
CSPRNG (:func:`secure_generator`); the Poisson draws default to a NumPy generator seeded
the same way (the amplification-by-sampling argument needs the batch choice to be
secret). The optimizer runs Opacus's floating-point-safe noise (``secure_mode``: each
value is a sum of four Gaussians over 2, against the attack of arXiv 2112.05307). What
``PrivacyEngine(secure_mode=True)`` adds on top — a CSPRNG noise generator — needs
``torchcsprng``, which cannot be installed here (its last release, 0.2.1 of 2021, predates
current torch), so the generator itself is torch's ordinary one, secretly seeded.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedpeft.data import Encoded, collate
from fedpeft.errors import ConfigError, IncompatibleComponentsError
from fedpeft.privacy.base import (
    PRIVACY,
    BudgetConfig,
    PrivacyMechanism,
    sample_level_round,
    with_target_sigma,
)

GRAD_SAMPLE_MODES = ("ghost", "hooks")
# Attributes Opacus leaves on parameters and modules; removed after every call.
_PARAM_ATTRS = ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample",
                "_norm_sample")
_MODULE_ATTRS = ("activations", "max_batch_len", "ft_compute_sample_grad",
                 "autograd_grad_sample_hooks")
if TYPE_CHECKING:  # Opacus takes ~4 s to import: only the training functions load it
    from opacus.grad_sample import GradSampleHooks as Hooks
    from opacus.optimizers import DPOptimizer


@dataclass(frozen=True)
class DPSGDConfig(BudgetConfig):
    """Options of ``privacy=dpsgd``. With ``target_epsilon`` set, each client replaces
    ``noise_multiplier`` by the sigma that reaches it over the planned rounds at its own q
    (:func:`~fedpeft.privacy.base.with_target_sigma`)."""

    name: str = "dpsgd"
    clip: float = 1.0  # C: per-example L2 clipping norm
    noise_multiplier: float | None = 1.0  # sigma: noise std is sigma·C on the summed gradient
    target_epsilon: float | None = None  # ε to reach over the planned steps (δ below)
    grad_sample_mode: str = "hooks"  # hooks: per-example grads; ghost: ghost clipping

    def validate(self) -> None:
        """Fail early, naming the key, the value found and what is valid."""
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ConfigError.unknown("privacy.grad_sample_mode", self.grad_sample_mode,
                                      GRAD_SAMPLE_MODES)
        _positive("privacy.clip", self.clip)
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ConfigError("set privacy.noise_multiplier or privacy.target_epsilon, "
                              "found neither")
        for key in ("noise_multiplier", "target_epsilon"):
            if getattr(self, key) is not None:
                _positive(f"privacy.{key}", getattr(self, key))
        self.check_budget("privacy")


def _positive(key: str, value: object) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):  # type: ignore[arg-type]
        raise ConfigError(f"{key} must be a finite number > 0, found {value!r}")


@dataclass(frozen=True)
class DPSGDResult:
    """What one call did; ``steps`` is what the accountant charges."""

    losses: list[float]  # mean sequence loss of each non-empty step (nan: non-finite)
    steps: int  # optimizer steps taken, empty batches included
    empty_steps: int  # steps whose Poisson batch was empty (noise only)
    sample_rate: float  # q = batch_size / len(examples), at most 1
    noise_multiplier: float  # sigma used


def secure_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded with 63 bits from the OS's CSPRNG (not a
    CSPRNG itself: ``torchcsprng`` cannot be installed, see the module docstring)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63))
    return gen


def sample_rate(batch_size: int, num_examples: int) -> float:
    """Poisson rate q = batch_size / num_examples, capped at 1."""
    return min(1.0, batch_size / num_examples)


def poisson_batch(rng: np.random.Generator, n: int, q: float) -> np.ndarray:
    """Indices of a Poisson batch: each of ``n`` examples kept with probability ``q``."""
    return np.flatnonzero(rng.random(n) < q)


def sequence_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) next-token cross-entropy, averaged over each sequence's labelled tokens. A
    model with ``takes_labels`` (``ssf_pool``: its query is the prompt) also gets the
    labels and may return a per-sequence ``penalty`` and a ``task_scale`` for the loss."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if getattr(model, "takes_labels", False):
        inputs["labels"] = batch["labels"]
    out = model(**inputs)
    task = _token_means(out.logits, batch["labels"])
    return task * getattr(out, "task_scale", 1.0) + getattr(out, "penalty", 0.0)


def _token_means(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    size, width, vocab = logits.shape
    # position t predicts token t+1: shift the labels (not the logits, which would copy)
    labels = F.pad(labels[:, 1:], (0, 1), value=-100).to(logits.device)  # (B, T)
    tokens = F.cross_entropy(logits.reshape(size * width, vocab).float(), labels.reshape(-1),
                             ignore_index=-100, reduction="none").view(size, width)
    count = (labels != -100).sum(dim=1).clamp(min=1)  # (B,)
    return tokens.sum(dim=1) / count


def dp_sgd_train(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    examples: Sequence[Encoded],
    *,
    steps: int,
    batch_size: int,
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    cfg: DPSGDConfig,
    pad_token_id: int,
    generator: torch.Generator,
    noise_multiplier: float | None = None,
    sampling_rng: np.random.Generator | None = None,
) -> DPSGDResult:
    """``steps`` DP-SGD steps on ``params`` (the only tensors that get gradients).

    ``make_optimizer(params)`` builds the method's optimizer; ``noise_multiplier``
    overrides ``cfg.noise_multiplier`` (pass the sigma resolved from a target ε);
    ``generator`` (on the parameters' device) draws the noise — use
    :func:`secure_generator`; ``sampling_rng`` draws the Poisson batches (default: a
    CSPRNG-seeded one; pass a seeded one only for reproducible tests). Dropout uses
    torch's global RNG, so call this inside ``seeded_training``. The model comes back
    in its previous train/eval mode with no Opacus state left on it. Raises
    ConfigError when Opacus cannot handle a trainable layer (naming it).
    """
    sigma = cfg.noise_multiplier if noise_multiplier is None else noise_multiplier
    params = list(params)
    _check_call(examples, params, steps, batch_size, sigma, generator)
    q = sample_rate(batch_size, len(examples))
    if sampling_rng is None:
        sampling_rng = np.random.default_rng(secrets.randbits(128))
    run = _Run(model, params, examples, pad_token_id, cfg.grad_sample_mode == "ghost",
               sampling_rng, q)
    with _attached(model, params, run.ghost, cfg.clip) as hooks:
        opt = _dp_optimizer(make_optimizer(params), run.ghost, cfg.clip, float(sigma),
                            q * len(examples), generator)
        for _ in range(steps):
            run.step(hooks, opt)
        opt.zero_grad(set_to_none=True)
    return DPSGDResult(run.losses, steps, run.empty, q, float(sigma))


@dataclass
class _Run:
    """One call's fixed inputs and running tallies."""

    model: nn.Module
    params: list[nn.Parameter]
    examples: Sequence[Encoded]
    pad_token_id: int
    ghost: bool
    rng: np.random.Generator
    q: float
    losses: list[float] = field(default_factory=list)
    empty: int = 0

    def step(self, hooks: Hooks, opt: DPOptimizer) -> None:
        """Draw a Poisson batch, compute its (clipped) gradients, take one noisy step."""
        idx = poisson_batch(self.rng, len(self.examples), self.q)
        opt.zero_grad(set_to_none=True)
        if idx.size:
            batch = collate([self.examples[i] for i in idx], self.pad_token_id)
            self.losses.append(_backward(self.model, hooks, opt, batch, self.params))
        else:
            self.empty += 1
            _zero_samples(self.params, self.ghost)
        opt.step()


def _check_call(examples: Sequence[Encoded], params: list[nn.Parameter], steps: int,
                batch_size: int, sigma: float | None, generator: torch.Generator) -> None:
    if not examples or not params:
        raise ValueError("DP-SGD needs at least one example and one trainable tensor")
    if steps < 0 or batch_size < 1:
        raise ValueError(f"steps must be >= 0 and batch_size >= 1, found {steps}, {batch_size}")
    if sigma is None or not sigma >= 0:
        raise ValueError(f"noise multiplier must be a number >= 0, found {sigma!r} "
                         "(resolve privacy.target_epsilon to a noise multiplier first)")
    if generator.device.type != params[0].device.type:
        raise ValueError(f"noise generator is on {generator.device}, parameters on "
                         f"{params[0].device}: build it with secure_generator(device)")


@contextmanager
def _attached(model: nn.Module, params: list[nn.Parameter], ghost: bool,
              clip: float) -> Iterator[Hooks]:
    """Opacus hooks on ``model`` with only ``params`` trainable, in train mode; all undone
    on exit (hooks, attributes, gradients, ``requires_grad`` flags, mode)."""
    chosen = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    mode = model.training
    for p, _ in flags:
        p.requires_grad_(id(p) in chosen)
    try:
        model.train()
        hooks = _make_hooks(model, ghost, clip)
        try:
            yield hooks
        finally:
            hooks.cleanup()
    finally:
        _strip(model)
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(mode)


def _make_hooks(model: nn.Module, ghost: bool, clip: float) -> Hooks:
    from opacus.grad_sample import GradSampleHooks, GradSampleHooksFastGradientClipping

    _check_supported(model, ghost)
    try:
        if ghost:
            return GradSampleHooksFastGradientClipping(model, loss_reduction="mean",
                                                       max_grad_norm=clip)
        return GradSampleHooks(model, loss_reduction="mean")
    except NotImplementedError as exc:  # a trainable layer with buffers
        raise ConfigError(f"Opacus cannot compute per-example gradients here: {exc}") from None


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """id of each trainable tensor -> the (name, module) pairs that hold it directly."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                owners.setdefault(id(p), []).append((name, module))
    return owners


def _check_supported(model: nn.Module, ghost: bool) -> None:
    """Refuse what Opacus would get wrong or fail on obscurely: trainable tensors held by
    a container whose forward never runs (e.g. IA3's ParameterDict: no hook ever fires)
    and, with ghost clipping, tensors shared by two modules (tied embeddings)."""
    owners = _owners(model).values()
    idle = [n for pairs in owners for n, m in pairs
            if isinstance(m, (nn.ParameterDict, nn.ParameterList))]
    if idle:
        raise ConfigError(f"Opacus cannot compute per-example gradients of trainable "
                          f"tensors held in a parameter container: {sorted(idle)[:4]}")
    tied = [[n for n, _ in pairs] for pairs in owners if len(pairs) > 1]
    if ghost and tied:
        raise ConfigError(f"privacy.grad_sample_mode=ghost does not support tied trainable "
                          f"tensors, found {tied[:2]}; use grad_sample_mode=hooks or "
                          "freeze them")


def _unsupported(model: nn.Module, exc: Exception) -> ConfigError:
    """Name the trainable layers Opacus handles by functorch (no dedicated per-example
    rule): the likely culprits when computing per-example gradients fails."""
    from opacus.grad_sample import GradSampleHooks

    fallback = sorted({f"{n} ({type(m).__name__})" for pairs in _owners(model).values()
                       for n, m in pairs if type(m) not in GradSampleHooks.GRAD_SAMPLERS})
    return ConfigError(f"Opacus failed to compute per-example gradients ({exc}); layers "
                       f"without a dedicated Opacus rule: {fallback[:4] or 'none'}")


def _strip(model: nn.Module) -> None:
    """Remove what Opacus leaves behind, so the cached model is as before the call."""
    for module in model.modules():
        for attr in _MODULE_ATTRS:
            if attr in module.__dict__:
                delattr(module, attr)
    for p in model.parameters():
        p.grad = None
        for attr in _PARAM_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)


def _dp_optimizer(opt: torch.optim.Optimizer, ghost: bool, clip: float, sigma: float,
                  expected_batch: float, generator: torch.Generator) -> DPOptimizer:
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

    cls = DPOptimizerFastGradientClipping if ghost else DPOptimizer
    return cls(opt, noise_multiplier=sigma, max_grad_norm=clip, secure_mode=True,
               expected_batch_size=expected_batch, loss_reduction="mean", generator=generator)


def _backward(model: nn.Module, hooks: Hooks, opt: DPOptimizer,
              batch: dict[str, torch.Tensor], params: list[nn.Parameter]) -> float:
    """Per-example gradients (hooks) or clipped summed gradients (ghost) of one batch;
    a non-finite loss turns the step into a noise-only one."""
    from opacus.grad_sample import GradSampleHooksFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    ghost = isinstance(hooks, GradSampleHooksFastGradientClipping)
    try:
        with warnings.catch_warnings():
            # LoRA's first layer sees a frozen input: torch warns, Opacus needs only the
            # gradient of the layer's output
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            per_seq = sequence_losses(model, batch)  # (B,)
            loss = float(per_seq.detach().mean())
            if not math.isfinite(loss):
                _reset_hooks(model)
                _zero_samples(params, ghost)
                return float("nan")
            if ghost:
                DPTensorFastGradientClipping(hooks, opt, per_seq, "mean").backward()
            else:
                per_seq.mean().backward()
    except (TypeError, NotImplementedError) as exc:
        raise _unsupported(model, exc) from exc
    _check_grad_samples(model, params, ghost)
    return loss


def _check_grad_samples(model: nn.Module, params: list[nn.Parameter], ghost: bool) -> None:
    """Every trainable tensor got a per-example gradient (hooks mode; ghost fails earlier)."""
    missing = [p for p in params if not ghost and getattr(p, "grad_sample", None) is None]
    if missing:
        names = [n for n, p in model.named_parameters() if any(p is m for m in missing)]
        raise ConfigError(f"Opacus computed no per-example gradient for {names[:4]}: its "
                          "layer uses the tensor outside its own forward")


def _zero_samples(params: list[nn.Parameter], ghost: bool) -> None:
    """Stand-in gradients of an empty batch: the optimizer then releases noise only (the
    model's forward cannot run on zero sequences, and Opacus needs something to clip)."""
    for p in params:
        if ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


def _reset_hooks(model: nn.Module) -> None:
    """Forget activations captured by a forward that is not followed by a backward."""
    for module in model.modules():
        for attr in ("activations", "max_batch_len"):
            if attr in module.__dict__:
                delattr(module, attr)
    for p in model.parameters():
        if hasattr(p, "_forward_counter"):
            p._forward_counter = 0


def private_steps(model: nn.Module, params: Sequence[nn.Parameter],
                  examples: Sequence[Encoded], *, steps: int, batch_size: int,
                  make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
                  cfg: DPSGDConfig, pad_token_id: int, num_rounds: int) -> dict[str, float]:
    """A method's local round under DP-SGD: sigma for this client's q (from the target ε
    over ``num_rounds`` rounds if one is set), noise from a CSPRNG-seeded generator, and
    the reply metrics that report the privacy event. No training loss is reported: it is
    an unnoised function of the private data."""
    from fedpeft.privacy.accounting import PrivacyEvent, event_metrics

    params = list(params)
    cfg = with_target_sigma(cfg, sample_rate(batch_size, len(examples)), steps * num_rounds)
    res = dp_sgd_train(model, params, examples, steps=steps, batch_size=batch_size,
                       make_optimizer=make_optimizer, cfg=cfg, pad_token_id=pad_token_id,
                       generator=secure_generator(params[0].device))
    event = PrivacyEvent(res.noise_multiplier, res.sample_rate, res.steps)
    return {**event_metrics(event), "dp_empty_steps": float(res.empty_steps)}


# Adapters Opacus cannot give per-example gradients (found by trying, Opacus 1.6/peft 0.21).
_NO_PER_EXAMPLE = {
    "ia3": "IA3 keeps its vectors in a ParameterDict, so Opacus's per-example hooks never fire",
    "dora": "DoRA's magnitude layer breaks Opacus's per-example (functorch) fallback",
}


@PRIVACY.register("dpsgd")
class DPSGD(PrivacyMechanism):
    """Sample-level DP-SGD on each client (see module docstring).

    Paper: Abadi et al., "Deep Learning with Differential Privacy", CCS 2016,
    arXiv 1607.00133.
    """

    name = "dpsgd"
    config_cls = DPSGDConfig
    level = "sample"
    first_order = True
    remedy = ("Zeroth-order methods (fedkseed) have no per-example gradients: use "
              "privacy=dpzo.")

    def first_round(self, method_cfg: Any, run: Any, smallest: int) -> Any:
        return sample_level_round(self.cfg, method_cfg.batch_size, smallest,
                                  method_cfg.local_steps, run.num_rounds)

    def check(self, method: type, strategy: str, params: dict[str, Any],
              method_cfg: Any = None) -> None:
        """First-order methods only; adapters Opacus cannot differentiate per example and
        FedProx's proximal term (not part of the private gradient) are refused."""
        super().check(method, strategy, params, method_cfg)
        adapter = dict(getattr(method_cfg, "adapter", None) or {})
        kind = str(adapter.get("peft_type", "lora")).lower()
        if kind in _NO_PER_EXAMPLE or adapter.get("use_dora"):
            why = _NO_PER_EXAMPLE.get(kind, _NO_PER_EXAMPLE["dora"])
            raise IncompatibleComponentsError(
                f"privacy=dpsgd cannot protect method={method.name} with "
                f"method.adapter.peft_type={kind}"
                f"{' (use_dora)' if adapter.get('use_dora') else ''}: it {self._needs()}, "
                f"and {why}. Use peft_type=lora (tested with Opacus)")
        if strategy == "fedprox" or params.get("proximal_mu"):
            raise IncompatibleComponentsError(
                "privacy=dpsgd cannot run with strategy=fedprox: its proximal term would "
                "be added outside the clipped per-example gradients; use fedavg (or a "
                "server optimiser: fedadam, fedyogi, fedadagrad, fedavgm)")
