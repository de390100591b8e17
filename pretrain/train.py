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
from pretrain.moco import AllReduceBatchNorm, build_model, convert_sync_bn

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
    communicated. Under any process group, one of 1 process too (its collectives are the
    identity)."""
    if not comm.is_dist():
        return
    device_ids = [device.index] if device.type == "cuda" else None
    for name in model.ddp_modules:
        setattr(model, name, DistributedDataParallel(getattr(model, name), device_ids=device_ids))
    synced = sum(isinstance(m, (torch.nn.SyncBatchNorm, AllReduceBatchNorm))
                 for m in model.modules())
    logger.info(f"DistributedDataParallel over {', '.join(model.ddp_modules)} (process group "
                f"{comm.backend()} of {comm.get_world_size()}); {synced} synchronised BN layers")


def replicated_state(model):
    """The tensors every rank updates on its own and must hold identically: the parameters outside
    DDP (the momentum encoder's), the queue and its pointer. (Its BN running statistics are per
    rank.)"""
    params = [p for name, p in model.named_parameters() if not name.startswith(model.ddp_modules)]
    return params + [b for name, b in model.named_buffers() if name in ("queue", "queue_ptr")]


# --------------------------------------------------------------------------------------------------
# watching it learn
# --------------------------------------------------------------------------------------------------
def knn_datasets(cfg):
    """(DATA.ROOT/train as the memory bank, DATA.ROOT/val as the queries) with the evaluation
    transform; None when val/ does not exist. Each lists its directory once: the task keeps them for
    the run (an ImageNet train/ is 1.28M files)."""
    from pretrain.augment import build_eval_transform
    from pretrain.data import SafeImageFolder

    val_dir = os.path.join(cfg.DATA.ROOT, "val")
    if not os.path.isdir(val_dir):
        return None
    transform = build_eval_transform(cfg.INPUT.SIZE)
    return (SafeImageFolder(os.path.join(cfg.DATA.ROOT, "train"), transform),
            SafeImageFolder(val_dir, transform))


def knn_monitor(cfg, model, device, num_workers, datasets):
    """Weighted kNN top-1 (%) of the backbone features (before the projection head), `datasets` =
    knn_datasets(cfg). Every process: each extracts its shard of the images and scores every query
    against its shard of the bank (pretrain.knn). Leaves the RNG states as it found them: it runs
    after the epoch's checkpoint, which keeps them."""
    from pretrain.data import build_loader
    from pretrain.knn import knn_accuracy, shard

    train_set, val_set = datasets
    loaders = [build_loader(shard(s), cfg.KNN.BATCH_SIZE, num_workers, shuffle=False,
                            drop_last=False, seed=cfg.SEED) for s in (train_set, val_set)]
    encoder = engine.unwrap(model.encoder_q if cfg.MOCO.VERSION != "v3" else model.base_encoder)
    # BN running statistics: rank 0's (the checkpointed ones) everywhere
    if comm.is_dist():
        for buffer in encoder.buffers():
            dist.broadcast(buffer, src=0)

    def backbone_features(x):  # a torchvision ResNet up to the global average pool
        x = normalize(x)  # the loader's uint8 images, on the device
        x = encoder.maxpool(encoder.relu(encoder.bn1(encoder.conv1(x))))
        x = encoder.layer4(encoder.layer3(encoder.layer2(encoder.layer1(x))))
        return torch.flatten(encoder.avgpool(x), 1)

    was_training = model.training
    rng = ckpt.get_rng_state()  # a seeded dataset reseeds `random` per image (num_workers 0)
    model.eval()
    try:
        return knn_accuracy(backbone_features, *loaders, k=cfg.KNN.K, t=cfg.KNN.T,
                            num_classes=len(train_set.classes), device=device)
    finally:
        model.train(was_training)
        ckpt.set_rng_state(rng)


# --------------------------------------------------------------------------------------------------
# batch-norm groups
# --------------------------------------------------------------------------------------------------
# MoCo v1/v2: batch 256 on 8 GPUs, each GPU's BN over its own 32 images, keys shuffled across the
# GPUs (He et al. 2020, Sec. 3.3 "Shuffling BN" and Sec. 4 "Training": mini-batch 256 in 8 GPUs;
# facebookresearch/moco main_moco.py: -b 256 divided among the GPUs of the node). The group size
# decides how much the BN statistics leak between the samples of a group, which shuffle BN is
# there to stop. v3: SyncBN over the whole batch (moco-v3 main_moco.py), no per-device group.
RECIPE_BN_GROUP = {"v1": 32, "v2": 32}


def bn_group_warning(cfg, world, batch_per_rank, splits, group, recipe):
    """One line: the BN group this run has, the recipe's, and the two ways to keep the recipe."""
    where = (f"{batch_per_rank} per process (SOLVER.BATCH_SIZE {cfg.SOLVER.BATCH_SIZE} over "
             f"{world} process(es)" + (f", {splits} SHUFFLE_BN_SPLITS groups" if splits > 1 else "")
             + ")")
    ways = [f"SOLVER.BATCH_SIZE {recipe * world * splits} ({recipe} per BN group; the lr follows "
            "by the linear rule, SOLVER.BASE_LR is per 256)"]
    if world == 1 and batch_per_rank % recipe == 0:
        ways.append(f"MOCO.SHUFFLE_BN_SPLITS {batch_per_rank // recipe} (SplitBN / shuffle BN over "
                    f"groups of {recipe} in this process)")
    elif world == 1:
        ways.append(f"SplitBN / shuffle-BN groups of {recipe}: a batch that is a multiple of "
                    f"{recipe} and MOCO.SHUFFLE_BN_SPLITS = batch / {recipe}")
    else:
        ways.append(f"SplitBN / shuffle-BN groups of {recipe} (MOCO.SHUFFLE_BN_SPLITS, in one "
                    "process only: with several, each process is one BN group)")
    return (f"BN statistics over {group} images: {where}, where the MoCo {cfg.MOCO.VERSION} recipe "
            f"has {recipe} (batch 256 on 8 GPUs, MoCo paper Sec. 3.3/4, official main_moco.py). "
            f"To keep the recipe: " + ", or ".join(ways))


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
        self.knn_sets = None  # knn_datasets, listed at the first monitor

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
        if comm.is_dist() and self.cfg.MOCO.VERSION == "v3":
            # torch's SyncBatchNorm on CUDA, AllReduceBatchNorm on CPU
            model = convert_sync_bn(model, device)
        return model

    def state_dict(self, model):
        return ckpt.official_state_dict(model)

    def load_state_dict(self, model, state_dict, source):
        ckpt.load_official_state_dict(model, state_dict, source)

    def bn_group(self, batch_per_rank):
        """The images one BN layer's batch statistics are over: v3's SyncBN (one process: plain BN)
        spans the global batch; v1/v2's BN is each process's batch, or a SHUFFLE_BN_SPLITS group
        of it in one process."""
        if self.cfg.MOCO.VERSION == "v3":
            return self.cfg.SOLVER.BATCH_SIZE
        return batch_per_rank // self.bn_splits

    def describe(self, world, batch_per_rank, device):
        cfg = self.cfg
        return [comm.topology_summary(world, cfg.SOLVER.BATCH_SIZE, self.bn_group(batch_per_rank),
                                      cfg.SOLVER.BASE_LR, device)]

    def topology(self, world, batch_per_rank):
        """The run record's scale, with a warning when v1/v2's BN groups are not the recipe's 32
        images. v3 has none: its SyncBN statistics are over the whole batch on any number of
        processes, so the per-process batch changes nothing there."""
        record = super().topology(world, batch_per_rank)
        group = self.bn_group(batch_per_rank)
        recipe = RECIPE_BN_GROUP.get(self.cfg.MOCO.VERSION)
        record.update(bn_group=group, recipe_bn_group=recipe)
        if recipe is not None and group != recipe:
            record["warnings"].append(bn_group_warning(self.cfg, world, batch_per_rank,
                                                       self.bn_splits, group, recipe))
        return record

    def wrap(self, model, device):
        # every rank starts from rank 0's state, key encoder and queue too
        if comm.is_dist():
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

    def monitor(self, model, epoch, device, precision):
        cfg = self.cfg
        last_epoch = epoch + 1 == cfg.SOLVER.EPOCHS
        if cfg.KNN.PERIOD <= 0 or not ((epoch + 1) % cfg.KNN.PERIOD == 0 or last_epoch):
            return {}
        if self.knn_sets is None:
            self.knn_sets = knn_datasets(cfg) or ()
        if not self.knn_sets:
            return {}
        top1 = knn_monitor(cfg, model, device, cfg.DATALOADER.NUM_WORKERS, self.knn_sets)
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
