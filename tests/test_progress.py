"""The progress bar is drawn on every terminal, including one that reports no size."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import finercut

SRC = Path(finercut.__file__).resolve().parents[1]
DRAW = """
from finercut.progress import WorkProgress
bar = WorkProgress(enabled=True, description="finercut")
bar.plan(40.0)
bar._on_block_run(10)
bar.close()
"""


def drawn_on_a_terminal_without_size() -> str:
    """What the bar writes to a fresh pseudo-terminal (0 rows, 0 columns, as `script` or a CI runner gives)."""
    leader, follower = pty.openpty()
    try:
        subprocess.run([sys.executable, "-c", DRAW], stderr=follower, stdout=subprocess.DEVNULL, check=True,
                       env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120)
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: nothing more
                break
            if not chunk:
                break
            shown += chunk
        return shown.decode("utf-8", "replace")
    finally:
        os.close(leader)


def test_the_bar_is_drawn_on_a_terminal_that_reports_no_columns():
    assert os.get_terminal_size(pty.openpty()[1]).columns == 0  # the premise: a new pty has no size
    shown = drawn_on_a_terminal_without_size()
    assert "10/40 blocks" in shown, shown
