"""Where each stage runs: its nodes, GPUs and CPUs per node, and this machine's place in it.

The stages that train span NUM_NODES nodes; the others run on one node without a GPU. A command
that runs a stage must be started on as many machines as the stage spans (`--launcher slurm` does
that, a job per stage); check_machines says so before anything runs.
"""
import dataclasses

from mocobench.pipeline.config import stage_config, trains_classifier
from mocobench.utils.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Place:
    """This machine's place in a stage that spans several machines (transfer's --num-machines /
    --machine-rank / --dist-url); machine 0 checks and records the stage's outputs."""

    num_machines: int = 1
    machine_rank: int = 0
    dist_url: str = "auto"


ONE_MACHINE = Place()


def trains(cfg, name):
    """Stages that train on many processes: they span NUM_NODES nodes with their GPUs; the others
    run on one node without a GPU (data generation, conversion, the report)."""
    return trains_classifier(cfg, name) or name.startswith("transfer_")


def stage_nodes(cfg, name):
    return cfg.NUM_NODES if trains(cfg, name) else 1


def stage_processes(cfg, name, gpus_per_node):
    """Processes per node of a stage that trains: its own count (PRETRAIN.NPROC_PER_NODE,
    TRANSFER.NUM_GPUS), else `gpus_per_node` (the launcher's --gpus-per-node); 1 for the others."""
    return max(_own_processes(cfg, name) or gpus_per_node, 1) if trains(cfg, name) else 1


def stage_gpus(cfg, config_file, name, gpus_per_node):
    """GPUs per node of the stage's job: a GPU per process (stage_processes); 0 for the stages that
    do not train and for a stage its config pins to the CPU (DEVICE / MODEL.DEVICE cpu: a job on a
    cluster without GPUs cannot ask for one)."""
    if not trains(cfg, name):
        return 0
    stage_cfg = _stage_config(cfg, config_file, name)
    device = stage_cfg.MODEL.DEVICE if name.startswith("transfer_") else stage_cfg.DEVICE
    return 0 if device == "cpu" else _own_processes(cfg, name) or gpus_per_node


def stage_cpus(cfg, config_file, name, processes):
    """CPUs of the stage's task (one per node, which starts its processes): a CPU per DataLoader
    worker + 1, for each process: (NUM_WORKERS + 1) x processes, NUM_WORKERS from the stage's own
    merged config (pretrain / supervised: DATALOADER.NUM_WORKERS of PRETRAIN / SUPERVISED;
    transfer_INIT: of its detectron2 config); 1 for the stages that do not train (one process, no
    loader)."""
    if not trains(cfg, name):
        return 1
    return (_stage_config(cfg, config_file, name).DATALOADER.NUM_WORKERS + 1) * processes


def _own_processes(cfg, name):
    """The stage's own process count per node; 0: the launcher's --gpus-per-node."""
    return cfg.TRANSFER.NUM_GPUS if name.startswith("transfer_") else cfg.PRETRAIN.NPROC_PER_NODE


def _stage_config(cfg, config_file, name):
    if name.startswith("transfer_"):
        return stage_config(cfg, config_file, "TRANSFER", name.removeprefix("transfer_"))
    return stage_config(cfg, config_file, name.upper())


def check_machines(cfg, config_file, names, place):
    """Each stage of `names` (those this command runs) is started on as many machines as it spans:
    NUM_NODES for the stages that train, one for the others."""
    for name in names:
        nodes = stage_nodes(cfg, name)
        if nodes != place.num_machines and place.num_machines == 1:
            raise UsageError(f"{config_file}: NUM_NODES {cfg.NUM_NODES}: stage {name} spans "
                             f"{nodes} nodes, which needs a launcher that starts it on each: "
                             f"mocobench pipeline --launcher slurm (a job per stage); on one node "
                             f"set NUM_NODES 1")
        if nodes != place.num_machines:
            raise UsageError(f"--num-machines {place.num_machines}: stage {name} runs on {nodes} "
                             f"machine(s) (NUM_NODES {cfg.NUM_NODES} is for pretrain, supervised "
                             f"and transfer)")
    if place.num_machines > 1 and not place.dist_url.startswith("tcp://"):
        raise UsageError(f"--dist-url {place.dist_url} with --num-machines {place.num_machines}: "
                         f"expected tcp://HOST:PORT (HOST: machine 0)")
