"""Every attention backend against the math reference: outputs and gradients of q, k, v and the
bias, with float and bool biases, causal or not, self- and cross-attention (Nq != Nk).

Tolerances (absolute and relative, math computes half inputs in fp32):
    fp32 on CPU: outputs 1e-5, gradients 1e-4 (on CUDA: 1e-4, 1e-3)
    fp16 on CUDA: outputs 2e-3, gradients 2e-2
    bf16 on CUDA: outputs 2e-2, gradients 1e-1
Flex runs its unfused eager path here (FLEX_COMPILE=False): compiling it on CPU takes ~30 s per
shape. The compiled path has its own `slow` test.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spacetime.attend import (
    ENV_VAR,
    AttentionBackend,
    attend,
    attention_backend,
    available_backends,
    backend_capabilities,
    backend_support,
    capability_table,
    resolve_backend,
)

# `spacetime.attend` the attribute is the function (re-exported by the package); the module is
# what tests patch.
attend_module = importlib.import_module("spacetime.attend")

TOLERANCES = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 2e-2),
    torch.bfloat16: (2e-2, 1e-1),
}
NAMED_BACKENDS = [b.value for b in AttentionBackend if b not in (AttentionBackend.AUTO, AttentionBackend.MATH)]
BIAS_KINDS = [None, "float-heads", "float-full", "bool-keys"]
SHAPES = {"self": (2, 3, 6, 6, 16), "cross": (2, 2, 4, 9, 16)}  # B, heads, Nq, Nk, D

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _eager_flex(monkeypatch):
    monkeypatch.setattr(attend_module, "FLEX_COMPILE", False)
    monkeypatch.delenv(ENV_VAR, raising=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


def make_inputs(batch, heads, nq, nk, dim, bias_kind, *, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q, k, v = randn(batch, heads, nq, dim), randn(batch, heads, nk, dim), randn(batch, heads, nk, dim)
    if bias_kind is None:
        bias = None
    elif bias_kind == "float-heads":
        bias = randn(heads, nq, nk)
    elif bias_kind == "float-full":
        bias = randn(batch, heads, nq, nk)
    elif bias_kind == "bool-keys":
        # Key padding as cross-attention uses it; key 0 is always kept, so every query has at
        # least one visible key even under causal masking (a fully masked row is backend-defined).
        bias = (torch.rand(batch, 1, 1, nk, generator=gen) > 0.4).to(device)
        bias[..., 0] = True
    else:
        raise AssertionError(bias_kind)
    return q, k, v, bias


def leaves(tensors, requires_grad):
    return [
        None if t is None else t.detach().clone().requires_grad_(requires_grad and t.is_floating_point())
        for t in tensors
    ]


def run_and_grads(backend, tensors, causal, grad_out):
    q, k, v, bias = tensors
    out = attend(q, k, v, bias, causal=causal, backend=backend)
    if grad_out is None:
        return out, []
    wrt = [t for t in (q, k, v, bias) if t is not None and t.requires_grad]
    return out, list(torch.autograd.grad(out, wrt, grad_out))


def check_matches_math(backend, inputs, causal):
    """Compare `backend` with math, with gradients when the backend supports them, else
    forward only under no_grad; skip with the reasons when it cannot run at all."""
    dtype = inputs[0].dtype
    out_tol, grad_tol = TOLERANCES[dtype]
    if inputs[0].is_cuda and dtype == torch.float32:
        out_tol, grad_tol = 1e-4, 1e-3  # fused fp32 kernels reorder the sums
    with_grad = leaves(inputs, True)
    if backend_support(backend, *with_grad, causal=causal):
        with torch.no_grad():
            reasons = backend_support(backend, *with_grad, causal=causal)
            if reasons:
                pytest.skip(f"{backend}: " + "; ".join(reasons))
            out = attend(*with_grad, causal=causal, backend=backend)
            ref = attend(*with_grad, causal=causal, backend="math")
        torch.testing.assert_close(out, ref, atol=out_tol, rtol=out_tol)
        return
    grad_out = torch.randn_like(with_grad[0])
    out, grads = run_and_grads(backend, with_grad, causal, grad_out)
    ref, ref_grads = run_and_grads("math", leaves(inputs, True), causal, grad_out)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=out_tol, rtol=out_tol)
    assert len(grads) == len(ref_grads) >= 3
    for name, g, g_ref in zip(("q", "k", "v", "bias"), grads, ref_grads):
        torch.testing.assert_close(g, g_ref, atol=grad_tol, rtol=grad_tol, msg=f"grad of {name}")


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("bias_kind", BIAS_KINDS, ids=[str(b) for b in BIAS_KINDS])
@pytest.mark.parametrize("backend", NAMED_BACKENDS + ["auto"])
def test_backend_matches_math_cpu(backend, bias_kind, causal, shape):
    check_matches_math(backend, make_inputs(*shape, bias_kind), causal)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("bias_kind", BIAS_KINDS, ids=[str(b) for b in BIAS_KINDS])
@pytest.mark.parametrize("backend", NAMED_BACKENDS + ["auto"])
def test_backend_matches_math_cuda(backend, bias_kind, causal, shape, dtype, monkeypatch):
    monkeypatch.setattr(attend_module, "FLEX_COMPILE", True)
    check_matches_math(backend, make_inputs(*shape, bias_kind, dtype=dtype, device="cuda"), causal)


@pytest.mark.cuda
@cuda
def test_cuda_fused_kernels_are_offered():
    q, k, v, _ = make_inputs(2, 2, 8, 8, 64, None, dtype=torch.float16, device="cuda")
    assert resolve_backend(q, k, v) != "math"
    bias = torch.randn(2, 8, 8, device="cuda", requires_grad=True)
    name = resolve_backend(q, k, v, bias, causal=True)
    assert name != "math" and backend_support(name, q, k, v, bias, causal=True) == []


# -- chunking ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias_kind", ["float-heads", "float-full", "bool-keys", None])
def test_chunked_equals_unchunked(bias_kind, monkeypatch):
    inputs = make_inputs(7, 2, 5, 6, 8, bias_kind)
    grad_out = torch.randn(7, 2, 5, 8)
    out, grads = run_and_grads("sdpa", leaves(inputs, True), True, grad_out)

    calls = []
    sdpa = attend_module._BACKENDS[AttentionBackend.SDPA]

    def counting_run(q, k, v, bias, causal):
        calls.append(q.shape[0])
        return sdpa.run(q, k, v, bias, causal)

    monkeypatch.setitem(
        attend_module._BACKENDS, AttentionBackend.SDPA, dataclasses.replace(sdpa, run=counting_run)
    )
    monkeypatch.setattr(attend_module, "CUDA_GRID_LIMIT", 3)
    assert backend_capabilities()["sdpa"].max_batch == 3
    chunked, chunked_grads = run_and_grads("sdpa", leaves(inputs, True), True, grad_out)
    assert calls == [3, 3, 1]
    torch.testing.assert_close(chunked, out, atol=1e-6, rtol=1e-6)
    for g, g_ref in zip(chunked_grads, grads, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-6)


def test_chunked_flex_forward(monkeypatch):
    q, k, v, bias = make_inputs(5, 2, 4, 4, 8, "float-full")
    with torch.no_grad():
        whole = attend(q, k, v, bias, causal=True, backend="flex")
        monkeypatch.setattr(attend_module, "CUDA_GRID_LIMIT", 2)
        chunked = attend(q, k, v, bias, causal=True, backend="flex")
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)


def test_math_is_not_batch_limited(monkeypatch):
    monkeypatch.setattr(attend_module, "CUDA_GRID_LIMIT", 1)
    assert backend_capabilities()["math"].max_batch is None
    q, k, v, _ = make_inputs(3, 1, 2, 2, 4, None)
    assert attend(q, k, v, backend="math").shape == (3, 1, 2, 4)


# -- refusals and names --------------------------------------------------------------------------


def test_flash_with_bias_lists_every_reason():
    q, k, v, bias = make_inputs(1, 2, 4, 4, 8, "float-heads")
    with pytest.raises(ValueError) as info:
        attend(q, k, v, bias, backend="flash")
    message = str(info.value)
    assert message.startswith("backend 'flash' cannot run these inputs: ")
    for reason in ("device cpu not supported (needs cuda)", "dtype float32 not supported",
                   "attention bias not supported"):
        assert reason in message
    assert backend_support("flash", q, k, v, bias) == message.split(": ", 1)[1].split("; ")


def test_flash_refuses_cross_causal_and_bool_mask():
    q, k, v, mask = make_inputs(1, 1, 3, 5, 8, "bool-keys")
    assert "causal masking with Nq != Nk (3 vs 5) not supported" in backend_support(
        "flash", q, k, v, causal=True
    )
    assert "boolean attention mask not supported" in backend_support("flash", q, k, v, mask)


def test_cudnn_refuses_bias_gradient():
    q, k, v, bias = make_inputs(1, 2, 4, 4, 8, "float-heads")
    bias.requires_grad_(True)
    assert any("gradient of the attention bias" in r for r in backend_support("cudnn", q, k, v, bias))
    with torch.no_grad():
        assert not any("gradient" in r for r in backend_support("cudnn", q, k, v, bias))


def test_flex_cpu_refuses_backward_only():
    q, k, v, _ = make_inputs(1, 1, 4, 4, 8, None)
    q.requires_grad_(True)
    assert any("backward pass not supported on cpu" in r for r in backend_support("flex", q, k, v))
    with torch.no_grad():
        assert backend_support("flex", q, k, v) == []
        assert attend(q, k, v, backend="flex").shape == q.shape


def test_unknown_backend_name():
    q, k, v, _ = make_inputs(1, 1, 2, 2, 4, None)
    with pytest.raises(ValueError, match=r"'nope' is not an attention backend; valid names: auto, math"):
        attend(q, k, v, backend="nope")
    with pytest.raises(ValueError, match="valid names"):
        backend_support("nope", q, k, v)
    with pytest.raises(ValueError, match="valid names"):
        with attention_backend("nope"):
            pass
    with pytest.raises(TypeError, match="str or AttentionBackend"):
        inspect.unwrap(backend_support)(3, q, k, v)


def test_xformers_missing_or_cpu_gives_install_hint():
    q, k, v, _ = make_inputs(1, 1, 2, 2, 8, None)
    reasons = backend_support("xformers", q, k, v)
    assert "device cpu not supported (needs cuda)" in reasons
    installed = attend_module._package_installed("xformers")
    assert installed or "needs package 'xformers' (pip install 'spacetime-video[xformers]')" in reasons
    assert ("xformers" in available_backends()) == installed
    with pytest.raises(ValueError, match="backend 'xformers' cannot run"):
        attend(q, k, v, backend="xformers")


def test_enum_names_and_capabilities():
    assert {b.value for b in AttentionBackend} >= {
        "auto", "math", "sdpa", "flash", "efficient", "cudnn", "flex", "xformers"
    }
    assert AttentionBackend("flash") == "flash" and str(AttentionBackend.FLEX) == "flex"
    caps = backend_capabilities()
    assert set(caps) == set(NAMED_BACKENDS) | {"math"}
    assert not caps["flash"].bias and caps["efficient"].bias_grad and not caps["cudnn"].bias_grad
    assert caps["flex"].grad_devices == frozenset({"cuda"})
    assert caps["xformers"].package == "xformers"
    cpu = available_backends("cpu")
    assert {"math", "sdpa", "flex"} <= set(cpu) and "flash" not in cpu
    table = capability_table()
    assert table.count("\n") == len(caps) + 1
    for name in caps:
        assert f"| {name} |" in table


# -- choosing: argument > context > environment variable > auto -----------------------------------


@pytest.fixture
def spy(monkeypatch):
    """Records which backend's run function `attend` calls."""
    used = []
    for name, backend in list(attend_module._BACKENDS.items()):

        def run(q, k, v, bias, causal, _name=name.value, _run=backend.run):
            used.append(_name)
            return _run(q, k, v, bias, causal)

        monkeypatch.setitem(attend_module._BACKENDS, name, dataclasses.replace(backend, run=run))
    return used


def test_precedence(monkeypatch, spy):
    # More keys than CPU_MATH_MAX_KEYS, so `auto` picks sdpa on CPU, distinct from math.
    q, k, v, _ = make_inputs(1, 2, 3, 32, 8, None)
    attend(q, k, v)
    monkeypatch.setenv(ENV_VAR, "MATH ")
    attend(q, k, v)
    with attention_backend("sdpa") as chosen:
        assert chosen is AttentionBackend.SDPA
        attend(q, k, v)
        with attention_backend(AttentionBackend.MATH):
            attend(q, k, v)
        attend(q, k, v)
        attend(q, k, v, backend="math")
        assert resolve_backend(q, k, v) == "sdpa"
    attend(q, k, v)
    assert spy == ["sdpa", "math", "sdpa", "math", "sdpa", "math", "math"]
    monkeypatch.setenv(ENV_VAR, "auto")
    assert resolve_backend(q, k, v) == "sdpa"


def test_invalid_env_var_raises_at_use(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "fastest")
    q, k, v, _ = make_inputs(1, 1, 2, 2, 4, None)
    with pytest.raises(ValueError, match=rf"{ENV_VAR}= 'fastest' is not an attention backend; valid names"):
        attend(q, k, v)
    assert attend(q, k, v, backend="math").shape == q.shape  # an explicit choice never reads it


def test_context_is_thread_local():
    import threading

    seen = []
    q, k, v, _ = make_inputs(1, 1, 2, 32, 4, None)  # long enough for auto -> sdpa on CPU
    with attention_backend("math"):
        worker = threading.Thread(target=lambda: seen.append(resolve_backend(q, k, v)))
        worker.start()
        worker.join()
        assert resolve_backend(q, k, v) == "math"
    assert seen == ["sdpa"]


@pytest.mark.parametrize("bias_kind", BIAS_KINDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("nk", [5, attend_module.CPU_MATH_MAX_KEYS + 1])
def test_auto_picks_a_backend_that_accepts(bias_kind, causal, grad, nk, spy):
    inputs = leaves(make_inputs(2, 2, 3, nk, 8, bias_kind), grad)
    name = resolve_backend(*inputs, causal=causal)
    assert backend_support(name, *inputs, causal=causal) == []
    assert backend_support("auto", *inputs, causal=causal) == []
    attend(*inputs, causal=causal)
    assert spy == [name]
    # CPU rule: math first for a bias that needs a gradient or at most CPU_MATH_MAX_KEYS keys,
    # sdpa first otherwise.
    bias_grad = grad and bias_kind is not None and bias_kind.startswith("float")
    short = nk <= attend_module.CPU_MATH_MAX_KEYS
    assert name == ("math" if bias_grad or short else "sdpa")


@pytest.fixture
def no_runtime_type_checks():
    """Dynamo cannot trace jaxtyping's checking wrapper (conftest's import hook), so compiled
    tests switch the checks off, as a user without the hook runs."""
    import jaxtyping

    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", False)


def test_choice_is_read_at_trace_time_under_compile(no_runtime_type_checks):
    from torch._dynamo.testing import CompileCounter

    q, k, v, bias = make_inputs(1, 2, 4, 4, 8, "float-heads")
    counter = CompileCounter()
    compiled = torch.compile(
        lambda q, k, v, b: attend(q, k, v, b, causal=True), backend=counter, fullgraph=True
    )
    expected = attend(q, k, v, bias, causal=True, backend="math")
    torch.testing.assert_close(compiled(q, k, v, bias), expected, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1
    with attention_backend("math"):
        torch.testing.assert_close(compiled(q, k, v, bias), expected, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 2  # a new context is a new trace, not a stale graph


@pytest.mark.slow
def test_flex_compiled_cpu(monkeypatch):
    monkeypatch.setattr(attend_module, "FLEX_COMPILE", True)
    q, k, v, bias = make_inputs(1, 2, 8, 8, 16, "float-heads")
    with torch.no_grad():
        out = attend(q, k, v, bias, causal=True, backend="flex")
        ref = attend(q, k, v, bias, causal=True, backend="math")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flex_block_masks_are_cached():
    q, k, v, _ = make_inputs(1, 1, 3, 5, 8, None)
    with torch.no_grad():
        attend(q, k, v, causal=True, backend="flex")
        mask = attend_module._block_masks[(3, 5, "cpu")]
        attend(q, k, v, causal=True, backend="flex")
    assert attend_module._block_masks[(3, 5, "cpu")] is mask


# -- math's recomputing backward ------------------------------------------------------------------


@pytest.mark.parametrize("bias_kind", BIAS_KINDS, ids=[str(b) for b in BIAS_KINDS])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq, nk, dim, recomputed", [(5, 7, 8, False), (12, 13, 2, True)])
def test_math_backward_matches_autograd_reference(bias_kind, causal, nq, nk, dim, recomputed, monkeypatch):
    """math recomputes the attention weights in backward instead of saving them when they
    outweigh q, k and v (Nq * Nk > (Nq + 2 Nk) * D); either way its outputs and gradients
    (q, k, v and a broadcast bias) equal autograd through the plain formula."""
    calls = []
    real_apply = attend_module._MathAttention.apply
    monkeypatch.setattr(attend_module._MathAttention, "apply", lambda *a: calls.append(1) or real_apply(*a))
    q, k, v, bias = (
        None if t is None else t.double() if t.is_floating_point() else t
        for t in make_inputs(2, 3, nq, nk, dim, bias_kind)
    )
    inputs = leaves([q, k, v, bias], True)
    grads_of = [t for t in inputs if t is not None and t.requires_grad]

    def reference(q, k, v, bias):
        sim = torch.einsum("b h i d, b h j d -> b h i j", q, k) * q.shape[-1] ** -0.5
        lowest = torch.finfo(sim.dtype).min
        if bias is not None:
            sim = sim.masked_fill(~bias, lowest) if bias.dtype == torch.bool else sim + bias
        if causal:
            sim = sim.masked_fill(~torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq), lowest)
        return torch.einsum("b h i j, b h j d -> b h i d", sim.softmax(-1), v)

    out = attend(*inputs, causal=causal, backend="math")
    expected = reference(*inputs)
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, grads_of, grad_out)
    want = torch.autograd.grad(expected, grads_of, grad_out)
    assert len(got) == (4 if bias_kind in ("float-heads", "float-full") else 3)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert len(calls) == int(recomputed)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("batch", [1, 3])  # 3: the bias is shared across the batch, so it takes the mask
def test_math_causal_rows_without_keys_stay_uniform_with_a_float_bias(batch, requires_grad):
    """Causal with more queries than keys leaves the first rows no key; with a float bias
    (which takes the causal mask itself when shared across the batch) they still average v."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, 2, n, 4, generator=gen, requires_grad=requires_grad) for n in (5, 3, 3))
    bias = torch.randn(2, 5, 3, generator=gen, requires_grad=requires_grad)
    out = attend(q, k, v, bias, causal=True, backend="math")
    # tril(3 - 5): query i sees keys j <= i - 2, so queries 0 and 1 see none.
    torch.testing.assert_close(out[:, :, :2], v.mean(dim=2, keepdim=True).expand(batch, 2, 2, 4))
    assert torch.isfinite(out).all()
    if requires_grad:
        (grad_bias,) = torch.autograd.grad(out.sum(), [bias])
        # no gradient reaches a masked bias entry
        assert torch.all(grad_bias.masked_select(~torch.ones(5, 3, dtype=torch.bool).tril(-2)) == 0)


# -- dtypes and validation -----------------------------------------------------------------------


def test_math_half_inputs_computed_in_fp32():
    q, k, v, bias = make_inputs(1, 2, 4, 6, 8, "float-heads")
    ref = attend(q, k, v, bias, causal=True, backend="math")
    half = [t.to(torch.bfloat16) for t in (q, k, v)]
    out = attend(*half, bias, causal=True, backend="math")  # fp32 bias beside bf16 q
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    out_sdpa = attend(*half, bias, causal=True, backend="sdpa")
    assert out_sdpa.dtype == torch.bfloat16
    torch.testing.assert_close(out_sdpa.float(), ref, atol=3e-2, rtol=3e-2)


def test_float64_through_auto():
    q, k, v, bias = make_inputs(2, 1, 3, 3, 4, "float-full", dtype=torch.float64)
    out = attend(q, k, v, bias, causal=True)
    torch.testing.assert_close(out, attend(q, k, v, bias, causal=True, backend="math"))


plain_attend = inspect.unwrap(attend)  # past the test-time jaxtyping/beartype hook


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda q, k, v, b: (q[0], k, v, b), ValueError, r"q must be 4-D \(B, heads, N, D\)"),
        (lambda q, k, v, b: (q, k[:, :1], v[:, :1], b), ValueError, "same number of heads"),
        (lambda q, k, v, b: (q, k[:1], v[:1], b), ValueError, "same batch size"),
        (lambda q, k, v, b: (q, k, v[:, :, :2], b), ValueError, "same sequence length"),
        (lambda q, k, v, b: (q, k[..., :4], v[..., :4], b), ValueError, "same head dim"),
        (lambda q, k, v, b: (q, k.double(), v, b), ValueError, "share one dtype"),
        (lambda q, k, v, b: (q.long(), k, v, b), TypeError, "floating-point"),
        (lambda q, k, v, b: (q, k, v, b[:, :2]), ValueError, "does not broadcast"),
        (lambda q, k, v, b: (q, k, v, b[None, None]), ValueError, "does not broadcast"),
        (lambda q, k, v, b: (q, k, v, b.long()), TypeError, "bool keep-mask"),
        (lambda q, k, v, b: ("q", k, v, b), TypeError, "q must be a torch.Tensor"),
        (lambda q, k, v, b: (q, k, v, b.tolist()), TypeError, "bias must be a torch.Tensor"),
        (lambda q, k, v, b: (q[:, :, :0], k, v, b[:, :0]), ValueError, "sequence lengths must be >= 1"),
        (lambda q, k, v, b: (q, k, v, b.to("meta")), ValueError, "bias must be on q's device"),
        (lambda q, k, v, b: (q, k.to("meta"), v.to("meta"), b), ValueError, "on one device"),
    ],
)
def test_validation_messages(change, error, match):
    q, k, v, bias = make_inputs(2, 2, 3, 5, 8, "float-heads")
    with pytest.raises(error, match=match):
        plain_attend(*change(q, k, v, bias))
    with pytest.raises((TypeError, ValueError)):  # the hooked entry point raises too
        attend(*change(q, k, v, bias))


def test_causal_must_be_bool():
    q, k, v, _ = make_inputs(1, 1, 2, 2, 4, None)
    with pytest.raises(TypeError, match="causal must be a bool"):
        plain_attend(q, k, v, causal=1)
    with pytest.raises(ValueError, match="same batch size"):
        backend_support("math", q, k[:0], v)


# -- properties over shapes ----------------------------------------------------------------------


@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 3),
    nq=st.integers(1, 7),
    nk=st.integers(1, 7),
    dim=st.sampled_from([1, 4, 8, 12]),
    causal=st.booleans(),
    bias_kind=st.sampled_from(BIAS_KINDS),
)
def test_sdpa_matches_math_on_any_shape(batch, heads, nq, nk, dim, causal, bias_kind):
    if causal:
        nq = min(nq, nk)  # keep every query with at least one visible key
    inputs = make_inputs(batch, heads, nq, nk, dim, bias_kind, seed=batch * 7 + nk)
    check_matches_math("sdpa", inputs, causal)


@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 2),
    nq=st.integers(1, 5),
    extra_keys=st.integers(0, 3),
    dim=st.sampled_from([2, 8]),
)
def test_causal_prefix_invariance(batch, heads, nq, extra_keys, dim):
    """Query i only sees keys up to i + Nk - Nq: changing later keys leaves it unchanged."""
    nk = nq + extra_keys
    q, k, v, _ = make_inputs(batch, heads, nq, nk, dim, None, seed=nq)
    out = attend(q, k, v, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 5.0
    v2[:, :, -1] -= 3.0
    out2 = attend(q, k2, v2, causal=True)
    torch.testing.assert_close(out2[:, :, :-1], out[:, :, :-1], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out2[:, :, -1], out[:, :, -1])


@pytest.mark.parametrize("kernel", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"])
def test_torch_kernel_probe_turns_refusals_into_reasons(kernel):
    """The CUDA backends also ask PyTorch's kernel filter; a refusal becomes a reason. (On CPU
    tensors every fused CUDA kernel refuses, which exercises the translation.)"""
    from torch.nn.attention import SDPBackend

    q, k, v, bias = make_inputs(1, 2, 4, 6, 8, "float-heads")
    inputs = attend_module._describe(q, k, v, bias, True)
    reasons = attend_module._torch_kernel_refusals(getattr(SDPBackend, kernel), inputs)
    assert reasons and all(r.startswith("PyTorch's kernel refuses them") for r in reasons)


def test_declared_capability_checks():
    """The declaration machinery, on a made-up record that refuses what no built-in does."""
    strict = attend_module.BackendCapability(
        name="strict", description="test record", devices=frozenset({"cpu"}),
        dtypes=frozenset({torch.float64}), bias=True, bias_grad=True, bool_mask=True,
        causal=False, min_head_dim=16, max_head_dim=32,
    )
    q, k, v, _ = make_inputs(1, 1, 2, 2, 8, None)
    reasons = attend_module._declared_reasons(strict, attend_module._describe(q, k, v, None, True))
    assert reasons == [
        "dtype float32 not supported (needs float64)",
        "head dim 8 not supported (needs >= 16)",
        "causal masking not supported",
    ]
    q, k, v, _ = make_inputs(1, 1, 2, 2, 512, None)
    assert "head dim 512 not supported (needs <= 256)" in backend_support("flash", q, k, v)


def test_flex_inside_an_outer_compiled_region(no_runtime_type_checks):
    q, k, v, bias = make_inputs(1, 2, 4, 6, 8, "float-heads")
    compiled = torch.compile(
        lambda q, k, v, b: attend(q, k, v, b, causal=True, backend="flex"), backend="eager",
        fullgraph=True,
    )
    with torch.no_grad():
        out = compiled(q, k, v, bias)
        ref = attend(q, k, v, bias, causal=True, backend="math")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_math_under_bf16_autocast_matches_its_exact_result(causal):
    # autocast must not recast the math backend's fp32 logits (the fp32 masking value would
    # overflow bf16) nor mix dtypes in its recomputing backward
    torch.manual_seed(0)
    q = torch.randn(2, 2, 64, 16, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(1, 2, 64, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, q, q, bias, causal=causal, backend="math")
    out.float().square().sum().backward()
    grads = q.grad.clone(), bias.grad.clone()
    q.grad = bias.grad = None
    exact = attend(q, q, q, bias, causal=causal, backend="math")
    exact.float().square().sum().backward()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, exact)
    torch.testing.assert_close(grads[0], q.grad)
    torch.testing.assert_close(grads[1], bias.grad)
