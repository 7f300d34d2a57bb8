"""Smoke run of benchmarks/inflate.py --quick: both models, both settings, the written report."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from benchmarks import inflate as inflate_bench  # noqa: E402


def test_quick_run_writes_both_models_and_the_comparison(tmp_path):
    assert inflate_bench.main(["--quick", "--out", str(tmp_path), "--min-run-time", "0.01"]) == 0
    (report,) = tmp_path.glob("*-inflate-quick.json")
    payload = json.loads(report.read_text())
    rows = {(r["model"], r["checkpointing"]): r for r in payload["rows"]}
    assert set(rows) == {(m, c) for m in inflate_bench.MODELS for c in (False, True)}
    assert all(r["peak_mem_mb"] > 0 and r["step_s"] > 0 for r in rows.values())
    # Temporal-only: the inflated model trains fewer parameters than the motion adapter adds.
    assert rows[("inflate", False)]["trainable_m"] < rows[("animatediff", False)]["trainable_m"]
    # Checkpointing lowers the inflated model's peak step memory.
    assert rows[("inflate", True)]["peak_mem_mb"] < rows[("inflate", False)]["peak_mem_mb"]
    assert payload["comparison"][-1]["setting"].startswith("target")
    assert (tmp_path / report.name.replace(".json", ".md")).read_text().startswith("# Temporal-only")
