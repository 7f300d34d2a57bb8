"""How well does a super-resolution stage recover the high-resolution video?

PSNR and SSIM of the stage's outputs against the true high-resolution videos, beside the same
scores of the bicubic upsampling of the same low-resolution input (the baseline every SR
paper reports). The low-resolution input is made from held-out ground truth exactly as in
training (`SuperResolution.downsample`), so the scores say how much of what downsampling
removed the stage puts back.

- PSNR: `10 log10(1 / MSE)` per video over all its pixels (values in [0, 1]).
- SSIM (Wang, Bovik, Sheikh & Simoncelli 2004, "Image quality assessment: from error
  visibility to structural similarity", eq. 13): local means, variances and covariance under
  an 11x11 Gaussian window of standard deviation 1.5 (the paper's choice), constants
  `C1 = (0.01 L)^2`, `C2 = (0.03 L)^2`, `L = 1`; the map is taken where the window fits
  inside the frame (no padding, as the authors' reference code) and averaged per frame and
  channel, then over the video. Population (not sample) variances, as in the paper.
- Consistency: PSNR of the output downsampled against the low-resolution input: how closely
  the stage keeps what it was given (bicubic upsampling scores high here too, since
  downsampling nearly undoes it).

Every mean comes with a 95% interval (normal interval of the mean), and the gain over
bicubic with the interval of the paired per-video differences, which is narrower than the
two intervals side by side suggest because both methods see the same videos.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from diffusion.evaluate import mean_interval
from diffusion.super_resolution import back_project
from spacetime.checks import check_int, check_number

logger = logging.getLogger(__name__)

__all__ = ["HELD_OUT_SEED_OFFSET", "evaluate_sr_run", "evaluate_super_resolution", "gaussian_window",
           "held_out_digits", "psnr", "sr_results_table", "ssim"]

# Held-out moving digits are drawn with the training data's seed plus this offset.
HELD_OUT_SEED_OFFSET = 1_000_003


def _pair(pred: Tensor, target: Tensor) -> None:
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor) or pred.shape != target.shape:
        shapes = [tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for v in (pred, target)]
        raise ValueError(f"pred and target must be tensors of the same shape, got {shapes[0]} and {shapes[1]}")
    if pred.ndim not in (4, 5):
        raise ValueError(f"expected videos (B, C, F, H, W) or images (B, C, H, W), got shape {tuple(pred.shape)}")


def psnr(pred: Tensor, target: Tensor, *, data_range: float | int = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per video (or image) of the batch, `(B,)`; infinite
    for identical inputs."""
    _pair(pred, target)
    mse = (pred.double() - target.double()).pow(2).flatten(1).mean(dim=1)
    return (10.0 * torch.log10(float(data_range) ** 2 / mse)).float()


def gaussian_window(size: int = 11, sigma: float | int = 1.5) -> Tensor:
    """The normalised 1-D Gaussian of `size` taps (odd) and standard deviation `sigma`."""
    check_int("size", size, low=1)
    if size % 2 == 0:
        raise ValueError(f"size must be odd (a centred window), got {size}")
    check_number("sigma", float(sigma), low=0.0, low_open=True)
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-(x**2) / (2.0 * float(sigma) ** 2))
    return window / window.sum()


def ssim(
    pred: Tensor,
    target: Tensor,
    *,
    data_range: float | int = 1.0,
    window: int = 11,
    sigma: float | int = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Mean structural similarity per video (or image) of the batch, `(B,)` (module
    docstring). Frames must be at least `window` pixels on each side."""
    _pair(pred, target)
    if min(pred.shape[-2:]) < window:
        raise ValueError(f"frames of {tuple(pred.shape[-2:])} are smaller than the {window}x{window} SSIM window")
    batch = pred.shape[0]
    layout = "b c f h w -> (b c f) 1 h w" if pred.ndim == 5 else "b c h w -> (b c) 1 h w"
    x, y = (rearrange(v.double(), layout) for v in (pred, target))
    g = gaussian_window(window, sigma).to(x.device)
    # Separable filter, no padding: statistics only where the whole window is inside.
    def blur(v: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(v, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * float(data_range)) ** 2, (k2 * float(data_range)) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(dim=1).view(batch, -1).mean(dim=1).float()


def held_out_digits(
    config: Any, num_videos: int, *, seed: int | None = None, num_frames: int | None = None
) -> tuple[Tensor, int]:
    """`(videos (N, C, F, H, W), seed)`: moving digits drawn like the run's training data
    (`config`: a `RunConfig` with `data.kind: moving-digits`) but from another seed, by
    default the training seed plus `HELD_OUT_SEED_OFFSET`; `num_frames` (default: the
    run's) for longer videos than the stage trained on."""
    from diffusion.moving_digits import MovingDigits

    if config.data.kind != "moving-digits":
        raise ValueError(
            f"held-out ground truth needs a moving-digits run, this one trains on data.kind={config.data.kind!r}"
        )
    options = config.data.given()
    options.pop("num_videos", None)
    train_seed = options.pop("seed", 0)
    seed = train_seed + HELD_OUT_SEED_OFFSET if seed is None else seed
    if seed == train_seed:
        raise ValueError(f"seed={seed} is the training data's seed; held-out videos need another")
    d = config.diffusion
    frames = d.num_frames if num_frames is None else num_frames
    data = MovingDigits(num_videos, image_size=d.image_size, num_frames=frames, channels=d.channels,
                        seed=seed, **options)
    return torch.stack([data[i]["video"] for i in range(num_videos)]), seed


def _scores(values: Tensor) -> dict[str, Any]:
    listed = [float(v) for v in values]
    low, high = mean_interval(listed)
    return {"mean": sum(listed) / len(listed), "interval": [low, high]}


@torch.no_grad()
def evaluate_super_resolution(
    stage: Any,
    videos: Tensor,
    *,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
    **sample_kwargs: Any,
) -> dict[str, Any]:
    """Scores of `stage` (a `SuperResolution`) and of bicubic upsampling on the true
    high-resolution `videos` (N, C, F, H, W) in [0, 1]: PSNR, SSIM and consistency (module
    docstring), each with its mean, 95% interval and per-video values, plus the PSNR and SSIM
    gains over bicubic with paired intervals. `sample_kwargs` go to `stage.sample`
    (`sampler`, `steps`, `noise_level`, `back_projection` ...). With `back_projection` the
    bicubic videos back-projected as many steps are scored too ("bicubic_back_projected"):
    classical iterative back-projection, the fair baseline for that option."""
    check_int("batch_size", batch_size, low=1)
    device = stage.process.betas.device
    outputs, baselines, lows = [], [], []
    for start in range(0, videos.shape[0], batch_size):
        truth = videos[start : start + batch_size].to(device)
        low = stage.downsample(truth)
        outputs.append(stage.sample(low, generator=generator, **sample_kwargs).float().cpu())
        baselines.append(stage.upsample_baseline(low).float().cpu())
        lows.append(low.float().cpu())
    truth = videos.float().cpu()
    sr, bicubic, low = torch.cat(outputs), torch.cat(baselines), torch.cat(lows)
    results: dict[str, Any] = {"num_videos": int(videos.shape[0])}
    per_video: dict[str, dict[str, Tensor]] = {}
    methods = [("sr", sr), ("bicubic", bicubic)]
    steps = sample_kwargs.get("back_projection") or 0
    if steps:
        projected = back_project(bicubic, low, steps=steps, downsample=stage.downsample_mode,
                                 upsample=stage.upsample_mode)
        methods.append(("bicubic_back_projected", projected))
    for name, out in methods:
        per_video[name] = {
            "psnr": psnr(out, truth),
            "ssim": ssim(out, truth),
            "consistency_psnr": psnr(stage.downsample(out), low),
        }
        results[name] = {key: {**_scores(values), "values": [float(v) for v in values]}
                         for key, values in per_video[name].items()}
    for key in ("psnr", "ssim"):
        results[f"{key}_gain"] = _scores(per_video["sr"][key] - per_video["bicubic"][key])
    if not all(math.isfinite(v) for v in results["sr"]["psnr"]["values"]):
        logger.warning("some SR outputs equal their ground truth exactly: their PSNR is infinite")
    return results


def evaluate_sr_run(
    path: Any,
    *,
    num_videos: int = 32,
    data_seed: int | None = None,
    seed: int | None = None,
    num_frames: int | None = None,
    weights: str = "ema",
    device: Any = "cpu",
    batch_size: int | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    noise_level: float | int | None = None,
    back_projection: int = 0,
) -> dict[str, Any]:
    """`evaluate_super_resolution` of a super-resolution run folder (or checkpoint) on
    `num_videos` held-out moving digits (`held_out_digits` with `data_seed`, `num_frames` per
    video), sampled with `seed` (default the run's `sample.seed`); sampler, steps and batch size
    default to the run's `sample` section, the noise level to its `sample_noise_level`. The
    results also name the run, the checkpoint, both data seeds and the sampling options."""
    from diffusion.run import open_run
    from diffusion.super_resolution import SuperResolution

    check_int("num_videos", num_videos, low=1)
    run = open_run(path, weights, device=device)
    if not isinstance(run.diffusion, SuperResolution):
        raise ValueError(f"{path} is not a super-resolution run (its config has no super_resolution section)")
    videos, data_seed = held_out_digits(run.config, num_videos, seed=data_seed, num_frames=num_frames)
    defaults = run.config.sample
    options = {"sampler": sampler or defaults.sampler, "steps": steps or defaults.steps, "noise_level": noise_level,
               "back_projection": back_projection}
    generator = torch.Generator().manual_seed(defaults.seed if seed is None else seed)
    results = evaluate_super_resolution(run.diffusion, videos, batch_size=batch_size or defaults.batch_size,
                                        generator=generator, **options)
    results.update(run=str(run.run_dir), checkpoint=str(run.checkpoint), data_seed=data_seed,
                   num_frames=int(videos.shape[2]),
                   train_data_seed=run.config.data.seed or 0, **options)
    return results


def sr_results_table(results: dict[str, Any]) -> str:
    """A small text table of `evaluate_super_resolution`'s results."""
    def cell(entry: dict[str, Any], digits: int) -> str:
        low, high = entry["interval"]
        return f"{entry['mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"

    frames = f" of {results['num_frames']} frames" if "num_frames" in results else ""
    lines = [f"{results['num_videos']} held-out videos{frames}; mean [95% interval]",
             f"{'':<10} {'PSNR (dB)':<24} {'SSIM':<26} {'consistency PSNR (dB)':<24}"]
    for name, label in (("sr", "SR"), ("bicubic", "bicubic"), ("bicubic_back_projected", "bicubic+BP")):
        if name not in results:
            continue
        r = results[name]
        lines.append(f"{label:<10} {cell(r['psnr'], 2):<24} {cell(r['ssim'], 4):<26} "
                     f"{cell(r['consistency_psnr'], 2):<24}")
    lines.append(f"{'SR gain':<10} {cell(results['psnr_gain'], 2):<24} {cell(results['ssim_gain'], 4):<26}")
    return "\n".join(lines)
