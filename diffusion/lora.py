"""What trains in a pretrained base: temporal layers by default, LoRA on spatial attention as
an option (Hu et al. 2021, "LoRA"; AnimateDiff, Guo et al. 2023, sec. 4.3, adapts the image
model with LoRA beside its motion modules).

`select_trainable(denoise_fn, mode)` sets `requires_grad` before the optimizer is built:
- "auto": an inflated model (one holding a `spacetime.inflate` result) or a pretrained video
  U-Net (`diffusion.pretrained_video`) trains its temporal layers and LoRA weights only, so
  the pretrained 2D weights stay bit-identical; any other model is left as it is (every
  parameter that has `requires_grad` trains, what the trainer always did, so parameters a
  user froze stay frozen).
- "temporal": temporal parameters (and LoRA) only, for any model.
- "all": everything.

`add_spatial_lora(inflated, rank=...)` wraps the query/key/value/output projections of the 2D
model's attention (never the temporal layers) with `peft` LoRA adapters, zero-initialised so
the model's output is unchanged until they train. `peft` is imported when it is used.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from spacetime.checks import check_choice, check_int
from spacetime.params import temporal_parameters

__all__ = ["TRAINABLE", "LORA_TARGETS", "add_spatial_lora", "select_trainable"]

logger = logging.getLogger(__name__)

TRAINABLE = ("auto", "temporal", "all")
# diffusers `Attention` projections; `(?!.*\.temporal\.)` keeps inflate's temporal layers out.
LORA_TARGETS = r"^(?!.*\.temporal\.).*\.(to_q|to_k|to_v|to_out\.0)$"
PEFT_EXTRA = "pip install 'spacetime-video[lora]'"


def _inflated(module: nn.Module) -> bool:
    from spacetime.inflate import InflatedModel

    # A pretrained video base (`diffusion.pretrained_video`) says so with this attribute.
    return any(isinstance(m, InflatedModel) or getattr(m, "temporal_only_by_default", False)
               for m in module.modules())


def select_trainable(denoise_fn: nn.Module, mode: str = "auto") -> tuple[int, int]:
    """Set which parameters train (see the module docstring); returns (trainable, total)
    parameter counts."""
    check_choice("trainable", mode, TRAINABLE)
    params = list(denoise_fn.parameters())
    if mode == "auto" and not _inflated(denoise_fn):
        keep = {id(p) for p in params if p.requires_grad}
    elif mode == "all":
        keep = {id(p) for p in params}
    else:
        keep = {id(p) for p in temporal_parameters(denoise_fn)}
        keep |= {id(p) for name, p in denoise_fn.named_parameters() if "lora_" in name}
        if not keep:
            raise ValueError(f"trainable={mode!r}: {type(denoise_fn).__name__} has no temporal or LoRA parameters")
    for p in params:
        p.requires_grad_(id(p) in keep)
    trainable = sum(p.numel() for p in params if id(p) in keep)
    total = sum(p.numel() for p in params)
    logger.info("training %s of %s parameters (trainable=%s)", f"{trainable:,}", f"{total:,}", mode)
    return trainable, total


def add_spatial_lora(model: nn.Module, *, rank: int, alpha: float | int | None = None, targets: str = LORA_TARGETS) -> nn.Module:
    """Add LoRA adapters of `rank` (scale `alpha / rank`, default alpha = rank) to the 2D
    attention projections of `model` in place; returns it. Raises if nothing matched."""
    check_int("lora_rank", rank, low=1)
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:
        raise ModuleNotFoundError(f"LoRA needs the `peft` package: {PEFT_EXTRA}", name="peft") from err
    before = {id(p) for p in model.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=targets,
                        init_lora_weights=True)
    try:
        inject_adapter_in_model(config, model)
    except ValueError as err:
        raise ValueError(f"add_spatial_lora: no attention projection of {type(model).__name__} matched: {err}") from None
    # peft freezes everything but its adapters; put back what was trainable before.
    for p in model.parameters():
        if id(p) in before:
            p.requires_grad_(id(p) in trainable)
    model.lora_config = {"rank": rank, "alpha": float(alpha if alpha is not None else rank), "targets": targets}
    added = sum(p.numel() for p in model.parameters() if id(p) not in before)
    logger.info("LoRA rank %d on spatial attention: %s parameters added", rank, f"{added:,}")
    return model


def lora_options(model: Any) -> dict[str, Any] | None:
    """The LoRA settings `add_spatial_lora` recorded on `model`, or None."""
    return getattr(model, "lora_config", None)
