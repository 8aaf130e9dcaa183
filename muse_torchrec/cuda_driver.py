"""The CUDA driver API through ctypes, for the few calls PyTorch does not expose.

Why the driver and not the runtime: a failed runtime call leaves its error as the runtime's "last
error", which PyTorch then raises from the next, unrelated kernel launch; a driver call's result is
only its return value.
"""

from __future__ import annotations

import ctypes
import functools

import torch


@functools.lru_cache(maxsize=None)
def driver() -> ctypes.CDLL:
    """libcuda.so.1; RuntimeError naming it where it is missing."""
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as err:
        raise RuntimeError(f"the CUDA driver (libcuda.so.1) is not available: {err}") from err


def check(result: int, call: str) -> None:
    """RuntimeError unless ``result`` (a CUresult) is CUDA_SUCCESS."""
    if result != 0:
        raise RuntimeError(f"{call} failed with CUresult {result}")


def host_register(address: int, nbytes: int, device: torch.device) -> int:
    """Page-lock ``nbytes`` of host memory at ``address`` for ``device``'s primary context (PyTorch's;
    ``cuMemHostRegister``): copies from it to the device are DMA transfers. Returns the CUresult (0: locked)."""
    with torch.cuda.device(device):
        # The driver call locks for the calling thread's current context: a runtime call makes the
        # device's primary context current in a thread that has not used CUDA yet.
        torch.cuda.mem_get_info()
        return driver().cuMemHostRegister_v2(ctypes.c_void_p(address), ctypes.c_size_t(nbytes), ctypes.c_uint(0))


def host_unregister(address: int) -> None:
    """Undo ``host_register`` of the memory at ``address``."""
    check(driver().cuMemHostUnregister(ctypes.c_void_p(address)), "cuMemHostUnregister")
