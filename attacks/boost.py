"""ReCIT's "Personal Notes" booster: malicious pre-training of the distributed model.

Paper: Xie et al., "ReCIT: Reconstructing Full Private Data from Gradient in
Parameter-Efficient Fine-Tuning of Large Language Models", 2025, arXiv 2504.20570.

Before the federation starts, the attacking server fine-tunes the base model it will
distribute on synthetic PII records, each followed by a note that restates its PII
(:func:`attacks.victims.personal_note`). A model trained this way has learnt to copy the
PII of whatever record it is shown, so a client's single local step on a new record
imprints that record strongly, and the server's replay of the update recovers more of it.

The texts are formatted exactly like the clients' data (the audit prompt as the question,
the note as the answer, tokenised by :func:`fedpeft.data.encode_example`), so the booster
trains the very positions clients later train. The records come from a Faker seed range
far from the victims' (``seed + 1_000_000``), so no victim record is ever in them.

The result is a plain Hugging Face directory cached under
``cache_root()/boosted/<hash of (model config, BoostConfig)>`` and loadable as
``model=hf model.name=<dir>``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from attacks.victims import PROMPT, Record, faker_records, personal_note
from fedpeft.data import DataConfig, Encoded, collate, encode_example
from fedpeft.errors import ConfigError
from fedpeft.models import (
    ModelConfig,
    _cached_dir,
    cache_root,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
)

SEED_OFFSET = 1_000_000  # boost records use Faker seeds this far from the victims'
_FORMAT = 1  # bump when the training recipe changes; older cached models are rebuilt
_LOG_EVERY = 10
# The clients' tokenisation of a generation task (the audit runs data=local with
# label_field=null); only the question is cut to max_input_tokens, never the answer.
_DATA = DataConfig(name="local", label_field=None, response_field="response",
                   max_input_tokens=16)


@dataclass(frozen=True)
class BoostConfig:
    """Options of the Personal Notes pre-training.

    records: synthetic records trained on; steps: AdamW steps; batch_size: records per
    step; lr: AdamW learning rate; seed: Faker seed (offset by ``SEED_OFFSET``) and
    batch-order seed.
    """

    records: int = 256
    steps: int = 60
    batch_size: int = 8
    lr: float = 5e-5
    seed: int = 0

    def validate(self) -> None:
        """Reject sizes below one and a non-positive learning rate."""
        for key in ("records", "steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"boost.{key} must be >= 1, found {getattr(self, key)}")
        if not self.lr > 0:
            raise ConfigError(f"boost.lr must be > 0, found {self.lr}")


def boost_records(cfg: BoostConfig) -> list[Record]:
    """The attacker's synthetic records, from a seed range disjoint from the victims'."""
    return faker_records(cfg.records, seed=cfg.seed + SEED_OFFSET)


def boost(model_cfg: ModelConfig, cfg: BoostConfig, out_dir: Path | None = None) -> Path:
    """The boosted copy of ``model_cfg``'s base model: a directory loadable as
    ``model=hf model.name=<dir>``, trained on first use and reused afterwards.

    ``out_dir`` replaces the default cache location
    ``cache_root(model_cfg)/boosted/<hash>``. The directory is written to a temp folder
    and renamed into place with a stamp written last, under a file lock, so a complete
    directory is never rebuilt and a half-written one is never read.
    """
    cfg.validate()
    model_cfg.validate()
    key = cache_key(model_cfg, cfg)
    target = out_dir or cache_root(model_cfg) / "boosted" / key["hash"]
    target.parent.mkdir(parents=True, exist_ok=True)
    return _cached_dir(target, key, lambda tmp: _build(model_cfg, cfg, tmp))


def cache_key(model_cfg: ModelConfig, cfg: BoostConfig) -> dict[str, Any]:
    """What determines the boosted weights, and its hash (the cache directory's name).

    ``dtype`` and ``device`` are left out: training always runs in float32 and the saved
    weights are float32, so each run may still load them in its own precision.
    """
    model = {"name": model_cfg.name, "revision": model_cfg.revision,
             "tiny": dataclasses.asdict(model_cfg.tiny) if model_cfg.name == "tiny-llama"
             else None}
    body = {"format": _FORMAT, "model": model, "boost": dataclasses.asdict(cfg)}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return {**body, "hash": digest}


def _build(model_cfg: ModelConfig, cfg: BoostConfig, out: Path) -> None:
    """Train a private float32 copy of the base model and save it with its tokenizer."""
    base = dataclasses.replace(model_cfg, dtype="float32")
    tokenizer = load_tokenizer(base)
    model = load_causal_lm(base).to(resolve_device(base.device))
    examples = encode_notes(tokenizer, boost_records(cfg))
    _train(model, examples, int(tokenizer.pad_token_id), cfg)
    model.cpu().eval().save_pretrained(out)
    tokenizer.save_pretrained(out)


def encode_notes(tokenizer: PreTrainedTokenizerBase, records: list[Record]) -> list[Encoded]:
    """Each record's personal note as a client example: ``PROMPT`` question, note answer."""
    return [encode_example(tokenizer, PROMPT, personal_note(r), (), _DATA) for r in records]


def trainable_parameters(model: PreTrainedModel) -> list[torch.nn.Parameter]:
    """Every base weight except the token embeddings and the output head.

    The embeddings stay as distributed for three reasons: the output head is tied to them
    (SmolLM2, tiny-llama), so training one trains both; AdamW's decoupled weight decay
    would shrink the ~49k vocabulary rows the notes never use, damaging the model for
    everything else; and ReCIT's candidate-token stage matches client gradients against
    these very vectors, which the clients also read unchanged.
    """
    frozen = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        frozen.add(id(head.weight))
    return [p for p in model.parameters() if id(p) not in frozen]


def _train(model: PreTrainedModel, examples: list[Encoded], pad_id: int,
           cfg: BoostConfig) -> None:
    """``cfg.steps`` AdamW steps on shuffled batches; the caller's RNG is left untouched."""
    params = trainable_parameters(model)
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    order = _batch_order(len(examples), cfg)
    device = next(model.parameters()).device
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(cfg.seed)  # dropout, if the model has any
        model.train()
        for step, rows in enumerate(order, 1):
            batch = collate([examples[i] for i in rows], pad_id)
            loss = _step(model, optimizer, {k: v.to(device) for k, v in batch.items()})
            if step % _LOG_EVERY == 0 or step == cfg.steps:
                print(f"boost step {step}/{cfg.steps} loss {loss:.4f}", file=sys.stderr,
                      flush=True)
    for param in params:
        param.requires_grad_(False)


def _step(model: PreTrainedModel, optimizer: torch.optim.Optimizer,
          batch: dict[str, torch.Tensor]) -> float:
    """One clipped AdamW step; returns the batch loss before it."""
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(
        [p for p in model.parameters() if p.requires_grad], max_norm=1.0)
    optimizer.step()
    return float(loss.detach())


def _batch_order(n: int, cfg: BoostConfig) -> list[list[int]]:
    """``cfg.steps`` batches of indices: seeded shuffles of ``range(n)``, one epoch after
    another (a batch may span two), from a private generator, not the global RNG."""
    gen = torch.Generator().manual_seed(cfg.seed)
    flat: list[int] = []
    size = cfg.batch_size
    while len(flat) < cfg.steps * size:
        flat += torch.randperm(n, generator=gen).tolist()
    return [flat[i * size:(i + 1) * size] for i in range(cfg.steps)]


@torch.no_grad()
def note_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
              records: list[Record], batch_size: int = 16) -> float:
    """Mean answer-token loss of the records' personal notes (how well the model knows
    them in the clients' format)."""
    examples = encode_notes(tokenizer, records)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], int(tokenizer.pad_token_id))
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        total, count = total + float(loss) * tokens, count + tokens
    return total / count
