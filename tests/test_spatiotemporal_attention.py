"""SpatioTemporalAttention, SpatialAttention, TemporalAttention: shapes for every position
encoding with and without context, image path == video path with time off, per-sample masks,
identity over time at init, causality, context masking, errors, the parameter split, flash,
parity with make-a-video-pytorch 0.4.0 and torch.compile."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spacetime import (
    Attention,
    SpatialAttention,
    SpatioTemporalAttention,
    TemporalAttention,
    spatial_parameters,
    temporal_parameters,
)
from spacetime.attention import position_kind

pos_kinds = st.sampled_from([True, False, "continuous", "t5", "rotary"])
TOL = dict(atol=2e-5, rtol=2e-5)


@torch.no_grad()
def randomize(module, params=None, std=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters() if params is None else params:
        p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def frame_by_frame(layer, video, **kw):
    return torch.stack([layer(video[:, :, i], **kw) for i in range(video.shape[2])], dim=2)


def build(dim, heads, dim_head, pos_bias, context_dim=None, **kw):
    return SpatioTemporalAttention(
        dim, dim_head=dim_head, heads=heads, pos_bias=pos_bias, context_dim=context_dim, ff_mult=2, **kw
    )


@given(
    b=st.integers(1, 2), f=st.integers(1, 3), h=st.integers(1, 4), w=st.integers(1, 4),
    dim=st.integers(2, 8), heads=st.integers(1, 3), dim_head=st.sampled_from([4, 6, 8]),
    pos_bias=pos_kinds, with_context=st.booleans(), ff=st.booleans(), causal=st.booleans(),
)
def test_shapes_image_path_and_masks(b, f, h, w, dim, heads, dim_head, pos_bias, with_context, ff, causal):
    context_dim = 5 if with_context else None
    attn = randomize(build(dim, heads, dim_head, pos_bias, context_dim, add_feed_forward=ff, causal_time_attn=causal))
    video = torch.randn(b, dim, f, h, w)
    kw = {}
    if with_context:
        kw = dict(context=torch.randn(b, 3, 5), context_mask=torch.tensor([[True, True, False]] * b))
    out = attn(video, **kw)
    assert out.shape == video.shape
    assert attn(video[:, :, 0], **kw).shape == (b, dim, h, w)
    torch.testing.assert_close(attn(video, enable_time=False, **kw), frame_by_frame(attn, video, **kw), **TOL)
    mask = torch.arange(b) % 2 == 0
    mixed = attn(video, enable_time=mask, **kw)
    for i in range(b):
        one = {k: v[i : i + 1] for k, v in kw.items()}
        torch.testing.assert_close(
            mixed[i : i + 1], attn(video[i : i + 1], enable_time=bool(mask[i]), **one), **TOL
        )


@given(
    b=st.integers(1, 2), f=st.integers(1, 4), h=st.integers(1, 3), w=st.integers(1, 3),
    dim=st.integers(2, 6), heads=st.integers(1, 2), pos_bias=pos_kinds, with_context=st.booleans(),
)
def test_identity_over_time_at_init(b, f, h, w, dim, heads, pos_bias, with_context):
    attn = build(dim, heads, 4, pos_bias, 3 if with_context else None, ff_token_shift=False)
    randomize(attn, spatial_parameters(attn))
    video = torch.randn(b, dim, f, h, w)
    kw = dict(context=torch.randn(b, 2, 3)) if with_context else {}
    torch.testing.assert_close(attn(video, **kw), frame_by_frame(attn, video, **kw), **TOL)


@given(f=st.integers(2, 5), t=st.integers(1, 4), pos_bias=pos_kinds, shift=st.booleans())
def test_causal_time_attention(f, t, pos_bias, shift):
    t = min(t, f - 1)
    attn = randomize(build(6, 2, 4, pos_bias, causal_time_attn=True, ff_token_shift=shift))
    video = torch.randn(2, 6, f, 3, 3)
    changed = video.clone()
    changed[:, :, t:] = torch.randn_like(changed[:, :, t:])
    a, b = attn(video), attn(changed)
    torch.testing.assert_close(a[:, :, :t], b[:, :, :t], **TOL)
    assert not torch.allclose(a[:, :, t:], b[:, :, t:])


def test_non_causal_time_attention_sees_future():
    attn = randomize(build(6, 2, 4, True, ff_token_shift=False))
    video = torch.randn(1, 6, 3, 2, 2)
    changed = video.clone()
    changed[:, :, 2] += 1
    assert not torch.allclose(attn(video)[:, :, 0], attn(changed)[:, :, 0])


@pytest.mark.parametrize("pos_bias", [True, "t5", "rotary", False])
def test_parameter_split(pos_bias):
    attn = build(8, 2, 4, pos_bias, context_dim=3)
    temporal = list(temporal_parameters(attn))
    spatial = list(spatial_parameters(attn))
    assert {id(p) for p in temporal} == {id(p) for p in attn.temporal.parameters()}
    assert len(temporal) + len(spatial) == len(list(attn.parameters()))
    assert {id(p) for p in temporal + spatial} == {id(p) for p in attn.parameters()}
    # Every attention output projection starts at zero (identity through the residual).
    for module in (attn.spatial.attn, attn.cross, attn.temporal.attn):
        assert module.to_out.weight.abs().sum() == 0


def test_context_masking_and_sharing():
    attn = randomize(build(6, 2, 4, True, context_dim=5))
    video = torch.randn(2, 6, 3, 2, 2)
    context = torch.randn(2, 4, 5)
    mask = torch.tensor([[True, False, True, False], [False, False, False, False]])
    out = attn(video, context=context, context_mask=mask)
    # Masked tokens are ignored.
    other = context.clone()
    other[~mask] = torch.randn_like(other[~mask])
    torch.testing.assert_close(attn(video, context=other, context_mask=mask), out, **TOL)
    # A sample without any real token gets no cross-attention update, and no NaN.
    torch.testing.assert_close(out[1], attn(video[1:])[0], **TOL)
    assert torch.isfinite(out).all()
    # The context actually conditions the output.
    assert not torch.allclose(out[0], attn(video[:1])[0])
    assert not torch.allclose(attn(video, context=context), attn(video, context=torch.randn(2, 4, 5)))
    # Cross-attention has no key positions: token order does not matter.
    torch.testing.assert_close(attn(video, context=context), attn(video, context=context.flip(1)), **TOL)


def test_errors():
    attn = build(4, 2, 4, True)
    with pytest.raises(ValueError, match=r"SpatioTemporalAttention was built for 4 channels, got 3"):
        attn(torch.randn(1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match=r"image \(B, C, H, W\) or a video \(B, C, F, H, W\).*6 dims"):
        attn(torch.randn(1, 4, 1, 2, 2, 2))
    with pytest.raises((ValueError, TypeError)):
        attn(torch.randn(4, 2, 2))
    with pytest.raises(ValueError, match=r"no cross-attention; build it with context_dim"):
        attn(torch.randn(1, 4, 2, 2, 2), context=torch.randn(1, 2, 3))
    with pytest.raises(ValueError, match=r"context_mask was given without context"):
        attn(torch.randn(1, 4, 2, 2, 2), context_mask=torch.ones(1, 2, dtype=torch.bool))
    cross = build(4, 2, 4, True, context_dim=3)
    with pytest.raises(ValueError, match=r"context must be \(B=1, L, context_dim=3\) tokens, got shape \(1, 2, 5\)"):
        cross(torch.randn(1, 4, 2, 2, 2), context=torch.randn(1, 2, 5))
    # jaxtyping (in tests) or the layer's own check rejects a mask not shaped like the context.
    with pytest.raises((ValueError, TypeError), match=r"context_mask"):
        cross(torch.randn(1, 4, 2, 2, 2), context=torch.randn(1, 2, 3), context_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"pos_bias must be a bool or one of 'continuous', 't5', 'rotary', got 'alibi'"):
        position_kind("alibi")
    with pytest.raises((ValueError, TypeError), match=r"pos_bias"):
        build(4, 2, 4, "alibi")
    with pytest.raises(ValueError, match=r"pos_bias='rotary' needs dim_head >= 4 for 2D positions, got dim_head=2"):
        build(4, 2, 2, "rotary")
    with pytest.raises(ValueError, match=r"Attention needs dim, dim_head and heads >= 1, got dim=4, dim_head=4, heads=0"):
        Attention(4, dim_head=4, heads=0)
    with pytest.raises(ValueError, match=r"needs a context.*got context_dim=3 and context=None"):
        Attention(4, context_dim=3)(torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match=r"got context_dim=None and context=\(1, 2, 4\)"):
        Attention(4)(torch.randn(1, 2, 4), context=torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match=r"TemporalAttention was built for 4 channels, got 2"):
        TemporalAttention(4)(torch.randn(1, 2, 2, 2, 2))


def test_temporal_and_spatial_attention_modules():
    temporal = TemporalAttention(6, dim_head=4, heads=2, pos_bias="t5", causal=True)
    assert {id(p) for p in temporal_parameters(temporal)} == {id(p) for p in temporal.parameters()}
    video = torch.randn(2, 6, 3, 2, 2)
    torch.testing.assert_close(temporal(video), video)  # identity at init
    image = torch.randn(2, 6, 2, 2)
    assert temporal(image) is image
    randomize(temporal)
    assert not torch.allclose(temporal(video), video)
    assert temporal(video, enable_time=False) is video
    mixed = temporal(video, enable_time=torch.tensor([True, False]))
    torch.testing.assert_close(mixed[1], video[1])
    torch.testing.assert_close(mixed[:1], temporal(video[:1]))

    spatial = randomize(SpatialAttention(6, dim_head=4, heads=2, pos_bias="rotary"))
    assert list(temporal_parameters(spatial)) == []
    torch.testing.assert_close(spatial(video), frame_by_frame(spatial, video), **TOL)


def test_flash_and_backend_arguments():
    torch.manual_seed(0)
    plain = randomize(build(6, 2, 4, True))
    flash = build(6, 2, 4, True, flash=True)
    flash.load_state_dict(plain.state_dict())
    # flash=True is a preference for auto, not an explicit backend that would override a
    # context or SPACETIME_ATTN_BACKEND
    assert flash.flash and flash.spatial.attn.backend is None and plain.spatial.attn.backend is None
    assert flash.spatial.attn.prefer_fused and flash.temporal.attn.prefer_fused
    assert not plain.spatial.attn.prefer_fused
    video = torch.randn(2, 6, 3, 4, 4)
    torch.testing.assert_close(flash(video), plain(video), **TOL)
    math = build(6, 2, 4, True, flash=True, backend="math")
    assert {m.backend for m in (math.spatial.attn, math.temporal.attn)} == {"math"}
    math.load_state_dict(plain.state_dict())
    torch.testing.assert_close(math(video), plain(video), **TOL)


def test_flash_does_not_override_context_or_environment(monkeypatch):
    """An explicit backend choice in the context or SPACETIME_ATTN_BACKEND reaches a block built
    with flash=True: a backend that cannot run on CPU (xformers) makes the call fail."""
    from spacetime.attend import ENV_VAR, attention_backend

    flash = build(6, 2, 4, True, flash=True)
    video = torch.randn(1, 6, 2, 4, 4)
    flash(video)
    with attention_backend("xformers"), pytest.raises((ValueError, RuntimeError)):
        flash(video)
    monkeypatch.setenv(ENV_VAR, "xformers")
    with pytest.raises((ValueError, RuntimeError)):
        flash(video)
    with attention_backend("math"):
        flash(video)  # the context beats the environment variable


def from_make_a_video(state):
    """make-a-video-pytorch 0.4.0 SpatioTemporalAttention state dict -> ours."""
    out = {}
    for key, value in state.items():
        for old, new in (
            ("spatial_attn.", "spatial.attn."), ("temporal_attn.", "temporal.attn."),
            ("spatial_rel_pos_bias.", "spatial.pos_bias."), ("temporal_rel_pos_bias.", "temporal.pos_bias."),
            ("net.2.", "net.4."), ("net.1.0.", "net.2."), ("net.0.0.", "net.0."),
            ("ff.proj_in.0.", "ff.proj_in.proj."), ("ff.proj_out.0.", "ff.norm."), ("ff.proj_out.1.", "ff.proj_out."),
        ):
            if key.startswith(old) or f".{old}" in key:
                key = key.replace(old, new, 1)
        out[key] = value.flatten(1) if value.ndim == 5 else value
    return out


@pytest.mark.parametrize("pos_bias, causal, ff", [(True, False, True), (True, True, True), (False, False, False)])
def test_parity_with_make_a_video(pos_bias, causal, ff):
    mav = pytest.importorskip("make_a_video_pytorch.make_a_video")
    torch.manual_seed(0)
    kw = dict(dim_head=8, heads=3, pos_bias=pos_bias, causal_time_attn=causal, add_feed_forward=ff, ff_mult=4)
    ref = randomize(mav.SpatioTemporalAttention(12, **kw), seed=3)
    ours = SpatioTemporalAttention(12, **kw)
    ours.load_state_dict(from_make_a_video(ref.state_dict()), strict=True)
    video = torch.randn(2, 12, 4, 4, 3)
    for x, enable_time in ((video, True), (video, False), (video[:, :, 0], True)):
        torch.testing.assert_close(ours(x, enable_time=enable_time), ref(x, enable_time=enable_time), atol=1e-5, rtol=1e-5)


COMPILE_SCRIPT = """
import torch
from spacetime import SpatioTemporalAttention
torch.manual_seed(0)
for pos_bias in (True, "t5", "rotary"):
    torch._dynamo.reset()
    attn = SpatioTemporalAttention(8, dim_head=4, heads=2, pos_bias=pos_bias, context_dim=3,
                                   causal_time_attn=True, ff_mult=2)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(std=0.3)
    video, context = torch.randn(2, 8, 3, 4, 4), torch.randn(2, 2, 3)
    mask = torch.tensor([[True, False], [True, True]])
    compiled = torch.compile(attn, fullgraph=True)
    for enable_time in (True, torch.tensor([True, False])):
        torch.testing.assert_close(
            compiled(video, enable_time, context=context, context_mask=mask),
            attn(video, enable_time, context=context, context_mask=mask), atol=1e-4, rtol=1e-4)
print("compiled ok")
"""


@pytest.mark.slow
def test_compile_fullgraph():
    # In a fresh interpreter: the jaxtyping/beartype import hook of the test session wraps every
    # function in Python-level checks that Dynamo cannot trace; users compile unhooked code.
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled ok" in result.stdout


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flash_with_position_bias_runs_on_a_fused_kernel(monkeypatch):
    import spacetime.attention as attention_module
    from spacetime.attend import resolve_backend

    chosen = []
    real_attend = attention_module.attend

    def spy(q, k, v, bias=None, *, causal=False, backend=None):
        chosen.append(str(resolve_backend(q, k, v, bias, causal, backend)))
        return real_attend(q, k, v, bias, causal=causal, backend=backend)

    monkeypatch.setattr(attention_module, "attend", spy)
    attn = randomize(build(64, 4, 32, True, flash=True, causal_time_attn=True)).cuda()
    video = torch.randn(2, 64, 4, 8, 8, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = attn(video)
    out.float().sum().backward()
    assert chosen and "math" not in chosen, chosen
    reference = attn.float()(video)
    torch.testing.assert_close(out.float(), reference, atol=5e-2, rtol=5e-2)


def test_flash_layers_follow_the_context_and_the_environment(monkeypatch):
    from spacetime import attention_backend

    flash = build(6, 2, 4, True, flash=True)
    video = torch.randn(1, 6, 2, 4, 4)
    # "flash" cannot run fp32 on CPU: the refusal proves the context / variable was used
    with attention_backend("flash"), pytest.raises(ValueError, match="backend 'flash' cannot run"):
        flash(video)
    monkeypatch.setenv("SPACETIME_ATTN_BACKEND", "flash")
    with pytest.raises(ValueError, match="backend 'flash' cannot run"):
        flash(video)
    with attention_backend("math"):  # the innermost choice wins over the variable
        flash(video)


def test_prefer_fused_tries_fused_kernels_first_off_cuda():
    from spacetime.attend import AttentionBackend, _choose, _describe, attend

    q = torch.randn(4, 2, 8, 16)  # 8 keys: auto alone runs math first on CPU
    inputs = _describe(q, q, q, None, False)
    assert _choose(AttentionBackend.AUTO, inputs) is AttentionBackend.MATH
    assert _choose(AttentionBackend.AUTO, inputs, prefer_fused=True) is AttentionBackend.SDPA
    torch.testing.assert_close(attend(q, q, q, prefer_fused=True), attend(q, q, q, backend="math"), **TOL)
