"""Autograd functions that keep fewer activations for backward than plain autograd, with the
same forward outputs, for the diffusers-layout U-Nets (`unets.diffusers_layers`).

What autograd keeps, and what these keep instead:

- `silu(group_norm(x))`: the norm's input and its output; `_GroupNormSiLU` keeps `x` only
  and recomputes the two elementwise passes in backward.
- `conv(silu(group_norm(x)))` (every resnet conv, every temporal conv, the output head): the
  above plus the conv's input, a third activation-sized tensor; `_NormSiLUConv2d` keeps `x`
  only. Backward recomputes the conv input, which `_GroupNormSiLU` recomputed anyway, so the
  saving costs no extra pass.
- a conv whose weight is frozen (every spatial conv in temporal-only training) still keeps its
  input, which only the weight gradient needs; `_LeanConv2d` keeps it only when the weight
  needs a gradient.
- the same with dropout between SiLU and conv (ModelScope's temporal convs train with it):
  `x` and the keep mask as bools, replayed in backward.
- `linear(value * gelu(gate))` (the GEGLU feed-forward): the projection, `gelu(gate)` and,
  for a trained `linear`, the product; `_GeluGateLinear` keeps the projection only (as its
  two halves, projected apart: `project_halves`).

Each falls back to plain autograd under `torch.compile` (which does its own planning) and
when no gradient is recorded.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spacetime.layers import project_halves

__all__ = ["conv2d", "geglu_linear", "lean_conv", "norm_silu", "norm_silu_conv", "project_halves"]


def _recording() -> bool:
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _autocast_state(x: Tensor) -> tuple[str, bool, torch.dtype]:
    device = x.device.type
    return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


def _autocast(state: tuple[str, bool, torch.dtype]) -> contextlib.AbstractContextManager:
    # Backward recomputes under the forward's autocast state, so the recomputed activation
    # has the forward's dtype and values (as checkpointing does).
    device, enabled, dtype = state
    return torch.autocast(device, dtype=dtype, enabled=enabled) if enabled else contextlib.nullcontext()


class _GroupNormSiLU(torch.autograd.Function):
    """`silu(group_norm(x))` saving only `x` for backward, which recomputes the two
    elementwise passes: plain autograd keeps the norm's output as well, a second tensor of the
    activation's size at every one of these."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps):  # type: ignore[override]
        ctx.save_for_backward(x, weight, bias)
        ctx.groups, ctx.eps, ctx.autocast = groups, eps, _autocast_state(x)
        return F.silu(F.group_norm(x, groups, weight, bias, eps))

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, bias = ctx.saved_tensors
        wanted = ctx.needs_input_grad[:3]
        grads = _norm_silu_grads(x, weight, bias, ctx.groups, ctx.eps, ctx.autocast, wanted, grad_out, None)[0]
        return (*grads, None, None)


def _norm_silu_grads(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float,
                     autocast: tuple[str, bool, torch.dtype], wanted: tuple[bool, ...], grad_out: Tensor | None,
                     then: Callable | None, *, need_act: bool = True) -> tuple[list[Tensor | None], object]:
    """Gradients of `silu(group_norm(x))` for the `wanted` of (x, weight, bias), recomputing
    the forward. `then(act) -> (grad_act, extra)` turns the recomputed activation into the
    gradient flowing into it (a conv's backward) when `grad_out` is None; with `need_act`
    False it gets a stand-in of the activation's shape (a frozen conv's input gradient reads
    no more), sparing the SiLU pass."""
    if not autocast[1] and x.dtype == weight.dtype == bias.dtype and x.numel():
        # The kernels autograd's group-norm and SiLU nodes run, called directly: a nested
        # autograd pass here costs more than the kernels on small activations.
        x = x.contiguous()
        n, c, size = x.shape[0], x.shape[1], math.prod(x.shape[2:])
        normed, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, n, c, size, groups, eps)
        extra = None
        if then is not None:
            grad_out, extra = then(F.silu(normed) if need_act else normed.new_empty(1).expand(normed.shape))
        if not any(wanted) or grad_out is None:
            return [None, None, None], extra
        grad_normed = torch.ops.aten.silu_backward(grad_out, normed).contiguous()
        grads = torch.ops.aten.native_group_norm_backward(grad_normed, x, mean, rstd, weight, n, c, size, groups,
                                                          list(wanted))
        return [g if w else None for g, w in zip(grads, wanted)], extra
    inputs = [t.detach().requires_grad_(w) for t, w in zip((x, weight, bias), wanted)]
    with torch.enable_grad(), _autocast(autocast):
        act = F.silu(F.group_norm(inputs[0], groups, inputs[1], inputs[2], eps))
    extra = None
    if then is not None:
        grad_out, extra = then(act.detach())
    needed = [t for t, w in zip(inputs, wanted) if w]
    if not needed or grad_out is None:
        return [None, None, None], extra
    grads = iter(torch.autograd.grad(act, needed, grad_out))
    return [next(grads) if w else None for w in wanted], extra


def _conv_backward(grad_out: Tensor, x: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int],
                   mask: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    # The same kernel autograd's convolution node runs, so the gradients are autograd's. The
    # conv ran in its output's dtype (autocast casts input and weight to it); each gradient
    # goes back in the dtype of what it is the gradient of, as autograd's casts do.
    run = grad_out.dtype
    grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad_out, x.to(run), weight.to(run), [weight.shape[0]], list(stride), list(padding), [1, 1], False, [0, 0],
        1, list(mask)
    )
    return (None if grad_x is None else grad_x.to(x.dtype), None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(weight.dtype))


class _NormSiLUConv2d(torch.autograd.Function):
    """`conv2d(dropout(silu(group_norm(x)), p))` saving `x` (and the parameters) only, plus
    the dropout's keep mask as bools when `p > 0` (a quarter of an fp32 activation)."""

    @staticmethod
    def forward(ctx, x, norm_w, norm_b, conv_w, conv_b, groups, eps, stride, padding, p):  # type: ignore[override]
        act = F.silu(F.group_norm(x, groups, norm_w, norm_b, eps))
        keep = None
        if p > 0:
            keep = torch.empty(act.shape, dtype=torch.bool, device=act.device).bernoulli_(1.0 - p)
            act = act * keep * (1.0 / (1.0 - p))
        ctx.save_for_backward(x, norm_w, norm_b, conv_w, keep)
        ctx.groups, ctx.eps, ctx.stride, ctx.padding, ctx.p = groups, eps, stride, padding, p
        ctx.has_bias, ctx.autocast = conv_b is not None, _autocast_state(x)
        return F.conv2d(act, conv_w, conv_b, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, norm_w, norm_b, conv_w, keep = ctx.saved_tensors
        need = ctx.needs_input_grad
        norm_wanted = tuple(need[:3])
        mask = (any(norm_wanted), need[3], need[4] and ctx.has_bias)
        scale = 1.0 / (1.0 - ctx.p)

        def conv_grads(act: Tensor) -> tuple[Tensor | None, tuple[Tensor | None, Tensor | None]]:
            if keep is not None and mask[1]:
                act = act * keep * scale
            grad_act, grad_w, grad_b = _conv_backward(grad_out, act, conv_w, ctx.stride, ctx.padding, mask)
            if keep is not None and grad_act is not None:
                grad_act = grad_act * keep * scale
            return grad_act, (grad_w, grad_b)

        if mask[0] or mask[1]:
            norm_grads, (grad_w, grad_b) = _norm_silu_grads(x, norm_w, norm_b, ctx.groups, ctx.eps, ctx.autocast,
                                                            norm_wanted, None, conv_grads, need_act=mask[1])
        else:  # only the conv bias: no activation needed
            norm_grads, grad_w, grad_b = [None, None, None], None, (
                grad_out.sum((0, 2, 3)).to(conv_w.dtype) if mask[2] else None)
        return (*norm_grads, grad_w, grad_b, None, None, None, None, None)


class _LeanConv2d(torch.autograd.Function):
    """`conv2d(x)` saving `x` only when the weight needs a gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):  # type: ignore[override]
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        if x is None:
            # The input gradient reads only the input's shape: a zero-stride stand-in.
            x = grad_out.new_empty(1, dtype=ctx.x_dtype).expand(ctx.x_shape)
        mask = (need[0], need[1], need[2] and ctx.has_bias)
        grad_x, grad_w, grad_b = _conv_backward(grad_out, x, weight, ctx.stride, ctx.padding, mask)
        return grad_x, grad_w, grad_b, None, None


class _GeluGateLinear(torch.autograd.Function):
    """`linear(value * gelu(gate), weight, bias)`, saving `value` and `gate` only: backward
    recomputes `gelu(gate)` (and the product, when the weight needs a gradient) in one
    elementwise pass. `value` and `gate` come as two contiguous tensors (`geglu_linear`
    projects them apart): GELU and its backward on the strided half of one projection run at
    about half the speed on CPU."""

    @staticmethod
    def forward(ctx, value, gate, weight, bias):  # type: ignore[override]
        ctx.save_for_backward(value, gate, weight)
        ctx.has_bias = bias is not None
        return F.linear(value * F.gelu(gate), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        value, gate, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        gelu = F.gelu(gate)
        grad_value = grad_gate = grad_w = grad_b = None
        # The linear ran in its output's dtype (autocast's cast): so do its gradients.
        run = grad_out.dtype
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        if need[2]:
            grad_w = (flat_grad.t() @ (value * gelu).reshape(-1, value.shape[-1]).to(run)).to(weight.dtype)
        if need[3] and ctx.has_bias:
            grad_b = flat_grad.sum(0).to(weight.dtype)
        if need[0] or need[1]:
            grad_mid = (flat_grad @ weight.to(run)).view(*grad_out.shape[:-1], -1).to(value.dtype)
            if need[0]:
                grad_value = grad_mid * gelu
            if need[1]:
                grad_gate = torch.ops.aten.gelu_backward(grad_mid.mul_(value), gate)
        return grad_value, grad_gate, grad_w, grad_b


def norm_silu(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    """`silu(norm(x))`, through `_GroupNormSiLU` when gradients are recorded."""
    if _recording():
        return _GroupNormSiLU.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps)
    return F.silu(norm(x))


def norm_silu_conv(norm: nn.GroupNorm, x: Tensor, weight: Tensor, bias: Tensor | None, *,
                   stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (1, 1),
                   dropout: float | int = 0.0) -> Tensor:
    """`conv2d(dropout(silu(norm(x)), p=dropout), weight, bias)` (the dropout always on: pass 0
    when the layer is in eval mode), through `_NormSiLUConv2d` when gradients are recorded."""
    if _recording():
        return _NormSiLUConv2d.apply(x, norm.weight, norm.bias, weight, bias, norm.num_groups, norm.eps,
                                     stride, padding, float(dropout))
    act = F.silu(norm(x))
    if dropout > 0:
        act = F.dropout(act, float(dropout), training=True)
    return conv2d(act, weight, bias, stride, padding)


def lean_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """`conv(x)` for a zero-padded, undilated, ungrouped `nn.Conv2d`, through `_LeanConv2d`
    when gradients are recorded and the weight is frozen (the only case it saves more)."""
    if _recording() and not conv.weight.requires_grad:
        return _LeanConv2d.apply(x, conv.weight, conv.bias, conv.stride, conv.padding)
    if conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple):
        return conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    return conv(x)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int] = (1, 1),
           padding: tuple[int, int] = (0, 0)) -> Tensor:
    """`F.conv2d` (zero padding, no dilation, one group). Without autograd on a CPU, a conv
    whose weight holds ten times more numbers than its unfolded input (the deep levels of a
    large U-Net on a small latent) runs as one matmul of the weight with that input instead:
    oneDNN copies a conv's weight into its own layout at every call (118 MB for a
    2560-to-1280-channel 3x3 conv), which there is most of the call's memory. Below that
    ratio oneDNN's kernel is the faster one. Same outputs to float rounding."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.ndim != 4 or torch.compiler.is_compiling():
        return F.conv2d(x, weight, bias, stride, padding)
    n, _, height, width = x.shape
    out_channels, in_channels, kh, kw = weight.shape
    out_h = (height + 2 * padding[0] - kh) // stride[0] + 1
    out_w = (width + 2 * padding[1] - kw) // stride[1] + 1
    if out_h < 1 or out_w < 1 or weight.numel() < 10 * n * in_channels * kh * kw * out_h * out_w:
        return F.conv2d(x, weight, bias, stride, padding)
    columns = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # (n, in * kh * kw, out_h * out_w)
    # weight (out, in * kh * kw) @ columns (in * kh * kw, n * out_h * out_w): the weight is read
    # as it is stored (the other orientation runs ~2x slower on CPU).
    out = weight.reshape(out_channels, -1) @ columns.transpose(0, 1).reshape(columns.shape[1], -1)
    if bias is not None:
        out += bias[:, None]
    return out.view(out_channels, n, out_h, out_w).transpose(0, 1).contiguous()


def geglu_linear(x: Tensor, proj: nn.Linear, linear: nn.Linear) -> Tensor:
    """`linear(value * gelu(gate))` where `value, gate = proj(x).chunk(2, -1)` (diffusers'
    GEGLU feed-forward): the halves projected apart (`project_halves`), then
    `_GeluGateLinear` when gradients are recorded (it keeps the halves only: plain autograd
    also keeps `gelu(gate)` and, for a trained `linear`, the product)."""
    value, gate = project_halves(x, proj)
    if _recording():
        return _GeluGateLinear.apply(value, gate, linear.weight, linear.bias)
    if not torch.is_grad_enabled():
        # Inference: both halves are this call's own temporaries, so GELU and the product
        # overwrite them (the feed-forward's peak is the two halves, not four such tensors).
        return linear(value.mul_(torch.ops.aten.gelu_(gate)))
    return linear(value * F.gelu(gate))
