"""text2video-from-scratch's flow, unchanged but for the imports: its `configs/default.yaml`
(CPU sizes: dim, dim_mults, image_size, steps, batch size, save period, results folder),
train.py's three constructors and `trainer.train()`, then generate.py's
`trainer.load(milestone=-1)` and `diffusion.sample(cond=[text], batch_size=1, cond_scale=2.0)`
(see shared/seeds/text2video-from-scratch-README.txt, "Configs" and "Generating Videos").
Every key of the seed's file is kept, with the seed's values where CPU time allows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

yaml = pytest.importorskip("yaml")
PIL = pytest.importorskip("PIL.Image")

REPO = Path(__file__).resolve().parents[1]

DEFAULT_YAML = """\
# Content: Default configuration file for training the TinySora model with text-to-video diffusion
training_data_dir: "./training_data" # Directory containing training data (text and video frames)
model:
  dim: 8 # Dimensionality of the model (embedding size)
  use_bert_text_cond: True # Enables BERT-based text conditioning for model input
  dim_mults: [1, 2] # Scaling factors for each model block (increasing depth)
  init_dim: null # Initial dimension, not specified (default is None)
  init_kernel_size: 7 # Kernel size for initial layers (often used for convolutional layers)
  use_sparse_linear_attn: True # Enables sparse attention mechanism for efficiency
  block_type: "basic" # Type of model block (e.g., 'basic', 'resnet', etc.)
diffusion:
  image_size: 16 # Height and width of the video frames
  num_frames: 5 # Number of frames in the video (sequence length)
  timesteps: 10 # Number of diffusion timesteps used during training
  loss_type: "l1" # Loss function for optimization ('l1' means L1 loss)
  use_dynamic_thres: False # Whether to use dynamic thresholding during training
  dynamic_thres_percentile: 0.9 # Threshold percentile used for dynamic thresholding
trainer:
  ema_decay: 0.995 # Exponential moving average decay rate for model weights
  train_batch_size: 2 # Number of samples per batch during training
  train_lr: 0.0001 # Learning rate for training
  train_num_steps: 4 # Total number of training steps (epochs)
  gradient_accumulate_every: 1 # How often to accumulate gradients (1 means no accumulation)
  amp: False # Whether to use automatic mixed precision for training (default: False)
  step_start_ema: 2000 # Step at which to start applying EMA smoothing
  update_ema_every: 10 # Frequency of updating EMA weights (every 10 steps)
  save_model_every: 2 # Save model every 2 steps
  results_folder: "./saved_models" # Folder where results (models, samples) are saved
  num_sample_rows: 4 # Number of rows to display during sampling (visualization)
  max_grad_norm: null # Maximum gradient norm for clipping (null means no clipping)
"""

CAPTIONS = ["a red square moves right", "a blue square moves left", "a green square stays still"]


def write_training_data(folder: Path, size: int = 16, frames: int = 5) -> None:
    """A few GIFs with a caption .txt each, as text2video-from-scratch's data scripts write."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    colours = [(255, 40, 40), (40, 40, 255), (40, 255, 40)]
    for index, (caption, colour) in enumerate(zip(CAPTIONS, colours)):
        images = []
        for frame in range(frames):
            pixels = rng.integers(0, 40, size=(size, size, 3), dtype=np.uint8)
            x = [2 + frame, 10 - frame, 6][index]
            pixels[6:10, x : x + 4] = colour
            images.append(PIL.fromarray(pixels))
        images[0].save(folder / f"video{index}.gif", save_all=True, append_images=images[1:], duration=100, loop=0)
        (folder / f"video{index}.txt").write_text(caption + "\n")


def save_video_as_gif_pil(video_tensor: torch.Tensor, output_path: str) -> None:
    # generate.py's helper, verbatim but for the print
    video_np = (video_tensor.squeeze(0).permute(1, 2, 3, 0).cpu().numpy() * 255).astype(np.uint8)
    frames = [PIL.fromarray(frame) for frame in video_np]
    frames[0].save(output_path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def test_train_py_then_generate_py(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_training_data(tmp_path / "training_data")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "default.yaml").write_text(DEFAULT_YAML)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # --- train.py, imports changed ----------------------------------------------------
        from diffusion import GaussianDiffusion, Trainer
        from unets import Unet3D

        with open("configs/default.yaml") as file:
            config = yaml.safe_load(file)
        model = Unet3D(**config["model"])
        diffusion = GaussianDiffusion(denoise_fn=model, **config["diffusion"])
        trainer = Trainer(diffusion_model=diffusion, **config["trainer"], folder=config["training_data_dir"])
        trainer.train()

        # --- generate.py --------------------------------------------------------------------
        trainer.load(milestone=-1)  # Load the latest model
        text_prompt = "a red square moves right"
        with torch.no_grad():
            generated_video = diffusion.sample(cond=[text_prompt], batch_size=1, cond_scale=2.0)
        Path("results").mkdir(parents=True, exist_ok=True)
        save_video_as_gif_pil(generated_video, "results/a_red_square_moves_right.gif")
    finally:
        torch.set_num_threads(threads)

    assert trainer.step == 4
    saved = sorted(p.name for p in (tmp_path / "saved_models").iterdir() if p.name.startswith("checkpoint-"))
    assert len(saved) >= 2  # a checkpoint every save_model_every=2 steps
    assert generated_video.shape == (1, 3, 5, 16, 16)
    assert torch.isfinite(generated_video).all()
    assert 0.0 <= float(generated_video.min()) and float(generated_video.max()) <= 1.0
    assert (tmp_path / "results" / "a_red_square_moves_right.gif").stat().st_size > 0


def test_spacetime_train_reads_the_seed_layout(tmp_path):
    """`spacetime train --config default.yaml` reads the same file as a unet3d run on the
    folder, with trainer.results_folder as the run folder."""
    write_training_data(tmp_path / "training_data")
    config_file = tmp_path / "default.yaml"
    config_file.write_text(DEFAULT_YAML)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "diffusion", "-q", "train", "--config", str(config_file), "--print-config"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["unet"] == "unet3d"
    assert printed["data"] == {"kind": "folder", "folder": "./training_data"}
    assert printed["model"]["block_type"] == "basic" and printed["trainer"]["save_model_every"] == 2
