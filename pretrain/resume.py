"""One run per OUTPUT_DIR, exact resume and the checkpoints of a running loop (pretrain.engine).

Order of a start (nothing is written into OUTPUT_DIR before every input has been validated):
    plan_resume       refuses a directory that holds another run unless resuming; reads the resume
                      checkpoint (weights_only), checks the config did not change what shapes the
                      state (the task's state_keys); says when the run is already finished;
                      refuses to extend a finished run (a larger SOLVER.EPOCHS) unless asked with
                      --extend: that changes its schedule (see EXTENDED_RECORD)
    restore           model, optimizer, scaler, RNG; (start epoch, iteration, epoch iteration)
    open_run_dir      creates OUTPUT_DIR, takes its lock, removes what a killed run left behind
Then a Checkpointer writes the resume points: after every epoch (before its evaluation), every
SOLVER.CHECKPOINT_PERIOD_ITERS iterations, and when a stop signal arrives (mocobench.utils.preempt;
the loop acts on it at its next vote, pretrain.engine.train_one_epoch).
A mid-epoch checkpoint records the data-loader position; the resumed run skips those batches of the
epoch's order, a function of (SEED, epoch), so it repeats the rest exactly.

An extended run (--extend) appends {from_epochs, to_epochs, checkpoint, sha256, time} to
OUTPUT_DIR/extended.json, says in the log that the schedule changed from N to M epochs, and keeps
every checkpoint that file names (the earlier runs' final ones) for good.
"""
import dataclasses
import datetime
import json
import os
import signal

from mocobench.utils import comm
from mocobench.utils.errors import UsageError
from mocobench.utils.fileio import RunLock, atomic_write, file_sha256
from mocobench.utils.preempt import Preempted, signal_name
from pretrain import checkpoint as ckpt
from pretrain.config import _lookup

# Keys whose change makes a checkpoint's state the wrong shape, or its data order another one (SEED)
STATE_SHAPING_KEYS = ("MODEL.ARCH", "SOLVER.OPTIMIZER", "SOLVER.BATCH_SIZE", "SEED")
MOCO_STATE_SHAPING_KEYS = ("MOCO.VERSION", "MOCO.K", "MOCO.DIM", "MOCO.MLP", "MOCO.MLP_DIM")
RUN_FILES = (ckpt.LAST_CHECKPOINT, "metrics.json")  # with checkpoint_*.pth.tar: "a run lives here"
EXTENDED_RECORD = "extended.json"  # the schedule changes of an extended run (--extend)


def run_files(output_dir):
    """The files in output_dir that show a run was started there."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir)
                  if n in RUN_FILES or (n.startswith("checkpoint_") and n.endswith(".pth.tar")))


@dataclasses.dataclass
class ResumePoint:
    path: str
    checkpoint: dict
    finished: bool
    epochs_before: int | None = None  # SOLVER.EPOCHS of the run that wrote it (None: unknown)
    extends: bool = False  # it is the final checkpoint of a finished run, continued to more epochs


def changed_state_keys(cfg, saved_config_text, keys):
    """[(key, value in the checkpoint, value now)] for the `keys` whose values differ."""
    import yaml

    from pretrain.config import get_cfg

    defaults, saved = get_cfg(), yaml.safe_load(saved_config_text) or {}

    def saved_value(dotted):  # a key the checkpoint's version did not have: its default
        node = saved
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return _lookup(defaults, dotted)
            node = node[part]
        return node

    return [(k, saved_value(k), _lookup(cfg, k)) for k in keys if saved_value(k) != _lookup(cfg, k)]


def saved_epochs(saved):
    """SOLVER.EPOCHS in a checkpoint's config (None: it has no config, or no such key)."""
    import yaml

    if not isinstance(saved.get("config"), str):
        return None
    try:
        epochs = (yaml.safe_load(saved["config"]) or {}).get("SOLVER", {}).get("EPOCHS")
    except (yaml.YAMLError, AttributeError):
        return None
    return int(epochs) if isinstance(epochs, int) else None


def plan_resume(cfg, resume, world_size, task, extend=False):
    """The checkpoint to resume from (None: start from scratch); raises UsageError, writes nothing.
    `task` (pretrain.engine.Task) names the run directory and the keys a resume may not change.
    Continuing a finished run to more epochs is refused unless `extend` (--extend)."""
    out, name = cfg.OUTPUT_DIR, task.output_name
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"{name} {out!r} is a file, not a directory")
    path = ckpt.find_resume_path(out, resume) if resume else None
    if path is None:
        existing = run_files(out)
        if existing and not resume:
            verb = "set" if name == "OUTPUT_DIR" else "choose"
            raise UsageError(
                f"{name} {out!r} already holds a {task.run_kind} ({', '.join(existing[:3])}); "
                f"continue it with --resume auto, or {verb} another {name}")
        return None
    saved = ckpt.read_resume_checkpoint(path)
    if isinstance(saved.get("config"), str):
        changed = changed_state_keys(cfg, saved["config"], task.state_keys)
        if changed:
            raise UsageError(
                f"cannot resume from {path}: the config changes what shapes its state: "
                + "; ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changed)
                + ". Keep those values, or start a new run in another OUTPUT_DIR")
    if int(saved.get("epoch_iteration", 0)) and int(saved.get("world_size", 1)) != world_size:
        raise UsageError(
            f"cannot resume the mid-epoch checkpoint {path} with {world_size} process(es): it "
            f"was written by {saved.get('world_size')} (the data order of the epoch is sharded "
            "by the process count); resume with that many processes")
    done, mid_epoch = int(saved["epoch"]), int(saved.get("epoch_iteration", 0))
    finished = done >= cfg.SOLVER.EPOCHS and not mid_epoch
    before = saved_epochs(saved)
    extends = not finished and not mid_epoch and before is not None and done >= before
    if extends and not extend:
        epochs = task.epochs_name
        raise UsageError(
            f"{out}: the run is finished ({done} epochs done, {os.path.basename(path)}); "
            f"{epochs} = {cfg.SOLVER.EPOCHS} would extend it and change its schedule from "
            f"{before} to {cfg.SOLVER.EPOCHS} epochs (not the same as a {cfg.SOLVER.EPOCHS}-epoch "
            f"run); pass --extend to continue it so (its final checkpoint is kept), or start a "
            f"{cfg.SOLVER.EPOCHS}-epoch run in another {name}")
    return ResumePoint(path, saved, finished, before, extends)


def finished_message(cfg, point):
    return (f"{cfg.OUTPUT_DIR}: the run is already finished ({point.checkpoint['epoch']} epochs "
            f"done, SOLVER.EPOCHS = {cfg.SOLVER.EPOCHS}; {os.path.basename(point.path)}). "
            "Nothing to do; to train longer, raise SOLVER.EPOCHS and pass --extend")


def schedule_change(cfg, point, logger):
    """Say in the log when the resume point's schedule length differs from SOLVER.EPOCHS; for an
    extended finished run also append the change to OUTPUT_DIR/extended.json (main process; the run
    directory is open)."""
    if point is None or point.epochs_before in (None, cfg.SOLVER.EPOCHS):
        return
    before, after = point.epochs_before, cfg.SOLVER.EPOCHS
    name = os.path.basename(point.path)
    if not point.extends:
        logger.warning(f"SOLVER.EPOCHS changed from {before} ({name}) to {after}: the schedule "
                       f"changed from {before} to {after} epochs")
        return
    logger.warning(f"extending the finished {before}-epoch run ({name}) to {after} epochs "
                   f"(--extend): the schedule changed from {before} to {after} epochs; {name} is "
                   f"kept, recorded in {EXTENDED_RECORD}")
    if not comm.is_main_process():
        return
    record_path = os.path.join(cfg.OUTPUT_DIR, EXTENDED_RECORD)
    records = extended_records(cfg.OUTPUT_DIR)
    entry = {"from_epochs": before, "to_epochs": after, "checkpoint": name,
             "sha256": file_sha256(point.path),
             "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    if any((r.get("checkpoint"), r.get("to_epochs")) == (name, after) for r in records):
        return  # the same extension, resumed before its first checkpoint
    with atomic_write(record_path, "w") as f:
        json.dump(records + [entry], f, indent=2)


def extended_records(output_dir):
    """The entries of OUTPUT_DIR/extended.json ([] when the run was never extended)."""
    path = os.path.join(output_dir, EXTENDED_RECORD)
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            records = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not readable JSON: {e}") from None
    return records if isinstance(records, list) else []


def restore(point, model, optimizer, scaler, load_state_dict_fn):
    """(start_epoch, iteration, iterations already done in start_epoch); (0, 0, 0) without a resume
    point."""
    if point is None:
        return 0, 0, 0
    return ckpt.load_for_resume(point.path, model, optimizer, scaler, load_state_dict_fn,
                                ckpt=point.checkpoint)


def open_run_dir(cfg, point=None):
    """Main process: create OUTPUT_DIR, lock it for this process's lifetime, remove stale temp files
    and the mid-epoch checkpoints other than the resume point (a kill between writing the next one
    and deleting the previous one leaves two). Returns the lock (close() releases it) or None on
    other ranks."""
    if not comm.is_main_process():
        return None
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    lock = RunLock(cfg.OUTPUT_DIR)
    removed = ckpt.remove_stale_temp_files(cfg.OUTPUT_DIR)
    keep = os.path.abspath(point.path) if point else None
    for name in sorted(os.listdir(cfg.OUTPUT_DIR)):
        path = os.path.abspath(os.path.join(cfg.OUTPUT_DIR, name))
        if ckpt.is_iteration_checkpoint(name) and name.endswith(".pth.tar") and path != keep:
            os.remove(path)
            removed.append(name)
    if removed:
        print(f"removed {len(removed)} file(s) a killed run left in {cfg.OUTPUT_DIR}: "
              f"{removed[:3]}")
    return lock


class Checkpointer:
    """Writes one run's resume points (main process; every rank calls the methods at the same
    points) and keeps only what is worth keeping: every CHECKPOINT_PERIOD-th epoch and the last one;
    any other checkpoint is deleted once a newer one exists."""

    def __init__(self, cfg, model, optimizer, scaler, state_dict_fn, stop, device, previous=None,
                 logger=None, extra_state_fn=dict):
        self.cfg, self.model, self.optimizer, self.scaler = cfg, model, optimizer, scaler
        self.state_dict_fn, self.stop = state_dict_fn, stop
        self.device, self.previous = device, previous
        self.logger, self.extra_state_fn = logger, extra_state_fn
        # the final checkpoints of the runs this one extends: never scratch
        self.kept = {r.get("checkpoint") for r in extended_records(cfg.OUTPUT_DIR)}

    def periodic_save_due(self, i, iters, iteration):
        """A SOLVER.CHECKPOINT_PERIOD_ITERS save comes after iteration i (0-based) of the epoch
        (the loop votes before it)."""
        period = self.cfg.SOLVER.CHECKPOINT_PERIOD_ITERS
        return bool(period and iteration % period == 0 and i + 1 < iters)

    def after_iteration(self, epoch, i, iters, iteration, signum):
        """Called after the loop's vote on iteration i (0-based) of the epoch; iteration =
        iterations done in the run; signum: the stop every rank agreed on (None: none)."""
        if signum or self.periodic_save_due(i, iters, iteration):
            path = self._save(epoch, iteration, epoch_iteration=i + 1)
            if signum:
                raise Preempted(signum, f"stopped by {signal_name(signum)} after iteration "
                                        f"{i + 1}/{iters} of epoch {epoch + 1} (iteration "
                                        f"{iteration} of the run): saved {path}")

    def save_epoch(self, epoch, iteration):
        """The epoch's checkpoint, written before its evaluation: a stop during a long monitor
        loses nothing of the epoch."""
        return self._save(epoch, iteration)

    def after_epoch(self, epoch, path):
        """After the epoch's evaluation: stop (every rank) when a signal arrived, naming the epoch's
        checkpoint `path`."""
        if self.cfg.DEBUG.SIGKILL_AFTER_EPOCH == epoch + 1:  # tests of exact resume
            os.kill(os.getpid(), signal.SIGKILL)
        signum = self.stop.agreed(self.device)
        if signum and epoch + 1 < self.cfg.SOLVER.EPOCHS:
            raise Preempted(signum, f"stopped by {signal_name(signum)} after epoch {epoch + 1}: "
                                    f"saved {path}")

    def _save(self, epoch, iteration, epoch_iteration=None):
        path = None
        if comm.is_main_process():
            path = ckpt.save_checkpoint(self.cfg.OUTPUT_DIR, epoch, self.model, self.optimizer,
                                        self.scaler, iteration, self.cfg, self.state_dict_fn,
                                        epoch_iteration, comm.get_world_size(),
                                        self.extra_state_fn())
            if self.logger is not None:
                self.logger.info(f"saved {path}")
            if self.previous and self.previous != path and self._is_scratch(self.previous):
                os.remove(self.previous)
            self.previous = path
        comm.barrier()
        return path

    def _is_scratch(self, path):
        """A checkpoint kept only as a resume point: a mid-epoch one, or not every
        CHECKPOINT_PERIOD-th epoch and not the last one. Files outside OUTPUT_DIR (--resume PATH)
        are never deleted."""
        name = os.path.basename(path)
        if os.path.dirname(os.path.abspath(path)) != os.path.abspath(self.cfg.OUTPUT_DIR):
            return False
        if ckpt.is_iteration_checkpoint(name):
            return True
        if name in self.kept:
            return False
        if not (name.startswith("checkpoint_") and name.endswith(".pth.tar")):
            return False
        try:
            epochs_done = int(name[len("checkpoint_"):-len(".pth.tar")]) + 1
        except ValueError:
            return False
        return (epochs_done % self.cfg.CHECKPOINT_PERIOD != 0
                and epochs_done != self.cfg.SOLVER.EPOCHS)
