"""train.compile_mode: unknown modes are refused before anything is built; "none" stays eager."""

import pytest
import torch

from muse_torchrec.config import load_config
from muse_torchrec.data.batch import sequence_features
from muse_torchrec.model.methods import build_model, get_method
from muse_torchrec.model.muse import DenseTower, compile_tower

from random_data import VOCAB  # noqa: E402


def _model():
    cfg = load_config(None, ["model.k=6", "data.recent=5", "model.mlp=[16]"])
    return build_model(cfg.model, VOCAB, sequence_features(get_method("muse").gsu), 5, 40, device=torch.device("cpu"))


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="train.compile_mode: unknown 'fast'"):
        compile_tower(_model(), "fast")


@pytest.mark.parametrize("mode,compiled", [("none", False), ("default", True), ("reduce-overhead", True)])
def test_compile_tower_compiles_the_tower_in_place(mode, compiled):
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    compile_tower(model, mode)
    tower = next(m for m in model.modules() if isinstance(m, DenseTower))
    assert (tower._compiled_call_impl is not None) == compiled
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints and exports keep their keys
