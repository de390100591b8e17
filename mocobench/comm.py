"""Rank and world-size helpers that work with and without torch.distributed (detectron2's `comm` style).

`pretrain` uses these; `transfer` uses detectron2's own `detectron2.utils.comm`, which reads the same
process group.
"""
import hashlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

# NCCL's default collective timeout is 10 minutes (30 for gloo): a rank that legitimately works alone for longer
# (a long evaluation, a slow checkpoint write on a network file system) would have the watchdog abort the job.
# Every pretraining process group gets this one explicit value instead (MOCOBENCH_DIST_TIMEOUT_MIN overrides it).
DEFAULT_TIMEOUT = timedelta(minutes=float(os.environ.get("MOCOBENCH_DIST_TIMEOUT_MIN", 60)))


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier():
    if is_dist() and get_world_size() > 1:
        dist.barrier()


def launched_world_size() -> int:
    """WORLD_SIZE as the launcher (torchrun, torch elastic, submitit) exported it; 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", 1))


def init_process_group(use_cuda: bool, timeout: timedelta = DEFAULT_TIMEOUT):
    """Join the launcher's env:// process group (NCCL on CUDA, gloo on CPU) with an explicit timeout."""
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://", timeout=timeout)


# all_gather_into_tensor (torch >= 1.13) was renamed all_gather_single (the old name warns in newer torch)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0 (same shape on all ranks); no gradient.
    One collective straight into the output: no per-rank list, no torch.cat copy."""
    world = get_world_size()
    if world == 1:
        return tensor
    if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        # NHWC images (channels_last): gather the memory as it lies and hand back the same layout, no conversion
        return all_gather_cat(tensor.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    tensor = tensor.contiguous()
    out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
    _all_gather_single(out, tensor)
    return out


@torch.no_grad()
def all_gather_uneven(tensor: torch.Tensor) -> list:
    """Every rank's `tensor` (same trailing shape, any number of rows), as a list indexed by rank."""
    world = get_world_size()
    if world == 1:
        return [tensor]
    rows = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = all_gather_cat(rows).tolist()
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = all_gather_cat(padded).view(world, max(counts), *tensor.shape[1:])
    return [gathered[r, : counts[r]] for r in range(world)]


def all_ranks_agree(flag: bool, device=None) -> bool:
    """True when `flag` is True on every rank (one all-reduce of one number; every rank gets the same answer).
    Used before acting on a per-rank observation (a NaN loss): a rank that stops alone leaves the others
    blocked in the next collective until the timeout."""
    if get_world_size() == 1:
        return bool(flag)
    value = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(value)
    return float(value) == 0.0


def fingerprint(tensors) -> str:
    """SHA-1 of the exact bytes of `tensors` (an iterable of tensors, order matters)."""
    digest = hashlib.sha1()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_same_on_all_ranks(what: str, value):
    """Raise RuntimeError on every rank (not just the odd one out) when `value` (a picklable, comparable object,
    e.g. a fingerprint or a checkpoint description) differs between ranks."""
    values = gather_objects(value)
    if any(v != values[0] for v in values[1:]):
        listed = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise RuntimeError(f"{what} differs between ranks ({listed})")


def bf16_supported_in_hardware(device) -> bool:
    """bfloat16 runs natively: CUDA compute capability >= 8.0 (Ampere). torch.cuda.is_bf16_supported() also
    answers True for pre-Ampere GPUs, which emulate it (slower than fp16, and not what AMP is for)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type == "cpu"
    return torch.cuda.is_bf16_supported(including_emulation=False)
