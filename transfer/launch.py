"""Start N training processes: detectron2's `launch` on CUDA (NCCL), our gloo twin on CPU.

detectron2 v0.6's `launch` asserts CUDA in every worker and uses NCCL. `launch_cpu` mirrors its
`_distributed_worker` for CPU processes: init_process_group("gloo"), one local process group per
machine in `detectron2.utils.comm._LOCAL_PROCESS_GROUP` (which `comm.get_local_rank/size` read;
v0.6 has no `create_local_process_group`), a barrier, then `main_func(*args)`. The config must
already use naiveSyncBN instead of SyncBN there (see transfer.config.swap_sync_bn).
"""
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mocobench.utils import d2compat  # noqa: F401  (before any detectron2 import)
from mocobench.utils.errors import UsageError

# isort: split
from detectron2.engine import defaults as d2_defaults
from detectron2.engine import launch
from detectron2.engine.launch import _find_free_port
from detectron2.utils import comm

DEFAULT_TIMEOUT = timedelta(minutes=30)

__all__ = ["check_launch", "default_num_gpus", "launch", "launch_cpu"]


def default_num_gpus(cfg) -> int:
    """Processes per machine when none is asked for: every visible GPU when the config trains on
    CUDA, else 1."""
    return torch.cuda.device_count() \
        if cfg.MODEL.DEVICE.startswith("cuda") and torch.cuda.is_available() else 1


def check_launch(cfg, num_gpus, num_machines=1, dist_url="auto"):
    """What would fail inside every worker, caught before any process starts (one-line
    UsageError)."""
    world_size = num_gpus * num_machines
    if dist_url == "auto" and num_machines > 1:
        raise UsageError("--dist-url auto picks a free port on this machine only; with "
                         f"--num-machines {num_machines} pass --dist-url tcp://HOST:PORT (HOST: "
                         "the machine of rank 0)")
    if cfg.SOLVER.IMS_PER_BATCH % world_size:
        raise UsageError(f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} (images per step, all "
                         f"processes) is not divisible by the {world_size} processes "
                         f"({num_machines} machine(s) x {num_gpus})")


def launch_cpu(main_func, num_procs_per_machine, num_machines=1, machine_rank=0, dist_url="auto",
               args=(), timeout=DEFAULT_TIMEOUT):
    world_size = num_machines * num_procs_per_machine
    if world_size == 1:
        main_func(*args)
        return
    if dist_url == "auto":
        if num_machines != 1:
            raise UsageError("dist_url 'auto' works on one machine only; pass --dist-url "
                             "tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.spawn(
        _gloo_worker,
        nprocs=num_procs_per_machine,
        args=(main_func, world_size, num_procs_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )

def _create_ddp_model_cpu(model, **kwargs):
    # create_ddp_model passes device_ids=[local rank], which DistributedDataParallel rejects for a
    # CPU module
    kwargs.setdefault("device_ids", None)
    return _create_ddp_model(model, **kwargs)

_create_ddp_model = d2_defaults.create_ddp_model

def _gloo_worker(local_rank, main_func, world_size, num_procs_per_machine, machine_rank, dist_url,
                 args, timeout):
    global_rank = machine_rank * num_procs_per_machine + local_rank
    try:
        dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size,
                                rank=global_rank, timeout=timeout)
    except Exception:
        logging.getLogger(__name__).error(f"Process group URL: {dist_url}")
        raise

    assert comm._LOCAL_PROCESS_GROUP is None
    num_machines = world_size // num_procs_per_machine
    for i in range(num_machines):
        # every rank must create every group, in the same order (a new_group is a collective)
        group = dist.new_group(list(range(i * num_procs_per_machine,
                                          (i + 1) * num_procs_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group

    # N processes on one machine's cores: without this each would start a thread per core
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_procs_per_machine))
    # process-local: this spawned worker runs CPU training only
    d2_defaults.create_ddp_model = _create_ddp_model_cpu

    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()
