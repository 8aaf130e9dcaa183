"""Host work of one training step, counted: autograd nodes and ATen ops of the unsharded model.

On a GPU the training step is bound by host time, which grows with every op dispatched and every
autograd node run. These counts are exact and the same on any machine, so a change to the model's
host work can be checked on the development CPU before it is timed on a GPU (``bench_train.py``).
The dense tower runs eagerly here; with ``train.compile_mode: graphs`` its forward and backward are
one graph replay each on the GPU, so the counts outside it are what a GPU step dispatches op by op.

    python benchmarks/count_ops.py --config configs/taobao_mm_p90.yaml
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench_train import Shapes, staged_batches
from muse_torchrec import features as F
from muse_torchrec.config import load_config
from muse_torchrec.data.batch import sequence_features
from muse_torchrec.model.methods import build_model, get_method


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: Optional[Dict[str, Any]] = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


def autograd_nodes(root: torch.autograd.graph.Node) -> int:
    """Nodes of the autograd graph reachable from ``root`` (what a backward from it runs)."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(child for child, _ in node.next_functions)
    return len(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/taobao_mm_p90.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--batch-size", type=int, default=64, help="samples (the counts do not depend on it)")
    parser.add_argument("--history", type=int, default=200)
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    vocab = {t.name: 1000 for t in F.TABLES}
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, vocab, sequence_features(get_method(cfg.model.method).gsu), cfg.data.recent,
                        args.history, device=torch.device("cpu"))
    shapes = Shapes(args.batch_size, args.history, samples_per_user=8, num_scl_rows=1000)
    batch = staged_batches(cfg, vocab, shapes, count=1, seed=0, device=torch.device("cpu"))[0]
    model(batch)[0].backward()  # a first step outside the count: lazily built state
    with OpCounter() as forward:
        loss, _ = model(batch)
    nodes = autograd_nodes(loss.grad_fn)
    with OpCounter() as backward:
        loss.backward()
    print(f"{cfg.model.method}: {nodes} autograd nodes, {forward.ops} ATen ops forward, {backward.ops} backward")


if __name__ == "__main__":
    main()
