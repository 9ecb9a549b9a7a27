"""TAG-style optimisation baseline: invert the update by gradient matching.

Paper: Deng et al., "TAG: Gradient Attack on Transformer-based Language Models",
EMNLP Findings 2021, arXiv 2104.06297; cosine objective as in LAMP (Balunović et al.,
"LAMP: Extracting Text from Gradients with Language Model Priors", NeurIPS 2022,
arXiv 2202.08827).

The attacker optimises ``batch_size`` dummy sequences of continuous input embeddings
(the server's prompt, then ``length`` free positions) so that the gradient of the
language-model loss on them, with respect to the adapter tensors at the global state
the server sent, points where the observed update does. What the server knows of the
client's step decides the target: one AdamW step (``local_steps=1``) from fresh moments
moves each entry by ``-lr * g / (|g| + eps)``, i.e. ``-lr * sign(g)``; so by default the
dummy gradient goes through a soft sign (``tanh(g / (softness * rms(g)))``) before the
cosine against ``-update``, and matching happens in sign space. ``space: raw`` compares
the raw gradient instead (the published objective, meant for SGD-like updates).

Labels: each dummy position is labelled with its nearest vocabulary token (cosine),
recomputed every step and held constant within it, so the loss is the client's
next-token loss on the sequence the embeddings currently spell; the gradient flows
through the inputs only. Entries the update leaves at exactly zero (dropped by a
compression codec, or LoRA-A before LoRA-B moves) carry nothing and are not compared.

At the end each dummy embedding becomes its nearest vocabulary token. Every step needs a
second-order backward pass through the model, so this is slow on CPU: the audit runs it
on a few observations only. Written by hand: no maintained library implements gradient
inversion for PEFT updates.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from attacks.base import ATTACKS, Attack, AttackContext, Observation, Reconstruction
from attacks.recit import decoded, prompt_ids
from fedpeft.errors import ConfigError

SPACES = ("sign", "raw")


@dataclass(frozen=True)
class TagConfig:
    """Options of the ``tag`` attack.

    length: dummy tokens per sequence after the prompt; steps: Adam iterations on the
    embeddings; lr: their learning rate, in units of the vocabulary embeddings' RMS
    entry; l2: weight of the squared distance to
    ``-update / lr_client`` added to the cosine loss; space: ``sign`` (soft sign of the
    dummy gradient, for AdamW updates) or ``raw``; softness: soft-sign temperature, as a
    fraction of each tensor's gradient RMS; seed: initial tokens (own generator).
    """

    name: str = "tag"
    length: int = 16
    steps: int = 50
    lr: float = 0.05
    l2: float = 0.0
    space: str = "sign"
    softness: float = 0.1
    seed: int = 0

    def validate(self) -> None:
        for key in ("length", "steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"attack.{key} must be >= 1, found {getattr(self, key)}")
        if not self.lr > 0 or not self.softness > 0 or self.l2 < 0:
            raise ConfigError("attack.lr and attack.softness must be > 0 and attack.l2 >= 0, "
                              f"found {self.lr}, {self.softness} and {self.l2}")
        if self.space not in SPACES:
            raise ConfigError(f"attack.space must be one of {SPACES}, found {self.space!r}")


@contextmanager
def attacked_state(ctx: AttackContext, state: Mapping[str, np.ndarray]) -> Iterator[None]:
    """The model at ``state``, in eval mode, with eager attention (the fused CPU kernel
    has no double backward); its adapter state, mode and attention are restored after."""
    model = ctx.model
    saved, training = ctx.method.get_state(model), model.training
    attn = model.config._attn_implementation
    try:
        ctx.method.set_state(model, dict(state))
        model.eval()
        model.config._attn_implementation = "eager"
        yield
    finally:
        model.config._attn_implementation = attn
        ctx.method.set_state(model, saved)
        model.train(training)


def adapter_params(ctx: AttackContext, update: Mapping[str, np.ndarray]
                   ) -> dict[str, torch.nn.Parameter]:
    """Trained tensors under their state-dict names, for the update's nonzero tensors."""
    adapter = getattr(ctx.model, "active_adapter", "default")
    named = {n.replace(f".{adapter}.", "."): p for n, p in ctx.method.tuned(ctx.model).items()}
    return {k: named[k] for k in sorted(update)
            if k in named and np.any(np.asarray(update[k]) != 0)}


def nearest_tokens(x: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """Index of the vocabulary row closest in cosine to each vector of ``x`` (..., H)."""
    sims = F.normalize(x.detach().float(), dim=-1) @ F.normalize(vocab.float(), dim=-1).T
    return sims.argmax(dim=-1)


def soft_sign(g: torch.Tensor, softness: float) -> torch.Tensor:
    """``tanh(g / (softness * rms(g)))``: close to ``sign(g)``, but differentiable."""
    scale = softness * g.detach().pow(2).mean().sqrt()
    return torch.tanh(g / scale.clamp_min(1e-30))


@ATTACKS.register("tag")
class TagAttack(Attack):
    """Dummy embeddings optimised so their adapter gradient matches the update."""

    name = "tag"
    config_cls = TagConfig
    kinds = ("dense", "compressed")
    max_observations = 2  # minutes per batch on a CPU: the audit runs it on a few

    def reconstruct(self, obs: Observation, batch_size: int) -> list[Reconstruction]:
        x, _ = self.optimise(obs, batch_size)
        ids = nearest_tokens(x, self.ctx.model.get_input_embeddings().weight)
        return [decoded(self.ctx, row) for row in ids]

    def optimise(self, obs: Observation, batch_size: int) -> tuple[torch.Tensor, list[float]]:
        """The best dummy embeddings (B x length x H) and the matching loss per step.

        Adam runs on the embeddings divided by the vocabulary's RMS entry, so ``lr`` means
        the same on any model."""
        scale = self.ctx.model.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt()
        z = (self.initial(batch_size) / scale).requires_grad_(True)
        best, history = z.detach() * scale, []
        opt = torch.optim.Adam([z], lr=self.cfg.lr)
        with attacked_state(self.ctx, obs.sent_global):
            params = adapter_params(self.ctx, obs.update)
            targets = self.targets(obs.update, params)
            for _ in range(self.cfg.steps if params else 0):  # nothing moved: no signal
                loss = self.matching_loss(z * scale, params, targets)
                if not history or loss.item() < min(history):
                    best = z.detach() * scale
                history.append(loss.item())
                z.grad = torch.autograd.grad(loss, [z])[0]
                opt.step()
        return best, history

    def initial(self, batch_size: int) -> torch.Tensor:
        """Embeddings of random vocabulary tokens, drawn from a generator of its own."""
        emb = self.ctx.model.get_input_embeddings().weight
        gen = torch.Generator().manual_seed(self.cfg.seed)
        ids = torch.randint(emb.shape[0], (batch_size, self.cfg.length), generator=gen)
        return emb.detach()[ids.to(emb.device)].float().clone()

    def targets(self, update: Mapping[str, np.ndarray], params: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        """``-update`` per matched tensor, flat, on the tensors' device."""
        return {k: -torch.as_tensor(np.asarray(update[k], np.float32)).flatten().to(p.device)
                for k, p in params.items()}

    def matching_loss(self, x: torch.Tensor, params: Mapping[str, torch.nn.Parameter],
                      targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sum over tensors of ``1 - cos(dummy gradient, -update)`` (+ the L2 term),
        on the entries the update moved; differentiable in ``x``."""
        grads = self.dummy_gradients(x, list(params.values()))
        lr_client = float(getattr(self.ctx.method.cfg, "lr", 1.0))
        losses = [self.tensor_loss(g, t, lr_client)
                  for g, t in zip(grads, targets.values(), strict=True)]
        return torch.stack(losses).sum() if losses else x.new_zeros(())

    def tensor_loss(self, g: torch.Tensor, target: torch.Tensor, lr_client: float
                    ) -> torch.Tensor:
        """One tensor's term, on the entries the update moved (the rest carry nothing)."""
        keep = target != 0
        d, t = g.flatten().float()[keep], target[keep]
        if self.cfg.space == "sign":
            d = soft_sign(d, self.cfg.softness)
        loss = 1 - F.cosine_similarity(d, t, dim=0, eps=1e-12)
        if self.cfg.l2 > 0:  # AdamW's first step: -update / lr is the sign of the gradient
            loss = loss + self.cfg.l2 * (d - t / lr_client).pow(2).mean()
        return loss

    def dummy_gradients(self, x: torch.Tensor, params: list[torch.nn.Parameter]
                        ) -> tuple[torch.Tensor, ...]:
        """Adapter gradients of the LM loss on prompt + ``x``, labelled with the nearest
        tokens of ``x`` (the prompt is unlabelled, as in the client's loss)."""
        model = self.ctx.model
        emb = model.get_input_embeddings().weight
        prompt = torch.tensor(prompt_ids(self.ctx), device=emb.device)
        batch = x.shape[0]
        inputs = torch.cat([emb[prompt].detach().expand(batch, -1, -1),
                            x.to(emb.dtype)], dim=1)
        labels = torch.cat([torch.full((batch, len(prompt)), -100, device=emb.device),
                            nearest_tokens(x, emb)], dim=1)
        loss = model(inputs_embeds=inputs, labels=labels).loss
        return torch.autograd.grad(loss, params, create_graph=True)
