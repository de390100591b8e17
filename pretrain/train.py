"""MoCo pretraining (`mocobench pretrain`): the MoCo task of the training engine (pretrain.engine).

What is MoCo's own: the two-view data, the model (query/key encoders and queue, or v3's momentum
encoder and predictor), its loss per version, the kNN monitor, and the state that no DDP keeps in
step (momentum encoder and queue), checked to agree on every rank after each epoch. Checkpoints use
the official layout (pretrain.checkpoint). `torchrun -m pretrain.train ...` runs the same command.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from mocobench.utils import comm
from mocobench.utils.errors import UsageError, run_main
from pretrain import checkpoint as ckpt
from pretrain import engine
from pretrain import resume as resume_mod
from pretrain.augment import normalize
from pretrain.config import moco_momentum_at
from pretrain.moco import build_model, convert_sync_bn

logger = engine.logger


# --------------------------------------------------------------------------------------------------
# losses per MoCo version
# --------------------------------------------------------------------------------------------------
def moco_v1_v2_loss(model, x1, x2, m):
    model.m = m
    logits, labels = model(x1, x2)
    return F.cross_entropy(logits.float(), labels), logits, labels


def moco_v3_loss(model, x1, x2, m):
    return model(x1, x2, m)


LOSSES = {"v1": moco_v1_v2_loss, "v2": moco_v1_v2_loss, "v3": moco_v3_loss}


# --------------------------------------------------------------------------------------------------
# the state DDP does not keep in step
# --------------------------------------------------------------------------------------------------
def wrap_ddp(model, device):
    """Wrap only the submodules that receive gradients (model.ddp_modules) in DDP: the key encoder
    and the queue stay outside, so nothing but query-side gradients and BN buffers is
    communicated."""
    if comm.get_world_size() == 1:
        return
    device_ids = [device.index] if device.type == "cuda" else None
    for name in model.ddp_modules:
        setattr(model, name, DistributedDataParallel(getattr(model, name), device_ids=device_ids))


def replicated_state(model):
    """The tensors every rank updates on its own and must hold identically: the parameters outside
    DDP (the momentum encoder's), the queue and its pointer. (Its BN running statistics are per
    rank.)"""
    params = [p for name, p in model.named_parameters() if not name.startswith(model.ddp_modules)]
    return params + [b for name, b in model.named_buffers() if name in ("queue", "queue_ptr")]


# --------------------------------------------------------------------------------------------------
# watching it learn
# --------------------------------------------------------------------------------------------------
def knn_monitor(cfg, model, device, num_workers):
    """Weighted kNN top-1 (%) of the backbone features (before the projection head), DATA.ROOT/train
    as the memory bank and DATA.ROOT/val as queries; None when val/ does not exist. Every process:
    each extracts its shard of the images and the bank is all-gathered (pretrain.knn)."""
    from pretrain.augment import build_eval_transform
    from pretrain.data import SafeImageFolder, build_loader
    from pretrain.knn import knn_accuracy, shard

    val_dir = os.path.join(cfg.DATA.ROOT, "val")
    if not os.path.isdir(val_dir):
        return None
    transform = build_eval_transform(cfg.INPUT.SIZE)
    train_set = SafeImageFolder(os.path.join(cfg.DATA.ROOT, "train"), transform)
    val_set = SafeImageFolder(val_dir, transform)
    loaders = [build_loader(shard(s), cfg.KNN.BATCH_SIZE, num_workers, shuffle=False,
                            drop_last=False, seed=cfg.SEED) for s in (train_set, val_set)]
    encoder = engine.unwrap(model.encoder_q if cfg.MOCO.VERSION != "v3" else model.base_encoder)
    # BN running statistics: rank 0's (the checkpointed ones) everywhere
    if comm.get_world_size() > 1:
        for buffer in encoder.buffers():
            dist.broadcast(buffer, src=0)

    def backbone_features(x):  # a torchvision ResNet up to the global average pool
        x = normalize(x)  # the loader's uint8 images, on the device
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


# --------------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------------
class MocoTask(engine.Task):
    tag = "pretrain"

    def __init__(self, cfg):
        super().__init__(cfg)
        keys = resume_mod.STATE_SHAPING_KEYS + resume_mod.MOCO_STATE_SHAPING_KEYS
        self.state_keys = (keys if cfg.MOCO.VERSION == "v3"
                           else tuple(k for k in keys if k != "MOCO.MLP_DIM"))
        self.bn_splits = 1

    def build_data(self, batch_per_rank, world):
        from pretrain.augment import build_two_view_transform
        from pretrain.data import SafeImageFolder, build_loader

        cfg = self.cfg
        # One process: emulate SHUFFLE_BN_SPLITS devices' BN. Several: each rank's BN is one
        # device's (v1/v2), SyncBN for v3 (as the official v3 code).
        self.bn_splits = (cfg.MOCO.SHUFFLE_BN_SPLITS if world == 1 and cfg.MOCO.VERSION != "v3"
                          else 1)
        if batch_per_rank % self.bn_splits != 0:
            raise UsageError(f"MOCO.SHUFFLE_BN_SPLITS = {self.bn_splits} must divide the batch "
                             f"size {batch_per_rank}")
        transform = build_two_view_transform(cfg.INPUT.AUG, cfg.INPUT.SIZE, cfg.INPUT.CROP_SCALE)
        train_set = SafeImageFolder(os.path.join(cfg.DATA.ROOT, "train"), transform)
        loader = build_loader(train_set, batch_per_rank, cfg.DATALOADER.NUM_WORKERS, shuffle=True,
                              drop_last=True, distributed=world > 1, seed=cfg.SEED)
        if len(loader) == 0:
            raise UsageError(f"{train_set.root}: {len(train_set)} images give no full batch of "
                             f"{batch_per_rank} per process; lower SOLVER.BATCH_SIZE")
        return train_set, loader

    def build_model(self, device):
        model = build_model(self.cfg, bn_splits=self.bn_splits)
        if comm.get_world_size() > 1 and self.cfg.MOCO.VERSION == "v3":
            # torch's SyncBatchNorm on CUDA, AllReduceBatchNorm on CPU
            model = convert_sync_bn(model, device)
        return model

    def state_dict(self, model):
        return ckpt.official_state_dict(model)

    def load_state_dict(self, model, state_dict, source):
        ckpt.load_official_state_dict(model, state_dict, source)

    def describe(self, world, batch_per_rank, device):
        cfg = self.cfg
        bn_group = (cfg.SOLVER.BATCH_SIZE if cfg.MOCO.VERSION == "v3"
                    else batch_per_rank // self.bn_splits)
        return [comm.topology_summary(world, cfg.SOLVER.BATCH_SIZE, bn_group, cfg.SOLVER.BASE_LR,
                                      device)]

    def wrap(self, model, device):
        # every rank starts from rank 0's state, key encoder and queue too
        if comm.get_world_size() > 1:
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)
        wrap_ddp(model, device)
        if self.cfg.COMPILE:
            for module in model.children():
                module.compile()
        return model

    def step(self, model, batch, device, epoch_float, memory_format):
        (x1, x2), _ = batch
        # uint8 from the workers; float32 and normalised only here, on the device
        x1 = normalize(x1.to(device, non_blocking=True, memory_format=memory_format))
        x2 = normalize(x2.to(device, non_blocking=True, memory_format=memory_format))
        return LOSSES[self.cfg.MOCO.VERSION](model, x1, x2, moco_momentum_at(self.cfg, epoch_float))

    def iteration_scalars(self, iteration, epoch_float):
        cfg = self.cfg
        scalars = {"moco_m": moco_momentum_at(cfg, epoch_float)}
        if cfg.MOCO.VERSION != "v3":
            scalars["queue_fill"] = min(1.0, iteration * cfg.SOLVER.BATCH_SIZE / cfg.MOCO.K)
        return scalars

    def evaluate(self, model, epoch, device, precision):
        cfg = self.cfg
        last_epoch = epoch + 1 == cfg.SOLVER.EPOCHS
        if cfg.KNN.PERIOD <= 0 or not ((epoch + 1) % cfg.KNN.PERIOD == 0 or last_epoch):
            return {}
        top1 = knn_monitor(cfg, model, device, cfg.DATALOADER.NUM_WORKERS)
        if top1 is None:
            return {}
        logger.info(f"epoch {epoch + 1}: kNN top-1 {top1:.2f}%")
        return {"knn_top1": top1}

    def check_replicas(self, model):
        comm.check_replicas_equal("the momentum encoder's weights and the queue",
                                  replicated_state(model))


def build_parser():
    return engine.config_command(
        "mocobench pretrain",
        "MoCo v1/v2/v3 pretraining of a torchvision ResNet (see configs/pretrain/).",
        "--config-file configs/pretrain/synth_R18_cpu.yaml DATA.ROOT /data/imagenet "
        "OUTPUT_DIR out/r18 SOLVER.EPOCHS 2", "SOLVER.EPOCHS 10 MOCO.K 4096")


def main(argv=None) -> int:
    return engine.run_config_command(build_parser(), argv, MocoTask, moco=True)


if __name__ == "__main__":
    sys.exit(run_main("mocobench pretrain", main, sys.argv[1:]))
