"""How our command-line processes end: ``end_process``.

Torch-free, so that the commands that never touch the training stack can end the same way.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def end_process(code: int) -> NoReturn:
    """End this process with exit status ``code`` the way multiprocessing ends its children: the
    logs and the standard streams flushed, then ``os._exit``, without the interpreter's finalisation.

    Why: gloo's worker threads outlive ``destroy_process_group``, and a worker releases a finished
    collective's work after it has woken the caller (core of an aborted rank: ``~AsyncBarrierWork``
    releasing the ``AsyncAllgatherWork`` its barrier waited for, in ``ProcessGroupGloo::runLoop``).
    Where that work holds the last reference to tensors whose Python objects are gone, the release
    waits for the GIL; if the interpreter's finalisation begins meanwhile, the interpreter ends the
    waiting thread with ``pthread_exit``, whose unwinding through gloo's loop aborts the process
    ("terminate called without an active exception"). The 2-rank torchx job aborted so at its end
    in 1 of 151 runs here, and once in CI; the barrier in ``shutdown`` does not close the window.

    Call it once the work is done and its files are closed: ``atexit`` handlers and finalisers do
    not run.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
