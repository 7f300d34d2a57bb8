"""Temporal-only training of a pretrained 2D U-Net: `spacetime.inflate` beside diffusers'
AnimateDiff path (`UNetMotionModel.from_unet2d` with a `MotionAdapter` at the same channels).

    python benchmarks/inflate.py --quick                         # tiny U-Net, CPU smoke run
    python benchmarks/inflate.py                                 # SD-1.5 size, CPU fp32, (1, 4, 8, 16, 16)
    python benchmarks/inflate.py --device cuda --bf16 --frames 16 --size 64   # GPU, bf16

Both start from the same `UNet2DConditionModel` (Stable Diffusion 1.5's public config, random
weights; nothing is downloaded). Only the temporal layers train (the 2D weights frozen, as
AnimateDiff trains its motion modules). One training step: forward on latents
`(B, 4, F, H, W)` with text tokens `(B, 77, 768)`, an MSE loss, backward and an AdamW step.
Per model and with / without gradient checkpointing: the median step time, the peak memory
of a step above what is allocated before it (of the first step, which also allocates AdamW's
state, and of a later one), trainable parameters, and time and memory per million trainable parameters (the two
add different temporal layers). Models are built, measured and freed one after the other in
this process, so only one is in memory at a time.

Writes `<out>/<hardware>-<date>-inflate.{csv,json,md}`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

logger = logging.getLogger("benchmarks.inflate")

# Stable Diffusion 1.5's `unet/config.json` (runwayml/stable-diffusion-v1-5), the fields that
# shape the network.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    cross_attention_dim=32, attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
)
MODELS = ("inflate", "animatediff")


def build(name: str, config: dict[str, Any], quick: bool) -> torch.nn.Module:
    """The video U-Net `name` from a fresh random 2D U-Net of `config`, temporal-only trainable."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    from spacetime import inflate

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config)
    if name == "inflate":
        model = inflate(unet, heads=2 if quick else 8, dim_head=8 if quick else 64)
        temporal = {id(p) for p in model.temporal_parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in temporal)
        return model
    # AnimateDiff's motion adapter at the U-Net's channels (its defaults are SD-1.5's).
    adapter_options: dict[str, Any] = {"block_out_channels": tuple(config["block_out_channels"])}
    if quick:
        adapter_options.update(motion_layers_per_block=config["layers_per_block"], motion_num_attention_heads=2,
                               motion_norm_num_groups=8, motion_mid_block_layers_per_block=1)
    model = UNetMotionModel.from_unet2d(unet, MotionAdapter(**adapter_options))
    del unet
    model.freeze_unet2d_params()
    return model


def step_fn(name: str, model: torch.nn.Module, shape: tuple[int, ...], context: int, dtype: torch.dtype,
            device: torch.device) -> Callable[[], None]:
    b, c, f, h, w = shape
    torch.manual_seed(1)
    latents = torch.randn(shape, device=device)
    tokens = torch.randn(b, 77, context, device=device)
    if name == "animatediff":  # UNetMotionModel takes its tokens per frame
        tokens = tokens.repeat_interleave(f, dim=0)
    target = torch.randn(shape, device=device)
    t = torch.tensor([500] * b, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> None:
        with autocast:
            # Both take (B, C, F, H, W) latents and return that layout.
            out = model(latents, t, encoder_hidden_states=tokens).sample
            loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(name: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    config = TINY_UNET if args.quick else SD15_UNET
    shape = (args.batch, 4, args.frames, args.size, args.size)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = build(name, config, args.quick).to(device)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    rows = []
    for checkpointing in (False, True):
        if checkpointing:
            model.enable_gradient_checkpointing()
        step = step_fn(name, model, shape, config["cross_attention_dim"], dtype, device)
        # The first step also allocates AdamW's state; later steps reuse it.
        first_peak = common.peak_memory(step, device)
        peak = common.peak_memory(step, device)
        seconds = common.measure_time(step, min_run_time=args.min_run_time)
        rows.append({
            "model": name, "checkpointing": checkpointing, "shape": "x".join(map(str, shape)),
            "dtype": str(dtype).replace("torch.", ""), "trainable_m": trainable / 1e6, "total_m": total / 1e6,
            "step_s": seconds, "peak_mem_mb": peak / 2**20, "first_step_peak_mb": first_peak / 2**20,
            "s_per_m_trainable": seconds / (trainable / 1e6), "mb_per_m_trainable": peak / 2**20 / (trainable / 1e6),
        })
        logger.info("%-12s checkpointing=%-5s %8.3f s/step  peak %9.1f MB  trainable %.1fM of %.1fM",
                    name, checkpointing, seconds, peak / 2**20, trainable / 1e6, total / 1e6)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def comparison(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """inflate / AnimateDiff per setting, and the target: inflate with checkpointing at most
    0.5x AnimateDiff's peak step memory (AnimateDiff as diffusers ships it, no checkpointing)
    at no more step time."""
    by = {(r["model"], r["checkpointing"]): r for r in rows}
    out = []
    for ckpt in (False, True):
        ours, theirs = by[("inflate", ckpt)], by[("animatediff", ckpt)]
        out.append({"setting": f"both checkpointing={ckpt}", "time_ratio": ours["step_s"] / theirs["step_s"],
                    "memory_ratio": ours["peak_mem_mb"] / theirs["peak_mem_mb"],
                    "trainable_ratio": ours["trainable_m"] / theirs["trainable_m"]})
    ours, theirs = by[("inflate", True)], by[("animatediff", False)]
    memory, time = ours["peak_mem_mb"] / theirs["peak_mem_mb"], ours["step_s"] / theirs["step_s"]
    out.append({"setting": "target: inflate+ckpt vs animatediff", "time_ratio": time, "memory_ratio": memory,
                "trainable_ratio": ours["trainable_m"] / theirs["trainable_m"], "met": memory <= 0.5 and time <= 1.0})
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/inflate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny U-Net and input (CPU smoke run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=16, help="latent height and width")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds of timing per case")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.frames, args.size = min(args.frames, 2), min(args.size, 8)
    if args.min_run_time is None:
        args.min_run_time = 0.05 if args.quick else 1.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    common.configure_logging()
    args = parse_args(argv)
    device = common.parse_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import diffusers

    env = {**common.environment(device), "diffusers": diffusers.__version__, "quick": args.quick}
    rows = [row for name in MODELS for row in measure(name, args, device)]
    ratios = comparison(rows)
    for r in ratios:
        logger.info("%-40s time %.2fx  memory %.2fx  trainable %.2fx%s", r["setting"], r["time_ratio"],
                    r["memory_ratio"], r["trainable_ratio"],
                    "" if "met" not in r else f"  ({'met' if r['met'] else 'NOT met'})")
    stem = common.output_stem(args.out, "inflate" + ("-quick" if args.quick else ""), device,
                              _dt.date.today().isoformat())
    common.write_csv(rows, stem.with_suffix(".csv"))
    common.write_json({"environment": env, "rows": rows, "comparison": ratios}, stem.with_suffix(".json"))
    columns = ["model", "checkpointing", "shape", "dtype", "trainable_m", "step_s", "peak_mem_mb", "first_step_peak_mb",
               "s_per_m_trainable", "mb_per_m_trainable"]
    text = ["# Temporal-only training step: inflate vs AnimateDiff (UNetMotionModel)", "",
            common.environment_markdown(env), "", common.markdown_table(rows, columns), "",
            common.markdown_table(ratios, ["setting", "time_ratio", "memory_ratio", "trainable_ratio", "met"]), ""]
    stem.with_suffix(".md").write_text("\n".join(text))
    logger.info("wrote %s.{csv,json,md}", stem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
