"""Expected stage times, for the plan and the stage headers.

From this run's own measurements (the stage's earlier run, else a finished stage of the same kind),
else from the seconds per unit of the same work measured by an earlier pipeline on this machine,
kept in `stage_seconds.json` under $MOCOBENCH_CACHE. The work is keyed by what a stage computes
except its length, so a longer run of the same work is estimated by scaling.
"""
import json
import os
import time

from mocobench.pipeline.config import trains_classifier
from mocobench.utils.fileio import atomic_write

CACHE_ENV = "MOCOBENCH_CACHE"


def size(wiring, name):
    """What the stage computes, in the units its time scales with ("" when nothing to say)."""
    cfg = wiring.cfg
    if trains_classifier(cfg, name):
        c = wiring.stage_config(name.upper())
        return (f"{c.SOLVER.EPOCHS} epochs at batch {c.SOLVER.BATCH_SIZE}, {c.MODEL.ARCH} at "
                f"{c.INPUT.SIZE} px")
    if name.startswith("transfer_"):
        c = wiring.stage_config("TRANSFER", name.split("_", 1)[1])
        return (f"{cfg.TRANSFER.SEEDS} seeds x {c.SOLVER.MAX_ITER} iterations at "
                f"{c.SOLVER.IMS_PER_BATCH} images")
    return ""


def work(wiring, name):
    """(what a stage computes, except its length; its length in units its time scales with): two
    stages with the same first part run at the same seconds per unit on one machine."""
    cfg = wiring.cfg
    if trains_classifier(cfg, name):
        return _classifier_work(wiring, name)
    if name.startswith("transfer_"):
        return _transfer_work(wiring, name.split("_", 1)[1])
    if name == "data":
        return f"data synth {cfg.DATA.SYNTH_PRESET} {list(cfg.DATA.SYNTH_OPTS)}", 1
    return name.split("_")[0], 1  # convert, report: about the same whatever the run


def _classifier_work(wiring, name):
    cfg = wiring.cfg
    c = wiring.stage_config(name.upper())
    if cfg.DATA.SYNTH:
        data = f"synth {cfg.DATA.SYNTH_PRESET} {list(cfg.DATA.SYNTH_OPTS)}"
    else:
        data = wiring.pretrain_root
    return (f"{name} {c.MODEL.ARCH} {c.INPUT.SIZE} px, batch {c.SOLVER.BATCH_SIZE}, device "
            f"{c.DEVICE or 'auto'} x {cfg.PRETRAIN.NPROC_PER_NODE} x {cfg.NUM_NODES} nodes, "
            f"data {data}", c.SOLVER.EPOCHS)


def _transfer_work(wiring, init):
    cfg = wiring.cfg
    c = wiring.stage_config("TRANSFER", init)
    config_name = os.path.basename(wiring.transfer_config_file(init))
    return (f"transfer {config_name} {c.MODEL.RESNETS.DEPTH}, {c.INPUT.MIN_SIZE_TRAIN} px, "
            f"{c.SOLVER.IMS_PER_BATCH} images, device {c.MODEL.DEVICE} x {cfg.TRANSFER.NUM_GPUS} x "
            f"{cfg.NUM_NODES} nodes, test {list(c.DATASETS.TEST)}",
            cfg.TRANSFER.SEEDS * c.SOLVER.MAX_ITER)


def rates_file():
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = os.environ.get(CACHE_ENV) or os.path.join(cache, "mocobench")
    return os.path.join(root, "stage_seconds.json")


def read_rates():
    """{work: {"seconds_per_unit", "measured"}} measured on this machine; {} when none yet."""
    try:
        with open(rates_file()) as f:
            rates = json.load(f)
        return rates if isinstance(rates, dict) else {}
    except (OSError, ValueError):  # none yet, or unreadable: no estimates from it
        return {}


def record_rate(wiring, name, seconds):
    """This machine's seconds per unit of the stage's work, for the estimates of later pipelines."""
    key, units = work(wiring, name)
    rates = read_rates()
    rates[key] = {"seconds_per_unit": seconds / max(units, 1),
                  "measured": time.strftime("%Y-%m-%d")}
    try:
        with atomic_write(rates_file(), "w") as f:
            json.dump(rates, f, indent=1, sort_keys=True)
    except OSError:  # a read-only home: only the estimates are lost
        pass


def expected_seconds(wiring, manifest, name, finished, rates):
    """An estimate from this run's own measurements: the stage's earlier run, else a finished stage
    of the same kind (transfer_*, convert_*) in `finished` ({stage: seconds}); else the same work's
    rate measured by an earlier pipeline on this machine (`rates`, from read_rates) times this
    stage's length; else None."""
    previous = manifest.stage(name)
    if previous.get("seconds") and previous.get("status") == "done":
        return previous["seconds"]
    kind = name.split("_")[0]
    same = [t for n, t in finished.items() if n.split("_")[0] == kind and "_" in n]
    if same:
        return sum(same) / len(same)
    key, units = work(wiring, name)
    rate = rates.get(key)
    return rate["seconds_per_unit"] * units if rate else reference_seconds(wiring, name)


# The paper-scale work on 8 x V100 (docs/scale.md, the official repositories' figures), for a
# stage this machine has not measured: MoCo v1/v2 R50 at 224 px, 200 epochs in 53 h
# (facebookresearch/moco README); detectron2 R50 training, seconds per iteration at 16 images on 8
# GPUs (detectron2 MODEL_ZOO.md, Faster R-CNN: FPN 0.210, C4 0.551)
REFERENCE_PRETRAIN_SECONDS_PER_EPOCH = 53 * 3600 / 200
REFERENCE_TRANSFER_SECONDS_PER_ITER = {"FPN": 0.210, "C4": 0.551}


def reference_seconds(wiring, name):
    """The 8 x V100 figures for a ResNet-50 pretraining at 224 px or a ResNet-50 detectron2 transfer
    on CUDA (its seeds x iterations); None for other work."""
    cfg = wiring.cfg
    if name == "supervised" and cfg.SUPERVISED.WEIGHTS:
        return 1.0  # the weights given: nothing to compute
    if name == "pretrain":
        c = wiring.stage_config("PRETRAIN")
        if c.MODEL.ARCH == "resnet50" and c.INPUT.SIZE == 224:
            return REFERENCE_PRETRAIN_SECONDS_PER_EPOCH * c.SOLVER.EPOCHS
    if name.startswith("transfer_"):
        c = wiring.stage_config("TRANSFER", name.split("_", 1)[1])
        if c.MODEL.RESNETS.DEPTH == 50 and c.MODEL.DEVICE.startswith("cuda"):
            kind = "FPN" if "fpn" in c.MODEL.BACKBONE.NAME.lower() else "C4"
            per_iter = REFERENCE_TRANSFER_SECONDS_PER_ITER[kind]
            return per_iter * c.SOLVER.MAX_ITER * cfg.TRANSFER.SEEDS
    return None


def time_left(wiring, manifest, names, measured):
    """' | expected left ...' for the stages `names` (the current one included), from the stage
    times `measured` so far in this run; "" when none of them can be estimated."""
    rates = read_rates()
    estimates = [expected_seconds(wiring, manifest, n, measured, rates) for n in names]
    known = [t for t in estimates if t]
    unknown = len(names) - len(known)
    if not known:
        return ""
    not_measured = f" + {unknown} stage(s) not measured yet" if unknown else ""
    return f" | expected left ~{sum(known):.0f} s" + not_measured
