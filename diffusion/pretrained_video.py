"""Pretrained video U-Nets in a run, the pipeline's noise schedule, and sampling straight from
a diffusers text-to-video pipeline folder.

A `pretrained` run whose U-Net is a `UNet3DConditionModel` (ModelScope, zeroscope), a
`UNetMotionModel`, or a `UNet2DConditionModel` with a `MotionAdapter` (AnimateDiff) gets this
library's model for it (`unets.from_diffusers`), not diffusers' module: temporal-only training
by default, gradient checkpointing, attention through `spacetime.attend` and every sampler.
`PretrainedVideoUnet` holds it with the null condition the base was trained with (the empty
caption's tokens), which the library's U-Nets, whose null is an all-zero token, do not keep.

`scheduler/scheduler_config.json` of a pipeline folder fixes the process: its betas
(`linear`, `scaled_linear`, `squaredcos_cap_v2` or `trained_betas`), `num_train_timesteps`
and `prediction_type` (`epsilon`, `v_prediction`, `sample`). What this library cannot honour
(`thresholding`, `clip_sample`, `rescale_betas_zero_snr`, flow-matching schedulers) is refused
naming the key. Which timesteps a sampler visits is the sampler's own choice here.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from diffusion.config import ConfigError
from unets import guards

__all__ = ["PretrainedVideoUnet", "SchedulerProcess", "open_pretrained", "read_scheduler", "video_unet"]

logger = logging.getLogger(__name__)

PREDICTION_TYPES = {"epsilon": "noise", "v_prediction": "v", "sample": "x0"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_MAX_JSON = 1024 * 1024
# Options whose only honoured value is the default: anything else changes the process.
_DEFAULT_ONLY = {"thresholding": False, "clip_sample": False, "rescale_betas_zero_snr": False}


class PretrainedVideoUnet(nn.Module):
    """A U-Net of this library under a fixed token null condition `null_cond` `(L, D)`:
    samples dropped for classifier-free guidance (`null_cond_prob`), and `cond=None`, get
    those tokens instead of the U-Net's all-zero token. `set_null_cond` installs them (what
    `GaussianDiffusion.use_empty_caption_null` calls); the null is a buffer, so checkpoints
    keep it. The trainer's `trainable="auto"` trains only its temporal layers."""

    temporal_only_by_default = True  # read by diffusion.lora.select_trainable

    def __init__(self, model: nn.Module, *, null_cond: Tensor | None = None) -> None:
        super().__init__()
        if getattr(model, "cond_format", None) != "tokens":
            raise TypeError(f"PretrainedVideoUnet holds a U-Net conditioned on tokens, got {type(model).__name__}")
        self.model = model
        self.cond_dim = int(model.config.cond_dim)
        self.register_buffer("null_cond", torch.zeros(1, self.cond_dim) if null_cond is None else self._check(null_cond))

    @property
    def cond_format(self) -> str:
        return "tokens"

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def frame_multiple(self) -> int:
        return self.model.frame_multiple

    @property
    def size_multiple(self) -> int:
        return self.model.size_multiple

    def temporal_parameters(self):
        return self.model.temporal_parameters()

    def spatial_parameters(self):
        return self.model.spatial_parameters()

    def enable_gradient_checkpointing(self, enabled: bool = True) -> PretrainedVideoUnet:
        self.model.enable_gradient_checkpointing(enabled)
        return self

    def save_diffusers(self, path: str | os.PathLike, **kwargs: Any) -> Path:
        """The U-Net as a diffusers folder (`unets.save_diffusers`)."""
        return self.model.save_diffusers(path, **kwargs)

    def _check(self, tokens: Tensor) -> Tensor:
        if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.shape[1] != self.cond_dim:
            got = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"null_cond must be token embeddings (L, {self.cond_dim}), got {got}")
        return tokens.detach().float().clone()

    def set_null_cond(self, tokens: Float[Tensor, "l d"]) -> None:
        self.null_cond = self._check(tokens).to(self.null_cond.device)

    def _with_null(self, cond: Tensor, mask: Tensor | None, drop: Tensor) -> tuple[Tensor, Tensor | None]:
        """Tokens of the samples where `drop` is True replaced by the null, both padded (and
        masked) to the longer length."""
        batch, length, dim = cond.shape
        null = self.null_cond.to(cond.dtype)
        full = max(length, null.shape[0])
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.bool, device=cond.device)
        cond = torch.cat([cond, cond.new_zeros(batch, full - length, dim)], dim=1)
        mask = torch.cat([mask, mask.new_zeros(batch, full - length)], dim=1)
        null_tokens = torch.cat([null, null.new_zeros(full - null.shape[0], dim)])
        null_mask = torch.arange(full, device=cond.device) < null.shape[0]
        cond = torch.where(drop.view(-1, 1, 1), null_tokens.expand_as(cond), cond)
        mask = torch.where(drop.view(-1, 1), null_mask.expand_as(mask), mask)
        return cond, None if bool(mask.all()) else mask

    def forward(
        self,
        x: Float[Tensor, "b c *frames h w"],
        t: Tensor,
        cond: Float[Tensor, "b l d"] | Float[Tensor, "b d"] | None = None,
        cond_mask: Bool[Tensor, "b l"] | None = None,
        null_cond_prob: float | int = 0.0,
        enable_time: Any = True,
        **kwargs: Any,
    ) -> Float[Tensor, "b c *frames h w"]:
        batch = x.shape[0]
        if cond is None:
            if cond_mask is not None:
                raise ValueError("cond_mask was given without cond")
            cond = self.null_cond.to(x.dtype).unsqueeze(0).expand(batch, -1, -1)
        else:
            if cond.ndim == 2:
                cond = cond[:, None]
            keep = self.model.cond_keep_mask(batch, float(null_cond_prob), x.device)
            if keep is not None:
                cond, cond_mask = self._with_null(cond, cond_mask, ~keep)
        return self.model(x, t, cond=cond, cond_mask=cond_mask, enable_time=enable_time, **kwargs)


def video_unet(unet: Path, motion_adapter: Path | None, *, gradient_checkpointing: bool = False) -> PretrainedVideoUnet:
    """This library's model for a video U-Net folder (or a 2D one with its motion adapter)."""
    import unets

    try:
        model = unets.from_diffusers(unet, motion_adapter=motion_adapter)
    except (ValueError, TypeError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        what = "pretrained.motion_adapter" if motion_adapter is not None and "adapter" in first else "pretrained.unet"
        raise ConfigError(f"{what}: cannot build this library's U-Net from {str(unet)!r}: {first}") from None
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    logger.info("pretrained %s from %s%s", type(model).__name__, unet,
                f" with motion adapter {motion_adapter}" if motion_adapter is not None else "")
    return PretrainedVideoUnet(model)


# ---------------------------------------------------------------------------------------
# the pipeline's scheduler


class SchedulerProcess:
    """What a diffusers scheduler config fixes of the process: `betas` (float64),
    `objective` (this library's name) and `timesteps`."""

    def __init__(self, betas: Tensor, objective: str, source: str) -> None:
        self.betas, self.objective, self.source = betas, objective, source

    @property
    def timesteps(self) -> int:
        return int(self.betas.shape[0])


def read_scheduler(folder: Path) -> SchedulerProcess:
    """The process of `folder/scheduler_config.json` (see the module docstring)."""
    import json

    file = folder / "scheduler_config.json"
    where = str(file)
    try:
        text = guards.read_text(file, what="pretrained.scheduler config", max_bytes=_MAX_JSON)
        config = json.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"pretrained.scheduler: {str(folder)!r} has no scheduler_config.json") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"pretrained.scheduler: {where!r} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"pretrained.scheduler: {where!r} must hold a JSON object")
    name = str(config.get("_class_name", "?"))
    if "FlowMatch" in name or "num_train_timesteps" not in config:
        raise ConfigError(f"pretrained.scheduler: {name} in {where!r} is not a DDPM-family scheduler; "
                          "this library runs the variance-preserving process of DDPM/DDIM/PNDM/Euler/DPM-Solver")
    for key, allowed in _DEFAULT_ONLY.items():
        if config.get(key, allowed) not in (allowed, None):
            raise ConfigError(f"pretrained.scheduler: {key}={config[key]!r} in {where!r} is not supported "
                              f"(only {allowed!r})")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ConfigError(f"pretrained.scheduler: prediction_type={prediction!r} in {where!r} is not supported; "
                          f"allowed: {', '.join(PREDICTION_TYPES)}")
    steps = config["num_train_timesteps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"pretrained.scheduler: num_train_timesteps must be a positive int, got {steps!r}")
    trained = config.get("trained_betas")
    if trained is not None:
        betas = torch.tensor(trained, dtype=torch.float64)
        if betas.shape != (steps,):
            raise ConfigError(f"pretrained.scheduler: trained_betas has {betas.numel()} values, "
                              f"num_train_timesteps is {steps}")
    else:
        kind = config.get("beta_schedule", "linear")
        start, end = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
        if kind == "linear":
            betas = torch.linspace(start, end, steps, dtype=torch.float64)
        elif kind == "scaled_linear":  # Stable Diffusion's: linear in sqrt(beta)
            betas = torch.linspace(math.sqrt(start), math.sqrt(end), steps, dtype=torch.float64) ** 2
        elif kind == "squaredcos_cap_v2":
            from diffusion.schedules import cosine_beta_schedule

            betas = cosine_beta_schedule(steps, max_beta=0.999)
        else:
            raise ConfigError(f"pretrained.scheduler: beta_schedule={kind!r} in {where!r} is not supported; "
                              f"allowed: {', '.join(BETA_SCHEDULES)} or trained_betas")
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise ConfigError(f"pretrained.scheduler: the betas of {where!r} must all lie in (0, 1)")
    return SchedulerProcess(betas, PREDICTION_TYPES[prediction], where)


def use_schedule(diffusion: Any, process: SchedulerProcess) -> None:
    """Give `diffusion` (a `GaussianDiffusion` built for `process.timesteps`) the scheduler's
    betas: every table is derived again from them."""
    from diffusion.schedules import NoiseSchedule

    if diffusion.num_timesteps != process.timesteps:
        raise ConfigError(f"diffusion.timesteps={diffusion.num_timesteps} differs from the scheduler's "
                          f"num_train_timesteps={process.timesteps} ({process.source})")
    device = diffusion.betas.device
    for name, table in NoiseSchedule.from_betas(process.betas).tables().items():
        diffusion.register_buffer(name, table.to(device))
    diffusion.beta_schedule = f"scheduler ({process.source})"


# ---------------------------------------------------------------------------------------
# sampling from a pipeline folder


def open_pretrained(path: str | os.PathLike, *, num_frames: int = 16, image_size: Any = None,
                    device: Any = "cpu") -> Any:
    """A `diffusion.run.LoadedRun` for a local diffusers text-to-video pipeline folder
    (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, optional `scheduler/`): the process its
    scheduler describes (else Stable Diffusion's: `scaled_linear` 0.00085 to 0.012 over 1000
    steps, epsilon), at `image_size` (default: the U-Net's `sample_size` times the VAE's
    downsampling), ready to sample. `checkpoint` and `run_dir` are the folder."""
    import json

    from diffusion.config import RunConfig
    from diffusion.pretrained import PretrainedSection, _read_config, resolve_parts
    from diffusion.run import LoadedRun, build_diffusion

    folder = Path(path).expanduser()
    section = PretrainedSection(path=str(folder))
    parts = resolve_parts(section)
    unet = _read_config(parts["unet"], "unet")
    if parts["vae"] is None or parts["text_encoder"] is None:
        raise ConfigError(f"{str(folder)!r} is not a text-to-video pipeline folder: it needs vae/ and "
                          "text_encoder/ (with tokenizer/) beside unet/")
    vae = _read_config(parts["vae"], "vae")
    factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    if image_size is None:
        size = unet.get("sample_size") or 64
        size = size[0] if isinstance(size, (list, tuple)) else size
        image_size = int(size) * factor
    diffusion = {"image_size": image_size, "num_frames": num_frames, "channels": int(vae.get("in_channels", 3))}
    scheduler = parts.get("scheduler")
    if scheduler is not None:
        process = read_scheduler(scheduler)
        diffusion.update(timesteps=process.timesteps, objective=process.objective)
    else:
        logger.warning("%s has no scheduler/: using Stable Diffusion's process (scaled_linear betas "
                       "0.00085 to 0.012, 1000 steps, epsilon)", folder)
        diffusion.update(timesteps=1000, objective="noise")
    config = RunConfig.from_dict({"pretrained": section.to_dict(), "diffusion": diffusion})
    process = build_diffusion(config)
    if scheduler is None:
        betas = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=torch.float64) ** 2
        use_schedule(process, SchedulerProcess(betas, "noise", "Stable Diffusion's default"))
    process.to(device).eval()
    logger.debug("pretrained pipeline config: %s", json.dumps(config.to_dict()))
    return LoadedRun(config=config, run_dir=folder, checkpoint=folder, diffusion=process)
