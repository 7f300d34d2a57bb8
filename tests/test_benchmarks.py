"""Smoke runs of benchmarks/attention.py and benchmarks/unet.py (--quick, CPU), and the
analytic counts and memory measurement they rest on."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import unets

from benchmarks import attention as attention_bench
from benchmarks import common
from benchmarks import unet as unet_bench


def _single(folder, pattern):
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {folder}, got {found}"
    return found[0]


def test_flop_and_byte_counts():
    case = attention_bench.Case("temporal", 4, 3, 2, 8, "none", False, "fp32", "fwd")
    assert attention_bench.flop_count(case) == 4 * 3 * 2 * 4 * 4 * 8
    # Causal 4x4 keeps 1 + 2 + 3 + 4 of 16 pairs; backward is 2.5x forward.
    causal = attention_bench.Case("temporal", 4, 3, 2, 8, "none", True, "fp32", "fwd+bwd")
    assert attention_bench.kept_fraction(4, 4, True) == pytest.approx(10 / 16)
    assert attention_bench.flop_count(causal) == pytest.approx(4 * 3 * 2 * 4 * 4 * 8 * 10 / 16 * 3.5)
    # fp32 q, k, v read and o written; the bias adds heads * N * N once.
    assert attention_bench.byte_count(case) == 4 * 3 * 2 * 8 * (4 * 4)
    biased = attention_bench.Case("temporal", 4, 3, 2, 8, "t5", False, "bf16", "fwd")
    assert attention_bench.byte_count(biased) == 2 * 3 * 2 * 8 * (4 * 4) + 2 * 2 * 4 * 4


def test_roofline_and_peaks():
    assert common.roofline_time(1e12, 1e9, 100.0, 1000.0) == pytest.approx(max(1e12 / 1e14, 1e9 / 1e12))
    assert common.roofline_time(1.0, 1.0, None, 1000.0) is None
    flops, gbps, source = common.device_peaks(torch.device("cpu"), tflops=2.0, gbps=50.0)
    assert (flops, gbps, source) == (2.0, 50.0, "command line")
    assert common.device_peaks(torch.device("cpu"))[:2] == (None, None)


def test_cpu_peak_memory_sees_torch_allocations():
    def allocate():
        a = torch.ones(1 << 20)  # 4 MiB
        del a
        b = torch.ones(2 << 20)  # 8 MiB
        c = torch.ones(1 << 20)  # + 4 MiB live together: 12 MiB peak
        return float(b[0] + c[0])

    peak = common.peak_memory(allocate, torch.device("cpu"))
    assert 12 * 2**20 <= peak < 13 * 2**20


def test_attention_quick(tmp_path):
    assert attention_bench.main(["--quick", "--out", str(tmp_path)]) == 0
    csv_path = _single(tmp_path, "*-attention.csv")
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    timed = [r for r in rows if r["time_ms"]]
    assert {"kind", "seq", "backend", "resolved", "time_ms", "tflops", "gbps", "peak_mem_mb"} <= set(rows[0])
    assert {r["kind"] for r in timed} == {"spatial", "temporal"}
    assert {r["pass"] for r in timed} == {"fwd", "fwd+bwd"}
    assert {"math", "sdpa", "auto"} <= {r["backend"] for r in timed}
    assert all(float(r["time_ms"]) > 0 and float(r["tflops"]) > 0 for r in timed)
    # fwd+bwd allocates activations and gradients: some memory must be seen.
    assert any(float(r["peak_mem_mb"]) > 0 for r in timed if r["pass"] == "fwd+bwd")

    payload = json.loads(_single(tmp_path, "*-attention.json").read_text())
    assert payload["environment"]["torch"] == torch.__version__
    assert payload["auto"], "the auto-vs-fastest report is empty"
    for entry in payload["auto"]:
        assert entry["auto_chose"] in {"math", "sdpa"}
        assert entry["auto/fastest"] >= 1.0 - 1e-9

    report = _single(tmp_path, "*-attention.md").read_text()
    assert report.startswith("# Attention benchmark")
    assert "What `auto` chose" in report and "| spatial |" in report
    assert _single(tmp_path, "*-attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unet_quick(tmp_path):
    assert unet_bench.main(["--quick", "--out", str(tmp_path)]) == 0
    payload = json.loads(_single(tmp_path, "*-unet.json").read_text())
    rows = payload["rows"]
    models = {r["model"] for r in rows}
    assert {"space_time_unet", "unet3d", "make-a-video-pytorch"} == models
    assert {(r["model"], r["mode"]) for r in rows} == {(m, mode) for m in models for mode in ("train", "sample")}
    for r in rows:
        assert r["time_ms"] > 0 and r["samples_per_s"] > 0 and r["gflop"] > 0
        assert r["peak_mem_mb"] > 0
    # Training keeps activations for backward: more memory than one inference step.
    for model in models:
        train, sample = (next(r for r in rows if r["model"] == model and r["mode"] == m) for m in ("train", "sample"))
        assert train["peak_mem_mb"] > sample["peak_mem_mb"]
        assert train["gflop"] > 2 * sample["gflop"]
    comparison = {(c["mode"], c["metric"]): c for c in payload["comparison"]}
    assert set(comparison) == {(m, k) for m in ("train", "sample") for k in ("time", "memory")}
    assert comparison[("train", "time")]["target"] == 0.5
    assert comparison[("train", "memory")]["target"] == 0.7
    assert all(c["ratio"] > 0 for c in comparison.values())

    with _single(tmp_path, "*-unet.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    report = _single(tmp_path, "*-unet.md").read_text()
    assert report.startswith("# U-Net benchmark") and "Ours / make-a-video-pytorch" in report


def test_channels_last_handles_mixed_4d_and_5d_weights():
    # A pseudo-3D U-Net with full 3D convs holds 4-D and 5-D weights; Module.to(memory_format=)
    # refuses that mix, the benchmark's helper converts each tensor by its rank.
    model = unets.build("space_time_unet", preset="debug", channels=1, blocks={"conv": "conv3d"})
    ranks = {p.ndim for p in model.parameters()}
    assert {4, 5} <= ranks
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unet_bench.channels_last(model)
    for p in model.parameters():
        if p.ndim == 4:
            assert p.is_contiguous(memory_format=torch.channels_last)
        elif p.ndim == 5:
            assert p.is_contiguous(memory_format=torch.channels_last_3d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unet_quick_channels_last(tmp_path):
    argv = ["--quick", "--channels-last", "--models", "space_time_unet", "--no-compare", "--out", str(tmp_path)]
    assert unet_bench.main(argv) == 0
    rows = json.loads(_single(tmp_path, "*-unet.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {"space_time_unet"}
    assert all(r["time_ms"] > 0 for r in rows)


def test_attention_rounds_time_every_backend_in_turn(monkeypatch):
    case = attention_bench.Case("temporal", 4, 8, 2, 8, "continuous", False, "fp32", "fwd+bwd")
    calls = []
    real = common.measure_time

    def spy(fn, *, min_run_time):
        calls.append(min_run_time)
        return real(fn, min_run_time=min_run_time)

    monkeypatch.setattr(common, "measure_time", spy)
    rows = attention_bench.run_case(
        case, ["math", "sdpa", "auto"], torch.device("cpu"), min_run_time=0.03, memory=False,
        peaks=(None, None), rounds=3,
    )
    assert [r["backend"] for r in rows] == ["math", "sdpa", "auto"]
    assert all(r["time_ms"] > 0 and r["tflops"] > 0 for r in rows)
    # three rounds of three backends, each a third of the time budget
    assert len(calls) == 9 and all(c == pytest.approx(0.01) for c in calls)


def test_matmul_peak_is_a_positive_rate():
    rate = common.matmul_peak(torch.device("cpu"), size=128, min_run_time=0.02)
    assert 0 < rate < 100  # TFLOP/s: one CPU process, far below 100
    with pytest.raises(ValueError, match="size must be >= 1, got 0"):
        common.matmul_peak(torch.device("cpu"), size=0)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("aten::convolution_backward", "convolution"),
        ("aten::mkldnn_convolution", "convolution"),
        ("aten::slow_conv3d_forward", "convolution"),
        ("aten::conv_depthwise3d", "convolution"),
        ("aten::_convert_indices_from_coo_to_csr", "other"),
        ("aten::bmm", "matmul"),
        ("aten::addmm", "matmul"),
        ("aten::_softmax_backward_data", "softmax / fused attention"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "softmax / fused attention"),
        ("aten::copy_", "copies / indexing"),
        ("aten::cat", "copies / indexing"),
        ("aten::mul", "other"),
        ("aten::matmul", "other"),  # dispatch only: its time is the bmm / mm it calls
    ],
)
def test_work_kinds(name, kind):
    assert unet_bench._work_kind(name) == kind


@pytest.mark.parametrize(
    ("op", "kind"),
    [("aten.convolution_backward", "convolution"), ("aten.mm.default", "matmul"), ("aten.bmm", "matmul"),
     ("aten._scaled_dot_product_flash_attention_for_cpu", "softmax / fused attention")],
)
def test_flop_counter_keys_map_to_kinds(op, kind):
    assert unet_bench._flop_kind(op) == kind


def test_time_target_reports_the_rate_it_needs():
    rows = [
        {"model": "space_time_unet", "mode": "train", "time_ms": 800.0, "peak_mem_mb": 60.0, "gflop": 40.0},
        {"model": "make-a-video-pytorch", "mode": "train", "time_ms": 1000.0, "peak_mem_mb": 100.0, "gflop": 39.0},
    ]
    out = {r["metric"]: r for r in unet_bench.ratios(rows, torch.device("cpu"), peak_tflops=0.1)}
    assert out["time"]["ratio"] == pytest.approx(0.8) and out["time"]["met"] is False
    # 40 GFLOP in 0.5 * 1000 ms = 80 GFLOP/s = 0.08 TFLOP/s, 80% of a 0.1 TFLOP/s peak.
    assert out["time"]["needs_tflops"] == pytest.approx(0.08)
    assert out["time"]["needs_pct_of_peak"] == pytest.approx(80.0)
    assert out["memory"]["ratio"] == pytest.approx(0.6) and out["memory"]["met"] is True
    assert "needs_tflops" not in out["memory"]
    unknown = {r["metric"]: r for r in unet_bench.ratios(rows, torch.device("cpu"))}
    assert unknown["time"]["needs_pct_of_peak"] is None


def test_unet_profile_breaks_the_step_down(tmp_path):
    argv = ["--quick", "--profile", "--models", "space_time_unet", "--modes", "train", "--no-compare",
            "--out", str(tmp_path)]
    assert unet_bench.main(argv) == 0
    payload = json.loads(_single(tmp_path, "*-unet.json").read_text())
    assert payload["environment"]["peak_tflops"] > 0
    assert payload["environment"]["peak_source"].startswith("measured")
    rows = {r["kind"]: r for r in payload["breakdown"]}
    assert list(rows) == list(unet_bench.WORK_KINDS)
    assert sum(r["share_pct"] for r in rows.values()) == pytest.approx(100.0)
    for kind in ("convolution", "matmul", "optimizer", "other"):
        assert rows[kind]["ms"] > 0, kind
    # FLOPs land on the kinds that do them: convolutions and matrix products, nothing else.
    assert rows["convolution"]["gflop"] > 0 and rows["convolution"]["tflops"] > 0
    assert rows["optimizer"]["gflop"] == 0 and rows["optimizer"]["tflops"] is None
    assert payload["rows"][0]["mfu_pct"] > 0
    report = _single(tmp_path, "*-unet.md").read_text()
    assert "Where one step's time goes" in report


def test_unet_profile_is_cpu_only():
    with pytest.raises(ValueError, match="--profile breaks a step down from CPU self times; got --device cuda"):
        unet_bench.parse_args(["--profile", "--device", "cuda"])


def test_copy_bandwidth_is_a_positive_rate():
    rate = common.copy_bandwidth(torch.device("cpu"), nbytes=1 << 20, min_run_time=0.02)
    assert 0 < rate < 10_000  # GB/s
    with pytest.raises(ValueError, match="nbytes must be >= 4, got 2"):
        common.copy_bandwidth(torch.device("cpu"), nbytes=2)


def test_cpu_peaks_are_measured_once_and_overrides_win(monkeypatch):
    calls = []
    monkeypatch.setattr(common, "_measured", {})
    monkeypatch.setattr(common, "matmul_peak", lambda device, dtype: calls.append(("matmul", dtype)) or 0.07)
    monkeypatch.setattr(common, "copy_bandwidth", lambda device: calls.append(("copy", None)) or 20.0)
    cpu = torch.device("cpu")
    flops, gbps, source = common.resolve_peaks(cpu, "fp32")
    assert (flops, gbps) == (0.07, 20.0)
    assert source.startswith("measured: 2048^3 fp32 matmul 70.0 GFLOP/s, 256 MiB copy 20.0 GB/s, ")
    assert common.resolve_peaks(cpu, "fp32")[:2] == (0.07, 20.0)
    assert calls == [("matmul", torch.float32), ("copy", None)]  # cached per dtype and threads
    common.resolve_peaks(cpu, "bf16")
    assert calls[-1] == ("matmul", torch.bfloat16) and len(calls) == 3
    flops, gbps, source = common.resolve_peaks(cpu, "fp32", tflops=1.5)
    assert (flops, gbps) == (1.5, 20.0) and source.endswith("the rest from the command line")
    assert common.resolve_peaks(cpu, "fp32", tflops=1.5, gbps=9.0) == (1.5, 9.0, "command line")
    flops, gbps, _ = common.resolve_peaks(cpu, "fp32", bandwidth=False)
    assert (flops, gbps) == (0.07, None)
    with pytest.raises(ValueError, match="dtype must be one of .* got 'fp8'"):
        common.resolve_peaks(cpu, "fp8")
