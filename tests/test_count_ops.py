"""benchmarks/count_ops.py: the counters count what they say, and the script runs on the p90 config."""

import subprocess
import sys

import torch

import tiny_run

sys.path.insert(0, str(tiny_run.ROOT / "benchmarks"))
from count_ops import OpCounter, autograd_nodes  # noqa: E402


def test_counters_on_a_known_graph():
    x = torch.ones(3, requires_grad=True)
    with OpCounter() as forward:
        y = (x * 2).sum()
    # SumBackward0 -> MulBackward0 -> AccumulateGrad of x
    assert forward.ops == 2 and autograd_nodes(y.grad_fn) == 3
    with OpCounter() as backward:
        y.backward()
    assert backward.ops > 0 and torch.equal(x.grad, torch.full((3,), 2.0))


def test_the_script_counts_the_p90_model():
    out = subprocess.run([sys.executable, "benchmarks/count_ops.py", "--config", "configs/taobao_mm_p90.yaml",
                          "--batch-size", "16", "--history", "40"],
                         cwd=tiny_run.ROOT, capture_output=True, text=True, check=True).stdout
    assert out.startswith("muse: ") and "autograd nodes" in out
