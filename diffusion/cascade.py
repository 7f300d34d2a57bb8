"""Make-A-Video's cascade: base video -> frame interpolation -> spatial super-resolution.

    from diffusion import Cascade
    cascade = Cascade.from_runs(base="runs/base", interp="runs/interp", sr="runs/sr")
    videos = cascade.sample(cond=["the digit 3 moving up"])        # (1, C, 29, 32, 32) in [0, 1]

Each stage is its own model, trained in its own run folder (Singer et al. 2022, Sec. 3): the
base (a `GaussianDiffusion` or `FlowMatching`) samples F frames at a low resolution; the
interpolation stage (a process whose U-Net has `frame_cond=True`) places them every `stride`-th
of `stride * (F - 1) + 1` frames and samples the rest (`temporal_super_resolution`); the
super-resolution stage (`SuperResolution`) brings every frame to its output size, conditioned on
the noise-augmented upsampled input. The interpolation and SR stages are optional.

Every stage has its own sampler, step count, guidance and eta (`StageOptions`); `from_runs`
starts from each run's `sample:` section. Captions go to the stages that take them
(`is_conditional`); a stage trained without text samples unconditionally. The stages are
checked against each other on construction (channels, sizes, frame counts), so a mismatched
set of runs fails before anything is sampled.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from torch import Tensor

from spacetime.checks import check_choice, check_int, check_number, did_you_mean, is_int

logger = logging.getLogger(__name__)

__all__ = ["STAGES", "Cascade", "StageOptions"]

STAGES = ("base", "interp", "sr")


@dataclasses.dataclass
class StageOptions:
    """How one stage samples. `steps` None: the process's default (50, or fewer timesteps);
    `eta` None: the sampler's. `noise_level` and `back_projection` are for the SR stage
    (`SuperResolution.sample`), None: the stage's own default. `window` is for the
    interpolation stage: given frames per call (`windowed_interpolation`, windows sharing a
    given frame); None: as many as the frames it was trained on hold."""

    sampler: str = "ddim"
    steps: int | None = None
    cond_scale: float | int = 1.0
    eta: float | int | None = None
    noise_level: float | int | None = None
    back_projection: int = 0
    window: int | None = None

    def __post_init__(self) -> None:
        from diffusion.samplers import available

        check_choice("sampler", self.sampler, available())
        if self.steps is not None:
            check_int("steps", self.steps, low=1)
        check_number("cond_scale", float(self.cond_scale) if is_int(self.cond_scale) else self.cond_scale, low=0.0)
        if self.eta is not None:
            check_number("eta", float(self.eta) if is_int(self.eta) else self.eta, low=0.0)
        if self.noise_level is not None:
            level = float(self.noise_level) if is_int(self.noise_level) else self.noise_level
            check_number("noise_level", level, low=0.0, high=1.0)
        check_int("back_projection", self.back_projection, low=0)
        if self.window is not None:
            check_int("window", self.window, low=2)

    @classmethod
    def from_sample_config(cls, sample: Any) -> StageOptions:
        """A run's `sample:` section (`diffusion.config.SampleConfig`) as stage options."""
        return cls(sampler=sample.sampler, steps=sample.steps, cond_scale=sample.cond_scale, eta=sample.eta)

    def updated(self, changes: dict[str, Any]) -> StageOptions:
        """A copy with `changes` applied (unknown keys raise ValueError naming the allowed ones)."""
        fields = [f.name for f in dataclasses.fields(self)]
        for key in changes:
            if key not in fields:
                raise ValueError(f"unknown stage option {key!r}{did_you_mean(key, fields)}; allowed: {', '.join(fields)}")
        return dataclasses.replace(self, **changes)

    def sample_kwargs(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "steps": self.steps, "eta": self.eta}


def _process_of(stage: Any) -> Any:
    """The diffusion process inside a stage (a `SuperResolution` wraps one)."""
    return getattr(stage, "process", stage)


def _frame_multiple(process: Any) -> int:
    return int(getattr(process.denoise_fn, "frame_multiple", 1))


class Cascade:
    """base -> interpolation (optional) -> super-resolution (optional); see the module
    docstring. `stride`: the interpolation factor (F base frames become `stride * (F - 1) + 1`);
    None infers it from the frame counts the base and interp stages were trained on.
    `options`: {stage name: `StageOptions` or a dict of its fields}."""

    def __init__(
        self,
        base: Any,
        interp: Any = None,
        sr: Any = None,
        *,
        stride: int | None = None,
        options: dict[str, StageOptions | dict[str, Any]] | None = None,
    ) -> None:
        from diffusion.gaussian import GaussianDiffusion
        from diffusion.super_resolution import SuperResolution

        if not isinstance(base, GaussianDiffusion) or isinstance(base, SuperResolution):
            raise TypeError(f"base must be a GaussianDiffusion or FlowMatching, got {type(base).__name__}")
        if interp is not None:
            if not isinstance(interp, GaussianDiffusion):
                raise TypeError(f"interp must be a GaussianDiffusion or FlowMatching, got {type(interp).__name__}")
            if not getattr(getattr(interp.denoise_fn, "config", None), "frame_cond", False):
                raise ValueError(
                    f"the interp stage's U-Net ({type(interp.denoise_fn).__name__}) was built without frame_cond: "
                    "an interpolation stage is trained with frame masks (frame_cond=True, trainer.frame_masks)"
                )
        if sr is not None and not isinstance(sr, SuperResolution):
            raise TypeError(f"sr must be a SuperResolution stage, got {type(sr).__name__}")
        if stride is None:
            stride = self._infer_stride(base, interp)
        check_int("stride", stride, low=2)
        self.stages: dict[str, Any] = {name: stage for name, stage in zip(STAGES, (base, interp, sr))
                                       if stage is not None}
        self.stride = stride
        self.options: dict[str, StageOptions] = {name: StageOptions() for name in self.stages}
        for name, value in (options or {}).items():
            self.set_options(name, value)
        self._check_compatible()

    @staticmethod
    def _infer_stride(base: Any, interp: Any) -> int:
        """The interpolation factor the interp stage was trained for: its frame count is
        `stride * (F - 1) + 1` of the base's F. Without an interp stage it is unused (4)."""
        if interp is None:
            return 4
        gaps, trained = base.num_frames - 1, interp.num_frames - 1
        if gaps < 1 or trained % gaps or trained // gaps < 2:
            raise ValueError(
                f"cannot infer the interpolation stride: the interp stage was trained on {interp.num_frames} frames, "
                f"the base makes {base.num_frames} (expected stride * ({base.num_frames} - 1) + 1), and its training "
                "masks do not name one stride; pass stride="
            )
        return trained // gaps

    # --- building -------------------------------------------------------------------------

    @classmethod
    def from_runs(
        cls,
        base: str | os.PathLike,
        interp: str | os.PathLike | None = None,
        sr: str | os.PathLike | None = None,
        *,
        weights: str = "ema",
        device: Any = "cpu",
        stride: int | None = None,
        options: dict[str, StageOptions | dict[str, Any]] | None = None,
    ) -> Cascade:
        """Each stage from its training run folder (`diffusion.load_run`), sampled with the
        run's `sample:` defaults unless `options` says otherwise."""
        from diffusion.run import open_run

        loaded = {name: open_run(path, weights, device=device)
                  for name, path in zip(STAGES, (base, interp, sr)) if path is not None}
        defaults = {name: StageOptions.from_sample_config(run.config.sample) for name, run in loaded.items()}
        for name, value in (options or {}).items():
            if name in defaults and isinstance(value, dict):
                defaults[name] = defaults[name].updated(value)
            else:
                defaults[name] = value  # type: ignore[assignment]
        stages = {name: run.diffusion for name, run in loaded.items()}
        if stride is None and "interp" in loaded:
            stride = cls._trained_stride(stages["base"], loaded["interp"].config, stages["interp"])
        return cls(stages["base"], stages.get("interp"), stages.get("sr"), stride=stride, options=defaults)

    @staticmethod
    def _trained_stride(base: Any, interp_config: Any, interp: Any) -> int | None:
        """The stride an interp run was trained for: from the frame counts when they fit
        (`stride * (F - 1) + 1`), else its `trainer.frame_masks` when they name one stride
        (a stage trained on short clips, e.g. 9 frames with every 4th given, fills any
        length). None: undecided (the constructor says so)."""
        gaps, trained = base.num_frames - 1, interp.num_frames - 1
        if gaps >= 1 and trained % gaps == 0 and trained // gaps >= 2:
            return trained // gaps
        masks = getattr(interp_config.trainer, "frame_masks", None)
        strides = masks.get("strides") if isinstance(masks, dict) else None
        if strides is not None and len(set(strides)) == 1 and int(strides[0]) >= 2:
            return int(strides[0])
        return None

    def set_options(self, stage: str, value: StageOptions | dict[str, Any]) -> None:
        """Replace (a `StageOptions`) or update (a dict) the options of `stage`."""
        if stage not in self.stages:
            raise ValueError(f"no stage {stage!r} in this cascade; stages: {', '.join(self.stages)}")
        if isinstance(value, StageOptions):
            self.options[stage] = value
        elif isinstance(value, dict):
            self.options[stage] = self.options[stage].updated(value)
        else:
            raise TypeError(f"options for stage {stage!r} must be a StageOptions or a dict, got {type(value).__name__}")

    def _check_compatible(self) -> None:
        base = self.stages["base"]
        channels, hw, frames = base.channels, tuple(base.image_hw), base.num_frames
        interp = self.stages.get("interp")
        if interp is not None:
            if interp.channels != channels or tuple(interp.image_hw) != hw:
                raise ValueError(
                    f"the interp stage makes {interp.channels}-channel {tuple(interp.image_hw)} videos, the base "
                    f"{channels}-channel {hw}: train the interpolation stage at the base's size"
                )
            frames = self.stride * (frames - 1) + 1
            multiple = _frame_multiple(interp)
            if frames % multiple:
                raise ValueError(f"the interp stage's U-Net takes a multiple of {multiple} frames; stride {self.stride} "
                                 f"makes {frames} from the base's {base.num_frames}")
        sr = self.stages.get("sr")
        if sr is not None:
            if sr.process.channels != channels or tuple(sr.lowres_hw) != hw:
                raise ValueError(
                    f"the sr stage takes {sr.process.channels}-channel {tuple(sr.lowres_hw)} videos, the stage before "
                    f"makes {channels}-channel {hw}: train it with lowres_size equal to the base's image size"
                )
            multiple = _frame_multiple(sr.process)
            if frames % multiple:
                raise ValueError(f"the sr stage's U-Net takes a multiple of {multiple} frames, it would get {frames}")

    # --- shapes -------------------------------------------------------------------------------

    @property
    def num_frames(self) -> int:
        """Frames of the cascade's output."""
        frames = self.stages["base"].num_frames
        return self.stride * (frames - 1) + 1 if "interp" in self.stages else frames

    @property
    def image_hw(self) -> tuple[int, int]:
        """(height, width) of the cascade's output."""
        last = self.stages.get("sr")
        return tuple(last.process.image_hw) if last is not None else tuple(self.stages["base"].image_hw)

    @property
    def interp_window(self) -> int | None:
        """Given frames per call of the interpolation stage: the `window` option, else the
        most that fit the frames it was trained on (a stage trained on 9-frame clips with
        every 4th given fills 29 frames 3 given frames at a time; sampled all at once it
        scored 8 dB lower, `benchmarks/results/cpu-amd-epyc-2026-11-29-interp-speeds.md`)."""
        interp = self.stages.get("interp")
        if interp is None:
            return None
        if self.options["interp"].window is not None:
            return self.options["interp"].window
        return max(2, (interp.num_frames - 1) // self.stride + 1)

    @property
    def is_conditional(self) -> bool:
        return any(_process_of(stage).is_conditional for stage in self.stages.values())

    # --- sampling -------------------------------------------------------------------------------

    def _cond(self, name: str, cond: Any) -> dict[str, Any]:
        """The condition keywords for stage `name`: captions only where the stage takes them."""
        if cond is None or not _process_of(self.stages[name]).is_conditional:
            return {}
        return {"cond": cond, "cond_scale": self.options[name].cond_scale}

    @torch.no_grad()
    def sample(
        self,
        cond: Any = None,
        *,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        return_stages: bool = False,
    ) -> Tensor | dict[str, Tensor]:
        """Videos `(B, C, num_frames, *image_hw)` in [0, 1]: the base sampled for `cond`
        (captions or embeddings, one per video) or `batch_size` unconditional videos, then
        each later stage on the previous one's output. `return_stages=True` gives every
        stage's output by name."""
        from diffusion.frame_masks import windowed_interpolation

        base = self.stages["base"]
        if cond is None and batch_size is None:
            raise ValueError("give cond (one caption per video) or batch_size (unconditional videos)")
        if cond is not None and not self.is_conditional:
            raise ValueError("no stage of this cascade takes a condition; pass batch_size instead of cond")
        if cond is not None and base.is_conditional:
            kwargs: dict[str, Any] = self._cond("base", cond)
        else:
            count = batch_size if batch_size is not None else len(cond)
            check_int("batch_size", count, low=1)
            kwargs = {"batch_size": count}
        outputs: dict[str, Tensor] = {}
        logger.info("cascade: base %s, %s steps", self.options["base"].sampler, self.options["base"].steps)
        video = base.sample(generator=generator, **kwargs, **self.options["base"].sample_kwargs()).clamp(0.0, 1.0)
        outputs["base"] = video
        if "interp" in self.stages:
            options = self.options["interp"]
            logger.info("cascade: interpolation x%d (%d -> %d frames), %s", self.stride, video.shape[2],
                        self.stride * (video.shape[2] - 1) + 1, options.sampler)
            video = windowed_interpolation(self.stages["interp"], video, self.stride, self.interp_window,
                                           generator=generator, **self._cond("interp", cond),
                                           **options.sample_kwargs()).clamp(0.0, 1.0)
            outputs["interp"] = video
        if "sr" in self.stages:
            options = self.options["sr"]
            sr = self.stages["sr"]
            logger.info("cascade: super-resolution %s -> %s, %s", tuple(video.shape[-2:]), tuple(sr.process.image_hw),
                        options.sampler)
            video = sr.sample(video, generator=generator, noise_level=options.noise_level,
                              back_projection=options.back_projection, **self._cond("sr", cond),
                              **options.sample_kwargs())
            outputs["sr"] = video
        return outputs if return_stages else video


def parse_cascade_spec(text: str) -> dict[str, str]:
    """`"base=DIR,interp=DIR,sr=DIR"` -> {stage: folder}; base is required, each stage once."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"--cascade needs base=DIR[,interp=DIR][,sr=DIR], got {text!r}")
    stages: dict[str, str] = {}
    for part in text.split(","):
        name, sep, folder = part.partition("=")
        name, folder = name.strip(), folder.strip()
        if not sep or not folder:
            raise ValueError(f"--cascade entries are STAGE=DIR, got {part!r}")
        if name not in STAGES:
            raise ValueError(f"unknown cascade stage {name!r}{did_you_mean(name, STAGES)}; stages: {', '.join(STAGES)}")
        if name in stages:
            raise ValueError(f"cascade stage {name!r} given twice")
        stages[name] = folder
    if "base" not in stages:
        raise ValueError(f"--cascade needs a base=DIR stage, got {', '.join(stages)}")
    return stages


def parse_stage_option(text: str) -> tuple[str, str, Any]:
    """`"interp.steps=20"` -> ("interp", "steps", 20): the value read as YAML (numbers, null)."""
    key, sep, raw = text.partition("=")
    stage, dot, field = key.strip().partition(".")
    if not sep or not dot or not field:
        raise ValueError(f"--stage-option takes STAGE.KEY=VALUE (e.g. interp.steps=20), got {text!r}")
    if stage not in STAGES:
        raise ValueError(f"unknown cascade stage {stage!r}{did_you_mean(stage, STAGES)}; stages: {', '.join(STAGES)}")
    import yaml

    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        value = value.strip()
    return stage, field, value
