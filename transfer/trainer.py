"""The transfer trainer: detectron2's DefaultTrainer with the evaluator registry, safe checkpoints
and progress."""
import logging
import os
import sys
import weakref
from collections import defaultdict

import torch

from mocobench.utils import d2compat  # noqa: F401  (before any detectron2 import)

# isort: split
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.data import transforms as T
from detectron2.engine import DefaultTrainer, HookBase, hooks
from detectron2.utils import comm
from detectron2.utils.events import EventWriter, get_event_storage

# registers Res5ROIHeadsExtraNorm and DilatedFCNHead in detectron2's registries
import transfer.heads  # noqa: F401
from mocobench.utils.preempt import ignore_in_worker, signal_name
from transfer.checkpoint import SafeDetectionCheckpointer
from transfer.evaluation import build_evaluator


class TrainingStopped(BaseException):
    """Raised by StopOnSignal after its checkpoint. A BaseException so that detectron2's
    TrainerBase.train, which logs every Exception with a traceback as a crash, lets a clean stop
    through (its after_train hooks still run)."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


class StopOnSignal(HookBase):
    """SIGTERM / SIGUSR1 / SIGINT (mocobench.utils.preempt `stop`): finish the iteration, save
    model_{iter}.pth with the optimizer and lr scheduler (what `--resume` continues from: at most
    the running iteration is lost, not everything since the last periodic checkpoint), then stop.
    Every rank asks after every step: the answer is a collective, so all ranks stop after the same
    iteration."""

    def __init__(self, stop, device):
        self._stop, self._device = stop, device
        self._stopped = None

    def after_step(self):
        signum = self._stop.agreed(self._device)
        if signum is None:
            return
        name = f"model_{self.trainer.iter:07d}"
        # as PeriodicCheckpointer saves: rank 0 writes (atomically) and points last_checkpoint at it
        self.trainer.checkpointer.save(name, iteration=self.trainer.iter)
        # no rank exits (and gets the others terminated by the launcher) before it is written
        comm.synchronize()
        path = os.path.join(self.trainer.cfg.OUTPUT_DIR, name + ".pth")
        self._stopped = TrainingStopped(signum, f"stopped by {signal_name(signum)} after iteration "
                                                f"{self.trainer.iter + 1}/{self.trainer.max_iter}, "
                                                f"saved {path}")

    def before_step(self):
        # raised here, not in after_step: the writers' final flush (after_train) then sees a new
        # iteration number; at the iteration it has just written, detectron2 v0.6's ETA divides by
        # zero
        if self._stopped is not None:
            raise self._stopped


class ProgressBar(HookBase):
    """A tqdm bar on an interactive terminal (rank 0): iterations, rate, ETA, loss and lr on one
    line.

    Log lines (detectron2's CommonMetricPrinter, which prints its own eta) are routed above the bar
    by `tqdm.contrib.logging.logging_redirect_tqdm` in `Trainer.train`; in a log file there is no
    bar.
    """

    def __init__(self, description=""):
        self._description = description
        self._bar = None

    def before_train(self):
        from tqdm import tqdm

        self._bar = tqdm(total=self.trainer.max_iter, initial=self.trainer.start_iter,
                         desc=self._description, unit="it", dynamic_ncols=True, leave=True)

    def after_step(self):
        self._bar.update(1)
        storage = self.trainer.storage
        history = storage.histories()
        postfix = {}
        if "total_loss" in history:
            postfix["loss"] = f"{history['total_loss'].median(20):.3f}"
        if "lr" in history:
            postfix["lr"] = f"{history['lr'].latest():.2g}"
        self._bar.set_postfix(postfix, refresh=False)

    def after_train(self):
        if self._bar is not None:
            self._bar.close()


class WandbWriter(EventWriter):
    """Sends what detectron2's JSONWriter writes to metrics.json to a W&B run
    (mocobench.utils.events.WandbRun): the storage's latest scalars with the same median smoothing
    (window 20) and keys, each iteration once, at step = iteration; the final evaluation's AP
    too."""

    def __init__(self, run, window_size=20):
        self._run, self._window_size, self._last_write = run, window_size, -1

    def write(self):
        to_save = defaultdict(dict)
        latest = get_event_storage().latest_with_smoothing_hint(self._window_size)
        for key, (value, iteration) in latest.items():
            if iteration > self._last_write:
                to_save[iteration][key] = value
        for iteration in sorted(to_save):
            self._run.log(iteration, to_save[iteration])
            self._last_write = iteration


class WorkerInit:
    """A DataLoader worker_init_fn: the loader's own (detectron2's worker_init_reset_seed for the
    training loader, a seed per worker), then mocobench.utils.preempt.ignore_in_worker. SLURM,
    Kubernetes and a terminal's Ctrl-C signal the whole process group: a worker with default
    handlers dies first, and the main process fails ("DataLoader worker exited unexpectedly", exit
    1, nothing saved) instead of finishing the iteration and saving (StopOnSignal)."""

    def __init__(self, previous=None):
        self.previous = previous

    def __call__(self, worker_id):
        if self.previous is not None:
            self.previous(worker_id)
        ignore_in_worker()


def leave_stops_to_the_main_process(loader):
    """Give the torch DataLoader inside a detectron2 loader a WorkerInit; returns the loader.
    detectron2 v0.6's build_detection_*_loader take no worker_init_fn; the DataLoader reads it when
    its workers start. With ASPECT_RATIO_GROUPING the training DataLoader is wrapped in an
    AspectRatioGroupedDataset (`.dataset`), possibly in a MapDataset (`._dataset`)."""
    inner = loader
    while not isinstance(inner, torch.utils.data.DataLoader):
        # (no `or`: the truth value of a DataLoader over an infinite sampler is an error)
        inner = getattr(inner, "dataset", getattr(inner, "_dataset", None))
        if inner is None:
            raise TypeError(f"no torch DataLoader inside {type(loader).__name__}: its workers "
                            "would die on a stop signal to the process group")
    if not isinstance(inner.worker_init_fn, WorkerInit):
        inner.worker_init_fn = WorkerInit(inner.worker_init_fn)
    return loader


def semantic_train_augmentations(cfg) -> list:
    """Scale, then crop, then flip: the MoCo paper's segmentation training (Appendix A.5: "random
    scaling ..., cropping, and horizontal flipping") in the order of detectron2's DeepLab project
    (projects/DeepLab/train_net.py, build_sem_seg_train_aug). detectron2's DatasetMapper puts
    INPUT.CROP *before* the resize (right for its detection crops), which would crop 513 px of the
    original image and then rescale the crop."""
    augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                 cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
    if cfg.INPUT.CROP.ENABLED:
        # a plain random crop (DeepLab's category-area constraint at its default 1.0 is the same;
        # the paper says "cropping"); absolute crops larger than the scaled image keep the image
        # whole
        augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    augs.append(T.RandomFlip())
    return augs


class Trainer(DefaultTrainer):
    progress_description = ""
    wandb_run = None  # a WandbRun (rank 0, MOCOBENCH.WANDB.ENABLED): set by transfer.run

    def build_writers(self):
        writers = super().build_writers()
        if self.wandb_run is not None:
            writers.append(WandbWriter(self.wandb_run))
        return writers

    # the loaders' workers leave SIGTERM / SIGUSR1 / SIGINT (and submitit's USR2) to this process,
    # which stops cleanly; evaluation too: the final one runs inside the stop handling
    @classmethod
    def build_train_loader(cls, cfg):
        if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":
            mapper = DatasetMapper(cfg, is_train=True,
                                   augmentations=semantic_train_augmentations(cfg))
            return leave_stops_to_the_main_process(build_detection_train_loader(cfg, mapper=mapper))
        return leave_stops_to_the_main_process(build_detection_train_loader(cfg))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return leave_stops_to_the_main_process(build_detection_test_loader(cfg, dataset_name))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    def build_hooks(self):
        # Loading and saving go through SafeDetectionCheckpointer (restricted unpickling, atomic
        # writes); it is swapped in here because DefaultTrainer.__init__ creates its checkpointer
        # right before build_hooks, which hands it to PeriodicCheckpointer.
        self.checkpointer = SafeDetectionCheckpointer(self._trainer.model, self.cfg.OUTPUT_DIR,
                                                      trainer=weakref.proxy(self))
        ret = super().build_hooks()
        for hook in ret:
            if isinstance(hook, hooks.PeriodicWriter):
                hook._period = self.cfg.MOCOBENCH.LOG_PERIOD  # DefaultTrainer hard-codes 20
        if comm.is_main_process() and sys.stderr.isatty():
            ret.append(ProgressBar(self.progress_description))
        return ret

    # detectron2 v0.6's DefaultTrainer checkpoints the iteration and the hooks (the lr scheduler)
    # but not the optimizer, which lives in its inner SimpleTrainer: a resumed run lost the
    # momentum buffers and ran its first iteration at the lr the optimizer was built with. Later
    # detectron2 releases save it under "_trainer", as here.
    def state_dict(self):
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()  # {"iteration", "optimizer"}
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logging.getLogger(__name__).warning(
                "the checkpoint has no optimizer state (written by a plain detectron2 v0.6 "
                "DefaultTrainer?): momentum starts from zero and the first resumed iteration uses "
                "the optimizer's initial lr"
            )

    def train(self):
        if comm.is_main_process() and sys.stderr.isatty():
            from tqdm.contrib.logging import logging_redirect_tqdm

            with logging_redirect_tqdm([logging.getLogger("detectron2"),
                                        logging.getLogger("fvcore"),
                                        logging.getLogger("transfer")]):
                return super().train()
        return super().train()
