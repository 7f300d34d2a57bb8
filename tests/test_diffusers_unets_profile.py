"""Smoke run of benchmarks/diffusers_unets_profile.py (--quick: tiny configs, CPU, seconds)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from benchmarks import diffusers_unets_profile as profile  # noqa: E402


def test_quick_profile_splits_the_step_and_names_the_lean_ops(tmp_path):
    assert profile.main(["--quick", "--models", "animatediff", "--top", "5", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-diffusers-unets-profile.json")
    data = json.loads(path.read_text())
    (result,) = data["results"]
    assert result["model"] == "animatediff"
    assert all(result["phases_ms"][f"{who}_{phase}"] > 0
               for who in ("ours", "diffusers") for phase in ("forward", "backward"))
    assert len(result["nodes"]) == len(result["ops"]) == 5
    # ours' backward runs the lean ops' own nodes, diffusers' does not
    names = {row["name"]: row for row in result["nodes"]}
    assert any(name.startswith("_") and row["ours_ms"] > 0 and row["diffusers_ms"] == 0
               for name, row in names.items())
    assert {row["lean_op"] for row in result["what_if"]} == set(profile.PLAIN_OPS)
    assert {row["lean_op"] for row in data["fixed_costs"]} == set(profile.PLAIN_OPS)
    (report,) = tmp_path.glob("*-diffusers-unets-profile.md")
    assert "| forward |" in report.read_text()


def test_plain_op_is_restored_and_gives_the_same_outputs():
    from unets import diffusers_layers, lean_ops

    _, ours, cond_dim = profile.pair.build_pair("animatediff", "tiny")
    x, t, cond = profile.pair._inputs("animatediff", cond_dim, batch=1, frames=4, side=8, device=torch.device("cpu"))
    lean = ours(x, t, cond=cond)
    for name in profile.PLAIN_OPS:
        with profile.plain_op(name):
            assert getattr(diffusers_layers, name) is profile.PLAIN_OPS[name]
            torch.testing.assert_close(ours(x, t, cond=cond), lean, atol=1e-5, rtol=0)
        assert getattr(diffusers_layers, name) is getattr(lean_ops, name)
