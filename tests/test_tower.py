"""train.compile_mode: unknown modes are refused before anything is built; "none" stays eager;
"graphs" (CUDA graphs of the compiled tower) trains as the compiled tower does (GPU; with the padding
of the lookups in the graphs: tests/test_row_layout.py)."""

import pytest
import torch

from muse_torchrec.config import load_config
from muse_torchrec.data.batch import sequence_features
from muse_torchrec.model.methods import build_model, get_method
from muse_torchrec.model.muse import DenseTower, compile_tower

from random_data import VOCAB  # noqa: E402

CPU = torch.device("cpu")


def _model():
    cfg = load_config(None, ["model.k=6", "data.recent=5", "model.mlp=[16]"])
    return build_model(cfg.model, VOCAB, sequence_features(get_method("muse").gsu), 5, 40, device=CPU)


def _tower(model) -> DenseTower:
    return next(m for m in model.modules() if isinstance(m, DenseTower))


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="train.compile_mode: unknown 'fast'"):
        compile_tower(_model(), "fast", CPU)


def test_graphs_on_cpu_are_refused():
    with pytest.raises(ValueError, match="'graphs' captures CUDA graphs; this run trains on cpu"):
        compile_tower(_model(), "graphs", CPU)


@pytest.mark.parametrize("mode,compiled", [("none", False), ("default", True), ("reduce-overhead", True)])
def test_compile_tower_compiles_the_tower_in_place(mode, compiled):
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    compile_tower(model, mode, CPU)
    assert (_tower(model)._compiled_call_impl is not None) == compiled
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints and exports keep their keys


def _tower_inputs(seed: int, batch: int, side_dim: int, device: torch.device):
    """Random tower inputs of the test model's shapes (E = 2 * 16, K = 6, R = 5)."""
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(batch, 32, generator=g), torch.randn(batch, 6, 32, generator=g),
               torch.randint(0, 7, (batch,), generator=g), torch.rand(batch, 6, generator=g),
               torch.randn(batch, 5, 32, generator=g), torch.randint(0, 6, (batch,), generator=g),
               torch.rand(batch, 5, generator=g), torch.randn(batch, side_dim, generator=g)]
    grads = (True, True, False, False, True, False, False, True)
    return [t.to(device).requires_grad_(r) for t, r in zip(tensors, grads)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_tower_trains_as_the_compiled_tower():
    """Eight Adam steps on random batches: the graphed tower's logits, input gradients, parameters
    and BatchNorm statistics follow the compiled tower's (the same compiled function, not replayed
    from graphs); another batch size and eval mode run the compiled tower itself."""
    cuda = torch.device("cuda")
    towers = {}
    for mode in ("compiled", "graphs"):
        torch.manual_seed(0)
        model = _model().to(cuda)
        side_dim = model.model.sparse_arch.side_dim
        compile_tower(model, "graphs", cuda, pad_in_graphs=False)  # the tower's own graphs
        towers[mode] = _tower(model)
    optimizers = {mode: torch.optim.Adam(t.parameters(), lr=1e-2) for mode, t in towers.items()}
    for step in range(8):
        batch = 64 if step != 5 else 48  # step 5: a shape the graphs were not captured for
        out = {}
        for mode, tower in towers.items():
            inputs = _tower_inputs(step, batch, side_dim, cuda)
            logits = tower.graphs.fn(*inputs) if mode == "compiled" else tower.graphs(*inputs)
            weights = torch.linspace(-1, 1, batch, device=cuda)
            optimizers[mode].zero_grad()
            (logits * weights).sum().backward()
            optimizers[mode].step()
            out[mode] = [logits.detach()] + [t.grad for t in inputs if t.requires_grad]
        for a, b in zip(out["compiled"], out["graphs"]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(towers["compiled"].state_dict().values(), towers["graphs"].state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert towers["graphs"].graphs.graphed is not None and towers["compiled"].graphs.graphed is None
    for tower in towers.values():
        tower.eval()
    with torch.no_grad():
        inputs = _tower_inputs(9, 64, side_dim, cuda)
        torch.testing.assert_close(towers["graphs"](*_as_sequence(inputs)), towers["compiled"].graphs.fn(*inputs))


def _as_sequence(inputs):
    from muse_torchrec.model.esu import SequenceInputs

    return SequenceInputs(*inputs[:7]), inputs[7]
