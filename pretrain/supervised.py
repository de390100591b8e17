"""The supervised baseline (`mocobench supervised`): a torchvision ResNet trained with cross-entropy
on the same images and budget as MoCo (DATA.ROOT/train), as a task of the training engine
(pretrain.engine).

Recipe (torchvision's ResNet reference): RandomResizedCrop(0.08-1) + flip, SGD with momentum, lr per
256 images, per-process BatchNorm; after every epoch, top-1 on DATA.ROOT/val when it exists
(`val_top1`). Checkpoints hold plain torchvision keys (conv1.weight, ..., fc.*), as torchvision's
own resnet50-*.pth, so `mocobench convert` takes them as torchvision checkpoints.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from mocobench.utils import comm
from mocobench.utils.errors import UsageError, run_main
from pretrain import engine
from pretrain.augment import normalize
from pretrain.moco import resnet_builder

logger = engine.logger


def build_classifier(cfg, num_classes):
    """The torchvision ResNet MODEL.ARCH with a num_classes-way fc (torchvision's
    initialisation)."""
    return resnet_builder(cfg.MODEL.ARCH,
                          zero_init_residual=cfg.MODEL.ZERO_INIT_RESIDUAL)(num_classes)


@torch.no_grad()
def evaluate(model, loader, device, precision):
    """(top-1 %, mean loss) over this process's share of the val set, summed over all processes:
    each rank holds every world-th image (no padding, so every image counts exactly once)."""
    amp, amp_dtype, channels_last = precision
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = engine.unwrap(model)
    if comm.is_dist():
        # each rank's BN running statistics last saw its own batch: evaluate rank 0's
        # (the checkpointed)
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, images
    try:
        for images, target in loader:
            images = normalize(images.to(device, non_blocking=True, memory_format=memory_format))
            target = target.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                logits = model(images).float()
            totals[0] += (logits.argmax(dim=1) == target).sum()
            totals[1] += F.cross_entropy(logits, target, reduction="sum")
            totals[2] += target.numel()
    finally:
        model.train(was_training)
    if comm.is_dist():
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
        raise UsageError(
            f"{val_dir!r} has classes {val_set.classes[:5]}... but the train folder has "
            f"{train_classes[:5]}...: val/ must hold the same class folders as train/")
    indices = range(comm.get_rank(), len(val_set), comm.get_world_size())
    shard = torch.utils.data.Subset(val_set, indices)
    return build_loader(shard, batch_per_rank, cfg.DATALOADER.NUM_WORKERS, shuffle=False,
                        drop_last=False, seed=cfg.SEED)


class SupervisedTask(engine.Task):
    tag = "supervised"

    def build_data(self, batch_per_rank, world):
        from pretrain.augment import build_linear_train_transform
        from pretrain.data import SafeImageFolder, build_loader

        cfg = self.cfg
        transform = build_linear_train_transform(cfg.INPUT.SIZE, cfg.INPUT.CROP_SCALE)
        self.train_set = SafeImageFolder(os.path.join(cfg.DATA.ROOT, "train"), transform)
        loader = build_loader(self.train_set, batch_per_rank, cfg.DATALOADER.NUM_WORKERS,
                              shuffle=True, drop_last=True, distributed=world > 1, seed=cfg.SEED)
        if len(loader) == 0:
            raise UsageError(f"{self.train_set.root}: {len(self.train_set)} images give no full "
                             f"batch of {batch_per_rank} per process; lower SOLVER.BATCH_SIZE")
        self.val_loader = build_val_loader(cfg, batch_per_rank, self.train_set.classes)
        return self.train_set, loader

    def build_model(self, device):
        return build_classifier(self.cfg, len(self.train_set.classes))

    def describe(self, world, batch_per_rank, device):
        cfg = self.cfg
        topology = comm.topology_summary(world, cfg.SOLVER.BATCH_SIZE, batch_per_rank,
                                         cfg.SOLVER.BASE_LR, device)
        val = self.val_loader
        data = (f"{len(self.train_set)} training images in {len(self.train_set.classes)} classes"
                + (f", {len(val.dataset.dataset)} val images" if val else ", no val/"))
        return [f"supervised {cfg.MODEL.ARCH}: {topology}", data]

    def wrap(self, model, device):
        # DDP broadcasts rank 0's parameters and buffers when it wraps
        if comm.is_dist():
            device_ids = [device.index] if device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids)
        if self.cfg.COMPILE:
            model.compile()
        return model

    def step(self, model, batch, device, epoch_float, memory_format):
        images, target = batch
        # uint8 from the workers; float32 and normalised only here, on the device
        images = normalize(images.to(device, non_blocking=True, memory_format=memory_format))
        target = target.to(device, non_blocking=True)
        logits = model(images)
        return F.cross_entropy(logits.float(), target), logits, target

    def evaluate(self, model, epoch, device, precision):
        if self.val_loader is None:
            return {}
        top1, val_loss = evaluate(model, self.val_loader, device, precision)
        logger.info(f"epoch {epoch + 1}: val top-1 {top1:.2f}%  val loss {val_loss:.4f}")
        return {"val_top1": top1, "val_loss": val_loss}


def build_parser():
    return engine.config_command(
        "mocobench supervised",
        "Supervised classification pretraining of a torchvision ResNet on DATA.ROOT/train: the "
        "baseline MoCo is compared against (same config keys as `mocobench pretrain`).",
        "--config-file configs/pretrain/synth_R18_cpu_supervised.yaml "
        "DATA.ROOT datasets/synth/imagenet OUTPUT_DIR out/sup_r18 SOLVER.EPOCHS 2",
        "SOLVER.EPOCHS 10 SOLVER.BASE_LR 0.2")


def main(argv=None) -> int:
    return engine.run_config_command(build_parser(), argv, SupervisedTask, moco=False)


if __name__ == "__main__":
    sys.exit(run_main("mocobench supervised", main, sys.argv[1:]))
