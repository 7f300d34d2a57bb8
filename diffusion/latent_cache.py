"""A disk cache of VAE latents: each training video is encoded once, then read back in every
later epoch and run.

Key: a SHA-256 of the video exactly as the data set delivers it (its pixels after decoding,
frame selection and resizing, plus its shape and dtype), within a folder named by the VAE's
fingerprint (`VideoVAE.fingerprint`: its config, scaling and weights). So a changed file, a
changed preprocessing (image size, frame count, frame selection) or another VAE all miss
the cache and are encoded afresh; identical videos share an entry. Hashing the delivered
pixels rather than the file's bytes costs the decode of each file per epoch (cheap beside
the VAE) and keeps the cache correct for any data set, including random frame windows
(which then simply miss).

Layout: `<folder>/<vae fingerprint>/<key[:2]>/<key>.safetensors`, one small safetensors
shard per video. Each shard is written to a temporary name and renamed into place
(`diffusion.checkpoint.atomic_write`), so ranks of a distributed run that encode the same
video at once never expose a half-written file: the last rename wins, with the same bytes.
A shard that cannot be read back (truncated, damaged, wrong shape) is re-encoded and
rewritten, with one warning per cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from diffusion.checkpoint import load_tensors, save_tensors
from diffusion.latent import VideoVAE

__all__ = ["LatentCache"]

logger = logging.getLogger(__name__)

_KEY = "latents"


class LatentCache:
    """`encode(pixels)` with the VAE, through the cache in `folder` (see the module docstring).

    `pixels` are what the process encodes (normalised to [-1, 1]). `hits`, `misses` and
    `recovered` count entries read, encoded, and re-encoded after damage."""

    def __init__(self, vae: VideoVAE, folder: str | os.PathLike) -> None:
        if not isinstance(vae, VideoVAE):
            raise TypeError(f"LatentCache needs a diffusion.latent.VideoVAE, got {type(vae).__name__}")
        self.vae = vae
        self.folder = Path(folder).expanduser()
        self.root = self.folder / vae.fingerprint.replace(":", "-")
        self.hits = self.misses = self.recovered = 0
        self._warned = False

    @staticmethod
    def key(pixels: Tensor) -> str:
        """The content key of one video (or image) tensor."""
        data = pixels.detach().cpu().contiguous()
        digest = hashlib.sha256(f"{tuple(data.shape)}|{data.dtype}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def _read(self, key: str, expected: tuple[int, ...] | None) -> Tensor | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            latents = load_tensors(path)[_KEY]
            if expected is not None and tuple(latents.shape) != expected:
                raise ValueError(f"shape {tuple(latents.shape)}, expected {expected}")
            return latents
        except (ValueError, KeyError, OSError) as err:
            if not self._warned:
                self._warned = True
                logger.warning("latent cache entry %s is damaged (%s): re-encoding it (further damaged entries "
                               "are re-encoded without a warning)", path, str(err).splitlines()[0][:200])
            self.recovered += 1
            return None

    def encode(self, pixels: Tensor) -> Tensor:
        """Latents of a batch `(B, C, F, H, W)` (or images), encoding only the videos not yet
        in the cache, in one VAE call."""
        keys = [self.key(row) for row in pixels]
        shape: tuple[int, ...] | None = None
        rows: list[Tensor | None] = []
        for key in keys:
            latents = self._read(key, shape)
            if latents is not None:
                shape = tuple(latents.shape)
            rows.append(latents)
        missing = [i for i, row in enumerate(rows) if row is None]
        if missing:
            encoded = self.vae.encode(pixels[missing])
            for index, latents in zip(missing, encoded):
                latents = latents.contiguous().cpu()
                rows[index] = latents
                path = self.path(keys[index])
                path.parent.mkdir(parents=True, exist_ok=True)
                save_tensors({_KEY: latents}, path, metadata={"vae": self.vae.fingerprint})
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return torch.stack([row for row in rows if row is not None]).to(pixels.device)
