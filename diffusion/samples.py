"""Sample grids written during training: `rows x rows` videos from the EMA model as a GIF
(and MP4 with the video extra), with their captions in a `.txt` beside it.

The grid's noise comes from a generator seeded by the run's seed alone, so successive grids
of a run show the same starting noise and differ only by what the model learnt.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from diffusion import checkpoint as ckpt
from diffusion.batches import collate, derive_seed

logger = logging.getLogger(__name__)


def dataset_captions(dataset: Dataset, count: int) -> list[str] | None:
    """The first `count` captions of a data set (its `captions` list, or its items'), or
    None when its items carry none."""
    captions = getattr(dataset, "captions", None)
    if isinstance(captions, Sequence) and len(captions) > 0 and isinstance(captions[0], str):
        return list(captions[:count])
    found = []
    for index in range(min(count, len(dataset))):
        item = dataset[index]
        if isinstance(item, Mapping) and isinstance(item.get("caption"), str):
            found.append(item["caption"])
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], str):
            found.append(item[1])
        else:
            return None
    return found or None


def conditions_on_captions(model: Any, dataset: Dataset, requested: bool | None) -> bool:
    """Whether a run conditions on captions: as `requested`, or (None) when the diffusion
    model is conditional (`GaussianDiffusion.is_conditional`, the one rule) and the data
    set's items carry captions."""
    if requested is not None:
        return bool(requested)
    if not getattr(model, "is_conditional", False):
        return False
    captions = dataset_captions(dataset, 8)
    if not captions:
        return False
    if not any(captions):
        logger.warning("the model takes a condition but the first captions are empty strings")
    return True


def sampling_model(ema_model: nn.Module, *, sharded: bool, is_main: bool, unsharded_copy: nn.Module | None,
                   device: torch.device) -> nn.Module | None:
    """The EMA model to sample from on this rank, or None where no samples are drawn. Under
    FSDP (`sharded`), gathers the EMA shards (a collective call: every rank calls this) into
    rank 0's `unsharded_copy`."""
    if not sharded:
        return ema_model if is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(ema_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    assert unsharded_copy is not None, "rank 0 keeps an unsharded copy under FSDP"
    unsharded_copy.load_state_dict(state)
    return unsharded_copy.to(device).eval()


class SampleGrid:
    """Writes `run_dir/<milestone>.gif` grids; see the module docstring.

    captions: the grid's captions when the run conditions on captions (default: the data
    set's first ones); `sample_kwargs` are extra `sample()` arguments (`sampler`, `steps`)."""

    def __init__(self, run_dir: Path, dataset: Dataset, *, rows: int, batch_size: int, seed: int,
                 conditional: bool, captions: Sequence[str] | None = None, cond_scale: float = 1.0,
                 sample_kwargs: Mapping[str, Any] | None = None, fps: float = 8.0, write_mp4: bool = True,
                 device: torch.device = torch.device("cpu"),
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.run_dir = Path(run_dir)
        self.dataset = dataset
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.conditional = conditional
        self.captions = list(captions) if captions is not None else None
        self.cond_scale = cond_scale
        self.sample_kwargs = dict(sample_kwargs or {})
        self.fps = fps
        self.write_mp4 = write_mp4
        self.device = device
        self.autocast = autocast
        self._warned_mp4 = False
        if self.captions is not None and not conditional:
            logger.warning("sample_captions ignored: this run does not condition on captions")

    def conditions(self, count: int) -> tuple[list[str] | None, dict[str, Tensor] | None]:
        """`(captions, None)` for a captioned run, `(None, {cond, cond_mask})` for a data set
        of condition tensors, `(None, None)` for an unconditional one."""
        if self.conditional:
            captions = self.captions or dataset_captions(self.dataset, count) or [""]
            return [captions[i % len(captions)] for i in range(count)], None
        first = self.dataset[0]
        if isinstance(first, Mapping) and "cond" in first or (
            isinstance(first, (tuple, list)) and not isinstance(first[1], str)
        ):
            batch = collate([self.dataset[i % len(self.dataset)] for i in range(count)])
            conds = {"cond": batch["cond"].to(self.device)}
            if "cond_mask" in batch:
                conds["cond_mask"] = batch["cond_mask"].to(self.device)
            return None, conds
        return None, None

    @torch.no_grad()
    def videos(self, model: nn.Module) -> tuple[Tensor, list[str] | None]:
        """The grid's videos `(rows^2, C, F, H, W)` in [0, 1] on the CPU, and its captions."""
        count = self.rows**2
        captions, conds = self.conditions(count)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, 0, "samples"))
        # A model that samples from inputs (a super-resolution stage's low-res videos) says which.
        grid_inputs = getattr(model, "grid_inputs", None)
        inputs = grid_inputs(self.dataset, count) if callable(grid_inputs) else {}
        videos = []
        for start in range(0, count, self.batch_size):
            n = min(self.batch_size, count - start)
            kwargs: dict[str, Any] = {"batch_size": n, "generator": generator, **self.sample_kwargs}
            kwargs.update({key: value[start : start + n] for key, value in inputs.items()})
            if captions is not None:
                kwargs.update(cond=captions[start : start + n], cond_scale=self.cond_scale)
            elif conds is not None:
                kwargs.update({k: v[start : start + n] for k, v in conds.items()}, cond_scale=self.cond_scale)
            # Sampling runs in bf16 only on GPUs: CPUs without bf16 matrix units are slower in
            # bf16 than in fp32, and samples need no gradients whose memory bf16 would halve.
            autocast = self.autocast() if self.device.type == "cuda" else contextlib.nullcontext()
            with autocast:
                videos.append(model.sample(**kwargs).float().clamp(0.0, 1.0).cpu())
        return torch.cat(videos), captions

    def write(self, model: nn.Module, milestone: int | str) -> Path:
        from diffusion import media

        gif = self.run_dir / f"{milestone}.gif"
        grid, captions = self.videos(model)
        media.write_sample_grid(grid, gif, nrow=self.rows, fps=self.fps)
        if captions is not None:
            ckpt.atomic_write_text(gif.with_suffix(".txt"), "".join(f"{c}\n" for c in captions))
        if self.write_mp4:
            try:
                media.write_sample_grid(grid, gif.with_suffix(".mp4"), nrow=self.rows, fps=self.fps)
            except ImportError as err:
                if not self._warned_mp4:
                    logger.info("no MP4 samples (%s); GIFs are written", err)
                    self._warned_mp4 = True
        return gif
