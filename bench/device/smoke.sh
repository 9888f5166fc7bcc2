#!/usr/bin/env bash
# Correctness of every CUDA path a user takes, in one call of the device tool (after
# `bash bench/device/wheels.sh` here):
#     run(command="bash bench/device/smoke.sh", carry=[".whl"], timeout_s=420)
# The two commands users type, on the full-size sam3 architecture with random weights written as
# an official-layout checkpoint: extraction on GPU 0, training with end-to-end intervals, predict,
# the same training under torchrun, a split cache (--cache-block), then the test suite's
# GPU-marked tests. Each step runs under its own time limit, cut to what is left of DEADLINE
# seconds, and logs to <step>.log in $OUT/logs.tar.gz (packed again after every step: the device
# tool brings back 8 files at most); the peak GPU memory of each (nvidia-smi, whole process:
# context and allocator cache included), its seconds and exit code go to $OUT/summary.txt,
# printed last.
# Dry run here (the project's venv active), on the CPU with the tiny backbone (the GPU tests
# alone: GPU_TESTS_ON_CPU=1 python -m pytest tests/test_cuda.py):
#     DEVICE=cpu BACKBONE=tiny IMAGES=24 SIDE=256 SPLIT_BLOCK=1 SKIP_WHEELS=1 \
#         OUT=/tmp/smoke-out WORK=/tmp/smoke bash bench/device/smoke.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/smoke-out}
WORK=${WORK:-/tmp/smoke}
DEVICE=${DEVICE:-cuda}
BACKBONE=${BACKBONE:-sam3}
IMAGES=${IMAGES:-200}
SIDE=${SIDE:-1024}
STEPS=${STEPS:-120}
SPLIT_BLOCK=${SPLIT_BLOCK:-23}
COPIES=${COPIES:-}  # --augment-copies of every step (empty: the default)
PREDICT_RUN=${PREDICT_RUN:-run-train}  # the run predict reads
ONLY=${ONLY:-}  # a space-separated list of steps to run (a rerun of what failed); empty: all
DEADLINE=${DEADLINE:-395}  # seconds for the whole script; keep it under the call's timeout_s
LOGS="$WORK/logs"
mkdir -p "$OUT" "$LOGS"
if [ -d .whl ] && [ -z "${SKIP_WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
fi
# A step past its limit gets SIGABRT first: faulthandler then prints every thread's stack.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_MININTERVAL=5 PYTHONFAULTHANDLER=1
PY=${PY:-python3}
SUMMARY="$OUT/summary.txt"
printf '%-14s %5s %8s %12s\n' step exit seconds peak_gpu_mib > "$SUMMARY"

step() {  # name, seconds, command and its arguments
    local name=$1 limit=$2
    shift 2
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    local left=$((DEADLINE - SECONDS - 10))
    if [ "$left" -lt 20 ]; then
        printf '%-14s %5s %8s %12s\n' "$name" skip 0 - >> "$SUMMARY"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (at most ${limit} s): $*"
    local poller="" start=$SECONDS
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 \
            > "$LOGS/mem-$name.csv" 2>/dev/null &
        poller=$!
    fi
    timeout -s ABRT -k 5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local code=$?
    [ -n "$poller" ] && kill "$poller" 2>/dev/null
    local peak=-
    [ -s "$LOGS/mem-$name.csv" ] && peak=$(sort -n "$LOGS/mem-$name.csv" | tail -n 1)
    grep -v -i "warn" "$LOGS/$name.log" | tr '\r' '\n' | grep -v '^\s*$' | tail -n 12
    printf '%-14s %5s %8s %12s\n' "$name" "$code" "$((SECONDS - start))" "$peak" >> "$SUMMARY"
    echo "== $name: exit $code"
    tar czf "$OUT/logs.tar.gz" -C "$LOGS" .
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nproc; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
start=$SECONDS
$PY bench/device/prepare.py --work-dir "$WORK" --images "$IMAGES" --image-side "$SIDE" \
    --backbone "$BACKBONE" > "$LOGS/prepare.log" 2>&1 || { cat "$LOGS/prepare.log"; exit 1; }
MANIFEST=$(awk '/^manifest /{print $2}' "$LOGS/prepare.log")
WEIGHTS=$(awk '/^checkpoint /{print $2}' "$LOGS/prepare.log")
echo "prepared in $((SECONDS - start)) s: $MANIFEST, weights $WEIGHTS"

MODEL=(--backbone "$BACKBONE" --cache-dir "$WORK/cache")
[ "$WEIGHTS" != none ] && MODEL+=(--checkpoint "$WEIGHTS")
[ -n "$COPIES" ] && MODEL+=(--augment-copies "$COPIES")
if [ "$DEVICE" = cuda ]; then PLACE=(--gpus 0); else PLACE=(--device cpu); fi
VAL=$((STEPS / 6))
SHORT=$((VAL * 2))  # the torchrun and split trainings: two validation intervals
TRAIN=(--data "$MANIFEST" "${MODEL[@]}" --val-every "$VAL" --e2e-steps 5 --overlays 4
       --loader-workers 4)

# First the GPU-marked tests on the tiny backbone (every one lives there; the rest of the suite
# needs packages the image lacks): quick, and they name what broke.
step gpu-tests 100 $PY -m pytest -q -x -m gpu tests/test_cuda.py -p no:cacheprovider \
    ${PYTEST_K:+-k "$PYTEST_K"}
step extract 150 $PY extract_features.py --data "$MANIFEST" "${MODEL[@]}" "${PLACE[@]}" \
    --loader-workers 6
# Intervals 3 and 6 of 6 start with 5 end-to-end steps each (then the drift probe).
step train 200 $PY train_head.py "${TRAIN[@]}" "${PLACE[@]}" --steps "$STEPS" --e2e-every 3 \
    --run-dir "$WORK/run-train" --overwrite
step torchrun 120 $PY -m torch.distributed.run --standalone --nproc-per-node 1 train_head.py \
    "${TRAIN[@]}" --device "$DEVICE" --steps "$SHORT" --e2e-every 2 \
    --run-dir "$WORK/run-torchrun" --overwrite
step predict 90 $PY -m pipeline.predict --run "$WORK/$PREDICT_RUN" --data "$MANIFEST" \
    --out "$WORK/predict" --device "$DEVICE"
step split-extract 120 $PY extract_features.py --data "$MANIFEST" "${MODEL[@]}" "${PLACE[@]}" \
    --cache-block "$SPLIT_BLOCK" --augment-copies 0 --loader-workers 6
step split-train 150 $PY train_head.py "${TRAIN[@]}" "${PLACE[@]}" --steps "$SHORT" \
    --cache-block "$SPLIT_BLOCK" --augment-copies 0 --e2e-every 2 \
    --run-dir "$WORK/run-split" --overwrite

for run in run-train run-torchrun run-split; do
    [ -f "$WORK/$run/metrics.jsonl" ] && cp "$WORK/$run/metrics.jsonl" "$LOGS/$run-metrics.jsonl"
done
tar czf "$OUT/logs.tar.gz" -C "$LOGS" .
echo
cat "$SUMMARY"
