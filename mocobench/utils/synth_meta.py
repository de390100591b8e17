"""synth.json: the contract between the data generator and the stages that read generated data.

The generator (`mocobench data synth`) writes it last, so its presence means the tree is complete;
transfer's dataset registration and the pipeline read it. One writer and one reader, both here.
"""
import json
import os

from mocobench.utils.errors import UsageError
from mocobench.utils.fileio import atomic_write

# Full ordered list; `classes=N` takes the first N. Shapes that a rotation maps onto each other (a
# diamond is a rotated square, a plus a rotated cross) are deliberately not separate classes.
CLASS_NAMES = (
    "circle", "square", "triangle", "star", "cross", "ring",
    "hexagon", "heart", "arrow", "crescent", "semicircle", "lshape",
)

META_FILE = "synth.json"
META_FORMAT = "mocobench-synth"
# 2: muted colours, upright objects, no clutter; 3: + keypoints, LVIS, Cityscapes, VOC2012 seg
META_VERSION = 3
# what determines the files; two metas with the same values here describe byte-identical trees
PARAM_KEYS = ("version", "seed", "class_names", "images_per_class", "val_per_class", "scenes",
              "size", "scene_size")


def write_synth_meta(out_dir, meta):
    """Write OUT_DIR/synth.json (atomically: the generator calls this once every file of the tree
    exists)."""
    with atomic_write(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def read_synth_meta(directory):
    """The synth.json of a generated tree, checked; raises UsageError naming the file and the
    problem."""
    path = os.path.join(os.fspath(directory), META_FILE)
    if not os.path.isfile(path):
        raise UsageError(f"{path!r} does not exist: {directory!r} is not a generated dataset "
                         f"(create one with `mocobench data synth --out {directory}`)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path!r} is not readable JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise UsageError(f"{path!r}: expected a dict with format={META_FORMAT!r}")
    if meta.get("version") != META_VERSION:
        raise UsageError(f"{path!r}: version {meta.get('version')!r}, this mocobench reads version "
                         f"{META_VERSION}; regenerate the data")
    missing = [k for k in (*PARAM_KEYS, "preset", "num_classes", "splits", "paths")
               if k not in meta]
    if missing:
        raise UsageError(f"{path!r}: missing key(s) {missing}")
    if not (isinstance(meta["class_names"], list) and meta["class_names"]
            and all(n in CLASS_NAMES for n in meta["class_names"])):
        raise UsageError(f"{path!r}: class_names must be a non-empty list of names from "
                         f"CLASS_NAMES, got {meta['class_names']!r}")
    return meta
