"""The sampling half of `GaussianDiffusion`: the guided prediction as `(x0, eps)`, the sampler
loop, decoding latents, `sample`, `sample_images` and `interpolate`.

`SamplingMixin` holds no state of its own: it reads the process's schedule buffers,
`objective`, thresholding options, `prepare_cond`, `_start` / `unnormalize` and the VAE, so
`GaussianDiffusion` (and `FlowMatching`, which overrides `_run_sampler`) stay one object.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

from diffusion.frame_masks import denoiser_extra, known_frames, paste_known
from diffusion.guidance import guided_output
from diffusion.samplers import VPSigmas, check_sampler, ddpm_sample, progress_bar, sample_loop
from diffusion.samplers.scheduler import scheduler_sample
from diffusion.self_cond import SelfCondEstimate
from diffusion.schedules import eps_from_x0, extract, prediction_to_x0_eps
from spacetime.checks import check_number, is_int


class NonFiniteSampleError(ValueError):
    """Sampling produced NaN or infinite values (damaged weights, or a guidance scale far
    outside what the model was trained for); nothing is returned or written."""



Cond = Float[Tensor, "b d"] | Float[Tensor, "b l d"] | list[str] | tuple[str, ...] | None
Number = float | int


def _quantile_rows(values: Tensor, q: float) -> Tensor:
    """`torch.quantile(values, q, dim=-1)` (linear interpolation) for `(B, N)` values.

    `torch.quantile` refuses inputs above 2**24 elements, which a batch of videos passes
    easily; two `kthvalue` calls have no such limit."""
    n = values.shape[-1]
    position = q * (n - 1)
    lower = math.floor(position)
    upper = min(lower + 1, n - 1)
    low = values.kthvalue(lower + 1, dim=-1).values
    high = values.kthvalue(upper + 1, dim=-1).values
    return low + (position - lower) * (high - low)


def threshold_x0(
    x0: Float[Tensor, "b *dims"], dynamic_percentile: float | int | None = None
) -> Float[Tensor, "b *dims"]:
    """Keep predicted clean samples in [-1, 1].

    Static: clamp. Dynamic (Saharia et al. 2022, "Imagen", sec. 2.3): per sample, `s` is the
    `dynamic_percentile` quantile of `|x0|` (at least 1); clamp to `[-s, s]` and divide by `s`,
    which pulls saturated pixels inwards instead of flattening them at large guidance."""
    if dynamic_percentile is None:
        return x0.clamp(-1.0, 1.0)
    s = _quantile_rows(rearrange(x0, "b ... -> b (...)").abs().float(), dynamic_percentile)
    s = s.clamp(min=1.0).to(x0.dtype).view((-1,) + (1,) * (x0.ndim - 1))
    return x0.clamp(-s, s) / s



class SamplingMixin:
    """Sampling methods of `GaussianDiffusion` (see the module docstring)."""


    def model_predictions(
        self,
        x: Float[Tensor, "b *dims"],
        t: Int[Tensor, " b"] | Float[Tensor, " b"],
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
    ) -> tuple[Float[Tensor, "b *dims"], Float[Tensor, "b *dims"]]:
        """The guided prediction at `(x, t)` as `(x0, eps)`, the one place where the
        objective is undone. With `clip_denoised`, `x0` is thresholded and `eps` re-derived
        from it so that every sampler sees a consistent pair. `t` may be fractional (a float
        tensor): the noise level is then interpolated (`VPSigmas`). `frames` = (known x0,
        mask, replace): known frames for a frame-conditioned U-Net, pasted into `x0` when
        `replace` (`diffusion.frame_masks`); `fps` for a `frame_rate_cond` U-Net."""
        prediction = guided_output(
            self.denoise_fn, x, t, cond=cond, cond_mask=cond_mask, cond_scale=cond_scale,
            guidance_rescale=guidance_rescale, batched=batched_guidance, extra=denoiser_extra(frames, fps, self_cond),
        )
        self._check_prediction(prediction, x)
        alpha, sigma = self._alpha_sigma(t, x)
        x0, eps = prediction_to_x0_eps(self.objective, prediction, x, alpha, sigma)
        if clip_denoised:
            x0 = threshold_x0(x0, self.dynamic_thres_percentile if self.use_dynamic_thres else None)
            eps = eps_from_x0(x, x0, alpha, sigma)
        if frames is not None and frames[2]:
            x0 = paste_known(x0, frames[0], frames[1])
            eps = eps_from_x0(x, x0, alpha, sigma)
        return x0, eps

    def _alpha_sigma(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        if not t.is_floating_point():
            return extract(self.sqrt_alphas_cumprod, t, x.ndim), extract(self.sqrt_one_minus_alphas_cumprod, t, x.ndim)
        shape = (-1,) + (1,) * (x.ndim - 1)
        return tuple(v.to(x.device, x.dtype).view(shape) for v in VPSigmas(self.alphas_cumprod).alpha_sigma(t.cpu()))

    def _model_fn(
        self, cond: Tensor | None, cond_mask: Tensor | None, cond_scale: float | int, clip_denoised: bool,
        guidance_rescale: float | int = 0.0, batched_guidance: bool | None = None,
        frames: tuple[Tensor, Tensor, bool] | None = None,
        fps: Any = None,
    ) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        # Self-conditioning: each call sees the x0 of the one before (zeros at the first).
        estimate = SelfCondEstimate() if getattr(self, "self_cond", False) else None

        def model_fn(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            x0, eps = self.model_predictions(
                x, t, cond=cond, cond_mask=cond_mask, cond_scale=cond_scale, clip_denoised=clip_denoised,
                guidance_rescale=guidance_rescale, batched_guidance=batched_guidance, frames=frames, fps=fps,
                **({} if estimate is None else {"self_cond": estimate.current(x)}),
            )
            if estimate is not None:
                estimate.update(x0)
            return x0, eps

        return model_fn

    def _initial_noise(
        self, shape: tuple[int, ...], noise: Tensor | None, generator: torch.Generator | None
    ) -> Tensor:
        device, dtype = self.betas.device, self.betas.dtype
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
            return noise.to(device=device, dtype=dtype)
        # Drawn on the generator's device, so a CPU-seeded generator reproduces on any device.
        source = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=source, dtype=dtype).to(device)

    @torch.no_grad()
    def _sample(
        self,
        frames: tuple[int, ...],
        cond: Any,
        cond_scale: float | int,
        batch_size: int,
        *,
        cond_mask: Tensor | None,
        sampler: str | None,
        steps: int | None,
        eta: float | int | None,
        generator: torch.Generator | None,
        clip_denoised: bool | None,
        noise: Tensor | None,
        progress: bool,
        options: dict[str, Any],
    ) -> Tensor:
        scheduler = options.get("scheduler")
        if scheduler is not None:
            given = [name for name, value in (("sampler", sampler), ("eta", eta), ("karras", options.get("karras")))
                     if value not in (None, False)]
            if given or options.get("spacing", "linspace") != "linspace":
                raise ValueError(f"scheduler= drives sampling by itself; leave out {given or ['spacing']}")
        sampler = self.default_sampler if sampler is None else sampler
        if scheduler is None:
            check_sampler(sampler, self.samplers)
        check_number("cond_scale", float(cond_scale) if is_int(cond_scale) else cond_scale)
        rescale = options.get("guidance_rescale", 0.0)
        check_number("guidance_rescale", float(rescale) if is_int(rescale) else rescale, low=0.0, high=1.0)
        cond, cond_mask = self.prepare_cond(cond, cond_mask, None)
        if cond is not None:
            # As in video-diffusion-pytorch: one sample per condition.
            batch_size = cond.shape[0]
        known = None
        if options.get("cond_frames") is not None or options.get("cond_frame_mask") is not None:
            known = known_frames(self, options.get("cond_frames"), options.get("cond_frame_mask"),
                                 None if cond is None else batch_size)
            batch_size = known[0].shape[0]
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        shape = (batch_size, self.latent_channels, *frames, *self.latent_hw)
        if known is not None and tuple(known[0].shape) != shape:
            raise ValueError(f"cond_frames must give the sampled video's shape {shape}, got {tuple(known[0].shape)}")
        if clip_denoised is None:  # x0 thresholds are for pixels, not latents
            clip_denoised = self.vae is None
        x = self._initial_noise(shape, noise, generator)
        replace = bool(options.get("replace_known", False))
        model_fn = self._model_fn(
            cond, cond_mask, float(cond_scale), clip_denoised, float(rescale), options.get("batched_guidance"),
            frames=None if known is None else (*known, replace), fps=options.get("fps"),
        )
        name = "scheduler" if scheduler is not None else sampler
        bar, callback = progress_bar(name, self.num_timesteps, steps) if progress else (None, None)
        try:
            x = self._run_sampler(sampler, model_fn, x, steps=steps, eta=eta, generator=generator,
                                  callback=callback, options=options)
        finally:
            if bar is not None:
                bar.close()
        self._check_finite(x)
        if known is not None and replace:
            x = paste_known(x, *known)
        if self.vae is not None:
            x = self.vae.decode(x).clamp(-1.0, 1.0)
        return self.unnormalize(x)

    def _run_sampler(
        self, sampler: str, model_fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], x: Tensor, *,
        steps: int | None, eta: float | int | None, generator: torch.Generator | None, callback: Any,
        options: dict[str, Any],
    ) -> Tensor:
        if options.get("scheduler") is not None:
            return scheduler_sample(
                options["scheduler"], model_fn, x, self.schedule, self.objective, steps=steps, generator=generator,
                callback=callback,
            )
        return sample_loop(
            sampler, model_fn, x, self.schedule, steps=steps, eta=eta, generator=generator, callback=callback,
            spacing=options.get("spacing", "linspace"), karras=options.get("karras"),
        )

    @staticmethod
    def _check_finite(x: Tensor) -> None:
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise NonFiniteSampleError(
                f"sampling produced {bad:,} NaN or infinite values out of {x.numel():,}: the weights may be "
                "damaged (non-finite parameters) or the guidance scale far too large; no sample is returned"
            )

    def sample(
        self,
        cond: Cond = None,
        cond_scale: Number = 1.0,
        batch_size: int = 16,
        *,
        cond_mask: Bool[Tensor, "b l"] | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        eta: Number | None = None,
        generator: torch.Generator | None = None,
        num_frames: int | None = None,
        clip_denoised: bool | None = None,
        noise: Float[Tensor, "b c f h w"] | None = None,
        progress: bool = False,
        spacing: str = "linspace",
        karras: bool | None = None,
        scheduler: Any = None,
        guidance_rescale: Number = 0.0,
        batched_guidance: bool | None = None,
        cond_frames: Tensor | None = None,
        cond_frame_mask: Tensor | None = None,
        replace_known: bool = False,
        fps: Any = None,
    ) -> Float[Tensor, "b c f h w"]:
        """Sample videos `(B, C, F, H, W)` in [0, 1] ([-1, 1] with `auto_normalize=False`).

        `sampler` is any of `diffusion.samplers.available()` (default `'ddpm'`): `'ddpm'` runs
        all timesteps; the others run `steps` (default: `ddim` all, the rest 50) on the
        timesteps chosen by `spacing` ('linspace', 'leading', 'trailing'), or on Karras sigmas
        with `karras=True` (not `ddim`; `karras=None`, the default, uses them for `heun` only).
        `eta` scales the fresh noise of `ddim`, `euler_ancestral` and `dpmpp_2m_sde` (defaults
        0, 1, 1). `scheduler`: a diffusers scheduler instance drives
        sampling instead (its prediction type must match the objective).

        With a `cond`, the batch size is the condition's; `guidance_rescale` in [0, 1]
        (Lin et al. 2023) tempers large `cond_scale`; `batched_guidance` False makes two
        U-Net calls per step instead of one batched call (None: batched, two calls if out of
        memory). `num_frames` overrides the training length; `noise` fixes the starting noise
        and `generator` every random draw. `clip_denoised` keeps each predicted clean sample in
        [-1, 1] (dynamically when `use_dynamic_thres`); by default on in pixel space, off in a
        VAE's latent space.

        `cond_frames` (B, C, F, H, W) in [0, 1] with `cond_frame_mask` (B, F) bool: frames
        given to a `frame_cond` U-Net (the batch size is theirs); `replace_known` also puts
        them back into every predicted clean video, so that they come back exactly
        (`diffusion.frame_masks`). `fps`: the frame rate (a positive number or (B,) values)
        for a U-Net with `frame_rate_cond=True`."""
        frames = self.num_frames if num_frames is None else num_frames
        if frames < 1:
            raise ValueError(f"num_frames must be positive, got {frames}")
        options = {"spacing": spacing, "karras": karras, "scheduler": scheduler,
                   "guidance_rescale": guidance_rescale, "batched_guidance": batched_guidance,
                   "cond_frames": cond_frames, "cond_frame_mask": cond_frame_mask, "replace_known": replace_known,
                   "fps": fps}
        return self._sample(
            (frames,), cond, cond_scale, batch_size, cond_mask=cond_mask, sampler=sampler, steps=steps, eta=eta,
            generator=generator, clip_denoised=clip_denoised, noise=noise, progress=progress, options=options,
        )

    def sample_images(
        self,
        cond: Cond = None,
        cond_scale: Number = 1.0,
        batch_size: int = 16,
        *,
        cond_mask: Bool[Tensor, "b l"] | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        eta: Number | None = None,
        generator: torch.Generator | None = None,
        clip_denoised: bool | None = None,
        noise: Float[Tensor, "b c h w"] | None = None,
        progress: bool = False,
        **options: Any,
    ) -> Float[Tensor, "b c h w"]:
        """Sample images `(B, C, H, W)` from the same network with time disabled; the
        arguments are those of `sample` (`spacing`, `karras`, `scheduler`, `guidance_rescale`,
        `batched_guidance` as keywords)."""
        allowed = ("spacing", "karras", "scheduler", "guidance_rescale", "batched_guidance")
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise TypeError(f"sample_images() got unexpected keyword arguments {unknown}; allowed: {allowed}")
        return self._sample(
            (), cond, cond_scale, batch_size, cond_mask=cond_mask, sampler=sampler, steps=steps, eta=eta,
            generator=generator, clip_denoised=clip_denoised, noise=noise, progress=progress, options=options,
        )

    @torch.no_grad()
    def interpolate(
        self,
        x1: Float[Tensor, "b c f h w"] | Float[Tensor, "b c h w"],
        x2: Float[Tensor, "b c f h w"] | Float[Tensor, "b c h w"],
        t: int | None = None,
        lam: Number = 0.5,
        *,
        cond: Cond = None,
        cond_mask: Bool[Tensor, "b l"] | None = None,
        cond_scale: Number = 1.0,
        generator: torch.Generator | None = None,
        clip_denoised: bool | None = None,
    ) -> Tensor:
        """Noise `x1` and `x2` to timestep `t` (default: the last), mix them `(1 - lam, lam)`
        and denoise the mix with the ancestral sampler (as video-diffusion-pytorch's
        `interpolate`, but in data space at both ends)."""
        if x1.shape != x2.shape:
            raise ValueError(
                f"x1 and x2 must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}"
            )
        self._check_data(x1, "x1")
        start = self.num_timesteps - 1 if t is None else t
        if not 0 <= start < self.num_timesteps:
            raise ValueError(f"t must lie in [0, {self.num_timesteps}), got {t}")
        cond, cond_mask = self.prepare_cond(cond, cond_mask, x1.shape[0])
        device = self.betas.device
        times = torch.full((x1.shape[0],), start, device=device, dtype=torch.long)
        noised = []
        for x in (x1, x2):
            start_x = self._start(x.to(device), False)
            noised.append(self.q_sample(start_x, times, self._initial_noise(tuple(start_x.shape), None, generator)))
        mix = (1.0 - lam) * noised[0] + lam * noised[1]
        check_number("cond_scale", float(cond_scale) if is_int(cond_scale) else cond_scale)
        clip = self.vae is None if clip_denoised is None else clip_denoised
        model_fn = self._model_fn(cond, cond_mask, float(cond_scale), clip)
        x = ddpm_sample(model_fn, mix, self.schedule, t_start=start, generator=generator)
        self._check_finite(x)
        if self.vae is not None:
            x = self.vae.decode(x).clamp(-1.0, 1.0)
        return self.unnormalize(x)
