"""GPU readiness that a CPU machine can check: bf16 by default on CUDA, timings that wait for the device, and
the GPU check script refusing clearly where there is no GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from finercut.evaluation import stats
from finercut.modelio import resolve_dtype
from finercut.record import RunConfig
from finercut.run import resolve_run_config

REPO = Path(__file__).resolve().parents[1]


def test_bfloat16_is_the_default_on_cuda_and_float32_on_the_cpu(monkeypatch):
    assert resolve_dtype("auto", "cuda") == "bfloat16" and resolve_dtype("auto", "cuda:1") == "bfloat16"
    assert resolve_dtype("auto", "cpu") == "float32" and resolve_dtype("float16", "cuda") == "float16"
    # With a device map, accelerate places the model on the GPUs when there are any: bfloat16 then too.
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    config = resolve_run_config(RunConfig(model="meta-llama/Meta-Llama-3-8B", device_map="auto", ratio=0.25), None)
    assert config.dtype == "bfloat16"


def test_a_timed_call_waits_for_the_device_before_and_after(monkeypatch):
    events = []
    monkeypatch.setattr(stats, "synchronize_devices", lambda: events.append("synchronize"))
    stats._timed(lambda: events.append("call"))
    assert events == ["synchronize", "call", "synchronize"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run the whole check")
def test_gpu_check_says_there_is_no_gpu_here():
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=120)
    assert result.returncode == 2 and "no CUDA GPU visible to torch" in result.stderr
