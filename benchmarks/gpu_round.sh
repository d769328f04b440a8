#!/usr/bin/env bash
# One device call for a session with a lent GPU: the student-epoch figures of issue #24 (ViT-B-32 and RN50,
# with and without --overlap, bf16 and fp16 labels, then torch.compile), the label and build throughput
# reruns, and the CUDA-only tests; every run logged under $OUT, the whole within $BUDGET seconds (default
# 540, under the 10 minutes one device command may take). Runs are in order of priority: one that would not
# fit in what is left of the budget is skipped and named in $OUT/summary.txt.
#
#   OUT=/some/folder bash benchmarks/gpu_round.sh           # from the repository root (the device's $OUT)
#   ROUND=2 OUT=/some/folder bash benchmarks/gpu_round.sh   # the ImageNet-1K build-time prediction
#
# The device has no network: torch, open_clip, timm and pytest must already be installed there (nothing is
# pip-installed); the scripts import hellofmt from this working tree. Bundles and generated JPEGs go to
# $WORK (default /tmp/hellofmt-gpu-round), outside $OUT, and are reused by the later runs.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d /tmp/hellofmt-gpu-round-out-XXXX)}
BUDGET=${BUDGET:-540}
WORK=${WORK:-/tmp/hellofmt-gpu-round}
PY=${PYTHON:-python}
mkdir -p "$OUT" "$WORK"
SUMMARY="$OUT/summary.txt"
START=$SECONDS

step() {  # step NAME SECONDS_WANTED CMD...: run CMD when that much budget is left; log in $OUT/NAME.log
    local name=$1 want=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < want)); then
        echo "SKIP  $name: ${left}s left, wants ${want}s" | tee -a "$SUMMARY"
        return
    fi
    local t0=$SECONDS
    timeout --signal=INT --kill-after=10 "$left" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "rc=$rc $((SECONDS - t0))s  $name: $*" | tee -a "$SUMMARY"
    grep -E '^(RESULT|labels:|FLOPs|compute-bound|same views|setup|device|\(|    \()|[0-9]+ (passed|failed|error)' \
        "$OUT/$name.log" | sed 's/^/      /' >>"$SUMMARY"
    if ((rc != 0)); then tail -n 5 "$OUT/$name.log" | sed 's/^/      ! /' >>"$SUMMARY"; fi
}

{
    date -u
    nvidia-smi
    nproc
    free -g
    "$PY" -c "import torch, open_clip, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'open_clip', open_clip.__version__, 'timm', timm.__version__, torch.cuda.get_device_name(0))"
} >"$OUT/env.txt" 2>&1
if ! "$PY" -c "import torch, open_clip, timm, pytest; assert torch.cuda.is_available()" >>"$OUT/env.txt" 2>&1; then
    echo "the device's Python lacks torch with CUDA, open_clip, timm or pytest: see env.txt" | tee -a "$SUMMARY"
    exit 1
fi

SE=("$PY" benchmarks/student_epoch.py --device cuda)
if [ "${ROUND:-1}" = 2 ]; then
    # Round 2 (ROUND=2; a session's 15 device minutes fit about one round): issue #24 item 4, the ImageNet-1K
    # build time predicted from a whole build on an ImageNet-shaped folder (benchmarks/imagenet_predict.py,
    # examples/imagenet.md), then what round 1 left.
    step imagenet-predict 330 "$PY" benchmarks/imagenet_predict.py --device cuda --data "$WORK/in-shaped" \
        --num-workers 15 --no-progress --json "$OUT/imagenet-predict.json" --markdown "$OUT/imagenet-predict.md"
    step label-throughput 60 "$PY" benchmarks/label_throughput.py --device cuda --arch ViT-B-32 --batch-size 256 \
        --reps 3
    echo "done in $((SECONDS - START))s of ${BUDGET}s" | tee -a "$SUMMARY"
    exit 0
fi
VIT=(--foundation ViT-B-32 --bundle "$WORK/bundle-vit-b-32")
RN=(--foundation RN50 --bundle "$WORK/bundle-rn50")

# 1. The issue's setting (1,000 classes x 10 images, ResNet-18 at 224 px, batch 256, bf16, channels-last,
#    AdamW); --overlap times (b) both with the side stream and without it.
step se-vit-b-32 200 "${SE[@]}" "${VIT[@]}" --overlap --json "$OUT/se-vit-b-32.json"
step se-rn50 150 "${SE[@]}" "${RN[@]}" --overlap --json "$OUT/se-rn50.json"
# 2. The CUDA-only tests, and this benchmark's own tests (the tiny run on the CPU of that machine).
step pytest-cuda 90 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_augment.py::test_cpu_and_cuda_agree \
    tests/test_dataset_dist.py::test_sample_epoch_cpu_and_cuda_agree \
    tests/test_dataset_dist.py::test_loader_batches_cpu_and_cuda_agree \
    tests/test_projector.py::test_cuda_autocast_gives_float32_close_to_float32_reference \
    tests/test_as_teacher.py::test_inputs_on_another_device_are_moved_and_the_output_comes_back \
    tests/test_student_epoch.py
# 3. fp16 labels (KL against float32 printed), then label throughput as in benchmarks/README.md.
step se-vit-b-32-fp16 90 "${SE[@]}" "${VIT[@]}" --overlap --label-amp fp16 --json "$OUT/se-vit-b-32-fp16.json"
step label-throughput 60 "$PY" benchmarks/label_throughput.py --device cuda --arch ViT-B-32 --batch-size 256 --reps 3
# 4. Build throughput, the run the README asks for next (--num-workers 12 beside the earlier 15).
step build-throughput-w12 150 "$PY" benchmarks/build_throughput.py --device cuda:0 --foundation ViT-B-32 --size 224 \
    --batch-size 256 --num-workers 12 --images 3000 --part data,compute,loop --data "$WORK/jpegs"
# 5. torch.compile (student, teacher, projector): compile time is the least predictable, so last.
step se-vit-b-32-compile 150 "${SE[@]}" "${VIT[@]}" --overlap --compile --json "$OUT/se-vit-b-32-compile.json"
step se-rn50-compile 150 "${SE[@]}" "${RN[@]}" --overlap --compile --json "$OUT/se-rn50-compile.json"
echo "done in $((SECONDS - START))s of ${BUDGET}s" | tee -a "$SUMMARY"
