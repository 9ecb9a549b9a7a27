"""Held-out evaluation of a (global) model: answer loss and label accuracy.

Classification tasks are scored the way the model is trained: every label's answer
tokens are scored after the prompt and the most likely label wins. Labels that are a
single token are scored from one forward pass of the prompt (exact, and 1/L of the cost
of scoring each prompt+label sequence); multi-token labels fall back to full sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedpeft.data import DataConfig, build_prompt, collate, encode_dataset, label_token_ids


@dataclass(frozen=True)
class EvalResult:
    """Mean answer NLL per example, and label accuracy (None for generation tasks)."""

    loss: float
    accuracy: float | None
    num_examples: int


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    tokenizer: object,
    test: object,
    label_names: Sequence[str],
    data_cfg: DataConfig,
    *,
    batch_size: int = 16,
    max_examples: int | None = None,
) -> EvalResult:
    """Score ``test`` (a dataset with text/label/response columns) with ``model``."""
    if max_examples is not None:
        test = test.select(range(min(max_examples, len(test))))
    was_training = model.training
    model.eval()
    try:
        if label_names:
            return _classify(model, tokenizer, test, label_names, data_cfg, batch_size)
        return _generation_loss(model, tokenizer, test, data_cfg, batch_size)
    finally:
        model.train(was_training)


def _classify(model, tokenizer, test, label_names, data_cfg, batch_size) -> EvalResult:
    table = label_scores(model, tokenizer, list(test["text"]), label_names, data_cfg,
                         batch_size=batch_size)
    labels = list(test["label"])
    target = torch.tensor(labels)
    nll = -table[torch.arange(len(labels)), target]
    acc = (table.argmax(dim=1) == target).float().mean()
    return EvalResult(loss=float(nll.mean()), accuracy=float(acc), num_examples=len(labels))


@torch.inference_mode()
def label_scores(model: nn.Module, tokenizer: object, texts: Sequence[str],
                 label_names: Sequence[str], data_cfg: DataConfig, *,
                 batch_size: int = 16) -> torch.Tensor:
    """(N, L) log-likelihood of each label's answer after each text's prompt (eval mode
    is the caller's business); the argmax is the predicted label."""
    answers = label_token_ids(tokenizer, label_names)
    prompts = [prompt_ids(tokenizer, t, label_names, data_cfg) for t in texts]
    scores = [_label_scores(model, prompts[i : i + batch_size], answers,
                            tokenizer.pad_token_id)
              for i in range(0, len(prompts), batch_size)]
    return torch.cat(scores)


def prompt_ids(tokenizer, text: str, label_names, data_cfg: DataConfig) -> list[int]:
    """Token ids of ``text``'s prompt, exactly as training builds it."""
    from fedpeft.data import encode_example

    enc = encode_example(tokenizer, text, label_names[0], label_names, data_cfg)
    n_prompt = sum(1 for x in enc.labels if x == -100)
    return enc.input_ids[:n_prompt]


def _label_scores(
    model: nn.Module, prompts: list[list[int]], answers: list[list[int]], pad_id: int
) -> torch.Tensor:
    if all(len(a) == 1 for a in answers):
        logits = _last_logits(model, prompts, pad_id)  # (B, V)
        logp = torch.log_softmax(logits.float(), dim=-1)
        return logp[:, [a[0] for a in answers]].cpu()  # (B, L)
    return torch.stack([_sequence_logp(model, prompts, a, pad_id) for a in answers], dim=1)


def _last_logits(model: nn.Module, prompts: list[list[int]], pad_id: int) -> torch.Tensor:
    ids, mask = _pad(prompts, pad_id)
    out = model(input_ids=ids, attention_mask=mask)
    last = (mask.sum(dim=1) - 1).to(out.logits.device)
    return out.logits[torch.arange(len(prompts), device=last.device), last]


def _sequence_logp(model, prompts, answer: list[int], pad_id: int) -> torch.Tensor:
    seqs = [p + answer for p in prompts]
    ids, mask = _pad(seqs, pad_id)
    labels = ids.masked_fill(mask == 0, -100)
    for b, p in enumerate(prompts):
        labels[b, : len(p)] = -100
    out = model(input_ids=ids, attention_mask=mask, **_labels_for(model, labels))
    logp = torch.log_softmax(out.logits.float(), -1)
    total = torch.zeros(len(prompts))
    for b, p in enumerate(prompts):
        pos = torch.arange(len(p) - 1, len(p) - 1 + len(answer))
        total[b] = float(logp[b, pos, torch.tensor(answer)].sum())
    return total


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def _generation_loss(model, tokenizer, test, data_cfg, batch_size) -> EvalResult:
    encoded = encode_dataset(test, tokenizer, (), data_cfg)
    losses = []
    for i in range(0, len(encoded), batch_size):
        batch = collate(encoded[i : i + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       **_labels_for(model, batch["labels"])).logits.float()
        losses.append(_per_example_nll(logits, batch["labels"].to(logits.device)).cpu())
    nll = torch.cat(losses)
    return EvalResult(loss=float(nll.mean()), accuracy=None, num_examples=len(encoded))


def _labels_for(model: nn.Module, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Labels for a model whose forward needs to know where prompts end (``ssf_pool``
    selects from the prompt only); other models are not given them (no extra loss)."""
    return {"labels": labels} if getattr(model, "takes_labels", False) else {}


def _per_example_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)
    tok = torch.nn.functional.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none"
    )
    mask = (shift_labels != -100).float()
    return (tok * mask).sum(1) / mask.sum(1).clamp(min=1)


__all__ = ["EvalResult", "build_prompt", "evaluate", "label_scores"]
