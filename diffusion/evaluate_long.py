"""Does a long moving-digits video keep following its caption? Direction and shape per window.

A video longer than the model's trained length (`diffusion.long_video`) is scored on windows
of the trained length, `stride` frames apart, with the measurements of `diffusion.evaluate`:

- **Direction per window, under the bounce law.** A long path does not fit the frame (16 px
  frames, 8 px digits, 1 px per frame: 8 px of room, 31 px of travel in 32 frames), so
  `MovingDigits` reflects the digit off the edges and the caption names the *initial*
  direction. The start position of a generated video is unknown, so the bounce times are
  read from the video itself: the digit's centroid is tracked, and the path is *unfolded*
  into an unbounded canvas, mirroring an axis each time the digit turns back while it is at
  the edge it was moving towards (at first: the caption's direction), its bright box close
  enough to the edge that its `digit_size` square touches it (`DEFAULT_EDGE_MARGIN`). On the unfolded path a faithful video moves in the caption's direction throughout;
  each window's direction is the least-squares velocity of the unfolded centroids rounded
  to the nearest of eight directions, as `diffusion.evaluate.motion_direction` does for a
  whole video, and it is right when it is the caption's. A digit that stops, turns back
  away from an edge, or moves the other way scores wrong in the windows where it does.
  Why unfold rather than sample on a larger canvas: the model draws 16 px frames, and the
  bounce is what the ground truth does there.
- **Shape consistency per window**, as `diffusion.evaluate.shape_consistency`: the digit
  crop of each frame of the window correlated with the window's first frame (does the digit
  hold its shape locally), and with the *video's* first frame (`shape_drift`: has it
  become another shape over the whole video).

Real long moving digits score 100% / 1.0 (tests/test_long_video.py); with the captions
shuffled, the direction accuracy falls to about 22% for 32 frames (chance 1/8: a digit that
starts at the edge its wrong caption points to "bounces" there at once, after which the
reversed path agrees with that caption).

Per-video scores are averaged (each video has the same number of windows), and the 95%
intervals are normal intervals of the per-video means: the windows of one video are not
independent trials, so a Wilson interval over all windows would be too narrow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Float
from torch import Tensor

from diffusion import media
from diffusion.evaluate import (
    _BY_ANGLE,
    DEFAULT_THRESHOLD,
    captioned_videos,
    centroids,
    crop_correlation,
    digit_features,
    mean_interval,
)
from diffusion.moving_digits import DIRECTION_NAMES, DIRECTIONS, parse_caption
from spacetime.checks import check_int, check_number

__all__ = [
    "evaluate_long_folder",
    "evaluate_long_videos",
    "long_results_table",
    "unfolded_path",
    "window_scores",
]

# A digit counts as at an edge when its bright box is within `digit_size - box size +
# DEFAULT_EDGE_MARGIN` pixels of it: the digit's square (`digit_size`, 8 px in the demo)
# touches the edge while its bright strokes may not (a "1" is 3 px wide in an 8 px square),
# and faint border pixels fall below the threshold.
DEFAULT_EDGE_MARGIN = 1
DEFAULT_DIGIT_SIZE = 8
# Centroid steps smaller than this are jitter, not a turn.
_MIN_TURN = 0.25


def _grey(video: Tensor) -> np.ndarray:
    if video.ndim != 4 or video.shape[0] not in (1, 3):
        raise ValueError(f"a video must be (C, F, H, W) with C = 1 or 3, got shape {tuple(video.shape)}")
    return video.detach().float().cpu().mean(dim=0).numpy()


def _boxes(frames: np.ndarray, threshold: float) -> np.ndarray:
    """`(F, 4)` bright box `(x_min, y_min, x_max, y_max)` per frame; NaN without bright pixels."""
    out = np.full((frames.shape[0], 4), np.nan)
    for index, frame in enumerate(frames):
        ys, xs = np.nonzero(frame > threshold)
        if xs.size:
            out[index] = (xs.min(), ys.min(), xs.max(), ys.max())
    return out


def unfolded_path(
    video: Float[Tensor, "c f h w"],
    direction: str,
    *,
    threshold: float | int = DEFAULT_THRESHOLD,
    edge_margin: int = DEFAULT_EDGE_MARGIN,
    digit_size: int = DEFAULT_DIGIT_SIZE,
) -> np.ndarray:
    """`(F, 2)` centroid path `(x, y)` of `video` unfolded by the bounce law for a digit that
    starts moving in `direction` (module docstring); NaN rows for frames without a digit."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTION_NAMES)}, got {direction!r}")
    check_int("edge_margin", edge_margin, low=0)
    check_int("digit_size", digit_size, low=1)
    frames = _grey(video)
    height, width = frames.shape[1:]
    points = centroids(video, threshold=threshold)
    boxes = _boxes(frames, float(threshold))
    out = np.full_like(points, np.nan)
    for axis, size in ((0, width), (1, height)):
        # moving: the sign of the last step that was not jitter, at first the caption's (a
        # digit that starts at the edge it is captioned to move towards bounces at once).
        mirror, moving = 1.0, float(DIRECTIONS[direction][axis])
        last, position = None, math.nan
        for index in range(points.shape[0]):
            value = points[index, axis]
            if math.isnan(value):
                continue
            if last is None:
                position = value
            else:
                step = value - points[last, axis]
                if abs(step) >= _MIN_TURN:
                    low, high = boxes[last, axis], boxes[last, axis + 2]
                    margin = edge_margin + max(0.0, digit_size - (high - low + 1))
                    at_edge = (moving > 0 and high >= size - 1 - margin) or (moving < 0 and low <= margin)
                    if at_edge and step * moving < 0:
                        # A bounce: on the unfolded canvas the digit keeps going.
                        mirror = -mirror
                    moving = math.copysign(1.0, step)
                position += mirror * step
            out[index, axis] = position
            last = index
    return out


def _direction(points: np.ndarray, min_speed: float) -> str | None:
    """Least-squares velocity of `points` (F, 2) rounded to one of eight directions, or None
    (fewer than two points, or slower than `min_speed` px per frame)."""
    valid = ~np.isnan(points[:, 0]) & ~np.isnan(points[:, 1])
    if valid.sum() < 2:
        return None
    times = np.flatnonzero(valid).astype(np.float64)
    centred = times - times.mean()
    velocity = (centred[:, None] * (points[valid] - points[valid].mean(axis=0))).sum(axis=0) / (centred**2).sum()
    vx, vy = velocity
    if math.hypot(vx, vy) < min_speed:
        return None
    return _BY_ANGLE[round(math.atan2(-vy, vx) / (math.pi / 4)) % 8]


def window_scores(
    video: Float[Tensor, "c f h w"],
    caption: str,
    window: int,
    stride: int | None = None,
    *,
    threshold: float | int = DEFAULT_THRESHOLD,
    edge_margin: int = DEFAULT_EDGE_MARGIN,
    digit_size: int = DEFAULT_DIGIT_SIZE,
    min_speed: float | int = 0.25,
) -> list[dict[str, Any]]:
    """One row per window of `window` frames, `stride` (default `window`) apart, the last
    window ending at the last frame: `start`, `direction` (seen on the unfolded path, or None),
    `direction_right`, `shape_window` and `shape_drift` (None without a digit in the window's
    first frame / the video's first frame)."""
    _, direction = parse_caption(caption)
    frames = _grey(video)
    count = frames.shape[0]
    check_int("window", window, low=2, high=count)
    stride = window if stride is None else stride
    check_int("stride", stride, low=1)
    check_number("min_speed", min_speed, low=0.0)
    path = unfolded_path(video, direction, threshold=threshold, edge_margin=edge_margin, digit_size=digit_size)
    crops = [digit_features(frame, threshold=threshold) for frame in frames]
    starts = list(range(0, count - window + 1, stride))
    if starts[-1] + window < count:
        starts.append(count - window)
    rows = []
    for start in starts:
        stop = start + window
        seen = _direction(path[start:stop], float(min_speed))
        first = crops[start]
        rows.append({
            "start": start,
            "direction": seen,
            "direction_right": seen == direction,
            "shape_window": None if first is None else float(np.mean([crop_correlation(first, c) for c in crops[start + 1:stop]])),
            "shape_drift": None if crops[0] is None else float(np.mean(
                [crop_correlation(crops[0], crops[i]) for i in range(max(start, 1), stop)])),
        })
    return rows


def _summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"mean": None, "interval": None}
    low, high = mean_interval(values)
    return {"mean": float(np.mean(values)), "interval": (max(low, -1.0), min(high, 1.0))}


def evaluate_long_videos(
    videos: Float[Tensor, "b c f h w"] | Sequence[Tensor],
    captions: Sequence[str],
    *,
    window: int = 8,
    stride: int | None = None,
    threshold: float | int = DEFAULT_THRESHOLD,
    edge_margin: int = DEFAULT_EDGE_MARGIN,
    digit_size: int = DEFAULT_DIGIT_SIZE,
) -> dict[str, Any]:
    """Per-window direction accuracy and shape consistency of long moving-digits videos
    (module docstring). Returns a JSON-serialisable dict: `num_videos`, `num_frames`,
    `window`, `stride`, `direction_accuracy`, `shape_consistency` (within windows),
    `shape_drift` (against the video's first frame), `intervals` (95%, of the per-video
    means), `per_window` (`[{start, direction_accuracy, shape_consistency, shape_drift}]`,
    how the scores change along the video) and `chance`."""
    if len(videos) != len(captions):
        raise ValueError(f"got {len(videos)} videos but {len(captions)} captions")
    if len(videos) == 0:
        raise ValueError("nothing to evaluate: no videos")
    lengths = {int(video.shape[1]) for video in videos}
    if len(lengths) != 1:
        raise ValueError(f"the videos must have one length to be scored window by window, got lengths {sorted(lengths)}")
    stride = window if stride is None else stride
    per_video = [window_scores(video, caption, window, stride, threshold=threshold, edge_margin=edge_margin,
                               digit_size=digit_size)
                 for video, caption in zip(videos, captions)]
    video_direction = [float(np.mean([row["direction_right"] for row in rows])) for rows in per_video]
    keys = ("shape_window", "shape_drift")
    video_shape = {key: [float(np.mean(vals)) for rows in per_video
                         if (vals := [row[key] for row in rows if row[key] is not None])] for key in keys}
    per_window = []
    for index, start in enumerate(row["start"] for row in per_video[0]):
        column = [rows[index] for rows in per_video]
        shapes = {key: [row[key] for row in column if row[key] is not None] for key in keys}
        per_window.append({
            "start": start,
            "direction_accuracy": float(np.mean([row["direction_right"] for row in column])),
            "shape_consistency": float(np.mean(shapes["shape_window"])) if shapes["shape_window"] else None,
            "shape_drift": float(np.mean(shapes["shape_drift"])) if shapes["shape_drift"] else None,
        })
    direction = _summary(video_direction)
    shape, drift = _summary(video_shape["shape_window"]), _summary(video_shape["shape_drift"])
    low_high = direction["interval"]
    return {
        "num_videos": len(per_video),
        "num_frames": lengths.pop(),
        "window": window,
        "stride": stride,
        "edge_margin": edge_margin,
        "digit_size": digit_size,
        "direction_accuracy": direction["mean"],
        "shape_consistency": shape["mean"],
        "shape_drift": drift["mean"],
        "intervals": {
            "direction_accuracy": (max(0.0, low_high[0]), min(1.0, low_high[1])),
            "shape_consistency": shape["interval"],
            "shape_drift": drift["interval"],
        },
        "per_window": per_window,
        "chance": {"direction": 1 / len(DIRECTION_NAMES)},
    }


def evaluate_long_folder(folder: str | Path, *, window: int = 8, stride: int | None = None,
                         threshold: float | int = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """`evaluate_long_videos` over a folder of videos with `name.txt` captions (every video
    needs one; all must have the same length)."""
    folder = Path(folder)
    paths, captions = captioned_videos(folder)
    videos = [media.read_video(path, channels=1) for path in paths]
    frames = min(int(video.shape[1]) for video in videos)
    if window > frames:
        raise ValueError(f"--window {window} is longer than the videos in {folder} ({frames} frames)")
    results = evaluate_long_videos(videos, captions, window=window, stride=stride, threshold=threshold)
    results["folder"] = str(folder)
    return results


def long_results_table(results: dict[str, Any]) -> str:
    """A Markdown table of `evaluate_long_videos` results, overall and per window."""

    def cell(value: float | None, interval: Any, percent: bool) -> str:
        if value is None:
            return "n/a"
        text = f"{value:.1%}" if percent else f"{value:.3f}"
        if interval is not None:
            text += f" ({interval[0]:.1%}-{interval[1]:.1%})" if percent else f" ({interval[0]:.3f}-{interval[1]:.3f})"
        return text

    intervals = results["intervals"]
    lines = [
        f"long moving digits: {results['num_videos']} videos of {results['num_frames']} frames, windows of "
        f"{results['window']} every {results['stride']}" + (f" from {results['folder']}" if "folder" in results else ""),
        "",
        "| metric | value (95% interval) | chance |",
        "|---|---:|---:|",
        (f"| direction accuracy (per window, bounce law) | "
         f"{cell(results['direction_accuracy'], intervals['direction_accuracy'], True)} | "
         f"{results['chance']['direction']:.1%} |"),
        (f"| shape consistency (within windows) | "
         f"{cell(results['shape_consistency'], intervals['shape_consistency'], False)} | |"),
        f"| shape drift (against frame 0) | {cell(results['shape_drift'], intervals['shape_drift'], False)} | |",
        "",
        "| window start | direction accuracy | shape consistency | shape drift |",
        "|---:|---:|---:|---:|",
    ]
    for row in results["per_window"]:
        lines.append(f"| {row['start']} | {cell(row['direction_accuracy'], None, True)} | "
                     f"{cell(row['shape_consistency'], None, False)} | {cell(row['shape_drift'], None, False)} |")
    return "\n".join(lines)
