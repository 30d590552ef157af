"""``torchrun ... tests/failing_rank.py RANK STEPS MODE finercut-args...``: the CLI, with one rank failing mid-step.

Once STEPS steps are done, rank RANK fails inside its next candidate evaluation (its earlier blocks ran, the
output head not yet): MODE ``raise`` raises an error there, ``kill`` sends the process SIGKILL, ``hang`` sleeps
for an hour. The seam is a wrapper around ``finercut.run.find_steps`` (as in ``interrupted_run.py``), so the
shipped code has no test-only branch.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from finercut import cli, run


def fail_after(rank: int, steps: int, mode: str):
    plain_find_steps = run.find_steps

    def find_steps(context, config, *, completed=(), on_step=None, **options):
        done = {"steps": len(completed)}

        def count_step(step):
            if on_step:
                on_step(step)
            done["steps"] += 1

        def maybe_fail(module, args):
            if done["steps"] >= steps and int(os.environ["RANK"]) == rank:
                if mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if mode == "hang":  # alive but silent, as a stuck GPU or a lost node looks to the others
                    time.sleep(3600)
                raise RuntimeError("injected failure: out of device memory")

        last_block = context.adapter.blocks_of(context.model)[-1]
        handle = last_block.register_forward_pre_hook(maybe_fail)
        try:
            return plain_find_steps(context, config, completed=completed, on_step=count_step, **options)
        finally:
            handle.remove()

    run.find_steps = find_steps


if __name__ == "__main__":
    rank, steps, mode, *arguments = sys.argv[1:]
    fail_after(int(rank), int(steps), mode)
    sys.exit(cli.main(arguments))
