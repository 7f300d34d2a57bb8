"""benchmarks/gpu_check.sh: the no-CUDA exit, the CPU dry run end to end, and the summary's
target logic (benchmarks/gpu_summary.py) on hand-made inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import gpu_summary

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STEPS = ("environment", "wheels", "pytest", "attention", "attention-flex", "unet-eager", "unet-compile",
         "train", "inflate", "diffusers")

needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "GPU_CHECK_WHEELS": str(tmp_path / "no-wheels")}
    env.pop("GPU_CHECK_DRY_RUN", None)
    env.update(extra)
    return env


@needs_bash
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_there_is_nothing_to_check(tmp_path):
    started = time.monotonic()
    done = subprocess.run(["bash", str(SCRIPT)], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "nothing to check" in done.stdout
    assert time.monotonic() - started < 30
    assert not (tmp_path / "out").exists()


@needs_bash
def test_unknown_argument_is_refused(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--fast"], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2
    assert "--fast" in done.stderr and "--dry-run" in done.stderr


@needs_bash
def test_dry_run_writes_summary_and_files(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=_env(tmp_path), capture_output=True,
                          text=True, timeout=400, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files
    for name in ("summary.md", "summary.json", "attention.csv", "unet.csv", "logs.tar.gz"):
        assert name in files, files
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    steps = {s["step"]: s for s in summary["steps"]}
    assert set(steps) == set(STEPS)
    # Every step ran to its end inside its limit (none timed out), and the steps whose code has
    # no known CPU-only failure succeeded.
    assert all(s["status"] != "TIMEOUT" for s in steps.values()), steps
    for name in ("environment", "pytest", "attention", "attention-flex", "unet-eager", "train"):
        assert steps[name]["status"] == "ok", steps[name]
    assert steps["wheels"]["status"] == "SKIP" and steps["unet-compile"]["status"] == "SKIP"
    targets = {t["target"]: t for t in summary["targets"]}
    assert all(t["result"] in ("PASS", "FAIL", "N/A") for t in targets.values())
    measured = [t for t in targets.values() if t["value"] is not None]
    assert any("memory roofline" in name for name in targets) and any("auto" in name for name in targets)
    assert len(measured) >= 4
    text = (out / "summary.md").read_text()
    assert "DRY RUN" in text and "| target |" in text
    for t in summary["targets"]:
        assert t["target"] in text and t["result"] in text
    assert "gpu_check: done" in done.stdout and "| target |" in done.stdout
    with tarfile.open(out / "logs.tar.gz") as archive:
        names = archive.getnames()
    assert any(n.endswith("logs/attention.log") for n in names)
    assert any(n.endswith("steps.tsv") for n in names)
    # The scratch folder is removed.
    assert not list(tmp_path.glob("gpu_check.*"))


def _write_metrics(path: Path, losses: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"step": i, "loss": v}) + "\n" for i, v in enumerate(losses)))


def test_loss_check(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics, [1.0 - 0.004 * i for i in range(200)])
    assert gpu_summary.loss_check(metrics, 200)["result"] == "PASS"
    assert gpu_summary.loss_check(metrics, 300)["result"] == "FAIL"  # stopped short
    _write_metrics(metrics, [0.5 + 0.001 * i for i in range(200)])
    assert gpu_summary.loss_check(metrics, 200)["result"] == "FAIL"  # rising
    _write_metrics(metrics, [1.0] * 100 + [float("nan")] + [0.1] * 99)
    check = gpu_summary.loss_check(metrics, 200)
    assert check["result"] == "FAIL" and "NON-FINITE" in check["where"]
    assert gpu_summary.loss_check(tmp_path / "missing.jsonl", 200)["result"] == "FAIL"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.01, 10.0), min_size=2, max_size=60))
def test_loss_check_agrees_with_window_means(losses):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "metrics.jsonl"
        _write_metrics(path, losses)
        check = gpu_summary.loss_check(path, len(losses))
    window = min(gpu_summary.LOSS_WINDOW, len(losses) // 2)
    falling = sum(losses[-window:]) / window < sum(losses[:window]) / window
    assert check["result"] == ("PASS" if falling else "FAIL")


def test_step_statuses(tmp_path):
    (tmp_path / "steps.tsv").write_text("a\t0\t3\t10\t\nb\t1\t2\t10\t\nc\t124\t10\t10\t\nd\tskip\t0\t0\twhy\n")
    steps = gpu_summary.read_steps(tmp_path / "steps.tsv")
    assert [s["status"] for s in steps] == ["ok", "FAIL", "TIMEOUT", "SKIP"]
    assert steps[3]["note"] == "why"
    (tmp_path / "bad.tsv").write_text("a\t0\n")
    with pytest.raises(ValueError, match="4 tab-separated"):
        gpu_summary.read_steps(tmp_path / "bad.tsv")


def test_unet_targets_speedup_and_mfu():
    report = {"rows": [{"model": "space_time_unet", "mode": "train", "mfu_pct": 31.0, "tflops": 300.0}],
              "comparison": [{"mode": "train", "metric": "time", "ours": 10.0, "make_a_video": 25.0, "ratio": 0.4}]}
    targets, rows = gpu_summary.unet_targets("compile", [report])
    assert targets[0]["value"] == pytest.approx(2.5) and targets[0]["result"] == "PASS"
    assert targets[1]["value"] == 31.0 and targets[1]["result"] == "PASS"
    assert rows[0]["variant"] == "compile"
    slow = {**report, "comparison": [{**report["comparison"][0], "ratio": 0.6}]}
    assert gpu_summary.unet_targets("eager", [slow])[0][0]["result"] == "FAIL"
    assert gpu_summary.unet_targets("eager", [])[0][0]["result"] == "N/A"


def test_pytest_counts(tmp_path):
    xml = tmp_path / "pytest.xml"
    xml.write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"/></testsuites>')
    check = gpu_summary.pytest_counts(xml)
    assert check["value"] == 2 and check["result"] == "FAIL"
    xml.write_text('<testsuite tests="3" failures="0" errors="0" skipped="0"/>')
    assert gpu_summary.pytest_counts(xml)["result"] == "PASS"


def test_attention_targets_pick_the_worst_class():
    def row(kind, bias, backend, ms, pct=None, causal=False):
        return {"kind": kind, "seq": 16, "batch": 8, "heads": 2, "dim_head": 8, "bias": bias, "causal": causal,
                "dtype": "bf16", "pass": "fwd", "backend": backend, "time_ms": ms, "gbps": 1.0,
                "pct_peak_bw": pct, "resolved": backend}

    rows = [row("temporal", "t5", "flash", 1.0, 70.0), row("temporal", "t5", "auto", 1.0, 70.0),
            row("temporal", "continuous", "flash", 2.0, 40.0), row("temporal", "continuous", "math", 3.0, 20.0),
            row("temporal", "continuous", "auto", 3.0, 20.0),
            row("spatial", "none", "flash", 1.0), row("spatial", "continuous", "efficient", 1.2)]
    rows[4]["resolved"] = "math"
    targets, _ = gpu_summary.attention_targets(rows)
    by_name = {t["target"].split(":")[0].split(",")[0]: t for t in targets}
    roofline = by_name["temporal attention with bias"]
    assert roofline["value"] == 40.0 and roofline["result"] == "FAIL"
    spatial = by_name["spatial attention"]
    assert spatial["value"] == pytest.approx(1.2) and spatial["result"] == "PASS"
    auto = by_name["auto / fastest backend"]
    assert auto["value"] == pytest.approx(1.5) and auto["result"] == "FAIL"


def test_summary_without_any_results(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "steps.tsv").write_text("attention\t137\t120\t120\t\n")
    summary = gpu_summary.summarize(work, tmp_path / "out", train_steps=200)
    assert summary["steps"][0]["status"] == "TIMEOUT"
    assert all(t["result"] in ("FAIL", "N/A") for t in summary["targets"])
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "steps failed or timed out: attention" in text


def test_gpu_attention_grid_covers_the_issue():
    from benchmarks import attention

    cases = attention._grid("gpu", ["bf16"])
    temporal = [c for c in cases if c.kind == "temporal"]
    spatial = [c for c in cases if c.kind == "spatial"]
    assert temporal and spatial and all(c.dtype == "bf16" for c in cases)
    assert any(c.batch > 65_535 for c in temporal)
    assert {c.bias for c in temporal} == {c.bias for c in spatial} == set(attention.BIASES)
    assert {c.causal for c in temporal} == {False, True}
    assert {c.pass_ for c in cases} == set(attention.PASSES)
    assert len(cases) <= 30  # the reduced grid: minutes, not the full grid's hour
    with pytest.raises(ValueError, match="quick, cpu, gpu, full"):
        attention._grid("huge", ["bf16"])
