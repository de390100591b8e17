"""One path of benchmarks/gpu_smoke.sh on one device: img/s, peak memory, PASS/FAIL.

    python benchmarks/gpu_smoke.py --config-file configs/pretrain/moco_v2_R50_200ep.yaml \
        [--compile] [--batch 64] [--size 224] [--steps 10] [--device cuda] [KEY VALUE ...]
    python benchmarks/gpu_smoke.py --loader [--workers 8] [--images 256] [--batch 64] [--size 224]
    python benchmarks/gpu_smoke.py --compare RUN_A RUN_B --iterations N [--groups A B] \
        [--tolerance T]

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
Compare (--compare): two pretraining runs' final checkpoints hold the same state (weights, queue
and its pointer, BN statistics, optimizer, GradScaler, RNG, counters): integers and RNG states
exactly, floats exactly or within --tolerance; and each ran the N iterations its data gives (N from
the image count, not from the product: a sampler that skips a batch in every run is found too);
--groups: the process group each run records in topology.json (nccl, gloo or none; a group runs
DDP). Exit 0 when all hold.
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
    parser.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                        help="compare two pretraining runs' final checkpoints instead")
    parser.add_argument("--iterations", type=int, help="--compare: the iterations each run must "
                                                       "have done (images // batch x epochs)")
    parser.add_argument("--groups", nargs=2, metavar=("A", "B"),
                        help="--compare: each run's process group: nccl, gloo or none")
    parser.add_argument("--tolerance", type=float, default=0.0,
                        help="--compare: max |difference| of float tensors (0: bit for bit)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = parser.parse_args()
    if args.loader:
        return loader_path(args)
    if args.compare:
        return compare_runs(args)
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


def compare_runs(args):
    """--compare: see the module doc. Prints what differs (or the largest float difference) and
    the runs' iterations and process groups."""
    import json

    import yaml

    from pretrain.checkpoint import find_resume_path, load_checkpoint

    failures, diffs = [], {}

    def compare(where, a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            if a.keys() != b.keys():
                failures.append(f"{where}: keys {sorted(set(a) ^ set(b))[:5]} in one run only")
            for key in [k for k in a if k in b]:
                compare(f"{where}.{key}", a[key], b[key])
        elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                compare(f"{where}[{i}]", x, y)
        elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.shape != b.shape or a.dtype != b.dtype:
                failures.append(f"{where}: {a.dtype} {list(a.shape)} vs {b.dtype} {list(b.shape)}")
            elif a.is_floating_point() and not where.startswith("rng"):
                diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
                part = where.split(".")[0] if not where.startswith("state_dict.module.queue") \
                    else "queue"
                diffs[part] = max(diffs.get(part, 0.0), diff)
                if not diff <= args.tolerance:  # NaN fails too
                    failures.append(f"{where}: max |difference| {diff:.3g}")
            elif not torch.equal(a, b):
                failures.append(f"{where}: {a.flatten()[:4].tolist()}... vs "
                                f"{b.flatten()[:4].tolist()}...")
        elif a != b and not (isinstance(a, float) and a != a and b != b):  # NaN == NaN
            failures.append(f"{where}: {a!r} vs {b!r}")

    runs = []
    for run_dir in args.compare:
        path = find_resume_path(run_dir, "auto")
        if path is None:
            print(f"RESULT compare FAIL: {run_dir} has no checkpoint")
            return 1
        runs.append(load_checkpoint(path))
    a, b = runs
    for key in ("epoch", "iteration", "epoch_iteration", "world_size", "state_dict", "optimizer",
                "scaler", "rng", "task_state"):
        compare(key, a.get(key), b.get(key))
    if args.iterations is not None:
        for run_dir, ckpt in zip(args.compare, runs):
            if ckpt["iteration"] != args.iterations:
                failures.append(f"{run_dir}: {ckpt['iteration']} iterations, its data gives "
                                f"{args.iterations}")
            queue_ptr = ckpt["state_dict"].get("module.queue_ptr")
            if queue_ptr is not None:  # v1/v2: a batch of keys enqueued per iteration
                cfg = yaml.safe_load(ckpt["config"])
                batch, k = cfg["SOLVER"]["BATCH_SIZE"], cfg["MOCO"]["K"]
                want_ptr = args.iterations * batch % k
                if int(queue_ptr) != want_ptr:
                    failures.append(f"{run_dir}: queue_ptr {int(queue_ptr)}, {args.iterations} "
                                    f"iterations of {batch} keys give {want_ptr}")
    groups = []
    for run_dir, expected in zip(args.compare, args.groups or ()):
        record = json.load(open(os.path.join(run_dir, "topology.json")))
        group = record.get("process_group") or "none"
        ddp = "DistributedDataParallel over" in open(os.path.join(run_dir, "log.txt")).read()
        groups.append(f"{os.path.basename(run_dir)}: world {record['world_size']}, process group "
                      f"{group}, DDP {ddp}")
        if (group, record["world_size"], ddp) != (expected, 1, expected != "none"):
            failures.append(f"{run_dir}: world {record['world_size']}, process group {group}, "
                            f"DDP {ddp}; expected world 1, {expected}, DDP {expected != 'none'}")
    figures = ", ".join(f"{k} {v:.3g}" for k, v in sorted(diffs.items()))
    how = "bit for bit" if args.tolerance == 0 else f"tolerance {args.tolerance:g}"
    print(f"RESULT compare {'FAIL' if failures else 'PASS'} {args.compare[0]} vs "
          f"{args.compare[1]} ({how}): iteration {a['iteration']} vs {b['iteration']}; max "
          f"|difference| {figures}" + (f"; {'; '.join(groups)}" if groups else ""))
    for line in failures[:20]:
        print(f"  differs: {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
