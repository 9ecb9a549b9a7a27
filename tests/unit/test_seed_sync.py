"""Client-side snapshots of seed methods: round 0 is the true base even in a process that
trained for an earlier run; catch-up from a snapshot equals the server's replay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, Metadata, RecordDict

from client.seed_sync import base_path, save_base, snapshot_path, state_dir, sync_node
from fedpeft import wire
from fedpeft.methods.fedkseed import FedKSeedConfig, FedKSeedMethod, encode_history
from fedpeft.models import ModelConfig, load_causal_lm


def _msg(history: dict, since: int, target: int) -> Message:
    meta = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1,
                    reply_to_message_id="", group_id="1", created_at=0.0, ttl=60.0,
                    message_type="train")
    content = RecordDict({wire.ARRAYS_KEY: wire.to_arrayrecord(history),
                          wire.CONFIG_KEY: ConfigRecord({"since": since, "target": target})})
    return Message(content=content, metadata=meta)


def test_round_zero_is_the_base_even_after_training_for_another_run(tmp_path: Path) -> None:
    # Prepare: one process (one attached model) serves run 1, trains, then serves run 2
    model_cfg = ModelConfig(name="tiny-llama", cache_dir=str(tmp_path))
    method = FedKSeedMethod(FedKSeedConfig(num_seeds=16))
    model = method.attach(load_causal_lm(model_cfg), seed=0)
    fresh = {k: v.clone() for k, v in method.params(model).items()}
    base = base_path(model_cfg, "key")
    save_base(method, model, base)
    sync_node(method, model, _msg({}, 0, 0), model_cfg, 1, 7, base)
    for p in method.params(model).values():  # local training of run 1 moves the weights
        p.data.add_(0.5)
    history = encode_history([(1, np.array([3], np.int32), np.array([2.0], np.float32))], 16)
    # Execute: run 2, round 2 (the node never synced in run 2: full history)
    sync_node(method, model, _msg(history, 0, 1), model_cfg, 2, 7, base)
    # Assert: run 2's round 0 is the untouched base; its round 1 is the server's replay
    round0 = state_dir(model_cfg, 2)
    assert snapshot_path(round0, 0).exists() and snapshot_path(round0, 1).exists()
    server = FedKSeedMethod(FedKSeedConfig(num_seeds=16))
    expected = server.attach(load_causal_lm(model_cfg), seed=0)
    assert all(torch.equal(method.params(expected)[k], fresh[k]) for k in fresh)
    server.replay(expected, np.array([3], np.int32), np.array([2.0], np.float32))
    got, want = method.params(model), server.params(expected)
    assert all(torch.equal(got[k], want[k]) for k in want)
