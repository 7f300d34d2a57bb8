"""Long moving-digits videos: how well each method keeps to the caption beyond the trained length.

    python benchmarks/long_video.py --window-run runs/demo-a --extend-run runs/demo-extend --frames 32
    python benchmarks/long_video.py --quick                     # smoke run, tiny untrained model

Cases (`--cases`, comma-separated):
- `short`: the run's trained length, plain sampling (the reference every long video is held to);
- `window`: `--frames` frames through sliding windows with fused overlaps and FreeNoise's
  rescheduled noise (`diffusion.long_video.sample_long(method="window")`), on `--window-run`;
- `window-no-free-noise`: the same from independent noise (the FreeNoise ablation);
- `extend`: autoregressive extension on `--extend-run` (a `frame_cond` run, e.g. made by
  `benchmarks/train_extend.py`), `--context` frames of context, every window guided by the caption;
- `extend-first-cond`: the same, the caption guiding only the first window (`extend_cond=False`).

Each case samples `--num-samples` videos for the run's captions (cycled) with one seed and
guidance, and scores them with `diffusion.evaluate_long.evaluate_long_videos`: direction
accuracy per window of the trained length under the bounce law, shape consistency within
windows and against the first frame, with 95% intervals, and the scores per window position.
Writes `<hardware>-<date>-long-video[-TAG].{json,md}` into `--out` and prints the Markdown.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

CASES = ("short", "window", "window-no-free-noise", "extend", "extend-first-cond")
COLUMNS = ["case", "run", "frames", "direction_accuracy", "direction_interval", "shape_consistency",
           "shape_interval", "shape_drift", "drift_interval", "seconds"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window-run", help="run for the short and window cases (any U-Net)")
    parser.add_argument("--extend-run", help="run for the extend case (a frame_cond U-Net)")
    parser.add_argument("--cases", default="short,window,extend", help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--frames", type=int, default=32, help="frames per long video (default 32)")
    parser.add_argument("--num-samples", type=int, default=32, help="videos per case (default 32)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--cond-scale", type=float, default=None, help="guidance scale (default: the run's)")
    parser.add_argument("--stride", type=int, default=None, help="window case: frames between windows (default F/2)")
    parser.add_argument("--weights", default="triangular", help="window case: uniform, triangular or cosine")
    parser.add_argument("--context", type=int, default=None, help="extend case: context frames (default F/2)")
    parser.add_argument("--eval-stride", type=int, default=None, help="metric windows' stride (default F/2)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(common.RESULTS_DIR))
    parser.add_argument("--tag", default="", help="suffix of the report's name (long-video-TAG)")
    parser.add_argument("--quick", action="store_true", help="tiny untrained frame_cond model, 2 videos, 2 steps")
    args = parser.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    if not args.quick:
        needs_window = any(not c.startswith("extend") for c in args.cases)
        needs_extend = any(c.startswith("extend") for c in args.cases)
        if needs_window and args.window_run is None or needs_extend and args.extend_run is None:
            parser.error("give --window-run (short, window cases) and --extend-run (extend case), or --quick")
    return args


def _quick_process() -> tuple[Any, list[str], float]:
    from diffusion.config import RunConfig
    from diffusion.presets import get_preset
    from diffusion.run import build_diffusion

    raw = get_preset("debug")
    raw["model"]["frame_cond"] = True
    config = RunConfig.from_dict(raw)
    torch.manual_seed(0)
    return build_diffusion(config).eval(), list(config.sample.captions), float(config.sample.cond_scale)


def _open(path: str, cache: dict[str, Any]) -> tuple[Any, list[str], float]:
    if path not in cache:
        from diffusion.run import open_run

        run = open_run(path)
        cache[path] = (run.diffusion, list(run.config.sample.captions), float(run.config.sample.cond_scale))
    return cache[path]


def run_case(case: str, process: Any, captions: list[str], args: argparse.Namespace,
             cond_scale: float) -> tuple[torch.Tensor, float]:
    from diffusion.long_video import sample_long

    generator = torch.Generator().manual_seed(args.seed)
    frames = process.num_frames if case == "short" else args.frames
    options: dict[str, Any] = {}
    if case.startswith("window"):
        options = {"method": "window", "stride": args.stride, "weights": args.weights,
                   "noise_reschedule": case == "window"}
    elif case.startswith("extend"):
        options = {"method": "extend", "context": args.context, "extend_cond": case == "extend"}
    videos, seconds = [], 0.0
    for first in range(0, len(captions), args.batch_size):
        chunk = captions[first : first + args.batch_size]
        start = time.perf_counter()
        out = sample_long(process, frames, cond=chunk, cond_scale=cond_scale, sampler=args.sampler,
                          steps=args.steps, generator=generator, **options)
        seconds += time.perf_counter() - start
        videos.append(out.float().clamp(0, 1).cpu())
    return torch.cat(videos), seconds


def main(argv: Sequence[str] | None = None) -> int:
    common.configure_logging()
    args = parse_args(argv)
    from diffusion.evaluate_long import evaluate_long_videos, long_results_table

    if args.quick:
        args.num_samples, args.steps = 2, 2
    device = torch.device("cpu")
    cache: dict[str, Any] = {}
    rows, tables, details = [], [], {}
    for case in args.cases:
        if args.quick:
            process, captions, cond_scale = _quick_process()
            run_name = "untrained debug preset (frame_cond)"
            frames = 2 * process.num_frames + 1 if case != "short" else process.num_frames
            args.frames = frames if case != "short" else args.frames
        else:
            run_name = args.extend_run if case.startswith("extend") else args.window_run
            process, captions, cond_scale = _open(run_name, cache)
        cond_scale = cond_scale if args.cond_scale is None else args.cond_scale
        chosen = [captions[i % len(captions)] for i in range(args.num_samples)]
        videos, seconds = run_case(case, process, chosen, args, cond_scale)
        trained = process.num_frames
        stride = args.eval_stride or max(1, trained // 2)
        results = evaluate_long_videos(videos, chosen, window=trained, stride=stride,
                                       digit_size=8 if not args.quick else 4)
        intervals = results["intervals"]
        rows.append({
            "case": case, "run": str(run_name), "frames": videos.shape[2],
            "direction_accuracy": results["direction_accuracy"],
            "direction_interval": "{:.2f}-{:.2f}".format(*intervals["direction_accuracy"]),
            "shape_consistency": results["shape_consistency"],
            "shape_interval": "-" if intervals["shape_consistency"] is None
            else "{:.2f}-{:.2f}".format(*intervals["shape_consistency"]),
            "shape_drift": results["shape_drift"],
            "drift_interval": "-" if intervals["shape_drift"] is None else "{:.2f}-{:.2f}".format(*intervals["shape_drift"]),
            "seconds": round(seconds, 1),
        })
        details[case] = results
        tables.append(f"### {case}\n\n" + long_results_table(results))
    env = common.environment(device)
    command = "python benchmarks/long_video.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = "\n\n".join([
        "# Long moving-digits videos: per-window direction and shape",
        f"Command: `{command}`",
        f"Sampler {args.sampler}, {args.steps} steps, {args.num_samples} videos per case, seed {args.seed}.",
        common.markdown_table(rows, COLUMNS),
        *tables,
        "## Environment\n\n" + common.environment_markdown(env),
    ]) + "\n"
    stem = common.output_stem(Path(args.out), "long-video" + (f"-{args.tag}" if args.tag else ""), device)
    common.write_json({"rows": rows, "details": details, "environment": env, "command": command},
                      stem.with_suffix(".json"))
    stem.with_suffix(".md").write_text(report, encoding="utf-8")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
