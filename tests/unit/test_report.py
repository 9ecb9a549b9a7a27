"""Run reports (plots embedded in one HTML file) and the --multirun sweep grid."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fedpeft import cli
from fedpeft.errors import ConfigError
from fedpeft.report import PLOTS, load_run, plot_lines, summary_row, write_report
from fedpeft.reporting import RunDir
from fedpeft.sweep import check_grid, expand_grid, point_label
from fedpeft.types import Exclusion, RoundRecord

PNG = b"\x89PNG\r\n\x1a\n"
ALL_PLOTS = {p.name for p in PLOTS}
NODES = ("101", "102", "103", "104")


class _Page(HTMLParser):
    """The parts of a report the tests look at: images, table cells, notes."""

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, str] = {}
        self.cells: list[str] = []
        self.notes: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "img":
            self.images[str(found["alt"])] = str(found["src"])
        self._in = "note" if found.get("class") == "note" else tag

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "td":
            self.cells.append(data)
        elif self._in == "note":
            self.notes.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    page.close()
    return page


def _record(rnd: int, *, dp: bool, robust: bool) -> RoundRecord:
    """A realistic round: 4 clients, LoRA-sized traffic, falling loss; optionally ε so
    far and one client dropped by Krum plus one refused by the decoder."""
    if rnd == 0:
        return RoundRecord(round=0, wall_time_s=1.1, eval_loss=2.9, eval_accuracy=0.53)
    excluded = [Exclusion(node="102", partition=1, round=rnd, by="krum",
                          reason="not among the 1 lowest Krum scores"),
                Exclusion(node="104", partition=3, round=rnd, by="decoder",
                          reason="non-finite update")] if robust else []
    return RoundRecord(
        round=rnd, wall_time_s=60.0 + rnd, train_loss=2.5 - 0.4 * rnd,
        eval_loss=2.6 - 0.5 * rnd, eval_accuracy=0.53 + 0.1 * rnd, num_clients=4,
        num_rejected=1 if robust else 0,
        bytes_up={n: 3_800_000 for n in NODES}, bytes_down={n: 3_300_000 for n in NODES},
        payload_bytes_up={n: 3_600_000 for n in NODES},
        payload_bytes_down={n: 3_200_000 for n in NODES},
        rejected={"104": "non-finite update"} if robust else {}, excluded=excluded,
        privacy={"mechanism": "dpsgd", "epsilon_rdp": 1.2 * rnd, "epsilon_prv": 1.0 * rnd,
                 "delta": 1e-5} if dp else {})


def _run(root: Path, run_id: str, overrides: list[str], *, dp: bool = False,
         robust: bool = False, rounds: int = 3, state: str = "completed") -> Path:
    run = RunDir.create(str(root), run_id, "x")
    run.write_json("config.json", {"overrides": [*overrides, f"run.output_dir={root}",
                                                 f"run.run_id={run_id}"], "config": {}})
    for rnd in range(rounds + 1):
        run.append(_record(rnd, dp=dp, robust=robust))
    run.set_status(state, **({"rounds": rounds} if state == "completed" else
                             {"error": "nothing trained in round 1"}))
    return run.path


@pytest.fixture
def dp_run(tmp_path: Path) -> Path:
    return _run(tmp_path, "dp", ["strategy=krum", "privacy=dpsgd"], dp=True, robust=True)


@pytest.fixture
def plain_run(tmp_path: Path) -> Path:
    return _run(tmp_path, "plain", ["strategy=fedavg", "privacy=none"])


def _check_embedded(html_path: Path, names: set[str]) -> _Page:
    """One <img> per produced plot, each a real PNG equal to the file beside the HTML."""
    page = _parse(html_path)
    assert set(page.images) == names
    assert {p.stem for p in html_path.parent.glob("*.png")} == names
    for name, src in page.images.items():
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        png = base64.b64decode(src[len(prefix):], validate=True)
        assert png.startswith(PNG) and len(png) > 1024
        assert png == (html_path.parent / f"{name}.png").read_bytes()
    return page


def test_one_run_report_embeds_every_plot_beside_the_run(dp_run: Path) -> None:
    html_path = write_report([dp_run])

    assert html_path == dp_run / "report" / "report.html"
    page = _check_embedded(html_path, ALL_PLOTS)
    assert page.notes == []
    assert "<script" not in html_path.read_text() and "http" not in html_path.read_text()


def test_plots_without_data_are_skipped_with_a_note(plain_run: Path) -> None:
    page = _check_embedded(write_report([plain_run]), ALL_PLOTS - {"privacy", "rejected"})

    assert len(page.notes) == 2
    assert any("privacy" in note.lower() and "skipped" in note for note in page.notes)
    assert any("no update was rejected or excluded" in note for note in page.notes)


def test_two_runs_overlay_with_labels_from_their_differing_overrides(
        dp_run: Path, plain_run: Path) -> None:
    html_path = write_report([dp_run, plain_run])

    assert html_path.parent.parent == dp_run.parent
    assert html_path.parent.name.startswith("compare-")
    page = _check_embedded(html_path, ALL_PLOTS)
    labels = ("strategy=krum privacy=dpsgd", "strategy=fedavg privacy=none")
    assert set(labels) <= set(page.cells) and {"dp", "plain"} <= set(page.cells)
    runs = [load_run(dp_run), load_run(plain_run)]
    runs = [type(r)(r.path, r.records, r.status, r.overrides, label) for r, label in
            zip(runs, labels, strict=True)]
    legend = {line.label for line in plot_lines(PLOTS[1], runs)}
    assert legend == set(labels)  # one curve per run: the legend is the run labels
    privacy = {line.label for line in plot_lines(PLOTS[-1], runs)}
    assert privacy == {f"{labels[0]}: ε (RDP)", f"{labels[0]}: ε (PRV)"}


def test_labels_fall_back_to_run_ids_when_overrides_do_not_tell_runs_apart(
        tmp_path: Path) -> None:
    first = _run(tmp_path, "first", ["strategy=fedavg"])
    second = _run(tmp_path, "second", ["strategy=fedavg"])

    page = _parse(write_report([first, second], out=tmp_path / "cmp", title="Two"))

    assert page.cells.count("first") == 2 and page.cells.count("second") == 2


def test_given_labels_name_the_runs_and_must_match_them(tmp_path: Path) -> None:
    first = _run(tmp_path, "first", ["strategy=fedavg"])
    second = _run(tmp_path, "second", ["strategy=fedavg"])

    page = _parse(write_report([first, second], out=tmp_path / "cmp", labels=["a 5%", "b"]))

    assert page.cells.count("a 5%") == 1 and page.cells.count("b") == 1  # beside run ids
    with pytest.raises(ConfigError, match="1 labels for 2 runs"):
        write_report([first, second], out=tmp_path / "cmp", labels=["a"])


def test_the_table_holds_each_runs_final_numbers(dp_run: Path, tmp_path: Path) -> None:
    row = summary_row(load_run(dp_run))
    failed = summary_row(load_run(_run(tmp_path, "f", [], rounds=0, state="failed")))

    assert row["status"] == "completed" and row["rounds"] == "3"
    assert row["final eval accuracy"] == "0.83" and row["final eval loss"] == "1.1"
    assert row["MB up"] == f"{3 * 4 * 3.8:.2f}" and row["MB down"] == f"{3 * 4 * 3.3:.2f}"
    assert row["final ε (RDP / PRV)"] == "3.6 / 3"
    assert row["rejected"] == "3" and row["excluded"] == "3"
    assert row["wall time"] == "3m 07s"
    assert failed["status"] == "failed" and failed["final ε (RDP / PRV)"] == "-"
    assert failed["MB up"] == "0.00"


def test_a_failed_run_is_reported_with_its_error(tmp_path: Path) -> None:
    path = _run(tmp_path, "bad", [], rounds=0, state="failed")

    text = write_report([path]).read_text()

    assert "nothing trained in round 1" in text


def test_report_command_prints_the_html_path(dp_run: Path, capsys: pytest.CaptureFixture,
                                             tmp_path: Path) -> None:
    assert cli.main(["report", str(dp_run), "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r" / "report.html")

    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_a_plotting_failure_is_only_a_warning(dp_run: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    def broken(*_args: object) -> Path:
        raise RuntimeError("no fonts")

    monkeypatch.setattr("fedpeft.report.write_report", broken)

    cli._report_run(RunDir(dp_run), {"state": "failed"})

    assert "warning: could not write the report of dp: RuntimeError: no fonts" in (
        capsys.readouterr().err)


def test_interrupted_runs_are_not_plotted(dp_run: Path) -> None:
    cli._report_run(RunDir(dp_run), {"state": "interrupted"})

    assert not (dp_run / "report").exists()


# ---------------------------------------------------------------- sweep grid


def test_grid_is_the_cartesian_product_in_order() -> None:
    grid = expand_grid(["a=1,2", "method=lora", "b=x,y"])

    assert grid == [["a=1", "method=lora", "b=x"], ["a=1", "method=lora", "b=y"],
                    ["a=2", "method=lora", "b=x"], ["a=2", "method=lora", "b=y"]]
    assert point_label(grid, grid[1]) == "a=1 b=y"


def test_grid_keeps_quoting_and_expands_choice_and_range() -> None:
    from fedpeft.config import compose

    regex = "method.trainable='layers\\.2[4-9]\\.mlp'"
    grid = expand_grid(["run.run_id='a,b',c", "run.num_rounds=range(1,3)", regex])

    assert [p[0] for p in grid[::2]] == ["run.run_id='a,b'", "run.run_id=c"]
    assert [p[1] for p in grid[:2]] == ["run.num_rounds=1", "run.num_rounds=2"]
    assert all(p[2] == regex for p in grid)
    assert expand_grid(["strategy=choice(fedavg,krum)"]) == [["strategy=fedavg"],
                                                            ["strategy=krum"]]
    cfg = compose(["model=tiny-llama", "method=fedkseed", "strategy=fedkseed", *grid[0]])
    assert cfg.run.run_id == "a,b" and cfg.method.trainable == r"layers\.2[4-9]\.mlp"


@pytest.mark.parametrize(("bad", "says"), [
    ("method.lr=1e-4,,3e-4", "cannot parse the override 'method.lr=1e-4,,3e-4'"),
    ("method.lr=[1,2", "cannot parse the override 'method.lr=[1,2'"),
    ("method.lr=interval(0,1)", "override 'method.lr=interval(0,1)': --multirun runs"),
    ("strategy=glob(fed*)", "override 'strategy=glob(fed*)': --multirun runs"),
    ("run.num_rounds=range(3,1)", "'run.num_rounds=range(3,1)' sweeps over no values"),
])
def test_malformed_sweeps_name_the_override(bad: str, says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        expand_grid(["strategy=fedavg", bad])


def test_every_point_is_checked_before_any_runs() -> None:
    grid = expand_grid(["model=tiny-llama", "sim.num_clients=2", "strategy=fedavg,fedmedain"])

    with pytest.raises(ConfigError, match=r"sweep point 1 \(.*=fedmedain\).*'strategy/fedmedain'"):
        check_grid(grid)


def test_without_multirun_a_comma_value_is_still_hydras_error(
        capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["simulate", "run.num_rounds=1,2"]) == 2
    assert "Ambiguous value" in capsys.readouterr().err


def test_multirun_runs_each_point_and_reports_even_when_one_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    seen: list[list[str]] = []

    def fake_simulate(overrides: list[str], app: Path) -> int:
        seen.append(overrides)
        run_id = overrides[-1].split("=", 1)[1]
        failed = "strategy=krum" in overrides
        _run(tmp_path, run_id, overrides[:-1], robust=failed,
             state="failed" if failed else "completed")
        return 1 if failed else 0

    monkeypatch.setattr(cli, "simulate", fake_simulate)
    code = cli.main(["simulate", "--multirun", "model=tiny-llama", "sim.num_clients=5",
                     f"run.output_dir={tmp_path}", "run.run_id=sw", "strategy=fedavg,krum"])

    assert code == 1
    assert [o[-1] for o in seen] == ["run.run_id=sw-0", "run.run_id=sw-1"]
    out, err = capsys.readouterr()
    assert "1 of 2 runs did not complete: sw-1" in err
    html_path = tmp_path / "sw-report" / "report.html"
    assert f"sweep report in {html_path}" in out
    cells = _parse(html_path).cells
    assert {"sw-0", "sw-1", "strategy=fedavg", "strategy=krum"} <= set(cells)
