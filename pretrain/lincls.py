"""Linear classification on a frozen MoCo backbone (`mocobench lincls`), as the official main_lincls.py.

Reads a MoCo checkpoint (ours or official `checkpoint_XXXX.pth.tar`: `state_dict` with `module.encoder_q.*`
for v1/v2, `module.base_encoder.*` for v3, plus `arch`), builds torchvision's ResNet, loads the encoder
without its fc / projection head, freezes everything but a freshly initialised fc and keeps the backbone in
eval mode (BatchNorm running statistics are part of the pretrained model too). At the end every backbone
tensor is compared with the checkpoint: any change fails the run, as the official sanity_check does.

    mocobench lincls --data ROOT --pretrained checkpoint_0199.pth.tar --output out/lincls
    mocobench lincls --nproc-per-node 8 ...     (or torchrun --nproc_per_node 8 -m pretrain.lincls ...)

Several processes (as the official protocol, DDP over 8 GPUs): --batch-size is global and split over the
ranks, only fc's gradients are all-reduced, every rank evaluates its shard of val/ and the counts are summed;
rank 0 prints and writes the files.

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
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from torch.nn.parallel import DistributedDataParallel

from mocobench.utils import comm
from mocobench.utils.comm import setup_device
from mocobench.utils.env import set_tf32
from mocobench.utils.errors import UsageError
from mocobench.utils.fileio import atomic_write, load_checkpoint
from pretrain.augment import build_eval_transform, build_linear_train_transform
from pretrain.data import SafeImageFolder, build_loader
from pretrain.knn import shard


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
    "v1v2": LinearRecipe(lr=30.0, epochs=100, batch_size=256, milestones=(60, 80), scale_lr_by_batch=False),
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


# ----------------------------------------------------------------------------------------------- checkpoint
def extract_backbone(checkpoint, path="<checkpoint>"):
    """(backbone state dict without prefix and without fc.*, recipe name, prefix) from a MoCo checkpoint."""
    if not isinstance(checkpoint, dict):
        raise UsageError(f"{path!r}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    state = checkpoint.get("state_dict", checkpoint)
    for prefix, recipe in ENCODER_PREFIXES.items():
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        backbone = {k: v for k, v in stripped.items() if not k.startswith("fc.")}  # fc / projection head
        if backbone:
            return backbone, recipe, prefix
    examples = ", ".join(list(state)[:5])
    raise UsageError(
        f"{path!r} is not a MoCo checkpoint: no keys start with any of {', '.join(ENCODER_PREFIXES)} "
        f"(first keys: {examples})"
    )


def build_linear_model(arch, num_classes, backbone_state, path="<checkpoint>"):
    """torchvision `arch` with the pretrained backbone loaded, fc reset to N(0, 0.01) / 0, backbone frozen."""
    if arch not in RESNET_ARCHS:
        raise UsageError(f"{path!r}: arch {arch!r} is not supported; expected one of {', '.join(RESNET_ARCHS)}")
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
            f"({len(missing)} in all), unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)} in all)"
        )
    return model


def check_backbone_unchanged(model_state, reference_state):
    """Raise BackboneChangedError naming the tensors (parameters or BN buffers) that differ from the reference."""
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
            f"{len(changed)} frozen backbone tensor(s) changed during linear training, e.g. {', '.join(changed[:5])}: "
            "the linear protocol is invalid (a parameter was not frozen or BatchNorm ran in train mode)"
        )


# ----------------------------------------------------------------------------------------------- training
def learning_rate(base_lr, epoch, epochs, milestones):
    """Per-epoch lr: step decay x0.1 at each milestone, or half-cosine to 0 when there are none."""
    if milestones:
        return base_lr * 0.1 ** sum(epoch >= m for m in milestones)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def accuracy(output, target, topk=(1, 5)):
    """Number of correct predictions within the top-k, for each k (k capped at the number of classes)."""
    maxk = min(max(topk), output.shape[1])
    pred = output.topk(maxk, dim=1).indices
    correct = pred.eq(target[:, None])
    return [int(correct[:, : min(k, maxk)].any(dim=1).sum()) for k in topk]


def _progress(iterable, desc, total):
    if sys.stdout.isatty() and comm.is_main_process():
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=False)
    return iterable


def train_one_epoch(model, loader, optimizer, device, desc):
    # The whole model stays in eval mode: BatchNorm must not update its running statistics (official main_lincls).
    model.eval()
    criterion = nn.CrossEntropyLoss()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, seen
    for images, target in _progress(loader, desc, len(loader)):
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        output = model(images)
        loss = criterion(output, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals += torch.tensor([float(loss.detach()) * target.numel(), accuracy(output.detach(), target, (1,))[0],
                                target.numel()], dtype=torch.float64, device=device)
    loss_sum, correct, seen = _sum_over_ranks(totals)
    return {"train_loss": loss_sum / max(seen, 1), "train_top1": 100.0 * correct / max(seen, 1)}


def _sum_over_ranks(totals):
    if comm.get_world_size() > 1:
        dist.all_reduce(totals)
    return totals.tolist()


@torch.no_grad()
def evaluate(model, loader, device, desc="val"):
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, images (this shard)
    for images, target in _progress(loader, desc, len(loader)):
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        c1, c5 = accuracy(model(images), target, topk=(1, 5))
        totals += torch.tensor([c1, c5, target.numel()], dtype=torch.float64, device=device)
    top1, top5, seen = _sum_over_ranks(totals)
    return {"top1": 100.0 * top1 / max(seen, 1), "top5": 100.0 * top5 / max(seen, 1)}


def _write_json_lines(path, records):
    with atomic_write(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mocobench lincls", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="ImageFolder root holding train/<class>/ and val/<class>/")
    parser.add_argument("--pretrained", required=True, help="MoCo checkpoint (.pth.tar), ours or official")
    parser.add_argument("--output", required=True, help="writes lincls_results.json and metrics.json (a line/epoch)")
    parser.add_argument("--recipe", default="auto", choices=["auto", *RECIPES], help="auto: from checkpoint keys")
    parser.add_argument("--arch", default=None, help="only if the checkpoint has no 'arch' entry")
    parser.add_argument("--epochs", type=int, default=None, help="recipe default: 100 (v1v2) / 90 (v3)")
    parser.add_argument("--lr", type=float, default=None,
                        help="recipe default: 30 (v1v2) / 0.1 (v3, scaled by batch size / 256)")
    parser.add_argument("--batch-size", type=int, default=None, help="recipe default: 256 (v1v2) / 1024 (v3)")
    parser.add_argument("--schedule", type=int, nargs="*", default=None,
                        help="epochs at which lr drops x0.1 (default 60 80 for v1v2; v3 uses cosine)")
    parser.add_argument("--size", type=int, default=224, help="image size (small tests: 32-64)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--device", default=None,
                        help="default: cuda (cuda:LOCAL_RANK with several processes) if available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tf32", action="store_true",
                        help="TF32 matmuls/convolutions on Ampere+ GPUs (off: the official V100 fp32 protocol)")
    return parser


def check_output_dir(output):
    """One run per directory: refuse an --output that holds another linear evaluation (nothing is written)."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise UsageError(f"--output {output!r} is a file, not a directory")
    existing = [n for n in ("lincls_results.json", "metrics.json") if os.path.exists(os.path.join(output, n))]
    if existing:
        raise UsageError(f"--output {output!r} already holds a linear evaluation ({', '.join(existing)}); choose "
                         "another --output, or move that one away to redo it")


def main(argv):
    args = build_parser().parse_args(argv)
    check_output_dir(args.output)
    try:
        return _main(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _main(args):
    device = setup_device(args.device or "")
    world = comm.get_world_size()
    log = print if comm.is_main_process() else (lambda *a, **k: None)
    tf32 = set_tf32(args.tf32)
    torch.manual_seed(args.seed)

    checkpoint = load_checkpoint(args.pretrained)
    backbone_state, detected_recipe, prefix = extract_backbone(checkpoint, args.pretrained)
    recipe_name = detected_recipe if args.recipe == "auto" else args.recipe
    recipe = RECIPES[recipe_name]
    arch = checkpoint.get("arch") or args.arch
    if not arch:
        raise UsageError(f"{args.pretrained!r} has no 'arch' entry; pass --arch (e.g. resnet50)")
    epochs = args.epochs if args.epochs is not None else recipe.epochs
    batch_size = args.batch_size or recipe.batch_size
    base_lr = args.lr if args.lr is not None else recipe.lr
    if recipe.scale_lr_by_batch:
        base_lr = base_lr * batch_size / 256
    milestones = tuple(args.schedule) if args.schedule is not None else recipe.milestones
    if epochs < 1 or batch_size < 1 or args.size < 8:
        raise UsageError(
            f"need --epochs >= 1, --batch-size >= 1, --size >= 8 (got {epochs}, {batch_size}, {args.size})"
        )

    train_set = SafeImageFolder(os.path.join(args.data, "train"), build_linear_train_transform(args.size))
    val_set = SafeImageFolder(os.path.join(args.data, "val"), build_eval_transform(args.size))
    if train_set.classes != val_set.classes:
        raise UsageError(f"{args.data!r}: train/ and val/ have different class folders "
                         f"({len(train_set.classes)} vs {len(val_set.classes)})")
    if batch_size % world:
        raise UsageError(f"--batch-size {batch_size} (global) is not divisible by the {world} processes")
    train_loader = build_loader(train_set, batch_size // world, args.workers, shuffle=True, drop_last=False,
                                distributed=world > 1, seed=args.seed)
    val_loader = build_loader(shard(val_set), batch_size // world, args.workers, shuffle=False, drop_last=False,
                              seed=args.seed)

    model = build_linear_model(arch, len(train_set.classes), backbone_state, args.pretrained).to(device)
    net = model
    if world > 1:  # only fc trains: its gradients are all that DDP reduces; BN buffers are frozen (eval mode)
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2, "only fc.weight and fc.bias may train"
    optimizer = torch.optim.SGD(trainable, base_lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)

    schedule = f"step x0.1 at {list(milestones)}" if milestones else "cosine"
    log(f"lincls: {arch} from {args.pretrained} ({prefix}*, recipe {recipe_name}), {len(train_set.classes)} classes, "
          f"{len(train_set)} train / {len(val_set)} val images, {epochs} epochs, batch {batch_size}, "
          f"lr {base_lr:g} ({schedule}), {world} process(es), device {device}, TF32 {args.tf32}", flush=True)

    if comm.is_main_process():
        os.makedirs(args.output, exist_ok=True)
    metrics_path = os.path.join(args.output, "metrics.json")
    records, best_top1 = [], 0.0
    for epoch in range(epochs):
        lr = learning_rate(base_lr, epoch, epochs, milestones)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_loader.sampler.set_epoch(epoch)
        start = time.time()
        train_stats = train_one_epoch(net, train_loader, optimizer, device, f"epoch {epoch + 1}/{epochs}")
        val_stats = evaluate(model, val_loader, device)
        best_top1 = max(best_top1, val_stats["top1"])
        record = {"epoch": epoch + 1, "lr": lr, **train_stats, "val_top1": val_stats["top1"],
                  "val_top5": val_stats["top5"], "time_s": round(time.time() - start, 2)}
        records.append(record)
        if comm.is_main_process():
            _write_json_lines(metrics_path, records)
        log(f"epoch {epoch + 1}/{epochs}  lr {lr:.4g}  loss {train_stats['train_loss']:.4f}  "
              f"train@1 {train_stats['train_top1']:.2f}  val@1 {val_stats['top1']:.2f}  "
              f"val@5 {val_stats['top5']:.2f}", flush=True)
    train_set.check_bad_fraction()
    val_set.check_bad_fraction()

    # Official sanity check: reload the checkpoint and compare every backbone tensor.
    reference, _, _ = extract_backbone(load_checkpoint(args.pretrained), args.pretrained)
    check_backbone_unchanged(model.state_dict(), reference)
    log("sanity check passed: backbone unchanged")

    results = {
        "pretrained": os.path.abspath(args.pretrained),
        "arch": arch,
        "recipe": recipe_name,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": base_lr,
        "schedule": list(milestones) if milestones else "cosine",
        "size": args.size,
        "num_classes": len(train_set.classes),
        "top1": records[-1]["val_top1"],
        "top5": records[-1]["val_top5"],
        "best_top1": best_top1,
        "bad_images": train_set.num_bad + val_set.num_bad,
        "backbone_unchanged": True,
        "world_size": world,
        **tf32,
    }
    if comm.is_main_process():
        with atomic_write(os.path.join(args.output, "lincls_results.json"), "w") as f:
            json.dump(results, f, indent=2)
    log(f"lincls: top-1 {results['top1']:.2f}  top-5 {results['top5']:.2f}  (best top-1 {best_top1:.2f})")
    return 0


if __name__ == "__main__":
    from pretrain.train import torchrun_entry

    torchrun_entry(lambda: main(sys.argv[1:]), "mocobench lincls")
