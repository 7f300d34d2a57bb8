"""The long-video options of `spacetime sample` and `spacetime eval` (`diffusion.long_video`,
`diffusion.evaluate_long`), kept here so that `diffusion.cli` holds one call per command.

    spacetime sample --checkpoint RUN --frames 32                      # sliding windows, any U-Net
    spacetime sample --checkpoint RUN --frames 32 --long extend --context 4   # a frame_cond U-Net
    spacetime eval RUN/samples --window 8 --window-stride 4            # direction and shape per window
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from diffusion.long_video import LONG_METHODS, WINDOW_WEIGHTS, has_frame_cond

__all__ = ["add_eval_arguments", "add_sample_arguments", "evaluate", "sample_options", "sample_videos"]

logger = logging.getLogger(__name__)


def add_sample_arguments(sample: argparse.ArgumentParser) -> None:
    from diffusion.cli import _positive_int

    sample.add_argument("--frames", type=_positive_int,
                        help="frames per video for a run; beyond its trained length, sampled as a long video (--long)")
    sample.add_argument("--long", choices=LONG_METHODS,
                        help="long videos: window (sliding windows with fused overlaps, any U-Net; default) or "
                             "extend (autoregressive, a frame_cond U-Net)")
    sample.add_argument("--context", type=_positive_int,
                        help="--long extend: frames each new window is conditioned on (default half the trained length)")
    sample.add_argument("--window-stride", type=_positive_int,
                        help="--long window: frames between window starts (default half the trained length)")
    sample.add_argument("--window-weights", choices=WINDOW_WEIGHTS, default="triangular",
                        help="--long window: weights of a window's frames where windows overlap (default triangular)")


def add_eval_arguments(evaluate_parser: argparse.ArgumentParser) -> None:
    from diffusion.cli import _positive_int

    evaluate_parser.add_argument("--window", type=_positive_int,
                                 help="long videos: score per window of this many frames (the trained length)")
    evaluate_parser.add_argument("--window-stride", type=_positive_int,
                                 help="with --window: frames between window starts (default: the window)")


def sample_options(args: argparse.Namespace, diffusion: Any) -> dict[str, Any] | None:
    """`sample_long` options for `--frames N`, `{"num_frames": N}` within the trained length,
    or None without `--frames`; a one-line usage error for options that do not fit."""
    from diffusion.cli import UsageError

    if args.frames is None:
        if args.long is not None or args.context is not None or args.window_stride is not None:
            raise UsageError("--long, --context and --window-stride go with --frames N (a video longer than "
                             "the run's trained length)")
        return None
    if args.pretrained is not None:
        raise UsageError("--frames goes with --checkpoint; a --pretrained pipeline takes --num-frames")
    trained = diffusion.num_frames
    method = args.long or "window"
    if args.context is not None and method != "extend":
        raise UsageError("--context goes with --long extend (the frames each new window is conditioned on)")
    if args.window_stride is not None and method != "window":
        raise UsageError("--window-stride goes with --long window (frames between the starts of the windows)")
    if args.context is not None and not 1 <= args.context < trained:
        raise UsageError(f"--context must lie in [1, {trained - 1}] for this run (trained on {trained} frames), "
                         f"got {args.context}")
    if args.window_stride is not None and args.window_stride > trained:
        raise UsageError(f"--window-stride must be at most the run's trained length {trained}, "
                         f"got {args.window_stride}")
    if method == "extend" and has_frame_cond(diffusion) is False:
        raise UsageError("--long extend needs a U-Net trained with frame_cond: true (conditioned on known frames); "
                         "this run's has none: use --long window")
    if args.frames <= trained:
        logger.info("--frames %d is within the trained length %d: plain sampling", args.frames, trained)
        return {"num_frames": args.frames}
    options: dict[str, Any] = {"method": method, "num_frames": args.frames}
    if method == "extend":
        options["context"] = args.context
    else:
        options.update(stride=args.window_stride, weights=args.window_weights)
    return options


def sample_videos(diffusion: Any, kwargs: dict[str, Any], options: dict[str, Any] | None) -> Any:
    """One batch of `spacetime sample`: `diffusion.sample(**kwargs)`, or a long video."""
    if options is None:
        return diffusion.sample(**kwargs)
    if "method" not in options:
        return diffusion.sample(**kwargs, **options)
    from diffusion.long_video import sample_long

    return sample_long(diffusion, **kwargs, **options)


def evaluate(args: argparse.Namespace) -> tuple[dict[str, Any], str] | None:
    """`spacetime eval --window W`: (results, table) of the per-window scores, or None
    without `--window` (the whole-video scores apply)."""
    from diffusion.cli import UsageError

    if args.window is None:
        if args.window_stride is not None:
            raise UsageError("--window-stride goes with --window W (per-window scores of long videos)")
        return None
    from diffusion.evaluate_long import evaluate_long_folder, long_results_table

    if args.window < 2:
        raise UsageError(f"--window must be at least 2 frames (a direction needs two), got {args.window}")
    results = evaluate_long_folder(args.folder, window=args.window, stride=args.window_stride)
    return results, long_results_table(results)
