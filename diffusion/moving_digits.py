"""Moving digits: a small text-to-video data set that needs no download.

Each video shows one handwritten digit from scikit-learn's bundled 8x8 digits
(`sklearn.datasets.load_digits`, UCI optical digits, shipped inside the package) moving at
constant speed in one of eight directions, bright on black, with a caption such as
"the digit 7 moving up and to the left". It plays the role Moving MNIST plays in video
prediction papers, but with captions, so a small text-conditioned model can be checked
for following the text (`diffusion.evaluate`).

The defaults are chosen so a small model learns it in minutes on a CPU: the 8x8 digit is
upsampled to `digit_size` = 14 px on a 32 px canvas and moves `speed` = 2 px per frame
along each moving axis (diagonals move on both), and the start is drawn so that the whole
path stays inside the frame. Only when the path cannot fit (a long video, a fast digit)
does the digit bounce off the edges; its caption then names the initial direction.

`subpixel=True` renders the digit at its exact fractional position (a bilinear shift: each
pixel of the digit spread over the four canvas pixels it overlaps), so a digit moving 0.25 px
per frame glides instead of jumping one pixel every fourth frame; at whole-pixel positions it
is exactly the default rendering. `at_frame_rate(k)` gives the same videos at k times the
frame rate (speed / k, k * (F - 1) + 1 frames): every k-th frame is the original's, which is
the ground truth of frame interpolation (`diffusion.evaluate_interp`). `frame_rate` is what a
`frame_rate_cond` U-Net is given: frames per pixel travelled, 1 / speed.

`speeds=(0.25, 0.5, 1.0)` draws each video's speed from the set instead (uniformly, from the
seed, on a random stream of its own so that the digits, directions and starts of `speed=` data
sets are unchanged): mixed motion, so that keyframes a fixed number of frames apart are 1, 2 or
4 px apart and an interpolator has to follow the motion rather than cross-fade.

Everything is a function of `seed`: the same arguments give the same videos, in memory
(`MovingDigits`) or on disk (`write_moving_digits`, gif + txt pairs that `VideoFolder`
reads).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import repeat
from jaxtyping import Float
from torch import Tensor
from torch.utils.data import Dataset

from diffusion import media
from diffusion.data import TEXT_EMBEDDINGS, CaptionEmbeddings, deprecated_text_encoder
from spacetime.checks import check_choice, check_number

# Seed-sequence key of the random stream that draws per-video speeds (any fixed constant).
_SPEEDS_STREAM = 0x5BEED
DEFAULT_SPEED = 2.0

logger = logging.getLogger(__name__)

# (dx, dy) in image coordinates: x to the right, y downwards.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "up": (0, -1),
    "down": (0, 1),
    "left": (-1, 0),
    "right": (1, 0),
    "up and to the left": (-1, -1),
    "up and to the right": (1, -1),
    "down and to the left": (-1, 1),
    "down and to the right": (1, 1),
}
DIRECTION_NAMES: tuple[str, ...] = tuple(DIRECTIONS)

_CAPTION = re.compile(
    r"^the digit ([0-9]) moving ("
    + "|".join(sorted(map(re.escape, DIRECTION_NAMES), key=len, reverse=True))
    + r")\.?$"
)


def make_caption(digit: int, direction: str) -> str:
    """`make_caption(7, "up and to the left") == "the digit 7 moving up and to the left"`."""
    if isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit <= 9:
        raise ValueError(f"digit must be an int from 0 to 9, got {digit!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTION_NAMES)}, got {direction!r}")
    return f"the digit {digit} moving {direction}"


def parse_caption(caption: str) -> tuple[int, str]:
    """`(digit, direction)` of a moving-digits caption; case, surrounding blanks, repeated
    spaces and a final full stop are ignored. Raises ValueError for anything else."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    match = _CAPTION.match(" ".join(caption.lower().split()))
    if match is None:
        raise ValueError(
            f"not a moving-digits caption: {caption!r}; expected 'the digit D moving DIRECTION' "
            f"with D in 0-9 and DIRECTION one of: {', '.join(DIRECTION_NAMES)}"
        )
    return int(match.group(1)), match.group(2)


@functools.lru_cache(maxsize=1)
def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 bundled 8x8 digits as float32 images in [0, 1] `(N, 8, 8)` and labels `(N,)`."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "moving digits use scikit-learn's bundled digits: pip install 'spacetime-video[train]'"
        ) from error
    digits = load_digits()
    # The UCI digits count set pixels in 4x4 blocks: values 0..16.
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def _bounce(position: np.ndarray, room: int) -> np.ndarray:
    """Reflect positions into [0, room]: a triangle wave, i.e. bouncing off both edges."""
    if room == 0:
        return np.zeros_like(position)
    period = 2 * room
    wrapped = np.mod(position, period)
    return np.where(wrapped > room, period - wrapped, wrapped)


def _paste_subpixel(frame: np.ndarray, template: np.ndarray, x: float, y: float) -> None:
    """Add `template` to `frame` with its top-left corner at the fractional `(x, y)`: the
    bilinear shift, each template pixel split over the four pixels it overlaps in the
    proportions of the overlap. Mass and the intensity centroid move exactly with (x, y);
    whole-pixel positions give the template itself. Weights below 1e-9 (float error of a
    position meant to be whole) are skipped, so nothing is written past the canvas."""
    x0, y0 = int(np.floor(x + 1e-9)), int(np.floor(y + 1e-9))
    fx, fy = max(x - x0, 0.0), max(y - y0, 0.0)
    size = template.shape[0]
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            if wx * wy > 1e-9:
                frame[y0 + dy : y0 + dy + size, x0 + dx : x0 + dx + size] += np.float32(wx * wy) * template


def _check_speeds(speed: Any, speeds: Any) -> float:
    """The single speed (`speed`, default `DEFAULT_SPEED`) after checking `speed` / `speeds`:
    at most one given, `speeds` a non-empty sequence of positive numbers."""
    if speeds is None:
        value = DEFAULT_SPEED if speed is None else speed
        return float(check_number("speed", value, low=0.0, low_open=True))
    if speed is not None:
        raise ValueError(f"give speed (one for all videos) or speeds (drawn per video), not both; got speed={speed!r}, "
                         f"speeds={speeds!r}")
    if isinstance(speeds, (str, bytes)) or not isinstance(speeds, Sequence) or not speeds:
        raise ValueError(f"speeds must be a non-empty list of positive numbers (pixels per frame), got {speeds!r}")
    for value in speeds:
        check_number("each of speeds", value, low=0.0, low_open=True)
    return float(speeds[0])


class MovingDigits(Dataset):
    """In-memory moving digits (see the module docstring); videos are rendered on access.

    Items are `{"video": (C, F, H, W) float32 in [0, 1], "caption": str}` (plus `cond` /
    `cond_mask` when `text_encoder` is given, as in `VideoFolder`). The labels are also
    available as arrays: `digit_labels`, `direction_labels` (indices into
    `DIRECTION_NAMES`) and the `captions` list.
    """

    def __init__(
        self,
        num_videos: int,
        *,
        image_size: int = 32,
        num_frames: int = 8,
        digit_size: int = 14,
        speed: float | int | None = None,
        channels: int = 1,
        seed: int = 0,
        text_encoder: Any = None,
        text_embedding: str = "pooled",
        subpixel: bool = False,
        speeds: Sequence[float | int] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_videos", num_videos), ("image_size", image_size),
                            ("num_frames", num_frames), ("digit_size", digit_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if num_videos < 1:
            raise ValueError(f"num_videos must be >= 1, got {num_videos}")
        if num_frames < 2:
            raise ValueError(f"num_frames must be >= 2 (motion needs two frames), got {num_frames}")
        if not 4 <= digit_size <= image_size:
            raise ValueError(
                f"digit_size must be between 4 and image_size={image_size}, got {digit_size}"
            )
        single_speed = _check_speeds(speed, speeds)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if not isinstance(subpixel, bool):
            raise TypeError(f"subpixel must be a bool, got {subpixel!r}")
        check_choice("text_embedding", text_embedding, TEXT_EMBEDDINGS)
        self.num_videos = num_videos
        self.image_size = image_size
        self.num_frames = num_frames
        self.digit_size = digit_size
        # one speed for all videos: `speed`; mixed: None, and the set in `speeds`
        self.speeds: tuple[float, ...] | None = None if speeds is None else tuple(float(v) for v in speeds)
        self.speed: float | None = single_speed if self.speeds is None else None
        self.channels = channels
        self.seed = seed
        self.subpixel = subpixel
        self.text_embedding = text_embedding

        images, labels = load_sklearn_digits()
        # bilinear upsampling keeps the soft strokes of the 8x8 originals
        self._templates = (
            F.interpolate(torch.from_numpy(images)[:, None], size=(digit_size, digit_size),
                          mode="bilinear", align_corners=False)[:, 0].clamp(0, 1).numpy()
        )
        rng = np.random.default_rng(seed)
        self.digit_labels = rng.integers(0, 10, num_videos)
        self.direction_labels = rng.integers(0, len(DIRECTION_NAMES), num_videos)
        by_digit = [np.flatnonzero(labels == d) for d in range(10)]
        self.image_indices = np.array(
            [by_digit[d][rng.integers(0, len(by_digit[d]))] for d in self.digit_labels]
        )
        if self.speeds is None:
            self.video_speeds = np.full(num_videos, self.speed)
        else:
            # A stream of its own: the main one (digits, directions, starts) stays as with `speed`.
            picks = np.random.default_rng([seed, _SPEEDS_STREAM]).integers(0, len(self.speeds), num_videos)
            self.video_speeds = np.asarray(self.speeds)[picks]
        room = image_size - digit_size
        # Rounded so that at_frame_rate's path (speed / k over k times the frames) has the same
        # length to the bit, and so the same starts.
        travels = np.round(self.video_speeds * (num_frames - 1), 9)
        bounce = travels > room
        self.bounces = bool(bounce.any())
        if self.bounces:
            logger.info(
                "moving digits: a path of up to %.1f px does not fit in %d px of room; %d of %d digits bounce "
                "off the edges and captions name the initial direction", travels.max(), room, bounce.sum(), num_videos,
            )
        # start (x, y) so that, when it fits, the whole path stays inside the frame
        self.starts = np.zeros((num_videos, 2))
        for i, direction in enumerate(self.direction_labels):
            travel = travels[i]
            for axis, step in enumerate(DIRECTIONS[DIRECTION_NAMES[direction]]):
                if step == 0 or bounce[i]:
                    low, high = 0.0, float(room)
                elif step > 0:
                    low, high = 0.0, room - travel
                else:
                    low, high = travel, float(room)
                self.starts[i, axis] = rng.integers(int(np.ceil(low)), int(np.floor(high)) + 1)
        self.captions = [
            make_caption(int(d), DIRECTION_NAMES[k])
            for d, k in zip(self.digit_labels, self.direction_labels)
        ]
        self.text_embeddings: CaptionEmbeddings | None = None
        if text_encoder is not None:
            deprecated_text_encoder("MovingDigits")
            self.text_embeddings = CaptionEmbeddings(text_encoder, self.captions, kind=text_embedding)

    def __len__(self) -> int:
        return self.num_videos

    @property
    def frame_rate(self) -> float | None:
        """Frames per pixel travelled (1 / speed): the `fps` of a `frame_rate_cond` U-Net
        (`diffusion.frame_masks.training_frame_inputs`). The 1 px/frame videos have 1, the
        same motion at four times the frame rate 4. None with mixed `speeds`: each video has
        its own (`frame_rates`), and the trainer then trains without `fps` (it warns)."""
        return None if self.speed is None else 1.0 / self.speed

    @property
    def frame_rates(self) -> np.ndarray:
        """Each video's frame rate, 1 / its speed, `(N,)` floats."""
        return 1.0 / self.video_speeds

    def at_frame_rate(self, factor: int) -> MovingDigits:
        """The same videos at `factor` times the frame rate: speed / factor over
        factor * (F - 1) + 1 frames, sub-pixel rendered, same digits, directions and starts.
        Frame `factor * i` is frame `i` of this data set's videos (exactly when this one is
        sub-pixel rendered too or its positions are whole pixels, as with a whole `speed`)."""
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be an int >= 1, got {factor!r}")
        # The starts depend only on the seed and the path lengths, which are unchanged; the
        # speeds are drawn by index, so dividing the set divides each video's speed.
        if self.speeds is None:
            pace: dict[str, Any] = {"speed": self.speed / factor}
        else:
            pace = {"speeds": [v / factor for v in self.speeds]}
        return MovingDigits(
            self.num_videos, image_size=self.image_size, num_frames=factor * (self.num_frames - 1) + 1,
            digit_size=self.digit_size, channels=self.channels, seed=self.seed, subpixel=True, **pace,
        )

    def exact_positions(self, index: int) -> np.ndarray:
        """Top-left corner `(x, y)` of the digit in every frame, `(F, 2)` floats."""
        step = np.array(DIRECTIONS[DIRECTION_NAMES[self.direction_labels[index]]], dtype=np.float64)
        times = np.arange(self.num_frames, dtype=np.float64)[:, None]
        path = self.starts[index] + self.video_speeds[index] * step * times
        return _bounce(path, self.image_size - self.digit_size)

    def positions(self, index: int) -> np.ndarray:
        """Top-left corner `(x, y)` of the digit in every frame, `(F, 2)` integers (rounded;
        `exact_positions` has the fractional ones `subpixel=True` renders)."""
        return np.rint(self.exact_positions(index)).astype(np.int64)

    def render(self, index: int) -> Float[Tensor, "c f h w"]:
        """The video of item `index`."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} videos")
        index %= len(self)
        template = self._templates[self.image_indices[index]]
        frames = np.zeros((self.num_frames, self.image_size, self.image_size), dtype=np.float32)
        size = self.digit_size
        if self.subpixel:
            for frame, (x, y) in zip(frames, self.exact_positions(index)):
                _paste_subpixel(frame, template, x, y)
        else:
            for frame, (x, y) in zip(frames, self.positions(index)):
                frame[y : y + size, x : x + size] = template
        return repeat(torch.from_numpy(frames), "f h w -> c f h w", c=self.channels).contiguous()

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"video": self.render(index), "caption": self.captions[index]}
        if self.text_embeddings is not None:
            item.update(self.text_embeddings(self.captions[index]))
        return item

    def videos(self) -> Float[Tensor, "b c f h w"]:
        """All videos stacked (small data sets only: B x C x F x H x W floats)."""
        return torch.stack([self.render(i) for i in range(len(self))])


def write_moving_digits(
    out_dir: str | Path,
    num_videos: int,
    *,
    image_size: int = 32,
    num_frames: int = 8,
    digit_size: int = 14,
    speed: float | int = 2.0,
    channels: int = 1,
    seed: int = 0,
    fps: float | int = 8.0,
) -> list[Path]:
    """Write `num_videos` moving digits to `out_dir` as `000000.gif` + `000000.txt` pairs
    (the `VideoFolder` format), identical to `MovingDigits` with the same arguments up to
    GIF colour quantisation (none for `channels=1`). Returns the GIF paths."""
    data = MovingDigits(
        num_videos, image_size=image_size, num_frames=num_frames, digit_size=digit_size,
        speed=speed, channels=channels, seed=seed,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(num_videos - 1)))
    paths = []
    for index in range(num_videos):
        stem = f"{index:0{width}d}"
        paths.append(media.write_gif(data.render(index), out_dir / f"{stem}.gif", fps=fps))
        (out_dir / f"{stem}.txt").write_text(data.captions[index] + "\n", encoding="utf-8")
    logger.info("wrote %d moving-digit videos to %s", num_videos, out_dir)
    return paths
