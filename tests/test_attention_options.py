"""The options of `spacetime.attention.Attention` other U-Nets' math needs: LayerNorm pre-norm,
a fused q/k/v projection, an un-normed context, default-initialised output, and `values()`."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spacetime.attention import Attention

torch.set_num_threads(1)


def _reference(x, wqkv, wout, norm, heads):
    """Plain multi-head self-attention with a fused projection."""
    q, k, v = norm(x).matmul(wqkv.T).chunk(3, dim=-1)
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
    return (weights @ v).transpose(1, 2).flatten(2) @ wout.T


@settings(max_examples=15, deadline=None)
@given(heads=st.integers(1, 3), dim_head=st.integers(1, 5), tokens=st.integers(1, 6), seed=st.integers(0, 99))
def test_fused_layer_norm_attention_matches_the_formula(heads, dim_head, tokens, seed):
    torch.manual_seed(seed)
    attn = Attention(6, heads=heads, dim_head=dim_head, norm="layer", fused_qkv=True, zero_out=False,
                     backend="math")
    assert isinstance(attn.norm, torch.nn.LayerNorm) and not hasattr(attn, "to_q")
    assert attn.to_out.weight.abs().sum() > 0
    x = torch.randn(2, tokens, 6)
    expected = _reference(x, attn.to_qkv.weight, attn.to_out.weight, attn.norm, heads)
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)
    # values(): attention over a single key returns that token's projected value.
    single = torch.stack([attn(x[:, i : i + 1]) for i in range(tokens)], dim=1).squeeze(2)
    torch.testing.assert_close(attn.values(x), single, atol=1e-5, rtol=1e-5)


def test_context_norm_off_uses_the_context_as_given():
    torch.manual_seed(0)
    attn = Attention(4, heads=2, dim_head=3, context_dim=5, norm="layer", context_norm=False, zero_out=False)
    assert isinstance(attn.context_norm, torch.nn.Identity)
    x, ctx = torch.randn(1, 3, 4), torch.randn(1, 2, 5)
    out = attn(x, context=ctx)
    scaled = attn(x, context=ctx * 3)
    assert not torch.allclose(out, scaled)  # a norm would have removed the scale
    assert [n for n, _ in attn.named_parameters()] == ["norm.weight", "norm.bias", "to_q.weight", "to_kv.weight",
                                                       "to_out.weight"]


def test_defaults_are_unchanged():
    attn = Attention(4, heads=2, dim_head=3)
    assert [n for n, _ in attn.named_parameters()] == ["norm.gamma", "to_q.weight", "to_kv.weight", "to_out.weight"]
    assert attn.to_out.weight.abs().sum() == 0


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match=r"norm must be one of 'rms', 'layer', got 'batch'"):
        Attention(4, norm="batch")
    with pytest.raises(ValueError, match="fused_qkv=True .* no context_dim, got 5"):
        Attention(4, fused_qkv=True, context_dim=5)
    with pytest.raises(ValueError, match="has a context"):
        Attention(4, context_dim=5).values(torch.randn(1, 2, 4))
