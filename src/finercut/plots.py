"""Figures: the layer map of removed sub-layers (paper Fig. 4), the per-step candidate scores, and metric-vs-ratio
curves (Figs. 2 and 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from finercut.candidates import Unit  # noqa: E402
from finercut.pruned_modeling import ATTENTION, FFN  # noqa: E402

ATTENTION_COLOR = "#d95f02"
FFN_COLOR = "#1b9e77"
KEPT_COLOR = "#e8e8e8"


def layer_map_grid(removed: Sequence[Unit], num_blocks: int) -> dict[str, list[int | None]]:
    """Per row (attention, FFN), per block: the 1-based removal step of that sub-layer, or None if kept."""
    grid: dict[str, list[int | None]] = {ATTENTION: [None] * num_blocks, FFN: [None] * num_blocks}
    for step, unit in enumerate(removed, start=1):
        for sublayer in unit.sublayers():
            grid[sublayer.kind][sublayer.block] = step
    return grid


def plot_layer_map(removed: Sequence[Unit], num_blocks: int, path: Path, *, title: str) -> Path:
    """Save the layer map: blocks along x, an attention row and an FFN row, removed cells coloured by type.

    Each removed cell shows the step at which it was removed.
    """
    grid = layer_map_grid(removed, num_blocks)
    counts = {kind: sum(step is not None for step in grid[kind]) for kind in grid}
    width = min(max(6.0, 0.32 * num_blocks + 1.5), 28.0)
    fig, ax = plt.subplots(figsize=(width, 2.3))
    for row, (kind, color) in enumerate(((ATTENTION, ATTENTION_COLOR), (FFN, FFN_COLOR))):
        for block, step in enumerate(grid[kind]):
            ax.add_patch(plt.Rectangle((block, 1 - row), 0.92, 0.88, color=color if step else KEPT_COLOR))
            if step and num_blocks <= 96:
                ax.text(block + 0.46, 1.44 - row, str(step), ha="center", va="center", fontsize=6, color="white")
    ax.set_xlim(-0.2, num_blocks + 0.1)
    ax.set_ylim(-0.1, 2.0)
    ax.set_yticks([0.44, 1.44], ["FFN", "Attention"])
    tick_every = 1 if num_blocks <= 40 else 5
    ticks = range(0, num_blocks, tick_every)
    ax.set_xticks([b + 0.46 for b in ticks], [str(b) for b in ticks], fontsize=7)
    ax.set_xlabel("decoder block")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.legend(
        handles=[
            Patch(color=ATTENTION_COLOR, label=f"removed attention ({counts[ATTENTION]}/{num_blocks})"),
            Patch(color=FFN_COLOR, label=f"removed FFN ({counts[FFN]}/{num_blocks})"),
            Patch(color=KEPT_COLOR, label="kept"),
        ],
        loc="upper center", bbox_to_anchor=(0.5, -0.38), ncol=3, frameon=False, fontsize=8,
    )
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_step_scores(steps: Sequence[dict], path: Path, *, title: str) -> Path:
    """Every candidate's score at every step (record ``steps``), one column per step, log scale.

    A complete distance is a filled dot, the removed unit's a larger black one; an aborted candidate's lower
    bound is an open upward triangle (its distance lies at or above it). Steps without scores (random removal)
    are left empty.
    """
    fig, ax = plt.subplots(figsize=(min(max(5.0, 0.45 * len(steps) + 2.0), 20.0), 3.8))
    drawn = {"complete": False, "bound": False}
    for column, step in enumerate(steps, start=1):
        complete = [c["distance"] for c in step.get("candidates", []) if c.get("distance") is not None]
        bounds = [c["lower_bound"] for c in step.get("candidates", [])
                  if c.get("distance") is None and c.get("lower_bound") is not None]
        positive = [v for v in complete if v > 0]
        if positive:
            ax.scatter([column] * len(positive), positive, s=12, color=FFN_COLOR, alpha=0.7, linewidths=0,
                       label=None if drawn["complete"] else "distance (scored on every sample)")
            drawn["complete"] = True
        bounds = [v for v in bounds if v > 0]
        if bounds:
            ax.scatter([column] * len(bounds), bounds, s=18, marker="^", facecolors="none",
                       edgecolors=ATTENTION_COLOR, linewidths=0.8,
                       label=None if drawn["bound"] else "lower bound (aborted early)")
            drawn["bound"] = True
        if step.get("distance"):
            ax.scatter([column], [step["distance"]], s=30, color="black", zorder=3,
                       label=None if drawn.get("removed") else "removed")
            drawn["removed"] = True
    if drawn["complete"] or drawn["bound"]:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("distance to the original output")
    ax.set_xticks(range(1, len(steps) + 1))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_metric_vs_ratio(
    series: dict[str, Sequence[tuple[float, float]]], path: Path, *, ylabel: str, title: str, log_y: bool = False
) -> Path:
    """One line per method of ``(ratio reached, value)`` points (paper Figs. 2 and 3)."""
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for name, points in series.items():
        points = sorted(points)
        ax.plot([100 * r for r, _ in points], [v for _, v in points], marker="o", label=name)
    ax.set_xlabel("layer pruning ratio reached (%)")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_search_progress(series: dict[str, Sequence[tuple[float, float]]], path: Path, *, title: str) -> Path:
    """One line per search of ``(evaluations, objective)`` points (a record's ``search.improvements``): the
    distance of the best removal set found against the set evaluations spent, as steps, log scale."""
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for name, points in series.items():
        points = sorted(points)
        if not points:
            continue
        ax.plot([n for n, _ in points], [v for _, v in points], drawstyle="steps-post", marker="o", markersize=3,
                label=name)
    ax.set_xlabel("set evaluations")
    ax.set_ylabel("distance of the removal set")
    if any(v > 0 for points in series.values() for _, v in points):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    """Write a finished figure to ``path`` (creating its folder) and free it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
