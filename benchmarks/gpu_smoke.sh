#!/usr/bin/env bash
# GPU smoke test of every CUDA path, in one go (sized for <= 5 minutes; not yet timed on a GPU):
#
#   benchmarks/gpu_smoke.sh [OUT_DIR]          (default OUT_DIR: /tmp/mocobench_gpu_smoke)
#
# 1 GPU : MoCo v2 R50 steps with AMP + channels_last + SplitBatchNorm (shuffle BN emulated), the same with
#         torch.compile, and one epoch of the real pretraining loop (data loader, kNN monitor, checkpoint).
# 2 GPUs: (when present) pretraining over NCCL with shuffle BN (v2) and SyncBN (v3), lincls DDP, and a
#         20-iteration R50-FPN SyncBN Mask R-CNN transfer.
# Every path prints PASS/FAIL, img/s and peak GPU memory; the exit code is the number of failed paths.
# GPU_SMOKE_CPU=1 runs the same script on CPU at toy sizes (gloo instead of NCCL): a dry run of the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-/tmp/mocobench_gpu_smoke}
CPU=${GPU_SMOKE_CPU:-0}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$CPU" = 1 ]; then
  # toy sizes; torch.compile with the eager backend (inductor's C++ build alone takes minutes on a CPU)
  NGPU=2; DEV=cpu; SIZE=32; BATCH=16; ARCH=(MODEL.ARCH resnet18); SPLITS=(MOCO.SHUFFLE_BN_SPLITS 2)
  DETDEV=cpu; DETITERS=2; PERPATH=600; COMPILE_BACKEND=eager; AMP=()
else
  NGPU=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
  if [ "$NGPU" -lt 1 ]; then echo "gpu_smoke: no CUDA device visible; this checks the GPU paths (GPU_SMOKE_CPU=1 for a dry run)"; exit 2; fi
  DEV=cuda; SIZE=224; BATCH=64; ARCH=(); SPLITS=(); DETDEV=cuda; DETITERS=20; PERPATH=240; COMPILE_BACKEND=inductor
  AMP=(AMP.ENABLED True)  # v1/v2 default to fp32 (the official recipe); the AMP path is what is checked here
fi
rm -rf "$OUT"; mkdir -p "$OUT"
echo "gpu_smoke: $NGPU device(s) ($DEV), torch $($PY -c 'import torch; print(torch.__version__, torch.version.cuda)'), output in $OUT"
$PY -m mocobench data synth --out "$OUT/data" --preset test --images-per-class 64 --scenes 32 >/dev/null || exit 2
DATA="$OUT/data/imagenet"
SUMMARY=()
FAILED=0

peak_watch_start() {  # sample the GPUs' used memory every 0.5 s while a command runs
  MEMLOG="$OUT/$1.mem"; : >"$MEMLOG"; WATCH=
  if [ "$DEV" = cuda ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$MEMLOG" 2>/dev/null &
    WATCH=$!
  fi
}
peak_watch_stop() {
  if [ -n "$WATCH" ]; then kill "$WATCH" 2>/dev/null; wait "$WATCH" 2>/dev/null; fi
  sort -n "$MEMLOG" | tail -1
}

# run_path NAME IMG_PER_S_COMMAND -- COMMAND...: run with a time limit, then record PASS/FAIL, img/s, peak MiB
run_path() {
  local name=$1 rate_cmd=$2; shift 3
  echo; echo "=== $name: $*"
  peak_watch_start "$name"
  local start=$SECONDS
  timeout "$PERPATH" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local peak; peak=$(peak_watch_stop)
  local rate; rate=$(eval "$rate_cmd" 2>/dev/null || echo -)
  local verdict=PASS
  if [ $rc -ne 0 ]; then verdict=FAIL; FAILED=$((FAILED + 1)); tail -15 "$OUT/$name.log"; fi
  SUMMARY+=("$(printf '%-34s %-4s %10s img/s %8s MiB %5ss' "$name" "$verdict" "${rate:--}" "${peak:--}" $((SECONDS - start)))")
  echo "${SUMMARY[-1]}"
}

last_img_per_s() {  # the last img_per_s a pretraining run wrote to metrics.json
  $PY -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print(round([x for x in r if 'img_per_s' in x][-1]['img_per_s'], 1))" "$1/metrics.json"
}
det_img_per_s() {  # images per step / median seconds per step, from detectron2's metrics.json
  $PY -c "import json,statistics,sys; t=[json.loads(l).get('time') for l in open(sys.argv[1] + '/metrics.json')]; print(round(int(sys.argv[2]) / statistics.median([x for x in t if x]), 1))" "$1" "$2"
}
step_img_per_s() { grep -o 'RESULT .* img/s' "$OUT/$1.log" | awk '{print $4}'; }

PRE=(DATA.ROOT "$DATA" SOLVER.EPOCHS 1 SOLVER.BATCH_SIZE 32 MOCO.K 256 INPUT.SIZE "$SIZE" KNN.PERIOD 1
     KNN.BATCH_SIZE 64 DATALOADER.NUM_WORKERS 4 LOG_PERIOD 2 DEVICE "$DEV" "${ARCH[@]}" "${AMP[@]}")

# ---- one GPU
run_path moco_v2_r50_amp_channels_last "step_img_per_s moco_v2_r50_amp_channels_last" -- \
  $PY benchmarks/gpu_smoke.py --name moco_v2_r50_amp_channels_last --config-file configs/pretrain/moco_v2_R50_200ep.yaml \
  --device "$DEV" --batch "$BATCH" --size "$SIZE" "${ARCH[@]}" "${SPLITS[@]}" "${AMP[@]}"
run_path moco_v2_r50_compile "step_img_per_s moco_v2_r50_compile" -- \
  $PY benchmarks/gpu_smoke.py --name moco_v2_r50_compile --compile --compile-backend "$COMPILE_BACKEND" --config-file configs/pretrain/moco_v2_R50_200ep.yaml \
  --device "$DEV" --batch "$BATCH" --size "$SIZE" "${ARCH[@]}" "${SPLITS[@]}" "${AMP[@]}"
run_path pretrain_loop_1proc_splitbn "last_img_per_s $OUT/p1" -- \
  $PY -m mocobench pretrain --nproc-per-node 1 --config-file configs/pretrain/moco_v2_R50_200ep.yaml "${PRE[@]}" \
  MOCO.SHUFFLE_BN_SPLITS 4 OUTPUT_DIR "$OUT/p1"

# ---- two GPUs: NCCL
if [ "$NGPU" -ge 2 ]; then
  run_path pretrain_2proc_nccl_shufflebn_v2 "last_img_per_s $OUT/p2" -- \
    $PY -m mocobench pretrain --nproc-per-node 2 --config-file configs/pretrain/moco_v2_R50_200ep.yaml "${PRE[@]}" \
    OUTPUT_DIR "$OUT/p2"
  run_path pretrain_2proc_syncbn_v3 "last_img_per_s $OUT/p3" -- \
    $PY -m mocobench pretrain --nproc-per-node 2 --config-file configs/pretrain/moco_v3_R50.yaml "${PRE[@]}" \
    OUTPUT_DIR "$OUT/p3"
  run_path lincls_2proc_ddp "echo -" -- \
    $PY -m mocobench lincls --nproc-per-node 2 --data "$DATA" --pretrained "$OUT/p2/checkpoint_0000.pth.tar" \
    --output "$OUT/lincls" --epochs 1 --batch-size 64 --size "$SIZE" --workers 4 --device "$DEV"
  DETPROCS=2
else
  echo "gpu_smoke: one GPU: the NCCL paths (shuffle BN / SyncBN over 2 processes, lincls DDP) are not checked"
  DETPROCS=1
fi
run_path "transfer_r50_fpn_syncbn_${DETITERS}it" "det_img_per_s $OUT/det/seed0 $((2 * DETPROCS))" -- \
  $PY -m mocobench transfer --config-file configs/detection/tiny_synth_coco_R_50_FPN.yaml --num-gpus "$DETPROCS" \
  --synth-root "$OUT/data" MODEL.DEVICE "$DETDEV" SOLVER.MAX_ITER "$DETITERS" SOLVER.IMS_PER_BATCH $((2 * DETPROCS)) \
  OUTPUT_DIR "$OUT/det"

echo; echo "=== gpu_smoke summary ($NGPU device(s), $DEV)"
printf '%s\n' "${SUMMARY[@]}"
echo "failed paths: $FAILED"
exit "$FAILED"
