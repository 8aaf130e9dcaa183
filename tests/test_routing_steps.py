"""The router's tensor work compiled by TorchScript (``routing_steps.scripted()``) against the same
functions run as Python (``routing_steps.EAGER``), on random inputs. tests/test_routing.py routes
whole batches over two ranks both ways."""

import numpy as np
import pytest
import torch

from muse_torchrec.data import routing_steps

SCRIPTED = routing_steps.scripted()
RNG_SEEDS = range(5)


def _equal(got, want) -> bool:
    return all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def _random_kjt(rng: np.random.Generator, count: int, batch: int, vocab: int):
    lengths = torch.from_numpy(rng.integers(0, 6, size=count * batch))
    values = torch.from_numpy(rng.integers(0, vocab, size=int(lengths.sum())))
    return values, lengths


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_distinct_ids_as_python(seed):
    rng = np.random.default_rng(seed)
    count, batch = int(rng.integers(1, 5)), int(rng.integers(1, 7))
    values, lengths = _random_kjt(rng, count, batch, vocab=9)  # repeats within and across features
    got, want = SCRIPTED.distinct(values, lengths, count, batch), routing_steps.EAGER.distinct(values, lengths, count, batch)
    assert _equal(got, want)
    unique, spread, inverse = got
    # Each feature's ids are its distinct ids; every id finds its own.
    offsets = np.concatenate([[0], np.cumsum(lengths.view(count, batch).sum(1).numpy())])
    unique_offsets = np.concatenate([[0], np.cumsum(spread.view(count, batch).sum(1).numpy())])
    for f in range(count):
        ids = values[offsets[f]:offsets[f + 1]]
        assert unique[unique_offsets[f]:unique_offsets[f + 1]].tolist() == sorted(set(ids.tolist()))
    assert torch.equal(unique[inverse], values)


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_bucketised_and_lengths_to_send_as_python(seed):
    rng = np.random.default_rng(seed)
    count, batch, world_size = int(rng.integers(1, 5)), int(rng.integers(1, 7)), int(rng.integers(1, 5))
    block_sizes = torch.from_numpy(rng.integers(1, 8, size=count))
    values, lengths = _random_kjt(rng, count, batch, vocab=int(block_sizes.min()) * world_size)
    got = SCRIPTED.bucketised(lengths, values, block_sizes, world_size, False)
    assert _equal(got, routing_steps.EAGER.bucketised(lengths, values, block_sizes, world_size, False))
    bucket_lengths, ids, restore = got
    assert bucket_lengths.shape == (world_size * count * batch,) and ids.numel() == values.numel()
    sent, outgoing, received = SCRIPTED.lengths_to_send(bucket_lengths, world_size, False)
    want_sent, want_outgoing, want_received = routing_steps.EAGER.lengths_to_send(bucket_lengths, world_size, False)
    assert _equal((sent, outgoing), (want_sent, want_outgoing)) and received.shape == want_received.shape
    per_rank = outgoing.view(world_size, -1)
    assert (per_rank[:, 0] == sent.max()).all() and torch.equal(per_rank[:, 1:].sum(1), sent)


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_read_order_as_python(seed):
    rng = np.random.default_rng(seed)
    count, batch, world_size = int(rng.integers(1, 5)), int(rng.integers(1, 7)), int(rng.integers(1, 5))
    lengths = torch.from_numpy(rng.integers(0, 4, size=(world_size, count * batch)))
    received = torch.cat([lengths.sum(1, keepdim=True), lengths], 1)
    received_ids = torch.from_numpy(rng.integers(0, 100, size=int(lengths.sum())))
    feature_major = torch.tensor([r * count + f for f in range(count) for r in range(world_size)], dtype=torch.int32)
    args = (received, received_ids, torch.device("cpu"), feature_major, world_size, count, batch)
    got = SCRIPTED.read_order(*args)
    assert _equal(got, routing_steps.EAGER.read_order(*args))
    values, read_lengths, order, as_received = got
    # Feature-major: per feature, every source rank's ids in turn; as_received inverts order.
    parts = received_ids.split(lengths.view(world_size, count, batch).sum(2).view(-1).tolist())
    assert torch.equal(values, torch.cat([parts[r * count + f] for f in range(count) for r in range(world_size)]))
    assert torch.equal(read_lengths, lengths.view(world_size, count, batch).transpose(0, 1).reshape(-1))
    assert torch.equal(as_received[order], torch.arange(order.numel()))


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_fixed_layout_as_python(seed):
    rng = np.random.default_rng(seed)
    world_size = int(rng.integers(1, 5))
    received, sent = (rng.integers(0, 6, size=world_size).tolist() for _ in range(2))
    capacity = max(received + sent) + int(rng.integers(0, 3))
    as_received = torch.from_numpy(rng.permutation(sum(received)))
    ids = sum(sent) + int(rng.integers(0, 4))
    restore = torch.from_numpy(rng.integers(0, max(sum(sent), 1), size=ids if sum(sent) else 0))
    args = (received, sent, capacity, world_size, as_received, restore, ids + 3)
    got = SCRIPTED.fixed_layout(*args)
    assert _equal(got, routing_steps.EAGER.fixed_layout(*args))
    send_slots, row_slots, order = got
    slots = world_size * capacity
    assert send_slots.shape == (slots,) and row_slots.shape == (slots + 1,) and order.shape == (ids + 4,)
    assert (order[restore.numel():] == slots).all()


@pytest.mark.parametrize("positions", [routing_steps.padded_positions,
                                       torch.jit.script(routing_steps.padded_positions)], ids=["eager", "scripted"])
def test_padded_positions_skip_empty_parts(positions):
    """Rows part after part (parts 0 and 2 from rank 0, 1 and 3 from rank 1), 5 places per rank:
    each row at its rank's places, in order; an empty part takes none."""
    assert positions([2, 0, 3, 1], 5, 2, torch.device("cpu")).tolist() == [0, 1, 0, 1, 2, 5]


def test_padded_positions_equal_a_plain_loop_on_random_parts():
    rng = np.random.default_rng(3)
    for world_size in (1, 2, 3, 8):
        counts = rng.integers(0, 6, size=2 * world_size).tolist()
        capacity = max(counts) + int(rng.integers(0, 3))
        want = [(part % world_size) * capacity + i for part, count in enumerate(counts) for i in range(count)]
        got = routing_steps.padded_positions(counts, capacity, world_size, torch.device("cpu"))
        assert got.tolist() == want, (counts, capacity)
