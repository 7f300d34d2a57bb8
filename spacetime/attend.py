"""attend(q, k, v, bias, causal, backend): the one call every attention layer makes.

Attention layers compute q/k/v, the space or time folding and the position bias; this module
turns them into softmax(q k^T / sqrt(D) + bias) v on one of several registered backends
(Vaswani et al. 2017, Eq. 1). Each backend declares what it can run (`BackendCapability`);
`backend_support` lists every reason a backend refuses given inputs, and an explicit choice that
cannot run raises with all of them (the xformers `not_supported_reasons` idea).

Choosing a backend, first match wins:
    1. the `backend=` argument of `attend`;
    2. the innermost `attention_backend(name)` context (thread-local);
    3. the environment variable `SPACETIME_ATTN_BACKEND`;
    4. `auto` (a layer built with `flash=True` asks `auto` to try fused kernels first).
Under torch.compile the choice is read while tracing; the thread-local is guarded by Dynamo, so
entering a different context recompiles, while the environment variable is read once per trace.

What `auto` tries, in order, taking the first backend that accepts the inputs:
    CUDA:  flash -> efficient -> cudnn -> sdpa -> math
        flash (FlashAttention-2) is the fastest kernel but takes no bias, so it only serves
        unbiased fp16/bf16 attention. efficient (the CUTLASS memory-efficient kernel) is next
        because it takes an additive bias *with* its gradient (learned position biases need it)
        and fp32. cuDNN comes after it: it has no bias gradient, needs head_dim % 8 == 0 and
        at least two keys, and PyTorch itself only prefers it on sm90/sm100 with a recent cuDNN
        (older versions mishandle sequence lengths that are not multiples of 128).
        sdpa lets PyTorch pick (it reaches its own math kernel for fp64); math is last.
    other devices (CPU, MPS, ...): math -> sdpa when the bias needs a gradient or there are
    at most `CPU_MATH_MAX_KEYS` (16) keys; sdpa -> math otherwise.
        On CPU, PyTorch's SDPA runs its own fused flash kernel, which accepts masks and biases
        and is the fastest for long sequences. But with a bias that needs a gradient (learned
        position biases) SDPA's CPU backward runs its own unfused math path, slower than ours,
        which also recomputes large attention weights in backward instead of keeping them
        (`_MathAttention`); and on short sequences (temporal attention over 8-16 frames) the
        fused kernel's per-row overhead dominates, so math is faster there. For spatial
        attention with a bias gradient sdpa alone is faster, but not in the U-Net train step,
        where it takes more memory; so math stays first there. The measurements behind this
        order: benchmarks/results/cpu-amd-epyc-2026-11-21.md (attention and U-Net sections).
flex and xformers are never picked by `auto`: flex compiles a kernel per shape (tens of seconds
on first use), and xformers' CUTLASS kernel is the one `efficient` already reaches through
PyTorch, so making results depend on whether a package is installed buys nothing.

Conventions shared by all backends:
    * scale is 1/sqrt(D); a float bias is added to the logits; a bool bias is a keep-mask
      (True = attend), e.g. a key-padding mask `(B, 1, 1, Nk)`;
    * `causal` masks keys after the query's position, aligned at the end when Nq != Nk
      (query i sees keys j <= i + Nk - Nq), which is what a query block that ends at the last
      key needs;
    * a query row whose keys are all masked is backend-defined (math gives the uniform average,
      fused kernels give zeros or NaN); layers must keep at least one key per query.
"""

from __future__ import annotations

import enum
import functools
import importlib.util
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple, no_type_check

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "AttentionBackend",
    "BackendCapability",
    "ENV_VAR",
    "attend",
    "attention_backend",
    "available_backends",
    "backend_capabilities",
    "backend_support",
    "capability_table",
    "resolve_backend",
]

logger = logging.getLogger(__name__)

ENV_VAR = "SPACETIME_ATTN_BACKEND"

# CUDA caps gridDim.y and gridDim.z at 65,535. Fused kernels put the batch (and the heads) on
# those axes, and temporal attention folds B*H*W into the batch, so a 64x64 latent with B=16
# already exceeds it. `attend` splits the batch below this for every backend declared
# `batch_limited`. Tests lower it to force chunking on small inputs.
CUDA_GRID_LIMIT = 65535

# True: flex runs through torch.compile (fused kernel). False: flex's unfused eager path, same
# semantics, no compilation; useful for debugging and for fast tests.
FLEX_COMPILE = True


class AttentionBackend(str, enum.Enum):
    """Names of the attention backends. `auto` picks per input (see the module docstring)."""

    AUTO = "auto"
    MATH = "math"
    SDPA = "sdpa"
    FLASH = "flash"
    EFFICIENT = "efficient"
    CUDNN = "cudnn"
    FLEX = "flex"
    XFORMERS = "xformers"

    def __str__(self) -> str:
        return self.value


_VALID_NAMES = ", ".join(b.value for b in AttentionBackend)


# `object` annotations on the validators: the checks below are the user-facing ones and must
# not be pre-empted by a type-checking import hook.
def _parse_backend(name: object, source: str) -> AttentionBackend:
    if isinstance(name, AttentionBackend):
        return name
    if not isinstance(name, str):
        raise TypeError(f"{source} must be a str or AttentionBackend, got {type(name).__name__}")
    try:
        return AttentionBackend(name.strip().lower())
    except ValueError:
        raise ValueError(
            f"{source} {name!r} is not an attention backend; valid names: {_VALID_NAMES}"
        ) from None


# --------------------------------------------------------------------------------------------
# Choosing the backend: argument > context manager > environment variable > auto.

# A threading.local rather than a ContextVar: Dynamo cannot trace ContextVar.get, but it reads
# (and guards on) attributes of a threading.local, so compiled code sees the active context.
_context = threading.local()


@contextmanager
def attention_backend(name: str | AttentionBackend) -> Iterator[AttentionBackend]:
    """Make `name` the default backend of `attend` inside the `with` block (this thread only).

    An explicit `backend=` argument still wins. Nested contexts restore the outer choice."""
    backend = _parse_backend(name, "attention backend")
    previous = getattr(_context, "backend", None)
    _context.backend = backend.value
    try:
        yield backend
    finally:
        _context.backend = previous


def _default_backend() -> AttentionBackend:
    active = getattr(_context, "backend", None)
    if active is not None:
        return AttentionBackend(active)
    from_env = os.environ.get(ENV_VAR, "").strip()
    if from_env:
        return _parse_backend(from_env, f"environment variable {ENV_VAR}=")
    return AttentionBackend.AUTO


# --------------------------------------------------------------------------------------------
# What a backend can run.


@dataclass(frozen=True)
class BackendCapability:
    """What one backend declares it can run. Checked by `backend_support` before every call.

    `devices` / `dtypes` / `grad_devices` of None mean "any". `batch_limited` backends launch
    CUDA grids with the batch on a 65,535-capped axis; `attend` chunks their batch."""

    name: str
    description: str
    devices: frozenset[str] | None
    dtypes: frozenset[torch.dtype]
    bias: bool
    bias_grad: bool
    bool_mask: bool
    causal: bool
    causal_cross: bool = True
    grad_devices: frozenset[str] | None = None
    min_head_dim: int = 1
    max_head_dim: int | None = None
    batch_limited: bool = False
    min_compute_capability: tuple[int, int] | None = None
    package: str | None = None
    extra: str | None = None
    notes: str = ""

    @property
    def max_batch(self) -> int | None:
        """Largest folded batch one kernel launch takes; `attend` splits larger batches."""
        return CUDA_GRID_LIMIT if self.batch_limited else None


@dataclass(frozen=True)
class _Backend:
    capability: BackendCapability
    run: Callable[[Tensor, Tensor, Tensor, Tensor | None, bool], Tensor]
    extra_reasons: Callable[[_Inputs], list[str]] = field(default=lambda inputs: [])


class _Inputs(NamedTuple):
    """One call's inputs and the facts the capability checks need, computed once.

    A NamedTuple of plain values (no properties, no dataclass __init__): Dynamo builds and
    reads it inside a fullgraph trace."""

    q: Tensor
    k: Tensor
    v: Tensor
    bias: Tensor | None
    causal: bool
    device: torch.device
    head_dim: int
    needs_grad: bool
    bias_needs_grad: bool


def _describe(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, causal: bool) -> _Inputs:
    grad_mode = torch.is_grad_enabled()
    bias_grad = grad_mode and bias is not None and bias.requires_grad
    needs_grad = bias_grad or (grad_mode and (q.requires_grad or k.requires_grad or v.requires_grad))
    return _Inputs(q, k, v, bias, causal, q.device, q.shape[-1], needs_grad, bias_grad)


_HALF = frozenset({torch.float16, torch.bfloat16})
_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# Dynamo calls these once while tracing and bakes the answer in, instead of tracing importlib
# or the CUDA runtime.
@torch.compiler.assume_constant_result
def _package_installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@torch.compiler.assume_constant_result
def _compute_capability(device: torch.device) -> tuple[int, int]:  # pragma: no cover - needs CUDA
    return torch.cuda.get_device_capability(device)


def _declared_reasons(cap: BackendCapability, inputs: _Inputs) -> list[str]:
    reasons = []
    if cap.package is not None and not _package_installed(cap.package):
        reasons.append(f"needs package '{cap.package}' (pip install 'spacetime-video[{cap.extra}]')")
    device = inputs.device.type
    if cap.devices is not None and device not in cap.devices:
        reasons.append(f"device {device} not supported (needs {' or '.join(sorted(cap.devices))})")
    elif (
        cap.min_compute_capability is not None and device == "cuda"
    ):  # pragma: no cover - needs CUDA
        sm = _compute_capability(inputs.device)
        if sm < cap.min_compute_capability:
            need = "sm{}{}".format(*cap.min_compute_capability)
            reasons.append(f"GPU compute capability sm{sm[0]}{sm[1]} not supported (needs {need}+)")
    dtype = inputs.q.dtype
    if dtype not in cap.dtypes:
        allowed = ", ".join(sorted(_dtype_name(d) for d in cap.dtypes))
        reasons.append(f"dtype {_dtype_name(dtype)} not supported (needs {allowed})")
    d = inputs.head_dim
    if d < cap.min_head_dim:
        reasons.append(f"head dim {d} not supported (needs >= {cap.min_head_dim})")
    if cap.max_head_dim is not None and d > cap.max_head_dim:
        reasons.append(f"head dim {d} not supported (needs <= {cap.max_head_dim})")
    bias = inputs.bias
    if bias is not None:
        if bias.dtype == torch.bool and not cap.bool_mask:
            reasons.append("boolean attention mask not supported")
        elif not cap.bias:
            reasons.append("attention bias not supported")
        elif inputs.bias_needs_grad and not cap.bias_grad:
            reasons.append("gradient of the attention bias not supported (bias requires grad)")
    if inputs.causal and not cap.causal:
        reasons.append("causal masking not supported")
    elif inputs.causal and not cap.causal_cross and inputs.q.shape[2] != inputs.k.shape[2]:
        reasons.append(
            f"causal masking with Nq != Nk ({inputs.q.shape[2]} vs {inputs.k.shape[2]}) not supported"
        )
    if inputs.needs_grad and cap.grad_devices is not None and device not in cap.grad_devices:
        reasons.append(
            f"backward pass not supported on {device} (inputs require grad; "
            "use torch.no_grad() or another backend)"
        )
    heads = inputs.q.shape[1]
    if cap.batch_limited and device == "cuda" and heads > CUDA_GRID_LIMIT:  # pragma: no cover
        reasons.append(f"{heads} heads not supported (needs <= {CUDA_GRID_LIMIT})")
    return reasons


# --------------------------------------------------------------------------------------------
# Masks shared by the backends.


def _causal_keep(nq: int, nk: int, device: torch.device) -> Tensor:
    """(Nq, Nk) bool, True where query i may see key j: j <= i + (Nk - Nq)."""
    return torch.ones(nq, nk, dtype=torch.bool, device=device).tril(nk - nq)


def _as_4d(bias: Tensor) -> Tensor:
    return bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))


def _with_causal(bias: Tensor, keep: Tensor) -> Tensor:
    """`bias` with the causal mask `keep` folded in: and-ed into a bool mask, `finfo.min` where
    a float bias is masked (not -inf: a row with every key masked stays finite)."""
    if bias.dtype == torch.bool:
        return bias & keep
    return torch.where(keep, bias, torch.finfo(bias.dtype).min)


def _fused_bias(bias: Tensor | None, q: Tensor, k: Tensor, causal: bool) -> Tensor | None:
    """The bias a fused kernel gets: 4-D, float cast to q's dtype (an fp32 bias next to bf16 q
    is misread by some kernels), with the causal mask folded in when there is one."""
    if bias is None:
        return None
    bias = _as_4d(bias)
    if bias.dtype != torch.bool:
        bias = bias.to(q.dtype)
    if causal:
        bias = _with_causal(bias, _causal_keep(q.shape[2], k.shape[2], q.device))
    return bias


# --------------------------------------------------------------------------------------------
# math: the reference.


def _math_probs(q: Tensor, k: Tensor, bias: Tensor | None, causal: bool) -> Tensor:
    """softmax(q k^T / sqrt(D) + bias), in fp32 for half inputs."""
    # Half inputs are computed in fp32: this backend is the reference the fused kernels are
    # tested against, and fused kernels also accumulate the logits and softmax in fp32. The
    # price is fp32 logits in memory, so it is the last resort of `auto` on GPUs.
    compute = torch.float32 if q.dtype in _HALF else q.dtype
    sim = torch.einsum("b h i d, b h j d -> b h i j", q.to(compute), k.to(compute))
    sim.mul_(q.shape[-1] ** -0.5)
    # finfo.min rather than -inf: a row with every key masked stays finite (uniform weights).
    masked = torch.finfo(compute).min
    keep = _causal_keep(q.shape[2], k.shape[2], q.device) if causal else None
    if bias is not None and bias.dtype != torch.bool:
        bias = bias.to(compute)
    if bias is not None and keep is not None and (bias.dtype == torch.bool or bias.numel() < sim.numel()):
        # A mask, or a bias shared across the batch, takes the causal mask itself: one pass
        # over the (B, h, Nq, Nk) logits less, forward and backward (sim + finfo.min ==
        # finfo.min). A full-size float bias is added first and masked in place instead.
        bias, keep = _with_causal(bias, keep), None
    if bias is not None:
        if bias.dtype == torch.bool:
            sim.masked_fill_(~bias, masked)
        else:
            sim.add_(bias)
    if keep is not None:
        sim.masked_fill_(~keep, masked)
    return sim.softmax(dim=-1)


class _MathAttention(torch.autograd.Function):
    """The math backend with its attention weights recomputed in backward.

    Autograd through the plain expression keeps the `(B, heads, Nq, Nk)` weights alive until
    backward: at 16x16 latents that one tensor per layer outweighs the layer's activations.
    Recomputing it costs one `q k^T` product and a softmax in backward (the FlashAttention
    trade, Dao et al. 2022, Sec. 3.1) and saves only q, k, v and the bias."""

    @staticmethod
    def forward(ctx, q, k, v, bias, causal):  # type: ignore[override]
        probs = _math_probs(q, k, bias, causal)
        out = torch.einsum("b h i j, b h j d -> b h i d", probs, v.to(probs.dtype))
        ctx.save_for_backward(q, k, v, bias)
        ctx.causal = causal
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, bias = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            return _MathAttention._backward(ctx, grad_out, q, k, v, bias)

    @staticmethod
    def _backward(ctx, grad_out, q, k, v, bias):  # type: ignore[no-untyped-def]
        probs = _math_probs(q, k, bias, ctx.causal)
        compute = probs.dtype
        grad_out = grad_out.to(compute)
        grad_v = torch.einsum("b h i j, b h i d -> b h j d", probs, grad_out)
        grad_probs = torch.einsum("b h i d, b h j d -> b h i j", grad_out, v.to(compute))
        # Softmax backward, in place on grad_probs: dS = P * (dP - sum_j P dP).
        grad_sim = torch._softmax_backward_data(grad_probs, probs, -1, compute)
        del probs, grad_probs
        grad_bias = None
        if bias is not None and ctx.needs_input_grad[3]:
            grad_bias = grad_sim.sum_to_size(bias.shape).to(bias.dtype)
        # The logit scale goes on the small (N, D) products: grad_bias may alias grad_sim.
        scale = q.shape[-1] ** -0.5
        grad_q = torch.einsum("b h i j, b h j d -> b h i d", grad_sim, k.to(compute)).mul_(scale)
        grad_k = torch.einsum("b h i j, b h i d -> b h j d", grad_sim, q.to(compute)).mul_(scale)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), grad_bias, None


def _run_math(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, causal: bool) -> Tensor:
    # The math backend sets its own precision (fp32 logits and softmax for half inputs);
    # autocast would cast its fp32 products back to bf16/fp16 and overflow the masking value.
    with torch.autocast(q.device.type, enabled=False):
        return _run_math_exact(q, k, v, bias, causal)


def _run_math_exact(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, causal: bool) -> Tensor:
    nq, nk, dim = q.shape[2], k.shape[2], q.shape[3]
    # Recompute only where the weights outweigh the q, k, v that backward keeps anyway (spatial
    # attention); for short sequences (temporal, small latents) keeping them is cheaper.
    if nq * nk > (nq + 2 * nk) * dim and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, bias)
    ):
        return _MathAttention.apply(q, k, v, bias, causal)
    probs = _math_probs(q, k, bias, causal)
    out = torch.einsum("b h i j, b h j d -> b h i d", probs, v.to(probs.dtype))
    return out.to(q.dtype)


# --------------------------------------------------------------------------------------------
# sdpa and the pinned SDPA kernels.


def _sdpa_arguments(
    q: Tensor, k: Tensor, bias: Tensor | None, causal: bool
) -> tuple[Tensor | None, bool]:
    """(attn_mask, is_causal) for F.scaled_dot_product_attention.

    SDPA refuses attn_mask together with is_causal, and its is_causal is aligned at the top-left
    when Nq != Nk, so `is_causal` is only used for square, unbiased attention; everything else
    gets the causal mask folded into the mask. (torch's CausalBias would reach the kernels
    without a mask but cannot be built under torch.compile(fullgraph=True).)"""
    nq, nk = q.shape[2], k.shape[2]
    if bias is None and causal and nq == nk:
        return None, True
    if bias is None and causal:
        return _causal_keep(nq, nk, q.device), False
    return _fused_bias(bias, q, k, causal), False


# PyTorch's own choice may be cuDNN (preferred on sm90/sm100), whose backward returns no
# gradient for the mask; a bias that needs one keeps `sdpa` to the other kernels.
_SDPA_WITH_BIAS_GRAD = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def _make_sdpa_runner(kernel: SDPBackend | None) -> Callable[..., Tensor]:
    def run(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, causal: bool) -> Tensor:
        attn_mask, is_causal = _sdpa_arguments(q, k, bias, causal)
        kernels = kernel
        if kernel is None and bias is not None and bias.requires_grad and torch.is_grad_enabled():
            kernels = _SDPA_WITH_BIAS_GRAD
        with sdpa_kernel(kernels) if kernels is not None else nullcontext():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

    return run


_TORCH_KERNEL_PROBES = {
    SDPBackend.FLASH_ATTENTION: "can_use_flash_attention",
    SDPBackend.EFFICIENT_ATTENTION: "can_use_efficient_attention",
    SDPBackend.CUDNN_ATTENTION: "can_use_cudnn_attention",
}


def _torch_kernel_refusals(kernel: SDPBackend, inputs: _Inputs) -> list[str]:
    """Ask PyTorch's own kernel filter (sdp_utils.cpp, `can_use_*` with debug on) about the
    exact call `attend` would make, so constraints not declared here (architecture-specific
    head dims, cuDNN version, memory alignment) come back as reasons rather than as a
    'No available kernel' error at run time. Skipped while tracing: the filter cannot run on
    fake tensors, and the declared checks already passed."""
    if torch.compiler.is_compiling():  # pragma: no cover - CUDA-only callers
        return []
    limit = CUDA_GRID_LIMIT
    q, k, v = inputs.q[:limit], inputs.k[:limit], inputs.v[:limit]
    bias = None if inputs.bias is None else _as_4d(inputs.bias)[:limit]
    attn_mask, is_causal = _sdpa_arguments(q, k, bias, inputs.causal)
    params = torch.backends.cuda.SDPAParams(q, k, v, attn_mask, 0.0, is_causal, False)
    probe = getattr(torch.backends.cuda, _TORCH_KERNEL_PROBES[kernel])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        usable = probe(params, True)
    if usable:  # pragma: no cover - needs CUDA
        return []
    said = [str(w.message).split(" (Triggered internally")[0].strip() for w in caught]
    return [f"PyTorch's kernel refuses them: {m}" for m in said if m] or [
        "PyTorch's kernel refuses them (no reason given)"
    ]


def _flash_reasons(inputs: _Inputs) -> list[str]:  # pragma: no cover - needs CUDA
    return _torch_kernel_refusals(SDPBackend.FLASH_ATTENTION, inputs)


def _efficient_reasons(inputs: _Inputs) -> list[str]:  # pragma: no cover - needs CUDA
    reasons = []
    # CUTLASS GEMM alignment: 16 bytes of head dim per row (sdp_utils.cpp, minimum_gemm_alignment).
    multiple = 8 if inputs.q.dtype in _HALF else 4
    if inputs.head_dim % multiple:
        reasons.append(
            f"head dim {inputs.head_dim} not supported for {_dtype_name(inputs.q.dtype)} "
            f"(needs a multiple of {multiple})"
        )
    if inputs.q.dtype == torch.bfloat16 and _compute_capability(inputs.device) < (8, 0):
        reasons.append("bfloat16 needs sm80+")
    return reasons + (_torch_kernel_refusals(SDPBackend.EFFICIENT_ATTENTION, inputs) if not reasons else [])


def _cudnn_reasons(inputs: _Inputs) -> list[str]:  # pragma: no cover - needs CUDA
    reasons = []
    if inputs.head_dim % 8:
        reasons.append(f"head dim {inputs.head_dim} not supported (needs a multiple of 8)")
    sm = _compute_capability(inputs.device)
    # Head dims up to 256 exist only on sm90/sm100 with cuDNN > 9.22; PyTorch's probe decides.
    if inputs.head_dim > 128 and sm[0] not in (9, 10):
        reasons.append(f"head dim {inputs.head_dim} not supported on sm{sm[0]}{sm[1]} (needs <= 128)")
    if inputs.k.shape[2] < 2:
        reasons.append("a single key per query not supported (cuDNN needs Nk >= 2)")
    return reasons + (_torch_kernel_refusals(SDPBackend.CUDNN_ATTENTION, inputs) if not reasons else [])


# --------------------------------------------------------------------------------------------
# flex: torch.nn.attention.flex_attention, bias through score_mod, causal through a block mask.


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=False: flex's generated kernel is specialised per shape anyway.
    return torch.compile(flex_attention, dynamic=False)


_block_masks: dict[tuple[int, int, str], object] = {}


def _flex_causal_block_mask(nq: int, nk: int, device: torch.device) -> object:
    from torch.nn.attention.flex_attention import create_block_mask

    offset = nk - nq

    # flex tells score_mod from mask_mod by counting positional parameters, so these closures
    # must not be wrapped by the jaxtyping/beartype import hook (which makes them *args).
    @no_type_check
    def causal_mask(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        return j <= i + offset

    if torch.compiler.is_compiling():
        # Inside a compiled graph the mask is built in-graph; the Python cache would only add
        # guards on a global dict.
        return create_block_mask(causal_mask, None, None, nq, nk, device=device)
    key = (nq, nk, str(device))
    if key not in _block_masks:
        _block_masks[key] = create_block_mask(causal_mask, None, None, nq, nk, device=device)
    return _block_masks[key]


def _flex_score_mod(bias: Tensor) -> Callable[..., Tensor]:
    # The bias is captured by the closure; flex differentiates through captured score_mod
    # tensors on CUDA. Broadcast dimensions are indexed at 0 rather than expanded so the
    # gradient lands on the caller's (small) bias tensor.
    use_b, use_h, use_i, use_j = (size > 1 for size in bias.shape)

    @no_type_check
    def lookup(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        return bias[b if use_b else 0, h if use_h else 0, i if use_i else 0, j if use_j else 0]

    if bias.dtype == torch.bool:

        @no_type_check
        def keep_mask(score: Tensor, b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
            return torch.where(lookup(b, h, i, j), score, float("-inf"))

        return keep_mask

    @no_type_check
    def add_bias(score: Tensor, b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        return score + lookup(b, h, i, j)

    return add_bias


def _run_flex(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, causal: bool) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if not torch.is_grad_enabled():
        # flex refuses CPU inputs that merely *require* grad, even under no_grad.
        q, k, v = q.detach(), k.detach(), v.detach()
        bias = None if bias is None else bias.detach()
    score_mod = None
    if bias is not None:
        bias = _as_4d(bias)
        score_mod = _flex_score_mod(bias if bias.dtype == torch.bool else bias.to(q.dtype))
    block_mask = _flex_causal_block_mask(q.shape[2], k.shape[2], q.device) if causal else None
    if torch.compiler.is_compiling():
        run = flex_attention
    elif FLEX_COMPILE:
        run = _compiled_flex()
    else:
        run = flex_attention
    return run(q, k, v, score_mod=score_mod, block_mask=block_mask)


def _flex_reasons(inputs: _Inputs) -> list[str]:
    if inputs.device.type == "cuda" and inputs.head_dim < 16:  # pragma: no cover - needs CUDA
        # Triton's tl.dot needs K >= 16 (torch/_inductor/kernel/flex/flex_attention.py).
        return [f"head dim {inputs.head_dim} not supported on cuda (needs >= 16)"]
    return []


# --------------------------------------------------------------------------------------------
# xformers: memory_efficient_attention, (B, N, heads, D) layout.


def _import_xformers_ops():  # pragma: no cover - reached only with xformers on CUDA
    try:
        import xformers.ops as xops
    except ImportError as error:
        raise ImportError(
            "the 'xformers' attention backend needs xformers: pip install 'spacetime-video[xformers]'"
        ) from error
    return xops


def _run_xformers(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, causal: bool
) -> Tensor:  # pragma: no cover - needs xformers and CUDA
    xops = _import_xformers_ops()
    batch, heads, nq, _ = q.shape
    nk = k.shape[2]
    attn_bias = None
    if bias is not None:
        bias = _fused_bias(bias, q, k, causal)
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~bias, torch.finfo(q.dtype).min
            )
        # xformers reads the bias with 16-byte aligned rows: allocate the key axis padded to a
        # multiple of 8 and hand over a view of the first Nk columns (its documented recipe).
        # Only batch and heads stay broadcast (stride 0); the query axis is materialised.
        bias = bias.expand(bias.shape[0], bias.shape[1], nq, nk)
        bias = F.pad(bias, (0, -nk % 8))[..., :nk]
        attn_bias = bias.expand(batch, heads, nq, nk)
    elif causal:
        # Bottom-right alignment is this module's causal convention (equal to top-left if Nq == Nk).
        attn_bias = xops.fmha.attn_bias.LowerTriangularFromBottomRightMask()
    q, k, v = (rearrange(t, "b h n d -> b n h d") for t in (q, k, v))
    out = xops.memory_efficient_attention(q, k, v, attn_bias=attn_bias)
    return rearrange(out, "b n h d -> b h n d")


# --------------------------------------------------------------------------------------------
# The registry.

_BACKENDS: dict[AttentionBackend, _Backend] = {
    AttentionBackend.MATH: _Backend(
        BackendCapability(
            name="math",
            description="reference einsum/softmax; half inputs computed in fp32",
            devices=None,
            dtypes=_FLOATS,
            bias=True,
            bias_grad=True,
            bool_mask=True,
            causal=True,
            notes="materialises the (B, heads, Nq, Nk) logits in fp32 for half inputs",
        ),
        _run_math,
    ),
    AttentionBackend.SDPA: _Backend(
        BackendCapability(
            name="sdpa",
            description="F.scaled_dot_product_attention, PyTorch picks the kernel",
            devices=None,
            dtypes=_FLOATS,
            bias=True,
            bias_grad=True,
            bool_mask=True,
            causal=True,
            batch_limited=True,
            notes="on CPU: PyTorch's fused CPU flash kernel (takes masks) or math",
        ),
        _make_sdpa_runner(None),
    ),
    AttentionBackend.FLASH: _Backend(
        BackendCapability(
            name="flash",
            description="SDPA pinned to FlashAttention-2",
            devices=frozenset({"cuda"}),
            dtypes=_HALF,
            bias=False,
            bias_grad=False,
            bool_mask=False,
            causal=True,
            causal_cross=False,
            max_head_dim=256,
            batch_limited=True,
            min_compute_capability=(8, 0),
            notes="is_causal is top-left aligned in PyTorch, so causal needs Nq == Nk",
        ),
        _make_sdpa_runner(SDPBackend.FLASH_ATTENTION),
        _flash_reasons,
    ),
    AttentionBackend.EFFICIENT: _Backend(
        BackendCapability(
            name="efficient",
            description="SDPA pinned to the CUTLASS memory-efficient kernel",
            devices=frozenset({"cuda"}),
            dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
            bias=True,
            bias_grad=True,
            bool_mask=True,
            causal=True,
            batch_limited=True,
            min_compute_capability=(5, 0),
            notes="head dim multiple of 8 (fp16/bf16) or 4 (fp32); bf16 needs sm80+",
        ),
        _make_sdpa_runner(SDPBackend.EFFICIENT_ATTENTION),
        _efficient_reasons,
    ),
    AttentionBackend.CUDNN: _Backend(
        BackendCapability(
            name="cudnn",
            description="SDPA pinned to cuDNN attention",
            devices=frozenset({"cuda"}),
            dtypes=_HALF,
            bias=True,
            bias_grad=False,  # its backward returns dq, dk, dv only
            bool_mask=True,
            causal=True,
            max_head_dim=256,
            batch_limited=True,
            min_compute_capability=(8, 0),
            notes="head dim multiple of 8, <= 128 (256 on sm90/sm100 with cuDNN > 9.22); Nk >= 2",
        ),
        _make_sdpa_runner(SDPBackend.CUDNN_ATTENTION),
        _cudnn_reasons,
    ),
    AttentionBackend.FLEX: _Backend(
        BackendCapability(
            name="flex",
            description="flex_attention under torch.compile; bias via score_mod, causal via block mask",
            devices=frozenset({"cuda", "cpu"}),
            dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
            bias=True,
            bias_grad=True,
            bool_mask=True,
            causal=True,
            grad_devices=frozenset({"cuda"}),
            batch_limited=True,
            notes="compiles per shape on first use; CPU is inference only; head dim >= 16 on CUDA",
        ),
        _run_flex,
        _flex_reasons,
    ),
    AttentionBackend.XFORMERS: _Backend(
        BackendCapability(
            name="xformers",
            description="xformers.ops.memory_efficient_attention",
            devices=frozenset({"cuda"}),
            dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
            bias=True,
            bias_grad=True,
            bool_mask=True,
            causal=True,
            batch_limited=True,
            package="xformers",
            extra="xformers",
            notes="bias passed as a tensor with 8-aligned key axis",
        ),
        _run_xformers,
    ),
}

_AUTO_ORDER = {
    "cuda": (
        AttentionBackend.FLASH,
        AttentionBackend.EFFICIENT,
        AttentionBackend.CUDNN,
        AttentionBackend.SDPA,
        AttentionBackend.MATH,
    ),
    "other": (AttentionBackend.SDPA, AttentionBackend.MATH),
    # CPU and other non-CUDA devices, for a bias that needs a gradient or a short key sequence.
    "other_math_first": (AttentionBackend.MATH, AttentionBackend.SDPA),
}

# Off CUDA, `auto` runs math first up to this many keys (see the module docstring).
CPU_MATH_MAX_KEYS = 16


def _auto_order(inputs: _Inputs, prefer_fused: bool = False) -> tuple[AttentionBackend, ...]:
    if inputs.device.type == "cuda":
        return _AUTO_ORDER["cuda"]
    if prefer_fused:
        # The caller asked for a fused kernel (make-a-video's `flash=True`): sdpa's fused CPU
        # kernel before math, whatever the sequence length.
        return _AUTO_ORDER["other"]
    if inputs.bias_needs_grad or inputs.k.shape[2] <= CPU_MATH_MAX_KEYS:
        return _AUTO_ORDER["other_math_first"]
    return _AUTO_ORDER["other"]


def backend_capabilities() -> dict[str, BackendCapability]:
    """The declared capability record of every registered backend, by name."""
    return {name.value: backend.capability for name, backend in _BACKENDS.items()}


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends whose package is installed and, if `device` is given, that declare its type.

    Declared support only; `backend_support` answers for concrete inputs."""
    device_type = None if device is None else torch.device(device).type
    names = []
    for name, backend in _BACKENDS.items():
        cap = backend.capability
        if cap.package is not None and not _package_installed(cap.package):
            continue
        if device_type is not None and cap.devices is not None and device_type not in cap.devices:
            continue
        names.append(name.value)
    return names


def capability_table() -> str:
    """A Markdown table of the declared capabilities, for printing or docs."""

    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    header = (
        "| backend | devices | dtypes | head dim | bias | bias grad | bool mask | causal "
        "| backward on | max batch | package | installed | notes |"
    )
    rows = [header, "|" + "---|" * 13]
    for cap in backend_capabilities().values():
        head = f"{cap.min_head_dim}..{cap.max_head_dim}" if cap.max_head_dim else f">= {cap.min_head_dim}"
        causal = yes(cap.causal) if cap.causal_cross or not cap.causal else "Nq == Nk only"
        installed = yes(cap.package is None or _package_installed(cap.package))
        rows.append(
            f"| {cap.name} | {', '.join(sorted(cap.devices)) if cap.devices else 'any'} "
            f"| {', '.join(sorted(_dtype_name(d) for d in cap.dtypes))} | {head} "
            f"| {yes(cap.bias)} | {yes(cap.bias_grad)} | {yes(cap.bool_mask)} | {causal} "
            f"| {', '.join(sorted(cap.grad_devices)) if cap.grad_devices else 'any'} "
            f"| {cap.max_batch or 'unlimited'} | {cap.package or '-'} | {installed} | {cap.notes} |"
        )
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# Validation and the public entry points.


def _validate(q: object, k: object, v: object, bias: object, causal: object) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(
                f"{name} must be 4-D (B, heads, N, D), got shape {tuple(t.shape)} ({t.ndim}-D)"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"q, k, v must have the same batch size (dim 0), got {shapes}")
    if not (q.shape[1] == k.shape[1] == v.shape[1]):
        raise ValueError(f"q, k, v must have the same number of heads (dim 1), got {shapes}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same sequence length (dim 2), got {shapes}")
    if not (q.shape[3] == k.shape[3] == v.shape[3]):
        raise ValueError(f"q, k, v must have the same head dim (dim 3), got {shapes}")
    if q.shape[2] < 1 or k.shape[2] < 1:
        raise ValueError(f"sequence lengths must be >= 1, got {shapes}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if not (bias.dtype == torch.bool or bias.is_floating_point()):
        raise TypeError(f"bias must be a float tensor or a bool keep-mask, got dtype {bias.dtype}")
    if bias.device != q.device:
        raise ValueError(f"bias must be on q's device {q.device}, got {bias.device}")
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    padded = (1,) * (4 - bias.ndim) + tuple(bias.shape)
    if bias.ndim > 4 or any(b not in (1, t) for b, t in zip(padded, target)):
        raise ValueError(
            f"bias of shape {tuple(bias.shape)} does not broadcast to (B, heads, Nq, Nk) = {target}"
        )


def _choose(requested: AttentionBackend, inputs: _Inputs, prefer_fused: bool = False) -> AttentionBackend:
    if requested is not AttentionBackend.AUTO:
        reasons = _reasons(requested, inputs)
        if reasons:
            raise ValueError(
                f"backend '{requested.value}' cannot run these inputs: " + "; ".join(reasons)
            )
        return requested
    on_cuda = inputs.device.type == "cuda"
    for name in _auto_order(inputs, prefer_fused):
        if not _reasons(name, inputs):
            if name is AttentionBackend.MATH and on_cuda and not torch.compiler.is_compiling():
                _warn_math_fallback(inputs)  # pragma: no cover - needs CUDA
            return name
    raise AssertionError("math accepts every validated input")  # pragma: no cover


_warned: set[tuple] = set()


def _warn_math_fallback(inputs: _Inputs) -> None:  # pragma: no cover - needs CUDA
    key = (inputs.q.dtype, inputs.head_dim, inputs.bias is not None, inputs.causal)
    if key in _warned:
        return
    _warned.add(key)
    refusals = {
        name.value: _reasons(name, inputs) for name in _AUTO_ORDER["cuda"][:-1]
    }
    logger.warning(
        "attention falls back to the math backend on CUDA (slow, fp32 logits); refusals: %s",
        refusals,
    )


def _reasons(name: AttentionBackend, inputs: _Inputs) -> list[str]:
    backend = _BACKENDS[name]
    reasons = _declared_reasons(backend.capability, inputs)
    if reasons:
        # Kernel-specific probes assume the declared basics (device, dtype) already hold.
        return reasons
    return backend.extra_reasons(inputs)


def backend_support(
    backend: str | AttentionBackend,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None = None,
    causal: bool = False,
) -> list[str]:
    """Every reason `backend` cannot run `attend(q, k, v, bias, causal=causal)`; [] if it can.

    Gradient support is judged from the inputs' `requires_grad` and the grad mode at the call.
    `auto` always returns [] (it falls back to math). Invalid inputs raise as in `attend`."""
    name = _parse_backend(backend, "backend")
    _validate(q, k, v, bias, causal)
    if name is AttentionBackend.AUTO:
        return []
    return _reasons(name, _describe(q, k, v, bias, causal))


def resolve_backend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None = None,
    causal: bool = False,
    backend: str | AttentionBackend | None = None,
) -> str:
    """The backend `attend` would run for these inputs, after argument, context, environment
    variable and `auto` are applied. Raises as `attend` would if an explicit choice cannot run."""
    _validate(q, k, v, bias, causal)
    requested = _default_backend() if backend is None else _parse_backend(backend, "backend")
    return _choose(requested, _describe(q, k, v, bias, causal)).value


def attend(
    q: Float[Tensor, "b h nq d"],
    k: Float[Tensor, "b h nk d"],
    v: Float[Tensor, "b h nk d"],
    bias: Float[Tensor, "..."] | Bool[Tensor, "..."] | None = None,
    *,
    causal: bool = False,
    backend: str | AttentionBackend | None = None,
    prefer_fused: bool = False,
) -> Float[Tensor, "b h nq d"]:
    """softmax(q k^T / sqrt(D) + bias) v.

    q `(B, heads, Nq, D)`, k/v `(B, heads, Nk, D)`. `bias` broadcasts to `(B, heads, Nq, Nk)`:
    a float bias is added to the logits, a bool bias is a keep-mask (True = attend). `causal`
    hides keys after the query's position, aligned at the end when Nq != Nk. `backend` is a
    name from `AttentionBackend`; None uses the context / environment default (see module doc).
    `prefer_fused` only matters when the choice falls through to `auto`: fused kernels are then
    tried before math on every device (on CUDA they already are). It never overrides an
    explicit backend, a context or the environment variable.
    Batches above a backend's `max_batch` are split and concatenated."""
    _validate(q, k, v, bias, causal)
    requested = _default_backend() if backend is None else _parse_backend(backend, "backend")
    name = _choose(requested, _describe(q, k, v, bias, causal), prefer_fused)
    run = _BACKENDS[name].run
    limit = _BACKENDS[name].capability.max_batch
    batch = q.shape[0]
    if limit is None or batch <= limit:
        return run(q, k, v, bias, causal)
    bias4 = None if bias is None else _as_4d(bias)
    outs = []
    for start in range(0, batch, limit):
        rows = slice(start, start + limit)
        chunk_bias = bias4 if bias4 is None or bias4.shape[0] == 1 else bias4[rows]
        outs.append(run(q[rows], k[rows], v[rows], chunk_bias, causal))
    return torch.cat(outs, dim=0)
