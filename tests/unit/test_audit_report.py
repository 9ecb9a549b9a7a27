"""Privacy audit report: schema validation, PII masking, plots, canary flags, valid HTML."""

from __future__ import annotations

import base64
import copy
import html
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from attacks.report import BUG, audit_schema, mask_example, write_audit_report
from fedpeft.errors import ConfigError

PNG = b"\x89PNG\r\n\x1a\n"
PLOTS = ("recovery_vs_epsilon", "metrics_by_batch", "canary_epsilon")
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}
PII = {
    "name": "Jane Doe", "email": "jane.doe@example.com", "phone": "+1-555-0142",
    "other": "Marek Nowak", "iban": "PL61 1090 1014 0000",
}


class _Page(HTMLParser):
    """Checks that every non-void tag is closed, in order; collects table rows and images."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.rows: list[tuple[str, list[str]]] = []
        self.images: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "img":
            self.images[str(found["alt"])] = str(found["src"])
        if tag == "tr":
            self.rows.append((found.get("class") or "", []))
        if tag == "td":
            self.rows[-1][1].append("")
        if tag not in VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        assert tag in VOID, f"<{tag}/> is not a void element"
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        assert tag not in VOID, f"void element <{tag}> has an end tag"
        assert self.open, f"</{tag}> closes nothing"
        assert self.open[-1] == tag, f"</{tag}> closes <{self.open[-1]}>"
        self.open.pop()

    def handle_data(self, data: str) -> None:
        if self.open and self.open[-1] == "td":
            cells = self.rows[-1][1]
            cells[-1] += data


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert page.open == [], f"unclosed tags: {page.open}"
    return page


def _interval(mean: float, half: float = 0.05, n: int = 64) -> dict[str, Any]:
    return {"mean": mean, "lo": max(0.0, mean - half), "hi": min(1.0, mean + half), "n": n}


def _row(method: str, batch: int, epsilon: float | None, attack: str) -> dict[str, Any]:
    """One audit row: recovery falls with the batch size, with DP, and for the weaker attack."""
    strength = ((0.9 if attack == "dager" else 0.6) * (1.0 if method == "lora" else 0.7)
                / batch * (0.1 if epsilon else 1.0))
    return {
        "method": method, "batch_size": batch, "local_steps": 1, "codec": "none",
        "privacy": ("dpsgd" if method == "lora" else "dpzo") if epsilon else "none",
        "noise_multiplier": 1.1 if epsilon else None, "epsilon": epsilon, "attack": attack,
        "samples": 64, "seconds": 12.5 * batch,
        "metrics": {"pii_exact": _interval(strength), "token_precision": _interval(strength),
                    "token_recall": _interval(strength * 0.9),
                    "rouge1": _interval(strength), "rouge2": _interval(strength * 0.7),
                    "rougeL": _interval(strength * 0.95)},
    }


def _result() -> dict[str, Any]:
    """2 methods x batch sizes 1, 4 x (no DP, ε about 3) x 2 attacks, examples, canaries."""
    rows = [_row(method, batch, eps, attack)
            for method in ("lora", "fedkseed") for batch in (1, 4)
            for eps in (None, 2.97 if batch == 1 else 3.04) for attack in ("dager", "lamp")]
    truth = f"Contact {PII['name']} at {PII['email']} or {PII['phone']}."
    return {
        "id": "audit-2025-06-01-a", "created": "2025-06-01T12:30:05.123456+00:00",
        "title": "Gradient inversion audit <SmolLM2 on synthetic PII>",
        "threat_model": "An honest-but-curious server sees every client update.\n\n"
                        "It knows the model and the tokenizer, not the client data.",
        "config": {"grid": {"method": ["lora", "fedkseed"], "batch_size": [1, 4]},
                   "data": {"faker_seed": 7}},
        "accountant": {"name": "rdp", "delta": 1e-5, "notes": "Poisson subsampling q=0.01"},
        "rows": rows,
        "examples": [
            {"row": 0, "truth": truth, "pii": [PII["name"], PII["email"], PII["phone"]],
             "reconstruction": f"contact {PII['name'].lower()} at {PII['email']} or call"},
            {"row": 1, "truth": f"{PII['other']} paid {PII['name']} from {PII['iban']}.",
             "reconstruction": f"{PII['other']} paid from account", "pii": [PII["other"],
                                                                             PII["iban"]]},
        ],
        "canary": [
            {"method": "lora", "privacy": "dpsgd", "epsilon": 2.97, "epsilon_lower_bound": 1.2,
             "num_canaries": 1000, "num_guesses": 100, "num_correct": 93,
             "tpr_at_0.1%_fpr": 0.02, "tpr_at_1%_fpr": 0.08},
            {"method": "fedkseed", "privacy": "dpzo", "epsilon": 2.97,
             "epsilon_lower_bound": 4.1, "num_canaries": 1000, "num_guesses": 100,
             "num_correct": 100, "tpr_at_0.1%_fpr": 0.3, "tpr_at_1%_fpr": 0.5},
            {"method": "lora", "privacy": "none", "epsilon": None, "epsilon_lower_bound": 6.5,
             "num_canaries": 1000, "num_guesses": 100, "num_correct": 100,
             "tpr_at_0.1%_fpr": 0.6, "tpr_at_1%_fpr": 0.9},
        ],
        "notes": ["ROUGE on tokens of the reconstructed text."],
    }


@pytest.fixture(scope="module")
def masked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_audit_report(_result(), tmp_path_factory.mktemp("masked"))


@pytest.fixture(scope="module")
def shown(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_audit_report(_result(), tmp_path_factory.mktemp("shown"), show_pii=True)


def test_report_is_wellformed_html_with_every_row_and_plot(masked: Path) -> None:
    page = _parse(masked)

    assert masked.name == "report.html"
    results = [cells for _, cells in page.rows if len(cells) == 16]
    assert len(results) == len(_result()["rows"]) == 16
    assert results[0][:9] == ["0", "lora", "1", "1", "none", "none", "-", "∞ (no DP)", "dager"]
    assert results[0][9] == "90.0% [85.0, 95.0]" and results[2][7] == "2.97"
    assert set(page.images) == set(PLOTS)
    text = masked.read_text(encoding="utf-8")
    assert html.escape("<SmolLM2 on synthetic PII>") in text and "<SmolLM2" not in text
    assert '"faker_seed": 7' in html.unescape(text)  # the config, pretty-printed


def test_plots_are_pngs_beside_the_html_and_embedded_in_it(masked: Path) -> None:
    page = _parse(masked)

    for name in PLOTS:
        png = (masked.parent / f"{name}.png").read_bytes()
        assert png.startswith(PNG) and len(png) > 1024
        src = page.images[name]
        assert base64.b64decode(src.split(",", 1)[1], validate=True) == png


def test_report_json_validates_against_the_schema(masked: Path) -> None:
    report = json.loads((masked.parent / "report.json").read_text(encoding="utf-8"))

    Draft202012Validator.check_schema(audit_schema())
    Draft202012Validator(audit_schema()).validate(report)
    assert report["schema_version"] == 1 and report["pii_masked"] is True
    assert report["rows"] == _result()["rows"]


def test_pii_is_masked_in_html_and_json_by_default(masked: Path) -> None:
    texts = [masked.read_text(encoding="utf-8"),
             (masked.parent / "report.json").read_text(encoding="utf-8")]

    for text in texts:
        for value in PII.values():
            assert value.lower() not in text.lower(), value
    first = json.loads(texts[1])["examples"][0]
    assert first["pii"] == ["[PII#1]", "[PII#2]", "[PII#3]"]
    assert first["truth"] == "Contact [PII#1] at [PII#2] or [PII#3]."
    assert first["reconstruction"] == "contact [PII#1] at [PII#2] or call"
    assert "PII masking is on" in texts[0]


def test_show_pii_keeps_the_values(shown: Path) -> None:
    text = shown.read_text(encoding="utf-8")
    report = json.loads((shown.parent / "report.json").read_text(encoding="utf-8"))

    for value in PII.values():
        assert html.escape(value) in text and value in json.dumps(report)
    assert report["pii_masked"] is False and "PII masking is off" in text


def test_masks_cover_long_values_whole_and_pii_of_other_examples() -> None:
    example = {"row": 0, "truth": "Jane Doe (Jane) met Marek", "reconstruction": "JANE DOE",
               "pii": ["Jane", "Jane Doe", "Jane"]}

    masked = mask_example(example, ["Marek"])

    assert masked["truth"] == "[PII#2] ([PII#1]) met [PII#3]"
    assert masked["reconstruction"] == "[PII#2]" and masked["pii"] == ["[PII#1]", "[PII#2]"]


def test_the_bug_flag_marks_exactly_the_canary_row_above_the_accountant(masked: Path) -> None:
    page = _parse(masked)

    canary = [(css, cells) for css, cells in page.rows if len(cells) == 10]
    assert [cells[0] for _, cells in canary] == ["lora", "fedkseed", "lora"]
    assert [cells[-1] for _, cells in canary] == ["ok", BUG, "n/a (no DP)"]
    assert [css for css, _ in canary] == ["", "bug", ""]
    assert masked.read_text(encoding="utf-8").count(html.escape(BUG)) == 1


def _invalid(change: Any) -> dict[str, Any]:
    result = copy.deepcopy(_result())
    change(result)
    return result


@pytest.mark.parametrize(("change", "where", "what"), [
    (lambda r: r["rows"][3].pop("attack"), "rows/3", "'attack' is a required property"),
    (lambda r: r.update(bogus=1), "(top level)", "'bogus' was unexpected"),
    (lambda r: r["rows"][0]["metrics"].update(bleu=r["rows"][0]["metrics"]["rouge1"]),
     "rows/0/metrics", "'bleu'"),
    (lambda r: r["canary"][1].update(epsilon="3"), "canary/1/epsilon", "not of type"),
    (lambda r: r["examples"][0].update(row=16), "examples/0/row", "not an index into rows"),
])
def test_an_invalid_result_names_the_failing_path(tmp_path: Path, change: Any, where: str,
                                                  what: str) -> None:
    with pytest.raises(ConfigError) as failure:
        write_audit_report(_invalid(change), tmp_path / "out")

    assert f"at {where}:" in str(failure.value) and what in str(failure.value)
    assert not (tmp_path / "out").exists()
