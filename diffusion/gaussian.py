"""GaussianDiffusion: the DDPM process around any denoiser that follows the U-Net call
convention (docs/design.md), with video-diffusion-pytorch's arguments.

Training (Ho et al. 2020, Algorithm 1): draw `t`, noise the data to
`x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps` and regress the network output on the
objective's target (eps, x0 or v), optionally weighted by min-SNR (Hang et al. 2023).
Videos `(B, C, F, H, W)` and images `(B, C, H, W)` train the same network; an image is the
network's single-frame case with time disabled (image-then-video pretraining, Ho et al. 2022
"Video Diffusion Models", sec. 3.2; Make-A-Video).

Sampling converts the (guided) network output to `(x0, eps)` once, thresholds `x0`, and
hands that to a plain sampler function from `diffusion.samplers`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from diffusion.frame_masks import training_frames
from diffusion.guidance import denoiser_kwargs
from diffusion.samplers import SAMPLERS
from diffusion.self_cond import training_estimate, uses_self_cond
# NonFiniteSampleError, threshold_x0 and _quantile_rows moved to diffusion.sampling; still importable here.
from diffusion.sampling import (  # noqa: F401
    Cond,
    NonFiniteSampleError,
    Number,
    SamplingMixin,
    _quantile_rows,
    threshold_x0,
)
from diffusion.schedules import (
    LOSS_TYPES,
    NoiseSchedule,
    beta_schedule as make_betas,
    rescale_zero_terminal_snr,
    check_objective,
    extract,
    objective_target,
    prediction_to_x0_eps,
)
from spacetime.checks import check_int, check_number
from unets.guards import check_memory

COND_FORMATS = (None, "pooled", "tokens")
# Bytes per timestep of the schedule's tables (a dozen float64 tables, with room to spare),
# for the memory check before they are allocated.
_SCHEDULE_BYTES_PER_STEP = 16 * 8


def denoiser_cond_format(denoise_fn: Any) -> str | None:
    """What a denoiser takes as its condition: None (nothing), "pooled" (one vector per
    sample) or "tokens" (token embeddings and their mask), from its `cond_format`."""
    declared = getattr(denoise_fn, "cond_format", COND_FORMATS)
    if declared is not COND_FORMATS:
        if declared not in COND_FORMATS:
            raise ValueError(
                f"{type(denoise_fn).__name__}.cond_format must be one of {COND_FORMATS}, got {declared!r}"
            )
        return declared
    # Denoisers without `cond_format`: the attributes U-Nets of this library set before it
    # existed, read here and nowhere else.
    if getattr(denoise_fn, "cond_on_tokens", False):
        return "tokens"
    config = getattr(denoise_fn, "config", None)
    if (getattr(denoise_fn, "has_cond", False) or getattr(config, "cond_dim", None) is not None
            or getattr(config, "use_bert_text_cond", False)):
        return "pooled"
    return None

class GaussianDiffusion(SamplingMixin, nn.Module):
    """The diffusion process around `denoise_fn` (video-diffusion-pytorch's arguments, plus
    the schedule, objective, loss weighting, normalisation and text options below).

    `denoise_fn(x_t, t, cond=..., ...)` is any module following the call convention of
    docs/design.md; only keywords that differ from their defaults are passed, so a plain
    `forward(x, t)` works for unconditional use.

    Conditions (`cond`): a tensor `(B, cond_dim)`, token embeddings `(B, L, D)` with an
    optional `cond_mask` `(B, L)` bool, or a list of strings. This process is the one owner
    of text conditioning: strings are encoded by `text_encoder` (default:
    `diffusion.text.default_text_encoder()`, loaded on first use) through a cache it owns
    (`text_cache`: each distinct caption is encoded once; `text_cache_dir` keeps them on
    disk too), and the denoiser's `cond_format` decides what it gets: the pooled vector
    `(B, D)` ("pooled"), or the token embeddings as `cond` with their padding mask as
    `cond_mask` ("tokens"). With `text_use_bert_cls=True` the first token's embedding
    replaces the pooled vector. `is_conditional` tells whether the denoiser takes a
    condition at all.

    `null_cond_prob` is the default probability of dropping the condition during training
    (classifier-free guidance needs it above 0, typically 0.1 to 0.2; the default 0 matches
    video-diffusion-pytorch). The encoder is kept out of the module's parameters and state.
    """

    # What `sample(sampler=...)` takes and its default (FlowMatching has its own).
    samplers: tuple[str, ...] = SAMPLERS
    default_sampler = "ddpm"

    def __init__(
        self,
        denoise_fn: nn.Module,
        *,
        image_size: int | tuple[int, int],
        num_frames: int,
        text_use_bert_cls: bool = False,
        channels: int = 3,
        timesteps: int = 1000,
        loss_type: str = "l1",
        use_dynamic_thres: bool = False,
        dynamic_thres_percentile: Number = 0.9,
        beta_schedule: str = "cosine",
        objective: str = "noise",
        min_snr_loss_weight: bool = False,
        min_snr_gamma: Number = 5.0,
        min_snr_floor: Number = 0.0,
        auto_normalize: bool = True,
        text_encoder: Any = None,
        null_cond_prob: Number = 0.0,
        text_cache_dir: str | os.PathLike | None = None,
        vae: Any = None,
        offset_noise: Number = 0.0,
        zero_terminal_snr: bool = False,
        self_cond_prob: Number = 0.5,
    ) -> None:
        super().__init__()
        from diffusion.denoiser import as_denoiser
        from diffusion.latent import as_video_vae

        denoise_fn = as_denoiser(denoise_fn)
        check_int("timesteps", timesteps, low=1)
        check_memory(float(timesteps * _SCHEDULE_BYTES_PER_STEP), what=f"timesteps={timesteps:,} (the noise schedule's tables)")
        if isinstance(image_size, int):
            image_hw = (image_size, image_size)
        else:
            image_hw = tuple(image_size)
        if len(image_hw) != 2 or min(image_hw) < 1:
            raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
        if num_frames < 1 or channels < 1:
            raise ValueError(f"num_frames and channels must be positive, got {num_frames} and {channels}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if not 0.0 < dynamic_thres_percentile <= 1.0:
            raise ValueError(f"dynamic_thres_percentile must lie in (0, 1], got {dynamic_thres_percentile}")
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        if not 0 <= min_snr_floor <= min_snr_gamma:
            raise ValueError(
                f"min_snr_floor must lie in [0, min_snr_gamma={min_snr_gamma}], got {min_snr_floor}"
            )
        if not 0.0 <= null_cond_prob <= 1.0:
            raise ValueError(f"null_cond_prob must lie in [0, 1], got {null_cond_prob}")
        check_number("offset_noise", offset_noise, low=0.0)
        check_number("self_cond_prob", self_cond_prob, low=0.0, high=1.0)
        if zero_terminal_snr and objective == "noise":
            raise ValueError(
                "zero_terminal_snr=True needs objective='v' or 'x0': at the last timestep the input is pure "
                "noise, so a noise prediction says nothing about the sample (Lin et al. 2023, sec. 3.2)"
            )

        self.denoise_fn = denoise_fn
        self.image_size = image_size
        self.image_hw: tuple[int, int] = image_hw
        # Latent diffusion: the frozen VAE stays out of parameters and state (as the text
        # encoder does); the process runs on `latent_shape`, data and samples stay pixels.
        self.__dict__["vae"] = as_video_vae(vae)
        if self.vae is not None:
            if self.vae.in_channels != channels:
                raise ValueError(f"channels={channels}, but the VAE takes images of {self.vae.in_channels} channels")
            self.latent_channels, self.latent_hw = self.vae.latent_channels, self.vae.latent_hw(image_hw)
            expected = getattr(getattr(denoise_fn, "config", None), "in_channels", None)
            if isinstance(expected, int) and expected != self.latent_channels:
                raise ValueError(
                    f"the VAE makes {self.latent_channels}-channel latents but the U-Net takes "
                    f"in_channels={expected}; use a VAE and U-Net of the same base model"
                )
        else:
            self.latent_channels, self.latent_hw = channels, image_hw
        self.num_frames = num_frames
        self.channels = channels
        self.loss_type = loss_type
        self.objective = check_objective(objective)
        self.beta_schedule = beta_schedule
        self.use_dynamic_thres = use_dynamic_thres
        self.dynamic_thres_percentile = float(dynamic_thres_percentile)
        self.min_snr_loss_weight = min_snr_loss_weight
        self.min_snr_gamma = float(min_snr_gamma)
        self.min_snr_floor = float(min_snr_floor)
        self.auto_normalize = auto_normalize
        self.text_use_bert_cls = text_use_bert_cls
        self.null_cond_prob = float(null_cond_prob)
        self._text_cache_dir = Path(text_cache_dir) if text_cache_dir is not None else None
        self.text_encoder = text_encoder

        self.offset_noise = float(offset_noise)
        # Self-conditioning (diffusion.self_cond) is on exactly when the U-Net takes an estimate.
        self.self_cond = uses_self_cond(denoise_fn)
        self.self_cond_prob = float(self_cond_prob)
        self.zero_terminal_snr = bool(zero_terminal_snr)
        betas = make_betas(beta_schedule, timesteps)
        schedule = NoiseSchedule.from_betas(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas)
        for name, table in schedule.tables().items():
            self.register_buffer(name, table)
        self.num_timesteps = timesteps
        if min_snr_loss_weight and min_snr_floor > 0 and self.objective == "noise":
            # The floor is an x0-space weight; on a noise error it becomes floor / snr, which
            # the schedule's last steps (snr near 0) turn into a loss scale of millions.
            abar = self.alphas_cumprod[-1]
            largest = min_snr_floor * (1.0 - abar) / abar
            raise ValueError(
                f"min_snr_floor={min_snr_floor} with objective='noise' weights the noisiest step's "
                f"noise error by floor / snr = {largest.item():.3g} on this {beta_schedule} schedule; "
                "use objective='v' or 'x0' with a floor, or min_snr_floor=0 for the noise objective"
            )

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> GaussianDiffusion:
        # `.to(device)`, `.cuda()` ... move the VAE too, though it is no submodule.
        if self.__dict__.get("vae") is not None:
            self.vae.vae._apply(fn)
        return super()._apply(fn, recurse)

    # --- schedule, normalisation --------------------------------------------------------

    @property
    def schedule(self) -> NoiseSchedule:
        """The tables as currently held in the buffers (device and loaded values included)."""
        return NoiseSchedule.from_tables(dict(self.named_buffers(recurse=False)))

    def normalize(self, x: Tensor) -> Tensor:
        return x * 2.0 - 1.0 if self.auto_normalize else x

    def unnormalize(self, x: Tensor) -> Tensor:
        return (x + 1.0) * 0.5 if self.auto_normalize else x

    def q_sample(
        self,
        x_start: Float[Tensor, "b *dims"],
        t: Int[Tensor, " b"],
        noise: Float[Tensor, "b *dims"] | None = None,
    ) -> Float[Tensor, "b *dims"]:
        """Draw `x_t ~ q(x_t | x_0)` (Ho et al. 2020, eq. 4), in the model's [-1, 1] space."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise
        )

    # --- input checks and conditions ---------------------------------------------------

    def _check_data(self, x: Tensor, what: str) -> None:
        c, (h, w), f = self.channels, self.image_hw, self.num_frames
        if x.ndim == 5 and tuple(x.shape[1:]) == (c, f, h, w):
            return
        if x.ndim == 4 and tuple(x.shape[1:]) == (c, h, w):
            return
        raise ValueError(
            f"{what} must be videos (B, {c}, {f}, {h}, {w}) or images (B, {c}, {h}, {w}) "
            f"(channels, num_frames, image_size of this GaussianDiffusion), got shape {tuple(x.shape)}"
        )

    # --- text: this process owns the encoder, its cache and the condition format -------

    @property
    def text_encoder(self) -> Any:
        """The encoder given (None: the default one, loaded on first use)."""
        return self._text_encoder

    @text_encoder.setter
    def text_encoder(self, encoder: Any) -> None:
        from diffusion.text import CachedTextEncoder, LazyTextEncoder, TextEncoder, default_text_encoder

        if encoder is not None and not callable(getattr(encoder, "encode", None)):
            raise TypeError(f"text_encoder must have an encode(list[str]) method, got {type(encoder).__name__}")
        # A frozen encoder is no part of the trained model: it is not an nn.Module, so its
        # weights stay out of parameters(), state_dict() and optimizers. Copies of this
        # process (EMA, sampling) share it and its cache (`TextEncoder.__deepcopy__`).
        self.__dict__["_text_encoder"] = encoder
        if isinstance(encoder, CachedTextEncoder):
            cache = encoder
        else:
            if isinstance(encoder, TextEncoder):
                inner = encoder
            else:  # the default encoder, loaded on first use, or any object with encode()
                inner = LazyTextEncoder(default_text_encoder if encoder is None else (lambda: encoder))
            cache = CachedTextEncoder(inner, cache_dir=self._text_cache_dir)
        self.__dict__["text_cache"] = cache

    def use_text_cache(self, folder: str | os.PathLike | None) -> None:
        """Keep encoded captions in `folder` too (one safetensors file per caption), so a
        later run with the same encoder reads them back instead of encoding again."""
        self._text_cache_dir = Path(folder) if folder is not None else None
        self.text_cache.cache_dir = self._text_cache_dir

    @property
    def cond_format(self) -> str | None:
        """What the denoiser takes: None, "pooled" or "tokens" (`denoiser_cond_format`)."""
        return denoiser_cond_format(self.denoise_fn)

    @property
    def is_conditional(self) -> bool:
        return self.cond_format is not None

    def encode_text(self, texts: list[str]) -> tuple[Tensor, Tensor | None]:
        """Encode strings (each distinct one once) into the condition the denoiser takes:
        `(pooled, None)`, or `(tokens, mask)` for a denoiser whose `cond_format` is "tokens"."""
        with torch.no_grad():
            embedding = self.text_cache.encode(list(texts))
        device = self.betas.device
        if self.cond_format == "tokens":
            return embedding.tokens.to(device), embedding.mask.to(device)
        if self.text_use_bert_cls:
            return embedding.tokens[:, 0].to(device), None
        return embedding.pooled.to(device), None

    def prepare_cond(
        self, cond: Any, cond_mask: Tensor | None, batch: int | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Validate a condition (encoding strings) and return `(cond, cond_mask)`."""
        if cond is None:
            if cond_mask is not None:
                raise ValueError("cond_mask was given without cond")
            return None, None
        if isinstance(cond, (list, tuple)):
            if len(cond) == 0 or not all(isinstance(text, str) for text in cond):
                raise TypeError("a list cond must be a non-empty list of strings")
            if cond_mask is not None:
                raise ValueError("cond_mask must not be given with string conditions (the text encoder makes it)")
            cond, cond_mask = self.encode_text(list(cond))
        elif not isinstance(cond, Tensor):
            raise TypeError(f"cond must be a tensor, a list of strings or None, got {type(cond).__name__}")
        if cond.ndim not in (2, 3):
            raise ValueError(
                f"cond must be (B, cond_dim) or token embeddings (B, L, D), got shape {tuple(cond.shape)}"
            )
        if batch is not None and cond.shape[0] != batch:
            raise ValueError(f"cond has batch size {cond.shape[0]}, the data has {batch}")
        if cond_mask is not None:
            mask_shape = tuple(cond_mask.shape)
            if cond.ndim != 3 or cond_mask.dtype != torch.bool or mask_shape != tuple(cond.shape[:2]):
                raise ValueError(
                    f"cond_mask must be a bool (B, L) mask for token embeddings (B, L, D); got a "
                    f"{cond_mask.dtype} mask of shape {mask_shape} for cond of shape {tuple(cond.shape)}"
                )
        return cond, cond_mask

    # --- training ----------------------------------------------------------------------

    def forward(
        self,
        videos: Float[Tensor, "b c f h w"] | Float[Tensor, "b c h w"],
        cond: Cond = None,
        prob_focus_present: Number = 0.0,
        focus_present_mask: Bool[Tensor, " b"] | None = None,
        *,
        cond_mask: Bool[Tensor, "b l"] | None = None,
        enable_time: bool | Bool[Tensor, " b"] = True,
        null_cond_prob: Number | None = None,
        noise: Float[Tensor, "b c f h w"] | Float[Tensor, "b c h w"] | None = None,
        times: Int[Tensor, " b"] | None = None,
        encoded: bool = False,
        cond_frames: Tensor | None = None,
        cond_frame_mask: Tensor | None = None,
        frame_masks: Any = None,
        fps: Any = None,
    ) -> Float[Tensor, ""]:
        """The training loss for a batch of videos (or images) in [0, 1] (or [-1, 1] with
        `auto_normalize=False`). `times` fixes the timesteps (default: uniform), `noise` the
        noise; `null_cond_prob` overrides the constructor's condition-dropout rate. With a
        VAE, `encoded=True` says `videos` are already its latents (`encode_latents`), e.g.
        read from the latent cache; `noise` always has the latents' shape.

        Known frames for a `frame_cond` U-Net: `cond_frames` (like `videos`) with
        `cond_frame_mask` (B, F), or `frame_masks` (a `diffusion.frame_masks.FrameMasks`, or
        True for the default one) to draw a mask per sample and show the batch its own
        frames. The loss covers every frame (`diffusion.frame_masks`). `fps`: the frame rate
        for a `frame_rate_cond` U-Net (a positive number or (B,) values)."""
        x_start = self._start(videos, encoded)
        batch = videos.shape[0]
        if noise is not None and noise.shape != x_start.shape:
            raise ValueError(
                f"noise must have the data's shape {tuple(x_start.shape)}, got {tuple(noise.shape)}"
            )
        if times is None:
            times = torch.randint(0, self.num_timesteps, (batch,), device=videos.device)
        elif bool(((times < 0) | (times >= self.num_timesteps)).any()):
            raise ValueError(f"times must lie in [0, {self.num_timesteps}), got {times.tolist()}")
        drop_prob = self.null_cond_prob if null_cond_prob is None else float(null_cond_prob)
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"null_cond_prob must lie in [0, 1], got {drop_prob}")
        cond, cond_mask = self.prepare_cond(cond, cond_mask, batch)

        if noise is None:
            noise = torch.randn_like(x_start)
            if self.offset_noise > 0:
                # Offset noise (Guttenberg 2023): a per-sample, per-channel constant added to the
                # noise lets the model learn to change a video's overall brightness.
                noise = noise + self.offset_noise * torch.randn(
                    x_start.shape[:2] + (1,) * (x_start.ndim - 2), device=x_start.device, dtype=x_start.dtype
                )
        x_t = self.q_sample(x_start, times, noise)
        kwargs = denoiser_kwargs(
            cond=cond,
            cond_mask=cond_mask,
            # Dropping a condition that is not there means nothing; the call stays plain.
            null_cond_prob=drop_prob if cond is not None else 0.0,
            enable_time=enable_time,
            focus_present_mask=focus_present_mask,
            prob_focus_present=prob_focus_present,
        )
        if cond_frames is not None or cond_frame_mask is not None or frame_masks not in (None, False):
            kwargs.update(training_frames(self, x_start, cond_frames, cond_frame_mask, frame_masks, encoded))
        if fps is not None:
            kwargs["fps"] = fps
        if self.self_cond:
            kwargs["self_cond"] = training_estimate(self.denoise_fn, x_t, times, kwargs, self.self_cond_prob,
                                                    self._training_x0)
        prediction = self.denoise_fn(x_t, times, **kwargs)
        self._check_prediction(prediction, x_t)

        alpha, sigma = extract(self.sqrt_alphas_cumprod, times, x_t.ndim), extract(
            self.sqrt_one_minus_alphas_cumprod, times, x_t.ndim
        )
        target = objective_target(self.objective, x_start, noise, alpha, sigma)
        loss = self._elementwise_loss(prediction, target)
        loss = rearrange(loss, "b ... -> b (...)").mean(dim=1)
        if self.min_snr_loss_weight:
            loss = loss * self._min_snr_weight(times)
        return loss.mean()

    def _training_x0(self, prediction: Tensor, x_t: Tensor, times: Tensor) -> Tensor:
        """x0 from the denoiser's output at integer `times` (self-conditioning's estimate),
        kept in [-1, 1] in pixel space as sampling keeps it."""
        alpha, sigma = self._alpha_sigma(times, x_t)
        x0, _ = prediction_to_x0_eps(self.objective, prediction, x_t, alpha, sigma)
        return x0.clamp(-1.0, 1.0) if self.vae is None else x0

    def encode_latents(self, videos: Tensor) -> Tensor:
        """Pixel videos (or images) as given to `forward` -> the VAE's scaled latents."""
        if self.vae is None:
            raise ValueError("encode_latents needs a GaussianDiffusion built with vae=")
        self._check_data(videos, "videos")
        return self.vae.encode(self.normalize(videos))

    def _start(self, videos: Tensor, encoded: bool) -> Tensor:
        """The process's `x_0`: normalised pixels, or the VAE's latents of them."""
        if not encoded:
            self._check_data(videos, "videos")
            return self.normalize(videos) if self.vae is None else self.vae.encode(self.normalize(videos))
        if self.vae is None:
            raise ValueError("encoded=True needs a GaussianDiffusion built with vae=")
        c, (h, w), f = self.latent_channels, self.latent_hw, self.num_frames
        if tuple(videos.shape[1:]) not in ((c, f, h, w), (c, h, w)):
            raise ValueError(f"encoded latents must be (B, {c}, {f}, {h}, {w}) or (B, {c}, {h}, {w}), got {tuple(videos.shape)}")
        return videos

    def use_empty_caption_null(self) -> None:
        """Make the text encoder's tokens for the empty caption the denoiser's null condition
        (what Stable Diffusion was trained with; `diffusion.denoiser`)."""
        set_null = getattr(self.denoise_fn, "set_null_cond", None)
        if not callable(set_null):
            raise TypeError(f"{type(self.denoise_fn).__name__} has no settable null condition")
        with torch.no_grad():
            embedding = self.text_cache.encode([""])
        set_null(embedding.tokens[0][embedding.mask[0]])

    def _elementwise_loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        if self.loss_type == "l1":
            return F.l1_loss(prediction, target, reduction="none")
        if self.loss_type == "l2":
            return F.mse_loss(prediction, target, reduction="none")
        return F.smooth_l1_loss(prediction, target, reduction="none")

    def _min_snr_weight(self, t: Tensor) -> Tensor:
        # Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting", eq. 8-10: the
        # x0-space weight min(snr, gamma), expressed for the objective's own target (an eps
        # error is snr times an x0 error, a v error snr + 1 times). `min_snr_floor` > 0 also
        # keeps it from falling below the floor at the noisy end: with floor 1 the noisiest
        # steps weigh as in Salimans & Ho 2022's truncated-SNR weighting max(snr, 1) (sec. 4)
        # instead of ~snr, i.e. nearly nothing, where a small video's layout is decided.
        abar = self.alphas_cumprod[t]
        snr = abar / (1.0 - abar)
        clipped = snr.clamp(min=self.min_snr_floor, max=self.min_snr_gamma)
        if self.objective == "noise":
            return clipped / snr
        if self.objective == "x0":
            return clipped
        return clipped / (snr + 1.0)

    @staticmethod
    def _check_prediction(prediction: Any, x_t: Tensor) -> None:
        if not isinstance(prediction, Tensor) or prediction.shape != x_t.shape:
            got = tuple(prediction.shape) if isinstance(prediction, Tensor) else type(prediction).__name__
            raise ValueError(
                f"denoise_fn must return a tensor shaped like its input {tuple(x_t.shape)}, got {got}"
            )
