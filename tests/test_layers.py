"""PseudoConv3d, TemporalConv, FeedForward, RMSNorm, Downsample, Upsample: shapes, image path ==
video path with time off, per-sample masks, identity at init, causality, errors, the
temporal/spatial parameter split and parity with make-a-video-pytorch 0.4.0."""

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spacetime import (
    Downsample,
    FeedForward,
    PseudoConv3d,
    RMSNorm,
    TemporalConv,
    Upsample,
    spatial_parameters,
    temporal_parameters,
)

odd_kernel = st.sampled_from([1, 3, 5])


@torch.no_grad()
def randomize(module, params=None, std=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters() if params is None else params:
        p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def check_split(module):
    temporal = list(temporal_parameters(module))
    spatial = list(spatial_parameters(module))
    ids = [id(p) for p in temporal + spatial]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in module.parameters()}
    return temporal, spatial


def frame_by_frame(layer, video, **kw):
    return torch.stack([layer(video[:, :, i], **kw) for i in range(video.shape[2])], dim=2)


# ---------------------------------------------------------------- PseudoConv3d


@given(
    b=st.integers(1, 2), f=st.integers(1, 4), h=st.integers(1, 5), w=st.integers(1, 5),
    dim=st.integers(1, 5), dim_out=st.integers(1, 5), k=odd_kernel, tk=odd_kernel,
    causal=st.booleans(),
)
def test_pseudo_conv_shapes_and_image_path(b, f, h, w, dim, dim_out, k, tk, causal):
    torch.manual_seed(0)
    conv = randomize(PseudoConv3d(dim, dim_out, k, temporal_kernel_size=tk, causal_time=causal))
    video = torch.randn(b, dim, f, h, w)
    out = conv(video)
    assert out.shape == (b, dim_out, f, h, w)
    assert conv(video[:, :, 0]).shape == (b, dim_out, h, w)
    # Time off: every frame gets exactly its image-path result.
    torch.testing.assert_close(conv(video, enable_time=False), frame_by_frame(conv, video))
    # Per-sample mask: each sample gets the result of its own setting.
    mask = torch.arange(b) % 2 == 0
    mixed = conv(video, enable_time=mask)
    for i in range(b):
        torch.testing.assert_close(mixed[i : i + 1], conv(video[i : i + 1], enable_time=bool(mask[i])))


@given(
    b=st.integers(1, 2), f=st.integers(1, 4), h=st.integers(1, 4), w=st.integers(1, 4),
    dim=st.integers(1, 4), dim_out=st.integers(1, 4), k=odd_kernel, tk=st.integers(1, 4),
)
def test_pseudo_conv_identity_over_time_at_init(b, f, h, w, dim, dim_out, k, tk):
    conv = PseudoConv3d(dim, dim_out, k, temporal_kernel_size=tk, causal_time=True)
    temporal, spatial = check_split(conv)
    randomize(conv, spatial)
    video = torch.randn(b, dim, f, h, w)
    torch.testing.assert_close(conv(video), frame_by_frame(conv, video))
    if k > 1:
        assert [tuple(p.shape) for p in temporal] == [(dim_out, dim_out, tk), (dim_out,)]
    else:
        assert temporal == [] and conv.temporal is None


@given(f=st.integers(2, 6), t=st.integers(1, 5), tk=st.integers(1, 4))
def test_pseudo_conv_causal(f, t, tk):
    t = min(t, f - 1)
    conv = randomize(PseudoConv3d(3, 4, 3, temporal_kernel_size=tk, causal_time=True))
    video = torch.randn(2, 3, f, 4, 4)
    changed = video.clone()
    changed[:, :, t:] = torch.randn_like(changed[:, :, t:])
    a, b = conv(video), conv(changed)
    torch.testing.assert_close(a[:, :, :t], b[:, :, :t])
    assert not torch.allclose(a[:, :, t:], b[:, :, t:])


def test_pseudo_conv_non_causal_sees_future():
    conv = randomize(PseudoConv3d(3, 3, 3))
    video = torch.randn(1, 3, 4, 4, 4)
    changed = video.clone()
    changed[:, :, 2:] += 1
    assert not torch.allclose(conv(video)[:, :, 1], conv(changed)[:, :, 1])


def test_temporal_conv_module():
    tconv = TemporalConv(4, 3)
    assert [id(p) for p in temporal_parameters(tconv)] == [id(p) for p in tconv.parameters()]
    video = torch.randn(2, 4, 5, 3, 3)
    torch.testing.assert_close(tconv(video), video)
    image = torch.randn(2, 4, 3, 3)
    assert tconv(image) is image
    randomize(tconv)
    assert not torch.allclose(tconv(video), video)
    torch.testing.assert_close(tconv(video, enable_time=False), video)
    tconv.reset_parameters()
    torch.testing.assert_close(tconv(video), video)
    assert "kernel_size=3" in repr(tconv)


def test_pseudo_conv_errors():
    conv = PseudoConv3d(4, 8)
    with pytest.raises(ValueError, match=r"built for 4 channels, got 3"):
        conv(torch.randn(1, 3, 2, 4, 4))
    with pytest.raises(ValueError, match=r"image \(B, C, H, W\) or a video \(B, C, F, H, W\).*6 dims"):
        conv(torch.randn(1, 4, 1, 2, 4, 4))
    with pytest.raises((ValueError, TypeError)):
        conv(torch.randn(4, 4, 4))
    # jaxtyping (active in tests) or check_enable_time (without it) rejects the batch mismatch.
    with pytest.raises((ValueError, TypeError), match=r"enable_time"):
        conv(torch.randn(1, 4, 2, 4, 4), enable_time=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"kernel_size must be odd and >= 1, got 2"):
        PseudoConv3d(4, kernel_size=2)
    with pytest.raises(ValueError, match=r"must be odd unless causal=True.*got 2"):
        PseudoConv3d(4, temporal_kernel_size=2)
    with pytest.raises(ValueError, match=r"kernel_size must be >= 1, got 0"):
        TemporalConv(4, 0)


# ---------------------------------------------------------------- FeedForward / RMSNorm


@given(
    b=st.integers(1, 2), f=st.integers(1, 4), h=st.integers(1, 4), w=st.integers(1, 4),
    dim=st.integers(2, 8), mult=st.sampled_from([1, 2, 4]), shift=st.booleans(),
)
def test_feed_forward(b, f, h, w, dim, mult, shift):
    ff = randomize(FeedForward(dim, mult, token_shift=shift))
    check_split(ff)
    assert list(temporal_parameters(ff)) == []
    video = torch.randn(b, dim, f, h, w)
    assert ff(video).shape == video.shape
    torch.testing.assert_close(ff(video, enable_time=False), frame_by_frame(ff, video))
    mask = torch.arange(b) % 2 == 1
    mixed = ff(video, enable_time=mask)
    for i in range(b):
        torch.testing.assert_close(mixed[i : i + 1], ff(video[i : i + 1], enable_time=bool(mask[i])))
    if not shift:
        torch.testing.assert_close(ff(video), frame_by_frame(ff, video))
    # Token shift looks one frame back only: causal.
    changed = video.clone()
    changed[:, :, -1] += 1
    torch.testing.assert_close(ff(video)[:, :, :-1], ff(changed)[:, :, :-1])


def test_token_shift_moves_half_the_channels_one_frame():
    ff = FeedForward(3, 2, token_shift=True)  # inner_dim 4: channels 2, 3 shift
    from spacetime import token_shift

    t = torch.arange(15, dtype=torch.float).view(1, 3, 1, 1, 5)  # (b f h w c), 2 channels shift
    shifted = token_shift(t)
    torch.testing.assert_close(shifted[..., :3], t[..., :3])
    torch.testing.assert_close(shifted[:, 1:, ..., 3:], t[:, :-1, ..., 3:])
    assert (shifted[:, 0, ..., 3:] == 0).all()
    assert ff.proj_in.proj.weight.shape == (8, 3)


def test_feed_forward_and_norm_errors():
    with pytest.raises(ValueError, match=r"int\(dim \* mult \* 2 / 3\) >= 1, got dim=1, mult=1"):
        FeedForward(1, 1)
    with pytest.raises(ValueError, match=r"built for 4 channels, got 5"):
        FeedForward(4)(torch.randn(1, 5, 2, 2, 2))
    with pytest.raises(ValueError, match=r"RMSNorm dim must be >= 1, got 0"):
        RMSNorm(0)


def test_rms_norm_axes():
    x = torch.randn(2, 6, 3, 4)
    norm = randomize(RMSNorm(6))
    ref = x / x.norm(dim=1, keepdim=True) * 6**0.5 * norm.gamma.view(-1, 1, 1)
    torch.testing.assert_close(norm(x), ref)
    last = randomize(RMSNorm(4, axis=-1))
    torch.testing.assert_close(last(x), x / x.norm(dim=-1, keepdim=True) * 2 * last.gamma)


@pytest.mark.parametrize("film", [False, True])
@pytest.mark.parametrize("axis", [1, -1])
def test_rms_norm_fused_film_silu_matches_autograd(axis, film):
    """The fused node (saves only its input, recomputes in backward) against autograd through
    the plain expression, in float64, with an all-zero position (the clamped-norm branch)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64)
    if axis == 1:
        x[0, :, 1, 2] = 0
    else:
        x[1, 2, 0, :] = 0
    x.requires_grad_()
    dim = x.shape[axis]
    norm = randomize(RMSNorm(dim, axis=axis)).double()
    gamma = norm.gamma.view(-1, *([1] * (x.ndim - 1 - axis % x.ndim)))
    scale_shift = None
    inputs = [x, norm.gamma]
    if film:
        film_shape = (2, 5, 1, 1) if axis == 1 else (2, 1, 1, 4)
        scale_shift = tuple(
            torch.randn(film_shape, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2)
        )
        inputs += list(scale_shift)

    def reference():
        y = torch.nn.functional.normalize(x, dim=axis) * dim**0.5 * gamma
        if film:
            y = y * (scale_shift[0] + 1) + scale_shift[1]
        return torch.nn.functional.silu(y)

    out, expected = norm(x, scale_shift, silu=True), reference()
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(out, inputs, grad_out), torch.autograd.grad(expected, inputs, grad_out)):
        torch.testing.assert_close(got, want)
    # Without FiLM and SiLU, the plain norm's gradient too.
    plain = torch.autograd.grad(norm(x).sum(), x)[0]
    unfused = torch.nn.functional.normalize(x, dim=axis) * dim**0.5 * gamma
    torch.testing.assert_close(plain, torch.autograd.grad(unfused.sum(), x)[0])


def test_rms_norm_rejects_a_feature_mismatch():
    with pytest.raises(ValueError, match=r"built for 6 features on axis 1, got shape \(2, 5, 3\)"):
        RMSNorm(6)(torch.randn(2, 5, 3))


# ---------------------------------------------------------------- Downsample / Upsample


@given(
    b=st.integers(1, 2), f2=st.integers(1, 3), h2=st.integers(1, 3), w2=st.integers(1, 3),
    dim=st.integers(1, 5), space=st.booleans(), time=st.booleans(), nonlin=st.booleans(),
)
def test_down_up_shapes_and_image_path(b, f2, h2, w2, dim, space, time, nonlin):
    if not (space or time):
        space = True
    down = randomize(Downsample(dim, downsample_space=space, downsample_time=time, nonlin=nonlin))
    up = randomize(Upsample(dim, upsample_space=space, upsample_time=time, nonlin=nonlin))
    f, h, w = 2 * f2, 2 * h2, 2 * w2
    video = torch.randn(b, dim, f, h, w)
    s = 2 if space else 1
    t = 2 if time else 1
    assert down(video).shape == (b, dim, f // t, h // s, w // s)
    assert up(video).shape == (b, dim, f * t, h * s, w * s)
    assert down(video[:, :, 0]).shape == (b, dim, h // s, w // s)
    assert up(video[:, :, 0]).shape == (b, dim, h * s, w * s)
    for layer in (down, up):
        torch.testing.assert_close(layer(video, enable_time=False), frame_by_frame(layer, video))
        same = torch.ones(b, dtype=torch.bool)
        torch.testing.assert_close(layer(video, enable_time=same), layer(video))
        torch.testing.assert_close(layer(video, enable_time=~same), layer(video, enable_time=False))
        temporal, _ = check_split(layer)
        assert len(temporal) == (0 if not time else (1 if layer is down else 2))


def test_upsample_init_is_nearest_neighbour_of_a_linear_map():
    up = Upsample(3, upsample_time=True)
    x = torch.randn(1, 3, 2, 2, 2)
    out = up(x)
    blocks = out.unfold(2, 2, 2).unfold(3, 2, 2).unfold(4, 2, 2)  # (b c f h w 2 2 2)
    torch.testing.assert_close(blocks, blocks[..., :1, :1, :1].expand_as(blocks))


def test_down_up_errors():
    down = Downsample(2, downsample_time=True)
    with pytest.raises(ValueError, match=r"halves the frame count, which must be even; got 3 frames"):
        down(torch.randn(1, 2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"height and width, which must be even; got 3x4"):
        down(torch.randn(1, 2, 2, 3, 4))
    with pytest.raises(ValueError, match=r"changes the number of frames.*mixed per-sample mask"):
        down(torch.randn(2, 2, 2, 4, 4), enable_time=torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"changes the number of frames"):
        Upsample(2, upsample_time=True)(torch.randn(2, 2, 2, 4, 4), enable_time=torch.tensor([False, True]))
    with pytest.raises(ValueError, match=r"built for 2 channels, got 3"):
        down(torch.randn(1, 3, 2, 4, 4))
    with pytest.raises(ValueError, match=r"needs downsample_space or downsample_time"):
        Downsample(2, downsample_space=False)
    with pytest.raises(ValueError, match=r"needs upsample_space or upsample_time"):
        Upsample(2, upsample_space=False)


# ---------------------------------------------------------------- make-a-video parity


def from_make_a_video(state, target):
    """make-a-video-pytorch 0.4.0 layer state dict -> this library's names and shapes."""
    rules = [
        (r"(^|\.)spatial_conv\.", r"\1spatial."),
        (r"(^|\.)temporal_conv\.", r"\1temporal."),
        (r"proj_in\.0\.weight", "proj_in.proj.weight"),
        (r"proj_out\.0\.gamma", "norm.gamma"),
        (r"proj_out\.1\.weight", "proj_out.weight"),
        (r"(down_space|down_time)\.1\.", r"\1."),
        (r"(up_space|up_time)\.0\.", r"\1."),
    ]
    shapes = {k: v.shape for k, v in target.state_dict().items()}
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value.reshape(shapes[key])
    return out


def test_parity_with_make_a_video_layers():
    mav = pytest.importorskip("make_a_video_pytorch.make_a_video")
    torch.manual_seed(0)
    pairs = [
        (mav.PseudoConv3d(4, 6, 3), PseudoConv3d(4, 6, 3)),
        (mav.PseudoConv3d(3, 5, 7, temporal_kernel_size=3), PseudoConv3d(3, 5, 7, temporal_kernel_size=3)),
        (mav.PseudoConv3d(4, 6, 1), PseudoConv3d(4, 6, 1)),
        (mav.FeedForward(4, mult=4), FeedForward(4, 4)),
        (mav.FeedForward(5, mult=2), FeedForward(5, 2)),
        (mav.Downsample(4, downsample_time=True), Downsample(4, downsample_time=True)),
        (mav.Downsample(4, nonlin=True), Downsample(4, nonlin=True)),
        (mav.Upsample(4, upsample_time=True), Upsample(4, upsample_time=True)),
        (mav.Upsample(4, upsample_space=False, upsample_time=True, nonlin=True),
         Upsample(4, upsample_space=False, upsample_time=True, nonlin=True)),
    ]
    for ref, ours in pairs:
        randomize(ref, seed=1)
        ours.load_state_dict(from_make_a_video(ref.state_dict(), ours), strict=True)
        video = torch.randn(2, ours.dim, 4, 8, 8)
        for x, enable_time in ((video, True), (video, False), (video[:, :, 0], True)):
            torch.testing.assert_close(
                ours(x, enable_time=enable_time), ref(x, enable_time=enable_time),
                atol=1e-5, rtol=1e-5, msg=lambda m: f"{ours!r}: {m}",
            )
    norm_ref, norm = mav.RMSNorm(6), RMSNorm(6)
    randomize(norm_ref)
    norm.load_state_dict(norm_ref.state_dict())
    x = torch.randn(2, 6, 3, 4, 4)
    torch.testing.assert_close(norm(x), norm_ref(x))

