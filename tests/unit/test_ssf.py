"""SSF sites and pools (fedpeft.ssf; methods ssf and ssf_pool) on the tiny Llama and the
bundled MiniLM encoder: identity at γ=1, β=0, merging and plain export, selection from
the frozen query only, and example-weighted aggregation of pool updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Message, Metadata
from transformers import AutoModelForCausalLM

from fedpeft import wire
from fedpeft.config import compose
from fedpeft.data import collate, encode_dataset, load_task_data
from fedpeft.errors import ConfigError
from fedpeft.methods import TrainContext, build_method, build_model
from fedpeft.models import ModelConfig, get_tokenizer, load_causal_lm, load_encoder
from fedpeft.ssf import (
    SSF,
    PoolSSF,
    attach_sites,
    default_sites,
    give_biases_for_export,
    merge_sites,
)
from strategies import build_strategy
from strategies.decoding import DecodingStrategy

TINY = "model=tiny-llama data.max_examples=200 data.test_size=20 "
POOL = TINY + "method=ssf_pool method.pool.entries=6 method.pool.top_n=2"


@pytest.fixture(scope="module")
def cfg():
    return compose(TINY)


@pytest.fixture(scope="module")
def batch(cfg):
    tok, data = get_tokenizer(cfg.model), load_task_data(cfg.data)
    enc = encode_dataset(data.train.select(range(6)), tok, data.label_names, cfg.data)
    return collate(enc, tok.pad_token_id)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _llama(cfg) -> torch.nn.Module:
    return load_causal_lm(cfg.model)


def _bert() -> torch.nn.Module:
    return load_encoder(ModelConfig(name="minilm-l6"))


def _out(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def bert_batch():
    tok = get_tokenizer(ModelConfig(name="minilm-l6"))
    enc = tok(["the match ended in a draw", "shares fell sharply on monday"],
              padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_identity_ssf_leaves_outputs_unchanged_and_a_random_one_does_not(
        arch, cfg, batch, bert_batch) -> None:
    model, inputs = (_llama(cfg), batch) if arch == "llama" else (_bert(), bert_batch)
    before = _out(model, inputs)
    names = attach_sites(model, default_sites(model), lambda c: SSF(c, std=0.0,
                                                                      generator=_gen()))
    assert len(names) == 2 * (2 if arch == "llama" else 6)  # two sites per block
    torch.testing.assert_close(_out(model, inputs), before, rtol=0, atol=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".ssf." in n:
                p.add_(torch.randn(p.shape, generator=_gen()) * 0.05)
    assert (_out(model, inputs) - before).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_merged_and_unmerged_outputs_are_equal(arch, cfg, batch, bert_batch) -> None:
    model, inputs = (_llama(cfg), batch) if arch == "llama" else (_bert(), bert_batch)
    attach_sites(model, default_sites(model), lambda c: SSF(c, std=0.1, generator=_gen()))
    unmerged = _out(model, inputs)
    merged_names = merge_sites(model)
    assert merged_names and not any(".ssf." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(_out(model, inputs), unmerged, rtol=1e-4, atol=1e-4)


def test_merged_llama_exports_as_a_plain_transformers_checkpoint(cfg, batch, tmp_path) -> None:
    model = _llama(cfg)
    attach_sites(model, default_sites(model), lambda c: SSF(c, std=0.1, generator=_gen()))
    expected = _out(model, batch)
    merge_sites(model)
    give_biases_for_export(model)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config.attention_bias and again.config.mlp_bias
    torch.testing.assert_close(_out(again, batch), expected, rtol=1e-4, atol=1e-4)


def test_a_pool_or_a_shift_without_a_bias_does_not_merge(cfg) -> None:
    model = _llama(cfg)
    attach_sites(model, ["o_proj"], lambda c: PoolSSF(3, c, std=0.1, generator=_gen()))
    with pytest.raises(ConfigError, match="pool"):
        merge_sites(model)
    norm = _llama(cfg)
    attach_sites(norm, ["input_layernorm"], lambda c: SSF(c, std=0.1, generator=_gen()))
    with pytest.raises(ConfigError, match="no bias"):
        merge_sites(norm)


def test_unknown_sites_name_the_valid_ones(cfg) -> None:
    with pytest.raises(ConfigError, match=r"matched no module.*o_proj"):
        attach_sites(_llama(cfg), ["attn_out"], lambda c: SSF(c, std=0.0, generator=_gen()))
    with pytest.raises(ConfigError, match="top_n"):
        compose(TINY + "method=ssf_pool method.pool.top_n=30")
    with pytest.raises(ConfigError, match=r"combine.*mean, weighted"):
        compose(TINY + "method=ssf_pool method.pool.combine=max")


@pytest.fixture(scope="module")
def pool():
    cfg = compose(POOL)
    method = build_method(cfg.method.name, cfg.method)
    return cfg, method, build_model(method, cfg.model, seed=0, data_cfg=cfg.data)


def test_selection_uses_only_the_frozen_models_query(pool, batch) -> None:
    cfg, method, model = pool
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    q = model.query(ids, mask, labels)
    # the query is the plain base model's pooled prompt features minus the template's
    base = _llama(cfg)
    prompts = [ids[b][(mask[b] == 1) & (labels[b] == -100)] for b in range(len(ids))]
    with torch.no_grad():
        hidden = [base.model(input_ids=p[None]).last_hidden_state[0, 1:].mean(0) for p in prompts]
    torch.testing.assert_close(q, torch.stack(hidden) - model.reference, rtol=1e-4, atol=1e-4)
    _, idx, _ = model.choose(ids, mask, labels)
    start = method.get_state(model)
    with torch.no_grad():  # other entries' tensors and a fresh cache change nothing
        for n, p in model.named_parameters():
            if ".ssf." in n:
                p.mul_(3.0)
    model._queries.clear()
    torch.testing.assert_close(model.query(ids, mask, labels), q, rtol=0, atol=0)
    assert torch.equal(model.choose(ids, mask, labels)[1], idx)
    answerless = torch.where(labels == -100, labels, torch.full_like(labels, -100))
    assert torch.equal(model.choose(ids, mask, None)[1], model.choose(ids, mask)[1])
    assert torch.equal(model.choose(ids, mask, answerless)[1], idx)
    method.set_state(model, start)


def test_only_selected_entries_get_gradients(pool, batch) -> None:
    model = pool[2]
    model.train()
    out = model(**batch)
    out.loss.backward()
    used = set(out.selected.flatten().tolist())
    site = next(m for n, m in model.named_modules() if isinstance(m, PoolSSF))
    moved = {p for p in range(site.gamma.shape[0]) if site.gamma.grad[p].abs().sum() > 0}
    assert moved == used and len(used) < site.gamma.shape[0]
    assert model.keys.keys.grad[sorted(used)].abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model.eval()


def _reply(node: int, delta: dict, n: int) -> Message:
    meta = Metadata(run_id=1, message_id=str(node), src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=0.0, ttl=60.0,
                    message_type="train")
    return Message(content=wire.reply_content(wire.to_arrayrecord(delta), n, {}),
                   metadata=meta)


def test_fedavg_weights_pool_updates_by_examples(pool) -> None:
    cfg, method, model = pool
    tok, data = get_tokenizer(cfg.model), load_task_data(cfg.data)
    start = method.get_state(model)
    updates = []
    for pid, rows in ((1, range(0, 3)), (2, range(3, 12))):
        examples = encode_dataset(data.train.select(rows), tok, data.label_names, cfg.data)
        method.set_state(model, start)
        ctx = TrainContext(server_round=1, partition_id=pid, seed=0,
                           pad_token_id=tok.pad_token_id)
        updates.append(method.train(model, examples, ctx))
    method.set_state(model, start)
    strat = DecodingStrategy(build_strategy("fedavg", cfg.strategy.params))
    strat._global = start
    replies = [_reply(i + 1, u.update.deltas, u.num_examples) for i, u in enumerate(updates)]
    arrays, _ = strat.aggregate_train(1, replies)
    out = wire.from_arrayrecord(arrays)
    assert [u.num_examples for u in updates] == [3, 9]
    assert set(out) == set(start) and any(k.startswith("keys") for k in out)
    for k in start:
        want = start[k] + (3 * updates[0].update.deltas[k] + 9 * updates[1].update.deltas[k]) / 12
        np.testing.assert_allclose(out[k], want, rtol=1e-5, atol=1e-6)


def test_evaluation_selects_from_the_prompt_even_when_answers_are_in_the_input(
        pool, monkeypatch) -> None:
    from fedpeft.evaluation import evaluate
    from fedpeft.ssf import SSFPoolModel

    cfg, _, model = pool
    tok = get_tokenizer(cfg.model)
    seen: list[tuple] = []
    original = SSFPoolModel.choose

    def spy(self, input_ids, attention_mask, labels=None, inputs_embeds=None):
        seen.append((input_ids, attention_mask, labels))
        return original(self, input_ids, attention_mask, labels, inputs_embeds)

    monkeypatch.setattr(SSFPoolModel, "choose", spy)
    qa = compose(POOL + " data=chatterbot-qa data.max_examples=60 data.test_size=6").data
    evaluate(model, tok, load_task_data(qa).test, (), qa)  # generation: answers in the input
    names = ("no", "yes please")  # a multi-token label: prompt + answer sequences
    two = load_task_data(cfg.data).test.filter(lambda r: r["label"] < 2).select(range(3))
    evaluate(model, tok, two, names, cfg.data)
    assert len(seen) >= 3
    for _ids, mask, labels in seen:
        assert labels is not None
        answer = (labels != -100) & (mask == 1)
        assert answer.any(dim=1).all()  # the answer is in the input, and masked from the query
