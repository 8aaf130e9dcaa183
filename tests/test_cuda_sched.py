"""benchmarks/cuda_sched.py: blocking sync is set on the device PyTorch then uses; no driver -> clear error."""

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import cuda_sched  # noqa: E402


def _has_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


@pytest.mark.skipif(_has_driver(), reason="this machine has a CUDA driver")
def test_without_a_driver_the_error_names_it():
    with pytest.raises(RuntimeError, match="libcuda.so.1"):
        cuda_sched.use_blocking_sync(0)


PROBE = """
import sys, torch
sys.path.insert(0, {bench!r})
import cuda_sched
if {blocking}:
    cuda_sched.use_blocking_sync(0)
(torch.ones(4, device="cuda") * 2).sum().item()
print(cuda_sched.sync_mode(0))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("blocking, mode", [(False, "auto"), (True, "blocking")])
def test_pytorch_runs_with_the_mode_set_before_it_started(blocking, mode):
    code = PROBE.format(bench=str(ROOT / "benchmarks"), blocking=blocking)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == mode
