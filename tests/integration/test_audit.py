"""``fedpeft audit`` end to end: real federated runs of the app with capture on, attacks
on the captures, the canary audit, and a report whose JSON validates."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from attacks.audit import run_audit, split_overrides, victim_records
from fedpeft.capture import read_observations

pytestmark = pytest.mark.slow


def test_audit_runs_real_rounds_and_reports(flwr_home: Path, app_dir: Path,
                                            tmp_path: Path) -> None:
    out = tmp_path / "audit"
    # a 128-wide tiny Llama: wider than the batch's positions, so FedSGD updates at the
    # audit's LoRA rank have an exact span
    html = run_audit(["model=tiny-llama", "model.tiny.hidden_size=128",
                      "model.tiny.intermediate_size=256", "audit.batch_sizes=[2]",
                      "audit.epsilons=[null]",
                      "audit.attacks=[recit,memorize]", "audit.canaries=40",
                      "audit.canary_guesses=5", "audit.canary_steps=2", f"audit.out={out}",
                      "audit.id=t", "eval.batch_size=4"], app_dir)
    assert html == out / "t" / "report.html" and html.is_file()
    result = json.loads((out / "t" / "report.json").read_text())
    schema = json.loads((app_dir / "attacks" / "audit_schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(result)
    assert [r["attack"] for r in result["rows"]] == ["recit", "memorize"]
    assert all(r["samples"] == 2 * 2 and r["epsilon"] is None for r in result["rows"])
    recit, memorize = (r["metrics"]["pii_exact"]["mean"] for r in result["rows"])
    assert recit == 1.0 > memorize  # every PII value of both clients' batches, verbatim
    captured = read_observations(out / "t" / "runs" / "lora-b2-nodp-identity" / "observations")
    assert sorted(c.partition for c in captured) == [0, 1]
    assert {c.round for c in captured} == {2} and {c.kind for c in captured} == {"dense"}
    [canary] = result["canary"]
    assert canary["num_canaries"] == 40 and canary["num_guesses"] == 10
    assert canary["num_correct"] == 10 and canary["epsilon_lower_bound"] > 0
    cfg, _ = split_overrides(["audit.clients=2"])
    text = (out / "t" / "report.json").read_text() + html.read_text()
    leaked = [v for r in victim_records(cfg, 2) for v in r.pii if v in text]
    assert not leaked  # PII is masked by default, in the JSON as in the HTML
