"""The command line's cascade-stage commands: `spacetime eval --interp RUN` / `--sr RUN` (a
stage scored on held-out moving digits) and `spacetime sample --cascade base=DIR,...`.
Kept out of `diffusion/cli.py` so that the core commands stay readable; the parser lives there."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffusion.cli import _device, _say


def eval_interpolation(args: argparse.Namespace) -> int:
    """`spacetime eval --interp RUN`: PSNR of the stage and of linear blending, in-between frames."""
    from diffusion import checkpoint as ckpt
    from diffusion.evaluate_interp import evaluate_interpolation_run, interpolation_table

    results = evaluate_interpolation_run(
        args.interp, num_videos=args.num_videos, stride=args.stride, seed=0 if args.seed is None else args.seed,
        sampler=args.sampler, steps=args.steps, batch_size=args.batch_size or 16, weights=args.weights,
        device=_device(args.device), **({} if args.data_seed is None else {"data_seed": args.data_seed}))
    out = Path(args.out) if args.out else Path(results["run"]) / "eval-interp.json"
    ckpt.atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    _say(interpolation_table(results))
    _say(f"\nwrote {out}")
    return 0


def eval_super_resolution(args: argparse.Namespace) -> int:
    """`spacetime eval --sr RUN`: PSNR / SSIM of the stage and of bicubic on held-out digits."""
    from diffusion import checkpoint as ckpt
    from diffusion.evaluate_sr import evaluate_sr_run, sr_results_table

    results = evaluate_sr_run(
        args.sr, num_videos=args.num_videos, data_seed=args.data_seed, seed=args.seed, num_frames=args.num_frames,
        weights=args.weights, device=_device(args.device), batch_size=args.batch_size, sampler=args.sampler,
        steps=args.steps, noise_level=args.noise_level, back_projection=args.back_projection)
    out = Path(args.out) if args.out else Path(results["run"]) / "eval_sr.json"
    ckpt.atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    _say(f"held-out moving digits: data seed {results['data_seed']} (training: {results['train_data_seed']})")
    _say(sr_results_table(results))
    _say(f"\nwrote {out}")
    return 0
