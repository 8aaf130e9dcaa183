"""A module's function replayed as CUDA graphs, forward and backward, captured on first use.

Why not ``torch.compile(mode="reduce-overhead")``: its CUDA graph trees spend host time on every
call (output reconstruction, liveness checks, input copies through AOTAutograd's wrappers), and the
training step is bound by host time. ``torch.cuda.make_graphed_callables`` replays a captured
forward and backward with a thin autograd function around them. ``GraphedFunction`` adds what a
training loop needs around it: capture at the first call (the shapes are the batch's), calls with
other shapes, dtypes or devices run the function as is, buffers (BatchNorm's running statistics)
are left as they were before capture's warm-up runs, and outputs are fresh tensors (a graph's
outputs are overwritten by its next replay).
"""

from __future__ import annotations

import threading
from typing import Callable, Optional, Tuple, Union

import torch
from torch import nn

# Held while a graph of the training step is captured (the tower's, the dense Adam's), and by the
# data path's thread ahead while it makes a batch (``device_gsu.GsuAhead``). Those captures run in
# CUDA's global mode (``make_graphed_callables`` offers no other), which fails the capture when any
# thread makes a call unsafe during capture: an allocation, a synchronisation, page-locking, as the
# data path's thread does (seen on an H100: "operation failed due to a previous error during
# capture", benchmarks/RESULTS.md row 84).
CAPTURE_LOCK = threading.Lock()

Signature = Tuple[Tuple[Tuple[int, ...], torch.dtype, torch.device, bool], ...]
# What a graphed function returns: a tensor or a tuple of tensors.
Outputs = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


def _signature(args: Tuple[torch.Tensor, ...]) -> Signature:
    return tuple((tuple(a.shape), a.dtype, a.device, a.requires_grad) for a in args)


class _Call(nn.Module):
    """``fn`` as a module over ``owner``'s parameters: the graphs compute their gradients."""

    def __init__(self, owner: nn.Module, fn: Callable[..., Outputs]) -> None:
        super().__init__()
        self.owner = owner
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> Outputs:
        return self.fn(*args)


class GraphedFunction:
    """``fn(*tensors) -> a tensor or a tuple of tensors`` over ``owner``'s parameters, replayed as CUDA
    graphs for inputs like the first call's.

    Args:
        owner: the module whose parameters ``fn`` reads (they get their gradients through the graphs).
        fn: the function (e.g. the owner's compiled forward); it must be capturable: no host syncs,
            no data-dependent shapes.
    """

    def __init__(self, owner: nn.Module, fn: Callable[..., Outputs]) -> None:
        self.owner, self.fn = owner, fn
        self.signature: Optional[Signature] = None
        self.graphed: Optional[nn.Module] = None

    def __call__(self, *args: torch.Tensor) -> Outputs:
        """``fn(*args)``: replayed from the graphs when training (the owner in train mode, gradients
        enabled) with inputs like the first training call's, else ``fn`` itself."""
        if not (self.owner.training and torch.is_grad_enabled()):
            return self.fn(*args)
        signature = _signature(args)
        if self.graphed is None:
            self._capture(args)
            self.signature = signature
        if signature != self.signature:
            return self.fn(*args)
        assert self.graphed is not None
        out = self.graphed(*args)
        return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()

    def _capture(self, args: Tuple[torch.Tensor, ...]) -> None:
        if not all(a.is_cuda for a in args):
            raise ValueError("GraphedFunction: CUDA graphs need every input on a CUDA device")
        samples = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        # The warm-up runs before capture train-mode BatchNorm as real steps would; undo that.
        buffers = [(b, b.clone()) for b in self.owner.buffers()]
        # The graphs' outputs keep the parameters' gradient accumulators that capture created on its
        # side stream, so every backward warns that they run on another stream than the gradients'
        # producer. Benign: the engine orders the accumulation after the producer and the caller's
        # stream after every leaf's stream at the end of backward (tests/test_tower.py compares
        # training steps with the ungraphed function).
        torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)
        with CAPTURE_LOCK:
            self.graphed = torch.cuda.make_graphed_callables(_Call(self.owner, self.fn), samples,
                                                             allow_unused_input=True)
        with torch.no_grad():
            for buffer, before in buffers:
                buffer.copy_(before)
