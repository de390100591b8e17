"""Cityscapes as the real tree lays it out: leftImg8bit images and gtFine annotations.

Street scenes at 2:1 with the shapes standing on the road as Cityscapes' instance classes. Only the
polygons json is written here: the gtFine label PNGs are made from it by cityscapesscripts' own
preparation tools, as the real ones are, so detectron2's loaders and the cityscapesscripts
evaluators read them as they read the real set.
"""
import json
import math
import os

import cv2
import numpy as np

from mocobench.utils.fileio import atomic_write
from mocobench.utils.synth_meta import CLASS_NAMES
from synth.raster import (
    STREAM_STREET,
    UPRIGHT,
    class_list,
    composite,
    grid,
    mask_annotation,
    muted_colour,
    object_appearance,
    scene_split,
    seeded_rng,
    shape_alpha,
    write_bytes,
)

# Cityscapes: label names/ids are cityscapesscripts' (helpers/labels.py); its evaluation scripts
# only know those. Shape class k is drawn as the k-th (mod 8) of the 8 instance classes of
# Cityscapes' instance benchmark.
CITYSCAPES_THINGS = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
CITYSCAPES_CITIES = {"train": "aachen", "val": "frankfurt"}  # one real city name per split


def render_street_scene(class_names, width, height, rng):
    """A 2:1 street scene: sky, buildings, road, and 2-6 non-overlapping objects standing on the
    road.

    Returns (RGB float32 image, Cityscapes polygon objects in drawing order: stuff first, then
    things).
    """
    h1 = int(height * rng.uniform(0.2, 0.35))
    h2 = int(height * rng.uniform(0.5, 0.65))
    img = np.zeros((height, width, 3), np.float32)
    img[:h1] = np.array([110, 150, 200], np.float32) + rng.uniform(-20, 20, 3)  # sky
    img[h1:h2] = muted_colour(rng)  # buildings
    img[h2:] = rng.uniform(60, 110) + rng.uniform(-8, 8, 3)  # road
    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(0, 6)
    objects = [{"label": label,
                "polygon": [[0, top], [width - 1, top], [width - 1, bottom], [0, bottom]]}
               for label, top, bottom in (("sky", 0, h1), ("building", h1, h2),
                                          ("road", h2, height - 1))]
    xx, yy = grid(height, width)
    occupied = np.zeros((height, width), bool)
    for _ in range(rng.integers(2, 7)):
        for _attempt in range(30):
            name = class_names[rng.integers(len(class_names))]
            radius = height * math.exp(rng.uniform(math.log(0.08), math.log(0.25)))
            center = (rng.uniform(0, width), rng.uniform(h2 - 0.5 * radius, height - 0.3 * radius))
            alpha = shape_alpha(name, center, radius, math.exp(rng.uniform(-0.25, 0.25)),
                                rng.uniform(-UPRIGHT, UPRIGHT), (height, width))
            full = alpha >= 128
            ann = mask_annotation(full)
            if ann is None or full.sum() < 24 or (full & occupied).any():
                continue
            occupied |= full
            composite(img, object_appearance(rng, xx, yy, img.mean(axis=(0, 1))), alpha)
            # one polygon per object (the largest part); Cityscapes stores integer pixel indices
            outline = max(ann["polygons"], key=len)
            polygon = [[int(round(x - 0.5)), int(round(y - 0.5))]
                       for x, y in zip(outline[0::2], outline[1::2])]
            objects.append({
                "label": CITYSCAPES_THINGS[CLASS_NAMES.index(name) % len(CITYSCAPES_THINGS)],
                "polygon": polygon})
            break
    return np.clip(img, 0, 255), objects


def make_cityscapes(out_dir, classes, scenes, size, seed):
    """Write DIR/cityscapes/{leftImg8bit,gtFine}/{train,val}/<city>/ in Cityscapes' layout; returns
    counts.

    Street scenes of size x size/2 px; gtFine_polygons.json is written here, and the gtFine
    labelIds, labelTrainIds and instanceIds PNGs are made from it by cityscapesscripts' own
    preparation tools (json2labelImg, createInstanceImage), as the real ones are.
    """
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    names = class_list(classes)
    width, height = size, size // 2
    n_train, _ = scene_split(scenes)
    counts = {"train": 0, "val": 0}
    for i in range(scenes):
        split = "train" if i < n_train else "val"
        city = CITYSCAPES_CITIES[split]
        img, objects = render_street_scene(names, width, height, seeded_rng(seed, STREAM_STREET, i))
        image_dir = os.path.join(out_dir, "cityscapes", "leftImg8bit", split, city)
        gt_dir = os.path.join(out_dir, "cityscapes", "gtFine", split, city)
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(gt_dir, exist_ok=True)
        stem = f"{city}_000000_{i:06d}"
        ok, png = cv2.imencode(".png",
                               np.ascontiguousarray(np.round(img).astype(np.uint8)[..., ::-1]))
        if not ok:
            raise RuntimeError("cv2 could not encode a PNG")
        write_bytes(os.path.join(image_dir, f"{stem}_leftImg8bit.png"), png.tobytes())
        polygons = os.path.join(gt_dir, f"{stem}_gtFine_polygons.json")
        with atomic_write(polygons, "w") as f:
            json.dump({"imgHeight": height, "imgWidth": width, "objects": objects}, f)
        json2labelImg(polygons, os.path.join(gt_dir, f"{stem}_gtFine_labelIds.png"), "ids")
        json2labelImg(polygons, os.path.join(gt_dir, f"{stem}_gtFine_labelTrainIds.png"),
                      "trainIds")
        # createInstanceImage draws a 32-bit "I" image, which current Pillow cannot write as PNG:
        # saved as the real files are, 16-bit greyscale (ids up to 33999 = label id * 1000 +
        # instance)
        annotation = Annotation()
        annotation.fromJsonFile(polygons)
        instance_ids = np.asarray(createInstanceImage(annotation, "ids"), dtype=np.int64)
        ok, png = cv2.imencode(".png", instance_ids.astype(np.uint16))
        write_bytes(os.path.join(gt_dir, f"{stem}_gtFine_instanceIds.png"), png.tobytes())
        counts[split] += 1
    return counts
