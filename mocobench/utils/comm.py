"""Processes and ranks: join the launcher's process group, pick this process's device, and the rank
and collective helpers that work with and without torch.distributed (detectron2's `comm` style).

Processes are started by a launcher (`mocobench pretrain --nproc-per-node N`, torchrun, submitit),
which exports the env:// variables (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT). `pretrain` uses
these helpers; `transfer` uses detectron2's own `detectron2.utils.comm`, which reads the same
process group.
"""
import hashlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from mocobench.utils.errors import UsageError

# NCCL's default collective timeout is 10 minutes (30 for gloo): a rank that legitimately works
# alone for longer (a long evaluation, a slow checkpoint write on a network file system) would have
# the watchdog abort the job. Every pretraining process group gets this one explicit value instead
# (MOCOBENCH_DIST_TIMEOUT_MIN overrides it).
DEFAULT_TIMEOUT = timedelta(minutes=float(os.environ.get("MOCOBENCH_DIST_TIMEOUT_MIN", 60)))


def is_dist() -> bool:
    """A process group exists (a launcher started this process, of any world size, 1 included).
    The collective helpers below shortcut only without one: in a group of 1 every collective runs
    (the path of N processes on one device), and a gather of 1 is the identity."""
    return dist.is_available() and dist.is_initialized()


def backend():
    """The process group's backend ("nccl", "gloo"), None without a group."""
    return dist.get_backend() if is_dist() else None


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier():
    if is_dist():
        dist.barrier()


def launched_world_size() -> int:
    """WORLD_SIZE as the launcher (torchrun, torch elastic, submitit) exported it; 1 when run
    directly."""
    return int(os.environ.get("WORLD_SIZE", 1))


def launched() -> bool:
    """A launcher (torchrun, torch elastic, submitit) started this process: it exported the env://
    rendezvous (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), with any world size (DeiT / MAE's
    init_distributed_mode test). `torchrun --nproc-per-node 1` is a process group of 1."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_process_group(use_cuda: bool, timeout: timedelta = DEFAULT_TIMEOUT):
    """Join the launcher's env:// process group (NCCL on CUDA, gloo on CPU) with an explicit
    timeout."""
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://", timeout=timeout)


# all_gather_into_tensor (torch >= 1.13) was renamed all_gather_single (the old name warns in newer
# torch)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0 (same shape on all ranks); no gradient.
    One collective straight into the output: no per-rank list, no torch.cat copy."""
    if not is_dist():
        return tensor
    world = get_world_size()
    if (tensor.dim() == 4 and not tensor.is_contiguous()
            and tensor.is_contiguous(memory_format=torch.channels_last)):
        # NHWC images (channels_last): gather the memory as it lies and hand back the same layout,
        # no conversion
        return all_gather_cat(tensor.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    tensor = tensor.contiguous()
    out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
    _all_gather_single(out, tensor)
    return out


@torch.no_grad()
def all_gather_uneven(tensor: torch.Tensor) -> list:
    """Every rank's `tensor` (same trailing shape, any number of rows), as a list indexed by
    rank."""
    if not is_dist():
        return [tensor]
    world = get_world_size()
    rows = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = all_gather_cat(rows).tolist()
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = all_gather_cat(padded).view(world, max(counts), *tensor.shape[1:])
    return [gathered[r, : counts[r]] for r in range(world)]


def all_ranks_agree(flag: bool, device=None) -> bool:
    """True when `flag` is True on every rank (one all-reduce of one number; every rank gets the
    same answer). Used before acting on a per-rank observation (a NaN loss): a rank that stops alone
    leaves the others blocked in the next collective until the timeout."""
    if not is_dist():
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
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_same_on_all_ranks(what: str, value):
    """Raise RuntimeError on every rank (not just the odd one out) when `value` (a picklable,
    comparable object, e.g. a fingerprint or a checkpoint description) differs between ranks."""
    values = gather_objects(value)
    if any(v != values[0] for v in values[1:]):
        listed = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise RuntimeError(f"{what} differs between ranks ({listed})")


def bf16_supported_in_hardware(device) -> bool:
    """bfloat16 runs natively: CUDA compute capability >= 8.0 (Ampere).
    torch.cuda.is_bf16_supported() also answers True for pre-Ampere GPUs, which emulate it (slower
    than fp16, and not what AMP is for)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type == "cpu"
    return torch.cuda.is_bf16_supported(including_emulation=False)


def setup_device(device_name=""):
    """Join the launcher's process group when a launcher started this process (`launched`; a
    group of 1 too) or WORLD_SIZE > 1; returns this process's torch.device.

    device_name: "" (cuda:LOCAL_RANK if CUDA is available, else cpu), "cpu", or "cuda". "cuda:N" is
    refused under a multi-process launcher: every rank would train on the same GPU.
    """
    world = launched_world_size()
    if world > 1 and device_name.startswith("cuda:"):
        raise UsageError(f"DEVICE {device_name!r} with {world} processes would put every rank on "
                         "the same GPU; use DEVICE cuda (each process takes cuda:LOCAL_RANK) or "
                         "choose GPUs with CUDA_VISIBLE_DEVICES")
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank if device_name in ("", "cuda")
                              else torch.device(device_name))
        # fixed input sizes: let cuDNN pick its fastest kernels (official)
        torch.backends.cudnn.benchmark = True
    if (world > 1 or launched()) and not is_dist():
        init_process_group(use_cuda)
    if device_name and device_name not in ("cuda",):
        return torch.device(device_name)
    return torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def topology_summary(world, global_batch, bn_group, base_lr=None, device=None):
    """The log's first line about scale: world size, per-process batch, BN group size, effective
    lr."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    text = (f"world size {world} ({per_node} per node) on {device}; global batch {global_batch} = "
            f"{global_batch // world} per process; BN statistics over {bn_group} images")
    if base_lr is not None:
        text += f"; lr = {base_lr:g} x {global_batch}/256 = {base_lr * global_batch / 256:g}"
    group = backend()
    return text + (f"; process group {group}" if group else "; no process group")


def _file_sha1(path):
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_same_resume(resume_path, start_epoch, iteration):
    """Every rank must resume from the same checkpoint (same bytes). Without a shared OUTPUT_DIR,
    the nodes other than rank 0's find no last_checkpoint and would start at epoch 0 with a fresh
    optimizer while only the weights are broadcast: a silent divergence. Raises UsageError on every
    rank instead."""
    if not is_dist():
        return
    mine = (start_epoch, iteration, _file_sha1(resume_path) if resume_path else None)
    ranks = gather_objects(mine)
    if any(r != ranks[0] for r in ranks[1:]):
        listed = "; ".join(
            f"rank {i}: " + (f"epoch {e}, iteration {it}, sha1 {h[:10]}" if h else "no checkpoint")
            for i, (e, it, h) in enumerate(ranks))
        raise UsageError(f"the ranks resume from different checkpoints ({listed}); OUTPUT_DIR must "
                         "be a directory every node shares, or pass --resume PATH to a checkpoint "
                         "every node can read")


def check_replicas_equal(what, tensors):
    """Raise RuntimeError on every rank when `tensors` (the state that no DDP keeps in step: the
    momentum encoder, the queue and its pointer) differ in any bit between ranks."""
    check_same_on_all_ranks(what, fingerprint(tensors))
