"""Supervised baseline: `mocobench supervised --config-file X.yaml [--resume auto|PATH] [KEY VALUE ...]`.

The classifier MoCo is compared against: a torchvision ResNet trained with cross-entropy on the same
images (DATA.ROOT/train) with their labels and the same budget (epochs, batch, image size). Same config
system and keys as `mocobench pretrain` (pretrain.config; the MOCO.* and KNN.* keys are unused), same loop
conventions, and the helpers of pretrain.train: torchrun/DDP, logging, metrics.json, progress, AMP,
checkpoints every epoch with exact `--resume auto`, and pretrain.resume's run-directory rules and clean stops
(SIGTERM / SIGUSR1 / Ctrl-C: exact mid-epoch checkpoint, exit 143 / 138 / 130).

    One process:  mocobench supervised --config-file configs/pretrain/synth_R18_cpu_supervised.yaml
    One node:     torchrun --nproc_per_node=8 -m pretrain.supervised --config-file ...

Recipe (torchvision's ResNet reference): RandomResizedCrop(0.08-1) + flip, SGD with momentum, lr per 256
images (SOLVER.BASE_LR), per-process BatchNorm. After every epoch: top-1 accuracy on DATA.ROOT/val when it
exists (resize + centre crop), written to metrics.json as `val_top1`.

Checkpoints (pretrain.checkpoint layout): `state_dict` holds plain torchvision keys (conv1.weight, bn1.*,
layer1.0.conv1.weight, ..., fc.*), as torchvision's own resnet50-*.pth, so `mocobench convert` takes it as a
torchvision checkpoint.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from mocobench.utils import comm
from mocobench.utils.comm import check_same_resume, topology_summary
from mocobench.utils.errors import UsageError
from mocobench.utils.fileio import atomic_write
from mocobench.utils.preempt import Preemption
from pretrain import checkpoint as ckpt
from pretrain import resume as resume_mod
from pretrain.config import lr_at
from pretrain.moco import resnet_builder
from pretrain.train import (
    LogWindow,
    MetricsWriter,
    Progress,
    build_optimizer,
    log_resume,
    logger,
    optimization_step,
    precision_settings,
    run_command,
    seed_all,
    setup_distributed,
    setup_logging,
    torchrun_entry,
    unwrap,
)


def build_classifier(cfg, num_classes):
    """The torchvision ResNet MODEL.ARCH with a num_classes-way fc (torchvision's default initialisation)."""
    return resnet_builder(cfg.MODEL.ARCH, zero_init_residual=cfg.MODEL.ZERO_INIT_RESIDUAL)(num_classes)


def train_one_epoch(cfg, model, loader, optimizer, scaler, epoch, iteration, device, precision, metrics,
                    start_i=0, checkpointer=None):
    amp, amp_dtype, channels_last = precision
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    iters = len(loader)
    progress = Progress(iters, epoch, cfg.SOLVER.EPOCHS, cfg.LOG_PERIOD)
    window = LogWindow(cfg.SOLVER.BATCH_SIZE)
    model.train()
    end = time.perf_counter()
    for i, (images, target) in enumerate(loader, start_i):
        data_time = time.perf_counter() - end
        lr = lr_at(cfg, epoch + i / iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        target = target.to(device, non_blocking=True)

        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), target)
        loss_value = optimization_step(loss, optimizer, scaler, iteration, epoch, i, iters)
        iteration += 1

        acc1 = (logits.argmax(dim=1) == target).float().mean().item() * 100.0  # this process's share of the batch
        window.add(loss_value, acc1, data_time)
        img_per_s = window.img_per_s()
        progress.update(i, loss=loss_value, acc1=acc1, lr=lr, img_s=round(img_per_s, 1))
        if iteration % cfg.LOG_PERIOD == 0 or i + 1 == iters:
            metrics.write(iteration, epoch=epoch + 1, lr=lr, img_per_s=img_per_s, **window.means())
            window.reset()
        if checkpointer is not None:
            checkpointer.after_iteration(epoch, i, iters, iteration)
        end = time.perf_counter()
    progress.close()
    return iteration


@torch.no_grad()
def evaluate(model, loader, device, precision):
    """(top-1 %, mean loss) over this process's share of the val set, summed over all processes: each rank
    holds every world-th image (no padding, so every image counts exactly once)."""
    amp, amp_dtype, channels_last = precision
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = unwrap(model)
    if comm.get_world_size() > 1:
        # each rank's BN running statistics last saw its own batch: evaluate rank 0's, the checkpointed model
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, images
    try:
        for images, target in loader:
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            target = target.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                logits = model(images).float()
            totals[0] += (logits.argmax(dim=1) == target).sum()
            totals[1] += F.cross_entropy(logits, target, reduction="sum")
            totals[2] += target.numel()
    finally:
        model.train(was_training)
    if comm.get_world_size() > 1:
        dist.all_reduce(totals)
    correct, loss_sum, seen = totals.tolist()
    return 100.0 * correct / max(seen, 1.0), loss_sum / max(seen, 1.0)


def build_val_loader(cfg, batch_per_rank, train_classes):
    """This process's every world-th image of DATA.ROOT/val, or None when val/ does not exist."""
    from pretrain.augment import build_eval_transform
    from pretrain.data import SafeImageFolder, build_loader

    val_dir = os.path.join(cfg.DATA.ROOT, "val")
    if not os.path.isdir(val_dir):
        return None
    val_set = SafeImageFolder(val_dir, build_eval_transform(cfg.INPUT.SIZE))
    if val_set.classes != train_classes:
        raise UsageError(f"{val_dir!r} has classes {val_set.classes[:5]}... but the train folder has "
                         f"{train_classes[:5]}...: val/ must hold the same class folders as train/")
    shard = torch.utils.data.Subset(val_set, range(comm.get_rank(), len(val_set), comm.get_world_size()))
    return build_loader(shard, batch_per_rank, cfg.DATALOADER.NUM_WORKERS, shuffle=False, drop_last=False,
                        seed=cfg.SEED)


def train(cfg, resume=None):
    device = setup_distributed(cfg)
    world, rank = comm.get_world_size(), comm.get_rank()
    if cfg.SOLVER.BATCH_SIZE % world != 0:
        raise UsageError(f"SOLVER.BATCH_SIZE = {cfg.SOLVER.BATCH_SIZE} (global) is not divisible by the "
                         f"{world} processes")
    batch_per_rank = cfg.SOLVER.BATCH_SIZE // world
    logger.handlers.clear()  # until setup_logging: not into an earlier run's log.txt (in-process reruns)
    point = resume_mod.plan_resume(cfg, resume, world, moco=False)  # nothing written before inputs are valid
    comm.barrier()  # every rank has looked at OUTPUT_DIR before rank 0 writes into it
    if point is not None and point.finished:
        if comm.is_main_process():
            print(resume_mod.finished_message(cfg, point), flush=True)
        return None

    # Data first: a bad DATA.ROOT should fail before a model is built.
    from pretrain.augment import build_linear_train_transform
    from pretrain.data import SafeImageFolder, build_loader

    transform = build_linear_train_transform(cfg.INPUT.SIZE, cfg.INPUT.CROP_SCALE)
    train_set = SafeImageFolder(os.path.join(cfg.DATA.ROOT, "train"), transform)
    loader = build_loader(train_set, batch_per_rank, cfg.DATALOADER.NUM_WORKERS, shuffle=True, drop_last=True,
                          distributed=world > 1, seed=cfg.SEED)
    if len(loader) == 0:
        raise UsageError(f"{train_set.root}: {len(train_set)} images give no full batch of {batch_per_rank} "
                         "per process; lower SOLVER.BATCH_SIZE")
    val_loader = build_val_loader(cfg, batch_per_rank, train_set.classes)

    seed_all(cfg.SEED)  # same seed on every rank: identical initial weights
    model = build_classifier(cfg, len(train_set.classes))
    amp, amp_dtype, channels_last = precision_settings(cfg, device)
    precision = (amp, amp_dtype, channels_last)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = build_optimizer(cfg, list(model.parameters()), lr_at(cfg, 0.0))
    scaler = torch.amp.GradScaler(device.type) if amp and amp_dtype == torch.float16 else None
    seed_all(cfg.SEED + rank)
    start_epoch, iteration, start_i = resume_mod.restore(point, model, optimizer, scaler,
                                                         ckpt.load_plain_state_dict)

    lock = resume_mod.open_run_dir(cfg, point)
    setup_logging(cfg.OUTPUT_DIR, tag="supervised")
    precision_settings(cfg, device)  # again, now that the run directory is open: log and write precision.json
    if comm.is_main_process():
        with atomic_write(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
            f.write(cfg.dump())
    logger.info(f"supervised {cfg.MODEL.ARCH}: " + topology_summary(world, cfg.SOLVER.BATCH_SIZE, batch_per_rank,
                                                                    cfg.SOLVER.BASE_LR, device))
    logger.info(f"{len(train_set)} training images in {len(train_set.classes)} classes"
                + (f", {len(val_loader.dataset.dataset)} val images" if val_loader else ", no val/"))
    log_resume(point, start_epoch, start_i, iteration, len(loader))
    check_same_resume(point.path if point else None, start_epoch, iteration)
    if world > 1:  # DDP broadcasts rank 0's parameters and buffers when it wraps the model
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.COMPILE:
        model.compile()

    metrics = MetricsWriter(cfg.OUTPUT_DIR, iteration)
    try:
        with Preemption() as stop:
            checkpointer = resume_mod.Checkpointer(cfg, model, optimizer, scaler, ckpt.plain_state_dict, stop,
                                                   device, point.path if point else None, logger)
            for epoch in range(start_epoch, cfg.SOLVER.EPOCHS):
                loader.sampler.set_epoch(epoch)
                loader.sampler.skip(start_i * batch_per_rank)
                iteration = train_one_epoch(cfg, model, loader, optimizer, scaler, epoch, iteration, device,
                                            precision, metrics, start_i, checkpointer)
                start_i = 0
                bad = train_set.check_bad_fraction()
                if bad:
                    logger.warning(f"{bad} unreadable image(s) skipped so far, e.g. {train_set.bad_files()[:3]}")
                if val_loader is not None:
                    top1, val_loss = evaluate(model, val_loader, device, precision)
                    logger.info(f"epoch {epoch + 1}: val top-1 {top1:.2f}%  val loss {val_loss:.4f}")
                    metrics.write(iteration, epoch=epoch + 1, val_top1=top1, val_loss=val_loss)
                checkpointer.after_epoch(epoch, iteration)
    finally:
        metrics.close()
        if lock is not None:
            lock.close()
    return model


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mocobench supervised",
        description="Supervised classification pretraining of a torchvision ResNet on DATA.ROOT/train: the "
                    "baseline MoCo is compared against (same config keys as `mocobench pretrain`).",
        epilog="Example: mocobench supervised --config-file configs/pretrain/synth_R18_cpu_supervised.yaml "
               "DATA.ROOT datasets/synth/imagenet OUTPUT_DIR out/sup_r18 SOLVER.EPOCHS 2",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="YAML config (may use _BASE_)")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="'auto': continue from OUTPUT_DIR/last_checkpoint if present; or a checkpoint path")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE",
                        help="config overrides, e.g. SOLVER.EPOCHS 10 SOLVER.BASE_LR 0.2")
    return parser


def main(argv=None) -> int:
    return run_command(build_parser(), train, argv, moco=False)


if __name__ == "__main__":
    torchrun_entry(main, "mocobench supervised")
