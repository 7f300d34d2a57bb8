"""Which parameters train: temporal-only by default for inflated models, LoRA on the 2D
attention only."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from byo_models import tiny_unet2d  # noqa: E402
from diffusion.lora import add_spatial_lora, select_trainable  # noqa: E402
from spacetime import inflate  # noqa: E402
from unets import build  # noqa: E402


def _out(model, x, t, tokens):
    with torch.no_grad():
        return model(x, t, encoder_hidden_states=tokens).sample


def test_lora_wraps_only_2d_attention_and_starts_as_identity():
    model = inflate(tiny_unet2d())
    x, t, tokens = torch.randn(1, 4, 2, 8, 8), torch.tensor([4]), torch.randn(1, 3, 32)
    before = _out(model, x, t, tokens)
    add_spatial_lora(model, rank=2)
    torch.testing.assert_close(_out(model, x, t, tokens), before)
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora and all(".temporal." not in n and ".attn" in n for n in lora)
    trainable, total = select_trainable(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    temporal = {id(p) for p in model.temporal_parameters()}
    assert names == {n for n, p in model.named_parameters() if "lora_" in n or id(p) in temporal}
    assert 0 < trainable < total


def test_select_trainable_modes():
    model = inflate(tiny_unet2d())
    select_trainable(model, "all")
    assert all(p.requires_grad for p in model.parameters())
    select_trainable(model, "auto")
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in model.temporal_parameters()}
    unet = build("unet3d", preset="debug")
    select_trainable(unet, "auto")  # not inflated: everything trains, as before
    assert all(p.requires_grad for p in unet.parameters())
    with pytest.raises(ValueError, match="trainable"):
        select_trainable(unet, "spatial")


def test_missing_peft_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'spacetime-video\[lora\]'"):
        add_spatial_lora(inflate(tiny_unet2d()), rank=2)
