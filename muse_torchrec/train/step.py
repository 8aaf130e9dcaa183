"""How the trainer advances the model one batch at a time (``train.pipeline``).

- ``plain`` (the default): move the batch to the device, forward (TorchRec's input distribution runs
  inside it), backward (the sparse optimizer is fused into it), dense optimizer step. Nothing is
  prefetched.
- ``sparse_dist``: TorchRec's ``TrainPipelineSparseDist``, which copies batch i+2 to the device and
  starts batch i+1's input distribution on side streams while batch i trains.

Why plain is the default (and the GPU configs' choice): on a GPU the step is bound by host (Python)
time at 1,000 samples per GPU, and the pipeline's overlap costs more host time per step than it
hides. Alternated processes on the same machines (benchmarks/RESULTS.md rows 36-38): the model step
1.23-1.31x on one H100 and 1.13x per GPU on 2 H200, end to end 1.16x on one H100 (means of each
set); the trainer itself ran 150 k and 162 k samples/s there against 110 k and 132 k (on a slower
H100 host, 112 k against 113 k in one pair, row 40). On CPU the overlap is real (gloo runs its
collectives on its own threads while the step computes): the demo config on 2 ranks trained 1.11x
faster with the pipeline (means of three alternated pairs on the 2-core development machine), so
the CPU configs choose it. It may also pay off where the input distribution's communication is
slow (across nodes; not measured).

Both compute the same as an unsharded model step for step (tests/test_sharded.py).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Protocol, Tuple

import torch
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from muse_torchrec.config import ConfigError
from muse_torchrec.data.batch import Batch

# What the model returns besides its loss: (loss, logits, labels), all detached.
StepOutput = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class TrainStepper(Protocol):
    def progress(self, batches: Iterator[Any]) -> StepOutput:
        """Train on the next batch of ``batches``; StopIteration once they are exhausted (and, for a
        pipeline, drained)."""

    def detach(self) -> nn.Module:
        """The model as it was before the stepper wrapped it (for evaluation)."""


class PlainStep:
    """One batch per ``progress`` call, nothing prefetched.

    Args:
        model: the DMP-wrapped ``MuseTrain``: ``model(batch) -> (loss, (loss, logits, labels))``.
        optimizer: the combined optimizer (the fused sparse one steps inside the backward).
        device: where batches are moved (a batch already there is not copied).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.model, self.optimizer, self.device = model, optimizer, device

    def progress(self, batches: Iterator[Any]) -> StepOutput:
        batch: Batch = next(batches).to(self.device, non_blocking=True)
        loss, output = self.model(batch)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return output

    def detach(self) -> nn.Module:
        return self.model


STEPPERS: Dict[str, Callable[[nn.Module, torch.optim.Optimizer, torch.device], TrainStepper]] = {
    "plain": PlainStep,
    # execute_all_batches: the last two prefetched batches are trained too, as in the plain step.
    "sparse_dist": lambda model, optimizer, device: TrainPipelineSparseDist(model, optimizer, device,
                                                                            execute_all_batches=True),
}


def check_pipeline(name: str) -> None:
    """ConfigError unless ``name`` is a ``train.pipeline`` (checked before a run builds anything)."""
    if name not in STEPPERS:
        raise ConfigError(f"train.pipeline: unknown {name!r}; choose one of {sorted(STEPPERS)}")


def make_stepper(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> TrainStepper:
    """The ``train.pipeline`` named ``name`` over ``model``."""
    check_pipeline(name)
    return STEPPERS[name](model, optimizer, device)
