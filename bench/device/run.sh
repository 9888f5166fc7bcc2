#!/usr/bin/env bash
# The GPU speed study in one call of the device tool, after `bash bench/device/wheels.sh` here:
#     run(command="bash bench/device/run.sh", carry=[".whl"], timeout_s=590)
# Installs the carried wheels, then runs the benches in order of importance, each under its own
# time limit cut to what is left of DEADLINE seconds, logging to $OUT. BENCHMARKS.md, with the
# sections the benches appended, comes back in $OUT after every step: copy those sections into
# the checkout's BENCHMARKS.md. After smoke.sh in the same call, WORK=<its WORK> reuses its
# random sam3 weights. ONLY="backbone training" runs those steps alone.
# Dry run here (the project's venv active):
#     DEVICE=cpu BACKBONE=tiny NO_APPEND=1 SKIP_WHEELS=1 OUT=/tmp/out bash bench/device/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/bench-device-out}
DEVICE=${DEVICE:-cuda}
BACKBONE=${BACKBONE:-sam3}
WORK=${WORK:-$PWD/cache/bench}
DEADLINE=${DEADLINE:-570}
ONLY=${ONLY:-}
BATCHES=${BATCHES:-8,16,32}
VARIANTS=${VARIANTS:-channels-last,sdpa flash,sdpa efficient,sdpa cudnn,bf16 weights}
MEM_BATCHES=${MEM_BATCHES:-1,2,4,8}
mkdir -p "$OUT"
if [ -d .whl ] && [ -z "${SKIP_WHEELS:-}" ] && [ ! -d /tmp/site/sam3 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site:$PWD"
export PYTHONUNBUFFERED=1
COMMON=(--backbone "$BACKBONE" --device "$DEVICE" --work-dir "$WORK")
[ "$BACKBONE" = sam3 ] && COMMON+=(--random-weights)
[ -n "${NO_APPEND:-}" ] && COMMON+=(--no-append)

step() {  # name, seconds, script and its arguments
    local name=$1 limit=$2
    shift 2
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    local left=$((DEADLINE - SECONDS - 10))
    if [ "$left" -lt 20 ]; then echo "== $name: skipped, ${left} s left"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (at most ${limit} s)"
    timeout -k 5 "$limit" python3 "$@" "${COMMON[@]}" > "$OUT/bench-$name.log" 2>&1
    local code=$?
    grep -v -i "warn" "$OUT/bench-$name.log" | tail -n 30
    echo "== $name: exit $code"
    cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import torch; print('torch', torch.__version__)"; } > "$OUT/machine.txt"
cat "$OUT/machine.txt"
# 1. The backbone: counted FLOPs, matmul ceiling, images/s and MFU by batch, cheap variants.
step backbone 210 bench/bench_backbone.py --batch-sizes "$BATCHES" --batch-size 16 \
    --variants "$VARIANTS"
# 2. One training step by batch size: cached, end to end with and without checkpointing.
step training 100 bench/bench_training.py --skip epochs,costs --mem-batch-sizes "$MEM_BATCHES"
# 3. Extraction against the bare backbone loop, its time split, GPU memory by batch size.
step extraction 150 bench/bench_extraction.py --batch-size 16 --images 96 --image-side 1024 \
    --levels 1x --rounds 1 --skip rss,budget
# 4. A split cache's training step (blocks after 23) against cached and end to end.
step split 90 bench/bench_split.py --batch-size 4 --blocks 23
# 5. Compilation last: it can take minutes for the full-size ViT.
step compile 90 bench/bench_backbone.py --batch-sizes 16 --batch-size 16 \
    --variants "compile,compile + CUDA graphs"
