"""The `spacetime` command line: train, sample, eval, data, bench.

    spacetime train --preset moving-digits --out runs/demo [--set trainer.train_lr=3e-4] [--resume]
    spacetime train --config run.yaml --out runs/mine --device cuda
    spacetime sample --checkpoint runs/demo --prompt "the digit 3 moving up" --sampler ddim --steps 50
    spacetime eval runs/demo/samples --out runs/demo/eval.json
    spacetime data moving-digits --out data/digits --num-videos 64
    spacetime bench attention [ARGS...]

A training run folder holds the resolved configuration (`config.json`, which `--config`
reads back), the Trainer's checkpoints (`checkpoint-*/`, `latest`), `metrics.jsonl`,
`loss.png` and sample-grid GIFs. `spacetime sample --checkpoint RUN` rebuilds the U-Net and
the diffusion process from `config.json` and loads the EMA weights of the latest checkpoint.

Invalid configurations and other usage errors print one line, `spacetime: error: ...`,
without a traceback and exit with status 2 (`--traceback` shows it).
"""

from __future__ import annotations

import argparse
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

from diffusion.config import (
    DIFFUSION_EXTRA,
    SAMPLERS,
    TRAINER_EXTRA,
    ConfigError,
    apply_overrides,
    load_config_file,
    merge,
    validate_config,
)

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
BENCHMARKS = ("attention", "unet")
MAX_NAME_LENGTH = 80
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
# building a run


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


def _diffusion_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config["diffusion"].items() if k not in DIFFUSION_EXTRA}


def build_diffusion(config: dict[str, Any]):
    """The `GaussianDiffusion` (with its U-Net) a validated run configuration describes."""
    import unets

    from diffusion.gaussian import GaussianDiffusion

    net = unets.build(config["unet"], preset=config.get("preset"), **config["model"])
    if config["diffusion"].get("cond_on_tokens", False):
        # GaussianDiffusion hands a denoiser that sets this the token embeddings (and their
        # mask) instead of the pooled vector (DESIGN.md "U-Net call convention").
        net.cond_on_tokens = True
    return GaussianDiffusion(net, **_diffusion_kwargs(config))


def resolved_config(config: dict[str, Any], diffusion: Any) -> dict[str, Any]:
    """`config` with the U-Net written out field by field (preset applied), so the run can
    be rebuilt even if presets change later."""
    model = diffusion.denoise_fn.config.to_dict()
    model.pop("name", None)
    return {**config, "preset": None, "model": model}


def build_dataset(config: dict[str, Any]):
    data = dict(config["data"])
    kind = data.pop("kind")
    video = {k: config["diffusion"][k] for k in ("image_size", "num_frames", "channels")}
    if kind == "moving-digits":
        from diffusion.moving_digits import MovingDigits

        num_videos = data.pop("num_videos", 2000)
        return MovingDigits(num_videos, **video, **data)
    from diffusion.data import VideoFolder

    folder = data.pop("folder")
    return VideoFolder(folder, **video, **data)


class TimeBudget:
    """Stops a Trainer after `max_seconds` of training (checked after every step) and, when
    the learning rate decays, fits the schedule to the steps the budget allows.

    The Trainer's learning rate is a pure function of the step and `train_num_steps`; a
    cosine or linear decay planned for more steps than the budget allows would stop while
    the rate is still high, which leaves noisy weights. So after `warmup` steps the
    projected number of steps (at the rate measured so far) becomes `train_num_steps`, never
    more than configured, re-estimated after every step as the machine's load changes.
    (Works through the Trainer's `log_fn` hook: the Trainer has no time limit of its own.)"""

    def __init__(self, trainer: Any, max_seconds: float, *, fit_schedule: bool = True, warmup: int = 10):
        self.trainer = trainer
        self.max_seconds = float(max_seconds)
        self.max_steps = trainer.train_num_steps
        self.fit_schedule = fit_schedule
        self.warmup = warmup
        self.start_step = trainer.step
        self.start = time.perf_counter()
        self.stopped_early = False

    def __call__(self, record: dict[str, Any]) -> None:
        trainer = self.trainer
        elapsed = time.perf_counter() - self.start
        if elapsed >= self.max_seconds:
            if trainer.step < self.max_steps and not self.stopped_early:
                self.stopped_early = True
                logger.info("time budget of %.0f s used up at step %d", self.max_seconds, trainer.step)
            trainer.train_num_steps = trainer.step
            return
        done = trainer.step - self.start_step
        if self.fit_schedule and done >= self.warmup:
            projected = self.start_step + int(done / elapsed * self.max_seconds)
            trainer.train_num_steps = max(trainer.step + 1, min(self.max_steps, projected))


def _run_config(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from diffusion.presets import get_preset

    out = Path(args.out) if args.out else None
    saved = out / CONFIG_NAME if out is not None else None
    if args.preset is None and args.config is None:
        if args.resume and saved is not None and saved.is_file():
            return load_config_file(saved), out.name
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


def _latest_checkpoint(run_dir: Path) -> Path | None:
    from diffusion.trainer import CHECKPOINT_PREFIX, LATEST

    pointer = run_dir / LATEST
    if pointer.is_file():
        target = run_dir / pointer.read_text(encoding="utf-8").strip()
        if (target / "ema.safetensors").is_file():
            return target
    complete = [p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / "state.pt").is_file()]
    return max(complete, key=lambda p: (p / "state.pt").stat().st_mtime_ns) if complete else None


def cmd_train(args: argparse.Namespace) -> int:
    from diffusion import checkpoint as ckpt
    from diffusion.trainer import Trainer

    config, name = _run_config(args)
    config = apply_overrides(config, args.set or [])
    config = validate_config(config)
    out = Path(args.out) if args.out else Path("runs") / name
    if args.print_config:
        _say(json.dumps(config, indent=2))
        return 0
    if out.exists() and _latest_checkpoint(out) is not None and not args.resume:
        raise UsageError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    device = _device(args.device)

    trainer_kwargs = {k: v for k, v in config["trainer"].items() if k not in TRAINER_EXTRA}
    max_seconds = float(config["trainer"].get("max_seconds", 0.0))
    diffusion = build_diffusion(config)
    dataset = build_dataset(config)
    out.mkdir(parents=True, exist_ok=True)
    if _is_main_process():
        ckpt.atomic_write_text(out / CONFIG_NAME, json.dumps(resolved_config(config, diffusion), indent=2) + "\n")
    params = sum(p.numel() for p in diffusion.denoise_fn.parameters())
    logger.info("%s U-Net with %.2fM parameters; %d training videos; run folder %s",
                config["unet"], params / 1e6, len(dataset), out)
    trainer = Trainer(diffusion, dataset=dataset, results_folder=out, device=device, resume=args.resume,
                      progress=args.progress, **trainer_kwargs)
    budget = TimeBudget(trainer, max_seconds, fit_schedule=trainer.lr_schedule != "constant") if max_seconds else None
    start, first_step = time.perf_counter(), trainer.step
    trainer.train(log_fn=budget)
    seconds = time.perf_counter() - start
    if not trainer.interrupted:
        trainer.sample_and_save("final")
        trainer.save("final")
    history = trainer.history
    recent = [loss for _, loss in history[-50:]]
    _say(f"trained {trainer.step - first_step} steps (to step {trainer.step}) in {seconds:.0f} s"
         + (f", {(trainer.step - first_step) / max(seconds, 1e-9):.2f} steps/s" if trainer.step > first_step else "")
         + (" - stopped by the time budget" if budget is not None and budget.stopped_early else "")
         + (" - interrupted" if trainer.interrupted else ""))
    if recent:
        _say(f"loss (mean of the last {len(recent)} steps): {sum(recent) / len(recent):.4f}")
    _say(f"run folder: {out} (config.json, checkpoints, metrics.jsonl, loss.png, sample GIFs)")
    return 0


# ---------------------------------------------------------------------------------------
# sampling


def _find_run(path: Path) -> tuple[dict[str, Any], Path]:
    """(config, checkpoint folder) for a run folder or one of its checkpoint folders."""
    if not path.exists():
        raise UsageError(f"--checkpoint {path} does not exist")
    if (path / CONFIG_NAME).is_file() and not (path / "ema.safetensors").is_file():
        run_dir, folder = path, _latest_checkpoint(path)
        if folder is None:
            raise UsageError(f"{path} has no complete checkpoint yet (checkpoint-*/ with ema.safetensors)")
    elif (path / "ema.safetensors").is_file() and (path.parent / CONFIG_NAME).is_file():
        run_dir, folder = path.parent, path
    else:
        raise UsageError(
            f"--checkpoint must be a training run folder (with {CONFIG_NAME}) or one of its checkpoint-* "
            f"folders, got {path}"
        )
    return validate_config(load_config_file(run_dir / CONFIG_NAME)), folder


def _read_prompts(args: argparse.Namespace, config: dict[str, Any]) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UsageError(f"--prompts-file {path} does not exist")
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                prompts.append(line)
    if not prompts:
        prompts = list(config["sample"].get("captions", []))
    if any(not p.strip() for p in prompts):
        raise UsageError("prompts must not be empty strings")
    return prompts


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from diffusion import checkpoint as ckpt
    from diffusion import media

    config, folder = _find_run(Path(args.checkpoint))
    defaults = config["sample"]
    options = {
        "sampler": args.sampler or defaults.get("sampler", "ddim"),
        "steps": args.steps if args.steps is not None else defaults.get("steps", 50),
        "cond_scale": args.cond_scale if args.cond_scale is not None else defaults.get("cond_scale", 1.0),
        "eta": args.eta if args.eta is not None else defaults.get("eta", 0.0),
        "num_samples": args.num_samples if args.num_samples is not None else defaults.get("num_samples", 1),
        "batch_size": args.batch_size if args.batch_size is not None else defaults.get("batch_size", 16),
        "seed": args.seed if args.seed is not None else defaults.get("seed", 0),
        "fps": defaults.get("fps", 8.0),
    }
    device = _device(args.device)
    diffusion = build_diffusion(config)
    weights = "ema.safetensors" if args.weights == "ema" else "model.safetensors"
    diffusion.load_state_dict(ckpt.load_tensors(folder / weights))
    diffusion.to(device).eval()

    conditional = getattr(diffusion.denoise_fn.config, "cond_dim", None) is not None or bool(
        getattr(diffusion.denoise_fn.config, "use_bert_text_cond", False))
    prompts = _read_prompts(args, config) if conditional else []
    if not conditional and (args.prompt or args.prompts_file):
        raise UsageError("this model is unconditional (no cond_dim): it takes no prompts")
    if conditional and not prompts:
        raise UsageError("this model is text-conditioned: give --prompt TEXT or --prompts-file FILE")
    count = options["num_samples"]
    captions = [p for p in prompts for _ in range(count)] if conditional else [""] * count
    stems = sample_stems(prompts, count) if conditional else [f"{i:03d}-sample" for i in range(count)]

    out = Path(args.out) if args.out else folder.parent / "samples"
    out.mkdir(parents=True, exist_ok=True)
    stale = [p for p in out.iterdir() if _SAMPLE_FILE.match(p.name)]
    if stale and not args.overwrite:
        raise UsageError(f"{out} already holds {len(stale)} sample files; pass --overwrite to replace them")
    for path in stale:
        path.unlink()

    generator = torch.Generator().manual_seed(options["seed"])
    logger.info("sampling %d videos from %s with %s (%s steps, guidance %.2f)", len(captions), folder,
                options["sampler"], options["steps"], options["cond_scale"])
    start = time.perf_counter()
    batch = options["batch_size"]
    for first in range(0, len(captions), batch):
        chunk = captions[first : first + batch]
        kwargs: dict[str, Any] = dict(sampler=options["sampler"], steps=options["steps"], eta=options["eta"],
                                      generator=generator)
        if conditional:
            kwargs.update(cond=chunk, cond_scale=options["cond_scale"])
        else:
            kwargs["batch_size"] = len(chunk)
        with torch.no_grad():
            videos = diffusion.sample(**kwargs).float().clamp(0.0, 1.0).cpu()
        for video, caption, stem in zip(videos, chunk, stems[first : first + batch]):
            media.write_gif(video, out / f"{stem}.gif", fps=options["fps"])
            if conditional:
                ckpt.atomic_write_text(out / f"{stem}.txt", caption + "\n")
    _say(f"wrote {len(captions)} samples (gif + txt) to {out} in {time.perf_counter() - start:.0f} s")
    return 0


# ---------------------------------------------------------------------------------------
# eval, data, bench


def cmd_eval(args: argparse.Namespace) -> int:
    from diffusion import checkpoint as ckpt
    from diffusion.evaluate import evaluate_folder, results_table

    results = evaluate_folder(args.folder)
    out = Path(args.out) if args.out else Path(args.folder) / "eval.json"
    ckpt.atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    _say(results_table(results))
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from diffusion.presets import available_presets

    parser = argparse.ArgumentParser(prog="spacetime", description="Train, sample and evaluate video diffusion models.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of errors")
    parser.add_argument("--threads", type=_positive_int,
                        help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy machine)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="train a model", description="Train a model from a preset or a config file.")
    train.add_argument("--preset", help=f"run preset: {', '.join(available_presets())}")
    train.add_argument("--config", help="YAML or JSON run configuration (over the preset, if both)")
    train.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                       help="override one value, e.g. --set trainer.train_lr=3e-4 (repeatable)")
    train.add_argument("--out", help="run folder (default: runs/<preset or config name>)")
    train.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar (default: when stderr is a terminal)")
    train.add_argument("--print-config", action="store_true", help="print the validated configuration and exit")
    train.set_defaults(func=cmd_train)

    sample = commands.add_parser("sample", help="sample videos from a trained run",
                                 description="Sample videos (gif + txt caption pairs) from a training run.")
    sample.add_argument("--checkpoint", required=True, help="training run folder or one of its checkpoint-* folders")
    sample.add_argument("--prompt", action="append", help="caption to sample (repeatable)")
    sample.add_argument("--prompts-file", help="file with one caption per line ('#' starts a comment)")
    sample.add_argument("--cond-scale", type=_non_negative_float, help="classifier-free guidance scale (1: none)")
    sample.add_argument("--sampler", choices=SAMPLERS)
    sample.add_argument("--steps", type=_positive_int, help="sampling steps (DDIM)")
    sample.add_argument("--eta", type=_non_negative_float, help="DDIM noise scale (0: deterministic)")
    sample.add_argument("--num-samples", type=_positive_int, help="samples per prompt")
    sample.add_argument("--batch-size", type=_positive_int, help="videos sampled at once")
    sample.add_argument("--seed", type=int)
    sample.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA (default) or raw weights")
    sample.add_argument("--out", help="output folder (default: RUN/samples)")
    sample.add_argument("--overwrite", action="store_true", help="replace earlier samples in --out")
    sample.add_argument("--device", default="auto")
    sample.set_defaults(func=cmd_sample)

    evaluate = commands.add_parser("eval", help="score moving-digits samples",
                                   description="Direction and digit accuracy of moving-digits videos against their captions.")
    evaluate.add_argument("folder", help="folder of videos with NAME.txt captions")
    evaluate.add_argument("--out", help="JSON results (default: FOLDER/eval.json)")
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
    digits.add_argument("--seed", type=int, default=0)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `spacetime` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    if args.threads is not None:
        import torch

        # More threads than free cores makes every kernel wait at OpenMP barriers: on a
        # shared machine one thread can be ten times faster than two.
        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UsageError) as err:
        if args.traceback:
            raise
        sys.stderr.write(f"spacetime: error: {err}\n")
        return 2
    except (ValueError, FileNotFoundError, ImportError) as err:
        # Errors the library raises for bad inputs (a folder without videos, a caption that
        # is not a moving-digits caption, a missing optional dependency) read as messages.
        if args.traceback:
            raise
        sys.stderr.write(f"spacetime: error: {type(err).__name__}: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("spacetime: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
