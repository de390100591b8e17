"""`mocobench transfer`: fine-tune a detectron2 model from converted weights and evaluate, S seeds at a time.

    mocobench transfer --config-file configs/detection/pascal_voc_R_50_C4_24k_moco.yaml --num-gpus 8 \
        --seeds 5 MODEL.WEIGHTS out/moco_v2.pkl OUTPUT_DIR out/voc_moco

Everything runs on detectron2's own engine (DefaultTrainer, launch, DetectionCheckpointer, its evaluators);
what is ours: the Res5ROIHeadsExtraNorm head (transfer.heads), the evaluator registry (transfer.evaluation),
the generated datasets and dataset checks (transfer.datasets), the CPU/gloo launcher (transfer.launch), and
the seeds: trial i trains into OUTPUT_DIR/seed{i}/ (detectron2's metrics.json, log.txt, config.yaml,
checkpoints) and writes results.json with its final evaluation; OUTPUT_DIR/summary.json has mean and std
over the trials. Detection on VOC varies by 0.2-0.4 AP from run to run (MoCo's detection README reports
means of 5 trials), so one trial is not a result.

Seeds: trial i uses SEED + i when the config's SEED >= 0, else a random seed; --resume and --eval-only reuse
the seed recorded in the trial's config.yaml.

Weights: MODEL.WEIGHTS is a local file (a .pkl from `mocobench convert`, or any detectron2 checkpoint), or a
URL/`detectron2://` path that detectron2 fetches into its cache. mocobench never downloads anything itself;
when such a fetch fails (as on a machine without internet) the error says where to put the file instead.
"""
import argparse
import json
import logging
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass, field

import torch

from mocobench import d2compat  # noqa: F401  (before any detectron2 import)

# isort: split
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from mocobench.errors import UsageError
from mocobench.fileio import atomic_write
from transfer.checkpoint import SafeDetectionCheckpointer
from transfer.config import load_config, swap_sync_bn
from transfer.datasets import (
    check_datasets,
    check_num_classes,
    register_synth_datasets,
    resolve_synth_root,
    uses_synth,
)
from transfer.launch import launch, launch_cpu
from transfer.trainer import Trainer

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.json"
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
    extra: dict = field(default_factory=dict)

def trial_dir(output_dir: str, index: int) -> str:
    return os.path.join(output_dir, f"seed{index}")

# ----------------------------------------------------------------------------------------------------------------
# configuration: everything that can be wrong with the input is found here, before any process is started

def prepare_config(config_file: str, opts, world_size: int = 1):
    """The merged config, with the generated datasets registered; returns (cfg, notes to log)."""
    cfg = load_config(config_file, opts)
    notes = []
    if cfg.MODEL.DEVICE == "cpu" and world_size > 1:
        swapped = swap_sync_bn(cfg)
        if swapped:
            notes.append(f"{world_size} CPU processes (gloo): SyncBN -> naiveSyncBN in {', '.join(swapped)} "
                         "(torch's SyncBatchNorm synchronizes CUDA tensors only)")
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
            raise UsageError(f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but no CUDA device is available here; "
                             "pass MODEL.DEVICE cpu (with --num-gpus N for N CPU processes)")
        if num_gpus > torch.cuda.device_count():
            raise UsageError(f"--num-gpus {num_gpus} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif cfg.MODEL.DEVICE != "cpu":
        raise UsageError(f"MODEL.DEVICE {cfg.MODEL.DEVICE!r}: expected 'cuda' or 'cpu'")

def check_weights(cfg, resume: bool, eval_only: bool):
    """MODEL.WEIGHTS must be loadable before N processes start (detectron2 would fail inside each)."""
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        if cfg.MOCOBENCH.REQUIRE_WEIGHTS and not resume:
            raise UsageError("MODEL.WEIGHTS is empty: pass MODEL.WEIGHTS /path/to/backbone.pkl (from `mocobench "
                             "convert`), or MOCOBENCH.REQUIRE_WEIGHTS False to train from random init")
        if eval_only and not resume:
            raise UsageError("--eval-only needs MODEL.WEIGHTS (a trained model) or --resume (the trial's last "
                             "checkpoint)")
        return
    if "://" in weights:
        try:
            PathManager.get_local_path(weights)  # detectron2's own fetch-and-cache (its model zoo URLs)
        except Exception as e:
            raise UsageError(
                f"MODEL.WEIGHTS {weights!r} could not be fetched ({type(e).__name__}: {e}). mocobench downloads "
                "nothing itself; get the file onto this machine and pass MODEL.WEIGHTS /local/path.pkl"
            ) from None
    elif not os.path.isfile(weights):
        raise UsageError(f"MODEL.WEIGHTS {weights!r} does not exist (expected a .pkl from `mocobench convert` or "
                         "a detectron2 checkpoint .pth)")

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

def _recorded_seed(directory):
    import yaml

    path = os.path.join(directory, "config.yaml")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        seed = (yaml.safe_load(f) or {}).get("SEED")
    return seed if isinstance(seed, int) and seed >= 0 else None

# ----------------------------------------------------------------------------------------------------------------
# the worker: runs in each training process (the caller's, or spawned ones)

def _setup_console_logging():
    rank = comm.get_rank()
    for name in LOGGERS:
        setup_logger(distributed_rank=rank, name=name, abbrev_name={"detectron2": "d2", "transfer": "mb"}.get(name))

class _TrialLogFile:
    """log.txt of one trial (log.txt.rank{r} for other ranks), attached to our loggers for its duration."""

    def __init__(self, directory):
        rank = comm.get_rank()
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "log.txt" if rank == 0 else f"log.txt.rank{rank}")
        self.handler = logging.FileHandler(self.path)
        self.handler.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s",
                                                    datefmt="%m/%d %H:%M:%S"))
        self.handler.setLevel(logging.DEBUG)

    def __enter__(self):
        for name in LOGGERS:
            logging.getLogger(name).addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(self.handler)
        self.handler.close()

def _plain(value):
    """Evaluation results (OrderedDicts of numpy/python floats) -> JSON-safe values (NaN -> None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

def _run_trial(cfg, job: TransferJob, index: int):
    rank = comm.get_rank()
    if comm.is_main_process():
        with atomic_write(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
            f.write(cfg.dump())
    seed_all_rng(cfg.SEED + rank)  # as detectron2's default_setup: a different, deterministic stream per rank
    logger.info(f"trial {index + 1}/{len(job.seeds)}: seed {cfg.SEED}, output {cfg.OUTPUT_DIR}, "
                f"{job.world_size} process(es) on {cfg.MODEL.DEVICE}")
    start = time.perf_counter()
    if job.eval_only:
        model = Trainer.build_model(cfg)
        SafeDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS,
                                                                                 resume=job.resume)
        results = Trainer.test(cfg, model)
        iteration = None
    else:
        Trainer.progress_description = f"seed{index}"
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=job.resume)
        trainer.train()
        # the final evaluation (EvalHook at the end of training); DefaultTrainer.train returns it only when
        # TEST.EXPECTED_RESULTS is set, but always keeps it here
        results = getattr(trainer, "_last_eval_results", None)
        iteration = trainer.iter
    if comm.is_main_process():
        record = {
            "seed": cfg.SEED,
            "trial": index,
            "config_file": os.path.abspath(job.config_file),
            "opts": list(job.opts),
            "weights": cfg.MODEL.WEIGHTS,
            "init_name": job.init_name,
            "datasets": {"train": list(cfg.DATASETS.TRAIN), "test": list(cfg.DATASETS.TEST)},
            "eval_only": job.eval_only,
            "resumed": job.resume,
            "max_iter": cfg.SOLVER.MAX_ITER,
            "iteration": iteration,
            "world_size": comm.get_world_size(),  # what ran, not what was asked for
            "device": cfg.MODEL.DEVICE,
            "seconds": round(time.perf_counter() - start, 3),
            "output_dir": os.path.abspath(cfg.OUTPUT_DIR),
            "results": _plain(results or {}),
        }
        with atomic_write(os.path.join(cfg.OUTPUT_DIR, RESULTS_FILE), "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    comm.synchronize()

def _run_trials(job: TransferJob):
    _setup_console_logging()
    base_cfg, notes = prepare_config(job.config_file, job.opts, job.world_size)  # registers datasets here
    for index, (seed, directory) in enumerate(zip(job.seeds, job.trial_dirs)):
        cfg = base_cfg.clone()
        cfg.OUTPUT_DIR = directory
        cfg.SEED = seed
        cfg.freeze()
        if comm.is_main_process():
            os.makedirs(directory, exist_ok=True)
        comm.synchronize()
        with _TrialLogFile(directory):
            for note in notes:  # in every trial's log.txt: what mocobench changed in the config, and why
                logger.info(note)
            _run_trial(cfg, job, index)

# ----------------------------------------------------------------------------------------------------------------
# the API and the command

def summarize(results: list) -> dict:
    """{"bbox/AP": {"mean", "std", "values"}, ...} over the trials (std: sample std, 0 for one trial)."""
    values = {}
    for record in results:
        for task, metrics in (record.get("results") or {}).items():
            if not isinstance(metrics, dict):
                continue
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    values.setdefault(f"{task}/{name}", []).append(float(value))
    summary = {}
    for key, vals in values.items():
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        summary[key] = {"mean": mean, "std": std, "n": len(vals), "values": vals}
    return summary

def run_transfer(config_file, opts, num_gpus=1, seeds=1, resume=False, eval_only=False, init_name=None, *,
                 num_machines=1, machine_rank=0, dist_url="auto", synth_root=None) -> list:
    """Fine-tune and evaluate `seeds` trials; returns their results.json records (rank 0's machine).

    `opts`: detectron2 KEY VALUE overrides. `num_gpus`: processes per machine (CUDA devices, or CPU
    processes over gloo when MODEL.DEVICE is cpu). `synth_root`: directory of a generated dataset for the
    synth_* dataset names.
    """
    opts = list(opts or [])
    if synth_root:
        opts += ["MOCOBENCH.SYNTH_ROOT", os.fspath(synth_root)]
    if seeds < 1:
        raise UsageError(f"--seeds {seeds}: expected >= 1")
    if num_machines < 1 or not 0 <= machine_rank < num_machines:
        raise UsageError(f"--machine-rank {machine_rank} with --num-machines {num_machines}: expected "
                         f"0 <= rank < machines")
    world_size = num_gpus * num_machines
    _setup_console_logging()
    cfg, _ = prepare_config(config_file, opts, world_size)  # every input error before a process starts
    check_device(cfg, num_gpus)
    check_weights(cfg, resume, eval_only)

    trial_dirs = [trial_dir(cfg.OUTPUT_DIR, i) for i in range(seeds)]
    job = TransferJob(
        config_file=config_file,
        opts=opts,
        world_size=world_size,
        seeds=choose_seeds(cfg, trial_dirs, reuse_recorded=resume or eval_only),
        trial_dirs=trial_dirs,
        resume=resume,
        eval_only=eval_only,
        init_name=init_name,
    )
    if cfg.MODEL.DEVICE == "cpu":
        launch_cpu(_run_trials, num_gpus, num_machines=num_machines, machine_rank=machine_rank, dist_url=dist_url,
                   args=(job,))
    else:
        launch(_run_trials, num_gpus, num_machines=num_machines, machine_rank=machine_rank, dist_url=dist_url,
               args=(job,))

    results = []
    for directory in trial_dirs:
        path = os.path.join(directory, RESULTS_FILE)
        if os.path.isfile(path):  # only on the machine of rank 0
            with open(path) as f:
                results.append(json.load(f))
    if results:
        summary = {"config_file": os.path.abspath(config_file), "init_name": init_name,
                   "seeds": [r["seed"] for r in results], "metrics": summarize(results)}
        with atomic_write(os.path.join(cfg.OUTPUT_DIR, SUMMARY_FILE), "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
    return results

def build_parser():
    parser = argparse.ArgumentParser(
        prog="mocobench transfer",
        description="Fine-tune detectron2 from converted weights and evaluate (detectron2's train_net conventions).",
        epilog="Example: mocobench transfer --config-file configs/detection/pascal_voc_R_50_C4_24k_moco.yaml "
               "--num-gpus 8 --seeds 5 MODEL.WEIGHTS moco.pkl OUTPUT_DIR out/voc",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to a detection config")
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="processes per machine: CUDA devices, or CPU processes (gloo) with MODEL.DEVICE cpu")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0, help="the rank of this machine")
    parser.add_argument("--dist-url", default="auto",
                        help="initialization URL for torch.distributed, e.g. tcp://HOST:PORT ('auto': a free local "
                             "port, one machine only)")
    parser.add_argument("--seeds", type=int, default=1, help="independent trials, into OUTPUT_DIR/seed{i}/")
    parser.add_argument("--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS (or with --resume, "
                        "each trial's last checkpoint) without training")
    parser.add_argument("--resume", action="store_true",
                        help="continue each trial from the last checkpoint in its directory (iteration, optimizer "
                             "and lr schedule restored)")
    parser.add_argument("--synth-root", default=None, metavar="DIR",
                        help="generated dataset (mocobench data synth) behind the synth_* dataset names "
                             "(default: $MOCOBENCH_SYNTH, else $DETECTRON2_DATASETS/synth)")
    parser.add_argument("--init-name", default=None, help="a name for the initialization, recorded in results.json")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=None,
                        help="detectron2 config overrides: KEY VALUE pairs, e.g. MODEL.WEIGHTS x.pkl")
    return parser

def _format_summary(results) -> str:
    summary = summarize(results)
    lines = []
    for record in results:
        metrics = [(k, v) for k, v in record["results"].items() if isinstance(v, dict)]
        shown = ", ".join(f"{task} " + " ".join(f"{n} {m[n]:.2f}" for n in ("AP", "AP50", "AP75")
                                                if isinstance(m.get(n), (int, float)))
                          for task, m in metrics)
        lines.append(f"seed {record['seed']}: {shown}  ({record['output_dir']})")
    if len(results) > 1:
        shown = ", ".join(f"{k} {v['mean']:.2f} ± {v['std']:.2f}" for k, v in summary.items()
                          if k.split("/")[1] in ("AP", "AP50", "AP75"))
        lines.append(f"mean ± std over {len(results)} seeds: {shown}")
    return "\n".join(lines)

def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    results = run_transfer(
        args.config_file, args.opts or [], num_gpus=args.num_gpus, seeds=args.seeds, resume=args.resume,
        eval_only=args.eval_only, init_name=args.init_name, num_machines=args.num_machines,
        machine_rank=args.machine_rank, dist_url=args.dist_url, synth_root=args.synth_root,
    )
    if results:
        print(_format_summary(results))
    return 0

if __name__ == "__main__":
    sys.exit(main())
