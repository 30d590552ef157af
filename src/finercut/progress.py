"""A progress bar over the work a search really does, and the greedy search's estimate of the work left.

The bar counts **block executions over the calibration set** (one decoder block run on every calibration sample
is 1; a block run on one of ten samples is 0.1), fed by the scoring context's block counter as the blocks run.
Its rate is therefore the machine's speed on this model, which does not change when the early abort makes one
candidate cost a tenth of another, and its total is the method's estimate of the whole run (:meth:`Method.plan_work`),
revised as the run learns what its steps cost.

The greedy estimate (:class:`GreedyPlan`): a step whose candidates all ran to the end would cost
``sum over candidates of (L - block)`` block executions (the replay from each candidate's block; a whole forward,
``L``, for the naive scorer); the early abort and the replay states kept across steps make it cost a share of
that, learnt from the last steps that ran. The steps to come have the candidates the window rule gives once as
many units are removed, each step one candidate fewer.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Sequence

from finercut.candidates import Unit, step_candidates

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} blocks [{elapsed}<{remaining}, {rate_fmt}]{postfix}"


FALLBACK_COLUMNS, FALLBACK_ROWS = 120, 24


def terminal_size() -> tuple[int, int]:
    """``(columns, rows)`` of the terminal the bar is drawn on (standard error); zeros when it reports none or
    is no terminal."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return 0, 0
    return size.columns, size.lines


class WorkProgress:
    """A tqdm bar in block executions over the calibration set; silent when not ``enabled``."""

    def __init__(self, *, enabled: bool, description: str = "finercut") -> None:
        from tqdm.auto import tqdm

        self.enabled = enabled
        # smoothing 0: the rate is the average since the start, not a moving average of bursts (the head and the
        # distance run between block executions), so the time left follows the estimate of the work left.
        # A terminal that reports no size (a pseudo-terminal nobody sized: `script`, some CI runners and editors)
        # makes tqdm draw nothing at all: a fixed size is used there instead.
        columns, rows = terminal_size()
        width = {"dynamic_ncols": True} if columns and rows else {"ncols": FALLBACK_COLUMNS, "nrows": FALLBACK_ROWS}
        self.bar = tqdm(total=1.0, desc=description, unit="blk", disable=not enabled, bar_format=BAR_FORMAT,
                        smoothing=0, **width)
        self._num_samples = 1

    def attach(self, context) -> None:
        """Count the block runs of ``context`` (a :class:`finercut.scoring.ScoringContext`) from now on."""
        self._num_samples = context.num_samples
        context.work.on_block_run = self._on_block_run

    def _on_block_run(self, samples: int) -> None:
        self.bar.update(samples / self._num_samples)
        if self.bar.n > self.bar.total:  # the estimate was low: the bar never runs past its end
            self.bar.total = self.bar.n
            self.bar.refresh()

    def plan(self, remaining: float | None) -> None:
        """Set the total to the work done so far plus ``remaining`` (block executions; None: unknown)."""
        if remaining is None:
            return
        self.bar.total = max(self.bar.n + remaining, 1e-9)
        self.bar.refresh()

    def note(self, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=False)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


def step_work(candidates: Sequence[Unit], num_blocks: int, *, full_forward: bool) -> int:
    """Block executions of one greedy step if every candidate ran on every sample: the replay from each
    candidate's block, or (``full_forward``, the naive scorer) a whole forward per candidate."""
    return sum(num_blocks if full_forward else num_blocks - unit.block for unit in candidates)


DEFAULT_ABORT_SHARE = 0.25
"""The share of a step's full work the first step is expected to need with the early abort (JS, 10 samples on
SmolLM2-135M: about a fifth to a third; later steps learn their own)."""
RECENT_STEPS = 3


@dataclass
class GreedyPlan:
    """The greedy search's expected remaining work (see the module doc).

    Args:
        units: every candidate unit; ``target`` the units to have removed at the end.
        window_until_ratio, window_first_block: the candidate window, as the search applies it.
        full_forward: the naive scorer (every candidate is a whole forward).
        share: the expected share of a step's full work before any step has been measured (1 without an abort).
    """

    units: Sequence[Unit]
    num_blocks: int
    target: int
    window_until_ratio: float
    window_first_block: int
    full_forward: bool = False
    share: float = DEFAULT_ABORT_SHARE
    observed: list[tuple[float, float]] = field(default_factory=list)
    """(actual, full) block executions of the steps measured so far."""

    def candidates(self, removed: Sequence[Unit]) -> list[Unit]:
        remaining = [unit for unit in self.units if unit not in removed]
        return step_candidates(remaining, removed_so_far=len(removed), total_units=len(self.units),
                               window_until_ratio=self.window_until_ratio,
                               window_first_block=self.window_first_block)[0]

    def record(self, removed_before: Sequence[Unit], block_executions: float) -> None:
        """A step that ran after ``removed_before`` cost ``block_executions``."""
        full = step_work(self.candidates(removed_before), self.num_blocks, full_forward=self.full_forward)
        self.observed.append((block_executions, full))

    def learnt_share(self) -> float:
        recent = self.observed[-RECENT_STEPS:]
        full = sum(f for _, f in recent)
        return sum(a for a, _ in recent) / full if recent and full else self.share

    def remaining(self, removed: Sequence[Unit]) -> float:
        """Expected block executions from now (``removed`` so far) to the target."""
        share = self.learnt_share()
        removed = list(removed)
        total = 0.0
        for _ in range(len(removed), self.target):
            candidates = self.candidates(removed)
            if not candidates:
                break
            total += share * step_work(candidates, self.num_blocks, full_forward=self.full_forward)
            # the next step has one candidate fewer: drop the one of median replay length
            removed.append(sorted(candidates, key=lambda unit: unit.block)[len(candidates) // 2])
        return total
