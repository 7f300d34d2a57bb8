"""The run configuration: typed sections, validated when built, read from YAML or JSON.

    unet: space_time_unet          # registry name (unets.available())
    unet_preset: debug             # optional U-Net preset (unets.presets(name))
    model: {dim: 32, ...}          # U-Net config fields, over the preset
    diffusion: {image_size: 16, num_frames: 8, channels: 1, objective: v, ...}
    trainer: {train_num_steps: 1000, max_seconds: 600, ...}  # Trainer options
    data: {kind: moving-digits, num_videos: 4000, ...}       # or {kind: folder, folder: DIR}
    sample: {sampler: ddim, steps: 50, cond_scale: 3, captions: [...]}

`RunConfig` composes `UnetSection`, `DiffusionConfig`, `TrainerConfig`, `DataConfig` and
`SampleConfig`. Each section checks its own values in `__post_init__`; `RunConfig` checks what
spans sections (channels, frame and size multiples of the U-Net, sampling steps against the
schedule, the memory a batch, a schedule and the U-Net need). Every problem is one
`ConfigError` (a `ValueError`) naming the dotted key, the value and what is allowed.

`TrainerConfig` is also what `Trainer(**options)` validates its options with, so a rule
holds in one place for the command line and for Python users.

text2video-from-scratch's `default.yaml` layout (`model`, `diffusion`, `trainer`,
`training_data_dir`, no `unet`) is read as a `unet3d` run on that folder.

This module sits at the bottom of `diffusion`'s imports: it may import `spacetime`, `unets`
and low modules (`diffusion.schedules`, `diffusion.samplers`, `diffusion.data` constants),
never the trainer, the process or the command line. Choice lists come from their owners.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, no_type_check

from diffusion.budget import LR_SCHEDULES
from diffusion.config_fields import (  # noqa: F401 (re-exported: other modules import them from here)
    ConfigError,
    ConfigTypeError,
    _checked,
    _int,
    _optional_int,
    _number,
    _choice,
    _bool,
    _string,
    _strings,
    unknown_key_message,
    sampler_names,
    Section,
    _plain,
)
from diffusion.config_stages import SuperResolutionConfig, check_super_resolution
from spacetime.checks import did_you_mean
from unets import guards

__all__ = [
    "ConfigError", "DataConfig", "DiffusionConfig", "RunConfig", "SampleConfig", "TrainerConfig",
    "UnetSection", "check_sample_kwargs", "normalise", "validate_config",
]

TOP_KEYS = ("unet", "unet_preset", "model", "diffusion", "trainer", "data", "sample", "pretrained", "super_resolution")
SECTIONS = ("model", "diffusion", "trainer", "data", "sample")
# Spellings of earlier versions, read with a warning: key -> what it is now.
DEPRECATED_TOP = {"preset": "unet_preset"}
DEPRECATED_DIFFUSION = ("cond_on_tokens",)
# text2video-from-scratch's layout: the training videos' folder at the top level.
SEED_DATA_KEY = "training_data_dir"

DATA_KINDS = ("moving-digits", "folder")
MAX_SEED = 2**63 - 1  # torch generators take a signed 64-bit seed


# DiffusionConfig keys a flow process has no use for (diffusion.run drops them).
GAUSSIAN_ONLY = ("beta_schedule", "objective", "min_snr_loss_weight", "min_snr_gamma", "min_snr_floor", "zero_terminal_snr")


@no_type_check  # values come from files: __post_init__ checks them, naming the key
@dataclasses.dataclass(kw_only=True)
class DiffusionConfig(Section):
    """`GaussianDiffusion`'s keyword arguments (the video shape, schedule, objective, loss)."""

    key: ClassVar[str] = "diffusion"
    image_size: int
    num_frames: int
    text_use_bert_cls: bool = False
    channels: int = 3
    timesteps: int = 1000
    loss_type: str = "l1"
    use_dynamic_thres: bool = False
    dynamic_thres_percentile: float = 0.9
    beta_schedule: str = "cosine"
    objective: str = "noise"
    min_snr_loss_weight: bool = False
    min_snr_gamma: float = 5.0
    min_snr_floor: float = 0.0
    auto_normalize: bool = True
    null_cond_prob: float = 0.0
    # "flow": diffusion.FlowMatching, with timestep_sampling and shift and no GAUSSIAN_ONLY keys.
    process: str = "gaussian"
    offset_noise: float = 0.0
    zero_terminal_snr: bool = False
    timestep_sampling: str = "logit_normal"
    shift: float = 1.0
    # Share of each batch trained with the model's own x0 estimate (diffusion.self_cond), used
    # when the U-Net is built with model.self_cond: true.
    self_cond_prob: float = 0.5

    def __post_init__(self) -> None:
        from diffusion.schedules import BETA_SCHEDULES, LOSS_TYPES, OBJECTIVES

        _int("diffusion.image_size", self.image_size, 1)
        _int("diffusion.num_frames", self.num_frames, 1)
        _int("diffusion.channels", self.channels, 1)
        _int("diffusion.timesteps", self.timesteps, 1)
        for name in ("text_use_bert_cls", "use_dynamic_thres", "min_snr_loss_weight", "auto_normalize",
                     "zero_terminal_snr"):
            _bool(f"diffusion.{name}", getattr(self, name))
        _choice("diffusion.loss_type", self.loss_type, LOSS_TYPES)
        _choice("diffusion.beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _choice("diffusion.objective", self.objective, OBJECTIVES)
        _number("diffusion.dynamic_thres_percentile", self.dynamic_thres_percentile, 0, 1, low_open=True)
        _number("diffusion.min_snr_gamma", self.min_snr_gamma, 0, low_open=True)
        _number("diffusion.min_snr_floor", self.min_snr_floor, 0, self.min_snr_gamma)
        _number("diffusion.null_cond_prob", self.null_cond_prob, 0, 1)
        _choice("diffusion.process", self.process, ("gaussian", "flow"))
        _number("diffusion.offset_noise", self.offset_noise, 0)
        _choice("diffusion.timestep_sampling", self.timestep_sampling, ("logit_normal", "uniform"))
        _number("diffusion.shift", self.shift, 0, low_open=True)
        _number("diffusion.self_cond_prob", self.self_cond_prob, 0, 1)
        if self.zero_terminal_snr and self.objective == "noise":
            raise ConfigError("diffusion.zero_terminal_snr needs diffusion.objective 'v' or 'x0', got 'noise'")
        changed = [f.name for f in dataclasses.fields(self) if f.name in GAUSSIAN_ONLY and getattr(self, f.name) != f.default]
        if self.process == "flow" and changed:
            raise ConfigError(f"diffusion.process 'flow' predicts the velocity on a straight path; leave "
                              f"{', '.join('diffusion.' + key for key in changed)} at their defaults")
        if self.min_snr_loss_weight and self.min_snr_floor > 0 and self.objective == "noise":
            raise ConfigError(
                f"diffusion.min_snr_floor={self.min_snr_floor} needs diffusion.objective 'v' or 'x0' "
                "(on the noise objective the floor becomes a loss scale of millions); got 'noise'"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> DiffusionConfig:
        data = dict(data or {})
        for old in DEPRECATED_DIFFUSION:
            if data.get(old):  # a false value asked for nothing: dropped without a word
                value = data.pop(old)
                warnings.warn(
                    f"diffusion.{old}={value!r} is ignored: each U-Net says itself whether it takes "
                    "pooled text or tokens (its cond_format)", FutureWarning, stacklevel=3,
                )
            data.pop(old, None)
        for required in ("image_size", "num_frames"):
            if required not in data:
                raise ConfigError(f"diffusion.{required} is required (a positive int)")
        return super().from_dict.__func__(cls, data)  # type: ignore[attr-defined]


@no_type_check  # values come from files: __post_init__ checks them, naming the key
@dataclasses.dataclass(kw_only=True)
class TrainerConfig(Section):
    """The `Trainer`'s options (all but the model, the data and where it runs), with the
    Trainer's defaults; see `diffusion.trainer.Trainer` for their meaning.

    `max_seconds`: a wall-clock budget for `train()` (0: none). `save_model_every`:
    text2video-from-scratch's option, a checkpoint every N steps without a sample grid."""

    key: ClassVar[str] = "trainer"
    ema_decay: float = 0.995
    num_frames: int | None = None
    train_batch_size: int = 32
    train_lr: float = 1e-4
    train_num_steps: int = 100000
    gradient_accumulate_every: int = 2
    amp: bool = False
    step_start_ema: int = 2000
    update_ema_every: int = 10
    save_and_sample_every: int = 1000
    results_folder: str = "./results"
    num_sample_rows: int = 4
    max_grad_norm: float | None = None
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    compile: bool = False
    seed: int = 0
    shuffle: bool = True
    num_workers: int = 0
    condition_on_captions: bool | None = None
    text_cache_dir: str | None = None
    cond_scale: float = 1.0
    sample_captions: list[str] | None = None
    sample_kwargs: dict[str, Any] | None = None
    image_phase_steps: int = 0
    image_ratio: float = 0.0
    log_every: int = 1
    write_mp4: bool = True
    fps: float = 8.0
    parallel: str = "auto"
    find_unused_parameters: bool = True
    max_seconds: float = 0.0
    save_model_every: int | None = None
    trainable: str = "auto"  # diffusion.lora.select_trainable
    latent_cache_dir: str | None = None  # diffusion.latent_cache
    # Known-frame training masks (diffusion.frame_masks.FrameMasks fields; true = defaults).
    frame_masks: dict[str, Any] | None = None
    # AdamW's update of each parameter inside backward, its gradient freed at once
    # (diffusion.fused_step): a step never holds all gradients.
    optimizer_in_backward: bool = False

    def __post_init__(self) -> None:
        from diffusion.distributed import PARALLEL_MODES
        from diffusion.frame_masks import frame_masks_option

        t = "trainer."
        for name, low in (("train_batch_size", 1), ("train_num_steps", 0), ("gradient_accumulate_every", 1),
                          ("step_start_ema", 0), ("update_ema_every", 1), ("save_and_sample_every", 1),
                          ("num_sample_rows", 1), ("warmup_steps", 0), ("num_workers", 0),
                          ("image_phase_steps", 0), ("log_every", 1)):
            _int(t + name, getattr(self, name), low)
        _int(t + "seed", self.seed, 0, MAX_SEED)
        _optional_int(t + "num_frames", self.num_frames, 1)
        _optional_int(t + "save_model_every", self.save_model_every, 1)
        _number(t + "ema_decay", self.ema_decay, 0, 1)
        _number(t + "train_lr", self.train_lr, 0, low_open=True)
        if self.max_grad_norm is not None:
            _number(t + "max_grad_norm", self.max_grad_norm, 0, low_open=True)
        _choice(t + "lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _number(t + "min_lr_ratio", self.min_lr_ratio, 0, 1)
        if isinstance(self.adam_betas, str) or not isinstance(self.adam_betas, (list, tuple)) \
                or len(self.adam_betas) != 2:
            raise ConfigTypeError(f"trainer.adam_betas must be a list of two numbers in [0, 1), got {self.adam_betas!r}")
        for index, beta in enumerate(self.adam_betas):
            _number(f"{t}adam_betas[{index}]", beta, 0, 1, high_open=True)
        self.adam_betas = tuple(self.adam_betas)
        _number(t + "weight_decay", self.weight_decay, 0)
        for name in ("amp", "compile", "shuffle", "write_mp4", "find_unused_parameters", "optimizer_in_backward"):
            _bool(t + name, getattr(self, name))
        _bool(t + "condition_on_captions", self.condition_on_captions, optional=True)
        _string(t + "results_folder", self.results_folder)
        _string(t + "text_cache_dir", self.text_cache_dir, optional=True)
        _number(t + "cond_scale", self.cond_scale, 0)
        # "" is a caption too: an unconditional sample in a grid.
        _strings(t + "sample_captions", self.sample_captions, optional=True, empty=True)
        if self.sample_captions is not None:
            self.sample_captions = list(self.sample_captions)
        if self.sample_kwargs is not None:
            check_sample_kwargs(t + "sample_kwargs", self.sample_kwargs)
            self.sample_kwargs = dict(self.sample_kwargs)
        _number(t + "image_ratio", self.image_ratio, 0, 1, high_open=True)
        _number(t + "fps", self.fps, 0, low_open=True)
        _choice(t + "parallel", self.parallel, PARALLEL_MODES)
        _number(t + "max_seconds", self.max_seconds, 0)
        _choice(t + "trainable", self.trainable, ("auto", "temporal", "all"))
        _string(t + "latent_cache_dir", self.latent_cache_dir, optional=True)
        self.frame_masks = _checked(frame_masks_option, t + "frame_masks", self.frame_masks)
        if self.optimizer_in_backward:
            self._check_optimizer_in_backward()

    def _check_optimizer_in_backward(self) -> None:
        # Each parameter is updated as soon as its gradient is complete (diffusion.fused_step):
        # whatever needs all gradients of a step before the first update cannot run with it.
        on = "trainer.optimizer_in_backward=true"
        if self.gradient_accumulate_every != 1:
            raise ConfigError(
                f"{on} updates each weight during the first backward, so it cannot accumulate gradients over "
                f"micro-batches: set trainer.gradient_accumulate_every=1 (got {self.gradient_accumulate_every}), "
                "or turn trainer.optimizer_in_backward off")
        if self.max_grad_norm is not None:
            raise ConfigError(
                f"{on} cannot clip by the global gradient norm (trainer.max_grad_norm={self.max_grad_norm!r}): that "
                "norm is known only after every weight was updated; set trainer.max_grad_norm=null (the norm is "
                "still logged, unclipped), or turn trainer.optimizer_in_backward off")
        if self.parallel in ("ddp", "fsdp"):
            raise ConfigError(
                f"{on} cannot run with trainer.parallel={self.parallel!r}: the update would run before the "
                "gradient is all-reduced across processes; use trainer.parallel='none' or 'auto' on one process, "
                "or turn trainer.optimizer_in_backward off")


# `sample()` arguments a trainer sets itself for its grids (the batch and its conditions).
_GRID_RESERVED = ("batch_size", "cond", "cond_mask", "cond_scale", "generator", "noise")


def check_sample_kwargs(where: str, kwargs: Any, *, target: Any = None, timesteps: Any = None) -> None:
    """Check extra `sample()` arguments (a trainer's `sample_kwargs`) before any training:
    the known ones by type and range (`steps` at most `timesteps`), every key against
    `target`'s parameters (the model's `sample`) when it is given."""
    if not isinstance(kwargs, Mapping):
        raise ConfigTypeError(f"{where} must be a mapping of sample() arguments, got {kwargs!r}")
    for key, value in kwargs.items():
        name = f"{where}.{key}"
        if key in _GRID_RESERVED:
            raise ConfigError(f"{name} is set by the trainer for its sample grids; remove it from {where}")
        if key == "sampler":
            _choice(name, value, sampler_names())
        elif key == "steps":
            if value is not None:
                _int(name, value, 1, timesteps)
        elif key == "eta":
            _number(name, value, 0)
        elif key == "num_frames":
            _optional_int(name, value, 1)
        elif key in ("clip_denoised", "progress"):
            _bool(name, value)
    if target is not None:
        parameters = inspect.signature(target).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            allowed = [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                       and n not in _GRID_RESERVED]
            for key in kwargs:
                if key not in allowed:
                    raise ConfigError(unknown_key_message(where, key, allowed))


@no_type_check  # values come from files: __post_init__ checks them, naming the key
@dataclasses.dataclass(kw_only=True)
class DataConfig(Section):
    """The training videos: the embedded moving digits, or a folder of videos."""

    key: ClassVar[str] = "data"
    kind: str = "moving-digits"
    # moving-digits
    num_videos: int | None = None
    digit_size: int | None = None
    speed: float | None = None
    seed: int | None = None
    subpixel: bool | None = None  # MovingDigits(subpixel=): fractional positions, bilinear
    speeds: list[float] | None = None  # MovingDigits(speeds=): each video's speed drawn from these
    # folder (diffusion.data.VideoFolder)
    folder: str | None = None
    frame_mode: str | None = None
    window: str | None = None
    captions: str | None = None
    probe: str | None = None
    decode_timeout: float | None = None
    max_source_frames: int | None = None

    KIND_KEYS: ClassVar[dict[str, tuple[str, ...]]] = {
        "moving-digits": ("num_videos", "digit_size", "speed", "speeds", "seed", "subpixel"),
        "folder": ("folder", "frame_mode", "window", "captions", "probe", "decode_timeout", "max_source_frames"),
    }

    def __post_init__(self) -> None:
        from diffusion.data import CAPTION_MODES, FRAME_MODES, PROBE_MODES, WINDOWS

        _choice("data.kind", self.kind, DATA_KINDS)
        for name in self.given():
            if name not in self.KIND_KEYS[self.kind]:
                raise ConfigError(
                    f"data.{name} is not a key of data.kind={self.kind!r}; allowed keys: "
                    f"{', '.join(('kind',) + self.KIND_KEYS[self.kind])}{did_you_mean(name, self.KIND_KEYS[self.kind])}"
                )
        _optional_int("data.num_videos", self.num_videos, 1)
        _optional_int("data.digit_size", self.digit_size, 4)
        if self.speed is not None:
            _number("data.speed", self.speed, 0, low_open=True)
        if self.speeds is not None:
            if isinstance(self.speeds, str) or not isinstance(self.speeds, (list, tuple)) or not self.speeds:
                raise ConfigTypeError(f"data.speeds must be a non-empty list of positive numbers (pixels per frame), "
                                      f"e.g. [0.25, 0.5, 1.0]; got {self.speeds!r}")
            for index, value in enumerate(self.speeds):
                _number(f"data.speeds[{index}]", value, 0, low_open=True)
            if self.speed is not None:
                raise ConfigError(f"give data.speed (one for all videos) or data.speeds (drawn per video), not both "
                                  f"(unset one: --set data.speed=null); "
                                  f"got speed={self.speed!r}, speeds={self.speeds!r}")
            self.speeds = list(self.speeds)
        if self.seed is not None:
            _int("data.seed", self.seed, 0, MAX_SEED)
        _bool("data.subpixel", self.subpixel, optional=True)
        if self.kind == "folder" and not self.folder:
            raise ConfigError("data.folder is required with data.kind=folder (a folder of videos)")
        _string("data.folder", self.folder, optional=True)
        for name, allowed in (("frame_mode", FRAME_MODES), ("window", WINDOWS), ("captions", CAPTION_MODES),
                              ("probe", PROBE_MODES)):
            if getattr(self, name) is not None:
                _choice(f"data.{name}", getattr(self, name), allowed)
        if self.decode_timeout is not None:
            _number("data.decode_timeout", self.decode_timeout, 0, low_open=True)
        _optional_int("data.max_source_frames", self.max_source_frames, 1)

    def given(self) -> dict[str, Any]:
        """The keys set (not None), without `kind`: the data set's keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "kind" and getattr(self, f.name) is not None}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **_plain(self.given())}


@no_type_check  # values come from files: __post_init__ checks them, naming the key
@dataclasses.dataclass(kw_only=True)
class SampleConfig(Section):
    """Defaults of `spacetime sample` for this run. `steps` None: 50, or every timestep of a
    shorter schedule."""

    key: ClassVar[str] = "sample"
    sampler: str = "ddim"
    steps: int | None = None
    cond_scale: float = 1.0
    eta: float | None = None  # None: the sampler's (0 for ddim, 1 for euler_ancestral, dpmpp_2m_sde)
    num_samples: int = 1
    batch_size: int = 16
    seed: int = 0
    fps: float = 8.0
    captions: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        _choice("sample.sampler", self.sampler, sampler_names())
        _optional_int("sample.steps", self.steps, 1)
        _number("sample.cond_scale", self.cond_scale, 0)
        if self.eta is not None:
            _number("sample.eta", self.eta, 0)
        _int("sample.num_samples", self.num_samples, 1)
        _int("sample.batch_size", self.batch_size, 1)
        _int("sample.seed", self.seed, 0, MAX_SEED)
        _number("sample.fps", self.fps, 0, low_open=True)
        _strings("sample.captions", self.captions)
        self.captions = list(self.captions)


@no_type_check  # values come from files: __post_init__ checks them, naming the key
@dataclasses.dataclass(kw_only=True)
class UnetSection:
    """Which U-Net (registry name), an optional U-Net preset and config fields over it."""

    name: str
    preset: str | None = None
    model: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        import unets

        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"unet must name a U-Net, one of {', '.join(unets.available())}; got {self.name!r}")
        if self.name not in unets.available():
            raise ConfigError(
                f"unknown U-Net name {self.name!r}{did_you_mean(self.name, unets.available())}; "
                f"allowed: {', '.join(unets.available())}"
            )
        if self.preset is not None and self.preset not in unets.presets(self.name):
            raise ConfigError(
                f"unet_preset {self.preset!r} is not a preset of U-Net {self.name!r}"
                f"{did_you_mean(self.preset, unets.presets(self.name))}; allowed: {', '.join(unets.presets(self.name))}"
            )
        if not isinstance(self.model, Mapping):
            raise ConfigTypeError(f"config section 'model' must be a mapping, got {self.model!r}")
        self.model = dict(self.model)
        fields = unets.get(self.name).config_class.field_names()
        for key in self.model:
            if key not in fields:
                raise ConfigError(unknown_key_message("model", key, fields))

    def unet_config(self) -> Any:
        """The U-Net's typed config (the preset with `model` over it)."""
        import unets

        try:
            return unets.build_config(self.name, preset=self.preset, **self.model)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"model: {err}") from None


@no_type_check  # values come from files: __post_init__ checks them, naming the key
@dataclasses.dataclass(kw_only=True)
class RunConfig:
    """A whole run: the sections above, checked together (see the module docstring)."""

    unet: UnetSection
    diffusion: DiffusionConfig
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    pretrained: Any = None  # diffusion.pretrained.PretrainedSection: a local diffusers base
    super_resolution: Any = None  # diffusion.config_stages.SuperResolutionConfig: an SR stage

    def __post_init__(self) -> None:
        check_super_resolution(self)
        if self.pretrained is not None:
            from diffusion.pretrained import check_pretrained_run

            return check_pretrained_run(self)
        d, t, model = self.diffusion, self.trainer, self.unet.model
        if model.setdefault("channels", d.channels) != d.channels:
            raise ConfigError(
                f"model.channels={model['channels']!r} differs from diffusion.channels={d.channels!r}; "
                "set only diffusion.channels"
            )
        if t.num_frames is not None and t.num_frames != d.num_frames:
            raise ConfigError(
                f"trainer.num_frames={t.num_frames} differs from diffusion.num_frames={d.num_frames}; "
                "set only diffusion.num_frames"
            )
        _check_unet_and_memory(self)
        if t.frame_masks is not None and not getattr(self.unet.unet_config(), "frame_cond", False):
            raise ConfigError(
                f"trainer.frame_masks shows the U-Net some of each video's frames: it needs model.frame_cond: true "
                f"(the {self.unet.name} U-Net is built with frame_cond false)"
            )
        if t.sample_kwargs:
            check_sample_kwargs("trainer.sample_kwargs", t.sample_kwargs, timesteps=d.timesteps)
        steps = self.sample.steps
        if steps is not None and steps > d.timesteps:
            raise ConfigError(f"sample.steps must be at most diffusion.timesteps={d.timesteps}, got {steps}")
        if self.data.kind == "moving-digits":
            if d.channels not in (1, 3):
                raise ConfigError(f"moving digits have 1 or 3 channels; diffusion.channels is {d.channels}")
            digit_size = self.data.digit_size if self.data.digit_size is not None else 14
            if not 4 <= digit_size <= d.image_size:
                raise ConfigError(
                    f"data.digit_size must be between 4 and diffusion.image_size={d.image_size}, got {digit_size}"
                )
            if d.num_frames < 2:
                raise ConfigError(f"diffusion.num_frames must be >= 2 for moving digits (motion), got {d.num_frames}")

    # --- dicts and files ----------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        data = normalise(data)
        if data.get("pretrained") is not None:
            from diffusion.pretrained import pretrained_run

            if data.get("super_resolution") is not None:
                raise ConfigError("super_resolution needs a U-Net of this library (unet:), not a pretrained base")
            return pretrained_run(cls, data)
        return cls(
            unet=UnetSection(name=data.get("unet"), preset=data.get("unet_preset"), model=data.get("model") or {}),
            diffusion=DiffusionConfig.from_dict(data.get("diffusion")),
            trainer=TrainerConfig.from_dict(data.get("trainer")),
            data=DataConfig.from_dict(data.get("data")),
            sample=SampleConfig.from_dict(data.get("sample")),
            super_resolution=None if data.get("super_resolution") is None
            else SuperResolutionConfig.from_dict(data["super_resolution"]),
        )

    def to_dict(self) -> dict[str, Any]:
        unet = self.unet
        return ({"unet": unet.name, "unet_preset": unet.preset, "model": _plain(unet.model)} if unet else {}) | {
            "diffusion": self.diffusion.to_dict(),
            "trainer": self.trainer.to_dict(),
            "data": self.data.to_dict(),
            "sample": self.sample.to_dict(),
        } | ({"pretrained": self.pretrained.to_dict()} if self.pretrained is not None else {}) | (
            {"super_resolution": self.super_resolution.to_dict()} if self.super_resolution is not None else {})

    def resolved(self, unet_config: Any = None) -> RunConfig:
        """This config with the U-Net written out field by field (no preset), so the run can be
        rebuilt even if presets change later."""
        if self.pretrained is not None:  # the base's own folders describe it
            return self
        config = unet_config if unet_config is not None else self.unet.unet_config()
        model = config.to_dict()
        model.pop("name", None)
        unet = UnetSection(name=self.unet.name, preset=None, model=model)
        return dataclasses.replace(self, unet=unet)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def _check_unet_and_memory(run: RunConfig) -> None:
    """The U-Net's frame and size multiples, and the memory the run needs, before anything is
    allocated: the U-Net is built on the meta device (shapes only, no storage)."""
    import torch

    d, t, s = run.diffusion, run.trainer, run.sample
    config = run.unet.unet_config()
    name = run.unet.name
    width = getattr(config, "dim", None)
    # model.channels always equals diffusion.channels (checked above), named under the latter.
    given = [f"model.{k}={v!r}" for k, v in run.unet.model.items() if k != "channels"]
    given += [f"unet_preset={run.unet.preset!r}"] if run.unet.preset else []
    settings = ", ".join(given + [f"diffusion.channels={d.channels}"])
    try:
        with torch.device("meta"):
            import unets

            net = unets.get(name).model_class.from_config(config)
    except (RuntimeError, OverflowError, MemoryError, ValueError, TypeError) as err:
        # The config itself was valid (unet_config checked it): what is left are sizes
        # torch cannot even describe, e.g. more elements than an int64 counts.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"model: the {name} U-Net cannot be built from {settings}: {first}") from None
    params = sum(p.numel() for p in net.parameters())
    frames, size = d.num_frames, d.image_size
    if size % net.size_multiple:
        raise ConfigError(
            f"diffusion.image_size must be a multiple of {net.size_multiple} (the size_multiple of this "
            f"{name} U-Net), got {size}"
        )
    if frames % net.frame_multiple:
        raise ConfigError(
            f"diffusion.num_frames must be a multiple of {net.frame_multiple} (the frame_multiple of this "
            f"{name} U-Net), got {frames}"
        )
    # Lower bounds, fp32: a run that fails them cannot fit; one that passes may still not.
    video = d.channels * frames * size * size * 4
    shape = f"diffusion.image_size={size} x diffusion.num_frames={frames} x diffusion.channels={d.channels}"
    estimates = (
        (d.timesteps * 8 * 16, f"the noise schedule of diffusion.timesteps={d.timesteps}"),
        (video, f"one video of {shape}"),
        # weights, EMA copy, gradients and AdamW's two moments
        (params * 4 * 5, f"the {name} U-Net's {params:,} parameters ({settings}) with EMA, gradients and "
                         "optimizer state"),
        # the batch, its noise, the noised batch and the prediction, plus one activation of
        # the U-Net's first width per video
        (t.train_batch_size * (4 * video + video // d.channels * (width if isinstance(width, int) else 1)),
         f"a training batch of trainer.train_batch_size={t.train_batch_size} videos of {shape}"),
        (s.batch_size * 4 * video, f"a sampling batch of sample.batch_size={s.batch_size} videos of {shape}"),
    )
    for nbytes, what in estimates:
        try:
            guards.check_memory(float(nbytes) if nbytes < 2**1000 else float("inf"), what=what)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def normalise(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config mapping in this version's layout: old spellings (`preset:`) renamed with a
    warning, text2video-from-scratch's layout mapped, unknown top-level keys refused."""
    if not isinstance(config, Mapping):
        raise ConfigTypeError(f"a run config must be a mapping of sections {', '.join(TOP_KEYS)}, got {config!r}")
    out = dict(config)
    for old, new in DEPRECATED_TOP.items():
        if old in out:
            value = out.pop(old)
            if new in out:
                raise ConfigError(f"config has both {old!r} (the old name) and {new!r}; keep only {new!r}")
            if value is not None:  # config.json of earlier runs says `preset: null`
                warnings.warn(f"config key {old!r} is now {new!r} (the U-Net preset)", FutureWarning, stacklevel=3)
            out[new] = value
    if SEED_DATA_KEY in out:
        # text2video-from-scratch: `Unet3D(**config['model'])` trained on this folder.
        folder = out.pop(SEED_DATA_KEY)
        if out.get("data"):
            raise ConfigError(f"config has both {SEED_DATA_KEY!r} and a data section; keep one")
        _string(SEED_DATA_KEY, folder)
        out["data"] = {"kind": "folder", "folder": str(folder)}
        out.setdefault("unet", "unet3d")
    for key, value in out.items():
        if key not in TOP_KEYS:
            raise ConfigError(unknown_key_message("config", key, TOP_KEYS + (SEED_DATA_KEY,)))
        if key in ("unet", "unet_preset"):
            if value is not None and not isinstance(value, str):
                raise ConfigTypeError(f"config key {key!r} must be a string, got {value!r}")
        elif value is not None and not isinstance(value, Mapping):
            raise ConfigTypeError(f"config section {key!r} must be a mapping, got {value!r}")
    return out


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """`RunConfig.from_dict(config).to_dict()`: the checked config with defaults filled in."""
    return RunConfig.from_dict(config).to_dict()
