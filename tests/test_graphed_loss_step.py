"""``cuda_graphs.GraphedLossStep`` (a loss's forward and backward as one CUDA graph) against the same
function run by autograd: the loss, the differentiable inputs' gradients, the parameters' gradients
(scaled by the loss's gradient, accumulated where ``.grad`` is set), parameters and BatchNorm
statistics after Adam steps; other shapes and eval mode run the function itself; a loss whose graph
was replayed again cannot be differentiated; CPU inputs are refused."""

import pytest
import torch
from torch import nn

from muse_torchrec.model.cuda_graphs import GraphedLossStep

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # No bias before BatchNorm: its gradient is 0 up to rounding, whose sign Adam would follow.
        self.hidden = nn.Linear(8, 16, bias=False)
        self.norm = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 1)
        self.unused = nn.Linear(3, 3)  # no gradient, as autograd gives none

    def loss(self, rows: torch.Tensor, labels: torch.Tensor):
        logits = self.out(torch.relu(self.norm(self.hidden(rows)))).squeeze(1)
        return nn.functional.binary_cross_entropy_with_logits(logits, labels), logits.detach()


def _inputs(step: int, batch: int, device: torch.device):
    generator = torch.Generator().manual_seed(step)
    rows = torch.randn(batch, 8, generator=generator).to(device).requires_grad_()
    labels = torch.randint(0, 2, (batch,), generator=generator).float().to(device)
    return rows, labels


@needs_cuda
def test_graphed_loss_step_trains_as_autograd():
    cuda = torch.device("cuda")
    nets = {}
    for mode in ("autograd", "graph"):
        torch.manual_seed(0)
        nets[mode] = _Net().to(cuda)
    graphed = GraphedLossStep(nets["graph"], nets["graph"].loss)
    optimizers = {mode: torch.optim.Adam(net.parameters(), lr=1e-2) for mode, net in nets.items()}
    for step in range(8):
        batch = 32 if step != 5 else 24  # step 5: a shape the graph was not captured for
        scale = 1.0 if step % 2 else 3.0  # the loss's gradient scales every gradient
        out = {}
        for mode, net in nets.items():
            rows, labels = _inputs(step, batch, cuda)
            loss, logits = net.loss(rows, labels) if mode == "autograd" else graphed(rows, labels)
            optimizers[mode].zero_grad()
            (loss * scale).backward()
            out[mode] = [loss.detach(), logits, rows.grad] + [p.grad for p in net.parameters() if p.grad is not None]
            optimizers[mode].step()
        assert len(out["graph"]) == len(out["autograd"]) == 3 + 5  # the unused layer has no gradient
        for want, got in zip(out["autograd"], out["graph"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert graphed.graph is not None and graphed.replays == 7
    for want, got in zip(nets["autograd"].state_dict().values(), nets["graph"].state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for net in nets.values():
        net.eval()
    rows, labels = _inputs(9, 32, cuda)
    torch.testing.assert_close(graphed(rows, labels)[0], nets["autograd"].loss(rows, labels)[0])
    assert graphed.replays == 7  # eval: the function itself


@needs_cuda
def test_graphed_loss_step_accumulates_into_set_gradients():
    """Two backwards without zeroing in between: the parameters' gradients add up, as autograd's do
    (no step between them: train-mode BatchNorm's gradients read the batch's statistics only)."""
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    net = _Net().to(cuda)
    graphed = GraphedLossStep(net, net.loss)
    graphed(*_inputs(0, 32, cuda))[0].backward()  # captures
    params = [p for p in net.parameters() if p.grad is not None]
    for p in params:
        p.grad = None
    graphed(*_inputs(1, 32, cuda))[0].backward()
    first = [p.grad.clone() for p in params]
    graphed(*_inputs(2, 32, cuda))[0].backward()
    second = torch.autograd.grad(net.loss(*_inputs(2, 32, cuda))[0], params)
    for p, a, b in zip(params, first, second):
        torch.testing.assert_close(p.grad, a + b, rtol=1e-5, atol=1e-6)


@needs_cuda
def test_a_loss_replayed_over_cannot_be_differentiated():
    cuda = torch.device("cuda")
    net = _Net().to(cuda)
    graphed = GraphedLossStep(net, net.loss)
    first, _ = graphed(*_inputs(0, 32, cuda))
    graphed(*_inputs(1, 32, cuda))
    with pytest.raises(RuntimeError, match="replayed again since"):
        first.backward()


def test_graphed_loss_step_refuses_cpu_inputs():
    net = _Net()
    with pytest.raises(ValueError, match="CUDA graphs need every input on a CUDA device"):
        GraphedLossStep(net, net.loss)(*_inputs(0, 8, torch.device("cpu")))
