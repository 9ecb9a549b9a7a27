"""ReCIT-style reconstruction of a client's private records from its PEFT update.

Paper: Xie et al., "ReCIT: Reconstructing Full Private Data from Gradient in
Parameter-Efficient Fine-Tuning of Large Language Models", 2025, arXiv 2504.20570.
No public code exists; this follows the paper's three stages on what a fedpeft server
observes:

0. **Exact recovery** (:mod:`attacks.span`): when the update is a plain-SGD step
   (FedSGD) and the adapter rank exceeds the batch's tokens, the layer-0 span test gives
   the batch's tokens exactly and a layer-1 span test orders them into the batch's
   sequences. Whatever it recovers is returned as is; the stages below fill the rest.
1. **Candidate tokens** from the first layer's adapter tensors. The query/key/value
   projections of layer 0 all read ``norm(embedding(token))``, so every row of their
   LoRA-A gradient is a combination of the batch's token vectors. AdamW's first step
   turns that gradient into (almost exactly) its sign, so instead of a span test we run
   simultaneous orthogonal matching pursuit: pick the vocabulary vectors that, jointly
   for all rows, best explain the observed update; the picks are the candidate bag.
2. **Update replay**: the observed update, scaled up, is applied to the distributed
   model, which moves it towards the client's batch.
3. **Sequence reconstruction**: beam search from the audit prompt with the replayed model,
   with a logit bonus on the candidate bag, returning one sequence per batch record.

The "Personal Notes" booster (malicious pre-training of the distributed model) lives in
:mod:`attacks.boost`; this attack simply uses whatever model the server distributed.
Written by hand: no maintained library implements gradient inversion for text PEFT.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from attacks import span
from attacks.base import ATTACKS, Attack, AttackContext, Observation, Reconstruction
from fedpeft.errors import ConfigError

_PURSUIT_ROWS = 32  # rows the pursuit works on (see _principal)
_FIRST_LAYER = re.compile(r"layers\.0\.self_attn\.(q_proj|k_proj|v_proj)\.lora_A\.")


@dataclass(frozen=True)
class RecitConfig:
    """Options of the ``recit`` attack.

    bag_per_record: candidate tokens picked per batch record; replay_scale: factor on
    the observed update when it is applied to the model; bonus: logit added to candidate
    tokens during beam search; beams: beam width; max_new_tokens: reconstruction length;
    span_tol: largest span distance (relative, 0..1) a token or prefix may have to pass
    the exact test; span_width: live prefixes in its ordering beam; span_max_len: longest
    sequence it grows (prompt included).
    """

    name: str = "recit"
    bag_per_record: int = 40
    replay_scale: float = 5.0
    bonus: float = 4.0
    beams: int = 4
    max_new_tokens: int = 48
    span_tol: float = 1e-3
    span_width: int = 64
    span_max_len: int = 160

    def validate(self) -> None:
        if not 0 < self.span_tol < 1:
            raise ConfigError(f"attack.span_tol must be in (0, 1), found {self.span_tol}")
        for key in ("bag_per_record", "beams", "max_new_tokens", "span_width",
                    "span_max_len"):
            if getattr(self, key) < 1:
                raise ConfigError(f"attack.{key} must be >= 1, found {getattr(self, key)}")
        if self.replay_scale < 0 or self.bonus < 0:
            raise ConfigError("attack.replay_scale and attack.bonus must be >= 0, found "
                              f"{self.replay_scale} and {self.bonus}")


def first_layer_rows(update: dict[str, np.ndarray]) -> np.ndarray | None:
    """The layer-0 q/k/v LoRA-A update rows stacked (m x hidden), or None if the
    update has none (other adapters, seed updates) or they are all zero (LoRA-B still
    zero in the global state, so the A-gradient vanishes)."""
    rows = [np.asarray(update[k], np.float32) for k in sorted(update) if _FIRST_LAYER.search(k)]
    if not rows:
        return None
    stacked = np.concatenate(rows, axis=0)
    return stacked if np.abs(stacked).max() > 0 else None


def token_vectors(model: torch.nn.Module) -> np.ndarray:
    """Every vocabulary token as layer 0's attention input, unit-normalised (V x hidden)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        emb = base.get_input_embeddings().weight
        x = base.model.layers[0].input_layernorm(emb).float().cpu().numpy()
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def matching_pursuit(rows: np.ndarray, vocab: np.ndarray, k: int) -> list[int]:
    """Simultaneous OMP: ``k`` vocabulary rows that jointly explain ``sign(rows)``.

    Each step adds the token whose vector correlates most with the residual over all
    rows, then refits every row on the chosen tokens by least squares; it stops early
    once the rows are explained (further picks would follow rounding noise)."""
    # AdamW's first step keeps only the sign; entries far below the largest are noise
    # whose sign can flip with summation order, so they count as zero.
    rows = np.asarray(rows, np.float32)
    target = _principal(np.sign(rows) * (np.abs(rows) > 1e-3 * np.abs(rows).max()))
    chosen: list[int] = []
    residual = target
    floor = 1e-4 * float(np.linalg.norm(target))
    for _ in range(min(k, vocab.shape[0])):
        if float(np.linalg.norm(residual)) <= floor:  # explained: more picks are noise
            break
        score = np.linalg.norm(residual @ vocab.T, axis=0)  # (V,)
        score[chosen] = -np.inf
        chosen.append(int(np.argmax(score)))
        basis = vocab[chosen]  # (s, hidden)
        coef, *_ = np.linalg.lstsq(basis.T, target.T, rcond=None)  # (s, m)
        residual = target - (basis.T @ coef).T
    return chosen


def _principal(target: np.ndarray, keep: int = _PURSUIT_ROWS) -> np.ndarray:
    """The best rank-``keep`` stand-in for ``target``'s rows (m x hidden -> keep x hidden):
    the pursuit's scores and fits depend on the rows only through their Gram matrix,
    which the top singular directions carry (exactly when the rows have rank <= keep);
    at rank 256 (768 rows) this makes each
    pursuit step 24x cheaper."""
    if target.shape[0] <= keep:
        return target
    _, s, vt = np.linalg.svd(target, full_matrices=False)
    return (s[:keep, None] * vt[:keep]).astype(target.dtype)


class _Bonus(LogitsProcessor):
    """Adds ``bonus`` to the logits of the candidate tokens and ``rest`` to all others
    (``rest=-inf``: only candidates can be generated)."""

    def __init__(self, tokens: list[int], bonus: float, vocab_size: int,
                 rest: float = 0.0) -> None:
        self.mask = torch.full((vocab_size,), rest)
        self.mask[torch.tensor(tokens, dtype=torch.long)] = bonus

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores + self.mask[: scores.shape[-1]].to(scores.dtype)


def prompt_ids(ctx: AttackContext) -> list[int]:
    """Token ids of the prompt the server configured, up to where the record starts."""
    text = f"Question: {ctx.prompt}\nAnswer:"
    return list(ctx.tokenizer(text, add_special_tokens=False)["input_ids"])


def replayed(ctx: AttackContext, obs: Observation, scale: float) -> None:
    """Load ``global + scale * update`` into the context's model (dense updates)."""
    state = {k: np.asarray(v) + scale * np.asarray(obs.update[k])
             for k, v in obs.sent_global.items() if k in obs.update}
    ctx.method.set_state(ctx.model, state)


def generate(ctx: AttackContext, n: int, beams: int, max_new: int,
             processors: LogitsProcessorList | None = None) -> list[Reconstruction]:
    """``n`` beam-search continuations of the prompt, decoded."""
    ids = torch.tensor([prompt_ids(ctx)])
    pad = ctx.tokenizer.pad_token_id or ctx.tokenizer.eos_token_id
    ctx.model.eval()
    with torch.no_grad():
        out = ctx.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
            num_beams=max(beams, n), num_return_sequences=n, do_sample=False,
            logits_processor=processors, pad_token_id=pad)
    return [decoded(ctx, row[ids.shape[1]:]) for row in out]


def decoded(ctx: AttackContext, ids: torch.Tensor) -> Reconstruction:
    keep = [int(t) for t in ids if int(t) not in ctx.tokenizer.all_special_ids]
    text = ctx.tokenizer.decode(keep, skip_special_tokens=True).strip()
    return Reconstruction(text=text, token_ids=tuple(keep))


@ATTACKS.register("recit")
class RecitAttack(Attack):
    """Exact span recovery where the update allows it; otherwise a candidate bag from the
    first layer, update replay and bag-biased beam search."""

    name = "recit"
    config_cls = RecitConfig

    def vocab(self) -> np.ndarray:
        """Layer 0's input for every vocabulary token (computed once per context)."""
        if "token_vectors" not in self.ctx.artefacts:
            self.ctx.artefacts["token_vectors"] = token_vectors(self.ctx.model)
        return self.ctx.artefacts["token_vectors"]

    def candidates(self, obs: Observation, batch_size: int) -> list[int]:
        """Candidate tokens of the batch (empty when layer 0 carries no LoRA-A signal)."""
        rows = first_layer_rows(dict(obs.update))
        if rows is None:
            return []
        return matching_pursuit(rows, self.vocab(), self.cfg.bag_per_record * batch_size)

    def exact_bag(self, obs: Observation) -> list[int]:
        """The batch's tokens by layer 0's span test (empty: no exact signal there)."""
        first = span.layer_subspaces(obs.update, obs.sent_global, 0)
        return span.token_bag(first, self.vocab(), self.cfg.span_tol) if first else []

    def exact(self, obs: Observation, batch_size: int) -> list[Reconstruction]:
        """Sequences the span tests recover exactly (empty when the update has no exact
        signal: AdamW steps, DP noise, a rank too small for the batch, other adapters)."""
        second = span.layer_subspaces(obs.update, obs.sent_global, 1)
        bag = self.exact_bag(obs) if second else []
        if not bag:
            return []
        self.ctx.method.set_state(self.ctx.model, dict(obs.sent_global))
        self.ctx.model.eval()
        beam = span.Beam(tol=self.cfg.span_tol, max_len=self.cfg.span_max_len,
                         width=max(self.cfg.span_width, batch_size))
        prompt, inputs = prompt_ids(self.ctx), span.layer_input_fn(self.ctx.model, 1)
        records = _records(span.order_bag(bag, second, inputs, beam, [prompt]), prompt)
        if not records:  # the template is not what the client trained on: start anywhere
            starts = [t for t in (self.ctx.tokenizer.bos_token_id, prompt[0]) if t is not None]
            seeds = [[t] for t in dict.fromkeys([*starts, *bag])]
            records = _records(span.order_bag(bag, second, inputs, beam, seeds), prompt)
        return [decoded(self.ctx, torch.tensor(_after(seq, prompt)))
                for seq in span.distinct(records, batch_size)]

    def reconstruct(self, obs: Observation, batch_size: int) -> list[Reconstruction]:
        found = self.exact(obs, batch_size)
        if len(found) >= batch_size:
            return found
        return found + self.approximate(obs, batch_size - len(found))

    def approximate(self, obs: Observation, batch_size: int) -> list[Reconstruction]:
        """Candidate bag, update replay and beam search: restricted to the bag (and the
        end token) when layer 0's span gave it exactly, else with a bonus on it."""
        exact = self.exact_bag(obs)
        bag = exact or self.candidates(obs, batch_size)
        replayed(self.ctx, obs, self.cfg.replay_scale)
        vocab_size = self.ctx.model.get_input_embeddings().weight.shape[0]
        eos = [t for t in (self.ctx.tokenizer.eos_token_id,) if t is not None]
        bonus = _Bonus([*bag, *eos], 0.0, vocab_size, rest=-math.inf) if exact else \
            _Bonus(bag, self.cfg.bonus, vocab_size)
        processors = LogitsProcessorList([bonus]) if bag else None
        return generate(self.ctx, batch_size, self.cfg.beams, self.cfg.max_new_tokens,
                        processors)


def _records(found: list[list[int]], prompt: list[int]) -> list[list[int]]:
    """The recovered sequences that hold more than the prompt template."""
    return [seq for seq in found if _after(seq, prompt) and seq != prompt]


def _after(seq: list[int], prompt: list[int]) -> list[int]:
    """``seq`` without the prompt template it starts with (if it does)."""
    return seq[len(prompt):] if seq[: len(prompt)] == prompt else seq
