"""The `spacetime` command line: train, sample, eval, data, bench.

    spacetime train --preset moving-digits --out runs/demo [--set trainer.train_lr=3e-4] [--resume]
    spacetime train --config run.yaml --out runs/mine --device cuda
    spacetime sample --checkpoint runs/demo --prompt "the digit 3 moving up" --sampler ddim --steps 50
    spacetime sample --pretrained models/zeroscope --prompt "a cat surfing" --num-frames 16 --out samples
    spacetime eval runs/demo/samples --out runs/demo/eval.json
    spacetime data moving-digits --out data/digits --num-videos 64
    spacetime bench attention [ARGS...]

A training run folder holds the resolved configuration (`config.json`, which `--config`
reads back), the Trainer's checkpoints (`checkpoint-*/`, `latest`), `metrics.jsonl`,
`loss.png` and sample-grid GIFs. `spacetime sample --checkpoint RUN` opens it with
`diffusion.load_run` (EMA weights of the latest checkpoint by default); `spacetime sample
--pretrained DIR` samples a local diffusers text-to-video pipeline folder as it is
(`diffusion.pretrained_video.open_pretrained`).

`--preset` names a run preset (`diffusion.presets`); a U-Net preset is the config key
`unet_preset` (`--set unet_preset=NAME`).

Every user or environment error (an invalid setting, a missing, unreadable, unwritable or
corrupt file, a full disk, a non-finite loss) prints one line, `spacetime: error: ...`,
naming the key or file, and exits with status 2; `--traceback` shows the traceback. Any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import runpy
import sys
import time
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffusion import cli_long as long_video_cli
from diffusion import cli_stages as stages_cli
from diffusion.config import (
    MAX_SEED,
    ConfigError,
    RunConfig,
    SampleConfig,
    TrainerConfig,
    check_sample_kwargs,
    sampler_names,
)
from diffusion.config_io import apply_overrides, load_config_file, merge
from diffusion.run import (
    CONFIG_NAME,
    build_dataset,
    build_diffusion,
    latest_checkpoint,
    open_run,
    read_run_config,
    resume_conflicts,
    run_traces,
)
from unets import guards

logger = logging.getLogger(__name__)

BENCHMARKS = ("attention", "unet")
MAX_NAME_LENGTH = 80
MAX_PROMPTS_BYTES = 1 << 20
SAMPLE_STEPS = 50  # sampling steps when neither --steps nor the run's sample.steps says
_SAMPLE_FILE = re.compile(r"^\d{3,}-[a-z0-9-]+\.(gif|txt)$")


class UsageError(ValueError):
    """A command-line mistake (missing file, conflicting options): printed without a traceback."""


def _is_main_process() -> bool:
    # Under torchrun every rank runs this same command; only rank 0 speaks and writes run files.
    return os.environ.get("RANK", "0") == "0"


def _say(text: str = "") -> None:
    # The command line's results go to stdout; progress and diagnostics go through logging.
    if not _is_main_process():
        return
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------
# file names from prompts


def prompt_slug(prompt: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """A file-name-safe form of `prompt`: ASCII letters and digits joined by '-', lower
    case, at most `max_length` characters; "sample" when nothing is left. Separators,
    dots and control characters never survive, so the result cannot leave a folder."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    slug = slug[:max_length].rstrip("-")
    return slug or "sample"


def sample_stems(prompts: Sequence[str], num_samples: int = 1, *, max_length: int = MAX_NAME_LENGTH) -> list[str]:
    """File stems for `num_samples` samples of each prompt, in order: `000-the-digit-3-...`.
    The running index makes every stem unique (also for repeated or empty prompts) and keeps
    the listing in sampling order."""
    total = len(prompts) * num_samples
    width = max(3, len(str(max(total - 1, 0))))
    stems = []
    for index in range(total):
        prompt = prompts[index // num_samples]
        stems.append(f"{index:0{width}d}-{prompt_slug(prompt, max_length)}")
    return stems


# ---------------------------------------------------------------------------------------
# training


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r} ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def _run_config(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The config dict the options describe (preset, file, or a resumed run's config.json)
    and a name for the default run folder."""
    from diffusion.presets import get_preset

    if args.preset is None and args.config is None:
        saved = Path(args.out) / CONFIG_NAME if args.out else None
        if args.resume and saved is not None and saved.exists():
            return read_run_config(saved).to_dict(), Path(args.out).name
        raise UsageError("give --preset NAME or --config FILE (or --resume with the --out of an earlier run)")
    config: dict[str, Any] = {}
    name = "run"
    if args.preset is not None:
        try:
            config = get_preset(args.preset)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        name = args.preset
    if args.config is not None:
        config = merge(config, load_config_file(args.config))
        name = Path(args.config).stem
    return config, name


def _out_folder(args: argparse.Namespace, config: RunConfig, name: str) -> Path:
    # --out wins; else a results_folder the config sets itself (text2video-from-scratch's
    # `trainer.results_folder`); else runs/<preset or config name>.
    if args.out:
        return Path(args.out)
    if config.trainer.results_folder != TrainerConfig.results_folder:
        return Path(config.trainer.results_folder)
    return Path("runs") / name


def _check_resume(args: argparse.Namespace, out: Path, config: RunConfig) -> bool:
    """Whether the Trainer resumes from `out`'s latest checkpoint. Refuses to overwrite a
    run by accident, an empty resume, and changes the checkpoint cannot honour."""
    checkpoint = latest_checkpoint(out) if out.is_dir() else None
    traces = run_traces(out) if out.is_dir() else []
    if args.fresh:
        if checkpoint is not None:
            raise UsageError(
                f"--fresh starts a run without a complete checkpoint again, but {out} holds {checkpoint.name}; "
                "pass --resume to continue it or choose another --out"
            )
        if traces:
            logger.warning("--fresh: training %s again from step 0 (it held %s)", out, ", ".join(traces))
            _clear_unfinished_run(out)
        return False
    if checkpoint is None:
        if traces:
            raise UsageError(
                f"{out} holds an unfinished run without a complete checkpoint ({', '.join(traces)}); "
                "pass --fresh to train it again from step 0, or choose another --out"
            )
        if args.resume:
            logger.info("--resume: %s holds no earlier run; starting at step 0", out)
        return False
    if not args.resume:
        raise UsageError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    saved_path = out / CONFIG_NAME
    if saved_path.exists():
        conflicts = resume_conflicts(read_run_config(saved_path), config)
        if conflicts:
            raise ConfigError(
                f"--resume cannot change {conflicts[0]}: {out / checkpoint.name} was trained with the value in "
                f"{saved_path}; keep it, or start a new run with another --out"
            )
    return True


def _clear_unfinished_run(out: Path) -> None:
    """Remove what a run without a complete checkpoint left (its metrics describe steps that
    will be trained again; its checkpoint folders are partial), before training it afresh."""
    import shutil

    for name in ("metrics.jsonl", "latest"):
        (out / name).unlink(missing_ok=True)
    for folder in out.glob("checkpoint-*"):
        if folder.is_symlink() or not folder.is_dir():
            folder.unlink()
        else:
            shutil.rmtree(folder)


def _trainer_options(config: RunConfig, out: Path) -> dict[str, Any]:
    return {**config.trainer.options(), "results_folder": str(out)}


def cmd_train(args: argparse.Namespace) -> int:
    from diffusion import checkpoint as ckpt
    from diffusion.trainer import Trainer

    raw, name = _run_config(args)
    config = RunConfig.from_dict(apply_overrides(raw, args.set or []))
    if args.print_config:
        _say(config.to_json().rstrip())
        return 0
    out = _out_folder(args, config, name)
    resume = _check_resume(args, out, config)
    device = _device(args.device)

    unet_config = config.unet.unet_config() if config.pretrained is None else None
    # The initial weights are part of the run: drawn from the run's seed, so the same command
    # on the same machine trains the same model (the Trainer seeds every step after this).
    import torch

    torch.manual_seed(config.trainer.seed)
    diffusion = build_diffusion(config, unet_config=unet_config)
    if config.trainer.sample_kwargs:
        check_sample_kwargs("trainer.sample_kwargs", config.trainer.sample_kwargs, target=diffusion.sample,
                            timesteps=diffusion.num_timesteps)
    dataset = build_dataset(config)
    out.mkdir(parents=True, exist_ok=True)
    saved = dataclasses.replace(config.resolved(unet_config),
                                trainer=dataclasses.replace(config.trainer, results_folder=str(out)))
    if _is_main_process():
        ckpt.atomic_write_text(out / CONFIG_NAME, saved.to_json())
    params = sum(p.numel() for p in diffusion.denoise_fn.parameters())
    logger.info("%s U-Net with %.2fM parameters; %d training videos; run folder %s",
                config.unet.name if config.pretrained is None else "pretrained", params / 1e6, len(dataset), out)
    try:
        trainer = Trainer(diffusion, dataset=dataset, device=device, resume=resume, progress=args.progress,
                          **_trainer_options(config, out))
    except ckpt.WeightsMismatchError as err:  # a config.json edited after the checkpoint
        raise ConfigError(f"{out / CONFIG_NAME} no longer matches the weights: {err}") from None
    start, first_step = time.perf_counter(), trainer.step
    trainer.train()
    seconds = time.perf_counter() - start
    if not trainer.interrupted:
        trainer.sample_and_save("final")
        trainer.save("final")
    budget_stop = config.trainer.max_seconds > 0 and trainer.step < config.trainer.train_num_steps
    recent = [loss for _, loss in trainer.history[-50:]]
    done = trainer.step - first_step
    _say(f"trained {done} steps (to step {trainer.step}) in {seconds:.0f} s"
         + (f", {done / max(seconds, 1e-9):.2f} steps/s" if done else "")
         + (" - stopped by the time budget" if budget_stop and not trainer.interrupted else "")
         + (" - interrupted" if trainer.interrupted else ""))
    if recent:
        _say(f"loss (mean of the last {len(recent)} steps): {sum(recent) / len(recent):.4f}")
    _say(f"run folder: {out} (config.json, checkpoints, metrics.jsonl, loss.png, sample GIFs)")
    return 0


# ---------------------------------------------------------------------------------------
# sampling


def _read_prompts(args: argparse.Namespace, config: RunConfig) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        text = guards.read_text(args.prompts_file, what="--prompts-file", max_bytes=MAX_PROMPTS_BYTES)
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                prompts.append(line)
    if not prompts:
        prompts = list(config.sample.captions)
    if any(not p.strip() for p in prompts):
        raise UsageError("prompts must not be empty strings")
    return prompts


def prepare_sample_folder(out: Path, overwrite: bool) -> None:
    """Create `out`; earlier sample files in it are an error unless `overwrite` (then removed)."""
    out.mkdir(parents=True, exist_ok=True)
    stale = [p for p in out.iterdir() if _SAMPLE_FILE.match(p.name)]
    if stale and not overwrite:
        raise UsageError(f"{out} already holds {len(stale)} sample files; pass --overwrite to replace them")
    for path in stale:
        path.unlink()


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from diffusion import checkpoint as ckpt
    from diffusion import media

    if args.cascade is not None:
        from diffusion.cli_stages import sample_cascade

        return sample_cascade(args)
    if args.stage_option:
        raise UsageError("--stage-option goes with --cascade")
    if args.pretrained is not None:
        run = _open_pretrained(args)
    else:
        if args.checkpoint is None:
            raise UsageError("give --checkpoint RUN (a training run) or --pretrained DIR (a diffusers pipeline folder)")
        if args.num_frames is not None or args.image_size is not None:
            raise UsageError("--num-frames and --image-size go with --pretrained; a run samples at its own size "
                             "(longer videos: --frames N)")
        if not Path(args.checkpoint).exists():
            raise UsageError(f"--checkpoint {args.checkpoint} does not exist")
        run = open_run(args.checkpoint, args.weights, device=_device(args.device))
    config, diffusion = run.config, run.diffusion
    defaults = config.sample
    # The run's sample section, with the options given here over it, checked as one section.
    options = SampleConfig.from_dict({
        **defaults.to_dict(),
        **{k: v for k, v in (("sampler", args.sampler), ("steps", args.steps), ("cond_scale", args.cond_scale),
                             ("eta", args.eta), ("num_samples", args.num_samples), ("batch_size", args.batch_size),
                             ("seed", args.seed)) if v is not None},
    })
    if options.sampler == "ddpm" and args.steps is None:
        # Ancestral DDPM visits every timestep; the run's default step count is for the others.
        options.steps = diffusion.num_timesteps
    if options.steps is None:
        options.steps = min(SAMPLE_STEPS, diffusion.num_timesteps)
    if options.steps > diffusion.num_timesteps:
        raise UsageError(f"--steps must be at most the run's diffusion.timesteps={diffusion.num_timesteps}, "
                         f"got {options.steps}")

    long_options = long_video_cli.sample_options(args, diffusion)
    conditional = diffusion.cond_format is not None
    if not conditional and (args.prompt or args.prompts_file):
        raise UsageError("this model is unconditional (no cond_dim): it takes no prompts")
    prompts = _read_prompts(args, config) if conditional else []
    if conditional and not prompts:
        raise UsageError("this model is text-conditioned: give --prompt TEXT or --prompts-file FILE")
    count = options.num_samples
    captions = [p for p in prompts for _ in range(count)] if conditional else [""] * count
    stems = sample_stems(prompts, count) if conditional else [f"{i:03d}-sample" for i in range(count)]

    out = Path(args.out) if args.out else run.run_dir / "samples"
    prepare_sample_folder(out, args.overwrite)

    generator = torch.Generator().manual_seed(options.seed)
    sampling_seconds, sampler_steps = 0.0, 0
    logger.info("sampling %d videos from %s with %s (%s steps, guidance %.2f)", len(captions), run.checkpoint,
                options.sampler, options.steps, options.cond_scale)
    start = time.perf_counter()
    batch = options.batch_size
    for first in range(0, len(captions), batch):
        chunk = captions[first : first + batch]
        kwargs: dict[str, Any] = dict(sampler=options.sampler, steps=options.steps, eta=options.eta,
                                      generator=generator)
        if conditional:
            kwargs.update(cond=chunk, cond_scale=options.cond_scale)
        else:
            kwargs["batch_size"] = len(chunk)
        with torch.no_grad():
            began = time.perf_counter()
            videos = long_video_cli.sample_videos(diffusion, kwargs, long_options).float()
            sampling_seconds += time.perf_counter() - began
            sampler_steps += options.steps
        if not torch.isfinite(videos).all():
            raise ValueError(f"sampling from {run.checkpoint} gave non-finite values (NaN or inf); nothing written "
                             "for this batch: the weights may be damaged")
        videos = videos.clamp(0.0, 1.0).cpu()
        for video, caption, stem in zip(videos, chunk, stems[first : first + batch]):
            media.write_gif(video, out / f"{stem}.gif", fps=options.fps)
            if conditional:
                ckpt.atomic_write_text(out / f"{stem}.txt", caption + "\n")
    _say(f"wrote {len(captions)} samples (gif + txt) to {out} in {time.perf_counter() - start:.0f} s")
    # Sampler steps (each one U-Net evaluation of the batch, two for heun) per second of sampling.
    _say(f"sampling: {options.sampler}, {options.steps} steps, {sampler_steps / max(sampling_seconds, 1e-9):.2f} "
         f"steps/s ({sampling_seconds:.1f} s for {-(-len(captions) // batch)} batch(es))")
    return 0


def _open_pretrained(args: argparse.Namespace) -> Any:
    """`spacetime sample --pretrained DIR`: the pipeline folder as a `LoadedRun`."""
    from diffusion.pretrained_video import open_pretrained

    folder = Path(args.pretrained)
    if args.checkpoint is not None:
        raise UsageError("give --checkpoint or --pretrained, not both")
    if not folder.is_dir():
        raise UsageError(f"--pretrained {args.pretrained} is not a folder (a diffusers pipeline folder: "
                         "unet/, vae/, text_encoder/, tokenizer/)")
    if args.out is None:
        raise UsageError("--pretrained needs --out FOLDER for the samples")
    if not (args.prompt or args.prompts_file):
        raise UsageError("--pretrained needs --prompt TEXT or --prompts-file FILE")
    try:
        return open_pretrained(folder, num_frames=args.num_frames or 16, image_size=args.image_size,
                               device=_device(args.device))
    except ConfigError as err:
        raise ConfigError(f"--pretrained {args.pretrained}: {err}") from None


# ---------------------------------------------------------------------------------------
# eval, data, bench


def cmd_eval(args: argparse.Namespace) -> int:
    from diffusion import checkpoint as ckpt
    from diffusion.evaluate import evaluate_folder, results_table

    stages = [name for name, value in (("--interp", args.interp), ("--sr", args.sr)) if value is not None]
    if (args.folder is not None) + len(stages) != 1:
        given = ([f"FOLDER {args.folder!r}"] if args.folder is not None else []) + stages
        raise UsageError("give one of (not both): a FOLDER of samples to score, --interp RUN (a frame-interpolation "
                         f"run) or --sr RUN (a super-resolution run); got {', '.join(given) or 'none'}")
    if args.interp is not None:
        from diffusion.cli_stages import eval_interpolation

        return eval_interpolation(args)
    if args.sr is not None:
        from diffusion.cli_stages import eval_super_resolution

        return eval_super_resolution(args)
    out = Path(args.out) if args.out else Path(args.folder) / "eval.json"
    # Long videos: per-window scores with --window (diffusion.cli_long).
    scored = long_video_cli.evaluate(args)
    if scored is not None:
        results, table = scored
    else:
        results = evaluate_folder(args.folder)
        table = results_table(results)
    ckpt.atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    _say(table)
    _say(f"\nwrote {out}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from diffusion.moving_digits import write_moving_digits

    paths = write_moving_digits(
        args.out, args.num_videos, image_size=args.image_size, num_frames=args.num_frames,
        digit_size=args.digit_size, speed=args.speed, channels=args.channels, seed=args.seed,
    )
    _say(f"wrote {len(paths)} videos (gif + txt caption each) to {args.out}")
    return 0


def benchmark_script(name: str) -> Path:
    """The script `benchmarks/<name>.py` of the source checkout this package runs from."""
    root = Path(__file__).resolve().parents[1]
    script = root / "benchmarks" / f"{name}.py"
    if not script.is_file():
        raise UsageError(
            f"the benchmark script {script} is missing: benchmarks ship with the source checkout "
            "(git clone), not with the installed package"
        )
    return script


def cmd_bench(args: argparse.Namespace) -> int:
    script = benchmark_script(args.benchmark)
    argv = sys.argv
    sys.argv = [str(script), *args.args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = argv
    return 0


# ---------------------------------------------------------------------------------------
# parser and entry point


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as the one line every other error of the command prints."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"spacetime: error: {self.prog}: {message} (see --help)\n")
        sys.exit(2)


def _int_argument(low: int, high: int | None, what: str) -> Any:
    """An argparse type: an int in [low, high], else "must be WHAT, got ..."."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


_positive_int = _int_argument(1, None, "a positive integer")
_non_negative_int = _int_argument(0, None, "a non-negative integer")
_seed = _int_argument(0, MAX_SEED, "an integer in [0, 2**63 - 1]")


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from diffusion.presets import available_presets

    parser = _Parser(prog="spacetime", description="Train, sample and evaluate video diffusion models.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of errors")
    parser.add_argument("--threads", type=_positive_int,
                        help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy machine)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="train a model", description="Train a model from a preset or a config file.")
    train.add_argument("--preset", help=f"run preset: {', '.join(available_presets())} "
                                        "(a U-Net preset is the config key unet_preset)")
    train.add_argument("--config", help="YAML or JSON run configuration (over the run preset, if both)")
    train.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                       help="override one value, e.g. --set trainer.train_lr=3e-4 (repeatable)")
    train.add_argument("--out", help="run folder (default: runs/<preset or config name>)")
    train.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    train.add_argument("--fresh", action="store_true",
                       help="train a run folder that holds no complete checkpoint (metrics, partial "
                            "checkpoints of a killed run) again from step 0")
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar (default: when stderr is a terminal)")
    train.add_argument("--print-config", action="store_true", help="print the validated configuration and exit")
    train.set_defaults(func=cmd_train)

    sample = commands.add_parser("sample", help="sample videos from a trained run or a diffusers pipeline",
                                 description="Sample videos (gif + txt caption pairs) from a training run "
                                             "or a local diffusers text-to-video pipeline folder.")
    sample.add_argument("--checkpoint", help="training run folder or one of its checkpoint-* folders")
    sample.add_argument("--pretrained", metavar="DIR",
                        help="a local diffusers text-to-video pipeline folder (unet/, vae/, text_encoder/, "
                             "tokenizer/, scheduler/) instead of --checkpoint")
    stages_cli.add_sample_arguments(sample)
    sample.add_argument("--num-frames", type=_positive_int, help="frames per video (--pretrained; default 16)")
    sample.add_argument("--image-size", type=_positive_int,
                        help="pixels per side (--pretrained; default the U-Net's sample_size times the VAE's factor)")
    sample.add_argument("--prompt", action="append", help="caption to sample (repeatable)")
    sample.add_argument("--prompts-file", help="file with one caption per line ('#' starts a comment)")
    sample.add_argument("--cond-scale", type=_non_negative_float, help="classifier-free guidance scale (1: none)")
    sample.add_argument("--sampler", choices=sampler_names())
    sample.add_argument("--steps", type=_positive_int, help="sampling steps (all but ddpm; default 50)")
    sample.add_argument("--eta", type=_non_negative_float,
                        help="noise scale of ddim (default 0), euler_ancestral and dpmpp_2m_sde (default 1)")
    sample.add_argument("--num-samples", type=_positive_int, help="samples per prompt")
    sample.add_argument("--batch-size", type=_positive_int, help="videos sampled at once")
    sample.add_argument("--seed", type=_seed)
    sample.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA (default) or raw weights")
    sample.add_argument("--out", help="output folder (default: RUN/samples)")
    sample.add_argument("--overwrite", action="store_true", help="replace earlier samples in --out")
    sample.add_argument("--device", default="auto")
    long_video_cli.add_sample_arguments(sample)
    sample.set_defaults(func=cmd_sample)

    evaluate = commands.add_parser(
        "eval", help="score moving-digits samples (--window: long videos), a frame-interpolation or super-resolution run",
        description="Direction and digit accuracy of moving-digits videos against their captions; with --interp "
                    "RUN, a frame-interpolation run's PSNR on held-out moving digits against linear blending; with "
                    "--sr RUN, PSNR and SSIM of a super-resolution run and of bicubic upsampling.")
    evaluate.add_argument("folder", nargs="?", help="folder of videos with NAME.txt captions")
    evaluate.add_argument("--out", help="JSON results (default: FOLDER/eval.json, RUN/eval-interp.json, RUN/eval_sr.json)")
    stages_cli.add_eval_arguments(evaluate)
    long_video_cli.add_eval_arguments(evaluate)
    evaluate.add_argument("--device", default="auto")
    evaluate.set_defaults(func=cmd_eval)

    data = commands.add_parser("data", help="write a data set to disk", description="Write a data set as gif + txt pairs.")
    kinds = data.add_subparsers(dest="kind", metavar="KIND", required=True)
    digits = kinds.add_parser("moving-digits", help="the embedded moving-digits data set")
    digits.add_argument("--out", required=True)
    digits.add_argument("--num-videos", type=_positive_int, default=64)
    digits.add_argument("--image-size", type=_positive_int, default=32)
    digits.add_argument("--num-frames", type=_positive_int, default=8)
    digits.add_argument("--digit-size", type=_positive_int, default=14)
    digits.add_argument("--speed", type=float, default=2.0)
    digits.add_argument("--channels", type=int, choices=(1, 3), default=1)
    digits.add_argument("--seed", type=_seed, default=0)
    digits.set_defaults(func=cmd_data)

    bench = commands.add_parser("bench", help="run a benchmark script",
                                description="Run benchmarks/attention.py or benchmarks/unet.py; other arguments go to the script.")
    bench.add_argument("benchmark", choices=BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    bench.set_defaults(func=cmd_bench)
    return parser


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("spacetime", "diffusion", "unets"):
        logging.getLogger(name).setLevel(level)


def _user_error(err: BaseException) -> str | None:
    """The one-line message for a user or environment error, or None for a bug."""
    import diffusion

    if isinstance(err, OSError):
        # Missing, unreadable or unwritable files, a full disk, a path under a file: the OS
        # names the file. An OSError without errno or file comes from no system call.
        if err.errno is None and not err.filename:
            return None
        text = str(err)
        if err.filename and str(err.filename) not in text:
            text = f"{text}: {err.filename}"
        return text
    if isinstance(err, (ValueError, TypeError, ImportError, MemoryError, diffusion.NonFiniteLossError)):
        # ValueError covers ConfigError, UsageError, unets.guards.BadFileError and the
        # checkpoint readers' errors; TypeError the library's argument checks; ImportError
        # a missing optional dependency, whose message gives the install command.
        text = str(err) or type(err).__name__
        if not isinstance(err, (ConfigError, UsageError)) and isinstance(err, (TypeError, ImportError, MemoryError)):
            text = f"{type(err).__name__}: {text}"
        return text
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `spacetime` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    if args.quiet or not sys.stderr.isatty():
        # Download / weight-loading bars of the text encoder's libraries would sit between
        # the command's own lines (and before a one-line error); an explicit setting wins.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args.threads is not None:
        import torch

        # More threads than free cores makes every kernel wait at OpenMP barriers: on a
        # shared machine one thread can be ten times faster than two.
        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("spacetime: interrupted\n")
        return 130
    except Exception as err:
        message = _user_error(err)
        if message is None or args.traceback:
            raise
        line = " ".join(message.split())
        sys.stderr.write(f"spacetime: error: {line}\n")
        return 2


def console() -> None:
    """The `spacetime` console script and `python -m diffusion`: `main`, then exit with its
    status; a rank of a torchrun (gloo) run leaves through `distributed.exit_process`."""
    code = main()
    # Only a command that imported it can have joined a process group.
    distributed = sys.modules.get("diffusion.distributed")
    if distributed is not None:
        distributed.exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
