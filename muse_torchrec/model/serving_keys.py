"""Ranking keys of the serving GSU and their per-block maxima, in one pass (MUSE_SPEC section 5).

``key[c, l] = dot(candidate_c, behavior_l) * scale[l] + bias[l]`` over int8 SCL vectors, and
``block_max[c, j] = max(key[c, j * block : (j + 1) * block])``, the two inputs of
``gsu.blocked_topk``. The plain version (any device) makes the int32 dot products, then the keys,
then the maxima: three passes over a [C, L] matrix. On a CUDA GPU with Triton, one kernel computes
a tile of dot products with the int8 tensor cores, turns it into keys and writes keys and tile
maxima: the int32 matrix is never written. Both give bit-identical keys: for a scored behavior
``bias`` is 0 and for the others ``scale`` is 0, so ``dot * scale + bias`` is one rounding (or none)
however the multiply-add is fused.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs have no Triton: the plain version serves them
    triton = None

# Candidates per program of the kernel; the history tile is one block of keys.
_CANDIDATE_TILE = 64


def int8_dots(candidates: Tensor, history: Tensor) -> Tensor:
    """Exact int8 dot products [C, 128] x [L, 128] -> [C, L] (int32 on CUDA, float32 elsewhere).

    On CUDA the int8 tensor-core GEMM (``torch._int_mm``, int32 accumulation) does it; elsewhere a
    float32 matmul, which is exact too (|dot| <= 128 * 127**2 < 2**24). ``L`` must be a multiple
    of 8 on CUDA (``_int_mm`` wants it).
    """
    if candidates.is_cuda and candidates.shape[0] > 16:
        return torch._int_mm(candidates, history.t())
    return candidates.float() @ history.float().t()


def ranking_keys(candidates: Tensor, history: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """Plain torch: keys [C, L] float32, ``dot * scale + bias`` per behavior."""
    return torch.addcmul(bias, int8_dots(candidates, history), scale)


def serving_keys_reference(candidates: Tensor, history: Tensor, scale: Tensor, bias: Tensor,
                           block: int) -> Tuple[Tensor, Tensor]:
    """Plain torch: (keys [C, L] float32, block maxima [C, L / block]); L a multiple of ``block``."""
    keys = ranking_keys(candidates, history, scale, bias)
    return keys, keys.view(keys.shape[0], -1, block).amax(dim=2)


def fused_keys_supported(candidates: Tensor, block: int) -> bool:
    """Whether :func:`serving_keys` runs the fused kernel for these inputs."""
    return triton is not None and candidates.is_cuda and block >= 16 and block & (block - 1) == 0


def serving_keys(candidates: Tensor, history: Tensor, scale: Tensor, bias: Tensor,
                 block: int, fused: bool = True) -> Tuple[Tensor, Tensor]:
    """Keys and block maxima (see the module docstring): the fused kernel where supported and ``fused``.

    Args:
        candidates: [C, 128] int8.
        history: [L, 128] int8, L a multiple of ``block``.
        scale, bias: [L] float32.
        block: keys per block.

    Returns:
        (keys [C, L] float32, block maxima [C, L / block] float32).
    """
    if history.shape[0] % block:
        raise ValueError(f"serving_keys: history length {history.shape[0]} is not a multiple of block {block}")
    if not (fused and fused_keys_supported(candidates, block)):
        return serving_keys_reference(candidates, history, scale, bias, block)
    rows, dim = candidates.shape
    width = history.shape[0]
    keys = torch.empty(rows, width, dtype=torch.float32, device=candidates.device)
    block_max = torch.empty(rows, width // block, dtype=torch.float32, device=candidates.device)
    grid = (triton.cdiv(rows, _CANDIDATE_TILE), width // block)
    _keys_kernel[grid](candidates.contiguous(), history.contiguous(), scale.contiguous(), bias.contiguous(),
                       keys, block_max, rows, width, TILE_C=_CANDIDATE_TILE, BLOCK=block, DIM=dim)
    return keys, block_max


if triton is not None:

    @triton.jit
    def _keys_kernel(candidates_ptr, history_ptr, scale_ptr, bias_ptr, keys_ptr, block_max_ptr,
                     rows, width, TILE_C: tl.constexpr, BLOCK: tl.constexpr, DIM: tl.constexpr):
        """One program: TILE_C candidates x one block of BLOCK behaviors (DIM = 128 int8 each)."""
        # int64 offsets: rows x width can pass 2**31 (10 k candidates x 1 M behaviors).
        row = tl.program_id(0).to(tl.int64) * TILE_C + tl.arange(0, TILE_C)
        col = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        dims = tl.arange(0, DIM)
        in_rows = row < rows
        cand = tl.load(candidates_ptr + row[:, None] * DIM + dims[None, :], mask=in_rows[:, None], other=0)
        hist = tl.load(history_ptr + col[None, :] * DIM + dims[:, None])  # [DIM, BLOCK], transposed view
        dots = tl.dot(cand, hist, out_dtype=tl.int32)
        keys = dots.to(tl.float32) * tl.load(scale_ptr + col)[None, :] + tl.load(bias_ptr + col)[None, :]
        tl.store(keys_ptr + row[:, None] * width + col[None, :], keys, mask=in_rows[:, None])
        tl.store(block_max_ptr + row * (width // BLOCK) + tl.program_id(1), tl.max(keys, axis=1), mask=in_rows)
