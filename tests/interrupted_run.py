"""``python tests/interrupted_run.py STEPS SIGNAL finercut-args...``: the CLI, signalled once STEPS steps are done
(a search over whole removal sets, which saves its state instead of steps: once it saved its state STEPS times).

The signal (``SIGKILL``, or ``SIGINT`` as Ctrl-C sends) arrives inside the next candidate evaluation: its earlier
blocks ran, its output head and distance not yet. The seam is a wrapper around ``finercut.run.find_steps``, so
the shipped code has no test-only branch.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable

from finercut import cli, run


def act_after(steps: int, action: Callable[[], None]) -> None:
    """Call ``action`` once, inside the first candidate evaluation after ``steps`` finished steps."""
    plain_find_steps = run.find_steps

    def find_steps(context, config, *, completed=(), on_step=None, save_state=None, **options):
        done = {"steps": len(completed), "acted": False}

        def count_step(step):
            if on_step:
                on_step(step)
            done["steps"] += 1

        def count_state(state):
            if save_state:
                save_state(state)
            done["steps"] += 1

        def maybe_act(module, args):
            if done["steps"] >= steps and not done["acted"]:
                done["acted"] = True
                action()

        last_block = context.adapter.blocks_of(context.model)[-1]
        handle = last_block.register_forward_pre_hook(maybe_act)
        try:
            return plain_find_steps(context, config, completed=completed, on_step=count_step,
                                    save_state=count_state, **options)
        finally:
            handle.remove()

    run.find_steps = find_steps


def signal_after(steps: int, signal_number: int) -> None:
    act_after(steps, lambda: os.kill(os.getpid(), signal_number))


if __name__ == "__main__":
    steps, signal_name, *arguments = sys.argv[1:]
    signal_after(int(steps), getattr(signal, signal_name))
    sys.exit(cli.main(arguments))
