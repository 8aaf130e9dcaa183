"""GraphedAdam (the dense Adam step as a CUDA graph) against torch's fused Adam, step for step."""

import pytest
import torch
from torchrec.optim.keyed import KeyedOptimizerWrapper

from muse_torchrec.train.dense_sync import GradientAverage
from muse_torchrec.train.graphed_adam import GraphedAdam
from muse_torchrec.train.sharded import dense_adam

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class _FourRanks(GradientAverage):
    """Four ranks without a process group: the others' gradients sum to twice ours."""

    def __init__(self) -> None:
        self.group, self.world_size, self.sums = None, 4, 0

    def sum_over_ranks(self, flat: torch.Tensor) -> None:
        self.sums += 1
        flat.mul_(3.0)


def test_cpu_parameters_are_refused():
    with pytest.raises(ValueError, match="CUDA"):
        GraphedAdam([torch.nn.Parameter(torch.zeros(3))], lr=0.1)


def test_cpu_runs_get_the_plain_adam_whatever_the_compile_mode():
    params = [torch.nn.Parameter(torch.zeros(3))]
    for mode in ("graphs", "none"):
        optimizer = dense_adam(params, 0.1, mode, torch.device("cpu"))
        assert type(optimizer) is torch.optim.Adam and not optimizer.param_groups[0]["fused"]


def test_cpu_runs_average_through_the_pre_step_hook():
    param = torch.nn.Parameter(torch.zeros(3))
    average = _FourRanks()
    optimizer = dense_adam([param], 0.1, "graphs", torch.device("cpu"), average)
    param.grad = torch.ones(3)
    optimizer.step()
    assert average.sums == 1 and torch.equal(param.grad, torch.full((3,), 0.75))


def _params(seed: int, device: torch.device):
    torch.manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2), ()]
    return {f"p{i}": torch.nn.Parameter(torch.randn(s, device=device)) for i, s in enumerate(shapes)}


@needs_cuda
def test_graphed_steps_update_as_fused_adam():
    cuda = torch.device("cuda")
    ours, ref = _params(0, cuda), _params(0, cuda)
    graphed = KeyedOptimizerWrapper(ours, lambda p: GraphedAdam(p, lr=0.01))
    plain = KeyedOptimizerWrapper(ref, lambda p: torch.optim.Adam(p, lr=0.01, fused=True))
    graphs = []
    for step in range(12):
        torch.manual_seed(100 + step)
        grads = {name: torch.randn_like(p) for name, p in ours.items()}
        if step == 4:
            grads["p1"] = None  # a parameter without gradient: an eager step, p1 left alone
        if step == 7:
            for optimizer in (graphed, plain):
                optimizer.param_groups[0]["lr"] = 0.003  # new hyperparameters: captured again
        if step == 9:
            # A checkpoint round trip: KeyedOptimizer copies into the existing state tensors.
            graphed.load_state_dict(plain.state_dict())
        for params in (ours, ref):
            for name, p in params.items():
                # Fresh tensors every step: the graph must not depend on where gradients live.
                p.grad = None if grads[name] is None else grads[name].clone()
        graphed.step()
        plain.step()
        graphs.append(graphed._optimizer._graph)
        for name in ours:
            torch.testing.assert_close(ours[name], ref[name], rtol=1e-6, atol=1e-7, msg=f"step {step} {name}")
            for key in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(graphed.state[ours[name]][key], plain.state[ref[name]][key],
                                           rtol=1e-6, atol=1e-7)
    # Steps 0 (no state yet) and 4 (a missing gradient) ran eagerly; captures at steps 1 and 7 only.
    assert graphs[0] is None and graphs[1] is graphs[3] is graphs[4] is graphs[6]
    assert graphs[7] is not graphs[6] and graphs[7] is graphs[11]


@needs_cuda
def test_torchs_own_state_loading_drops_the_graph():
    cuda = torch.device("cuda")
    params = list(_params(0, cuda).values())
    optimizer = GraphedAdam(params, lr=0.01)
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
    assert optimizer._graph is not None
    optimizer.load_state_dict(optimizer.state_dict())  # new state tensors
    assert optimizer._graph is None


@needs_cuda
def test_averaged_graphed_steps_update_as_fused_adam_after_the_hook():
    """With ``average`` the graph sums its own flat gradient buffer over the ranks and divides it: the
    same updates as fused Adam after ``GradientAverage``'s pre-step hook, eager first step included;
    the sum is called once eagerly (the first step) and once inside the capture, whose replays sum
    every later step's gradients."""
    cuda = torch.device("cuda")
    ours, ref = list(_params(0, cuda).values()), list(_params(0, cuda).values())
    averages = _FourRanks(), _FourRanks()
    graphed = GraphedAdam(ours, average=averages[0], lr=0.01)
    plain = torch.optim.Adam(ref, lr=0.01, fused=True)
    plain.register_step_pre_hook(averages[1])
    for step in range(6):
        torch.manual_seed(200 + step)
        grads = [torch.randn_like(p) for p in ours]
        for params in (ours, ref):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        graphed.step()
        plain.step()
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"step {step}")
    assert graphed._graph is not None and averages[0].sums == 2 and averages[1].sums == 6


@needs_cuda
def test_parameters_of_several_dtypes_are_refused():
    params = [torch.nn.Parameter(torch.zeros(2, device="cuda")),
              torch.nn.Parameter(torch.zeros(2, device="cuda", dtype=torch.float64))]
    with pytest.raises(ValueError, match="one flat buffer: parameters of one dtype"):
        GraphedAdam(params, lr=0.1)


@needs_cuda
def test_the_graphs_are_captured_holding_the_capture_lock(monkeypatch):
    """The data path's thread makes no batch meanwhile (``cuda_graphs.CAPTURE_LOCK``)."""
    from muse_torchrec.model.cuda_graphs import CAPTURE_LOCK, GraphedFunction

    held, graph, graphed_callables = [], torch.cuda.graph, torch.cuda.make_graphed_callables

    def watched_graph(*args, **kwargs):
        held.append(("graph", CAPTURE_LOCK.locked()))
        return graph(*args, **kwargs)

    def watched_callables(*args, **kwargs):
        held.append(("callables", CAPTURE_LOCK.locked()))
        return graphed_callables(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "graph", watched_graph)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", watched_callables)
    params = list(_params(0, torch.device("cuda")).values())
    optimizer = GraphedAdam(params, lr=0.01)
    for _ in range(2):  # the first step makes the state, the second captures
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
    layer = torch.nn.Linear(4, 3).cuda()
    GraphedFunction(layer, layer.forward)(torch.randn(2, 4, device="cuda", requires_grad=True)).sum().backward()
    assert {kind for kind, _ in held} == {"graph", "callables"} and all(locked for _, locked in held), held
    assert not CAPTURE_LOCK.locked()
