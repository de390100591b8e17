"""One MoCo training-step path on one device: img/s, peak memory, PASS/FAIL (called by
benchmarks/gpu_smoke.sh).

    python benchmarks/gpu_smoke.py --config-file configs/pretrain/moco_v2_R50_200ep.yaml \
        [--compile] [--batch 64] [--size 224] [--steps 10] [--device cuda] [KEY VALUE ...]

The model, BN (SplitBatchNorm over MOCO.SHUFFLE_BN_SPLITS groups, shuffle BN), precision (AMP
dtype with the hardware bf16 check, channels_last) and step are the training script's own
(pretrain.moco.build_model, pretrain.engine.precision_settings / optimization_step,
pretrain.train.LOSSES); the images are random tensors, so this measures the GPU step, not the data
loader. Prints one line: `RESULT name PASS|FAIL img/s peak_MiB details`.
"""
import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.config import load_config  # noqa: E402
from pretrain.engine import build_optimizer, optimization_step, precision_settings  # noqa: E402
from pretrain.moco import build_model  # noqa: E402
from pretrain.train import LOSSES  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--name", default="moco_step")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the encoders (as COMPILE True)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend; the CPU dry run uses 'eager' (inductor's C++ "
                             "build takes minutes)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = parser.parse_args()
    cfg = load_config(args.config_file, ["SOLVER.BATCH_SIZE", str(args.batch), "MOCO.K",
                                         str(args.batch * 16), "DEVICE", args.device, *args.opts])
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp, dtype, channels_last = precision_settings(cfg, device)
    splits = cfg.MOCO.SHUFFLE_BN_SPLITS if cfg.MOCO.VERSION != "v3" else 1
    compiled = args.compile_backend if args.compile else "off"
    detail = (f"{cfg.MODEL.ARCH} MoCo {cfg.MOCO.VERSION}, batch {args.batch} at {args.size} px, BN "
              f"groups {splits}, AMP {dtype if amp else 'off'}, channels_last {channels_last}, "
              f"compile {compiled}")
    try:
        torch.manual_seed(0)
        model = build_model(cfg, bn_splits=splits)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model.to(device, memory_format=memory_format)
        if args.compile:
            for module in model.children():
                module.compile(backend=args.compile_backend)
        optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], 0.03)
        scaler = torch.amp.GradScaler(device.type) if amp and dtype == torch.float16 else None
        x1 = torch.randn(args.batch, 3, args.size, args.size,
                         device=device).to(memory_format=memory_format)
        x2 = torch.randn_like(x1)
        loss_fn = LOSSES[cfg.MOCO.VERSION]

        def step(i):
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                loss, _, _ = loss_fn(model, x1, x2, cfg.MOCO.M)
            optimization_step(loss, optimizer, scaler)
            return loss.detach()  # read once after the timing, as the training loop reads it

        for i in range(3):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        losses = [step(i) for i in range(args.steps)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        img_s = args.steps * args.batch / (time.perf_counter() - start)
        losses = torch.stack(losses).tolist()
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        ok = all(math.isfinite(v) for v in losses)
        print(f"RESULT {args.name} {'PASS' if ok else 'FAIL'} {img_s:.1f} img/s {peak:.0f} MiB  "
              f"{detail}; losses {losses[0]:.3f} .. {losses[-1]:.3f}", flush=True)
        return 0 if ok else 1
    # a smoke test reports every failure as FAIL with its reason
    except Exception as e:  # noqa: BLE001
        print(f"RESULT {args.name} FAIL - img/s - MiB  {detail}; {type(e).__name__}: {e}",
              flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
