"""Soak: 2,000 steps of a debug-size U-Net on a folder of GIFs, on CPU.

Checked: resident memory stays flat (no growth beyond allocator noise between the second
quarter and the last quarter of the run), CPU time per step stays flat, and the process
holds the same open file descriptors from step 500 to the end (every step opens GIFs; every
250th writes a checkpoint, a sample grid and a loss plot). Before the first loss plot
matplotlib opens its font files once and keeps them open (its font cache): that one-time
difference between before and after the run is the only one allowed. The figures are printed (`-s`) and
written to `soak.json` in the run folder.

Slow (several minutes on one core): run with `make test-slow` or `pytest -m slow`.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

STEPS = 2000
WINDOW = 100


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        resident_pages = int(handle.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def open_fds() -> list[str]:
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{name}"))
        except OSError:  # the descriptor of the listing itself, closed meanwhile
            pass
    return sorted(fds)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc (Linux)")
def test_soak_memory_throughput_and_file_handles_stay_flat(tmp_path):
    import unets
    from diffusion import GaussianDiffusion, Trainer, media

    torch.set_num_threads(1)
    folder = tmp_path / "videos"
    generator = torch.Generator().manual_seed(0)
    for index in range(12):
        media.write_gif(torch.rand(1, 6, 12, 12, generator=generator), folder / f"clip{index}.gif")
    torch.manual_seed(0)
    denoiser = unets.build("unet3d", preset="debug", channels=1)
    diffusion = GaussianDiffusion(denoiser, image_size=8, num_frames=4, channels=1, timesteps=50)
    trainer = Trainer(
        diffusion,
        folder,
        train_batch_size=2,
        gradient_accumulate_every=1,
        train_num_steps=STEPS,
        save_and_sample_every=250,
        step_start_ema=100,
        update_ema_every=10,
        num_sample_rows=1,
        sample_kwargs={"sampler": "ddim", "steps": 5},
        results_folder=tmp_path / "run",
        write_mp4=False,
        progress=False,
        log_every=10,
    )
    samples: list[dict[str, float]] = []
    window = {"cpu": time.process_time(), "wall": time.perf_counter()}

    def probe(record):
        if trainer.step % WINDOW == 0:
            cpu, wall = time.process_time(), time.perf_counter()
            samples.append({
                "step": trainer.step,
                "rss_mb": rss_mb(),
                "cpu_ms_per_step": 1000 * (cpu - window["cpu"]) / WINDOW,
                "wall_ms_per_step": 1000 * (wall - window["wall"]) / WINDOW,
                "open_fds": len(open_fds()),
            })
            if trainer.step == 500:
                fds_at_500.extend(open_fds())
            window.update(cpu=cpu, wall=wall)

    fds_at_500: list[str] = []
    fds_before = open_fds()
    started = time.perf_counter()
    trainer.train(log_fn=probe)
    seconds = time.perf_counter() - started
    fds_after = open_fds()
    assert trainer.step == STEPS and len(samples) == STEPS // WINDOW

    # The first quarter holds warm-up (allocator pools, the first checkpoint and sample,
    # matplotlib's import); from then on nothing may accumulate.
    quarter = len(samples) // 4
    early = samples[quarter : 2 * quarter]
    late = samples[-quarter:]
    rss_early = statistics.median(s["rss_mb"] for s in early)
    rss_late = statistics.median(s["rss_mb"] for s in late)
    cpu_early = statistics.median(s["cpu_ms_per_step"] for s in early)
    cpu_late = statistics.median(s["cpu_ms_per_step"] for s in late)
    figures = {
        "steps": STEPS,
        "seconds": round(seconds, 1),
        "rss_mb_first_window": round(samples[0]["rss_mb"], 1),
        "rss_mb_median_2nd_quarter": round(rss_early, 1),
        "rss_mb_median_last_quarter": round(rss_late, 1),
        "rss_mb_max": round(max(s["rss_mb"] for s in samples), 1),
        "cpu_ms_per_step_2nd_quarter": round(cpu_early, 2),
        "cpu_ms_per_step_last_quarter": round(cpu_late, 2),
        "wall_ms_per_step_median": round(statistics.median(s["wall_ms_per_step"] for s in samples), 2),
        "open_fds_before": len(fds_before),
        "open_fds_at_step_500": len(fds_at_500),
        "open_fds_after": len(fds_after),
        "open_fds_max_after_500": max(s["open_fds"] for s in samples if s["step"] >= 500),
        "windows": samples,
    }
    (tmp_path / "run" / "soak.json").write_text(json.dumps(figures, indent=1))
    print("soak:", json.dumps({k: v for k, v in figures.items() if k != "windows"}))

    assert fds_after == fds_at_500, sorted(set(fds_after) ^ set(fds_at_500))
    assert figures["open_fds_max_after_500"] == len(fds_at_500), figures
    one_time = set(fds_after) - set(fds_before)
    assert all("matplotlib" in path and path.endswith(".ttf") for path in one_time), one_time
    assert set(fds_before) <= set(fds_after), set(fds_before) - set(fds_after)
    assert rss_late - rss_early < 16.0, figures  # MB: allocator noise, not a per-step leak
    assert cpu_late < 1.3 * cpu_early, figures
