"""U-Net train and sampling steps, and the side-by-side with make-a-video-pytorch.

    python benchmarks/unet.py                      # presets "small", batch 2 x 8 frames x 32x32
    python benchmarks/unet.py --quick              # CPU smoke run
    python benchmarks/unet.py --device cuda --bf16 --backend auto --compile

Per model (`SpaceTimeUnet`, `Unet3D`, by registry preset): the train step (zero_grad, forward,
MSE loss, backward, Adam step) and the sampling step (one U-Net evaluation under
`torch.inference_mode`, what each sampler step costs): median time, samples/s, peak memory
(reset per case; see `benchmarks/common.py` for how on CPU) and the model FLOPs
(`torch.utils.flop_counter`, forward + backward for the train step) as achieved TFLOP/s and
model FLOPs utilisation (MFU) against the device's peak (see `resolve_peak`).

`--profile` (CPU) breaks one step of each model down by kind of work (convolutions, matrix
products, softmax and fused attention, copies and indexing, optimizer, the rest: elementwise
ops, norms, framework overhead) with `torch.profiler` self times and the FLOPs of each kind, so
the report shows where the time goes and how close each kind runs to the machine's dense-matmul
rate. On a CPU, whose peak no datasheet gives, that rate is measured (`common.matmul_peak`) and
is the MFU denominator; beside each time target the report prints the sustained TFLOP/s the
target would need and its share of that rate.

Toggles: `--backend` (attention backend, via `spacetime.attention_backend`), `--compile`
(`torch.compile`), `--checkpointing` (`enable_gradient_checkpointing()`), `--channels-last`
(model and input in channels-last memory format), `--bf16` (autocast to bfloat16).

With make-a-video-pytorch installed (`pip install --no-deps make-a-video-pytorch==0.4.0`: its
declared dependencies pull a CUDA torch), `SpaceTimeUnet` is also run against make-a-video's
`SpaceTimeUnet` at the same config and the same weights (`unets.from_make_a_video`), the two
alternating round by round in one process (so machine load affects both alike), and the
ratios ours / theirs are printed beside the targets: CPU fp32 train step <= 0.5x the time
and <= 0.7x the peak memory; CUDA bf16 train step >= 2x as fast (<= 0.5x the time).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import logging
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    # Run as `python benchmarks/unet.py`: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import unets
from benchmarks import common
from spacetime import attention_backend

logger = logging.getLogger("benchmarks.unet")

MODELS = ("space_time_unet", "unet3d")
# The comparison config is the registry's "small" preset of space_time_unet:
# dim=32, dim_mult=(1, 2, 4), self_attns=(F, T, T), temporal_compression=(F, F, T),
# depths (1, 1, 1), 4 heads of 32, position bias on.
TARGETS = {
    ("cpu", "train", "time"): 0.5,
    ("cpu", "train", "memory"): 0.7,
    ("cuda", "train", "time"): 0.5,
}


def channels_last(model: nn.Module) -> nn.Module:
    """`model` with its 4-D parameters and buffers in `channels_last` and its 5-D ones in
    `channels_last_3d` (`Module.to(memory_format=...)` refuses a model holding both, as
    pseudo-3D U-Nets with full 3D convolutions do)."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.ndim in formats:
                tensor.data = tensor.data.contiguous(memory_format=formats[tensor.ndim])
    return model


def _timestep(batch: int, device: torch.device) -> torch.Tensor:
    return torch.linspace(10, 990, batch, device=device).round()


class Subject:
    """One model with its optimizer, inputs and the two step closures."""

    def __init__(self, name: str, model: nn.Module, args: argparse.Namespace, device: torch.device, shape):
        self.name = name
        self.device = device
        model = model.to(device)
        generator = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(shape, generator=generator)
        self.target = torch.randn(shape, generator=generator).to(device)
        if args.channels_last:
            model = channels_last(model)
            x = x.to(memory_format=torch.channels_last_3d)
        self.x = x.to(device)
        self.t = _timestep(shape[0], device)
        if args.checkpointing:
            if not hasattr(model, "enable_gradient_checkpointing"):
                raise ValueError(f"{name} has no enable_gradient_checkpointing(); drop --checkpointing")
            model.enable_gradient_checkpointing()
        self.model = model
        self.forward = torch.compile(model, backend=args.compile_backend) if args.compile else model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        self.bf16 = args.bf16
        self.backend = args.backend

    def _context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if self.bf16:
            stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        if self.backend is not None and not self.name.startswith("make-a-video"):
            stack.enter_context(attention_backend(self.backend))
        return stack

    def train_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self._context():
            loss = F.mse_loss(self.forward(self.x, self.t).float(), self.target)
        loss.backward()
        self.optimizer.step()

    def sample_step(self) -> None:
        with torch.inference_mode(), self._context():
            self.forward(self.x, self.t)

    def step(self, mode: str) -> Callable[[], None]:
        return self.train_step if mode == "train" else self.sample_step

    def flops(self, mode: str) -> float | None:
        """Model FLOPs of one step (forward, plus backward when training) counted by
        `torch.utils.flop_counter` on the eager model."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        try:
            with counter, self._context():
                if mode == "train":
                    out = self.model(self.x, self.t)
                    F.mse_loss(out.float(), self.target).backward()
                else:
                    with torch.no_grad():
                        self.model(self.x, self.t)
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())


# Kinds of work in a profiled step, by ATen op name (self time). Ops run under
# `Optimizer.step` / `Optimizer.zero_grad` count as "optimizer" whatever they are.
_MATMUL_OPS = frozenset({"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm"})
_COPY_OPS = frozenset({
    "aten::copy_", "aten::cat", "aten::index", "aten::_index_put_impl_", "aten::gather",
    "aten::scatter", "aten::scatter_add_", "aten::fill_", "aten::zero_", "aten::constant_pad_nd",
})
WORK_KINDS = ("convolution", "matmul", "softmax / fused attention", "copies / indexing", "optimizer", "other")


_CONV_OP = re.compile(r"conv(olution|[123]d|_)")  # not aten::_convert_*


def _work_kind(name: str) -> str:
    if _CONV_OP.search(name):
        return "convolution"
    if name in _MATMUL_OPS:
        return "matmul"
    if "softmax" in name or "scaled_dot_product" in name or "flash_attention" in name:
        return "softmax / fused attention"
    if name in _COPY_OPS:
        return "copies / indexing"
    return "other"


def _flop_kind(op_name: str) -> str:
    """The kind of a flop_counter key, `aten.mm` (a packet) or `aten.mm.default` (an overload)."""
    namespace, name = (op_name.split(".") + [""])[:2]
    return _work_kind(f"{namespace}::{name}")


def step_breakdown(subject: Subject, mode: str, peak_tflops: float | None) -> list[dict[str, Any]]:
    """One step of `subject` under `torch.profiler` (CPU): self time per kind of work, its share
    of the step, the FLOPs `torch.utils.flop_counter` gives that kind, and the rate it runs at
    (and its share of `peak_tflops`, when given)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    if subject.device.type != "cpu":
        raise ValueError(
            f"--profile breaks a step down from CPU self times; got device {subject.device}. "
            "On CUDA, use torch.profiler's kernel table"
        )
    step = subject.step(mode)
    step()  # warm: the timing rounds ran it, but a fresh Adam state would count here otherwise
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    micros = dict.fromkeys(WORK_KINDS, 0.0)
    for event in prof.events():
        parent, kind = event.cpu_parent, None
        while parent is not None:
            if parent.name.startswith("Optimizer."):
                kind = "optimizer"
                break
            parent = parent.cpu_parent
        if kind is None and event.name.startswith("Optimizer."):
            kind = "optimizer"
        micros[kind or _work_kind(event.name)] += event.self_cpu_time_total
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = dict.fromkeys(WORK_KINDS, 0.0)
    for op, count in counter.get_flop_counts().get("Global", {}).items():
        flops[_flop_kind(str(op))] += count
    total = sum(micros.values())
    rows = []
    for kind in WORK_KINDS:
        seconds = micros[kind] / 1e6
        rate = flops[kind] / seconds / 1e12 if flops[kind] and seconds else None
        rows.append({
            "model": subject.name,
            "mode": mode,
            "kind": kind,
            "ms": seconds * 1e3,
            "share_pct": 100 * micros[kind] / total if total else 0.0,
            "gflop": flops[kind] / 1e9,
            "tflops": rate,
            "pct_of_peak": None if rate is None or not peak_tflops else 100 * rate / peak_tflops,
        })
    return rows


def resolve_peak(device: torch.device, args: argparse.Namespace) -> tuple[float | None, str]:
    """The MFU denominator: `--peak-tflops`, else the datasheet peak of a known GPU, else (CPU)
    the measured rate of a large matmul in the step's dtype (`common.resolve_peaks`)."""
    dtype = "bf16" if args.bf16 else "fp32"
    peak, _, source = common.resolve_peaks(device, dtype, tflops=args.peak_tflops, bandwidth=False)
    return peak, source


def _make_a_video(config: dict[str, Any]) -> nn.Module:
    try:
        from make_a_video_pytorch import SpaceTimeUnet as MakeAVideoUnet
    except ImportError as error:
        raise ImportError(
            "the make-a-video comparison needs make-a-video-pytorch: "
            "pip install 'spacetime-video[bench]' && pip install --no-deps make-a-video-pytorch==0.4.0"
        ) from error
    return MakeAVideoUnet(**config)


def _preset(model_name: str, preset: str) -> dict[str, Any]:
    """The constructor arguments a registry preset sets (make-a-video's names for SpaceTimeUnet)."""
    table = unets.get(model_name).preset_table
    if preset not in table:
        raise ValueError(f"{model_name} has no preset {preset!r}; presets: {sorted(table)}")
    entry = table[preset]
    return dict(entry.to_dict() if hasattr(entry, "to_dict") else entry)


def build_subjects(model_name: str, args: argparse.Namespace, device: torch.device, shape) -> list[Subject]:
    preset = _preset(model_name, args.preset)
    if model_name == "space_time_unet":
        preset.setdefault("attn_pos_bias", True)
    torch.manual_seed(0)
    if model_name == "space_time_unet" and args.compare:
        reference = _make_a_video(preset)
        ours = unets.from_make_a_video(reference.state_dict(), **preset)
        return [Subject(model_name, ours, args, device, shape), Subject("make-a-video-pytorch", reference, args, device, shape)]
    return [Subject(model_name, unets.build(model_name, **preset), args, device, shape)]


def measure(subjects: Sequence[Subject], mode: str, args: argparse.Namespace,
            peak_tflops: float | None = None) -> list[dict[str, Any]]:
    """Alternate the subjects round by round (reversing the order every other round), one
    step per timing; median over rounds. Then peak memory and FLOPs per subject."""
    from torch.utils import benchmark as tbench

    steps = [s.step(mode) for s in subjects]
    for step in steps:  # warm-up: allocator, oneDNN primitives, Adam state, compilation
        for _ in range(args.warmup):
            step()
    times: list[list[float]] = [[] for _ in subjects]
    for round_ in range(args.repeats):
        order = list(range(len(subjects)))
        if round_ % 2:
            order.reverse()
        for i in order:
            timer = tbench.Timer(stmt="step()", globals={"step": steps[i]}, num_threads=torch.get_num_threads())
            times[i].append(timer.timeit(1).median)
    rows = []
    batch = subjects[0].x.shape[0]
    for subject, step, samples in zip(subjects, steps, times):
        seconds = statistics.median(samples)
        row: dict[str, Any] = {
            "model": subject.name,
            "mode": mode,
            "time_ms": seconds * 1e3,
            "time_min_ms": min(samples) * 1e3,
            "samples_per_s": batch / seconds,
            "rounds": len(samples),
        }
        if not args.no_memory:
            subject.optimizer.zero_grad(set_to_none=True)
            row["peak_mem_mb"] = common.peak_memory(step, subject.device) / 2**20
        flops = subject.flops(mode)
        row["gflop"] = None if flops is None else flops / 1e9
        row["tflops"] = None if flops is None else flops / seconds / 1e12
        row["mfu_pct"] = None if flops is None or not peak_tflops else 100 * row["tflops"] / peak_tflops
        rows.append(row)
    return rows


def ratios(rows: Sequence[dict[str, Any]], device: torch.device,
           peak_tflops: float | None = None) -> list[dict[str, Any]]:
    """ours / make-a-video per mode, for time and peak memory, with the targets. For a time
    target, also the sustained TFLOP/s our step's FLOPs would need to meet it, and that rate
    as a share of `peak_tflops` (how much of the machine the target asks for)."""
    out = []
    for mode in ("train", "sample"):
        ours = next((r for r in rows if r["model"] == "space_time_unet" and r["mode"] == mode), None)
        theirs = next((r for r in rows if r["model"] == "make-a-video-pytorch" and r["mode"] == mode), None)
        if ours is None or theirs is None:
            continue
        for metric, field in (("time", "time_ms"), ("memory", "peak_mem_mb")):
            if ours.get(field) is None or not theirs.get(field):
                continue
            value = ours[field] / theirs[field]
            goal = TARGETS.get((device.type, mode, metric))
            row = {"mode": mode, "metric": metric, "ours": ours[field], "make_a_video": theirs[field],
                   "ratio": value, "target": goal, "met": None if goal is None else value <= goal}
            if metric == "time" and goal is not None and ours.get("gflop"):
                needs = ours["gflop"] / (goal * theirs["time_ms"])  # GFLOP per ms = TFLOP/s
                row["needs_tflops"] = needs
                row["needs_pct_of_peak"] = 100 * needs / peak_tflops if peak_tflops else None
            out.append(row)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/unet.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="debug presets, tiny input (CPU smoke run)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--modes", nargs="+", choices=("train", "sample"), default=["train", "sample"])
    parser.add_argument("--preset", default=None, help="registry preset (default small; debug with --quick)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--backend", default=None, help="attention backend for our U-Nets")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (default inductor; 'eager' traces without code "
                             "generation, for a fast CPU dry run of the compiled path)")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="skip the make-a-video-pytorch side-by-side")
    parser.add_argument("--repeats", type=int, default=None, help="alternating timing rounds (default 7, quick 2)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="MFU denominator (default: datasheet on known GPUs, a measured matmul on CPU)")
    parser.add_argument("--profile", action="store_true",
                        help="break one step of each model down by kind of work (CPU)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    quick = args.quick
    args.preset = args.preset or ("debug" if quick else "small")
    args.batch = args.batch or (1 if quick else 2)
    args.frames = args.frames or (4 if quick else 8)
    args.size = args.size or (16 if quick else 32)
    args.repeats = args.repeats or (2 if quick else 7)
    if quick and args.threads is None:
        # One thread: a smoke run on a shared machine, where extra threads only spin.
        args.threads = 1
    if args.profile and not str(args.device).startswith("cpu"):
        raise ValueError(f"--profile breaks a step down from CPU self times; got --device {args.device}")
    if args.compare:
        try:
            import make_a_video_pytorch  # noqa: F401
        except ImportError:
            logger.warning("make-a-video-pytorch not installed: no side-by-side comparison")
            args.compare = False
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the U-Net steps, write `<out>/<hardware>-<date>-unet.{csv,json,md}`; returns 0."""
    common.configure_logging()
    args = parse_args(argv)
    device = common.parse_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    toggles = {k: getattr(args, k) for k in ("preset", "backend", "compile", "checkpointing", "channels_last", "bf16")}
    env = {**common.environment(device), **toggles, "batch": args.batch, "frames": args.frames, "size": args.size}
    peak_tflops, peak_source = resolve_peak(device, args)
    env["peak_tflops"] = peak_tflops
    env["peak_source"] = peak_source
    if peak_tflops:
        logger.info("peak %.4f TFLOP/s (%s)", peak_tflops, peak_source)
    rows: list[dict[str, Any]] = []
    breakdown: list[dict[str, Any]] = []
    for model_name in args.models:
        channels = unets.build_config(model_name, preset=args.preset).channels
        shape = (args.batch, channels, args.frames, args.size, args.size)
        subjects = build_subjects(model_name, args, device, shape)
        for mode in args.modes:
            new = measure(subjects, mode, args, peak_tflops)
            if args.profile:
                for subject in subjects:
                    breakdown += step_breakdown(subject, mode, peak_tflops)
            for row in new:
                row.update(toggles)
                logger.info("%-22s %-6s %9.1f ms  %7.2f samples/s  peak %s MB", row["model"], mode,
                            row["time_ms"], row["samples_per_s"],
                            "-" if row.get("peak_mem_mb") is None else f"{row['peak_mem_mb']:.1f}")
            rows += new
        del subjects
    for b in breakdown:
        logger.info("  %-22s %-6s %-26s %8.1f ms %5.1f%%  %7.2f GFLOP%s", b["model"], b["mode"], b["kind"], b["ms"],
                    b["share_pct"], b["gflop"], "" if b["tflops"] is None else
                    f"  {b['tflops'] * 1e3:6.1f} GFLOP/s" + ("" if b["pct_of_peak"] is None else f" ({b['pct_of_peak']:.0f}% of peak)"))
    comparison = ratios(rows, device, peak_tflops)
    for r in comparison:
        goal = "" if r["target"] is None else f"  (target <= {r['target']}: {'met' if r['met'] else 'NOT met'})"
        logger.info("ours / make-a-video, %s %s: %.3f%s", r["mode"], r["metric"], r["ratio"], goal)
        if r.get("needs_tflops") is not None:
            share = "" if r["needs_pct_of_peak"] is None else f", {r['needs_pct_of_peak']:.0f}% of the peak"
            logger.info("  the target needs %.1f GFLOP/s sustained over our step%s",
                        r["needs_tflops"] * 1e3, share)

    stem = common.output_stem(args.out, "unet", device, _dt.date.today().isoformat())
    common.write_csv(rows, stem.with_suffix(".csv"))
    common.write_json({"environment": env, "rows": rows, "comparison": comparison, "breakdown": breakdown},
                      stem.with_suffix(".json"))
    columns = ["model", "mode", "time_ms", "time_min_ms", "samples_per_s", "peak_mem_mb", "gflop", "tflops", "mfu_pct", "rounds"]
    text = ["# U-Net benchmark", "", common.environment_markdown(env), "", "## Steps", "",
            common.markdown_table(rows, columns)]
    if comparison:
        text += ["", "## Ours / make-a-video-pytorch (same config, same weights, alternating rounds)", "",
                 common.markdown_table(comparison, ["mode", "metric", "ours", "make_a_video", "ratio", "target", "met",
                                                    "needs_tflops", "needs_pct_of_peak"])]
    if breakdown:
        text += ["", "## Where one step's time goes (`--profile`: profiler self times, flop_counter FLOPs)", "",
                 common.markdown_table(breakdown, ["model", "mode", "kind", "ms", "share_pct", "gflop", "tflops",
                                                   "pct_of_peak"])]
    stem.with_suffix(".md").write_text("\n".join(text) + "\n")
    logger.info("wrote %s.{csv,json,md}", stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
