"""diffusion: the pluggable diffusion process, trainer, video data, text encoders and CLI."""

from diffusion.gaussian import GaussianDiffusion, NonFiniteSampleError, threshold_x0
from diffusion.flow import FlowMatching
from diffusion.samplers import ddim_sample, ddim_timesteps, ddpm_sample, sample_loop
from diffusion.schedules import (
    NoiseSchedule,
    beta_schedule,
    cosine_beta_schedule,
    linear_beta_schedule,
    prediction_to_x0_eps,
    sigmoid_beta_schedule,
)
from diffusion.data import VideoFolder, collate_videos
from diffusion.ema import EMA
from diffusion.evaluate import evaluate_folder, evaluate_videos, results_table
from diffusion.moving_digits import MovingDigits, parse_caption, write_moving_digits
from diffusion.denoiser import DiffusersDenoiser, as_denoiser
from diffusion.latent import VideoVAE
from diffusion.latent_cache import LatentCache
from diffusion.text import (
    CachedTextEncoder,
    CLIPTextEncoder,
    HFTextEncoder,
    TextEmbedding,
    TextEncoder,
    default_text_encoder,
)
from diffusion.trainer import NonFiniteLossError, Trainer
from diffusion.run import load_run
from diffusion.super_resolution import SuperResolution
from diffusion.cascade import Cascade, StageOptions
