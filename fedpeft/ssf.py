"""Scale-and-shift (SSF) sites for Hugging Face models: one set, or a pool per site.

Paper: Lian et al., "Scaling & Shifting Your Features", NeurIPS 2022, arXiv 2210.08823
(SSF); Feng et al., "Learning Instance-Adaptive ... (FedIns)", ICCV 2023, arXiv 2308.06051
(pools with per-instance selection).

A *site* is a module whose output gets ``y = γ ⊙ x + β`` per output channel. Sites are
attached in place: the SSF module becomes a child named ``ssf`` of the module it follows
and a forward hook applies it, so the base model's own parameter names are unchanged and
SSF tensors are named ``<module>.ssf.gamma`` / ``.beta``. A pool site holds ``P`` entries
``(P, C)`` and applies, per instance, the combination that :func:`select` chose from the
frozen model's query features (passed as the site's second input, so Opacus sees it).

Hand-written because no maintained library has it: ``peft``'s IA3 scales without a shift
and has no pools. The one Opacus rule below (per-example gradients of a pool site) uses
Opacus's documented extension point, ``register_grad_sampler``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedpeft.errors import ConfigError

# Default sites: each block's writes to the residual stream (attention output and MLP
# output). Both are linear layers, so a single SSF merges into them.
DEFAULT_SITES: dict[str, tuple[str, ...]] = {
    **{t: ("o_proj", "down_proj") for t in ("llama", "mistral", "qwen2", "qwen3", "gemma")},
    "bert": ("output.dense",),  # attention.output.dense and the FFN's output.dense
}
COMBINES = ("mean", "weighted")
# Llama-family config flags that give a group of projections biases (for merged export).
_BIAS_FLAGS = {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"),
               "mlp_bias": ("gate_proj", "up_proj", "down_proj")}


def _init(shape: tuple[int, ...], std: float, generator: torch.Generator) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape, generator=generator) * std)


class SSF(nn.Module):
    """One scale-and-shift: γ ~ N(1, std²), β ~ N(0, std²), both of shape (C,)."""

    def __init__(self, channels: int, *, std: float, generator: torch.Generator) -> None:
        super().__init__()
        self.gamma = _init((channels,), std, generator)
        self.beta = _init((channels,), std, generator)
        with torch.no_grad():
            self.gamma.add_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C)
        return x * self.gamma + self.beta


class PoolSSF(nn.Module):
    """``P`` scale-and-shift entries (P, C); each instance uses the mix its weights give."""

    def __init__(self, entries: int, channels: int, *, std: float,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.gamma = _init((entries, channels), std, generator)
        self.beta = _init((entries, channels), std, generator)
        with torch.no_grad():
            self.gamma.add_(1.0)
        _register_opacus_rule()

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``x`` (B, ..., C), ``weights`` (B, P) -> (B, ..., C). In float32 even under
        autocast: a low-precision matmul would round γ's small updates away."""
        with torch.autocast(x.device.type, enabled=False):
            gamma, beta = weights.float() @ self.gamma, weights.float() @ self.beta  # (B, C)
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        return x * gamma.view(shape) + beta.view(shape)


def pool_grad_sample(layer: PoolSSF, activations: list[torch.Tensor],
                     backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradients of a pool site: entry p gets weight_bp times the single-SSF
    gradient (Σ_t x·g for γ, Σ_t g for β). Opacus's functorch fallback cannot do this: it
    only slices the first input per example, and the weights are the second."""
    x, weights = activations[0], activations[1].float()  # (B, ..., C), (B, P)
    g = backprops.float()
    dims = tuple(range(1, x.dim() - 1))
    xg = (x.float() * g).sum(dim=dims) if dims else x.float() * g  # (B, C)
    gs = g.sum(dim=dims) if dims else g  # (B, C)
    return {layer.gamma: torch.einsum("bp,bc->bpc", weights, xg),
            layer.beta: torch.einsum("bp,bc->bpc", weights, gs)}


_RULE: list[bool] = []


def _register_opacus_rule() -> None:
    if not _RULE:
        from opacus.grad_sample.utils import register_grad_sampler

        register_grad_sampler(PoolSSF)(pool_grad_sample)
        _RULE.append(True)


class KeyMatch(nn.Module):
    """Learnable keys K (P, H); ``forward(q)`` gives cos(q_b, K_p) as (B, P)."""

    def __init__(self, entries: int, dim: int, *, generator: torch.Generator) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.rand((entries, dim), generator=generator) * 2 - 1)

    def forward(self, query: torch.Tensor) -> torch.Tensor:  # (B, H) -> (B, P)
        with torch.autocast(query.device.type, enabled=False):
            return F.normalize(query.float(), dim=-1) @ F.normalize(self.keys, dim=-1).T


def select(sims: torch.Tensor, top_n: int, combine: str,
           temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``top_n`` entries per instance by similarity ``sims`` (B, P); returns their
    indices (B, N) in descending order and the combination weights (B, P): 1/N each
    (``mean``) or a softmax of the selected similarities over ``temperature``."""
    top = torch.topk(sims, top_n, dim=1, sorted=True)
    if combine == "mean":
        chosen = torch.full_like(top.values, 1.0 / top_n)
    else:
        chosen = torch.softmax(top.values / temperature, dim=1)
    weights = torch.zeros_like(sims).scatter(1, top.indices, chosen)
    return top.indices, weights


# ------------------------------------------------------------------ attaching sites


def default_sites(model: nn.Module) -> tuple[str, ...]:
    """The default site list for ``model``'s architecture (ConfigError if none)."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in DEFAULT_SITES:
        raise ConfigError(f"no default SSF sites for model type {kind!r}: set method.sites "
                          f"to module names (e.g. {sorted(module_suffixes(model))[:8]}); "
                          f"types with defaults: {sorted(DEFAULT_SITES)}")
    return DEFAULT_SITES[kind]


def module_suffixes(model: nn.Module) -> set[str]:
    """Last name parts of the modules that can hold a site (linear layers and norms)."""
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _channels(m)}


def find_sites(model: nn.Module, sites: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """Modules named ``s`` or ``*.s`` for a site ``s``; ConfigError naming valid ones."""
    found = [(n, m) for n, m in model.named_modules()
             if any(n == s or n.endswith("." + s) for s in sites)]
    bad = [n for n, m in found if not _channels(m)]
    if not found or bad:
        what = f"modules without one output channel axis: {bad[:3]}" if bad else "no module"
        raise ConfigError(f"method.sites={list(sites)} matched {what}; expected linear or "
                          f"norm modules, e.g. {sorted(module_suffixes(model))[:12]}")
    return found


def _channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = getattr(module, "weight", None)
    is_norm = "norm" in type(module).__name__.lower()
    if is_norm and isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return int(weight.shape[0])
    return 0


@dataclass
class Route:
    """What pool sites apply in the current forward: ``weights`` (B, P), or nothing when
    ``enabled`` is False (the frozen model's query pass)."""

    weights: torch.Tensor | None = None
    enabled: bool = True


def attach_sites(model: nn.Module, sites: Sequence[str],
                 make: Callable[[int], nn.Module], route: Route | None = None) -> list[str]:
    """Give every matched module an ``ssf`` child built by ``make(channels)`` and a hook
    that applies it (pool sites read their weights from ``route``); returns their names."""
    found = find_sites(model, sites)
    for _, module in found:
        module.ssf = make(_channels(module))
        module._ssf_hook = module.register_forward_hook(_hook(route))
    return [n for n, _ in found]


def _hook(route: Route | None) -> Callable[..., torch.Tensor]:
    def apply(module: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
        if route is None:
            return module.ssf(out)
        if not route.enabled:
            return out
        weights = route.weights
        if weights is None or out.shape[0] % weights.shape[0]:
            raise RuntimeError("pool sites need per-instance weights for this batch "
                               "(run the model through its SSFPoolModel wrapper)")
        # generation may repeat each prompt (beams, several sequences): repeat its weights
        weights = weights.repeat_interleave(out.shape[0] // weights.shape[0], dim=0)
        return module.ssf(out, weights.to(out.device))
    return apply


# ------------------------------------------------------------------ merging


def merge_sites(model: nn.Module) -> list[str]:
    """Fold every single SSF into the module it follows (W' = diag(γ)W, b' = γ⊙b + β),
    remove it and its hook; the model then computes the same function with no SSF.
    ConfigError for a pool site or a shift that has no bias to go into."""
    merged = []
    for name, module in list(model.named_modules()):
        site = module._modules.get("ssf") if hasattr(module, "_modules") else None
        if site is None:
            continue
        if not isinstance(site, SSF):
            raise ConfigError(f"site {name} holds a pool ({type(site).__name__}): only a "
                              "single SSF (ssf, or ssf_pool with pool.entries=1) merges")
        _fold(name, module, site)
        module._ssf_hook.remove()
        del module._ssf_hook, module._modules["ssf"]
        merged.append(name)
    return merged


@torch.no_grad()
def _fold(name: str, module: nn.Module, site: SSF) -> None:
    gamma, beta = site.gamma.detach(), site.beta.detach()
    weight = module.weight
    if isinstance(module, nn.Linear):
        weight.copy_(weight * gamma.to(weight.dtype)[:, None])
    else:
        weight.copy_(weight * gamma.to(weight.dtype))
    bias = getattr(module, "bias", None)
    if bias is None:
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"site {name} ({type(module).__name__}) has no bias to take "
                              "β: choose linear sites to merge")
        module.bias = nn.Parameter(beta.to(weight.dtype).clone(), requires_grad=False)
    else:
        bias.copy_(bias * gamma.to(bias.dtype) + beta.to(bias.dtype))


def give_biases_for_export(model: nn.Module) -> None:
    """Make a merged Llama-family model loadable as a plain checkpoint: where a merged
    projection gained a bias, set the config flag that gives its whole group biases and
    add zero biases to the group's other projections."""
    config = getattr(model, "config", None)
    for flag, group in _BIAS_FLAGS.items():
        if config is None or not hasattr(config, flag):
            continue
        members = [m for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in group]
        if not any(m.bias is not None for m in members):
            continue
        setattr(config, flag, True)
        for m in members:
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype,
                                                  device=m.weight.device), requires_grad=False)


# ------------------------------------------------------------------ the pool model

_MAX_CACHED_QUERIES = 200_000


@dataclass(frozen=True)
class PoolOptions:
    """Pool size, selection and the key-matching weight λ (see :class:`SSFPoolModel`)."""

    entries: int = 25
    top_n: int = 3
    combine: str = "mean"
    temperature: float = 0.1
    key_weight: float = 0.1

    def validate(self) -> None:
        """Fail early on an impossible pool or selection."""
        if self.entries < 1 or not 1 <= self.top_n <= self.entries:
            raise ConfigError(f"method.pool needs entries >= 1 and 1 <= top_n <= entries, "
                              f"found entries={self.entries}, top_n={self.top_n}")
        if self.combine not in COMBINES:
            raise ConfigError.unknown("method.pool.combine", self.combine, COMBINES)
        if not 0 <= self.key_weight < 1 or not self.temperature > 0:
            raise ConfigError(f"method.pool needs 0 <= key_weight < 1 and temperature > 0, "
                              f"found {self.key_weight}, {self.temperature}")


@dataclass
class PoolOutput:
    """What :class:`SSFPoolModel` returns: logits, the training loss when labels were
    given, each instance's weighted key term λ(1 - mean cos) (B,), the task loss's
    weight 1 - λ, and the entries each instance used (B, N)."""

    logits: torch.Tensor
    loss: torch.Tensor | None
    penalty: torch.Tensor
    task_scale: float
    selected: torch.Tensor


class SSFPoolModel(nn.Module):
    """A causal LM with an SSF pool at every site, learnable keys and per-instance
    selection (FedIns for language models).

    Per instance: the query is the frozen model's final hidden state (no SSF applied),
    averaged over the prompt's tokens after the first (position 0 is the attention sink,
    whose huge activations would make every query alike), minus the same pooling of the
    task's prompt template with an empty text (the part every prompt shares; without it
    queries of different topics have cosine ~0.93 and selection collapses). Selection is
    top-N by cos(query, key), a fixed (non-differentiable) choice: the keys learn only
    from the matching term, as in L2P/FedIns. Loss = (1-λ)·task + λ·(1 - mean cos).

    Queries are cached by prompt tokens: the base is frozen, so a prompt's query never
    changes, and each example costs one extra forward pass per process, not per step.
    Only the prompt (``labels == -100``) forms the query, so training and prediction
    select alike and the answer never steers selection.
    """

    takes_labels = True  # the query needs to know where the prompt ends

    def __init__(self, base: nn.Module, sites: Sequence[str], opts: PoolOptions, *,
                 std: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base, self.opts, self.route = base, opts, Route()
        self.site_names = attach_sites(
            base, sites, lambda c: PoolSSF(opts.entries, c, std=std, generator=generator),
            self.route)
        self.keys = KeyMatch(opts.entries, base.config.hidden_size, generator=generator)
        self.reference: torch.Tensor | None = None
        self._queries: dict[bytes, torch.Tensor] = {}

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: Any) -> PoolOutput:
        given = input_ids if input_ids is not None else inputs_embeds
        if attention_mask is None:
            attention_mask = torch.ones(given.shape[:2], dtype=torch.long, device=given.device)
        sims, idx, weights = self.choose(input_ids, attention_mask, labels, inputs_embeds)
        self.route.weights = weights
        try:
            logits = self.base(input_ids=input_ids, inputs_embeds=inputs_embeds,
                               attention_mask=attention_mask, **kwargs).logits
        finally:
            self.route.weights = None
        lam = self.opts.key_weight
        penalty = lam * (1 - sims.gather(1, idx).mean(dim=1))  # (B,)
        loss = None
        if labels is not None:
            loss = (1 - lam) * token_mean_loss(logits, labels) + penalty.mean()
        return PoolOutput(logits, loss, penalty, 1 - lam, idx)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        """``transformers`` generation with each prompt's entries fixed from its query."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.route.weights = self.choose(input_ids, attention_mask)[2]
        try:
            return self.base.generate(input_ids=input_ids, attention_mask=attention_mask,
                                      **kwargs)
        finally:
            self.route.weights = None

    @property
    def config(self) -> Any:
        """The base model's ``transformers`` config."""
        return self.base.config

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def choose(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
               labels: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Similarities (B, P), chosen entries (B, N) and their weights (B, P); from token
        ids (cached) or, for embedding-space callers, from ``inputs_embeds``."""
        if input_ids is None:
            query = self._embeds_query(inputs_embeds, attention_mask)
        else:
            query = self.query(input_ids, attention_mask, labels)
        sims = self.keys(query)
        idx, weights = select(sims.detach(), self.opts.top_n, self.opts.combine,
                              self.opts.temperature)
        return sims, idx, weights

    @torch.no_grad()
    def query(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              labels: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H) centred query features of the prompts in a batch (cached)."""
        if self.reference is None:
            raise ConfigError("ssf_pool has no query reference: build the model with "
                              "build_model(..., data_cfg=...) so it knows the prompt template")
        keep = attention_mask.bool()
        if labels is not None:
            keep &= labels.to(keep.device) == -100
        prompts = [input_ids[b][keep[b]].cpu() for b in range(input_ids.shape[0])]
        keys = [p.numpy().tobytes() for p in prompts]
        todo = {k: p for k, p in zip(keys, prompts, strict=True) if k not in self._queries}
        if todo:
            self._remember(list(todo), self.pooled(list(todo.values())))
        found = torch.stack([self._queries[k] for k in keys]) - self.reference
        return found.to(self.keys.keys.device)

    def _remember(self, keys: list[bytes], values: torch.Tensor) -> None:
        if len(self._queries) + len(keys) > _MAX_CACHED_QUERIES:
            self._queries.clear()
        self._queries.update(zip(keys, values, strict=True))

    @torch.no_grad()
    def pooled(self, prompts: list[torch.Tensor]) -> torch.Tensor:
        """(n, H) float32 mean of the frozen model's final hidden states over each
        prompt's tokens after the first (no SSF applied)."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)], mask[i, : len(p)] = p, 1
        return self._frozen_mean(mask, input_ids=ids).cpu()

    @torch.no_grad()
    def _embeds_query(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.reference is None:
            raise ConfigError("ssf_pool has no query reference (see SSFPoolModel.query)")
        found = self._frozen_mean(mask, inputs_embeds=embeds.detach())
        return found - self.reference.to(found.device)

    def _frozen_mean(self, mask: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        device = self.keys.keys.device
        mask = mask.to(device)
        self.route.enabled = False
        try:
            hidden = self.base.base_model(attention_mask=mask, **{
                k: v.to(device) for k, v in inputs.items()}).last_hidden_state
        finally:
            self.route.enabled = True
        weight = mask.float()
        weight[:, 0] = (mask.sum(dim=1) == 1).float()  # keep a 1-token prompt
        total = (hidden.float() * weight[..., None]).sum(dim=1)
        return total / weight.sum(dim=1, keepdim=True)

    def set_reference(self, template_prompt: Sequence[int]) -> None:
        """Centre queries on the pooled feature of the prompt template with empty text."""
        self.reference = self.pooled([torch.tensor(list(template_prompt))])[0]


def token_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over every labelled token of the batch (the
    loss ``transformers`` computes for a causal LM)."""
    shift = labels[:, 1:].to(logits.device)  # (B, T-1)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           shift.reshape(-1), ignore_index=-100)
