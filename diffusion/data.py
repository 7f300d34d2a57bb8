"""Video data sets: a folder of videos with captions, and the helpers they share.

`VideoFolder` yields `{"video": (C, F, H, W) float32 in [0, 1], "caption": str}` per item;
the diffusion model encodes the captions (the deprecated `text_encoder=` still adds
embeddings here).
`collate_videos` batches such items (it pads token embeddings of different lengths).

How a video is cast to `num_frames` (`frame_mode`):
- `"stride"`: `num_frames` evenly spaced frames from first to last (the whole clip, faster
  motion); a clip shorter than `num_frames` has frames repeated, evenly.
- `"crop"`: `num_frames` contiguous frames (real-time motion) starting at the beginning,
  the centre, or a random position (`window`); a short clip is padded as in `"pad"`.
- `"pad"`: the first `num_frames` frames; a short clip repeats its last frame.

Unreadable files never crash training. At construction each file gets a probe (`probe`:
`"header"` reads headers and the first frame, `"full"` decodes every file, `"none"` skips
this), and a file that fails is skipped with one warning naming it and a closing
`skipped K of N videos` line. A file that passes the probe but fails later (a GIF truncated
after its first frame) is skipped in `__getitem__` the same way: one warning, and the next
readable item is returned in its place. Each probe and decode runs under `decode_timeout`
seconds, so a hostile file cannot hang a data loader worker (the abandoned decode stops at
its next frame), and frames whose header claims more than `media.MAX_FRAME_PIXELS` pixels
are refused before decoding (a decompression-bomb guard); see `diffusion.media`.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from torch.utils.data import Dataset

from diffusion import media
from spacetime.checks import check_choice, check_int

if TYPE_CHECKING:
    from PIL import Image as PILImage

logger = logging.getLogger(__name__)

FRAME_MODES = ("stride", "crop", "pad")
WINDOWS = ("start", "center", "random")
CAPTION_MODES = ("auto", "required", "none")
PROBE_MODES = ("header", "full", "none")
TEXT_EMBEDDINGS = ("pooled", "tokens")


def _check_positive_int(name: str, value: Any) -> None:
    check_int(name, value, low=1)


# ---------------------------------------------------------------------------------------
# frames: which ones, at what size


def select_frames(
    total: int,
    num_frames: int,
    mode: str = "stride",
    *,
    window: str = "start",
    generator: torch.Generator | None = None,
) -> list[int]:
    """Indices of the `num_frames` source frames (out of `total`) to keep; see the module
    docstring for the modes. `generator` drives `window="random"`."""
    check_choice("frame_mode", mode, FRAME_MODES)
    check_choice("window", window, WINDOWS)
    if total < 1:
        raise ValueError(f"a video needs at least one frame, got {total}")
    _check_positive_int("num_frames", num_frames)
    if mode == "stride":
        return np.linspace(0, total - 1, num_frames).round().astype(int).tolist()
    start = 0
    if mode == "crop" and total > num_frames:
        if window == "center":
            start = (total - num_frames) // 2
        elif window == "random":
            start = int(torch.randint(0, total - num_frames + 1, (), generator=generator))
    return [min(start + offset, total - 1) for offset in range(num_frames)]


def resize_and_crop(frame: PILImage.Image, image_size: int) -> PILImage.Image:
    """Resize so the shorter side is `image_size` (bicubic, antialiased when shrinking),
    then crop the centre square."""
    Image = media._pillow()

    width, height = frame.size
    if min(width, height) != image_size:
        scale = image_size / min(width, height)
        size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
        frame = frame.resize(size, Image.Resampling.BICUBIC)
        width, height = size
    if (width, height) != (image_size, image_size):
        left, top = (width - image_size) // 2, (height - image_size) // 2
        frame = frame.crop((left, top, left + image_size, top + image_size))
    return frame


def decode_with_timeout(function, timeout: float | int | None):
    """Run `function(cancel)` in a worker thread and give up after `timeout` seconds.

    `cancel` is a `threading.Event` the function should check between frames, so an
    abandoned decode stops soon after; the call itself returns (raising `TimeoutError`)
    on time even if the decoder is stuck inside one frame."""
    cancel = threading.Event()
    if timeout is None:
        return function(cancel)
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = function(cancel)
        except BaseException as error:  # handed to the caller's thread below
            outcome["error"] = error

    thread = threading.Thread(target=work, name="video-decode", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        cancel.set()
        raise TimeoutError(f"decoding took longer than {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# ---------------------------------------------------------------------------------------
# captions and their embeddings


def caption_path(source: str | Path) -> Path:
    """Where the caption of a video lives: `clip.gif` -> `clip.txt`, folder `clip/` ->
    `clip.txt` beside it."""
    source = Path(source)
    if source.is_dir():
        return source.with_name(source.name + ".txt")
    return source.with_name(source.stem + ".txt")


def read_caption(source: str | Path) -> str | None:
    """The stripped caption of a video, or None when it has no (or an empty) caption file."""
    path = caption_path(source)
    if not path.is_file():
        return None
    text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
    return text or None


def deprecated_text_encoder(owner: str) -> None:
    warnings.warn(
        f"{owner}(text_encoder=...) is deprecated: data sets return captions and the diffusion model "
        "encodes them (GaussianDiffusion(text_encoder=...), each distinct caption once)",
        DeprecationWarning, stacklevel=3,
    )


class CaptionEmbeddings:
    """Deprecated: the diffusion model encodes captions now (`GaussianDiffusion.text_cache`).
    Kept for code that passes `text_encoder=` to a data set.

    Text embeddings of a fixed set of captions, encoded once, in batches, and kept in
    memory keyed by the caption string.

    Encoding up front (in the main process, before any data loader worker forks) means
    workers never run, or even load, the text model. `encoder` is anything with
    `encode(list[str])` returning an object with `tokens (B, L, D)`, `mask (B, L)` and
    `pooled (B, D)` (`diffusion.text.TextEncoder`). `kind="pooled"` keeps one `(D,)` vector
    per caption; `kind="tokens"` keeps the unpadded `(L, D)` token states.
    """

    def __init__(
        self, encoder: Any, captions: Iterable[str], *, kind: str = "pooled", batch_size: int = 64
    ) -> None:
        check_choice("text_embedding", kind, TEXT_EMBEDDINGS)
        if not callable(getattr(encoder, "encode", None)):
            raise TypeError(
                f"text_encoder must have an encode(list[str]) method, got {type(encoder).__name__}"
            )
        _check_positive_int("batch_size", batch_size)
        self.kind = kind
        self._table: dict[str, Tensor] = {}
        unique = list(dict.fromkeys(captions))
        with torch.no_grad():
            for first in range(0, len(unique), batch_size):
                batch = unique[first : first + batch_size]
                embedding = encoder.encode(batch)
                for row, caption in enumerate(batch):
                    if kind == "pooled":
                        value = embedding.pooled[row]
                    else:
                        value = embedding.tokens[row][embedding.mask[row].bool()]
                    # clone: a row view would keep the whole batch tensor alive
                    self._table[caption] = value.detach().to("cpu", torch.float32).clone()
        logger.info("encoded %d distinct captions (%s)", len(self._table), kind)

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, caption: str) -> bool:
        return caption in self._table

    def __call__(self, caption: str) -> dict[str, Tensor]:
        """The item entries for one caption: `cond`, plus `cond_mask` for tokens."""
        if caption not in self._table:
            raise KeyError(f"caption was not encoded up front: {caption!r}")
        value = self._table[caption]
        if self.kind == "pooled":
            return {"cond": value}
        return {"cond": value, "cond_mask": torch.ones(value.shape[0], dtype=torch.bool)}


def collate_videos(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch items of `VideoFolder` / `MovingDigits`: videos stacked to `(B, C, F, H, W)`,
    captions as a list, pooled embeddings stacked, token embeddings right-padded with zeros
    (and `cond_mask` False there) to the longest in the batch."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    batch: dict[str, Any] = {
        "video": torch.stack([item["video"] for item in items]),
        "caption": [item["caption"] for item in items],
    }
    if "cond" in items[0]:
        if "cond_mask" not in items[0]:
            batch["cond"] = torch.stack([item["cond"] for item in items])
        else:
            longest = max(item["cond"].shape[0] for item in items)
            dim = items[0]["cond"].shape[-1]
            cond = torch.zeros(len(items), longest, dim, dtype=items[0]["cond"].dtype)
            mask = torch.zeros(len(items), longest, dtype=torch.bool)
            for row, item in enumerate(items):
                length = item["cond"].shape[0]
                cond[row, :length] = item["cond"]
                mask[row, :length] = item["cond_mask"]
            batch["cond"], batch["cond_mask"] = cond, mask
    return batch


# ---------------------------------------------------------------------------------------
# the folder data set


@dataclass(frozen=True)
class VideoSource:
    """One video of a folder: a file or a folder of frames, and its caption."""

    path: Path
    caption: str


def find_videos(folder: str | Path) -> list[Path]:
    """Every video under `folder`, recursively, in natural name order: files with a video
    extension, and sub-folders that directly hold png / jpg frames (not searched further).
    Hidden files and folders (a leading dot, e.g. a half-written temporary) are ignored, as
    are images lying directly in `folder`."""
    root = Path(folder)
    found: list[Path] = []
    for directory, subdirectories, files in os.walk(root):
        here = Path(directory)
        subdirectories[:] = sorted(
            (d for d in subdirectories if not d.startswith(".")), key=media.natural_key
        )
        if here != root and any(
            Path(f).suffix.lower() in media.IMAGE_EXTENSIONS and not f.startswith(".") for f in files
        ):
            found.append(here)
            subdirectories[:] = []
            continue
        for name in sorted(files, key=media.natural_key):
            if not name.startswith(".") and Path(name).suffix.lower() in media.VIDEO_EXTENSIONS:
                found.append(here / name)
    return found


class VideoFolder(Dataset):
    """A torch Dataset over the videos in a folder (see the module docstring).

    folder: searched recursively for `.gif`, `.mp4`, `.webm` files (mp4 / webm need the
        `video` extra; gif only Pillow) and sub-folders of png / jpg frames (natural order).
    image_size: frames are resized (shorter side) and centre-cropped to this square size.
    num_frames: frames per item, chosen by `frame_mode` ("stride", "crop", "pad") and, for
        "crop", `window` ("random" (default), "start", "center").
    channels: 1 (luma) or 3 (RGB).
    captions: "auto" (read `name.txt` beside each video, "" when absent), "required" (a
        missing caption is a ValueError listing the files, raised here), "none" (ignore
        caption files; every caption is "").
    text_encoder: deprecated (the diffusion model encodes captions); if given, every
        distinct caption is encoded here and items carry `cond` (and `cond_mask`).
    probe: "header" (default), "full" or "none", see the module docstring.
    decode_timeout: seconds allowed to decode one video (None: no limit).
    max_source_frames: at most this many frames of a source are decoded (stride then spans
        only those), bounding memory and time on very long files.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        image_size: int,
        num_frames: int,
        channels: int = 3,
        frame_mode: str = "stride",
        window: str = "random",
        captions: str = "auto",
        text_encoder: Any = None,
        text_embedding: str = "pooled",
        probe: str = "header",
        decode_timeout: float | int | None = 10.0,
        max_source_frames: int = 1024,
    ) -> None:
        super().__init__()
        _check_positive_int("image_size", image_size)
        _check_positive_int("num_frames", num_frames)
        _check_positive_int("max_source_frames", max_source_frames)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        check_choice("frame_mode", frame_mode, FRAME_MODES)
        check_choice("window", window, WINDOWS)
        check_choice("captions", captions, CAPTION_MODES)
        check_choice("probe", probe, PROBE_MODES)
        check_choice("text_embedding", text_embedding, TEXT_EMBEDDINGS)
        if decode_timeout is not None and decode_timeout <= 0:
            raise ValueError(f"decode_timeout must be positive or None, got {decode_timeout}")
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"video folder {self.folder} does not exist or is not a folder")
        self.image_size = image_size
        self.num_frames = num_frames
        self.channels = channels
        self.frame_mode = frame_mode
        self.window = window
        self.decode_timeout = decode_timeout
        self.max_source_frames = max_source_frames

        paths = find_videos(self.folder)
        if not paths:
            raise ValueError(
                f"no videos found in {self.folder}: expected {', '.join(media.VIDEO_EXTENSIONS)} "
                f"files or sub-folders of {', '.join(media.IMAGE_EXTENSIONS)} frames"
            )
        texts = [None if captions == "none" else read_caption(path) for path in paths]
        if captions == "required":
            missing = [path for path, text in zip(paths, texts) if text is None]
            if missing:
                shown = ", ".join(str(caption_path(p)) for p in missing[:10])
                more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
                raise ValueError(
                    f"captions='required' but {len(missing)} of {len(paths)} videos in "
                    f"{self.folder} have no (or an empty) caption file: {shown}{more}"
                )
        sources = [VideoSource(path, text or "") for path, text in zip(paths, texts)]

        # (path, reason) for every video skipped so far, in this process
        self.skipped: list[tuple[Path, str]] = []
        self._bad: set[int] = set()
        self._found = len(sources)
        if probe != "none":
            readable = []
            for source in sources:
                try:
                    if probe == "header":
                        # Under the decode time limit too: a header can promise a frame
                        # that takes long to decode.
                        decode_with_timeout(lambda cancel, path=source.path: media.probe_video(path), decode_timeout)
                    else:
                        self._decode(source)
                except ImportError:
                    raise
                except Exception as error:
                    self._skip(source.path, error)
                    continue
                readable.append(source)
            if self.skipped:
                logger.warning(
                    "skipped %d of %d videos in %s (unreadable)",
                    len(self.skipped), len(sources), self.folder,
                )
            if not readable:
                raise ValueError(
                    f"none of the {len(sources)} videos in {self.folder} could be read; "
                    "see the warnings above"
                )
            sources = readable
        self.sources: list[VideoSource] = sources
        self.text_embeddings: CaptionEmbeddings | None = None
        if text_encoder is not None:
            deprecated_text_encoder("VideoFolder")
            self.text_embeddings = CaptionEmbeddings(
                text_encoder, [s.caption for s in sources], kind=text_embedding
            )

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def captions(self) -> list[str]:
        return [source.caption for source in self.sources]

    def _skip(self, path: Path, error: BaseException) -> None:
        reason = f"{type(error).__name__}: {error}"
        self.skipped.append((path, reason))
        logger.warning("skipping unreadable video %s (%s)", path, reason)

    def _decode(self, source: VideoSource) -> Float[Tensor, "c f h w"]:
        # Modes that only need the first frames stop decoding there.
        early = self.frame_mode == "pad" or (self.frame_mode == "crop" and self.window == "start")
        limit = self.num_frames if early else self.max_source_frames
        mode = "L" if self.channels == 1 else "RGB"

        def decode(cancel: threading.Event) -> list[np.ndarray]:
            frames = []
            for frame in media.iter_frames(source.path):
                if cancel.is_set():
                    break
                frame = resize_and_crop(frame, self.image_size).convert(mode)
                frames.append(np.asarray(frame))
                if len(frames) >= limit:
                    break
            return frames

        started = time.monotonic()
        frames = decode_with_timeout(decode, self.decode_timeout)
        if not frames:
            raise ValueError(f"{source.path} has no frames")
        logger.debug("decoded %s in %.3f s", source.path, time.monotonic() - started)
        chosen = np.stack([frames[i] for i in select_frames(
            len(frames), self.num_frames, self.frame_mode, window=self.window
        )])
        if self.channels == 1:
            chosen = chosen[..., None]
        return media.from_uint8_frames(chosen)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} videos")
        index %= len(self)
        for attempt in range(len(self)):
            candidate = (index + attempt) % len(self)
            if candidate in self._bad:
                continue
            source = self.sources[candidate]
            try:
                video = self._decode(source)
            except ImportError:
                raise
            except Exception as error:
                # Substitute the next readable video rather than crash a training run.
                self._bad.add(candidate)
                self._skip(source.path, error)
                logger.warning(
                    "skipped %d of %d videos in %s so far", len(self.skipped), self._found, self.folder
                )
                continue
            item: dict[str, Any] = {"video": video, "caption": source.caption}
            if self.text_embeddings is not None:
                item.update(self.text_embeddings(source.caption))
            return item
        raise RuntimeError(
            f"none of the {len(self)} videos in {self.folder} could be decoded; see the warnings above"
        )


def folder_dataset(model: Any, folder: str | os.PathLike) -> VideoFolder:
    """The `VideoFolder` a diffusion model trains on: its frame count, channels and (square)
    image size."""
    size = model.image_size
    if not isinstance(size, int):
        if len(set(size)) != 1:
            raise ValueError(f"a video folder gives square frames; the model's image_size is {size}")
        size = size[0]
    dataset = VideoFolder(folder, image_size=size, num_frames=model.num_frames, channels=model.channels)
    logger.info("found %d videos in %s", len(dataset), folder)
    return dataset
