"""Reading and writing videos, sample grids and loss plots.

Videos cross this module's boundary as float tensors `(C, F, H, W)` in [0, 1] with C = 1
(grey) or 3 (RGB); on disk they are GIF (Pillow, the `train` extra) or MP4 / WebM (imageio
with the pyav plugin, the `video` extra). Both extras are imported lazily so that
`import diffusion` works without them; the message of the ImportError names the extra.

GIF quirk worth knowing: Pillow's GIF writer stores identical consecutive frames as one
frame shown for the sum of their durations (a static video becomes a one-frame GIF). The
GIF reader here undoes that by repeating each frame `round(duration / frame duration)`
times, where the frame duration is the one `write_gif` records in the GIF comment (or, for
other GIFs, the shortest duration), so a video written by `write_gif` reads back with the
number of frames it had.

Hostile files. Every reader checks a frame's size from its header before decoding it
(`MAX_FRAME_PIXELS`, a decompression-bomb guard well below what Pillow itself refuses),
reads at most `max_frames` frames, and converts every image mode to 8-bit RGB by value:
16-bit and 32-bit greyscale are scaled (Pillow's own conversion would clip them to white),
alpha is composited over black, CMYK and palettes are converted.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from diffusion.checkpoint import atomic_write

if TYPE_CHECKING:
    from PIL import Image as PILImage

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS: tuple[str, ...] = (".gif", ".mp4", ".webm")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")

# Codec per container for `write_video`; both ship with the wheels of `av`.
_CODECS = {".mp4": "libx264", ".webm": "libvpx-vp9"}

# A GIF frame shown for many times the shortest duration (a long hold at the end, say)
# is repeated at most this many times when read, so a hostile file cannot blow up memory.
_MAX_GIF_REPEAT = 64
_FRAME_DURATION = re.compile(r"spacetime-video frame_duration_ms=(\d+)")

# Largest frame decoded (8192 x 8192): an 8K frame decodes to ~200 MB of RGB. Pillow warns
# only above 89M pixels and refuses above 179M; a GIF or PNG of one colour claiming
# 12000 x 12000 is a few kilobytes on disk and 430 MB once decoded.
MAX_FRAME_PIXELS = 8192 * 8192
# The GIF reader scans frame durations before its first frame; a file claiming millions of
# frames is read no further than this.
MAX_GIF_FRAMES = 100_000


class FrameTooLargeError(ValueError):
    """A frame's header claims more pixels than allowed (a possible decompression bomb)."""


def check_frame_size(width: int, height: int, path: str | Path, max_pixels: int | None = None) -> None:
    """Raise `FrameTooLargeError` for frames over `max_pixels` (None: `MAX_FRAME_PIXELS`)."""
    if max_pixels is None:
        max_pixels = MAX_FRAME_PIXELS
    if width < 1 or height < 1:
        raise ValueError(f"{path} has an empty frame size {width}x{height}")
    if width * height > max_pixels:
        raise FrameTooLargeError(
            f"{path} has {width}x{height} frames ({width * height} pixels), more than the limit of "
            f"{max_pixels} pixels (a possible decompression bomb)"
        )


def to_rgb(image: PILImage.Image) -> PILImage.Image:
    """Any Pillow image mode as 8-bit RGB, by value (see the module docstring)."""
    Image = _pillow()
    mode = image.mode
    if mode in ("RGB",):
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        # 16-bit data (PNG 'I;16', and 16-bit PNGs Pillow opens as 'I') spans 0..65535;
        # 32-bit float frames are taken as 0..1 when they fit, else 0..255.
        if mode == "F":
            scale = 255.0 if values.size and float(np.nanmax(values)) <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0
        grey = np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------
# optional dependencies


def _pillow():
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - exercised only without Pillow
        raise ImportError(
            "reading and writing GIFs and image frames needs Pillow: "
            "pip install 'spacetime-video[train]'"
        ) from error
    return Image


def _imageio():
    try:
        import av  # noqa: F401  (imageio's pyav plugin needs it)
        import imageio.v3 as iio
    except ImportError as error:
        raise ImportError(
            "reading and writing MP4 / WebM needs imageio and av: "
            "pip install 'spacetime-video[video]'"
        ) from error
    return iio


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "plotting the loss needs matplotlib: pip install 'spacetime-video[train]'"
        ) from error
    # Agg renders to files only: no display is needed on a training server.
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------
# tensors <-> uint8 frames


def _check_video(video: Tensor) -> None:
    if video.ndim != 4:
        raise ValueError(
            f"a video must be a (C, F, H, W) tensor, got shape {tuple(video.shape)}"
        )
    if video.shape[0] not in (1, 3):
        raise ValueError(f"a video must have 1 or 3 channels, got {video.shape[0]}")
    if video.shape[1] < 1:
        raise ValueError("a video must have at least one frame, got 0")


def to_uint8_frames(video: Float[Tensor, "c f h w"]) -> np.ndarray:
    """`(C, F, H, W)` floats in [0, 1] -> `(F, H, W, C)` uint8 (values outside are clipped)."""
    _check_video(video)
    frames = video.detach().float().cpu().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return rearrange(frames, "c f h w -> f h w c").numpy()


def from_uint8_frames(frames: np.ndarray) -> Float[Tensor, "c f h w"]:
    """`(F, H, W, C)` uint8 -> `(C, F, H, W)` float32 in [0, 1]."""
    if frames.ndim != 4 or frames.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 frames shaped (F, H, W, C), got {frames.dtype} {frames.shape}"
        )
    tensor = torch.from_numpy(np.ascontiguousarray(frames)).float().div_(255.0)
    return rearrange(tensor, "f h w c -> c f h w")


# ---------------------------------------------------------------------------------------
# reading


def natural_key(name: str) -> list[Any]:
    """Sort key that orders `frame2.png` before `frame10.png`."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_frame_files(folder: str | Path) -> list[Path]:
    """The image files (png / jpg) directly inside `folder`, in natural name order."""
    folder = Path(folder)
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: natural_key(p.name))


def _as_text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _iter_gif(path: Path, max_frames: int | None, max_pixels: int | None) -> Iterator[PILImage.Image]:
    Image = _pillow()
    with Image.open(path) as image:
        if image.format != "GIF":
            raise ValueError(f"{path} is not a GIF (Pillow reads it as {image.format})")
        check_frame_size(*image.size, path, max_pixels)
        # First pass reads the frame durations of at most `max_frames` frames (not
        # `n_frames`, which would walk a hostile file to its end); the second decodes
        # lazily so a caller can stop early or give up between frames.
        durations = []
        index = 0
        limit = MAX_GIF_FRAMES if max_frames is None else min(max_frames, MAX_GIF_FRAMES)
        while index < limit:
            try:
                image.seek(index)
            except EOFError:
                break
            durations.append(int(image.info.get("duration", 0) or 0))
            index += 1
        shortest = min((d for d in durations if d > 0), default=0)
        # `write_gif` records the duration of one frame, which is the only way to recover
        # the frame count of a video whose frames Pillow merged into a single one.
        match = _FRAME_DURATION.search(_as_text(image.info.get("comment", b"")))
        if match:
            shortest = int(match.group(1))
        for index, duration in enumerate(durations):
            image.seek(index)
            # convert() composites the frame with the ones before it (GIF disposal rules)
            frame = to_rgb(image)
            repeat = 1
            if shortest > 0 and duration > 0:
                repeat = min(max(round(duration / shortest), 1), _MAX_GIF_REPEAT)
            for _ in range(repeat):
                yield frame


def _iter_pyav(path: Path, max_frames: int | None, max_pixels: int | None) -> Iterator[PILImage.Image]:
    _imageio()
    import av

    Image = _pillow()
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        check_frame_size(stream.codec_context.width, stream.codec_context.height, path, max_pixels)
        for index, frame in enumerate(container.decode(stream)):
            if max_frames is not None and index >= max_frames:
                break
            # A stream may change size mid-way; each frame is checked before conversion.
            check_frame_size(frame.width, frame.height, path, max_pixels)
            yield Image.fromarray(frame.to_ndarray(format="rgb24"))


def _iter_frame_folder(path: Path, max_frames: int | None, max_pixels: int | None) -> Iterator[PILImage.Image]:
    Image = _pillow()
    files = list_frame_files(path)
    if not files:
        raise ValueError(f"{path} holds no frames ({', '.join(IMAGE_EXTENSIONS)})")
    for file in files[:max_frames]:
        with Image.open(file) as image:
            check_frame_size(*image.size, file, max_pixels)
            yield to_rgb(image)


def iter_frames(
    path: str | Path, *, max_frames: int | None = None, max_pixels: int | None = None
) -> Iterator[PILImage.Image]:
    """Yield the frames of a video file (gif / mp4 / webm) or a folder of frames as RGB
    Pillow images, one at a time (callers can stop early or check a time limit between
    frames). At most `max_frames` frames are read; a frame larger than `max_pixels` (None:
    `MAX_FRAME_PIXELS`) raises `FrameTooLargeError` before it is decoded."""
    path = Path(path)
    if path.is_dir():
        return _iter_frame_folder(path, max_frames, max_pixels)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        return _iter_gif(path, max_frames, max_pixels)
    if suffix in (".mp4", ".webm"):
        return _iter_pyav(path, max_frames, max_pixels)
    raise ValueError(
        f"cannot read {path}: expected a folder of frames or one of {', '.join(VIDEO_EXTENSIONS)}"
    )


def probe_video(path: str | Path, *, max_pixels: int | None = None) -> None:
    """Cheap validity check of a video source: reads headers, decodes at most one frame.

    Raises (any exception) when the source is unreadable or its frames are larger than
    `max_pixels` (None: `MAX_FRAME_PIXELS`); returns None when it looks fine. A file can pass this and still fail
    later (a GIF truncated after its first frame)."""
    path = Path(path)
    if path.is_dir():
        files = list_frame_files(path)
        if not files:
            raise ValueError(f"{path} holds no frames")
        with _pillow().open(files[0]) as image:
            check_frame_size(*image.size, files[0], max_pixels)
            image.verify()
        return
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes)")
    suffix = path.suffix.lower()
    if suffix == ".gif":
        with _pillow().open(path) as image:
            if image.format != "GIF":
                raise ValueError(f"{path} is not a GIF (Pillow reads it as {image.format})")
            check_frame_size(*image.size, path, max_pixels)
            image.seek(0)
            image.load()
        return
    if suffix in (".mp4", ".webm"):
        _imageio()
        import av

        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            context = container.streams.video[0].codec_context
            check_frame_size(context.width, context.height, path, max_pixels)
            # Decoding one frame catches files whose header is fine but whose data is not.
            for _ in container.decode(video=0):
                break
            else:
                raise ValueError(f"{path} has a video stream without frames")
        return
    raise ValueError(f"{path}: unsupported extension {suffix!r}")


def read_video(path: str | Path, *, channels: int = 3) -> Float[Tensor, "c f h w"]:
    """Read a whole video (file or folder of frames) at its own size as `(C, F, H, W)` in
    [0, 1]. `channels=1` converts to luma (ITU-R 601), `channels=3` to RGB."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    mode = "L" if channels == 1 else "RGB"
    arrays = [np.asarray(frame.convert(mode)) for frame in iter_frames(path)]
    if not arrays:
        raise ValueError(f"{path} has no frames")
    frames = np.stack(arrays)
    if channels == 1:
        frames = frames[..., None]
    return from_uint8_frames(frames)


def read_gif(path: str | Path, *, channels: int = 3) -> Float[Tensor, "c f h w"]:
    """Read a GIF as `(C, F, H, W)` in [0, 1] (Pillow only; no `video` extra needed)."""
    if Path(path).suffix.lower() != ".gif":
        raise ValueError(f"read_gif reads .gif files, got {path}")
    return read_video(path, channels=channels)


# ---------------------------------------------------------------------------------------
# writing


def write_gif(
    video: Float[Tensor, "c f h w"], path: str | Path, *, fps: float | int = 8.0, loop: int = 0
) -> Path:
    """Write `(C, F, H, W)` in [0, 1] as an animated GIF (Pillow). Grey videos (C = 1) are
    stored exactly; RGB ones through a 256-colour adaptive palette. `loop=0` loops forever."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    Image = _pillow()
    frames = to_uint8_frames(video)
    if frames.shape[-1] == 1:
        images = [Image.fromarray(frame[..., 0], mode="L") for frame in frames]
    else:
        images = [Image.fromarray(frame, mode="RGB") for frame in frames]
    # GIF durations are in units of 10 ms.
    duration = max(10, int(round(100.0 / fps)) * 10)

    def write(target: Path) -> None:
        images[0].save(
            target,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=duration,
            loop=loop,
            comment=f"spacetime-video frame_duration_ms={duration}",
        )

    return atomic_write(Path(path), write, keep_suffix=True)


def write_mp4(
    video: Float[Tensor, "c f h w"],
    path: str | Path,
    *,
    fps: float | int = 8.0,
    codec: str | None = None,
) -> Path:
    """Write `(C, F, H, W)` in [0, 1] as MP4 (H.264) or, for a `.webm` path, WebM (VP9)
    through imageio's pyav plugin (the `video` extra). These codecs store 4:2:0 chroma and
    so need even sizes: an odd height or width is padded by repeating the last row/column."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    path = Path(path)
    suffix = path.suffix.lower()
    if codec is None:
        if suffix not in _CODECS:
            raise ValueError(f"write_mp4 writes .mp4 or .webm, got {path}")
        codec = _CODECS[suffix]
    iio = _imageio()
    frames = to_uint8_frames(video)
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")

    def write(target: Path) -> None:
        iio.imwrite(target, frames, plugin="pyav", codec=codec, fps=fps)

    return atomic_write(path, write, keep_suffix=True)


def write_video(video: Float[Tensor, "c f h w"], path: str | Path, *, fps: float | int = 8.0) -> Path:
    """Write a video by the path's extension: `.gif` (Pillow) or `.mp4` / `.webm` (pyav)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".gif":
        return write_gif(video, path, fps=fps)
    if suffix in _CODECS:
        return write_mp4(video, path, fps=fps)
    raise ValueError(f"cannot write {path}: extension must be one of {', '.join(VIDEO_EXTENSIONS)}")


# ---------------------------------------------------------------------------------------
# sample grids


def video_grid(
    videos: Float[Tensor, "b c f h w"],
    *,
    nrow: int | None = None,
    padding: int = 2,
    pad_value: float | int = 0.0,
) -> Float[Tensor, "c f hh ww"]:
    """Tile B videos into one `(C, F, H', W')` video, `nrow` videos per row (default: the
    smallest square that holds them), with `padding` pixels of `pad_value` between them."""
    if videos.ndim != 5:
        raise ValueError(f"videos must be (B, C, F, H, W), got shape {tuple(videos.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    batch = videos.shape[0]
    if nrow is None:
        nrow = max(1, math.ceil(math.sqrt(batch)))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    rows = math.ceil(batch / nrow)
    missing = rows * nrow - batch
    if missing:
        blank = videos.new_full((missing, *videos.shape[1:]), pad_value)
        videos = torch.cat([videos, blank])
    if padding:
        # pad right and bottom of each tile, then once more on the left and top of the grid
        videos = torch.nn.functional.pad(videos, (0, padding, 0, padding), value=pad_value)
    grid = rearrange(videos, "(r n) c f h w -> c f (r h) (n w)", r=rows, n=nrow)
    if padding:
        grid = torch.nn.functional.pad(grid, (padding, 0, padding, 0), value=pad_value)
    return grid


def write_sample_grid(
    videos: Float[Tensor, "b c f h w"],
    path: str | Path,
    *,
    nrow: int | None = None,
    padding: int = 2,
    fps: float | int = 8.0,
) -> Path:
    """Tile a batch of videos with `video_grid` and write one animated file (by extension)."""
    return write_video(video_grid(videos, nrow=nrow, padding=padding), path, fps=fps)


# ---------------------------------------------------------------------------------------
# loss plot


def plot_loss(
    history: Sequence[tuple[int, float]],
    path: str | Path,
    *,
    title: str = "training loss",
    smoothing: int = 0,
) -> Path:
    """Save a PNG of loss against step from `(step, loss)` pairs (matplotlib, Agg backend).
    `smoothing > 1` overlays a moving average over that many points."""
    if not history:
        raise ValueError("history is empty: nothing to plot")
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    plt = _pyplot()
    steps = np.asarray([step for step, _ in history], dtype=np.float64)
    losses = np.asarray([loss for _, loss in history], dtype=np.float64)
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        axes.plot(steps, losses, linewidth=0.8, alpha=0.5 if smoothing > 1 else 1.0, label="loss")
        if smoothing > 1 and len(losses) >= smoothing:
            kernel = np.ones(smoothing) / smoothing
            axes.plot(
                steps[smoothing - 1 :],
                np.convolve(losses, kernel, mode="valid"),
                linewidth=1.5,
                label=f"mean of {smoothing}",
            )
            axes.legend()
        if np.all(losses > 0) and losses.max() / losses.min() > 20:
            axes.set_yscale("log")
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.set_title(title)
        axes.grid(True, alpha=0.3)
        figure.tight_layout()
        path = Path(path)
        atomic_write(path, lambda target: figure.savefig(target, format="png"), keep_suffix=True)
    finally:
        plt.close(figure)
    return path
