"""Shared pieces of the benchmark scripts: timing, peak memory, device peaks, environment
record and the CSV / JSON / Markdown / PNG writers.

Timing: `torch.utils.benchmark.Timer.blocked_autorange` (CUDA-synchronised, warm-up excluded),
reported as the median of its blocks.

Peak memory, reset per case:
    CUDA  `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus what was
          allocated before the case: the extra bytes the case needs at its high point.
    CPU   PyTorch keeps no peak statistic for the CPU allocator, and tracemalloc does not see
          it. The case runs once more under `torch.profiler` with `profile_memory=True`; the
          trace's `[memory]` events carry the allocator's running "Total Allocated", whose
          maximum minus its value before the first event is the peak. These are exact
          allocator bytes (no RSS noise from other processes or from glibc keeping freed
          pages), measured in the same process, so models can be compared side by side.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import json
import logging
import os
import platform
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils import benchmark as tbench

__all__ = [
    "DevicePeaks",
    "PEAKS",
    "RESULTS_DIR",
    "copy_bandwidth",
    "device_peaks",
    "environment",
    "hardware_tag",
    "markdown_table",
    "matmul_peak",
    "measure_time",
    "peak_memory",
    "resolve_peaks",
    "roofline_time",
    "write_csv",
    "write_json",
]

logger = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class DevicePeaks:
    """Vendor datasheet peaks: dense tensor-core TFLOP/s per dtype and memory GB/s."""

    name: str
    tflops: Mapping[str, float]
    gbps: float


# Dense (no 2:4 sparsity) datasheet numbers. Matched on the device name CUDA reports, used only
# to express measurements as fractions of the hardware's limits (never to choose code paths).
# fp32 is the tensor-core TF32 rate where the kernels may use it, else the CUDA-core rate.
PEAKS: tuple[tuple[str, DevicePeaks], ...] = (
    ("H200", DevicePeaks("H200 SXM", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}, 4800.0)),
    ("H100 PCIe", DevicePeaks("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}, 2000.0)),
    ("H100 NVL", DevicePeaks("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}, 3900.0)),
    ("H100", DevicePeaks("H100 SXM", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}, 3350.0)),
    ("A100-SXM4-80GB", DevicePeaks("A100 SXM 80GB", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}, 2039.0)),
    ("A100 80GB PCIe", DevicePeaks("A100 PCIe 80GB", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}, 1935.0)),
    ("A100", DevicePeaks("A100 40GB", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}, 1555.0)),
    ("L40S", DevicePeaks("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}, 864.0)),
    ("L4", DevicePeaks("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}, 300.0)),
    ("A10", DevicePeaks("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}, 600.0)),
)


def device_peaks(
    device: torch.device,
    *,
    tflops: float | None = None,
    gbps: float | None = None,
    dtype: str = "fp32",
) -> tuple[float | None, float | None, str]:
    """(peak TFLOP/s for `dtype`, peak GB/s, source) for `device`. `tflops` / `gbps` override
    the table (e.g. for a CPU, whose peaks depend on clocks and cores in use)."""
    found: DevicePeaks | None = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = next((peaks for key, peaks in PEAKS if key in name), None)
    peak_flops = tflops if tflops is not None else (found.tflops.get(dtype) if found else None)
    peak_bw = gbps if gbps is not None else (found.gbps if found else None)
    source = "command line" if tflops is not None or gbps is not None else (
        f"datasheet ({found.name})" if found else "unknown (pass --peak-tflops / --peak-gbps)"
    )
    return peak_flops, peak_bw, source


def _fastest_time(fn: Callable[[], Any], *, min_run_time: float) -> float:
    """Seconds per call of `fn` in its fastest `torch.utils.benchmark` block: a peak is what
    the machine can deliver, so load from other processes should not lower it."""
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return min(timer.blocked_autorange(min_run_time=min_run_time).times)


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, *, size: int | None = None,
                min_run_time: float = 0.5) -> float:
    """Measured TFLOP/s of one large square matmul on `device` at the current thread count:
    the practical ceiling of dense kernels there. CPUs have no datasheet entry (clocks, SIMD
    width and the cores a process gets all vary), so the U-Net benchmark uses this as their
    MFU denominator. `size` defaults to 2048 on CPU (MKL's steady state; 1024 fits in cache
    and reads ~15% higher) and 8192 on CUDA."""
    if size is None:
        size = 2048 if device.type == "cpu" else 8192
    if size < 1:
        raise ValueError(f"matmul_peak size must be >= 1, got {size}")
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    return 2 * size**3 / _fastest_time(lambda: a @ b, min_run_time=min_run_time) / 1e12


def copy_bandwidth(device: torch.device, *, nbytes: int = 256 * 2**20, min_run_time: float = 0.5) -> float:
    """Measured GB/s of copying one `nbytes` buffer into another on `device` (bytes read plus
    bytes written over the time): the memory rate streaming kernels can reach there, at the
    current thread count. 256 MiB defeats the caches of current CPUs."""
    if nbytes < 4:
        raise ValueError(f"copy_bandwidth nbytes must be >= 4, got {nbytes}")
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _fastest_time(lambda: dst.copy_(src), min_run_time=min_run_time) / 1e9


_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_measured: dict[tuple[str, str, int], float] = {}


def resolve_peaks(
    device: torch.device,
    dtype: str = "fp32",
    *,
    tflops: float | None = None,
    gbps: float | None = None,
    bandwidth: bool = True,
) -> tuple[float | None, float | None, str]:
    """(peak TFLOP/s, peak GB/s, source) that fractions of peak and roofline bounds are taken
    against: the command-line overrides, else a known GPU's datasheet, else, on a CPU, what
    this process measures (`matmul_peak` in `dtype`; `copy_bandwidth` unless `bandwidth` is
    False), once per dtype and thread count. A CPU has no datasheet entry: clocks, SIMD width
    and the cores a process gets all vary."""
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_TORCH_DTYPES)}, got {dtype!r}")
    peak_flops, peak_bw, source = device_peaks(device, tflops=tflops, gbps=gbps, dtype=dtype)
    if device.type != "cpu" or (peak_flops is not None and (peak_bw is not None or not bandwidth)):
        return peak_flops, peak_bw, source
    threads = torch.get_num_threads()
    measured = []
    if peak_flops is None:
        key = ("matmul", dtype, threads)
        if key not in _measured:
            _measured[key] = matmul_peak(device, _TORCH_DTYPES[dtype])
        peak_flops = _measured[key]
        measured.append(f"2048^3 {dtype} matmul {peak_flops * 1e3:.1f} GFLOP/s")
    if peak_bw is None and bandwidth:
        key = ("copy", "", threads)
        if key not in _measured:
            _measured[key] = copy_bandwidth(device)
        peak_bw = _measured[key]
        measured.append(f"256 MiB copy {peak_bw:.1f} GB/s")
    given = "; the rest from the command line" if tflops is not None or gbps is not None else ""
    return peak_flops, peak_bw, f"measured: {', '.join(measured)}, {threads} thread(s){given}"


def roofline_time(flops: float, nbytes: float, peak_tflops: float | None, peak_gbps: float | None) -> float | None:
    """Lower bound on the run time (s) from compute and from memory traffic, the larger wins."""
    if peak_tflops is None or peak_gbps is None:
        return None
    return max(flops / (peak_tflops * 1e12), nbytes / (peak_gbps * 1e9))


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and machine facts recorded with every result."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if hasattr(os, "getloadavg"):
        env["load_average"] = tuple(round(x, 2) for x in os.getloadavg())
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    try:
        import make_a_video_pytorch  # noqa: F401
        from importlib.metadata import version

        env["make_a_video_pytorch"] = version("make-a-video-pytorch")
    except Exception:  # not installed, or installed without metadata
        pass
    return env


def hardware_tag(device: torch.device) -> str:
    """A file-name-safe name for the hardware, e.g. `cpu-amd-epyc` or `nvidia-h100-80gb-hbm3`."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-" + _cpu_model()
    name = re.sub(r"\(r\)|\(tm\)|processor|\d+-core", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:48]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_time(fn: Callable[[], Any], *, min_run_time: float = 0.2) -> float:
    """Median seconds per call of `fn` (`torch.utils.benchmark`, which also synchronises CUDA)."""
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by one call of `fn` above what was allocated before it (see the
    module docstring for how, per device)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    memory = [
        e["args"] for e in events
        if e.get("name") == "[memory]" and str(e["args"].get("Device Type", 0)) in ("0", "cpu")
    ]
    if not memory:
        return 0
    base = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(0, max(m["Total Allocated"] for m in memory) - base)


# --------------------------------------------------------------------------------------------
# Writers.


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_json(payload: Any, path: Path) -> None:
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        magnitude = abs(value)
        return f"{value:.3g}" if magnitude < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def environment_markdown(env: Mapping[str, Any]) -> str:
    return "\n".join(f"- {key}: {value}" for key, value in env.items())


def import_pyplot():
    """matplotlib's pyplot on the Agg backend, or an ImportError naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "the benchmark plots need matplotlib: pip install 'spacetime-video[bench]'"
        ) from error
    return plt


def output_stem(out_dir: Path, script: str, device: torch.device, date: str | None = None) -> Path:
    """`<out_dir>/<hardware>-<date>-<script>` (no suffix); creates `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    date = date or _dt.date.today().isoformat()
    return out_dir / f"{hardware_tag(device)}-{date}-{script}"


def parse_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but CUDA is not available on this machine")
    return device


def configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
