"""A real `flwr run` simulation of ``ssf_pool`` on the tiny model, then ``fedpeft
predict`` on its run directory: the predictions score exactly the held-out accuracy the
server recorded for the final global pool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpeft import cli
from fedpeft.config import compose
from fedpeft.data import load_task_data
from fedpeft.reporting import RunDir
from tests.integration.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def test_ssf_pool_federation_then_predict(tmp_path: Path, flwr_home: Path,
                                          app_dir: Path) -> None:
    out = tmp_path / "runs"
    base = [*tiny_overrides(out, "pool"), "method=ssf_pool", "method.pool.entries=4",
            "method.pool.top_n=2", "sim.num_clients=2", "sim.client_cpus=1",
            "run.num_rounds=1"]
    assert cli.main(["simulate", *base, "--app", str(app_dir)]) == 0
    run = RunDir(out / "pool")
    final = run.records()[-1]
    assert final["round"] == 1 and final["num_clients"] == 2 and final["num_rejected"] == 0

    data = load_task_data(compose(base).data)
    inputs = tmp_path / "test.jsonl"
    inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in data.test["text"]))
    preds = tmp_path / "preds.jsonl"
    assert cli.main(["predict", str(run.path), "--input", str(inputs),
                     "--output", str(preds)]) == 0
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    truth = [data.label_names[i] for i in data.test["label"]]
    accuracy = sum(r["label"] == t for r, t in zip(rows, truth, strict=True)) / len(rows)
    assert accuracy == pytest.approx(final["eval_accuracy"], abs=1e-6)
    assert all(len(r["entries"]) == 2 and set(r["entries"]) <= set(range(4)) for r in rows)
