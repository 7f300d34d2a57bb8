"""inflate(): a 2D U-Net (a plain nn.Conv2d one, diffusers UNet2DModel and UNet2DConditionModel,
tiny and random) becomes a video model that equals the 2D model per frame at init, mixes frames
once its temporal parameters move, keeps its 2D weights, splits its parameters, passes images
through, honours enable_time and causal_time, and rejects bad input."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from spacetime import PseudoConv3d, SpatialAttention, spatial_parameters, temporal_parameters
from spacetime.inflate import InflatedModel, TemporalAfter, VideoLayer, inflate

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These tiny models are dominated by per-op overhead; on a shared machine two intra-op
    # threads make them many times slower, not faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyUNet2D(nn.Module):
    """A user's 2D U-Net: plain convs (3x3, strided, 1x1), a spacetime PseudoConv3d and
    SpatialAttention used on images, timestep and pooled-vector conditioning."""

    def __init__(self, channels=3, dim=8, cond_dim=5, causal=False):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, dim, 3, padding=1)
        self.time_mlp = nn.Linear(1, dim)
        self.cond_mlp = nn.Linear(cond_dim, dim)
        self.down = nn.Conv2d(dim, 2 * dim, 3, stride=2, padding=1)
        self.mid = PseudoConv3d(2 * dim, 2 * dim, causal_time=causal)
        self.norm = nn.GroupNorm(2, 2 * dim)
        self.attn = SpatialAttention(2 * dim, heads=2, dim_head=4)
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2.0), nn.Conv2d(2 * dim, dim, 3, padding=1)
        )
        self.merge = nn.Conv2d(2 * dim, dim, 1)
        self.conv_out = nn.Conv2d(dim, channels, 3, padding=1)

    def forward(self, x, t, cond=None):
        emb = self.time_mlp(t.float()[:, None])
        if cond is not None:
            emb = emb + self.cond_mlp(cond)
        h = self.conv_in(x) + emb[:, :, None, None]
        d = self.attn(self.norm(self.mid(torch.nn.functional.silu(self.down(h)))))
        u = self.merge(torch.cat([self.up(d), h], dim=1))
        return self.conv_out(torch.nn.functional.silu(u))


def tiny_plain(causal=False):
    torch.manual_seed(0)
    return TinyUNet2D(causal=causal).eval()


def tiny_unet2d():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
        layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"),
    ).eval()


def tiny_unet2d_cond():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, norm_num_groups=8, cross_attention_dim=16, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def _conditioning(kind, b, gen):
    """The 2D model's arguments besides x, per video, for a batch of b."""
    if kind.startswith("plain"):
        return (torch.tensor([3, 700])[:b],), {"cond": torch.randn(b, 5, generator=gen)}
    if kind == "unet2d":
        return (torch.tensor([10, 400])[:b],), {}
    return (torch.tensor(250),), {"encoder_hidden_states": torch.randn(b, 3, 16, generator=gen)}


# name -> (builder, channels)
BUILDERS = {
    "plain": (tiny_plain, 3),
    "plain_causal": (lambda: tiny_plain(causal=True), 3),
    "unet2d": (tiny_unet2d, 3),
    "unet2d_cond": (tiny_unet2d_cond, 4),
}
KINDS = ["plain", "unet2d", "unet2d_cond"]
OPTIONS = {"heads": 2, "dim_head": 8}


def sample_of(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out.sample


def setup(kind, b=2, f=3, hw=8, seed=0, **options):
    builder, channels = BUILDERS[kind]
    model_2d = builder()
    reference = copy.deepcopy(model_2d)
    inflated = inflate(model_2d, **{**OPTIONS, **options})
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(b, channels, f, hw, hw, generator=gen)
    args, kwargs = _conditioning(kind, b, gen)
    return reference, inflated, video, args, kwargs


def per_frame(reference, video, args, kwargs):
    return torch.stack(
        [sample_of(reference(video[:, :, i], *args, **kwargs)) for i in range(video.shape[2])],
        dim=2,
    )


@torch.no_grad()
def randomize_temporal(model, std=0.3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for p in temporal_parameters(model):
        p.copy_(torch.randn(p.shape, generator=gen) * std)


# ------------------------------------------------------------------ identity at init


@pytest.mark.parametrize(
    "kind, return_dict",
    [("plain", None), ("unet2d", True), ("unet2d", False), ("unet2d_cond", True),
     ("unet2d_cond", False)],
)
@torch.no_grad()
def test_identity_at_init_per_frame(kind, return_dict):
    reference, inflated, video, args, kwargs = setup(kind)
    if return_dict is not None:
        kwargs = {**kwargs, "return_dict": return_dict}
    out = inflated(video, *args, **kwargs)
    expected = per_frame(reference, video, args, kwargs)
    ref_out = reference(video[:, :, 0], *args, **kwargs)
    assert type(out) is type(ref_out)
    assert sample_of(out).shape == video.shape[:1] + expected.shape[1:]
    torch.testing.assert_close(sample_of(out), expected, atol=1e-5, rtol=1e-5)


@given(b=st.integers(1, 2), f=st.integers(1, 4), hw=st.sampled_from([4, 6]), causal=st.booleans())
@torch.no_grad()
def test_identity_at_init_plain_shapes(b, f, hw, causal):
    kind = "plain_causal" if causal else "plain"
    reference, inflated, video, args, kwargs = setup(kind, b=b, f=f, hw=hw, causal_time=causal)
    out = inflated(video, *args, **kwargs)
    assert out.shape == video.shape
    torch.testing.assert_close(out, per_frame(reference, video, args, kwargs), atol=1e-5, rtol=1e-5)


def test_inserted_layers():
    _, plain, *_ = setup("plain")
    # 3x3 convs get a temporal conv, the 1x1 merge does not; PseudoConv3d uses its own.
    wrapped = plain.wrapped
    assert {n for n, c in wrapped.items() if c == "spatial"} == {
        "conv_in", "down", "up.1", "conv_out", "attn"
    }
    assert wrapped["mid"] == "layer" and isinstance(plain.model.mid, VideoLayer)
    reference, cond, *_ = setup("unet2d_cond")
    resnets = [n for n, m in reference.named_modules() if type(m).__name__ == "ResnetBlock2D"]
    transformers = [
        n for n, m in reference.named_modules() if type(m).__name__ == "Transformer2DModel"
    ]
    # diffusers: conv1/conv2 of every resnet block and every Transformer2DModel (not the
    # Attention modules inside it, not conv_in/conv_out or the resamplers).
    expected = {f"{n}.{c}" for n in resnets for c in ("conv1", "conv2")} | set(transformers)
    assert resnets and transformers and set(cond.wrapped) == expected
    _, unet2d, *_ = setup("unet2d")
    assert any(isinstance(m.spatial, diffusers.models.attention_processor.Attention)
               for m in unet2d.modules() if isinstance(m, TemporalAfter))


# ------------------------------------------------------------------ frames interact


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_frames_interact_only_after_training(kind):
    _, inflated, video, args, kwargs = setup(kind)
    changed = video.clone()
    changed[:, :, 0] += torch.randn_like(changed[:, :, 0])
    before = sample_of(inflated(video, *args, **kwargs))
    after = sample_of(inflated(changed, *args, **kwargs))
    torch.testing.assert_close(after[:, :, 1:], before[:, :, 1:], atol=1e-6, rtol=0)
    assert not torch.allclose(after[:, :, 0], before[:, :, 0])

    randomize_temporal(inflated)
    before = sample_of(inflated(video, *args, **kwargs))
    after = sample_of(inflated(changed, *args, **kwargs))
    assert (after[:, :, 1:] - before[:, :, 1:]).abs().amax() > 1e-4


@pytest.mark.parametrize("kind", ["plain_causal", "unet2d"])
@torch.no_grad()
def test_causal_time(kind):
    _, inflated, video, args, kwargs = setup(kind, f=4, causal_time=True)
    randomize_temporal(inflated)
    changed = video.clone()
    changed[:, :, 2] += 1.0
    before = sample_of(inflated(video, *args, **kwargs))
    after = sample_of(inflated(changed, *args, **kwargs))
    torch.testing.assert_close(after[:, :, :2], before[:, :, :2], atol=1e-5, rtol=1e-5)
    assert (after[:, :, 3] - before[:, :, 3]).abs().amax() > 1e-4


# ------------------------------------------------------------------ parameters and weights


@pytest.mark.parametrize("kind", KINDS)
def test_weights_untouched_and_parameter_split(kind):
    reference, inflated, video, args, kwargs = setup(kind)
    original = reference.state_dict()
    state_2d = inflated.state_dict_2d()
    assert list(state_2d) == list(original)
    for key, value in original.items():
        assert torch.equal(state_2d[key], value), key
        assert inflated.inflated_key(key) in inflated.state_dict()

    new = set()
    for module in inflated.modules():
        if isinstance(module, TemporalAfter):
            new.update(id(p) for p in module.temporal.parameters())
        if isinstance(module, VideoLayer) and module.layer.temporal is not None:
            new.update(id(p) for p in module.layer.temporal.parameters())
    temporal = list(temporal_parameters(inflated))
    spatial = list(spatial_parameters(inflated))
    assert temporal and {id(p) for p in temporal} == new and len(temporal) == len(new)
    all_ids = [id(p) for p in temporal + spatial]
    assert len(all_ids) == len(set(all_ids)) == len(list(inflated.parameters()))
    assert [id(p) for p in inflated.temporal_parameters()] == [id(p) for p in temporal]
    assert [id(p) for p in inflated.spatial_parameters()] == [id(p) for p in spatial]
    # The 2D model's parameters (by object) are exactly the spatial ones.
    if kind == "plain":
        # SpatialAttention/PseudoConv3d carry no extra temporal parameters besides `mid.temporal`.
        assert sum(p.numel() for p in spatial) == sum(
            p.numel() for p in reference.parameters()
        ) - sum(p.numel() for p in reference.mid.temporal.parameters())
    else:
        assert sum(p.numel() for p in spatial) == sum(p.numel() for p in reference.parameters())

    # Training only the temporal parameters changes only them.
    inflated.train()
    optimizer = torch.optim.SGD(inflated.temporal_parameters(), lr=0.1)
    before = {k: v.clone() for k, v in inflated.state_dict().items()}
    for _ in range(2):
        optimizer.zero_grad()
        sample_of(inflated(video, *args, **kwargs)).square().mean().backward()
        optimizer.step()
    after = inflated.state_dict()
    temporal_ids = {id(p) for p in temporal}
    temporal_keys = {k for k, p in inflated.named_parameters() if id(p) in temporal_ids}
    for key, value in after.items():
        if key in temporal_keys:
            continue
        assert torch.equal(value, before[key]), key
    assert any(not torch.equal(after[k], before[k]) for k in temporal_keys)
    # The 2D weights are unchanged (PseudoConv3d's own temporal conv in `plain` is temporal).
    for key, value in inflated.state_dict_2d().items():
        assert torch.equal(value, original[key]) or inflated.inflated_key(key) in temporal_keys, key


def test_in_place_copy_and_load_state_dict_2d():
    model_2d = tiny_plain()
    inflated = inflate(model_2d, **OPTIONS)
    assert inflated.model is model_2d and isinstance(model_2d.conv_in, TemporalAfter)

    fresh = tiny_plain()
    kept = inflate(fresh, copy=True, **OPTIONS)
    assert isinstance(fresh.conv_in, nn.Conv2d) and kept.model is not fresh

    other = TinyUNet2D()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    kept.load_state_dict_2d(other.state_dict())
    for key, value in other.state_dict().items():
        assert torch.equal(kept.state_dict_2d()[key], value)
    with pytest.raises(ValueError, match="missing"):
        kept.load_state_dict_2d({"conv_in.weight": other.conv_in.weight})


@torch.no_grad()
def test_modified_2d_model_still_works_on_images():
    reference, inflated, video, args, kwargs = setup("unet2d_cond")
    randomize_temporal(inflated)
    image = video[:, :, 0]
    expected = reference(image, *args, **kwargs).sample
    torch.testing.assert_close(inflated.model(image, *args, **kwargs).sample, expected)


# ------------------------------------------------------------------ images, enable_time


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_images_and_enable_time(kind):
    reference, inflated, video, args, kwargs = setup(kind)
    randomize_temporal(inflated)
    image = video[:, :, 0]
    torch.testing.assert_close(
        sample_of(inflated(image, *args, **kwargs)),
        sample_of(reference(image, *args, **kwargs)), atol=0, rtol=0,
    )
    frame_wise = per_frame(reference, video, args, kwargs)
    off = sample_of(inflated(video, *args, enable_time=False, **kwargs))
    torch.testing.assert_close(off, frame_wise, atol=1e-5, rtol=1e-5)

    mask = torch.tensor([True, False])
    mixed = sample_of(inflated(video, *args, enable_time=mask, **kwargs))
    on = sample_of(inflated(video, *args, **kwargs))
    torch.testing.assert_close(mixed[1], frame_wise[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[0], on[0], atol=1e-5, rtol=1e-5)
    assert (on[0] - frame_wise[0]).abs().amax() > 1e-4


@torch.no_grad()
def test_conditioning_is_per_video():
    # Different encoder_hidden_states / timesteps per video, each shared by its frames.
    reference, inflated, video, _, _ = setup("unet2d_cond")
    gen = torch.Generator().manual_seed(3)
    t = torch.tensor([5, 800])
    ehs = torch.randn(2, 3, 16, generator=gen)
    out = inflated(video, t, encoder_hidden_states=ehs).sample
    for i in range(2):
        one = slice(i, i + 1)
        expected = per_frame(reference, video[one], (t[one],), {"encoder_hidden_states": ehs[one]})
        torch.testing.assert_close(out[i : i + 1], expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ options and errors


def test_options_choose_where():
    _, no_attn, *_ = setup("unet2d", temporal_attn=False)
    assert all(isinstance(m.temporal, nn.Module) and "attentions" not in n for n, m in
               no_attn.named_modules() if isinstance(m, TemporalAfter))
    _, only_conv_in, *_ = setup("unet2d", convs=["conv_in"], temporal_attn=False)
    assert set(only_conv_in.wrapped) == {"conv_in"}
    _, by_class, *_ = setup("plain", convs=[nn.Conv2d], attns=lambda name, m: False)
    assert "merge" in by_class.wrapped and "attn" not in by_class.wrapped
    _, k5, *_ = setup("plain", temporal_kernel_size=5)
    assert k5.model.conv_in.temporal.kernel_size == 5


def test_errors():
    # (Under the test suite's beartype hook the annotation itself rejects it.)
    with pytest.raises(TypeError, match="Module"):
        inflate("not a model")
    with pytest.raises(TypeError, match="no nn.Conv2d|has none"):
        inflate(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="odd"):
        inflate(tiny_plain(), temporal_kernel_size=4)
    with pytest.raises(ValueError, match="heads"):
        inflate(tiny_plain(), heads=0)
    with pytest.raises(ValueError, match="'auto'"):
        inflate(tiny_plain(), convs="conv_in")
    with pytest.raises(TypeError, match="only\\s+nn.Conv2d|only nn.Conv2d"):
        inflate(tiny_plain(), convs=["time_mlp"])
    with pytest.raises(ValueError, match="causal_time=False"):
        inflate(tiny_plain(), causal_time=True)
    with pytest.raises(ValueError, match="nowhere"):
        inflate(nn.Sequential(nn.Conv2d(3, 3, 1)), temporal_attn=False)
    # A bad option leaves the model as it was.
    model = tiny_plain()
    with pytest.raises(TypeError):
        inflate(model, convs=["time_mlp", "conv_in"])
    assert isinstance(model.conv_in, nn.Conv2d)

    inflated = inflate(tiny_plain(), **OPTIONS)
    with pytest.raises(TypeError, match="already inflated"):
        inflate(inflated)
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="6 dims"):
        inflated(torch.randn(2, 3, 1, 2, 8, 8), t)
    with pytest.raises(ValueError, match="enable_time"):
        inflated(torch.randn(2, 3, 2, 8, 8), t, enable_time=torch.tensor([True]))
    with pytest.raises(TypeError, match="enable_time"):
        inflated(torch.randn(2, 3, 2, 8, 8), t, enable_time="yes")


def test_returns_inflated_model_type():
    _, inflated, *_ = setup("plain")
    assert isinstance(inflated, InflatedModel)
    assert inflated.frame_context.num_frames is None  # reset after every forward


def test_gradient_checkpointing_matches():
    # Checkpointed blocks re-run in backward, after the forward has cleared the frame context.
    def temporal_grads(checkpointing):
        _, inflated, video, args, kwargs = setup("unet2d", f=2)
        randomize_temporal(inflated)
        if checkpointing:
            inflated.model.enable_gradient_checkpointing()
        inflated.train()
        sample_of(inflated(video, *args, **kwargs)).square().mean().backward()
        assert inflated.frame_context.num_frames is None
        return [p.grad for p in inflated.temporal_parameters()]

    for plain, checkpointed in zip(temporal_grads(False), temporal_grads(True), strict=True):
        torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)


@pytest.fixture
def without_runtime_checks():
    # Dynamo cannot trace the jaxtyping/beartype wrappers conftest installs; users run unhooked.
    import jaxtyping

    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", False)


@pytest.mark.slow
@torch.no_grad()
def test_compile_fullgraph(without_runtime_checks):
    # The frame count reaches the inserted layers through a plain shared object, which
    # dynamo traces without a graph break for a fixed input shape.
    _, inflated, video, args, kwargs = setup("plain")
    randomize_temporal(inflated)
    compiled = torch.compile(inflated, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(video, *args, **kwargs), inflated(video, *args, **kwargs))
    image = video[:, :, 0]
    torch.testing.assert_close(compiled(image, *args, **kwargs), inflated(image, *args, **kwargs))
    assert inflated.frame_context.num_frames is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_new_layers_follow_the_2d_model_device_and_dtype():
    model_2d = tiny_unet2d().to("cuda", torch.float64)
    reference = copy.deepcopy(model_2d)
    inflated = inflate(model_2d, **OPTIONS)
    assert all(p.device.type == "cuda" and p.dtype == torch.float64 for p in inflated.parameters())
    video = torch.randn(2, 3, 3, 8, 8, device="cuda", dtype=torch.float64)
    t = torch.tensor([10, 400], device="cuda")
    expected = per_frame(reference, video, (t,), {})
    torch.testing.assert_close(inflated(video, t).sample, expected, atol=1e-9, rtol=1e-9)
