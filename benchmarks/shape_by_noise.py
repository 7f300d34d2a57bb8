"""Where a moving-digits model loses the digit's shape: one-shot x0 from noised real videos.

    python benchmarks/shape_by_noise.py runs/demo runs/demo-long --guidance 4
    python benchmarks/shape_by_noise.py runs/demo --times 30,100,300 --videos 64

Held-out real videos (`MovingDigits` with the run's video shape and `--data-seed`, a seed the
training data does not use) are noised to each timestep t of `--times` with one fixed noise,
and each run's model predicts x0 in one call (its EMA weights, guided with `--guidance` by the
videos' own captions). The table gives the shape consistency of those predictions
(`diffusion.evaluate.shape_consistency`, 1.0 on the real videos) and their mean absolute error
in [0, 1] pixels. Sampling from noise ends with the least noisy steps, so a model whose
prediction already loses the shape at small t cannot keep it in its samples: this separates
the denoiser's accuracy from sampler and guidance settings in seconds rather than minutes.
Prints a Markdown table; `--json` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_TIMES = (30, 100, 200, 300, 500)


def held_out_videos(process: Any, count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """`count` moving-digit videos at the process's shape (digits of half its side, 1 px per
    frame, as the demo trains on) and their captions."""
    from diffusion.moving_digits import MovingDigits

    size = process.image_hw[0]
    data = MovingDigits(num_videos=count, image_size=size, num_frames=process.num_frames, channels=process.channels,
                        digit_size=size // 2, speed=1.0, seed=seed)
    items = [data[i] for i in range(count)]
    return torch.stack([item["video"] for item in items]), [item["caption"] for item in items]


@torch.no_grad()
def shape_by_noise(process: Any, videos: torch.Tensor, captions: Sequence[str] | None, times: Sequence[int], *,
                   guidance: float = 4.0, noise_seed: int = 0) -> list[dict[str, Any]]:
    """One row per timestep: shape consistency (mean over the videos where it is measurable)
    and mean absolute error of the one-shot x0 predictions from `videos` noised to t."""
    from diffusion.evaluate import shape_consistency

    x0 = process.normalize(videos)
    cond = cond_mask = None
    if captions is not None and process.is_conditional:
        cond, cond_mask = process.encode_text(list(captions))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(noise_seed))
    rows = []
    for t in times:
        if not 0 <= t < process.num_timesteps:
            raise ValueError(f"timesteps must lie in [0, {process.num_timesteps}), got {t}")
        tt = torch.full((x0.shape[0],), int(t), dtype=torch.long)
        kwargs = {"cond": cond, "cond_mask": cond_mask, "cond_scale": guidance} if cond is not None else {}
        prediction, _ = process.model_predictions(process.q_sample(x0, tt, noise), tt, **kwargs)
        pixels = process.unnormalize(prediction).clamp(0.0, 1.0)
        shapes = [s for s in (shape_consistency(video) for video in pixels) if s is not None]
        rows.append({"t": int(t), "shape_consistency": float(np.mean(shapes)) if shapes else None,
                     "measured": len(shapes), "mae": float((pixels - videos).abs().mean())})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (or checkpoint folders) of moving-digits models")
    parser.add_argument("--times", default=",".join(map(str, DEFAULT_TIMES)), help="comma-separated timesteps")
    parser.add_argument("--videos", type=int, default=64)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--data-seed", type=int, default=12345)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    try:
        times = [int(part) for part in args.times.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--times must be comma-separated integers, got {args.times!r}")
    if args.videos < 1:
        parser.error(f"--videos must be positive, got {args.videos}")
    torch.set_num_threads(args.threads)
    from diffusion import load_run

    rows = []
    for run in args.runs:
        process = load_run(run, weights="ema")
        videos, captions = held_out_videos(process, args.videos, args.data_seed)
        for row in shape_by_noise(process, videos, captions, times, guidance=args.guidance):
            rows.append({"run": run, **row})
    print(f"One-shot x0 from {args.videos} held-out real videos (data seed {args.data_seed}) noised to t, "
          f"guidance {args.guidance:g}\n")
    print("| run | t | shape consistency | mean abs. error |\n|---|---|---|---|")
    for row in rows:
        shape = "n/a" if row["shape_consistency"] is None else f"{row['shape_consistency']:.3f}"
        print(f"| {row['run']} | {row['t']} | {shape} | {row['mae']:.4f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
