"""Spatial super-resolution: a diffusion stage conditioned on a low-resolution video.

The Imagen recipe (Saharia et al. 2022, Sec. 2.5 "noise conditioning augmentation"), as the
spatial SR stages of Make-A-Video use it (Singer et al. 2022, Sec. 3.5): the stage denoises the
high-resolution video while it sees the low-resolution one, upsampled to the output size and
corrupted by the diffusion process's own forward noise at an augmentation level `s` in
[0, 1]; the U-Net is told `s` as well (`unets.lowres_cond`).

- Training (`SuperResolution.forward`): the high-resolution videos are the target; the
  condition is made from them: downsampled (bicubic with antialiasing), upsampled again
  (bicubic or bilinear), and noise-augmented at `s` drawn uniformly in [0, noise_aug] per
  sample. Learning to undo several levels of corruption makes the stage robust to the
  artefacts of a base model's samples, which are not clean downsampled videos.
- Sampling (`SuperResolution.sample`): the given low-resolution video is upsampled and
  augmented at one fixed level (`sample_noise_level`, Imagen's choice at inference), and
  the process samples the high-resolution video with that condition.

The augmentation is the process's `q_sample`: at timestep `round(s * (T - 1))` for a
`GaussianDiffusion`, at time `s` for a `FlowMatching`; level 0 is no noise at all.

The condition reaches the U-Net as two keyword arguments of each of its calls
(`lowres_cond`, `lowres_noise_level`), bound for the duration of one `forward` or `sample`
call by a forward pre-hook on the U-Net. That leaves the process, its samplers and
classifier-free guidance untouched (a guided call on a doubled batch gets the condition
doubled too) and works alike for both processes.

Frame counts: a U-Net without temporal down-sampling (`frame_multiple` 1, as in the preset)
takes any number of frames, so a stage trained on 8-frame clips runs on the 29 frames of an
interpolated video in one pass; its temporal attention then sees distances it never saw in
training, which the relative position bias shares between buckets.

Latent processes (with a VAE) are refused: the condition would have to live in latent space.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from spacetime.checks import check_choice, check_int, check_number, is_int

logger = logging.getLogger(__name__)

__all__ = ["DOWNSAMPLE_MODES", "UPSAMPLE_MODES", "SuperResolution", "back_project", "resize_video"]

DOWNSAMPLE_MODES = ("bicubic", "bilinear", "area")
UPSAMPLE_MODES = ("bicubic", "bilinear", "nearest")

# What the Trainer and callers read through the stage from its process (`__getattr__`).
_FROM_PROCESS = (
    "denoise_fn", "is_conditional", "cond_format", "num_timesteps", "vae", "normalize", "unnormalize",
    "text_cache", "text_encoder", "use_text_cache", "encode_text", "prepare_cond", "num_frames", "channels",
    "image_size", "image_hw", "latent_channels", "latent_hw", "objective", "samplers", "default_sampler",
    "null_cond_prob", "auto_normalize",
)


def resize_video(video: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """Resize every frame of `video` (B, C, F, H, W) or an image batch (B, C, H, W) to `size`
    (h, w). Downsizing by "bicubic" / "bilinear" uses antialiasing (a low-pass before
    sampling, like PIL's resize), without which small digits alias into broken strokes."""
    check_choice("mode", mode, DOWNSAMPLE_MODES + UPSAMPLE_MODES)
    if video.ndim not in (4, 5):
        raise ValueError(f"expected videos (B, C, F, H, W) or images (B, C, H, W), got shape {tuple(video.shape)}")
    frames = video.shape[2] if video.ndim == 5 else None
    flat = rearrange(video, "b c f h w -> (b f) c h w") if frames is not None else video
    if tuple(flat.shape[-2:]) == tuple(size):
        out = flat
    elif mode in ("bicubic", "bilinear"):
        down = size[0] < flat.shape[-2] or size[1] < flat.shape[-1]
        out = F.interpolate(flat.float(), size=size, mode=mode, align_corners=False, antialias=down).to(flat.dtype)
    else:
        out = F.interpolate(flat.float(), size=size, mode=mode).to(flat.dtype)
    return rearrange(out, "(b f) c h w -> b c f h w", f=frames) if frames is not None else out


def back_project(
    video: Tensor, lowres: Tensor, *, steps: int, downsample: str = "bicubic", upsample: str = "bicubic"
) -> Tensor:
    """Iterative back-projection (Irani & Peleg 1991): `steps` times, add the upsampled
    residual `up(lowres - down(video))`, so that the result downsampled matches `lowres`
    while the detail the model added (what downsampling removes) is kept. Values in [0, 1].
    The residual shrinks geometrically because down(up(.)) is close to the identity on the
    low-resolution grid (tests/test_super_resolution.py states the tolerance reached)."""
    check_int("steps", steps, low=0)
    size = tuple(lowres.shape[-2:])
    out = video
    for _ in range(steps):
        residual = lowres - resize_video(out, size, downsample)
        out = (out + resize_video(residual, tuple(video.shape[-2:]), upsample)).clamp(0.0, 1.0)
    return out


@contextlib.contextmanager
def _bound_inputs(module: nn.Module, inputs: dict[str, Tensor]) -> Iterator[None]:
    """Give every call of `module` in this block the per-sample `inputs` as keywords. A call
    on a batch k times as large (guidance on `[x; x]`) gets them repeated k times."""
    batch = next(iter(inputs.values())).shape[0]

    def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        x = args[0] if args else kwargs["x"]
        repeats, rest = divmod(x.shape[0], batch)
        if rest or repeats < 1:
            raise ValueError(f"a U-Net call on a batch of {x.shape[0]} does not fit the {batch} low-res videos given")
        extra = {key: value if repeats == 1 else torch.cat([value] * repeats) for key, value in inputs.items()}
        return args, {**kwargs, **extra}

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class SuperResolution(nn.Module):
    """A spatial super-resolution stage around `process` (a `GaussianDiffusion` or
    `FlowMatching` at the high resolution) whose U-Net was built with `lowres_cond=True`.

    - `lowres_size`: the low resolution, an int or (h, w), below the process's `image_size`;
    - `downsample` ("bicubic", "bilinear" with antialiasing, or "area"): how training makes
      the low-res video; `upsample` ("bicubic", "bilinear", "nearest"): how the condition is
      brought to the output size;
    - `noise_aug`: training augmentation levels are drawn uniformly in [0, noise_aug];
    - `sample_noise_level`: the level used when sampling (`sample(noise_level=...)` overrides).

    `forward(videos, ...)` is the training loss (the process's, with the condition made from
    the videos); `sample(lowres, ...)` the high-resolution videos in [0, 1]; see the module
    docstring. Other attributes (`denoise_fn`, `num_timesteps`, text options ...) are the
    process's."""

    def __init__(
        self,
        process: nn.Module,
        *,
        lowres_size: int | tuple[int, int],
        downsample: str = "bicubic",
        upsample: str = "bicubic",
        noise_aug: float | int = 0.3,
        sample_noise_level: float | int = 0.1,
    ) -> None:
        super().__init__()
        from diffusion.gaussian import GaussianDiffusion

        if not isinstance(process, GaussianDiffusion):
            raise TypeError(f"process must be a GaussianDiffusion or FlowMatching, got {type(process).__name__}")
        if getattr(process, "vae", None) is not None:
            raise ValueError("SuperResolution works in pixel space; got a process with a VAE (latent diffusion)")
        if not getattr(getattr(process.denoise_fn, "config", None), "lowres_cond", False):
            raise ValueError(
                f"the process's U-Net ({type(process.denoise_fn).__name__}) was built without lowres_cond; "
                "build it with lowres_cond=True to use it in a super-resolution stage"
            )
        if is_int(lowres_size):
            lowres_hw = (lowres_size, lowres_size)
        elif isinstance(lowres_size, (tuple, list)) and len(lowres_size) == 2 and all(is_int(v) for v in lowres_size):
            lowres_hw = (int(lowres_size[0]), int(lowres_size[1]))
        else:
            raise TypeError(f"lowres_size must be an int or (height, width), got {lowres_size!r}")
        high = process.image_hw
        if not all(1 <= low < h for low, h in zip(lowres_hw, high)):
            raise ValueError(
                f"lowres_size must be positive and below the process's image size {high}, got {lowres_hw}"
            )
        check_choice("downsample", downsample, DOWNSAMPLE_MODES)
        check_choice("upsample", upsample, UPSAMPLE_MODES)
        for name, value in (("noise_aug", noise_aug), ("sample_noise_level", sample_noise_level)):
            check_number(name, float(value) if is_int(value) else value, low=0.0, high=1.0)
        self.process = process
        self.lowres_hw = lowres_hw
        self.downsample_mode = downsample
        self.upsample_mode = upsample
        self.noise_aug = float(noise_aug)
        self.sample_noise_level = float(sample_noise_level)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _FROM_PROCESS:
                return getattr(self._modules["process"], name)
            raise

    # --- the condition ---------------------------------------------------------------------

    def downsample(self, videos: Tensor) -> Tensor:
        """High-resolution videos in [0, 1] -> the low-resolution videos training shows."""
        return resize_video(videos, self.lowres_hw, self.downsample_mode).clamp(0.0, 1.0)

    def upsample_baseline(self, lowres: Tensor) -> Tensor:
        """The low-resolution videos upsampled to the output size (bicubic by default), in
        [0, 1]: the condition before augmentation, and the baseline of `spacetime eval --sr`."""
        return resize_video(lowres, self.process.image_hw, self.upsample_mode).clamp(0.0, 1.0)

    def augment(self, upsampled: Tensor, level: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The upsampled videos (in [0, 1]) in the model's space, noised by the process's
        forward process at `level` (B,) in [0, 1]; exactly clean where the level is 0."""
        x = self.process.normalize(upsampled)
        source = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=source, dtype=x.dtype).to(x.device)
        if self.process.objective == "flow":
            noised = self.process.q_sample(x, level.to(x.device), noise)
        else:
            steps = (level * (self.process.num_timesteps - 1)).round().long().to(x.device)
            noised = self.process.q_sample(x, steps, noise)
        clean = (level == 0).to(x.device).view((-1,) + (1,) * (x.ndim - 1))
        return torch.where(clean, x, noised)

    def _check_lowres(self, lowres: Any) -> None:
        c, (h, w) = self.process.channels, self.lowres_hw
        if not isinstance(lowres, Tensor) or lowres.ndim not in (4, 5) or lowres.shape[1] != c \
                or tuple(lowres.shape[-2:]) != (h, w):
            got = tuple(lowres.shape) if isinstance(lowres, Tensor) else type(lowres).__name__
            raise ValueError(f"lowres must be videos (B, {c}, F, {h}, {w}) or images (B, {c}, {h}, {w}) in [0, 1] "
                             f"(channels and lowres_size of this stage), got {got}")

    # --- training ----------------------------------------------------------------------------

    def forward(
        self,
        videos: Tensor,
        cond: Any = None,
        *args: Any,
        times: Tensor | None = None,
        noise: Tensor | None = None,
        lowres: Tensor | None = None,
        noise_level: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """The process's training loss on the high-resolution `videos` (B, C, F, H, W) in
        [0, 1], with the U-Net conditioned on their low-resolution version (`lowres`: given,
        or made by `downsample`) upsampled and augmented at `noise_level` (B,) (default: drawn
        uniformly in [0, noise_aug]). Other arguments are the process's `forward`'s."""
        if lowres is None:
            lowres = self.downsample(videos)
        self._check_lowres(lowres)
        if lowres.shape[:-2] != videos.shape[:-2]:
            raise ValueError(f"lowres {tuple(lowres.shape)} must match the videos {tuple(videos.shape)} but in size")
        batch = videos.shape[0]
        if noise_level is None:
            noise_level = torch.rand(batch, device=videos.device) * self.noise_aug
        elif tuple(noise_level.shape) != (batch,) or bool(((noise_level < 0) | (noise_level > 1)).any()):
            raise ValueError(f"noise_level must be ({batch},) values in [0, 1], got {noise_level!r}")
        condition = self.augment(self.upsample_baseline(lowres), noise_level)
        inputs = {"lowres_cond": condition, "lowres_noise_level": noise_level.float()}
        with _bound_inputs(self.process.denoise_fn, inputs):
            return self.process(videos, cond, *args, times=times, noise=noise, **kwargs)

    # --- sampling ------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        lowres: Tensor | None = None,
        *,
        cond: Any = None,
        cond_scale: float | int = 1.0,
        cond_mask: Tensor | None = None,
        batch_size: int | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | int | None = None,
        noise_level: float | int | None = None,
        back_projection: int = 0,
        generator: torch.Generator | None = None,
        clip_denoised: bool | None = None,
        progress: bool = False,
        **options: Any,
    ) -> Tensor:
        """High-resolution videos (B, C, F, H, W) in [0, 1] for `lowres` (B, C, F, h, w) in
        [0, 1] (images (B, C, h, w) give images), any frame count the U-Net takes
        (`frame_multiple`). `noise_level` (default `sample_noise_level`): the augmentation of
        the condition. `back_projection` > 0 runs that many steps of `back_project`, so that
        the output downsampled matches `lowres`. `cond`, `cond_scale`, `sampler`, `steps`,
        `eta`, `generator` and the other keywords are the process's `sample` arguments
        (`batch_size`, if given, must be the number of low-res videos)."""
        if lowres is None:
            raise ValueError("a super-resolution stage samples from low-resolution videos: pass lowres (B, C, F, h, w) "
                             "to SuperResolution.sample (load_run(RUN).sample(lowres), or a cascade)")
        self._check_lowres(lowres)
        batch = lowres.shape[0]
        if batch_size is not None and batch_size != batch:
            raise ValueError(f"batch_size={batch_size} differs from the {batch} low-res videos given")
        if cond is not None and not self.process.is_conditional:
            raise ValueError("this super-resolution stage is unconditional (its U-Net takes no condition); "
                             "pass cond=None (a cascade gives captions only to stages with is_conditional)")
        if isinstance(cond, (Tensor, list, tuple)) and len(cond) != batch:
            raise ValueError(f"cond has {len(cond)} entries for {batch} low-res videos; give one condition each")
        level = self.sample_noise_level if noise_level is None else noise_level
        check_number("noise_level", float(level) if is_int(level) else level, low=0.0, high=1.0)
        check_int("back_projection", back_projection, low=0)
        device = self.process.betas.device
        lowres = lowres.to(device=device, dtype=self.process.betas.dtype)
        video = lowres.ndim == 5
        if video:
            frames = lowres.shape[2]
            multiple = getattr(self.process.denoise_fn, "frame_multiple", 1)
            if frames % multiple:
                raise ValueError(f"this stage's U-Net takes a multiple of {multiple} frames, got {frames}")
        levels = torch.full((batch,), float(level), device=device)
        condition = self.augment(self.upsample_baseline(lowres), levels, generator)
        kwargs: dict[str, Any] = dict(cond=cond, cond_scale=cond_scale, cond_mask=cond_mask, batch_size=batch,
                                      sampler=sampler, steps=steps, eta=eta, generator=generator,
                                      clip_denoised=clip_denoised, progress=progress, **options)
        with _bound_inputs(self.process.denoise_fn, {"lowres_cond": condition, "lowres_noise_level": levels}):
            if video:
                out = self.process.sample(num_frames=frames, **kwargs)
            else:
                out = self.process.sample_images(**kwargs)
        out = out.clamp(0.0, 1.0)
        if back_projection:
            out = back_project(out, lowres, steps=back_projection, downsample=self.downsample_mode,
                               upsample=self.upsample_mode)
        return out

    def grid_inputs(self, dataset: Any, count: int) -> dict[str, Tensor]:
        """`sample()` inputs for a trainer's sample grid: the first `count` videos of
        `dataset` downsampled (`diffusion.samples.SampleGrid`)."""
        from diffusion.batches import collate

        videos = collate([dataset[i % len(dataset)] for i in range(count)])["video"]
        return {"lowres": self.downsample(videos.to(self.process.betas.device))}
