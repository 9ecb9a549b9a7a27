"""Predicting and exporting from a run directory (fedpeft.predict, ``fedpeft predict`` and
``fedpeft export``), on run directories laid out as the server writes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from fedpeft import cli
from fedpeft.config import compose
from fedpeft.data import load_task_data
from fedpeft.errors import ConfigError
from fedpeft.evaluation import label_scores
from fedpeft.methods import build_method, build_model
from fedpeft.models import get_tokenizer
from fedpeft.predict import Predictor, export_merged
from fedpeft.reporting import RunDir

TINY = ["model=tiny-llama", "data.max_examples=200", "data.test_size=20"]
POOL = [*TINY, "method=ssf_pool", "method.pool.entries=5", "method.pool.top_n=2",
        "method.pool.combine=weighted"]


def _run_dir(tmp_path: Path, overrides: list[str]):
    """A run whose round-1 checkpoint holds a randomly moved global state."""
    cfg = compose(overrides)
    method = build_method(cfg.method.name, cfg.method)
    model = build_model(method, cfg.model, seed=cfg.run.seed, data_cfg=cfg.data)
    rng = np.random.default_rng(0)
    state = {k: v + rng.normal(0, 0.05, v.shape).astype(np.float32)
             for k, v in method.get_state(model).items()}
    method.set_state(model, state)
    run = RunDir(tmp_path / "run")
    run.path.mkdir(parents=True)
    run.write_json("config.json", {"overrides": overrides, "config": {}})
    ckpt = run.checkpoint_dir(1)
    ckpt.mkdir(parents=True)
    method.save(model, ckpt)
    (ckpt / ".complete").write_text("1")
    return run.path, cfg, model


def test_predictions_are_the_saved_models_with_the_entries_it_chose(tmp_path) -> None:
    path, cfg, model = _run_dir(tmp_path, POOL)
    texts = list(load_task_data(cfg.data).test["text"][:6])
    predictor = Predictor.from_run(path)
    preds = predictor.predict(texts)
    tok, names = get_tokenizer(cfg.model), load_task_data(cfg.data).label_names
    expected = label_scores(model, tok, texts, names, cfg.data)
    for p, row in zip(preds, expected, strict=True):
        assert p.label == names[int(row.argmax())]
        np.testing.assert_allclose(list(p.scores.values()), row.numpy(), rtol=1e-5)
        assert len(p.entries) == 2 and len(set(p.entries)) == 2
        assert abs(sum(p.entry_weights) - 1) < 1e-5 and p.entry_weights[0] >= p.entry_weights[1]
    assert len({tuple(p.entries) for p in preds}) > 1  # instances choose differently


@pytest.mark.parametrize("extra", [["method=ssf"],
                                   ["method=ssf_pool", "method.pool.entries=1",
                                    "method.pool.top_n=1"]])
def test_export_writes_a_plain_checkpoint_with_the_same_outputs(tmp_path, extra) -> None:
    path, _, model = _run_dir(tmp_path, [*TINY, *extra])
    ids = torch.tensor([[1, 520, 3308, 314, 260, 1345, 2]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = export_merged(path, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert not any("ssf" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_export_refuses_what_does_not_merge(tmp_path) -> None:
    path, _, _ = _run_dir(tmp_path, POOL)
    with pytest.raises(ConfigError, match=r"pool.entries=1.*has 5"):
        export_merged(path, tmp_path / "merged")


def test_cli_predict_writes_json_lines_and_names_a_bad_line(tmp_path, capsys) -> None:
    path, _, _ = _run_dir(tmp_path, POOL)
    good = tmp_path / "in.jsonl"
    good.write_text('{"text": "Shares fell on Monday."}\n\n{"text": "The match was won."}\n')
    out = tmp_path / "out.jsonl"
    assert cli.main(["predict", str(path), "--input", str(good), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == ["Shares fell on Monday.", "The match was won."]
    assert all(len(r["entries"]) == 2 for r in rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    assert cli.main(["predict", str(path), "--input", str(bad)]) == 2
    assert "bad.jsonl:2: expected a string field 'text', found ['body']" in capsys.readouterr().err
    assert cli.main(["predict", str(tmp_path), "--input", str(good)]) == 2
    assert "not a run directory" in capsys.readouterr().err
