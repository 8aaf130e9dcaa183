"""Turns at the GIL between the training thread and the data path's thread ahead of it.

Why: on one GPU the training step is bound by host time, and the data path's thread ahead
(``data.device_gsu.GsuAhead``: the batch's receipt from the loader workers, its copy to the GPU,
the GSU) shares the process's GIL with it. Every PyTorch op lets the GIL go while it runs, and the
training thread then waits to take it back whenever that thread holds it: end to end the step took
about the model step plus all of the data path's CPU time (benchmarks/RESULTS.md rows 105-106),
although the two threads together held the GIL only a third of the time. During its backward the
training thread waits in C++ without the GIL (the autograd engine runs it), so the thread ahead
starts each batch there, or between steps, rather than beside the forward and the optimizer step.

``TRAINING_TURNS`` is the process's: ``train.step.PlainStep`` holds ``busy()`` around its forward
and its optimizer step, and ``GsuAhead`` waits for ``its_turn()`` before each batch. Nothing else
holds it, so elsewhere (evaluation, TorchRec's pipeline) the thread ahead never waits.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

# The longest a data path's thread waits for its turn: a guard, far longer than a training step's
# forward, against a training thread stuck inside ``busy()``.
MAX_WAIT_S = 1.0


class Turns:
    """Whether the training thread is in a part of its step that the data path's thread should
    leave alone (``busy``), and a wait for that to end (``its_turn``)."""

    def __init__(self) -> None:
        self._free = threading.Event()
        self._free.set()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Held by the training thread while it runs Python that the data path's thread would slow."""
        self._free.clear()
        try:
            yield
        finally:
            self._free.set()

    def is_busy(self) -> bool:
        return not self._free.is_set()

    def its_turn(self, timeout_s: float = MAX_WAIT_S) -> bool:
        """Wait (in the data path's thread) until the training thread is not ``busy``; False if
        ``timeout_s`` passed first (the caller goes on anyway)."""
        return self._free.wait(timeout_s)


TRAINING_TURNS = Turns()
