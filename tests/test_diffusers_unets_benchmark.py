"""Smoke run of benchmarks/diffusers_unets.py (--quick: tiny configs, CPU, seconds)."""

from __future__ import annotations

import json

import pytest
import torch

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


@pytest.mark.slow
def test_separate_mode_runs_each_side_in_its_own_process(tmp_path):
    """--separate (for sizes whose two copies do not fit together): weights saved once, one
    process per side, same outputs, time and resident-memory figures for both."""
    argv = ["--separate", "--quick", "--models", "modelscope", "--modes", "train", "--rounds", "1",
            "--threads", "1", "--out", str(tmp_path)]
    assert diffusers_unets.main(argv) == 0
    (path,) = tmp_path.glob("*-diffusers-unets-separate.json")
    (row,) = json.loads(path.read_text())["rows"]
    assert row["separate"] and row["mode"] == "train"
    assert row["max_abs_diff"] < 1e-4
    for who in ("ours", "diffusers"):
        assert row[f"{who}_ms"] > 0 and row[f"{who}_mem_mb"] > 0
        assert row[f"{who}_peak_rss_mb"] >= row[f"{who}_rss_before_mb"] > 0
    assert row["ours_mem_mb"] < row["diffusers_mem_mb"]  # the lean ops keep less for backward


def test_separate_mode_refuses_animatediff(capsys):
    with pytest.raises(SystemExit) as err:
        diffusers_unets.main(["--separate", "--models", "animatediff"])
    assert err.value.code == 2
    assert "ModelScope only" in capsys.readouterr().err


def test_peak_rss_is_read_and_reset():
    before = diffusers_unets._status_kib("VmRSS")
    if before is None:
        pytest.skip("no /proc/self/status here")
    assert diffusers_unets._reset_peak_rss()
    assert diffusers_unets._status_kib("VmHWM") >= before


def test_fused_mode_is_labelled_and_comma_separated_modes_work(tmp_path):
    """train+fused: ours with the optimizer step inside backward against diffusers' plain
    step, the row saying so; `--modes a,b` as in the documented commands; `--tag` names the files."""
    argv = ["--quick", "--models", "animatediff", "--modes", "train+fused,train", "--tag", "fused",
            "--out", str(tmp_path)]
    assert diffusers_unets.main(argv) == 0
    (path,) = tmp_path.glob("*-diffusers-unets-fused.json")
    rows = {r["mode"]: r for r in json.loads(path.read_text())["rows"]}
    assert list(rows) == ["train", "train+fused"]  # the fused step's hooks come last
    assert rows["train"]["diffusers_side"] == "same step"
    assert rows["train+fused"]["diffusers_side"].startswith("plain AdamW step")
    for row in rows.values():
        assert row["max_abs_diff"] < 1e-4 and row["ours_ms"] > 0 and row["ours_mem_mb"] > 0
    (report,) = tmp_path.glob("*-diffusers-unets-fused.md")
    assert "diffusers ships no trainer" in report.read_text()


def test_unknown_mode_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as err:
        diffusers_unets.main(["--modes", "train,fast"])
    assert err.value.code == 2
    assert "--modes takes forward, train, train+ckpt, train+fused, got ['fast']" in capsys.readouterr().err


def test_fused_train_step_updates_ours_like_the_plain_one():
    """The benchmark's fused step is the trainer's optimizer: same weights after two steps."""
    import copy

    _, ours, cond_dim = diffusers_unets.build_pair("animatediff", "tiny")
    twin = copy.deepcopy(ours)
    x, t, cond = diffusers_unets._inputs("animatediff", cond_dim, batch=1, frames=4, side=8, device=torch.device("cpu"))
    plain = diffusers_unets.side_steps(ours, True, x, t, cond, "animatediff", torch.float32)["train"]
    fused = diffusers_unets.side_steps(twin, True, x, t, cond, "animatediff", torch.float32)["train+fused"]
    for _ in range(2):
        torch.testing.assert_close(plain(), fused(), atol=1e-6, rtol=0)
    for (name, a), b in zip(ours.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert all(p.grad is None for p in twin.parameters())


def test_both_separate_processes_get_the_same_allocator_settings(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    env = diffusers_unets.worker_env("reuse")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + diffusers_unets.REUSE_TUNABLES
    assert diffusers_unets.worker_env("default")["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert diffusers_unets.worker_env("reuse")["GLIBC_TUNABLES"] == diffusers_unets.REUSE_TUNABLES
    with pytest.raises(ValueError, match="'default' or 'reuse'"):
        diffusers_unets.worker_env("jemalloc")
