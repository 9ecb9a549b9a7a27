"""A client's examples are sliced from the training split its process encodes once, and
equal what encoding its own partition would give, for every partitioner."""

from __future__ import annotations

import dataclasses

import pytest

from client.app import _encoded_train, _examples
from fedpeft.data import DataConfig, PartitionConfig, encode_dataset, load_task_data, partition
from fedpeft.models import ModelConfig, get_tokenizer


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "pathological"])
def test_sliced_examples_equal_encoding_each_partition(kind: str, tiny_cfg: ModelConfig) -> None:
    data_cfg = DataConfig(name="bbc-news", test_size=20, max_examples=300,
                          partition=PartitionConfig(type=kind, alpha=0.5))
    data = load_task_data(data_cfg)
    tok = get_tokenizer(tiny_cfg)
    for pid in range(5):
        direct = encode_dataset(partition(data.train, data_cfg.partition, 5, pid), tok,
                                data.label_names, data_cfg)
        sliced = _examples((), data_cfg, tiny_cfg, pid, 5)
        assert [dataclasses.astuple(e) for e in sliced] == [
            dataclasses.astuple(e) for e in direct]


def test_training_split_is_encoded_once_per_process(tiny_cfg: ModelConfig) -> None:
    data_cfg = DataConfig(name="bbc-news", test_size=20, max_examples=300)
    _encoded_train.cache_clear()
    for pid in range(8):
        _examples((), data_cfg, tiny_cfg, pid, 8)
    assert _encoded_train.cache_info().misses == 1
