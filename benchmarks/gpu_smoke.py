"""One path of benchmarks/gpu_smoke.sh on one device: img/s, peak memory, PASS/FAIL.

    python benchmarks/gpu_smoke.py --config-file configs/pretrain/moco_v2_R50_200ep.yaml \
        [--compile] [--batch 64] [--size 224] [--steps 10] [--device cuda] [KEY VALUE ...]
    python benchmarks/gpu_smoke.py --loader [--workers 8] [--images 256] [--batch 64] [--size 224]

Step: the model, BN (SplitBatchNorm over MOCO.SHUFFLE_BN_SPLITS groups, shuffle BN), optimizer (SGD
or LARS), precision (TF32, AMP dtype with the hardware bf16 check and the GradScaler,
channels_last) and step are the training script's own (pretrain.moco.build_model,
pretrain.engine.build_optimizer / precision_settings / optimization_step, pretrain.train.LOSSES);
the images are random uint8 batches normalised on the device as the step does, so this measures the
GPU step, not the data loader.
Loader (--loader): ImageNet-size JPEGs (~500x375) through the training loader (pretrain.data:
SafeImageFolder, the MoCo v2 two-view transform, build_loader with N workers, pinned memory on
CUDA), each batch moved and normalised on the device: the loader's img/s.
Prints one line: `RESULT name PASS|FAIL img/s peak_MiB details`.
"""
import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # augment_throughput's JPEGs

from pretrain.augment import normalize  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.engine import build_optimizer, optimization_step, precision_settings  # noqa: E402
from pretrain.moco import build_model  # noqa: E402
from pretrain.train import LOSSES  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", help="the step's pretraining config")
    parser.add_argument("--loader", action="store_true", help="measure the data loader instead")
    parser.add_argument("--workers", type=int, default=8, help="--loader: DataLoader workers")
    parser.add_argument("--images", type=int, default=256, help="--loader: JPEGs to write")
    parser.add_argument("--name", default="moco_step")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the encoders (as COMPILE True)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend; the CPU dry run uses 'eager' (inductor's C++ "
                             "build takes minutes)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = parser.parse_args()
    if args.loader:
        return loader_path(args)
    cfg = load_config(args.config_file, ["SOLVER.BATCH_SIZE", str(args.batch), "MOCO.K",
                                         str(args.batch * 16), "DEVICE", args.device, *args.opts])
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp, dtype, channels_last = precision_settings(cfg, device)
    splits = cfg.MOCO.SHUFFLE_BN_SPLITS if cfg.MOCO.VERSION != "v3" else 1
    compiled = args.compile_backend if args.compile else "off"
    detail = (f"{cfg.MODEL.ARCH} MoCo {cfg.MOCO.VERSION}, batch {args.batch} at {args.size} px, BN "
              f"groups {splits}, {cfg.SOLVER.OPTIMIZER}, AMP {dtype if amp else 'off'}, GradScaler "
              f"{amp and dtype == torch.float16}, TF32 matmul "
              f"{torch.backends.cuda.matmul.allow_tf32} cudnn {torch.backends.cudnn.allow_tf32}, "
              f"channels_last {channels_last}, compile {compiled}")
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
        # uint8 batches as the workers send them, normalised on the device as the step does
        shape = (args.batch, 3, args.size, args.size)
        x1 = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
        x2 = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
        loss_fn = LOSSES[cfg.MOCO.VERSION]

        def step(i):
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                q = normalize(x1.contiguous(memory_format=memory_format))
                k = normalize(x2.contiguous(memory_format=memory_format))
                loss, _, _ = loss_fn(model, q, k, cfg.MOCO.M)
            optimization_step(loss, optimizer, scaler)
            return loss.detach()  # read once after the timing, as the training loop reads it

        for i in range(args.warmup):
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


def loader_path(args):
    """The training loader's img/s on ImageNet-size JPEGs (two MoCo v2 views per image)."""
    import tempfile

    from augment_throughput import write_jpegs

    from pretrain.augment import build_two_view_transform
    from pretrain.data import SafeImageFolder, build_loader

    device = torch.device(args.device)
    detail = (f"{args.images} JPEGs ~500x375, two v2 views at {args.size} px, batch {args.batch}, "
              f"{args.workers} workers, pinned memory {torch.cuda.is_available()}")
    try:
        with tempfile.TemporaryDirectory() as root:
            os.makedirs(os.path.join(root, "class0"))
            write_jpegs(os.path.join(root, "class0"), args.images, 375, 500)
            dataset = SafeImageFolder(root, build_two_view_transform("v2", args.size))
            loader = build_loader(dataset, args.batch, args.workers, seed=0)
            loader.sampler.set_epoch(0)
            batches = iter(loader)
            next(batches)  # the workers' start-up is not the loader's rate
            start, seen = time.perf_counter(), 0
            for (view1, view2), _ in batches:
                for view in (view1, view2):
                    x = normalize(view.to(device, non_blocking=True))
                seen += view1.shape[0]
            if device.type == "cuda":
                torch.cuda.synchronize()
            img_s = seen / (time.perf_counter() - start)
        ok = seen > 0 and bool(torch.isfinite(x).all())
        print(f"RESULT loader {'PASS' if ok else 'FAIL'} {img_s:.1f} img/s - MiB  {detail}",
              flush=True)
        return 0 if ok else 1
    except Exception as e:  # noqa: BLE001
        print(f"RESULT loader FAIL - img/s - MiB  {detail}; {type(e).__name__}: {e}", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
