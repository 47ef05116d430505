"""Without a GPU, the Triton kernels' tests (test_kernels.py, marker ``triton``) still run: on CPU, under Triton's
interpreter. It executes the same kernel source with NumPy, so indexing, masking and the math of every kernel are
checked here too (float32; speed and bf16 tensor-core rounding need the real hardware)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: test_kernels.py runs the kernels natively")
def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    # the interpreter is chosen when a kernel is defined, so it needs a fresh process
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    test_file = Path(__file__).with_name("test_kernels.py")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "triton",
                           "-W", "error::RuntimeWarning",  # NumPy overflow in a kernel: it read past a tensor
                           str(test_file)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
