"""GSU on the training device (DeferredGsuBuilder + DeviceGsu) equals the host GSU (BatchBuilder)."""

import numpy as np
import pytest
import torch

from muse_torchrec import features as F
from muse_torchrec.data.batch import BatchBuilder
from muse_torchrec.data.device_gsu import DeferredGsuBuilder, DeviceGsu
from random_data import random_block, random_scl

K, RECENT, MAX_HISTORY = 6, 5, 40
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["scl_cosine", "category"])
@pytest.mark.parametrize("pad_to", [None, 60])
def test_device_gsu_equals_host_gsu(kind, pad_to, device):
    rng = np.random.default_rng(3)
    scl, item_scl_row = random_scl(rng)
    block = random_block(rng, num_users=15, max_len=70)
    host = BatchBuilder(scl, item_scl_row, gsu=kind, k=K, recent=RECENT, max_history=MAX_HISTORY, pad_to=pad_to)(block)
    raw = DeferredGsuBuilder(scl, item_scl_row, recent=RECENT, max_history=MAX_HISTORY, pad_to=pad_to, k=K,
                             kind=kind)(block)
    moved = DeviceGsu(scl, item_scl_row, torch.device(device), k=K, kind=kind)(raw).to(torch.device("cpu"))
    # The same KJT: keys in the collection's order, the placeholders overwritten with the host GSU's ids.
    got, want = moved.sparse_features, host.sparse_features
    assert got.keys() == want.keys() == F.lookup_order(want.keys())
    assert torch.equal(got.values(), want.values())
    assert torch.equal(got.lengths(), want.lengths())
    torch.testing.assert_close(moved.topk_scores, host.topk_scores, rtol=0, atol=1e-6)
    for name in ("recent_scores", "labels", "weights", "user_key", "true_prob"):
        assert torch.equal(getattr(moved, name), getattr(host, name)), name


def test_device_gsu_rejects_gsus_with_parameters():
    with pytest.raises(ValueError, match="device GSU runs"):
        DeviceGsu(np.zeros((1, 128), np.int8), np.zeros(1, np.int32), torch.device("cpu"), kind="whole_history")


def test_device_gsu_refuses_a_batch_built_for_another_k_or_kind():
    rng = np.random.default_rng(4)
    scl, item_scl_row = random_scl(rng)
    raw = DeferredGsuBuilder(scl, item_scl_row, recent=RECENT, max_history=MAX_HISTORY, k=K + 1)(
        random_block(rng, num_users=3, max_len=20))
    with pytest.raises(ValueError, match="built for a scl_cosine top-7"):
        DeviceGsu(scl, item_scl_row, torch.device("cpu"), k=K)(raw)
    raw = DeferredGsuBuilder(scl, item_scl_row, recent=RECENT, max_history=MAX_HISTORY, k=K, kind="category")(
        random_block(rng, num_users=3, max_len=20))
    with pytest.raises(ValueError, match="built for a category top-6"):
        DeviceGsu(scl, item_scl_row, torch.device("cpu"), k=K)(raw)
    with pytest.raises(ValueError, match="device GSU runs"):
        DeferredGsuBuilder(scl, item_scl_row, kind="recent_only")


def _raw_batches(count: int):
    rng = np.random.default_rng(8)
    scl, item_scl_row = random_scl(rng)
    builder = DeferredGsuBuilder(scl, item_scl_row, recent=RECENT, max_history=MAX_HISTORY, k=K)
    return scl, item_scl_row, [builder(random_block(rng, num_users=6, max_len=50)) for _ in range(count)]


@pytest.mark.parametrize("device", DEVICES)
def test_gsu_ahead_gives_the_same_batches_in_order(device):
    scl, item_scl_row, raws = _raw_batches(7)
    gsu = DeviceGsu(scl, item_scl_row, torch.device(device), k=K)
    inline = [b.to(torch.device("cpu")) for b in gsu.over(raws)]
    ahead = [b.to(torch.device("cpu")) for b in gsu.ahead(raws, depth=2)]
    assert len(ahead) == len(inline) == 7
    for a, b in zip(inline, ahead):
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
        assert torch.equal(a.topk_scores, b.topk_scores)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gsu_ahead_batches_stay_intact_until_the_consumers_stream_has_read_them():
    """The consumer's stream reads each batch only after a long wait on the GPU, while the host drops
    the batch at once and the thread ahead goes on making batches on its own stream: their memory is
    recorded as used on the consumer's stream (by the thread that made them), so it is not reused
    before that read."""
    scl, item_scl_row, raws = _raw_batches(12)
    gsu = DeviceGsu(scl, item_scl_row, torch.device("cuda"), k=K)
    want = [b.sparse_features.values().cpu() for b in gsu.over(raws)]
    got = []
    for batch in gsu.ahead(raws, depth=2):
        torch.cuda._sleep(50_000_000)  # tens of ms of the consumer's stream before it reads the batch
        got.append(batch.sparse_features.values().clone())
        del batch
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)


def test_gsu_ahead_raises_a_loader_error_in_order_and_stops():
    scl, item_scl_row, raws = _raw_batches(3)

    def failing():
        yield from raws[:2]
        raise RuntimeError("bad shard")

    got = []
    with pytest.raises(RuntimeError, match="bad shard"):
        for batch in DeviceGsu(scl, item_scl_row, torch.device("cpu"), k=K).ahead(failing()):
            got.append(batch)
    assert len(got) == 2


def test_gsu_ahead_stops_its_thread_when_the_consumer_stops():
    import threading

    scl, item_scl_row, raws = _raw_batches(6)
    iterator = iter(DeviceGsu(scl, item_scl_row, torch.device("cpu"), k=K).ahead(raws, depth=1))
    next(iterator)
    iterator.close()
    assert not any(t.name == "gsu-ahead" for t in threading.enumerate())


def test_gsu_ahead_makes_no_batch_while_a_graph_is_captured():
    """The thread draws and makes each batch holding ``CAPTURE_LOCK``, which the training thread's
    graph captures hold: they fail if another thread allocates or synchronises meanwhile."""
    import threading
    import time

    from muse_torchrec.model.cuda_graphs import CAPTURE_LOCK

    held = []

    class Watched(DeviceGsu):
        def __call__(self, raw):
            held.append(CAPTURE_LOCK.locked())
            return super().__call__(raw)

    scl, item_scl_row, raws = _raw_batches(3)
    batches = []
    with CAPTURE_LOCK.capturing():
        consumer = threading.Thread(
            target=lambda: batches.extend(Watched(scl, item_scl_row, torch.device("cpu"), k=K).ahead(raws, depth=1)))
        consumer.start()
        time.sleep(0.5)
        assert held == [] and not batches
    consumer.join(timeout=60)
    assert len(batches) == 3 and held == [True] * 3


class _Tag(str):
    """A stand-in routing: a name, and nothing to record on a stream."""

    def record_stream(self, stream) -> None:
        pass


class _Counted(DeviceGsu):
    """A DeviceGsu that counts the batches it made (``made``: set each time)."""

    def __init__(self, *args, **kwargs) -> None:
        import threading

        super().__init__(*args, **kwargs)
        self.count, self.made = 0, threading.Condition()

    def __call__(self, raw):
        batch = super().__call__(raw)
        with self.made:
            self.count += 1
            self.made.notify_all()
        return batch


@pytest.mark.parametrize("device", DEVICES)
def test_gsu_ahead_routes_in_a_second_thread_while_the_first_makes_the_next_batch(device):
    """Each batch routed in order by a thread of its own, outside ``CAPTURE_LOCK`` (the router holds
    it only while it calls CUDA, given as ``cuda_calls``), while the GSU's thread makes the next
    batch (the router of batch i waits for batch i + 1 to be made: one thread doing both would
    wait forever)."""
    import threading

    from muse_torchrec.model.cuda_graphs import CAPTURE_LOCK

    scl, item_scl_row, raws = _raw_batches(5)
    gsu = _Counted(scl, item_scl_row, torch.device(device), k=K)
    calls = []

    def router(features, cuda_calls):
        index = len(calls)
        with gsu.made:
            overlapped = gsu.made.wait_for(lambda: gsu.count >= min(index + 2, len(raws)), timeout=30)
        free_here = not cuda_calls.held_here()
        calls.append((threading.current_thread().name, free_here, cuda_calls is CAPTURE_LOCK, overlapped))
        return _Tag(f"routing {index} of {features.values().sum().item()}")

    inline = [b.to(torch.device("cpu")) for b in DeviceGsu(scl, item_scl_row, torch.device(device), k=K).over(raws)]
    routed = list(gsu.ahead(raws, depth=1, router=router))
    assert calls == [("route-ahead", True, True, True)] * 5
    assert [b.routing for b in routed] == [f"routing {i} of {b.sparse_features.values().sum().item()}"
                                           for i, b in enumerate(inline)]
    for want, got in zip(inline, routed):
        assert torch.equal(got.sparse_features.values().cpu(), want.sparse_features.values())


def test_gsu_ahead_raises_router_and_loader_errors_in_order_and_stops_both_threads():
    import threading

    scl, item_scl_row, raws = _raw_batches(4)
    gsu = DeviceGsu(scl, item_scl_row, torch.device("cpu"), k=K)

    def failing_loader():
        yield from raws[:2]
        raise RuntimeError("bad shard")

    def failing_router(features, cuda_calls):
        if failing_router.calls == 1:
            raise ValueError("bad routing")
        failing_router.calls += 1
        return _Tag("routing")

    failing_router.calls = 0
    for loader, router, message, before in ((failing_loader(), lambda f, cuda_calls: _Tag("routing"), "bad shard", 2),
                                            (raws, failing_router, "bad routing", 1)):
        got = []
        with pytest.raises((RuntimeError, ValueError), match=message):
            for batch in gsu.ahead(loader, router=router):
                got.append(batch)
        assert len(got) == before
    iterator = iter(gsu.ahead(raws, depth=1, router=lambda f, cuda_calls: _Tag("routing")))
    next(iterator)
    iterator.close()
    assert not any(t.name in ("gsu-ahead", "route-ahead") for t in threading.enumerate())


@pytest.mark.parametrize("overrides,message", [
    (["model.method=din", "data.gsu_placement=device"], "data.gsu_placement=device runs the GSUs"),
    (["model.method=din", "data.gsu_placement=device_inline"], "data.gsu_placement=device_inline runs the GSUs"),
    (["data.gsu_placement=gpu"], "data.gsu_placement: unknown 'gpu'"),
])
def test_trainer_refuses_placements_that_cannot_run(overrides, message):
    """Checked before any data is read or model built."""
    from muse_torchrec.config import load_config
    from muse_torchrec.train.trainer import device_data_bytes

    with pytest.raises(ValueError, match=message):
        device_data_bytes(load_config(None, overrides), data=None)


def test_batch_path_runs_the_device_gsu_ahead_or_in_the_training_thread(tmp_path):
    """``device`` hands the loader to a GsuAhead (its own thread), ``device_inline`` applies the GSU
    as each batch is drawn; both complete the same batches."""
    from muse_torchrec.config import load_config
    from muse_torchrec.data.device_gsu import GsuAhead
    from muse_torchrec.data.loader import make_loader
    from muse_torchrec.train.trainer import batch_path
    from test_packed import small_prepared

    data, _ = small_prepared(tmp_path)
    blocks = [block for block, _ in zip(make_loader(data, "train", 16, lambda b: b), range(3))]
    outputs = {}
    for placement in ("device", "device_inline"):
        cfg = load_config(None, [f"data.gsu_placement={placement}", "data.max_history=50"])
        path = batch_path(cfg, data, torch.device("cpu"))
        raws = [path.transform(block) for block in blocks]
        finished = path.finish(raws)
        assert isinstance(finished, GsuAhead) == (placement == "device")
        outputs[placement] = [batch.topk_scores for batch in finished]
    assert all(torch.equal(a, b) for a, b in zip(outputs["device"], outputs["device_inline"]))
    assert len(outputs["device"]) == 3
