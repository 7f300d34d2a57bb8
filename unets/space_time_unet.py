"""SpaceTimeUnet: the factorised space-time U-Net of Make-A-Video (Singer et al. 2022).

Architecture and constructor arguments follow make-a-video-pytorch 0.4.0's `SpaceTimeUnet`
(same defaults): pseudo-3D convolutions (Sec. 3.2), resnet blocks with timestep FiLM,
factorised spatial-then-temporal attention (Ho et al. 2022) at the levels in `self_attns`,
pixel-shuffle down/upsampling in space at every level and in time where
`temporal_compression` says, and skip connections scaled by 2^-1/2.

Added here (all optional, off by default):
- text conditioning (`cond_dim`): a pooled condition (`cond_pool`: masked mean, or mean plus
  learned attention pooling, `unets.blocks.TextPool`) is projected and added to the timestep
  embedding, and every attention block cross-attends to the condition tokens; a learned null
  embedding replaces the condition with probability `null_cond_prob` for classifier-free
  guidance (Ho & Salimans 2022), see `unets.base.UnetMixin.forward_with_cond_scale`;
- an absolute frame position (`frame_pos_emb`): `spacetime.FramePositionEmbedding` added
  after the input convolution, so the network knows which frame comes first even at the
  noisiest steps (relative position biases and temporal convolutions do not tell it);
- block kinds chosen by registry name (`blocks`), e.g. full 3D convs (`conv="conv3d"`);
- conditioning frames (`frame_cond`): known frames and their mask through a zero-initialised
  projection added after the input convolution (`unets.frame_cond`);
- low-resolution conditioning (`lowres_cond`, a super-resolution stage): the upsampled video
  the same way, its noise-augmentation level added to the timestep embedding (`unets.lowres_cond`);
- self-conditioning (`self_cond`): its own previous x0 estimate the same way (`unets.self_cond`);
- per-block gradient checkpointing, and no copies of the skip tensors.

An image `(B, C, H, W)` is one frame with time off; `enable_time=False` on a video runs every
frame as an image; a per-sample `enable_time` mask mixes both in one batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from spacetime.checks import is_int
from spacetime.position import FramePositionEmbedding
from unets.base import UnetMixin
from unets.blocks import POOLINGS, TextPool, TimestepEmbedding, check_block_name, get_block
from unets.config import ConfigPart, UnetConfig, check_attn_backend
from unets.frame_cond import (
    FrameCondInput,
    FrameRateEmbedding,
    add_frame_rate,
    check_conditioning_options,
    frame_cond_inputs,
)
from unets.lowres_cond import LowresCond, add_lowres_features, add_noise_level, lowres_cond_inputs
from unets.self_cond import SelfCondInput, add_self_cond_features, self_cond_inputs

__all__ = ["PRESETS", "SpaceTimeBlocks", "SpaceTimeUnet", "SpaceTimeUnetConfig"]

_POS_BIAS_KINDS = ("continuous", "t5", "rotary")


@dataclasses.dataclass
class SpaceTimeBlocks(ConfigPart):
    """Which registered block (see `unets.blocks`) fills each role."""

    resnet: str = "resnet"
    conv: str = "pseudo3d"
    attention: str = "spatio_temporal"
    downsample: str = "pixel_shuffle"
    upsample: str = "pixel_shuffle"

    def validate(self) -> None:
        for kind in ("resnet", "conv", "attention", "downsample", "upsample"):
            check_block_name(kind, getattr(self, kind))


@dataclasses.dataclass
class SpaceTimeUnetConfig(UnetConfig):
    """Constructor arguments of `SpaceTimeUnet` (make-a-video-pytorch's, same defaults, plus
    `cond_dim`, `ff_mult`, `frame_pos_emb`, `cond_pool` and `blocks`)."""

    unet_name: ClassVar[str] = "space_time_unet"

    dim: int
    channels: int = 3
    dim_mult: tuple[int, ...] = (1, 2, 4, 8)
    self_attns: tuple[bool, ...] = (False, False, False, True)
    temporal_compression: tuple[bool, ...] = (False, True, True, True)
    resnet_block_depths: tuple[int, ...] = (2, 2, 2, 2)
    attn_dim_head: int = 64
    attn_heads: int = 8
    condition_on_timestep: bool = True
    attn_pos_bias: bool | str = True
    flash_attn: bool = False
    attn_backend: str | None = None
    causal_time_attn: bool = False
    cond_dim: int | None = None
    ff_mult: int = 4
    frame_pos_emb: bool = False
    cond_pool: str = "mean"
    blocks: SpaceTimeBlocks = dataclasses.field(default_factory=SpaceTimeBlocks)
    frame_cond: bool = False
    frame_rate_cond: bool = False
    lowres_cond: bool = False
    self_cond: bool = False

    def validate(self) -> None:
        for key in ("dim", "channels", "attn_dim_head", "attn_heads", "ff_mult"):
            value = getattr(self, key)
            if not is_int(value) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        if self.dim % 2:
            raise ValueError(f"dim must be even (sinusoidal timestep embedding), got {self.dim}")
        per_level = ("dim_mult", "self_attns", "temporal_compression", "resnet_block_depths")
        lengths = {k: len(getattr(self, k)) if isinstance(getattr(self, k), tuple) else None for k in per_level}
        if None in lengths.values():
            bad = [k for k, n in lengths.items() if n is None]
            raise ValueError(f"{bad} must be tuples (one entry per level), got {[getattr(self, k) for k in bad]}")
        if len(set(lengths.values())) != 1 or lengths["dim_mult"] == 0:
            raise ValueError(f"{list(per_level)} must all have one entry per level (>= 1 level), got lengths {lengths}")
        if any(not is_int(m) or m < 1 for m in self.dim_mult):
            raise ValueError(f"dim_mult entries must be positive ints, got {self.dim_mult}")
        if any(not is_int(d) or d < 1 for d in self.resnet_block_depths):
            raise ValueError(f"resnet_block_depths entries must be ints >= 1, got {self.resnet_block_depths}")
        for key in ("self_attns", "temporal_compression"):
            if any(not isinstance(v, bool) for v in getattr(self, key)):
                raise ValueError(f"{key} entries must be bools, got {getattr(self, key)}")
        if self.cond_pool not in POOLINGS:
            raise ValueError(f"cond_pool must be one of {list(POOLINGS)}, got {self.cond_pool!r}")
        if self.cond_pool != "mean" and self.cond_dim is None:
            raise ValueError(f"cond_pool={self.cond_pool!r} pools text tokens: it needs cond_dim, got cond_dim=None")
        if not isinstance(self.frame_pos_emb, bool):
            raise TypeError(f"frame_pos_emb must be a bool, got {self.frame_pos_emb!r}")
        if not isinstance(self.attn_pos_bias, bool) and self.attn_pos_bias not in _POS_BIAS_KINDS:
            raise ValueError(f"attn_pos_bias must be a bool or one of {list(_POS_BIAS_KINDS)}, got {self.attn_pos_bias!r}")
        if self.cond_dim is not None and (not is_int(self.cond_dim) or self.cond_dim < 1):
            raise ValueError(f"cond_dim must be None or a positive int, got {self.cond_dim!r}")
        if self.attn_backend is not None:
            check_attn_backend(self.attn_backend)
        check_conditioning_options(self)
        if self.frame_rate_cond and not self.condition_on_timestep and self.cond_dim is None:
            raise ValueError("frame_rate_cond=True adds to the timestep embedding: it needs condition_on_timestep=True or cond_dim")
        if self.lowres_cond and not self.condition_on_timestep and self.cond_dim is None:
            raise ValueError("lowres_cond=True adds its noise level to the timestep embedding: it needs "
                             "condition_on_timestep=True or cond_dim")
        if not isinstance(self.blocks, SpaceTimeBlocks):
            raise TypeError(f"blocks must be a SpaceTimeBlocks, got {type(self.blocks).__name__}")


PRESETS: dict[str, dict[str, Any]] = {
    # Tiny, for tests: two levels, attention and time compression at the second.
    "debug": dict(
        dim=8,
        dim_mult=(1, 2),
        self_attns=(False, True),
        temporal_compression=(False, True),
        resnet_block_depths=(1, 1),
        attn_dim_head=8,
        attn_heads=2,
    ),
    # The benchmark configuration (make-a-video comparison in `spacetime bench`).
    "small": dict(
        dim=32,
        dim_mult=(1, 2, 4),
        self_attns=(False, True, True),
        temporal_compression=(False, False, True),
        resnet_block_depths=(1, 1, 1),
        attn_dim_head=32,
        attn_heads=4,
    ),
    # make-a-video-pytorch's defaults at dim 64.
    "base": dict(dim=64),
}


class _Level(nn.Module):
    """One resolution of the U-Net: a resnet block taking the embedding, `depth` more resnet
    blocks, optional attention, and the resampler to the next (down) or from it (up)."""

    def __init__(
        self,
        init_block: nn.Module,
        blocks: list[nn.Module],
        attn: nn.Module | None,
        sample: nn.Module,
    ):
        super().__init__()
        self.init_block = init_block
        self.blocks = nn.ModuleList(blocks)
        self.attn = attn
        self.sample = sample


class SpaceTimeUnet(UnetMixin, nn.Module):
    """Make-A-Video's space-time U-Net. `forward(x, timestep=None, enable_time=True, *,
    cond=None, cond_mask=None, null_cond_prob=0.)` returns a tensor shaped like `x`."""

    config_class = SpaceTimeUnetConfig

    def __init__(self, *args: Any, **options: Any):
        """Options: the fields of `SpaceTimeUnetConfig` (see `inspect.signature(SpaceTimeUnet)`)."""
        super().__init__()
        config = SpaceTimeUnetConfig.from_options(*args, **options)
        self.config = config
        dim, channels, cond_dim = config.dim, config.channels, config.cond_dim
        attn_dim_head, attn_heads, ff_mult = config.attn_dim_head, config.attn_heads, config.ff_mult
        attn_pos_bias, flash_attn, attn_backend = config.attn_pos_bias, config.flash_attn, config.attn_backend
        condition_on_timestep, causal_time_attn = config.condition_on_timestep, config.causal_time_attn
        kinds = config.blocks
        resnet = get_block("resnet", kinds.resnet)
        conv = get_block("conv", kinds.conv)
        attention = get_block("attention", kinds.attention)
        downsample = get_block("downsample", kinds.downsample)
        upsample = get_block("upsample", kinds.upsample)

        num_levels = len(config.dim_mult)
        dims = [dim, *(m * dim for m in config.dim_mult)]
        self._frame_multiple = 2 ** sum(config.temporal_compression)
        self._size_multiple = 2**num_levels
        # Paper's trick for faster convergence (make-a-video-pytorch): scale skips by 2^-1/2.
        self.skip_scale = 2**-0.5

        # The embedding the resnet blocks are FiLM-ed by: diffusion timestep, pooled condition
        # or their sum. Not to be confused with the video's time axis.
        emb_dim = dim * 4 if (condition_on_timestep or cond_dim is not None) else None
        self.time_embed = TimestepEmbedding(dim, emb_dim) if condition_on_timestep else None
        self.fps_embed = FrameRateEmbedding(emb_dim) if config.frame_rate_cond else None
        if cond_dim is not None:
            self.cond_embed = nn.Sequential(nn.Linear(cond_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            # One learned token stands for "no condition" (classifier-free guidance).
            self.null_cond = nn.Parameter(torch.randn(cond_dim) * 0.02)
            self.cond_pool = TextPool(cond_dim, config.cond_pool)
        else:
            self.cond_embed = None
            self.null_cond = None

        # A custom attention factory need not know `backend`: it is only passed when pinned.
        pinned = {} if attn_backend is None else {"backend": attn_backend}

        def attn(d: int) -> nn.Module:
            return attention(
                d,
                dim_head=attn_dim_head,
                heads=attn_heads,
                ff_mult=ff_mult,
                pos_bias=attn_pos_bias,
                flash=flash_attn,
                causal_time_attn=causal_time_attn,
                context_dim=cond_dim,
                **pinned,
            )

        def res(d_in: int, d_out: int, with_emb: bool) -> nn.Module:
            return resnet(d_in, d_out, emb_dim=emb_dim if with_emb else None, conv=kinds.conv)

        self.conv_in = conv(channels, dim, 7, temporal_kernel_size=3)
        self.frame_pos = FramePositionEmbedding(dim) if config.frame_pos_emb else None
        self.frame_cond_in = FrameCondInput(channels, dim) if config.frame_cond else None
        self.lowres = LowresCond(channels, dim, emb_dim) if config.lowres_cond else None
        self.self_cond_in = SelfCondInput(channels, dim) if config.self_cond else None
        self.downs = nn.ModuleList()
        self.ups = nn.ModuleList()
        levels = zip(dims[:-1], dims[1:], config.self_attns, config.temporal_compression, config.resnet_block_depths)
        for dim_in, dim_out, self_attend, compress_time, depth in levels:
            self.downs.append(
                _Level(
                    res(dim_in, dim_out, True),
                    [res(dim_out, dim_out, False) for _ in range(depth)],
                    attn(dim_out) if self_attend else None,
                    downsample(dim_out, time=compress_time),
                )
            )
            # Up path: the first inner block also takes the second skip of the level.
            self.ups.append(
                _Level(
                    res(dim_out * 2, dim_in, True),
                    [res(dim_in + (dim_out if i == 0 else 0), dim_in, False) for i in range(depth)],
                    attn(dim_in) if self_attend else None,
                    upsample(dim_out, time=compress_time),
                )
            )
        mid_dim = dims[-1]
        self.mid_block1 = res(mid_dim, mid_dim, True)
        self.mid_attn = attn(mid_dim)
        self.mid_block2 = res(mid_dim, mid_dim, True)
        self.conv_out = conv(dim, channels, 3, temporal_kernel_size=3)

    @property
    def frame_multiple(self) -> int:
        return self._frame_multiple

    @property
    def size_multiple(self) -> int:
        return self._size_multiple

    # make-a-video-pytorch's name for size_multiple.
    @property
    def image_size_multiple(self) -> int:
        return self._size_multiple

    def _embed_cond(
        self, cond: Tensor | None, cond_mask: Tensor | None, null_cond_prob: float, batch: int, device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(tokens (B, L, D), mask (B, L), pooled (B, D)), with the null token swapped in for
        dropped samples. A dropped sample's tokens are all the null token and all attended,
        so its output does not depend on L or on the original condition."""
        null = self.null_cond
        assert null is not None
        d = null.shape[0]
        if cond is None:
            if cond_mask is not None:
                raise ValueError("cond_mask was given without cond")
            tokens = null.expand(batch, 1, d)
            mask = torch.ones(batch, 1, dtype=torch.bool, device=device)
        else:
            if cond.ndim not in (2, 3) or cond.shape[0] != batch or cond.shape[-1] != d:
                raise ValueError(
                    f"cond must be ({batch}, {d}) pooled or ({batch}, L, {d}) tokens, got shape {tuple(cond.shape)}"
                )
            tokens = cond[:, None] if cond.ndim == 2 else cond
            if cond_mask is None:
                mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=device)
            else:
                if cond.ndim != 3 or cond_mask.dtype != torch.bool or cond_mask.shape != tokens.shape[:2]:
                    raise ValueError(
                        f"cond_mask must be a bool tensor {tuple(tokens.shape[:2])} for token embeddings "
                        f"cond (B, L, D), got {cond_mask.dtype} {tuple(cond_mask.shape)} with cond {tuple(cond.shape)}"
                    )
                mask = cond_mask
            keep = self.cond_keep_mask(batch, null_cond_prob, device)
            if keep is not None:
                tokens = torch.where(keep[:, None, None], tokens.to(null.dtype), null)
                mask = mask | ~keep[:, None]
        return tokens, mask, self.cond_pool(tokens, mask)

    def _run_levels(
        self,
        x: Tensor,
        emb: Tensor | None,
        enable_time: bool | Tensor,
        context: Tensor | None,
        context_mask: Tensor | None,
        frame_cond: tuple[Tensor, Tensor] | None = None,
        lowres: tuple[Tensor, Tensor] | None = None,
        estimate: Tensor | None = None,
    ) -> Tensor:
        ck = self.checkpointed
        attn_kw = dict(context=context, context_mask=context_mask) if context is not None else {}
        x = self.conv_in(x, enable_time=enable_time)
        if self.frame_cond_in is not None and frame_cond is not None:
            x = self.frame_cond_in(x, frame_cond)
        x = add_lowres_features(self.lowres, x, lowres)
        x = add_self_cond_features(self.self_cond_in, x, estimate)
        if self.frame_pos is not None:
            x = self.frame_pos(x, enable_time)
        # No clones: nothing below writes into a skip tensor in place.
        skips: list[Tensor] = []
        for level in self.downs:
            x = ck(level.init_block, x, emb, enable_time)
            skips.append(x)
            for block in level.blocks:
                x = ck(block, x, None, enable_time)
            if level.attn is not None:
                x = ck(level.attn, x, enable_time, **attn_kw)
            skips.append(x)
            x = level.sample(x, enable_time=enable_time)
        x = ck(self.mid_block1, x, emb, enable_time)
        x = ck(self.mid_attn, x, enable_time, **attn_kw)
        x = ck(self.mid_block2, x, emb, enable_time)
        for level in reversed(self.ups):
            x = level.sample(x, enable_time=enable_time)
            x = torch.cat((skips.pop() * self.skip_scale, x), dim=1)
            x = ck(level.init_block, x, emb, enable_time)
            x = torch.cat((skips.pop() * self.skip_scale, x), dim=1)
            for block in level.blocks:
                x = ck(block, x, None, enable_time)
            if level.attn is not None:
                x = ck(level.attn, x, enable_time, **attn_kw)
        return self.conv_out(x, enable_time=enable_time)

    @property
    def cond_format(self) -> str | None:
        """"tokens" with `cond_dim` (pooled by `cond_pool` and cross-attended), else None."""
        return None if self.config.cond_dim is None else "tokens"

    def forward(
        self,
        x: Float[Tensor, "b c *frames h w"],
        timestep: Float[Tensor, "*#b"] | Tensor | float | int | None = None,
        enable_time: bool | Bool[Tensor, " b"] = True,
        *,
        cond: Float[Tensor, "b ..."] | None = None,
        cond_mask: Bool[Tensor, "b l"] | None = None,
        null_cond_prob: float = 0.0,
        focus_present_mask: Tensor | None = None,
        prob_focus_present: float = 0.0,
        cond_frames: Tensor | None = None,
        cond_frame_mask: Tensor | None = None,
        fps: Tensor | float | int | None = None,
        lowres_cond: Tensor | None = None,
        lowres_noise_level: Tensor | float | int | None = None,
        self_cond: Tensor | None = None,
    ) -> Float[Tensor, "b c *frames h w"]:
        config = self.config
        self.reject_unsupported(focus_present_mask=focus_present_mask, prob_focus_present=prob_focus_present)
        self.check_input(x, enable_time, config.channels)
        frame_cond = frame_cond_inputs("SpaceTimeUnet", config.frame_cond, x, cond_frames, cond_frame_mask)
        lowres = lowres_cond_inputs("SpaceTimeUnet", config.lowres_cond, x, lowres_cond, lowres_noise_level)
        estimate = self_cond_inputs("SpaceTimeUnet", config.self_cond, x, self_cond)
        batch = x.shape[0]

        emb = None
        if config.condition_on_timestep:
            if timestep is None:
                raise ValueError("this SpaceTimeUnet conditions on the timestep (condition_on_timestep=True); pass timestep")
            t = torch.as_tensor(timestep, device=x.device).float().reshape(-1)
            if t.shape[0] not in (1, batch):
                raise ValueError(f"timestep must be a scalar or have {batch} entries, got shape {tuple(t.shape)}")
            emb = self.time_embed(t.expand(batch))
        elif timestep is not None:
            raise ValueError("this SpaceTimeUnet was built with condition_on_timestep=False; pass timestep=None")

        context = context_mask = None
        if self.null_cond is not None:
            context, context_mask, pooled = self._embed_cond(cond, cond_mask, null_cond_prob, batch, x.device)
            cond_emb = self.cond_embed(pooled)
            emb = cond_emb if emb is None else emb + cond_emb
        elif cond is not None or cond_mask is not None:
            raise ValueError("this SpaceTimeUnet was built without text conditioning (cond_dim=None); pass cond=None")
        if fps is not None:
            # Raises for a U-Net without frame_rate_cond before `emb` (None then) is read;
            # with it, validate() made sure there is an embedding to add to.
            emb = add_frame_rate(self.fps_embed, emb, fps, "SpaceTimeUnet")
        if lowres is not None:  # validate() made sure there is an embedding
            emb = add_noise_level(self.lowres, emb, lowres)

        # The temporal down/upsamplers change the frame count, so one tensor cannot hold
        # samples with time on and off: run both paths and pick per sample (shape-static, so
        # it compiles; twice the cost, only for per-sample masks with temporal compression).
        if isinstance(enable_time, Tensor) and x.ndim == 5 and self.frame_multiple > 1:
            with_time = self._run_levels(x, emb, True, context, context_mask, frame_cond, lowres, estimate)
            without_time = self._run_levels(x, emb, False, context, context_mask, frame_cond, lowres, estimate)
            return torch.where(enable_time.view(-1, 1, 1, 1, 1), with_time, without_time)
        return self._run_levels(x, emb, enable_time, context, context_mask, frame_cond, lowres, estimate)
