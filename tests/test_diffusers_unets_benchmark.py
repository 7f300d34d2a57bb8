"""Smoke run of benchmarks/diffusers_unets.py (--quick: tiny configs, CPU, seconds)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from benchmarks import diffusers_unets  # noqa: E402


def test_quick_run_writes_both_models_and_equal_outputs(tmp_path):
    assert diffusers_unets.main(["--quick", "--modes", "forward", "train+ckpt", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-diffusers-unets.json")
    rows = json.loads(path.read_text())["rows"]
    assert {(r["model"], r["mode"]) for r in rows} == {
        (m, mode) for m in ("modelscope", "animatediff") for mode in ("forward", "train+ckpt")
    }
    for row in rows:
        assert row["max_abs_diff"] < 1e-4, row
        assert row["ours_ms"] > 0 and row["diffusers_ms"] > 0
    # checkpointing keeps fewer activations than diffusers' plain (ModelScope) step
    ckpt = next(r for r in rows if r["model"] == "modelscope" and r["mode"] == "train+ckpt")
    assert ckpt["ours_mem_mb"] < ckpt["diffusers_mem_mb"]
    (report,) = tmp_path.glob("*-diffusers-unets.md")
    assert "| modelscope | tiny | forward |" in report.read_text()


def test_the_17b_config_is_the_public_one():
    from unets.convert import _modelscope_options
    from unets.modelscope import ModelScopeUnetConfig

    options = _modelscope_options({"_class_name": "UNet3DConditionModel", **diffusers_unets.MS_17B}, "ms-1.7b")
    options.pop("sample_size")
    assert options.pop("out_channels") == 4
    assert ModelScopeUnetConfig(**options) == ModelScopeUnetConfig()  # the registry's full-size defaults
