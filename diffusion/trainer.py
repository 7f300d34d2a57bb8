"""Trainer: video-diffusion-pytorch's training loop, made resumable and safe to interrupt.

Takes video-diffusion-pytorch's `Trainer` arguments (a diffusion model and a folder of
videos, batch size, learning rate, gradient accumulation, EMA, AMP, sample/save period), and
adds: any `Dataset` in place of a folder, AdamW with linear warm-up, gradient clipping, bf16
autocast, `torch.compile`, caption conditioning through the model's text encoder (each
caption encoded once), classifier-free-guided sample grids, and image-then-video training.

Reproducibility. Everything random in a step is a function of `(seed, step)` only: the data
order is a seeded permutation per epoch indexed by the step, and the torch / numpy / python
global generators are re-seeded from `(seed, step)` before each step (timesteps, noise,
condition dropout, augmentations). Together with weights, optimizer, scheduler and scaler
state restored from a checkpoint, a run resumed at step k reproduces the losses and weights
of an uninterrupted run exactly (on CPU; CUDA kernels may be nondeterministic unless
`torch.use_deterministic_algorithms(True)`). With `num_workers > 0`, random augmentations
inside the data set run in worker processes and are not covered.

Checkpoints (`results/checkpoint-<milestone>/`): `model.safetensors` and `ema.safetensors`
(weights only), `state.pt` (optimizer, scheduler, scaler, step, RNG states; tensors and
plain types only, read with `torch.load(weights_only=True)`). A checkpoint is assembled in a
temporary folder and renamed into place, then the `latest` pointer file is replaced
atomically, so a crash at any moment leaves the previous checkpoint intact and `latest`
pointing at a complete one.

Data parallelism (`diffusion.distributed`). Started by `torchrun --nproc_per_node=N`, the
same Trainer joins the process group (gloo on CPU, nccl on CUDA) and wraps the model in
DistributedDataParallel (`parallel="auto"` / `"ddp"`) or shards it with FSDP2
(`parallel="fsdp"`). `train_batch_size` stays the global batch of a micro-step; rank r
trains on the r-th slice of it, and the data positions, diffusion timesteps, noise and
image / video choices of every sample are functions of `(seed, step, micro-batch, index in
the global batch)`, never of the rank. So a run on N processes follows the same trajectory
as one on 1 process (up to the order of fp32 additions in the gradient all-reduce, ~1e-6
relative), and a checkpoint resumes under any N. Randomness drawn inside the denoiser
(condition dropout, focus-present masks) comes from a per-rank stream seeded by
`(seed, step, rank)`: reproducible for a fixed N, equal across N in distribution only.
Gradient accumulation communicates once per optimizer step (`no_sync` / FSDP2's
`set_requires_gradient_sync(False)` on the other micro-batches). Rank 0 alone writes
checkpoints, metrics and samples, and logs. With FSDP every rank keeps the EMA of its own
shards; a checkpoint gathers full tensors to rank 0 and has the format of a
single-process one, and samples come from an unsharded copy on rank 0 (so rank 0 needs
room for one full model besides its shards). Checkpoints are read by every rank, which
assumes a results folder all processes can see. A stop request (Ctrl-C, SIGTERM from
torchrun or a scheduler, a time budget changing `train_num_steps` on rank 0) is agreed on
by all ranks before each step, so they stop, and save, together.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from diffusion import checkpoint as ckpt
from diffusion import distributed
from diffusion.ema import EMA, frozen_copy

logger = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "cosine", "linear")
CHECKPOINT_PREFIX = "checkpoint-"
LATEST = "latest"
# 2: optimizer state keyed by parameter names (torch.distributed.checkpoint.state_dict),
# which FSDP and plain runs share; version 1 (keyed by position) is still read.
STATE_VERSION = 2
READABLE_STATE_VERSIONS = (1, 2)

Number = float | int


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss or gradient norm."""


def _derive_seed(seed: int, step: int, purpose: str) -> int:
    # A hash, not `seed + step`, so runs with neighbouring seeds do not share streams.
    digest = hashlib.sha256(f"{seed}:{step}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seed_step(seed: int, step: int, rank: int = 0) -> None:
    """Seed every global generator from `(seed, step)` (and the rank, for ranks > 0)."""
    value = _derive_seed(seed, step, "step" if rank == 0 else f"step-rank{rank}")
    torch.manual_seed(value)  # CPU and every CUDA device
    random.seed(value)
    np.random.seed(value % (1 << 32))


# ---------------------------------------------------------------------------------------
# data


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
            generator = torch.Generator().manual_seed(_derive_seed(self.seed, epoch, "data"))
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


def _denoiser_is_conditional(denoise_fn: nn.Module) -> bool:
    config = getattr(denoise_fn, "config", None)
    if getattr(denoise_fn, "has_cond", False):
        return True
    if config is None:
        return False
    return getattr(config, "cond_dim", None) is not None or bool(getattr(config, "use_bert_text_cond", False))


def _autocast_dtype(device: torch.device) -> torch.dtype:
    """bf16 wherever it is supported (no loss scaling needed); fp16 only on older GPUs."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _milestone_name(milestone: int | str) -> str:
    name = str(milestone)
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"milestone must be an int or a plain name, got {milestone!r}")
    return name


class Trainer:
    """Trains a `GaussianDiffusion` on a folder of videos or any `Dataset`.

    video-diffusion-pytorch's arguments keep their meaning and defaults:
    `folder` (videos, see `diffusion.data.VideoFolder`; None when `dataset` is given),
    `ema_decay`, `num_frames` (taken from the model; a different value is ignored with a
    warning, as there), `train_batch_size`, `train_lr`, `train_num_steps`,
    `gradient_accumulate_every`, `amp`, `step_start_ema`, `update_ema_every`,
    `save_and_sample_every`, `results_folder`, `num_sample_rows` (samples are a rows x rows
    grid), `max_grad_norm`.

    Further:
    dataset: a `Dataset` of tensors `(C, F, H, W)` in [0, 1], `(video, caption)` pairs or
        dicts with `video` (and `caption`, `cond`, `cond_mask`).
    warmup_steps, lr_schedule ('constant', 'cosine', 'linear' decay to `min_lr_ratio` *
        lr after warm-up), adam_betas, weight_decay: AdamW.
    amp: autocast to bf16 (CPU, and GPUs that support it), else fp16 with a GradScaler.
    compile: compile the denoiser in place with `torch.compile` (`nn.Module.compile`).
    device: where to train (default: where the model's parameters are); seed: see the module
        docstring; shuffle: shuffle the data order.
    condition_on_captions: None (default) conditions on captions when the denoiser takes a
        condition and the data has captions; captions are encoded by the model's text
        encoder through a `CachedTextEncoder` (each distinct caption once; `text_cache_dir`
        keeps them on disk too).
    cond_scale, sample_captions, sample_kwargs: for sample grids (guidance scale, captions,
        extra `sample()` arguments such as `sampler='ddim', steps=50`).
    image_phase_steps: the first N steps train on single frames (images, time disabled).
    image_ratio: afterwards, this fraction of each batch is frames drawn independently from
        their video with time disabled (per-sample `enable_time`; Ho et al. 2022, "Video
        Diffusion Models", sec. 3: joint image-video training).
    resume: continue from `results_folder/latest` when it exists.
    compile: note that compiled code draws random numbers with its own generator, so a
        compiled run is reproducible but does not match an eager one step for step.
    When conditioning on captions, the model's (and its EMA copy's) `text_encoder` is
    replaced by a `CachedTextEncoder` around it; embeddings are unchanged.
    progress: tqdm bar (None: only when stderr is a terminal); log_every: metrics cadence.
    parallel: under torchrun, "auto" / "ddp" (DistributedDataParallel) or "fsdp" (FSDP2
        `fully_shard` of each `nn.ModuleList` entry, then the whole model); "none" trains
        independently on every process (rank 0 alone writes files). Ignored for one process. See the
        module docstring; `train_batch_size` must be divisible by the number of processes.
    find_unused_parameters: passed to DistributedDataParallel (True: image batches and
        unconditional batches leave some parameters without gradients).
    """

    def __init__(
        self,
        diffusion_model: nn.Module,
        folder: str | os.PathLike | None = None,
        *,
        ema_decay: Number = 0.995,
        num_frames: int | None = None,
        train_batch_size: int = 32,
        train_lr: Number = 1e-4,
        train_num_steps: int = 100000,
        gradient_accumulate_every: int = 2,
        amp: bool = False,
        step_start_ema: int = 2000,
        update_ema_every: int = 10,
        save_and_sample_every: int = 1000,
        results_folder: str | os.PathLike = "./results",
        num_sample_rows: int = 4,
        max_grad_norm: Number | None = None,
        dataset: Dataset | None = None,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        min_lr_ratio: Number = 0.0,
        adam_betas: tuple[Number, Number] = (0.9, 0.99),
        weight_decay: Number = 0.0,
        compile: bool = False,
        device: torch.device | str | None = None,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        condition_on_captions: bool | None = None,
        text_cache_dir: str | os.PathLike | None = None,
        cond_scale: Number = 1.0,
        sample_captions: Sequence[str] | None = None,
        sample_kwargs: Mapping[str, Any] | None = None,
        image_phase_steps: int = 0,
        image_ratio: Number = 0.0,
        resume: bool = False,
        progress: bool | None = None,
        log_every: int = 1,
        write_mp4: bool = True,
        fps: Number = 8.0,
        parallel: str = "auto",
        find_unused_parameters: bool = True,
    ):
        for name, value, low in (
            ("train_batch_size", train_batch_size, 1),
            ("train_num_steps", train_num_steps, 0),
            ("gradient_accumulate_every", gradient_accumulate_every, 1),
            ("save_and_sample_every", save_and_sample_every, 1),
            ("num_sample_rows", num_sample_rows, 1),
            ("warmup_steps", warmup_steps, 0),
            ("image_phase_steps", image_phase_steps, 0),
            ("num_workers", num_workers, 0),
            ("log_every", log_every, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not train_lr > 0:
            raise ValueError(f"train_lr must be positive, got {train_lr}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
        if not 0.0 <= image_ratio < 1.0:
            raise ValueError(f"image_ratio must lie in [0, 1), got {image_ratio}")
        for attribute in ("image_size", "num_frames", "channels", "sample"):
            if not hasattr(diffusion_model, attribute):
                raise TypeError(
                    f"diffusion_model must be a GaussianDiffusion (with .{attribute}), got {type(diffusion_model).__name__}"
                )
        if (folder is None) == (dataset is None):
            raise ValueError(
                "give exactly one of `folder` (a folder of videos) and `dataset=` (any Dataset); "
                f"got folder={folder!r} and dataset={type(dataset).__name__ if dataset is not None else None}"
            )
        if num_frames is not None and num_frames != diffusion_model.num_frames:
            logger.warning(
                "num_frames=%d ignored: the diffusion model trains on %d frames",
                num_frames,
                diffusion_model.num_frames,
            )

        if parallel not in distributed.PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {distributed.PARALLEL_MODES}, got {parallel!r}")
        if device is None and not distributed.launched_by_torchrun():
            first = next(diffusion_model.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.dist = distributed.setup(device)
        self.parallel = distributed.resolve_parallel(parallel, self.dist)
        self.world_size = self.dist.world_size if self.parallel != "none" else 1
        self.rank = self.dist.rank if self.parallel != "none" else 0
        if train_batch_size % self.world_size != 0:
            raise ValueError(
                f"train_batch_size is the global batch and must be divisible by the {self.world_size} processes, "
                f"got {train_batch_size}"
            )
        self.device = self.dist.device
        self.model = diffusion_model.to(self.device)

        if dataset is None:
            from diffusion.data import VideoFolder

            size = diffusion_model.image_size
            if not isinstance(size, int):
                if len(set(size)) != 1:
                    raise ValueError(f"a video folder gives square frames; the model's image_size is {size}")
                size = size[0]
            dataset = VideoFolder(
                folder,
                image_size=size,
                num_frames=diffusion_model.num_frames,
                channels=diffusion_model.channels,
            )
            logger.info("found %d videos in %s", len(dataset), folder)
        self.ds = dataset
        if len(self.ds) == 0:
            raise ValueError("need at least 1 video to train on, the data set is empty")

        self.batch_size = train_batch_size
        self.local_batch_size = train_batch_size // self.world_size
        self.image_size = diffusion_model.image_size
        self.train_lr = train_lr
        self.train_num_steps = train_num_steps
        self.gradient_accumulate_every = gradient_accumulate_every
        self.step_start_ema = step_start_ema
        self.update_ema_every = update_ema_every
        self.save_and_sample_every = save_and_sample_every
        self.num_sample_rows = num_sample_rows
        self.max_grad_norm = max_grad_norm
        self.warmup_steps = warmup_steps
        self.lr_schedule = lr_schedule
        self.min_lr_ratio = min_lr_ratio
        self.seed = seed
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.cond_scale = cond_scale
        self.sample_kwargs = dict(sample_kwargs or {})
        self.image_phase_steps = image_phase_steps
        self.image_ratio = image_ratio
        self.log_every = log_every
        self.write_mp4 = write_mp4
        self.fps = fps
        self.progress = progress
        self.results_folder = Path(results_folder)
        self.metrics_path = self.results_folder / "metrics.jsonl"
        error = None
        if self.is_main:
            try:
                self.results_folder.mkdir(parents=True, exist_ok=True)
                ckpt.check_writable(self.results_folder)
            except OSError as err:
                error = err
        self._collective(distributed.broadcast_error, error)

        self.ema = EMA(self.model, beta=ema_decay, update_every=update_ema_every, start_step=step_start_ema)
        self.ema_model = self.ema.ema_model
        # Samples under FSDP come from an unsharded copy on rank 0 that is loaded with the
        # gathered EMA weights when a grid is due.
        self._sampling_model: nn.Module | None = None
        if compile:
            # The denoiser, not the whole process: the diffusion wrapper's input checks, string
            # conditions and host-side branches would only break the graph. `Module.compile`
            # compiles in place, so parameter names (and checkpoints) stay as they are.
            self.model.denoise_fn.compile()
        self.train_model: nn.Module = self.model
        if self.parallel == "ddp":
            self.train_model = distributed.wrap_ddp(self.model, self.dist, find_unused_parameters=find_unused_parameters)
        elif self.parallel == "fsdp":
            if self.is_main:
                self._sampling_model = frozen_copy(self.model).to("cpu")
            distributed.fully_shard_model(self.model)
            distributed.fully_shard_model(self.ema_model)
        self._fixed_randomness = self._accepts_fixed_randomness()

        # Built after sharding: FSDP replaces the parameters by sharded ones.
        self.opt = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=train_lr,
            betas=tuple(adam_betas),
            weight_decay=weight_decay,
        )
        self.base_lrs = [group["lr"] for group in self.opt.param_groups]

        self.amp = amp
        self.amp_dtype = _autocast_dtype(self.device) if amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp and self.amp_dtype == torch.float16)

        self.condition_on_captions = self._decide_captions(condition_on_captions)
        self.text_encoder = None
        if self.condition_on_captions:
            self._install_cached_text_encoder(text_cache_dir)
        self.sample_captions = list(sample_captions) if sample_captions is not None else None

        self.step = 0
        self.interrupted = False
        self.history: list[tuple[int, float]] = []
        self._interrupt_requested = False
        self._hard_interrupt = False
        self._warned_mp4 = False

        if resume:
            if self.latest_checkpoint() is not None:
                self.load(LATEST)
            else:
                logger.info("resume=True but no checkpoint in %s yet: starting from step 0", self.results_folder)
                if self.is_main:
                    # Metrics of a run killed before its first checkpoint describe steps
                    # that will now be trained again.
                    self._truncate_metrics(0)

    # --- set-up helpers ----------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and logs (rank 0, or the only one)."""
        return self.dist.is_main

    def _collective(self, function: Callable[..., Any], *args: Any) -> Any:
        # A wrapper of "none" runs every process on its own: no collective calls then.
        context = self.dist if self.parallel != "none" else distributed.DistributedContext(device=self.device)
        return function(*args, context)

    def _accepts_fixed_randomness(self) -> bool:
        """Whether the diffusion model takes `times=` and `noise=` (GaussianDiffusion does),
        which makes a sample's timestep and noise independent of the rank it lands on."""
        import inspect

        try:
            parameters = inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            return False
        accepted = {"times", "noise"} <= parameters.keys() and hasattr(self.model, "num_timesteps")
        if not accepted and self.world_size > 1:
            logger.warning(
                "%s.forward takes no times= / noise=: timesteps and noise depend on the rank, so runs with "
                "different numbers of processes differ",
                type(self.model).__name__,
            )
        return accepted

    def _lr_factor(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return 1.0
        span = max(1, self.train_num_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.lr_schedule == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape

    def _dataset_captions(self, count: int) -> list[str] | None:
        captions = getattr(self.ds, "captions", None)
        if isinstance(captions, Sequence) and len(captions) > 0 and isinstance(captions[0], str):
            return list(captions[:count])
        found = []
        for index in range(min(count, len(self.ds))):
            item = self.ds[index]
            if isinstance(item, Mapping) and isinstance(item.get("caption"), str):
                found.append(item["caption"])
            elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], str):
                found.append(item[1])
            else:
                return None
        return found or None

    def _decide_captions(self, requested: bool | None) -> bool:
        if requested is not None:
            return bool(requested)
        if not _denoiser_is_conditional(self.model.denoise_fn):
            return False
        captions = self._dataset_captions(8)
        if not captions:
            return False
        if not any(captions):
            logger.warning("the denoiser takes a condition but the first captions are empty strings")
        return True

    def _install_cached_text_encoder(self, cache_dir: str | os.PathLike | None) -> None:
        from diffusion.text import CachedTextEncoder, default_text_encoder

        encoder = getattr(self.model, "text_encoder", None)
        if encoder is None:
            encoder = default_text_encoder()
        if not isinstance(encoder, CachedTextEncoder):
            encoder = CachedTextEncoder(encoder, cache_dir=cache_dir)
        self.text_encoder = encoder
        # The diffusion model turns strings into its denoiser's condition (pooled vector or
        # tokens); giving it the caching encoder keeps that logic in one place.
        for model in (self.model, self.ema_model, self._sampling_model):
            if model is not None:
                object.__setattr__(model, "text_encoder", encoder)

    # --- checkpoints -------------------------------------------------------------------

    def checkpoint_dir(self, milestone: int | str) -> Path:
        return self.results_folder / f"{CHECKPOINT_PREFIX}{_milestone_name(milestone)}"

    def latest_checkpoint(self) -> Path | None:
        """The folder `latest` points to, or (pointer lost) the newest complete checkpoint."""
        pointer = self.results_folder / LATEST
        if pointer.is_file():
            target = self.results_folder / pointer.read_text(encoding="utf-8").strip()
            if (target / "state.pt").is_file():
                return target
            logger.warning("%s points to %s, which is incomplete; looking for another checkpoint", pointer, target)
        complete = [
            path
            for path in self.results_folder.glob(f"{CHECKPOINT_PREFIX}*")
            if path.is_dir() and (path / "state.pt").is_file()
        ]
        if not complete:
            return None
        return max(complete, key=lambda path: (path / "state.pt").stat().st_mtime_ns)

    def _rng_state(self) -> dict[str, Any]:
        keys, pos, has_gauss, cached = np.random.get_state()[1:]
        version, internal, gauss_next = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            },
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        }

    @staticmethod
    def _set_rng_state(state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        numpy_state = state["numpy"]
        np.random.set_state(
            (
                "MT19937",
                numpy_state["keys"].numpy().astype(np.uint32),
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )
        python_state = state["python"]
        random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))

    def _state_dicts(self) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
        """Model, EMA and optimizer state as full (unsharded) tensors on this rank; under
        FSDP a collective call that leaves them on rank 0 only (empty elsewhere)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        sharded = self.parallel == "fsdp"
        options = StateDictOptions(full_state_dict=sharded, cpu_offload=sharded)
        if sharded:
            model_state = get_model_state_dict(self.model, options=options)
            ema_state = get_model_state_dict(self.ema_model, options=options)
        else:
            model_state, ema_state = self.model.state_dict(), self.ema_model.state_dict()
        # Keyed by parameter name, the same for sharded and plain models.
        optimizer_state = get_optimizer_state_dict(self.model, self.opt, options=options)
        return model_state, ema_state, optimizer_state

    def save(self, milestone: int | str) -> Path:
        """Write checkpoint `milestone` (see the module docstring) and point `latest` at it.

        Under torchrun every rank calls this (FSDP gathers the shards); rank 0 writes. A
        failed write (disk full, folder not writable) raises `CheckpointWriteError` (an
        `OSError`) on rank 0 and `distributed.RemoteError` on the others; the previous
        checkpoint and `latest` are left as they were."""
        name = _milestone_name(milestone)
        target = self.checkpoint_dir(name)
        model_state, ema_state, optimizer_state = self._state_dicts()
        error = None
        if self.is_main:
            try:
                self._write_checkpoint(target, name, model_state, ema_state, optimizer_state)
            except ckpt.CheckpointWriteError as err:
                previous = self.latest_checkpoint()
                kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
                error = ckpt.CheckpointWriteError(f"{err}; {kept}", errno=err.errno, path=err.filename)
            except Exception as err:  # handed to the other ranks, then raised here
                error = err
        self._collective(distributed.broadcast_error, error)
        if self.is_main:
            logger.info("saved checkpoint %s at step %d", target, self.step)
        return target

    def _write_checkpoint(
        self,
        target: Path,
        name: str,
        model_state: Mapping[str, Tensor],
        ema_state: Mapping[str, Tensor],
        optimizer_state: Mapping[str, Any],
    ) -> None:
        # Debris of writes a kill interrupted: this process is the folder's only writer.
        for stale in self.results_folder.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in self.results_folder.glob(f".{LATEST}.*.tmp"):
            stale.unlink(missing_ok=True)
        staging = self.results_folder / f".{target.name}.tmp-{os.getpid()}"
        try:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        except OSError as err:
            raise ckpt.CheckpointWriteError.from_os_error(err, f"cannot create {staging}") from err
        try:
            ckpt.save_tensors(model_state, staging / "model.safetensors", metadata={"step": str(self.step)})
            ckpt.save_tensors(ema_state, staging / "ema.safetensors", metadata={"step": str(self.step)})
            state = {
                "version": STATE_VERSION,
                "step": self.step,
                "milestone": name,
                "seed": self.seed,
                "world_size": self.world_size,
                "parallel": self.parallel,
                "data": {"length": len(self.ds), "shuffle": self.shuffle, "batch_size": self.batch_size},
                "optimizer": optimizer_state,
                "scheduler": {
                    "base_lrs": list(self.base_lrs),
                    "lr_schedule": self.lr_schedule,
                    "warmup_steps": self.warmup_steps,
                    "train_num_steps": self.train_num_steps,
                    "min_lr_ratio": self.min_lr_ratio,
                },
                "scaler": self.scaler.state_dict(),
                "rng": self._rng_state(),
            }
            ckpt.save_state(state, staging / "state.pt")
            # Swap the finished folder into place. A folder cannot be renamed over a non-empty
            # one, so an existing checkpoint of the same name is moved aside first.
            retired = None
            try:
                if target.exists():
                    retired = self.results_folder / f".{target.name}.old-{os.getpid()}"
                    if retired.exists():
                        shutil.rmtree(retired)
                    os.replace(target, retired)
                os.replace(staging, target)
            except OSError as err:
                if retired is not None and not target.exists():
                    os.replace(retired, target)  # put the old one back
                raise ckpt.CheckpointWriteError.from_os_error(err, f"cannot move {staging} to {target}") from err
            ckpt.atomic_write_text(self.results_folder / LATEST, target.name + "\n")
            if retired is not None:
                shutil.rmtree(retired, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def load(self, milestone: int | str = LATEST, **load_kwargs: Any) -> None:
        """Restore checkpoint `milestone` ('latest' or -1 for the newest). Extra keywords go to
        `load_state_dict` (e.g. `strict=False`). Under torchrun every rank reads the files
        (a shared results folder); a checkpoint written by any number of processes loads."""
        if milestone in (LATEST, -1):
            folder = self.latest_checkpoint()
            if folder is None:
                raise FileNotFoundError(f"no checkpoint in {self.results_folder} to load")
        else:
            folder = self.checkpoint_dir(milestone)
            if not (folder / "state.pt").is_file():
                available = sorted(p.name for p in self.results_folder.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
                raise FileNotFoundError(f"no complete checkpoint at {folder}; found {available}")
        state = ckpt.load_state(folder / "state.pt")
        if state.get("version") not in READABLE_STATE_VERSIONS:
            raise ValueError(
                f"{folder} has checkpoint version {state.get('version')}, this Trainer reads {READABLE_STATE_VERSIONS}"
            )
        sharded = self.parallel == "fsdp"
        device = "cpu" if sharded else self.device
        model_state = ckpt.load_tensors(folder / "model.safetensors", device=device)
        ema_state = ckpt.load_tensors(folder / "ema.safetensors", device=device)
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            options = StateDictOptions(full_state_dict=True, strict=load_kwargs.get("strict", True))
            set_model_state_dict(self.model, model_state, options=options)
            set_model_state_dict(self.ema_model, ema_state, options=options)
        else:
            self.model.load_state_dict(model_state, **load_kwargs)
            self.ema_model.load_state_dict(ema_state, **load_kwargs)
        if state["version"] == 1:
            self.opt.load_state_dict(state["optimizer"])
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(
                self.model, self.opt, state["optimizer"], options=StateDictOptions(full_state_dict=sharded)
            )
        self.base_lrs = list(state["scheduler"]["base_lrs"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self._set_rng_state(state["rng"])
        self.step = int(state["step"])
        if state["seed"] != self.seed:
            logger.warning("checkpoint was trained with seed %d, not %d: continuing with its seed", state["seed"], self.seed)
            self.seed = int(state["seed"])
        data = state["data"]
        if data["length"] != len(self.ds) or data["batch_size"] != self.batch_size:
            logger.warning(
                "data differs from the checkpoint's (%d items, batch %d; now %d, %d): the data order will not "
                "continue the interrupted run's",
                data["length"],
                data["batch_size"],
                len(self.ds),
                self.batch_size,
            )
        if state.get("world_size", 1) != self.world_size:
            logger.info("checkpoint written by %d process(es), resumed by %d", state.get("world_size", 1), self.world_size)
        if self.is_main:
            self._truncate_metrics(self.step)
        logger.info("loaded checkpoint %s (step %d)", folder, self.step)

    # --- metrics -----------------------------------------------------------------------

    def _truncate_metrics(self, step: int) -> None:
        """Keep metrics of steps before `step` only (a resumed run rewrites the rest)."""
        self.history = []
        if not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if record.get("step", step) < step:
                kept.append(line)
                self.history.append((record["step"], record["loss"]))
        ckpt.atomic_write_text(self.metrics_path, "".join(f"{line}\n" for line in kept))

    def _log_metrics(self, record: Mapping[str, Any]) -> None:
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as err:
            raise ckpt.CheckpointWriteError.from_os_error(err, f"cannot append to {self.metrics_path}") from err

    # --- one step ----------------------------------------------------------------------

    def _batches(self) -> Iterator[dict[str, Any]]:
        start = self.step * self.gradient_accumulate_every * self.batch_size
        sampler = StepOrderSampler(
            len(self.ds),
            seed=self.seed,
            start=start,
            shuffle=self.shuffle,
            global_batch=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
        )
        loader = DataLoader(
            self.ds,
            batch_size=self.local_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        return iter(loader)

    def _conditioning(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if "cond" in batch:
            out = {"cond": batch["cond"].to(self.device)}
            if "cond_mask" in batch:
                out["cond_mask"] = batch["cond_mask"].to(self.device)
            return out
        if self.condition_on_captions:
            if "caption" not in batch:
                raise ValueError("condition_on_captions=True but the data set's items carry no captions")
            return {"cond": list(batch["caption"])}
        return {}

    def _local_rows(self) -> slice:
        """This rank's rows of a global micro-batch."""
        first = self.rank * self.local_batch_size
        return slice(first, first + self.local_batch_size)

    def _image_batch(self, videos: Tensor, generator: torch.Generator) -> Tensor:
        """One random frame per video, as images `(B, C, H, W)`. The frames are drawn for
        the whole global micro-batch and this rank keeps its rows."""
        b, _, f = videos.shape[:3]
        frame = torch.randint(0, f, (self.batch_size,), generator=generator)[self._local_rows()].to(videos.device)
        return videos[torch.arange(b, device=videos.device), :, frame]

    def _mixed_batch(self, videos: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
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
        rows = self._local_rows()
        here = (chosen >= rows.start) & (chosen < rows.stop)
        if not bool(here.any()):
            return videos, enable_time.to(videos.device)
        local, frames = chosen[here] - rows.start, frames[here]
        videos = videos.clone()
        index = local.to(videos.device)
        videos[index] = videos[index[:, None], :, frames.to(videos.device)].transpose(1, 2)
        enable_time[local] = False
        return videos, enable_time.to(videos.device)

    def _sample_randomness(self, step: int, micro: int, shape: torch.Size) -> dict[str, Tensor]:
        """Diffusion timesteps and noise for this rank's rows, each sample's drawn from a
        generator seeded by its index in the global micro-batch (not by the rank)."""
        if not self._fixed_randomness:
            return {}
        first = self._local_rows().start
        times, noise = [], []
        for row in range(shape[0]):
            generator = torch.Generator(device=self.device)
            generator.manual_seed(_derive_seed(self.seed, step, f"sample-{micro}-{first + row}"))
            times.append(torch.randint(0, self.model.num_timesteps, (1,), generator=generator, device=self.device))
            noise.append(torch.randn(tuple(shape[1:]), generator=generator, device=self.device))
        return {"times": torch.cat(times), "noise": torch.stack(noise)}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _non_finite(self, what: str, step: int, where: str = "") -> NonFiniteLossError:
        self.opt.zero_grad(set_to_none=True)
        return NonFiniteLossError(
            f"{what} at step {step}{where}: training stopped without saving this state; "
            f"the last good checkpoint is {self.latest_checkpoint()}"
        )

    def _train_step(self, batches: Iterator[dict[str, Any]], train_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        step = self.step
        seed_step(self.seed, step, self.rank)
        image_phase = step < self.image_phase_steps
        parallel = self.world_size > 1
        total = 0.0
        for micro in range(self.gradient_accumulate_every):
            batch = next(batches)
            videos = batch["video"].to(self.device, non_blocking=True)
            kwargs: dict[str, Any] = dict(self._conditioning(batch))
            generator = torch.Generator().manual_seed(_derive_seed(self.seed, step, f"images-{micro}"))
            if image_phase:
                videos = self._image_batch(videos, generator)
                kwargs["enable_time"] = False
            else:
                kwargs.update(train_kwargs)
                if self.image_ratio > 0:
                    videos, kwargs["enable_time"] = self._mixed_batch(videos, generator)
            kwargs.update(self._sample_randomness(step, micro, videos.shape))
            # Gradients are all-reduced (DDP) or reduce-scattered (FSDP) once, after the
            # last micro-batch; the others only accumulate locally.
            last = micro == self.gradient_accumulate_every - 1
            with distributed.gradient_sync(self.train_model, last):
                with self._autocast():
                    loss = self.train_model(videos, **kwargs)
                # One rank alone must not raise here: the others would wait for its
                # gradients. Distributed runs check the all-reduced loss below instead.
                if not parallel and not torch.isfinite(loss):
                    raise self._non_finite(f"loss is {loss.item()}", step, f" (micro-batch {micro})")
                self.scaler.scale(loss / self.gradient_accumulate_every).backward()
            total += loss.item() / self.gradient_accumulate_every
        if parallel:
            (summed,) = self._collective(distributed.all_reduce_sum, [total])
            total = summed / self.world_size
            if not math.isfinite(total):
                raise self._non_finite(f"loss is {total}", step, " (on at least one rank)")

        self.scaler.unscale_(self.opt)
        params = [p for group in self.opt.param_groups for p in group["params"]]
        limit = self.max_grad_norm if self.max_grad_norm is not None else float("inf")
        grad_norm = float(distributed.full_value(nn.utils.clip_grad_norm_(params, limit)))
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            # With fp16 loss scaling an overflow is expected and the scaler skips the step.
            raise self._non_finite(f"gradient norm is {grad_norm}", step)
        # The learning rate is a pure function of the step (no scheduler object whose
        # state could drift from the step counter on resume).
        factor = self._lr_factor(step)
        for group, base in zip(self.opt.param_groups, self.base_lrs):
            group["lr"] = base * factor
        lr = self.opt.param_groups[0]["lr"]
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.model, step)
        return {"step": step, "loss": total, "lr": lr, "grad_norm": grad_norm, "phase": "image" if image_phase else "video"}

    # --- samples -----------------------------------------------------------------------

    def _sample_conditions(self, count: int) -> tuple[list[str] | None, dict[str, Tensor] | None]:
        if self.condition_on_captions:
            captions = self.sample_captions or self._dataset_captions(count) or [""]
            return [captions[i % len(captions)] for i in range(count)], None
        if self.sample_captions is not None:
            logger.warning("sample_captions ignored: this run does not condition on captions")
        first = self.ds[0]
        if isinstance(first, Mapping) and "cond" in first or isinstance(first, (tuple, list)) and not isinstance(first[1], str):
            items = [self.ds[i % len(self.ds)] for i in range(count)]
            batch = collate(items)
            conds = {"cond": batch["cond"].to(self.device)}
            if "cond_mask" in batch:
                conds["cond_mask"] = batch["cond_mask"].to(self.device)
            return None, conds
        return None, None

    @torch.no_grad()
    def sample_and_save(self, milestone: int | str) -> Path:
        """Sample a `num_sample_rows`^2 grid from the EMA model and write it as GIF (and MP4
        with the video extra), with the captions in a `.txt` beside it. Under torchrun every
        rank calls this and rank 0 samples; the path is returned on every rank."""
        from diffusion import media

        gif = self.results_folder / f"{milestone}.gif"
        model = self._ema_for_sampling()
        if model is None:
            return gif
        try:
            self._sample_grid(model, gif, media)
        finally:
            if self._sampling_model is not None:
                self._sampling_model.to("cpu")
        return gif

    def _ema_for_sampling(self) -> nn.Module | None:
        """The EMA model to sample from on this rank, or None where no samples are drawn.
        Under FSDP, gathers the EMA shards (a collective call) into rank 0's unsharded copy."""
        if self.parallel != "fsdp":
            return self.ema_model if self.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.ema_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        assert self._sampling_model is not None, "rank 0 keeps an unsharded copy under FSDP"
        self._sampling_model.load_state_dict(state)
        return self._sampling_model.to(self.device).eval()

    def _sample_grid(self, model: nn.Module, gif: Path, media: Any) -> None:
        count = self.num_sample_rows**2
        captions, conds = self._sample_conditions(count)
        generator = torch.Generator().manual_seed(_derive_seed(self.seed, 0, "samples"))
        videos = []
        for start in range(0, count, self.batch_size):
            n = min(self.batch_size, count - start)
            kwargs: dict[str, Any] = {"batch_size": n, "generator": generator, **self.sample_kwargs}
            if captions is not None:
                kwargs.update(cond=captions[start : start + n], cond_scale=self.cond_scale)
            elif conds is not None:
                kwargs.update({k: v[start : start + n] for k, v in conds.items()}, cond_scale=self.cond_scale)
            # Sampling runs in bf16 only on GPUs: CPUs without bf16 matrix units are slower in
            # bf16 than in fp32, and samples need no gradients whose memory bf16 would halve.
            autocast = self._autocast() if self.device.type == "cuda" else contextlib.nullcontext()
            with autocast:
                videos.append(model.sample(**kwargs).float().clamp(0.0, 1.0).cpu())
        grid = torch.cat(videos)
        media.write_sample_grid(grid, gif, nrow=self.num_sample_rows, fps=self.fps)
        if captions is not None:
            ckpt.atomic_write_text(gif.with_suffix(".txt"), "".join(f"{c}\n" for c in captions))
        if self.write_mp4:
            try:
                media.write_sample_grid(grid, gif.with_suffix(".mp4"), nrow=self.num_sample_rows, fps=self.fps)
            except ImportError as err:
                if not self._warned_mp4:
                    logger.info("no MP4 samples (%s); GIFs are written", err)
                    self._warned_mp4 = True
        if self.history:
            media.plot_loss(self.history, self.results_folder / "loss.png", smoothing=min(50, max(2, len(self.history) // 20)))

    # --- the loop ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _deferred_sigint(self) -> Iterator[None]:
        """First Ctrl-C: finish the current step, save, return. Second: stop at once.

        Under torchrun SIGTERM is handled the same way: torchrun (and schedulers such as
        Slurm on pre-emption) stop workers with SIGTERM before they SIGKILL them."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._interrupt_requested:
                self._hard_interrupt = True
                raise KeyboardInterrupt
            self._interrupt_requested = True
            logger.warning("interrupt: finishing step %d, then saving (Ctrl-C again to stop at once)", self.step)

        signals = [signal.SIGINT] + ([signal.SIGTERM] if self.world_size > 1 else [])
        previous = {number: signal.signal(number, handler) for number in signals}
        try:
            yield
        finally:
            for number, old in previous.items():
                signal.signal(number, old)

    def _progress_bar(self) -> Any:
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        if not show or not self.is_main:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError as err:
            if self.progress:
                raise ImportError("progress=True needs tqdm: pip install 'spacetime-video[train]'") from err
            return None
        return tqdm(total=self.train_num_steps, initial=self.step, desc="training", dynamic_ncols=True)

    def _agree_on_control(self) -> None:
        """Make every rank see the same stop request and step budget before a step: any
        rank's interrupt counts, and rank 0's `train_num_steps` (which a time budget in
        `log_fn` may lower) is everyone's. One tiny all-reduce per step."""
        if self.world_size == 1:
            return
        interrupt, steps = self._collective(
            distributed.all_reduce_sum,
            [float(self._interrupt_requested), float(self.train_num_steps) if self.is_main else 0.0],
        )
        self._interrupt_requested = interrupt > 0
        self.train_num_steps = int(steps)

    def _interrupt_save(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.interrupted = True
        path = self.save(f"step-{self.step}")
        logger.warning("training interrupted at step %d; saved %s (resume with resume=True)", self.step, path)

    def train(
        self,
        prob_focus_present: Number = 0.0,
        focus_present_mask: Tensor | None = None,
        log_fn: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """Train until `train_num_steps`. Ctrl-C saves a checkpoint and returns; a NaN or
        infinite loss raises `NonFiniteLossError` without saving."""
        if log_fn is not None and not callable(log_fn):
            raise TypeError(f"log_fn must be callable, got {type(log_fn).__name__}")
        train_kwargs: dict[str, Any] = {}
        if prob_focus_present:
            train_kwargs["prob_focus_present"] = prob_focus_present
        if focus_present_mask is not None:
            train_kwargs["focus_present_mask"] = focus_present_mask.to(self.device)
        self.model.train()
        self.interrupted = False
        self._interrupt_requested = False
        self._hard_interrupt = False
        bar = self._progress_bar()
        batches = self._batches()
        last = time.perf_counter()
        try:
            with self._deferred_sigint():
                while True:
                    self._agree_on_control()
                    if self.step >= self.train_num_steps:
                        break
                    if self._interrupt_requested:
                        self._interrupt_save()
                        return
                    record = self._train_step(batches, train_kwargs)
                    now = time.perf_counter()
                    record["it_per_s"] = 1.0 / max(now - last, 1e-9)
                    last = now
                    self.history.append((record["step"], record["loss"]))
                    if record["step"] % self.log_every == 0 and self.is_main:
                        self._log_metrics(record)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                    self.step += 1
                    if self.step % self.save_and_sample_every == 0:
                        milestone = self.step // self.save_and_sample_every
                        record["sample"] = str(self.sample_and_save(milestone))
                        self.save(milestone)
                        self.model.train()
                    logger.debug("step %d: loss %.5f", record["step"], record["loss"])
                    if log_fn is not None:
                        log_fn(record)
                if self._interrupt_requested:
                    self._interrupt_save()
                    return
        except KeyboardInterrupt:
            if self._hard_interrupt or self.world_size > 1:
                # Under torchrun the other ranks cannot be told to join a save from here.
                # A second Ctrl-C may land inside the optimizer update: that state is torn,
                # so nothing is saved and the last checkpoint stays the one to resume from.
                logger.warning("stopped at once during step %d; nothing saved", self.step)
                raise
            # Raised by user code (a data set, log_fn): the step in flight is dropped and
            # the weights are those of the last completed step.
            self._interrupt_save()
            return
        finally:
            if bar is not None:
                bar.close()
        logger.info("training completed at step %d", self.step)
