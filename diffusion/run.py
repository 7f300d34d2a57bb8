"""A training run folder, opened from Python: `load_run(path)` -> a ready diffusion process.

    from diffusion import load_run
    diffusion = load_run("runs/demo")                    # EMA weights of the latest checkpoint
    videos = diffusion.sample(cond=["the digit 3 moving up"], cond_scale=5.0, sampler="ddim", steps=50)

A run folder (what `spacetime train` writes) holds `config.json` (the resolved `RunConfig`)
and the Trainer's checkpoints (`checkpoint-*/` with `model.safetensors`, `ema.safetensors`,
`state.pt`, and a `latest` pointer). The process is rebuilt from `config.json` (validated,
memory estimated, before anything is allocated) and loaded with the checkpoint's weights;
strings given as `cond` are encoded by the process's text encoder (the library's offline
default), which is how the run was trained.

This module also assembles runs for the command line (`build_diffusion`, `build_dataset`).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from pathlib import Path
from typing import Any

from diffusion.config import GAUSSIAN_ONLY, ConfigError, RunConfig
from diffusion.config_io import MAX_CONFIG_BYTES, read_config_text
from unets import guards

logger = logging.getLogger(__name__)

__all__ = ["CONFIG_NAME", "RESUME_HONOURED", "LoadedRun", "build_dataset", "build_diffusion",
           "latest_checkpoint", "load_run", "open_run", "read_run_config", "resume_conflicts"]

CONFIG_NAME = "config.json"
WEIGHTS = ("ema", "model")
CHECKPOINT_PREFIX = "checkpoint-"
LATEST = "latest"


def read_run_config(path: str | os.PathLike) -> RunConfig:
    """The `RunConfig` in a run's `config.json` (a regular UTF-8 file, size and depth bounded)."""
    from diffusion.config import normalise

    path = Path(path)
    text = guards.read_text(path, what="run config", max_bytes=MAX_CONFIG_BYTES)
    data = read_config_text(text, suffix=".json", what=f"run config {str(path)!r}")
    try:
        return RunConfig.from_dict(normalise(data))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The run's newest complete checkpoint folder, or None: the Trainer's own rule
    (`CheckpointManager.latest`: the folder `latest` names inside the run, else the newest
    complete `checkpoint-*`)."""
    from diffusion.checkpoint import CheckpointManager

    return CheckpointManager(Path(run_dir)).latest()


def run_traces(run_dir: Path) -> list[str]:
    """What a run folder holds of an earlier run besides its config (metrics, checkpoint
    folders, a `latest` pointer): work that starting again at step 0 would overwrite."""
    found = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    folders = sorted(p.name for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*"))
    if folders:
        found.append(f"checkpoint folders ({', '.join(folders[:3])}{', ...' if len(folders) > 3 else ''})")
    if (run_dir / LATEST).exists() or (run_dir / LATEST).is_symlink():
        found.append(LATEST)
    return found


def build_diffusion(config: RunConfig, *, unet_config: Any = None) -> Any:
    """The `GaussianDiffusion` or `FlowMatching` (`diffusion.process`), with its U-Net, that
    `config` describes; with a `super_resolution` section, the `SuperResolution` stage
    around it."""
    import unets

    from diffusion.flow import FlowMatching
    from diffusion.gaussian import GaussianDiffusion

    options = config.diffusion.to_dict()
    flow = options.pop("process") == "flow"
    # Each process gets only its own options (those of the other are at their defaults).
    for key in GAUSSIAN_ONLY if flow else ("timestep_sampling", "shift"):
        options.pop(key)
    process = FlowMatching if flow else GaussianDiffusion
    if config.pretrained is not None:
        from diffusion.pretrained import build_pretrained_diffusion

        return build_pretrained_diffusion(config.pretrained, options, process=process)
    net = unets.build(unet_config if unet_config is not None else config.unet.unet_config())
    if config.super_resolution is not None:
        from diffusion.super_resolution import SuperResolution

        return SuperResolution(process(net, **options), **config.super_resolution.options())
    return process(net, **options)


def build_dataset(config: RunConfig) -> Any:
    """The training data set of `config.data`, at the process's video shape."""
    video = {k: getattr(config.diffusion, k) for k in ("image_size", "num_frames", "channels")}
    options = config.data.given()
    if config.data.kind == "moving-digits":
        from diffusion.moving_digits import MovingDigits

        return MovingDigits(options.pop("num_videos", 2000), **video, **options)
    from diffusion.data import VideoFolder

    return VideoFolder(options.pop("folder"), **video, **options)


@dataclasses.dataclass
class LoadedRun:
    """A run opened for sampling: its config, the checkpoint read and the ready process."""

    config: RunConfig
    run_dir: Path
    checkpoint: Path
    diffusion: Any


def find_checkpoint(path: str | os.PathLike) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) for a run folder or one of its checkpoint folders."""
    path = Path(path)
    if not path.exists():
        # With errno and the path, like the OS's own: the command line shows it as one line.
        raise FileNotFoundError(errno.ENOENT, "run folder does not exist", str(path))
    if (path.parent / CONFIG_NAME).is_file() and path.name.startswith(CHECKPOINT_PREFIX):
        from diffusion.checkpoint import CheckpointManager

        if not CheckpointManager(path.parent).is_complete(path):
            raise ConfigError(f"{path} is not a complete checkpoint (state.pt and model.safetensors)")
        return path.parent, path
    if (path / CONFIG_NAME).exists():
        folder = latest_checkpoint(path)
        if folder is None:
            raise ConfigError(f"{path} has no complete checkpoint yet (checkpoint-*/ with state.pt)")
        return path, folder
    raise ConfigError(
        f"{path} is neither a training run folder (with {CONFIG_NAME}) nor one of its checkpoint-* folders"
    )


def weights_mismatch(config_file: Path, weights: Path | None, err: RuntimeError) -> str:
    """One line for `load_state_dict`'s refusal of weights the config does not describe."""
    first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
    return f"{config_file} no longer matches the weights in {weights}: {first}"


def open_run(path: str | os.PathLike, weights: str = "ema", *, device: Any = "cpu") -> LoadedRun:
    """`load_run` with the run's config and the checkpoint folder it read (see `LoadedRun`)."""
    from diffusion import checkpoint as ckpt

    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(map(repr, WEIGHTS))}, got {weights!r}")
    run_dir, folder = find_checkpoint(path)
    config = read_run_config(run_dir / CONFIG_NAME)
    diffusion = build_diffusion(config)
    file = folder / f"{weights}.safetensors"
    guards.regular_file(file, what="weights file")
    state = ckpt.load_tensors(file)
    try:
        diffusion.load_state_dict(state)
    except RuntimeError as err:
        raise ConfigError(weights_mismatch(run_dir / CONFIG_NAME, file, err)) from None
    diffusion.to(device).eval()
    return LoadedRun(config=config, run_dir=run_dir, checkpoint=folder, diffusion=diffusion)


def load_run(path: str | os.PathLike, weights: str = "ema", *, device: Any = "cpu") -> Any:
    """A training run folder (or one of its `checkpoint-*` folders) -> a ready
    `GaussianDiffusion` in eval mode on `device`, with its U-Net, the checkpoint's `weights`
    ("ema": the averaged weights, or "model") and its text encoder, so that
    `.sample(cond=["a caption"], cond_scale=...)` works. A run folder gives its latest
    complete checkpoint. A flow-matching run (`diffusion.process: flow`) gives a
    `FlowMatching`; a run with a `super_resolution` section the `SuperResolution` stage
    (`.sample(lowres, ...)`)."""
    return open_run(path, weights, device=device).diffusion


# ---------------------------------------------------------------------------------------
# resuming with changed settings

# Trainer settings a resumed run takes from the new config. Everything else (the U-Net,
# the process, the data, the optimizer and EMA settings, the batch and seed that fix the
# data order) is what the checkpoint was trained with: a change is refused, naming the key.
# `train_num_steps` may grow or shrink; a decaying learning rate is then planned over the
# new length from the resumed step on.
RESUME_HONOURED = (
    "train_num_steps", "max_seconds", "save_and_sample_every", "save_model_every", "log_every",
    "num_sample_rows", "sample_captions", "sample_kwargs", "cond_scale", "write_mp4", "fps", "num_workers",
    "compile", "text_cache_dir", "results_folder", "find_unused_parameters", "parallel", "latent_cache_dir",
    "optimizer_in_backward",  # the same AdamW state either way (diffusion.fused_step)
)


def resume_conflicts(saved: RunConfig, new: RunConfig) -> list[str]:
    """Dotted keys whose value differs between a run's saved config and the config it is
    resumed with, and that a resumed run cannot honour (see `RESUME_HONOURED`). Each entry
    reads `key (saved value -> new value)`."""
    out = []
    if (saved.pretrained is None) != (new.pretrained is None) or saved.pretrained is not None:
        old_base = saved.pretrained.to_dict() if saved.pretrained is not None else None
        new_base = new.pretrained.to_dict() if new.pretrained is not None else None
        if old_base != new_base:
            out.append(f"pretrained ({old_base!r} -> {new_base!r})")
        saved_unet = new_unet = {}
    else:
        saved_unet = saved.unet.unet_config().to_dict()
        new_unet = new.unet.unet_config().to_dict()
    for key in sorted(set(saved_unet) | set(new_unet)):
        if saved_unet.get(key) != new_unet.get(key):
            out.append(f"model.{key} ({saved_unet.get(key)!r} -> {new_unet.get(key)!r})")
    old_sr, new_sr = (None if c.super_resolution is None else c.super_resolution.to_dict() for c in (saved, new))
    if old_sr != new_sr:
        out.append(f"super_resolution ({old_sr!r} -> {new_sr!r})")
    for section in ("diffusion", "trainer", "data"):
        old, now = getattr(saved, section).to_dict(), getattr(new, section).to_dict()
        for key in sorted(set(old) | set(now)):
            if section == "trainer" and key in RESUME_HONOURED:
                continue
            if old.get(key) != now.get(key):
                out.append(f"{section}.{key} ({old.get(key)!r} -> {now.get(key)!r})")
    return out
