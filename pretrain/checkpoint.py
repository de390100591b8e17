"""Pretraining checkpoints in the official MoCo layout, loadable with torch.load(weights_only=True).

    checkpoint_{epoch:04d}.pth.tar   (epoch = index of the finished epoch, 0-based, as main_moco.py
                                     names them)
    checkpoint_iter_{iteration:08d}.pth.tar   a mid-epoch resume point (preemption,
                                              SOLVER.CHECKPOINT_PERIOD_ITERS)
        epoch       number of finished epochs (the epoch to start from when resuming), as in
                    main_moco.py
        arch        MODEL.ARCH
        state_dict  module.encoder_q.*, module.encoder_k.*, module.queue, module.queue_ptr   (v1/v2)
                    module.base_encoder.*, module.momentum_encoder.*, module.predictor.*     (v3)
                    conv1.weight, bn1.*, layer1.0.conv1.weight, ..., fc.*    (supervised baseline:
                    plain torchvision keys, as torchvision's own resnet50-*.pth;
                    pretrain.supervised)
        optimizer   optimizer.state_dict()
      ours, for exact resume:
        iteration   global iteration count
        epoch_iteration   iterations already done in epoch `epoch` (0 at an epoch boundary): a
                    resumed run skips that many batches of the epoch's order, a function of
                    (sampler_seed, epoch)
        sampler_seed, world_size   what that order and the per-process shards depend on
        scaler      GradScaler state (fp16); a default GradScaler's otherwise (official v3 layout)
        rng         torch / cuda / numpy / python RNG states as tensors and plain numbers
        config      the full config as a YAML string
        task_state  what the training method keeps across a resume
                    (pretrain.engine.Task.extra_state)
    last_checkpoint  text file naming the newest checkpoint (what `--resume auto` reads)

The "module." prefix is what the official code's DistributedDataParallel wrapper puts there; we wrap
only the trainable submodules in DDP, so `official_state_dict` removes their own ".module" and adds
the outer one. Every file is written to a temporary name and renamed (mocobench.utils.fileio): a
crash never leaves half a file; `remove_stale_temp_files` deletes the temporary files a killed run
left behind.
"""
import os
import random

import numpy as np
import torch

from mocobench.utils.errors import UsageError
from mocobench.utils.fileio import atomic_torch_save, atomic_write, load_checkpoint

LAST_CHECKPOINT = "last_checkpoint"


def checkpoint_name(epoch_index):
    return f"checkpoint_{epoch_index:04d}.pth.tar"


def iteration_checkpoint_name(iteration):
    return f"checkpoint_iter_{iteration:08d}.pth.tar"


def is_iteration_checkpoint(path):
    return os.path.basename(path).startswith("checkpoint_iter_")


# What a killed run can leave half-written: mocobench.utils.fileio.atomic_write's
# ".<name>.<random>.tmp" of these files
_OWN_FILES = ("checkpoint_", LAST_CHECKPOINT, "config.yaml", "metrics.json")


def remove_stale_temp_files(output_dir):
    """Delete the temporary files of this run's own files (a SIGKILL during a save leaves one
    behind: the size of a checkpoint). Call it only while no other process writes into output_dir.
    Returns the removed names."""
    removed = []
    for name in sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []:
        if name.endswith(".tmp") and name.startswith(tuple("." + own for own in _OWN_FILES)):
            os.remove(os.path.join(output_dir, name))
            removed.append(name)
    return removed


def official_state_dict(model):
    """model.state_dict() with DDP-wrapped submodules unwrapped and the official 'module.'
    prefix."""
    out = {}
    for key, value in model.state_dict().items():
        for name in model.ddp_modules:
            if key.startswith(name + ".module."):
                key = name + "." + key[len(name) + len(".module."):]
        out["module." + key] = value
    return out


def plain_state_dict(model):
    """The state dict of a classifier (DDP-wrapped or not) under plain torchvision keys: no
    'module.' prefix."""
    from torch.nn.parallel import DistributedDataParallel

    return (model.module if isinstance(model, DistributedDataParallel) else model).state_dict()


def _mismatches(error):
    """The first three of load_state_dict's error lines (after its "Error(s) in loading state_dict
    for ..." header: one per tensor of another shape), on one line."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] \
        or [str(error).strip()]
    return "; ".join(lines[:3]) + (" ..." if len(lines) > 3 else "")


def load_plain_state_dict(model, state_dict, source):
    """Inverse of plain_state_dict for a model not (yet) wrapped in DDP; every key and shape must
    match."""
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatch, e.g. another number of classes in fc
        raise UsageError(f"{source}: state_dict does not match the model (MODEL.ARCH / classes "
                         f"differ?): {_mismatches(e)}") from None
    if missing or unexpected:
        raise UsageError(
            f"{source}: state_dict does not match the model (MODEL.ARCH / classes differ?): "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")


def load_official_state_dict(model, state_dict, source):
    """Inverse of official_state_dict for a model not (yet) wrapped in DDP; every key must match."""
    stripped = {k[len("module."):] if k.startswith("module.") else k: v
                for k, v in state_dict.items()}
    try:
        missing, unexpected = model.load_state_dict(stripped, strict=False)
    except RuntimeError as e:  # shape mismatch, e.g. another MOCO.K or MOCO.DIM
        raise UsageError(
            f"{source}: state_dict does not match the model (MODEL.ARCH / MOCO.* differ?): "
            f"{_mismatches(e)}") from None
    if missing or unexpected:
        raise UsageError(
            f"{source}: state_dict does not match the model (MODEL.ARCH / MOCO.* differ?): "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")


def get_rng_state():
    """All RNG states as tensors / ints / floats (weights_only-loadable)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "cached_gaussian": float(np_gauss)},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if (state["cuda"] and torch.cuda.is_available()
            and len(state["cuda"]) == torch.cuda.device_count()):
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))


def save_checkpoint(output_dir, epoch_index, model, optimizer, scaler, iteration, cfg,
                    state_dict_fn=official_state_dict, epoch_iteration=None, world_size=1,
                    task_state=None):
    """Write checkpoint_{epoch_index:04d}.pth.tar (epoch epoch_index finished), or with
    epoch_iteration=i the mid-epoch checkpoint_iter_{iteration:08d}.pth.tar (i iterations of epoch
    epoch_index done); then point last_checkpoint at it. Returns the path. state_dict_fn(model)
    gives the 'state_dict' entry: the MoCo layout by default, plain_state_dict for a classifier."""
    mid_epoch = epoch_iteration is not None
    name = iteration_checkpoint_name(iteration) if mid_epoch else checkpoint_name(epoch_index)
    path = os.path.join(output_dir, name)
    atomic_torch_save({
        "epoch": epoch_index if mid_epoch else epoch_index + 1,
        "arch": cfg.MODEL.ARCH,
        "state_dict": state_dict_fn(model),
        "optimizer": optimizer.state_dict(),
        "iteration": iteration,
        "epoch_iteration": epoch_iteration if mid_epoch else 0,
        "sampler_seed": cfg.SEED,
        "world_size": world_size,
        "scaler": scaler_state_dict(scaler),
        "rng": get_rng_state(),
        "config": cfg.dump(),
        "task_state": task_state or {},
    }, path)
    with atomic_write(os.path.join(output_dir, LAST_CHECKPOINT), "w") as f:
        f.write(name)
    return path


def scaler_state_dict(scaler):
    """The GradScaler state; without one (fp32/bf16 runs) the state of a fresh default GradScaler,
    because the official MoCo v3 main_moco.py --resume calls scaler.load_state_dict, which rejects
    an empty dict."""
    return (scaler if scaler is not None else torch.amp.GradScaler("cpu")).state_dict()


def find_resume_path(output_dir, resume):
    """--resume auto -> the file last_checkpoint names (None when there is none); otherwise the
    given path."""
    if resume != "auto":
        return resume
    pointer = os.path.join(output_dir, LAST_CHECKPOINT)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(output_dir, name)
    if not os.path.isfile(path):
        raise UsageError(f"{pointer} names {name!r}, which does not exist in {output_dir!r}")
    return path


def read_resume_checkpoint(path):
    """The checkpoint dict, checked for the entries a resume needs."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise UsageError(f"{path}: not a pretraining checkpoint (a {type(ckpt).__name__}, "
                         "not a dict)")
    for key in ("epoch", "state_dict", "optimizer"):
        if key not in ckpt:
            raise UsageError(f"{path}: not a pretraining checkpoint (no {key!r} entry)")
    return ckpt


def load_for_resume(path, model, optimizer, scaler, load_state_dict_fn=load_official_state_dict,
                    ckpt=None):
    """Restore model, optimizer, scaler and RNG states from `path` (or its already read dict
    `ckpt`); returns (start_epoch, iteration, epoch_iteration).
    load_state_dict_fn(model, state_dict, path) is the inverse of save_checkpoint's
    state_dict_fn."""
    ckpt = read_resume_checkpoint(path) if ckpt is None else ckpt
    load_state_dict_fn(model, ckpt["state_dict"], path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as e:
        raise UsageError(f"{path}: optimizer state does not match the model (MODEL.* differ?): "
                         f"{e}") from None
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    return int(ckpt["epoch"]), int(ckpt.get("iteration", 0)), int(ckpt.get("epoch_iteration", 0))
