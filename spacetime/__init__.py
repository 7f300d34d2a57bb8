"""spacetime: composable space-time layers for video diffusion (image/video agnostic).

Every layer takes an image `(B, C, H, W)` or a video `(B, C, F, H, W)` and an `enable_time`
switch (bool, or bool tensor `(B,)` for mixed image/video batches); temporal parts start as
the identity, and `temporal_parameters` / `spatial_parameters` split any model built from them.
"""

from spacetime.attend import AttentionBackend, attend, attention_backend, backend_support
from spacetime.attention import (
    Attention,
    SpatialAttention,
    SpatioTemporalAttention,
    TemporalAttention,
)
from spacetime.conv import PseudoConv3d, TemporalConv
from spacetime.inflate import inflate
from spacetime.layers import GEGLU, Downsample, FeedForward, RMSNorm, Upsample, token_shift
from spacetime.params import mark_temporal, spatial_parameters, temporal_parameters
from spacetime.position import (
    ContinuousPositionBias,
    FramePositionEmbedding,
    RelativePositionBias,
    RotaryEmbedding,
    apply_rotary,
)
from spacetime.time import check_enable_time, select_time, time_enabled

__all__ = [
    "GEGLU",
    "Attention",
    "AttentionBackend",
    "ContinuousPositionBias",
    "Downsample",
    "FeedForward",
    "FramePositionEmbedding",
    "PseudoConv3d",
    "RMSNorm",
    "RelativePositionBias",
    "RotaryEmbedding",
    "SpatialAttention",
    "SpatioTemporalAttention",
    "TemporalAttention",
    "TemporalConv",
    "Upsample",
    "apply_rotary",
    "attend",
    "attention_backend",
    "backend_support",
    "check_enable_time",
    "inflate",
    "mark_temporal",
    "select_time",
    "spatial_parameters",
    "temporal_parameters",
    "time_enabled",
    "token_shift",
]
