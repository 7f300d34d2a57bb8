"""Unet3D checkpoints saved by the v1 code (tests/fixtures/unet3d-v1, written by its
make_fixtures.py) load with `unets.load` and `unets.load_weights` and give the same outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import unets

torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures" / "unet3d-v1"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file())


def _run(net: torch.nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    kwargs = {"cond_mask": data["cond_mask"]} if "cond_mask" in data else {}
    with torch.no_grad():
        return net.eval()(data["x"], data["time"], data.get("cond"), **kwargs)


def test_every_case_is_present():
    assert CASES == ["plain", "pooled-full3d", "tokens-cross"]


@pytest.mark.parametrize("case", CASES)
def test_load_reproduces_the_saved_output(case):
    data = load_file(str(FIXTURES / case / "io.safetensors"))
    net = unets.load(FIXTURES / case)
    assert type(net).__name__ == "Unet3D"
    torch.testing.assert_close(_run(net, data), data["expected"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_load_weights_of_the_saved_state_dict(case):
    data = load_file(str(FIXTURES / case / "io.safetensors"))
    state = load_file(str(FIXTURES / case / "model.safetensors"))
    fresh = unets.build(unets.load(FIXTURES / case).config.to_dict())
    unets.load_weights(fresh, state)
    torch.testing.assert_close(_run(fresh, data), data["expected"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_cond_format_of_the_saved_configs(case):
    expected = {"plain": None, "pooled-full3d": "pooled", "tokens-cross": "tokens"}[case]
    assert unets.load(FIXTURES / case).cond_format == expected


def test_text2video_from_scratch_config():
    """text2video-from-scratch's U-Net options (video-diffusion-pytorch names): `block_type` is
    ignored whatever its value, `init_dim: null` means dim, bert conditioning fixes cond_dim."""
    options = {"dim": 8, "dim_mults": [1, 2], "attn_heads": 2, "attn_dim_head": 4, "resnet_groups": 4,
               "block_type": "basic", "use_sparse_linear_attn": True, "init_kernel_size": 7,
               "init_dim": None, "use_bert_text_cond": True}
    net = unets.build("unet3d", **options)
    reference = unets.build("unet3d", **(options | {"block_type": "resnet"}))
    assert net.config.block_type == "basic" and net.cond_format == "pooled" and net.cond_dim == 384
    assert [k for k, _ in net.named_parameters()] == [k for k, _ in reference.named_parameters()]
    reference.load_state_dict(net.state_dict())
    x, t, cond = torch.randn(1, 3, 2, 8, 8), torch.tensor([5]), torch.randn(1, 384)
    torch.testing.assert_close(_run(net, {"x": x, "time": t, "cond": cond}),
                               _run(reference, {"x": x, "time": t, "cond": cond}))
    with pytest.raises(TypeError, match="block_type"):
        unets.build("unet3d", **(options | {"block_type": 3}))
