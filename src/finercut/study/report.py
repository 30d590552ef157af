"""``finercut report``: one self-contained HTML page of a run or a compare folder, figures inlined as PNG.

A run page shows what was removed (the layer map), how far each step's candidates moved the output (the distance
of every candidate per step; a candidate whose scoring was cut short holds only a lower bound and is drawn as
one), the cost trajectory when the record has one, and the list of steps. A compare page adds the results table
and the accuracy and perplexity curves of every method. Nothing is fetched when the page is opened.
"""

from __future__ import annotations

import base64
import html
import io
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from finercut.candidates import Unit  # noqa: E402
from finercut.errors import MissingFileError  # noqa: E402
from finercut.jsonio import read_json  # noqa: E402
from finercut.plots import (  # noqa: E402
    ATTENTION_COLOR, FFN_COLOR, plot_layer_map, plot_metric_vs_ratio, plot_search_progress,
)
from finercut.record import Record, read_record  # noqa: E402
from finercut.study.table import compare_series, results_table  # noqa: E402

KIND_COLORS = {"attention": ATTENTION_COLOR, "ffn": FFN_COLOR, "block": "#7570b3"}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; background: #fff; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; } th { background: #f0f0f0; }
td.text, th.text { text-align: left; } img { max-width: 100%; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; } .figures img { max-width: 48%; }
.note { color: #666; font-size: 0.85em; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; } dt { font-weight: 600; }
"""


# ---------------------------------------------------------------------------------------------------------------------
# Reading steps and candidates (records with and without lower bounds)


def is_bound(candidate: dict[str, Any]) -> bool:
    """Whether a candidate holds only a lower bound of its distance (its scoring was aborted early).

    The search records such a candidate as ``"distance": null`` with ``"lower_bound"`` (and ``"samples"``, the
    calibration samples it saw); ``"bound": true`` or ``"aborted": true`` next to a distance mean the same.
    Records without these fields hold exact distances only.
    """
    if candidate.get("distance") is None:
        return candidate.get("lower_bound") is not None
    return bool(candidate.get("bound") or candidate.get("aborted"))


def candidate_value(candidate: dict[str, Any]) -> float | None:
    """The candidate's distance, or its lower bound if it was aborted; None if it has neither (random removal)."""
    distance = candidate.get("distance")
    return distance if distance is not None else candidate.get("lower_bound")


def step_points(steps: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per (step, candidate): 1-based step, kind, value (distance or lower bound), whether it is a bound,
    whether it was chosen. Candidates with neither a distance nor a bound (random removal) are left out."""
    points = []
    for number, step in enumerate(steps, start=1):
        chosen = Unit.from_dict(step["removed"])
        for candidate in step.get("candidates", []):
            value = candidate_value(candidate)
            if value is None:
                continue
            unit = Unit.from_dict(candidate)
            points.append({"step": number, "kind": unit.kind, "block": unit.block, "distance": value,
                           "bound": is_bound(candidate), "samples": candidate.get("samples"),
                           "chosen": unit == chosen})
    return points


STEP_COLUMNS = ["step", "removed", "distance", "candidates", "lower bounds", "samples scored"]


def step_rows(steps: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The steps table (:data:`STEP_COLUMNS`): step, removed unit, its distance, candidates scored, how many of
    them hold only a lower bound, and the calibration samples scored over all candidates ('–' if not recorded),
    with those only bounded from a vocabulary subset ("+ N bounded") where there are any."""
    rows = []
    for number, step in enumerate(steps, start=1):
        candidates = step.get("candidates", [])
        distance, samples = step.get("distance"), step.get("samples_evaluated")
        bounded = sum(c.get("subset_samples") or 0 for c in candidates)
        scored = "–" if samples is None else str(samples) + (f" + {bounded} bounded" if bounded else "")
        rows.append([str(number), str(Unit.from_dict(step["removed"])),
                     "–" if distance is None else f"{distance:.6g}", str(len(candidates)),
                     str(sum(is_bound(c) for c in candidates)), scored])
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Figures


def png_data_uri(fig) -> str:
    """A matplotlib figure as an inline ``data:image/png;base64,...`` URI (the figure is closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def file_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def step_distance_figure(steps: Sequence[dict[str, Any]], *, log_y: bool = True) -> str | None:
    """Every candidate's distance at every step (x: step), the chosen one outlined; bounds drawn as ``^``."""
    points = step_points(steps)
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for kind, color in KIND_COLORS.items():
        for bound, marker, label in ((False, "o", kind), (True, "^", f"{kind} (lower bound, aborted)")):
            chosen = [p for p in points if p["kind"] == kind and p["bound"] == bound]
            if chosen:
                ax.scatter([p["step"] for p in chosen], [p["distance"] for p in chosen], s=14, marker=marker,
                           facecolors="none" if bound else color, edgecolors=color, alpha=0.7, label=label)
    picked = [p for p in points if p["chosen"]]
    ax.plot([p["step"] for p in picked], [p["distance"] for p in picked], color="black", linewidth=1,
            marker="s", markersize=4, label="removed")
    positive = all(p["distance"] > 0 for p in points)
    if log_y and positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("distance to the original model")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    return png_data_uri(fig)


def cost_trajectory(record: Record) -> list[dict[str, Any]] | None:
    """The record's cost per step (``cost_trajectory``: one dict of fractions per step), if it has one."""
    trajectory = record.cost_trajectory or record.extras.get("costs")
    return trajectory if isinstance(trajectory, list) and trajectory else None


def cost_figure(trajectory: Sequence[dict[str, Any]]) -> str:
    """One line per cost (fraction of the dense model) against the step."""
    keys = sorted({k for row in trajectory for k, v in row.items() if isinstance(v, (int, float)) and k != "step"})
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for key in keys:
        ax.plot(range(1, len(trajectory) + 1), [row.get(key) for row in trajectory], marker=".", label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of the dense model")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return png_data_uri(fig)


def drawn_png_uri(draw: Callable[[Path], Any]) -> str:
    """The PNG that ``draw(path)`` saves, as an inline data URI (drawn in a temporary folder)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "figure.png"
        draw(path)
        return file_data_uri(path)


def layer_map_uri(record: Record, folder: Path | None, *, title: str) -> str:
    """The run's layer map: its own ``layer_map.png`` if there is one made for these removals, else drawn from
    the record."""
    saved = folder / "layer_map.png" if folder is not None else None
    if saved is not None and saved.is_file() and (not record.outputs or "layer_map.png" in record.outputs):
        return file_data_uri(saved)
    return drawn_png_uri(lambda path: plot_layer_map(record.removed, record.num_blocks, path, title=title))


def search_series(record: Record, label: str) -> dict[str, list[tuple[float, float]]]:
    """A search record's objective after each improvement, as ``(evaluations, objective)`` points, extended to
    the evaluations spent (the line runs on to where the search stopped); nothing for other records."""
    search = record.search
    if not search or not search.get("improvements"):
        return {}
    points = [(float(p["evaluations"]), float(p["objective"])) for p in search["improvements"]]
    if search.get("evaluations", 0) > points[-1][0]:
        points.append((float(search["evaluations"]), float(search["objective"])))
    return {label: points}


def search_figure_uri(series: dict[str, list[tuple[float, float]]], *, title: str) -> str:
    return drawn_png_uri(lambda path: plot_search_progress(series, path, title=title))


def metric_figure_uri(series: dict[str, list[tuple[float, float]]], *, ylabel: str, title: str,
                      log_y: bool = False) -> str:
    return drawn_png_uri(lambda path: plot_metric_vs_ratio(series, path, ylabel=ylabel, title=title, log_y=log_y))


# ---------------------------------------------------------------------------------------------------------------------
# HTML pieces


def table(header: Sequence[str], rows: Iterable[Sequence[str]], *, text_columns: int = 1, table_id: str = "") -> str:
    """An HTML table; the first ``text_columns`` columns are left-aligned text, the rest numbers."""
    def cell(tag: str, index: int, value: str) -> str:
        cls = ' class="text"' if index < text_columns else ""
        return f"<{tag}{cls}>{html.escape(str(value))}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def page(title: str, sections: Sequence[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>" + "".join(sections) + "</body></html>\n")


def facts(items: Sequence[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items) + "</dl>"


# ---------------------------------------------------------------------------------------------------------------------
# A run


def run_sections(record: Record, folder: Path | None, *, heading: str = "") -> list[str]:
    """The sections of one run: summary, layer map, step distances, cost trajectory, steps table."""
    reached = record.reached
    model = record.model
    prefix = f"{heading}: " if heading else ""
    steps = [step.to_dict() for step in record.steps]
    sections = [
        f"<h2>{html.escape(prefix)}Summary</h2>",
        facts([
            ("model", f"{model.get('id')} ({model.get('architecture')}, {record.num_blocks} blocks)"),
            ("method", f"{record.method}" + (f", metric {record.metric}" if record.metric else "")
             + f", granularity {record.granularity}"),
            ("removed", f"{reached['count']} units = {reached['sublayers']} sub-layers ({reached['attention']} "
                        f"attention, {reached['ffn']} FFN; {reached['whole_blocks']} whole blocks); "
                        f"sub-layer ratio {reached['sublayer_ratio']:.1%}"),
            ("calibration", str(record.calibration.get("description", "–"))),
        ]),
        f"<h2>{html.escape(prefix)}Layer map</h2>",
        image(layer_map_uri(record, folder, title=record.title()), "layer map"),
    ]
    distances = step_distance_figure(steps)
    bounds = sum(p["bound"] for p in step_points(steps))
    sections.append(f"<h2>{html.escape(prefix)}Distances per step</h2>")
    if distances:
        sections.append(image(distances, "candidate distances per step"))
        sections.append(f'<p class="note">Each point is one candidate scored at that step; the black line is the '
                        f"candidate removed. {bounds} candidate scores are lower bounds (scoring stopped once the "
                        "candidate could no longer be the least), drawn as open triangles.</p>")
    elif record.search:
        sections.append('<p class="note">A search over whole removal sets: its steps are the units of its answer, '
                        "with no candidates of their own; how the answer improved is under Search.</p>")
    else:
        sections.append('<p class="note">This method scores no candidates (random removal).</p>')
    series = search_series(record, record.method)
    if series:
        search = record.search
        sections.append(f"<h2>{html.escape(prefix)}Search</h2>")
        sections.append(image(search_figure_uri(series, title=record.title()), "objective vs evaluations"))
        greedy = search.get("greedy_objective")
        sections.append(
            f'<p class="note">{html.escape(str(search.get("kind")))}: objective {search["objective"]:.6g} (the '
            "distance of the removed set)" + (f", greedy's {greedy:.6g}" if greedy else "")
            + f", after {search['evaluations']} set evaluations in {search.get('seconds', 0.0):.1f} s. Each point "
            "is the objective after an improvement.</p>")
    gains = record.extras.get("gains")
    if gains:
        sections.append(f"<h2>{html.escape(prefix)}What was gained</h2>")
        sections.append(table(*gains_table(gains), table_id="gains"))
    trajectory = cost_trajectory(record)
    sections.append(f"<h2>{html.escape(prefix)}Cost trajectory</h2>")
    sections.append(image(cost_figure(trajectory), "cost trajectory") if trajectory else
                    '<p class="note">The record holds no cost trajectory (a run with a sub-layer count target).</p>')
    sections.append(f"<h2>{html.escape(prefix)}Steps</h2>")
    sections.append(table(STEP_COLUMNS, step_rows(steps), text_columns=2, table_id="steps"))
    return sections


def gains_table(gains: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The paper's Table 3 for one run: parameters, MACs, KV cache per token and measured latency, before and
    after, and the share kept."""
    def row(label: str, entry: dict, text) -> list[str]:
        share = f"{entry['after'] / entry['before']:.1%}" if entry["before"] else "–"
        return [label, text(entry["before"]), text(entry["after"]), share]

    latency = gains["latency"]
    shape = "x".join(str(n) for n in latency["input_shape"])
    rows = [
        row("parameters", gains["params"], lambda v: f"{v / 1e6:.1f} M"),
        row(f"MACs @ {gains['context_length']} tokens", gains["macs"], lambda v: f"{v / 1e9:.2f} G"),
        row("KV cache per token", gains["kv_cache"], lambda v: f"{v / 1024:.1f} KiB"),
        row(f"forward latency ({shape} tokens, {latency['device']}, {latency['threads']} threads, median of "
            f"{latency['repeats']} side by side)", latency, lambda v: f"{v * 1e3:.1f} ms"),
    ]
    return ["", "before", "after", "after / before"], rows


def run_page(folder_or_record: Path) -> str:
    path = Path(folder_or_record)
    folder = path if path.is_dir() else None
    record = read_record(path)
    return page(f"finercut run: {record.model.get('id')}", run_sections(record, folder))


# ---------------------------------------------------------------------------------------------------------------------
# A compare folder


def compare_variants(folder: Path) -> tuple[Any, list[Any], list[dict[str, Any] | None]]:
    """The compare folder's config, its variants (as ``finercut compare`` forms them, read only) and each one's
    saved evaluation (None where it was not run yet)."""
    from finercut.study.compare import CompareConfig, list_variants, result_key, run_folders, split_method

    config = CompareConfig.from_dict(read_json(folder / "compare.json", expect=dict, what="compare settings"))
    records: dict[str, dict[float, Record]] = {}
    for spec in config.methods:
        runs = run_folders(folder, split_method(spec, ())[0], config.method_ratios(spec))
        records[spec] = {r: read_record(run) for r, run in runs if (run / "record.json").is_file()}
    variants = list_variants(config, records)
    settings = config.evaluation_settings()
    results = []
    for variant in variants:
        recovery = config.recovery_settings(variant.recovery) if variant.recovery else None
        path = folder / "results" / f"{result_key(variant, settings, recovery)}.json"
        results.append(read_json(path, expect=dict, what="evaluation result") if path.is_file() else None)
    return config, variants, results


def compare_searches(folder: Path, config: Any) -> dict[str, list[tuple[float, float]]]:
    """Every search run of a compare folder (beam, swap, EvoPress, at each ratio), for one figure."""
    from finercut.study.compare import entry_named, run_folders, split_method

    series: dict[str, list[tuple[float, float]]] = {}
    for spec in config.methods:
        name = split_method(spec, ())[0]
        _, entry = entry_named(name)
        for ratio, run in run_folders(folder, name, config.method_ratios(spec)):
            if (run / "record.json").is_file():
                series.update(search_series(read_record(run), f"{entry.label}, r={ratio:g}"))
    return series


def compare_page(folder: Path) -> str:
    from finercut.study.compare import entry_named

    config, variants, results = compare_variants(folder)
    missing = sum(r is None for r in results)
    sections = [
        "<h2>Results</h2>",
        results_table(variants, results, config.tasks).html(table_id="results"),
        '<p class="note">Accuracy (%) is acc_norm where lm-eval reports it, else acc; ppl (a) is WikiText-2 '
        "windowed perplexity, (b) lm-eval's word perplexity. The ratio reached counts removed sub-layers / 2L."
        + (f" {missing} of {len(results)} variants have no saved evaluation yet (–)." if missing else "") + "</p>",
    ]
    figures = []
    accuracy, perplexity = compare_series(variants, results)
    if accuracy:
        figures.append(image(metric_figure_uri(accuracy, ylabel="average accuracy (%)",
                                               title="Average zero/few-shot accuracy"), "accuracy"))
    if perplexity:
        figures.append(image(metric_figure_uri(perplexity, ylabel="WikiText-2 perplexity (log)",
                                               title="WikiText-2 perplexity", log_y=True), "perplexity"))
    searches = compare_searches(folder, config)
    if searches:
        figures.append(image(search_figure_uri(searches, title="Searches: objective vs evaluations"), "searches"))
    if figures:
        sections.append('<div class="figures">' + "".join(figures) + "</div>")
    for spec in config.methods:
        name = spec.partition("@")[0]
        _, entry = entry_named(name)
        run = folder / "runs" / name
        if entry.primary and (run / "record.json").is_file():
            sections += run_sections(read_record(run), run, heading=f"{entry.label} run")
    return page(f"finercut compare: {config.model or 'default model'}", sections)


def write_report(path: str | Path, html_path: str | Path) -> Path:
    """Write the page of a run folder (or record.json) or a compare folder to ``html_path``.

    Raises:
        MissingFileError: ``path`` holds neither a record nor a compare.json, or the page's folder is missing.
    """
    path = Path(path).expanduser()
    if path.is_dir() and (path / "compare.json").is_file():
        text = compare_page(path)
    elif (path.is_dir() and (path / "record.json").is_file()) or (path.is_file() and path.suffix == ".json"):
        text = run_page(path)
    else:
        raise MissingFileError(f"{path} holds neither a run (record.json) nor a compare folder (compare.json)")
    out = Path(html_path).expanduser()
    if not out.parent.is_dir():
        raise MissingFileError(f"--html {out}: its folder does not exist")
    out.write_text(text, encoding="utf-8")
    return out


__all__ = ["is_bound", "step_points", "write_report"]
