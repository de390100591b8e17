"""The process side of scaling out, shared by pretrain.train, pretrain.supervised and pretrain.lincls.

Processes are started by a launcher (`mocobench pretrain --nproc-per-node N`, torchrun, submitit), which
exports the env:// variables (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT). Here: join that process
group with an explicit timeout, pick this process's device, check at start what must be the same on every
rank, and say in the log's first lines how the batch is split.
"""
import hashlib
import os

import torch

from mocobench import comm
from mocobench.errors import UsageError


def setup_device(device_name=""):
    """Join the launcher's process group when WORLD_SIZE > 1; returns this process's torch.device.

    device_name: "" (cuda:LOCAL_RANK if CUDA is available, else cpu), "cpu", or "cuda". "cuda:N" is refused
    under a multi-process launcher: every rank would train on the same GPU.
    """
    world = comm.launched_world_size()
    if world > 1 and device_name.startswith("cuda:"):
        raise UsageError(f"DEVICE {device_name!r} with {world} processes would put every rank on the same GPU; "
                         "use DEVICE cuda (each process takes cuda:LOCAL_RANK) or choose GPUs with "
                         "CUDA_VISIBLE_DEVICES")
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank if device_name in ("", "cuda") else torch.device(device_name))
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels (official)
    if world > 1 and not comm.is_dist():
        comm.init_process_group(use_cuda)
    if device_name and device_name not in ("cuda",):
        return torch.device(device_name)
    return torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def topology_summary(world, global_batch, bn_group, base_lr=None, device=None):
    """The log's first line about scale: world size, per-process batch, BN group size, effective lr."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    text = (f"world size {world} ({per_node} per node) on {device}; global batch {global_batch} = "
            f"{global_batch // world} per process; BN statistics over {bn_group} images")
    if base_lr is not None:
        text += f"; lr = {base_lr:g} x {global_batch}/256 = {base_lr * global_batch / 256:g}"
    return text


def _file_sha1(path):
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_same_resume(resume_path, start_epoch, iteration):
    """Every rank must resume from the same checkpoint (same bytes). Without a shared OUTPUT_DIR, the nodes
    other than rank 0's find no last_checkpoint and would start at epoch 0 with a fresh optimizer while only
    the weights are broadcast: a silent divergence. Raises UsageError on every rank instead."""
    if comm.get_world_size() == 1:
        return
    mine = (start_epoch, iteration, _file_sha1(resume_path) if resume_path else None)
    ranks = comm.gather_objects(mine)
    if any(r != ranks[0] for r in ranks[1:]):
        listed = "; ".join(f"rank {i}: " + (f"epoch {e}, iteration {it}, sha1 {h[:10]}" if h else "no checkpoint")
                           for i, (e, it, h) in enumerate(ranks))
        raise UsageError(f"the ranks resume from different checkpoints ({listed}); OUTPUT_DIR must be a directory "
                         "every node shares, or pass --resume PATH to a checkpoint every node can read")


def check_replicas_equal(what, tensors):
    """Raise RuntimeError on every rank when `tensors` (the state that no DDP keeps in step: the momentum
    encoder, the queue and its pointer) differ in any bit between ranks."""
    comm.check_same_on_all_ranks(what, comm.fingerprint(tensors))
