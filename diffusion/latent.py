"""Latent video diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models", sec. 3; Blattmann et al. 2023, "Align your Latents"): a frozen image
autoencoder maps each frame to latents and back; the diffusion process runs on the latents.

`VideoVAE` wraps a diffusers `AutoencoderKL` (or any module with `encode(x).latent_dist` /
`decode(z).sample` and `config.scaling_factor`, optionally `config.shift_factor`):

- `encode(video)`: pixels in [-1, 1], `(B, C, F, H, W)` or `(B, C, H, W)` -> latents
  `(z - shift) * scale`, frame by frame in chunks of `chunk_size` frames, without gradients.
  The posterior's mean is used, not a sample: the cache (`diffusion.latent_cache`) must give the
  same latents for the same file, and the VAE's posterior std is tiny at SD scale.
- `decode(latents)`: the inverse, in chunks, back to pixels in [-1, 1].

The VAE is frozen and held outside the trained module's parameters (like the text encoder), so
optimizers, EMA and checkpoints never see it.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from spacetime.checks import check_int

__all__ = ["VideoVAE", "as_video_vae"]

logger = logging.getLogger(__name__)


def _config_value(config: Any, name: str, default: Any = None) -> Any:
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


class VideoVAE:
    """A frozen per-frame autoencoder for videos; see the module docstring.

    `latent_channels` and `downsample` (the spatial factor) come from the VAE's config
    (`latent_channels`, `block_out_channels`), else from one probe encode of a small image."""

    def __init__(self, vae: nn.Module, *, chunk_size: int = 16) -> None:
        encode, decode = getattr(vae, "encode", None), getattr(vae, "decode", None)
        if not (isinstance(vae, nn.Module) and callable(encode) and callable(decode)):
            raise TypeError(
                f"vae must be an nn.Module with encode(x).latent_dist and decode(z).sample (a diffusers "
                f"AutoencoderKL), got {type(vae).__name__}"
            )
        config = getattr(vae, "config", None)
        scale = _config_value(config, "scaling_factor")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
            raise ValueError(
                f"vae.config.scaling_factor must be a positive number (Stable Diffusion 1.x: 0.18215), got {scale!r}"
            )
        shift = _config_value(config, "shift_factor")
        check_int("chunk_size", chunk_size, low=1)
        vae.requires_grad_(False)
        vae.eval()
        self.vae = vae
        self.scaling_factor = float(scale)
        self.shift_factor = float(shift) if isinstance(shift, (int, float)) and not isinstance(shift, bool) else 0.0
        self.chunk_size = chunk_size
        self.in_channels = int(_config_value(config, "in_channels", 3))
        channels = _config_value(config, "latent_channels")
        blocks = _config_value(config, "block_out_channels")
        if isinstance(channels, int) and blocks is not None:
            self.latent_channels = channels
            self.downsample = 2 ** (len(blocks) - 1)
        else:
            probe = self.encode(torch.zeros(1, self.in_channels, 32, 32, device=self.device, dtype=self.dtype))
            self.latent_channels = probe.shape[1]
            self.downsample = 32 // probe.shape[-1]

    @property
    def device(self) -> torch.device:
        first = next(self.vae.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        first = next(self.vae.parameters(), None)
        return first.dtype if first is not None else torch.float32

    @property
    def fingerprint(self) -> str:
        """Identifies the VAE's weights and scaling for caches: a hash of its config and of
        every parameter's bytes (computed once; the VAE is frozen)."""
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            digest = hashlib.sha256()
            digest.update(repr(sorted(dict(_config_value(self.vae, "config", {}) or {}).items())).encode())
            digest.update(f"{self.scaling_factor}|{self.shift_factor}".encode())
            for name, tensor in self.vae.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            cached = self._fingerprint = f"{type(self.vae).__name__}:{digest.hexdigest()[:20]}"
        return cached

    def __deepcopy__(self, memo: dict[int, Any]) -> VideoVAE:
        # Frozen: copies of a process holding it (EMA, sampling) share it, as they share the
        # text encoder, instead of duplicating its weights.
        return self

    def to(self, device: torch.device | str) -> VideoVAE:
        self.vae.to(device)
        return self

    def latent_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        h, w = hw
        if h % self.downsample or w % self.downsample:
            raise ValueError(
                f"image_size {hw} must be a multiple of the VAE's downsampling factor {self.downsample} in latent space"
            )
        return h // self.downsample, w // self.downsample

    def _frames(self, x: Tensor) -> tuple[Tensor, int | None]:
        if x.ndim == 5:
            return rearrange(x, "b c f h w -> (b f) c h w"), x.shape[0]
        if x.ndim == 4:
            return x, None
        raise ValueError(f"expected (B, C, F, H, W) or (B, C, H, W), got shape {tuple(x.shape)}")

    @torch.no_grad()
    def encode(self, pixels: Float[Tensor, "b c *frames h w"]) -> Float[Tensor, "b z *frames h2 w2"]:
        """Pixels in [-1, 1] -> scaled latents, per frame, `chunk_size` frames at a time."""
        frames, batch = self._frames(pixels)
        out = []
        for chunk in frames.split(self.chunk_size):
            encoded = self.vae.encode(chunk.to(device=self.device, dtype=self.dtype))
            dist = getattr(encoded, "latent_dist", None)
            if dist is None and isinstance(encoded, tuple):
                dist = encoded[0]
            latent = dist.mode() if hasattr(dist, "mode") else dist
            if not isinstance(latent, Tensor):
                raise TypeError(f"vae.encode returned {type(encoded).__name__}; expected .latent_dist")
            out.append((latent.float() - self.shift_factor) * self.scaling_factor)
        latents = torch.cat(out).to(pixels.device)
        return rearrange(latents, "(b f) c h w -> b c f h w", b=batch) if batch is not None else latents

    @torch.no_grad()
    def decode(self, latents: Float[Tensor, "b z *frames h2 w2"]) -> Float[Tensor, "b c *frames h w"]:
        """Scaled latents -> pixels in [-1, 1] (not clamped), `chunk_size` frames at a time."""
        frames, batch = self._frames(latents)
        out = []
        for chunk in frames.split(self.chunk_size):
            z = chunk.to(device=self.device, dtype=self.dtype) / self.scaling_factor + self.shift_factor
            decoded = self.vae.decode(z)
            sample = getattr(decoded, "sample", decoded[0] if isinstance(decoded, tuple) else decoded)
            out.append(sample.float())
        pixels = torch.cat(out).to(latents.device)
        return rearrange(pixels, "(b f) c h w -> b c f h w", b=batch) if batch is not None else pixels


def as_video_vae(vae: Any) -> VideoVAE | None:
    """None, a `VideoVAE`, or a module with the AutoencoderKL interface (wrapped)."""
    if vae is None or isinstance(vae, VideoVAE):
        return vae
    return VideoVAE(vae)
