"""The transfer run record: what one trial of `mocobench transfer` was and what it measured.

One JSON file per trial directory, the only hand-off between `mocobench transfer` (the writer,
`write_record`) and `mocobench report` (the reader, `read_record`). Versioned (`format`, `version`)
and validated on read: a field of the wrong type is an error that names the file and the field.

    results.json        the trial's final evaluation after training (never rewritten by a later
                        call)
    results_eval.json   `--eval-only`: the same record under its own name, beside the training
                        record

Experiment identity. Two trials may be averaged only when they ran the same experiment. `identity`
is the merged detectron2 config, flattened to "A.B.C" keys, minus the keys that say how a trial was
*initialised* or *where* it ran: the weights and the pixel conventions that belong to them (a
supervised Caffe2 R-50 runs BGR, caffe mean/std and stride in the 1x1 conv; a converted
torchvision/MoCo R-50 runs RGB, ImageNet mean/std and stride in the 3x3 conv: still the same
experiment, see configs/detection/pascal_voc_R_50_C4_24k*.yaml), the seed, the output directory,
the device and the logging/checkpointing periods. Everything else (architecture, depth, norm,
schedule, input sizes, datasets, test-time thresholds) is identity: runs that differ there are
never averaged.
"""
import hashlib
import json
import math
import os
import time

from mocobench.utils.config import CONFIGS_DIR
from mocobench.utils.env import software_versions
from mocobench.utils.errors import UsageError
from mocobench.utils.fileio import atomic_write, file_sha256, load_checkpoint

FORMAT = "mocobench.transfer.run"
VERSION = 1
RESULTS_FILE = "results.json"
EVAL_FILE = "results_eval.json"

# how a trial was initialised: the weights and the pixel conventions that come with them
INIT_KEYS = ("MODEL.WEIGHTS", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "INPUT.FORMAT",
             "MODEL.RESNETS.STRIDE_IN_1X1")
# where and how a trial ran, which does not change what is measured
RUN_KEYS = ("SEED", "OUTPUT_DIR", "MODEL.DEVICE", "DATALOADER.NUM_WORKERS",
            "SOLVER.CHECKPOINT_PERIOD", "TEST.EVAL_PERIOD", "VIS_PERIOD", "CUDNN_BENCHMARK",
            "GLOBAL.HACK", "MOCOBENCH.LOG_PERIOD", "MOCOBENCH.REQUIRE_WEIGHTS",
            "MOCOBENCH.SYNTH_ROOT", "MOCOBENCH.WANDB.ENABLED", "MOCOBENCH.WANDB.PROJECT")
NOT_IDENTITY = frozenset(INIT_KEYS + RUN_KEYS)
SCHEDULE_KEYS = ("SOLVER.MAX_ITER", "SOLVER.STEPS", "SOLVER.BASE_LR", "SOLVER.IMS_PER_BATCH")


class RecordError(UsageError):
    """A results.json that is not a valid run record (names the file and the field)."""


# --------------------------------------------------------------------------------------------------
# identity

def flatten_config(node, prefix="") -> dict:
    """A (detectron2) config as {"A.B.C": value}, tuples as lists, so that it compares equal after
    a JSON trip."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = _jsonable(value)
    return out


def _jsonable(value):
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def experiment_identity(cfg) -> dict:
    """The flattened config minus the init/run keys (module docstring)."""
    return {k: v for k, v in sorted(flatten_config(cfg).items()) if k not in NOT_IDENTITY}


def identity_sha(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def identity_diff(a: dict, b: dict) -> list:
    """Keys whose values differ between two identities (absent counts as different)."""
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))


# --------------------------------------------------------------------------------------------------
# provenance: the config file and the init name

def recorded_config_file(config_file) -> tuple:
    """(path to record, sha256 of the file) for the --config-file a run was given, resolved as
    `mocobench.utils.config.merge_config` resolves it: a shipped config (one under CONFIGS_DIR,
    however it was named) as its "configs/..." name, which every mocobench command resolves from
    any working directory; any other file as its absolute path. (path, None) when no file is
    there."""
    path = os.fspath(config_file)
    shipped = os.path.join(os.path.dirname(CONFIGS_DIR), path)
    if not os.path.isfile(path) and not os.path.isabs(path) and os.path.isfile(shipped):
        path = shipped
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        return path, None
    sha = file_sha256(path)
    inside = os.path.relpath(os.path.realpath(path), os.path.realpath(CONFIGS_DIR))
    if inside.split(os.sep)[0] != os.pardir:
        path = "/".join(["configs", *inside.split(os.sep)])
    return path, sha


def row_name(init_name, weights) -> tuple:
    """(the report's row name, guessed): the init name, else the weights file's name ("random init"
    without weights), guessed."""
    if init_name is not None:
        return init_name, False
    if not weights:
        return "random init", True
    return os.path.splitext(os.path.basename(weights))[0], True


MOCO_NAMES = {"v1": "moco_v1", "v2": "moco_v2", "v3": "moco_v3"}


def _moco_version_of_config(text):
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    # another tool's config may hold anything under any key: only a MOCO mapping says a version
    moco = data.get("MOCO") if isinstance(data, dict) else None
    version = moco.get("VERSION") if isinstance(moco, dict) else None
    return version if version in MOCO_NAMES else None


def _moco_version(conversion):
    """(version, where it was read) of the MoCo v1/v2 checkpoint a conversion report names:
    the checkpoint's `config` entry (when the file is still the one converted), else its run
    directory's config.yaml (when the checkpoint is gone), else the head layout the converter
    dropped (v2: MLP fc.0/fc.2, v1: linear fc); (None, why not) otherwise."""
    checkpoint = conversion.get("input")
    changed = False
    if isinstance(checkpoint, str) and os.path.isfile(checkpoint):
        if file_sha256(checkpoint) == conversion.get("input_sha256"):
            try:
                config = load_checkpoint(checkpoint).get("config")
            except (UsageError, AttributeError):
                config = None
            version = _moco_version_of_config(config) if isinstance(config, str) else None
            if version:
                return version, f"its config entry says MOCO.VERSION {version}"
        else:
            changed = True  # another file now: neither it nor its directory describes the input
    elif isinstance(checkpoint, str):
        run_config = os.path.join(os.path.dirname(checkpoint), "config.yaml")
        if os.path.isfile(run_config):
            try:
                with open(run_config, encoding="utf-8") as f:
                    version = _moco_version_of_config(f.read())
            except (OSError, UnicodeDecodeError):
                version = None
            if version:
                return version, f"its run directory's config.yaml says MOCO.VERSION {version}"
    prefix = conversion.get("prefix") or ""
    heads = {d.get("key", "")[len(prefix):] for d in conversion.get("dropped") or []
             if isinstance(d, dict) and str(d.get("key", "")).startswith(prefix)}
    if "fc.0.weight" in heads:
        return "v2", "its projection head is an MLP (fc.0, fc.2): MoCo v2's layout"
    if "fc.weight" in heads:
        return "v1", "its projection head is linear (fc): MoCo v1's layout"
    return None, ("its MoCo version is recorded nowhere (no config entry"
                  + (", and the file changed since the conversion" if changed else "")
                  + ", no projection head)")


def infer_init_name(weights, weights_info) -> tuple:
    """(init name or None, how) from the record chain behind MODEL.WEIGHTS: no weights is
    "random"; a .pkl whose `mocobench convert` report (OUT.json beside it, recorded in
    weights_info by transfer.checkpoint.inspect_weights) describes this very file (its
    output_sha256) is named after the checkpoint it was converted from: a MoCo v1/v2 checkpoint
    "moco_v1"/"moco_v2" by the MoCo version its config records (`_moco_version`), a MoCo v3
    checkpoint "moco_v3", a torchvision-layout classifier (one with its fc) "supervised".
    Anything else: None and why not (the report then names the run after its weights file)."""
    if not weights:
        return "random", "no MODEL.WEIGHTS: random initialisation"
    info = weights_info or {}
    found = info.get("converter_report") or {}
    shown = os.path.basename(weights)
    if not found.get("path") or found.get("error"):
        return None, (f"{shown} has no readable conversion report beside it (the OUT.json of "
                      "`mocobench convert`)")
    try:
        with open(found["path"], encoding="utf-8") as f:
            conversion = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError):
        conversion = None
    if not isinstance(conversion, dict):
        return None, f"{found['path']} cannot be read as a conversion report"
    report = os.path.basename(found["path"])
    if conversion.get("output_sha256") != info.get("sha256"):
        return None, (f"{report} records the conversion of another file (its output sha256 is not "
                      f"that of {shown})")
    source, checkpoint = conversion.get("source"), conversion.get("input")
    what = f"{shown} was converted ({report}) from {checkpoint}"
    if source == "moco-v3":
        return "moco_v3", f"{what}, a MoCo v3 checkpoint (base_encoder layout)"
    if source == "moco":
        version, where = _moco_version(conversion)
        if version in ("v1", "v2"):
            return MOCO_NAMES[version], f"{what}, a MoCo v1/v2 checkpoint: {where}"
        return None, f"{what}, a MoCo v1/v2 checkpoint, but {where}"
    if source == "torchvision":
        prefix = conversion.get("prefix") or ""
        dropped = {d.get("key") for d in conversion.get("dropped") or [] if isinstance(d, dict)}
        if prefix + "fc.weight" in dropped:
            return "supervised", f"{what}, a torchvision-layout classifier (its fc was dropped)"
        return None, (f"{what}, a torchvision-layout backbone without a classifier: a supervised "
                      "model or a backbone-only release of a self-supervised one (DINO, Barlow "
                      "Twins) cannot be told apart")
    return None, f"{what}, a {source!r} checkpoint: no init name is inferred for that source"


# --------------------------------------------------------------------------------------------------
# the writer

def plain(value):
    """Evaluation results (OrderedDicts of numpy/python floats) -> JSON-safe values (NaN/inf ->
    None)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def results_per_dataset(results, test_datasets) -> dict:
    """detectron2's `DefaultTrainer.test` output as {dataset: {task: {metric: value}}}.

    detectron2 returns {dataset: {task: ...}} for several test datasets but drops the dataset level
    for one.
    """
    results = dict(results or {})
    names = list(test_datasets)
    if len(names) == 1 and names[0] not in results:
        return {names[0]: results}
    return {name: results.get(name, {}) for name in names}


def build_record(cfg, *, config_file, opts, init_name, weights_info, trial, world_size, eval_only,
                 resumed, iteration, seconds, results, evaluator_types,
                 init_name_from=None) -> dict:
    """`init_name_from`: how the init name was chosen ("--init-name", "inferred: ...")."""
    identity = experiment_identity(cfg)
    flat = flatten_config(cfg)
    config_path, config_sha = recorded_config_file(config_file)
    return {
        "format": FORMAT,
        "version": VERSION,
        "init_name": init_name,
        "init_name_from": init_name_from,
        "weights": cfg.MODEL.WEIGHTS,
        "weights_info": weights_info,
        "config_file": config_path,
        "config_file_sha256": config_sha,
        "opts": [str(o) for o in opts],
        "config_sha256": hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest(),
        "identity_sha": identity_sha(identity),
        "identity": identity,
        "init_config": {k: flat.get(k) for k in INIT_KEYS},
        "datasets": {"train": list(cfg.DATASETS.TRAIN), "test": list(cfg.DATASETS.TEST)},
        "evaluator_types": dict(evaluator_types),
        "schedule": {k.split(".")[1]: flat[k] for k in SCHEDULE_KEYS},
        "seed": cfg.SEED,
        "trial": trial,
        "eval_only": eval_only,
        "resumed": resumed,
        "iteration": iteration,
        "world_size": world_size,
        "device": cfg.MODEL.DEVICE,
        "seconds": round(seconds, 3),
        "output_dir": os.path.abspath(cfg.OUTPUT_DIR),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": software_versions(),
        "results": plain(results_per_dataset(results, cfg.DATASETS.TEST)),
    }


def write_record(path, record: dict):
    validate(record, path)  # the writer never writes what the reader would refuse
    with atomic_write(path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


# --------------------------------------------------------------------------------------------------
# a trial's start: what it trains, so that --resume never continues it as another experiment
STARTED_FILE = "started.json"
STARTED_FORMAT = "mocobench-trial-start"
STARTED_VERSION = 1


def write_started(directory, cfg, init_name, weights_info):
    """DIRECTORY/started.json, written when a trial starts: its experiment identity, init name and
    the weights' sha256 (a finished trial's results.json records the same)."""
    started = {"format": STARTED_FORMAT, "version": STARTED_VERSION,
               "identity": experiment_identity(cfg),
               "init_name": init_name, "weights_sha256": (weights_info or {}).get("sha256")}
    with atomic_write(os.path.join(directory, STARTED_FILE), "w") as f:
        json.dump(started, f, indent=2)
        f.write("\n")


def read_started(path) -> dict:
    """The started.json at `path`; RecordError naming the file otherwise."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            started = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"{path}: not a readable trial start record ({e})") from None
    if not isinstance(started, dict) or started.get("format") != STARTED_FORMAT \
            or not isinstance(started.get("identity"), dict):
        raise RecordError(f"{path}: expected a dict with format {STARTED_FORMAT!r} and an "
                          "'identity' dict")
    if started.get("version") != STARTED_VERSION:  # another mocobench's identity: not comparable
        raise RecordError(f"{path}: version {started.get('version')!r}; this mocobench reads "
                          f"version {STARTED_VERSION}")
    return started


# --------------------------------------------------------------------------------------------------
# the reader

_STR, _INT, _NUM, _BOOL, _DICT, _LIST = str, int, (int, float), bool, dict, list
# field -> (type(s), may be null)
FIELDS = {
    "init_name": (_STR, True),
    "weights": (_STR, False),
    "weights_info": (_DICT, True),
    "config_file": (_STR, False),
    "opts": (_LIST, False),
    "config_sha256": (_STR, False),
    "identity_sha": (_STR, False),
    "identity": (_DICT, False),
    "init_config": (_DICT, False),
    "datasets": (_DICT, False),
    "evaluator_types": (_DICT, False),
    "schedule": (_DICT, False),
    "seed": (_INT, False),
    "trial": (_INT, False),
    "eval_only": (_BOOL, False),
    "resumed": (_BOOL, False),
    "iteration": (_INT, True),
    "world_size": (_INT, False),
    "device": (_STR, False),
    "seconds": (_NUM, False),
    "output_dir": (_STR, False),
    "versions": (_DICT, False),
    "results": (_DICT, False),
}
# fields added within version 1: checked when present (records written before them lack them)
OPTIONAL_FIELDS = {
    "init_name_from": (_STR, True),
    "config_file_sha256": (_STR, True),
}


def _bad(path, field, value, expected):
    shown = json.dumps(value)
    shown = shown if len(shown) < 60 else shown[:57] + "..."
    return RecordError(f"{path}: field {field!r} is {shown}, expected {expected}")


def _is(value, types):
    return isinstance(value, types) and not (isinstance(value, bool) and types in (_INT, _NUM))


def validate(record, path):
    if not isinstance(record, dict):
        raise RecordError(f"{path}: expected a JSON object (a mocobench run record), got "
                          f"{type(record).__name__}")
    if record.get("format") != FORMAT:
        raise RecordError(f"{path}: not a mocobench run record (field 'format' is "
                          f"{record.get('format')!r}, expected {FORMAT!r}; records without it were "
                          "written by mocobench before record version 1)")
    version = record.get("version")
    if not _is(version, _INT) or not 1 <= version <= VERSION:
        raise RecordError(f"{path}: record version {version!r}; this mocobench reads versions "
                          f"1..{VERSION}"
                          + (" (written by a newer mocobench: update it)" if _is(version, _INT)
                             else ""))
    for field, (types, nullable) in {**FIELDS, **OPTIONAL_FIELDS}.items():
        if field not in record:
            if field in OPTIONAL_FIELDS:
                continue
            raise RecordError(f"{path}: field {field!r} is missing")
        value = record[field]
        if value is None and nullable:
            continue
        if not _is(value, types):
            name = {_STR: "a string", _INT: "an integer", _NUM: "a number", _BOOL: "true/false",
                    _DICT: "an object", _LIST: "a list"}[types]
            raise _bad(path, field, value, name + (" or null" if nullable else ""))
    for split in ("train", "test"):
        names = record["datasets"].get(split)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _bad(path, f"datasets.{split}", names, "a list of dataset names")
    for dataset, tasks in record["results"].items():
        if dataset not in record["datasets"]["test"]:
            raise _bad(path, f"results.{dataset}", tasks,
                       f"results of a test dataset {record['datasets']['test']}")
        if not isinstance(tasks, dict):
            raise _bad(path, f"results.{dataset}", tasks, "an object {task: {metric: value}}")
        for task, metrics in tasks.items():
            if not isinstance(metrics, dict):
                raise _bad(path, f"results.{dataset}.{task}", metrics, "an object {metric: value}")
            for metric, value in metrics.items():
                if value is not None and not _is(value, _NUM):
                    raise _bad(path, f"results.{dataset}.{task}.{metric}", value,
                               "a number or null (NaN)")


def read_record(path) -> dict:
    """The validated record at `path`; RecordError (a UsageError) naming the file and field
    otherwise."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except UnicodeDecodeError as e:
        raise RecordError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, "
                          f"column {e.colno})") from None
    except OSError as e:
        raise RecordError(f"{path}: cannot be read ({e.strerror})") from None
    validate(record, path)
    return record


def trial_records(output_dir: str, name: str = RESULTS_FILE):
    """(trial directory, record or RecordError) for every OUTPUT_DIR/seed*/`name`, in trial
    order."""
    found = []
    if not os.path.isdir(output_dir):
        return found
    for entry in os.listdir(output_dir):
        path = os.path.join(output_dir, entry, name)
        if entry.startswith("seed") and entry[4:].isdigit() and os.path.isfile(path):
            try:
                found.append((int(entry[4:]), os.path.dirname(path), read_record(path)))
            except RecordError as e:
                found.append((int(entry[4:]), os.path.dirname(path), e))
    return [(d, r) for _, d, r in sorted(found, key=lambda x: x[0])]
