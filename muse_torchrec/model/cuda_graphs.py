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

import abc
import contextlib
import threading
from typing import Callable, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

class CaptureLock:
    """Held alone while a graph of the training step is captured (``capturing()``: the tower's, the
    dense Adam's), and shared by the data path's threads ahead (``with CAPTURE_LOCK``: the device
    GSU's while it makes a batch, the router's around its CUDA calls, ``device_gsu.GsuAhead``).

    Why: those captures run in CUDA's global mode (``make_graphed_callables`` offers no other),
    which fails the capture when any thread makes a call unsafe during capture: an allocation, a
    synchronisation, page-locking, as the data path's threads do (seen on an H100: "operation
    failed due to a previous error during capture", benchmarks/RESULTS.md row 84). The data path's
    threads share it: they need not keep each other out, only the captures, which come first once
    one waits (a capture is not held off by a stream of batches). Shared, the proxy of 2 ranks ran
    1.09x end to end against a plain lock (benchmarks/RESULTS.md row 132)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._sharing, self._capturing, self._captures_waiting = 0, False, 0
        self._here = threading.local()

    def __enter__(self) -> None:
        # Not reentrant: a thread entering again would wait for a capture waiting for itself.
        if self.held_here():
            raise RuntimeError("CAPTURE_LOCK: this thread holds it already")
        with self._changed:
            self._changed.wait_for(lambda: not (self._capturing or self._captures_waiting))
            self._sharing += 1
        self._here.held = True

    def __exit__(self, *exc) -> None:
        self._here.held = False
        with self._changed:
            self._sharing -= 1
            self._changed.notify_all()

    def held_here(self) -> bool:
        """Whether the calling thread holds it (shared)."""
        return getattr(self._here, "held", False)

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """Held alone: no data path's thread holds it meanwhile."""
        with self._changed:
            self._captures_waiting += 1
            self._changed.wait_for(lambda: not (self._capturing or self._sharing))
            self._captures_waiting -= 1
            self._capturing = True
        try:
            yield
        finally:
            with self._changed:
                self._capturing = False
                self._changed.notify_all()

    def locked(self) -> bool:
        """Whether a capture or a data path's thread holds it."""
        with self._changed:
            return self._capturing or self._sharing > 0


CAPTURE_LOCK = CaptureLock()

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


class _CapturedAtFirstTrainingCall(abc.ABC):
    """``fn(*tensors)`` over ``owner``'s parameters: captured (``_capture``) at the first training
    call (the owner in train mode, gradients enabled) and replayed (``_replay``) for training calls
    with inputs like it; every other call runs ``fn`` itself.

    Args:
        owner: the module whose parameters ``fn`` reads (they get their gradients through the graphs).
        fn: the function (e.g. the owner's compiled forward); it must be capturable: no host syncs,
            no data-dependent shapes.
    """

    def __init__(self, owner: nn.Module, fn: Callable[..., Outputs]) -> None:
        self.owner, self.fn = owner, fn
        self.signature: Optional[Signature] = None

    def __call__(self, *args: torch.Tensor) -> Outputs:
        if not (self.owner.training and torch.is_grad_enabled()):
            return self.fn(*args)
        signature = _signature(args)
        if self.signature is None:
            self._capture_keeping_buffers(args)
            self.signature = signature
        if signature != self.signature:
            return self.fn(*args)
        return self._replay(*args)

    def _capture_keeping_buffers(self, args: Tuple[torch.Tensor, ...]) -> None:
        if not all(a.is_cuda for a in args):
            raise ValueError(f"{type(self).__name__}: CUDA graphs need every input on a CUDA device")
        samples = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        # The warm-up runs before capture train-mode BatchNorm as real steps would; undo that.
        buffers = [(b, b.clone()) for b in self.owner.buffers()]
        self._capture(samples)
        with torch.no_grad():
            for buffer, before in buffers:
                buffer.copy_(before)

    @abc.abstractmethod
    def _capture(self, samples: Tuple[torch.Tensor, ...]) -> None:
        """Capture the graph(s) from ``samples`` (inputs of the first training call's shapes, the
        graphs' to keep); warm-up runs may change the owner's buffers, which are restored after."""

    @abc.abstractmethod
    def _replay(self, *args: torch.Tensor) -> Outputs:
        """``fn(*args)`` replayed from the graph(s)."""


class GraphedFunction(_CapturedAtFirstTrainingCall):
    """``fn(*tensors) -> a tensor or a tuple of tensors`` over ``owner``'s parameters, its forward and
    its backward replayed as two CUDA graphs (``make_graphed_callables``) for inputs like the first
    training call's (``_CapturedAtFirstTrainingCall``)."""

    def __init__(self, owner: nn.Module, fn: Callable[..., Outputs]) -> None:
        super().__init__(owner, fn)
        self.graphed: Optional[nn.Module] = None

    def _replay(self, *args: torch.Tensor) -> Outputs:
        assert self.graphed is not None
        out = self.graphed(*args)
        return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()

    def _capture(self, samples: Tuple[torch.Tensor, ...]) -> None:
        # The graphs' outputs keep the parameters' gradient accumulators that capture created on its
        # side stream, so every backward warns that they run on another stream than the gradients'
        # producer. Benign: the engine orders the accumulation after the producer and the caller's
        # stream after every leaf's stream at the end of backward (tests/test_tower.py compares
        # training steps with the ungraphed function).
        torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)
        with CAPTURE_LOCK.capturing():
            self.graphed = torch.cuda.make_graphed_callables(_Call(self.owner, self.fn), samples,
                                                             allow_unused_input=True)


class GraphedLossStep(_CapturedAtFirstTrainingCall):
    """``fn(*tensors) -> (loss, *outputs without gradient)`` over ``owner``'s parameters, its forward
    and its backward replayed as one CUDA graph for inputs like the first training call's
    (``_CapturedAtFirstTrainingCall``).

    Why: with ``GraphedFunction`` a training step replays two graphs; autograd runs the second as a
    node of its own, copies the loss's gradient in, and accumulates every parameter's gradient into
    ``.grad`` through a node and a copy each (the tower's 21 ~0.24 ms of host time a step,
    benchmarks/RESULTS.md row 75). A loss's backward needs nothing but the loss's own gradient, a
    number, so the graph runs the backward right after the forward, for a gradient of 1, into
    buffers of its own; the one autograd node this returns then scales them by the real gradient
    (one launch for all the parameters), hands the differentiable inputs' (the looked-up rows) on to
    their producers, and accumulates the parameters' into ``.grad`` as autograd would (set where
    it is None, else added).

    A second training call replays the graph again, so the first call's loss can no longer be
    differentiated (its backward raises). Outputs after the loss must not require gradients.
    """

    def __init__(self, owner: nn.Module, fn: Callable[..., Tuple[torch.Tensor, ...]]) -> None:
        super().__init__(owner, fn)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.replays = 0
        self._inputs: Tuple[torch.Tensor, ...] = ()  # the graph's own, copied into at every call
        self._outputs: Tuple[torch.Tensor, ...] = ()  # (loss, *outputs), overwritten by every replay
        self._input_grads: Tuple[Optional[torch.Tensor], ...] = ()  # d loss / d input, None where not differentiable
        self._params: List[nn.Parameter] = []
        self._param_grads: List[torch.Tensor] = []  # d loss / d parameter (the parameters the loss reads)

    def _replay(self, *args: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        assert self.graph is not None
        with torch.no_grad():
            torch._foreach_copy_(list(self._inputs), list(args))
        self.graph.replay()
        self.replays += 1
        loss = _GraphedLoss.apply(self._outputs[0], self, self.replays, *args)
        return (loss, *(o.clone() for o in self._outputs[1:]))

    def _capture(self, samples: Tuple[torch.Tensor, ...]) -> None:
        self._inputs = samples
        params = [p for p in self.owner.parameters() if p.requires_grad]
        differentiable = [a for a in self._inputs if a.requires_grad]

        def step() -> Tuple[Tuple[torch.Tensor, ...], Tuple[Optional[torch.Tensor], ...]]:
            outputs = self.fn(*self._inputs)
            if any(o.requires_grad for o in outputs[1:]):
                raise ValueError("GraphedLossStep: only the first output (the loss) may require gradients")
            return outputs, torch.autograd.grad(outputs[0], [*differentiable, *params], allow_unused=True)

        current = torch.cuda.current_stream()
        with CAPTURE_LOCK.capturing():
            # Warm-up on a side stream (lazy initialisations, compilation), as make_graphed_callables does.
            side = torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(3):
                    step()
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs, grads = step()
        self._outputs = tuple(o.detach() for o in outputs)
        input_grads = iter(grads[:len(differentiable)])
        self._input_grads = tuple(next(input_grads) if a.requires_grad else None for a in self._inputs)
        used = [(p, g) for p, g in zip(params, grads[len(differentiable):]) if g is not None]
        self._params, self._param_grads = [p for p, _ in used], [g for _, g in used]
        self.graph = graph

    def backward(self, grad: torch.Tensor, replay: int) -> Tuple[Optional[torch.Tensor], ...]:
        """The gradients of the inputs for the loss of replay ``replay`` with gradient ``grad``
        (a scalar); the parameters' accumulated into their ``.grad``."""
        if replay != self.replays:
            raise RuntimeError("GraphedLossStep: the backward of a loss whose graph was replayed again since "
                               "(one backward per training call, before the next)")
        # New tensors (one launch for all): ``.grad`` must not alias buffers the next replay overwrites.
        for param, param_grad in zip(self._params, torch._foreach_mul(self._param_grads, grad)):
            if param.grad is None:
                param.grad = param_grad
            else:
                param.grad.add_(param_grad)
        return tuple(None if g is None else g * grad for g in self._input_grads)


class _GraphedLoss(torch.autograd.Function):
    """The loss of a ``GraphedLossStep`` replay (a copy of the graph's), whose backward is the
    step's: autograd's one node for the whole graph."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, step: GraphedLossStep, replay: int, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.step, ctx.replay = step, replay
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        return (None, None, None, *ctx.step.backward(grad, ctx.replay))
