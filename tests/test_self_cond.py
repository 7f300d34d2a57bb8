"""Self-conditioning: every registered U-Net's x0-estimate input (unets/self_cond.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import unets
from unets.frame_cond import check_conditioning_options, fill_missing
from unets.self_cond import SelfCondInput, self_cond_inputs

NAMES = unets.available()


def _perturbed(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval().to(dtype)


def _inputs(model: torch.nn.Module, batch: int = 2, image: bool = False, dtype: torch.dtype = torch.float32):
    side = model.size_multiple * max(1, 8 // model.size_multiple)
    frames = () if image else (2 * model.frame_multiple,)
    x = torch.randn(batch, model.config.channels, *frames, side, side, dtype=dtype)
    return x, torch.tensor([3.0, 700.0, 250.0][:batch], dtype=dtype)


@pytest.fixture(scope="module", params=NAMES)
def name(request):
    return request.param


@pytest.mark.parametrize("image", [False, True])
def test_zero_start_none_and_zeros_equal_the_plain_unet(name, image):
    torch.manual_seed(0)
    plain = _perturbed(unets.build(name, preset="debug"))
    model = unets.build(name, preset="debug", self_cond=True).eval()
    model.load_state_dict(plain.state_dict(), strict=True)  # the same weights; the projection stays zero
    x, t = _inputs(plain, image=image)
    estimate = torch.randn_like(x)
    with torch.no_grad():
        expected = plain(x, t)
        torch.testing.assert_close(model(x, t, self_cond=estimate), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(x, t), expected, rtol=0, atol=1e-6)
        # None is "no estimate", the same as zeros, also once the projection is trained.
        _perturbed(model.self_cond_in)
        assert torch.equal(model(x, t), model(x, t, self_cond=torch.zeros_like(x)))


@pytest.mark.parametrize("image", [False, True])
def test_trained_projection_reaches_the_output_per_sample(name, image):
    torch.manual_seed(1)
    model = _perturbed(unets.build(name, preset="debug", self_cond=True))
    x, t = _inputs(model, image=image)
    estimate = torch.randn_like(x)
    with torch.no_grad():
        out = model(x, t, self_cond=estimate)
        assert out.shape == x.shape
        assert not torch.allclose(out, model(x, t, self_cond=estimate * 0.5))
        assert not torch.allclose(out, model(x, t))
        other = estimate.clone()
        other[1] = torch.randn_like(other[1])
        torch.testing.assert_close(model(x, t, self_cond=other)[0], out[0])


def test_errors_name_what_was_given(name):
    plain = unets.build(name, preset="debug").eval()
    x, t = _inputs(plain)
    with pytest.raises(ValueError, match="built without self-conditioning.*self_cond=True"):
        plain(x, t, self_cond=torch.rand_like(x))
    model = unets.build(name, preset="debug", self_cond=True).eval()
    bad = torch.rand_like(x)[..., :-1]
    with pytest.raises(ValueError, match="self_cond") as error:
        model(x, t, self_cond=bad)
    assert str(tuple(x.shape)) in str(error.value) and str(tuple(bad.shape)) in str(error.value)
    with pytest.raises(TypeError, match="self_cond"):  # beartype's message in tests, ours without it
        unets.build(name, preset="debug", self_cond=1)
    options = SimpleNamespace(frame_cond=False, frame_rate_cond=False, lowres_cond=False, self_cond=1)
    with pytest.raises(TypeError, match="self_cond must be a bool, got 1"):
        check_conditioning_options(options)


def test_config_round_trip_and_checkpoints(name, tmp_path):
    torch.manual_seed(2)
    model = _perturbed(unets.build(name, preset="debug", self_cond=True))
    assert model.config.to_dict()["self_cond"] is True
    assert unets.build(model.config.to_dict()).config.self_cond is True
    x, t = _inputs(model)
    estimate = torch.randn_like(x)
    with torch.no_grad():
        out = model(x, t, self_cond=estimate)
        again = unets.load(model.save_pretrained(tmp_path / "sc")).eval()
        assert again.config.self_cond is True
        torch.testing.assert_close(again(x, t, self_cond=estimate), out)


def test_old_checkpoint_loads_strictly_as_the_zero_start(name, tmp_path):
    torch.manual_seed(3)
    plain = _perturbed(unets.build(name, preset="debug"))
    model = unets.build(name, preset="debug", self_cond=True).eval()
    with torch.no_grad():  # a trained value must be reset to the zero start
        model.self_cond_in.weight.fill_(1.0)
        model.self_cond_in.bias.fill_(1.0)
    result = model.load_state_dict(plain.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert not model.self_cond_in.weight.any() and not model.self_cond_in.bias.any()
    x, t = _inputs(plain)
    estimate = torch.randn_like(x)
    with torch.no_grad():
        expected = plain(x, t)
        assert torch.equal(model(x, t, self_cond=estimate), expected)
    folder = plain.save_pretrained(tmp_path / "plain")
    weights = unets.io.load_file(str(folder / "model.safetensors"))
    assert {"self_cond_in.weight", "self_cond_in.bias"} <= set(fill_missing(model, weights))
    loaded = unets.load_weights(unets.build(name, preset="debug", self_cond=True).eval(), weights)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, self_cond=estimate), expected)


def test_batched_guidance_repeats_the_estimate(name):
    dtype = torch.float64  # see tests/test_batched_guidance.py: batch-size rounding in float32
    torch.manual_seed(4)
    model = _perturbed(unets.build(name, preset="debug", cond_dim=16, self_cond=True), dtype)
    x, t = _inputs(model, batch=3, dtype=dtype)
    cond = torch.randn(3, 16, dtype=dtype)
    estimate = torch.randn_like(x)
    batches: list[int] = []
    model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    with torch.no_grad():
        two = model.forward_with_cond_scale(x, t, cond=cond, cond_scale=3.0, batched=False, self_cond=estimate)
        one = model.forward_with_cond_scale(x, t, cond=cond, cond_scale=3.0, self_cond=estimate)
        assert batches == [3, 3, 6]
        torch.testing.assert_close(one, two, rtol=1e-9, atol=1e-9)
        # The estimate is used in the batched call: another one changes the result.
        other = model.forward_with_cond_scale(x, t, cond=cond, cond_scale=3.0, self_cond=estimate * 0.5)
        assert not torch.allclose(one, other)


def test_diffusers_export_refuses_the_extra_input():
    model = unets.build("modelscope", preset="debug", self_cond=True)
    with pytest.raises(ValueError, match="self_cond"):
        model.save_diffusers("/nonexistent/never-written")


def test_input_check_returns_a_video():
    x = torch.randn(2, 3, 8, 8)
    assert self_cond_inputs("U", False, x, None) is None
    zeros = self_cond_inputs("U", True, x, None)
    assert zeros.shape == (2, 3, 1, 8, 8) and not zeros.any()
    estimate = torch.randn_like(x)
    assert torch.equal(self_cond_inputs("U", True, x, estimate)[:, :, 0], estimate)
    layer = SelfCondInput(3, 4)
    assert not layer.weight.any() and not layer.bias.any()
