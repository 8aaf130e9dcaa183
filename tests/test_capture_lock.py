"""``cuda_graphs.CAPTURE_LOCK``: the data path's threads share it, a graph capture holds it alone and
goes before threads that come after it."""

import threading
import time

import pytest

from muse_torchrec.model.cuda_graphs import CaptureLock


def _started(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_the_data_paths_threads_share_it_each_once():
    lock, inside = CaptureLock(), []

    def other() -> None:
        inside.append(lock.held_here())
        with lock:
            inside.extend([lock.locked(), lock.held_here()])

    with lock:
        assert lock.held_here()
        _started(other).join(timeout=5)
        with pytest.raises(RuntimeError, match="holds it already"):
            lock.__enter__()
    assert inside == [False, True, True] and not lock.locked() and not lock.held_here()


def test_a_capture_waits_for_the_threads_inside_then_holds_it_alone():
    lock, events = CaptureLock(), []

    def capture():
        with lock.capturing():
            events.append("capture")
            time.sleep(0.2)
            events.append("captured")

    def batch():
        with lock:
            events.append("batch")

    lock.__enter__()
    capturer = _started(capture)
    time.sleep(0.2)
    assert events == []  # a data path's thread is inside
    # A thread that comes while the capture waits goes after it.
    late = _started(batch)
    time.sleep(0.2)
    assert events == []
    lock.__exit__(None, None, None)
    capturer.join(timeout=5)
    late.join(timeout=5)
    assert events == ["capture", "captured", "batch"] and not lock.locked()
