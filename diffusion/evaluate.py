"""Does a generated moving-digits video follow its caption?

Two measurements per video, each compared to what the caption asks for
(`diffusion.moving_digits.parse_caption`):

- Direction: the centroid of the bright pixels is tracked over the frames, a straight line
  is fitted to x(t) and y(t) by least squares, and the velocity's angle is rounded to the
  nearest of the eight directions (45 degree sectors). A video whose bright mass does not
  move (less than `min_speed` px per frame) has no direction and counts as wrong.
- Digit: each frame's digit is located (bounding box of the bright pixels, after dropping
  specks much smaller than the largest bright blob), padded to a square, averaged down to 8x8 and scaled to 0..16 like scikit-learn's bundled digits, and
  classified by an RBF support vector machine; the frames vote (summed decision values).
  The classifier is fitted on first use on the bundled digits passed through this very
  normalisation (upsampled to two sizes first), so real and generated frames are
  described the same way. The fit is deterministic.

- Shape consistency: the same digit crop (the 64 features above, before classification) is
  taken in every frame, and each frame's crop is correlated (Pearson) with the first
  frame's; the video's score is the mean over its other frames. A digit that keeps its shape
  while it moves scores 1 (ground-truth moving digits move by whole pixels, so their crops
  are identical); one that morphs from frame to frame scores lower.

Every rate comes with a 95% interval (Wilson's score interval for the accuracies, a normal
interval of the mean for shape consistency), so that two runs or two recipes can be told
apart from sampling noise: with 16 videos a 90% accuracy has an interval of about 67-97%.

The direction fit assumes the digit does not bounce within the video, which holds for the
moving-digits defaults (the start is drawn so the path fits the frame).

Ground-truth moving digits score close to 100% on both (see tests/test_evaluate.py), so a
low score on samples is the model's, not the metric's. Chance is 1/8 and 1/10.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from diffusion import media
from diffusion.data import find_videos, read_caption
from diffusion.moving_digits import DIRECTION_NAMES, load_sklearn_digits, parse_caption

logger = logging.getLogger(__name__)

# Directions ordered by angle, counter-clockwise from "right" in 45 degree steps (y is up
# here: image rows grow downwards, so the fit's vy is negated before taking the angle).
_BY_ANGLE = (
    "right", "up and to the right", "up", "up and to the left",
    "left", "down and to the left", "down", "down and to the right",
)
assert set(_BY_ANGLE) == set(DIRECTION_NAMES)

DEFAULT_THRESHOLD = 0.3
# Sizes the 8x8 training digits are upsampled to before normalisation: around the 14 px
# that moving digits use, so the classifier sees the same interpolation blur.
_TRAIN_SIZES = (12, 16)


def _grey(video: Tensor) -> np.ndarray:
    if video.ndim != 4 or video.shape[0] not in (1, 3):
        raise ValueError(
            f"a video must be (C, F, H, W) with C = 1 or 3, got shape {tuple(video.shape)}"
        )
    return video.detach().float().cpu().mean(dim=0).numpy()


# ---------------------------------------------------------------------------------------
# direction


def centroids(video: Float[Tensor, "c f h w"], *, threshold: float | int = DEFAULT_THRESHOLD) -> np.ndarray:
    """`(F, 2)` centroid `(x, y)` of the pixels brighter than `threshold`, weighted by how
    much brighter; NaN for frames with no such pixel."""
    frames = _grey(video)
    weights = np.clip(frames - threshold, 0.0, None)
    total = weights.sum(axis=(1, 2))
    rows = np.arange(frames.shape[1], dtype=np.float64)
    cols = np.arange(frames.shape[2], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        x = (weights.sum(axis=1) * cols).sum(axis=1) / total
        y = (weights.sum(axis=2) * rows).sum(axis=1) / total
    result = np.stack([x, y], axis=1)
    result[total <= 1e-6] = np.nan
    return result


def motion_direction(
    video: Float[Tensor, "c f h w"],
    *,
    threshold: float | int = DEFAULT_THRESHOLD,
    min_speed: float | int = 0.25,
) -> str | None:
    """The direction name the bright content moves in, or None when it cannot be told
    (fewer than two frames with bright pixels, or slower than `min_speed` px per frame)."""
    points = centroids(video, threshold=threshold)
    valid = ~np.isnan(points[:, 0])
    if valid.sum() < 2:
        return None
    times = np.flatnonzero(valid).astype(np.float64)
    # least-squares slope of each coordinate against time
    centred = times - times.mean()
    velocity = (centred[:, None] * (points[valid] - points[valid].mean(axis=0))).sum(axis=0)
    velocity /= (centred**2).sum()
    vx, vy = velocity
    if math.hypot(vx, vy) < min_speed:
        return None
    sector = round(math.atan2(-vy, vx) / (math.pi / 4)) % 8
    return _BY_ANGLE[sector]


# ---------------------------------------------------------------------------------------
# digit


def _ndimage():
    try:
        from scipy import ndimage
    except ImportError as error:
        raise ImportError(
            "the digit metric needs scikit-learn (and its scipy): pip install 'spacetime-video[train]'"
        ) from error
    return ndimage


@functools.lru_cache(maxsize=256)
def _pooling_matrix(size: int) -> np.ndarray:
    """`(8, size)` averaging weights: row i averages input cells [floor(i s/8), ceil((i+1) s/8)),
    the bins of adaptive average pooling (a plain matrix product is far cheaper per frame
    than a framework call)."""
    pool = np.zeros((8, size), dtype=np.float32)
    for row in range(8):
        start, end = (row * size) // 8, -((-(row + 1) * size) // 8)
        pool[row, start:end] = 1.0 / (end - start)
    return pool


def digit_features(frame: np.ndarray, *, threshold: float | int = DEFAULT_THRESHOLD) -> np.ndarray | None:
    """64 features of the digit in one grey frame `(H, W)` in [0, 1], in the 0..16 scale
    of scikit-learn's digits; None when fewer than 4 pixels are brighter than `threshold`."""
    mask = frame > threshold
    if mask.sum() < 4:
        return None
    # Generated frames carry specks of noise above the threshold; one stray pixel in a
    # corner would stretch the bounding box over the whole frame. Keep the connected
    # blobs that are a sizeable part of the largest one (strokes of a digit), drop specks.
    labels, _ = _ndimage().label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.concatenate([[False], sizes >= max(3, 0.15 * sizes.max())])
    mask = keep[labels]
    if mask.sum() < 4:
        return None
    ys, xs = np.nonzero(mask)
    crop = np.where(mask, frame, 0.0)[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    height, width = crop.shape
    side = max(height, width)
    # Square, centred: a "1" keeps its thin shape instead of being stretched to a block.
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = crop
    pool = _pooling_matrix(side)
    small = pool @ square @ pool.T
    return (small / max(float(small.max()), 1e-6) * 16.0).reshape(-1).astype(np.float64)


@functools.lru_cache(maxsize=1)
def digit_classifier():
    """The fitted scikit-learn SVC (cached; about a quarter of a second on first use)."""
    try:
        from sklearn.svm import SVC
    except ImportError as error:
        raise ImportError(
            "the digit metric needs scikit-learn: pip install 'spacetime-video[train]'"
        ) from error
    images, labels = load_sklearn_digits()
    features, targets = [], []
    for size in _TRAIN_SIZES:
        upsampled = F.interpolate(
            torch.from_numpy(images)[:, None], size=(size, size), mode="bilinear", align_corners=False
        )[:, 0].numpy()
        for image, label in zip(upsampled, labels):
            row = digit_features(image)
            if row is not None:
                features.append(row)
                targets.append(label)
    classifier = SVC(C=10.0, gamma="scale")
    classifier.fit(np.stack(features), np.asarray(targets))
    return classifier


def shape_consistency(
    video: Float[Tensor, "c f h w"], *, threshold: float | int = DEFAULT_THRESHOLD
) -> float | None:
    """Mean Pearson correlation of each later frame's digit crop with the first frame's (the
    64 features of `digit_features`); None when the first frame or every later frame shows no
    digit. A later frame without a digit counts as 0 (the shape is gone)."""
    frames = _grey(video)
    crops = [digit_features(frame, threshold=threshold) for frame in frames]
    first = crops[0]
    if first is None or len(crops) < 2 or all(crop is None for crop in crops[1:]):
        return None
    return float(np.mean([crop_correlation(first, crop) for crop in crops[1:]]))


def crop_correlation(first: np.ndarray, crop: np.ndarray | None) -> float:
    """Pearson correlation of two digit crops (`digit_features`), the score of one frame in
    `shape_consistency`: 0 when the later crop is missing (the shape is gone)."""
    if crop is None:
        return 0.0
    a, b = first - first.mean(), crop - crop.mean()
    norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
    # Two flat crops (a filled square) are the same shape; one flat and one not are not.
    return float((a * b).sum() / norm) if norm > 1e-12 else float(np.allclose(first, crop))


def wilson_interval(hits: int, count: int, *, z: float = 1.959964) -> tuple[float, float]:
    """Wilson's score interval (95% for the default `z`) of a rate of `hits` in `count`
    trials; it stays inside [0, 1] and is sensible at 0% and 100%, unlike the normal one."""
    if count <= 0:
        return (0.0, 1.0)
    rate = hits / count
    denominator = 1 + z * z / count
    centre = (rate + z * z / (2 * count)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / count + z * z / (4 * count * count)) / denominator
    # At 0% and 100% the bound on that side is exact; rounding must not move it off the rate.
    low = 0.0 if hits == 0 else max(0.0, min(rate, centre - half))
    high = 1.0 if hits == count else min(1.0, max(rate, centre + half))
    return (low, high)


def mean_interval(values: Sequence[float], *, z: float = 1.959964) -> tuple[float, float]:
    """Normal 95% interval of the mean of `values` (the mean itself for fewer than two)."""
    if len(values) < 2:
        mean = float(values[0]) if values else float("nan")
        return (mean, mean)
    array = np.asarray(values, dtype=np.float64)
    half = z * float(array.std(ddof=1)) / math.sqrt(len(array))
    return (float(array.mean() - half), float(array.mean() + half))


def classify_digits(
    videos: Float[Tensor, "b c f h w"] | Sequence[Tensor], *, threshold: float | int = DEFAULT_THRESHOLD
) -> list[int | None]:
    """The digit shown in each video (its frames vote with summed SVM decision values), or
    None for a video in which no frame has a visible digit. One classifier call for all."""
    rows, owners = [], []
    for owner, video in enumerate(videos):
        for frame in _grey(video):
            row = digit_features(frame, threshold=threshold)
            if row is not None:
                rows.append(row)
                owners.append(owner)
    digits: list[int | None] = [None] * len(videos)
    if not rows:
        return digits
    classifier = digit_classifier()
    scores = classifier.decision_function(np.stack(rows))
    totals = np.zeros((len(videos), scores.shape[1]))
    np.add.at(totals, np.asarray(owners), scores)
    for owner in sorted(set(owners)):
        digits[owner] = int(classifier.classes_[int(np.argmax(totals[owner]))])
    return digits


def classify_digit(
    video: Float[Tensor, "c f h w"], *, threshold: float | int = DEFAULT_THRESHOLD
) -> int | None:
    """The digit shown in one video, or None when no frame has a visible digit."""
    return classify_digits([video], threshold=threshold)[0]


# ---------------------------------------------------------------------------------------
# whole sets


def evaluate_videos(
    videos: Float[Tensor, "b c f h w"] | Sequence[Tensor],
    captions: Sequence[str],
    *,
    threshold: float | int = DEFAULT_THRESHOLD,
) -> dict[str, Any]:
    """Direction and digit accuracy of videos against their moving-digits captions.

    `videos` is a `(B, C, F, H, W)` tensor or a sequence of `(C, F, H, W)` tensors in
    [0, 1]. Raises ValueError for a caption that is not a moving-digits caption. Returns a
    JSON-serialisable dict: `num_videos`, `direction_accuracy`, `digit_accuracy`,
    `joint_accuracy` (both right), `shape_consistency` (mean over the videos where it can be
    measured, see `shape_consistency`), `intervals` (95% interval of each of those four),
    `direction_undetected` / `digit_undetected` (counts of
    videos without a measurable motion / digit), `per_direction` and `per_digit`
    (`{name: {"count", "direction_accuracy", "digit_accuracy"}}`) and `chance`.
    """
    if len(videos) != len(captions):
        raise ValueError(f"got {len(videos)} videos but {len(captions)} captions")
    if len(videos) == 0:
        raise ValueError("nothing to evaluate: no videos")
    targets = [parse_caption(caption) for caption in captions]
    direction_hits, digit_hits, shapes = [], [], []
    undetected = {"direction": 0, "digit": 0}
    seen_digits = classify_digits(videos, threshold=threshold)
    for video, seen_digit, (digit, direction) in zip(videos, seen_digits, targets):
        seen_direction = motion_direction(video, threshold=threshold)
        undetected["direction"] += seen_direction is None
        undetected["digit"] += seen_digit is None
        direction_hits.append(seen_direction == direction)
        digit_hits.append(seen_digit == digit)
        shape = shape_consistency(video, threshold=threshold)
        if shape is not None:
            shapes.append(shape)

    def summary(selected: list[int]) -> dict[str, Any]:
        return {
            "count": len(selected),
            "direction_accuracy": float(np.mean([direction_hits[i] for i in selected])),
            "digit_accuracy": float(np.mean([digit_hits[i] for i in selected])),
        }

    per_direction = {
        name: summary([i for i, (_, d) in enumerate(targets) if d == name])
        for name in DIRECTION_NAMES
        if any(d == name for _, d in targets)
    }
    per_digit = {
        str(digit): summary([i for i, (g, _) in enumerate(targets) if g == digit])
        for digit in range(10)
        if any(g == digit for g, _ in targets)
    }
    joint_hits = np.logical_and(direction_hits, digit_hits)
    count = len(targets)
    return {
        "num_videos": count,
        "direction_accuracy": float(np.mean(direction_hits)),
        "digit_accuracy": float(np.mean(digit_hits)),
        "joint_accuracy": float(np.mean(joint_hits)),
        "shape_consistency": float(np.mean(shapes)) if shapes else None,
        "intervals": {
            "direction_accuracy": wilson_interval(int(sum(direction_hits)), count),
            "digit_accuracy": wilson_interval(int(sum(digit_hits)), count),
            "joint_accuracy": wilson_interval(int(joint_hits.sum()), count),
            "shape_consistency": mean_interval(shapes) if shapes else None,
        },
        "direction_undetected": int(undetected["direction"]),
        "digit_undetected": int(undetected["digit"]),
        "per_direction": per_direction,
        "per_digit": per_digit,
        "chance": {"direction": 1 / len(DIRECTION_NAMES), "digit": 0.1},
    }


def captioned_videos(folder: Path) -> tuple[list[Path], list[str]]:
    """The videos of `folder` and their `name.txt` captions; ValueError for a missing folder,
    no videos, or videos without a caption (naming them, before anything is decoded)."""
    if not folder.is_dir():
        raise ValueError(f"{folder} does not exist or is not a folder")
    paths = find_videos(folder)
    if not paths:
        raise ValueError(f"no videos found in {folder}")
    captions = [read_caption(path) for path in paths]
    missing = [str(path) for path, caption in zip(paths, captions) if caption is None]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(paths)} videos in {folder} have no caption file: "
            + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        )
    return paths, captions  # type: ignore[return-value]


def evaluate_folder(folder: str | Path, *, threshold: float | int = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """`evaluate_videos` over a folder of generated videos with `name.txt` captions (the
    `VideoFolder` layout; videos are read at their own size and length). Every video needs
    a caption (ValueError naming those without, before anything is decoded); unreadable
    videos are skipped with a warning and listed under `skipped` in the result."""
    folder = Path(folder)
    paths, captions = captioned_videos(folder)
    videos, kept, skipped = [], [], []
    for path, caption in zip(paths, captions):
        try:
            videos.append(media.read_video(path, channels=1))
        except ImportError:
            raise
        except Exception as error:
            logger.warning("skipping unreadable video %s (%s: %s)", path, type(error).__name__, error)
            skipped.append(str(path))
            continue
        kept.append(caption)
    if skipped:
        logger.warning("skipped %d of %d videos in %s", len(skipped), len(paths), folder)
    if not videos:
        raise ValueError(f"none of the {len(paths)} videos in {folder} could be read")
    results = evaluate_videos(videos, kept, threshold=threshold)
    results["folder"] = str(folder)
    results["skipped"] = skipped
    return results


def results_table(results: dict[str, Any]) -> str:
    """A Markdown table of `evaluate_videos` / `evaluate_folder` results, for printing."""
    chance = results.get("chance", {})
    intervals = results.get("intervals", {})

    def rate(key: str, percent: bool = True) -> str:
        value, low_high = results.get(key), intervals.get(key)
        if value is None:
            return "n/a"
        text = f"{value:.1%}" if percent else f"{value:.3f}"
        if low_high is not None:
            low, high = low_high
            text += f" ({low:.1%}-{high:.1%})" if percent else f" ({low:.3f}-{high:.3f})"
        return text

    lines = [
        f"moving digits: {results['num_videos']} videos"
        + (f" from {results['folder']}" if "folder" in results else ""),
        "",
        "| metric | value (95% interval) | chance |",
        "|---|---:|---:|",
        f"| direction accuracy | {rate('direction_accuracy')} | {chance.get('direction', 0):.1%} |",
        f"| digit accuracy | {rate('digit_accuracy')} | {chance.get('digit', 0):.1%} |",
        f"| both right | {rate('joint_accuracy')} | "
        f"{chance.get('direction', 0) * chance.get('digit', 0):.1%} |",
        f"| shape consistency | {rate('shape_consistency', percent=False)} | |",
        f"| no motion found | {results['direction_undetected']} | |",
        f"| no digit found | {results['digit_undetected']} | |",
    ]
    if results.get("skipped"):
        lines.append(f"| unreadable (skipped) | {len(results['skipped'])} | |")
    for title, key in (("direction", "per_direction"), ("digit", "per_digit")):
        lines += ["", f"| {title} | videos | direction accuracy | digit accuracy |", "|---|---:|---:|---:|"]
        for name, row in results[key].items():
            lines.append(
                f"| {name} | {row['count']} | {row['direction_accuracy']:.1%} | {row['digit_accuracy']:.1%} |"
            )
    return "\n".join(lines)
