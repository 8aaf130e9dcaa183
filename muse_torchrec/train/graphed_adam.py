"""The dense Adam step replayed as one CUDA graph (``train.compile_mode: graphs``).

Why: the training step is bound by host time, and ``torch.optim.Adam.step`` spends its host time
in Python (gathering every parameter's gradient and state into lists, checks) before one fused
kernel launch: ~0.4 ms a step under cProfile on an H100 host (benchmarks/RESULTS.md, rows 41-42).
Replayed, the step is one copy of the gradients into the graph's own buffers and one graph launch.

What the graph bakes in, and how ``GraphedAdam`` keeps it right:

- the parameters' and the optimizer state's addresses: both are updated in place (TorchRec's
  ``KeyedOptimizer.load_state_dict`` copies into the existing state tensors; torch's own
  ``load_state_dict`` replaces them, so it drops the graph);
- the gradients' addresses: the graph reads buffers of its own, into which every step copies the
  gradients first, wherever autograd put them;
- the hyperparameters (lr, betas, ...): a step whose param_groups differ from the captured ones
  (e.g. after loading a checkpoint's param_groups) captures again.

A step where a parameter has no gradient, or whose state is not made yet (the first step), runs
eagerly. Same updates as ``torch.optim.Adam(fused=True)``: tests/test_graphed_adam.py.

Over several ranks (``average``) the gradients are averaged before the step as
``dense_sync.GradientAverage`` does, but its flat buffer is the graph's own: the gradients are copied
into it anyway, then summed in one all-reduce and divided, both inside the graph. The pre-step hook
would gather, concatenate, split and copy back every gradient on the host first, and an all-reduce
launched from the host costs the step 100-180 us of host time (benchmarks/RESULTS.md row 118)
where a graph's replay holds it for nothing more.
"""

from __future__ import annotations

from typing import Any, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from muse_torchrec.model.cuda_graphs import CAPTURE_LOCK
from muse_torchrec.train.dense_sync import GradientAverage


class GraphedAdam(torch.optim.Adam):
    """``torch.optim.Adam(params, fused=True, capturable=True, **hyperparameters)`` whose step is a
    CUDA graph replay once every parameter has a gradient and a state. Parameters must be on one CUDA
    device, of one dtype, hyperparameters plain numbers (a tensor lr is not supported). ``average``: the
    gradients are averaged over its ranks before every step."""

    def __init__(self, params: Iterable[Any], average: Optional[GradientAverage] = None, **hyperparameters: Any) -> None:
        super().__init__(params, fused=True, capturable=True, **hyperparameters)
        if not all(p.is_cuda for p in self._params()):
            raise ValueError("GraphedAdam replays CUDA graphs: every parameter must be on a CUDA device")
        kinds = {(p.dtype, p.device) for p in self._params()}
        if len(kinds) > 1:
            raise ValueError(f"GraphedAdam keeps the gradients in one flat buffer: parameters of one dtype on one "
                             f"device, not {sorted(map(str, kinds))}")
        self.average = average
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        # The graph's gradient buffers: views of one flat buffer, which ``average`` sums over the ranks.
        self._flat_grads: Optional[Tensor] = None
        self._static_grads: List[Tensor] = []
        self._captured_with: Optional[Tuple[Any, ...]] = None

    def _params(self) -> List[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _hyperparameters(self) -> Tuple[Any, ...]:
        return tuple(tuple((k, v) for k, v in group.items() if k != "params") for group in self.param_groups)

    def load_state_dict(self, state_dict: Any) -> None:
        """torch's loading replaces the state tensors (TorchRec's copies into them): capture again."""
        super().load_state_dict(state_dict)
        self._graph = None

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        if closure is not None:
            raise ValueError("GraphedAdam.step takes no closure")
        for group in self.param_groups:
            # A loaded checkpoint's param_groups may say otherwise; the step is captured either way.
            group["capturable"] = True
        params = self._params()
        grads = [p.grad for p in params]
        if any(g is None for g in grads) or any(p not in self.state for p in params):
            if self.average is not None:
                self.average.average_gradients(self)
            super().step()
            return
        hyperparameters = self._hyperparameters()
        if self._graph is None or hyperparameters != self._captured_with:
            self._capture(params, grads, hyperparameters)
        torch._foreach_copy_(self._static_grads, grads)
        self._graph.replay()

    def _capture(self, params: List[Tensor], grads: List[Tensor], hyperparameters: Tuple[Any, ...]) -> None:
        """Record the step over static gradient buffers (nothing runs during capture); ``grads``:
        the parameters' gradients, put back afterwards."""
        numels = [p.numel() for p in params]
        self._flat_grads = torch.zeros(sum(numels), dtype=params[0].dtype, device=params[0].device)
        self._static_grads = [part.view_as(p) for part, p in zip(self._flat_grads.split(numels), params)]
        for p, static in zip(params, self._static_grads):
            p.grad = static
        graph = torch.cuda.CUDAGraph()
        try:
            with CAPTURE_LOCK.capturing(), torch.cuda.graph(graph):
                if self.average is not None:
                    # Every rank captures at the same step (the same parameters have gradients
                    # everywhere), so their replays' all-reduces pair up.
                    self.average.sum_over_ranks(self._flat_grads)
                    self._flat_grads.div_(self.average.world_size)
                super().step()
        finally:
            for p, grad in zip(params, grads):
                p.grad = grad
        self._graph, self._captured_with = graph, hyperparameters
