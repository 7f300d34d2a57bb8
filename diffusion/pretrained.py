"""Pretrained bases from local diffusers folders: a run config's `pretrained` section.

    pretrained:
      path: models/sd15            # a diffusers pipeline folder: unet/ vae/ text_encoder/ tokenizer/
      # or any of these separately (each overrides the folder of the same name under path):
      unet: ..., vae: ..., text_encoder: ..., tokenizer: ..., scheduler: ...
      motion_adapter: models/mm_sd_v15_v2   # AnimateDiff: a MotionAdapter folder or mm_*.ckpt file
      gradient_checkpointing: false
      inflate: {heads: 8, dim_head: 64}   # spacetime.inflate options for a 2D U-Net
      lora_rank: 0                 # > 0: LoRA on the 2D attention projections (peft)
      null_cond: empty             # the guidance null: the empty caption's tokens, or "zeros"

A video U-Net (`UNet3DConditionModel`: ModelScope, zeroscope; `UNetMotionModel`; or a
`UNet2DConditionModel` with a motion adapter, given as `motion_adapter` or found as
`motion_adapter/` in the pipeline folder: AnimateDiff) becomes this library's model
(`unets.from_diffusers`, held by `diffusion.pretrained_video.PretrainedVideoUnet`); the
trainer's `trainable: auto` then trains its temporal layers only. Any other 2D U-Net
(`UNet2DConditionModel`, `UNet2DModel`) is inflated (`spacetime.inflate`) and reaches the
process through `diffusion.as_denoiser`. A `scheduler/` folder fixes the betas of the process
(`diffusion.pretrained_video.read_scheduler`); `diffusion.timesteps` and `diffusion.objective`
must then agree with it. With a VAE the process runs in its latent space (`diffusion.latent`);
with a text encoder (the SD-1.x CLIP layout) captions condition the U-Net's cross-attention.

Everything is checked from the folders' `config.json` files before any weights are read: a
missing folder or file, a layout that is not a diffusers one, a U-Net class this library
cannot drive, or a VAE whose latent channels differ from the U-Net's input channels is one
`ConfigError` naming the path. Folders are read with `local_files_only=True`: nothing is
downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, no_type_check

from diffusion.config import (
    ConfigError,
    ConfigTypeError,
    Section,
    _bool,
    _choice,
    _int,
    _number,
    _string,
)
from unets import guards

__all__ = ["PARTS", "PretrainedSection", "build_pretrained_diffusion", "resolve_parts"]

logger = logging.getLogger(__name__)

PARTS = ("unet", "vae", "text_encoder", "tokenizer")
UNET_2D = ("UNet2DConditionModel", "UNet2DModel")
UNET_VIDEO = ("UNet3DConditionModel", "UNetMotionModel")
MOTION_ADAPTER = "MotionAdapter"
# Original AnimateDiff motion modules (read with weights_only=True or safetensors).
MOTION_FILES = (".ckpt", ".pt", ".pth", ".safetensors", ".bin")
NULL_CONDS = ("empty", "zeros")
_MAX_JSON = 1024 * 1024


@no_type_check  # values come from files: __post_init__ checks them, naming the key
@dataclasses.dataclass(kw_only=True)
class PretrainedSection(Section):
    """The `pretrained` section (see the module docstring)."""

    key = "pretrained"
    path: str | None = None
    unet: str | None = None
    vae: str | None = None
    text_encoder: str | None = None
    tokenizer: str | None = None
    inflate: dict[str, Any] = dataclasses.field(default_factory=dict)
    lora_rank: int = 0
    lora_alpha: float | None = None
    null_cond: str = "empty"
    vae_chunk_size: int = 16
    scheduler: str | None = None
    motion_adapter: str | None = None
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        p = "pretrained."
        _bool(p + "gradient_checkpointing", self.gradient_checkpointing)
        for name in ("path", "scheduler", "motion_adapter") + PARTS:
            _string(p + name, getattr(self, name), optional=True)
        if self.path is None and self.unet is None:
            raise ConfigError("pretrained needs path (a diffusers pipeline folder) or unet (a U-Net folder)")
        if not isinstance(self.inflate, dict):
            raise ConfigTypeError(f"pretrained.inflate must be a mapping of spacetime.inflate options, got {self.inflate!r}")
        _int(p + "lora_rank", self.lora_rank, 0)
        if self.lora_alpha is not None:
            _number(p + "lora_alpha", self.lora_alpha, 0, low_open=True)
        _choice(p + "null_cond", self.null_cond, NULL_CONDS)
        _int(p + "vae_chunk_size", self.vae_chunk_size, 1)


def _read_config(folder: Path, part: str) -> dict[str, Any]:
    file = folder / "config.json"
    try:
        text = guards.read_text(file, what=f"pretrained.{part} config", max_bytes=_MAX_JSON)
    except FileNotFoundError:
        raise ConfigError(
            f"pretrained.{part}: {str(folder)!r} has no config.json; expected a diffusers {part} folder "
            f"(saved with save_pretrained)"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"pretrained.{part}: {str(file)!r} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"pretrained.{part}: {str(file)!r} must hold a JSON object")
    return data


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def resolve_parts(section: PretrainedSection) -> dict[str, Path | None]:
    """The folder of each part (None: not used), checked: it exists and holds a config and
    weights (the tokenizer its vocabulary)."""
    base = Path(section.path).expanduser() if section.path is not None else None
    if base is not None and not base.is_dir():
        raise ConfigError(f"pretrained.path {section.path!r} is not a local folder")
    if base is not None and section.unet is None and not (base / "unet").is_dir():
        found = sorted(p.name for p in base.iterdir() if p.is_dir())[:8]
        raise ConfigError(
            f"pretrained.path {section.path!r} is not a diffusers pipeline folder: no unet/ in it "
            f"(found {found or 'no folders'}); expected unet/, vae/, text_encoder/, tokenizer/"
        )
    parts: dict[str, Path | None] = {}
    for part in PARTS:
        given = getattr(section, part)
        if given is not None:
            folder = Path(given).expanduser()
            if not folder.is_dir():
                raise ConfigError(f"pretrained.{part} {given!r} is not a local folder")
        elif base is not None and (base / part).is_dir():
            folder = base / part
        else:
            folder = None
        parts[part] = folder
    for part in ("unet", "vae", "text_encoder"):
        folder = parts[part]
        if folder is not None:
            _read_config(folder, part)
            if not _has_weights(folder):
                raise ConfigError(f"pretrained.{part}: {str(folder)!r} holds no weights (*.safetensors or *.bin)")
    if parts["text_encoder"] is not None and parts["tokenizer"] is None:
        raise ConfigError("pretrained: a text_encoder needs its tokenizer folder (tokenizer/ beside it, or pretrained.tokenizer)")
    if parts["tokenizer"] is not None and not (parts["tokenizer"] / "vocab.json").is_file():
        raise ConfigError(f"pretrained.tokenizer: {str(parts['tokenizer'])!r} has no vocab.json (a CLIP tokenizer folder)")
    parts["scheduler"] = _optional_folder(section, base, "scheduler")
    if parts["scheduler"] is not None and not (parts["scheduler"] / "scheduler_config.json").is_file():
        raise ConfigError(f"pretrained.scheduler: {str(parts['scheduler'])!r} has no scheduler_config.json")
    parts["motion_adapter"] = _motion_adapter(section, base, parts["unet"])
    return parts


def _optional_folder(section: PretrainedSection, base: Path | None, part: str) -> Path | None:
    given = getattr(section, part)
    if given is not None:
        folder = Path(given).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"pretrained.{part} {given!r} is not a local folder")
        return folder
    return base / part if base is not None and (base / part).is_dir() else None


def _motion_adapter(section: PretrainedSection, base: Path | None, unet: Path) -> Path | None:
    """The motion adapter: a `MotionAdapter` folder or an original motion-module file, checked;
    None for a U-Net that is not a `UNet2DConditionModel` unless one was asked for."""
    given = section.motion_adapter
    kind = _read_config(unet, "unet").get("_class_name")
    if given is None:
        found = base / "motion_adapter" if base is not None and (base / "motion_adapter").is_dir() else None
        # An AnimateDiff pipeline saves its UNetMotionModel beside the adapter it holds already.
        return found if found is not None and kind == "UNet2DConditionModel" else None
    if kind != "UNet2DConditionModel":
        raise ConfigError(f"pretrained.motion_adapter goes with a UNet2DConditionModel U-Net; "
                          f"{str(unet)!r} holds a {kind}")
    path = Path(given).expanduser()
    if path.is_file():
        if path.suffix not in MOTION_FILES:
            raise ConfigError(f"pretrained.motion_adapter {given!r} is a file but not a motion-module checkpoint "
                              f"({', '.join(MOTION_FILES)})")
        return path
    if not path.is_dir():
        raise ConfigError(f"pretrained.motion_adapter {given!r} is neither a local folder nor a file")
    return path


def _check_motion_adapter(folder: Path) -> None:
    if folder.is_file():
        return
    holds = _read_config(folder, "motion_adapter").get("_class_name")
    if holds != MOTION_ADAPTER:
        raise ConfigError(f"pretrained.motion_adapter: {str(folder)!r} holds a {holds}; accepted: {MOTION_ADAPTER}")
    if not _has_weights(folder):
        raise ConfigError(f"pretrained.motion_adapter: {str(folder)!r} holds no weights (*.safetensors or *.bin)")


def _check_scheduler(folder: Path, diffusion: Any) -> None:
    from diffusion.pretrained_video import read_scheduler

    process = read_scheduler(folder)
    if process.timesteps != diffusion.timesteps:
        raise ConfigError(f"diffusion.timesteps={diffusion.timesteps} but the pipeline's scheduler ({process.source}) "
                          f"has num_train_timesteps={process.timesteps}; set diffusion.timesteps: {process.timesteps}")
    if process.objective != diffusion.objective:
        raise ConfigError(f"diffusion.objective={diffusion.objective!r} but the pipeline's scheduler "
                          f"({process.source}) predicts {process.objective!r}; set diffusion.objective: "
                          f"{process.objective}")


def check_pretrained(section: PretrainedSection, diffusion: Any) -> None:
    """Every check that needs only the config files (see the module docstring)."""
    parts = resolve_parts(section)
    unet = _read_config(parts["unet"], "unet")
    kind = unet.get("_class_name")
    if kind not in UNET_2D + UNET_VIDEO:
        raise ConfigError(
            f"pretrained.unet: {kind!r} in {str(parts['unet'] / 'config.json')!r} is not a U-Net this library "
            f"drives; allowed: {', '.join(UNET_2D + UNET_VIDEO)}"
        )
    in_channels = unet.get("in_channels")
    if parts["vae"] is not None:
        vae = _read_config(parts["vae"], "vae")
        latent = vae.get("latent_channels")
        if latent != in_channels:
            raise ConfigError(
                f"pretrained: the VAE ({parts['vae']}) makes {latent}-channel latents but the U-Net "
                f"({parts['unet']}) takes in_channels={in_channels}; use the VAE of the U-Net's base model"
            )
        if vae.get("in_channels", 3) != diffusion.channels:
            raise ConfigError(
                f"diffusion.channels={diffusion.channels} but the VAE takes {vae.get('in_channels', 3)}-channel images"
            )
        factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
        if diffusion.image_size % factor:
            raise ConfigError(
                f"diffusion.image_size must be a multiple of {factor} (the VAE's downsampling), got {diffusion.image_size}"
            )
    elif in_channels != diffusion.channels:
        raise ConfigError(
            f"pretrained: no VAE, so the U-Net works on pixels, but its in_channels={in_channels} differ from "
            f"diffusion.channels={diffusion.channels}"
        )
    cross = unet.get("cross_attention_dim")
    if cross is not None and parts["text_encoder"] is None:
        raise ConfigError(
            f"pretrained: the U-Net cross-attends to text (cross_attention_dim={cross}) but no text_encoder "
            "folder was found; give pretrained.text_encoder and pretrained.tokenizer"
        )
    if parts["text_encoder"] is not None:
        text = _read_config(parts["text_encoder"], "text_encoder")
        hidden = text.get("hidden_size")
        if cross is not None and hidden != cross:
            raise ConfigError(
                f"pretrained: the text encoder's hidden_size={hidden} differs from the U-Net's cross_attention_dim={cross}"
            )
    video = kind in UNET_VIDEO or parts["motion_adapter"] is not None
    if section.lora_rank and video:
        what = "an AnimateDiff U-Net (a motion adapter)" if kind not in UNET_VIDEO else f"a {kind}"
        raise ConfigError(f"pretrained.lora_rank applies to inflated 2D U-Nets, not to {what}")
    if section.inflate and video:
        raise ConfigError("pretrained.inflate applies to 2D U-Nets; a video U-Net (or one with a motion adapter) "
                          "already has its temporal layers")
    if parts["motion_adapter"] is not None:
        _check_motion_adapter(parts["motion_adapter"])
    if parts["scheduler"] is not None:
        _check_scheduler(parts["scheduler"], diffusion)


def _load(part: str, cls_name: str, folder: Path) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import diffusers
    except ImportError as err:
        raise ModuleNotFoundError(
            "pretrained diffusers models need diffusers: pip install 'spacetime-video[diffusers]'", name="diffusers"
        ) from err
    cls = getattr(diffusers, cls_name)
    try:
        return cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"pretrained.{part}: cannot load {cls_name} from {str(folder)!r}: {first}") from None


def build_pretrained_diffusion(section: PretrainedSection, diffusion_options: dict[str, Any], *,
                               process: type | None = None) -> Any:
    """The process of a pretrained run (see the module docstring): `process` is
    `GaussianDiffusion` (the default) or `FlowMatching`, built with `diffusion_options`."""
    from diffusion.gaussian import GaussianDiffusion

    process = GaussianDiffusion if process is None else process
    parts = resolve_parts(section)
    kind = _read_config(parts["unet"], "unet")["_class_name"]
    if kind in UNET_VIDEO or parts["motion_adapter"] is not None:
        from diffusion.pretrained_video import video_unet

        model = video_unet(parts["unet"], parts["motion_adapter"],
                           gradient_checkpointing=section.gradient_checkpointing)
    else:
        unet = _load("unet", kind, parts["unet"])
        from spacetime import inflate

        try:
            model = inflate(unet, **section.inflate)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"pretrained.inflate: {err}") from None
        if section.lora_rank:
            from diffusion.lora import add_spatial_lora

            add_spatial_lora(model, rank=section.lora_rank, alpha=section.lora_alpha)
        if section.gradient_checkpointing:
            model.enable_gradient_checkpointing()
    vae = _load("vae", "AutoencoderKL", parts["vae"]) if parts["vae"] is not None else None
    text_encoder = None
    if parts["text_encoder"] is not None:
        from diffusion.text import CLIPTextEncoder

        text_encoder = CLIPTextEncoder(parts["text_encoder"], tokenizer_path=parts["tokenizer"])
    if vae is not None:
        from diffusion.latent import VideoVAE

        vae = VideoVAE(vae, chunk_size=section.vae_chunk_size)
    diffusion = process(model, vae=vae, text_encoder=text_encoder, **diffusion_options)
    # A flow-matching fine-tune of a DDPM base has no use for the base's noise schedule.
    if parts["scheduler"] is not None and process is GaussianDiffusion:
        from diffusion.pretrained_video import read_scheduler, use_schedule

        use_schedule(diffusion, read_scheduler(parts["scheduler"]))
    if text_encoder is not None and section.null_cond == "empty" and diffusion.cond_format == "tokens":
        diffusion.use_empty_caption_null()
    return diffusion


def pretrained_run(cls: type, data: dict[str, Any]) -> Any:
    """A `RunConfig` (`cls`) for a config with a `pretrained` section: the U-Net comes from
    its folder, so `unet`, `unet_preset` and `model` must not be given."""
    from diffusion.config import DataConfig, DiffusionConfig, SampleConfig, TrainerConfig

    given = [key for key in ("unet", "unet_preset", "model") if data.get(key)]
    if given:
        raise ConfigError(
            f"config has a pretrained section and {', '.join(given)}: the U-Net comes from pretrained; remove {given[0]}"
        )
    return cls(
        unet=None,
        diffusion=DiffusionConfig.from_dict(data.get("diffusion")),
        trainer=TrainerConfig.from_dict(data.get("trainer")),
        data=DataConfig.from_dict(data.get("data")),
        sample=SampleConfig.from_dict(data.get("sample")),
        pretrained=PretrainedSection.from_dict(data.get("pretrained")),
    )


def check_pretrained_run(run: Any) -> None:
    """`RunConfig.__post_init__` for a pretrained run: the folders against the process."""
    if not isinstance(run.pretrained, PretrainedSection):
        raise ConfigTypeError(f"pretrained must be a PretrainedSection, got {type(run.pretrained).__name__}")
    d, t = run.diffusion, run.trainer
    if t.num_frames is not None and t.num_frames != d.num_frames:
        raise ConfigError(
            f"trainer.num_frames={t.num_frames} differs from diffusion.num_frames={d.num_frames}; "
            "set only diffusion.num_frames"
        )
    if run.data.kind == "moving-digits" and d.channels not in (1, 3):
        raise ConfigError(f"moving digits have 1 or 3 channels; diffusion.channels is {d.channels}")
    steps = run.sample.steps
    if steps is not None and steps > d.timesteps:
        raise ConfigError(f"sample.steps must be at most diffusion.timesteps={d.timesteps}, got {steps}")
    check_pretrained(run.pretrained, d)
