"""unets/lean_ops.py: the memory-lean autograd functions give autograd's outputs and gradients
(gradcheck in float64 for every combination of what needs a gradient, and under bf16
autocast), keep less for backward, and a temporal-only train step of the diffusers-layout
U-Nets has diffusers' gradients."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from unets.lean_ops import (
    _GeluGateLinear,
    _LeanConv2d,
    _NormSiLUConv2d,
    geglu_linear,
    lean_conv,
    norm_silu_conv,
)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while `fn` runs, parameters
    (which exist anyway) excluded."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter) and not isinstance(t._base, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _leaves(*shapes_and_flags):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_(flag)
            for shape, flag in shapes_and_flags]


MASKS5 = [m for m in itertools.product((True, False), repeat=5) if any(m)]


@pytest.mark.parametrize("wanted", MASKS5[::3] + [(False, False, False, True, False), (False,) * 4 + (True,)])
def test_norm_silu_conv_gradcheck(wanted):
    x, nw, nb, cw, cb = _leaves(((2, 8, 5, 4), wanted[0]), ((8,), wanted[1]), ((8,), wanted[2]),
                                ((6, 8, 3, 1), wanted[3]), ((6,), wanted[4]))

    def lean(*a):
        return _NormSiLUConv2d.apply(*a, 4, 1e-5, (1, 1), (1, 0), 0.0)

    assert torch.autograd.gradcheck(lean, (x, nw, nb, cw, cb))
    plain = F.conv2d(F.silu(F.group_norm(x, 4, nw, nb, 1e-5)), cw, cb, (1, 1), (1, 0))
    torch.testing.assert_close(lean(x, nw, nb, cw, cb), plain, rtol=0, atol=0)


@pytest.mark.parametrize("wanted", [m for m in itertools.product((True, False), repeat=3) if any(m)])
@pytest.mark.parametrize("stride", [1, 2])
def test_lean_conv_gradcheck(wanted, stride):
    x, w, b = _leaves(((2, 3, 7, 6), wanted[0]), ((5, 3, 3, 3), wanted[1]), ((5,), wanted[2]))
    assert torch.autograd.gradcheck(lambda *a: _LeanConv2d.apply(*a, (stride, stride), (1, 1)), (x, w, b))


@pytest.mark.parametrize("wanted", [m for m in itertools.product((True, False), repeat=4) if any(m)])
def test_gelu_gate_linear_gradcheck(wanted):
    value, gate, w, b = _leaves(((2, 3, 4), wanted[0]), ((2, 3, 4), wanted[1]), ((5, 4), wanted[2]),
                                ((5,), wanted[3]))
    assert torch.autograd.gradcheck(_GeluGateLinear.apply, (value, gate, w, b))
    torch.testing.assert_close(_GeluGateLinear.apply(value, gate, w, b), F.linear(value * F.gelu(gate), w, b),
                               rtol=0, atol=0)


@pytest.mark.parametrize("frozen", [False, True])
def test_geglu_linear_is_diffusers_feed_forward(frozen):
    """Projecting the halves apart gives the one projection's output and gradients (proj's
    weight and bias included) to float rounding."""
    torch.manual_seed(0)
    proj, linear = torch.nn.Linear(6, 16), torch.nn.Linear(8, 6)
    for module in (proj, linear):
        module.double().requires_grad_(not frozen)
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    params = [x] + [p for p in (*proj.parameters(), *linear.parameters()) if p.requires_grad]

    def plain() -> torch.Tensor:
        value, gate = proj(x).chunk(2, dim=-1)
        return linear(value * F.gelu(gate))

    torch.testing.assert_close(geglu_linear(x, proj, linear), plain())
    lean_grads = torch.autograd.grad(geglu_linear(x, proj, linear).square().sum(), params)
    plain_grads = torch.autograd.grad(plain().square().sum(), params)
    assert len(lean_grads) == (1 if frozen else 5)
    for a, b in zip(lean_grads, plain_grads):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        torch.testing.assert_close(geglu_linear(x, proj, linear), plain())


def test_the_lean_ops_keep_less_than_autograd():
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 16)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    plain = _saved_bytes(lambda: conv(F.silu(norm(x))))
    lean = _saved_bytes(lambda: norm_silu_conv(norm, x, conv.weight, conv.bias))
    assert lean <= plain / 2  # x only, against x, the norm's output and the conv's input
    conv.requires_grad_(False)
    assert _saved_bytes(lambda: lean_conv(conv, x * 1)) == 0  # a frozen conv keeps no activation
    tokens = torch.randn(2, 16, 8, requires_grad=True)
    proj, linear = torch.nn.Linear(8, 32), torch.nn.Linear(16, 8)

    def plain_ff() -> torch.Tensor:
        value, gate = proj(tokens).chunk(2, dim=-1)
        return linear(value * F.gelu(gate))

    # the halves and the input, against those plus gelu(gate) and the product
    assert _saved_bytes(lambda: geglu_linear(tokens, proj, linear)) < 0.75 * _saved_bytes(plain_ff)


@settings(max_examples=10, deadline=None)
@given(frozen=st.booleans(), groups=st.sampled_from([1, 2, 4]), side=st.integers(2, 6))
def test_autocast_bf16_matches_autograd(frozen, groups, side):
    """Under CPU bf16 autocast the lean ops recompute in the forward's dtypes: same output and
    gradients (to bf16 precision) as plain autograd, each gradient in its tensor's dtype."""
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(groups, 8)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).requires_grad_(not frozen)
    proj, linear = torch.nn.Linear(8, 8), torch.nn.Linear(4, 8)
    x = torch.randn(2, 8, side, side, requires_grad=True)

    def run(lean: bool) -> list[torch.Tensor]:
        for p in (x, *norm.parameters(), *conv.parameters(), *proj.parameters(), *linear.parameters()):
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = norm_silu_conv(norm, x, conv.weight, conv.bias) if lean else conv(F.silu(norm(x)))
            h = lean_conv(conv, h) if lean else conv(h)
            tokens = h.flatten(2).transpose(1, 2)
            if lean:
                out = geglu_linear(tokens, proj, linear)
            else:
                hidden = proj(tokens)
                out = linear(hidden[..., :4] * F.gelu(hidden[..., 4:]))
        out.float().square().mean().backward()
        grads = [p.grad for p in (x, *norm.parameters(), *conv.parameters(), *proj.parameters(),
                                  *linear.parameters())]
        return [out.float(), *[g for g in grads if g is not None]]

    lean, plain = run(True), run(False)
    assert len(lean) == len(plain)
    for a, b in zip(lean, plain):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kind", ["modelscope", "animatediff"])
def test_temporal_only_gradients_equal_diffusers(kind):
    pytest.importorskip("diffusers")
    from benchmarks.diffusers_unets import _temporal_only, build_pair

    theirs, ours, cond_dim = build_pair(kind, "tiny")
    theirs.eval(), ours.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 3, 8, 8, generator=gen)
    t = torch.tensor([500])
    cond = torch.randn(1, 5, cond_dim, generator=gen)
    target = torch.randn(x.shape, generator=gen)
    their_cond = cond.repeat_interleave(3, 0) if kind == "animatediff" else cond
    for model, is_ours in ((ours, True), (theirs, False)):
        _temporal_only(model, is_ours)
    F.mse_loss(ours(x, t, cond=cond), target).backward()
    F.mse_loss(theirs(x, t, encoder_hidden_states=their_cond).sample, target).backward()
    their_grads = dict(theirs.named_parameters())
    compared = 0
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, their_grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)
            compared += 1
    assert compared == len(list(ours.temporal_parameters()))


@pytest.mark.parametrize("frozen", [False, True])
def test_norm_silu_conv_dropout_replays_its_mask(frozen):
    """With dropout, the keep mask drawn in forward (as bools) is replayed in backward: output
    and gradients equal autograd through the same mask, and less is kept than plain autograd
    with `F.dropout` keeps."""
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 8)
    conv = torch.nn.Conv2d(8, 6, (3, 1), padding=(1, 0)).requires_grad_(not frozen)
    x = torch.randn(2, 8, 5, 7, requires_grad=True)
    p = 0.3
    params = [x, *norm.parameters(), *conv.parameters()]

    torch.manual_seed(1)
    lean = norm_silu_conv(norm, x, conv.weight, conv.bias, padding=(1, 0), dropout=p)
    lean.square().sum().backward()
    lean_grads = [q.grad for q in params]
    for q in params:
        q.grad = None
    torch.manual_seed(1)  # the same draw as inside the op
    keep = torch.empty(2, 8, 5, 7, dtype=torch.bool).bernoulli_(1 - p)
    plain = conv(F.silu(norm(x)) * keep * (1 / (1 - p)))
    plain.square().sum().backward()
    torch.testing.assert_close(lean, plain)
    assert 0 < int((~keep).sum()) < keep.numel()
    for a, q in zip(lean_grads, params):
        assert (a is None) == (q.grad is None)
        if a is not None:
            torch.testing.assert_close(a, q.grad)
    kept = _saved_bytes(lambda: norm_silu_conv(norm, x, conv.weight, conv.bias, padding=(1, 0), dropout=p))
    assert kept < _saved_bytes(lambda: conv(F.dropout(F.silu(norm(x)), p)))


def test_modelscope_training_mode_with_temporal_dropout_trains():
    """ModelScope's temporal convs drop out in training mode (the debug preset has none):
    the lean path runs, checkpointing replays the same masks, gradients reach the temporal
    weights."""
    import copy

    import unets

    torch.manual_seed(0)
    model = unets.build("modelscope", preset="debug", temporal_dropout=0.2).train()
    for parameter in model.spatial_parameters():
        parameter.requires_grad_(False)
    ckpt = copy.deepcopy(model).enable_gradient_checkpointing()
    x = torch.randn(2, model.channels, 3, 8, 8)
    cond = torch.randn(2, 3, model.config.cond_dim)
    outs = []
    for m in (model, ckpt):
        torch.manual_seed(5)
        out = m(x, torch.tensor([10, 500]), cond=cond)
        out.square().mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(model.temporal_parameters(), ckpt.temporal_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    assert any(bool(p.grad.abs().sum() > 0) for p in model.temporal_parameters())


def _separate_qkv(layer, x: torch.Tensor) -> torch.Tensor:
    from einops import rearrange

    q, k, v = (rearrange(p(x), "n l (h d) -> n h l d", h=layer.heads) for p in (layer.to_q, layer.to_k, layer.to_v))
    out = F.scaled_dot_product_attention(q, k, v)
    return layer.to_out[0](rearrange(out, "n h l d -> n l (h d)"))


@pytest.mark.parametrize("tokens", [2, 40])
def test_self_attention_one_matmul_for_qkv_is_three(tokens):
    """The self-attention's q/k/v projections as one matmul (many tokens) or three (few):
    the same output and gradients as three linears either way."""
    from unets.diffusers_layers import AttentionLayer

    torch.manual_seed(0)
    layer = AttentionLayer(8, heads=2, dim_head=4).double()
    x = torch.randn(3, tokens, 8, dtype=torch.float64, requires_grad=True)
    assert layer._fusable(x) == (tokens == 40)
    params = [x, *layer.parameters()]
    fused = layer(x)
    torch.testing.assert_close(fused, _separate_qkv(layer, x))
    for a, b in zip(torch.autograd.grad(fused.square().sum(), params),
                    torch.autograd.grad(_separate_qkv(layer, x).square().sum(), params)):
        torch.testing.assert_close(a, b)


def test_self_attention_calls_wrapped_or_hooked_projections():
    """A projection that is not a plain linear (a LoRA wrapper) or has a hook is called as
    itself, never bypassed by the one-matmul path."""
    from unets.diffusers_layers import AttentionLayer

    class Shifted(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1.0

    torch.manual_seed(0)
    layer = AttentionLayer(8, heads=2, dim_head=4)
    x = torch.randn(2, 40, 8)
    assert layer._fusable(x)
    shifted = Shifted(8, 8, bias=False)
    shifted.weight.data.copy_(layer.to_v.weight)
    plain_out = layer(x)
    layer.to_v = shifted
    assert not layer._fusable(x)
    torch.testing.assert_close(layer(x), _separate_qkv(layer, x))
    assert not torch.allclose(layer(x), plain_out)
    layer.to_v = torch.nn.Linear(8, 8, bias=False)
    calls = []
    layer.to_k.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    layer(x)
    assert calls == [torch.Size([2, 40, 8])]


def test_spacetime_geglu_matches_autograd_and_keeps_the_halves_only():
    """spacetime's GEGLU projects value and gate apart: the same output and gradients as
    autograd through `value * gelu(gate)` of one projection, and backward keeps the halves,
    not `gelu(gate)`."""
    from spacetime.layers import GEGLU, _GeluGate

    torch.manual_seed(0)
    layer = GEGLU(6, 5).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)

    def plain() -> torch.Tensor:
        value, gate = layer.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)

    torch.testing.assert_close(layer(x), plain())
    params = [x, layer.proj.weight]
    for a, b in zip(torch.autograd.grad(layer(x).square().sum(), params),
                    torch.autograd.grad(plain().square().sum(), params)):
        torch.testing.assert_close(a, b)
    halves = tuple(torch.randn(2, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(_GeluGate.apply, halves)
    assert _saved_bytes(lambda: layer(x)) < _saved_bytes(plain)
    with torch.inference_mode():  # GELU and the product in place on the halves
        torch.testing.assert_close(layer(x), plain())


@pytest.mark.parametrize("shape, weight_shape, stride, padding", [
    ((2, 16, 2, 2), (32, 16, 3, 3), (1, 1), (1, 1)),    # weight-heavy: one matmul
    ((1, 8, 3, 5), (16, 8, 3, 1), (1, 1), (1, 0)),      # ModelScope's temporal 3x1 shape
    ((2, 16, 3, 3), (16, 16, 3, 3), (2, 2), (1, 1)),    # stride 2 (a downsampler)
    ((1, 16, 2, 3), (8, 16, 1, 1), (1, 1), (0, 0)),     # 1x1
    ((2, 4, 16, 16), (8, 4, 3, 3), (1, 1), (1, 1)),     # activation-heavy: F.conv2d itself
])
def test_conv2d_without_autograd_is_f_conv2d(shape, weight_shape, stride, padding):
    """`lean_ops.conv2d` gives F.conv2d's output whichever way it runs (a matmul over the
    unfolded input when the weight outweighs it, without autograd), and with autograd it is
    F.conv2d."""
    from unets.lean_ops import conv2d

    torch.manual_seed(0)
    x, weight, bias = torch.randn(shape), torch.randn(weight_shape), torch.randn(weight_shape[0])
    expected = F.conv2d(x, weight, bias, stride, padding)
    with torch.inference_mode():
        torch.testing.assert_close(conv2d(x, weight, bias, stride, padding), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(conv2d(x, weight, None, stride, padding), F.conv2d(x, weight, None, stride, padding),
                                   rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    out = conv2d(x, weight, bias, stride, padding)
    assert out.grad_fn is not None and "Convolution" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_a_weight_heavy_conv_without_autograd_keeps_no_weight_copy():
    """The point of the matmul path: without autograd, a 3x3 conv with a large weight on a
    2x2 input allocates about its unfolded input and output, not a copy of the weight (oneDNN's
    F.conv2d copies the weight into its own layout at every call: a weight-sized peak)."""
    from benchmarks.common import peak_memory
    from unets.lean_ops import conv2d

    torch.manual_seed(0)
    x, weight = torch.randn(4, 512, 2, 2), torch.randn(512, 512, 3, 3)  # a 9 MB weight
    with torch.inference_mode():
        peak = peak_memory(lambda: conv2d(x, weight, None, (1, 1), (1, 1)), torch.device("cpu"))
    assert 0 < peak < weight.numel() * weight.element_size() / 8


def test_geglu_calls_a_wrapped_or_hooked_projection():
    """Projecting the halves apart reads the projection's weight: a projection that is not a
    plain linear (a LoRA wrapper) or has a hook is called as itself instead, in both GEGLUs."""
    from spacetime.layers import GEGLU
    from unets.lean_ops import project_halves

    class Shifted(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1.0

    torch.manual_seed(0)
    x = torch.randn(2, 3, 6)
    shifted = Shifted(6, 8)
    value, gate = project_halves(x, shifted)
    torch.testing.assert_close(torch.cat((value, gate), -1), shifted(x))
    layer = GEGLU(6, 4)
    calls = []
    layer.proj.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            out = layer(x)
        hidden = layer.proj(x)
        torch.testing.assert_close(out, hidden[..., :4] * F.gelu(hidden[..., 4:]))
    assert len(calls) == 4  # two GEGLU calls and the two reference calls
