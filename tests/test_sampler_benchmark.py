"""Smoke run of benchmarks/samplers.py (--quick: a tiny untrained model, CPU)."""

from __future__ import annotations

import json

import pytest

from benchmarks import samplers as samplers_bench


def test_samplers_quick(tmp_path, capsys):
    assert samplers_bench.main(["--quick", "--out", str(tmp_path), "--samplers", "dpmpp_2m,euler"]) == 0
    (report,) = tmp_path.glob("*-samplers-quick.json")
    rows = json.loads(report.read_text())["rows"]
    assert [(r["sampler"], r["steps"], r["guidance"]) for r in rows] == [
        ("ddim", 3, "two calls (baseline)"), ("dpmpp_2m", 2, "batched"), ("dpmpp_2m", 3, "batched"),
        ("euler", 2, "batched"), ("euler", 3, "batched"),
    ]
    for row in rows:
        assert 0.0 <= row["direction_accuracy"] <= 1.0 and 0.0 <= row["digit_accuracy"] <= 1.0
        assert row["seconds"] > 0 and row["time_vs_baseline"] > 0
    assert rows[0]["time_vs_baseline"] == 1.0
    assert (tmp_path / report.name.replace(".json", ".md")).read_text().startswith("# Samplers")
    assert "| dpmpp_2m | 2 | batched |" in capsys.readouterr().out


def test_samplers_benchmark_needs_a_checkpoint_or_quick(capsys):
    with pytest.raises(SystemExit):
        samplers_bench.main([])
    assert "--checkpoint is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        samplers_bench.main(["--quick", "--samplers", "plms"])
