"""Named run configurations for `spacetime train --preset NAME`.

Each preset is a full run configuration (the sections of `diffusion.config`). The
`moving-digits` preset is the demo (`make demo`): a text-conditioned model trained on the
embedded moving-digits data on a CPU within a wall-clock budget, sampled with DDIM and
classifier-free guidance; `moving-digits-flow` trains it as a rectified flow
(`diffusion.FlowMatching`). `moving-digits-long` is the same recipe with a 40-minute
training budget; `moving-digits-interp` is the frame-interpolation stage (29 frames from
every 4th given) and `moving-digits-sr` the spatial super-resolution stage (16 px -> 32 px,
`diffusion.SuperResolution`) of a cascade; `debug` is a tiny run for tests.
"""

from __future__ import annotations

import copy
from typing import Any

from diffusion.moving_digits import DIRECTION_NAMES, make_caption

# The demo's 16 captions: every digit at least once and every direction twice, paired so
# that no digit is always seen with the same direction.
DEMO_CAPTIONS: tuple[str, ...] = tuple(
    make_caption(i % 10, DIRECTION_NAMES[(3 * i) % len(DIRECTION_NAMES)]) for i in range(16)
)

# 16 px frames with the 8x8 digits at their native size, moving 1 px per frame: the
# smallest videos on which the direction and digit metrics still score ~100% on real data
# (tests/test_evaluate.py), so a CPU spends its few minutes on learning, not on pixels.
_DIGITS_VIDEO = {"image_size": 16, "num_frames": 8, "channels": 1}
_DIGITS_DATA = {"kind": "moving-digits", "num_videos": 4000, "digit_size": 8, "speed": 1.0, "seed": 0}

PRESETS: dict[str, dict[str, Any]] = {
    "moving-digits": {
        "unet": "space_time_unet",
        "model": {
            "dim": 16,
            "dim_mult": [1, 2, 4],
            "self_attns": [False, False, True],
            "temporal_compression": [False, False, False],
            "resnet_block_depths": [1, 1, 1],
            "attn_heads": 2,
            "attn_dim_head": 16,
            "ff_mult": 2,
            # Text conditioning: SpaceTimeUnet cross-attends to the caption's tokens (the digit
            # is one word of the caption, a small change to its pooled embedding but a token of
            # its own) and pools them for its time embedding.
            "cond_dim": 384,
            # Which frame comes first: without it the model draws the captioned path played
            # backwards about half the time (see spacetime.FramePositionEmbedding).
            "frame_pos_emb": True,
            # The mean of MiniLM's tokens hardly tells the diagonals apart (cosine 0.97-0.99
            # between them); learned attention pooling can weigh the direction words.
            "cond_pool": "attention",
        },
        "diffusion": {
            **_DIGITS_VIDEO,
            "timesteps": 1000,
            "beta_schedule": "cosine",
            "objective": "v",
            "loss_type": "l2",
            # Plain v-loss, no min-SNR weighting: min-SNR (Hang et al. 2023) weighs the noisiest
            # steps by ~snr, nearly zero, and on 16 px videos those are the steps that decide
            # where the digit starts and which way it goes (the ablation is in the README, "The
            # main job").
            "min_snr_loss_weight": False,
            "null_cond_prob": 0.1,
        },
        "trainer": {
            "train_num_steps": 3000,
            "max_seconds": 660.0,
            "train_batch_size": 16,
            "gradient_accumulate_every": 1,
            "train_lr": 2e-3,
            "warmup_steps": 50,
            "lr_schedule": "cosine",
            "min_lr_ratio": 0.05,
            "max_grad_norm": 1.0,
            "ema_decay": 0.99,
            "step_start_ema": 50,
            "update_ema_every": 1,
            "save_and_sample_every": 500,
            "num_sample_rows": 2,
            "cond_scale": 4.0,
            "sample_kwargs": {"sampler": "ddim", "steps": 25},
            "log_every": 10,
            "write_mp4": False,
        },
        "data": dict(_DIGITS_DATA),
        "sample": {
            "sampler": "ddim",
            "steps": 50,
            # Guidance 4: on the 3,000-step demo run it scores direction and digit as well as 8
            # and keeps the digit's shape better (the guidance sweep is in the README).
            "cond_scale": 4.0,
            # 4 videos per caption: 64 scored videos give intervals narrow enough to tell runs
            # apart (16 give +-20 points on an accuracy); sampling them costs about half a minute.
            "num_samples": 4,
            "batch_size": 16,
            "seed": 0,
            "captions": list(DEMO_CAPTIONS),
        },
    },
    "debug": {
        "unet": "space_time_unet",
        "unet_preset": "debug",
        "model": {"cond_dim": 384, "temporal_compression": [False, False]},
        "diffusion": {"image_size": 8, "num_frames": 4, "channels": 1, "timesteps": 20, "objective": "v",
                      "null_cond_prob": 0.1},
        "trainer": {"train_num_steps": 4, "train_batch_size": 2, "gradient_accumulate_every": 1,
                    "save_and_sample_every": 2, "num_sample_rows": 1, "step_start_ema": 0, "update_ema_every": 1,
                    "sample_kwargs": {"sampler": "ddim", "steps": 3}, "write_mp4": False},
        "data": {"kind": "moving-digits", "num_videos": 16, "digit_size": 4, "speed": 1.0},
        "sample": {"sampler": "ddim", "steps": 3, "cond_scale": 2.0, "captions": list(DEMO_CAPTIONS[:2])},
    },
}

# The same recipe with a 40-minute training budget instead of 11 minutes, on more distinct
# videos: what more compute buys without changing the model.
PRESETS["moving-digits-long"] = copy.deepcopy(PRESETS["moving-digits"])
PRESETS["moving-digits-long"]["trainer"].update(
    {"train_num_steps": 20000, "max_seconds": 2400.0, "save_and_sample_every": 1000}
)
PRESETS["moving-digits-long"]["data"]["num_videos"] = 20000

# The demo recipe trained as a rectified flow (diffusion.FlowMatching, Esser et al. 2024):
# same U-Net, data and budget; velocity loss at logit-normal times; sampled with Euler.
PRESETS["moving-digits-flow"] = copy.deepcopy(PRESETS["moving-digits"])
_flow = PRESETS["moving-digits-flow"]
for _key in ("timesteps", "beta_schedule", "objective", "min_snr_loss_weight"):
    _flow["diffusion"].pop(_key)
_flow["diffusion"].update({"process": "flow", "timestep_sampling": "logit_normal", "shift": 1.0})
_flow["trainer"]["sample_kwargs"] = {"sampler": "euler", "steps": 25}
_flow["sample"].update({"sampler": "euler", "steps": 50})
del _flow, _key

# The cascade's later stages train with the demo's optimiser recipe, batch 8, and a 9-minute
# budget (start-up and the final sample grid stay inside 10 minutes on 2 cores).
_STAGE_TRAINER: dict[str, Any] = {
    **{key: PRESETS["moving-digits"]["trainer"][key] for key in (
        "gradient_accumulate_every", "train_lr", "warmup_steps", "lr_schedule", "min_lr_ratio", "max_grad_norm",
        "ema_decay", "step_start_ema", "update_ema_every", "num_sample_rows", "log_every", "write_mp4")},
    "max_seconds": 540.0,
    "train_batch_size": 8,
    "save_and_sample_every": 1000,
}

# --- moving-digits-sr: the spatial super-resolution stage (diffusion.SuperResolution) ---
# 16 px -> 32 px moving digits (digit_size 16, 2 px per frame, 8 frames), the sizes a cascade
# gives it. No captions: the low-res video already shows the digit and its motion, so text
# would add nothing the condition lacks, and an unconditional stage loads no text encoder and
# serves any caption of the base. No attention either: SR is local (the upsampled condition
# is aligned with the output pixel for pixel); the temporal convolutions keep the frames
# consistent, and with no temporal down-sampling the U-Net takes any frame count (the 29
# frames of an interpolated video). Objective x0 with an L2 loss: the closest a diffusion
# loss comes to regressing the high-res pixels, which is what PSNR rewards.
PRESETS["moving-digits-sr"] = {
    "unet": "space_time_unet",
    "model": {
        "dim": 16,
        "dim_mult": [1, 2],
        "self_attns": [False, False],
        "temporal_compression": [False, False],
        "resnet_block_depths": [1, 1],
        "attn_heads": 2,
        "attn_dim_head": 16,
        "ff_mult": 2,
        "lowres_cond": True,
    },
    "diffusion": {"image_size": 32, "num_frames": 8, "channels": 1, "timesteps": 1000, "beta_schedule": "cosine",
                  "objective": "x0", "loss_type": "l2"},
    "super_resolution": {"lowres_size": 16, "downsample": "bicubic", "upsample": "bicubic", "noise_aug": 0.2,
                         "sample_noise_level": 0.05},
    "trainer": {**_STAGE_TRAINER, "train_num_steps": 4000, "sample_kwargs": {"sampler": "ddim", "steps": 10}},
    "data": {"kind": "moving-digits", "num_videos": 4000, "digit_size": 16, "speed": 2.0, "seed": 0},
    "sample": {"sampler": "ddim", "steps": 10, "batch_size": 16, "seed": 0},
}


def available_presets() -> list[str]:
    """Names of the run presets, sorted."""
    return sorted(PRESETS)


def get_preset(name: str) -> dict[str, Any]:
    """A deep copy of run preset `name`; unknown names raise ValueError listing the others."""
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint}; available: {', '.join(available_presets())}")
    return copy.deepcopy(PRESETS[name])


# Frame interpolation (Make-A-Video Sec. 3.4), the cascade's middle stage: 8 frames of the
# 1 px/frame base videos become 4 * (8 - 1) + 1 = 29 frames at 0.25 px/frame. Motion
# rendered at fractional positions (`data.subpixel`). Trained on 9-frame clips (3 given
# frames): 8x the steps of 29-frame clips in the budget, and better at 29 frames too
# (benchmarks/results/cpu-amd-epyc-2026-11-29-interp-speeds.md); with no temporal
# compression a SpaceTimeUnet takes any frame count, and `diffusion.Cascade` reads the stride
# from `frame_masks.strides`. Best sampled in windows of 9 frames (`windowed_interpolation`).
# Training masks: mostly every 4th frame given (interpolation, the stage's job), a fifth the
# first 2-6 frames (extrapolation: Make-A-Video trains one network for both). No captions:
# the given frames fix the digit and its path.
PRESETS["moving-digits-interp"] = {
    "unet": "space_time_unet",
    "model": {
        "dim": 16,
        "dim_mult": [1, 2, 4],
        "self_attns": [False, False, True],
        "temporal_compression": [False, False, False],
        "resnet_block_depths": [1, 1, 1],
        "attn_heads": 2,
        "attn_dim_head": 16,
        "ff_mult": 2,
        "frame_cond": True,
    },
    "diffusion": {"image_size": 16, "num_frames": 9, "channels": 1, "timesteps": 1000, "beta_schedule": "cosine",
                  "objective": "v", "loss_type": "l2"},
    "trainer": {
        **_STAGE_TRAINER,
        "train_num_steps": 3000,
        "sample_kwargs": {"sampler": "ddim", "steps": 25},
        "frame_masks": {"interpolate": 0.8, "future": 0.2, "first_frame": 0.0, "unconditional": 0.0,
                        "strides": [4], "context_frames": [2, 6]},
    },
    # Mixed speeds: given frames 4 apart are 1, 2 or 4 px apart. At 1 px (the cascade's
    # case) a bilinear sub-pixel shift is the linear blend of the whole-pixel frames, so only
    # the faster motion teaches following the digit rather than cross-fading.
    "data": {"kind": "moving-digits", "num_videos": 4000, "digit_size": 8, "speeds": [0.25, 0.5, 1.0],
             "subpixel": True, "seed": 0},
    "sample": {"sampler": "ddim", "steps": 25, "batch_size": 16, "seed": 0},
}
