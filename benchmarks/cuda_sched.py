"""How a CUDA device's host threads wait for it: spin (CUDA's default on hosts with more cores than
contexts) or sleep until woken (blocking sync).

Why it matters for the benchmarks: a spinning wait in a synchronising call (a `.item()`, TorchRec's
splits read back after an all-to-all) burns CPU time, so "the step's wall time equals the process's
CPU time" does not tell host work from waiting. With blocking sync a wait costs no CPU time, and
wall minus CPU is the waiting. The flag belongs to the device's primary context, so it is set
through the driver API before PyTorch creates that context.
"""

from __future__ import annotations

import ctypes

from muse_torchrec.cuda_driver import check, driver

# CUctx_flags (cuda.h): the scheduling bits of a context's flags.
SCHED_MASK = 0x07
SCHED_NAMES = {0x00: "auto", 0x01: "spin", 0x02: "yield", 0x04: "blocking"}
BLOCKING_SYNC = 0x04


def _device(lib: ctypes.CDLL, ordinal: int) -> ctypes.c_int:
    check(lib.cuInit(0), "cuInit")
    device = ctypes.c_int()
    check(lib.cuDeviceGet(ctypes.byref(device), ordinal), f"cuDeviceGet({ordinal})")
    return device


def use_blocking_sync(ordinal: int) -> None:
    """Make host threads sleep while they wait for device ``ordinal`` (call before PyTorch uses it)."""
    lib = driver()
    device = _device(lib, ordinal)
    set_flags = getattr(lib, "cuDevicePrimaryCtxSetFlags_v2", None) or lib.cuDevicePrimaryCtxSetFlags
    check(set_flags(device, ctypes.c_uint(BLOCKING_SYNC)), "cuDevicePrimaryCtxSetFlags")


def sync_mode(ordinal: int) -> str:
    """The scheduling mode of device ``ordinal``'s primary context: auto, spin, yield or blocking."""
    lib = driver()
    device = _device(lib, ordinal)
    flags, active = ctypes.c_uint(), ctypes.c_int()
    check(lib.cuDevicePrimaryCtxGetState(device, ctypes.byref(flags), ctypes.byref(active)),
          "cuDevicePrimaryCtxGetState")
    return SCHED_NAMES.get(flags.value & SCHED_MASK, f"flags {flags.value:#x}")
