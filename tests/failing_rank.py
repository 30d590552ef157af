"""``torchrun ... tests/failing_rank.py RANK STEPS MODE finercut-args...``: the CLI, with one rank failing mid-step.

Once STEPS steps are done, rank RANK fails inside its next candidate evaluation (its earlier blocks ran, the
output head not yet): MODE ``raise`` raises an error there, ``kill`` sends the process SIGKILL, ``hang`` sleeps
for an hour. The seam is ``interrupted_run.act_after``, a wrapper around ``finercut.run.find_steps``, so the
shipped code has no test-only branch.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from interrupted_run import act_after

from finercut import cli


def fail_after(rank: int, steps: int, mode: str) -> None:
    if int(os.environ["RANK"]) != rank:
        return

    def fail():
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "hang":  # alive but silent, as a stuck GPU or a lost node looks to the others
            time.sleep(3600)
        raise RuntimeError("injected failure: out of device memory")

    act_after(steps, fail)


if __name__ == "__main__":
    rank, steps, mode, *arguments = sys.argv[1:]
    fail_after(int(rank), int(steps), mode)
    sys.exit(cli.main(arguments))
