"""The one training loop of `pretrain`, in the spirit of detectron2's TrainerBase and torchvision's
train_one_epoch: epochs of iterations, with exact resume, clean stops, checkpoints, metrics and
progress.

A Task supplies what differs between the methods: its data, model, optimizer, step, evaluation and
state (MoCo: pretrain.train, the supervised baseline: pretrain.supervised, the linear protocol:
pretrain.lincls). Everything else lives here once:

    train(task)  validate (nothing written yet) -> build -> restore -> open OUTPUT_DIR -> epochs of
                   iterations: lr, step, backward; every LOG_PERIOD: one vote (NaN, stop), metrics,
                   checkpoint on a stop
                   after each epoch: unreadable images, evaluation, replica check, checkpoint,
                   monitor (kNN), stop
                 -> task.finish
"""
import json
import logging
import math
import os
import random
import shlex
import signal
import time

import numpy as np
import torch

from mocobench.utils import comm
from mocobench.utils.env import set_tf32
from mocobench.utils.errors import CommandFailed, UsageError
from mocobench.utils.events import MetricsWriter, Progress, log_to_file_only, setup_logging
from mocobench.utils.fileio import atomic_write
from mocobench.utils.preempt import EXIT_CODES, Preempted, Preemption
from pretrain import checkpoint as ckpt
from pretrain import resume as resume_mod

logger = logging.getLogger("pretrain")

PRECISION_RECORD = "precision.json"
TOPOLOGY_RECORD = "topology.json"  # world size, batches, BN groups and their warnings


class TrainingDiverged(CommandFailed):
    """The loss became NaN or infinite (exit code 1); the last checkpoint stays good."""


class Task:
    """One training method as the loop sees it; subclasses override what they do differently."""

    tag = "pretrain"  # the log lines' tag
    output_name = "OUTPUT_DIR"  # how the user names the run directory (in refusals)
    run_kind = "run"  # what a refused run directory already holds
    epochs_name = "SOLVER.EPOCHS"  # how the user sets the schedule's length (in refusals)
    state_keys = resume_mod.STATE_SHAPING_KEYS  # config keys a resume may not change

    def __init__(self, cfg):
        self.cfg = cfg

    # --- building (every rank; nothing may be written before the run directory is opened) ---
    def build_data(self, batch_per_rank, world):
        """(training dataset, its loader from pretrain.data.build_loader); raises UsageError."""
        raise NotImplementedError

    def build_model(self, device):
        """The model, not yet on `device`; called after seeding with SEED (identical on every
        rank)."""
        raise NotImplementedError

    def build_optimizer(self, model, lr):
        return build_optimizer(self.cfg, model.parameters(), lr)

    def state_dict(self, model):
        """The checkpoint's `state_dict` entry."""
        return ckpt.plain_state_dict(model)

    def load_state_dict(self, model, state_dict, source):
        ckpt.load_plain_state_dict(model, state_dict, source)

    def extra_state(self):
        """Plain values the task keeps across a resume (stored as the checkpoint's `task_state`)."""
        return {}

    def load_extra_state(self, state):
        pass

    def describe(self, world, batch_per_rank, device):
        """The log's first lines about the run."""
        return []

    def topology(self, world, batch_per_rank):
        """OUTPUT_DIR/topology.json: the run's scale; its `warnings` (lines) are logged too."""
        return {"world_size": world, "process_group": comm.backend(),
                "batch_size": self.cfg.SOLVER.BATCH_SIZE, "batch_per_process": batch_per_rank,
                "warnings": []}

    def wrap(self, model, device):
        """The model the loop trains: DDP, torch.compile. Called once the state is restored."""
        return model

    # --- training ---
    def lr_at(self, epoch_float):
        from pretrain.config import lr_at

        return lr_at(self.cfg, epoch_float)

    def train_mode(self, model):
        model.train()

    def step(self, model, batch, device, epoch_float, memory_format):
        """Forward one batch: (loss, logits, labels) of this process's share."""
        raise NotImplementedError

    def iteration_scalars(self, iteration, epoch_float):
        """Extra scalars of an iteration's metrics record."""
        return {}

    def evaluate(self, model, epoch, device, precision):
        """After an epoch, before its checkpoint, on every rank: scalars for metrics.json ({} when
        there is nothing to say). It may change what the checkpoint keeps (the task's state)."""
        return {}

    def monitor(self, model, epoch, device, precision):
        """After the epoch's checkpoint, on every rank: scalars for metrics.json ({} when there is
        nothing to say). Watches only: it must change nothing a checkpoint keeps."""
        return {}

    def check_replicas(self, model):
        """After an epoch with several processes: raise when state DDP does not sync differs."""

    def finish(self, model, device):
        """After the last epoch, on every rank."""


# --------------------------------------------------------------------------------------------------
# pieces the tasks share
# --------------------------------------------------------------------------------------------------
def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(cfg, params, lr):
    """SGD or LARS over `params`. MoCo passes model.parameters() of the unwrapped model, as the
    official main_moco.py does (frozen key encoder included, in module order): parameters without a
    gradient get no state, so the training is the same, and the optimizer state_dict has the
    official layout, which the official `optimizer.load_state_dict` (--resume) accepts."""
    from pretrain.lars import LARS

    kwargs = dict(momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    optimizers = {"sgd": lambda: torch.optim.SGD(params, lr, **kwargs),
                  "lars": lambda: LARS(params, lr, **kwargs)}
    return optimizers[cfg.SOLVER.OPTIMIZER]()


def precision_settings(cfg, device, write=True):
    """(autocast enabled, dtype, channels_last), and the TF32 switches set from cfg.TF32.

    AMP.ENABLED None follows the official recipe: fp16 autocast + GradScaler for MoCo v3 on CUDA,
    fp32 for v1/v2 (and on CPU, where autocast is slower). channels_last defaults to on for CUDA.
    With `write`, the resolved precision is logged and written to OUTPUT_DIR/precision.json (main
    process)."""
    on_cuda = device.type == "cuda"
    amp = cfg.AMP.ENABLED if cfg.AMP.ENABLED is not None else (on_cuda and cfg.MOCO.VERSION == "v3")
    dtype = torch.bfloat16 if cfg.AMP.DTYPE == "bfloat16" else torch.float16
    if amp and on_cuda and dtype == torch.bfloat16 and not comm.bf16_supported_in_hardware(device):
        dtype = torch.float16
    channels_last = cfg.CHANNELS_LAST if cfg.CHANNELS_LAST is not None else on_cuda
    record = {"device": str(device), "amp": bool(amp),
              "amp_dtype": str(dtype).replace("torch.", "") if amp else None,
              "grad_scaler": bool(amp and dtype == torch.float16), **set_tf32(cfg.TF32),
              "channels_last": bool(channels_last)}
    if write:
        logger.info("precision: " + ", ".join(f"{k} {v}" for k, v in record.items()))
        if comm.is_main_process() and os.path.isdir(cfg.OUTPUT_DIR):
            with atomic_write(os.path.join(cfg.OUTPUT_DIR, PRECISION_RECORD), "w") as f:
                json.dump(record, f, indent=2)
    return amp, dtype, channels_last


def write_topology(cfg, record):
    """Log the record's warnings and write it to OUTPUT_DIR/TOPOLOGY_RECORD (main process: on the
    others a warning would reach stderr through logging's last-resort handler)."""
    if not comm.is_main_process():
        return
    for line in record["warnings"]:
        logger.warning(line)
    with atomic_write(os.path.join(cfg.OUTPUT_DIR, TOPOLOGY_RECORD), "w") as f:
        json.dump(record, f, indent=2)


def optimization_step(loss, optimizer, scaler):
    """Backward and step (through the GradScaler for fp16). Nothing here reads the loss on the host:
    a NaN/inf loss is caught by the loop's next vote (see train_one_epoch), which comes before any
    checkpoint."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def unwrap(module):
    """The module inside a DistributedDataParallel wrapper (the module itself when not wrapped)."""
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


def config_command(prog, description, example, example_opts):
    """The parser of a yacs-config training command: --config-file, --resume and KEY VALUE
    overrides."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     epilog=f"Example: {prog} {example}")
    parser.add_argument("--config-file", required=True, metavar="FILE",
                        help="YAML config (may use _BASE_)")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="'auto': continue from OUTPUT_DIR/last_checkpoint if present; or a "
                             "checkpoint path")
    add_extend_flag(parser)
    parser.add_argument("--print-config", action="store_true",
                        help="print the merged config (the yaml, its _BASE_ chain and the KEY "
                             "VALUE overrides, validated) as YAML and exit; writes nothing")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE",
                        help=f"config overrides, e.g. {example_opts} (flags may come before or "
                             "after)")
    return parser


def add_extend_flag(parser, epochs="SOLVER.EPOCHS"):
    parser.add_argument("--extend", action="store_true",
                        help=f"with --resume: continue a finished run to a larger {epochs}. Its "
                             "schedule changes (the learning rate follows the new length from "
                             "then on); its final checkpoint is kept and the change is written to "
                             "the log and OUTPUT_DIR/extended.json. Without it, that is refused")


def run_config_command(parser, argv, make_task, moco):
    """Parse a config_command's `argv` (None: sys.argv), load the config and run its task."""
    import sys

    from pretrain.config import load_config

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config_file, args.opts, moco=moco)
    if args.print_config:
        print(cfg.dump(), end="")
        return 0
    return run(parser.prog, argv, make_task(cfg), args.resume, extend=args.extend)


class LogWindow:
    """The iterations since the last metrics line: per-iteration loss and acc@1 kept on the device
    (reading them each iteration would wait for the GPU every iteration), data time and the images
    per second on the host. Read once, by the loop's vote."""

    def __init__(self, batch_size, capacity, device):
        self.batch_size = batch_size
        # rows (loss, acc1): at most LOG_PERIOD iterations lie between two metrics lines
        self.values = torch.zeros(capacity, 2, dtype=torch.float64, device=device)
        self.reset(0, 0)

    def reset(self, iteration, i):
        """Start a window at the run's iteration `iteration` (done so far), the epoch's i."""
        self.first_iteration, self.first_i = iteration + 1, i
        self.data_time = 0.0
        self.n = 0
        self.start = time.perf_counter()

    def add(self, loss, acc1, data_time):
        """loss, acc1: 0-dim tensors on the device (copied there without a host sync)."""
        self.values[self.n].copy_(torch.stack([loss.detach().double(), acc1.double()]))
        self.data_time += data_time
        self.n += 1

    def img_per_s(self):
        return self.n * self.batch_size / max(time.perf_counter() - self.start, 1e-9)

    def means(self, rows):
        """The window's means from its `rows` [(loss, acc1)] as the vote read them (img_per_s: its
        images over its wall time), in the order of the log line."""
        n = self.n
        return {"loss": sum(r[0] for r in rows) / n, "acc1": sum(r[1] for r in rows) / n,
                "img_per_s": self.img_per_s(), "data_time": self.data_time / n}


def vote(window, signum, device):
    """The loop's one synchronisation point: (the signal to stop for or None, any rank's loss not
    finite in the window, this rank's window rows [(loss, acc1)]), the same first two on every rank.

    One all-reduce (MAX) of [requested signal, this rank saw a non-finite loss] and one read to the
    host (the window's rows come along). Every rank calls it at the same iterations."""
    rows = window.values[:window.n]
    flags = torch.stack([torch.full((), float(signum or 0), dtype=torch.float64, device=device),
                         (~torch.isfinite(rows[:, 0])).any().double()])
    if comm.is_dist():  # a group of 1 too: the path of N processes
        import torch.distributed as dist

        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    values = torch.cat([flags, rows.flatten()]).tolist()
    agreed, bad = int(values[0]) or None, values[1] > 0
    return agreed, bad, [values[2 + 2 * j: 4 + 2 * j] for j in range(window.n)]


def diverged(window, rows, epoch, iters):
    """TrainingDiverged naming the first non-finite loss of the window (this rank's, else the
    window: another rank saw it)."""
    first, last = window.first_iteration, window.first_iteration + window.n - 1
    for j, (loss, _) in enumerate(rows):
        if not math.isfinite(loss):
            where = (f"loss is {loss} at iteration {first + j} (epoch {epoch + 1}, iteration "
                     f"{window.first_i + j + 1}/{iters} of the epoch)")
            break
    else:
        where = (f"loss is not finite on another rank in iterations {first}-{last} (epoch "
                 f"{epoch + 1})")
    return TrainingDiverged(f"{where}; stopped at iteration {last}, before any checkpoint of it")


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------
def train_one_epoch(task, model, loader, optimizer, scaler, epoch, iteration, device, precision,
                    metrics, start_i=0, checkpointer=None):
    """One epoch from its iteration start_i (an exact mid-epoch resume: the sampler skips what was
    done).

    Nothing on the way waits for the device but the vote (`vote`): one all-reduce and one read,
    every LOG_PERIOD iterations, at the end of the epoch and before any checkpoint, plus (one
    process, where it costs no collective) as soon as a stop signal arrives. A NaN/inf loss is
    acted on at the next vote: the weights in memory may have taken up to LOG_PERIOD - 1 steps from
    it, but no checkpoint is written between it and the vote, so every checkpoint holds weights
    whose every step had a finite loss. A stop signal on any rank stops every rank after the same
    iteration, with an exact checkpoint (checkpointer.after_iteration: periodic and stop saves)."""
    cfg = task.cfg
    amp, amp_dtype, channels_last = precision
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    iters = len(loader)
    progress = Progress(logger, iters, epoch, cfg.SOLVER.EPOCHS, cfg.LOG_PERIOD)
    window = LogWindow(cfg.SOLVER.BATCH_SIZE, cfg.LOG_PERIOD, device)
    window.reset(iteration, start_i)
    task.train_mode(model)
    # one process (a group of 1 too) acts on a stop signal at once: no other rank to agree with
    one_process = comm.get_world_size() == 1
    end = time.perf_counter()
    for i, batch in enumerate(loader, start_i):
        data_time = time.perf_counter() - end
        epoch_float = epoch + i / iters
        lr = task.lr_at(epoch_float)
        for group in optimizer.param_groups:
            group["lr"] = lr

        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            loss, logits, labels = task.step(model, batch, device, epoch_float, memory_format)
        optimization_step(loss, optimizer, scaler)
        iteration += 1

        # this process's share, on the device
        acc1 = (logits.detach().argmax(dim=1) == labels).double().mean() * 100.0
        window.add(loss, acc1, data_time)
        progress.update(i, lr=lr)
        log_now = iteration % cfg.LOG_PERIOD == 0 or i + 1 == iters
        stop_now = one_process and checkpointer is not None and checkpointer.stop.requested
        save_now = checkpointer is not None and checkpointer.periodic_save_due(i, iters, iteration)
        if log_now or stop_now or save_now:
            signum, bad, rows = vote(window, checkpointer.stop.requested if checkpointer else None,
                                     device)
            if bad:
                raise diverged(window, rows, epoch, iters)
            if log_now:
                # metrics.json, TensorBoard, W&B and the log line: the same numbers, means over the
                # window where the value is one per iteration
                means = window.means(rows)
                now = {"lr": lr, **task.iteration_scalars(iteration, epoch_float)}
                metrics.write(iteration, epoch=epoch + 1, **means, **now)
                progress.log(i, iteration, {"n": window.n, **means}, now)
                window.reset(iteration, i + 1)
            if checkpointer is not None:
                checkpointer.after_iteration(epoch, i, iters, iteration, signum)
        end = time.perf_counter()
    progress.close()
    return iteration


def train(task, resume=None, extend=False):
    """Run `task` in OUTPUT_DIR: from scratch, or from `resume` ('auto' or a checkpoint path);
    `extend`: a finished run may go on to a larger SOLVER.EPOCHS. Returns the trained model, or
    None when the run was already finished."""
    cfg = task.cfg
    device = comm.setup_device(cfg.DEVICE)
    world, rank = comm.get_world_size(), comm.get_rank()
    if cfg.SOLVER.BATCH_SIZE % world != 0:
        raise UsageError(f"SOLVER.BATCH_SIZE = {cfg.SOLVER.BATCH_SIZE} (global) is not divisible "
                         f"by the {world} processes")
    batch_per_rank = cfg.SOLVER.BATCH_SIZE // world
    # until setup_logging: not into an earlier run's log.txt (in-process reruns)
    logger.handlers.clear()
    point = resume_mod.plan_resume(cfg, resume, world, task, extend)  # validates; writes nothing
    comm.barrier()  # every rank has looked at OUTPUT_DIR before rank 0 writes into it
    if point is not None and point.finished:
        if comm.is_main_process():
            print(resume_mod.finished_message(cfg, point), flush=True)
        return None

    # Data first: a bad DATA.ROOT should fail before a model is built.
    train_set, loader = task.build_data(batch_per_rank, world)
    seed_all(cfg.SEED)  # same seed on every rank: identical initial weights (and queue)
    model = task.build_model(device)
    precision = precision_settings(cfg, device, write=False)
    model.to(device, memory_format=torch.channels_last if precision[2] else torch.contiguous_format)
    optimizer = task.build_optimizer(model, task.lr_at(0.0))
    scaler = (torch.amp.GradScaler(device.type)
              if precision[0] and precision[1] == torch.float16 else None)
    seed_all(cfg.SEED + rank)
    start_epoch, iteration, start_i = resume_mod.restore(point, model, optimizer, scaler,
                                                         task.load_state_dict)
    if point is not None:
        task.load_extra_state(point.checkpoint.get("task_state", {}))

    lock = resume_mod.open_run_dir(cfg, point)
    try:
        setup_logging(logger, cfg.OUTPUT_DIR, task.tag)
        precision_settings(cfg, device)  # the run directory is open: log and write precision.json
        if comm.is_main_process():
            with atomic_write(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
                f.write(cfg.dump())
        for line in task.describe(world, batch_per_rank, device):
            logger.info(line)
        write_topology(cfg, task.topology(world, batch_per_rank))
        if point is not None:
            if start_i >= len(loader):  # stopped after the epoch's last iteration
                where = f"at the end of epoch {start_epoch + 1} (its evaluation and checkpoint)"
            else:
                where = f"at epoch {start_epoch + 1}" + (
                    f", iteration {start_i + 1}/{len(loader)} of it" if start_i else "")
            logger.info(f"resumed from {point.path}: starting {where} (iteration {iteration})")
        resume_mod.schedule_change(cfg, point, logger)
        comm.check_same_resume(point.path if point else None, start_epoch, iteration)
        model = task.wrap(model, device)
        model = run_epochs(task, model, train_set, loader, optimizer, scaler, precision, device,
                           (start_epoch, iteration, start_i), point)
        task.finish(model, device)
    finally:
        if lock is not None:
            lock.close()
    return model


def wandb_settings(cfg):
    """MetricsWriter's W&B settings (None: off): the config's WANDB keys and the merged config as
    the W&B run's config."""
    if not cfg.get("WANDB") or not cfg.WANDB.ENABLED:
        return None
    import yaml

    return {"project": cfg.WANDB.PROJECT, "name": cfg.WANDB.NAME,
            "config": yaml.safe_load(cfg.dump())}


def run_epochs(task, model, train_set, loader, optimizer, scaler, precision, device, start, point):
    """The epochs from `start` = (epoch, iteration of the run, iteration within the epoch)."""
    cfg = task.cfg
    start_epoch, iteration, start_i = start
    batch_per_rank = loader.batch_size
    metrics = MetricsWriter(cfg.OUTPUT_DIR, iteration, wandb=wandb_settings(cfg))
    try:
        with Preemption() as stop:
            checkpointer = resume_mod.Checkpointer(
                cfg, model, optimizer, scaler, task.state_dict, stop, device,
                point.path if point else None, logger, extra_state_fn=task.extra_state)
            for epoch in range(start_epoch, cfg.SOLVER.EPOCHS):
                loader.sampler.set_epoch(epoch)
                loader.sampler.skip(start_i * batch_per_rank)
                iteration = train_one_epoch(task, model, loader, optimizer, scaler, epoch,
                                            iteration, device, precision, metrics, start_i,
                                            checkpointer)
                start_i = 0
                bad = train_set.check_bad_fraction()
                if bad:
                    logger.warning(f"{bad} unreadable image(s) skipped so far, "
                                   f"e.g. {train_set.bad_files()[:3]}")
                scalars = task.evaluate(model, epoch, device, precision)
                if scalars:
                    metrics.write(iteration, epoch=epoch + 1, **scalars)
                if comm.is_dist():
                    task.check_replicas(model)
                path = checkpointer.save_epoch(epoch, iteration)
                # after the checkpoint: a stop signal during a long monitor loses nothing
                scalars = task.monitor(model, epoch, device, precision)
                if scalars:
                    metrics.write(iteration, epoch=epoch + 1, **scalars)
                checkpointer.after_epoch(epoch, path)
    finally:
        metrics.close()
    return model


# --------------------------------------------------------------------------------------------------
# the command around it
# --------------------------------------------------------------------------------------------------
def resume_command(prog, argv):
    """The command line that continues this run (printed when it stops on a signal): with the same
    processes per node when a launcher started them, one included (a mid-epoch checkpoint resumes
    only on the same process count)."""
    args = [a for i, a in enumerate(argv)
            if a != "--resume" and (i == 0 or argv[i - 1] != "--resume")
            and not a.startswith("--resume=")]
    per_node = os.environ.get("LOCAL_WORLD_SIZE")  # torch elastic / submitit export it
    # the launcher's processes again (a process group of 1 too); none when it ran in this process
    launch = ["--nproc-per-node", per_node] if per_node and comm.is_dist() else []
    return " ".join(shlex.quote(x) for x in [*prog.split(), *launch, *args, "--resume", "auto"])


def run(prog, argv, task, resume, extend=False):
    """train(task) as a command: a clean stop, a Ctrl-C and a divergence become CommandFailed with
    the line to print (mocobench.utils.errors.run_main prints it and exits with its code:
    143 / 138 / 130 after a save, 1 diverged); bad input stays a UsageError (exit 2). Returns 0 when
    done."""
    import torch.distributed as dist

    try:
        train(task, resume=resume, extend=extend)
    except Preempted as e:
        line = f"{e}; resume with: {resume_command(prog, argv)}"
        if comm.is_main_process():  # the same line in log.txt as on stderr (the job log)
            log_to_file_only(logger, logging.WARNING, f"{prog}: {line}")
        raise Preempted(e.signum, line) from None
    except KeyboardInterrupt:  # before the loop's handler was installed, or Ctrl-C twice
        raise CommandFailed("interrupted; resume from the last checkpoint with: "
                            f"{resume_command(prog, argv)}",
                            EXIT_CODES[int(signal.SIGINT)], is_error=False) from None
    except TrainingDiverged as e:
        last = os.path.join(task.cfg.OUTPUT_DIR, ckpt.LAST_CHECKPOINT)
        logger.error(f"{e}. The last good checkpoint is the one {last} names (if any); lower "
                     "SOLVER.BASE_LR or check the data.")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
