"""Linear classification on a frozen MoCo backbone (`mocobench lincls`), as the official
main_lincls.py, as a task of the training engine (pretrain.engine): exact checkpoints every epoch,
`--resume auto`, clean stops on SIGTERM / SIGUSR1 / Ctrl-C (exit 143 / 138 / 130) and requeue, like
pretraining.

Reads a MoCo checkpoint (ours or official `checkpoint_XXXX.pth.tar`: `module.encoder_q.*` for v1/v2,
`module.base_encoder.*` for v3, plus `arch`), builds torchvision's ResNet, loads the encoder without
its fc / projection head, freezes everything but a freshly initialised fc and keeps the backbone in
eval mode (BatchNorm running statistics are part of the pretrained model too). At the end every
backbone tensor is compared with the checkpoint: any change fails the run, as the official
sanity_check does.

    mocobench lincls --data ROOT --pretrained checkpoint_0199.pth.tar --output out/lincls
    mocobench lincls --nproc-per-node 8 ...
        (or torchrun --nproc_per_node 8 -m pretrain.lincls ...)

Several processes (the official protocol: DDP over 8 GPUs): --batch-size is global, only fc's
gradients are all-reduced, every rank evaluates its shard of val/ and the counts are summed.

Recipes (official defaults; --recipe auto picks by checkpoint keys):
    v1v2: SGD lr 30, momentum 0.9, wd 0, batch 256, 100 epochs, lr x0.1 at epochs 60 and 80
    v3:   SGD lr 0.1 * batch / 256, momentum 0.9, wd 0, batch 1024, 90 epochs, cosine
"""
import argparse
import dataclasses
import json
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from torch.nn.parallel import DistributedDataParallel

from mocobench.utils import comm
from mocobench.utils.errors import UsageError, run_main
from mocobench.utils.fileio import atomic_write, load_checkpoint
from pretrain import engine
from pretrain.augment import build_eval_transform, build_linear_train_transform, normalize
from pretrain.config import get_cfg
from pretrain.data import SafeImageFolder, build_loader
from pretrain.knn import shard

logger = engine.logger
RESULTS_FILE = "lincls_results.json"


@dataclasses.dataclass(frozen=True)
class LinearRecipe:
    lr: float
    epochs: int
    batch_size: int
    milestones: tuple  # step decay x0.1 at these epochs; empty -> cosine
    scale_lr_by_batch: bool  # lr * batch_size / 256
    momentum: float = 0.9
    weight_decay: float = 0.0


RECIPES = {
    "v1v2": LinearRecipe(lr=30.0, epochs=100, batch_size=256, milestones=(60, 80),
                         scale_lr_by_batch=False),
    "v3": LinearRecipe(lr=0.1, epochs=90, batch_size=1024, milestones=(), scale_lr_by_batch=True),
}

# state_dict prefix of the backbone -> recipe family. With and without DDP's "module.".
ENCODER_PREFIXES = {
    "module.encoder_q.": "v1v2",
    "encoder_q.": "v1v2",
    "module.base_encoder.": "v3",
    "base_encoder.": "v3",
}

RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")


class BackboneChangedError(RuntimeError):
    """A frozen backbone tensor differs from the pretrained checkpoint after linear training."""


# -------------------------------------------------------------------------------------- checkpoint
def extract_backbone(checkpoint, path="<checkpoint>"):
    """(backbone state dict without prefix and without fc.*, recipe name, prefix) from a MoCo
    checkpoint."""
    if not isinstance(checkpoint, dict):
        raise UsageError(f"{path!r}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    state = checkpoint.get("state_dict", checkpoint)
    for prefix, recipe in ENCODER_PREFIXES.items():
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        # fc / projection head
        backbone = {k: v for k, v in stripped.items() if not k.startswith("fc.")}
        if backbone:
            return backbone, recipe, prefix
    examples = ", ".join(list(state)[:5])
    raise UsageError(
        f"{path!r} is not a MoCo checkpoint: no keys start with any of "
        f"{', '.join(ENCODER_PREFIXES)} (first keys: {examples})"
    )


def build_linear_model(arch, num_classes, backbone_state, path="<checkpoint>"):
    """torchvision `arch` with the pretrained backbone loaded, fc reset to N(0, 0.01) / 0, backbone
    frozen."""
    if arch not in RESNET_ARCHS:
        raise UsageError(f"{path!r}: arch {arch!r} is not supported; expected one of "
                         f"{', '.join(RESNET_ARCHS)}")
    model = torchvision.models.__dict__[arch](num_classes=num_classes)
    for name, param in model.named_parameters():
        if name not in ("fc.weight", "fc.bias"):
            param.requires_grad = False
    model.fc.weight.data.normal_(mean=0.0, std=0.01)
    model.fc.bias.data.zero_()
    try:
        result = model.load_state_dict(backbone_state, strict=False)
    except RuntimeError as e:  # shape mismatch: another arch's weights
        raise UsageError(f"{path!r}: encoder weights do not fit {arch}: {e}") from None
    if set(result.missing_keys) != {"fc.weight", "fc.bias"} or result.unexpected_keys:
        missing = [k for k in result.missing_keys if not k.startswith("fc.")]
        raise UsageError(
            f"{path!r}: encoder weights do not match {arch}: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {result.unexpected_keys[:5]} "
            f"({len(result.unexpected_keys)} in all)"
        )
    return model


def check_backbone_unchanged(model_state, reference_state):
    """Raise BackboneChangedError naming the tensors (parameters or BN buffers) that differ from the
    reference."""
    changed = []
    for key, reference in reference_state.items():
        if key.startswith("fc."):
            continue
        if key not in model_state:
            changed.append(f"{key} (missing)")
        elif not torch.equal(model_state[key].detach().cpu(), reference.detach().cpu()):
            changed.append(key)
    if changed:
        raise BackboneChangedError(
            f"{len(changed)} frozen backbone tensor(s) changed during linear training, e.g. "
            f"{', '.join(changed[:5])}: the linear protocol is invalid (a parameter was not frozen "
            "or BatchNorm ran in train mode)"
        )


# -------------------------------------------------------------------------------------- training
def learning_rate(base_lr, epoch, epochs, milestones):
    """Per-epoch lr: step decay x0.1 at each milestone, or half-cosine to 0 when there are none."""
    if milestones:
        return base_lr * 0.1 ** sum(epoch >= m for m in milestones)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def accuracy(output, target, topk=(1, 5)):
    """Number of correct predictions within the top-k, for each k (k capped at the number of
    classes)."""
    maxk = min(max(topk), output.shape[1])
    pred = output.topk(maxk, dim=1).indices
    correct = pred.eq(target[:, None])
    return [int(correct[:, : min(k, maxk)].any(dim=1).sum()) for k in topk]


def _sum_over_ranks(totals):
    if comm.is_dist():
        totals = totals.clone()
        dist.all_reduce(totals)
    return totals.tolist()


@torch.no_grad()
def evaluate(model, loader, device):
    """Top-1 / top-5 (%) over val/: each rank its shard, the counts summed over ranks."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, images
    for images, target in loader:
        images = normalize(images.to(device, non_blocking=True))
        target = target.to(device, non_blocking=True)
        c1, c5 = accuracy(model(images), target, topk=(1, 5))
        totals += torch.tensor([c1, c5, target.numel()], dtype=torch.float64, device=device)
    top1, top5, seen = _sum_over_ranks(totals)
    return {"top1": 100.0 * top1 / max(seen, 1), "top5": 100.0 * top5 / max(seen, 1)}


class LinearTask(engine.Task):
    """The linear protocol: the model stays in eval mode, only fc trains, lr changes per epoch."""

    tag = "lincls"
    output_name = "--output"
    run_kind = "linear evaluation"
    epochs_name = "--epochs"
    state_keys = ("MODEL.ARCH", "SOLVER.BATCH_SIZE", "SEED", "LINCLS.PRETRAINED", "LINCLS.RECIPE")

    def __init__(self, cfg, backbone_state, prefix):
        super().__init__(cfg)
        self.backbone_state, self.prefix = backbone_state, prefix
        self.best_top1, self.last = 0.0, {}
        # this epoch's loss sum, hits, images (this rank)
        self.totals = torch.zeros(3, dtype=torch.float64)

    def build_data(self, batch_per_rank, world):
        cfg = self.cfg
        root = cfg.DATA.ROOT
        self.train_set = SafeImageFolder(os.path.join(root, "train"),
                                         build_linear_train_transform(cfg.INPUT.SIZE))
        self.val_set = SafeImageFolder(os.path.join(root, "val"),
                                       build_eval_transform(cfg.INPUT.SIZE))
        if self.train_set.classes != self.val_set.classes:
            raise UsageError(f"{root!r}: train/ and val/ have different class folders "
                             f"({len(self.train_set.classes)} vs {len(self.val_set.classes)})")
        workers = cfg.DATALOADER.NUM_WORKERS
        loader = build_loader(self.train_set, batch_per_rank, workers, shuffle=True,
                              drop_last=False, distributed=world > 1, seed=cfg.SEED)
        self.val_loader = build_loader(shard(self.val_set), batch_per_rank, workers, shuffle=False,
                                       drop_last=False, seed=cfg.SEED)
        return self.train_set, loader

    def build_model(self, device):
        cfg = self.cfg
        model = build_linear_model(cfg.MODEL.ARCH, len(self.train_set.classes), self.backbone_state,
                                   cfg.LINCLS.PRETRAINED)
        self.totals = self.totals.to(device)
        return model

    def build_optimizer(self, model, lr):
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert len(trainable) == 2, "only fc.weight and fc.bias may train"
        return torch.optim.SGD(trainable, lr, momentum=self.cfg.SOLVER.MOMENTUM,
                               weight_decay=self.cfg.SOLVER.WEIGHT_DECAY)

    def extra_state(self):
        return {"best_top1": self.best_top1, "last": dict(self.last), "totals": self.totals.cpu()}

    def load_extra_state(self, state):
        self.best_top1, self.last = float(state.get("best_top1", 0.0)), dict(state.get("last", {}))
        if "totals" in state:
            self.totals.copy_(state["totals"])

    def describe(self, world, batch_per_rank, device):
        cfg, lin = self.cfg, self.cfg.LINCLS
        schedule = f"step x0.1 at {list(lin.MILESTONES)}" if lin.MILESTONES else "cosine"
        return [f"lincls: {cfg.MODEL.ARCH} from {lin.PRETRAINED} ({self.prefix}*, recipe "
                f"{lin.RECIPE}), {len(self.train_set.classes)} classes, {len(self.train_set)} "
                f"train / {len(self.val_set)} val images, {cfg.SOLVER.EPOCHS} epochs, batch "
                f"{cfg.SOLVER.BATCH_SIZE}, lr {lin.LR:g} ({schedule}), {world} process(es), "
                f"device {device}, TF32 {cfg.TF32} (matmul "
                f"{torch.backends.cuda.matmul.allow_tf32}, cuDNN "
                f"{torch.backends.cudnn.allow_tf32})"]

    def wrap(self, model, device):
        if not comm.is_dist():
            return model
        # only fc trains: its gradients are all DDP reduces; BN buffers are frozen (eval mode)
        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)

    def lr_at(self, epoch_float):
        lin = self.cfg.LINCLS
        return learning_rate(lin.LR, math.floor(epoch_float), self.cfg.SOLVER.EPOCHS,
                             tuple(lin.MILESTONES))

    def train_mode(self, model):
        model.eval()  # BatchNorm must not update its running statistics (official main_lincls)

    def step(self, model, batch, device, epoch_float, memory_format):
        images, target = batch
        # uint8 from the workers; float32 and normalised only here, on the device
        images = normalize(images.to(device, non_blocking=True, memory_format=memory_format))
        target = target.to(device, non_blocking=True)
        output = model(images)
        loss = nn.functional.cross_entropy(output, target)
        correct = (output.detach().argmax(dim=1) == target).sum()
        self.totals += torch.stack([
            loss.detach().double() * target.numel(), correct.double(),
            torch.tensor(target.numel(), dtype=torch.float64, device=device)])
        return loss, output, target

    def evaluate(self, model, epoch, device, precision):
        loss_sum, correct, seen = _sum_over_ranks(self.totals)
        self.totals.zero_()
        val = evaluate(engine.unwrap(model), self.val_loader, device)
        self.best_top1 = max(self.best_top1, val["top1"])
        self.last = {"train_loss": loss_sum / max(seen, 1),
                     "train_top1": 100.0 * correct / max(seen, 1),
                     "val_top1": val["top1"], "val_top5": val["top5"]}
        lr = self.lr_at(epoch)
        logger.info(f"epoch {epoch + 1}/{self.cfg.SOLVER.EPOCHS}  lr {lr:.4g}  "
                    f"loss {self.last['train_loss']:.4f}  train@1 {self.last['train_top1']:.2f}  "
                    f"val@1 {val['top1']:.2f}  val@5 {val['top5']:.2f}")
        return {"lr": lr, **self.last}

    def finish(self, model, device):
        cfg, lin = self.cfg, self.cfg.LINCLS
        self.train_set.check_bad_fraction()
        self.val_set.check_bad_fraction()
        # Official sanity check: reload the checkpoint and compare every backbone tensor.
        reference, _, _ = extract_backbone(load_checkpoint(lin.PRETRAINED), lin.PRETRAINED)
        check_backbone_unchanged(engine.unwrap(model).state_dict(), reference)
        logger.info("sanity check passed: backbone unchanged")
        results = {
            "pretrained": lin.PRETRAINED, "arch": cfg.MODEL.ARCH, "recipe": lin.RECIPE,
            "epochs": cfg.SOLVER.EPOCHS, "batch_size": cfg.SOLVER.BATCH_SIZE, "lr": lin.LR,
            "schedule": list(lin.MILESTONES) if lin.MILESTONES else "cosine",
            "size": cfg.INPUT.SIZE,
            "num_classes": len(self.train_set.classes), "top1": self.last["val_top1"],
            "top5": self.last["val_top5"], "best_top1": self.best_top1,
            "bad_images": self.train_set.num_bad + self.val_set.num_bad, "backbone_unchanged": True,
            "world_size": comm.get_world_size(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        }
        if comm.is_main_process():
            with atomic_write(os.path.join(cfg.OUTPUT_DIR, RESULTS_FILE), "w") as f:
                json.dump(results, f, indent=2)
        logger.info(f"lincls: top-1 {results['top1']:.2f}  top-5 {results['top5']:.2f}  "
                    f"(best top-1 {self.best_top1:.2f})")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mocobench lincls", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True,
                        help="ImageFolder root holding train/<class>/ and val/<class>/")
    parser.add_argument("--pretrained", required=True,
                        help="MoCo checkpoint (.pth.tar), ours or official")
    parser.add_argument("--output", required=True,
                        help="the run directory: lincls_results.json, metrics.json, log.txt, "
                             "checkpoints")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="'auto': continue from OUTPUT/last_checkpoint if present; or a "
                             "checkpoint path")
    engine.add_extend_flag(parser, "--epochs")
    parser.add_argument("--recipe", default="auto", choices=["auto", *RECIPES],
                        help="auto: from checkpoint keys")
    parser.add_argument("--arch", default=None, help="only if the checkpoint has no 'arch' entry")
    parser.add_argument("--epochs", type=int, default=None,
                        help="recipe default: 100 (v1v2) / 90 (v3)")
    parser.add_argument("--lr", type=float, default=None,
                        help="recipe default: 30 (v1v2) / 0.1 (v3, scaled by batch size / 256)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="recipe default: 256 (v1v2) / 1024 (v3)")
    parser.add_argument("--schedule", type=int, nargs="*", default=None,
                        help="epochs at which lr drops x0.1 (default 60 80 for v1v2; v3 uses "
                             "cosine)")
    parser.add_argument("--size", type=int, default=224, help="image size (small tests: 32-64)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--device", default=None,
                        help="default: cuda (cuda:LOCAL_RANK with several processes) if "
                             "available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                        help="--tf32: TF32 matmuls and convolutions on Ampere+ GPUs; --no-tf32: "
                             "neither (the official V100 fp32 protocol); default: torch's defaults "
                             "(cuDNN convolutions TF32, matmuls fp32), as the official script gets "
                             "on an A100/H100")
    parser.add_argument("--print-config", action="store_true",
                        help="print the config these flags and the checkpoint's recipe make (as "
                             "YAML, the keys of `mocobench pretrain`'s config) and exit; writes "
                             "nothing")
    return parser


def build_config(args):
    """(config, backbone state, prefix) from the flags and the checkpoint's recipe; raises
    UsageError."""
    checkpoint = load_checkpoint(args.pretrained)
    backbone_state, detected_recipe, prefix = extract_backbone(checkpoint, args.pretrained)
    recipe_name = detected_recipe if args.recipe == "auto" else args.recipe
    recipe = RECIPES[recipe_name]
    arch = checkpoint.get("arch") or args.arch
    if not arch:
        raise UsageError(f"{args.pretrained!r} has no 'arch' entry; pass --arch (e.g. resnet50)")
    epochs = args.epochs if args.epochs is not None else recipe.epochs
    batch_size = args.batch_size or recipe.batch_size
    lr = args.lr if args.lr is not None else recipe.lr
    if recipe.scale_lr_by_batch:
        lr = lr * batch_size / 256
    milestones = tuple(args.schedule) if args.schedule is not None else recipe.milestones
    if epochs < 1 or batch_size < 1 or args.size < 8:
        raise UsageError(f"need --epochs >= 1, --batch-size >= 1, --size >= 8 "
                         f"(got {epochs}, {batch_size}, {args.size})")
    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.ARCH", arch, "DATA.ROOT", args.data, "OUTPUT_DIR", args.output, "SEED", args.seed,
        "INPUT.SIZE", args.size, "DATALOADER.NUM_WORKERS", args.workers,
        "DEVICE", args.device or "",
        "TF32", args.tf32, "SOLVER.EPOCHS", epochs, "SOLVER.BATCH_SIZE", batch_size,
        "SOLVER.MOMENTUM", recipe.momentum, "SOLVER.WEIGHT_DECAY", recipe.weight_decay,
        "CHECKPOINT_PERIOD", epochs,  # keep the last checkpoint (the trained classifier) only
        "LINCLS.PRETRAINED", os.path.abspath(args.pretrained), "LINCLS.RECIPE", recipe_name,
        "LINCLS.LR", float(lr), "LINCLS.MILESTONES", milestones,
    ])
    cfg.freeze()
    return cfg, backbone_state, prefix


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg, backbone_state, prefix = build_config(args)
    if args.print_config:
        print(cfg.dump(), end="")
        return 0
    return engine.run(parser.prog, argv, LinearTask(cfg, backbone_state, prefix), args.resume,
                      extend=args.extend)


if __name__ == "__main__":
    sys.exit(run_main("mocobench lincls", main, sys.argv[1:]))
