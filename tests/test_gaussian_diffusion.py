"""GaussianDiffusion: schedules, objective conversions, loss, guidance, conditions, errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from diffusion import GaussianDiffusion, NoiseSchedule, beta_schedule, threshold_x0
from diffusion.gaussian import _quantile_rows
from diffusion.guidance import guided_output
from diffusion.schedules import (
    cosine_beta_schedule,
    eps_from_v,
    eps_from_x0,
    linear_beta_schedule,
    objective_target,
    prediction_to_x0_eps,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)

C, F, H, W = 2, 3, 4, 6


class Scale(nn.Module):
    """A tiny trainable denoiser with the plainest signature: forward(x, t)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.weight * x


class Recorder(nn.Module):
    """Records the keyword arguments of each call; conditional output `cond_value`,
    unconditional (`null_cond_prob == 1`) output `uncond_value`."""

    def __init__(self, cond_value: float = 3.0, uncond_value: float = -1.0, tokens: bool = False) -> None:
        super().__init__()
        self.calls: list[dict] = []
        self.cond_value, self.uncond_value = cond_value, uncond_value
        self.cond_on_tokens = tokens

    def forward(self, x: Tensor, t: Tensor, **kwargs) -> Tensor:
        self.calls.append(kwargs)
        value = self.uncond_value if kwargs.get("null_cond_prob", 0.0) == 1.0 else self.cond_value
        return torch.full_like(x, value)


class WithCondScale(Recorder):
    def forward_with_cond_scale(self, x: Tensor, t: Tensor, *, cond_scale: float, **kwargs) -> Tensor:
        self.calls.append({"cond_scale": cond_scale, **kwargs})
        return torch.full_like(x, 42.0)


class FakeTextEncoder:
    """Follows diffusion.text's interface: encode(list[str]) -> tokens, mask, pooled; dim."""

    dim = 5

    def __init__(self) -> None:
        self.seen: list[list[str]] = []

    def encode(self, texts: list[str]):
        self.seen.append(texts)
        lengths = torch.tensor([len(text.split()) for text in texts])
        max_len = int(lengths.max())
        tokens = torch.arange(len(texts) * max_len * self.dim, dtype=torch.float32).view(len(texts), max_len, self.dim)
        mask = torch.arange(max_len)[None, :] < lengths[:, None]
        tokens = tokens * mask[..., None]  # zero at padding, as TextEmbedding documents
        pooled = tokens.mean(dim=1) + 1000.0
        return SimpleNamespace(tokens=tokens, mask=mask, pooled=pooled)


def make(denoise_fn=None, **kwargs) -> GaussianDiffusion:
    options = dict(image_size=(H, W), num_frames=F, channels=C, timesteps=20)
    options.update(kwargs)
    return GaussianDiffusion(Scale() if denoise_fn is None else denoise_fn, **options)


def videos(batch: int = 2) -> Tensor:
    return torch.rand(batch, C, F, H, W)


# --- schedules --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cosine", "linear", "sigmoid"])
@given(timesteps=st.integers(1, 2000))
def test_schedule_tables_are_consistent(name, timesteps):
    s = NoiseSchedule.from_betas(beta_schedule(name, timesteps), dtype=torch.float64)
    abar = s.alphas_cumprod
    assert s.num_timesteps == timesteps
    assert bool(((s.betas > 0) & (s.betas < 1)).all())
    assert bool(((abar > 0) & (abar < 1)).all())
    assert bool((abar[1:] < abar[:-1]).all())
    torch.testing.assert_close(abar, torch.cumprod(1 - s.betas, 0))
    torch.testing.assert_close(s.alphas_cumprod_prev, torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]]))
    torch.testing.assert_close(s.sqrt_alphas_cumprod**2 + s.sqrt_one_minus_alphas_cumprod**2, torch.ones_like(abar))
    torch.testing.assert_close(s.sqrt_recip_alphas_cumprod * s.sqrt_alphas_cumprod, torch.ones_like(abar))
    # The posterior mean of x_{t-1} at x0 = 1, x_t = alpha_t is alpha_{t-1} (the means agree).
    torch.testing.assert_close(
        s.posterior_mean_coef1 + s.posterior_mean_coef2 * s.sqrt_alphas_cumprod, s.alphas_cumprod_prev.sqrt()
    )
    # beta-tilde (Ho et al. eq. 7) and the equivalent form 1 / (1 / (1 - abar_prev) + alpha / beta).
    inner = s.posterior_variance[1:]
    other = 1 / (1 / (1 - s.alphas_cumprod_prev[1:]) + (1 - s.betas[1:]) / s.betas[1:])
    torch.testing.assert_close(inner, other)
    assert s.posterior_variance[0] == 0
    torch.testing.assert_close(s.snr, abar / (1 - abar))


@given(timesteps=st.integers(2, 2000))
def test_cosine_schedule_is_nichol_dhariwal_eq_17(timesteps):
    abar = NoiseSchedule.from_betas(cosine_beta_schedule(timesteps), dtype=torch.float64).alphas_cumprod
    s = 0.008
    f = [math.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2 for t in range(timesteps + 1)]
    # Index t is step t + 1; only the last step is affected by clipping beta.
    expected = torch.tensor([f[t + 1] / f[0] for t in range(timesteps - 1)], dtype=torch.float64)
    torch.testing.assert_close(abar[:-1], expected, rtol=1e-9, atol=1e-12)
    assert cosine_beta_schedule(timesteps)[-1] == pytest.approx(0.9999)


def test_linear_schedule_is_ho_et_al_and_scales_with_timesteps():
    betas = linear_beta_schedule(1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert linear_beta_schedule(250)[-1].item() == pytest.approx(0.08)
    for name in ("cosine", "linear", "sigmoid"):
        abar_end = NoiseSchedule.from_betas(beta_schedule(name, 1000)).alphas_cumprod[-1]
        assert abar_end < 1e-3, name  # x_T is (close to) pure noise


def test_schedule_buffers_are_registered_and_follow_the_module():
    d = make()
    names = dict(d.named_buffers())
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "posterior_variance", "posterior_mean_coef1",
                 "posterior_mean_coef2", "posterior_log_variance_clipped"):
        assert name in names and name in d.state_dict()
    d.double()
    assert d.alphas_cumprod.dtype == torch.float64 and d.schedule.alphas_cumprod.dtype == torch.float64
    assert d.num_timesteps == 20 and d.schedule.num_timesteps == 20


# --- objective conversions --------------------------------------------------------------


@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    abar=st.floats(1e-4, 1 - 1e-4),
    seed=st.integers(0, 2**16),
)
def test_objective_conversions_round_trip(shape, abar, seed):
    gen = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, *shape, generator=gen, dtype=torch.float64).unbind(0)
    alpha, sigma = torch.tensor(abar, dtype=torch.float64).sqrt(), torch.tensor(1 - abar, dtype=torch.float64).sqrt()
    x_t = alpha * x0 + sigma * eps
    v = v_from_x0_eps(x0, eps, alpha, sigma)
    torch.testing.assert_close(x0_from_eps(x_t, eps, alpha, sigma), x0)
    torch.testing.assert_close(eps_from_x0(x_t, x0, alpha, sigma), eps)
    torch.testing.assert_close(x0_from_v(x_t, v, alpha, sigma), x0)
    torch.testing.assert_close(eps_from_v(x_t, v, alpha, sigma), eps)
    for objective in ("noise", "x0", "v"):
        target = objective_target(objective, x0, eps, alpha, sigma)
        got_x0, got_eps = prediction_to_x0_eps(objective, target, x_t, alpha, sigma)
        torch.testing.assert_close(got_x0, x0)
        torch.testing.assert_close(got_eps, eps)


@pytest.mark.parametrize("objective", ["noise", "x0", "v"])
def test_a_model_outputting_the_target_has_zero_loss(objective):
    x, noise = videos(3), torch.randn(3, C, F, H, W)
    times = torch.tensor([0, 7, 19])

    class Oracle(nn.Module):
        def forward(self, x_t, t):
            x0 = x * 2 - 1
            abar = d.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
            return objective_target(objective, x0, noise, abar.sqrt(), (1 - abar).sqrt())

    d = make(Oracle(), objective=objective, loss_type="l2")
    assert d(x, noise=noise, times=times).item() == pytest.approx(0.0, abs=1e-10)
    if objective != "x0":
        # The oracle is exact only for this noise: another draw gives a positive loss.
        assert d(x, times=times).item() > 1e-3


@pytest.mark.parametrize("loss_type", ["l1", "l2", "huber"])
def test_loss_values(loss_type):
    d = make(Recorder(cond_value=0.0), loss_type=loss_type)
    noise = torch.full((2, C, F, H, W), 0.5)
    noise[1] = -2.0
    loss = d(videos(), noise=noise, times=torch.tensor([3, 4]))
    expected = {"l1": (0.5 + 2.0) / 2, "l2": (0.25 + 4.0) / 2, "huber": (0.5 * 0.25 + 1.5) / 2}[loss_type]
    assert loss.item() == pytest.approx(expected)


@pytest.mark.parametrize(
    ("objective", "floor"), [("noise", 0.0), ("x0", 0.0), ("x0", 1.0), ("v", 0.0), ("v", 1.0)]
)
def test_min_snr_weighting(objective, floor):
    times = torch.tensor([0, 10, 19])
    noise, x = torch.randn(3, C, F, H, W), videos(3)
    plain = make(Recorder(cond_value=0.0), objective=objective, loss_type="l2")
    weighted = make(Recorder(cond_value=0.0), objective=objective, loss_type="l2", min_snr_loss_weight=True,
                    min_snr_gamma=2.0, min_snr_floor=floor)
    abar = plain.alphas_cumprod[times]
    snr = abar / (1 - abar)
    # x0-space weight: min(snr, gamma), and at least the floor (truncated SNR at the noisy end)
    x0_weight = snr.clamp(max=2.0).clamp(min=floor)
    assert (snr[-1] < 1.0) and (x0_weight[-1] == (1.0 if floor else snr[-1]))
    weight = {"noise": x0_weight / snr, "x0": x0_weight, "v": x0_weight / (snr + 1)}[objective]
    alpha, sigma = abar.sqrt().view(-1, 1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1, 1)
    per_sample = objective_target(objective, x * 2 - 1, noise, alpha, sigma).pow(2).flatten(1).mean(1)
    assert plain(x, noise=noise, times=times).item() == pytest.approx(per_sample.mean().item(), rel=1e-5)
    assert weighted(x, noise=noise, times=times).item() == pytest.approx((weight * per_sample).mean().item(), rel=1e-5)


def test_readme_style_training_step_updates_the_denoiser():
    d = make()
    loss = d(videos())
    loss.backward()
    assert loss.ndim == 0 and d.denoise_fn.weight.grad is not None
    assert [name for name, _ in d.named_parameters()] == ["denoise_fn.weight"]


# --- what the denoiser is called with ---------------------------------------------------


def test_only_set_keywords_reach_the_denoiser():
    rec = Recorder()
    d = make(rec)
    d(videos())
    assert rec.calls[-1] == {}
    cond = torch.randn(2, 7)
    focus = torch.tensor([True, False])
    d(videos(), cond, 0.5, focus, null_cond_prob=0.25, enable_time=False)
    call = rec.calls[-1]
    assert set(call) == {"cond", "null_cond_prob", "prob_focus_present", "focus_present_mask", "enable_time"}
    assert call["cond"] is cond and call["null_cond_prob"] == 0.25 and call["prob_focus_present"] == 0.5
    assert call["focus_present_mask"] is focus and call["enable_time"] is False
    # The constructor's condition dropout applies to conditional batches only.
    d = make(rec, null_cond_prob=0.1)
    d(videos(), cond=cond)
    assert rec.calls[-1]["null_cond_prob"] == 0.1
    d(videos())
    assert rec.calls[-1] == {}
    tokens, mask = torch.randn(2, 4, 7), torch.tensor([[True] * 4, [True, True, False, False]])
    d(videos(), cond=tokens, cond_mask=mask, null_cond_prob=0.0)
    assert set(rec.calls[-1]) == {"cond", "cond_mask"}


def test_images_train_and_sample_the_same_network_with_time_disabled():
    shapes = []

    class Shapes(Recorder):
        def forward(self, x, t, **kwargs):
            shapes.append(tuple(x.shape))
            return super().forward(x, t, **kwargs)

    rec = Shapes(cond_value=0.0)
    d = make(rec)
    loss = d(torch.rand(5, C, H, W))
    assert loss.ndim == 0 and shapes[-1] == (5, C, H, W) and rec.calls[-1] == {}
    images = d.sample_images(batch_size=3, sampler="ddim", steps=2)
    assert images.shape == (3, C, H, W) and shapes[-1] == (3, C, H, W)


def test_string_conditions_use_the_text_encoder():
    encoder = FakeTextEncoder()
    texts = ["a whale", "two candles on a cake"]
    rec = Recorder()
    d = make(rec, text_encoder=encoder)
    d(videos(), cond=texts)
    call = rec.calls[-1]
    assert encoder.seen == [texts] and set(call) == {"cond"}
    torch.testing.assert_close(call["cond"], encoder.encode(texts).pooled)
    assert not any("encoder" in name for name in d.state_dict())

    tokens_rec = Recorder(tokens=True)
    d = make(tokens_rec, text_encoder=encoder)
    d.sample(cond=texts, sampler="ddim", steps=2)
    emb = encoder.encode(texts)
    assert all(set(call) == {"cond", "cond_mask"} for call in tokens_rec.calls)
    torch.testing.assert_close(tokens_rec.calls[-1]["cond"], emb.tokens)
    assert torch.equal(tokens_rec.calls[-1]["cond_mask"], emb.mask)

    cls_rec = Recorder()
    make(cls_rec, text_encoder=encoder, text_use_bert_cls=True)(videos(), cond=texts)
    torch.testing.assert_close(cls_rec.calls[-1]["cond"], emb.tokens[:, 0])


# --- guidance ---------------------------------------------------------------------------


@pytest.mark.parametrize("cond_scale", [0.0, 0.5, 2.0, 7.5])
def test_guidance_formula(cond_scale):
    rec = Recorder(cond_value=3.0, uncond_value=-1.0)
    x, t, cond = torch.randn(2, C, F, H, W), torch.tensor([1, 2]), torch.randn(2, 7)
    out = guided_output(rec, x, t, cond=cond, cond_scale=cond_scale)
    # eps = eps_uncond + s * (eps_cond - eps_uncond)
    torch.testing.assert_close(out, torch.full_like(x, -1.0 + cond_scale * 4.0))
    assert len(rec.calls) == 2 and rec.calls[0] == {"cond": cond}
    assert rec.calls[1] == {"cond": cond, "null_cond_prob": 1.0}


def test_guidance_uses_the_denoisers_own_method_when_present():
    rec = WithCondScale()
    x, t, cond = torch.randn(2, C, H, W), torch.tensor([1, 2]), torch.randn(2, 7)
    out = guided_output(rec, x, t, cond=cond, cond_scale=3.0)
    assert torch.all(out == 42.0) and rec.calls == [{"cond_scale": 3.0, "cond": cond}]


def test_cond_scale_one_is_exactly_one_unguided_call():
    x, t, cond = torch.randn(2, C, F, H, W), torch.tensor([1, 2]), torch.randn(2, 7)
    for rec in (Recorder(), WithCondScale()):
        out = guided_output(rec, x, t, cond=cond, cond_scale=1.0)
        assert len(rec.calls) == 1 and rec.calls[0] == {"cond": cond}
        assert torch.equal(out, rec(x, t, cond=cond))

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(7, C)

        def forward(self, x, t, cond=None, null_cond_prob=0.0):
            shift = self.proj(cond) * (1 - null_cond_prob)
            return 0.3 * x + shift.view(x.shape[0], C, 1, 1, 1)

    d = make(Linear())
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    guided = d.sample(cond=cond, cond_scale=1.0, sampler="ddim", steps=5, eta=1.0, generator=seed())
    calls = []
    d.denoise_fn.register_forward_hook(lambda module, args, out: calls.append(1))
    unguided = d.sample(cond=cond, sampler="ddim", steps=5, eta=1.0, generator=seed())
    assert torch.equal(guided, unguided) and len(calls) == 5
    calls.clear()
    strong = d.sample(cond=cond, cond_scale=3, sampler="ddim", steps=5, eta=1.0, generator=seed())
    assert len(calls) == 10 and not torch.equal(strong, unguided)


# --- sampling ---------------------------------------------------------------------------


def test_sample_shapes_range_and_batch_from_cond():
    d = make(Recorder(cond_value=0.1))
    out = d.sample(batch_size=3)
    assert out.shape == (3, C, F, H, W) and out.min() >= 0 and out.max() <= 1
    assert d.sample(cond=torch.randn(2, 7), batch_size=16, sampler="ddim", steps=3).shape == (2, C, F, H, W)
    assert d.sample(batch_size=1, num_frames=5, sampler="ddim", steps=3).shape == (1, C, 5, H, W)
    raw = make(auto_normalize=False).sample(batch_size=2, sampler="ddim", steps=4)
    assert raw.min() >= -1 and raw.max() <= 1 and raw.min() < 0
    mixed = d.interpolate(videos(), videos(), t=5, lam=0.3)
    assert mixed.shape == (2, C, F, H, W)


def test_progress_bar_counts_the_steps(capsys):
    d = make()
    d.sample(batch_size=1, sampler="ddim", steps=3, progress=True)
    assert "3/3" in capsys.readouterr().err


def test_seeded_sampling_is_reproducible_and_noise_can_be_given():
    d = make()
    a = d.sample(batch_size=2, generator=torch.Generator().manual_seed(1))
    b = d.sample(batch_size=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    noise = torch.randn(2, C, F, H, W)
    c = d.sample(batch_size=2, noise=noise, sampler="ddim")
    assert torch.equal(c, d.sample(batch_size=2, noise=noise, sampler="ddim"))


def test_dynamic_thresholding():
    x0 = torch.tensor([[0.5, -3.0, 2.0, 1.5, 0.2], [0.1, 0.2, -0.3, 0.4, 0.5]])
    out = threshold_x0(x0, 0.9)
    s = torch.quantile(x0.abs(), 0.9, dim=-1).clamp(min=1.0)
    torch.testing.assert_close(out, x0.clamp(-s[:, None], s[:, None]) / s[:, None])
    assert torch.equal(out[1], x0[1])  # below 1: only static clamping, which changes nothing
    assert out.abs().max() <= 1.0
    torch.testing.assert_close(threshold_x0(x0), x0.clamp(-1, 1))
    values = torch.randn(3, 101)
    for q in (0.0, 0.33, 0.9, 1.0):
        torch.testing.assert_close(_quantile_rows(values, q), torch.quantile(values, q, dim=-1))


def test_dynamic_thresholding_is_used_when_sampling():
    class Wild(nn.Module):
        def forward(self, x, t):
            return torch.full_like(x, 5.0)  # x0 objective: far outside [-1, 1]

    static = make(Wild(), objective="x0")
    dynamic = make(Wild(), objective="x0", use_dynamic_thres=True)
    x, t = torch.randn(2, C, F, H, W), torch.tensor([3, 3])
    assert torch.all(static.model_predictions(x, t)[0] == 1.0)
    assert torch.all(dynamic.model_predictions(x, t)[0] == 1.0)
    x0, eps = dynamic.model_predictions(x, t, clip_denoised=False)
    assert torch.all(x0 == 5.0)


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, message",
    [
        ({"loss_type": "l3"}, r"loss_type must be one of \('l1', 'l2', 'huber'\), got 'l3'"),
        ({"beta_schedule": "quadratic"}, r"beta_schedule must be one of \('cosine', 'linear', 'sigmoid'\), got 'quadratic'"),
        ({"objective": "eps"}, r"objective must be one of \('noise', 'x0', 'v'\), got 'eps'"),
        ({"timesteps": 0}, "timesteps must be an int >= 1, got 0"),
        ({"image_size": (0, 4)}, "image_size must be a positive int or"),
        ({"null_cond_prob": 1.5}, r"null_cond_prob must lie in \[0, 1\]"),
        ({"dynamic_thres_percentile": 0.0}, "dynamic_thres_percentile must lie in"),
    ],
)
def test_constructor_errors(option, message):
    with pytest.raises(ValueError, match=message):
        make(**option)


def test_shape_errors_say_what_was_expected():
    d = make()
    expected = rf"videos must be videos \(B, {C}, {F}, {H}, {W}\) or images \(B, {C}, {H}, {W}\)"
    for shape in ((2, C + 1, F, H, W), (2, C, F + 1, H, W), (2, C, F, H, W + 1), (2, C, H + 1, W), (2, 1, H, W)):
        with pytest.raises(ValueError, match=expected + rf".*got shape \({', '.join(map(str, shape))}\)"):
            d(torch.rand(shape))
    # Wrong rank: the jaxtyping annotation refuses it under the test-time hook (TypeError),
    # the explicit check otherwise (ValueError).
    with pytest.raises((TypeError, ValueError)):
        d(torch.rand(2, C, F, H, W, 1))
    with pytest.raises((TypeError, ValueError)):  # as above: jaxtyping checks `b` under the hook
        d(videos(), cond=torch.randn(3, 7))
    with pytest.raises(ValueError, match="cond has batch size 3, the data has 2"):
        d.prepare_cond(torch.randn(3, 7), None, 2)
    with pytest.raises(ValueError, match="cond_mask was given without cond"):
        d(videos(), cond_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises((TypeError, ValueError)):
        d(videos(), cond=torch.randn(2, 4, 7), cond_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="cond_mask must be a bool"):
        d.prepare_cond(torch.randn(2, 4, 7), torch.ones(2, 5, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="cond_mask must be a bool"):
        d.prepare_cond(torch.randn(2, 4, 7), torch.ones(2, 4), 2)
    with pytest.raises(ValueError, match=r"cond must be \(B, cond_dim\) or token embeddings"):
        d.prepare_cond(torch.randn(2, 4, 7, 1), None, 2)
    with pytest.raises(TypeError, match="cond must be a tensor, a list of strings or None, got dict"):
        d.prepare_cond({"text": "a cat"}, None, 2)
    with pytest.raises(ValueError, match=r"times must lie in \[0, 20\)"):
        d(videos(), times=torch.tensor([0, 20]))
    with pytest.raises(ValueError, match="noise must have the data's shape"):
        d(videos(), noise=torch.randn(2, C, H, W))

    class BadShape(nn.Module):
        def forward(self, x, t):
            return x[:, :1]

    with pytest.raises(ValueError, match="denoise_fn must return a tensor shaped like its input"):
        make(BadShape())(videos())


def test_sampling_errors():
    d = make()
    with pytest.raises(ValueError, match=r"sampler must be one of \('ddpm', 'ddim', .*\), got 'hune'.*'heun'"):
        d.sample(batch_size=1, sampler="hune")
    with pytest.raises(ValueError, match="steps must be at most timesteps=20, got 21"):
        d.sample(batch_size=1, sampler="ddim", steps=21)
    with pytest.raises(ValueError, match="steps must be at most timesteps=20, got 50"):
        d.sample(batch_size=1, steps=50)
    with pytest.raises(ValueError, match="noise must have shape"):
        d.sample(batch_size=2, noise=torch.randn(1, C, F, H, W))
    with pytest.raises(TypeError, match="list cond must be a non-empty list of strings"):
        d.sample(cond=[])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampling_on_cuda_follows_the_module():
    d = make().cuda()
    assert d.alphas_cumprod.is_cuda and d.schedule.betas.is_cuda
    cpu = make()
    cpu.load_state_dict(d.state_dict())
    # A CPU generator reproduces the same noise on the GPU.
    gpu_out = d.sample(batch_size=2, sampler="ddim", steps=5, eta=1.0, generator=torch.Generator().manual_seed(0))
    cpu_out = cpu.sample(batch_size=2, sampler="ddim", steps=5, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert gpu_out.is_cuda
    torch.testing.assert_close(gpu_out.cpu(), cpu_out, atol=1e-4, rtol=1e-4)
    assert d(videos().cuda()).is_cuda


def test_min_snr_floor_is_refused_for_the_noise_objective():
    # floor / snr on a noise error: the last step of a 1000-step cosine schedule has snr ~2e-10.
    with pytest.raises(ValueError, match=r"min_snr_floor=1.0 with objective='noise' .* = 4\.\d+e\+09 on this cosine"):
        make(min_snr_loss_weight=True, min_snr_floor=1.0, objective="noise", timesteps=1000)
    # Without min-SNR weighting the floor is unused, and a zero floor is plain min-SNR.
    make(min_snr_loss_weight=False, min_snr_floor=1.0, objective="noise")
    make(min_snr_loss_weight=True, min_snr_floor=0.0, objective="noise")


@pytest.mark.parametrize("floor", [-0.5, 3.0])
def test_min_snr_floor_must_lie_between_zero_and_gamma(floor):
    with pytest.raises(ValueError, match="min_snr_floor must lie in"):
        make(min_snr_loss_weight=True, min_snr_gamma=2.0, min_snr_floor=floor)


# --- offset noise, zero-terminal SNR ---------------------------------------------------------


class _Zero(nn.Module):
    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.zeros_like(x)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_offset_noise_adds_a_per_channel_constant_to_the_training_noise(offset):
    # A zero prediction's l2 loss on the noise objective is E[noise^2] = 1 + offset^2.
    d = GaussianDiffusion(_Zero(), image_size=8, num_frames=4, channels=2, timesteps=10, loss_type="l2",
                          offset_noise=offset)
    torch.manual_seed(0)
    losses = [d(torch.rand(16, 2, 4, 8, 8)).item() for _ in range(20)]
    assert sum(losses) / len(losses) == pytest.approx(1.0 + offset**2, rel=0.15)


@given(timesteps=st.integers(2, 400), schedule=st.sampled_from(["cosine", "linear", "sigmoid"]))
@settings(max_examples=20, deadline=None)
def test_zero_terminal_snr_rescaling(timesteps, schedule):
    from diffusion.schedules import rescale_zero_terminal_snr

    betas = beta_schedule(schedule, timesteps)
    rescaled = rescale_zero_terminal_snr(betas)
    abar, new = torch.cumprod(1 - betas, 0), torch.cumprod(1 - rescaled, 0)
    assert new[-1].item() == 0.0 and rescaled[-1].item() == pytest.approx(1.0)
    assert new[0].item() == pytest.approx(abar[0].item(), rel=1e-9)
    assert bool((new[1:] <= new[:-1]).all())
    NoiseSchedule.from_betas(rescaled)  # a last beta of 1 is accepted
