"""Classifier-free guidance in one batched U-Net call equals the two-call result."""

from __future__ import annotations

import pytest
import torch

import unets
from diffusion import GaussianDiffusion
from unets.base import guidance_mix

NAMES = unets.available()


# In float64, so that the comparison sees the arithmetic of guidance and not float32 rounding,
# which differs between batch sizes (other matmul blocking) by about 1e-6 of the output's scale.
DTYPE = torch.float64


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = unets.build(name, preset="debug", cond_dim=16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval().to(DTYPE)


def _inputs(model, batch: int = 3):
    side = model.size_multiple * max(1, 8 // model.size_multiple)
    x = torch.randn(batch, model.config.channels, 2 * model.frame_multiple, side, side, dtype=DTYPE)
    return x, torch.tensor([3.0, 700.5, 250.0][:batch], dtype=DTYPE)


class CallCounter:
    def __init__(self, model):
        self.batches: list[int] = []
        model.register_forward_pre_hook(lambda module, args: self.batches.append(args[0].shape[0]))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tokens", [False, True])
def test_batched_guidance_equals_two_calls(name, tokens):
    model = _model(name)
    x, t = _inputs(model)
    if tokens:
        cond = torch.randn(3, 5, 16, dtype=DTYPE)
        cond_mask = torch.tensor([[True] * 5, [True, True, False, False, False], [True] * 3 + [False] * 2])
    else:
        cond, cond_mask = torch.randn(3, 16, dtype=DTYPE), None
    counter = CallCounter(model)
    with torch.no_grad():
        two = model.forward_with_cond_scale(x, t, cond=cond, cond_mask=cond_mask, cond_scale=4.0, batched=False)
        assert counter.batches == [3, 3]
        one = model.forward_with_cond_scale(x, t, cond=cond, cond_mask=cond_mask, cond_scale=4.0)
        assert counter.batches == [3, 3, 6]
        enable_time = torch.tensor([True, False, True])
        two_mixed = model.forward_with_cond_scale(
            x, t, cond=cond, cond_mask=cond_mask, cond_scale=4.0, batched=False, enable_time=enable_time
        )
        one_mixed = model.forward_with_cond_scale(
            x, t, cond=cond, cond_mask=cond_mask, cond_scale=4.0, batched=True, enable_time=enable_time
        )
    torch.testing.assert_close(one, two, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_mixed, two_mixed, atol=1e-5, rtol=1e-5)
    # Training-time dropout is untouched by the batched call.
    assert "_guidance_keep" not in model.__dict__


def test_out_of_memory_falls_back_to_two_calls(monkeypatch):
    model = _model("unet3d")
    x, t = _inputs(model)
    cond = torch.randn(3, 16, dtype=DTYPE)
    with torch.no_grad():
        expected = model.forward_with_cond_scale(x, t, cond=cond, cond_scale=2.0, batched=False)
    forward = type(model).forward

    def forward_short_of_memory(self, x, *args, **kwargs):
        if x.shape[0] == 6:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", forward_short_of_memory)
    with torch.no_grad():
        with pytest.raises(torch.OutOfMemoryError):
            model.forward_with_cond_scale(x, t, cond=cond, cond_scale=2.0, batched=True)
        got = model.forward_with_cond_scale(x, t, cond=cond, cond_scale=2.0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_guidance_rescale_follows_lin_et_al():
    cond, uncond = torch.randn(2, 3, 4, 4) * 2, torch.randn(2, 3, 4, 4)
    plain = guidance_mix(cond, uncond, 5.0)
    torch.testing.assert_close(plain, uncond + 5.0 * (cond - uncond))
    full = guidance_mix(cond, uncond, 5.0, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))
    half = guidance_mix(cond, uncond, 5.0, 0.5)
    torch.testing.assert_close(half, 0.5 * full + 0.5 * plain)


def test_sampling_with_batched_guidance_equals_two_calls():
    model = _model("unet3d")
    side = model.size_multiple * max(1, 8 // model.size_multiple)
    diffusion = GaussianDiffusion(model, image_size=side, num_frames=2 * model.frame_multiple,
                                  channels=model.config.channels, timesteps=20).to(DTYPE)
    cond = torch.randn(2, 16, dtype=DTYPE)
    outs = [
        diffusion.sample(cond=cond, cond_scale=3.0, sampler="dpmpp_2m", steps=4, batched_guidance=batched,
                         guidance_rescale=0.7, generator=torch.Generator().manual_seed(0))
        for batched in (True, False)
    ]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_float32_batched_guidance_is_within_rounding_of_two_calls():
    model = _model("space_time_unet").float()
    x, t = _inputs(model)
    x, t, cond = x.float(), t.float(), torch.randn(3, 16)
    with torch.no_grad():
        one = model.forward_with_cond_scale(x, t, cond=cond, cond_scale=4.0)
        two = model.forward_with_cond_scale(x, t, cond=cond, cond_scale=4.0, batched=False)
    scale = two.abs().max().item()
    assert (one - two).abs().max().item() <= 1e-5 * max(scale, 1.0)
