"""`finercut report`: one self-contained HTML page per run or compare folder; rendered in headless Chromium."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from finercut.candidates import Unit
from finercut.cli import main
from finercut.study.report import is_bound, step_points, step_rows, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class PageParser(HTMLParser):
    """Collects image sources, links, tables (id -> rows of cell texts) and headings of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.headings: list[str] = []
        self._table = self._row = self._cell = self._heading = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag in ("a", "link", "script"):
            self.links.append(attrs.get("href") or attrs.get("src") or "")
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", f"table{len(self.tables)}"), [])
        if tag == "tr" and self._table is not None:
            self._row = []
        if tag in ("td", "th") and self._row is not None:
            self._cell = ""
        if tag == "h2":
            self._heading = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        if tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        if tag == "table":
            self._table = None
        if tag == "h2":
            self.headings.append(self._heading)
            self._heading = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._heading is not None:
            self._heading += data


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def assert_self_contained(page: PageParser) -> None:
    assert page.images, "the page has figures"
    for source in page.images:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1])[:8] == PNG_SIGNATURE
    assert page.links == [], "nothing is fetched: no links, scripts or style sheets"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, word_text) -> Path:
    output = tmp_path_factory.mktemp("report") / "run"
    args = ["prune", "--model", str(tiny_model_dir), "--calibration", str(word_text), "--samples", "3", "--seq-len",
            "12", "--threads", "1", "--no-progress", "--no-save-model", "--count", "4", "--output", str(output)]
    assert main(args) == 0
    return output


# ---------------------------------------------------------------------------------------------------------------------
# Steps and bounds


def synthetic_steps() -> list[dict]:
    return [
        {"step": 0, "removed": {"block": 3, "kind": "attention"}, "distance": 0.1, "candidates": [
            {"block": 3, "kind": "attention", "distance": 0.1},
            {"block": 3, "kind": "ffn", "distance": None, "lower_bound": 0.4, "samples": 1},  # aborted
            {"block": 2, "kind": "ffn", "distance": 0.3}]},
        {"step": 1, "removed": {"block": 2, "kind": "ffn"}, "distance": 0.2, "samples_evaluated": 7, "candidates": [
            {"block": 2, "kind": "ffn", "distance": 0.2},
            {"block": 3, "kind": "ffn", "distance": None}]},
    ]


def test_step_points_mark_bounds_and_the_chosen_candidate():
    points = step_points(synthetic_steps())
    assert [(p["step"], p["block"], p["kind"], p["bound"], p["chosen"]) for p in points] == [
        (1, 3, "attention", False, True), (1, 3, "ffn", True, False), (1, 2, "ffn", False, False),
        (2, 2, "ffn", False, True),  # a candidate without a distance is left out
    ]
    assert points[1]["samples"] == 1 and points[0]["samples"] is None


def test_records_without_bound_fields_hold_exact_distances_only():
    assert not is_bound({"block": 1, "kind": "ffn", "distance": 0.5})
    assert not is_bound({"block": 1, "kind": "ffn", "distance": None})  # random removal: no score at all
    assert is_bound({"block": 1, "kind": "ffn", "distance": None, "lower_bound": 0.2, "samples": 3})
    assert is_bound({"block": 1, "kind": "ffn", "distance": 0.5, "bound": True})
    assert is_bound({"block": 1, "kind": "ffn", "distance": 0.5, "aborted": True})
    assert step_rows(synthetic_steps()) == [["1", "3.attn", "0.1", "3", "1", "–"], ["2", "2.ffn", "0.2", "2", "0", "7"]]


# ---------------------------------------------------------------------------------------------------------------------
# Pages


def test_run_page_is_self_contained_with_layer_map_distances_and_steps(run_dir, tmp_path):
    out = write_report(run_dir, tmp_path / "run.html")
    page = parse(out)
    assert_self_contained(page)
    assert len(page.images) == 2  # layer map, distances per step (no cost trajectory in a count-target run)
    assert page.headings == ["Summary", "Layer map", "Distances per step", "What was gained", "Cost trajectory",
                             "Steps"]
    gains = page.tables["gains"]
    assert gains[0] == ["", "before", "after", "after / before"] and gains[1][0] == "parameters"
    recorded = json.loads((run_dir / "record.json").read_text())["gains"]
    assert gains[1][3] == f"{recorded['params']['after'] / recorded['params']['before']:.1%}"
    assert gains[3][1] == f"{recorded['kv_cache']['before'] / 1024:.1f} KiB"
    steps = page.tables["steps"]
    record = json.loads((run_dir / "record.json").read_text())
    assert steps[0] == ["step", "removed", "distance", "candidates", "lower bounds", "samples scored"]
    assert len(steps) == 1 + 4
    assert steps[1][1] == str(Unit.from_dict(record["steps"][0]["removed"]))
    assert "no cost trajectory" in out.read_text()
    # the search's own count of aborted candidates (0 in records written before it aborted any)
    aborted = [step.get("aborted", 0) for step in record["steps"]]
    assert [row[4] for row in steps[1:]] == [str(n) for n in aborted]
    assert f"{sum(aborted)} candidate scores are lower bounds" in out.read_text()


def test_run_page_shows_aborted_candidates_as_bounds_and_a_cost_trajectory(run_dir, tmp_path):
    record = json.loads((run_dir / "record.json").read_text())
    marked = copy.deepcopy(record)
    marks = []
    for step in marked["steps"]:  # the first two scored candidates that were not removed were cut short
        others = [c for c in step["candidates"] if Unit.from_dict(c) != Unit.from_dict(step["removed"])
                  and c["distance"] is not None][:2]
        for candidate in others:  # as the search records an aborted candidate
            candidate.update(distance=None, lower_bound=candidate["distance"] / 2, samples=1)
        marks.append(sum(c["distance"] is None and c.get("lower_bound") is not None for c in step["candidates"]))
    marked["cost_trajectory"] = [{"params": 1 - 0.1 * i, "kv_cache": 1 - 0.05 * i} for i in range(1, 5)]
    (tmp_path / "record.json").write_text(json.dumps(marked))
    out = write_report(tmp_path / "record.json", tmp_path / "bounds.html")
    page = parse(out)
    assert_self_contained(page)
    assert len(page.images) == 3
    assert [row[4] for row in page.tables["steps"][1:]] == [str(n) for n in marks]
    assert f"{sum(marks)} candidate scores are lower bounds" in out.read_text() and sum(marks) > 0


def compare_folder(tmp_path: Path, run_dir: Path) -> Path:
    """A compare folder as `finercut compare` leaves it, with hand-set evaluation results."""
    from finercut.study.compare import CompareConfig, Variant, result_key
    from finercut.record import read_record, removal_summary

    config = CompareConfig(model="tiny", methods=("finercut",), ratios=(0.0, 0.25, 0.5), tasks=("arc_easy",),
                           limit=2)
    folder = tmp_path / "compare"
    (folder / "runs").mkdir(parents=True)
    (folder / "results").mkdir()
    (folder / "compare.json").write_text(json.dumps(dataclasses.asdict(config)))
    shutil.copytree(run_dir, folder / "runs" / "finercut")
    units = tuple(read_record(run_dir).removed)
    for ratio, removed, accuracy, ppl in ((0.0, (), 0.5, 20.0), (0.25, units[:2], 0.45, 31.5)):
        variant = Variant("finercut" if removed else "dense", ratio, removed,
                          removal_summary(removed, num_blocks=4, granularity="sublayer"))
        result = {"stages": {"tasks": {"scores": {"arc_easy": {"acc": accuracy, "acc_norm": accuracy}},
                                       "average": accuracy},
                             "windowed_perplexity": {"ppl": ppl}, "lm_eval_wikitext": {"word_perplexity": 2 * ppl}}}
        (folder / "results" / f"{result_key(variant, config.evaluation_settings())}.json").write_text(
            json.dumps(result))
    return folder


def test_compare_page_has_the_results_table_and_figures(run_dir, tmp_path):
    out = write_report(compare_folder(tmp_path, run_dir), tmp_path / "compare.html")
    page = parse(out)
    assert_self_contained(page)
    results = page.tables["results"]
    assert results[0] == ["method", "target", "reached", "sub-layers", "params removed", "ARC-e", "average",
                          "ppl (a)", "word ppl (b)"]
    assert results[1] == ["Dense", "0%", "0.0%", "0", "–", "50.0", "50.0", "20.00", "40.00"]
    assert results[2] == ["FinerCut", "25%", "25.0%", "2", "–", "45.0", "45.0", "31.50", "63.00"]
    assert results[3][:4] == ["FinerCut", "50%", "50.0%", "4"] and results[3][4:] == ["–"] * 5  # not evaluated yet
    assert "1 of 3 variants have no saved evaluation yet" in out.read_text()
    assert len(page.images) == 2 + 2  # accuracy, perplexity; the FinerCut run's layer map and distances
    assert "FinerCut run: Steps" in page.headings


def test_cli_report_and_its_errors(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir), "--html", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").is_file()
    assert main(["report", str(tmp_path), "--html", str(tmp_path / "x.html")]) == 2
    assert "neither a run" in capsys.readouterr().err
    assert main(["report", str(run_dir), "--html", str(tmp_path / "missing" / "x.html")]) == 2


# ---------------------------------------------------------------------------------------------------------------------
# Rendered in a browser


def chromium() -> str | None:
    return next((path for path in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if path), None)


def headless(binary: str, *args: str) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        return subprocess.run(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": profile})
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def test_page_renders_in_headless_chromium_with_its_table(run_dir, tmp_path):
    import numpy as np
    from PIL import Image

    binary = chromium()
    if binary is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    out = write_report(compare_folder(tmp_path, run_dir), tmp_path / "compare.html")
    shot = tmp_path / "shot.png"
    rendered = headless(binary, f"--screenshot={shot}", "--window-size=1200,1600", out.as_uri())
    assert shot.is_file(), rendered.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (1600, 1200)
    assert pixels.std() > 10, "the screenshot is blank"
    assert (pixels < 128).mean() > 0.005, "too little dark ink for a page of text, table and figures"
    dom = headless(binary, "--dump-dom", out.as_uri()).stdout
    assert '<table id="results">' in dom and "FinerCut" in dom and "31.50" in dom
    assert dom.count("<img") == 4


def test_compare_page_table_equals_the_markdown_report_of_a_real_compare_run(tmp_path, tiny_model_dir, word_text,
                                                                             data_dir, one_thread):
    """The page finds the variants and results `finercut compare` wrote, as its own Markdown table shows them."""
    from finercut.study.compare import CompareConfig, run_compare

    config = CompareConfig(
        model=str(tiny_model_dir), methods=("finercut", "deeper_layers"), ratios=(0.0, 0.25), data_dir=str(data_dir),
        calibration=str(word_text), num_samples=3, seq_len=12, threads=1, tasks=("arc_easy",), limit=2,
        mmlu_limit_per_subject=None, ppl_window=32, ppl_max_windows=1, lm_eval_wikitext_docs=1, eval_batch_size=2,
        stats_context=16, prompts=("w1 w2",))
    markdown = run_compare(config, tmp_path / "compare", report=tmp_path / "results.md", log=lambda m: None,
                           progress=False).read_text().splitlines()
    header = next(i for i, line in enumerate(markdown) if line.startswith("| method |"))
    expected = [[cell.split(" ± ")[0].strip() for cell in line.strip("|").split("|")]
                for line in markdown[header + 2: markdown.index("", header)]]
    page = parse(write_report(tmp_path / "compare", tmp_path / "compare.html"))
    assert page.tables["results"][1:] == expected and len(expected) == 3
