"""The layer examples of make-a-video-pytorch's README (shared/seeds/make-a-video-pytorch-
README.txt), run as written with only the import line changed, plus checks of the shapes the
README states in its comments."""

import torch


def test_readme_passing_in_video_features():
    from spacetime import PseudoConv3d, SpatioTemporalAttention

    conv = PseudoConv3d(
        dim = 256,
        kernel_size = 3
    )

    attn = SpatioTemporalAttention(
        dim = 256,
        dim_head = 64,
        heads = 8
    )

    video = torch.randn(1, 256, 8, 16, 16) # (batch, features, frames, height, width)

    conv_out = conv(video) # (1, 256, 8, 16, 16)
    attn_out = attn(video) # (1, 256, 8, 16, 16)

    assert conv_out.shape == (1, 256, 8, 16, 16)
    assert attn_out.shape == (1, 256, 8, 16, 16)


def test_readme_passing_in_images():
    from spacetime import PseudoConv3d, SpatioTemporalAttention

    conv = PseudoConv3d(
        dim = 256,
        kernel_size = 3
    )

    attn = SpatioTemporalAttention(
        dim = 256,
        dim_head = 64,
        heads = 8
    )

    images = torch.randn(1, 256, 16, 16) # (batch, features, height, width)

    conv_out = conv(images) # (1, 256, 16, 16)
    attn_out = attn(images) # (1, 256, 16, 16)

    assert conv_out.shape == (1, 256, 16, 16)
    assert attn_out.shape == (1, 256, 16, 16)
    # "The temporal modules are initialized to output identity": a one-frame video through the
    # convolution (time on) gives the image result.
    torch.testing.assert_close(conv(images[:, :, None])[:, :, 0], conv_out)


def test_readme_training_only_spatially():
    from spacetime import PseudoConv3d, SpatioTemporalAttention

    conv = PseudoConv3d(
        dim = 256,
        kernel_size = 3
    )

    attn = SpatioTemporalAttention(
        dim = 256,
        dim_head = 64,
        heads = 8
    )

    video = torch.randn(1, 256, 8, 16, 16) # (batch, features, frames, height, width)

    # below it will not train across time

    conv_out = conv(video, enable_time = False) # (1, 256, 8, 16, 16)
    attn_out = attn(video, enable_time = False) # (1, 256, 8, 16, 16)

    assert conv_out.shape == (1, 256, 8, 16, 16)
    assert attn_out.shape == (1, 256, 8, 16, 16)
    # "It will not train across time": no gradient reaches the temporal parameters.
    (conv_out.sum() + attn_out.sum()).backward()
    assert conv.temporal.weight.grad is None
    assert all(p.grad is None for p in attn.temporal.parameters())
