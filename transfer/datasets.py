"""Datasets for transfer: detectron2's builtin names, the generated (synth) ones, and checks before training.

Builtin names (voc_2007_trainval, voc_2012_trainval, voc_2007_test, coco_2017_train, coco_2017_val, ...) are
registered by detectron2 under `$DETECTRON2_DATASETS` (default ./datasets), lazily: a missing file would only
surface deep inside the first data loader. `check_datasets` looks for every file a config's datasets need
first and names the exact path and the expected layout.

Generated datasets (`mocobench data synth --out DIR`) register under their own names so that any config can
point at them:

    synth_voc_trainval, synth_voc_test     DIR/VOC2007 (PASCAL VOC layout, class names from DIR/synth.json)
    synth_coco_train, synth_coco_val       DIR/coco/{train,val}2017 + annotations/instances_*.json

DIR is, first match wins: `--synth-root DIR` (= config key MOCOBENCH.SYNTH_ROOT), `$MOCOBENCH_SYNTH`,
`$DETECTRON2_DATASETS/synth` (detectron2's default datasets root: ./datasets/synth).
"""
import logging
import os

from mocobench import d2compat  # noqa: F401  (before any detectron2 import)

# isort: split
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances, register_pascal_voc

from mocobench.errors import UsageError

logger = logging.getLogger(__name__)

SYNTH_PREFIX = "synth_"
SYNTH_ENV = "MOCOBENCH_SYNTH"
# name -> (format, split); paths come from the tree's synth.json
SYNTH_DATASETS = {
    "synth_voc_trainval": ("voc", "trainval"),
    "synth_voc_test": ("voc", "test"),
    "synth_coco_train": ("coco", "train"),
    "synth_coco_val": ("coco", "val"),
}

VOC_LAYOUT = (
    "{dirname}/\n"
    "  Annotations/<id>.xml\n"
    "  ImageSets/Main/{split}.txt   (one image id per line)\n"
    "  JPEGImages/<id>.jpg"
)
COCO_LAYOUT = (
    "{json_file}   (COCO instances json)\n"
    "{image_root}/<file_name>   (the images it lists)"
)

def datasets_root() -> str:
    return os.getenv("DETECTRON2_DATASETS", "datasets")

def resolve_synth_root(configured: str = "") -> str:
    return configured or os.getenv(SYNTH_ENV) or os.path.join(datasets_root(), "synth")

def register_synth_datasets(root: str) -> dict:
    """Register the synth_* names for the tree at `root` (re-registering if they pointed elsewhere)."""
    from mocobench.synth import read_synth_meta

    root = os.path.abspath(root)
    meta = read_synth_meta(root)  # UsageError naming DIR/synth.json when it is not a generated tree
    paths = meta["paths"]
    for name, (fmt, split) in SYNTH_DATASETS.items():
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("synth_root", None) == root:
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        if fmt == "voc":
            dirname = os.path.join(root, paths["voc"])
            register_pascal_voc(name, dirname, split, meta["voc_year"], meta["class_names"])
            # register_pascal_voc (v0.6) leaves evaluator_type unset; the builtin voc_* names set it alongside
            MetadataCatalog.get(name).set(evaluator_type="pascal_voc")
        else:
            register_coco_instances(name, {"thing_classes": list(meta["class_names"])},
                                    os.path.join(root, paths[f"coco_{split}_json"]),
                                    os.path.join(root, paths[f"coco_{split}_images"]))
        MetadataCatalog.get(name).set(synth_root=root)
    return meta

def dataset_names(cfg) -> list:
    return list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)

def uses_synth(cfg) -> bool:
    return any(n.startswith(SYNTH_PREFIX) for n in dataset_names(cfg))

def _missing_paths(paths):
    return [p for p in paths if not os.path.exists(p)]

def check_dataset(name: str):
    """Raise UsageError naming the missing path and the expected layout; detectron2 would fail much later."""
    if name not in DatasetCatalog.list():
        voc = sorted(n for n in DatasetCatalog.list() if n.startswith("voc_"))
        raise UsageError(
            f"dataset {name!r} is not registered. PASCAL VOC names: {', '.join(voc)}; COCO: coco_2017_train, "
            f"coco_2017_val, ...; generated data: {', '.join(SYNTH_DATASETS)} (with --synth-root DIR or "
            f"${SYNTH_ENV})"
        )
    meta = MetadataCatalog.get(name)
    where = (f"generated dataset root {meta.synth_root!r}" if meta.get("synth_root", None)
             else f"DETECTRON2_DATASETS={datasets_root()!r}")
    if meta.get("evaluator_type", None) == "pascal_voc" and meta.get("dirname", None):
        split_file = os.path.join(meta.dirname, "ImageSets", "Main", f"{meta.split}.txt")
        missing = _missing_paths([split_file, os.path.join(meta.dirname, "Annotations"),
                                  os.path.join(meta.dirname, "JPEGImages")])
        layout = VOC_LAYOUT.format(dirname=meta.dirname, split=meta.split)
    elif meta.get("json_file", None):
        missing = _missing_paths([meta.json_file, meta.image_root])
        layout = COCO_LAYOUT.format(json_file=meta.json_file, image_root=meta.image_root)
    else:
        return  # a dataset family without files we know how to check: detectron2 reports its own errors
    if missing:
        raise UsageError(
            f"dataset {name!r}: {missing[0]!r} does not exist ({where}). Expected layout:\n{layout}\n"
            f"Nothing is downloaded here: put the data there, or point DETECTRON2_DATASETS at its root."
        )

def check_datasets(cfg):
    for name in dict.fromkeys(dataset_names(cfg)):
        check_dataset(name)

def check_num_classes(cfg) -> list:
    """MODEL.ROI_HEADS.NUM_CLASSES must match the datasets' classes; returns log lines for what it changed.

    For generated data the class count is a generation parameter, so it is taken from synth.json (logged);
    for everything else a mismatch is the user's error and is reported.
    """
    notes = []
    for name in dict.fromkeys(dataset_names(cfg)):
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is None or len(classes) == cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            continue
        if name.startswith(SYNTH_PREFIX):
            notes.append(f"MODEL.ROI_HEADS.NUM_CLASSES {cfg.MODEL.ROI_HEADS.NUM_CLASSES} -> {len(classes)} "
                         f"(the classes of generated dataset {name!r})")
            cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(classes)
        else:
            raise UsageError(f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES} but dataset "
                             f"{name!r} has {len(classes)} classes")
    return notes
