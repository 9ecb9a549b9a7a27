"""Datasets, held-out splits, federated partitions, prompts and tokenization."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedpeft import data as data_mod
from fedpeft.data import (
    DataConfig,
    Encoded,
    PartitionConfig,
    TaskData,
    build_prompt,
    collate,
    encode_dataset,
    encode_example,
    label_token_ids,
    load_task_data,
    partition,
)
from fedpeft.errors import ConfigError, DatasetNotFoundError
from fedpeft.models import ModelConfig, get_tokenizer
from fedpeft.schema import build

BBC_LABELS = ("business", "entertainment", "politics", "sport", "tech")
BBC_COUNTS = {"business": 510, "entertainment": 386, "politics": 417, "sport": 511, "tech": 401}


@pytest.fixture
def fresh_caches() -> Iterator[None]:
    """Empty the per-process data/partitioner caches so determinism is really re-derived."""
    data_mod._load_task_data.cache_clear()
    data_mod._PARTITIONERS.clear()
    yield
    data_mod._PARTITIONERS.clear()


@pytest.fixture(scope="module")
def tokenizer(tiny_cfg: ModelConfig) -> object:
    return get_tokenizer(tiny_cfg)  # the SmolLM2 tokenizer


@pytest.fixture(scope="module")
def bbc() -> TaskData:
    return load_task_data(DataConfig(name="bbc-news", test_size=100))


def _label_shares(ds: object, num_labels: int) -> np.ndarray:
    counts = np.bincount(np.asarray(ds["label"]), minlength=num_labels)
    return counts / counts.sum()


# ------------------------------------------------------------ bundled datasets


def test_bbc_news_has_all_articles_five_topics_and_a_stratified_test_split(
    bbc: TaskData,
) -> None:
    # Execute
    total = Counter(bbc.train["response"]) + Counter(bbc.test["response"])

    # Assert
    assert bbc.label_names == BBC_LABELS
    assert dict(total) == BBC_COUNTS
    assert len(bbc.test) == 100 and len(bbc.train) == 2125
    expected = np.array([BBC_COUNTS[n] for n in BBC_LABELS]) / 2225
    assert np.abs(_label_shares(bbc.test, 5) - expected).max() < 0.011
    assert all(bbc.label_names[y] == r for y, r in zip(bbc.test["label"], bbc.test["response"],
                                                      strict=True))


def test_tweets_have_three_sentiments_and_all_rows() -> None:
    # Execute
    tweets = load_task_data(DataConfig(name="tweets", test_size=90))

    # Assert
    assert tweets.label_names == ("negative", "neutral", "positive")
    assert len(tweets.train) + len(tweets.test) == 38158
    assert len(tweets.test) == 90
    assert all(t.strip() for t in tweets.test["text"])


def test_chatterbot_is_a_generation_task_of_question_answer_pairs() -> None:
    # Execute
    qa = load_task_data(DataConfig(name="chatterbot-qa", label_field=None, test_size=60))

    # Assert
    assert qa.label_names == ()
    assert len(qa.train) + len(qa.test) == 2026
    assert set(qa.train["label"]) == {-1}
    assert all(isinstance(r, str) and r for r in qa.test["response"])


# ------------------------------------------------------------ held-out split


def test_split_is_disjoint_complete_and_deterministic(fresh_caches: None) -> None:
    # Prepare
    cfg = DataConfig(name="bbc-news", test_size=80, seed=3)
    rows, _ = data_mod._bbc()

    # Execute
    first = load_task_data(cfg)
    data_mod._load_task_data.cache_clear()
    second = load_task_data(cfg)
    other_seed = load_task_data(DataConfig(name="bbc-news", test_size=80, seed=4))

    # Assert: train + test is exactly the corpus (as a multiset), so nothing overlaps
    assert Counter(first.train["text"]) + Counter(first.test["text"]) == Counter(rows["text"])
    assert first is not second
    assert list(first.test["text"]) == list(second.test["text"])
    assert list(first.train["text"]) == list(second.train["text"])
    assert list(first.test["text"]) != list(other_seed.test["text"])


def test_max_examples_caps_the_total() -> None:
    # Execute
    small = load_task_data(DataConfig(name="bbc-news", test_size=20, max_examples=120))

    # Assert
    assert len(small.train) == 100 and len(small.test) == 20


def test_test_size_larger_than_the_data_is_a_config_error(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "tiny.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(5)))

    # Execute / Assert
    with pytest.raises(ConfigError, match="test_size"):
        load_task_data(DataConfig(name=str(path), test_size=5))


# ------------------------------------------------------------ partitions


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "pathological"])
def test_partitions_are_deterministic_for_a_seed_and_change_with_it(
    bbc: TaskData, kind: str, fresh_caches: None
) -> None:
    # Prepare
    def texts(seed: int) -> list[list[str]]:
        cfg = PartitionConfig(type=kind, seed=seed)
        parts = [list(partition(bbc.train, cfg, 4, i)["text"]) for i in range(4)]
        data_mod._PARTITIONERS.clear()
        return parts

    # Execute
    first, again, other = texts(0), texts(0), texts(1)

    # Assert
    assert first == again
    assert first != other


def test_iid_partitions_cover_the_train_set_disjointly(bbc: TaskData) -> None:
    # Execute
    parts = [partition(bbc.train, PartitionConfig(type="iid"), 5, i) for i in range(5)]

    # Assert
    merged = sum((Counter(p["text"]) for p in parts), Counter())
    assert merged == Counter(bbc.train["text"])
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_small_dirichlet_alpha_skews_labels_more_than_large_alpha(bbc: TaskData) -> None:
    # Prepare
    overall = _label_shares(bbc.train, 5)

    def skew(alpha: float) -> float:  # mean total-variation distance to the global mix
        cfg = PartitionConfig(type="dirichlet", alpha=alpha)
        parts = [partition(bbc.train, cfg, 5, i) for i in range(5)]
        return float(np.mean([0.5 * np.abs(_label_shares(p, 5) - overall).sum()
                              for p in parts]))

    # Execute
    skewed, balanced = skew(0.1), skew(100.0)

    # Assert
    assert skewed > 0.3
    assert balanced < 0.1


def test_pathological_partitions_hold_at_most_the_configured_classes(bbc: TaskData) -> None:
    # Prepare
    cfg = PartitionConfig(type="pathological", num_classes_per_partition=2)

    # Execute
    parts = [partition(bbc.train, cfg, 5, i) for i in range(5)]

    # Assert
    assert all(1 <= len(set(p["label"])) <= 2 for p in parts)


def test_label_partitioning_of_a_generation_task_names_the_valid_type() -> None:
    # Prepare
    qa = load_task_data(DataConfig(name="chatterbot-qa", label_field=None, test_size=60))

    # Execute / Assert
    with pytest.raises(ConfigError, match="valid types here: iid"):
        partition(qa.train, PartitionConfig(type="dirichlet"), 2, 0)


def test_partition_id_out_of_range_is_a_config_error(bbc: TaskData) -> None:
    with pytest.raises(ConfigError, match=r"\[0, 4\)"):
        partition(bbc.train, PartitionConfig(type="iid"), 4, 4)


def test_unknown_partition_type_lists_the_choices() -> None:
    # Execute
    with pytest.raises(ConfigError) as info:
        build(DataConfig, {"partition": {"type": "zipf"}}, "data")

    # Assert
    assert "zipf" in str(info.value)
    assert all(k in str(info.value) for k in ("iid", "dirichlet", "pathological"))


# ------------------------------------------------------------ prompts + tokens


def test_build_prompt_lists_labels_and_ends_before_the_answer() -> None:
    # Execute
    default = build_prompt("Shares rose.", BBC_LABELS, None)
    custom = build_prompt("Shares rose.", ("a", "b"), "Pick {labels}!")
    question = build_prompt("Hi?", (), None)

    # Assert
    assert default.endswith("Text: Shares rose.\nAnswer:")
    assert ", ".join(BBC_LABELS) in default
    assert custom.startswith("Pick a, b!\n")
    assert question == "Question: Hi?\nAnswer:"


def test_encode_example_masks_the_prompt_and_learns_answer_plus_eos(tokenizer: object) -> None:
    # Prepare
    cfg = DataConfig(name="bbc-news")

    # Execute
    enc = encode_example(tokenizer, "Shares rose sharply.", "business", BBC_LABELS, cfg)

    # Assert
    n_prompt = enc.labels.index(next(x for x in enc.labels if x != -100))
    prompt = build_prompt("Shares rose sharply.", BBC_LABELS, data_mod._DEFAULT_INSTRUCTIONS[
        "bbc-news"])
    assert tokenizer.decode(enc.input_ids[:n_prompt]) == prompt
    assert enc.labels[:n_prompt] == [-100] * n_prompt
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]
    assert tokenizer.decode(enc.input_ids[n_prompt:]) == " business" + tokenizer.eos_token


def test_truncation_cuts_the_text_but_keeps_template_and_answer(tokenizer: object) -> None:
    # Prepare
    cfg = DataConfig(name="bbc-news", max_input_tokens=8)
    text = " ".join(f"word{i}" for i in range(300))

    # Execute
    long = encode_example(tokenizer, text, "tech", BBC_LABELS, cfg)
    short = encode_example(tokenizer, "", "tech", BBC_LABELS, cfg)

    # Assert
    answer = label_token_ids(tokenizer, BBC_LABELS)[4] + [tokenizer.eos_token_id]
    assert long.input_ids[-len(answer):] == answer
    assert [x for x in long.labels if x != -100] == answer
    assert 0 < len(long.input_ids) - len(short.input_ids) <= 8 + 1
    decoded = tokenizer.decode(long.input_ids)
    assert "word0" in decoded and "word299" not in decoded and decoded.startswith("Classify")


def test_label_token_ids_match_the_answers_used_in_training(tokenizer: object) -> None:
    # Prepare
    cfg = DataConfig(name="bbc-news")
    answers = label_token_ids(tokenizer, BBC_LABELS)

    # Execute
    encoded = [encode_example(tokenizer, "Some news.", name, BBC_LABELS, cfg)
               for name in BBC_LABELS]

    # Assert: prompt ids + label ids + eos is exactly the training sequence
    for enc, ids in zip(encoded, answers, strict=True):
        n_prompt = enc.labels.count(-100)
        assert enc.input_ids == enc.input_ids[:n_prompt] + ids + [tokenizer.eos_token_id]
    assert len({tuple(a) for a in answers}) == len(BBC_LABELS)


def test_encode_dataset_equals_encode_example_row_by_row(
    bbc: TaskData, tokenizer: object
) -> None:
    # Prepare
    cfg = DataConfig(name="bbc-news", max_input_tokens=32)
    rows = bbc.test.select(range(8))

    # Execute
    batched = encode_dataset(rows, tokenizer, bbc.label_names, cfg)

    # Assert
    single = [encode_example(tokenizer, t, r, bbc.label_names, cfg)
              for t, r in zip(rows["text"], rows["response"], strict=True)]
    assert batched == single


def test_collate_right_pads_with_masked_labels() -> None:
    # Prepare
    batch = [Encoded(input_ids=[5, 6, 7], labels=[-100, 6, 7]),
             Encoded(input_ids=[8], labels=[8])]

    # Execute
    out = collate(batch, pad_id=0)

    # Assert
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


# ------------------------------------------------------------ user data


def test_local_jsonl_classification_and_generation(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "mine.jsonl"
    rows = [{"body": f"item {i}", "tag": "odd" if i % 2 else "even", "reply": f"r{i}"}
            for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows))

    # Execute
    cls = load_task_data(DataConfig(name=str(path), text_field="body", label_field="tag",
                                    test_size=10))
    gen = load_task_data(DataConfig(name=str(path), text_field="body", label_field=None,
                                    response_field="reply", test_size=10))

    # Assert
    assert cls.label_names == ("even", "odd") and len(cls.train) == 30
    assert Counter(cls.test["response"]) == {"even": 5, "odd": 5}
    assert gen.label_names == () and set(gen.train["label"]) == {-1}
    assert all(r == "r" + t.split()[1] for t, r in zip(gen.train["text"], gen.train["response"],
                                                      strict=True))


def test_missing_column_lists_the_dataset_columns(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"b{i}", "label": 0}) for i in range(20)))

    # Execute
    with pytest.raises(ConfigError) as info:
        load_task_data(DataConfig(name=str(path), test_size=5))

    # Assert
    assert "'text'" in str(info.value) and "body" in str(info.value)


def test_missing_file_and_unknown_hub_dataset_raise_dataset_not_found() -> None:
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_task_data(DataConfig(name="/no/such/data.jsonl", test_size=5))
    with pytest.raises(DatasetNotFoundError, match="bbc-news"):
        load_task_data(DataConfig(name="no-such-org/no-such-dataset", test_size=5))
