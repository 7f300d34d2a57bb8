"""Diffusers-style U-Nets (plain and inflated) under the call convention, and the VAE wrapper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

from byo_models import CROSS_DIM, tiny_unet2d, tiny_vae  # noqa: E402
from diffusion import GaussianDiffusion  # noqa: E402
from diffusion.denoiser import DiffusersDenoiser, as_denoiser  # noqa: E402
from diffusion.guidance import guided_output  # noqa: E402
from diffusion.latent import VideoVAE  # noqa: E402
from spacetime import inflate  # noqa: E402
from unets import build  # noqa: E402


def _per_frame(unet, x, t, tokens):
    b, _, f = x.shape[:3]
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * f, *x.shape[1:2], *x.shape[3:])
    out = unet(frames, t.repeat_interleave(f), encoder_hidden_states=tokens.repeat_interleave(f, 0)).sample
    return out.reshape(b, f, *out.shape[1:]).permute(0, 2, 1, 3, 4)


def test_library_unets_pass_through_unchanged():
    unet = build("unet3d", preset="debug")
    assert as_denoiser(unet) is unet
    with pytest.raises(TypeError, match="already follows the call convention"):
        as_denoiser(unet, null_cond=torch.zeros(1, 4))
    with pytest.raises(TypeError, match="nn.Module"):
        as_denoiser("unet")


@pytest.mark.parametrize("inflated", [False, True])
def test_adapter_equals_the_diffusers_call_per_frame(inflated):
    unet = tiny_unet2d()
    reference = tiny_unet2d()
    model = inflate(unet) if inflated else unet
    denoiser = as_denoiser(model)
    assert isinstance(denoiser, DiffusersDenoiser) and denoiser.cond_format == "tokens"
    x, t, tokens = torch.randn(2, 4, 3, 8, 8), torch.tensor([5, 900]), torch.randn(2, 6, CROSS_DIM)
    with torch.no_grad():
        torch.testing.assert_close(denoiser(x, t, cond=tokens), _per_frame(reference, x, t, tokens))


def test_null_condition_zeros_by_default_and_settable():
    denoiser = as_denoiser(inflate(tiny_unet2d()))
    x, t, tokens = torch.randn(2, 4, 2, 8, 8), torch.tensor([10, 20]), torch.randn(2, 5, CROSS_DIM)
    with torch.no_grad():
        dropped = denoiser(x, t, cond=tokens, null_cond_prob=1.0)
        zeros = denoiser(x, t, cond=torch.zeros(2, 1, CROSS_DIM))
        torch.testing.assert_close(dropped, zeros)
        torch.testing.assert_close(denoiser(x, t), zeros)
        empty = torch.randn(7, CROSS_DIM)
        denoiser.set_null_cond(empty)
        torch.testing.assert_close(
            denoiser(x, t, cond=tokens, null_cond_prob=1.0), denoiser(x, t, cond=empty.expand(2, -1, -1))
        )
        guided = guided_output(denoiser, x, t, cond=tokens, cond_scale=3.0)
        cond_out, null_out = denoiser(x, t, cond=tokens), denoiser(x, t, cond=empty.expand(2, -1, -1))
        torch.testing.assert_close(guided, null_out + 3.0 * (cond_out - null_out), rtol=1e-4, atol=1e-5)
    assert "null_cond" in denoiser.state_dict()


def test_adapter_errors_are_clear():
    denoiser = as_denoiser(inflate(tiny_unet2d()))
    x, t = torch.randn(1, 4, 2, 8, 8), torch.tensor([3])
    with pytest.raises(ValueError, match=r"cross_attention_dim=32"):
        denoiser(x, t, cond=torch.randn(1, 3, 16))
    with pytest.raises(TypeError, match="focus_present_mask"):
        denoiser(x, t, focus_present_mask=torch.ones(1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"null_cond must be token embeddings \(L, 32\)"):
        denoiser.set_null_cond(torch.zeros(3, 16))


def test_gaussian_diffusion_adapts_automatically_and_trains_on_latents():
    diffusion = GaussianDiffusion(
        inflate(tiny_unet2d()), image_size=16, num_frames=2, channels=3, vae=tiny_vae(), null_cond_prob=0.5
    )
    assert isinstance(diffusion.denoise_fn, DiffusersDenoiser)
    assert diffusion.latent_hw == (8, 8) and diffusion.latent_channels == 4
    assert not any("vae" in key for key in diffusion.state_dict())
    videos = torch.rand(2, 3, 2, 16, 16)
    loss = diffusion(videos, cond=torch.randn(2, 4, CROSS_DIM))
    loss.backward()
    latents = diffusion.encode_latents(videos)
    torch.manual_seed(0)
    from_pixels = diffusion(videos, cond=torch.randn(2, 4, CROSS_DIM), times=torch.tensor([1, 2]))
    torch.manual_seed(0)
    from_latents = diffusion(latents, cond=torch.randn(2, 4, CROSS_DIM), times=torch.tensor([1, 2]), encoded=True)
    torch.testing.assert_close(from_pixels, from_latents)
    samples = diffusion.sample(cond=torch.randn(1, 4, CROSS_DIM), cond_scale=2.0, sampler="ddim", steps=2)
    assert samples.shape == (1, 3, 2, 16, 16) and 0 <= samples.min() and samples.max() <= 1


def test_latent_channel_mismatch_is_refused():
    with pytest.raises(ValueError, match="8-channel latents but the U-Net takes in_channels=4"):
        GaussianDiffusion(inflate(tiny_unet2d()), image_size=16, num_frames=2, vae=tiny_vae(latent_channels=8))
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling factor 2"):
        GaussianDiffusion(inflate(tiny_unet2d()), image_size=15, num_frames=2, vae=tiny_vae())
    with pytest.raises(TypeError, match="encode"):
        VideoVAE(nn.Linear(2, 2))


def test_vae_chunks_and_scaling():
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.5, shift_factor=0.1)
    whole, chunked = VideoVAE(vae, chunk_size=64), VideoVAE(vae, chunk_size=1)
    video = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    latents = whole.encode(video)
    torch.testing.assert_close(chunked.encode(video), latents)
    frame = video[:, :, 1]
    raw = vae.encode(frame).latent_dist.mode()
    torch.testing.assert_close(latents[:, :, 1], (raw - 0.1) * 0.5)
    torch.testing.assert_close(chunked.decode(latents), whole.decode(latents), rtol=1e-4, atol=1e-5)
    assert whole.fingerprint == chunked.fingerprint
    other = VideoVAE(tiny_vae(seed=1))
    assert other.fingerprint != whole.fingerprint


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 4), cond_len=st.integers(1, 6), null_len=st.integers(1, 6),
       drops=st.lists(st.booleans(), min_size=4, max_size=4), with_mask=st.booleans())
def test_null_substitution_keeps_kept_rows_and_pads_consistently(batch, cond_len, null_len, drops, with_mask):
    """Rows not dropped keep their tokens (and mask); dropped rows get exactly the null, the
    rest of the length masked out."""
    denoiser = _NULL_DENOISER
    null = torch.randn(null_len, CROSS_DIM)
    denoiser.set_null_cond(null)
    cond = torch.randn(batch, cond_len, CROSS_DIM)
    mask = torch.rand(batch, cond_len) < 0.7 if with_mask else None
    if mask is not None:
        mask[:, 0] = True
    drop = torch.tensor(drops[:batch])
    tokens, out_mask = denoiser._with_null(cond, mask, drop)
    length = max(cond_len, null_len)
    assert tokens.shape == (batch, length, CROSS_DIM)
    for row in range(batch):
        if drop[row]:
            torch.testing.assert_close(tokens[row, :null_len], null)
            if out_mask is not None:
                assert out_mask[row].tolist() == [i < null_len for i in range(length)]
        else:
            torch.testing.assert_close(tokens[row, :cond_len], cond[row])
            if out_mask is not None:
                expected = mask[row].tolist() if mask is not None else [True] * cond_len
                assert out_mask[row, :cond_len].tolist() == expected and not out_mask[row, cond_len:].any()


_NULL_DENOISER = as_denoiser(tiny_unet2d())


def test_vae_is_shared_by_copies_and_follows_the_process():
    import copy

    diffusion = GaussianDiffusion(inflate(tiny_unet2d()), image_size=16, num_frames=2, vae=tiny_vae())
    assert copy.deepcopy(diffusion).vae is diffusion.vae
    diffusion.to(torch.float64)
    assert diffusion.vae.dtype == torch.float64


def test_animatediff_motion_model_gets_tokens_per_frame():
    from diffusers import MotionAdapter, UNetMotionModel

    motion = UNetMotionModel.from_unet2d(tiny_unet2d(), MotionAdapter(
        block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
        motion_norm_num_groups=8))
    denoiser = as_denoiser(motion)
    x, t, tokens = torch.randn(1, 4, 2, 8, 8), torch.tensor([9]), torch.randn(1, 3, CROSS_DIM)
    with torch.no_grad():
        expected = motion(x, t, encoder_hidden_states=tokens.repeat_interleave(2, 0)).sample
        torch.testing.assert_close(denoiser(x, t, cond=tokens), expected)


def test_bf16_autocast_training_step_on_latents():
    diffusion = GaussianDiffusion(inflate(tiny_unet2d()), image_size=16, num_frames=2, vae=tiny_vae(),
                                  null_cond_prob=0.5)
    diffusion.denoise_fn.model.enable_gradient_checkpointing()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = diffusion(torch.rand(1, 3, 2, 16, 16), cond=torch.randn(1, 4, CROSS_DIM))
    loss.backward()
    grads = [p.grad for p in diffusion.denoise_fn.temporal_parameters()]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
