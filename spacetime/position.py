"""Relative position encodings for attention over space (2D) and time (1D).

- `ContinuousPositionBias`: an MLP from relative coordinates to one bias per head (Liu et al.
  2022, Swin Transformer V2, Sec. 3.3, fed raw coordinates as make-a-video does). Works for any
  length or size, seen or not.
- `RelativePositionBias`: T5's learned bias per log-spaced distance bucket (Raffel et al. 2020,
  Sec. 2.1), bidirectional or causal.
- `RotaryEmbedding`: rotary position embedding (Su et al. 2021, RoFormer, Eq. 34), 1D or axial
  2D; it rotates q and k instead of adding a bias, so bias-free fused attention kernels apply.
- `FramePositionEmbedding`: an absolute position along the time axis, added to the features
  of each frame (sinusoidal features of the frame index, then a zero-initialised linear map,
  as temporal transformers in video diffusion do, e.g. AnimateDiff's motion modules).

The biases return `(heads, N, N)` for `N` tokens laid out row-major over the given dimensions
(`(h w)` for space), ready to broadcast over the batch in `attend`.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor, nn

from spacetime.checks import is_int
from spacetime.params import mark_temporal
from spacetime.time import EnableTime, select_time, time_enabled

__all__ = [
    "ContinuousPositionBias",
    "FramePositionEmbedding",
    "RelativePositionBias",
    "RotaryEmbedding",
    "apply_rotary",
]


def sinusoidal_features(positions: Tensor, freqs: Tensor) -> Tensor:
    """`(N, 2 F)` features `[sin(p f), cos(p f)]` of positions `(N,)` at angular frequencies
    `(F,)` (Vaswani et al. 2017, sec. 3.5); computed in fp32."""
    angles = positions.float()[:, None] * freqs[None, :]
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


def _check_dimensions(dimensions: tuple[int, ...], num_dims: int, name: str) -> None:
    if len(dimensions) != num_dims or any(d < 1 for d in dimensions):
        raise ValueError(f"{name} was built for {num_dims} positive sizes, got {dimensions}")


def _grid(dimensions: tuple[int, ...], device: torch.device) -> Tensor:
    """Integer coordinates `(N, len(dimensions))` of an `dimensions` grid, row-major."""
    axes = [torch.arange(d, device=device) for d in dimensions]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(dimensions))


class ContinuousPositionBias(nn.Module):
    """Continuous relative position bias: `heads` biases for every pair of positions on a
    `num_dims`-dimensional grid, produced by an MLP (`layers` hidden layers of width `dim`,
    SiLU) from the pair's relative coordinates.

    The MLP runs once per forward on the small table of distinct offsets
    (`prod(2 d - 1)` rows, e.g. `(2H-1)(2W-1)` for space), and a cached index tensor gathers it
    into the `(heads, N, N)` bias; it is never evaluated on the `N^2` pairs.

    make-a-video names (its `net` nests Linear+SiLU pairs): `net.0.0` -> `net.0`, `net.1.0` ->
    `net.2`, ..., its last `net.{layers}` -> `net.{2 * layers}`; identical shapes."""

    def __init__(self, *, dim: int, heads: int, num_dims: int = 1, layers: int = 2):
        super().__init__()
        if num_dims < 1 or layers < 1 or dim < 1 or heads < 1:
            raise ValueError(
                "ContinuousPositionBias needs dim, heads, num_dims and layers >= 1, got "
                f"dim={dim}, heads={heads}, num_dims={num_dims}, layers={layers}"
            )
        self.num_dims = num_dims
        self.heads = heads
        modules: list[nn.Module] = [nn.Linear(num_dims, dim), nn.SiLU()]
        for _ in range(layers - 1):
            modules += [nn.Linear(dim, dim), nn.SiLU()]
        modules.append(nn.Linear(dim, heads))
        self.net = nn.Sequential(*modules)
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _build(self, dimensions: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
        """(offset table `(R, num_dims)` float, index `(N, N)` into it)."""
        sizes = torch.tensor(dimensions, device=device)
        offsets = _grid(tuple(2 * d - 1 for d in dimensions), device) - (sizes - 1)
        # Row-major strides of the offset table, so that index = sum((rel + d - 1) * stride).
        strides = [1]
        for d in reversed(dimensions[1:]):
            strides.insert(0, strides[0] * (2 * d - 1))
        grid = _grid(dimensions, device)
        relative = grid[:, None, :] - grid[None, :, :] + (sizes - 1)
        index = (relative * torch.tensor(strides, device=device)).sum(-1)
        return offsets.float(), index

    def tables(self, *dimensions: int) -> tuple[Tensor, Tensor]:
        """Cached (offsets, index) for a grid of `dimensions` on this module's device."""
        device = self.net[0].weight.device
        if torch.compiler.is_compiling():
            # Built in-graph (and constant-folded): no Python-side cache mutation to trace.
            return self._build(dimensions, device)
        key = (dimensions, device)
        if key not in self._cache:
            self._cache[key] = self._build(dimensions, device)
        return self._cache[key]

    def forward(self, *dimensions: int) -> Float[Tensor, "heads n n"]:
        """Bias `(heads, N, N)` for `N = prod(dimensions)` positions (row-major)."""
        _check_dimensions(dimensions, self.num_dims, "ContinuousPositionBias")
        offsets, index = self.tables(*dimensions)
        table = self.net(offsets.to(self.net[0].weight.dtype))  # (R, heads)
        return table.t()[:, index]


def t5_buckets(relative: Tensor, *, num_buckets: int, max_distance: int, causal: bool) -> Tensor:
    """T5 bucket of each `key - query` offset: exact buckets for small distances, then
    log-spaced up to `max_distance` (all larger distances share the last bucket). Bidirectional
    buckets split in two halves by sign; causal buckets cover only keys at or before the query
    (later keys, which causal attention masks anyway, fall in bucket 0)."""
    distance = -relative  # > 0 when the key is in the past
    if causal:
        base = torch.zeros_like(distance)
        distance = distance.clamp(min=0)
    else:
        num_buckets //= 2
        base = (distance < 0).long() * num_buckets
        distance = distance.abs()
    max_exact = num_buckets // 2
    # Clamp before the log: small distances take the exact branch of the where below.
    ratio = distance.clamp(min=max_exact).float() / max_exact
    scaled = torch.log(ratio) / math.log(max_distance / max_exact)
    large = max_exact + (scaled * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return base + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """T5 relative position bias over a sequence: one learned scalar per head and distance
    bucket (`num_buckets` buckets, log-spaced up to `max_distance`). `causal=True` spends all
    buckets on past offsets (for causal attention). Marked temporal by the attention that owns
    it when used over frames."""

    def __init__(
        self,
        *,
        heads: int,
        num_buckets: int = 32,
        max_distance: int = 128,
        causal: bool = False,
    ):
        super().__init__()
        half = num_buckets if causal else num_buckets // 2
        if half < 2 or max_distance <= half // 2:
            raise ValueError(
                f"RelativePositionBias needs num_buckets >= {2 if causal else 4} and "
                f"max_distance > {max(half // 2, 1)}, got num_buckets={num_buckets}, "
                f"max_distance={max_distance}"
            )
        self.heads = heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.causal = causal
        self.embedding = nn.Embedding(num_buckets, heads)
        self._cache: dict[tuple, Tensor] = {}

    def _build(self, n: int, device: torch.device) -> Tensor:
        positions = torch.arange(n, device=device)
        relative = positions[None, :] - positions[:, None]
        return t5_buckets(
            relative,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
            causal=self.causal,
        )

    def buckets(self, n: int) -> Tensor:
        """Cached bucket index `(n, n)` on this module's device."""
        device = self.embedding.weight.device
        if torch.compiler.is_compiling():
            return self._build(n, device)
        key = (n, device)
        if key not in self._cache:
            self._cache[key] = self._build(n, device)
        return self._cache[key]

    def forward(self, n: int) -> Float[Tensor, "heads n n"]:
        """Bias `(heads, n, n)` for a sequence of `n` positions."""
        _check_dimensions((n,), 1, "RelativePositionBias")
        return self.embedding.weight.t()[:, self.buckets(n)]


def apply_rotary(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first `cos.shape[-1]` features of `t` `(..., N, D)` by the angles whose
    `cos`/`sin` `(N, rot_dim)` are given (half-split pairing: feature i with i + rot_dim/2);
    the remaining features pass through."""
    rot_dim = cos.shape[-1]
    rot, rest = t[..., :rot_dim], t[..., rot_dim:]
    first, second = rot.chunk(2, dim=-1)
    rotated = rot * cos.to(t.dtype) + torch.cat((-second, first), dim=-1) * sin.to(t.dtype)
    if rest.shape[-1] == 0:
        return rotated
    return torch.cat((rotated, rest), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over `dim` features of each head, 1D or axial (`num_dims=2`:
    half of the rotated features encode the row, half the column). Parameter-free; `forward`
    returns `(cos, sin)`, each `(N, dim)`, to pass with q and k to `apply_rotary`.

    The attention scores then depend on positions only through their differences, for any
    length, seen in training or not."""

    def __init__(self, dim: int, *, num_dims: int = 1, theta: float = 10000.0):
        super().__init__()
        if dim < 2 * num_dims or dim % (2 * num_dims):
            raise ValueError(
                "RotaryEmbedding dim must be a positive multiple of 2 * num_dims = "
                f"{2 * num_dims}, got dim={dim}"
            )
        self.dim = dim
        self.num_dims = num_dims
        per_axis = dim // num_dims
        inv_freq = theta ** (-torch.arange(0, per_axis, 2, dtype=torch.float32) / per_axis)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, *dimensions: int) -> tuple[Tensor, Tensor]:
        """`(cos, sin)` `(N, dim)` for the row-major grid of `dimensions`."""
        _check_dimensions(dimensions, self.num_dims, "RotaryEmbedding")
        grid = _grid(dimensions, self.inv_freq.device).float()  # (N, num_dims)
        angles = (grid[:, :, None] * self.inv_freq).reshape(grid.shape[0], -1)  # (N, dim / 2)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()


class FramePositionEmbedding(nn.Module):
    """Adds an embedding of each frame's index to a video's features `(B, C, F, H, W)`.

    Relative position biases and temporal convolutions tell a network how far apart two
    frames are, not which frame comes first; zero padding at the clip's ends tells it only
    as much as the input's mean differs from zero, which is nothing at the noisy diffusion
    steps where a sample's layout is decided. Without an absolute signal, a denoiser can
    draw the right motion played backwards (a digit asked to move left moving right).

    The index `f` of every frame is mapped to `freq_dim` sinusoidal features (Vaswani et al.
    2017, sec. 3.5: angular frequencies `max_period ** (-i / (freq_dim / 2))`) and then
    linearly to `dim` channels, broadcast over
    space. The linear map starts at zero, so a new embedding is the identity, like every other
    temporal part. Images and samples with time off pass through unchanged (a single image
    has no position in time). Marked temporal (`spacetime.temporal_parameters`).
    """

    def __init__(self, dim: int, *, freq_dim: int = 16, max_period: float = 10000.0):
        super().__init__()
        if not is_int(dim) or dim < 1:
            raise ValueError(f"FramePositionEmbedding dim must be a positive int, got {dim!r}")
        if not is_int(freq_dim) or freq_dim < 2 or freq_dim % 2:
            raise ValueError(f"freq_dim must be an even int >= 2, got {freq_dim!r}")
        if not max_period > 1:
            raise ValueError(f"max_period must be > 1, got {max_period!r}")
        half = freq_dim // 2
        freqs = max_period ** (-torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.proj = nn.Linear(freq_dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        mark_temporal(self)

    def embedding(self, num_frames: int) -> Float[Tensor, "f dim"]:
        """The `(num_frames, dim)` embeddings of frames `0 .. num_frames - 1`."""
        if not is_int(num_frames) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        frames = torch.arange(num_frames, device=self.freqs.device)
        return self.proj(sinusoidal_features(frames, self.freqs))

    def forward(self, x: Tensor, enable_time: EnableTime = True) -> Tensor:
        """`x` plus the embedding of its frames where time is enabled; images unchanged."""
        enabled = time_enabled(x, enable_time)
        if enabled is False:
            return x
        if x.shape[1] != self.proj.out_features:
            raise ValueError(
                f"FramePositionEmbedding was built for {self.proj.out_features} channels, got input "
                f"of shape {tuple(x.shape)}"
            )
        emb = self.embedding(x.shape[2]).to(x.dtype)  # (F, C)
        with_time = x + emb.t()[None, :, :, None, None]
        return select_time(enabled, with_time, x)
