"""This library's ModelScope / AnimateDiff U-Nets against diffusers' at the same weights.

    python benchmarks/diffusers_unets.py                 # tiny and ModelScope 1.7B, CPU fp32
    python benchmarks/diffusers_unets.py --quick         # tiny only, a few seconds (the test)
    python benchmarks/diffusers_unets.py --device cuda --bf16 --sizes ms-1.7b
    python benchmarks/diffusers_unets.py --separate --models modelscope --sizes ms-1.7b --frames 4 --modes train

Per (model, size): diffusers' `UNet3DConditionModel` (ModelScope) or `UNetMotionModel`
(AnimateDiff, built from a `UNet2DConditionModel` + `MotionAdapter`) with random weights,
and ours from it through `unets.from_diffusers`; first the outputs are compared (max
absolute difference), then, alternating ours / theirs round by round in one process (so the
load of a shared machine hits both alike):

- forward: one U-Net call under `inference_mode` (what each sampler step costs);
- train: a temporal-only step (spatial weights frozen, as AnimateDiff / ModelScope
  fine-tuning does): zero_grad, forward, MSE, backward, AdamW step on the temporal weights;
- train+ckpt: the same with our `enable_gradient_checkpointing()`. diffusers'
  `UNet3DConditionModel` has no checkpointing, so that row is compared with its plain step;
  `UNetMotionModel` has one and uses it.
- train+fused: ours with the AdamW update inside backward (`diffusion.fused_step`, what
  `trainer.optimizer_in_backward` uses: each weight updated and its gradient freed as soon as
  it is complete), against diffusers' plain train step: diffusers ships no trainer, so its
  side is the step a diffusers user writes (`diffusers_side` in the table says so). What
  this row saves is the training loop's, not the U-Net's; a diffusers user could hook the
  same optimizer onto `UNet3DConditionModel` by hand.

Time is the median of `--rounds` rounds; peak memory is measured per call
(`benchmarks/common.py: peak_memory`). Targets (issue 15): ours <= 1.0x the time and
<= 0.8x the memory of diffusers. The 1.7B size is `damo-vilab/text-to-video-ms-1.7b`'s
public unet config (below, random weights); it needs about 7 GB for the weights of each
model and much more for a train step, so it is not part of `--quick`.

`--separate` is for sizes whose two copies do not fit in memory together: the weights are
made once (same seed) and saved to a temporary diffusers folder, then each side runs in its
own process that loads them (diffusers' `from_pretrained`, ours `unets.from_diffusers`), with
the order of the two processes alternating over `--repeats` pairs. A process times `--rounds`
steps after a warm-up and reports, besides the allocator peak of one step, its peak resident
memory over the timed steps (`VmHWM`, reset after loading and warm-up) and its resident
memory before them (the weights, gradients and optimizer state); outputs are compared
through a saved forward output. Only ModelScope has a 1.7B size, so only it runs separate.

Separate processes do not share an allocator, and on Linux glibc's malloc hands every block
above its mmap threshold (at most 32 MiB by default) back to the kernel when freed: the next
one page-faults all of its pages in again. oneDNN reorders a convolution's weight into a
fresh buffer at every call (59 MB for a 1280-channel 3x3 conv), so whether a process happens
to have a large free block in its heap to reuse decides much of that conv's time, whichever
model runs (README, "ModelScope / AnimateDiff vs diffusers"). `--malloc reuse` (the default with
`--separate`) starts both sides' processes with the same `GLIBC_TUNABLES` raising the mmap
and trim thresholds, so both reuse freed memory (what jemalloc / tcmalloc, which PyTorch's
CPU tuning guide recommends, do too); `--malloc default` leaves glibc as it is.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import unets
from benchmarks import common
from diffusion.fused_step import fused_adamw

logger = logging.getLogger("benchmarks.diffusers_unets")

# `damo-vilab/text-to-video-ms-1.7b` unet/config.json (diffusers 0.15 export).
MS_17B = {
    "act_fn": "silu",
    "attention_head_dim": 64,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"],
    "downsample_padding": 1,
    "in_channels": 4,
    "layers_per_block": 2,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 32,
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"],
}

TINY_3D = {
    "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"], "layers_per_block": 1, "norm_num_groups": 8,
    "cross_attention_dim": 32, "attention_head_dim": 8,
}
TINY_2D = {
    "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1, "norm_num_groups": 8,
    "cross_attention_dim": 32, "attention_head_dim": 4,
}
TINY_ADAPTER = {"block_out_channels": [32, 64], "motion_layers_per_block": 1, "motion_num_attention_heads": 4,
                "motion_norm_num_groups": 8, "motion_max_seq_length": 16}

TARGETS = {"time": 1.0, "memory": 0.8}


def _perturb(model: nn.Module, seed: int) -> nn.Module:
    # diffusers zero-inits the last temporal conv and the motion modules' output: move every
    # weight so the temporal layers do real work in both models.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.02)
    return model


def build_pair(kind: str, size: str) -> tuple[nn.Module, nn.Module, int]:
    """(diffusers model, ours, cond dim) at the same weights."""
    import diffusers

    torch.manual_seed(0)
    if kind == "modelscope":
        config = TINY_3D if size == "tiny" else MS_17B
        theirs = _perturb(diffusers.UNet3DConditionModel(**config), 1)
        ours = unets.from_diffusers(theirs)
        return theirs, ours, config["cross_attention_dim"]
    if size != "tiny":
        raise ValueError(f"AnimateDiff is benchmarked at size 'tiny' only, got {size!r}")
    unet = _perturb(diffusers.UNet2DConditionModel(**TINY_2D), 1)
    adapter = _perturb(diffusers.MotionAdapter(**TINY_ADAPTER), 2)
    theirs = diffusers.UNetMotionModel.from_unet2d(unet, adapter)
    ours = unets.from_diffusers(unet, motion_adapter=adapter)
    return theirs, ours, TINY_2D["cross_attention_dim"]


def _temporal_only(model: nn.Module, ours: bool) -> list[nn.Parameter]:
    if ours:
        temporal = {id(p) for p in model.temporal_parameters()}
    else:  # diffusers' temporal modules by name
        temporal = {id(p) for n, p in model.named_parameters()
                    if any(s in n for s in ("temp_convs", "temp_attentions", "transformer_in", "motion_modules"))}
    params = []
    for p in model.parameters():
        p.requires_grad_(id(p) in temporal)
        if id(p) in temporal:
            params.append(p)
    return params


MODES = ("forward", "train", "train+ckpt", "train+fused")
FUSED_NOTE = ("train+fused: ours updates each weight inside backward and frees its gradient at once "
              "(`diffusion.fused_step`, `trainer.optimizer_in_backward`); diffusers' side is its plain train step, "
              "since diffusers ships no trainer. What it saves comes from the training loop, not the U-Net: a "
              "diffusers user could hook the same optimizer onto diffusers' model by hand.")
# What diffusers' side of a row runs, when it is not the same step as ours.
DIFFUSERS_SIDE = {"train+fused": "plain AdamW step (diffusers has no trainer)"}


def side_steps(model: nn.Module, is_ours: bool, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, kind: str,
               dtype: torch.dtype) -> dict[str, Callable[[], Any]]:
    """One model's step per mode: `forward`, `train`, `train+ckpt`, `train+fused` (module
    doc). Diffusers' `train+fused` is its plain `train` step."""
    frames = x.shape[2]
    their_cond = cond.repeat_interleave(frames, 0) if kind == "animatediff" else cond
    autocast = torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def call() -> torch.Tensor:
        return model(x, t, cond=cond) if is_ours else model(x, t, encoder_hidden_states=their_cond).sample

    def forward() -> Any:
        with torch.inference_mode(), autocast:
            return call()

    def train(ckpt: bool, fused: bool = False) -> Callable[[], Any]:
        # Seeded apart from the global generator, which loading a model may or may not use.
        target = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device)
        made: list[torch.optim.Optimizer] = []

        def run() -> Any:
            if is_ours:
                model.enable_gradient_checkpointing(ckpt)
            elif hasattr(model, "enable_gradient_checkpointing") and model._supports_gradient_checkpointing:
                (model.enable_gradient_checkpointing if ckpt else model.disable_gradient_checkpointing)()
            if not made:
                # Made at the first (warm-up) call: the fused optimizer's hooks stay on the
                # parameters, so they must not exist while the other modes are timed.
                params = _temporal_only(model, is_ours)
                made.append(fused_adamw(model, params, lr=1e-5) if fused else torch.optim.AdamW(params, lr=1e-5))
            (opt,) = made
            if fused:
                with opt.backward_steps():
                    with autocast:
                        loss = F.mse_loss(call().float(), target)
                    loss.backward()
                return loss.detach()
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = F.mse_loss(call().float(), target)
            loss.backward()
            opt.step()
            return loss.detach()
        return run

    return {"forward": forward, "train": train(False), "train+ckpt": train(True),
            "train+fused": train(False, fused=is_ours)}


def make_steps(theirs: nn.Module, ours: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
               kind: str, dtype: torch.dtype) -> dict[str, dict[str, Callable[[], Any]]]:
    """`{mode: {"ours": step, "diffusers": step}}`."""
    mine = side_steps(ours, True, x, t, cond, kind, dtype)
    their = side_steps(theirs, False, x, t, cond, kind, dtype)
    return {mode: {"ours": mine[mode], "diffusers": their[mode]} for mode in mine}


def run_case(kind: str, size: str, *, batch: int, frames: int, side: int, rounds: int, device: torch.device,
             dtype: torch.dtype, modes: Sequence[str]) -> list[dict[str, Any]]:
    theirs, ours, cond_dim = build_pair(kind, size)
    theirs, ours = theirs.to(device).eval(), ours.to(device).eval()
    x, t, cond = _inputs(kind, cond_dim, batch=batch, frames=frames, side=side, device=device)
    with torch.inference_mode():
        expected = theirs(x, t, encoder_hidden_states=cond.repeat_interleave(frames, 0) if kind == "animatediff"
                          else cond).sample
        diff = float((ours(x, t, cond=cond) - expected).abs().max())
    steps = make_steps(theirs, ours, x, t, cond, kind, dtype)
    rows = []
    for mode in sorted(modes, key=MODES.index):  # train+fused last (its hooks stay)
        pair = steps[mode]
        for fn in pair.values():  # warm-up (and the optimizer state)
            fn()
        times: dict[str, list[float]] = {"ours": [], "diffusers": []}
        for _ in range(rounds):
            for who, fn in pair.items():
                common._sync(device)
                start = time.perf_counter()
                fn()
                common._sync(device)
                times[who].append(time.perf_counter() - start)
        memory = {who: common.peak_memory(fn, device) for who, fn in pair.items()}
        row = {"model": kind, "size": size, "mode": mode, "shape": f"{batch}x4x{frames}x{side}x{side}",
               "dtype": str(dtype).removeprefix("torch."), "max_abs_diff": diff}
        for who in ("ours", "diffusers"):
            row[f"{who}_ms"] = statistics.median(times[who]) * 1e3
            row[f"{who}_ms_min"], row[f"{who}_ms_max"] = min(times[who]) * 1e3, max(times[who]) * 1e3
            row[f"{who}_mem_mb"] = memory[who] / 2**20
        row["time_ratio"] = row["ours_ms"] / row["diffusers_ms"]
        row["memory_ratio"] = row["ours_mem_mb"] / row["diffusers_mem_mb"] if row["diffusers_mem_mb"] else None
        diffusers_ckpt = mode == "train+ckpt" and getattr(theirs, "_supports_gradient_checkpointing", False)
        row["diffusers_checkpointed"] = diffusers_ckpt
        row["diffusers_side"] = DIFFUSERS_SIDE.get(mode, "same step")
        if mode == "train+ckpt" and not diffusers_ckpt:
            row["diffusers_side"] = "plain step (no checkpointing in this diffusers model)"
        row["time_ok"] = row["time_ratio"] <= TARGETS["time"]
        row["memory_ok"] = row["memory_ratio"] is not None and row["memory_ratio"] <= TARGETS["memory"]
        rows.append(row)
        logger.info("%s %s %s: ours %.1f ms / %.1f MB, diffusers %.1f ms / %.1f MB (x%.2f time, x%s memory)",
                    kind, size, mode, row["ours_ms"], row["ours_mem_mb"], row["diffusers_ms"], row["diffusers_mem_mb"],
                    row["time_ratio"], f"{row['memory_ratio']:.2f}" if row["memory_ratio"] else "-")
    return rows


def _inputs(kind: str, cond_dim: int, *, batch: int, frames: int, side: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, frames, side, side, generator=gen).to(device)
    t = torch.tensor([500] * batch, device=device)
    cond = torch.randn(batch, 8, cond_dim, generator=gen).to(device)
    return x, t, cond


def _status_kib(field: str) -> int | None:
    """A `VmRSS` / `VmHWM` line of /proc/self/status, in KiB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def worker(who: str, folder: Path, result: Path, *, mode: str, batch: int, frames: int, side: int, rounds: int,
           device: torch.device, dtype: torch.dtype) -> None:
    """One side of a `--separate` run: load the saved weights, save one forward output next to
    `result`, time `rounds` steps of `mode` after a warm-up, write a JSON result."""
    import diffusers

    is_ours = who == "ours"
    config = json.loads((folder / "config.json").read_text())
    if is_ours:
        model = unets.from_diffusers(folder)
    else:
        model = diffusers.UNet3DConditionModel.from_pretrained(folder)
    model = model.to(device).eval()
    x, t, cond = _inputs("modelscope", config["cross_attention_dim"], batch=batch, frames=frames, side=side,
                         device=device)
    with torch.inference_mode():
        out = model(x, t, cond=cond) if is_ours else model(x, t, encoder_hidden_states=cond).sample
    torch.save(out.float().cpu(), result.with_suffix(".pt"))
    fn = side_steps(model, is_ours, x, t, cond, "modelscope", dtype)[mode]
    fn()  # warm-up, and the optimizer state
    common._sync(device)
    before = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        common._sync(device)
        times.append(time.perf_counter() - start)
    peak = _status_kib("VmHWM") if reset else None
    row = {"who": who, "times_s": times, "rss_before_mb": None if before is None else before / 1024,
           "peak_rss_mb": None if peak is None else peak / 1024,
           "step_peak_mb": common.peak_memory(fn, device) / 2**20}
    result.write_text(json.dumps(row))


# glibc keeps freed blocks up to 1 GiB for reuse and never trims its heap (module doc).
REUSE_TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967295"


def worker_env(malloc: str) -> dict[str, str]:
    """The environment of both sides' processes for `--malloc` (`default` or `reuse`)."""
    env = dict(os.environ)
    if malloc == "reuse":
        env["GLIBC_TUNABLES"] = ":".join(filter(None, (env.get("GLIBC_TUNABLES"), REUSE_TUNABLES)))
    elif malloc != "default":
        raise ValueError(f"malloc must be 'default' or 'reuse', got {malloc!r}")
    return env


def run_separate(kind: str, size: str, *, batch: int, frames: int, side: int, rounds: int, repeats: int,
                 device: torch.device, dtype: torch.dtype, modes: Sequence[str],
                 threads: int | None, malloc: str = "reuse") -> list[dict[str, Any]]:
    """Ours and diffusers' in separate processes (module doc, `--separate`)."""
    import diffusers

    env = worker_env(malloc)
    if kind != "modelscope":
        raise ValueError(f"--separate runs ModelScope only, got {kind!r}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="diffusers-unets-") as tmp:
        folder = Path(tmp) / "unet"
        torch.manual_seed(0)
        theirs = _perturb(diffusers.UNet3DConditionModel(**(TINY_3D if size == "tiny" else MS_17B)), 1)
        theirs.save_pretrained(folder)
        del theirs
        for mode in modes:
            results: dict[str, list[dict[str, Any]]] = {"ours": [], "diffusers": []}
            for repeat in range(repeats):
                order = ("ours", "diffusers") if repeat % 2 == 0 else ("diffusers", "ours")
                for who in order:
                    result = Path(tmp) / f"{who}-{mode}-{repeat}.json"
                    command = [sys.executable, str(Path(__file__).resolve()), "--worker", who, "--weights",
                               str(folder), "--result", str(result), "--modes", mode, "--batch", str(batch),
                               "--frames", str(frames), "--side", str(side), "--rounds", str(rounds),
                               "--device", str(device)]
                    command += ["--bf16"] if dtype == torch.bfloat16 else []
                    command += ["--threads", str(threads)] if threads else []
                    logger.info("%s %s %s: %s process, pair %d of %d", kind, size, mode, who, repeat + 1, repeats)
                    subprocess.run(command, check=True, env=env)
                    results[who].append(json.loads(result.read_text()))
            outputs = {who: torch.load(Path(tmp) / f"{who}-{mode}-0.pt") for who in results}
            row = {"model": kind, "size": size, "mode": mode, "shape": f"{batch}x4x{frames}x{side}x{side}",
                   "dtype": str(dtype).removeprefix("torch."),
                   "max_abs_diff": float((outputs["ours"] - outputs["diffusers"]).abs().max()),
                   "separate": True, "malloc": malloc}
            for who, runs in results.items():
                times = [s for r in runs for s in r["times_s"]]
                row[f"{who}_ms"] = statistics.median(times) * 1e3
                row[f"{who}_ms_min"], row[f"{who}_ms_max"] = min(times) * 1e3, max(times) * 1e3
                # Every step, process by process in the order run: a shared machine's load shows.
                row[f"{who}_times_s"] = [r["times_s"] for r in runs]
                row[f"{who}_mem_mb"] = max(r["step_peak_mb"] for r in runs)
                for key in ("peak_rss_mb", "rss_before_mb"):
                    values = [r[key] for r in runs if r[key] is not None]
                    row[f"{who}_{key}"] = max(values) if values else None
            row["time_ratio"] = row["ours_ms"] / row["diffusers_ms"]
            row["memory_ratio"] = row["ours_mem_mb"] / row["diffusers_mem_mb"] if row["diffusers_mem_mb"] else None
            rss = (row["ours_peak_rss_mb"], row["diffusers_peak_rss_mb"])
            row["peak_rss_ratio"] = rss[0] / rss[1] if None not in rss else None
            row["diffusers_checkpointed"] = False
            row["diffusers_side"] = DIFFUSERS_SIDE.get(mode, "same step")
            row["time_ok"] = row["time_ratio"] <= TARGETS["time"]
            row["memory_ok"] = row["memory_ratio"] is not None and row["memory_ratio"] <= TARGETS["memory"]
            rows.append(row)
            logger.info("%s %s %s (separate): ours %.0f ms / %.1f MB step / %s MB peak RSS, diffusers %.0f ms / "
                        "%.1f MB / %s MB (x%.2f time, x%.2f memory)", kind, size, mode, row["ours_ms"],
                        row["ours_mem_mb"], row["ours_peak_rss_mb"], row["diffusers_ms"], row["diffusers_mem_mb"],
                        row["diffusers_peak_rss_mb"], row["time_ratio"], row["memory_ratio"] or 0.0)
    return rows


COLUMNS = ("model", "size", "mode", "shape", "dtype", "max_abs_diff", "ours_ms", "ours_ms_min", "ours_ms_max",
           "diffusers_ms", "diffusers_ms_min", "diffusers_ms_max", "time_ratio", "ours_mem_mb", "diffusers_mem_mb",
           "memory_ratio", "diffusers_checkpointed", "diffusers_side", "time_ok", "memory_ok")
SEPARATE_COLUMNS = ("model", "size", "mode", "shape", "dtype", "max_abs_diff", "ours_ms", "ours_ms_min",
                    "ours_ms_max", "diffusers_ms", "diffusers_ms_min", "diffusers_ms_max", "time_ratio",
                    "ours_mem_mb", "diffusers_mem_mb", "memory_ratio", "ours_peak_rss_mb", "diffusers_peak_rss_mb",
                    "peak_rss_ratio", "ours_rss_before_mb", "diffusers_rss_before_mb", "diffusers_side", "malloc",
                    "time_ok", "memory_ok")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny configs only, 2 rounds, small shapes")
    parser.add_argument("--models", nargs="+", default=["modelscope", "animatediff"],
                        choices=["modelscope", "animatediff"])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "ms-1.7b"], choices=["tiny", "ms-1.7b"])
    parser.add_argument("--modes", nargs="+", default=["forward", "train", "train+ckpt"],
                        help=f"of {', '.join(MODES)}; also comma-separated (train,train+fused)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--side", type=int, default=16, help="latent height and width (a multiple of 8)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--separate", action="store_true",
                        help="each side in its own process, loading weights saved once (ModelScope only)")
    parser.add_argument("--repeats", type=int, default=2, help="with --separate: process pairs, order alternating")
    parser.add_argument("--tag", default="", help="appended to the results' file name (e.g. fused)")
    parser.add_argument("--malloc", choices=["reuse", "default"], default="reuse",
                        help="with --separate: both processes keep freed memory for reuse (same GLIBC_TUNABLES), "
                             "or glibc's defaults (module doc)")
    parser.add_argument("--worker", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.modes = [mode for given in args.modes for mode in given.split(",") if mode]
    unknown = [mode for mode in args.modes if mode not in MODES]
    if unknown or not args.modes:
        parser.error(f"--modes takes {', '.join(MODES)}, got {unknown or 'none'}")
    for name in ("rounds", "repeats", "batch", "frames", "side"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    common.configure_logging()
    try:
        import diffusers  # noqa: F401
    except ImportError:
        parser.error("this benchmark compares against diffusers: pip install 'spacetime-video[diffusers]'")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.parse_device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.worker:
        if args.weights is None or args.result is None or len(args.modes) != 1:
            parser.error("--worker needs --weights, --result and one --modes")
        worker(args.worker, args.weights, args.result, mode=args.modes[0], batch=args.batch, frames=args.frames,
               side=args.side, rounds=args.rounds, device=device, dtype=dtype)
        return 0
    if args.quick:
        args.sizes, args.rounds, args.frames, args.side = ["tiny"], 2, 4, 8
        args.repeats = min(args.repeats, 1) if args.separate else args.repeats
    if args.separate and args.models != ["modelscope"]:
        parser.error(f"--separate runs ModelScope only (the one with a 1.7B size): pass --models modelscope, "
                     f"got {args.models}")
    rows = []
    for kind in args.models:
        for size in args.sizes:
            if kind == "animatediff" and size != "tiny":
                continue
            if args.separate:
                rows += run_separate(kind, size, batch=args.batch, frames=args.frames, side=args.side,
                                     rounds=args.rounds, repeats=args.repeats, device=device, dtype=dtype,
                                     modes=args.modes, threads=args.threads, malloc=args.malloc)
            else:
                rows += run_case(kind, size, batch=args.batch, frames=args.frames, side=args.side,
                                 rounds=args.rounds, device=device, dtype=dtype, modes=args.modes)
    name = "diffusers-unets" + (f"-{args.tag}" if args.tag else "") + ("-separate" if args.separate else "")
    stem = common.output_stem(args.out, name, device)
    env = common.environment(device)
    common.write_csv(rows, stem.with_suffix(".csv"))
    common.write_json({"environment": env, "targets": TARGETS, "rows": rows}, stem.with_suffix(".json"))
    report = ["# This library's diffusers-format video U-Nets vs diffusers", "", common.environment_markdown(env), "",
              f"Targets: time ratio <= {TARGETS['time']}, memory ratio <= {TARGETS['memory']} (ours / diffusers).",
              *([] if "train+fused" not in args.modes else ["", FUSED_NOTE]),
              "", common.markdown_table(rows, SEPARATE_COLUMNS if args.separate else COLUMNS), ""]
    stem.with_suffix(".md").write_text("\n".join(report))
    logger.info("wrote %s.{csv,json,md}", stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
