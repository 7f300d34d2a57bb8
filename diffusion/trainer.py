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
from diffusion.ema import EMA

logger = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "cosine", "linear")
CHECKPOINT_PREFIX = "checkpoint-"
LATEST = "latest"
STATE_VERSION = 1

Number = float | int


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss or gradient norm."""


def _derive_seed(seed: int, step: int, purpose: str) -> int:
    # A hash, not `seed + step`, so runs with neighbouring seeds do not share streams.
    digest = hashlib.sha256(f"{seed}:{step}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seed_step(seed: int, step: int) -> None:
    """Seed every global generator from `(seed, step)` alone."""
    value = _derive_seed(seed, step, "step")
    torch.manual_seed(value)  # CPU and every CUDA device
    random.seed(value)
    np.random.seed(value % (1 << 32))


# ---------------------------------------------------------------------------------------
# data


class StepOrderSampler(Sampler[int]):
    """Infinite stream of data indices; position `p` is a pure function of `(seed, p)`.

    Epoch `e = p // N` visits a permutation drawn from a generator seeded by `(seed, e)`, so
    the stream can be restarted at any position (a resumed step) without replaying it."""

    def __init__(self, length: int, *, seed: int, start: int = 0, shuffle: bool = True):
        if length < 1:
            raise ValueError(f"the data set is empty: need at least 1 item, got {length}")
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
        position = self.start
        while True:
            yield self.index(position)
            position += 1


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

        if device is None:
            first = next(diffusion_model.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
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
        self.results_folder.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.results_folder / "metrics.jsonl"

        self.ema = EMA(self.model, beta=ema_decay, update_every=update_ema_every, start_step=step_start_ema)
        self.ema_model = self.ema.ema_model

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
        if compile:
            # The denoiser, not the whole process: the diffusion wrapper's input checks, string
            # conditions and host-side branches would only break the graph. `Module.compile`
            # compiles in place, so parameter names (and checkpoints) stay as they are.
            self.model.denoise_fn.compile()

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

    # --- set-up helpers ----------------------------------------------------------------

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
        for model in (self.model, self.ema_model):
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

    def save(self, milestone: int | str) -> Path:
        """Write checkpoint `milestone` (see the module docstring) and point `latest` at it."""
        name = _milestone_name(milestone)
        target = self.checkpoint_dir(name)
        for stale in self.results_folder.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = self.results_folder / f".{target.name}.tmp-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        try:
            ckpt.save_tensors(self.model.state_dict(), staging / "model.safetensors", metadata={"step": str(self.step)})
            ckpt.save_tensors(self.ema_model.state_dict(), staging / "ema.safetensors", metadata={"step": str(self.step)})
            state = {
                "version": STATE_VERSION,
                "step": self.step,
                "milestone": name,
                "seed": self.seed,
                "data": {"length": len(self.ds), "shuffle": self.shuffle, "batch_size": self.batch_size},
                "optimizer": self.opt.state_dict(),
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
            if target.exists():
                retired = self.results_folder / f".{target.name}.old-{os.getpid()}"
                if retired.exists():
                    shutil.rmtree(retired)
                os.replace(target, retired)
            os.replace(staging, target)
            ckpt.atomic_write_text(self.results_folder / LATEST, target.name + "\n")
            if retired is not None:
                shutil.rmtree(retired, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("saved checkpoint %s at step %d", target, self.step)
        return target

    def load(self, milestone: int | str = LATEST, **load_kwargs: Any) -> None:
        """Restore checkpoint `milestone` ('latest' or -1 for the newest). Extra keywords go to
        `load_state_dict` (e.g. `strict=False`)."""
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
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{folder} has checkpoint version {state.get('version')}, this Trainer reads {STATE_VERSION}")
        self.model.load_state_dict(ckpt.load_tensors(folder / "model.safetensors", device=self.device), **load_kwargs)
        self.ema_model.load_state_dict(ckpt.load_tensors(folder / "ema.safetensors", device=self.device), **load_kwargs)
        self.opt.load_state_dict(state["optimizer"])
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
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    # --- one step ----------------------------------------------------------------------

    def _batches(self) -> Iterator[dict[str, Any]]:
        start = self.step * self.gradient_accumulate_every * self.batch_size
        sampler = StepOrderSampler(len(self.ds), seed=self.seed, start=start, shuffle=self.shuffle)
        loader = DataLoader(
            self.ds,
            batch_size=self.batch_size,
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

    def _image_batch(self, videos: Tensor, generator: torch.Generator) -> Tensor:
        """One random frame per video, as images `(B, C, H, W)`."""
        b, _, f = videos.shape[:3]
        frame = torch.randint(0, f, (b,), generator=generator).to(videos.device)
        return videos[torch.arange(b, device=videos.device), :, frame]

    def _mixed_batch(self, videos: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Replace `round(image_ratio * B)` videos by frames drawn independently (with
        replacement) from the same video, and disable time for them.

        Frames come from the sample's own video so that its caption still describes them;
        with time disabled the network sees them as unrelated images."""
        b, _, f = videos.shape[:3]
        count = int(round(self.image_ratio * b))
        enable_time = torch.ones(b, dtype=torch.bool)
        if count == 0:
            return videos, enable_time.to(videos.device)
        chosen = torch.randperm(b, generator=generator)[:count]
        frames = torch.randint(0, f, (count, f), generator=generator)
        videos = videos.clone()
        rows = chosen.to(videos.device)
        videos[rows] = videos[rows[:, None], :, frames.to(videos.device)].transpose(1, 2)
        enable_time[chosen] = False
        return videos, enable_time.to(videos.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _train_step(self, batches: Iterator[dict[str, Any]], train_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        step = self.step
        seed_step(self.seed, step)
        generator = torch.Generator().manual_seed(_derive_seed(self.seed, step, "images"))
        image_phase = step < self.image_phase_steps
        total = 0.0
        for micro in range(self.gradient_accumulate_every):
            batch = next(batches)
            videos = batch["video"].to(self.device, non_blocking=True)
            kwargs: dict[str, Any] = dict(self._conditioning(batch))
            if image_phase:
                videos = self._image_batch(videos, generator)
                kwargs["enable_time"] = False
            else:
                kwargs.update(train_kwargs)
                if self.image_ratio > 0:
                    videos, kwargs["enable_time"] = self._mixed_batch(videos, generator)
            with self._autocast():
                loss = self.model(videos, **kwargs)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss is {loss.item()} at step {step} (micro-batch {micro}): training stopped without "
                    f"saving this state; the last good checkpoint is {self.latest_checkpoint()}"
                )
            self.scaler.scale(loss / self.gradient_accumulate_every).backward()
            total += loss.item() / self.gradient_accumulate_every

        self.scaler.unscale_(self.opt)
        params = [p for group in self.opt.param_groups for p in group["params"]]
        limit = self.max_grad_norm if self.max_grad_norm is not None else float("inf")
        grad_norm = float(nn.utils.clip_grad_norm_(params, limit))
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            # With fp16 loss scaling an overflow is expected and the scaler skips the step.
            raise NonFiniteLossError(
                f"gradient norm is {grad_norm} at step {step}: training stopped without saving this state; "
                f"the last good checkpoint is {self.latest_checkpoint()}"
            )
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
        with the video extra), with the captions in a `.txt` beside it."""
        from diffusion import media

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
                videos.append(self.ema_model.sample(**kwargs).float().clamp(0.0, 1.0).cpu())
        grid = torch.cat(videos)
        gif = self.results_folder / f"{milestone}.gif"
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
        return gif

    # --- the loop ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _deferred_sigint(self) -> Iterator[None]:
        """First Ctrl-C: finish the current step, save, return. Second: stop at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._interrupt_requested:
                self._hard_interrupt = True
                raise KeyboardInterrupt
            self._interrupt_requested = True
            logger.warning("interrupt: finishing step %d, then saving (Ctrl-C again to stop at once)", self.step)

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _progress_bar(self) -> Any:
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        if not show:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError as err:
            if self.progress:
                raise ImportError("progress=True needs tqdm: pip install 'spacetime-video[train]'") from err
            return None
        return tqdm(total=self.train_num_steps, initial=self.step, desc="training", dynamic_ncols=True)

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
                while self.step < self.train_num_steps:
                    if self._interrupt_requested:
                        self._interrupt_save()
                        return
                    record = self._train_step(batches, train_kwargs)
                    now = time.perf_counter()
                    record["it_per_s"] = 1.0 / max(now - last, 1e-9)
                    last = now
                    self.history.append((record["step"], record["loss"]))
                    if record["step"] % self.log_every == 0:
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
            if self._hard_interrupt:
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
