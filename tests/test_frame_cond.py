"""Conditioning frames (`frame_cond=True`) on every registered U-Net (unets/frame_cond.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import unets
from unets.frame_cond import FrameCondInput, fill_missing, frame_cond_inputs

NAMES = unets.available()


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    # Off the (often zero) initialisation, so that equalities below are not trivially true.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _inputs(model, batch: int = 2, frames: int | None = None):
    side = model.size_multiple * max(1, 8 // model.size_multiple)
    frames = 2 * model.frame_multiple if frames is None else frames
    x = torch.randn(batch, model.config.channels, frames, side, side)
    return x, torch.tensor([3, 700, 250][:batch])


def _mask(batch: int, frames: int) -> torch.Tensor:
    mask = torch.zeros(batch, frames, dtype=torch.bool)
    mask[:, 0] = True
    return mask


@pytest.fixture(scope="module", params=NAMES)
def name(request):
    return request.param


def test_registry_lists_the_unets_that_take_frames():
    assert {"space_time_unet", "unet3d", "modelscope", "animatediff"} <= set(NAMES)


def test_old_weights_load_strictly_and_give_the_same_output(name, tmp_path):
    torch.manual_seed(0)
    plain = _perturbed(unets.build(name, preset="debug"))
    conditioned = unets.build(name, preset="debug", frame_cond=True).eval()
    # The projection must be reset to zero even if it had been trained.
    with torch.no_grad():
        conditioned.frame_cond_in.weight.fill_(1.0)
    result = conditioned.load_state_dict(plain.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.count_nonzero(conditioned.frame_cond_in.weight) == 0
    x, t = _inputs(plain)
    cond_frames = torch.rand_like(x)
    with torch.no_grad():
        expected = plain(x, t)
        assert torch.equal(conditioned(x, t, cond_frames=cond_frames, cond_frame_mask=_mask(2, x.shape[2])), expected)
        assert torch.equal(conditioned(x, t), expected)
    # The same through a saved folder: unets.load and load_weights compare key sets first.
    folder = plain.save_pretrained(tmp_path / "plain")
    weights = unets.io.load_file(str(folder / "model.safetensors"))
    loaded = unets.load_weights(unets.build(name, preset="debug", frame_cond=True).eval(), weights)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, cond_frames=cond_frames, cond_frame_mask=_mask(2, x.shape[2])), expected)


def test_trained_projection_round_trips_and_uses_only_known_frames(name, tmp_path):
    torch.manual_seed(1)
    model = _perturbed(unets.build(name, preset="debug", frame_cond=True))
    x, t = _inputs(model)
    frames = x.shape[2]
    mask = _mask(2, frames)
    cond_frames = torch.rand_like(x)
    with torch.no_grad():
        out = model(x, t, cond_frames=cond_frames, cond_frame_mask=mask)
        # The known frame reaches the output ...
        changed_known = cond_frames.clone()
        changed_known[:, :, 0] += 1.0
        assert not torch.allclose(model(x, t, cond_frames=changed_known, cond_frame_mask=mask), out)
        # ... the unknown ones do not (they are zeroed before the projection).
        changed_unknown = cond_frames.clone()
        changed_unknown[:, :, 1:] = torch.rand_like(changed_unknown[:, :, 1:])
        assert torch.equal(model(x, t, cond_frames=changed_unknown, cond_frame_mask=mask), out)
        # No frames given = nothing known.
        assert torch.equal(model(x, t), model(x, t, cond_frames=cond_frames, cond_frame_mask=torch.zeros_like(mask)))
    loaded = unets.load(model.save_pretrained(tmp_path / "fc")).eval()
    assert loaded.config.frame_cond is True
    assert unets.build(model.config.to_dict()).config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(x, t, cond_frames=cond_frames, cond_frame_mask=mask), out)


def test_images_take_one_frame(name):
    torch.manual_seed(2)
    model = _perturbed(unets.build(name, preset="debug", frame_cond=True))
    x, t = _inputs(model, frames=1)
    image = x[:, :, 0]
    cond = torch.rand_like(image)
    with torch.no_grad():
        flat = model(image, t, cond_frames=cond, cond_frame_mask=torch.ones(2, dtype=torch.bool))
        video = model(x, t, cond_frames=cond[:, :, None], cond_frame_mask=torch.ones(2, 1, dtype=torch.bool),
                      enable_time=False)
    assert flat.shape == image.shape
    torch.testing.assert_close(flat, video[:, :, 0], rtol=1e-4, atol=1e-5)


def test_user_errors_name_what_was_given(name):
    plain = unets.build(name, preset="debug")
    x, t = _inputs(plain)
    with pytest.raises(ValueError, match="frame_cond=True"):
        plain(x, t, cond_frames=x, cond_frame_mask=_mask(2, x.shape[2]))
    model = unets.build(name, preset="debug", frame_cond=True)
    with pytest.raises(ValueError, match="cond_frame_mask is missing"):
        model(x, t, cond_frames=x)
    with pytest.raises(ValueError, match="input's shape"):
        model(x, t, cond_frames=x[:, :, :1], cond_frame_mask=_mask(2, 1))
    with pytest.raises(ValueError, match="bool tensor"):
        model(x, t, cond_frames=x, cond_frame_mask=_mask(2, x.shape[2]).float())
    with pytest.raises(ValueError, match=r"shape \(2, "):
        model(x, t, cond_frames=x, cond_frame_mask=_mask(2, x.shape[2] + 1))
    with pytest.raises(TypeError, match="frame_cond"):
        unets.build(name, preset="debug", frame_cond=1)


def test_save_diffusers_refuses_frame_cond(tmp_path):
    model = unets.build("modelscope", preset="debug", frame_cond=True)
    with pytest.raises(ValueError, match="frame_cond"):
        model.save_diffusers(tmp_path / "out")


def test_guidance_passes_the_frames_to_both_halves():
    torch.manual_seed(3)
    model = _perturbed(unets.build("space_time_unet", preset="debug", cond_dim=8, frame_cond=True))
    x, t = _inputs(model)
    cond = torch.randn(2, 3, 8)
    frames, mask = torch.rand_like(x), _mask(2, x.shape[2])
    with torch.no_grad():
        batched = model.forward_with_cond_scale(x, t, cond, 3.0, cond_frames=frames, cond_frame_mask=mask, batched=True)
        split = model.forward_with_cond_scale(x, t, cond, 3.0, cond_frames=frames, cond_frame_mask=mask, batched=False)
        without = model.forward_with_cond_scale(x, t, cond, 3.0, batched=False)
    torch.testing.assert_close(batched, split, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(split, without)


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 3), channels=st.integers(1, 4), frames=st.integers(1, 5),
    side=st.integers(1, 6), dim=st.integers(1, 8), folded=st.booleans(),
)
def test_projection_is_zero_at_init_and_fits_both_layouts(batch, channels, frames, side, dim, folded):
    layer = FrameCondInput(channels, dim)
    x = torch.randn(batch, channels, frames, side, side)
    cond = frame_cond_inputs("test", True, x, torch.rand_like(x), torch.rand(batch, frames) < 0.5)
    h = torch.randn(batch * frames, dim, side, side) if folded else torch.randn(batch, dim, frames, side, side)
    assert torch.equal(layer(h, cond), h)
    with torch.no_grad():
        layer.bias.fill_(1.0)
    assert torch.equal(layer(h, cond), h + 1.0)


def test_fill_missing_adds_zeros_only_where_all_are_absent():
    model = unets.build("unet3d", preset="debug", frame_cond=True)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("frame_cond_in.")}
    filled = fill_missing(model, state)
    assert set(filled) == set(model.state_dict())
    assert torch.count_nonzero(filled["frame_cond_in.weight"]) == 0
    partial = dict(state, **{"frame_cond_in.weight": model.frame_cond_in.weight.detach()})
    assert "frame_cond_in.bias" not in fill_missing(model, partial)


def _cond_kwargs(model) -> dict:
    # unet3d's debug preset is unconditional; the others' conditions are optional.
    return {}


def test_frame_rate_starts_at_zero_loads_old_weights_and_then_matters(name, tmp_path):
    torch.manual_seed(4)
    plain = _perturbed(unets.build(name, preset="debug"))
    model = unets.build(name, preset="debug", frame_rate_cond=True).eval()
    model.load_state_dict(plain.state_dict(), strict=True)
    x, t = _inputs(plain)
    with torch.no_grad():
        expected = plain(x, t)
        assert torch.equal(model(x, t, fps=8), expected)
        assert torch.equal(model(x, t, fps=torch.tensor([4.0, 24.0])), expected)
    folder = plain.save_pretrained(tmp_path / "plain")
    loaded = unets.load_weights(unets.build(name, preset="debug", frame_rate_cond=True).eval(),
                                unets.io.load_file(str(folder / "model.safetensors")))
    with torch.no_grad():
        assert torch.equal(loaded(x, t, fps=8), expected)
    # Trained (moved off zero), different rates give different outputs; the hidden layer was
    # not zeroed, so the output layer gets a gradient.
    out = model(x, t, fps=torch.tensor([4.0, 24.0]))
    out.square().mean().backward()
    assert model.fps_embed.out_weight.grad is not None and model.fps_embed.out_weight.grad.abs().sum() > 0
    _perturbed(model)
    with torch.no_grad():
        assert not torch.allclose(model(x, t, fps=4), model(x, t, fps=24))
        assert torch.equal(model(x, t, fps=torch.tensor([4.0, 4.0])), model(x, t, fps=4))
    with pytest.raises(ValueError, match="frame_rate_cond"):
        plain(x, t, fps=8)
    with pytest.raises(ValueError, match="positive"):
        model(x, t, fps=0)
    with pytest.raises(ValueError, match="positive"):
        model(x, t, fps=torch.tensor([1.0, 2.0, 3.0]))
