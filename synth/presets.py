"""What a generated tree can be asked for: the presets, the size limits, and their checks.

resolve_params turns a preset, a seed and explicit overrides into the meta that synth.json records
(the parameters, the split sizes and the path of every format), or raises UsageError naming the
parameter and what was expected, before anything is written.
"""
import numpy as np

from mocobench.utils.errors import UsageError
from mocobench.utils.synth_meta import META_FORMAT, META_VERSION
from synth.raster import class_list, scene_split
from synth.voc import VOC_SEG_YEAR, VOC_YEAR

PRESETS = {
    # small: the whole tree in about a second, for tests
    "test": dict(classes=4, images_per_class=12, val_per_class=None, scenes=16, size=64,
                 scene_size=128),
    # the demo pipeline: enough for pretraining to matter downstream, generated in well under 30 s
    # on one core
    "demo": dict(classes=8, images_per_class=250, val_per_class=50, scenes=320, size=64,
                 scene_size=128),
}

# what `mocobench data synth` writes without --preset: the size the shipped CPU configs
# (configs/pretrain/*cpu*.yaml, batch 64) are made for; `test` holds 48 ImageNet-style images, no
# full batch of 64 (tests/test_cpu_defaults.py checks every CPU config against this preset)
DEFAULT_PRESET = "demo"

MIN_SIZE = 32  # smallest object-image side: below this the shapes stop being recognisable
MIN_SCENE_SIZE = 64  # smallest scene side: 2-6 objects must fit, the smallest still > a few pixels
MAX_SIZE = 1024


def resolve_params(preset, seed, overrides):
    """The meta (synth.json) of the tree that `preset`, `seed` and `overrides` describe; an
    override of None keeps the preset's value."""
    if preset not in PRESETS:
        raise UsageError(f"preset {preset!r}: expected one of {', '.join(PRESETS)}")
    unknown = set(overrides) - set(PRESETS[preset])
    if unknown:
        raise UsageError(f"unknown synth parameter(s) {sorted(unknown)}; "
                         f"expected {sorted(PRESETS[preset])}")
    p = dict(PRESETS[preset])
    p.update({k: v for k, v in overrides.items() if v is not None})
    if p["val_per_class"] is None:
        p["val_per_class"] = max(2, p["images_per_class"] // 5)

    def check_int(key, low, high=None):
        value = p[key]
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low or \
                (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"{low}..{high}"
            raise UsageError(f"{key}={value!r}: expected an integer {bounds}")
        p[key] = int(value)

    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise UsageError(f"seed={seed!r}: expected a non-negative integer")
    names = class_list(p["classes"])
    check_int("images_per_class", 1)
    check_int("val_per_class", 1)
    # VOC needs >= 2 ids per split file (detectron2 reads them with np.loadtxt)
    check_int("scenes", 4)
    check_int("size", MIN_SIZE, MAX_SIZE)
    check_int("scene_size", MIN_SCENE_SIZE, MAX_SIZE)
    n_train, n_test = scene_split(p["scenes"])
    return {
        "format": META_FORMAT,
        "version": META_VERSION,
        "preset": preset,
        "seed": int(seed),
        "class_names": names,
        "num_classes": len(names),
        "images_per_class": p["images_per_class"],
        "val_per_class": p["val_per_class"],
        "scenes": p["scenes"],
        "size": p["size"],
        "scene_size": p["scene_size"],
        "voc_year": VOC_YEAR,
        "splits": {
            "imagenet": {"train": p["images_per_class"] * len(names),
                         "val": p["val_per_class"] * len(names)},
            "voc": {"trainval": n_train, "test": n_test},
            "coco": {"train": n_train, "val": n_test},
            "coco_keypoints": {"train": n_train, "val": n_test},
            "lvis": {"train": n_train, "val": n_test},
            "cityscapes": {"train": n_train, "val": n_test},
            "voc_seg": {"train_aug": n_train, "val": n_test},
        },
        "paths": {
            "imagenet_train": "imagenet/train",
            "imagenet_val": "imagenet/val",
            "voc": f"VOC{VOC_YEAR}",
            "coco_train_images": "coco/train2017",
            "coco_val_images": "coco/val2017",
            "coco_train_json": "coco/annotations/instances_train2017.json",
            "coco_val_json": "coco/annotations/instances_val2017.json",
            "coco_keypoints_train_json": "coco/annotations/person_keypoints_train2017.json",
            "coco_keypoints_val_json": "coco/annotations/person_keypoints_val2017.json",
            "lvis_image_root": "coco/",
            "lvis_train_json": "lvis/lvis_v0.5_train.json",
            "lvis_val_json": "lvis/lvis_v0.5_val.json",
            "cityscapes": "cityscapes",
            "voc_seg": f"VOC{VOC_SEG_YEAR}",
        },
    }
