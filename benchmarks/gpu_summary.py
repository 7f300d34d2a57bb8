"""The summary of one `benchmarks/gpu_check.sh` run: every step's status and every GPU target
with its measured value and PASS / FAIL.

    python benchmarks/gpu_summary.py WORK_DIR OUT_DIR [--dry-run] [--train-steps N]

WORK_DIR is the check's scratch folder: `steps.tsv` (one line per step: name, exit status,
seconds, time limit), `attention*/` and `unet_*/` (the benchmark scripts' `--out` folders),
`train/metrics.jsonl` and `pytest.xml`. Writes `OUT_DIR/summary.md`, `OUT_DIR/summary.json`,
and the merged `OUT_DIR/attention.csv` / `OUT_DIR/unet.csv`; prints the summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common
from unets.guards import BadFileError, read_json, read_text

logger = logging.getLogger("benchmarks.gpu_summary")

# Exit statuses `timeout` uses for a step it stopped.
TIMED_OUT = (124, 137)
# The loss check compares the mean of this many first and last logged losses.
LOSS_WINDOW = 20


def read_steps(path: Path) -> list[dict[str, Any]]:
    """`steps.tsv`: name, rc, seconds, limit (tab separated); rc "skip" for a skipped step."""
    steps = []
    if not path.exists():
        return steps
    for line in read_text(path).splitlines():
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 4:
            raise ValueError(f"{path}: a step line needs 4 tab-separated fields, got {line!r}")
        name, rc, seconds, limit = parts[:4]
        note = parts[4] if len(parts) > 4 else ""
        if rc == "skip":
            status = "SKIP"
        elif rc == "0":
            status = "ok"
        elif rc.isdigit() and int(rc) in TIMED_OUT:
            status = "TIMEOUT"
        else:
            status = "FAIL"
        steps.append({"step": name, "status": status, "rc": rc, "seconds": float(seconds),
                      "limit_s": float(limit), "note": note})
    return steps


def _reports(folder: Path) -> list[dict[str, Any]]:
    """Every benchmark JSON report in `folder` (a missing or unreadable one is skipped: the
    step's own status already says it failed)."""
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            out.append(read_json(path))
        except (BadFileError, ValueError) as error:
            logger.warning("skipping %s: %s", path, error)
    return out


def attention_targets(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The attention targets over the merged rows of every attention run: one line per target
    (its worst shape class decides), and the per-class details."""
    from benchmarks import attention  # torch import: only when there are rows

    per_class = attention.target_report(rows)
    auto = attention.auto_report(rows)
    targets = []
    temporal = [t for t in per_class if t["target"].startswith("temporal") and t["value"] is not None]
    targets.append(_worst("temporal attention with bias: % of memory roofline", temporal,
                          ">= 50", lambda t: t["value"], lowest=True, goal=lambda v: v >= 50.0))
    spatial = [t for t in per_class if t["target"].startswith("spatial")]
    targets.append(_worst("spatial attention, continuous bias / no bias (fastest kernels)", spatial,
                          "<= 1.3", lambda t: t["value"], lowest=False, goal=lambda v: v <= 1.3))
    targets.append(_worst("auto / fastest backend", auto, "<= 1.10", lambda r: r["auto/fastest"],
                          lowest=False, goal=lambda v: v <= 1.10))
    return targets, per_class + auto


def _worst(name: str, items: Sequence[dict[str, Any]], goal_text: str, value, lowest: bool, goal) -> dict[str, Any]:
    if not items:
        return {"target": name, "goal": goal_text, "value": None, "result": "N/A", "where": "not measured"}
    worst = (min if lowest else max)(items, key=value)
    where = " ".join(str(worst.get(k)) for k in ("kind", "pass", "seq", "batch", "bias", "dtype"))
    if worst.get("causal"):
        where += " causal"
    v = value(worst)
    return {"target": name, "goal": goal_text, "value": v, "result": "PASS" if goal(v) else "FAIL",
            "where": f"worst of {len(items)}: {where}"}


def unet_targets(label: str, reports: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """U-Net train step speed-up over make-a-video-pytorch (goal >= 2x) and our MFU."""
    rows = [row for report in reports for row in report.get("rows", [])]
    comparison = [row for report in reports for row in report.get("comparison", [])]
    train = next((c for c in comparison if c["mode"] == "train" and c["metric"] == "time"), None)
    targets = []
    if train is None or not train.get("ratio"):
        targets.append({"target": f"U-Net bf16 train step speed-up vs make-a-video-pytorch ({label})",
                        "goal": ">= 2", "value": None, "result": "N/A", "where": "no side-by-side row"})
    else:
        speedup = 1.0 / train["ratio"]
        targets.append({"target": f"U-Net bf16 train step speed-up vs make-a-video-pytorch ({label})",
                        "goal": ">= 2", "value": speedup, "result": "PASS" if speedup >= 2.0 else "FAIL",
                        "where": f"ours {train['ours']:.4g} ms, theirs {train['make_a_video']:.4g} ms"})
    ours = next((r for r in rows if r.get("model") == "space_time_unet" and r.get("mode") == "train"), None)
    mfu = None if ours is None else ours.get("mfu_pct")
    targets.append({"target": f"U-Net train step MFU % ({label})", "goal": "reported", "value": mfu,
                    "result": "PASS" if mfu is not None else "FAIL",
                    "where": "" if ours is None else f"{ours.get('tflops') or 0:.4g} TFLOP/s"})
    return targets, [{**r, "variant": label} for r in rows]


def loss_check(path: Path, steps: int) -> dict[str, Any]:
    """The demo training run: `steps` logged steps reached, every loss finite, and (with at
    least 2 windows of losses) the last window's mean below the first's."""
    name = f"bf16 training, {steps} steps: losses finite and falling"
    if not path.exists():
        return {"target": name, "goal": "finite, last < first", "value": None, "result": "FAIL",
                "where": f"{path.name} missing"}
    records = [json.loads(line) for line in read_text(path).splitlines() if line.strip()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
    if not losses:
        return {"target": name, "goal": "finite, last < first", "value": None, "result": "FAIL",
                "where": "no loss logged"}
    values = [float(loss) for _, loss in losses]
    last_step = max(step for step, _ in losses)
    finite = all(math.isfinite(v) for v in values)
    window = min(LOSS_WINDOW, len(values) // 2)
    first = sum(values[:window]) / window if window else values[0]
    last = sum(values[-window:]) / window if window else values[-1]
    falling = window == 0 or last < first
    reached = last_step + 1 >= steps
    ok = finite and falling and reached
    return {"target": name, "goal": "finite, last < first", "value": last,
            "result": "PASS" if ok else "FAIL",
            "where": f"{len(values)} logged, last step {last_step}, first-{window} mean {first:.4g}, "
                     f"last-{window} mean {last:.4g}" + ("" if finite else ", NON-FINITE loss")}


def pytest_counts(path: Path) -> dict[str, Any]:
    """Counts from pytest's JUnit XML."""
    if not path.exists():
        return {"target": "pytest -m cuda", "goal": "no failures", "value": None, "result": "FAIL",
                "where": "no report"}
    root = ElementTree.fromstring(read_text(path))
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    bad = count["failures"] + count["errors"]
    return {"target": "pytest -m cuda", "goal": "no failures", "value": passed,
            "result": "PASS" if bad == 0 else "FAIL",
            "where": f"{passed} passed, {count['failures']} failed, {count['errors']} errors, "
                     f"{count['skipped']} skipped"}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summarize(work: Path, out: Path, dry_run: bool = False, train_steps: int = 200) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    steps = read_steps(work / "steps.tsv")
    targets: list[dict[str, Any]] = []

    attention_reports = [r for folder in sorted(work.glob("attention*")) for r in _reports(folder)]
    attention_rows = [row for report in attention_reports for row in report.get("rows", [])]
    details: list[dict[str, Any]] = []
    if attention_rows:
        found, details = attention_targets(attention_rows)
        targets += found
        common.write_csv(attention_rows, out / "attention.csv")
    else:
        targets.append({"target": "attention targets", "goal": "-", "value": None, "result": "N/A",
                        "where": "no attention rows"})

    unet_rows: list[dict[str, Any]] = []
    for folder, label in (("unet_eager", "eager"), ("unet_compile", "compile")):
        found, rows = unet_targets(label, _reports(work / folder))
        targets += found
        unet_rows += rows
    if unet_rows:
        common.write_csv(unet_rows, out / "unet.csv")

    targets.append(loss_check(work / "train" / "metrics.jsonl", train_steps))
    targets.append(pytest_counts(work / "pytest.xml"))

    extra = sorted({s["step"] for s in steps} - {"environment", "wheels", "pytest", "attention",
                                                   "attention-flex", "unet-eager", "unet-compile", "train"})
    summary = {"dry_run": dry_run, "steps": steps, "targets": targets, "details": details,
               "extra_steps": extra}
    common.write_json(summary, out / "summary.json")

    lines = ["# GPU check" + (" (DRY RUN on CPU: plumbing only, values are not GPU results)" if dry_run else ""), ""]
    lines += ["## Steps", "", "| step | status | seconds | limit s | note |", "|---|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']:.0f} | {s['limit_s']:.0f} | {s['note']} |" for s in steps]
    lines += ["", "## Targets", "", "| target | goal | measured | result | where |", "|---|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['goal']} | {_fmt(t['value'])} | {t['result']} | {t['where']} |" for t in targets]
    failed = [s["step"] for s in steps if s["status"] in ("FAIL", "TIMEOUT")]
    lines += ["", f"steps failed or timed out: {', '.join(failed) if failed else 'none'}",
              f"targets: {sum(t['result'] == 'PASS' for t in targets)} PASS, "
              f"{sum(t['result'] == 'FAIL' for t in targets)} FAIL, {sum(t['result'] == 'N/A' for t in targets)} N/A", ""]
    (out / "summary.md").write_text("\n".join(lines))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    common.configure_logging()
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_summary.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--train-steps", type=int, default=200)
    args = parser.parse_args(argv)
    summarize(args.work, args.out, dry_run=args.dry_run, train_steps=args.train_steps)
    sys.stdout.write((args.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
