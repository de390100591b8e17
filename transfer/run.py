"""`mocobench transfer`: fine-tune a detectron2 model from converted weights and evaluate, S seeds
at a time.

    mocobench transfer --config-file configs/detection/pascal_voc_R_50_C4_24k_moco.yaml \
        --num-gpus 8 --seeds 5 MODEL.WEIGHTS out/moco_v2.pkl OUTPUT_DIR out/voc_moco

Everything runs on detectron2's own engine (DefaultTrainer, launch, DetectionCheckpointer, its
evaluators); what is ours: the Res5ROIHeadsExtraNorm head (transfer.heads), the evaluator registry
(transfer.evaluation), the generated datasets and dataset checks (transfer.datasets), the CPU/gloo
launcher (transfer.launch), and the seeds: trial i trains into OUTPUT_DIR/seed{i}/, named by its
index i = 0, 1, ... and not by the seed it draws (detectron2's metrics.json, log.txt, config.yaml,
checkpoints) and writes its run record, results.json
(transfer.record: init, weights and their sha256, config identity, schedule, versions, results per
test dataset); OUTPUT_DIR/summary.json has mean and std over every trial record present, and
each trial's directory and seed. Detection
on VOC varies by 0.2-0.4 AP from run to run (MoCo's detection README reports means of 5 trials), so
one trial is not a result.

Re-runs never destroy results: an OUTPUT_DIR whose trials have started or finished is refused
without --resume; --resume keeps finished trials as they are (same config and weights, or it is
refused) and continues or starts the others; --eval-only writes results_eval.json and leaves
training records alone.

Seeds: trial i uses SEED + i when the config's SEED >= 0, else a random seed; --resume and
--eval-only reuse the seed recorded in the trial's config.yaml.

Init name: --init-name, else inferred (choose_init_name): with --resume the name the finished
trials recorded, else from the record chain of MODEL.WEIGHTS (transfer.record.infer_init_name);
the log says which, and when none was found (the report then names the run after its weights
file).

Weights: every backbone tensor (for C4 also res5 in the ROI head) must load from MODEL.WEIGHTS with
its shape, checked before any process starts (transfer.checkpoint.inspect_weights); a mismatch is
an error, never a silently random-initialised backbone.

Weights: MODEL.WEIGHTS is a local file (a .pkl from `mocobench convert`, or any detectron2
checkpoint), or a URL/`detectron2://` path that detectron2 fetches into its cache. mocobench never
downloads anything itself; when such a fetch fails (as on a machine without internet) the error
says where to put the file instead.
"""
import argparse
import glob
import json
import logging
import os
import secrets
import shlex
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.multiprocessing as mp

from mocobench.utils import d2compat  # noqa: F401  (before any detectron2 import)

# isort: split
from detectron2.data import MetadataCatalog
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from mocobench.utils.config import set_keys
from mocobench.utils.env import set_tf32
from mocobench.utils.errors import UsageError, run_main
from mocobench.utils.fileio import atomic_write
from mocobench.utils.preempt import EXIT_CODES, Preempted, Preemption, signal_name
from transfer import record as run_record
from transfer.checkpoint import SafeDetectionCheckpointer, inspect_weights
from transfer.config import configure_resnet, load_config, swap_sync_bn
from transfer.datasets import (
    check_datasets,
    check_num_classes,
    register_synth_datasets,
    resolve_synth_root,
    uses_synth,
)
from transfer.launch import check_launch, default_num_gpus, launch, launch_cpu
from transfer.stats import describe
from transfer.trainer import StopOnSignal, Trainer, TrainingStopped

logger = logging.getLogger(__name__)

RESULTS_FILE = run_record.RESULTS_FILE
EVAL_FILE = run_record.EVAL_FILE
SUMMARY_FILE = "summary.json"
# what detectron2 leaves in a trial directory once training has started
TRAINING_FILES = (run_record.STARTED_FILE, "metrics.json", "last_checkpoint", "model_*.pth",
                  "events.out.tfevents.*")
LOGGERS = ("detectron2", "fvcore", "transfer")

@dataclass
class TransferJob:
    """Everything a (possibly spawned) worker needs; plain data so that it pickles."""

    config_file: str
    opts: list
    world_size: int
    seeds: list
    trial_dirs: list
    resume: bool = False
    eval_only: bool = False
    init_name: str = None
    init_name_from: str = None  # how the init name was chosen (choose_init_name)
    weights_info: dict = None
    skip: list = field(default_factory=list)  # trial indices already finished (--resume)

def trial_dir(output_dir: str, index: int) -> str:
    """OUTPUT_DIR/seed{index}: the index-th trial (0, 1, ...), whatever seed it draws; the seed is
    in its config.yaml, its results.json and summary.json (directory names stay fixed: --resume
    finds a trial by them)."""
    return os.path.join(output_dir, f"seed{index}")

# --------------------------------------------------------------------------------------------------
# configuration: everything that can be wrong with the input is found here, before any process is
# started

def prepare_config(config_file: str, opts, world_size: int = 1):
    """The merged config, with the generated datasets registered; returns (cfg, notes to log)."""
    cfg = load_config(config_file, opts)
    # MODEL.RESNETS from the architecture a converted .pkl records, or refuse (a value set in the
    # config or on the command line that the weights contradict)
    notes = configure_resnet(cfg, explicit=set_keys(config_file, opts))
    if cfg.MODEL.DEVICE == "cpu" and world_size > 1:
        swapped = swap_sync_bn(cfg)
        if swapped:
            notes.append(f"{world_size} CPU processes (gloo): SyncBN -> naiveSyncBN in "
                         f"{', '.join(swapped)} (torch's SyncBatchNorm synchronizes CUDA tensors "
                         "only)")
    if uses_synth(cfg):
        root = resolve_synth_root(cfg.MOCOBENCH.SYNTH_ROOT)
        register_synth_datasets(root)
        notes.append(f"generated datasets (synth_*) from {os.path.abspath(root)}")
    check_datasets(cfg)
    notes += check_num_classes(cfg)
    return cfg, notes

def check_device(cfg, num_gpus: int):
    if num_gpus < 1:
        raise UsageError(f"--num-gpus {num_gpus}: expected >= 1 (processes per machine)")
    if cfg.MODEL.DEVICE.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but no CUDA device is "
                             "available here; pass MODEL.DEVICE cpu (with --num-gpus N for N CPU "
                             "processes)")
        if num_gpus > torch.cuda.device_count():
            raise UsageError(f"--num-gpus {num_gpus} but only {torch.cuda.device_count()} CUDA "
                             "device(s) are visible")
    elif cfg.MODEL.DEVICE != "cpu":
        raise UsageError(f"MODEL.DEVICE {cfg.MODEL.DEVICE!r}: expected 'cuda' or 'cpu'")

def check_weights(cfg, resume: bool, eval_only: bool):
    """MODEL.WEIGHTS must be loadable before N processes start (detectron2 would fail inside
    each)."""
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        if cfg.MOCOBENCH.REQUIRE_WEIGHTS and not resume:
            raise UsageError("MODEL.WEIGHTS is empty: pass MODEL.WEIGHTS /path/to/backbone.pkl "
                             "(from `mocobench convert`), or MOCOBENCH.REQUIRE_WEIGHTS False to "
                             "train from random init")
        if eval_only and not resume:
            raise UsageError("--eval-only needs MODEL.WEIGHTS (a trained model) or --resume (the "
                             "trial's last checkpoint)")
        return
    if "://" in weights:
        try:
            # detectron2's own fetch-and-cache (its model zoo URLs)
            PathManager.get_local_path(weights)
        except Exception as e:
            raise UsageError(
                f"MODEL.WEIGHTS {weights!r} could not be fetched ({type(e).__name__}: {e}). "
                "mocobench downloads nothing itself; get the file onto this machine and pass "
                "MODEL.WEIGHTS /local/path.pkl"
            ) from None
    elif not os.path.isfile(weights):
        raise UsageError(f"MODEL.WEIGHTS {weights!r} does not exist (expected a .pkl from "
                         "`mocobench convert` or a detectron2 checkpoint .pth)")

def choose_seeds(cfg, trial_dirs, reuse_recorded: bool) -> list:
    seeds = []
    for i, directory in enumerate(trial_dirs):
        recorded = _recorded_seed(directory) if reuse_recorded else None
        if recorded is not None:
            seeds.append(recorded)
        elif cfg.SEED >= 0:
            seeds.append(cfg.SEED + i)
        else:
            seeds.append(secrets.randbelow(2**31 - 1))
    return seeds

def write_trial_config(cfg):
    """The trial's OUTPUT_DIR/config.yaml (detectron2's name): the merged config it runs with, its
    SEED too (read back by --resume and --eval-only: _recorded_seed)."""
    with atomic_write(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
        f.write(cfg.dump())


def _recorded_seed(directory):
    import yaml

    path = os.path.join(directory, "config.yaml")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        seed = (yaml.safe_load(f) or {}).get("SEED")
    return seed if isinstance(seed, int) and seed >= 0 else None

# --------------------------------------------------------------------------------------------------
# the worker: runs in each training process (the caller's, or spawned ones)

def _setup_console_logging():
    rank = comm.get_rank()
    for name in LOGGERS:
        logger_ = setup_logger(distributed_rank=rank, name=name,
                               abbrev_name={"detectron2": "d2", "transfer": "mb"}.get(name))
        # detectron2's setup_logger is cached: its console handler keeps the sys.stdout of the
        # first call. A later run in the same process (a notebook, a test) may have another one,
        # and writing to the old, closed stream would print a logging traceback
        for handler in logger_.handlers:
            if type(handler) is logging.StreamHandler and handler.stream is not sys.stdout:
                handler.stream = sys.stdout  # not setStream: it flushes the old, closed stream

class _TrialLogFile:
    """log.txt of one trial (log.txt.rank{r} for other ranks), attached to our loggers for its
    duration."""

    def __init__(self, directory):
        rank = comm.get_rank()
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "log.txt" if rank == 0 else f"log.txt.rank{rank}")
        self.handler = logging.FileHandler(self.path)
        self.handler.setFormatter(logging.Formatter(
            "[%(asctime)s] %(name)s %(levelname)s: %(message)s", datefmt="%m/%d %H:%M:%S"))
        self.handler.setLevel(logging.DEBUG)

    def __enter__(self):
        for name in LOGGERS:
            logging.getLogger(name).addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(self.handler)
        self.handler.close()

def _evaluator_types(cfg) -> dict:
    return {name: MetadataCatalog.get(name).get("evaluator_type", None)
            for name in cfg.DATASETS.TEST}


def _run_trial(cfg, job: TransferJob, index: int):
    rank = comm.get_rank()
    # --eval-only leaves the training trial's files alone
    if comm.is_main_process() and not job.eval_only:
        write_trial_config(cfg)
    # as detectron2's default_setup: a different, deterministic stream per rank
    seed_all_rng(cfg.SEED + rank)
    # explicit; the value is in config.yaml and the record's config hash (None: torch's defaults)
    tf32 = set_tf32(cfg.MOCOBENCH.TF32)
    logger.info(f"trial {index + 1}/{len(job.seeds)}: seed {cfg.SEED}, output {cfg.OUTPUT_DIR}, "
                f"{job.world_size} process(es) on {cfg.MODEL.DEVICE}, TF32 {cfg.MOCOBENCH.TF32} "
                f"(matmul {tf32['tf32_matmul']}, cuDNN {tf32['tf32_cudnn']})")
    start = time.perf_counter()
    if job.eval_only:
        # every process builds the same model: what MODEL.WEIGHTS leaves out (the heads, for a
        # converted backbone) is initialised from the trial's seed, not SEED + rank, or each rank
        # would score its shard with a different model (training gets this from DDP, which
        # broadcasts rank 0's parameters)
        seed_all_rng(cfg.SEED)
        model = Trainer.build_model(cfg)
        seed_all_rng(cfg.SEED + rank)
        SafeDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS,
                                                                                 resume=job.resume)
        results = Trainer.test(cfg, model)
        iteration = None
    else:
        Trainer.progress_description = f"seed{index}"
        Trainer.wandb_run = _open_wandb(cfg, index)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=job.resume)
        with Preemption() as stop:
            trainer.register_hooks([StopOnSignal(stop, torch.device(cfg.MODEL.DEVICE))])
            try:
                trainer.train()
            except TrainingStopped as e:
                _close_wandb()
                raise Preempted(e.signum, f"trial {index + 1}/{len(job.seeds)} {e}") from None
            except BaseException:
                _close_wandb()
                raise
        # the final evaluation (EvalHook at the end of training); DefaultTrainer.train returns it
        # only when TEST.EXPECTED_RESULTS is set, but always keeps it here
        results = getattr(trainer, "_last_eval_results", None)
        iteration = trainer.iter
    if comm.is_main_process():
        record = run_record.build_record(
            cfg, config_file=job.config_file, opts=job.opts, init_name=job.init_name,
            init_name_from=job.init_name_from, weights_info=job.weights_info, trial=index,
            world_size=comm.get_world_size(),
            eval_only=job.eval_only, resumed=job.resume, iteration=iteration,
            seconds=time.perf_counter() - start, results=results,
            evaluator_types=_evaluator_types(cfg),
        )
        run_record.write_record(os.path.join(cfg.OUTPUT_DIR,
                                             EVAL_FILE if job.eval_only else RESULTS_FILE), record)
        if Trainer.wandb_run is not None:
            Trainer.wandb_run.update_config({"run_record": record})
        _close_wandb()
    comm.synchronize()


def _open_wandb(cfg, index):
    """The trial's W&B run (rank 0, MOCOBENCH.WANDB.ENABLED; else None): named OUTPUT/seedN, the
    merged config as its config (the run record joins it when the trial is done)."""
    if not cfg.MOCOBENCH.WANDB.ENABLED or not comm.is_main_process():
        return None
    import yaml

    from mocobench.utils.events import WandbRun

    parent = os.path.basename(os.path.dirname(os.path.abspath(cfg.OUTPUT_DIR)))
    return WandbRun(cfg.OUTPUT_DIR, cfg.MOCOBENCH.WANDB.PROJECT, f"{parent}/seed{index}",
                    {"config": yaml.safe_load(cfg.dump())})


def _close_wandb():
    if Trainer.wandb_run is not None:
        Trainer.wandb_run.finish()
        Trainer.wandb_run = None


def _run_trials(job: TransferJob):
    _setup_console_logging()
    # registers datasets here
    base_cfg, notes = prepare_config(job.config_file, job.opts, job.world_size)
    for index, (seed, directory) in enumerate(zip(job.seeds, job.trial_dirs)):
        if index in job.skip:
            if os.path.isfile(os.path.join(directory, RESULTS_FILE)):
                logger.info(f"trial {index + 1}/{len(job.seeds)}: finished earlier "
                            f"({directory}/{RESULTS_FILE}), kept")
            continue  # else another process's (trials=)
        cfg = base_cfg.clone()
        cfg.OUTPUT_DIR = directory
        cfg.SEED = seed
        cfg.freeze()
        if comm.is_main_process():
            os.makedirs(directory, exist_ok=True)
            started = os.path.join(directory, run_record.STARTED_FILE)
            if not job.eval_only and not os.path.isfile(started):  # kept as first written
                run_record.write_started(directory, cfg, job.init_name, job.weights_info)
        comm.synchronize()
        with _TrialLogFile(directory):
            logger.info(f"trial {index + 1}/{len(job.seeds)} in {directory}: seed {seed}, init "
                        f"name {job.init_name!r} ({job.init_name_from})")
            # in every trial's log.txt: what mocobench changed in the config, and why
            for note in notes:
                logger.info(note)
            try:
                _run_trial(cfg, job, index)
            except Preempted as e:
                if job.world_size == 1:
                    raise
                # a spawned worker: the launching process learns of the clean stop from this exit
                # code
                logger.warning(str(e))
                sys.exit(e.exit_code)

# --------------------------------------------------------------------------------------------------
# re-runs: what an OUTPUT_DIR already holds

def _training_files(directory) -> list:
    found = [os.path.join(directory, RESULTS_FILE)] \
        if os.path.isfile(os.path.join(directory, RESULTS_FILE)) else []
    for pattern in TRAINING_FILES:
        found += sorted(glob.glob(os.path.join(directory, pattern)))
    return [os.path.basename(p) for p in found]


def check_output_dir(cfg, trial_dirs, resume: bool, eval_only: bool, init_name,
                     weights_info) -> list:
    """Trial indices to skip; UsageError when this call would overwrite, mix with or append to
    earlier trials."""
    if eval_only:
        return []  # writes results_eval.json only
    skip = []
    identity = run_record.experiment_identity(cfg)
    for index, directory in enumerate(trial_dirs):
        present = _training_files(directory)
        if not present:
            continue
        if not resume:
            finished = [d for d in trial_dirs if os.path.isfile(os.path.join(d, RESULTS_FILE))]
            what = (
                "finished trials ("
                f"{', '.join(os.path.join(os.path.basename(d), RESULTS_FILE) for d in finished)})"
                if finished else
                f"a started trial ({os.path.basename(directory)}: {', '.join(present[:3])})"
            )
            raise UsageError(
                f"OUTPUT_DIR {cfg.OUTPUT_DIR!r} already holds {what}; a new run would overwrite "
                "them or append to their logs. Pass --resume to keep finished trials and continue "
                "the others, --eval-only to re-evaluate (writes results_eval.json), or choose "
                "another OUTPUT_DIR")
        path = os.path.join(directory, RESULTS_FILE)
        started = os.path.join(directory, run_record.STARTED_FILE)
        finished = os.path.isfile(path)
        if finished:
            earlier = run_record.read_record(path)
            earlier_sha = (earlier.get("weights_info") or {}).get("sha256")
            consequence = "its trials and this call's would be averaged together"
        elif os.path.isfile(started):  # started, not finished: detectron2 resumes its checkpoint
            path, earlier = started, run_record.read_started(started)
            earlier_sha = earlier["weights_sha256"]
            consequence = "continuing it would make one trial of two experiments"
        else:
            continue  # started by a mocobench that recorded nothing to check against
        changed = run_record.identity_diff(earlier["identity"], identity)
        if earlier["init_name"] != init_name:
            changed.append(f"--init-name ({earlier['init_name']!r} -> {init_name!r})")
        if earlier_sha != (weights_info or {}).get("sha256"):
            changed.append("MODEL.WEIGHTS (another file)")
        if changed:
            raise UsageError(
                f"--resume: {path} was made by another experiment (differs in "
                f"{', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}); {consequence}. "
                "Use another OUTPUT_DIR")
        if finished:
            skip.append(index)
    return skip

# --------------------------------------------------------------------------------------------------
# the API and the command

def summarize(records: list) -> dict:
    """{dataset: {"bbox/AP": describe(finite values), ...}} over trial records (std None for one
    trial)."""
    values = {}
    for rec in records:
        for dataset, tasks in rec["results"].items():
            for task, metrics in tasks.items():
                for name, value in metrics.items():
                    key = f"{task}/{name}"
                    values.setdefault(dataset, {}).setdefault(key, [])
                    if value is not None:  # NaN (null) does not enter the mean; n says how many did
                        values[dataset][key].append(float(value))
    return {dataset: {k: describe(v) for k, v in metrics.items()}
            for dataset, metrics in values.items()}


def write_summary(output_dir) -> dict:
    """OUTPUT_DIR/summary.json from every trial record present (not only this call's seeds).

    `trials`: per trial its directory (seed{N}/ is the N-th trial), its record and the seed it ran
    with; `init_names`: the row names the report gives these trials (`init_names_guessed`: those
    only guessed from the weights file's name, no init name having been given or inferred)."""
    found = run_record.trial_records(output_dir)
    records = [r for _, r in found if isinstance(r, dict)]
    names = [run_record.row_name(r["init_name"], r["weights"]) for r in records]
    summary = {
        "output_dir": os.path.abspath(output_dir),
        "trials": [{"dir": os.path.basename(d), "trial": r["trial"], "seed": r["seed"],
                    "init_name": r["init_name"],
                    "record": f"{os.path.basename(d)}/{RESULTS_FILE}"}
                   for d, r in found if isinstance(r, dict)],
        "init_names": sorted({name for name, _ in names}),
        "init_names_guessed": sorted({name for name, guessed in names if guessed}),
        "config_files": sorted({r["config_file"] for r in records}),
        "seeds": [r["seed"] for r in records],
        "unreadable": [str(r) for _, r in found if not isinstance(r, dict)],
        "metrics": summarize(records),
    }
    with atomic_write(os.path.join(output_dir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    return summary


def choose_init_name(given, cfg, weights_info, trial_dirs, resume) -> tuple:
    """(init name, how it was chosen): --init-name when given; with --resume, the name the finished
    trials recorded (all trials of an OUTPUT_DIR are one row of the report); else inferred from the
    record chain behind MODEL.WEIGHTS (transfer.record.infer_init_name), or None (the report names
    the run after its weights file)."""
    if given is not None:
        return given, "--init-name"
    if resume:
        earlier = set()
        for directory in trial_dirs:
            path = os.path.join(directory, RESULTS_FILE)
            if os.path.isfile(path):
                try:
                    earlier.add(run_record.read_record(path)["init_name"])
                except run_record.RecordError:
                    pass  # check_output_dir says what is wrong with it
        if len(earlier) == 1:
            return earlier.pop(), "kept from the finished trials' records (--resume)"
    name, how = run_record.infer_init_name(cfg.MODEL.WEIGHTS, weights_info)
    return name, ("inferred: " if name is not None else "not inferred: ") + how


def _log_init_name(name, how, weights):
    if name is None:
        label, _ = run_record.row_name(None, weights)
        logger.warning(f"init name: none given, {how}; the report names this run after its "
                       f"weights file ({label!r}, marked ‡): pass --init-name NAME to name it")
    elif how != "--init-name":
        logger.info(f"init name {name!r}, {how}; --init-name NAME chooses another")


def run_transfer(config_file, opts, num_gpus=1, seeds=1, resume=False, eval_only=False,
                 init_name=None, *, num_machines=1, machine_rank=0, dist_url="auto",
                 synth_root=None, trials=None) -> list:
    """Fine-tune and evaluate `seeds` trials; returns their run records (rank 0's machine).

    `opts`: detectron2 KEY VALUE overrides. `num_gpus`: processes per machine (CUDA devices, or CPU
    processes over gloo when MODEL.DEVICE is cpu; 0: every visible GPU, 1 process on CPU).
    `synth_root`: directory of a generated dataset for the synth_* dataset names. With `eval_only`
    the records are the trials' results_eval.json. `trials`: the indices of the trials this call
    runs (default: all); the others are left as they are, so that trials of one OUTPUT_DIR can run
    in separate processes or jobs (`mocobench pipeline --jobs`, `--launcher slurm`), each with the
    seed it would have had in one call.
    """
    opts = list(opts or [])
    if synth_root:
        opts += ["MOCOBENCH.SYNTH_ROOT", os.fspath(synth_root)]
    if seeds < 1:
        raise UsageError(f"--seeds {seeds}: expected >= 1")
    if num_machines < 1 or not 0 <= machine_rank < num_machines:
        raise UsageError(f"--machine-rank {machine_rank} with --num-machines {num_machines}: "
                         "expected 0 <= rank < machines")
    if num_gpus == 0:  # every visible GPU of this machine (the pipeline's default)
        num_gpus = default_num_gpus(load_config(config_file, opts))
    world_size = num_gpus * num_machines
    _setup_console_logging()
    # every input error before a process starts
    cfg, _ = prepare_config(config_file, opts, world_size)
    check_device(cfg, num_gpus)
    check_launch(cfg, num_gpus, num_machines, dist_url)
    check_weights(cfg, resume, eval_only)
    weights_info = inspect_weights(cfg) if cfg.MODEL.WEIGHTS else None

    trial_dirs = [trial_dir(cfg.OUTPUT_DIR, i) for i in range(seeds)]
    init_name, init_name_from = choose_init_name(init_name, cfg, weights_info, trial_dirs, resume)
    _log_init_name(init_name, init_name_from, cfg.MODEL.WEIGHTS)
    skip = check_output_dir(cfg, trial_dirs, resume, eval_only, init_name, weights_info)
    if trials is not None:
        unknown = sorted(set(trials) - set(range(seeds)))
        if unknown:
            raise UsageError(f"trial(s) {unknown}: expected indices below --seeds {seeds}")
        skip = sorted(set(skip) | (set(range(seeds)) - set(trials)))
    job = TransferJob(
        config_file=config_file,
        opts=opts,
        world_size=world_size,
        seeds=choose_seeds(cfg, trial_dirs, reuse_recorded=resume or eval_only),
        trial_dirs=trial_dirs,
        resume=resume,
        eval_only=eval_only,
        init_name=init_name,
        init_name_from=init_name_from,
        weights_info=weights_info,
        skip=skip,
    )
    if len(skip) < len(trial_dirs):
        start = launch_cpu if cfg.MODEL.DEVICE == "cpu" else launch
        # SLURM, Kubernetes and Ctrl-C signal the whole process group: the workers save and stop
        # (StopOnSignal), this process waits for them instead of dying first
        with Preemption():
            try:
                start(_run_trials, num_gpus, num_machines=num_machines, machine_rank=machine_rank,
                      dist_url=dist_url, args=(job,))
            except mp.ProcessExitedException as e:
                if e.exit_code not in EXIT_CODES.values():
                    raise
                signum = e.exit_code - 128
                raise Preempted(signum,
                                f"stopped by {signal_name(signum)}; each unfinished trial saved "
                                f"its last iteration under {cfg.OUTPUT_DIR}") from None

    name = EVAL_FILE if eval_only else RESULTS_FILE
    paths = [os.path.join(d, name) for d in trial_dirs]
    # only on the machine of rank 0
    records = [run_record.read_record(p) for p in paths if os.path.isfile(p)]
    if records and not eval_only:
        write_summary(cfg.OUTPUT_DIR)
    return records

def first_trial_config(config_file, opts, num_gpus=1, num_machines=1, resume=False,
                       eval_only=False, synth_root=None):
    """The config of the first trial as it would run, and notes on what mocobench changed; starts
    and writes nothing and checks no dataset: the merged config (yaml, _BASE_ chain, KEY VALUE
    overrides), MODEL.RESNETS from a converted .pkl, SyncBN swapped for several CPU processes, then
    the trial's own OUTPUT_DIR/seed0 and SEED."""
    opts = list(opts or [])
    if synth_root:
        opts += ["MOCOBENCH.SYNTH_ROOT", os.fspath(synth_root)]
    cfg = load_config(config_file, opts)
    if num_gpus == 0:
        num_gpus = default_num_gpus(cfg)
    notes = configure_resnet(cfg)
    if cfg.MODEL.DEVICE == "cpu" and num_gpus * num_machines > 1:
        swapped = swap_sync_bn(cfg)
        if swapped:
            notes.append(f"SyncBN -> naiveSyncBN in {', '.join(swapped)} (several CPU processes)")
    directory = trial_dir(cfg.OUTPUT_DIR, 0)
    recorded = _recorded_seed(directory) if resume or eval_only else None
    if recorded is not None:
        cfg.SEED = recorded
        notes.append(f"SEED {recorded}: recorded in {directory}/config.yaml")
    elif cfg.SEED < 0:
        notes.append(f"SEED {cfg.SEED}: each trial draws a random seed when it starts")
    else:
        notes.append(f"SEED {cfg.SEED}: trial i runs with SEED + i")
    notes.append(f"OUTPUT_DIR {directory}: the trial's own directory")
    cfg.OUTPUT_DIR = directory
    cfg.freeze()
    return cfg, notes


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mocobench transfer",
        description="Fine-tune detectron2 from converted weights and evaluate (detectron2's "
                    "train_net conventions).",
        epilog="Example: mocobench transfer --config-file "
               "configs/detection/pascal_voc_R_50_C4_24k_moco.yaml --num-gpus 8 --seeds 5 "
               "MODEL.WEIGHTS moco.pkl OUTPUT_DIR out/voc",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE",
                        help="path to a detection config")
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="processes per machine: CUDA devices, or CPU processes (gloo) with "
                             "MODEL.DEVICE cpu")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0, help="the rank of this machine")
    parser.add_argument("--dist-url", default="auto",
                        help="initialization URL for torch.distributed, e.g. tcp://HOST:PORT "
                             "('auto': a free local port, one machine only)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="independent trials: the i-th (i = 0, 1, ...) into "
                             "OUTPUT_DIR/seed{i}/, its seed recorded in its results.json")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate MODEL.WEIGHTS (or with --resume, each trial's last "
                             "checkpoint) without training")
    parser.add_argument("--resume", action="store_true",
                        help="continue each trial from the last checkpoint in its directory "
                             "(iteration, optimizer and lr schedule restored)")
    parser.add_argument("--synth-root", default=None, metavar="DIR",
                        help="generated dataset (mocobench data synth) behind the synth_* dataset "
                             "names (default: $MOCOBENCH_SYNTH, else $DETECTRON2_DATASETS/synth)")
    parser.add_argument("--init-name", default=None,
                        help="the initialization's name (e.g. moco_v2, supervised): recorded in "
                             "each trial's results.json, the row name in `mocobench report` "
                             "(default: inferred from the record chain of MODEL.WEIGHTS: random "
                             "without weights; for a .pkl from `mocobench convert`, moco_v1/v2/v3 "
                             "or supervised by the checkpoint it was converted from; else the "
                             "weights file's name, marked as guessed)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the config of the first trial as it would run (the merged "
                             "config, MODEL.RESNETS from the weights' .pkl, OUTPUT_DIR/seed0 and "
                             "its SEED; later trials differ in those two only) as YAML and exit; "
                             "writes nothing, starts nothing, checks no dataset")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=None,
                        help="detectron2 config overrides: KEY VALUE pairs, e.g. MODEL.WEIGHTS "
                             "x.pkl")
    return parser

# detection/keypoints; semantic segmentation (Cityscapes: IoU)
HEADLINE_METRICS = ("AP", "AP50", "AP75", "mIoU", "IoU")


def _format_metrics(tasks, fmt) -> str:
    return ", ".join(f"{task} " + " ".join(f"{n} {fmt(m[n])}" for n in HEADLINE_METRICS if n in m)
                     for task, m in tasks.items())


def _format_summary(records) -> str:
    lines = []
    for rec in records:
        for dataset, tasks in rec["results"].items():
            shown = _format_metrics(tasks, lambda v: "NaN" if v is None else f"{v:.2f}")
            lines.append(f"trial {rec['trial']} (seed {rec['seed']}) {dataset}: {shown}  "
                         f"({rec['output_dir']})")
    if len(records) > 1:
        for dataset, metrics in summarize(records).items():
            shown = ", ".join(f"{k} {v['mean']:.2f} ± {v['std']:.2f} (n={v['n']})"
                              for k, v in metrics.items()
                              if k.split("/")[1] in HEADLINE_METRICS and v["n"] > 1)
            lines.append(f"{dataset}: mean ± sample std over the valid seeds: "
                         f"{shown or 'fewer than 2 valid seeds'}")
    return "\n".join(lines)

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if "--print-config" in (args.opts or []):  # after the KEY VALUE pairs: REMAINDER took it
        args.opts = [a for a in args.opts if a != "--print-config"]
        args.print_config = True
    if args.print_config:
        cfg, notes = first_trial_config(
            args.config_file, args.opts, num_gpus=args.num_gpus, num_machines=args.num_machines,
            resume=args.resume, eval_only=args.eval_only, synth_root=args.synth_root)
        print(f"# mocobench transfer: the config of trial 1 of {args.seeds} as it would run")
        print("".join(f"# {note}\n" for note in notes) + cfg.dump(), end="")
        return 0
    try:
        results = run_transfer(
            args.config_file, args.opts or [], num_gpus=args.num_gpus, seeds=args.seeds,
            resume=args.resume, eval_only=args.eval_only, init_name=args.init_name,
            num_machines=args.num_machines, machine_rank=args.machine_rank, dist_url=args.dist_url,
            synth_root=args.synth_root,
        )
    except Preempted as e:
        resume = ["mocobench", "transfer", *([] if "--resume" in argv else ["--resume"]), *argv]
        raise Preempted(e.signum, f"{e}; resume with: {shlex.join(resume)}") from None
    if results:
        print(_format_summary(results))
    return 0

if __name__ == "__main__":
    sys.exit(run_main("mocobench transfer", main, sys.argv[1:]))
