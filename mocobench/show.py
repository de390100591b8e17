"""`mocobench show PATH`: what a run directory, checkpoint, converted .pkl (or its .json report) or
transfer run is, how it was made, its config, the sha256 of its files, its results, and the chain of
files it came from as far as they record it (a transfer record names its weights, a .pkl's report
its input checkpoint, a checkpoint its run). Reads checkpoints only through the safe loaders of
mocobench.utils.fileio; `--json` prints the same as one JSON object."""
import argparse
import json
import os

from mocobench.utils.errors import UsageError

EXPECTED = ("expected a pretrain / supervised / lincls run directory, a checkpoint (.pth.tar, "
            ".pth), a converted .pkl or its .json report, or a transfer run directory")
# the config lines shown without --config, per kind of config (flattened keys; absent ones skipped)
KEY_LINES = {
    "pretrain": ("MODEL.ARCH", "MOCO.VERSION", "MOCO.K", "MOCO.T", "MOCO.M", "MOCO.MLP",
                 "SOLVER.EPOCHS", "SOLVER.BATCH_SIZE", "SOLVER.BASE_LR", "SOLVER.OPTIMIZER",
                 "SOLVER.SCHEDULE", "INPUT.SIZE", "INPUT.AUG", "DATA.ROOT", "SEED", "DEVICE"),
    "supervised": ("MODEL.ARCH", "SOLVER.EPOCHS", "SOLVER.BATCH_SIZE", "SOLVER.BASE_LR",
                   "SOLVER.OPTIMIZER", "SOLVER.SCHEDULE", "INPUT.SIZE", "DATA.ROOT", "SEED",
                   "DEVICE"),
    "lincls": ("MODEL.ARCH", "LINCLS.PRETRAINED", "LINCLS.RECIPE", "LINCLS.LR",
               "LINCLS.MILESTONES", "SOLVER.EPOCHS", "SOLVER.BATCH_SIZE", "INPUT.SIZE",
               "DATA.ROOT", "SEED"),
    "detectron2": ("MODEL.META_ARCHITECTURE", "MODEL.BACKBONE.NAME", "MODEL.RESNETS.DEPTH",
                   "MODEL.RESNETS.NORM", "MODEL.ROI_HEADS.NAME", "MODEL.WEIGHTS", "DATASETS.TRAIN",
                   "DATASETS.TEST", "SOLVER.MAX_ITER", "SOLVER.IMS_PER_BATCH", "SOLVER.BASE_LR",
                   "SOLVER.STEPS", "INPUT.MIN_SIZE_TRAIN", "SEED"),
}
RUN_FILES = ("config.yaml", "last_checkpoint", "metrics.json", "lincls_results.json")
METRIC_KEYS = ("epoch", "loss", "acc1", "knn_top1", "val_top1", "val_loss", "train_top1")
CHAIN_DEPTH = 6


# --------------------------------------------------------------------------------------------------
# small readers

def _flatten(node, prefix=""):
    out = {}
    for key, value in (node or {}).items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _yaml_config(text, source):
    """A config YAML (text) as a nested dict; UsageError naming `source` when it is not one."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"{source}: not a readable config YAML ({str(e).splitlines()[0]})") \
            from None
    if not isinstance(data, dict):
        raise UsageError(f"{source}: not a config (a YAML {type(data).__name__}, expected a "
                         "mapping of config keys)")
    return data


def _read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _read_json(path):
    try:
        return json.loads(_read_text(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path!r} is not a JSON file ({e}); {EXPECTED}") from None


def _json_lines(path):
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line a kill cut in half
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _config_kind(flat):
    if "MODEL.META_ARCHITECTURE" in flat:
        return "detectron2"
    if flat.get("LINCLS.PRETRAINED"):
        return "lincls"
    return "pretrain"


def _file_entry(path, label=None):
    from mocobench.utils.fileio import file_sha256

    return {"path": os.path.abspath(path), "name": label or os.path.basename(path),
            "bytes": os.path.getsize(path), "sha256": file_sha256(path)}


def _new(path, kind, what):
    return {"path": os.path.abspath(path), "kind": kind, "what": what, "arch": None,
            "source": None, "epochs": None, "iterations": None, "config_kind": None,
            "config": {}, "config_text": None, "files": [], "results": {}, "links": [],
            "notes": []}


def _link(relation, path, recorded_sha256=None):
    return {"relation": relation, "path": os.path.abspath(path) if path else path,
            "recorded_sha256": recorded_sha256}


def _set_config(info, text, source):
    data = _yaml_config(text, source)
    info["config_text"] = text
    info["config"] = _flatten(data)
    info["config_kind"] = _config_kind(info["config"])


# --------------------------------------------------------------------------------------------------
# checkpoints

def _state_keys(obj):
    for name in ("state_dict", "model"):
        if isinstance(obj.get(name), dict):
            return [str(k) for k in obj[name]]
    return [str(k) for k in obj]


def _moco_version(keys, config):
    if any(".base_encoder." in f".{k}" for k in keys):
        return "v3"
    if config.get("MOCO.VERSION"):
        return config["MOCO.VERSION"]
    return "v2" if any(k.endswith("encoder_q.fc.0.weight") for k in keys) else "v1"


def describe_checkpoint(path, shallow=False):
    """A torch checkpoint: ours (pretrain / supervised / lincls), an official MoCo one, a plain
    state dict or a detectron2 training checkpoint."""
    import torch

    from mocobench.utils.fileio import load_checkpoint

    obj = load_checkpoint(path)
    if not isinstance(obj, dict) or not obj:
        raise UsageError(f"{path!r} holds a {type(obj).__name__}, not a checkpoint dict; "
                         f"{EXPECTED}")
    keys = _state_keys(obj)
    info = _new(path, "checkpoint", "checkpoint")
    if isinstance(obj.get("config"), str):
        _set_config(info, obj["config"], f"{path}: entry 'config'")
    flat = info["config"]
    tensors = all(isinstance(v, torch.Tensor) for v in obj.values())
    moco = any(".encoder_q." in f".{k}" or ".base_encoder." in f".{k}" for k in keys)
    if "config" in obj and "iteration" in obj:
        if moco:
            version = _moco_version(keys, flat)
            info["what"] = f"MoCo {version} pretraining checkpoint (mocobench pretrain)"
            info["config_kind"] = "pretrain"
        elif info["config_kind"] == "lincls":
            info["what"] = "linear classification checkpoint (mocobench lincls)"
        else:
            info["what"] = "supervised pretraining checkpoint (mocobench supervised)"
            info["config_kind"] = "supervised"
    elif "state_dict" in obj and moco:
        info["what"] = (f"MoCo {_moco_version(keys, {})} checkpoint in the official layout "
                        "(main_moco.py; no mocobench config)")
    elif "model" in obj and "iteration" in obj and any(k.startswith("backbone.") for k in keys):
        info["what"] = "detectron2 training checkpoint (mocobench transfer / DefaultTrainer)"
    elif tensors:
        info["what"] = "plain state dict (torchvision layout)" \
            if "conv1.weight" in obj and "fc.weight" in obj else "plain state dict"
    info["epochs"] = obj.get("epoch") if isinstance(obj.get("epoch"), int) else None
    info["iterations"] = obj.get("iteration") if isinstance(obj.get("iteration"), int) else None
    info["arch"] = obj.get("arch") if isinstance(obj.get("arch"), str) else flat.get("MODEL.ARCH")
    info["entries"] = sorted(str(k) for k in obj)
    _trunk_source(info, obj, path)
    if not shallow:
        info["files"].append(_file_entry(path))
    _checkpoint_context(info, path, obj, shallow)
    return info


def _trunk_source(info, obj, path):
    """Source, author and architecture as `mocobench convert` would read them."""
    from convert.sources import extract_trunk, flatten_checkpoint

    try:
        trunk = extract_trunk(flatten_checkpoint(obj, path))
    except UsageError as e:
        info["notes"].append(f"no ResNet trunk that `mocobench convert` reads: {e}")
        return
    arch = trunk.arch.torchvision_name or trunk.arch.name
    info["source"] = f"{trunk.source} (__author__ {trunk.author!r}, trunk under {trunk.prefix!r})"
    info["arch"] = info["arch"] or arch
    info["trunk"] = {"source": trunk.source, "author": trunk.author, "prefix": trunk.prefix,
                     "architecture": trunk.arch.as_dict()}


def _checkpoint_context(info, path, obj, shallow):
    """The run directory a checkpoint sits in (its metrics at the checkpoint's iteration), the
    checkpoint a lincls one was trained on, the convert report of a converted .pth."""
    directory = os.path.dirname(os.path.abspath(path))
    if info["config"].get("LINCLS.PRETRAINED"):
        info["links"].append(_link("linear classifier on", info["config"]["LINCLS.PRETRAINED"]))
    report = _convert_report_beside(path)
    if report is not None:
        info["what"] = f"torchvision weights written by `mocobench convert` ({info['what']})"
        _add_report(info, report, shallow)
    if os.path.isfile(os.path.join(directory, "config.yaml")) and "config" in obj:
        info["links"].append(_link("written by run", directory))
        rows = _json_lines(os.path.join(directory, "metrics.json"))
        at = [r for r in rows if info["iterations"] is None
              or r.get("iteration", 0) <= info["iterations"]]
        info["results"].update(_latest_metrics(at, "at this checkpoint"))


def _latest_metrics(rows, label="latest"):
    """The last training line (loss, acc1) and the last held-out top-1 of metrics.json rows."""
    out = {}
    trained = [r for r in rows if "loss" in r]
    if trained:
        out[f"{label}: training (metrics.json)"] = \
            {k: trained[-1][k] for k in ("iteration", *METRIC_KEYS) if k in trained[-1]}
    for key in ("knn_top1", "val_top1"):
        held = [r for r in rows if isinstance(r.get(key), (int, float))]
        if held:
            out[f"{label}: {key} (metrics.json)"] = {"epoch": held[-1].get("epoch"),
                                                     key: held[-1][key]}
    return out


# --------------------------------------------------------------------------------------------------
# converted .pkl and its report

def _is_convert_report(data):
    return isinstance(data, dict) and \
        {"input", "input_sha256", "output", "architecture"} <= set(data)


def _convert_report_beside(path):
    """{"path", "data"} of the OUT.json `mocobench convert` wrote beside OUT.pkl / OUT.pth, if it
    names this file."""
    from convert.api import report_path

    candidate = report_path(path)
    if candidate == os.fspath(path) or not os.path.isfile(candidate):
        return None
    try:
        data = json.loads(_read_text(candidate))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not _is_convert_report(data) or not data.get("output") \
            or os.path.abspath(data["output"]) != os.path.abspath(path):
        return None
    return {"path": candidate, "data": data}


def _add_report(info, report, shallow):
    """The convert report beside a converted file: its sha256 among the files, its input as the
    next link of the chain."""
    info["convert_report"] = os.path.abspath(report["path"])
    if not shallow:
        info["files"].append(_file_entry(report["path"]))
    recorded = report["data"].get("output_sha256")
    if info["files"] and recorded and recorded != info["files"][0]["sha256"]:
        info["notes"].append(f"its sha256 differs from the one its report recorded "
                             f"({recorded[:12]}...): the file changed after conversion")
    _add_report_links(info, report["data"])


def _add_report_links(info, report):
    info["links"].append(_link("converted from", report["input"], report.get("input_sha256")))
    info["source"] = info["source"] or (f"{report.get('source')} (__author__ "
                                        f"{report.get('author')!r}, trunk under "
                                        f"{report.get('prefix')!r})")
    info["conversion"] = {k: report.get(k) for k in ("source", "detected", "prefix", "author",
                                                     "converted", "verified", "max_rel_error",
                                                     "format")}


def describe_pkl(path, shallow=False):
    from mocobench.utils.converted import read_converted

    data = read_converted(path)
    ours = isinstance(data.get("resnets"), dict)
    info = _new(path, "converted backbone" if ours else "detectron2 weights",
                "converted backbone for detectron2 (mocobench convert)" if ours
                else "detectron2 weights .pkl (no architecture recorded: not from mocobench "
                     "convert)")
    info["arch"] = data.get("architecture")
    info["source"] = f"__author__ {data.get('__author__')!r}" if "__author__" in data else None
    info["tensors"] = len(data["model"])
    if ours:
        info["resnets"] = dict(data["resnets"])
        info["config"] = {f"MODEL.RESNETS.{k}": v for k, v in data["resnets"].items()}
    if not shallow:
        info["files"].append(_file_entry(path))
    report = _convert_report_beside(path)
    if report is None:
        info["notes"].append("no convert report (OUT.json) beside it names this file: its input "
                             "is not recorded")
    else:
        if info["source"] and info["source"].startswith("__author__"):
            info["source"] = (f"{report['data'].get('source')} ({info['source']}, trunk under "
                              f"{report['data'].get('prefix')!r})")
        _add_report(info, report, shallow)
    return info


def describe_convert_report(path, data, shallow=False):
    arch = data.get("architecture") if isinstance(data.get("architecture"), dict) else {}
    info = _new(path, "convert report", f"report of `mocobench convert` ({data.get('format')} "
                f"output, verified {data.get('verified')})")
    info["arch"] = arch.get("torchvision") or arch.get("name")
    info["source"] = (f"{data.get('source')} (__author__ {data.get('author')!r}, trunk under "
                      f"{data.get('prefix')!r})")
    info["config"] = {f"MODEL.RESNETS.{k}": v
                      for k, v in (data.get("detectron2_resnets") or {}).items()}
    info["conversion"] = {k: data.get(k) for k in ("source", "detected", "prefix", "author",
                                                   "converted", "verified", "max_rel_error",
                                                   "format")}
    if not shallow:
        info["files"].append(_file_entry(path))
    if data.get("output"):
        info["links"].append(_link("report of", data["output"], data.get("output_sha256")))
    info["links"].append(_link("converted from", data["input"], data.get("input_sha256")))
    return info


# --------------------------------------------------------------------------------------------------
# transfer: run records, trial directories, OUTPUT_DIR

def _record_results(record):
    return {dataset: {task: {m: v for m, v in metrics.items()}
                      for task, metrics in tasks.items()}
            for dataset, tasks in record["results"].items()}


def _weights_links(info, record):
    weights = record.get("weights")
    winfo = record.get("weights_info") or {}
    if weights:
        info["links"].append(_link("fine-tuned from", weights, winfo.get("sha256")))
    else:
        info["notes"].append("MODEL.WEIGHTS empty: trained from random initialisation")


def describe_record(path, record, shallow=False):
    """One transfer trial (its results.json / results_eval.json)."""
    info = _new(path, "transfer trial", f"transfer trial {record['trial']} (seed "
                f"{record['seed']}) of `mocobench transfer`, init {record['init_name']!r}")
    _record_common(info, record)
    info["results"] = {f"seed {record['seed']}": _record_results(record)}
    if not shallow:
        info["files"].append(_file_entry(path))
    _weights_links(info, record)
    return info


def _record_common(info, record):
    winfo = record.get("weights_info") or {}
    info["arch"] = winfo.get("architecture") \
        or f"ResNet-{record['identity'].get('MODEL.RESNETS.DEPTH', '?')}"
    info["source"] = f"init {record['init_name']!r} from {record['weights'] or 'random init'}"
    info["iterations"] = record.get("iteration")
    info["config"] = {**record["identity"], **record["init_config"]}
    info["config_kind"] = "detectron2"
    info["config_file"] = record["config_file"]
    info["opts"] = record["opts"]
    info["schedule"] = record["schedule"]


def describe_transfer_dir(path, shallow=False):
    """A `mocobench transfer` OUTPUT_DIR (seed*/results.json, summary.json) or one trial
    directory."""
    from transfer import record as run_record

    if os.path.isfile(os.path.join(path, run_record.RESULTS_FILE)) or \
            os.path.isfile(os.path.join(path, run_record.EVAL_FILE)):
        name = run_record.RESULTS_FILE \
            if os.path.isfile(os.path.join(path, run_record.RESULTS_FILE)) else run_record.EVAL_FILE
        info = describe_record(os.path.join(path, name),
                               run_record.read_record(os.path.join(path, name)), shallow)
        info["path"] = os.path.abspath(path)
        _d2_trial_files(info, path, shallow)
        return info
    found = run_record.trial_records(path)
    records = [(d, r) for d, r in found if isinstance(r, dict)]
    summary_path = os.path.join(path, "summary.json")
    info = _new(path, "transfer run", f"`mocobench transfer` run: {len(records)} finished "
                f"trial(s) ({', '.join(os.path.basename(d) for d, _ in records) or 'none'})")
    for directory, problem in found:
        if not isinstance(problem, dict):
            info["notes"].append(f"{os.path.basename(directory)}: unreadable record: {problem}")
    if records:
        first = records[0][1]
        _record_common(info, first)
        inits = sorted({str(r["init_name"]) for _, r in records})
        info["source"] = f"init {', '.join(inits)} from {first['weights'] or 'random init'}"
        info["results"] = {f"{os.path.basename(d)} (seed {r['seed']})": _record_results(r)
                           for d, r in records}
        if len(records) > 1:
            info["results"]["mean ± std over trials"] = _summarize(records)
        _weights_links(info, first)
        if len({r["weights"] for _, r in records}) > 1:
            info["notes"].append("the trials were fine-tuned from different weights")
    if not shallow:
        if os.path.isfile(summary_path):
            info["files"].append(_file_entry(summary_path))
        for directory, _ in records:
            info["files"].append(_file_entry(os.path.join(directory, run_record.RESULTS_FILE),
                                             f"{os.path.basename(directory)}/"
                                             f"{run_record.RESULTS_FILE}"))
    return info


def _summarize(records):
    from transfer.stats import describe

    values = {}
    for _, rec in records:
        for dataset, tasks in rec["results"].items():
            for task, metrics in tasks.items():
                for name, value in metrics.items():
                    bucket = values.setdefault(dataset, {}).setdefault(f"{task}/{name}", [])
                    if value is not None:
                        bucket.append(float(value))
    return {dataset: {k: describe(v) for k, v in metrics.items()}
            for dataset, metrics in values.items()}


def _d2_trial_files(info, directory, shallow):
    pointer = os.path.join(directory, "last_checkpoint")
    if os.path.isfile(pointer):
        name = _read_text(pointer).strip()
        info["last_checkpoint"] = name
        if not shallow and os.path.isfile(os.path.join(directory, name)):
            info["files"].append(_file_entry(os.path.join(directory, name)))


# --------------------------------------------------------------------------------------------------
# pretrain / supervised / lincls run directories

def describe_run_dir(path, shallow=False):
    from mocobench.utils.fileio import load_checkpoint

    config_path = os.path.join(path, "config.yaml")
    info = _new(path, "run", "run directory")
    if os.path.isfile(config_path):
        _set_config(info, _read_text(config_path), config_path)
    flat = info["config"]
    rows = _json_lines(os.path.join(path, "metrics.json"))
    lincls_path = os.path.join(path, "lincls_results.json")
    latest = _latest_checkpoint(path)
    kind = info["config_kind"]
    if kind == "detectron2":  # a detectron2 output directory without a mocobench run record
        return _describe_plain_d2_dir(info, path, rows, shallow)
    # the same config keys for both: MoCo logs the key encoder's momentum, else its weights tell
    if os.path.isfile(lincls_path) or kind == "lincls":
        kind = "lincls"
    elif rows:
        kind = "pretrain" if any("moco_m" in r for r in rows) else "supervised"
    elif latest:
        obj = load_checkpoint(latest)
        keys = _state_keys(obj) if isinstance(obj, dict) else []
        kind = "pretrain" if any(".encoder_q." in f".{k}" or ".base_encoder." in f".{k}"
                                 for k in keys) else "supervised"
    info["config_kind"] = kind
    info["kind"] = f"{kind} run"
    info["what"] = {
        "pretrain": f"MoCo {flat.get('MOCO.VERSION', '?')} pretraining run (mocobench pretrain)",
        "supervised": "supervised pretraining run (mocobench supervised)",
        "lincls": "linear classification run (mocobench lincls)"}[kind]
    info["arch"] = flat.get("MODEL.ARCH")
    info["source"] = f"mocobench {kind}"
    if flat.get("SOLVER.EPOCHS") is not None:
        done = max((r["epoch"] for r in rows if isinstance(r.get("epoch"), (int, float))),
                   default=0)
        info["epochs"] = f"{done:g} of {flat['SOLVER.EPOCHS']}"
    info["iterations"] = max((r["iteration"] for r in rows if isinstance(r.get("iteration"), int)),
                             default=None)
    info["results"].update(_latest_metrics(rows))
    if os.path.isfile(lincls_path):
        data = _read_json(lincls_path)
        if isinstance(data, dict):
            info["results"]["lincls_results.json"] = {
                k: data[k] for k in ("top1", "top5", "best_top1", "epochs", "num_classes",
                                     "backbone_unchanged") if k in data}
            if data.get("pretrained"):
                info["links"].append(_link("linear classifier on", data["pretrained"]))
    elif flat.get("LINCLS.PRETRAINED"):
        info["links"].append(_link("linear classifier on", flat["LINCLS.PRETRAINED"]))
    if latest:
        info["latest_checkpoint"] = os.path.basename(latest)
    info["checkpoints"] = sorted(n for n in os.listdir(path)
                                 if n.startswith("checkpoint_") and n.endswith(".pth.tar"))
    if not shallow:
        for name in ("config.yaml", "metrics.json", "lincls_results.json"):
            if os.path.isfile(os.path.join(path, name)):
                info["files"].append(_file_entry(os.path.join(path, name)))
        if latest:
            info["files"].append(_file_entry(latest))
    if flat.get("DATA.ROOT"):
        info["data"] = flat["DATA.ROOT"]
    return info


def _describe_plain_d2_dir(info, path, rows, shallow):
    flat = info["config"]
    info["kind"] = "detectron2 run"
    info["what"] = ("detectron2 training directory without a mocobench run record (results.json): "
                    "written by plain detectron2, or a trial that has not finished")
    info["arch"] = f"ResNet-{flat.get('MODEL.RESNETS.DEPTH', '?')}"
    info["source"] = f"MODEL.WEIGHTS {flat.get('MODEL.WEIGHTS') or '(random init)'}"
    info["iterations"] = max((r["iteration"] for r in rows if isinstance(r.get("iteration"), int)),
                             default=None)
    evaluated = [r for r in rows if any("/AP" in k for k in r)]
    if evaluated:
        info["results"]["last evaluation (metrics.json)"] = \
            {k: v for k, v in evaluated[-1].items() if "/AP" in k or k == "iteration"}
    if not shallow and os.path.isfile(os.path.join(path, "config.yaml")):
        info["files"].append(_file_entry(os.path.join(path, "config.yaml")))
    _d2_trial_files(info, path, shallow)
    if flat.get("MODEL.WEIGHTS"):
        info["links"].append(_link("fine-tuned from", flat["MODEL.WEIGHTS"]))
    return info


def _latest_checkpoint(path):
    pointer = os.path.join(path, "last_checkpoint")
    if not os.path.isfile(pointer):
        return None
    name = _read_text(pointer).strip()
    full = os.path.join(path, name)
    return full if name and os.path.isfile(full) else None


# --------------------------------------------------------------------------------------------------
# dispatch and the chain

def _text_start(head):
    """The start of a text file (UTF-8, printable), or None for binary data."""
    for cut in range(4):  # the 64 bytes may end inside a multi-byte character
        try:
            text = head[:len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return text if all(c.isprintable() or c.isspace() for c in text) else None
    return None


def describe(path, shallow=False):
    """What `path` is: a dict (see format_text); UsageError when it is none of EXPECTED."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(f"{path!r} does not exist; {EXPECTED}")
    if os.path.isdir(path):
        names = set(os.listdir(path))
        from transfer import record as run_record

        if names & {run_record.RESULTS_FILE, run_record.EVAL_FILE, "summary.json"} or \
                run_record.trial_records(path):
            return describe_transfer_dir(path, shallow)
        if names & set(RUN_FILES):
            return describe_run_dir(path, shallow)
        raise UsageError(f"{path!r} is a directory but not a run: it holds none of "
                         f"{', '.join(RUN_FILES)}, results.json, summary.json or seed*/; "
                         f"{EXPECTED}")
    if not os.path.isfile(path):
        raise UsageError(f"{path!r} is not a regular file or directory; {EXPECTED}")
    if os.path.getsize(path) == 0:
        raise UsageError(f"{path!r} is empty (0 bytes); {EXPECTED}")
    if path.endswith(".json"):
        return _describe_json(path, shallow)
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:2] != b"PK" and head[:1] != b"\x80":
        text = _text_start(head)
        shown = repr(text[:30]) if text is not None else repr(head[:16])
        what = "a text file" if text is not None else "not a checkpoint or pickle"
        raise UsageError(f"{path!r} is {what} (it starts with {shown}); {EXPECTED}")
    if path.endswith(".pkl"):
        return describe_pkl(path, shallow)
    return describe_checkpoint(path, shallow)


def _describe_json(path, shallow):
    from transfer import record as run_record

    data = _read_json(path)
    if _is_convert_report(data):
        return describe_convert_report(path, data, shallow)
    if isinstance(data, dict) and data.get("format") == run_record.FORMAT:
        return describe_record(path, run_record.read_record(path), shallow)
    if isinstance(data, dict) and os.path.basename(path) in ("summary.json",
                                                             "lincls_results.json"):
        info = describe(os.path.dirname(os.path.abspath(path)), shallow)
        return info
    raise UsageError(f"{path!r} is JSON but not a convert report (OUT.json beside OUT.pkl) or a "
                     f"transfer run record (results.json); {EXPECTED}")


def _follow(link, seen):
    """One step of the chain: what the linked file is now, and whether it is the file that was
    recorded."""
    path = link["path"]
    step = {"relation": link["relation"], "path": path, "exists": bool(path)
            and os.path.exists(path), "kind": None, "what": None, "arch": None,
            "sha256": None, "recorded_sha256": link["recorded_sha256"], "matches": None,
            "links": []}
    if not step["exists"]:
        step["what"] = "no longer at this path"
        return step
    try:
        info = describe(path, shallow=True)
    except UsageError as e:
        step["what"] = f"unreadable: {e}"
        return step
    step.update(kind=info["kind"], what=info["what"], arch=info["arch"])
    for key in ("epochs", "iterations", "data"):
        if info.get(key) is not None:
            step[key] = info[key]
    if os.path.isfile(path):
        from mocobench.utils.fileio import file_sha256

        step["sha256"] = file_sha256(path)
        if link["recorded_sha256"]:
            step["matches"] = step["sha256"] == link["recorded_sha256"]
    step["links"] = [x for x in info["links"] if os.path.abspath(x["path"] or "") not in seen]
    return step


def provenance_chain(info):
    """The files `info` came from, outward: [{relation, path, kind, sha256, matches ...}]."""
    chain, seen = [], {info["path"]}
    pending = list(info["links"])
    while pending and len(chain) < CHAIN_DEPTH * 2:
        link = pending.pop(0)
        if not link["path"] or os.path.abspath(link["path"]) in seen:
            continue
        seen.add(os.path.abspath(link["path"]))
        step = _follow(link, seen)
        chain.append(step)
        pending = step.pop("links") + pending
    return chain


# --------------------------------------------------------------------------------------------------
# output

def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    if isinstance(value, dict):
        if set(value) >= {"mean", "std", "n"}:
            std = "-" if value["std"] is None else f"{value['std']:.2f}"
            return f"{value['mean']:.2f} ± {std} (n={value['n']})" \
                if value["mean"] is not None else f"NaN (n={value['n']})"
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return "NaN" if value is None else str(value)


def _results_lines(results):
    lines = []
    for label, value in results.items():
        nested = isinstance(value, dict) and value and \
            all(isinstance(v, dict) for v in value.values())
        if not nested:
            lines.append(f"    {label}: {_fmt(value)}")
            continue
        for dataset, tasks in value.items():
            inner = all(isinstance(v, dict) and not {"mean", "n"} <= set(v)
                        for v in tasks.values())
            shown = "; ".join(f"{task} {_fmt(m)}" for task, m in tasks.items()) if inner \
                else _fmt(tasks)
            lines.append(f"    {label} {dataset}: {shown}")
    return lines


def format_text(info, full_config=False):
    lines = [f"{info['path']}", f"  kind        {info['what']}"]
    for label, key in (("arch", "arch"), ("source", "source"), ("epochs", "epochs"),
                       ("iterations", "iterations"), ("data", "data"),
                       ("checkpoint", "latest_checkpoint"), ("report", "convert_report"),
                       ("config file", "config_file")):
        if info.get(key) is not None:
            lines.append(f"  {label:<11} {info[key]}")
    if info.get("checkpoints"):
        lines.append(f"  checkpoints {len(info['checkpoints'])}: "
                     f"{', '.join(info['checkpoints'][-3:])}")
    if info.get("conversion"):
        lines.append(f"  conversion  {_fmt(info['conversion'])}")
    if info.get("opts"):
        lines.append(f"  overrides   {' '.join(info['opts'])}")
    if info["config"]:
        if full_config and info["config_text"]:
            lines.append("  config (full)")
            lines += [f"    {line}" for line in info["config_text"].rstrip().splitlines()]
        else:
            keys = KEY_LINES.get(info["config_kind"] or "", ()) if not full_config else ()
            shown = [k for k in keys if k in info["config"]] or sorted(info["config"])
            lines.append("  config" + ("" if full_config or not keys
                                       else " (key lines; --config: all)"))
            lines += [f"    {k} {_fmt(info['config'][k])}" for k in shown]
    if info["results"]:
        lines.append("  results")
        lines += _results_lines(info["results"])
    if info["files"]:
        lines.append("  sha256")
        lines += [f"    {f['sha256']}  {f['name']} ({f['bytes']:,} bytes)" for f in info["files"]]
    if info.get("chain"):
        lines.append("  provenance")
        for depth, step in enumerate(info["chain"]):
            status = ""
            if step["recorded_sha256"]:
                status = ("  sha256 matches the record" if step["matches"] else
                          "  sha256 DIFFERS from the record" if step["matches"] is False else
                          "  (recorded sha256 " + step["recorded_sha256"][:12] + "...)")
            lines.append(f"    {'  ' * min(depth, 4)}<- {step['relation']} {step['path']}")
            detail = step["what"] + (f", {step['arch']}" if step["arch"] else "")
            for key in ("epochs", "iterations", "data"):
                if step.get(key) is not None:
                    detail += f", {key} {step[key]}"
            lines.append(f"    {'  ' * min(depth, 4)}   {detail}{status}")
    for note in info["notes"]:
        lines.append(f"  note        {note}")
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mocobench show", description=__doc__,
        epilog="Examples: mocobench show out/mocov2 ; mocobench show mocov2.pkl --json ; "
               "mocobench show out/mocov2/checkpoint_0199.pth.tar --config")
    parser.add_argument("path", help="a run directory (pretrain / supervised / lincls / transfer "
                                     "OUTPUT_DIR or a seed*/ trial), a checkpoint, a converted "
                                     ".pkl, its .json report, or a results.json")
    parser.add_argument("--config", action="store_true",
                        help="print the whole config, not its key lines")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object: kind, arch, source, config (every key), sha256 "
                             "of the files, results and the provenance chain")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    info = describe(args.path)
    info["chain"] = provenance_chain(info)
    if args.json:
        out = {k: v for k, v in info.items() if k not in ("links", "config_text")}
        if args.config and info["config_text"]:
            out["config_text"] = info["config_text"]
        print(json.dumps(out, indent=2, default=str))
    else:
        print(format_text(info, full_config=args.config))
    return 0
