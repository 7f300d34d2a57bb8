"""This library's ModelScope / AnimateDiff U-Nets against diffusers' at the same weights.

    python benchmarks/diffusers_unets.py                 # tiny and ModelScope 1.7B, CPU fp32
    python benchmarks/diffusers_unets.py --quick         # tiny only, a few seconds (the test)
    python benchmarks/diffusers_unets.py --device cuda --bf16 --sizes ms-1.7b

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

Time is the median of `--rounds` rounds; peak memory is measured per call
(`benchmarks/common.py: peak_memory`). Targets (issue 15): ours <= 1.0x the time and
<= 0.8x the memory of diffusers. The 1.7B size is `damo-vilab/text-to-video-ms-1.7b`'s
public unet config (below, random weights); it needs about 7 GB for the weights of each
model and much more for a train step, so it is not part of `--quick`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
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


def make_steps(theirs: nn.Module, ours: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
               kind: str, dtype: torch.dtype) -> dict[str, dict[str, Callable[[], Any]]]:
    frames = x.shape[2]
    their_cond = cond.repeat_interleave(frames, 0) if kind == "animatediff" else cond
    autocast = torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def their_call() -> torch.Tensor:
        return theirs(x, t, encoder_hidden_states=their_cond).sample

    def our_call() -> torch.Tensor:
        return ours(x, t, cond=cond)

    def forward(call: Callable[[], torch.Tensor]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode(), autocast:
                return call()
        return run

    def train(model: nn.Module, call: Callable[[], torch.Tensor], is_ours: bool, ckpt: bool) -> Callable[[], Any]:
        params = _temporal_only(model, is_ours)
        opt = torch.optim.AdamW(params, lr=1e-5)
        target = torch.randn_like(x)

        def run() -> Any:
            if is_ours:
                model.enable_gradient_checkpointing(ckpt)
            elif hasattr(model, "enable_gradient_checkpointing") and model._supports_gradient_checkpointing:
                (model.enable_gradient_checkpointing if ckpt else model.disable_gradient_checkpointing)()
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = F.mse_loss(call().float(), target)
            loss.backward()
            opt.step()
            return loss.detach()
        return run

    steps = {
        "forward": {"ours": forward(our_call), "diffusers": forward(their_call)},
        "train": {"ours": train(ours, our_call, True, False), "diffusers": train(theirs, their_call, False, False)},
        "train+ckpt": {"ours": train(ours, our_call, True, True),
                       "diffusers": train(theirs, their_call, False, True)},
    }
    return steps


def run_case(kind: str, size: str, *, batch: int, frames: int, side: int, rounds: int, device: torch.device,
             dtype: torch.dtype, modes: Sequence[str]) -> list[dict[str, Any]]:
    theirs, ours, cond_dim = build_pair(kind, size)
    theirs, ours = theirs.to(device).eval(), ours.to(device).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, frames, side, side, generator=gen).to(device)
    t = torch.tensor([500] * batch, device=device)
    cond = torch.randn(batch, 8, cond_dim, generator=gen).to(device)
    with torch.inference_mode():
        expected = theirs(x, t, encoder_hidden_states=cond.repeat_interleave(frames, 0) if kind == "animatediff"
                          else cond).sample
        diff = float((ours(x, t, cond=cond) - expected).abs().max())
    steps = make_steps(theirs, ours, x, t, cond, kind, dtype)
    rows = []
    for mode in modes:
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
            row[f"{who}_mem_mb"] = memory[who] / 2**20
        row["time_ratio"] = row["ours_ms"] / row["diffusers_ms"]
        row["memory_ratio"] = row["ours_mem_mb"] / row["diffusers_mem_mb"] if row["diffusers_mem_mb"] else None
        diffusers_ckpt = mode == "train+ckpt" and getattr(theirs, "_supports_gradient_checkpointing", False)
        row["diffusers_checkpointed"] = diffusers_ckpt
        row["time_ok"] = row["time_ratio"] <= TARGETS["time"]
        row["memory_ok"] = row["memory_ratio"] is not None and row["memory_ratio"] <= TARGETS["memory"]
        rows.append(row)
        logger.info("%s %s %s: ours %.1f ms / %.1f MB, diffusers %.1f ms / %.1f MB (x%.2f time, x%s memory)",
                    kind, size, mode, row["ours_ms"], row["ours_mem_mb"], row["diffusers_ms"], row["diffusers_mem_mb"],
                    row["time_ratio"], f"{row['memory_ratio']:.2f}" if row["memory_ratio"] else "-")
    return rows


COLUMNS = ("model", "size", "mode", "shape", "dtype", "max_abs_diff", "ours_ms", "diffusers_ms", "time_ratio",
           "ours_mem_mb", "diffusers_mem_mb", "memory_ratio", "diffusers_checkpointed", "time_ok", "memory_ok")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny configs only, 2 rounds, small shapes")
    parser.add_argument("--models", nargs="+", default=["modelscope", "animatediff"],
                        choices=["modelscope", "animatediff"])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "ms-1.7b"], choices=["tiny", "ms-1.7b"])
    parser.add_argument("--modes", nargs="+", default=["forward", "train", "train+ckpt"],
                        choices=["forward", "train", "train+ckpt"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--side", type=int, default=16, help="latent height and width (a multiple of 8)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    common.configure_logging()
    try:
        import diffusers  # noqa: F401
    except ImportError:
        parser.error("this benchmark compares against diffusers: pip install 'spacetime-video[diffusers]'")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.parse_device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.quick:
        args.sizes, args.rounds, args.frames, args.side = ["tiny"], 2, 4, 8
    rows = []
    for kind in args.models:
        for size in args.sizes:
            if kind == "animatediff" and size != "tiny":
                continue
            rows += run_case(kind, size, batch=args.batch, frames=args.frames, side=args.side, rounds=args.rounds,
                             device=device, dtype=dtype, modes=args.modes)
    stem = common.output_stem(args.out, "diffusers-unets", device)
    env = common.environment(device)
    common.write_csv(rows, stem.with_suffix(".csv"))
    common.write_json({"environment": env, "targets": TARGETS, "rows": rows}, stem.with_suffix(".json"))
    report = ["# This library's diffusers-format video U-Nets vs diffusers", "", common.environment_markdown(env), "",
              f"Targets: time ratio <= {TARGETS['time']}, memory ratio <= {TARGETS['memory']} (ours / diffusers).",
              "", common.markdown_table(rows, COLUMNS), ""]
    stem.with_suffix(".md").write_text("\n".join(report))
    logger.info("wrote %s.{csv,json,md}", stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
