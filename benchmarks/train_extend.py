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

import numpy as np
import torch
from torch.utils.data import Dataset

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
    parser.add_argument("--bouncing", action="store_true",
                        help="train on 8-frame crops of 32-frame videos in which the digits bounce (BouncingCrops)")
    parser.add_argument("--quick", action="store_true", help="tiny debug model, 4 steps, no base run")
    return parser.parse_args(argv)


class BouncingCrops(Dataset):
    """Clips of `num_frames` cut at a random start from `long_frames`-frame moving digits, whose
    paths do not fit the frame, so most clips show a bounce. A clip's caption names its own
    initial direction (the moving-digits convention), read off the digit's path.

    Why: a model trained only on clips whose path fits never sees a digit reach an edge, and
    an extension past the trained length is exactly where it must; the bounce law is what the
    long-video metric (`diffusion.evaluate_long`) holds the videos to."""

    def __init__(self, num_videos: int, *, num_frames: int, long_frames: int = 32, seed: int = 0, **digits: Any):
        from diffusion.moving_digits import (
            DIRECTION_NAMES,
            DIRECTIONS,
            MovingDigits,
            make_caption,
        )

        self.videos = MovingDigits(num_videos, num_frames=long_frames, seed=seed, **digits)
        self.num_frames = num_frames
        rng = np.random.default_rng(seed + 1)
        self.starts = rng.integers(0, long_frames - num_frames + 1, num_videos)
        by_step = {step: name for name, step in DIRECTIONS.items()}
        self.captions = []
        for index, start in enumerate(self.starts):
            path = self.videos.positions(index)
            step = tuple(int(v) for v in np.sign(path[start + 1] - path[start]))
            self.captions.append(make_caption(int(self.videos.digit_labels[index]), by_step[step]))
        assert all(caption.split("moving ")[1] in DIRECTION_NAMES for caption in self.captions)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        start = int(self.starts[index])
        video = self.videos.render(index)[:, start : start + self.num_frames]
        return {"video": video.contiguous(), "caption": self.captions[index]}


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
    from diffusion.run import (
        CONFIG_NAME,
        build_dataset,
        build_diffusion,
        latest_checkpoint,
    )
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
    dataset = build_dataset(config)
    if args.bouncing:
        data = config.data
        dataset = BouncingCrops(data.num_videos, num_frames=config.diffusion.num_frames,
                                image_size=config.diffusion.image_size, digit_size=data.digit_size or 14,
                                speed=data.speed or 2.0, seed=data.seed or 0)
    trainer = Trainer(diffusion, dataset=dataset, device=torch.device("cpu"), progress=False,
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
