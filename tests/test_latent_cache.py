"""The VAE latent cache: encoded once, reused across epochs and runs, invalidated by a changed
file, recovered from a damaged shard with one warning."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("diffusers")

from byo_models import tiny_unet2d, tiny_vae  # noqa: E402
from diffusion import GaussianDiffusion, Trainer, media  # noqa: E402
from diffusion.latent import VideoVAE  # noqa: E402
from diffusion.latent_cache import LatentCache  # noqa: E402
from spacetime import inflate  # noqa: E402


class CountingVAE(VideoVAE):
    """Counts the videos the VAE encodes."""

    encoded = 0

    def encode(self, pixels):
        CountingVAE.encoded += pixels.shape[0]
        return super().encode(pixels)


def _diffusion():
    torch.manual_seed(0)
    unet = inflate(tiny_unet2d())
    return GaussianDiffusion(unet, image_size=16, num_frames=2, channels=3, timesteps=20,
                             vae=CountingVAE(tiny_vae()))


def _train(folder, results, cache, steps=2):
    trainer = Trainer(_diffusion(), str(folder), train_batch_size=2, gradient_accumulate_every=1,
                      train_num_steps=steps, save_and_sample_every=1000, results_folder=str(results),
                      latent_cache_dir=str(cache), step_start_ema=0, progress=False,
                      condition_on_captions=False)
    CountingVAE.encoded = 0
    trainer.train()
    return trainer, CountingVAE.encoded


@pytest.fixture
def folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    torch.manual_seed(0)
    for i in range(2):
        media.write_gif(torch.rand(3, 2, 16, 16), data / f"{i}.gif")
    return data


def test_epochs_and_runs_reuse_the_cache_and_a_changed_file_is_encoded(folder, tmp_path):
    cache = tmp_path / "cache"
    # Two steps of a full batch of both videos: the second step is the second epoch.
    trainer, encoded = _train(folder, tmp_path / "a", cache)
    assert encoded == 2 and trainer.latent_cache.hits == 2
    trainer, encoded = _train(folder, tmp_path / "b", cache)
    assert encoded == 0 and trainer.latent_cache.misses == 0
    media.write_gif(torch.rand(3, 2, 16, 16), folder / "1.gif")
    trainer, encoded = _train(folder, tmp_path / "c", cache)
    assert encoded == 1


def test_truncated_shard_is_recovered_with_one_warning(folder, tmp_path, caplog):
    cache = tmp_path / "cache"
    _train(folder, tmp_path / "a", cache, steps=1)
    shards = sorted(cache.rglob("*.safetensors"))
    assert len(shards) == 2
    for shard in shards:
        shard.write_bytes(shard.read_bytes()[:40])
    with caplog.at_level(logging.WARNING, logger="diffusion.latent_cache"):
        trainer, encoded = _train(folder, tmp_path / "b", cache)
    warnings = [r for r in caplog.records if "damaged" in r.getMessage()]
    assert encoded == 2 and trainer.latent_cache.recovered == 2 and len(warnings) == 1
    trainer, encoded = _train(folder, tmp_path / "c", cache)
    assert encoded == 0


def test_cache_equals_the_vae_and_is_keyed_by_the_vae(tmp_path):
    vae = VideoVAE(tiny_vae())
    cache = LatentCache(vae, tmp_path)
    pixels = torch.rand(2, 3, 2, 16, 16) * 2 - 1
    torch.testing.assert_close(cache.encode(pixels), vae.encode(pixels))
    torch.testing.assert_close(cache.encode(pixels), vae.encode(pixels))
    assert (cache.hits, cache.misses) == (2, 2)
    other = LatentCache(VideoVAE(tiny_vae(seed=3)), tmp_path)
    other.encode(pixels)
    assert other.misses == 2 and other.root != cache.root
    with pytest.raises(TypeError, match="VideoVAE"):
        LatentCache(tiny_vae(), tmp_path)


def test_concurrent_writers_leave_one_valid_entry(tmp_path):
    """Two ranks encoding the same video at once: each writes a temporary file and renames it
    into place, so the entry is whole whichever rename lands last."""
    import threading

    vae = VideoVAE(tiny_vae())
    pixels = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    caches = [LatentCache(vae, tmp_path) for _ in range(2)]
    results: list = [None, None]
    start = threading.Barrier(2)

    def work(i):
        start.wait()
        results[i] = caches[i].encode(pixels)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    torch.testing.assert_close(results[0], results[1])
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    fresh = LatentCache(vae, tmp_path)
    torch.testing.assert_close(fresh.encode(pixels), results[0])
    assert fresh.hits == 1 and fresh.recovered == 0
