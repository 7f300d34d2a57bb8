"""The GaussianDiffusion examples of video-diffusion-pytorch's README (shared/seeds), run with
only the import lines changed.

Three reductions, each marked where it is made, keep the file fast on a shared CPU: sampling
calls the U-Net once per timestep (twice with guidance), and as written (dim 64, 32 x 32
frames, 1000 timesteps) one call takes seconds on a CPU and one `sample` most of an hour.
So `dim = 8` (README: 64), `image_size = 16` (README: 32, and the video shapes with it) and
`timesteps = 4` (README: 1000). Everything else (dim_mults, num_frames, batch sizes,
loss_type, the calls, the conditions, and the shapes they return) is as written.
"""

from __future__ import annotations

import torch


def test_readme_unconditional():
    import torch
    from unets import Unet3D; from diffusion import GaussianDiffusion  # noqa: E702

    model = Unet3D(
        dim = 8,  # README: 64
        dim_mults = (1, 2, 4, 8)
    )

    diffusion = GaussianDiffusion(
        model,
        image_size = 16,  # README: 32
        num_frames = 5,
        timesteps = 4,   # number of steps (README: 1000)
        loss_type = 'l1'    # L1 or L2
    )

    videos = torch.randn(1, 3, 5, 16, 16) # video (batch, channels, frames, height, width) - normalized from -1 to +1
    loss = diffusion(videos)
    loss.backward()

    # after a lot of training

    sampled_videos = diffusion.sample(batch_size = 4)
    assert sampled_videos.shape == (4, 3, 5, 16, 16)

    assert loss.ndim == 0 and torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert 0 <= sampled_videos.min() and sampled_videos.max() <= 1


def test_readme_tensor_condition():
    import torch
    from unets import Unet3D; from diffusion import GaussianDiffusion  # noqa: E702

    model = Unet3D(
        dim = 8,  # README: 64
        cond_dim = 64,
        dim_mults = (1, 2, 4, 8)
    )

    diffusion = GaussianDiffusion(
        model,
        image_size = 16,  # README: 32
        num_frames = 5,
        timesteps = 4,   # number of steps (README: 1000)
        loss_type = 'l1'    # L1 or L2
    )

    videos = torch.randn(2, 3, 5, 16, 16) # video (batch, channels, frames, height, width)
    text = torch.randn(2, 64)             # assume output of BERT-large has dimension of 64

    loss = diffusion(videos, cond = text)
    loss.backward()

    # after a lot of training

    sampled_videos = diffusion.sample(cond = text)
    assert sampled_videos.shape == (2, 3, 5, 16, 16)

    assert torch.isfinite(loss) and model.null_cond_emb is not None
    # The co-training call of the README's last section.
    loss = diffusion(videos, cond = text, prob_focus_present = 0.5) # for 50% of videos, focus on the present during training
    loss.backward()
    assert torch.isfinite(loss)


def test_readme_string_condition():
    import torch
    from unets import Unet3D; from diffusion import GaussianDiffusion  # noqa: E702

    model = Unet3D(
        dim = 8,  # README: 64
        use_bert_text_cond = True,  # this must be set to True to auto-use the bert model dimensions
        dim_mults = (1, 2, 4, 8),
    )

    diffusion = GaussianDiffusion(
        model,
        image_size = 16,    # height and width of frames (README: 32)
        num_frames = 5,     # number of video frames
        timesteps = 4,   # number of steps (README: 1000)
        loss_type = 'l1'    # L1 or L2
    )

    videos = torch.randn(3, 3, 5, 16, 16) # video (batch, channels, frames, height, width)

    text = [
        'a whale breaching from afar',
        'young girl blowing out candles on her birthday cake',
        'fireworks with blue and green sparkles'
    ]

    loss = diffusion(videos, cond = text)
    loss.backward()

    # after a lot of training

    sampled_videos = diffusion.sample(cond = text, cond_scale = 2)
    assert sampled_videos.shape == (3, 3, 5, 16, 16)

    assert torch.isfinite(loss) and torch.isfinite(sampled_videos).all()
    # The strings went through the offline default text encoder, not BERT.
    assert not any("text" in name or "bert" in name for name in diffusion.state_dict() if not name.startswith("denoise_fn."))
