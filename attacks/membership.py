"""A one-run membership audit with canaries: an empirical lower bound on ε.

Paper: Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023, arXiv 2305.08846.

``m`` random canary records are drawn; each joins the client's training data with
probability 1/2 (independently). The client trains once, with the configured method and
privacy mechanism, exactly as in a round (the method's own ``train``). The auditor sees
only the resulting update: it scores every canary by the exact span test when the update
has one (:mod:`attacks.span`: a member's tokens lie in the span of the layer-0 LoRA-B
update, a non-member's do not), else by how well its gradient (at the state the client
started from) aligns with the update, and guesses "member" for the top
scores and "non-member" for the bottom ones, and :func:`attacks.canary.audit` turns
the number of correct guesses into a lower bound on ε that holds with the stated
confidence. The accountant's ε for the same training
comes from the privacy ledger; a lower bound above it would be a bug in the mechanism or
the accountant, and is reported as such.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from attacks.base import AttackContext
from attacks.canary import audit as canary_audit
from fedpeft.data import DataConfig, Encoded, collate, encode_example


@dataclass(frozen=True)
class MembershipResult:
    """The canary audit of one training run, beside the accountant's ε."""

    epsilon: float | None  # accountant (RDP), None without DP
    epsilon_lower_bound: float
    num_canaries: int
    num_guesses: int
    num_correct: int
    tpr_at_0_1_fpr: float
    tpr_at_1_fpr: float


def canaries(m: int, seed: int, tokenizer: Any, length: int = 8) -> list[str]:
    """``m`` distinct canaries of ``length`` random vocabulary tokens each (seeded): rare
    pieces that other canaries almost never share, so learning one does not lower the
    others' loss (canaries made of common words or letters would all move together)."""
    rng = np.random.default_rng(10_000 + seed)
    size = len(tokenizer)
    out: dict[str, None] = {}
    while len(out) < m:
        ids = rng.integers(size // 8, size, length)  # skip the most frequent (lowest) ids
        out[tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()] = None
    return list(out)


def membership_audit(ctx: AttackContext, m: int, guesses: int, *, seed: int,
                     privacy: Any = None, num_rounds: int = 1,
                     length: int = 8) -> MembershipResult:
    """Train once on the included canaries (``length`` tokens each), score all ``m``
    from the update alone, guess ``guesses`` members and ``guesses`` non-members, bound ε."""
    from fedpeft.methods.base import TrainContext

    texts = canaries(m, seed, ctx.tokenizer, length)
    included = np.random.default_rng(seed).random(m) < 0.5  # the auditor's coin flips
    encoded = _encode(ctx, texts)
    start = ctx.method.get_state(ctx.model)
    train = TrainContext(server_round=1, partition_id=0, seed=seed, privacy=privacy,
                         pad_token_id=_pad(ctx), num_rounds=num_rounds)
    result = ctx.method.train(ctx.model, [e for e, i in zip(encoded, included, strict=True)
                                          if i], train)
    scores = span_scores(ctx, encoded, start, result.update.deltas)
    if scores is None:
        scores = alignment(ctx, encoded, start, result.update.deltas)
    delta = float(getattr(privacy, "delta", None) or 1e-5)
    audit = canary_audit(scores, included, guesses, guesses, delta=delta, confidence=0.95)
    return MembershipResult(
        epsilon=_accountant_epsilon(result.metrics, delta),
        epsilon_lower_bound=audit.epsilon_lower_bound,
        num_canaries=m, num_guesses=audit.num_guesses, num_correct=audit.num_correct,
        tpr_at_0_1_fpr=audit.tpr_at_0_1pct_fpr, tpr_at_1_fpr=audit.tpr_at_1pct_fpr)


def span_scores(ctx: AttackContext, examples: Sequence[Encoded], start: dict[str, np.ndarray],
                delta: dict[str, np.ndarray]) -> np.ndarray | None:
    """Per canary: minus the largest layer-0 span distance of its answer tokens (0 for a
    member: every token it trained on lies in the span), or None when the update has no
    exact span (AdamW steps, DP noise, more tokens than the rank)."""
    from attacks.recit import token_vectors
    from attacks.span import distance, layer_subspaces

    spaces = layer_subspaces(delta, start, 0)
    if not spaces:
        return None
    vectors = token_vectors(ctx.model)
    return np.array([-float(distance(spaces, vectors[_answer(e)]).max()) for e in examples])


def _answer(example: Encoded) -> list[int]:
    """The answer tokens of a training example (the labelled ones, end token excluded)."""
    return [t for t, lab in zip(example.input_ids, example.labels, strict=True)
            if lab != -100][:-1] or [example.input_ids[-1]]


def alignment(ctx: AttackContext, examples: Sequence[Encoded], start: dict[str, np.ndarray],
              delta: dict[str, np.ndarray]) -> np.ndarray:
    """Per canary: cosine between its loss gradient at ``start`` and the descent
    direction ``-delta`` the client sent. Training on a canary moves the adapter along
    its gradient, so members align; in high dimension non-members are near orthogonal."""
    params = list(ctx.method.tuned(ctx.model).values())
    ctx.method.set_state(ctx.model, {k: v + delta[k] for k, v in start.items()})
    after = torch.cat([p.detach().reshape(-1).float() for p in params])
    ctx.method.set_state(ctx.model, start)  # the state the gradients are taken at
    target = torch.cat([p.detach().reshape(-1).float() for p in params]) - after
    ctx.model.eval()
    return np.array([_cosine(_gradient(ctx, e, params), target) for e in examples])


def _gradient(ctx: AttackContext, example: Encoded, params: list[Any]) -> torch.Tensor:
    batch = collate([example], _pad(ctx))
    grads = torch.autograd.grad(ctx.model(**batch).loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                      for g, p in zip(grads, params, strict=True)])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-30))


def _sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Mean next-token cross-entropy of each sequence over its labelled tokens."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    target = labels[:, 1:]
    mask = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (-(picked * mask).sum(1) / mask.sum(1).clamp(min=1)).numpy()


def _encode(ctx: AttackContext, texts: list[str]) -> list[Encoded]:
    cfg = DataConfig(name="canaries", label_field=None, max_input_tokens=16)
    return [encode_example(ctx.tokenizer, ctx.prompt, t, [], cfg) for t in texts]


def _pad(ctx: AttackContext) -> int:
    tok = ctx.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def _accountant_epsilon(metrics: Any, delta: float) -> float | None:
    """ε (RDP, at ``delta``) of the privacy event the training reported; None without DP."""
    from fedpeft.privacy.accounting import PrivacyLedger, event_from_metrics

    event = event_from_metrics(metrics)
    if event is None:
        return None
    ledger = PrivacyLedger()
    ledger.record("0", event, 1)
    return ledger.epsilon("0", delta, "rdp")
