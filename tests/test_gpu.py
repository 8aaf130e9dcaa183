"""GPU-only checks (skipped without CUDA): device results equal the CPU reference."""

import pytest
import torch

from muse_torchrec.model.gsu import muse_gsu, serving_topk
from muse_torchrec.model.serving_keys import fused_keys_supported, serving_keys, serving_keys_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(users: int, samples: int, length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(-127, 128, (users, length, 128), dtype=torch.int8, generator=g)
    hist[:, ::7] = hist[:, :1]  # duplicates: exact ties
    hist[:, 3::11] = 0  # missing vectors
    target = torch.randint(-127, 128, (samples, 128), dtype=torch.int8, generator=g)
    sample_user = torch.arange(samples) * users // samples
    lengths = torch.randint(0, length + 1, (users,), generator=g)
    return hist, lengths, target, sample_user


def test_gpu_muse_gsu_is_bit_identical_to_cpu():
    hist, lengths, target, su = _inputs(20, 200, 1000, 0)
    cpu = muse_gsu(hist, lengths, target, su, 50)
    gpu = muse_gsu(hist.cuda(), lengths.cuda(), target.cuda(), su.cuda(), 50)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())


def test_gpu_serving_topk_int8_gemm_matches_exact_gsu():
    hist, _, target, _ = _inputs(1, 1000, 4096, 1)
    hist = hist[0]
    hist[::7] = torch.randint(-127, 128, (hist[::7].shape[0], 128), dtype=torch.int8)  # no ties here
    fast = serving_topk(hist.cuda(), 4000, target.cuda(), 50)
    exact = muse_gsu(hist.unsqueeze(0), torch.tensor([4000]), target, torch.zeros(1000, dtype=torch.long), 50)
    torch.testing.assert_close(fast.scores.cpu(), exact.scores, rtol=0, atol=1e-6)
    # Cosines that differ by less than float32 resolution may swap (serving_topk ranks by dot / |h|,
    # muse_gsu by the rounded cosine, then recency): each pick must still have its slot's cosine.
    indices = fast.indices.cpu()
    assert (indices != exact.indices).float().mean() < 1e-3
    picked = hist[indices].double()
    cosine = (picked * target.double().unsqueeze(1)).sum(-1) / (
        picked.norm(dim=-1).clamp_min(1) * target.double().norm(dim=-1, keepdim=True))
    scored = torch.arange(50) < fast.scored_lengths.cpu().unsqueeze(1)
    torch.testing.assert_close(torch.where(scored, cosine, 0.0).float(), exact.scores, rtol=0, atol=1e-6)
    assert all(len(set(row)) == 50 for row in indices.tolist())


@pytest.mark.parametrize("candidates,width,block", [(1000, 100_096, 128), (37, 4096, 64), (200, 2048, 256)])
def test_fused_serving_keys_are_bit_identical_to_the_torch_passes(candidates, width, block):
    g = torch.Generator().manual_seed(width)
    hist = torch.randint(-127, 128, (width, 128), dtype=torch.int8, generator=g)
    hist[5::9] = 0
    cands = torch.randint(-127, 128, (candidates, 128), dtype=torch.int8, generator=g)
    scale = torch.rand(width, generator=g)
    scale[5::9] = 0.0
    bias = torch.where(scale > 0, 0.0, -4096.0 - torch.arange(width, dtype=torch.float32))
    bias[-100:] = -float("inf")
    args = [t.cuda() for t in (cands, hist, scale, bias)]
    assert fused_keys_supported(args[0], block)
    keys, block_max = serving_keys(*args, block)
    ref_keys, ref_max = serving_keys_reference(*args, block)
    assert torch.equal(keys, ref_keys)
    assert torch.equal(block_max, ref_max)


def _gsu_batches(count: int, pad_to: int, seed: int):
    import numpy as np

    from muse_torchrec.data.device_gsu import DeferredGsuBuilder
    from random_data import random_block, random_scl

    rng = np.random.default_rng(seed)
    scl, item_scl_row = random_scl(rng)
    builder = DeferredGsuBuilder(scl, item_scl_row, recent=5, max_history=40, pad_to=pad_to, k=6)
    # 2-15 users a batch: the graph's buffers are filled to different depths.
    return scl, item_scl_row, [builder(random_block(rng, num_users=2 + 13 * (i % 2), max_len=70)) for i in range(count)]


@pytest.mark.parametrize("graphed", [False, True])
def test_device_gsu_never_waits_for_the_device(graphed):
    """MUSE's device GSU reads nothing back from the GPU: a sync there would stall the CPU until the
    previous training step finished (sync debug mode "error" raises on any synchronizing call)."""
    from muse_torchrec.data.device_gsu import DeviceGsu

    scl, item_scl_row, (raw,) = _gsu_batches(1, pad_to=48, seed=0)
    gsu = DeviceGsu(scl, item_scl_row, torch.device("cuda"), k=6, kind="scl_cosine",
                    graph_shape=(48, 40) if graphed else None)
    expected = gsu(raw).to(torch.device("cpu"))
    raw = raw.pin_memory()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = gsu(raw)
        # TorchRec's input distribution splits the KJT by these: host numbers, never read back.
        batch.sparse_features.length_per_key()
        batch.sparse_features.offset_per_key()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(batch.sparse_features.values().cpu(), expected.sparse_features.values())


def test_graphed_device_gsu_equals_eager():
    """The CUDA-graph selection (compiled, static buffers) gives the eager grouped muse_gsu's batches
    exactly, batch after batch with different user counts, and a batch of another size falls back."""
    from muse_torchrec.data.device_gsu import DeviceGsu

    scl, item_scl_row, raws = _gsu_batches(6, pad_to=48, seed=1)
    cuda = torch.device("cuda")
    eager = DeviceGsu(scl, item_scl_row, cuda, k=6)
    graphed = DeviceGsu(scl, item_scl_row, cuda, k=6, graph_shape=(48, 40))
    _, _, (other_size,) = _gsu_batches(1, pad_to=30, seed=2)
    kept = [graphed(raw) for raw in raws + [other_size]]  # all replayed before any is read
    for raw, got in zip(raws + [other_size], kept):
        want = eager(raw)
        assert torch.equal(got.sparse_features.values(), want.sparse_features.values())
        assert torch.equal(got.sparse_features.lengths(), want.sparse_features.lengths())
        assert torch.equal(got.topk_scores, want.topk_scores)
    assert graphed.graphed is not None and not graphed.graphed.fits(other_size.to(cuda))
