"""``python -m finercut ...`` (and ``torchrun --nproc-per-node N -m finercut prune ...``): the command line."""

import sys

from finercut.cli import main

sys.exit(main())
