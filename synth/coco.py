"""COCO 2017 and the formats built on it: instances, LVIS v0.5 and person keypoints.

Instances and LVIS describe the shape scenes (raster.write_scenes; LVIS annotates the COCO images,
as the real LVIS annotates COCO's); keypoints get their own stick-figure scenes with COCO's 17
keypoints and visibility flags, stored next to them in coco/{train,val}2017 under image ids of their
own. All are read back by detectron2's COCO and LVIS loaders and scored by their evaluators.
"""
import json
import math
import os

import cv2
import numpy as np

from mocobench.utils.fileio import atomic_write
from mocobench.utils.synth_meta import META_VERSION
from synth.raster import (
    STREAM_PERSON,
    background,
    class_list,
    composite,
    encode_jpeg,
    grid,
    mask_annotation,
    object_appearance,
    scene_split,
    seeded_rng,
    write_bytes,
    write_scenes,
)


def _coco_json(class_names, images, annotations):
    return {
        "info": {"description": "mocobench synthetic shapes (mocobench.synth)",
                 "version": str(META_VERSION), "year": 2017},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"}
                       for i, n in enumerate(class_names)],
    }


# -----------------------------------------------------------------------------------------------
# LVIS v0.5 (the paper's Table 6)


def _lvis_frequency(train_images):
    # LVIS (Gupta et al., 2019, Sec. 4): rare = 1-10 training images, common = 11-100,
    # frequent = > 100
    return "r" if train_images <= 10 else "c" if train_images <= 100 else "f"


def _lvis_json(class_names, split, images, annotations, train):
    """LVIS v0.5 json of COCO-format `images`/`annotations`: federated image lists, frequencies.

    Every class absent from an image is listed in its neg_category_ids (verified absent: the
    generator knows), none as not exhaustive. Frequencies come from the training split, as in the
    real files.
    """
    def image_sets(anns):
        sets = {}
        for ann in anns:
            sets.setdefault(ann["category_id"], set()).add(ann["image_id"])
        return sets

    train_sets, split_sets = image_sets(train["annotations"]), image_sets(annotations)
    category_ids = range(1, len(class_names) + 1)
    lvis_images = []
    for image in images:
        present = {c for c in category_ids if image["id"] in split_sets.get(c, ())}
        lvis_images.append({
            "id": image["id"], "width": image["width"], "height": image["height"],
            # detectron2 reads it
            "coco_url": f"http://images.cocodataset.org/{split}2017/{image['file_name']}",
            "not_exhaustive_category_ids": [],
            "neg_category_ids": [c for c in category_ids if c not in present],
        })
    lvis_annotations = [
        {k: a[k] for k in ("id", "image_id", "category_id", "bbox", "segmentation", "area")}
        for a in annotations]
    categories = [{
        "id": c, "name": name, "synonyms": [name], "synset": f"{name}.n.01",
        "def": f"a {name} shape",
        "frequency": _lvis_frequency(len(train_sets.get(c, ()))),
        "image_count": len(split_sets.get(c, ())),
        "instance_count": sum(a["category_id"] == c for a in annotations),
    } for c, name in zip(category_ids, class_names)]
    return {"info": {"description": "mocobench synthetic shapes (mocobench.synth)",
                     "version": "0.5"},
            "licenses": [], "images": lvis_images, "annotations": lvis_annotations,
            "categories": categories}


# -----------------------------------------------------------------------------------------------
# instances


class CocoInstancesWriter:
    """DIR/coco/{train,val}2017 and annotations/instances_*.json of the scenes (write_scenes).

    `lvis`: also DIR/lvis/lvis_v0.5_{train,val}.json, the same annotations in LVIS v0.5's format.
    """

    def __init__(self, out_dir, class_names, size, lvis=False):
        self.out_dir, self.dir = out_dir, os.path.join(out_dir, "coco")
        self.names, self.size, self.lvis = class_names, size, lvis
        for sub in ("train2017", "val2017", "annotations"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        self.data = {split: {"images": [], "annotations": []} for split in ("train", "val")}

    def add(self, index, train, jpeg, objects):
        coco = self.data
        split = "train" if train else "val"
        image_id = index + 1
        file_name = f"{image_id:012d}.jpg"
        write_bytes(os.path.join(self.dir, split + "2017", file_name), jpeg)
        coco[split]["images"].append({"id": image_id, "file_name": file_name, "width": self.size,
                                      "height": self.size})
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            coco[split]["annotations"].append({
                "id": len(coco["train"]["annotations"]) + len(coco["val"]["annotations"]) + 1,
                "image_id": image_id,
                "category_id": self.names.index(obj["name"]) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "segmentation": obj["polygons"],
                "area": round(obj["area"], 4),
                "iscrowd": 0,
            })

    def finish(self):
        for split, data in self.data.items():
            path = os.path.join(self.dir, "annotations", f"instances_{split}2017.json")
            with atomic_write(path, "w") as f:
                json.dump(_coco_json(self.names, data["images"], data["annotations"]), f)
        counts = {"coco": {split: len(data["images"]) for split, data in self.data.items()}}
        if self.lvis:
            os.makedirs(os.path.join(self.out_dir, "lvis"), exist_ok=True)
            for split, data in self.data.items():
                path = os.path.join(self.out_dir, "lvis", f"lvis_v0.5_{split}.json")
                with atomic_write(path, "w") as f:
                    json.dump(_lvis_json(self.names, split, data["images"], data["annotations"],
                                         self.data["train"]), f)
        return counts


def make_coco(out_dir, classes, scenes, size, seed):
    """Write DIR/coco/{train,val}2017 and annotations/instances_*.json (the same scenes as
    voc.make_voc)."""
    names = class_list(classes)
    return write_scenes(names, scenes, size, seed, [CocoInstancesWriter(out_dir, names, size)])


# -----------------------------------------------------------------------------------------------
# person keypoints (the paper's Table 6)

# COCO person keypoints: names, order and skeleton of COCO's person_keypoints json
# (cocodataset.org/#format-data; tests compare the names with detectron2's
# COCO_PERSON_KEYPOINT_NAMES)
COCO_KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
    "right_knee", "left_ankle", "right_ankle",
)
COCO_SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8],
                 [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]
# person images get their own ids next to the shape scenes in coco/*2017/
KEYPOINT_IMAGE_ID_OFFSET = 1_000_000


def _person_pose(rng):
    """17 keypoints (COCO order) of an upright stick figure facing the camera, in units of its
    height.

    The person's left is on the image's right (COCO's convention). Arms and legs swing at random.
    """
    k = {"nose": (0, 0.09), "left_eye": (0.025, 0.07), "right_eye": (-0.025, 0.07),
         "left_ear": (0.05, 0.08), "right_ear": (-0.05, 0.08), "left_shoulder": (0.11, 0.2),
         "right_shoulder": (-0.11, 0.2), "left_hip": (0.07, 0.52), "right_hip": (-0.07, 0.52)}
    for side, sign in (("left", 1), ("right", -1)):
        # upper arm from the vertical, elbow bend
        a, b = rng.uniform(-0.3, 1.6), rng.uniform(-0.5, 1.0)
        sx, sy = k[f"{side}_shoulder"]
        ex, ey = sx + sign * 0.16 * math.sin(a), sy + 0.16 * math.cos(a)
        k[f"{side}_elbow"] = (ex, ey)
        k[f"{side}_wrist"] = (ex + sign * 0.14 * math.sin(a + b), ey + 0.14 * math.cos(a + b))
        c, d = rng.uniform(-0.1, 0.4), rng.uniform(-0.3, 0.3)  # thigh from the vertical, knee bend
        hx, hy = k[f"{side}_hip"]
        kx, ky = hx + sign * 0.22 * math.sin(c), hy + 0.22 * math.cos(c)
        k[f"{side}_knee"] = (kx, ky)
        k[f"{side}_ankle"] = (kx + sign * 0.22 * math.sin(c + d), ky + 0.22 * math.cos(c + d))
    pose = np.array([k[name] for name in COCO_KEYPOINT_NAMES], np.float64)
    pose[:, 0] *= math.exp(rng.uniform(-0.15, 0.15))  # build
    return pose


_LIMBS = [("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"),
          ("right_shoulder", "right_elbow"), ("right_elbow", "right_wrist"),
          ("left_hip", "left_knee"), ("left_knee", "left_ankle"),
          ("right_hip", "right_knee"), ("right_knee", "right_ankle")]


def _person_alpha(points, height, canvas_hw):
    """Coverage (uint8) of a stick figure: head disc, torso quadrilateral, neck and limbs as thick
    lines."""
    alpha = np.zeros(canvas_hw, np.uint8)
    p = {name: np.round((xy - 0.5) * 16).astype(np.int32)
         for name, xy in zip(COCO_KEYPOINT_NAMES, points)}
    cv2.circle(alpha, tuple(int(v) for v in p["nose"]), int(round(0.075 * height * 16)), 255, -1,
               cv2.LINE_AA, 4)
    torso = np.stack([p["left_shoulder"], p["right_shoulder"], p["right_hip"], p["left_hip"]])
    cv2.fillPoly(alpha, [torso], 255, cv2.LINE_AA, 4)
    neck = (p["left_shoulder"] + p["right_shoulder"]) // 2
    width = max(2, int(round(0.05 * height)))
    cv2.line(alpha, tuple(int(v) for v in p["nose"]), tuple(int(v) for v in neck), 255, width,
             cv2.LINE_AA, 4)
    for a, b in _LIMBS:
        cv2.line(alpha, tuple(int(v) for v in p[a]), tuple(int(v) for v in p[b]), 255, width,
                 cv2.LINE_AA, 4)
    return alpha


def render_person_scene(size, rng):
    """1-3 stick figures on a background; returns (RGB float32 image, list of person dicts).

    Each person: box, polygons, area of its visible mask, and 17 keypoints (x, y, v) in COCO's
    convention: integer pixel indices, v=2 visible, v=1 labelled but hidden by a person drawn later,
    v=0 (and x=y=0) outside the image. A placement is redrawn when it would hide more than 40% of an
    earlier person.
    """
    placed = []
    for _ in range(rng.integers(1, 4)):
        for _attempt in range(30):
            height = size * rng.uniform(0.45, 0.9)
            origin = np.array([rng.uniform(0.1, 0.9) * size,
                               rng.uniform(-0.05 * size, size - 0.9 * height)])
            points = _person_pose(rng) * height + origin
            alpha = _person_alpha(points, height, (size, size))
            full = alpha >= 128
            if full.sum() < 40 or any((p["visible"] & ~full).sum() < 0.6 * p["full"].sum()
                                      for p in placed):
                continue
            for p in placed:
                p["visible"] = p["visible"] & ~full
            placed.append(dict(points=points, alpha=alpha, full=full, visible=full.copy()))
            break
    img = background(rng, size, size)
    xx, yy = grid(size, size)
    for p in placed:
        composite(img, object_appearance(rng, xx, yy, img.mean(axis=(0, 1))), p["alpha"])
    people = []
    for index, p in enumerate(placed):
        ann = mask_annotation(p["visible"])
        if ann is None:
            continue
        keypoints = []
        for x, y in p["points"]:
            xi, yi = int(math.floor(x)), int(math.floor(y))
            if not (0 <= xi < size and 0 <= yi < size):
                keypoints += [0, 0, 0]
            elif any(q["full"][yi, xi] for q in placed[index + 1:]):
                keypoints += [xi, yi, 1]
            else:
                keypoints += [xi, yi, 2]
        people.append(dict(keypoints=keypoints, **ann))
    return img, people


def make_coco_keypoints(out_dir, scenes, size, seed):
    """Write person images into DIR/coco/{train,val}2017 and annotations/person_keypoints_*.json;
    returns counts."""
    coco_dir = os.path.join(out_dir, "coco")
    for sub in ("train2017", "val2017", "annotations"):
        os.makedirs(os.path.join(coco_dir, sub), exist_ok=True)
    n_train, _ = scene_split(scenes)
    data = {split: {"images": [], "annotations": []} for split in ("train", "val")}
    n_annotations = 0
    for i in range(scenes):
        img, people = render_person_scene(size, seeded_rng(seed, STREAM_PERSON, i))
        split = "train" if i < n_train else "val"
        image_id = KEYPOINT_IMAGE_ID_OFFSET + i + 1
        file_name = f"{image_id:012d}.jpg"
        write_bytes(os.path.join(coco_dir, split + "2017", file_name), encode_jpeg(img))
        data[split]["images"].append({"id": image_id, "file_name": file_name, "width": size,
                                      "height": size})
        for person in people:
            x0, y0, x1, y1 = person["box"]
            n_annotations += 1
            data[split]["annotations"].append({
                "id": n_annotations, "image_id": image_id, "category_id": 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": person["polygons"],
                "area": round(person["area"], 4), "iscrowd": 0, "keypoints": person["keypoints"],
                "num_keypoints": sum(v > 0 for v in person["keypoints"][2::3]),
            })
    for split, d in data.items():
        payload = _coco_json(["person"], d["images"], d["annotations"])
        payload["categories"] = [{"id": 1, "name": "person", "supercategory": "person",
                                  "keypoints": list(COCO_KEYPOINT_NAMES),
                                  "skeleton": COCO_SKELETON}]
        path = os.path.join(coco_dir, "annotations", f"person_keypoints_{split}2017.json")
        with atomic_write(path, "w") as f:
            json.dump(payload, f)
    return {split: len(d["images"]) for split, d in data.items()}
