"""MoCo pretraining: `mocobench pretrain --config-file configs/pretrain/X.yaml [--resume auto|PATH] [KEY VALUE ...]`.

One process:   mocobench pretrain --config-file ...
One node:      torchrun --nproc_per_node=8 -m pretrain.train --config-file ...
Several nodes: torchrun --nnodes=2 --node_rank=R --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT \
                   --nproc_per_node=8 -m pretrain.train --config-file ...
(torchrun's env:// variables are all it needs; NCCL on CUDA, gloo on CPU.)

A plain loop in the style of the torchvision reference scripts: build everything, then per epoch
train_one_epoch -> kNN monitor -> checkpoint. Data order and augmentation are functions of (SEED, epoch,
index) (pretrain.data), with any number of workers; the remaining randomness (the shuffle-BN permutation)
comes from the torch RNG, whose state each checkpoint carries, so a resumed run repeats an uninterrupted one.

Everything a run writes goes to OUTPUT_DIR: config.yaml, log.txt, metrics.json (one JSON object per line),
TensorBoard events, checkpoint_XXXX.pth.tar and last_checkpoint.

Never losing a run (pretrain.resume, mocobench.utils.preempt): one run per OUTPUT_DIR (another run's directory is
refused unless --resume), nothing written before every input is validated; SIGTERM / SIGUSR1 / Ctrl-C finish
the iteration, save an exact mid-epoch checkpoint and exit 143 / 138 / 130 with the resume command;
SOLVER.CHECKPOINT_PERIOD_ITERS adds periodic mid-epoch checkpoints against SIGKILL; `--resume auto` continues
bit-exactly (CPU, fixed seed) from the iteration it stopped at.
"""
import argparse
import json
import logging
import math
import os
import shlex
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from mocobench.utils import comm
from mocobench.utils.comm import check_replicas_equal, check_same_resume, setup_device, topology_summary
from mocobench.utils.env import set_tf32
from mocobench.utils.errors import UsageError
from mocobench.utils.fileio import atomic_write
from mocobench.utils.preempt import EXIT_CODES, Preempted, Preemption
from pretrain import checkpoint as ckpt
from pretrain import resume as resume_mod
from pretrain.config import load_config, lr_at, moco_momentum_at
from pretrain.moco import build_model, convert_sync_bn

logger = logging.getLogger("pretrain")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# ----------------------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------------------
def setup_distributed(cfg):
    """Join the launcher's process group when WORLD_SIZE > 1; returns the device of this process."""
    return setup_device(cfg.DEVICE)


def setup_logging(output_dir, tag="pretrain"):
    """Log lines "[time tag] message" to stdout and OUTPUT_DIR/log.txt, on the main process only."""
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    logger.propagate = False
    if comm.is_main_process():
        fmt = logging.Formatter(f"[%(asctime)s {tag}] %(message)s", "%m/%d %H:%M:%S")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(os.path.join(output_dir, "log.txt"))):
            handler.setFormatter(fmt)
            logger.addHandler(handler)


def seed_all(seed):
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(cfg, params, lr):
    """SGD or LARS over `params`. Pass model.parameters() of the unwrapped MoCo model, as the official
    main_moco.py does (SGD / LARS over all parameters of the DDP model, frozen key encoder included, in module
    order): parameters without a gradient get no state, so the training is the same, and the optimizer
    state_dict then has the official layout, which the official `optimizer.load_state_dict` (--resume) accepts."""
    from pretrain.lars import LARS

    optimizers = {
        "sgd": lambda: torch.optim.SGD(params, lr, momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY),
        "lars": lambda: LARS(params, lr, momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY),
    }
    return optimizers[cfg.SOLVER.OPTIMIZER]()


PRECISION_RECORD = "precision.json"


def precision_settings(cfg, device):
    """(autocast enabled, dtype, channels_last), and the TF32 switches set from cfg.TF32.

    AMP.ENABLED None follows the official recipe: fp16 autocast + GradScaler for MoCo v3 on CUDA, fp32 for v1/v2
    (and on CPU, where autocast is slower). channels_last defaults to on for CUDA. The resolved precision is
    logged and written to OUTPUT_DIR/precision.json (main process), so a run says what it computed in."""
    amp = cfg.AMP.ENABLED if cfg.AMP.ENABLED is not None else (device.type == "cuda" and cfg.MOCO.VERSION == "v3")
    dtype = torch.bfloat16 if cfg.AMP.DTYPE == "bfloat16" else torch.float16
    if amp and device.type == "cuda" and dtype == torch.bfloat16 and not comm.bf16_supported_in_hardware(device):
        dtype = torch.float16
    channels_last = cfg.CHANNELS_LAST if cfg.CHANNELS_LAST is not None else device.type == "cuda"
    record = {"device": str(device), "amp": bool(amp), "amp_dtype": str(dtype).replace("torch.", "") if amp else None,
              "grad_scaler": bool(amp and dtype == torch.float16), **set_tf32(cfg.TF32),
              "channels_last": bool(channels_last)}
    logger.info("precision: " + ", ".join(f"{k} {v}" for k, v in record.items()))
    if comm.is_main_process() and os.path.isdir(cfg.OUTPUT_DIR):
        with atomic_write(os.path.join(cfg.OUTPUT_DIR, PRECISION_RECORD), "w") as f:
            json.dump(record, f, indent=2)
    return amp, dtype, channels_last


def wrap_ddp(model, device):
    """Wrap only the submodules that receive gradients (model.ddp_modules) in DDP: the key encoder and the
    queue stay outside, so nothing but query-side gradients and BN buffers is communicated by DDP."""
    if comm.get_world_size() == 1:
        return
    for name in model.ddp_modules:
        module = getattr(model, name)
        setattr(model, name, DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda"
                                                     else None))


def replicated_state(model):
    """The tensors every rank updates on its own and must hold identically: the parameters outside DDP (the
    momentum encoder's), the queue and its pointer. (Its BN running statistics are per rank, as officially.)"""
    params = [p for name, p in model.named_parameters() if not name.startswith(model.ddp_modules)]
    return params + [b for name, b in model.named_buffers() if name in ("queue", "queue_ptr")]


def unwrap(module):
    return module.module if isinstance(module, DistributedDataParallel) else module


# ----------------------------------------------------------------------------------------------------------
# losses per MoCo version
# ----------------------------------------------------------------------------------------------------------
def moco_v1_v2_loss(model, x1, x2, m):
    model.m = m
    logits, labels = model(x1, x2)
    return F.cross_entropy(logits.float(), labels), logits, labels


def moco_v3_loss(model, x1, x2, m):
    return model(x1, x2, m)


LOSSES = {"v1": moco_v1_v2_loss, "v2": moco_v1_v2_loss, "v3": moco_v3_loss}


# ----------------------------------------------------------------------------------------------------------
# watching it learn
# ----------------------------------------------------------------------------------------------------------
class MetricsWriter:
    """metrics.json (one JSON object per line, detectron2 style) and TensorBoard, on the main process only.
    A run resumed at iteration N first drops the records after N (they are about to be written again) and a
    line a kill cut in half; TensorBoard purges its events after N the same way (purge_step)."""

    def __init__(self, output_dir, start_iteration=0):
        self.enabled = comm.is_main_process()
        self.tb = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            path = os.path.join(output_dir, "metrics.json")
            self._truncate(path, start_iteration)
            self.json = open(path, "a")
            self.tb = SummaryWriter(log_dir=output_dir, purge_step=start_iteration + 1 if start_iteration else None)

    @staticmethod
    def _truncate(path, start_iteration):
        if not os.path.exists(path):
            return
        kept = []
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # half a line: the process was killed while writing it
                if isinstance(record, dict) and record.get("iteration", 0) <= start_iteration:
                    kept.append(json.dumps(record) + "\n")
        with atomic_write(path, "w") as f:
            f.writelines(kept)

    def write(self, iteration, **scalars):
        if not self.enabled:
            return
        record = {"iteration": iteration, **{k: (round(v, 6) if isinstance(v, float) else v)
                                             for k, v in scalars.items()}}
        self.json.write(json.dumps(record) + "\n")
        self.json.flush()
        for key, value in scalars.items():
            if key != "epoch":
                self.tb.add_scalar(key, value, iteration)

    def close(self):
        if self.enabled:
            self.json.close()
            self.tb.close()


class Progress:
    """A tqdm bar on a terminal; plain log lines every LOG_PERIOD iterations otherwise. Main process only."""

    def __init__(self, total, epoch, epochs, log_period):
        self.enabled = comm.is_main_process()
        self.bar = None
        self.total, self.epoch, self.epochs, self.log_period = total, epoch, epochs, log_period
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", dynamic_ncols=True, leave=True)

    def update(self, i, **stats):
        if not self.enabled:
            return
        text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif (i + 1) % self.log_period == 0 or i + 1 == self.total:
            logger.info(f"epoch {self.epoch + 1}/{self.epochs} iter {i + 1}/{self.total}  {text}")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def knn_monitor(cfg, model, device, num_workers):
    """Weighted kNN top-1 (%) of the backbone features (before the projection head), DATA.ROOT/train as the
    memory bank and DATA.ROOT/val as queries; None when val/ does not exist. Every process: each extracts
    its shard of the images and the bank is all-gathered (pretrain.knn), the same answer on every rank."""
    from pretrain.augment import build_eval_transform
    from pretrain.data import SafeImageFolder, build_loader
    from pretrain.knn import knn_accuracy, shard

    val_dir = os.path.join(cfg.DATA.ROOT, "val")
    if not os.path.isdir(val_dir):
        return None
    transform = build_eval_transform(cfg.INPUT.SIZE)
    train_set = SafeImageFolder(os.path.join(cfg.DATA.ROOT, "train"), transform)
    val_set = SafeImageFolder(val_dir, transform)
    loaders = [build_loader(shard(s), cfg.KNN.BATCH_SIZE, num_workers, shuffle=False, drop_last=False,
                            seed=cfg.SEED) for s in (train_set, val_set)]
    encoder = unwrap(model.encoder_q if cfg.MOCO.VERSION != "v3" else model.base_encoder)
    if comm.get_world_size() > 1:  # BN running statistics: rank 0's (the checkpointed ones) on every rank
        for buffer in encoder.buffers():
            dist.broadcast(buffer, src=0)

    def backbone_features(x):  # a torchvision ResNet up to the global average pool
        x = encoder.maxpool(encoder.relu(encoder.bn1(encoder.conv1(x))))
        x = encoder.layer4(encoder.layer3(encoder.layer2(encoder.layer1(x))))
        return torch.flatten(encoder.avgpool(x), 1)

    was_training = model.training
    model.eval()
    try:
        return knn_accuracy(backbone_features, *loaders, k=cfg.KNN.K, t=cfg.KNN.T,
                            num_classes=len(train_set.classes), device=device)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------
class LogWindow:
    """Per-iteration loss / acc@1 / data time since the last metrics line, and the images per second over it."""

    def __init__(self, batch_size):
        self.batch_size = batch_size
        self.reset()

    def reset(self):
        self.loss = self.acc1 = self.data_time = 0.0
        self.n = 0
        self.start = time.perf_counter()

    def add(self, loss, acc1, data_time):
        self.loss += loss
        self.acc1 += acc1
        self.data_time += data_time
        self.n += 1

    def img_per_s(self):
        return self.n * self.batch_size / max(time.perf_counter() - self.start, 1e-9)

    def means(self):
        return {"loss": self.loss / self.n, "acc1": self.acc1 / self.n, "data_time": self.data_time / self.n}


def optimization_step(loss, optimizer, scaler, iteration, epoch, i, iters):
    """Backward and step (through the GradScaler for fp16); returns loss.item(). A NaN/inf loss raises
    TrainingDiverged naming the iteration before any weight changes, so the last checkpoint stays good."""
    loss_value = loss.item()
    # every rank decides together: one rank raising alone would leave the others blocked in backward's all-reduce
    if not comm.all_ranks_agree(math.isfinite(loss_value), loss.device):
        what = f"{loss_value}" if not math.isfinite(loss_value) else "not finite on another rank"
        raise TrainingDiverged(f"loss is {what} at iteration {iteration + 1} (epoch {epoch + 1}, "
                               f"iteration {i + 1}/{iters} of the epoch); stopping")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss_value


def train_one_epoch(cfg, model, loader, optimizer, scaler, epoch, iteration, device, precision, metrics,
                    start_i=0, checkpointer=None):
    """One epoch from its iteration start_i (an exact mid-epoch resume: the sampler skips what was done);
    checkpointer.after_iteration (pretrain.resume) runs after every iteration: periodic and preemption saves."""
    amp, amp_dtype, channels_last = precision
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    compute_loss = LOSSES[cfg.MOCO.VERSION]
    iters = len(loader)
    progress = Progress(iters, epoch, cfg.SOLVER.EPOCHS, cfg.LOG_PERIOD)
    window = LogWindow(cfg.SOLVER.BATCH_SIZE)
    model.train()
    end = time.perf_counter()
    for i, ((x1, x2), _) in enumerate(loader, start_i):
        data_time = time.perf_counter() - end
        epoch_float = epoch + i / iters
        lr = lr_at(cfg, epoch_float)
        for group in optimizer.param_groups:
            group["lr"] = lr
        moco_m = moco_momentum_at(cfg, epoch_float)
        x1 = x1.to(device, non_blocking=True, memory_format=memory_format)
        x2 = x2.to(device, non_blocking=True, memory_format=memory_format)

        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            loss, logits, labels = compute_loss(model, x1, x2, moco_m)
        loss_value = optimization_step(loss, optimizer, scaler, iteration, epoch, i, iters)
        iteration += 1

        acc1 = (logits.argmax(dim=1) == labels).float().mean().item() * 100.0
        window.add(loss_value, acc1, data_time)
        img_per_s = window.img_per_s()
        progress.update(i, loss=loss_value, acc1=acc1, lr=lr, img_s=round(img_per_s, 1))
        if iteration % cfg.LOG_PERIOD == 0 or i + 1 == iters:
            means = window.means()
            scalars = {"epoch": epoch + 1, "loss": means["loss"], "acc1": means["acc1"], "lr": lr,
                       "moco_m": moco_m, "img_per_s": img_per_s, "data_time": means["data_time"]}
            if cfg.MOCO.VERSION != "v3":
                scalars["queue_fill"] = min(1.0, iteration * cfg.SOLVER.BATCH_SIZE / cfg.MOCO.K)
            metrics.write(iteration, **scalars)
            window.reset()
        if checkpointer is not None:
            checkpointer.after_iteration(epoch, i, iters, iteration)
        end = time.perf_counter()
    progress.close()
    return iteration


def train(cfg, resume=None):
    device = setup_distributed(cfg)
    world, rank = comm.get_world_size(), comm.get_rank()
    if cfg.SOLVER.BATCH_SIZE % world != 0:
        raise UsageError(f"SOLVER.BATCH_SIZE = {cfg.SOLVER.BATCH_SIZE} (global) is not divisible by the "
                         f"{world} processes")
    batch_per_rank = cfg.SOLVER.BATCH_SIZE // world
    # One process: emulate SHUFFLE_BN_SPLITS devices' BN. Several: each rank's BN is one device's (v1/v2),
    # SyncBN for v3 (as the official v3 code).
    bn_splits = cfg.MOCO.SHUFFLE_BN_SPLITS if world == 1 and cfg.MOCO.VERSION != "v3" else 1
    if batch_per_rank % bn_splits != 0:
        raise UsageError(f"MOCO.SHUFFLE_BN_SPLITS = {bn_splits} must divide the batch size "
                         f"{batch_per_rank}")
    logger.handlers.clear()  # until setup_logging: not into an earlier run's log.txt (in-process reruns)
    point = resume_mod.plan_resume(cfg, resume, world)  # nothing is written before every input is validated
    comm.barrier()  # every rank has looked at OUTPUT_DIR before rank 0 writes into it
    if point is not None and point.finished:
        if comm.is_main_process():
            print(resume_mod.finished_message(cfg, point), flush=True)
        return None

    # Data first: a bad DATA.ROOT should fail before a model is built.
    from pretrain.augment import build_two_view_transform
    from pretrain.data import SafeImageFolder, build_loader

    train_set = SafeImageFolder(os.path.join(cfg.DATA.ROOT, "train"),
                                build_two_view_transform(cfg.INPUT.AUG, cfg.INPUT.SIZE, cfg.INPUT.CROP_SCALE))
    loader = build_loader(train_set, batch_per_rank, cfg.DATALOADER.NUM_WORKERS, shuffle=True, drop_last=True,
                          distributed=world > 1, seed=cfg.SEED)
    if len(loader) == 0:
        raise UsageError(f"{train_set.root}: {len(train_set)} images give no full batch of {batch_per_rank} "
                         "per process; lower SOLVER.BATCH_SIZE")

    seed_all(cfg.SEED)  # same seed on every rank: identical initial weights and queue
    model = build_model(cfg, bn_splits=bn_splits)
    if world > 1 and cfg.MOCO.VERSION == "v3":
        model = convert_sync_bn(model, device)  # torch's SyncBatchNorm on CUDA, AllReduceBatchNorm on CPU
    amp, amp_dtype, channels_last = precision_settings(cfg, device)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = build_optimizer(cfg, model.parameters(), lr_at(cfg, 0.0))  # all of them: the official layout
    scaler = torch.amp.GradScaler(device.type) if amp and amp_dtype == torch.float16 else None
    seed_all(cfg.SEED + rank)
    start_epoch, iteration, start_i = resume_mod.restore(point, model, optimizer, scaler,
                                                         ckpt.load_official_state_dict)

    lock = resume_mod.open_run_dir(cfg, point)
    setup_logging(cfg.OUTPUT_DIR)
    precision_settings(cfg, device)  # again, now that the run directory is open: log and write precision.json
    if comm.is_main_process():
        with atomic_write(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
            f.write(cfg.dump())
    bn_group = cfg.SOLVER.BATCH_SIZE if cfg.MOCO.VERSION == "v3" else batch_per_rank // bn_splits  # v3: SyncBN
    logger.info(topology_summary(world, cfg.SOLVER.BATCH_SIZE, bn_group, cfg.SOLVER.BASE_LR, device))
    log_resume(point, start_epoch, start_i, iteration, len(loader))
    check_same_resume(point.path if point else None, start_epoch, iteration)
    if world > 1:  # every rank starts from rank 0's state, key encoder and queue included
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    wrap_ddp(model, device)
    if cfg.COMPILE:
        for module in model.children():
            module.compile()

    metrics = MetricsWriter(cfg.OUTPUT_DIR, iteration)
    try:
        with Preemption() as stop:
            checkpointer = resume_mod.Checkpointer(cfg, model, optimizer, scaler, ckpt.official_state_dict, stop,
                                                   device, point.path if point else None, logger)
            for epoch in range(start_epoch, cfg.SOLVER.EPOCHS):
                loader.sampler.set_epoch(epoch)
                loader.sampler.skip(start_i * batch_per_rank)
                iteration = train_one_epoch(cfg, model, loader, optimizer, scaler, epoch, iteration, device,
                                            (amp, amp_dtype, channels_last), metrics, start_i, checkpointer)
                start_i = 0
                bad = train_set.check_bad_fraction()
                if bad:
                    logger.warning(f"{bad} unreadable image(s) skipped so far, e.g. {train_set.bad_files()[:3]}")
                last_epoch = epoch + 1 == cfg.SOLVER.EPOCHS
                if cfg.KNN.PERIOD > 0 and ((epoch + 1) % cfg.KNN.PERIOD == 0 or last_epoch):
                    top1 = knn_monitor(cfg, model, device, cfg.DATALOADER.NUM_WORKERS)
                    if top1 is not None:
                        logger.info(f"epoch {epoch + 1}: kNN top-1 {top1:.2f}%")
                        metrics.write(iteration, epoch=epoch + 1, knn_top1=top1)
                if world > 1:  # what DDP does not keep in step (momentum encoder weights, queue) must still agree
                    check_replicas_equal("the momentum encoder's weights and the queue", replicated_state(model))
                checkpointer.after_epoch(epoch, iteration)
    finally:
        metrics.close()
        if lock is not None:
            lock.close()
    return model


def log_resume(point, start_epoch, start_i, iteration, iters):
    if point is not None:
        logger.info(f"resumed from {point.path}: starting at epoch {start_epoch + 1}"
                    + (f", iteration {start_i + 1}/{iters} of it" if start_i else "") + f" (iteration {iteration})")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mocobench pretrain",
        description="MoCo v1/v2/v3 pretraining of a torchvision ResNet (see configs/pretrain/).",
        epilog="Example: mocobench pretrain --config-file configs/pretrain/synth_R18_cpu.yaml "
               "DATA.ROOT /data/imagenet OUTPUT_DIR out/r18 SOLVER.EPOCHS 2",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="YAML config (may use _BASE_)")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="'auto': continue from OUTPUT_DIR/last_checkpoint if present; or a checkpoint path")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE",
                        help="config overrides, e.g. SOLVER.EPOCHS 10 MOCO.K 4096 (flags may come before or after)")
    return parser


def resume_command(prog, args):
    """The command line that continues this run (printed when it stops on a signal)."""
    return " ".join(shlex.quote(x) for x in [*prog.split(), "--config-file", args.config_file, "--resume", "auto",
                                              *args.opts])


def run_command(parser, train_fn, argv, moco=True) -> int:
    """The body of `mocobench pretrain` and `mocobench supervised`: parse, train, clean exit codes:
    0 done, 1 diverged, 2 bad input (UsageError, raised to the caller), 130 / 143 / 138 stopped by
    SIGINT / SIGTERM / SIGUSR1 after saving (mocobench.utils.preempt)."""
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.config_file, args.opts, moco=moco)
    try:
        train_fn(cfg, resume=args.resume)
    except Preempted as e:
        line = f"{parser.prog}: {e}; resume with: {resume_command(parser.prog, args)}"
        if comm.is_main_process():  # one line on stderr (the job log), the same in log.txt
            for handler in logger.handlers:
                if isinstance(handler, logging.FileHandler):
                    handler.emit(logger.makeRecord(logger.name, logging.WARNING, __file__, 0, line, None, None))
            print(line, file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:  # before the training loop's handler was installed, or Ctrl-C twice
        print(f"{parser.prog}: interrupted; resume from the last checkpoint with: "
              f"{resume_command(parser.prog, args)}", file=sys.stderr, flush=True)
        return EXIT_CODES[int(signal.SIGINT)]
    except TrainingDiverged as e:
        logger.error(f"{e}. The last good checkpoint is the one {os.path.join(cfg.OUTPUT_DIR, ckpt.LAST_CHECKPOINT)}"
                     " names (if any); lower SOLVER.BASE_LR or check the data.")
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def torchrun_entry(main, prog):
    """`torchrun -m pretrain.X`: the same clean error and exit code 2 as the mocobench command."""
    try:
        sys.exit(main())
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    return run_command(build_parser(), train, argv)


if __name__ == "__main__":
    torchrun_entry(main, "mocobench pretrain")
