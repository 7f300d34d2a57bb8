"""Training an inflated U-Net: gradient checkpointing over 2D blocks and temporal layers, and
the temporal-only weight file applied to a fresh inflate."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from spacetime import inflate
from spacetime.inflate import TemporalAfter
from unets.guards import BadFileError


class Tiny2D(nn.Module):
    """A 2D U-Net-like stack with no checkpointing of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, t=None):
        return self.b(torch.relu(self.a(x)))


def _perturb_temporal(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.temporal_parameters():
            p.add_(0.1 * torch.randn_like(p))


def _grads(model, x, *args, **kwargs):
    model.zero_grad()
    out = model(x, *args, **kwargs)
    out = getattr(out, "sample", out)
    (out.square().mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointed_gradients_equal_plain_ones_without_own_checkpointing():
    model = inflate(Tiny2D(), attns=[])
    _perturb_temporal(model)
    x = torch.randn(2, 3, 4, 8, 8)
    plain = _grads(model, x)
    model.enable_gradient_checkpointing()
    assert all(m.checkpointing == "both" for m in model.modules() if isinstance(m, TemporalAfter))
    checkpointed = _grads(model, x)
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)
    model.disable_gradient_checkpointing()
    assert all(m.checkpointing is None for m in model.modules() if isinstance(m, TemporalAfter))


def test_checkpointed_gradients_equal_plain_ones_on_a_diffusers_unet():
    pytest.importorskip("diffusers")
    from byo_models import tiny_unet2d

    model = inflate(tiny_unet2d())
    _perturb_temporal(model)
    x, t, tokens = torch.randn(1, 4, 3, 8, 8), torch.tensor([7]), torch.randn(1, 3, 32)
    plain = _grads(model, x, t, encoder_hidden_states=tokens)
    model.enable_gradient_checkpointing()
    assert model.model.is_gradient_checkpointing
    checkpointed = _grads(model, x, t, encoder_hidden_states=tokens)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_temporal_file_round_trip_onto_a_fresh_inflate(tmp_path):
    base = Tiny2D()
    trained = inflate(copy.deepcopy(base))
    _perturb_temporal(trained)
    path = trained.save_temporal(tmp_path / "motion.safetensors")
    assert path.stat().st_size < 20_000
    fresh = inflate(copy.deepcopy(base))
    x = torch.randn(1, 3, 4, 8, 8)
    assert not torch.allclose(fresh(x), trained(x))
    fresh.load_temporal(path)
    torch.testing.assert_close(fresh(x), trained(x))
    # The file holds the temporal weights and nothing else.
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        saved = set(handle.keys())
    assert saved == {n for n, p in trained.named_parameters() if any(p is q for q in trained.temporal_parameters())}


def test_temporal_file_errors(tmp_path):
    trained = inflate(Tiny2D())
    path = trained.save_temporal(tmp_path / "motion.safetensors")

    class Other(Tiny2D):
        def __init__(self) -> None:
            super().__init__()
            self.b = nn.Conv2d(8, 3, 5, padding=2)

    with pytest.raises(ValueError, match="different 2D model"):
        inflate(Other()).load_temporal(path)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:50])
    with pytest.raises(BadFileError, match="not a readable safetensors file"):
        inflate(Tiny2D()).load_temporal(broken)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inflate(Tiny2D()).load_temporal(tmp_path / "missing.safetensors")
