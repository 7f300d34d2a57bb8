"""Trainer: exact resume, atomic checkpoints, interrupts, non-finite losses, outputs.

Uses a tiny denoiser and a hash-based text encoder defined here, so each run is a fraction
of a second on one CPU core."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from diffusion import checkpoint as ckpt
from diffusion.gaussian import GaussianDiffusion
from diffusion.text import TextEmbedding, TextEncoder
from diffusion.trainer import NonFiniteLossError, StepOrderSampler, Trainer

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red ball", "two digits", "a red ball", "", "moving squares"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These tensors are tiny: a second intra-op thread only adds contention on a shared CPU.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class TinyDenoiser(nn.Module):
    """Spatial conv + temporal conv (masked by enable_time) + timestep and condition embeddings,
    following the U-Net call convention of docs/design.md."""

    def __init__(self, channels: int = 1, dim: int = 8, cond_dim: int | None = None, timesteps: int = 1000):
        super().__init__()
        self.config = SimpleNamespace(cond_dim=cond_dim)
        self.inp = nn.Conv3d(channels, dim, (1, 3, 3), padding=(0, 1, 1))
        self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), padding=(1, 0, 0))
        self.t_emb = nn.Embedding(timesteps, dim)
        self.cond_proj = nn.Linear(cond_dim, dim) if cond_dim else None
        self.null_cond = nn.Parameter(torch.zeros(cond_dim)) if cond_dim else None
        self.out = nn.Conv3d(dim, channels, (1, 3, 3), padding=(0, 1, 1))
        self.calls: list[dict] = []

    def forward(self, x, t, *, cond=None, cond_mask=None, null_cond_prob=0.0, enable_time=True, **unused):
        image = x.ndim == 4
        self.calls.append({"ndim": x.ndim, "enable_time": enable_time, "cond": cond is not None})
        if image:
            x, enable_time = x[:, :, None], False
        h = self.inp(x) + self.t_emb(t)[:, :, None, None, None]
        if cond is not None:
            if cond.ndim == 3:
                mask = cond_mask[..., None].float()
                cond = (cond * mask).sum(1) / mask.sum(1).clamp(min=1)
            keep = torch.rand(cond.shape[0], device=cond.device) >= null_cond_prob
            cond = torch.where(keep[:, None], cond, self.null_cond)
            h = h + self.cond_proj(cond)[:, :, None, None, None]
        if isinstance(enable_time, bool):
            enable_time = torch.full((x.shape[0],), enable_time, device=x.device)
        h = h + self.time_conv(h) * enable_time.view(-1, 1, 1, 1, 1).to(h.dtype)
        out = self.out(F.silu(h))
        return out[:, :, 0] if image else out


class HashTextEncoder(TextEncoder):
    """Deterministic, weightless: token i of a text embeds its i-th word's hash."""

    def __init__(self, dim: int = 6):
        self._dim = dim
        self.seen: list[str] = []

    @property
    def dim(self):
        return self._dim

    @property
    def fingerprint(self):
        return f"hash-{self._dim}"

    def encode(self, texts, *, device=None):
        self.seen.extend(texts)
        words = [text.split() or [""] for text in texts]
        length = max(len(w) for w in words)
        tokens = torch.zeros(len(texts), length, self._dim)
        mask = torch.zeros(len(texts), length, dtype=torch.bool)
        for i, row in enumerate(words):
            for j, word in enumerate(row):
                g = torch.Generator().manual_seed(sum(map(ord, word)) + 7 * len(word))
                tokens[i, j] = torch.randn(self._dim, generator=g)
                mask[i, j] = True
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return TextEmbedding(tokens=tokens, mask=mask, pooled=pooled)


class Videos(Dataset):
    """Random videos with captions; `on_fetch(n)` runs before the n-th item is returned."""

    def __init__(self, n=5, channels=1, frames=4, size=8, on_fetch=None):
        g = torch.Generator().manual_seed(123)
        self.videos = torch.rand(n, channels, frames, size, size, generator=g)
        self.captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
        self.on_fetch = on_fetch
        self.fetches = 0
        self.poison = False

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, index):
        self.fetches += 1
        if self.on_fetch is not None:
            self.on_fetch(self.fetches)
        video = self.videos[index]
        if self.poison:
            video = torch.full_like(video, float("nan"))
        return {"video": video, "caption": self.captions[index]}


def make_diffusion(*, text=True, seed=0):
    torch.manual_seed(seed)
    encoder = HashTextEncoder() if text else None
    denoiser = TinyDenoiser(cond_dim=encoder.dim if text else None, timesteps=10)
    return GaussianDiffusion(
        denoiser, image_size=8, num_frames=4, channels=1, timesteps=10, loss_type="l2",
        text_encoder=encoder, null_cond_prob=0.25,
    )


def make_trainer(results, dataset=None, *, diffusion=None, **overrides):
    options = dict(
        dataset=dataset if dataset is not None else Videos(),
        train_batch_size=3,
        gradient_accumulate_every=2,
        train_num_steps=6,
        save_and_sample_every=3,
        step_start_ema=2,
        update_ema_every=1,
        num_sample_rows=2,
        results_folder=results,
        train_lr=1e-2,
        warmup_steps=2,
        max_grad_norm=1.0,
        image_phase_steps=1,
        image_ratio=0.34,
        write_mp4=False,
        progress=False,
        seed=7,
    )
    options.update(overrides)
    return Trainer(diffusion if diffusion is not None else make_diffusion(), **options)


def run(trainer):
    losses = []
    trainer.train(log_fn=lambda record: losses.append(record["loss"]))
    return losses


def assert_same_weights(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    trainer = make_trainer(tmp_path_factory.mktemp("reference"))
    losses = run(trainer)
    assert len(losses) == 6 and trainer.step == 6
    return trainer, losses


@pytest.mark.parametrize("how", ["sigint", "exception"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, reference, how):
    ref_trainer, ref_losses = reference
    # 6 items fetched per step (batch 3 x 2 micro-batches); fire during step 4's 2nd micro-batch.
    target = 4 * 6 + 5

    def on_fetch(n):
        if n == target:
            if how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise KeyboardInterrupt

    first = make_trainer(tmp_path, Videos(on_fetch=on_fetch))
    losses = run(first)
    assert first.interrupted
    # SIGINT lets the step in flight finish; an exception drops it.
    stopped_at = 5 if how == "sigint" else 4
    assert first.step == stopped_at and len(losses) == stopped_at
    assert (tmp_path / "latest").read_text().strip() == f"checkpoint-step-{stopped_at}"

    resumed = make_trainer(tmp_path, diffusion=make_diffusion(seed=99), resume=True)
    assert resumed.step == stopped_at
    losses += run(resumed)
    assert losses == ref_losses  # exactly, not approximately
    assert_same_weights(resumed.model, ref_trainer.model)
    assert_same_weights(resumed.ema_model, ref_trainer.ema_model)
    # metrics were rewritten from the checkpoint on, not duplicated
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(6))


def test_load_by_milestone_restores_that_state(tmp_path):
    trainer = make_trainer(tmp_path, train_num_steps=6)
    run(trainer)
    trainer.load(1)
    assert trainer.step == 3
    again = make_trainer(tmp_path, diffusion=make_diffusion(seed=5))
    again.load(1)
    assert_same_weights(again.model, trainer.model)
    again.load("latest")
    assert again.step == 6
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        again.load(7)


def test_checkpoint_files_are_safetensors_and_weights_only(tmp_path):
    from safetensors.torch import load_file

    trainer = make_trainer(tmp_path, train_num_steps=3)
    run(trainer)
    folder = tmp_path / "checkpoint-1"
    assert sorted(p.name for p in folder.iterdir()) == ["ema.safetensors", "model.safetensors", "state.pt"]
    weights = load_file(folder / "model.safetensors")
    assert weights.keys() == trainer.model.state_dict().keys()
    state = torch.load(folder / "state.pt", weights_only=True)
    assert state["step"] == 3 and state["seed"] == 7
    assert set(state["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, train_num_steps=3)
    run(trainer)
    before = (tmp_path / "checkpoint-1" / "model.safetensors").read_bytes()
    real_atomic_write = ckpt.atomic_write

    def torn_save_state(state, path):
        def write(tmp):
            tmp.write_bytes(b"PK\x03\x04 half a pickle")
            raise OSError("disk full (simulated)")

        return real_atomic_write(path, write)

    monkeypatch.setattr(ckpt, "save_state", torn_save_state)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    for milestone in (2, 1):  # a new milestone, and overwriting the existing one
        with pytest.raises(OSError, match="disk full"):
            trainer.save(milestone)
    monkeypatch.undo()

    assert not (tmp_path / "checkpoint-2").exists()
    assert (tmp_path / "checkpoint-1" / "model.safetensors").read_bytes() == before
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-1"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    fresh = make_trainer(tmp_path, resume=True)
    assert fresh.step == 3


def test_kill_during_save_keeps_old_checkpoint_loadable(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_trainer import make_trainer
        trainer = make_trainer({str(tmp_path)!r}, train_num_steps=6)
        trainer.sample_and_save = lambda milestone: None  # only the checkpoint matters here
        real_save = torch.save
        def dying_save(obj, f, *args, **kwargs):
            if obj.get("step") == 6:
                with open(f, "wb") as handle:
                    handle.write(b"torn")
                    handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)
        torch.save = dying_save
        trainer.train()
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-1"
    assert not (tmp_path / "checkpoint-2").exists()
    assert any(p.name.startswith(".checkpoint-2.tmp") for p in tmp_path.iterdir())  # debris of the kill

    resumed = make_trainer(tmp_path, resume=True)
    assert resumed.step == 3
    run(resumed)
    assert resumed.step == 6 and (tmp_path / "checkpoint-2" / "state.pt").is_file()
    assert not any(p.name.startswith(".checkpoint-2.tmp") for p in tmp_path.iterdir())


def test_non_finite_loss_stops_without_saving(tmp_path):
    data = Videos()
    trainer = make_trainer(tmp_path, data, train_num_steps=3)
    run(trainer)
    data.poison = True
    trainer.train_num_steps = 6
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3.*checkpoint-1"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-1"
    data.poison = False
    again = make_trainer(tmp_path, data, resume=True)
    assert again.step == 3
    for p in again.model.parameters():
        assert torch.isfinite(p).all()


def test_outputs_metrics_samples_and_captions(tmp_path):
    trainer = make_trainer(tmp_path, train_num_steps=3, write_mp4=True, cond_scale=2.0)
    run(trainer)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    for record in records:
        assert {"step", "loss", "lr", "grad_norm", "it_per_s"} <= record.keys()
        assert record["grad_norm"] >= 0 and record["it_per_s"] > 0
    # linear warm-up over 2 steps, then constant
    assert [r["lr"] for r in records] == pytest.approx([5e-3, 1e-2, 1e-2])
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert (tmp_path / "1.gif").stat().st_size > 0
    captions = (tmp_path / "1.txt").read_text().splitlines()
    assert captions == CAPTIONS[:4]
    try:
        import av  # noqa: F401
        import imageio  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "1.mp4").stat().st_size > 0


def test_each_caption_encoded_once(tmp_path):
    diffusion = make_diffusion()
    encoder = diffusion.text_encoder
    trainer = make_trainer(tmp_path, diffusion=diffusion, train_num_steps=3)
    run(trainer)
    assert len(encoder.seen) == len(set(encoder.seen)) == len(set(CAPTIONS))
    assert trainer.text_encoder.num_encoded == len(set(CAPTIONS))
    assert trainer.condition_on_captions
    assert all(call["cond"] for call in diffusion.denoise_fn.calls)


def test_image_phase_then_mixed_batches(tmp_path):
    diffusion = make_diffusion(text=False)
    calls = diffusion.denoise_fn.calls
    trainer = make_trainer(tmp_path, diffusion=diffusion, train_num_steps=3, save_and_sample_every=100, image_phase_steps=1)
    run(trainer)
    assert not trainer.condition_on_captions
    phase, rest = calls[:2], calls[2:6]  # 2 micro-batches per step
    assert all(call["ndim"] == 4 for call in phase)
    for call in rest:
        assert call["ndim"] == 5
        assert call["enable_time"].tolist().count(False) == 1  # round(0.34 * 3)
        assert not call["cond"]


def test_step_order_sampler_is_a_function_of_position():
    a = StepOrderSampler(7, seed=3)
    stream = [x for _, x in zip(range(30), iter(a))]
    b = StepOrderSampler(7, seed=3, start=11)
    assert [x for _, x in zip(range(19), iter(b))] == stream[11:]
    assert sorted(stream[7:14]) == list(range(7))  # each epoch is a permutation
    assert stream[:7] != stream[7:14]


def test_amp_uses_bf16_on_cpu(tmp_path):
    trainer = make_trainer(tmp_path, amp=True, train_num_steps=2, save_and_sample_every=2, image_phase_steps=0)
    assert trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    losses = run(trainer)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_plain_tensor_dataset_and_user_errors(tmp_path):
    class Plain(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.rand(1, 4, 8, 8)

    trainer = make_trainer(tmp_path, Plain(), diffusion=make_diffusion(text=False), train_num_steps=1)
    assert len(run(trainer)) == 1
    with pytest.raises(ValueError, match="exactly one"):
        Trainer(make_diffusion(), None)
    with pytest.raises(ValueError, match="exactly one"):
        Trainer(make_diffusion(), tmp_path, dataset=Plain())
    with pytest.raises(ValueError, match="image_ratio"):
        make_trainer(tmp_path, image_ratio=1.5)
    with pytest.raises(ValueError, match="train_batch_size"):
        make_trainer(tmp_path, train_batch_size=0)
    with pytest.raises(TypeError, match="GaussianDiffusion"):
        Trainer(nn.Linear(2, 2), dataset=Plain())


@pytest.mark.slow
def test_compiled_training_runs_and_checkpoints_plain_names(tmp_path):
    trainer = make_trainer(tmp_path, compile=True, train_num_steps=3, image_phase_steps=0, image_ratio=0.0)
    losses = run(trainer)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "checkpoint-1" / "model.safetensors").keys()
    assert keys == trainer.model.state_dict().keys() and not any("_orig_mod" in k for k in keys)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_amp_training_and_resume(tmp_path):
    trainer = make_trainer(tmp_path, device="cuda", amp=True, train_num_steps=3)
    assert trainer.amp_dtype in (torch.bfloat16, torch.float16)
    losses = run(trainer)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    resumed = make_trainer(tmp_path, device="cuda", amp=True, train_num_steps=4, resume=True)
    assert resumed.step == 3 and next(resumed.model.parameters()).is_cuda
    run(resumed)
    assert resumed.step == 4
