"""FlowMatching: rectified flow (Liu et al. 2022; Lipman et al. 2022) with GaussianDiffusion's
interface, as used by current video models (Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis", SD3).

Convention (docs/api.md): data `x0` in [-1, 1], `x_t = (1 - t) x0 + t noise` for `t` in
[0, 1]; the network is called as `denoise_fn(x_t, 1000 * t, ...)` and predicts the velocity
`v = noise - x0`, so the sample is the solution of `dx/dt = v` from `t = 1` (pure noise) to
`t = 0`. Training draws `t` from a logit-normal distribution (Esser et al. sec. 3.1, eq. 19),
which puts the training signal in the middle of the path, and optionally shifts it towards
the noisy end (`shift`, their eq. 23), the same shift being applied to the sampling grid.

Everything that is not the process itself (conditions, text, guidance, thresholding, the
input checks) is GaussianDiffusion's; the DDPM tables it holds are unused here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor

from diffusion.gaussian import Cond, GaussianDiffusion, Number, threshold_x0
from diffusion.frame_masks import denoiser_extra, paste_known, training_frames
from diffusion.guidance import denoiser_kwargs, guided_output
from diffusion.self_cond import training_estimate
from spacetime.checks import check_choice, check_number

ModelFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
FLOW_SAMPLERS = ("euler", "heun")
TIMESTEP_SAMPLING = ("logit_normal", "uniform")
# The network sees t in the range a DDPM U-Net's timestep embedding was built for.
TIME_SCALE = 1000.0


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Esser et al. 2024, eq. 23: `shift * t / (1 + (shift - 1) * t)`; `shift > 1` spends
    more of the path at high noise, which larger inputs need (their resolution shift)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def flow_times(steps: int, shift: float = 1.0) -> Tensor:
    """The `steps + 1` times a sampler visits, from 1 down to 0 (float64)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def _velocity(model_fn: ModelFn, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    x0, eps = model_fn(x, t.to(x.device, torch.float32).expand(x.shape[0]))
    return eps - x0, x0


def flow_euler(
    model_fn: ModelFn, x: Float[Tensor, "b *dims"], times: Tensor, *, callback: Any = None
) -> Float[Tensor, "b *dims"]:
    """Euler's method on `dx/dt = v` along `times` (descending to 0). `model_fn(x_t, t)`
    returns `(x0, noise)` predictions, whose difference is the velocity."""
    for i in range(times.numel() - 1):
        t, t_next = times[i], times[i + 1]
        v, x0 = _velocity(model_fn, x, t)
        if callback is not None:
            callback(i, round(float(t) * TIME_SCALE), x, x0)
        x = x + (t_next - t).to(x.dtype) * v
    return x


def flow_heun(
    model_fn: ModelFn, x: Float[Tensor, "b *dims"], times: Tensor, *, callback: Any = None
) -> Float[Tensor, "b *dims"]:
    """Heun's method (trapezoidal Euler correction); the last step, to t = 0, stays Euler.
    `2 * steps - 1` model calls."""
    for i in range(times.numel() - 1):
        t, t_next = times[i], times[i + 1]
        v, x0 = _velocity(model_fn, x, t)
        if callback is not None:
            callback(i, round(float(t) * TIME_SCALE), x, x0)
        dt = (t_next - t).to(x.dtype)
        x_euler = x + dt * v
        if float(t_next) == 0.0:
            x = x_euler
            continue
        v_next, _ = _velocity(model_fn, x_euler, t_next)
        x = x + dt * (v + v_next) / 2
    return x


_FLOW_SAMPLER_FNS = {"euler": flow_euler, "heun": flow_heun}


class FlowMatching(GaussianDiffusion):
    """Rectified flow around `denoise_fn`, with GaussianDiffusion's arguments (text,
    guidance, normalisation, loss type, offset noise) plus:

    - `timestep_sampling`: "logit_normal" (default; `t = sigmoid(n)`, `n ~ N(logit_mean,
      logit_std**2)`) or "uniform";
    - `shift`: the timestep shift applied to training times and the sampling grid (1 = none).

    `sample(sampler="euler" | "heun", steps=N)` (default euler, 50 steps). The schedule
    options of GaussianDiffusion (`beta_schedule`, `objective`, min-SNR, zero-terminal SNR)
    do not apply and must be left at their defaults; `timesteps` is the number of quantiles
    integer `times` index (see `times_from_index`)."""

    samplers = FLOW_SAMPLERS
    default_sampler = "euler"

    def __init__(
        self,
        denoise_fn: Any,
        *,
        image_size: int | tuple[int, int],
        num_frames: int,
        channels: int = 3,
        timestep_sampling: str = "logit_normal",
        logit_mean: Number = 0.0,
        logit_std: Number = 1.0,
        shift: Number = 1.0,
        **kwargs: Any,
    ) -> None:
        not_flow = {"objective": "noise", "min_snr_loss_weight": False, "zero_terminal_snr": False,
                    "beta_schedule": "cosine"}
        for name, default in not_flow.items():
            if name in kwargs and kwargs[name] != default:
                raise ValueError(
                    f"FlowMatching has no {name} (it predicts the velocity noise - x0 on a straight path), "
                    f"got {name}={kwargs[name]!r}"
                )
        # `timesteps` (default 1000) only sets how finely integer `times` (the trainer's
        # rank-independent draws) resolve the time distribution; the DDPM tables that
        # GaussianDiffusion builds from it are unused.
        super().__init__(denoise_fn, image_size=image_size, num_frames=num_frames, channels=channels, **kwargs)
        check_choice("timestep_sampling", timestep_sampling, TIMESTEP_SAMPLING)
        check_number("logit_std", logit_std, low=0.0)
        check_number("logit_mean", logit_mean)
        check_number("shift", shift, low=0.0, low_open=True)
        self.objective = "flow"
        self.timestep_sampling = timestep_sampling
        self.logit_mean, self.logit_std, self.shift = float(logit_mean), float(logit_std), float(shift)

    # --- training ----------------------------------------------------------------------

    def sample_times(self, batch: int, device: torch.device | str) -> Tensor:
        """Training times `t` in (0, 1) for a batch, shifted by `shift`."""
        if self.timestep_sampling == "logit_normal":
            t = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(batch, device=device))
        else:
            t = torch.rand(batch, device=device)
        return shift_time(t, self.shift)

    def times_from_index(self, index: Tensor) -> Tensor:
        """Integer `times` (what the trainer draws, in `[0, num_timesteps)`, so that each
        sample's draw is independent of the rank) as flow times: the `(i + 1/2) / N` quantile
        of the training distribution, shifted."""
        u = (index.to(torch.float64) + 0.5) / self.num_timesteps
        if self.timestep_sampling == "logit_normal":
            t = torch.sigmoid(self.logit_mean + self.logit_std * math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0))
        else:
            t = u
        return shift_time(t, self.shift).to(torch.float32)

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """`x_t = (1 - t) x0 + t noise`, `t` `(B,)` in [0, 1]."""
        if noise is None:
            noise = torch.randn_like(x_start)
        t = t.to(x_start.dtype).view((-1,) + (1,) * (x_start.ndim - 1))
        return (1.0 - t) * x_start + t * noise

    def forward(  # type: ignore[override]
        self,
        videos: Float[Tensor, "b c f h w"] | Float[Tensor, "b c h w"],
        cond: Cond = None,
        prob_focus_present: Number = 0.0,
        focus_present_mask: Bool[Tensor, " b"] | None = None,
        *,
        cond_mask: Bool[Tensor, "b l"] | None = None,
        enable_time: bool | Bool[Tensor, " b"] = True,
        null_cond_prob: Number | None = None,
        noise: Tensor | None = None,
        times: Tensor | None = None,
        encoded: bool = False,
        cond_frames: Tensor | None = None,
        cond_frame_mask: Tensor | None = None,
        frame_masks: Any = None,
        fps: Any = None,
    ) -> Float[Tensor, ""]:
        """The flow-matching loss `|v_pred - (noise - x0)|` for videos (or images) in [0, 1]
        (Lipman et al. 2022, eq. 23). `times` fixes `t`: floats in [0, 1], or integer
        quantile indices (`times_from_index`); default: drawn. With a VAE the flow runs on its
        latents (`encoded=True`: `videos` are latents already, as in GaussianDiffusion). Known
        frames (`cond_frames` / `cond_frame_mask`, or drawn `frame_masks`) and `fps` as in
        `GaussianDiffusion.forward`."""
        x_start = self._start(videos, encoded)
        batch = videos.shape[0]
        if noise is not None and noise.shape != x_start.shape:
            raise ValueError(f"noise must have the data's shape {tuple(x_start.shape)}, got {tuple(noise.shape)}")
        if times is None:
            times = self.sample_times(batch, videos.device)
        elif not times.is_floating_point():
            if bool(((times < 0) | (times >= self.num_timesteps)).any()):
                raise ValueError(
                    f"integer times must lie in [0, {self.num_timesteps}) (quantiles of the time distribution), "
                    f"got {times.tolist()}"
                )
            times = self.times_from_index(times).to(videos.device)
        elif bool(((times < 0) | (times > 1)).any()):
            raise ValueError(f"float times must lie in [0, 1] for FlowMatching, got {times.tolist()}")
        drop_prob = self.null_cond_prob if null_cond_prob is None else float(null_cond_prob)
        check_number("null_cond_prob", drop_prob, low=0.0, high=1.0)
        cond, cond_mask = self.prepare_cond(cond, cond_mask, batch)
        if noise is None:
            noise = torch.randn_like(x_start)
            if self.offset_noise > 0:
                noise = noise + self.offset_noise * torch.randn(
                    x_start.shape[:2] + (1,) * (x_start.ndim - 2), device=x_start.device, dtype=x_start.dtype
                )
        x_t = self.q_sample(x_start, times, noise)
        kwargs = denoiser_kwargs(
            cond=cond, cond_mask=cond_mask, null_cond_prob=drop_prob if cond is not None else 0.0,
            enable_time=enable_time, focus_present_mask=focus_present_mask, prob_focus_present=prob_focus_present,
        )
        if cond_frames is not None or cond_frame_mask is not None or frame_masks not in (None, False):
            kwargs.update(training_frames(self, x_start, cond_frames, cond_frame_mask, frame_masks, encoded))
        if fps is not None:
            kwargs["fps"] = fps
        if self.self_cond:
            kwargs["self_cond"] = training_estimate(self.denoise_fn, x_t, times * TIME_SCALE, kwargs,
                                                    self.self_cond_prob, self._training_x0)
        prediction = self.denoise_fn(x_t, times * TIME_SCALE, **kwargs)
        self._check_prediction(prediction, x_t)
        loss = self._elementwise_loss(prediction, noise - x_start)
        return rearrange(loss, "b ... -> b (...)").mean(dim=1).mean()

    def _training_x0(self, v: Tensor, x_t: Tensor, scaled_times: Tensor) -> Tensor:  # type: ignore[override]
        """x0 = x_t - t v at the denoiser's times (`t * TIME_SCALE`), kept in [-1, 1] in
        pixel space (self-conditioning's estimate)."""
        x0 = x_t - (scaled_times / TIME_SCALE).to(x_t.dtype).view((-1,) + (1,) * (x_t.ndim - 1)) * v
        return x0.clamp(-1.0, 1.0) if self.vae is None else x0

    # --- sampling ----------------------------------------------------------------------

    def model_predictions(  # type: ignore[override]
        self,
        x: Tensor,
        t: Tensor,
        *,
        cond: Tensor | None = None,
        cond_mask: Tensor | None = None,
        cond_scale: Number = 1.0,
        clip_denoised: bool = True,
        guidance_rescale: Number = 0.0,
        batched_guidance: bool | None = None,
        frames: tuple[Tensor, Tensor, bool] | None = None,
        fps: Any = None,
        self_cond: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The guided velocity at `(x, t)` (`t` in [0, 1], `(B,)`) as `(x0, noise)`:
        `x0 = x - t v`, `noise = x + (1 - t) v`; with `clip_denoised` (and `t > 0`) `x0` is
        thresholded and the noise re-derived from it."""
        v = guided_output(
            self.denoise_fn, x, t * TIME_SCALE, cond=cond, cond_mask=cond_mask, cond_scale=cond_scale,
            guidance_rescale=guidance_rescale, batched=batched_guidance,
            extra=denoiser_extra(frames, fps, self_cond),
        )
        self._check_prediction(v, x)
        tt = t.to(x.dtype).view((-1,) + (1,) * (x.ndim - 1))
        x0, eps = x - tt * v, x + (1.0 - tt) * v
        if clip_denoised and bool((t > 0).all()):
            x0 = threshold_x0(x0, self.dynamic_thres_percentile if self.use_dynamic_thres else None)
            eps = (x - (1.0 - tt) * x0) / tt
        if frames is not None and frames[2]:
            # Known frames put back into x0 (diffusion.frame_masks); the noise follows from x.
            x0 = paste_known(x0, frames[0], frames[1])
            eps = x + (1.0 - tt) * (x - x0) / tt.clamp(min=1e-12)
        return x0, eps

    def _run_sampler(
        self, sampler: str, model_fn: ModelFn, x: Tensor, *, steps: int | None, eta: float | int | None,
        generator: torch.Generator | None, callback: Any, options: dict[str, Any],
    ) -> Tensor:
        shared = ("guidance_rescale", "batched_guidance", "cond_frames", "cond_frame_mask", "replace_known", "fps")
        given = {key: value for key, value in options.items()
                 if key not in shared and value not in (None, False, 0, 0.0, "linspace")}
        if given or eta not in (None, 0, 0.0):
            raise ValueError(
                f"FlowMatching samples with sampler and steps only; got {sorted(given) + (['eta'] if eta else [])}"
            )
        times = flow_times(50 if steps is None else steps, self.shift)
        return _FLOW_SAMPLER_FNS[sampler](model_fn, x, times, callback=callback)

    @torch.no_grad()
    def interpolate(  # type: ignore[override]
        self,
        x1: Tensor,
        x2: Tensor,
        t: float | int | None = None,
        lam: Number = 0.5,
        *,
        cond: Cond = None,
        cond_mask: Tensor | None = None,
        cond_scale: Number = 1.0,
        generator: torch.Generator | None = None,
        clip_denoised: bool | None = None,
        steps: int = 50,
    ) -> Tensor:
        """Noise `x1` and `x2` to time `t` in (0, 1] (default 1), mix them `(1 - lam, lam)` and
        run Euler from `t` to 0 over `steps` steps."""
        if x1.shape != x2.shape:
            raise ValueError(f"x1 and x2 must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")
        self._check_data(x1, "x1")
        start = 1.0 if t is None else float(t)
        if not 0.0 < start <= 1.0:
            raise ValueError(f"t must lie in (0, 1] for FlowMatching, got {t}")
        cond, cond_mask = self.prepare_cond(cond, cond_mask, x1.shape[0])
        device = self.betas.device
        times = torch.full((x1.shape[0],), start, device=device)
        noised = []
        for x in (x1, x2):
            start_x = self._start(x.to(device), False)
            noised.append(self.q_sample(start_x, times, self._initial_noise(tuple(start_x.shape), None, generator)))
        mix = (1.0 - lam) * noised[0] + lam * noised[1]
        clip = self.vae is None if clip_denoised is None else clip_denoised
        model_fn = self._model_fn(cond, cond_mask, float(cond_scale), clip)
        x = flow_euler(model_fn, mix, flow_times(steps) * start)
        self._check_finite(x)
        if self.vae is not None:
            x = self.vae.decode(x).clamp(-1.0, 1.0)
        return self.unnormalize(x)
