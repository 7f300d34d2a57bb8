"""The ModelScope and AnimateDiff U-Nets (`unets/modelscope.py`, `unets/animatediff.py`) on
their own: option checks, the null condition and token masks, per-sample time switching,
and short temporal-only training runs through `diffusion.Trainer` (latent-sized random
4-channel videos, gradient checkpointing on) followed by sampling."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset

import unets
from diffusion import GaussianDiffusion, Trainer

NAMES = ["modelscope", "animatediff"]


def _model(name: str, **overrides):
    torch.manual_seed(0)
    model = unets.build(name, preset="debug", **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("name", NAMES)
def test_null_condition_and_token_masks(name):
    model = _model(name)
    x = torch.randn(2, 4, 2, 8, 8)
    t = torch.tensor([10, 500])
    cond = torch.randn(2, 5, 16)
    with torch.no_grad():
        none = model(x, t)
        dropped = model(x, t, cond=cond, null_cond_prob=1.0)
        torch.testing.assert_close(none, dropped, atol=1e-5, rtol=1e-5)
        full = model(x, t, cond=cond)
        all_kept = model(x, t, cond=cond, cond_mask=torch.ones(2, 5, dtype=torch.bool))
        torch.testing.assert_close(all_kept, full, atol=1e-5, rtol=1e-5)
        # masking the last two tokens == leaving them out
        mask = torch.tensor([[True, True, True, False, False]] * 2)
        torch.testing.assert_close(model(x, t, cond=cond, cond_mask=mask), model(x, t, cond=cond[:, :3]),
                                   atol=1e-5, rtol=1e-5)
        # a sample with nothing kept gets the null condition, not NaN
        empty = model(x, t, cond=cond, cond_mask=torch.zeros(2, 5, dtype=torch.bool))
        torch.testing.assert_close(empty, none, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"cond must be \(B=2, L, 16\) tokens"):
        model(x, t, cond=torch.randn(2, 5, 7))


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("modelscope", {"block_out_channels": (8, 10)}, r"multiple of norm_num_groups \(4\), got \[8, 10\]"),
        ("modelscope", {"down_block_types": ("CrossAttnDownBlock3D",)}, r"one entry per level \(2"),
        ("modelscope", {"up_block_types": ("UpBlock3D", "CrossAttnDownBlock3D")}, r"must be among"),
        ("modelscope", {"attention_head_dim": 3}, r"multiple of attention_head_dim \(3\)"),
        ("animatediff", {"motion_num_attention_heads": 3}, r"multiple of motion_num_attention_heads"),
        ("animatediff", {"down_block_types": ("CrossAttnDownBlock3D", "DownBlockMotion")}, r"must be among"),
    ],
)
def test_bad_options_say_what_is_allowed(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        unets.build(name, preset="debug", **overrides)


def test_animatediff_frames_beyond_its_positions_are_refused():
    model = _model("animatediff")
    limit = model.config.motion_max_seq_length
    with pytest.raises(ValueError, match=f"at most {limit} frames, got {limit + 1}"):
        model(torch.randn(1, 4, limit + 1, 8, 8), torch.tensor([1]))


def test_temporal_parameters_are_the_temporal_layers():
    ms = unets.build("modelscope", preset="debug")
    names = {n for n, p in ms.named_parameters() if any(p is q for q in ms.temporal_parameters())}
    assert names and all(("temp_" in n or n.startswith("transformer_in.")) for n in names)
    ad = unets.build("animatediff", preset="debug")
    names = {n for n, p in ad.named_parameters() if any(p is q for q in ad.temporal_parameters())}
    assert names and all(".motion_modules." in n for n in names)
    assert {n for n, _ in ad.named_parameters() if ".motion_modules." in n} == names


class RandomVideos(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        return torch.rand(4, 2, 8, 8, generator=generator)


@pytest.mark.parametrize(("name", "amp"), [("modelscope", False), ("animatediff", False), ("modelscope", True)])
def test_temporal_only_training_with_checkpointing_then_sampling(name, amp, tmp_path):
    """amp=True: bf16 autocast (the Trainer's choice on CPU)."""
    model = _model(name).train().enable_gradient_checkpointing()
    for p in model.spatial_parameters():
        p.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    temporal = {id(p) for p in model.temporal_parameters()}
    diffusion = GaussianDiffusion(model, image_size=8, num_frames=2, channels=4, timesteps=10, loss_type="l2")
    trainer = Trainer(diffusion, dataset=RandomVideos(), train_batch_size=2, gradient_accumulate_every=1,
                      train_num_steps=3, save_and_sample_every=1000, step_start_ema=1, update_ema_every=1,
                      num_sample_rows=1, results_folder=tmp_path, train_lr=1e-3, write_mp4=False, progress=False,
                      seed=3, amp=amp)
    losses = []
    trainer.train(log_fn=lambda record: losses.append(record["loss"]))
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        if id(p) in temporal:
            continue
        assert not changed, f"spatial parameter {n} moved in temporal-only training"
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if id(p) in temporal)
    with torch.no_grad():
        videos = diffusion.sample(batch_size=1)
    assert videos.shape == (1, 4, 2, 8, 8) and torch.isfinite(videos).all()


@settings(max_examples=15, deadline=None)
@given(levels=st.integers(1, 3), layers=st.integers(1, 2), cross=st.lists(st.booleans(), min_size=3, max_size=3))
def test_modelscope_original_key_map_is_a_bijection(levels, layers, cross):
    """Over configs of 1-3 levels, 1-2 layers, any mix of attention levels: every key gets a
    distinct original name, and mapping back gives the same names and tensors."""
    from unets.original_keys import from_modelscope_original, to_modelscope_original

    down = tuple("CrossAttnDownBlock3D" if c else "DownBlock3D" for c in cross[:levels])
    up = tuple("CrossAttnUpBlock3D" if c else "UpBlock3D" for c in reversed(cross[:levels]))
    config = unets.build_config("modelscope", preset="debug", block_out_channels=(8, 16, 16)[:levels],
                                down_block_types=down, up_block_types=up, layers_per_block=layers)
    with torch.device("meta"):
        state = unets.build(config).state_dict()
    original = to_modelscope_original(state, config)
    assert len(original) == len(state)
    back = from_modelscope_original(original, config)
    assert set(back) == set(state)
    assert all(back[k].shape == v.shape for k, v in state.items())


@pytest.mark.parametrize("wanted", [(True, True, True), (True, False, False), (False, True, False)])
def test_group_norm_silu_saves_less_and_has_the_same_gradients(wanted):
    from unets.diffusers_layers import _GroupNormSiLU

    torch.manual_seed(0)
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64, requires_grad=wanted[0])
    weight = torch.randn(8, dtype=torch.float64, requires_grad=wanted[1])
    bias = torch.randn(8, dtype=torch.float64, requires_grad=wanted[2])
    assert torch.autograd.gradcheck(lambda a, w, b: _GroupNormSiLU.apply(a, w, b, 4, 1e-5), (x, weight, bias))
    out = _GroupNormSiLU.apply(x, weight, bias, 4, 1e-5)
    torch.testing.assert_close(out, torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4, weight, bias)))


def test_channels_last_input_with_frozen_early_layers_trains():
    """A VAE's latents arrive channels-last, and temporal-only training freezes everything
    before the first temporal layer: GroupNorm's CPU backward crashed on exactly that input
    (torch 2.13), so the U-Nets take a contiguous copy first."""
    import unets

    for name in ("modelscope", "animatediff"):
        torch.manual_seed(0)
        model = unets.build(name, preset="debug")
        for parameter in model.spatial_parameters():
            parameter.requires_grad_(False)
        frames = torch.randn(2 * 2, model.channels, 8, 8).to(memory_format=torch.channels_last)
        x = frames.view(2, 2, model.channels, 8, 8).transpose(1, 2)
        cond = torch.randn(2, 3, model.config.cond_dim)
        model(x, torch.tensor([10, 500]), cond=cond).square().mean().backward()
        grads = [p.grad for p in model.temporal_parameters()]
        assert any(g is not None and bool(g.abs().sum() > 0) for g in grads), name
