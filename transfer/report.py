"""`mocobench report RUN_DIR... [--out DIR] [--baseline NAME]`: the paper's transfer tables from
run directories.

A *run* is one trial directory. Its outcome comes from its run record (results.json, or
results_eval.json for an evaluation-only trial; `transfer.record`), or, for a plain detectron2
directory without one, from config.yaml and the last metrics.json line with `.../AP` scalars; such
a run's row name is guessed from the MODEL.WEIGHTS file name and marked as guessed. Paths are
searched recursively; a directory reached twice (overlapping arguments, symlinks) counts once.

Tables. One per experiment: (test dataset, config identity). The identity is the merged config
without the keys that only say how a run was initialised or where it ran
(`transfer.record.experiment_identity`), so a supervised Caffe2-style config and its `_moco` twin
land in one table while runs that differ in architecture, schedule, input size or datasets are
never averaged. A row per init name, a column per metric (from the registry `METRIC_COLUMNS`, keyed
by the dataset's evaluator type). Each cell: mean ± sample std (n) over the valid seeds; one seed
prints its value and n=1. Rows other than the baseline (`--baseline`, default supervised) show the
difference of means with a 95 % Welch interval (t quantile at the Welch-Satterthwaite degrees of
freedom), marked * only when the interval excludes 0. A seed whose metric is NaN or missing is
listed under its table and left out of n. When a table's identity equals an official MoCo detection
config, the published numbers for that config follow in a separate block (`PUBLISHED`, every number
cited).

Each table is headed by what it is in words (training data, task, model, schedule, test set:
`describe_experiment`); its config identity hash is in report.json and report.csv.

Outputs in --out: report.md (also printed), report.json and report.csv (every seed's values),
ap.png, and pretrain.png when pretraining runs are among the paths or reachable from the records'
weights. Exit 0 when at least one table was made, 2 (one-line error) when nothing usable was found
or when --baseline names no row of the report (the error lists the rows there are).
"""
import argparse
import csv
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass

from mocobench.utils.errors import UsageError
from transfer import record as run_record
from transfer.stats import CONFIDENCE, describe, welch_interval
from transfer.tasks import TASKS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = "supervised"


# --------------------------------------------------------------------------------------------------
# metric columns by evaluator type (a new task registers its columns here)

@dataclass(frozen=True)
class Column:
    task: str  # the evaluator's result group: bbox, segm, keypoints, sem_seg ...
    metric: str  # the key in that group: AP, AP50, mIoU ...
    title: str  # the column title, as in the paper's tables

    @property
    def key(self):
        return f"{self.task}/{self.metric}"


METRIC_COLUMNS = {}  # evaluator_type -> [Column], in the paper's column order
# (evaluator_type, predicate(results of one dataset)) for runs that do not record the type
_RECOGNIZERS = []


def register_metrics(evaluator_type, columns, recognizes=None):
    if evaluator_type in METRIC_COLUMNS:
        raise KeyError(f"metric columns for {evaluator_type!r} are already registered")
    METRIC_COLUMNS[evaluator_type] = [Column(*c) for c in columns]
    if recognizes is not None:
        _RECOGNIZERS.append((evaluator_type, recognizes))


# He et al. 2020, Table 2 (VOC): AP50, AP, AP75 of detectron2's PascalVOCDetectionEvaluator
register_metrics("pascal_voc",
                 [("bbox", "AP50", "AP50"), ("bbox", "AP", "AP"), ("bbox", "AP75", "AP75")],
                 recognizes=lambda r: (set(r) == {"bbox"}
                                       and set(r["bbox"]) <= {"AP", "AP50", "AP75"}))
# He et al. 2020, Table 5 (COCO): box and mask AP of COCOEvaluator
register_metrics("coco", [("bbox", "AP", "AP^bb"), ("bbox", "AP50", "AP^bb_50"),
                          ("bbox", "AP75", "AP^bb_75"), ("segm", "AP", "AP^mk"),
                          ("segm", "AP50", "AP^mk_50"), ("segm", "AP75", "AP^mk_75")],
                 recognizes=lambda r: "bbox" in r or "segm" in r)
# He et al. 2020, Table 6: the other tasks' columns (transfer/tasks.py). COCO keypoints share
# COCOEvaluator with COCO detection, so a keypoint run's table shows its box AP beside AP^kp.
for _task in TASKS:
    if _task.evaluator_type in METRIC_COLUMNS:
        METRIC_COLUMNS[_task.evaluator_type] += [Column(*c) for c in _task.columns]
    else:
        register_metrics(_task.evaluator_type, _task.columns, recognizes=(
            (lambda r, m=_task.columns[0][1]: set(r) == {"sem_seg"} and m in r["sem_seg"])
            if _task.columns[0][0] == "sem_seg" else None))


def columns_for(evaluator_type, results_seen):
    """The registered columns that occur in the results, or every task/metric seen for an
    unregistered type."""
    present = {f"{t}/{m}" for res in results_seen for t, ms in res.items() for m in ms}
    if evaluator_type in METRIC_COLUMNS:
        return [c for c in METRIC_COLUMNS[evaluator_type] if c.key in present]
    return [Column(*k.split("/", 1), k) for k in sorted(present)]


def guess_evaluator_type(results):
    return next((name for name, recognizes in _RECOGNIZERS if recognizes(results)), None)


# --------------------------------------------------------------------------------------------------
# published numbers for the official configs (compared by config identity, not by file name)
#
# VOC: Faster R-CNN R50-C4, VOC07+12 trainval, 24k iterations, VOC07 test; means of 5 trials.
#   [T2]   He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR
#          2020, Table 2
#   [D]    github.com/facebookresearch/moco, detection/README.md ("Results"; means of 5 trials)
# COCO: Mask R-CNN, coco_2017_train -> coco_2017_val, SyncBN tuned, 1x = 90k / 2x = 180k iterations.
#   [T5x]  He et al., CVPR 2020, Table 5 (a) R50-FPN 1x, (b) R50-FPN 2x, (c) R50-C4 1x, (d) R50-C4
#          2x
# Checked while writing this against copies read through the code-search tool: [D] verbatim; Table
# 2, 5b and 5d in a transcription of the paper; 5c's supervised row in another README that quotes
# it. Table 5a and 5c's MoCo rows are from the paper as remembered, not cross-checked here.
_VOC = ("bbox/AP50", "bbox/AP", "bbox/AP75")
_COCO = ("bbox/AP", "bbox/AP50", "bbox/AP75", "segm/AP", "segm/AP50", "segm/AP75")
PUBLISHED = {
    "pascal_voc_R_50_C4_24k_moco.yaml": [
        ("supervised IN-1M", dict(zip(_VOC, (81.3, 53.5, 58.8))),
         "He et al. 2020, Table 2; moco detection README"),
        ("MoCo v1 IN-1M, 200ep", dict(zip(_VOC, (81.5, 55.9, 62.6))),
         "He et al. 2020, Table 2; moco detection README"),
        ("MoCo v1 IG-1B", dict(zip(_VOC, (82.2, 57.2, 63.7))), "He et al. 2020, Table 2"),
        ("MoCo v2 IN-1M, 200ep", dict(zip(_VOC, (82.4, 57.0, 63.6))), "moco detection README"),
        ("MoCo v2 IN-1M, 800ep", dict(zip(_VOC, (82.5, 57.4, 64.0))), "moco detection README"),
    ],
    "coco_R_50_FPN_1x_moco.yaml": [
        ("supervised IN-1M", dict(zip(_COCO, (38.9, 59.6, 42.7, 35.4, 56.5, 38.1))),
         "He et al. 2020, Table 5a"),
        ("MoCo IN-1M", dict(zip(_COCO, (38.5, 58.9, 42.0, 35.1, 55.9, 37.7))),
         "He et al. 2020, Table 5a"),
        ("MoCo IG-1B", dict(zip(_COCO, (38.9, 59.4, 42.3, 35.4, 56.5, 37.9))),
         "He et al. 2020, Table 5a"),
    ],
    "coco_R_50_FPN_2x_moco.yaml": [
        ("supervised IN-1M", dict(zip(_COCO, (40.6, 61.3, 44.4, 36.8, 58.1, 39.5))),
         "He et al. 2020, Table 5b"),
        ("MoCo IN-1M", dict(zip(_COCO, (40.8, 61.6, 44.7, 36.9, 58.4, 39.7))),
         "He et al. 2020, Table 5b"),
        ("MoCo IG-1B", dict(zip(_COCO, (41.1, 61.8, 45.1, 37.4, 59.1, 40.2))),
         "He et al. 2020, Table 5b"),
    ],
    "coco_R_50_C4_1x_moco.yaml": [
        ("supervised IN-1M", dict(zip(_COCO, (38.2, 58.2, 41.2, 33.3, 54.7, 35.2))),
         "He et al. 2020, Table 5c"),
        ("MoCo IN-1M", dict(zip(_COCO, (38.5, 58.3, 41.6, 33.6, 54.8, 35.6))),
         "He et al. 2020, Table 5c"),
        ("MoCo IG-1B", dict(zip(_COCO, (39.1, 58.7, 42.2, 34.1, 55.4, 36.4))),
         "He et al. 2020, Table 5c"),
    ],
    "coco_R_50_C4_2x_moco.yaml": [
        ("supervised IN-1M", dict(zip(_COCO, (40.0, 59.9, 43.1, 34.7, 56.5, 36.9))),
         "He et al. 2020, Table 5d"),
        ("MoCo IN-1M", dict(zip(_COCO, (40.7, 60.5, 44.1, 35.4, 57.3, 37.6))),
         "He et al. 2020, Table 5d"),
        ("MoCo IG-1B", dict(zip(_COCO, (41.1, 60.7, 44.8, 35.6, 57.4, 38.1))),
         "He et al. 2020, Table 5d"),
    ],
}
# Table 6 (the other tasks): rows attached to their _moco configs, cited in transfer/tasks.py
for _task in TASKS:
    PUBLISHED.update(_task.published)
_official_identities = {}


def official_identity(config_name):
    """The experiment identity of configs/detection/<config_name>, or configs/<dir/name> for a name
    with a folder (the Table 6 tasks' configs); loads detectron2's config, cached."""
    if config_name not in _official_identities:
        from transfer.config import load_config

        folder = () if "/" in config_name else ("detection",)
        cfg = load_config(os.path.join(REPO, "configs", *folder, *config_name.split("/")))
        _official_identities[config_name] = run_record.experiment_identity(cfg)
    return _official_identities[config_name]


def published_for(identity):
    """(official config name, rows) whose identity equals `identity`, else (None, [])."""
    # every official config is R-50: skip loading them otherwise
    if identity.get("MODEL.RESNETS.DEPTH") != 50:
        return None, []
    for name, rows in PUBLISHED.items():
        if official_identity(name) == identity:
            return name, rows
    return None, []


# --------------------------------------------------------------------------------------------------
# finding and reading runs

def _read_json_lines(path):
    """(rows, problem): a torn last line marks an unfinished run; undecodable text is a problem."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        # a run killed mid-write leaves a torn line; the lines before it still count
                        pass
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text ({e.reason} at byte {e.start})"
    except OSError as e:
        return None, f"cannot be read ({e.strerror})"
    return [r for r in rows if isinstance(r, dict)], None


def _results_from_metrics(rows, test_datasets):
    """{dataset: {task: {metric: value}}} from the last metrics.json line with evaluation
    scalars."""
    # an evaluation line holds a registered column's metric ("bbox/AP", "sem_seg/mIoU"; Cityscapes'
    # "sem_seg/IoU"), optionally under its dataset ("synth_voc_test/bbox/AP"); training lines hold
    # losses and timings
    columns = {(c.task, c.metric) for cols in METRIC_COLUMNS.values() for c in cols}
    tasks = {task for task, _ in columns}
    for row in reversed(rows):
        if not any(tuple(k.split("/")[-2:]) in columns for k in row):
            continue
        out = defaultdict(lambda: defaultdict(dict))
        for key, value in row.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[1] in tasks:
                dataset, task, metric = parts
            elif len(parts) == 2 and parts[0] in tasks and test_datasets:
                (task, metric), dataset = parts, test_datasets[0]
            else:
                continue
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value)
            out[dataset][task][metric] = float(value) if ok else None
        return {d: {t: dict(m) for t, m in ts.items()} for d, ts in out.items()}
    return None


def _plain_detectron2_run(run_dir):
    """A detectron2 output directory without a run record: (run or None, problem or None)."""
    import yaml

    rows, problem = _read_json_lines(os.path.join(run_dir, "metrics.json"))
    if problem:
        return None, f"{os.path.join(run_dir, 'metrics.json')}: {problem}"
    if not any("total_loss" in r for r in rows) and _results_from_metrics(rows, ["?"]) is None:
        # not a detectron2 run (a pretraining run has config.yaml + metrics.json too)
        return None, None
    path = os.path.join(run_dir, "config.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
        if not isinstance(cfg, dict):
            raise ValueError("not a mapping")
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        return None, (f"{path}: not a readable detectron2 config ({type(e).__name__}: "
                      f"{str(e).splitlines()[0]})")
    test = list((cfg.get("DATASETS") or {}).get("TEST") or [])
    weights = (cfg.get("MODEL") or {}).get("WEIGHTS", "")
    identity = run_record.experiment_identity(cfg)
    run = {
        "dir": run_dir, "source": "metrics.json", "init": run_record.row_name(None, weights)[0],
        "guessed": True, "seed": cfg.get("SEED"), "config_file": "config.yaml",
        "identity": identity, "identity_sha": run_record.identity_sha(identity),
        "test_datasets": test, "evaluator_types": {}, "results": _results_from_metrics(rows, test),
        "weights": weights, "weights_info": None,
    }
    if run["results"] is None:
        run["results"] = {}
        run["why"] = ("metrics.json has no final evaluation (training unfinished, or evaluation "
                      "failed)")
    return run, None


def _record_run(run_dir, path):
    rec = run_record.read_record(path)
    init, guessed = run_record.row_name(rec["init_name"], rec["weights"])
    return {
        "dir": run_dir, "source": os.path.basename(path), "init": init,
        "guessed": guessed, "seed": rec["seed"],
        "config_file": os.path.basename(rec["config_file"]), "identity": rec["identity"],
        "identity_sha": rec["identity_sha"], "test_datasets": rec["datasets"]["test"],
        "evaluator_types": rec["evaluator_types"], "results": rec["results"],
        "weights": rec["weights"], "weights_info": rec["weights_info"],
    }


def find_runs(paths):
    """(runs, problems): every run under the paths, each directory once (by real path)."""
    runs, problems, seen = [], [], set()
    for top in paths:
        if not os.path.isdir(top):
            problems.append({"path": top, "why": "not a directory"})
            continue
        for dirpath, dirnames, files in os.walk(top, followlinks=True):
            dirnames.sort()
            real = os.path.realpath(dirpath)
            if real in seen:
                dirnames[:] = []  # reached before (overlapping arguments, a symlink): count it once
                continue
            seen.add(real)
            record_file = next((f for f in (run_record.RESULTS_FILE, run_record.EVAL_FILE)
                                if f in files), None)
            try:
                if record_file:
                    runs.append(_record_run(dirpath, os.path.join(dirpath, record_file)))
                elif "metrics.json" in files and "config.yaml" in files:
                    run, problem = _plain_detectron2_run(dirpath)
                    if problem:
                        problems.append({"path": dirpath, "why": problem})
                    elif run is not None:
                        runs.append(run)
            except run_record.RecordError as e:
                problems.append({"path": os.path.join(dirpath, record_file), "why": str(e)})
    return runs, problems


# --------------------------------------------------------------------------------------------------
# tables

def _row_order(init, baseline):
    order = ["random", "random init", baseline]
    return (order.index(init), "") if init in order else (len(order), init)


def _seed_values(run, dataset, columns):
    metrics = run["results"].get(dataset, {})
    return {c.key: metrics.get(c.task, {}).get(c.metric) for c in columns}


def _failure(run, dataset, values):
    bad = [k for k, v in values.items() if v is None]
    if run.get("why"):
        why = run["why"]
    elif not run["results"].get(dataset):
        why = f"no results for {dataset} (evaluation failed, or no evaluator for it)"
    elif not bad:
        return None
    else:
        nan = [k for k in bad
               if k.split("/")[1] in run["results"][dataset].get(k.split("/")[0], {})]
        missing = [k for k in bad if k not in nan]
        parts = ([f"{', '.join(nan)} NaN (null in {run['source']}; e.g. an evaluation without "
                  "detections)"]
                 if nan else []) + ([f"{', '.join(missing)} missing"] if missing else [])
        why = "; ".join(parts)
    return {"dir": run["dir"], "init": run["init"], "seed": run["seed"], "why": why}


def _short(value):
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value)


def describe_identity(identity):
    """A one-line title: architecture, norm, schedule, sizes, training data."""
    g = identity.get
    backbone = g("MODEL.BACKBONE.NAME", "?").replace("build_", "").replace("_backbone", "")
    # no RoI heads: name the segmentation head
    semantic = g("MODEL.META_ARCHITECTURE") == "SemanticSegmentor"
    head = g("MODEL.SEM_SEG_HEAD.NAME" if semantic else "MODEL.ROI_HEADS.NAME", "?")
    arch = f"R-{g('MODEL.RESNETS.DEPTH', '?')} {backbone}, {head}"
    if g("MODEL.MASK_ON") and not semantic:
        arch += " + mask"
    if g("MODEL.KEYPOINT_ON") and not semantic:
        arch += " + keypoints"
    schedule = (f"{g('SOLVER.MAX_ITER')} it x {g('SOLVER.IMS_PER_BATCH')} img, lr "
                f"{g('SOLVER.BASE_LR')}, steps {_short(g('SOLVER.STEPS'))}")
    sizes = f"min size train {_short(g('INPUT.MIN_SIZE_TRAIN'))} / test {g('INPUT.MIN_SIZE_TEST')}"
    return (f"{arch}, norm {g('MODEL.RESNETS.NORM')}; {schedule}; {sizes}; "
            f"train {', '.join(g('DATASETS.TRAIN') or [])}")


# dataset names in words, as the paper's tables name them (a name not listed is shown as it is)
TRAIN_WORDS = {("voc_2007_trainval", "voc_2012_trainval"): "VOC07+12",
               ("voc_2007_trainval",): "VOC07", ("voc_2012_trainval",): "VOC12",
               ("coco_2017_train",): "COCO", ("keypoints_coco_2017_train",): "COCO",
               ("lvis_v0.5_train",): "LVIS v0.5",
               ("cityscapes_fine_instance_seg_train",): "Cityscapes",
               ("cityscapes_fine_sem_seg_train",): "Cityscapes",
               ("voc_2012_sem_seg_train_aug",): "VOC12 train_aug"}
TEST_WORDS = {"voc_2007_test": "VOC07 test", "coco_2017_val": "COCO val2017",
              "keypoints_coco_2017_val": "COCO val2017", "lvis_v0.5_val": "LVIS v0.5 val",
              "cityscapes_fine_instance_seg_val": "Cityscapes val",
              "cityscapes_fine_sem_seg_val": "Cityscapes val",
              "voc_2012_sem_seg_val": "VOC12 val"}


def _iterations(n):
    if not isinstance(n, int):
        return f"{n} iterations"
    if n >= 1000:
        return f"{n / 1000:g}k iterations"
    return f"{n} iteration" + ("" if n == 1 else "s")


def describe_experiment(identity, dataset):
    """What a table is, in words: training data, task, model, schedule and test set, e.g.
    "VOC07+12 detection, R50-C4, 24k iterations, test on VOC07 test"."""
    g = identity.get
    train = tuple(g("DATASETS.TRAIN") or ())
    train_words = TRAIN_WORDS.get(train) or " + ".join(train) or "no training data"
    if g("MODEL.META_ARCHITECTURE") == "SemanticSegmentor":
        task = "semantic segmentation"
        head = str(g("MODEL.SEM_SEG_HEAD.NAME", "?"))
        design = {"DilatedFCNHead": "FCN"}.get(head, head)
    else:
        task = ("keypoint detection" if g("MODEL.KEYPOINT_ON")
                else "detection and instance segmentation" if g("MODEL.MASK_ON") else "detection")
        backbone = str(g("MODEL.BACKBONE.NAME", "?"))
        design = ("FPN" if "fpn" in backbone
                  else "C4" if str(g("MODEL.ROI_HEADS.NAME", "")).startswith("Res5ROIHeads")
                  else backbone)
    depth, groups = g("MODEL.RESNETS.DEPTH", "?"), g("MODEL.RESNETS.NUM_GROUPS", 1)
    trunk = (f"X{depth}-{groups}x{g('MODEL.RESNETS.WIDTH_PER_GROUP')}d"
             if isinstance(groups, int) and groups > 1 else f"R{depth}")
    return (f"{train_words} {task}, {trunk}-{design}, {_iterations(g('SOLVER.MAX_ITER'))}, "
            f"test on {TEST_WORDS.get(dataset, dataset)}")


def summarize(runs, baseline=BASELINE):
    """{"<test dataset> <config identity>": table}, in that order (see the module docstring)."""
    groups = defaultdict(list)
    for run in runs:
        for dataset in run["test_datasets"] or list(run["results"]):
            groups[(dataset, run["identity_sha"])].append(run)
    tables = {}
    for (dataset, sha), members in sorted(groups.items(), key=lambda kv: kv[0]):
        etype = next((r["evaluator_types"].get(dataset) for r in members
                      if r["evaluator_types"].get(dataset)), None)
        seen = [r["results"][dataset] for r in members if r["results"].get(dataset)]
        etype = etype \
            or next((guess_evaluator_type(s) for s in seen if guess_evaluator_type(s)), None)
        columns = columns_for(etype, seen)
        rows, failures = {}, []
        for run in sorted(members,
                          key=lambda r: (_row_order(r["init"], baseline), str(r["seed"]),
                                         r["dir"])):
            values = _seed_values(run, dataset, columns)
            row = rows.setdefault(run["init"], {"guessed": False, "config_files": [], "seeds": []})
            row["guessed"] |= run["guessed"]
            if run["config_file"] not in row["config_files"]:
                row["config_files"].append(run["config_file"])
            row["seeds"].append({"dir": run["dir"], "seed": run["seed"], "values": values})
            failure = _failure(run, dataset, values)
            if failure:
                failures.append(failure)
        for row in rows.values():
            row["cells"] = {c.key: describe([s["values"][c.key] for s in row["seeds"]
                                             if s["values"][c.key] is not None]) for c in columns}
        base = rows.get(baseline)
        for init, row in rows.items():
            row["deltas"] = {}
            if base is not None and init != baseline:
                for c in columns:
                    cell, ref = row["cells"][c.key], base["cells"][c.key]
                    if cell["n"] and ref["n"]:
                        row["deltas"][c.key] = (welch_interval(cell, ref)
                                                or {"diff": cell["mean"] - ref["mean"], "low": None,
                                                    "high": None, "df": None, "significant": None})
        identity = members[0]["identity"]
        official, published = published_for(identity)
        tables[f"{dataset} {sha}"] = {
            "dataset": dataset, "identity_sha": sha, "identity": identity, "evaluator_type": etype,
            "header": describe_experiment(identity, dataset), "title": describe_identity(identity),
            "columns": [c.__dict__ | {"key": c.key} for c in columns], "rows": rows,
            "baseline": baseline if base is not None else None, "failures": failures,
            "official_config": official,
            "published": [{"name": n, "values": v, "source": s} for n, v, s in published],
        }
    for table in tables.values():  # say what separates tables of the same test dataset
        others = [t for t in tables.values() if t["dataset"] == table["dataset"] and t is not table]
        table["differs_in"] = sorted({k for o in others
                                      for k in run_record.identity_diff(o["identity"],
                                                                        table["identity"])})
    return tables


# --------------------------------------------------------------------------------------------------
# markdown, json, csv

def _decimals(table):
    """1 decimal as in the paper's tables; 2 when every mean is below 1 AP (a smoke-test run),
    where 0.1 steps would print most cells and differences as 0.0."""
    means = [c["mean"] for row in table["rows"].values() for c in row["cells"].values() if c["n"]]
    return 2 if means and max(abs(m) for m in means) < 1.0 else 1


def _cell_text(cell, delta, d=1):
    if not cell["n"]:
        return "–"
    text = f"{cell['mean']:.{d}f} (n=1)" if cell["n"] == 1 else \
        f"{cell['mean']:.{d}f} ± {cell['std']:.{d}f} (n={cell['n']})"
    if delta is not None:
        if delta["low"] is None:
            text += f", Δ {delta['diff']:+.{d}f} (no CI)"
        else:
            text += f", Δ {delta['diff']:+.{d}f} [{delta['low']:+.{d}f}, {delta['high']:+.{d}f}]"
            text += "*" if delta["significant"] else ""
    return text


def to_markdown(tables, problems, baseline=BASELINE) -> str:
    out = ["# Transfer results", ""]
    for i, table in enumerate(tables.values(), 1):
        cols = table["columns"]
        out += [f"## {i}. {table['header']}", "", f"{table['title']}", ""]
        for j, other in enumerate(tables.values(), 1):
            if other is table or other["dataset"] != table["dataset"]:
                continue
            keys = run_record.identity_diff(table["identity"], other["identity"])
            shown = [f"{k} = {_short(table['identity'].get(k))} here, "
                     f"{_short(other['identity'].get(k))} there"
                     for k in keys[:6]]
            out += [f"Not averaged with table {j} (also {table['dataset']}): the configs differ in "
                    f"{'; '.join(shown)}{'; ...' if len(keys) > 6 else ''}.", ""]
        out += ["| pre-train | " + " | ".join(c["title"] for c in cols) + " | config file |",
                "|---|" + "---|" * len(cols) + "---|"]
        guessed = False
        for init, row in table["rows"].items():
            name = init + (" ‡" if row["guessed"] else "")
            guessed |= row["guessed"]
            cells = [_cell_text(row["cells"][c["key"]], row["deltas"].get(c["key"]),
                                _decimals(table)) for c in cols]
            out.append(f"| {name} | " + " | ".join(cells)
                       + f" | {', '.join(row['config_files'])} |")
        out.append("")
        notes = ["Mean ± sample std over the valid seeds (n); n=1: the single value, no std."]
        if table["baseline"]:
            notes.append(f"Δ: difference of means to the `{table['baseline']}` row with its "
                         f"{CONFIDENCE:.0%} confidence interval (Welch's t-test: unequal "
                         "variances, Welch–Satterthwaite degrees of freedom); * the interval "
                         "excludes 0. No CI when either row has n < 2 (or zero variance).")
        else:
            notes.append(f"No `{baseline}` row in this table, so no differences (choose one with "
                         "--baseline NAME).")
        if guessed:
            notes.append("‡ row name guessed from the MODEL.WEIGHTS file name (a plain detectron2 "
                         "directory, or a run whose init name was neither given with --init-name "
                         "nor inferred from its weights' record chain).")
        out += [" ".join(notes), ""]
        if table["failures"]:
            out += ["Seeds left out of a mean:", ""]
            out += [f"- `{f['dir']}` ({f['init']}, seed {f['seed']}): {f['why']}"
                    for f in table["failures"]]
            out.append("")
        if table["published"]:
            out += [f"**Published** for this config ({table['official_config']}): what a faithful "
                    "reproduction should be near (means of 5 trials).", "",
                    "| published pre-train | " + " | ".join(c["title"] for c in cols)
                    + " | source |",
                    "|---|" + "---|" * len(cols) + "---|"]
            for p in table["published"]:
                vals = [f"{p['values'][c['key']]:.1f}" if c["key"] in p["values"] else "–"
                        for c in cols]
                out.append(f"| {p['name']} | " + " | ".join(vals) + f" | {p['source']} |")
            out.append("")
    if problems:
        out += ["## Not read", ""]
        out += [f"- `{p['path']}`: {p['why']}" for p in problems]
        out.append("")
    return "\n".join(out)


def write_csv(tables, path):
    from mocobench.utils.fileio import atomic_write

    with atomic_write(path, "w") as f:
        writer = csv.writer(f)
        writer.writerow(["dataset", "config", "init", "seed", "metric", "value", "dir"])
        for t in tables.values():
            for init, row in t["rows"].items():
                for s in row["seeds"]:
                    for key, value in s["values"].items():
                        writer.writerow([t["dataset"], t["identity_sha"], init, s["seed"], key,
                                         "" if value is None else value, s["dir"]])


# --------------------------------------------------------------------------------------------------
# plots

# the plots are drawn from the tables above (mutation-tested); their styling (colours, sizes,
# titles, legends) is looked at, not asserted, so `make mutation` leaves the figure functions out.
# What is asserted (tests/test_report_plots.py): one quantity per axis, and readable tick labels.

def _pyplot():  # pragma: no mutate block
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fixed_decimal_axis(ax, values, decimals, signed=False):  # pragma: no mutate block
    """y limits around `values` (and 0 when signed) at least a few display steps wide, ticks at
    steps of 1, 2 or 5 x 10^k, labelled with `decimals` decimals and no offset or scientific
    notation: an all-zero difference axis reads 0, not "1e-17" (matplotlib's limits around a single
    value are of the order of float noise)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    values = [v for v in values if v is not None and math.isfinite(v)] + ([0.0] if signed else [])
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    pad = max((high - low) * 0.15, 5 * 10.0 ** -decimals)
    ax.set_ylim(low - pad, high + pad)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 5, 10]))

    def label(value, _):
        value = round(value, decimals) + 0.0  # -0.0 -> 0.0
        if value == 0:
            return "0"
        return f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"

    ax.yaxis.set_major_formatter(FuncFormatter(label))


def ap_figure(tables):  # pragma: no mutate block
    """The AP figure: per table, the seeds' values and means (left), the differences to the
    baseline with their intervals (right)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(tables), 2, figsize=(13, 4.2 * len(tables)), squeeze=False)
    for number, ((ax, dax), table) in enumerate(zip(axes, tables.values()), 1):
        cols, inits = table["columns"], list(table["rows"])
        width = 0.8 / max(len(inits), 1)
        plotted, differences = [], []
        for i, init in enumerate(inits):
            row = table["rows"][init]
            color = f"C{i}"
            ns = sorted({row["cells"][c["key"]]["n"] for c in cols})
            n_text = f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}–{ns[-1]}"
            for j, c in enumerate(cols):
                x = j + (i - (len(inits) - 1) / 2) * width
                values = [s["values"][c["key"]] for s in row["seeds"]
                          if s["values"][c["key"]] is not None]
                plotted += values
                ax.scatter([x] * len(values), values, s=14, color=color, alpha=0.6,
                           label=f"{init} ({n_text})" if j == 0 else None)
                cell = row["cells"][c["key"]]
                if cell["n"] >= 2:
                    ax.errorbar(x + width * 0.25, cell["mean"], yerr=cell["std"], fmt="_",
                                color=color, markersize=12, capsize=4, elinewidth=1.5)
                    plotted += [cell["mean"] - cell["std"], cell["mean"] + cell["std"]]
                delta = row["deltas"].get(c["key"])
                if delta is not None and delta["low"] is not None:
                    err = [[delta["diff"] - delta["low"]], [delta["high"] - delta["diff"]]]
                    dax.errorbar(x, delta["diff"], yerr=err, fmt="o", color=color, capsize=4,
                                 label=init if j == 0 else None)
                    differences += [delta["low"], delta["high"]]
                elif delta is not None:
                    dax.scatter([x], [delta["diff"]], marker="x", color=color,
                                label=f"{init} (no CI)" if j == 0 else None)
                    differences.append(delta["diff"])
        for a in (ax, dax):
            a.set_xticks(range(len(cols)))
            a.set_xticklabels([c["title"] for c in cols])
            a.set_xlim(-0.6, len(cols) - 0.4)
        decimals = _decimals(table)
        fixed_decimal_axis(ax, plotted, decimals)
        ax.set_ylabel("AP (%)")
        ax.set_title(f"{number}. {table['header']}", fontsize=10)
        ax.legend(fontsize=8)
        dax.axhline(0.0, color="0.3", linewidth=1)
        fixed_decimal_axis(dax, differences, decimals, signed=True)
        dax.set_ylabel("Δ AP (points)")
        if table["baseline"]:
            dax.set_title(f"difference to {table['baseline']}, {CONFIDENCE:.0%} Welch CI",
                          fontsize=10)
            if any(row["deltas"] for row in table["rows"].values()):
                dax.legend(fontsize=8)
        else:
            dax.set_title("no baseline row: no differences", fontsize=10)
    fig.text(0.01, 0.005, "left: dots = seeds, bar = mean ± sample std (n ≥ 2); right: mean "
             f"difference to the baseline with its {CONFIDENCE:.0%} Welch confidence interval (x: "
             "n < 2, no interval)", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def plot_ap(tables, path):  # pragma: no mutate block
    fig = ap_figure(tables)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def _pretrain_kind(rows):
    if any("moco_m" in r for r in rows):  # MoCo logs the key encoder's momentum
        return "MoCo"
    if any("epoch" in r and "acc1" in r for r in rows):
        return "supervised"
    return None


def find_pretrain_runs(paths, runs=()):
    """[(dir, rows, label)]: pretraining runs under the paths (searched), and the runs the records'
    weights were converted from, named by the init that used them."""
    labels = {}
    for run in runs:
        info = run.get("weights_info") or {}
        # whatever the converter wrote down (its report beside the .pkl, the .pkl's metadata): a
        # path to an existing checkpoint file leads to the pretraining run it came from
        report = {k: v for k, v in (info.get("converter_report") or {}).items() if k != "path"}
        values = [*report.values(), *(info.get("metadata") or {}).values()]
        values += [x for v in values if isinstance(v, dict) for x in v.values()]
        for value in values:
            if isinstance(value, str) and os.path.isfile(value):
                labels.setdefault(os.path.realpath(os.path.dirname(value)), run["init"])
    candidates = [d for top in paths for d, _, files in os.walk(top) if "metrics.json" in files]
    found, seen = [], set()
    for directory in sorted(candidates) + [d for d in labels
                                           if os.path.isfile(os.path.join(d, "metrics.json"))]:
        real = os.path.realpath(directory)
        if real in seen:
            continue
        seen.add(real)
        rows, _ = _read_json_lines(os.path.join(directory, "metrics.json"))
        kind = _pretrain_kind(rows or [])
        if kind:
            name = labels.get(real) or os.path.basename(os.path.normpath(directory))
            found.append((directory, rows,
                          name if name.lower() == kind.lower() else f"{name} ({kind})"))
    return found


def pretrain_curves(rows):
    """Per-epoch mean loss and acc@1, and held-out top-1 (kNN for MoCo, val for supervised) where
    measured."""
    per_epoch = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if "epoch" not in r:
            continue
        for key in ("loss", "acc1", "knn_top1", "val_top1"):
            if isinstance(r.get(key), (int, float)):
                per_epoch[r["epoch"]][key].append(r[key])
    curves = defaultdict(list)
    for epoch in sorted(per_epoch):
        for key, values in per_epoch[epoch].items():
            curves[key].append((epoch, sum(values) / len(values)))
    return dict(curves)


# one quantity per axis: a row of axes per kind of pretraining, since MoCo's InfoNCE loss and
# instance-discrimination accuracy are other quantities than a classifier's cross-entropy and
# accuracy (and its kNN top-1 another estimate than a trained classifier's val top-1)
PRETRAIN_PANELS = {
    "MoCo": (("loss", "InfoNCE loss"), ("acc1", "instance discrimination acc@1 (%)"),
             ("knn_top1", "kNN top-1 on val (%)")),
    "supervised": (("loss", "cross-entropy loss"), ("acc1", "training acc@1 (%)"),
                   ("val_top1", "val top-1 (%)")),
}


def pretrain_figure(found):  # pragma: no mutate block (styling, see ap_figure)
    """Training curves per epoch: a row of three axes (loss, training acc@1, held-out top-1) for
    each kind of pretraining among `found` (find_pretrain_runs), every axis one quantity."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    kinds = [k for k in PRETRAIN_PANELS if any(_pretrain_kind(rows) == k for _, rows, _ in found)]
    fig, axes = plt.subplots(len(kinds), 3, figsize=(15, 3.8 * len(kinds)), squeeze=False)
    last = max((r["epoch"] for _, rows, _ in found for r in rows
                if isinstance(r.get("epoch"), int)), default=1)
    for row_axes, kind in zip(axes, kinds):
        for ax, (key, quantity) in zip(row_axes, PRETRAIN_PANELS[kind]):
            for i, (_, rows, label) in enumerate(found):
                curve = pretrain_curves(rows).get(key) if _pretrain_kind(rows) == kind else None
                if curve:
                    xs, ys = zip(*curve)
                    ax.plot(xs, ys, marker="o", color=f"C{i}", label=label)
            ax.set_title(f"{kind}: {quantity}", fontsize=9)
            ax.set_ylabel(quantity, fontsize=9)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            ax.set_xlim(0.5, last + 0.5)  # whole epochs, also for a single one
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center",
                        va="center", color="0.5")
    fig.tight_layout()
    return fig


def plot_pretrain(found, path):  # pragma: no mutate block (styling, see ap_figure)
    fig = pretrain_figure(found)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


# --------------------------------------------------------------------------------------------------
# the entry points

def check_baseline(tables, baseline):
    """UsageError unless `baseline` is a row of some table (when there are tables)."""
    rows = sorted({init for t in tables.values() for init in t["rows"]})
    if rows and baseline not in rows:
        raise UsageError(f"--baseline {baseline!r} names no row of the report; its rows are "
                         f"{', '.join(map(repr, rows))}")


def write_report(paths, out_dir, baseline=None, plots=True) -> dict:
    """Read, tabulate and write report.md/.json/.csv and the plots (unless `plots` is False: a
    partial report while trials still run); UsageError when no table could be made, or when a
    `baseline` given (None: BASELINE, which a table may lack) is no row."""
    from mocobench.utils.fileio import atomic_write

    runs, problems = find_runs(paths)
    tables = summarize(runs, baseline or BASELINE)
    pretrain = find_pretrain_runs(paths, runs)
    usable = any(c["n"] for t in tables.values() for row in t["rows"].values()
                 for c in row["cells"].values())
    if not usable and not pretrain:
        failed = [f"{f['dir']}: {f['why']}" for t in tables.values() for f in t["failures"]]
        unread = [f"{p['path']}: {p['why']}" for p in problems]
        shown = "; ".join((unread + failed)[:3])
        raise UsageError(
            f"no transfer results under {', '.join(map(repr, paths))}: expected run directories "
            "with results.json (mocobench transfer) or a detectron2 config.yaml + metrics.json, or "
            "pretraining runs"
            + (f" ({len(unread)} unreadable, {len(failed)} without results: {shown})" if shown
               else ""))
    if baseline is not None:
        check_baseline(tables, baseline)  # before anything is written
    baseline = baseline or BASELINE
    os.makedirs(out_dir, exist_ok=True)
    markdown = to_markdown(tables, problems, baseline)
    files = ["report.md", "report.json", "report.csv"]
    with atomic_write(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown)
    with atomic_write(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump({"baseline": baseline, "confidence": CONFIDENCE, "tables": tables,
                   "not_read": problems}, f, indent=2)
    write_csv(tables, os.path.join(out_dir, "report.csv"))
    if tables and plots:
        plot_ap(tables, os.path.join(out_dir, "ap.png"))
        files.append("ap.png")
    if pretrain and plots:
        plot_pretrain(pretrain, os.path.join(out_dir, "pretrain.png"))
        files.append("pretrain.png")
    return {"tables": tables, "not_read": problems, "markdown": markdown,
            "files": [os.path.join(out_dir, f) for f in files]}


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="mocobench report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories (searched recursively)")
    parser.add_argument("--out", default=None,
                        help="where to write report.md/.json/.csv and the plots (default: the "
                             "first RUN_DIR)")
    parser.add_argument("--baseline", default=None, metavar="NAME",
                        help=f"the init name the differences are taken to (default: {BASELINE}); "
                             "a NAME that is no row of the report is an error")
    args = parser.parse_args(argv)
    summary = write_report(args.run_dirs, args.out or args.run_dirs[0], args.baseline)
    print(summary["markdown"])
    print("wrote " + ", ".join(summary["files"]))
    return 0
