"""Every registered U-Net: `cond_format` (and its alias `cond_on_tokens`) follows the config, and
`attn_backend` (None = context / environment variable / auto; a name pins it) is one spelling."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import unets
from spacetime.attend import ENV_VAR, AttentionBackend, attention_backend
from spacetime.attention import Attention

torch.set_num_threads(1)

CASES = [
    # (name, extra options, expected cond_format)
    ("space_time_unet", {}, None),
    ("space_time_unet", {"cond_dim": 6}, "tokens"),
    ("unet3d", {}, None),
    ("unet3d", {"cond_dim": 6}, "pooled"),
    ("unet3d", {"cond_dim": 6, "text_cross_attn": True}, "tokens"),
]


@pytest.mark.parametrize(("name", "extra", "expected"), CASES)
def test_cond_format_follows_the_config(name, extra, expected):
    net = unets.build(name, preset="debug", **extra)
    assert net.cond_format == expected
    assert net.cond_format in type(net).COND_FORMATS
    assert net.cond_on_tokens is (expected == "tokens")
    # A reload derives the same format from the saved config.
    assert unets.build(net.config.to_dict()).cond_format == expected


@pytest.mark.parametrize(("name", "extra", "expected"), CASES)
def test_cond_on_tokens_is_read_only(name, extra, expected):
    net = unets.build(name, preset="debug", **extra)
    net.cond_on_tokens = expected == "tokens"  # agreeing with the config changes nothing
    assert net.cond_format == expected
    with pytest.raises(AttributeError, match="cond_format"):
        net.cond_on_tokens = expected != "tokens"
    assert net.cond_format == expected


def _attention_backends(net: torch.nn.Module) -> set:
    return {m.backend for m in net.modules() if hasattr(m, "backend") and isinstance(m, torch.nn.Module)
            and (isinstance(m, Attention) or type(m).__module__ == "unets.unet3d")}


@pytest.mark.parametrize("name", ["space_time_unet", "unet3d"])
def test_attn_backend_default_leaves_the_choice_to_context(name):
    net = unets.build(name, preset="debug")
    assert net.config.attn_backend is None
    assert _attention_backends(net) == {None}


@pytest.mark.parametrize("name", ["space_time_unet", "unet3d"])
@settings(max_examples=8, deadline=None)
@given(backend=st.sampled_from([b.value for b in AttentionBackend]))
def test_attn_backend_pins_every_attention_layer(name, backend):
    net = unets.build(name, preset="debug", attn_backend=backend)
    assert _attention_backends(net) == {backend}
    assert unets.build(net.config.to_dict()).config.attn_backend == backend


@pytest.mark.parametrize("name", ["space_time_unet", "unet3d"])
def test_attn_backend_rejects_unknown_names(name):
    with pytest.raises(ValueError, match=r"attn_backend must be one of .*got 'mth'.*did you mean 'math'"):
        unets.build(name, preset="debug", attn_backend="mth")
    with pytest.raises(TypeError, match="attn_backend"):
        unets.build(name, preset="debug", attn_backend=3)


def _video(net):
    return torch.randn(1, net.config.channels, 2, 8, 8)


def test_flash_attn_does_not_override_context_or_environment(monkeypatch):
    """make-a-video's `flash_attn=True` is accepted, but an explicit context or environment
    variable still decides: xformers cannot run on CPU, so choosing it makes the call fail."""
    net = unets.build("space_time_unet", preset="debug", flash_attn=True).eval()
    x, t = _video(net), torch.tensor([3])
    with torch.no_grad():
        expected = net(x, t)
        with attention_backend("xformers"), pytest.raises((ValueError, RuntimeError)):
            net(x, t)
        monkeypatch.setenv(ENV_VAR, "xformers")
        with pytest.raises((ValueError, RuntimeError)):
            net(x, t)
        with attention_backend("math"):
            torch.testing.assert_close(net(x, t), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["space_time_unet", "unet3d"])
def test_pinned_attn_backend_beats_the_context(name):
    net = unets.build(name, preset="debug", attn_backend="math").eval()
    x, t = _video(net), torch.tensor([3])
    with torch.no_grad():
        expected = net(x, t)
        with attention_backend("xformers"):
            torch.testing.assert_close(net(x, t), expected)
