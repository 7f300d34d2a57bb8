"""The Unet3D constructions of video-diffusion-pytorch's README (shared/seeds), with only the
import line changed, build and run one forward on the README's shapes at a random timestep.
(The GaussianDiffusion half of those examples is tested with the diffusion package.)"""

from __future__ import annotations

import pytest
import torch

from unets import Unet3D


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # On a shared CPU extra threads slow these forwards down; restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _timesteps(batch: int) -> torch.Tensor:
    return torch.randint(0, 1000, (batch,))


def test_readme_unconditional_unet():
    torch.manual_seed(0)
    model = Unet3D(
        dim=64,
        dim_mults=(1, 2, 4, 8),
    )
    videos = torch.randn(1, 3, 5, 32, 32)  # (batch, channels, frames, height, width)
    out = model(videos, _timesteps(1))
    assert out.shape == videos.shape and torch.isfinite(out).all()
    assert not model.has_cond
    # The README trains it: gradients reach the first and the last layer.
    out.mean().backward()
    assert model.init_conv.weight.grad.abs().sum() > 0 and model.final_conv.weight.grad.abs().sum() > 0


def test_readme_conditional_unet():
    torch.manual_seed(0)
    model = Unet3D(
        dim=64,
        cond_dim=64,
        dim_mults=(1, 2, 4, 8),
    )
    videos = torch.randn(2, 3, 5, 32, 32)
    text = torch.randn(2, 64)  # "assume output of BERT-large has dimension of 64"
    with torch.no_grad():
        # The sampling call of the README's diffusion.sample(cond=text, cond_scale=2).
        guided = model.forward_with_cond_scale(videos, _timesteps(2), cond=text, cond_scale=2.0)
    assert guided.shape == (2, 3, 5, 32, 32)
    assert torch.isfinite(guided).all()


def test_readme_text_unet():
    torch.manual_seed(0)
    model = Unet3D(
        dim=64,
        use_bert_text_cond=True,  # sized for this library's default text encoder
        dim_mults=(1, 2, 4, 8),
    )
    assert model.cond_dim == 384
    videos = torch.randn(3, 3, 5, 32, 32)
    # The strings of the README are encoded by the diffusion process; the U-Net receives the
    # encoder's token embeddings and their mask (here random, of the encoder's width).
    tokens = torch.randn(3, 7, 384)
    mask = torch.arange(7) < torch.tensor([[3], [7], [5]])
    with torch.no_grad():
        out = model(videos, _timesteps(3), cond=tokens, cond_mask=mask)
    assert out.shape == (3, 3, 5, 32, 32) and torch.isfinite(out).all()
