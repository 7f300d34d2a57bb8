"""Sample quality against sampling steps, per sampler, on a moving-digits run.

    python benchmarks/samplers.py --checkpoint runs/demo-a                 # the full table
    python benchmarks/samplers.py --checkpoint runs/demo-a --samplers dpmpp_2m,ddim --steps 10,20,50
    python benchmarks/samplers.py --quick                                   # smoke run, tiny untrained model

For every (sampler, steps) the run's captions (its `sample.captions`, cycled up to
`--num-samples` videos) are sampled with the same seed and guidance, scored with
`diffusion.evaluate.evaluate_videos` (direction, digit and joint accuracy with 95% intervals,
shape consistency) and timed (wall seconds for all the videos, and seconds per caption batch).
Guidance runs as one batched U-Net call per step; `--baseline` adds the reference the issue
compares against: DDIM at 50 steps with the two-call guidance sampling used before. Each
row reports its time as a fraction of that baseline's.

A FlowMatching run (`diffusion.process: flow`) is sampled with its samplers (euler, heun).
Writes `<hardware>-<date>-samplers.{csv,json,md}` into `--out` and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

logger = logging.getLogger("benchmarks.samplers")

COLUMNS = ["sampler", "steps", "guidance", "direction_accuracy", "digit_accuracy", "joint_accuracy",
           "shape_consistency", "seconds", "seconds_per_batch", "time_vs_baseline"]


def _names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _steps(text: str) -> list[int]:
    try:
        values = [int(item) for item in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps must be comma-separated positive ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--steps must be comma-separated positive ints, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="training run folder or one of its checkpoint-* folders")
    parser.add_argument("--num-samples", type=int, default=64, help="videos per configuration (default 64)")
    parser.add_argument("--steps", type=_steps, default=[5, 10, 15, 20, 50], help="comma-separated step counts")
    parser.add_argument("--samplers", type=_names, default=None,
                        help="comma-separated sampler names (default: every sampler the process takes but ddpm)")
    parser.add_argument("--cond-scale", type=float, default=None, help="guidance scale (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=16, help="videos sampled at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", choices=("ema", "model"), default="ema")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the DDIM 50 two-call guidance reference row")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: a tiny untrained model (or --checkpoint), 2 videos, steps 2,3")
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1:
        parser.error("--num-samples and --batch-size must be positive")
    if args.checkpoint is None and not args.quick:
        parser.error("--checkpoint is required (or --quick for a smoke run on a tiny untrained model)")
    return args


def load_subject(args: argparse.Namespace, device: torch.device) -> tuple[Any, list[str], float, str]:
    """(process, captions, guidance scale, what it is) for the run or the quick stand-in."""
    from diffusion.config import RunConfig
    from diffusion.presets import get_preset
    from diffusion.run import build_diffusion, open_run

    if args.checkpoint is not None:
        run = open_run(args.checkpoint, args.weights, device=device)
        config, diffusion, name = run.config, run.diffusion, str(run.checkpoint)
    else:
        config = RunConfig.from_dict(get_preset("debug"))
        torch.manual_seed(args.seed)
        diffusion = build_diffusion(config).to(device).eval()
        name = "untrained debug preset"
    captions = list(config.sample.captions)
    if not captions:
        from diffusion.presets import DEMO_CAPTIONS

        captions = list(DEMO_CAPTIONS)
    cond_scale = config.sample.cond_scale if args.cond_scale is None else args.cond_scale
    return diffusion, captions, float(cond_scale), name


def run_case(diffusion: Any, captions: list[str], *, sampler: str, steps: int, cond_scale: float, seed: int,
             batch_size: int, batched_guidance: bool) -> tuple[torch.Tensor, float, int]:
    """(videos in [0, 1] on the CPU, wall seconds, batches)."""
    generator = torch.Generator().manual_seed(seed)
    videos, seconds, batches = [], 0.0, 0
    for first in range(0, len(captions), batch_size):
        chunk = captions[first : first + batch_size]
        start = time.perf_counter()
        with torch.no_grad():
            out = diffusion.sample(cond=chunk, cond_scale=cond_scale, sampler=sampler, steps=steps,
                                   generator=generator, batched_guidance=batched_guidance)
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        seconds += time.perf_counter() - start
        batches += 1
        videos.append(out.float().clamp(0, 1).cpu())
    return torch.cat(videos), seconds, batches


def main(argv: Sequence[str] | None = None) -> int:
    common.configure_logging()
    args = parse_args(argv)
    from diffusion.evaluate import evaluate_videos
    from diffusion.flow import FlowMatching

    device = common.parse_device(args.device)
    diffusion, captions, cond_scale, name = load_subject(args, device)
    if args.quick:
        args.num_samples = min(args.num_samples, 2)
        args.steps = [2, 3]
    allowed = tuple(diffusion.samplers)
    samplers = args.samplers or [s for s in allowed if s != "ddpm"]
    if args.quick and args.samplers is None:
        samplers = samplers[:3]
    unknown = [s for s in samplers if s not in allowed]
    if unknown:
        raise SystemExit(f"samplers.py: error: unknown sampler(s) {unknown} for this process; allowed: {allowed}")
    captions = [captions[i % len(captions)] for i in range(args.num_samples)]

    cases: list[tuple[str, int, bool]] = []
    if args.baseline and "ddim" in allowed:
        cases.append(("ddim", 3 if args.quick else 50, False))
    cases += [(sampler, steps, True) for sampler in samplers for steps in args.steps]
    logger.info("%s: %d configurations x %d videos, guidance %.1f", name, len(cases), len(captions), cond_scale)

    rows: list[dict[str, Any]] = []
    baseline_seconds = None
    for sampler, steps, batched in cases:
        if not isinstance(diffusion, FlowMatching) and steps > diffusion.num_timesteps:
            logger.info("skipping %s at %d steps: more than the run's %d timesteps", sampler, steps,
                        diffusion.num_timesteps)
            continue
        videos, seconds, batches = run_case(
            diffusion, captions, sampler=sampler, steps=steps, cond_scale=cond_scale, seed=args.seed,
            batch_size=args.batch_size, batched_guidance=batched,
        )
        scores = evaluate_videos(videos, captions)
        if not batched and baseline_seconds is None:
            baseline_seconds = seconds
        rows.append({
            "sampler": sampler,
            "steps": steps,
            "guidance": "batched" if batched else "two calls (baseline)",
            "direction_accuracy": scores["direction_accuracy"],
            "digit_accuracy": scores["digit_accuracy"],
            "joint_accuracy": scores["joint_accuracy"],
            "shape_consistency": scores["shape_consistency"],
            "direction_interval": scores["intervals"]["direction_accuracy"],
            "digit_interval": scores["intervals"]["digit_accuracy"],
            "seconds": seconds,
            "seconds_per_batch": seconds / batches,
            "time_vs_baseline": None if baseline_seconds is None else seconds / baseline_seconds,
        })
        logger.info("%-16s %3d steps: direction %.3f digit %.3f in %.1f s", sampler, steps,
                    scores["direction_accuracy"], scores["digit_accuracy"], seconds)

    env = common.environment(device)
    stem = common.output_stem(Path(args.out), "samplers" + ("-quick" if args.quick else ""), device)
    table = common.markdown_table(rows, COLUMNS)
    report = "\n".join([
        f"# Samplers: quality against steps ({name})", "",
        f"{len(captions)} videos per row (the run's captions, cycled), seed {args.seed}, guidance {cond_scale}, "
        f"batch {args.batch_size}. Accuracies from diffusion.evaluate (95% intervals in the JSON).", "",
        table, "", "## Environment", "", common.environment_markdown(env), "",
    ])
    common.write_csv(rows, stem.with_suffix(".csv"))
    common.write_json({"subject": name, "cond_scale": cond_scale, "seed": args.seed, "rows": rows,
                       "environment": env}, stem.with_suffix(".json"))
    stem.with_suffix(".md").write_text(report)
    print(table)
    print(f"\nwrote {stem}.{{csv,json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
