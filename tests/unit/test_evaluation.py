from __future__ import annotations

import torch

from fedpeft.data import DataConfig, load_task_data
from fedpeft.evaluation import _label_scores, _sequence_logp, evaluate, prompt_ids
from fedpeft.models import ModelConfig, get_tokenizer, load_causal_lm


def test_single_forward_label_scores_equal_full_sequence_scores() -> None:
    cfg = ModelConfig(name="tiny-llama")
    model, tok = load_causal_lm(cfg), get_tokenizer(cfg)
    data = load_task_data(DataConfig(test_size=20))
    prompts = [prompt_ids(tok, t, data.label_names, DataConfig())
               for t in data.test["text"][:6]]
    answers = [tok(" " + n, add_special_tokens=False).input_ids for n in data.label_names]

    with torch.inference_mode():
        fast = _label_scores(model, prompts, answers, tok.pad_token_id)
        slow = torch.stack([_sequence_logp(model, prompts, a, tok.pad_token_id)
                            for a in answers], dim=1)

    assert all(len(a) == 1 for a in answers)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


def test_evaluate_reports_loss_and_accuracy_in_range() -> None:
    cfg = ModelConfig(name="tiny-llama")
    model, tok = load_causal_lm(cfg), get_tokenizer(cfg)
    data = load_task_data(DataConfig(test_size=20))

    res = evaluate(model, tok, data.test, data.label_names, DataConfig(), batch_size=8)

    assert res.num_examples == 20 and 0.0 <= res.accuracy <= 1.0
    assert res.loss > 0 and torch.isfinite(torch.tensor(res.loss))


def test_generation_task_reports_loss_only() -> None:
    cfg = ModelConfig(name="tiny-llama")
    dcfg = DataConfig(name="chatterbot-qa", test_size=10)
    data = load_task_data(dcfg)

    res = evaluate(load_causal_lm(cfg), get_tokenizer(cfg), data.test, (), dcfg)

    assert res.accuracy is None and res.loss > 0
