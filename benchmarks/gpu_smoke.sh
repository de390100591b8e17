#!/usr/bin/env bash
# GPU smoke test of the CUDA paths on ONE GPU, in one go, under a hard overall limit (8 minutes;
# GPU_SMOKE_LIMIT_S): NOT YET RUN ON A GPU (no GPU has been lent to this project's sessions so far).
#
#   benchmarks/gpu_smoke.sh [OUT_DIR]          (default OUT_DIR: /tmp/mocobench_gpu_smoke)
#
# One line per path: PASS/FAIL, img/s, peak GPU memory (MiB), seconds. The paths:
#   moco_v2_fp32_tf32_{on,off}_cl_{on,off}  MoCo v2 R50 fp32 steps, TF32 True/False x channels_last
#   moco_v3_fp16_lars_b{128,256}            MoCo v3 R50, fp16 autocast + GradScaler + LARS, 128/256 per GPU
#   loader_8_workers                        the training loader on ImageNet-size JPEGs, 8 workers
#   pretrain_1rank_group                    real launcher, --nproc-per-node 1: a process group of 1 (NCCL;
#                                           DDP, shuffle-BN and queue gathers, votes); its final state equals
#                                           a run without a group's and has the iterations its data gives;
#                                           MoCo v3 in the group: SyncBatchNorm under DDP
#   pretrain_sigterm_resume                 the same launcher, workers > 0, SIGTERM mid-epoch -> exit 143 ->
#                                           --resume auto; the whole state against the uninterrupted run's
#   convert                                 that checkpoint -> verified detectron2 .pkl
#   lincls                                  the linear protocol from it, a few iterations (a group of 1)
#   voc_r50_c4_extranorm                    VOC R50-C4 fine-tuning steps (Res5ROIHeadsExtraNorm) from the .pkl
#   coco_eval                               one COCO evaluation (Mask R-CNN R50-FPN) on generated data
# Not covered: cross-GPU traffic (NCCL between 2+ GPUs) and SyncBN's CUDA kernel (torch's SyncBatchNorm
# is plain BN in a group of 1); tests/test_scale.py runs 2 processes on CPU/gloo.
# The exit code is the number of failed paths (124 when the overall limit cut the run short).
# GPU_SMOKE_CPU=1 runs the same paths on CPU at tiny sizes (gloo, ResNet-18 for the step paths): a dry
# run of the script itself (tests/test_gpu_smoke.py).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-/tmp/mocobench_gpu_smoke}
CPU=${GPU_SMOKE_CPU:-0}
LIMIT=${GPU_SMOKE_LIMIT_S:-480}

if [ -z "${GPU_SMOKE_INNER:-}" ]; then  # the hard overall limit: run the paths under timeout
  START=$SECONDS
  GPU_SMOKE_INNER=1 timeout -k 15 "$LIMIT" "$0" "$@"
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "gpu_smoke: FAIL: the overall limit of ${LIMIT}s was reached after $((SECONDS - START))s; paths not listed above did not run"
    exit 124
  fi
  exit $rc
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$CPU" = 1 ]; then
  # ResNet-18 and a small v3 MLP for the step paths; one warm-up and one timed step
  DEV=cpu; STEP_ARCH=(MODEL.ARCH resnet18 MOCO.MLP_DIM 256 MOCO.SHUFFLE_BN_SPLITS 2); SIZE=32; B1=8; B2=16
  STEPS=(--steps 1 --warmup 1); LOADER=(--workers 2 --images 32 --batch 8 --size 32); LIFE_SIZE=32; LIFE_BATCH=16
  LIFE_V3_ARCH=(MODEL.ARCH resnet18 MOCO.MLP_DIM 256); DET_ITERS=2; PERPATH=240
else
  NGPU=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
  if [ "$NGPU" -lt 1 ]; then echo "gpu_smoke: no CUDA device visible; this checks the GPU paths (GPU_SMOKE_CPU=1 for a dry run)"; exit 2; fi
  DEV=cuda; STEP_ARCH=(); SIZE=224; B1=128; B2=256; STEPS=(--steps 10 --warmup 3)
  LOADER=(--workers 8 --images 512 --batch 64 --size 224); LIFE_SIZE=64; LIFE_BATCH=8; LIFE_V3_ARCH=()
  DET_ITERS=10; PERPATH=150
fi
rm -rf "$OUT"; mkdir -p "$OUT"
echo "gpu_smoke: $DEV, torch $($PY -c 'import torch; print(torch.__version__, torch.version.cuda)'), limit ${LIMIT}s, output in $OUT"
$PY -m mocobench data synth --out "$OUT/data" --preset test --classes 4 --images-per-class 32 --scenes 8 >/dev/null || exit 2
DATA="$OUT/data/imagenet"
SUMMARY=()
FAILED=0
PRELUDE=":"
T0=$SECONDS

peak_watch_start() {  # sample the GPU's used memory every 0.5 s while a command runs
  MEMLOG="$OUT/$1.mem"; : >"$MEMLOG"; WATCH=
  if [ "$DEV" = cuda ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 500 >"$MEMLOG" 2>/dev/null &
    WATCH=$!
  fi
}
peak_watch_stop() {
  if [ -n "$WATCH" ]; then kill "$WATCH" 2>/dev/null; wait "$WATCH" 2>/dev/null; fi
  sort -n "$MEMLOG" | tail -1
}

# run_path NAME IMG_PER_S_COMMAND -- COMMAND...: run with a time limit (the path's, or what is left of
# the overall one), then record PASS/FAIL, img/s, peak MiB
run_path() {
  local name=$1 rate_cmd=$2; shift 3
  local left=$((LIMIT - 20 - (SECONDS - T0))) limit=$PERPATH
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  echo; echo "=== $name: $*"
  peak_watch_start "$name"
  local start=$SECONDS rc=124
  if [ "$limit" -gt 0 ]; then  # in a bash that knows sigterm_resume (timeout runs programs only)
    timeout -k 5 "$limit" bash -c "$PRELUDE"'; "$@"' _ "$@" >"$OUT/$name.log" 2>&1; rc=$?
  fi
  local peak; peak=$(peak_watch_stop)
  local rate; rate=$(eval "$rate_cmd" 2>/dev/null || echo -)
  local verdict=PASS
  if [ $rc -ne 0 ]; then verdict=FAIL; FAILED=$((FAILED + 1)); tail -15 "$OUT/$name.log"; fi
  SUMMARY+=("$(printf '%-32s %-4s %10s img/s %8s MiB %5ss' "$name" "$verdict" "${rate:--}" "${peak:--}" $((SECONDS - start)))")
  echo "${SUMMARY[-1]}"
}

last_img_per_s() {  # the last img_per_s a training run wrote to metrics.json
  $PY -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print(round([x for x in r if 'img_per_s' in x][-1]['img_per_s'], 1))" "$1/metrics.json"
}
det_img_per_s() {  # images per step / median seconds per step, from detectron2's metrics.json
  $PY -c "import json,statistics,sys; t=[json.loads(l).get('time') for l in open(sys.argv[1] + '/metrics.json')]; print(round(int(sys.argv[2]) / statistics.median([x for x in t if x]), 1))" "$1" "$2"
}
result_img_per_s() { grep -o 'RESULT .* img/s' "$OUT/$1.log" | awk '{print $4}'; }

# ---- training steps (random uint8 batches, normalised on the device)
V2=configs/pretrain/moco_v2_R50_200ep.yaml
for tf32 in True False; do
  for cl in True False; do
    name="moco_v2_fp32_tf32_$([ $tf32 = True ] && echo on || echo off)_cl_$([ $cl = True ] && echo on || echo off)"
    run_path "$name" "result_img_per_s $name" -- \
      $PY benchmarks/gpu_smoke.py --name "$name" --config-file $V2 --device "$DEV" --batch "$B1" --size "$SIZE" \
      "${STEPS[@]}" "${STEP_ARCH[@]}" AMP.ENABLED False TF32 $tf32 CHANNELS_LAST $cl
  done
done
for batch in "$B1" "$B2"; do
  name="moco_v3_fp16_lars_b$batch"
  run_path "$name" "result_img_per_s $name" -- \
    $PY benchmarks/gpu_smoke.py --name "$name" --config-file configs/pretrain/moco_v3_R50.yaml --device "$DEV" \
    --batch "$batch" --size "$SIZE" "${STEPS[@]}" "${STEP_ARCH[@]}" TF32 True
done

# ---- the data loader
run_path loader_8_workers "result_img_per_s loader_8_workers" -- $PY benchmarks/gpu_smoke.py --loader --device "$DEV" "${LOADER[@]}"

# ---- a run's life on the device: a process group of 1, stop, resume, convert, linear protocol, detection
LIFE=(--config-file $V2 DATA.ROOT "$DATA" SOLVER.EPOCHS 1 SOLVER.BATCH_SIZE "$LIFE_BATCH" MOCO.K 256
      INPUT.SIZE "$LIFE_SIZE" MOCO.SHUFFLE_BN_SPLITS 2 KNN.PERIOD 0 DATALOADER.NUM_WORKERS 2 LOG_PERIOD 1
      DEVICE "$DEV" TF32 False)
# the iterations a complete run does, from the image count (not from the product): a sampler that skips
# a batch in every run, interrupted or not, is found by this count, not by comparing two runs
ITERS=$(( $(find "$DATA/train" -type f | wc -l) / LIFE_BATCH ))
# two runs' final state: bit for bit on CPU; on CUDA within 1e-4 (cudnn.benchmark picks its kernels
# per process, some not bitwise reproducible; a wrong batch moves the queue's keys by tenths: 0.44 on CPU)
if [ "$DEV" = cuda ]; then GROUP=nccl; TOL=1e-4; else GROUP=gloo; TOL=0; fi
one_rank_group() {  # --nproc-per-node 1: the real launcher, a process group of 1 (NCCL on CUDA, gloo
  # on CPU): DDP, the shuffle-BN and queue gathers, the NaN/stop votes run; a gather of 1 is the
  # identity, so the run equals one without a group (pretrain.train in this process)
  $PY -m mocobench pretrain --nproc-per-node 1 "${LIFE[@]}" OUTPUT_DIR "$OUT/full" || return 1
  $PY -m pretrain.train "${LIFE[@]}" OUTPUT_DIR "$OUT/nogroup" || return 1
  $PY benchmarks/gpu_smoke.py --compare "$OUT/full" "$OUT/nogroup" --iterations "$ITERS" \
    --groups "$GROUP" none --tolerance "$TOL" || return 1
  # MoCo v3 in the group: SyncBN (torch's SyncBatchNorm on CUDA: plain BN kernels in a group of 1) under DDP
  $PY -m mocobench pretrain --nproc-per-node 1 --config-file configs/pretrain/moco_v3_R50.yaml \
    "${V3_LIFE[@]}" OUTPUT_DIR "$OUT/v3_group" || return 1
  grep "DistributedDataParallel over base_encoder, predictor (process group $GROUP of 1); [1-9]" \
    "$OUT/v3_group/log.txt" || { echo "v3: no DDP over SyncBN in a group of 1 in the log"; return 1; }
}
sigterm_resume() {  # stop a run with SIGTERM after its 2nd iteration, resume it, compare with the
  # uninterrupted one (the group run above)
  if [ ! -f "$OUT/full/checkpoint_0000.pth.tar" ]; then
    rm -rf "$OUT/full"
    $PY -m mocobench pretrain --nproc-per-node 1 "${LIFE[@]}" OUTPUT_DIR "$OUT/full" || return 1
  fi
  $PY -m mocobench pretrain --nproc-per-node 1 "${LIFE[@]}" OUTPUT_DIR "$OUT/stopped" &
  local pid=$!
  local n=0
  while [ "${n:-0}" -lt 2 ] && kill -0 $pid 2>/dev/null; do
    sleep 0.2; n=$(grep -c '"loss"' "$OUT/stopped/metrics.json" 2>/dev/null)
  done
  kill -TERM $pid; wait $pid; local rc=$?
  [ $rc -eq 143 ] || { echo "a SIGTERM mid-epoch exited $rc, not 143"; return 1; }
  # the stop must fall inside the epoch (iteration i of n, i < n): the resume then starts mid-epoch
  grep -Eq "stopped by SIGTERM after iteration ([0-9]+)/([0-9]+)" "$OUT/stopped/log.txt" &&
    ! grep -Eq "stopped by SIGTERM after iteration ([0-9]+)/\1 " "$OUT/stopped/log.txt" ||
    { echo "the SIGTERM did not stop the run mid-epoch"; return 1; }
  $PY -m mocobench pretrain --nproc-per-node 1 "${LIFE[@]}" OUTPUT_DIR "$OUT/stopped" --resume auto || return 1
  grep -q "resumed from" "$OUT/stopped/log.txt" || { echo "no 'resumed from' in the log"; return 1; }
  # the whole state (weights, queue, optimizer, RNG, counters) against the uninterrupted run's
  $PY benchmarks/gpu_smoke.py --compare "$OUT/full" "$OUT/stopped" --iterations "$ITERS" \
    --groups "$GROUP" "$GROUP" --tolerance "$TOL"
}
V3_LIFE=(DATA.ROOT "$DATA" SOLVER.EPOCHS 1 SOLVER.BATCH_SIZE "$LIFE_BATCH" INPUT.SIZE "$LIFE_SIZE" KNN.PERIOD 0
         DATALOADER.NUM_WORKERS 2 LOG_PERIOD 1 DEVICE "$DEV" "${LIFE_V3_ARCH[@]}")
PRELUDE="$(declare -f one_rank_group sigterm_resume); $(declare -p PY OUT LIFE V3_LIFE ITERS GROUP TOL)"
run_path pretrain_1rank_group "last_img_per_s $OUT/full" -- one_rank_group
run_path pretrain_sigterm_resume "last_img_per_s $OUT/stopped" -- sigterm_resume
CKPT="$OUT/stopped/checkpoint_0000.pth.tar"
run_path convert "echo -" -- $PY -m mocobench convert "$CKPT" "$OUT/moco.pkl"
run_path lincls "echo -" -- \
  $PY -m mocobench lincls --nproc-per-node 1 --data "$DATA" --pretrained "$CKPT" --output "$OUT/lincls" \
  --epochs 1 --batch-size 32 --size "$LIFE_SIZE" --workers 2 --device "$DEV"
run_path voc_r50_c4_extranorm "det_img_per_s $OUT/voc/seed0 2" -- \
  $PY -m mocobench transfer --config-file configs/detection/tiny_synth_voc_R_50_C4.yaml --synth-root "$OUT/data" \
  MODEL.DEVICE "$DEV" MODEL.WEIGHTS "$OUT/moco.pkl" SOLVER.MAX_ITER "$DET_ITERS" OUTPUT_DIR "$OUT/voc"
run_path coco_eval "echo -" -- \
  $PY -m mocobench transfer --config-file configs/detection/tiny_synth_coco_R_50_FPN.yaml --synth-root "$OUT/data" \
  --eval-only MODEL.DEVICE "$DEV" MODEL.WEIGHTS "$OUT/moco.pkl" OUTPUT_DIR "$OUT/coco"

echo; echo "=== gpu_smoke summary ($DEV, $((SECONDS - T0)) s)"
printf '%s\n' "${SUMMARY[@]}"
echo "failed paths: $FAILED"
exit "$FAILED"
