"""Inflate a pretrained 2D U-Net into a video U-Net (Make-A-Video, Singer et al. 2022, Sec. 3.2;
AnimateDiff, Guo et al. 2023, Sec. 4): keep every 2D module and its weights, fold the frames of
a video into the batch for them, and insert new temporal layers that unfold the frames, mix
across them and fold them back:

- a `TemporalConv` (Dirac init) after each selected spatial convolution;
- a `TemporalAttention` (zero-initialised output, residual) after each selected attention block.

Both start as the identity, so until they are trained the inflated model returns, for every
frame, exactly what the 2D model returns for that frame. They are marked temporal, so
`temporal_parameters(inflated)` yields exactly the new parameters (plus the temporal parts of
any spacetime layers the 2D model already had) and the 2D weights can stay frozen.

The temporal layers need the frame count, which the 2D model's own forward knows nothing of.
The `InflatedModel` wrapper writes it into a small `FrameContext` object shared with every
inserted layer for the duration of its forward (a plain Python object, not a global or a
`contextvars` variable, so `torch.compile` traces through it); outside that window the
inserted layers pass everything through, so the modified 2D model still works on images.

State-dict keys: the 2D model is modified in place (or a deep copy with `copy=True`) and held
by the wrapper as `model`. A selected module at path `p` is replaced by a wrapper holding it
as `p.spatial` with the new layer at `p.temporal`, so a 2D key `p.weight` becomes
`model.p.spatial.weight`; a spacetime `PseudoConv3d` already able to take video is held as
`p.layer` instead (`model.p.layer.*`). `InflatedModel.state_dict_2d()` and
`load_state_dict_2d()` translate to and from the 2D model's original key names.
"""

from __future__ import annotations

import copy as copy_module
import dataclasses
import fnmatch
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn
from torch.autograd import Variable
from torch.utils.checkpoint import checkpoint

from spacetime.attention import (
    PosBias,
    SpatialAttention,
    SpatioTemporalAttention,
    TemporalAttention,
)
from spacetime.checks import check_int, is_int
from spacetime.conv import PseudoConv3d, TemporalConv
from spacetime.params import is_temporal, spatial_parameters, temporal_parameters
from spacetime.time import EnableTime, check_enable_time

__all__ = ["FrameContext", "InflatedModel", "TemporalAfter", "VideoLayer", "inflate"]

logger = logging.getLogger(__name__)

Selector = str | Callable[[str, nn.Module], bool] | Sequence[str | type]

# Diffusers blocks are recognised by class name so that diffusers stays an optional dependency.
_DIFFUSERS_RESNETS = frozenset({"ResnetBlock2D", "ResnetBlockCondNorm2D"})
_DIFFUSERS_ATTENTIONS = frozenset({"Transformer2DModel", "DualTransformer2DModel", "Attention"})
# Spacetime layers that take a video themselves: handed the unfolded video, they use their own
# identity-initialised temporal part instead of gaining a second one.
_VIDEO_NATIVE = (PseudoConv3d,)
# Attention blocks of this library used on images; their own temporal sub-block never runs on
# folded frames (and their feed-forward token shift is not the identity), so they are treated
# like any third-party block and get a `TemporalAttention` after them.
_SPACETIME_ATTENTIONS = (SpatialAttention, SpatioTemporalAttention)
# Attributes that tell the channel count of an attention block's output, in order of trust.
_CHANNEL_ATTRS = (
    "out_channels", "out_dim", "dim", "query_dim", "embed_dim", "channels", "in_channels"
)


class FrameContext:
    """What the inserted temporal layers need and the 2D forward cannot pass them: the frame
    count of the video being run (None outside an `InflatedModel` forward: pass through) and
    its `enable_time` (bool or bool tensor `(B,)`)."""

    def __init__(self) -> None:
        self.num_frames: int | None = None
        self.enable_time: EnableTime = False


def _map_main(out: Any, fn: Callable[[Tensor], Tensor], owner: str) -> Any:
    """Apply `fn` to the main tensor of a module's output: the tensor itself, the first item of
    a tuple/list (diffusers blocks with `return_dict=False`), or the first field of a
    dataclass/mapping output (diffusers `Transformer2DModelOutput.sample`)."""
    if isinstance(out, Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        items = [fn(out[0]), *out[1:]]
        if hasattr(out, "_fields"):  # namedtuple
            return type(out)(*items)
        return type(out)(items)
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        first = dataclasses.fields(out)[0].name
        value = getattr(out, first)
        if isinstance(value, Tensor):
            return dataclasses.replace(out, **{first: fn(value)})
    elif isinstance(out, Mapping) and out:
        key = next(iter(out))
        if isinstance(out[key], Tensor):
            return {**out, key: fn(out[key])}
    raise TypeError(
        f"inflate: cannot find the output tensor of {owner}: it returned a "
        f"{type(out).__name__}; allowed are a tensor, a tuple/list starting with one, or a "
        f"dataclass/mapping whose first field is one"
    )


def _unfold_frames(y: Tensor, frames: int, owner: str) -> tuple[Tensor, str]:
    """Folded `(B*F, C, H, W)` features or `(B*F, N, C)` tokens -> `(B, C, F, H, W)` and the
    pattern that folds them back."""
    if y.shape[0] % frames != 0:
        raise ValueError(
            f"inflate: {owner} returned a batch of {y.shape[0]}, not a multiple of the "
            f"{frames} frames folded into it"
        )
    if y.ndim == 4:
        return rearrange(y, "(b f) c h w -> b c f h w", f=frames), "b c f h w -> (b f) c h w"
    if y.ndim == 3:
        # Tokens (a diffusers Attention on sequences): each token position is a "pixel".
        return rearrange(y, "(b f) n c -> b c f n 1", f=frames), "b c f n 1 -> (b f) n c"
    raise ValueError(
        f"inflate: {owner} returned a {y.ndim}-dim tensor of shape {tuple(y.shape)}; a temporal "
        f"layer can follow only (B*F, C, H, W) feature maps or (B*F, N, C) tokens"
    )


class TemporalAfter(nn.Module):
    """A 2D module (`spatial`, untouched) followed by a temporal layer (`temporal`) over the
    frames of its output. Outside an `InflatedModel` forward it is exactly `spatial`."""

    def __init__(self, spatial: nn.Module, temporal: nn.Module, context: FrameContext):
        super().__init__()
        self.spatial = spatial
        self.temporal = temporal
        # A plain attribute, not a submodule: shared by every inserted layer, no parameters.
        self.frame_context = context
        # Set by `InflatedModel.enable_gradient_checkpointing`: "temporal" recomputes the
        # temporal layer in backward, "both" the 2D module too (for 2D models that have no
        # checkpointing of their own).
        self.checkpointing: str | None = None

    def _temporal(self, y: Tensor) -> Tensor:
        frames = self.frame_context.num_frames
        assert frames is not None
        video, fold = _unfold_frames(y, frames, type(self.spatial).__name__)
        enabled = self.frame_context.enable_time
        if self.checkpointing is not None and torch.is_grad_enabled():
            out = checkpoint(self.temporal, video, enabled, use_reentrant=False)
        else:
            out = self.temporal(video, enabled)
        return rearrange(out, fold)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.checkpointing == "both" and torch.is_grad_enabled():
            out = checkpoint(self.spatial, *args, use_reentrant=False, **kwargs)
        else:
            out = self.spatial(*args, **kwargs)
        if self.frame_context.num_frames is None or self.frame_context.enable_time is False:
            return out
        return _map_main(out, self._temporal, type(self.spatial).__name__)


class VideoLayer(nn.Module):
    """A spacetime layer that takes video itself (`PseudoConv3d`) inside a 2D model: it gets the
    frames unfolded from the batch, so its own temporal part runs, and returns them folded."""

    def __init__(self, layer: nn.Module, context: FrameContext):
        super().__init__()
        self.layer = layer
        self.frame_context = context

    def forward(
        self, x: Float[Tensor, "b c *frames h w"], enable_time: EnableTime = True
    ) -> Float[Tensor, "b c_out *frames h w"]:
        frames = self.frame_context.num_frames
        if frames is None or x.ndim != 4:
            return self.layer(x, enable_time)
        # The 2D model may itself switch time off for this call; it cannot switch it on.
        enabled = False if enable_time is False else self.frame_context.enable_time
        video, fold = _unfold_frames(x, frames, type(self.layer).__name__)
        return rearrange(self.layer(video, enabled), fold)


class _FramesInBackward(torch.autograd.Function):
    """Identity on an output of the inflated model whose backward puts the frame context back
    for the rest of the backward pass and clears it when the pass ends. Gradient checkpointing
    (diffusers' `enable_gradient_checkpointing`, `torch.utils.checkpoint`) re-runs 2D blocks
    during backward, after the forward has cleared the context; without this, their temporal
    layers would be skipped in the re-run and the recomputation would not match."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, context: FrameContext, frames: int, enabled: Any) -> Tensor:
        ctx.context = context
        ctx.state = (frames, enabled)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        context = ctx.context
        saved = (context.num_frames, context.enable_time)
        context.num_frames, context.enable_time = ctx.state

        def restore() -> None:
            context.num_frames, context.enable_time = saved

        # Runs once the whole backward pass (and every recomputation in it) is done.
        Variable._execution_engine.queue_callback(restore)
        return grad, None, None, None


def _frames_in_backward(value: Any, context: FrameContext, frames: int, enabled: EnableTime) -> Any:
    if isinstance(value, Tensor):
        if value.requires_grad:
            return _FramesInBackward.apply(value, context, frames, enabled)
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            f.name: _frames_in_backward(getattr(value, f.name), context, frames, enabled)
            for f in dataclasses.fields(value)
            if f.init
        }
        return dataclasses.replace(value, **changes)
    if isinstance(value, Mapping):
        return {k: _frames_in_backward(v, context, frames, enabled) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        items = [_frames_in_backward(v, context, frames, enabled) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def _repeat_per_frame(value: Any, batch: int, frames: int) -> Any:
    """Per-video conditioning -> per frame: every tensor whose first dim is the batch is
    repeated for each frame, in the `(b f)` order the frames are folded in."""
    if isinstance(value, Tensor):
        if value.ndim > 0 and value.shape[0] == batch:
            return value.repeat_interleave(frames, dim=0)
        return value
    if isinstance(value, Mapping):
        return {k: _repeat_per_frame(v, batch, frames) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        items = [_repeat_per_frame(v, batch, frames) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def _unfold_output(value: Any, batch: int, frames: int) -> Any:
    """The 2D model's per-frame output -> per video: `(B*F, C, H, W)` -> `(B, C, F, H, W)`,
    other `(B*F, ...)` tensors -> `(B, F, ...)`; containers keep their type."""
    if isinstance(value, Tensor):
        if value.ndim == 0 or value.shape[0] != batch * frames:
            return value
        if value.ndim == 4:
            return rearrange(value, "(b f) c h w -> b c f h w", b=batch)
        return rearrange(value, "(b f) ... -> b f ...", b=batch)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            f.name: _unfold_output(getattr(value, f.name), batch, frames)
            for f in dataclasses.fields(value)
            if f.init
        }
        return dataclasses.replace(value, **changes)
    if isinstance(value, Mapping):
        return {k: _unfold_output(v, batch, frames) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        items = [_unfold_output(v, batch, frames) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


class InflatedModel(nn.Module):
    """A 2D model run on video. Built by `inflate`; holds the (modified) 2D model as `model`.

    `forward(x, *args, enable_time=True, **kwargs)`:
    - `x` a video `(B, C, F, H, W)`: frames are folded into the batch for the 2D model; every
      tensor in `args`/`kwargs` (nested in tuples, lists, dicts) whose first dim is B is
      per-video conditioning and is repeated for each frame (a timestep `(B,)`,
      `encoder_hidden_states (B, L, D)`, class labels, `added_cond_kwargs` ...); others (a
      scalar timestep, flags) pass as they are. The 2D model's output comes back in the same
      type with frames unfolded: `(B*F, C, H, W)` tensors -> `(B, C, F, H, W)` (e.g. a
      diffusers `UNet2DOutput.sample`, or the tuple for `return_dict=False`).
    - `x` an image `(B, C, H, W)`: exactly the 2D model's call.
    - `enable_time`: bool or bool tensor `(B,)`; where False, frames do not interact and the
      result is the 2D model's per frame.
    """

    def __init__(
        self,
        model: nn.Module,
        context: FrameContext,
        wrapped: dict[str, str],
        keys_2d: list[str],
    ):
        super().__init__()
        self.model = model
        self.frame_context = context
        # 2D module path -> name of the child that now holds the original module.
        self.wrapped = dict(wrapped)
        self.keys_2d = list(keys_2d)

    def forward(
        self,
        x: Float[Tensor, "b c *frames h w"],
        *args: Any,
        enable_time: EnableTime = True,
        **kwargs: Any,
    ) -> Any:
        if x.ndim not in (4, 5):
            raise ValueError(
                f"inflated model expects an image (B, C, H, W) or a video (B, C, F, H, W), got a "
                f"tensor with {x.ndim} dims of shape {tuple(x.shape)}"
            )
        batch = x.shape[0]
        enabled = check_enable_time(enable_time, batch)
        context = self.frame_context
        saved = (context.num_frames, context.enable_time)
        if x.ndim == 4:
            context.num_frames, context.enable_time = None, False
            try:
                return self.model(x, *args, **kwargs)
            finally:
                context.num_frames, context.enable_time = saved
        frames = x.shape[2]
        folded = rearrange(x, "b c f h w -> (b f) c h w")
        args = _repeat_per_frame(args, batch, frames)
        kwargs = _repeat_per_frame(kwargs, batch, frames)
        context.num_frames, context.enable_time = frames, enabled
        try:
            out = self.model(folded, *args, **kwargs)
        finally:
            context.num_frames, context.enable_time = saved
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            out = _frames_in_backward(out, context, frames, enabled)
        return _unfold_output(out, batch, frames)

    def temporal_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters that mix across frames (train these; the 2D weights can stay frozen)."""
        return temporal_parameters(self)

    def spatial_parameters(self) -> Iterator[nn.Parameter]:
        """Every other parameter: the 2D model's own."""
        return spatial_parameters(self)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward instead of keeping them (less memory, about
        one more forward of time). A 2D model with its own `enable_gradient_checkpointing`
        (diffusers) checkpoints its blocks, which hold the temporal convolutions; every
        temporal layer is checkpointed too, and for a 2D model without its own, each selected
        2D module with it. The frame context is restored for the recomputation
        (`_FramesInBackward`), so checkpointed gradients equal plain ones."""
        own = getattr(self.model, "enable_gradient_checkpointing", None)
        if callable(own):
            own()
        mode = "temporal" if callable(own) else "both"
        for module in self.modules():
            if isinstance(module, TemporalAfter):
                module.checkpointing = mode

    def disable_gradient_checkpointing(self) -> None:
        own = getattr(self.model, "disable_gradient_checkpointing", None)
        if callable(own):
            own()
        for module in self.modules():
            if isinstance(module, TemporalAfter):
                module.checkpointing = None

    def save_temporal(self, path: str | os.PathLike) -> Path:
        """Write only the temporal (and LoRA) weights, one small safetensors file that
        `load_temporal` applies to a fresh inflate of the same 2D model."""
        from spacetime.inflate_io import save_adapter

        return save_adapter(self, path)

    def load_temporal(self, path: str | os.PathLike) -> None:
        """Load a file written by `save_temporal`; the 2D weights are left as they are."""
        from spacetime.inflate_io import load_adapter

        load_adapter(self, path)

    def inflated_key(self, key_2d: str) -> str:
        """The key under which a 2D state-dict entry `key_2d` lives in `self.state_dict()`."""
        parts: list[str] = []
        prefix: list[str] = []
        for part in key_2d.split("."):
            prefix.append(part)
            parts.append(part)
            child = self.wrapped.get(".".join(prefix))
            if child is not None:
                parts.append(child)
        return "model." + ".".join(parts)

    def state_dict_2d(self) -> dict[str, Tensor]:
        """The 2D model's entries (buffers included) under their original key names, as
        `model_2d.state_dict()` gave them before inflation."""
        state = self.state_dict()
        return {key: state[self._present_key(key, state)] for key in self.keys_2d}

    def _present_key(self, key_2d: str, state: Mapping[str, Any]) -> str:
        # A layer wrapped by LoRA (peft) holds the original one as `base_layer`.
        key = self.inflated_key(key_2d)
        if key not in state:
            head, _, leaf = key.rpartition(".")
            if f"{head}.base_layer.{leaf}" in state:
                return f"{head}.base_layer.{leaf}"
        return key

    def load_state_dict_2d(self, state_dict: Mapping[str, Tensor], strict: bool = True) -> None:
        """Load 2D weights given under the 2D model's key names (e.g. a pretrained image
        U-Net's checkpoint); temporal parameters are left alone. With `strict`, the keys must be
        exactly the 2D model's."""
        known = set(self.keys_2d)
        given = set(state_dict)
        if strict and given != known:
            missing = sorted(known - given)
            unexpected = sorted(given - known)
            raise ValueError(
                f"load_state_dict_2d: keys do not match the 2D model: missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''}"
            )
        own = self.state_dict()
        mapped = {self._present_key(k, own): v for k, v in state_dict.items() if k in known}
        result = self.load_state_dict(mapped, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys


def _matcher(selector: Selector, what: str) -> Callable[[str, nn.Module], bool] | None:
    """None for "auto", else a predicate on (qualified name, module)."""
    if isinstance(selector, str):
        if selector != "auto":
            raise ValueError(
                f"{what} must be 'auto', a callable (name, module) -> bool, or a sequence of "
                f"module classes and name globs; got the string {selector!r} (wrap a single "
                f"glob in a list)"
            )
        return None
    if callable(selector):
        return selector
    if isinstance(selector, Sequence):
        items = list(selector)
        for item in items:
            is_class = isinstance(item, type) and issubclass(item, nn.Module)
            if not (isinstance(item, str) or is_class):
                raise TypeError(
                    f"{what} items must be nn.Module subclasses or name globs (str), got "
                    f"{type(item).__name__} {item!r}"
                )

        def match(name: str, module: nn.Module) -> bool:
            return any(
                isinstance(module, item)
                if isinstance(item, type)
                else fnmatch.fnmatchcase(name, item)
                for item in items
            )

        return match
    raise TypeError(
        f"{what} must be 'auto', a callable (name, module) -> bool, or a sequence of module "
        f"classes and name globs, got {type(selector).__name__}"
    )


def _is_diffusers(module: nn.Module, names: frozenset[str]) -> bool:
    cls = type(module)
    return cls.__name__ in names and cls.__module__.startswith("diffusers")


def _auto_convs(named: dict[str, nn.Module]) -> Callable[[str, nn.Module], bool]:
    resnets = {name for name, m in named.items() if _is_diffusers(m, _DIFFUSERS_RESNETS)}
    if resnets:
        # Diffusers U-Nets: the two 3x3 convolutions of each resnet block, as in AnimateDiff's
        # and Make-A-Video's placement (not conv_in/conv_out or the resamplers).
        def in_resnet(name: str, module: nn.Module) -> bool:
            parent, _, leaf = name.rpartition(".")
            is_conv = isinstance(module, nn.Conv2d)
            return is_conv and leaf in ("conv1", "conv2") and parent in resnets

        return in_resnet

    # Make-A-Video makes every k x k convolution pseudo-3D; 1x1 convolutions see no
    # neighbourhood in space, so they get none in time either.
    def spatial_conv(name: str, module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)

    return spatial_conv


def _auto_attns(name: str, module: nn.Module) -> bool:
    return isinstance(module, _SPACETIME_ATTENTIONS) or _is_diffusers(module, _DIFFUSERS_ATTENTIONS)


def _is_causal(layer: nn.Module) -> bool:
    temporal = getattr(layer, "temporal", None)
    return temporal is None or bool(getattr(temporal, "causal", False))


def _channels(name: str, module: nn.Module) -> int:
    for attr in _CHANNEL_ATTRS:
        value = getattr(module, attr, None)
        if is_int(value) and value > 0:
            return value
    raise TypeError(
        f"inflate: cannot tell the output channels of attention block {name!r} "
        f"({type(module).__name__}): it has none of the attributes {list(_CHANNEL_ATTRS)}; "
        f"select other modules with attns="
    )


def _match_placement(new: nn.Module, old: nn.Module) -> None:
    """Put a new temporal layer on the device and floating dtype of the 2D module it follows
    (only the new layer moves: the 2D weights keep theirs)."""
    reference = next((p for p in old.parameters() if p.is_floating_point()), None)
    if reference is not None:
        new.to(device=reference.device, dtype=reference.dtype)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def inflate(
    model_2d: nn.Module,
    *,
    temporal_conv: bool = True,
    temporal_attn: bool = True,
    temporal_kernel_size: int = 3,
    heads: int = 8,
    dim_head: int = 64,
    pos_bias: PosBias = True,
    causal_time: bool = False,
    convs: Selector = "auto",
    attns: Selector = "auto",
    backend: str | None = None,
    copy: bool = False,
) -> InflatedModel:
    """Turn a 2D U-Net (this library's, a user's, or a diffusers `UNet2DModel` /
    `UNet2DConditionModel`) into a video model; see the module docstring and `InflatedModel`.

    - `temporal_conv`: put a `TemporalConv(channels, temporal_kernel_size, causal=causal_time)`
      after each spatial convolution chosen by `convs`.
    - `temporal_attn`: put a `TemporalAttention(channels, heads=, dim_head=, pos_bias=,
      causal=causal_time, backend=)` after each attention block chosen by `attns`.
    - `convs` / `attns`: "auto", a predicate `(qualified_name, module) -> bool`, or a sequence
      of module classes (isinstance) and name globs (fnmatch on the qualified name).
      "auto" convs: in a diffusers U-Net, `conv1`/`conv2` of its resnet blocks; otherwise every
      `nn.Conv2d` with a kernel larger than 1x1. "auto" attns: diffusers `Transformer2DModel` /
      `Attention` and spacetime `SpatialAttention` / `SpatioTemporalAttention` blocks. Only the
      outermost selected attention block of a nest gets a temporal layer.
      Spacetime `PseudoConv3d` layers are always handed the video and use their own temporal
      convolution; nothing inside a temporal-marked module is selected.
    - `copy`: inflate a deep copy and leave `model_2d` as it was. By default `model_2d` itself
      is modified in place (its selected submodules are replaced by wrappers holding them);
      called directly it still behaves as before on images. Its weights are never changed.

    Raises TypeError if `model_2d` is not an nn.Module or has no `nn.Conv2d` (not a 2D U-Net),
    ValueError if nothing was selected or an option is out of range.
    """
    if not isinstance(model_2d, nn.Module):
        raise TypeError(f"inflate expects a 2D U-Net (an nn.Module), got {type(model_2d).__name__}")
    if isinstance(model_2d, InflatedModel):
        raise TypeError("inflate: this model is already inflated")
    if not any(isinstance(m, nn.Conv2d) for m in model_2d.modules()):
        raise TypeError(
            f"inflate expects a 2D U-Net (a module with nn.Conv2d layers); "
            f"{type(model_2d).__name__} has none"
        )
    for flag, value in (("temporal_conv", temporal_conv), ("temporal_attn", temporal_attn),
                        ("causal_time", causal_time), ("copy", copy)):
        if not isinstance(value, bool):
            raise TypeError(f"inflate: {flag} must be a bool, got {type(value).__name__}")
    for option, value in (("temporal_kernel_size", temporal_kernel_size), ("heads", heads),
                          ("dim_head", dim_head)):
        check_int(f"inflate: {option}", value, low=1)
    if not causal_time and temporal_kernel_size % 2 == 0:
        raise ValueError(
            f"inflate: temporal_kernel_size must be odd unless causal_time=True (a centred kernel "
            f"keeps the frame count), got {temporal_kernel_size}"
        )
    conv_match = _matcher(convs, "convs")
    attn_match = _matcher(attns, "attns")

    model = copy_module.deepcopy(model_2d) if copy else model_2d
    keys_2d = list(model.state_dict().keys())
    named = dict(model.named_modules())
    if conv_match is None:
        conv_match = _auto_convs(named)
    if attn_match is None:
        attn_match = _auto_attns

    # Subtrees that are already temporal or take video themselves get nothing inserted.
    native = [name for name, m in named.items() if name and isinstance(m, _VIDEO_NATIVE)]
    closed = [name for name, m in named.items() if name and is_temporal(m)] + native

    def inside(name: str, roots: list[str]) -> bool:
        return any(name == r or name.startswith(r + ".") for r in roots)

    candidates = {name: m for name, m in named.items() if name and not inside(name, closed)}
    conv_paths = [n for n, m in candidates.items() if temporal_conv and conv_match(n, m)]
    attn_paths: list[str] = []
    if temporal_attn:
        selected = [n for n, m in candidates.items() if attn_match(n, m)]
        attn_paths = [n for n in selected if not any(n.startswith(o + ".") for o in selected)]
    for name in conv_paths:
        if not isinstance(named[name], nn.Conv2d):
            raise TypeError(
                f"inflate: convs selected {name!r}, a {type(named[name]).__name__}; only "
                f"nn.Conv2d modules can take a temporal convolution"
            )
    if causal_time:
        # A native layer keeps the temporal kernel it was built with; re-padding a centred
        # Dirac kernel causally would shift frames, so causality cannot be imposed on it.
        acausal = [n for n in native if not _is_causal(named[n])]
        if acausal:
            raise ValueError(
                f"inflate: causal_time=True but these PseudoConv3d layers of the 2D model were "
                f"built with causal_time=False and would see future frames: {acausal}"
            )
    overlap = sorted(set(conv_paths) & set(attn_paths))
    if overlap:
        raise ValueError(f"inflate: modules selected both as convs and as attns: {overlap}")
    if not (conv_paths or attn_paths or native):
        raise ValueError(
            f"inflate found nowhere to put temporal layers in {type(model_2d).__name__} "
            f"(temporal_conv={temporal_conv}, temporal_attn={temporal_attn}); check convs= / attns="
        )

    # Build every new layer before touching the model, so a bad option leaves it intact.
    context = FrameContext()
    replacements: dict[str, tuple[nn.Module, str]] = {}
    for name in conv_paths:
        conv = named[name]
        assert isinstance(conv, nn.Conv2d)
        temporal = TemporalConv(conv.out_channels, temporal_kernel_size, causal=causal_time)
        _match_placement(temporal, conv)
        replacements[name] = (TemporalAfter(conv, temporal, context), "spatial")
    for name in attn_paths:
        temporal = TemporalAttention(
            _channels(name, named[name]), dim_head=dim_head, heads=heads, pos_bias=pos_bias,
            causal=causal_time, backend=backend,
        )
        _match_placement(temporal, named[name])
        replacements[name] = (TemporalAfter(named[name], temporal, context), "spatial")
    for name in native:
        replacements[name] = (VideoLayer(named[name], context), "layer")

    # Deepest first: a wrapped module's own path is still valid when its parent is wrapped.
    for name in sorted(replacements, key=lambda n: n.count("."), reverse=True):
        wrapper, _ = replacements[name]
        _set_submodule(model, name, wrapper)
    logger.info(
        "inflate: %d temporal convs, %d temporal attentions, %d native video layers in %s",
        len(conv_paths), len(attn_paths), len(native), type(model_2d).__name__,
    )
    wrapped = {name: child for name, (_, child) in replacements.items()}
    return InflatedModel(model, context, wrapped, keys_2d)

