"""Fine-tune a moving-digits run into a frame-conditioned one for autoregressive extension.

    OMP_NUM_THREADS=1 python benchmarks/train_extend.py --base runs/demo-a --out runs/demo-extend \
        --max-seconds 840 --threads 1
    python benchmarks/train_extend.py --quick --out /tmp/extend-quick          # smoke run, tiny model

`diffusion.long_video.extend` needs a U-Net built with `frame_cond=True` that has learnt to
continue a video from its first frames. Training one from scratch costs the demo's whole
budget again; the frame-conditioning projection starts at zero (`unets.frame_cond`), so the
demo's weights load into a `frame_cond` model unchanged and only have to learn to use the
frames. This script does that: the base run's config with `model.frame_cond = true`, its EMA
weights, and training masks drawn half `future` (the first 2..6 frames given) and half
`unconditional` (`diffusion.frame_masks.FrameMasks`), so the same model still samples the
first window without frames. The result is an ordinary run folder (`spacetime sample`,
`diffusion.load_run`).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

logger = logging.getLogger("benchmarks.train_extend")

# Half the samples continue a video from its first frames, half start one from nothing.
EXTEND_MASKS = {"future": 0.5, "interpolate": 0.0, "first_frame": 0.0, "unconditional": 0.5,
                "context_frames": (2, 6)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="moving-digits run folder to start from (its EMA weights)")
    parser.add_argument("--out", required=True, help="new run folder")
    parser.add_argument("--max-seconds", type=float, default=840.0, help="wall-clock training budget")
    parser.add_argument("--steps", type=int, default=3000, help="most steps (the budget usually stops first)")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (fine-tuning: below the demo's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny debug model, 4 steps, no base run")
    return parser.parse_args(argv)


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    from diffusion.presets import get_preset

    if args.quick:
        config = get_preset("debug")
        config["model"]["frame_cond"] = True
        return config
    if args.base is None:
        raise SystemExit("give --base RUN (or --quick)")
    config = json.loads((Path(args.base) / "config.json").read_text(encoding="utf-8"))
    config["model"]["frame_cond"] = True
    config["trainer"].update({
        "train_num_steps": args.steps, "max_seconds": args.max_seconds, "train_lr": args.lr, "warmup_steps": 20,
        "save_and_sample_every": 100000, "step_start_ema": 0,
    })
    return config


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    from diffusion import checkpoint as ckpt
    from diffusion.config import RunConfig, normalise
    from diffusion.frame_masks import FrameMasks
    from diffusion.run import CONFIG_NAME, build_dataset, build_diffusion, latest_checkpoint
    from diffusion.trainer import Trainer

    out = Path(args.out)
    raw = run_config(args)
    raw["trainer"]["results_folder"] = str(out)
    config = RunConfig.from_dict(normalise(raw))
    torch.manual_seed(config.trainer.seed)
    unet_config = config.unet.unet_config()
    diffusion = build_diffusion(config, unet_config=unet_config)
    if args.base is not None and not args.quick:
        folder = latest_checkpoint(args.base)
        if folder is None:
            raise SystemExit(f"{args.base} has no complete checkpoint")
        # The frame-conditioning weights are missing from the base: they load as their zero start.
        diffusion.load_state_dict(ckpt.load_tensors(folder / "ema.safetensors"))
        logger.info("started from %s", folder)
    masks = FrameMasks(**EXTEND_MASKS)
    # The Trainer calls the process with the batch's own keywords; the masks ride along.
    diffusion.forward = functools.partial(diffusion.forward, frame_masks=masks)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(out / CONFIG_NAME, config.resolved(unet_config).to_json())
    trainer = Trainer(diffusion, dataset=build_dataset(config), device=torch.device("cpu"), progress=False,
                      **{**config.trainer.options(), "results_folder": str(out)})
    start = time.perf_counter()
    trainer.train()
    trainer.save("final")
    recent = [loss for _, loss in trainer.history[-50:]]
    logger.info("trained %d steps in %.0f s; loss (last 50) %.4f; run folder %s", trainer.step,
                time.perf_counter() - start, sum(recent) / max(len(recent), 1), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
