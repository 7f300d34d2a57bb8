"""Frame interpolation scored against held-out ground truth (`spacetime eval --interp RUN`).

A frame-interpolation stage (`diffusion.frame_masks.temporal_super_resolution`) is given every
`stride`-th frame of a video and fills in the rest. On moving digits the frames it should
produce are known: the held-out videos are rendered at the stage's own frame rate
(`MovingDigits`, a data seed the run did not train on), their every `stride`-th frame is the
input, and the frames in between are the truth. The score is the PSNR (pixels in [0, 1]) over
those in-between frames only (the given ones come back exactly and would only inflate it),
one value per video, averaged with a normal 95% interval of the mean (capped at `MAX_PSNR`
for a perfect video), and the PSNR of the mean squared error over all videos (`pooled_gain`).

The baseline is linear blending: frame `i * stride + j` as `(1 - j / stride)` times the given
frame before it plus `j / stride` times the one after. The gain (model minus blending, paired
per video) says whether the network does better than cross-fading, which on sub-pixel motion
of about a pixel between given frames is already close (docs/design.md).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import Tensor

from diffusion.evaluate import mean_interval
from diffusion.frame_masks import interpolation_mask, temporal_super_resolution, windowed_interpolation  # noqa: F401
from spacetime.checks import check_int, check_number

logger = logging.getLogger(__name__)

__all__ = [
    "HELD_OUT_SEED",
    "MAX_PSNR",
    "evaluate_interpolation_run",
    "interpolation_scores",
    "interpolation_table",
    "linear_blend",
    "pooled_gain",
    "psnr_per_video",
    "windowed_interpolation",
]

# A perfect prediction has infinite PSNR; capped so that means and JSON stay finite.
MAX_PSNR = 100.0
# Default data seed of the held-out videos (training data sets use small seeds, 0 by default).
HELD_OUT_SEED = 1_000_003


def _check_video(name: str, video: Any) -> None:
    if not isinstance(video, Tensor) or video.ndim != 5:
        got = tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__
        raise ValueError(f"{name} must be a video batch (B, C, F, H, W), got {got}")


def _check_layout(frames: int, stride: int) -> None:
    check_int("stride", stride, low=1)
    if frames < stride + 1 or (frames - 1) % stride:
        raise ValueError(
            f"interpolation by stride {stride} needs stride * (F - 1) + 1 frames (F >= 2), e.g. "
            f"{stride + 1}, {2 * stride + 1}, ...; got {frames}"
        )


def linear_blend(video: Tensor, stride: int) -> Tensor:
    """The linear-blending baseline: `video` (B, C, T, H, W) with T = stride * (F - 1) + 1,
    every frame off the stride grid replaced by the blend of the two grid frames around it."""
    _check_video("video", video)
    _check_layout(video.shape[2], stride)
    given = video[:, :, ::stride]
    before, after = given[:, :, :-1], given[:, :, 1:]
    weights = torch.arange(stride, dtype=video.dtype, device=video.device) / stride
    w = weights.view(1, 1, 1, stride, 1, 1)
    # (B, C, F - 1, stride, H, W): the stride frames starting at each given one
    blended = (1 - w) * before.unsqueeze(3) + w * after.unsqueeze(3)
    out = blended.flatten(2, 3)
    return torch.cat((out, given[:, :, -1:]), dim=2)


def psnr_per_video(prediction: Tensor, truth: Tensor, frames: Tensor | None = None) -> Tensor:
    """PSNR in dB of each video (pixels in [0, 1]) over the frames where `frames` (T,) bool
    is True (default all), capped at `MAX_PSNR`."""
    _check_video("prediction", prediction)
    _check_video("truth", truth)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and truth {tuple(truth.shape)} must have one shape")
    if frames is not None:
        if frames.dtype != torch.bool or tuple(frames.shape) != (truth.shape[2],) or not bool(frames.any()):
            raise ValueError(f"frames must be a ({truth.shape[2]},) bool mask with at least one True, got "
                             f"{frames.dtype} {tuple(frames.shape)}")
        prediction, truth = prediction[:, :, frames.to(truth.device)], truth[:, :, frames.to(truth.device)]
    mse = (prediction.double() - truth.double()).pow(2).flatten(1).mean(dim=1)
    floor = 10.0 ** (-MAX_PSNR / 10.0)
    return (10.0 * torch.log10(1.0 / mse.clamp(min=floor))).float()


def _summary(values: Tensor) -> dict[str, Any]:
    listed = [float(v) for v in values]
    return {"mean": sum(listed) / len(listed), "interval": list(mean_interval(listed)), "per_video": listed}


def _pooled_psnr(mse: Tensor) -> Tensor:
    return 10.0 * torch.log10(1.0 / mse.mean(dim=-1).clamp(min=10.0 ** (-MAX_PSNR / 10.0)))


def pooled_gain(model_psnr: Tensor, linear_psnr: Tensor, *, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """PSNR of the mean squared error over all videos (the data set's PSNR, which a few
    perfect videos cannot dominate as they do a mean of per-video PSNRs), for the model and
    for blending, and their difference, each with a 95% bootstrap interval over videos."""
    model_mse, linear_mse = 10.0 ** (-model_psnr.double() / 10.0), 10.0 ** (-linear_psnr.double() / 10.0)
    rows = torch.randint(len(model_mse), (resamples, len(model_mse)), generator=torch.Generator().manual_seed(seed))
    boot_model, boot_linear = _pooled_psnr(model_mse[rows]), _pooled_psnr(linear_mse[rows])
    out = {}
    for key, value, boot in (("model_psnr", _pooled_psnr(model_mse), boot_model),
                             ("linear_psnr", _pooled_psnr(linear_mse), boot_linear),
                             ("gain_db", _pooled_psnr(model_mse) - _pooled_psnr(linear_mse), boot_model - boot_linear)):
        low, high = torch.quantile(boot.float(), torch.tensor([0.025, 0.975])).tolist()
        out[key] = {"value": float(value), "interval": [low, high]}
    return out


def interpolation_scores(
    process: Any,
    truth: Tensor,
    stride: int,
    *,
    batch_size: int = 16,
    seed: int = 0,
    groups: dict[str, Tensor] | None = None,
    window: int | None = None,
    **sample_options: Any,
) -> dict[str, Any]:
    """Score `process` as a frame-interpolation stage on ground-truth videos `truth`
    (B, C, T, H, W) in [0, 1], T = stride * (F - 1) + 1: it is given every `stride`-th frame
    (`temporal_super_resolution`, given frames put back) and scored on the others, beside
    linear blending. `sample_options` go to `process.sample` (`sampler`, `steps`, `fps`...).
    Returns `model_psnr`, `linear_psnr` and `gain_db` (model minus blending, paired), each
    with `mean`, `interval` (95%) and `per_video`; `pooled` (`pooled_gain`); the counts; and
    for each of `groups` (name -> (B,) bool, the videos in it) its `pooled_gain`. `window`:
    given frames per call of the stage (`windowed_interpolation`; None: all at once)."""
    _check_video("truth", truth)
    _check_layout(truth.shape[2], stride)
    check_int("batch_size", batch_size, low=1)
    between = ~interpolation_mask(truth.shape[2], stride)
    generator = torch.Generator().manual_seed(seed)
    device = process.betas.device
    model, linear = [], []
    for start in range(0, truth.shape[0], batch_size):
        chunk = truth[start : start + batch_size].to(device)
        sampled = windowed_interpolation(process, chunk[:, :, ::stride], stride, window, generator=generator,
                                         **sample_options)
        model.append(psnr_per_video(sampled.clamp(0, 1), chunk, between).cpu())
        linear.append(psnr_per_video(linear_blend(chunk, stride), chunk, between).cpu())
        logger.info("interpolation: scored %d of %d videos", min(start + batch_size, truth.shape[0]), truth.shape[0])
    model_psnr, linear_psnr = torch.cat(model), torch.cat(linear)
    return {
        "num_videos": int(truth.shape[0]),
        "stride": stride,
        "window": window,
        "frames": int(truth.shape[2]),
        "in_between_frames": int(between.sum()),
        "model_psnr": _summary(model_psnr),
        "linear_psnr": _summary(linear_psnr),
        "gain_db": _summary(model_psnr - linear_psnr),
        "pooled": pooled_gain(model_psnr, linear_psnr),
        "groups": {name: {"num_videos": int(rows.sum()), **pooled_gain(model_psnr[rows], linear_psnr[rows])}
                   for name, rows in (groups or {}).items() if bool(rows.any())},
    }


def evaluate_interpolation_run(
    run: str | os.PathLike,
    *,
    num_videos: int = 32,
    stride: int = 4,
    data_seed: int = HELD_OUT_SEED,
    seed: int = 0,
    sampler: str | None = None,
    steps: int | None = None,
    batch_size: int = 16,
    weights: str = "ema",
    device: Any = "cpu",
    speed: float | int | None = None,
    num_frames: int | None = None,
    window: int | None = None,
) -> dict[str, Any]:
    """`interpolation_scores` of a training run (folder or checkpoint) on `num_videos`
    held-out moving digits: the run's own data settings (size, digit size, speed or speeds,
    sub-pixel rendering) and video length, drawn with `data_seed`, which must differ from the
    run's training seed. Sampler and steps default to the run's `sample` section.

    `speed` (pixels per output frame) scores every video at that one speed, so given frames
    are `stride * speed` px apart: at 0.25 and stride 4 they are the cascade's base frames,
    1 px apart, where linear blending is near-exact; at 1.0 they are 4 px apart. `num_frames`
    (stride * (F - 1) + 1) overrides the run's video length, e.g. 29 for a run trained on
    9-frame clips. `window` samples the stage on that many given frames at a time
    (`windowed_interpolation`). Results are also split by motion kind and, with mixed speeds,
    by spacing."""
    from diffusion.moving_digits import DIRECTION_NAMES, DIRECTIONS, MovingDigits
    from diffusion.run import open_run

    check_int("num_videos", num_videos, low=1)
    loaded = open_run(run, weights, device=device)
    config, process = loaded.config, loaded.diffusion
    if config.data.kind != "moving-digits":
        raise ValueError(f"--interp scores runs trained on moving digits (data.kind moving-digits), "
                         f"got data.kind {config.data.kind!r}")
    data = config.data.given()
    training_seed = data.pop("seed", 0)
    data.pop("num_videos", None)
    if data_seed == training_seed:
        raise ValueError(f"the held-out data seed must differ from the run's data.seed={training_seed}, got {data_seed}")
    if speed is not None:
        check_number("speed", speed, low=0.0, low_open=True)
        data.pop("speeds", None)
        data["speed"] = speed
    frames = config.diffusion.num_frames if num_frames is None else check_int("num_frames", num_frames, low=2)
    _check_layout(frames, stride)
    videos = MovingDigits(num_videos, image_size=config.diffusion.image_size, num_frames=frames,
                          channels=config.diffusion.channels, seed=data_seed, **data)
    options: dict[str, Any] = {
        "sampler": sampler if sampler is not None else config.sample.sampler,
        "steps": steps if steps is not None else config.sample.steps,
    }
    unet_config = getattr(process.denoise_fn, "config", None)
    if getattr(unet_config, "frame_rate_cond", False):
        if videos.frame_rate is None:
            raise ValueError(f"this run's U-Net takes the frame rate (frame_rate_cond) and its data mixes speeds "
                             f"{videos.speeds}: score one speed at a time (speed=, --speed S)")
        options["fps"] = videos.frame_rate
    # Blending is exact for horizontal and vertical sub-pixel motion of at most a pixel between
    # given frames (docs/design.md): the two kinds of motion are scored apart as well.
    diagonal = torch.tensor([all(DIRECTIONS[DIRECTION_NAMES[k]]) for k in videos.direction_labels])
    kinds = {"horizontal or vertical": ~diagonal, "diagonal": diagonal}
    groups = dict(kinds)
    if videos.speeds is not None:
        spacing = torch.from_numpy(videos.video_speeds * stride)
        for value in sorted(set(spacing.tolist())):
            groups[f"{value:g} px apart"] = spacing == value
            for kind, rows in kinds.items():
                groups[f"{value:g} px apart, {kind}"] = (spacing == value) & rows
    results = interpolation_scores(process, videos.videos(), stride, batch_size=batch_size, seed=seed,
                                   groups=groups, window=window, **options)
    results.update({"run": str(loaded.run_dir), "checkpoint": str(loaded.checkpoint), "data_seed": data_seed,
                    "sampler": options["sampler"], "steps": options["steps"], "speed": videos.speed,
                    "speeds": None if videos.speeds is None else list(videos.speeds)})
    return results


def interpolation_table(results: dict[str, Any]) -> str:
    """A markdown table of `interpolation_scores` results."""

    def row(name: str, key: str) -> str:
        entry = results[key]
        low, high = entry["interval"]
        return f"| {name} | {entry['mean']:.2f} ({low:.2f} to {high:.2f}) |"

    if results.get("speed") is not None:
        pace = (f" at {results['speed']:g} px/frame ({results['speed'] * results['stride']:g} px between given "
                f"frames)")
    elif results.get("speeds"):
        pace = f" at speeds {', '.join(f'{v:g}' for v in results['speeds'])} px/frame (one per video)"
    else:
        pace = ""
    windows = f" (sampled {results['window']} given frames at a time)" if results.get("window") else ""
    lines = [
        f"{results['num_videos']} held-out videos of {results['frames']} frames{pace}, every {results['stride']}th "
        f"given{windows}; PSNR in dB over the {results['in_between_frames']} frames in between of each",
        "",
        "| | mean (95% interval) |",
        "|---|---|",
        row("model PSNR", "model_psnr"),
        row("linear blending PSNR", "linear_psnr"),
        row("gain over blending (dB)", "gain_db"),
    ]
    sections = [("all videos", results["num_videos"], results.get("pooled"))]
    sections += [(group, scores["num_videos"], scores) for group, scores in results.get("groups", {}).items()]
    lines += ["", "PSNR of the mean squared error over the videos of each group (95% bootstrap interval):", "",
              "| videos | n | model PSNR | linear blending PSNR | gain over blending (dB) |", "|---|---|---|---|---|"]
    for title, count, pooled in sections:
        if not pooled:
            continue
        cells = []
        for key in ("model_psnr", "linear_psnr", "gain_db"):
            low, high = pooled[key]["interval"]
            cells.append(f"{pooled[key]['value']:.2f} ({low:.2f} to {high:.2f})")
        lines.append(f"| {title} | {count} | {' | '.join(cells)} |")
    return "\n".join(lines)
