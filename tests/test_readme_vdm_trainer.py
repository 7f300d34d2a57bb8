"""video-diffusion-pytorch's README "Training" example, with only the imports changed.

The example's sizes are shrunk so it runs in seconds on a CPU (dim, dim_mults, image_size,
num_frames, timesteps, batch size, steps, save period) and `.cuda()` is dropped, which
docs/api.md allows for CPU users. Every argument name and the call sequence are the README's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL.Image")


def _write_gifs(folder, count=3, size=16, frames=4):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        images = []
        for frame in range(frames):
            pixels = np.zeros((size, size, 3), dtype=np.uint8)
            # a bright square moving to the right, on noise
            pixels[:] = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            x = (2 * frame + index) % (size - 4)
            pixels[6:10, x : x + 4] = (255, 200 - 40 * index, 40 * index)
            images.append(PIL.fromarray(pixels))
        images[0].save(folder / f"clip{index}.gif", save_all=True, append_images=images[1:], duration=100, loop=0)


def test_readme_trainer_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_gifs(tmp_path / "data", size=8, frames=3)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # --- README, imports changed ---------------------------------------------------
        from unets import Unet3D
        from diffusion import GaussianDiffusion, Trainer

        model = Unet3D(
            dim = 8,
            dim_mults = (1, 2),
        )

        diffusion = GaussianDiffusion(
            model,
            image_size = 8,
            num_frames = 3,
            timesteps = 4,   # number of steps
            loss_type = 'l1'    # L1 or L2
        )

        trainer = Trainer(
            diffusion,
            './data',                         # this folder path needs to contain all your training data, as .gif files, of correct image size and number of frames
            train_batch_size = 2,
            train_lr = 1e-4,
            save_and_sample_every = 2,
            train_num_steps = 2,         # total training steps
            gradient_accumulate_every = 2,    # gradient accumulation steps
            ema_decay = 0.995,                # exponential moving average decay
            amp = True                        # turn on mixed precision
        )

        trainer.train()
        # --- end of README -------------------------------------------------------------
    finally:
        torch.set_num_threads(previous_threads)

    results = tmp_path / "results"
    assert trainer.step == 2
    assert (results / "1.gif").stat().st_size > 0  # "Sample videos (as gif files) will be saved to ./results"
    assert (results / "checkpoint-1" / "model.safetensors").is_file()
    assert (results / "latest").read_text().strip() == "checkpoint-1"
    records = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert all(np.isfinite(r["loss"]) for r in records)
    # the 4 x 4 sample grid: 16 videos of 8 x 8 with 2-pixel borders
    grid = PIL.open(results / "1.gif")
    assert grid.size == (4 * 10 + 2, 4 * 10 + 2)
