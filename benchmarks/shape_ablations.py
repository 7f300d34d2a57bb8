"""Ablations of the moving-digits demo's shape consistency that need a change the library does
not offer as an option: each is a small patch applied in this process before the run is built,
so every README row that names one can be reproduced.

    python benchmarks/shape_ablations.py run temporal-kernel-5 -- --threads 1 train --preset moving-digits \\
        --out runs/tk5 --set trainer.max_seconds=0 --set trainer.train_num_steps=3000
    python benchmarks/shape_ablations.py score runs/tk5 --patch temporal-kernel-5
    python benchmarks/shape_ablations.py score runs/demo --skip-guidance 0.5
    python benchmarks/shape_ablations.py score runs/first-frame --first-frame

`run PATCH -- ARGS` applies the patch and runs `spacetime ARGS` in this process. Patches
(`run`'s first argument, `score --patch`; `none` changes nothing):

- `temporal-kernel-5`: every resnet block's convs take 5 frames instead of 3;
- `frame-diff-loss`: the loss adds the squared frame-to-frame change of the prediction's error
  (errors that differ between frames, i.e. a shape that changes, weigh more);
- `joint-attention`: every `TemporalAttention` (the temporal step of `SpatioTemporalAttention`)
  attends over all the frames and pixels of a sample (joint space-time attention, no position
  bias) instead of over each pixel's frames;
- `conv3d-16px`: the resnet blocks of the full-resolution level (down and up) use full 3x3x3
  convolutions (the `conv3d` block) instead of pseudo-3D ones; `conv3d-16-8px`: those of the two
  finest levels.

`score` samples the demo's 16 captions `--per-caption` times (DDIM `--steps` 50, `--guidance`, `--seed`),
prints direction, digit and shape consistency with 95% intervals, and the shape correlation by
frame distance (how fast the digit drifts: 1.0 at every distance on real videos). Options:
`--first-frame` (a `frame_cond` run): sample, then sample again with each video's first frame
given (image-to-video), and score both; `--skip-guidance W`: guide away from the same model with
the temporal convs of the two finest levels skipped (spatiotemporal skip guidance, Hyun et al.
2024), `out + W (out - skipped)`.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _temporal_kernel_5() -> None:
    import unets.blocks as blocks

    original = blocks.ResnetBlock.__init__

    def init(self: Any, *args: Any, temporal_kernel_size: int | None = None, **kwargs: Any) -> None:
        original(self, *args, temporal_kernel_size=5 if temporal_kernel_size is None else temporal_kernel_size,
                 **kwargs)

    blocks.ResnetBlock.__init__ = init


def frame_diff_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Elementwise squared change of the error `prediction - target` from each frame to the next,
    zero-padded at the last frame so it has the inputs' shape (B, C, F, H, W)."""
    error = prediction - target
    change = (error[:, :, 1:] - error[:, :, :-1]) ** 2
    return torch.nn.functional.pad(change, (0, 0, 0, 0, 0, 1))


def _frame_diff_loss() -> None:
    from diffusion.gaussian import GaussianDiffusion

    original = GaussianDiffusion._elementwise_loss

    def loss(self: Any, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        value = original(self, prediction, target)
        if prediction.ndim == 5 and self.training:
            value = value + frame_diff_error(prediction, target)
        return value

    GaussianDiffusion._elementwise_loss = loss


def _joint_attention() -> None:
    import spacetime.attention as attention
    from spacetime.time import select_time

    def tokens_forward(self: Any, t: torch.Tensor, enabled: Any) -> torch.Tensor:
        if enabled is False:
            return t
        b, f, h, w, c = t.shape
        updated = t + self.attn(t.reshape(b, f * h * w, c)).view(t.shape)
        return select_time(enabled, updated, t)

    attention.TemporalAttention.tokens_forward = tokens_forward


def _conv3d(count: int) -> None:
    import unets.blocks as blocks
    import unets.space_time_unet as space_time_unet

    original = space_time_unet.SpaceTimeUnet.__init__

    def swap(block: Any) -> Any:
        emb = None if block.emb_proj is None else block.emb_proj.in_features
        return blocks.ResnetBlock(block.block1.project.spatial.in_channels, block.block2.project.spatial.out_channels,
                                  emb_dim=emb, conv="conv3d")

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        for level in (*self.downs[:count], *self.ups[:count]):
            level.init_block = swap(level.init_block)
            for i, block in enumerate(level.blocks):
                level.blocks[i] = swap(block)

    space_time_unet.SpaceTimeUnet.__init__ = init


PATCHES: dict[str, Callable[[], None]] = {
    "none": lambda: None,
    "temporal-kernel-5": _temporal_kernel_5,
    "frame-diff-loss": _frame_diff_loss,
    "joint-attention": _joint_attention,
    "conv3d-16px": functools.partial(_conv3d, 1),
    "conv3d-16-8px": functools.partial(_conv3d, 2),
}


def apply_patch(name: str) -> None:
    if name not in PATCHES:
        raise ValueError(f"unknown patch {name!r}; choose from {sorted(PATCHES)}")
    PATCHES[name]()


def shape_by_lag(videos: Sequence[torch.Tensor]) -> list[float]:
    """Mean correlation of the digit crops (`diffusion.evaluate.digit_features`) of every pair of
    frames, by their distance 1..F-1 (pairs where a frame shows no digit are left out)."""
    from diffusion.evaluate import crop_correlation, digit_features

    frames = videos[0].shape[1]
    totals, counts = np.zeros(frames), np.zeros(frames)
    for video in videos:
        grey = video.detach().float().mean(dim=0).numpy()
        crops = [digit_features(frame) for frame in grey]
        for i in range(frames):
            for j in range(i + 1, frames):
                if crops[i] is not None and crops[j] is not None:
                    totals[j - i] += crop_correlation(crops[i], crops[j])
                    counts[j - i] += 1
    return [float(totals[d] / counts[d]) if counts[d] else float("nan") for d in range(1, frames)]


def skip_guided(unet: Any, weight: float) -> None:
    """Make `unet` return `out + weight * (out - skipped)`, `skipped` being its output with the
    temporal convs of the two finest levels (down and up) bypassed."""
    from spacetime.conv import PseudoConv3d

    state = {"skip": False}
    for level in (*unet.downs[:2], *unet.ups[:2]):
        for module in level.modules():
            if isinstance(module, PseudoConv3d) and module.temporal is not None:
                apply_time = module.temporal.apply_time

                def patched(x: torch.Tensor, enabled: Any, _apply: Any = apply_time) -> torch.Tensor:
                    return x if state["skip"] else _apply(x, enabled)

                module.temporal.apply_time = patched
    forward = unet.forward

    def guided(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = forward(*args, **kwargs)
        state["skip"] = True
        try:
            skipped = forward(*args, **kwargs)
        finally:
            state["skip"] = False
        return out + weight * (out - skipped)

    unet.forward = guided


def _report(tag: str, videos: torch.Tensor, captions: list[str]) -> dict[str, Any]:
    from diffusion.evaluate import evaluate_videos

    result = evaluate_videos(list(videos), captions)
    low, high = result["intervals"]["shape_consistency"]
    lags = shape_by_lag(list(videos))
    print(f"{tag}: direction {result['direction_accuracy']:.1%}, digit {result['digit_accuracy']:.1%}, "
          f"shape {result['shape_consistency']:.3f} ({low:.3f}-{high:.3f}); by frame distance "
          + " ".join(f"{value:.3f}" for value in lags), flush=True)
    return result


def score(args: argparse.Namespace) -> int:
    from diffusion import load_run
    from diffusion.presets import DEMO_CAPTIONS

    process = load_run(args.run, weights="ema")
    if args.skip_guidance:
        skip_guided(process.denoise_fn, args.skip_guidance)
    captions = [caption for caption in DEMO_CAPTIONS for _ in range(args.per_caption)]
    kwargs = dict(cond_scale=args.guidance, sampler="ddim", steps=args.steps)
    videos = process.sample(cond=captions, generator=torch.Generator().manual_seed(args.seed), **kwargs)
    _report("sampled", videos, captions)
    if args.first_frame:
        mask = torch.zeros(videos.shape[0], videos.shape[2], dtype=torch.bool)
        mask[:, 0] = True
        for replace in (True, False):
            again = process.sample(cond=captions, generator=torch.Generator().manual_seed(args.seed + 1),
                                   cond_frames=videos, cond_frame_mask=mask, replace_known=replace, **kwargs)
            _report(f"given the first frame (replace_known={replace})", again, captions)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="apply PATCH, then run `spacetime` with the arguments after --")
    run.add_argument("patch", choices=sorted(PATCHES))
    run.add_argument("spacetime_args", nargs=argparse.REMAINDER)
    scoring = commands.add_parser("score", help="sample the demo captions from RUN and score them")
    scoring.add_argument("run")
    scoring.add_argument("--patch", choices=sorted(PATCHES), default="none", help="the patch RUN was trained with")
    scoring.add_argument("--guidance", type=float, default=4.0)
    scoring.add_argument("--per-caption", type=int, default=4)
    scoring.add_argument("--seed", type=int, default=1)
    scoring.add_argument("--steps", type=int, default=50, help="DDIM steps")
    scoring.add_argument("--first-frame", action="store_true", help="also sample given each video's first frame")
    scoring.add_argument("--skip-guidance", type=float, default=0.0, metavar="W")
    scoring.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = parser.parse_args(argv)
    if args.command == "run":
        apply_patch(args.patch)
        from diffusion.cli import main as cli_main

        rest = args.spacetime_args[1:] if args.spacetime_args[:1] == ["--"] else args.spacetime_args
        return cli_main(rest)
    if args.per_caption < 1 or args.steps < 1:
        parser.error(f"--per-caption and --steps must be >= 1, got {args.per_caption} and {args.steps}")
    torch.set_num_threads(args.threads)
    apply_patch(args.patch)
    return score(args)


if __name__ == "__main__":
    sys.exit(main())
