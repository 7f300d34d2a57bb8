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
