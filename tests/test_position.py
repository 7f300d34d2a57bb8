"""Position encodings: ContinuousPositionBias against a direct MLP over all (N^2) pairs and
against make-a-video, T5 buckets against a scalar reference, rotary relativity; all for
lengths and sizes never seen before."""

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from spacetime import ContinuousPositionBias, RelativePositionBias, RotaryEmbedding, apply_rotary


def direct_cpb(cpb, *dims):
    """The definition: the MLP evaluated on every pair's relative coordinates (i - j)."""
    axes = [torch.arange(d) for d in dims]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(dims))
    relative = (grid[:, None, :] - grid[None, :, :]).float()  # (N, N, num_dims)
    return cpb.net(relative).permute(2, 0, 1)


@given(
    dims=st.lists(st.integers(1, 6), min_size=1, max_size=2),
    heads=st.integers(1, 4), hidden=st.integers(1, 8), layers=st.integers(1, 3),
)
def test_continuous_position_bias_equals_direct_mlp(dims, heads, hidden, layers):
    torch.manual_seed(0)
    cpb = ContinuousPositionBias(dim=hidden, heads=heads, num_dims=len(dims), layers=layers)
    n = math.prod(dims)
    bias = cpb(*dims)
    assert bias.shape == (heads, n, n)
    torch.testing.assert_close(bias, direct_cpb(cpb, *dims))


def test_continuous_position_bias_unseen_sizes_and_cache():
    cpb = ContinuousPositionBias(dim=8, heads=2, num_dims=2)
    first = cpb(3, 4)
    index = cpb.tables(3, 4)[1]
    assert cpb.tables(3, 4)[1] is index  # cached per shape and device
    torch.testing.assert_close(cpb(3, 4), first)
    # A size never seen: still the definition, not a crop of a stored table.
    torch.testing.assert_close(cpb(7, 2), direct_cpb(cpb, 7, 2))
    # Translation invariance: the (1, 1) -> (0, 0) bias of a 3x4 grid is that of a 7x2 grid.
    torch.testing.assert_close(cpb(3, 4)[:, 1 * 4 + 1, 0], cpb(7, 2)[:, 1 * 2 + 1, 0])
    one_d = ContinuousPositionBias(dim=4, heads=3)
    torch.testing.assert_close(one_d(40), direct_cpb(one_d, 40))


def test_continuous_position_bias_gradients_reach_mlp():
    cpb = ContinuousPositionBias(dim=4, heads=2, num_dims=2)
    cpb(3, 3).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cpb.parameters())


def test_continuous_position_bias_parity_with_make_a_video():
    mav = pytest.importorskip("make_a_video_pytorch.make_a_video")
    torch.manual_seed(0)
    for num_dims, dims in ((1, (5,)), (2, (3, 4))):
        ref = mav.ContinuousPositionBias(dim=6, heads=3, num_dims=num_dims, layers=2)
        ours = ContinuousPositionBias(dim=6, heads=3, num_dims=num_dims, layers=2)
        renamed = {
            "net.0.weight": "net.0.0.weight", "net.0.bias": "net.0.0.bias",
            "net.2.weight": "net.1.0.weight", "net.2.bias": "net.1.0.bias",
            "net.4.weight": "net.2.weight", "net.4.bias": "net.2.bias",
        }
        ours.load_state_dict({k: ref.state_dict()[v] for k, v in renamed.items()})
        torch.testing.assert_close(ours(*dims), ref(*dims))


def test_continuous_position_bias_errors():
    cpb = ContinuousPositionBias(dim=4, heads=2, num_dims=2)
    with pytest.raises(ValueError, match=r"built for 2 positive sizes, got \(3,\)"):
        cpb(3)
    with pytest.raises(ValueError, match=r"got \(3, 0\)"):
        cpb(3, 0)
    with pytest.raises(ValueError, match=r"dim, heads, num_dims and layers >= 1.*layers=0"):
        ContinuousPositionBias(dim=4, heads=2, layers=0)


def t5_bucket_reference(relative, causal, num_buckets, max_distance):
    """T5's bucketing written out for one offset (key - query)."""
    n = -relative
    ret = 0
    if not causal:
        num_buckets //= 2
        if n < 0:
            ret += num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    large = max_exact + int(
        math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    )
    return ret + min(large, num_buckets - 1)


@given(
    n=st.integers(1, 40), causal=st.booleans(),
    num_buckets=st.sampled_from([4, 8, 32]), max_distance=st.sampled_from([8, 20, 128]),
)
def test_relative_position_bias_buckets(n, causal, num_buckets, max_distance):
    assume(max_distance > (num_buckets if causal else num_buckets // 2) // 2)
    rpb = RelativePositionBias(heads=3, num_buckets=num_buckets, max_distance=max_distance, causal=causal)
    buckets = rpb.buckets(n)
    expected = torch.tensor(
        [[t5_bucket_reference(j - i, causal, num_buckets, max_distance) for j in range(n)] for i in range(n)]
    )
    torch.testing.assert_close(buckets, expected)
    bias = rpb(n)
    assert bias.shape == (3, n, n)
    torch.testing.assert_close(bias, rpb.embedding.weight[expected].permute(2, 0, 1))


def test_relative_position_bias_unseen_lengths_and_directions():
    rpb = RelativePositionBias(heads=2, num_buckets=8, max_distance=16)
    long = rpb.buckets(300)  # far beyond max_distance: the last buckets of each half
    assert long.max() == 7 and long.min() == 0
    assert long[0, 299] != long[299, 0]  # past and future get distinct halves
    causal = RelativePositionBias(heads=2, num_buckets=8, max_distance=16, causal=True)
    b = causal.buckets(10)
    assert (b.triu(1) == 0).all() and b.diagonal().eq(0).all() and b[9, 0] > b[1, 0] > 0
    with pytest.raises(ValueError, match=r"num_buckets >= 4.*got num_buckets=2"):
        RelativePositionBias(heads=2, num_buckets=2)
    with pytest.raises(ValueError, match=r"built for 1 positive sizes, got \(0,\)"):
        rpb(0)


@given(
    num_dims=st.integers(1, 2), half=st.integers(1, 4), extra=st.integers(0, 3),
    sizes=st.lists(st.integers(1, 9), min_size=2, max_size=2), shift=st.integers(0, 20),
)
def test_rotary_scores_depend_on_relative_position_only(num_dims, half, extra, sizes, shift):
    dim = 2 * num_dims * half
    rotary = RotaryEmbedding(dim, num_dims=num_dims)
    dims = tuple(sizes[:num_dims])
    big = tuple(d + shift for d in dims)
    cos, sin = rotary(*dims)
    cos_big, sin_big = rotary(*big)
    n = math.prod(dims)
    assert cos.shape == sin.shape == (n, dim)
    q, k = torch.randn(2, 1, dim + extra, dtype=torch.float64).unbind(0)

    def index(grid_dims, pos):
        return pos[0] if len(pos) == 1 else pos[0] * grid_dims[1] + pos[1]

    def score(c, s, grid_dims, i, j):
        qi = apply_rotary(q, c[index(grid_dims, i)][None].double(), s[index(grid_dims, i)][None].double())
        kj = apply_rotary(k, c[index(grid_dims, j)][None].double(), s[index(grid_dims, j)][None].double())
        return (qi * kj).sum()

    last = tuple(d - 1 for d in dims)
    origin = tuple(0 for _ in dims)
    moved_last = tuple(d - 1 + shift for d in dims)
    moved_origin = tuple(shift for _ in dims)
    torch.testing.assert_close(
        score(cos, sin, dims, last, origin), score(cos_big, sin_big, big, moved_last, moved_origin),
        atol=1e-5, rtol=1e-5,
    )
    # Rotation keeps norms, and the unrotated tail passes through.
    rotated = apply_rotary(q.expand(n, -1), cos.double(), sin.double())
    torch.testing.assert_close(rotated.norm(dim=-1), q.norm(dim=-1).expand(n), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rotated[:, dim:], q[:, dim:].expand(n, -1))


def test_rotary_errors():
    with pytest.raises(ValueError, match=r"multiple of 2 \* num_dims = 4, got dim=6"):
        RotaryEmbedding(6, num_dims=2)
    with pytest.raises(ValueError, match=r"built for 1 positive sizes, got \(2, 2\)"):
        RotaryEmbedding(4)(2, 2)
