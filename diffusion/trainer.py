"""Trainer: video-diffusion-pytorch's training loop, made resumable and safe to interrupt.

Takes video-diffusion-pytorch's `Trainer` arguments and adds any `Dataset` in place of a
folder, AdamW with warm-up and decay, gradient clipping, bf16 autocast, `torch.compile`,
caption conditioning, guided sample grids, image-then-video training, a wall-clock budget
and data parallelism. This file is the loop; its parts are modules of their own
(torchtitan's `train.py` with its `components/` is the model):
- `diffusion.batches`: data order and collation, a pure function of `(seed, step)`;
- `diffusion.checkpoint.CheckpointManager`: layout, atomic writes, `latest`, validated reads;
- `diffusion.budget`: the learning-rate curve and the time budget;
- `diffusion.samples`: sample grids; `diffusion.metrics`: `metrics.jsonl` and the loss plot;
- `diffusion.interrupts`: Ctrl-C / SIGTERM finish the step, save and return;
- `diffusion.distributed`: process group, DDP / FSDP2, full state for checkpoints.

A run resumed at step k reproduces the losses and weights of an uninterrupted one exactly
(on CPU; CUDA kernels may be nondeterministic). Under `torchrun --nproc_per_node=N` the model
is wrapped in DDP (`parallel="auto"` / `"ddp"`) or sharded with FSDP2 (`"fsdp"`);
`train_batch_size` stays the global batch, so N processes follow the trajectory of one and a
checkpoint resumes under any N. Rank 0 alone writes files; every stop (Ctrl-C, SIGTERM, the
time budget) is agreed on by all ranks before each step, so they stop, and save, together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from diffusion import checkpoint as ckpt
from diffusion import distributed, fused_step
from diffusion.batches import StepBatches, StepOrderSampler, fixed_randomness_steps, seed_step  # noqa: F401
from diffusion.budget import LR_SCHEDULES, TimeBudget, lr_factor
from diffusion.config import TrainerConfig, check_sample_kwargs
from diffusion.data import folder_dataset
from diffusion.ema import EMA
from diffusion.frame_masks import grid_frame_rate, training_frame_inputs
from diffusion.interrupts import DeferredInterrupt, progress_bar
from diffusion.metrics import MetricsLog
from diffusion.samples import SampleGrid, conditions_on_captions, sampling_model

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX, LATEST = ckpt.CHECKPOINT_PREFIX, ckpt.LATEST

Number = float | int


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss or gradient norm."""


def _autocast_dtype(device: torch.device) -> torch.dtype:
    """bf16 wherever it is supported (no loss scaling needed); fp16 only on older GPUs."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _config_types(options: dict[str, Any]) -> dict[str, Any]:
    """`options` in the types `TrainerConfig` declares where Python code passes another as a
    matter of course (a path for a str, an int for a float, a tuple for a list, a Mapping
    for a dict); every other value is left for `TrainerConfig` to judge."""
    declared = {field.name: str(field.type) for field in dataclasses.fields(TrainerConfig)}
    casts = (("str", os.PathLike, os.fspath), ("float", int, float), ("list", tuple, list), ("dict", Mapping, dict))
    out = dict(options)
    for name, value in options.items():
        for kind, given, cast in casts:
            if declared.get(name, "").startswith(kind) and isinstance(value, given) and not isinstance(value, bool):
                out[name] = cast(value)
    return out


class Trainer:
    """Trains a `GaussianDiffusion` on a folder of videos or any `Dataset`.

    video-diffusion-pytorch's arguments keep their meaning and defaults: `folder` (videos,
    see `diffusion.data.VideoFolder`; None when `dataset` is given), `ema_decay`,
    `num_frames` (taken from the model; another value is ignored with a warning, as
    there), `train_batch_size`, `train_lr`, `train_num_steps`, `gradient_accumulate_every`,
    `amp`, `step_start_ema`, `update_ema_every`, `save_and_sample_every`, `results_folder`,
    `num_sample_rows` (a rows x rows grid), `max_grad_norm`; text2video-from-scratch's
    `save_model_every` (a checkpoint `checkpoint-step-<step>` every N steps, no grid; None = off).

    Every option but `diffusion_model, folder, dataset, device, resume, progress` is
    validated by `diffusion.config.TrainerConfig` and read from `self.config`. Further:
    dataset: a `Dataset` of tensors `(C, F, H, W)` in [0, 1], `(video, caption)` pairs or
        dicts with `video` (and `caption`, `cond`, `cond_mask`).
    warmup_steps, lr_schedule, min_lr_ratio, adam_betas, weight_decay: AdamW and its
        learning-rate curve; max_seconds: wall-clock budget of each `train()` call (0 =
        none), see `diffusion.budget` for how a decaying schedule meets it.
    amp: autocast to bf16 (CPU, and GPUs that support it), else fp16 with a GradScaler.
    compile: compile the denoiser in place (reproducible, but not step for step eager's).
    device: default, where the model's parameters are; seed, shuffle: `diffusion.batches`.
    condition_on_captions: None (default) conditions on captions when the diffusion model is
        conditional (`GaussianDiffusion.is_conditional`) and the data has captions. The model
        encodes them (each distinct caption once; `text_cache_dir` keeps them on disk too).
    cond_scale, sample_captions, sample_kwargs: for sample grids (`diffusion.samples`).
    image_phase_steps: the first N steps train on single frames (images, time disabled).
    frame_masks: known-frame training (`diffusion.frame_masks`): a `FrameMasks`, its fields
        as a mapping, or True for the defaults; each step shows every sample some of its own
        frames. Needs a U-Net with `frame_cond=True`. A U-Net with `frame_rate_cond=True` is
        also given the data set's `frame_rate` (`fps=`) every step and in its sample grids.
    image_ratio: afterwards, this fraction of each batch is frames drawn independently from
        their video with time disabled (Ho et al. 2022, "Video Diffusion Models", sec. 3).
    resume: continue from the run's latest checkpoint; a run whose checkpoint folders are
        all incomplete is an error (`checkpoint.IncompleteRunError`), not a fresh start.
    progress: tqdm bar (None: only when stderr is a terminal); log_every: metrics cadence.
    parallel, find_unused_parameters: under torchrun, see the module docstring; "none"
        trains independently on every process (rank 0 alone writes files).
    optimizer_in_backward: update each weight inside backward as soon as its gradient is
        complete and free that gradient (`diffusion.fused_step`): the same AdamW update and
        checkpoint format, without holding every gradient at once. Needs
        `gradient_accumulate_every=1`, `max_grad_norm=None`, one process and no fp16 loss
        scaling; `grad_norm` is still logged (unclipped).
    """

    def __init__(
        self, diffusion_model: nn.Module, folder: str | os.PathLike | None = None, *,
        ema_decay: Number = 0.995, num_frames: int | None = None, train_batch_size: int = 32,
        train_lr: Number = 1e-4, train_num_steps: int = 100000, gradient_accumulate_every: int = 2,
        amp: bool = False, step_start_ema: int = 2000, update_ema_every: int = 10,
        save_and_sample_every: int = 1000, results_folder: str | os.PathLike = "./results",
        num_sample_rows: int = 4, max_grad_norm: Number | None = None, dataset: Dataset | None = None,
        warmup_steps: int = 0, lr_schedule: str = "constant", min_lr_ratio: Number = 0.0,
        adam_betas: tuple[Number, Number] = (0.9, 0.99), weight_decay: Number = 0.0, compile: bool = False,
        device: torch.device | str | None = None, seed: int = 0, shuffle: bool = True, num_workers: int = 0,
        condition_on_captions: bool | None = None, text_cache_dir: str | os.PathLike | None = None,
        cond_scale: Number = 1.0, sample_captions: Sequence[str] | None = None,
        sample_kwargs: Mapping[str, Any] | None = None, image_phase_steps: int = 0, image_ratio: Number = 0.0,
        resume: bool = False, progress: bool | None = None, log_every: int = 1, write_mp4: bool = True,
        fps: Number = 8.0, parallel: str = "auto", find_unused_parameters: bool = True,
        max_seconds: Number = 0.0, save_model_every: int | None = None, trainable: str = "auto",
        latent_cache_dir: str | os.PathLike | None = None, frame_masks: Any = None,
        optimizer_in_backward: bool = False,
    ):
        options = {name: value for name, value in locals().items()
                   if name not in ("self", "diffusion_model", "folder", "dataset", "device", "resume", "progress")}
        self.config = config = TrainerConfig(**_config_types(options))
        missing = [a for a in ("image_size", "num_frames", "channels", "sample") if not hasattr(diffusion_model, a)]
        if missing:
            raise TypeError(f"diffusion_model must be a GaussianDiffusion (with .{missing[0]}), "
                            f"got {type(diffusion_model).__name__}")
        if (folder is None) == (dataset is None):
            raise ValueError("give exactly one of `folder` (a folder of videos) and `dataset=` (any Dataset); got "
                             f"folder={folder!r} and dataset={type(dataset).__name__ if dataset is not None else None}")
        if num_frames is not None and num_frames != diffusion_model.num_frames:
            logger.warning("num_frames=%d ignored: the diffusion model trains on %d frames",
                           num_frames, diffusion_model.num_frames)
        if device is None and not distributed.launched_by_torchrun():
            first = next(diffusion_model.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.dist = distributed.setup(device)
        self.parallel = distributed.resolve_parallel(config.parallel, self.dist)
        self.world_size = self.dist.world_size if self.parallel != "none" else 1
        self.rank = self.dist.rank if self.parallel != "none" else 0
        if config.train_batch_size % self.world_size != 0:
            raise ValueError(
                f"train_batch_size is the global batch and must be divisible by the {self.world_size} processes, "
                f"got {config.train_batch_size}"
            )
        self.device = self.dist.device
        self.model = diffusion_model.to(self.device)
        if hasattr(self.model, "denoise_fn"):
            from diffusion.lora import select_trainable

            select_trainable(self.model.denoise_fn, config.trainable)
        self.ds = dataset if dataset is not None else folder_dataset(self.model, folder)
        if len(self.ds) == 0:
            raise ValueError("need at least 1 video to train on, the data set is empty")
        # Per-step inputs beyond the batch: drawn known-frame masks and the data's frame rate.
        self.frame_inputs = training_frame_inputs(self.model, self.ds, config.frame_masks)

        self.batch_size = config.train_batch_size
        self.local_batch_size = self.batch_size // self.world_size
        self.seed = config.seed
        self.train_num_steps = config.train_num_steps
        self.progress = progress
        self.results_folder = Path(config.results_folder)
        self.checkpoints = ckpt.CheckpointManager(self.results_folder)
        self.metrics = MetricsLog(self.results_folder)
        self._on_main(self.checkpoints.check_writable)

        self.ema = EMA(self.model, beta=config.ema_decay, update_every=config.update_ema_every,
                       start_step=config.step_start_ema)
        self.ema_model = self.ema.ema_model
        if config.compile:
            # The denoiser, not the whole process: the diffusion wrapper's input checks and
            # host-side branches would only break the graph. In place, so names stay.
            self.model.denoise_fn.compile()
        # Under FSDP, samples come from an unsharded copy on rank 0 (`_sampling_model`).
        self.train_model, self._sampling_model = distributed.prepare_model(
            self.model, self.ema_model, self.parallel, self.dist, find_unused_parameters=config.find_unused_parameters)
        self.batches = StepBatches(
            self.ds, seed=self.seed, batch_size=self.batch_size, accumulate=config.gradient_accumulate_every,
            rank=self.rank, world_size=self.world_size, shuffle=config.shuffle, num_workers=config.num_workers,
            device=self.device, image_ratio=config.image_ratio,
            num_timesteps=fixed_randomness_steps(self.model, self.world_size))
        self.latent_cache = None
        if getattr(self.model, "vae", None) is not None:
            # Latent diffusion: batches are encoded once here (through the cache when there
            # is one) and the process trains on the latents (`forward(..., encoded=True)`).
            from diffusion.latent_cache import LatentCache

            vae, normalize = self.model.vae, self.model.normalize
            if config.latent_cache_dir is not None:
                self.latent_cache = cache = LatentCache(vae, config.latent_cache_dir)
                self.batches.encode = lambda videos: cache.encode(normalize(videos))
            else:
                self.batches.encode = lambda videos: vae.encode(normalize(videos))

        self.amp = config.amp
        self.amp_dtype = _autocast_dtype(self.device) if self.amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)
        # Built after sharding: FSDP replaces the parameters by sharded ones.
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        adamw = {"lr": config.train_lr, "betas": tuple(config.adam_betas), "weight_decay": config.weight_decay}
        if config.optimizer_in_backward:
            fused_step.check_trainer_support(loss_scaling=self.scaler.is_enabled(), world_size=self.world_size)
            self.opt = fused_step.fused_adamw(self.model, trainable, **adamw)
        else:
            self.opt = torch.optim.AdamW(trainable, **adamw)
        self.base_lrs = [group["lr"] for group in self.opt.param_groups]
        self.lr_horizon: int | None = None  # set by a time budget (diffusion.budget)

        self.condition_on_captions = conditions_on_captions(self.model, self.ds, config.condition_on_captions)
        if self.condition_on_captions and config.text_cache_dir is not None:
            if not hasattr(self.model, "use_text_cache"):
                raise TypeError(f"text_cache_dir needs a model that encodes captions (GaussianDiffusion), got "
                                f"{type(self.model).__name__}")
            self.model.use_text_cache(config.text_cache_dir)
        self.samples = SampleGrid(
            self.results_folder, self.ds, rows=config.num_sample_rows, batch_size=self.batch_size, seed=self.seed,
            conditional=self.condition_on_captions, captions=config.sample_captions, cond_scale=config.cond_scale,
            sample_kwargs=grid_frame_rate(self.frame_inputs, config.sample_kwargs), fps=config.fps, write_mp4=config.write_mp4, device=self.device,
            autocast=self._autocast,
        )
        if config.sample_kwargs:
            check_sample_kwargs("sample_kwargs", config.sample_kwargs, target=self.model.sample,
                                timesteps=getattr(self.model, "num_timesteps", None))

        self.step = 0
        self.interrupted = self.stopped_by_budget = False
        self.interrupt = DeferredInterrupt()
        if resume:
            if self.checkpoints.resumable() is not None:
                self.load(LATEST)
            else:
                logger.info("resume=True but no checkpoint in %s yet: starting from step 0", self.results_folder)
                if self.is_main:
                    # Metrics of a run killed before its first checkpoint describe steps
                    # that will now be trained again.
                    self.metrics.truncate(0)

    # --- set-up helpers ----------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and logs (rank 0, or the only one)."""
        return self.dist.is_main

    @property
    def history(self) -> list[tuple[int, float]]:
        """`(step, loss)` of every step trained or read back from `metrics.jsonl`."""
        return self.metrics.history

    @property
    def text_encoder(self) -> Any:
        """The diffusion model's caching text encoder when this run conditions on captions."""
        return getattr(self.model, "text_cache", None) if self.condition_on_captions else None

    def _collective(self, function: Callable[..., Any], *args: Any) -> Any:
        # A wrapper of "none" runs every process on its own: no collective calls then.
        context = self.dist if self.parallel != "none" else distributed.DistributedContext(device=self.device)
        return function(*args, context)

    def _on_main(self, function: Callable[[], Any]) -> None:
        """Run `function` on rank 0 alone; its error is raised there and, as a
        `distributed.RemoteError`, on every other rank, so none waits for a partner."""
        error = None
        if self.is_main:
            try:
                function()
            except Exception as err:
                error = err
        self._collective(distributed.broadcast_error, error)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _lr_factor(self, step: int) -> float:
        horizon = self.lr_horizon if self.lr_horizon is not None else self.train_num_steps
        return lr_factor(step, warmup_steps=self.config.warmup_steps, schedule=self.config.lr_schedule,
                         horizon=horizon, min_lr_ratio=self.config.min_lr_ratio)

    # --- checkpoints -------------------------------------------------------------------

    def checkpoint_dir(self, milestone: int | str) -> Path:
        return self.checkpoints.folder(milestone)

    def latest_checkpoint(self) -> Path | None:
        """The folder `latest` names or, if it cannot be used, the newest complete one."""
        return self.checkpoints.latest()

    def save(self, milestone: int | str) -> Path:
        """Write checkpoint `milestone` and point `latest` at it (`CheckpointManager`).

        Under torchrun every rank calls this (FSDP gathers the shards); rank 0 writes. A
        failed write (disk full, folder not writable) raises `CheckpointWriteError` (an
        `OSError`) on rank 0 and `distributed.RemoteError` on the others; the previous
        checkpoint and `latest` are left as they were."""
        target = self.checkpoint_dir(milestone)
        model_state, ema_state, optimizer_state = distributed.full_state_dicts(
            self.model, self.ema_model, self.opt, sharded=self.parallel == "fsdp")
        self._on_main(lambda: self.checkpoints.write(milestone, model_state=model_state, ema_state=ema_state,
                                                     state=self._state(milestone, optimizer_state)))
        if self.is_main:
            logger.info("saved checkpoint %s at step %d", target, self.step)
        return target

    def _state(self, milestone: int | str, optimizer_state: Mapping[str, Any]) -> dict[str, Any]:
        config = self.config
        return {
            "version": ckpt.STATE_VERSION, "step": self.step, "milestone": ckpt.milestone_name(milestone),
            "seed": self.seed, "world_size": self.world_size, "parallel": self.parallel,
            "data": {"length": len(self.ds), "shuffle": config.shuffle, "batch_size": self.batch_size},
            "optimizer": optimizer_state,
            "scheduler": {"base_lrs": list(self.base_lrs), "lr_schedule": config.lr_schedule,
                          "warmup_steps": config.warmup_steps, "train_num_steps": self.train_num_steps,
                          "min_lr_ratio": config.min_lr_ratio, "horizon": self.lr_horizon},
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.rng_state(),
        }

    def load(self, milestone: int | str = LATEST, **load_kwargs: Any) -> None:
        """Restore checkpoint `milestone` ('latest' or -1 for the newest). `strict=False`
        is passed to `load_state_dict`. Under torchrun every rank reads the files (a shared
        results folder); a checkpoint written by any number of processes loads. A file that
        is damaged or does not fit this model raises a `ValueError` naming it."""
        state = self.checkpoints.restore(
            self.checkpoints.find(milestone), model=self.model, ema_model=self.ema_model, optimizer=self.opt,
            scaler=self.scaler, sharded=self.parallel == "fsdp", device=self.device,
            strict=load_kwargs.get("strict", True),
            now={"seed": self.seed, "length": len(self.ds), "batch_size": self.batch_size,
                 "world_size": self.world_size})
        self.base_lrs = list(state["scheduler"]["base_lrs"])
        self.lr_horizon = state["scheduler"].get("horizon")
        self.step = int(state["step"])
        # The data order and sample noise continue the checkpoint's seed.
        self.seed = self.batches.seed = self.samples.seed = int(state["seed"])
        if self.is_main:
            self.metrics.truncate(self.step)
        logger.info("loaded checkpoint %s (step %d)", state["folder"], self.step)

    # --- one step ----------------------------------------------------------------------

    def _non_finite(self, what: str, step: int, where: str = "") -> NonFiniteLossError:
        self.opt.zero_grad(set_to_none=True)
        last = self.latest_checkpoint()
        return NonFiniteLossError(f"{what} at step {step}{where}: training stopped without saving this state; "
                                  + (f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"))

    def _train_step(self, batches: Iterator[dict[str, Any]], train_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        step = self.step
        seed_step(self.seed, step, self.rank)
        image_phase = step < self.config.image_phase_steps
        # Set before backward: with optimizer_in_backward the updates happen inside it.
        factor = self._lr_factor(step)
        for group, base in zip(self.opt.param_groups, self.base_lrs):
            group["lr"] = base * factor
        lr = self.opt.param_groups[0]["lr"]
        in_backward = self.config.optimizer_in_backward
        with self.opt.backward_steps() if in_backward else contextlib.nullcontext():
            total = self._backward(batches, train_kwargs, step, image_phase)
        if self.world_size > 1:
            (summed,) = self._collective(distributed.all_reduce_sum, [total])
            total = summed / self.world_size
            if not math.isfinite(total):
                raise self._non_finite(f"loss is {total}", step, " (on at least one rank)")
        if in_backward:
            grad_norm = self._applied_in_backward(step)
        else:
            grad_norm = self._optimizer_step(step)
        self.ema.update(self.model, step)
        return {"step": step, "loss": total, "lr": lr, "grad_norm": grad_norm,
                "phase": "image" if image_phase else "video"}

    def _backward(self, batches: Iterator[dict[str, Any]], train_kwargs: Mapping[str, Any], step: int,
                  image_phase: bool) -> float:
        """Forward and backward of every micro-batch; the mean loss."""
        accumulate, parallel = self.config.gradient_accumulate_every, self.world_size > 1
        total = 0.0
        for micro in range(accumulate):
            videos, kwargs = self.batches.prepare(next(batches), step, micro, image_phase=image_phase,
                                                  captions=self.condition_on_captions, train_kwargs=train_kwargs)
            # Gradients are all-reduced (DDP) or reduce-scattered (FSDP) once, after the
            # last micro-batch; the others only accumulate locally.
            with distributed.gradient_sync(self.train_model, micro == accumulate - 1):
                with self._autocast():
                    loss = self.train_model(videos, **kwargs)
                # One rank alone must not raise here: the others would wait for its
                # gradients. Distributed runs check the all-reduced loss below instead.
                if not parallel and not torch.isfinite(loss):
                    raise self._non_finite(f"loss is {loss.item()}", step, f" (micro-batch {micro})")
                self.scaler.scale(loss / accumulate).backward()
            total += loss.item() / accumulate
        return total

    def _optimizer_step(self, step: int) -> float:
        """Clip, step, clear the gradients; the global gradient norm before clipping."""
        self.scaler.unscale_(self.opt)
        params = [p for group in self.opt.param_groups for p in group["params"]]
        limit = self.config.max_grad_norm if self.config.max_grad_norm is not None else float("inf")
        grad_norm = float(distributed.full_value(nn.utils.clip_grad_norm_(params, limit)))
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            # With fp16 loss scaling an overflow is expected and the scaler skips the step.
            raise self._non_finite(f"gradient norm is {grad_norm}", step)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        return grad_norm

    def _applied_in_backward(self, step: int) -> float:
        """After a backward that updated the weights (`diffusion.fused_step`): the global
        gradient norm, or the error when a gradient was not finite."""
        report = self.opt.report()
        if report.non_finite is not None or not math.isfinite(report.grad_norm):
            what = (f"gradient of {report.non_finite} is not finite" if report.non_finite is not None
                    else f"gradient norm is {report.grad_norm}")
            raise self._non_finite(what, step, f" (optimizer_in_backward: {report.updated} parameters were already "
                                               "updated in this step, the rest were not)")
        return report.grad_norm

    # --- samples -----------------------------------------------------------------------

    @torch.no_grad()
    def sample_and_save(self, milestone: int | str) -> Path:
        """Write a sample grid of the EMA model (`diffusion.samples`) and the loss plot. Under
        torchrun every rank calls this and rank 0 samples; every rank gets the GIF's path."""
        gif = self.results_folder / f"{milestone}.gif"
        model = sampling_model(self.ema_model, sharded=self.parallel == "fsdp", is_main=self.is_main,
                               unsharded_copy=self._sampling_model, device=self.device)
        if model is None:
            return gif
        try:
            self.samples.write(model, milestone)
            self.metrics.plot(self.results_folder / "loss.png")
        finally:
            if self._sampling_model is not None:
                self._sampling_model.to("cpu")
        return gif

    # --- the loop ----------------------------------------------------------------------

    def _agree_on_control(self, budget: TimeBudget) -> bool:
        """Whether to stop before the next step, the same on every rank: any rank's
        interrupt counts; rank 0's clock (the time budget and the schedule's horizon it
        fixes) and step target are everyone's. One tiny all-reduce per step."""
        stop = budget.should_stop(self.step) if self.is_main else False
        if self.world_size > 1:
            main = 1.0 if self.is_main else 0.0
            interrupt, stop_sum, horizon, steps = self._collective(distributed.all_reduce_sum, [
                float(self.interrupt.requested), float(stop), main * (budget.horizon or 0), main * self.train_num_steps])
            self.interrupt.requested = interrupt > 0
            stop = stop_sum > 0
            budget.horizon = int(horizon) or None
            self.train_num_steps = int(steps)
        self.lr_horizon = budget.horizon
        self.stopped_by_budget = stop and self.step < self.train_num_steps
        return stop or self.step >= self.train_num_steps

    def _interrupt_save(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.interrupted = True
        path = self.save(f"step-{self.step}")
        logger.warning("training interrupted at step %d; saved %s (resume with resume=True)", self.step, path)

    def train(self, prob_focus_present: Number = 0.0, focus_present_mask: Tensor | None = None,
              log_fn: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Train until `train_num_steps` (or the time budget). Ctrl-C saves a checkpoint and
        returns; a NaN or infinite loss raises `NonFiniteLossError` without saving. `log_fn`
        receives each step's record (read-only: the loop does not look at what it does)."""
        if log_fn is not None and not callable(log_fn):
            raise TypeError(f"log_fn must be callable, got {type(log_fn).__name__}")
        config = self.config
        train_kwargs: dict[str, Any] = dict(self.frame_inputs)
        if prob_focus_present:
            train_kwargs["prob_focus_present"] = prob_focus_present
        if focus_present_mask is not None:
            train_kwargs["focus_present_mask"] = focus_present_mask.to(self.device)
        self.model.train()
        self.interrupted = self.stopped_by_budget = False
        self.interrupt.reset()
        budget = TimeBudget(config.max_seconds, decaying=config.lr_schedule != "constant",
                            max_steps=self.train_num_steps, horizon=self.lr_horizon)
        budget.start(self.step)
        bar = progress_bar(self.progress, total=self.train_num_steps, initial=self.step) if self.is_main else None
        batches = self.batches.loader(self.step)
        last = time.perf_counter()
        try:
            with self.interrupt.handling(sigterm=self.world_size > 1, step=lambda: self.step):
                while not self._agree_on_control(budget):
                    if self.interrupt.requested:
                        self._interrupt_save()
                        return
                    record = self._train_step(batches, train_kwargs)
                    now = time.perf_counter()
                    record["it_per_s"] = 1.0 / max(now - last, 1e-9)
                    last = now
                    self.history.append((record["step"], record["loss"]))
                    if record["step"] % config.log_every == 0 and self.is_main:
                        self.metrics.append(record)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                    self.step += 1
                    budget.after_step(self.step)
                    self._periodic_outputs(record)
                    logger.debug("step %d: loss %.5f", record["step"], record["loss"])
                    if log_fn is not None:
                        log_fn(dict(record))
                if self.interrupt.requested:
                    self._interrupt_save()
                    return
        except KeyboardInterrupt:
            if self.interrupt.hard or self.world_size > 1:
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
        logger.info("training %s at step %d", "stopped by the time budget" if self.stopped_by_budget else "completed",
                    self.step)

    def _periodic_outputs(self, record: dict[str, Any]) -> None:
        """Sample grid and checkpoint every `save_and_sample_every` steps; a checkpoint
        alone every `save_model_every` steps."""
        every, model_every = self.config.save_and_sample_every, self.config.save_model_every
        if self.step % every == 0:
            record["sample"] = str(self.sample_and_save(self.step // every))
            self.save(self.step // every)
            self.model.train()
        elif model_every and self.step % model_every == 0:
            self.save(f"step-{self.step}")
