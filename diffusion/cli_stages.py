"""The command line's cascade-stage commands: `spacetime eval --interp RUN` / `--sr RUN` (a
stage scored on held-out moving digits) and `spacetime sample --cascade base=DIR,...`.
Their options and handlers are kept out of `diffusion/cli.py` so that the core commands stay
readable; `build_parser` there calls `add_sample_arguments` / `add_eval_arguments`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_sample_arguments(sample: argparse.ArgumentParser) -> None:
    """`spacetime sample --cascade ... [--stage-option STAGE.KEY=VALUE]`."""
    sample.add_argument("--cascade", metavar="base=DIR[,interp=DIR][,sr=DIR]",
                        help="sample a cascade of runs: base -> frame interpolation -> super-resolution")
    sample.add_argument("--stage-option", action="append", metavar="STAGE.KEY=VALUE",
                        help="--cascade: one stage's sampler / steps / cond_scale / eta / noise_level / back_projection")


def add_eval_arguments(evaluate: argparse.ArgumentParser) -> None:
    """`spacetime eval --interp RUN` / `--sr RUN` and their options."""
    from diffusion.cli import _non_negative_float, _non_negative_int, _positive_int, _seed
    from diffusion.config import sampler_names

    evaluate.add_argument("--interp", metavar="RUN", help="frame-interpolation run folder (or checkpoint) to score")
    evaluate.add_argument("--sr", metavar="RUN", help="super-resolution run folder (or checkpoint) to score")
    evaluate.add_argument("--num-videos", type=_positive_int, default=32, help="--interp / --sr: held-out videos")
    evaluate.add_argument("--stride", type=_positive_int, default=4, help="--interp: every STRIDE-th frame given")
    evaluate.add_argument("--data-seed", type=_seed,
                          help="--interp / --sr: seed of the held-out videos (default: not the run's data.seed)")
    evaluate.add_argument("--seed", type=_seed, help="--interp / --sr: sampling seed (default 0 / the run's)")
    evaluate.add_argument("--num-frames", type=_positive_int,
                          help="--interp / --sr: frames per video (default the run's; --interp: STRIDE * (F - 1) + 1)")
    evaluate.add_argument("--speed", type=_non_negative_float, metavar="S",
                          help="--interp: every video at S px per output frame, given frames STRIDE * S px apart "
                               "(default: the run's data.speed / data.speeds)")
    evaluate.add_argument("--sampler", choices=sampler_names(), help="--interp / --sr: default the run's sample.sampler")
    evaluate.add_argument("--steps", type=_positive_int, help="--interp / --sr: default the run's sample.steps")
    evaluate.add_argument("--noise-level", type=_non_negative_float,
                          help="--sr: augmentation level of the condition (default the run's sample_noise_level)")
    evaluate.add_argument("--back-projection", type=_non_negative_int, default=0, metavar="N",
                          help="--sr: N steps of back-projection onto the low-res input (default 0)")
    evaluate.add_argument("--batch-size", type=_positive_int, help="--interp / --sr: videos sampled at once")
    evaluate.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA (default) or raw weights")


def eval_interpolation(args: argparse.Namespace) -> int:
    """`spacetime eval --interp RUN`: PSNR of the stage and of linear blending, in-between frames."""
    from diffusion import checkpoint as ckpt
    from diffusion.cli import UsageError, _device, _say
    from diffusion.evaluate_interp import evaluate_interpolation_run, interpolation_table

    window = None
    if args.window is not None:
        # --window counts frames (as for long videos): the stage's trained length, e.g. 9
        if args.window < args.stride + 1 or (args.window - 1) % args.stride:
            raise UsageError(f"--interp --window counts frames, STRIDE * (K - 1) + 1 for K >= 2 given frames "
                             f"(e.g. {2 * args.stride + 1} at stride {args.stride}); got {args.window}")
        window = (args.window - 1) // args.stride + 1
    results = evaluate_interpolation_run(
        args.interp, num_videos=args.num_videos, stride=args.stride, seed=0 if args.seed is None else args.seed,
        sampler=args.sampler, steps=args.steps, batch_size=args.batch_size or 16, weights=args.weights,
        device=_device(args.device), speed=args.speed, num_frames=args.num_frames, window=window,
        **({} if args.data_seed is None else {"data_seed": args.data_seed}))
    out = Path(args.out) if args.out else Path(results["run"]) / "eval-interp.json"
    ckpt.atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    _say(interpolation_table(results))
    _say(f"\nwrote {out}")
    return 0


def eval_super_resolution(args: argparse.Namespace) -> int:
    """`spacetime eval --sr RUN`: PSNR / SSIM of the stage and of bicubic on held-out digits."""
    from diffusion import checkpoint as ckpt
    from diffusion.cli import _device, _say
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


def sample_cascade(args: argparse.Namespace) -> int:
    """`spacetime sample --cascade base=DIR,interp=DIR,sr=DIR`: each stage from its run, with the
    run's `sample:` defaults, then `--sampler / --steps / --cond-scale / --eta` for every stage,
    then `--stage-option STAGE.KEY=VALUE` for one."""
    import time

    import torch

    from diffusion import checkpoint as ckpt
    from diffusion import media
    from diffusion.cascade import Cascade, parse_cascade_spec, parse_stage_option
    from diffusion.cli import UsageError, _device, _read_prompts, _say, prepare_sample_folder, sample_stems
    from diffusion.run import CONFIG_NAME, find_checkpoint, read_run_config

    if args.checkpoint is not None or args.pretrained is not None:
        raise UsageError("--cascade names every stage's run itself; leave out --checkpoint and --pretrained")
    if args.num_frames is not None or args.image_size is not None:
        raise UsageError("--num-frames and --image-size go with --pretrained; a cascade samples at its stages' sizes")
    try:
        folders = parse_cascade_spec(args.cascade)
        changes = [parse_stage_option(text) for text in args.stage_option or []]
    except ValueError as err:
        raise UsageError(str(err)) from None
    for name, folder in folders.items():
        if not Path(folder).exists():
            raise UsageError(f"--cascade {name}={folder} does not exist")
    common = {k: v for k, v in (("sampler", args.sampler), ("steps", args.steps), ("cond_scale", args.cond_scale),
                                ("eta", args.eta)) if v is not None}
    options: dict[str, dict] = {name: dict(common) for name in folders}
    for stage, key, value in changes:
        if stage not in folders:
            raise UsageError(f"--stage-option {stage}.{key}: the cascade has no {stage} stage (stages: "
                             f"{', '.join(folders)})")
        options[stage][key] = value
    cascade = Cascade.from_runs(**folders, weights=args.weights, device=_device(args.device), options=options)

    base_config = read_run_config(find_checkpoint(folders["base"])[0] / CONFIG_NAME)
    defaults = base_config.sample
    count = args.num_samples or defaults.num_samples
    batch = args.batch_size or defaults.batch_size
    seed = defaults.seed if args.seed is None else args.seed
    conditional = cascade.is_conditional
    if not conditional and (args.prompt or args.prompts_file):
        raise UsageError("no stage of this cascade takes a caption: leave out --prompt / --prompts-file")
    prompts = _read_prompts(args, base_config) if conditional else []
    if conditional and not prompts:
        raise UsageError("this cascade is text-conditioned: give --prompt TEXT or --prompts-file FILE")
    captions = [p for p in prompts for _ in range(count)] if conditional else [""] * count
    stems = sample_stems(prompts, count) if conditional else [f"{i:03d}-sample" for i in range(count)]

    out = Path(args.out) if args.out else Path(folders["base"]) / "cascade-samples"
    prepare_sample_folder(out, args.overwrite)

    stages = " -> ".join(f"{name} ({o.sampler}, {o.steps or 'default'} steps)" for name, o in cascade.options.items())
    _say(f"cascade: {stages}; {len(captions)} videos of {cascade.num_frames} frames at "
         f"{cascade.image_hw[0]}x{cascade.image_hw[1]}")
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for first in range(0, len(captions), batch):
        chunk = captions[first : first + batch]
        with torch.no_grad():
            videos = cascade.sample(chunk if conditional else None, batch_size=None if conditional else len(chunk),
                                    generator=generator)
        if not torch.isfinite(videos).all():
            raise ValueError("cascade sampling gave non-finite values (NaN or inf); nothing written for this batch")
        for video, caption, stem in zip(videos.float().clamp(0, 1).cpu(), chunk, stems[first : first + batch]):
            media.write_gif(video, out / f"{stem}.gif", fps=defaults.fps)
            if conditional:
                ckpt.atomic_write_text(out / f"{stem}.txt", caption + "\n")
    _say(f"wrote {len(captions)} cascade samples (gif + txt) to {out} in {time.perf_counter() - start:.0f} s")
    return 0

