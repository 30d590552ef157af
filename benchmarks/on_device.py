"""``python benchmarks/on_device.py DEVICE DTYPE SCRIPT ARGS...``: run a benchmark script with its model on DEVICE.

Benchmark scripts load their model through :func:`finercut.modelio.load_model` on the CPU in float32 (the build
machines have no GPU); this runs one with every such load placed on DEVICE in DTYPE instead, unchanged
otherwise. ``benchmarks/gpu_check.sh`` uses it for ``search_speed.py``.
"""

from __future__ import annotations

import runpy
import sys

from finercut import modelio


def place_every_load(device: str, dtype: str) -> None:
    plain_load_model = modelio.load_model

    def load_model(source, *, device_map=None, **_placement):  # the script's own dtype and device are replaced
        return plain_load_model(source, dtype=dtype, device=device, device_map=device_map)

    modelio.load_model = load_model


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__.splitlines()[0])
    device, dtype, script, *arguments = sys.argv[1:]
    place_every_load(device, dtype)
    sys.argv = [script, *arguments]
    runpy.run_path(script, run_name="__main__")
