"""Data order and collation: which items each step trains on, as a pure function of the step.

Everything random in a step is a function of `(seed, step)` only: the data order is a
seeded permutation per epoch indexed by the step, and the torch / numpy / python global
generators are re-seeded from `(seed, step)` before each step (timesteps, noise, condition
dropout, augmentations). So a run resumed at step k draws exactly what an uninterrupted one
draws. Under torchrun, the data positions, diffusion timesteps, noise and image / video
choices of every sample are functions of `(seed, step, micro-batch, index in the global
batch)`, never of the rank, so N processes follow the trajectory of one.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler


def derive_seed(seed: int, step: int, purpose: str) -> int:
    # A hash, not `seed + step`, so runs with neighbouring seeds do not share streams.
    digest = hashlib.sha256(f"{seed}:{step}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seed_step(seed: int, step: int, rank: int = 0) -> None:
    """Seed every global generator from `(seed, step)` (and the rank, for ranks > 0)."""
    value = derive_seed(seed, step, "step" if rank == 0 else f"step-rank{rank}")
    torch.manual_seed(value)  # CPU and every CUDA device
    random.seed(value)
    np.random.seed(value % (1 << 32))



class StepOrderSampler(Sampler[int]):
    """Infinite stream of data indices; position `p` is a pure function of `(seed, p)`.

    Epoch `e = p // N` visits a permutation drawn from a generator seeded by `(seed, e)`, so
    the stream can be restarted at any position (a resumed step) without replaying it.

    With `world_size > 1` the global stream is cut into batches of `global_batch`
    positions and this rank yields only its slice of each: positions
    `g * global_batch + rank * local + k` for `k < local = global_batch // world_size`."""

    def __init__(
        self,
        length: int,
        *,
        seed: int,
        start: int = 0,
        shuffle: bool = True,
        global_batch: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ):
        if length < 1:
            raise ValueError(f"the data set is empty: need at least 1 item, got {length}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        if global_batch % world_size != 0:
            raise ValueError(f"global_batch {global_batch} is not divisible by world_size {world_size}")
        if start % global_batch != 0:
            raise ValueError(f"start {start} must be a multiple of global_batch {global_batch}")
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size
        self.length = length
        self.seed = seed
        self.start = start
        self.shuffle = shuffle
        self._epoch = -1
        self._order: list[int] = []

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.length)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, "data"))
            self._order = torch.randperm(self.length, generator=generator).tolist()
            self._epoch = epoch
        return self._order[offset]

    def __iter__(self) -> Iterator[int]:
        local = self.global_batch // self.world_size
        position = self.start
        while True:
            first = position + self.rank * local
            for offset in range(local):
                yield self.index(first + offset)
            position += self.global_batch


def collate(items: Sequence[Any]) -> dict[str, Any]:
    """Batch items of any of the shapes data sets here yield.

    A tensor `(C, F, H, W)`; a `(video, caption)` or `(video, cond)` pair; or a dict with
    `video` and optionally `caption`, `cond`, `cond_mask` (`VideoFolder`, `MovingDigits`)."""
    if len(items) == 0:
        raise ValueError("cannot collate an empty batch")
    first = items[0]
    if isinstance(first, Tensor):
        return {"video": torch.stack(list(items))}
    if isinstance(first, (tuple, list)):
        if len(first) != 2:
            raise TypeError(f"tuple items must be (video, caption) or (video, cond), got {len(first)} elements")
        videos = torch.stack([item[0] for item in items])
        if isinstance(first[1], str):
            return {"video": videos, "caption": [item[1] for item in items]}
        return {"video": videos, "cond": torch.stack([item[1] for item in items])}
    if isinstance(first, Mapping):
        if "video" not in first:
            raise TypeError(f"dict items need a 'video' entry, got keys {sorted(first)}")
        from diffusion.data import collate_videos

        if "caption" in first:
            return collate_videos(items)
        batch = {"video": torch.stack([item["video"] for item in items])}
        if "cond" in first:
            padded = collate_videos([{**item, "caption": ""} for item in items])
            batch["cond"] = padded["cond"]
            if "cond_mask" in padded:
                batch["cond_mask"] = padded["cond_mask"]
        return batch
    raise TypeError(
        f"data set items must be a tensor, a (video, caption) pair or a dict with 'video', got {type(first).__name__}"
    )



def conditioning(batch: Mapping[str, Any], device: torch.device, *, captions: bool) -> dict[str, Any]:
    """The condition keywords of a batch for the diffusion model: its `cond` (and
    `cond_mask`) tensors, else its captions when the run conditions on them."""
    if "cond" in batch:
        out = {"cond": batch["cond"].to(device)}
        if "cond_mask" in batch:
            out["cond_mask"] = batch["cond_mask"].to(device)
        return out
    if captions:
        if "caption" not in batch:
            raise ValueError("condition_on_captions=True but the data set's items carry no captions")
        return {"cond": list(batch["caption"])}
    return {}


def fixed_randomness_steps(model: Any, world_size: int = 1) -> int | None:
    """The model's timestep count if its forward takes `times=` and `noise=`
    (GaussianDiffusion's does), which lets every sample's timestep and noise be drawn from
    its own position instead of the rank's stream; None otherwise."""
    import inspect
    import logging

    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        parameters = {}
    if {"times", "noise"} <= parameters.keys() and hasattr(model, "num_timesteps"):
        return model.num_timesteps
    if world_size > 1:
        logging.getLogger(__name__).warning(
            "%s.forward takes no times= / noise=: timesteps and noise depend on the rank, so runs with different "
            "numbers of processes differ", type(model).__name__)
    return None


class StepBatches:
    """The batches of a run on one rank: a loader over `StepOrderSampler`, and the per-step
    draws that must not depend on the rank (image frames, mixed image / video batches,
    each sample's timestep and noise).

    `batch_size` is the global batch of a micro-step; this rank trains on its
    `batch_size // world_size` rows of it."""

    def __init__(self, dataset: Dataset, *, seed: int, batch_size: int, accumulate: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, num_workers: int = 0,
                 device: torch.device = torch.device("cpu"), image_ratio: float = 0.0,
                 num_timesteps: int | None = None):
        self.dataset = dataset
        self.seed = seed
        self.batch_size = batch_size
        self.local_batch_size = batch_size // world_size
        self.accumulate = accumulate
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.device = device
        self.image_ratio = image_ratio
        # None: the model draws timesteps and noise itself (rank-dependent under torchrun).
        self.num_timesteps = num_timesteps
        # Latent diffusion: pixel videos -> the VAE's latents (`diffusion.latent_cache`), set
        # by the trainer; timesteps, noise and image frames are then drawn on the latents.
        self.encode: Callable[[Tensor], Tensor] | None = None

    def loader(self, step: int) -> Iterator[dict[str, Any]]:
        """Micro-batches from step `step` on, endlessly."""
        sampler = StepOrderSampler(
            len(self.dataset), seed=self.seed, start=step * self.accumulate * self.batch_size,
            shuffle=self.shuffle, global_batch=self.batch_size, rank=self.rank, world_size=self.world_size,
        )
        loader = DataLoader(
            self.dataset, batch_size=self.local_batch_size, sampler=sampler, num_workers=self.num_workers,
            collate_fn=collate, pin_memory=self.device.type == "cuda", persistent_workers=False,
        )
        return iter(loader)

    def prepare(self, batch: Mapping[str, Any], step: int, micro: int, *, image_phase: bool, captions: bool,
                train_kwargs: Mapping[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """The videos (or images) of micro-batch `micro` of `step` on this rank, and the
        keywords of the diffusion model's call: conditions, `enable_time`, and each
        sample's timestep and noise."""
        videos = batch["video"].to(self.device, non_blocking=True)
        kwargs = conditioning(batch, self.device, captions=captions)
        if self.encode is not None:
            videos = self.encode(videos)
            kwargs["encoded"] = True
        generator = torch.Generator().manual_seed(derive_seed(self.seed, step, f"images-{micro}"))
        if image_phase:
            videos = self.image_batch(videos, generator)
            kwargs["enable_time"] = False
        else:
            kwargs.update(train_kwargs)
            if self.image_ratio > 0:
                videos, kwargs["enable_time"] = self.mixed_batch(videos, generator)
        kwargs.update(self.sample_randomness(step, micro, videos.shape))
        return videos, kwargs

    def local_rows(self) -> slice:
        """This rank's rows of a global micro-batch."""
        first = self.rank * self.local_batch_size
        return slice(first, first + self.local_batch_size)

    def image_batch(self, videos: Tensor, generator: torch.Generator) -> Tensor:
        """One random frame per video, as images `(B, C, H, W)`. The frames are drawn for
        the whole global micro-batch and this rank keeps its rows."""
        b, _, f = videos.shape[:3]
        frame = torch.randint(0, f, (self.batch_size,), generator=generator)[self.local_rows()].to(videos.device)
        return videos[torch.arange(b, device=videos.device), :, frame]

    def mixed_batch(self, videos: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Replace `round(image_ratio * B)` videos of the global micro-batch by frames drawn
        independently (with replacement) from the same video, and disable time for them.

        Frames come from the sample's own video so that its caption still describes them;
        with time disabled the network sees them as unrelated images."""
        b, _, f = videos.shape[:3]
        count = int(round(self.image_ratio * self.batch_size))
        enable_time = torch.ones(b, dtype=torch.bool)
        if count == 0:
            return videos, enable_time.to(videos.device)
        chosen = torch.randperm(self.batch_size, generator=generator)[:count]
        frames = torch.randint(0, f, (count, f), generator=generator)
        rows = self.local_rows()
        here = (chosen >= rows.start) & (chosen < rows.stop)
        if not bool(here.any()):
            return videos, enable_time.to(videos.device)
        local, frames = chosen[here] - rows.start, frames[here]
        videos = videos.clone()
        index = local.to(videos.device)
        videos[index] = videos[index[:, None], :, frames.to(videos.device)].transpose(1, 2)
        enable_time[local] = False
        return videos, enable_time.to(videos.device)

    def sample_randomness(self, step: int, micro: int, shape: torch.Size) -> dict[str, Tensor]:
        """Diffusion timesteps and noise for this rank's rows, each sample's drawn from a
        generator seeded by its index in the global micro-batch (not by the rank)."""
        if self.num_timesteps is None:
            return {}
        first = self.local_rows().start
        times, noise = [], []
        for row in range(shape[0]):
            generator = torch.Generator(device=self.device)
            generator.manual_seed(derive_seed(self.seed, step, f"sample-{micro}-{first + row}"))
            times.append(torch.randint(0, self.num_timesteps, (1,), generator=generator, device=self.device))
            noise.append(torch.randn(tuple(shape[1:]), generator=generator, device=self.device))
        return {"times": torch.cat(times), "noise": torch.stack(noise)}
