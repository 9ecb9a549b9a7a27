"""Exact span tests on a LoRA update: the batch's tokens, then its sequences, in order.

Paper: Petrov et al., "DAGER: Exact Gradient Inversion for Large Language Models",
NeurIPS 2024, arXiv 2405.15586 (the span test), applied to LoRA as ReCIT (arXiv
2504.20570) applies its filters to PEFT updates.

For a LoRA pair on a linear layer with input ``x``, ``y += B A x``, the gradient of ``B`` is
``G (A X)^T``: every row of a plain-SGD update of ``B`` is a combination of the vectors
``A x_t`` of the batch's positions. The server sent ``A``, so it can push any candidate
input through ``A`` and test whether it lies in the row space of the observed update:

1. **Tokens.** Layer 0's q/k/v read ``norm(embedding(token))``: the vocabulary tokens in
   the span are exactly the batch's tokens (all but a last-position token, whose
   gradient is zero).
2. **Order.** Layer 1's q/k/v read a causal function of the prefix, so a prefix is right
   iff its last position's layer-1 input lies in layer 1's span. A beam grows prefixes
   from the bag one token at a time and keeps the extensions that pass.

The test needs the span to be a proper subspace: rank ``r`` above the number of distinct
tokens (layer 0) and positions (layer 1) in the batch. AdamW's elementwise step and DP
noise fill the whole space; then nothing passes and the caller falls back to inexact
filters. Written by hand: no maintained library implements gradient inversion for text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

_QKV_B = r"layers\.{layer}\.self_attn\.(q_proj|k_proj|v_proj)\.lora_B\."
_MIN_GAP = 20.0  # a drop this steep in the singular values separates signal from rounding


@dataclass(frozen=True)
class Subspace:
    """One module's observed row space: inputs ``x`` are tested as ``A x`` against the
    orthonormal rows of ``basis``."""

    project: np.ndarray  # (r, d_in): the LoRA-A the server sent
    basis: np.ndarray  # (k, r), k < r

    def distance(self, inputs: np.ndarray) -> np.ndarray:
        """Relative distance of each row of ``inputs`` (n, d_in) to the span, in [0, 1]."""
        z = np.asarray(inputs, np.float64) @ self.project.T
        z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-300)
        return np.linalg.norm(z - (z @ self.basis.T) @ self.basis, axis=1)


def row_space(delta: np.ndarray) -> np.ndarray | None:
    """Orthonormal basis of the row space of ``delta``, or None when it is zero or has no
    clear rank (noise, AdamW signs or too many inputs fill every dimension).

    The rank is cut at the steepest drop of the singular values, if that drop is at
    least ``_MIN_GAP``: below it lie only float rounding errors of the update."""
    d = np.asarray(delta, np.float64)
    if not np.any(d):
        return None
    _, s, vt = np.linalg.svd(d, full_matrices=False)
    s = np.maximum(s, 1e-300 * s[0])
    ratios = s[:-1] / s[1:]
    rank = int(np.argmax(ratios)) + 1 if ratios.size else 0
    return vt[:rank] if ratios.size and ratios[rank - 1] >= _MIN_GAP else None


def layer_subspaces(update: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray],
                    layer: int) -> list[Subspace]:
    """The informative q/k/v subspaces of one layer (empty: no exact signal there)."""
    pattern = re.compile(_QKV_B.format(layer=layer))
    spaces = []
    for key in sorted(k for k in update if pattern.search(k)):
        basis = row_space(update[key])
        a_key = key.replace("lora_B", "lora_A")
        if basis is not None and a_key in sent:
            spaces.append(Subspace(np.asarray(sent[a_key], np.float64), basis))
    return spaces


def distance(spaces: list[Subspace], inputs: np.ndarray) -> np.ndarray:
    """Smallest distance over the subspaces (each row of ``inputs`` is one candidate): a
    module whose gradient missed some positions (a rank below the others') cannot veto
    a true candidate, while a false one must miss every subspace."""
    return np.min([s.distance(inputs) for s in spaces], axis=0)


def token_bag(spaces: list[Subspace], vocab: np.ndarray, tol: float) -> list[int]:
    """Vocabulary ids whose layer-0 input lies in the span, closest first."""
    d = distance(spaces, vocab)
    order = np.argsort(d, kind="stable")
    return [int(i) for i in order if d[i] < tol]


class _Stop(Exception):
    """Raised by the capture hook: nothing past layer 1's input is needed."""


def layer_input_fn(model: torch.nn.Module, layer: int) -> Callable[[list[list[int]]], np.ndarray]:
    """A function mapping equal-length prefixes to their last position's input of
    ``layer``'s q_proj, running the model only up to there."""
    suffix = f"layers.{layer}.self_attn.q_proj"
    module = next(m for n, m in model.named_modules() if n.endswith(suffix))

    def inputs(prefixes: list[list[int]]) -> np.ndarray:
        seen: list[torch.Tensor] = []

        def grab(_mod: torch.nn.Module, args: tuple) -> None:
            seen.append(args[0][:, -1].detach())
            raise _Stop

        handle = module.register_forward_pre_hook(grab)
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor(prefixes))
        except _Stop:
            pass
        finally:
            handle.remove()
        return seen[0].double().cpu().numpy()

    return inputs


@dataclass(frozen=True)
class Beam:
    """Limits of the ordering search: ``tol`` on the span distance, ``max_len`` tokens,
    ``width`` live prefixes, ``chunk`` prefixes per forward pass."""

    tol: float = 1e-3
    max_len: int = 128
    width: int = 64
    chunk: int = 512


def order_bag(bag: list[int], spaces: list[Subspace],
              inputs: Callable[[list[list[int]]], np.ndarray], beam: Beam,
              seeds: list[list[int]] | None = None) -> list[list[int]]:
    """Every maximal prefix the layer-1 span accepts, longest first.

    The search grows ``seeds`` (equal-length prefixes taken as given; default: every bag
    token alone). Seed positions are not tested: the first position's gradient is
    numerically tiny (it is the attention sink), so it drops out of both spans, and a
    known template's positions (no loss on them) carry the weakest signal. A wrong seed
    dies at the next step."""
    live = [list(s) for s in seeds] if seeds else [[t] for t in bag]
    ended: list[list[int]] = []
    for _ in range(beam.max_len - len(live[0])):
        passed = _extensions(live, bag, spaces, inputs, beam)
        grown = {tuple(p[:-1]) for p in passed}
        ended += [p for p in live if tuple(p) not in grown and len(p) > 1]
        live = passed[: beam.width]
        if not live:
            break
    ended += live
    return sorted(ended, key=len, reverse=True)


def _extensions(live: list[list[int]], bag: list[int], spaces: list[Subspace],
                inputs: Callable[[list[list[int]]], np.ndarray], beam: Beam) -> list[list[int]]:
    """One-token extensions of the live prefixes that pass the span test, best first."""
    # A run of one token from position 0 has the same layer-1 input at every position
    # (attention over equal values), so it would pass wherever its first position did.
    cands = [[*p, t] for p in live for t in bag if any(x != t for x in p)]
    dist = np.concatenate([distance(spaces, inputs(cands[i:i + beam.chunk]))
                           for i in range(0, len(cands), beam.chunk)])
    keep = np.argsort(dist, kind="stable")
    return [cands[i] for i in keep if dist[i] < beam.tol]


def distinct(sequences: list[list[int]], n: int) -> list[list[int]]:
    """Up to ``n`` sequences, longest first, none a prefix of one already taken."""
    out: list[list[int]] = []
    for seq in sequences:
        if not any(kept[: len(seq)] == seq for kept in out):
            out.append(seq)
        if len(out) == n:
            break
    return out
