"""Generated datasets in the real on-disk formats, read through the real loaders.

Nothing can be downloaded here, so every test and the demo use data this module draws. It mirrors the
real transfer setting: object-centric images for pretraining (ImageNet) -> multi-object scenes for
detection (PASCAL VOC 2007, COCO 2017), all of the same shape classes:

    DIR/imagenet/{train,val}/<class>/<class>_00000.jpg     one object per image (torchvision ImageFolder)
    DIR/VOC2007/JPEGImages/000001.jpg                       2-6 objects per scene
    DIR/VOC2007/Annotations/000001.xml                      VOC XML, 1-based inclusive pixel boxes
    DIR/VOC2007/ImageSets/Main/{trainval,test}.txt          (+ <class>_<split>.txt like the real set)
    DIR/coco/{train,val}2017/000000000001.jpg               the same scenes as VOC (trainval->train, test->val)
    DIR/coco/annotations/instances_{train,val}2017.json     bbox xywh, polygon segmentation, area, iscrowd 0
    DIR/coco/annotations/person_keypoints_{train,val}2017.json  stick figures (images 001000000001.jpg, ...)
                                                            with COCO's 17 keypoints and visibility flags
    DIR/lvis/lvis_v0.5_{train,val}.json                     the COCO scenes in LVIS v0.5's federated format
    DIR/cityscapes/leftImg8bit/{train,val}/<city>/*.png     2:1 street scenes; gtFine/ polygons json + the
                                                            labelIds/labelTrainIds/instanceIds PNGs
    DIR/VOC2012/SegmentationClass/000001.png                the VOC2007 scenes' labels, VOC palette, 255 borders
    DIR/VOC2012/SegmentationClassAug/000001.png             the same labels as greyscale (train_aug's format)
    DIR/VOC2012/ImageSets/Segmentation/{train_aug,val}.txt
    DIR/synth.json                                          class names, seed, sizes, preset (read_synth_meta)

The class of an object is its shape identity only. Colour (muted), shading, size, a small rotation (objects stand
upright), aspect ratio and the background (gradient and noise) are drawn from the same distributions for every
class, so colour statistics alone do not tell the classes apart while the shapes do.

Annotations are computed from the rasterised visible mask of each object (after occlusion by the objects drawn
later and clipping at the image border), so boxes, polygons and pixels agree:
- the box is the tight box of the mask; in VOC it is written 1-based inclusive ([xmin-1, ymin-1, xmax, ymax]
  in detectron2's loader gives back the pixel-edge box), in COCO as [x, y, w, h] with pixel-edge coordinates;
- the polygons trace the outer outline of each visible part (rasterising them with pycocotools gives back the
  mask). Holes are not represented: a ring's segmentation is its outer outline (its hole is filled), the same
  simplification the COCO polygon format forces on real annotators;
- `area` is the area of those polygons.

Everything is deterministic from the seed: each image draws from its own `np.random.SeedSequence([seed,
stream, ...])`, JPEGs are encoded with a fixed quality and the JSON has no timestamps, so the same seed and
sizes give byte-identical files, and a class's ImageNet images do not depend on how many classes are asked for.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time
import xml.etree.ElementTree as ET

import cv2
import numpy as np

from mocobench.utils.errors import UsageError
from mocobench.utils.fileio import atomic_write
from mocobench.utils.synth_meta import (
    CLASS_NAMES,
    META_FILE,
    META_FORMAT,
    META_VERSION,
    PARAM_KEYS,
    read_synth_meta,
    write_synth_meta,
)

PRESETS = {
    # small: the whole tree in about a second, for tests
    "test": dict(classes=4, images_per_class=12, val_per_class=None, scenes=16, size=64, scene_size=128),
    # the demo pipeline: enough for pretraining to matter downstream, generated in well under 30 s on one core
    "demo": dict(classes=8, images_per_class=250, val_per_class=50, scenes=320, size=64, scene_size=128),
}

VOC_YEAR = 2007
JPEG_QUALITY = 90
MIN_SIZE = 32          # smallest object-image side: below this the shapes stop being recognisable
MIN_SCENE_SIZE = 64    # smallest scene side: 2-6 objects must fit with the smallest ones still > a few pixels
MAX_SIZE = 1024

# seed streams, so that ImageNet train/val and the scenes never share random numbers
_STREAM_TRAIN, _STREAM_VAL, _STREAM_SCENE, _STREAM_PERSON, _STREAM_STREET = 0, 1, 2, 3, 4


# ----------------------------------------------------------------------------------------------------------------
# shapes: unit-size outlines centred on the origin, as (polygon, +1 fill / -1 cut out) layers


def _regular(n, radius=1.0, phase=0.0):
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _star(points=5, inner=0.42):
    outer = _regular(points, 1.0, -np.pi / 2)
    inner_pts = _regular(points, inner, -np.pi / 2 + np.pi / points)
    return np.stack([outer, inner_pts], axis=1).reshape(-1, 2)


def _heart():
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], axis=1) / 16.5


def _semicircle():
    t = np.linspace(0, np.pi, 33)
    return np.stack([np.cos(t), np.sin(t) - 0.42], axis=1)


SHAPES = {
    "circle": lambda: [(_regular(48), 1)],
    "square": lambda: [(_regular(4, 1.0, np.pi / 4) * 0.92, 1)],
    "triangle": lambda: [(_regular(3, 1.0, -np.pi / 2) + [0, 0.2], 1)],
    "star": lambda: [(_star(), 1)],
    "cross": lambda: [(np.array([[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3], [1, 0.3], [0.3, 0.3], [0.3, 1],
                                 [-0.3, 1], [-0.3, 0.3], [-1, 0.3], [-1, -0.3], [-0.3, -0.3]]), 1)],
    "ring": lambda: [(_regular(48), 1), (_regular(48, 0.55), -1)],
    "hexagon": lambda: [(_regular(6), 1)],
    "heart": lambda: [(_heart(), 1)],
    "arrow": lambda: [(np.array([[-1, -0.22], [0.15, -0.22], [0.15, -0.6], [1, 0], [0.15, 0.6], [0.15, 0.22],
                                 [-1, 0.22]]), 1)],
    "crescent": lambda: [(_regular(48), 1), (_regular(48, 0.85) + [0.45, -0.1], -1)],
    "semicircle": lambda: [(_semicircle(), 1)],
    "lshape": lambda: [(np.array([[-0.75, -1], [-0.2, -1], [-0.2, 0.45], [0.75, 0.45], [0.75, 1], [-0.75, 1]]), 1)],
}
_SHAPE_LAYERS = {name: [(np.asarray(p, np.float64), s) for p, s in build()] for name, build in SHAPES.items()}
assert tuple(SHAPES) == CLASS_NAMES


def _shape_alpha(name, center, radius, aspect, angle, canvas_hw):
    """Anti-aliased coverage (uint8 0..255) of one shape placed on a canvas.

    Continuous coordinates: pixel (i, j) covers [j, j+1] x [i, i+1]; cv2 puts integer coordinates at pixel
    centres, hence the -0.5. Drawn with 4 fractional bits so sub-pixel poses look different.
    """
    c, s = math.cos(angle), math.sin(angle)
    scale = np.array([radius * math.sqrt(aspect), radius / math.sqrt(aspect)])
    rot = np.array([[c, -s], [s, c]])
    alpha = np.zeros(canvas_hw, np.uint8)
    for poly, sign in _SHAPE_LAYERS[name]:
        pts = (poly * scale) @ rot.T + np.asarray(center) - 0.5
        cv2.fillPoly(alpha, [np.round(pts * 16).astype(np.int32)], 255 if sign > 0 else 0, cv2.LINE_AA, 4)
    return alpha


# ----------------------------------------------------------------------------------------------------------------
# appearance: colours, shading and backgrounds, shared by every class
#
# Colours are muted (a grey level with a small tint) and objects stand upright (+-15 degrees, as objects do in
# photographs). Both keep the instance-specific detail that no class owns small: a contrastive learner matches two
# crops of one image by whatever survives the augmentations, and a saturated random hue (colour jitter moves hue
# by at most 0.1) or a random rotation (no augmentation rotates) would be that cue instead of the shape.
# Measured (ResNet-18 MoCo v2 at 32 px, 8 classes, 2000 images, kNN top-1, chance 12.5 %): saturated random
# colours and free rotation (no textures, no clutter): 13-15 % through 24 epochs (16 % after 8 with the blur
# scaled to the crop); grey, upright: 40 % after 24 epochs; these muted colours, upright: 33 % after 20 epochs
# (the demo; 21 % after 4).

UPRIGHT = math.radians(15)  # largest rotation of an object


def _muted_colour(rng):
    """A grey level plus a tint of at most 30 per channel."""
    return np.clip(rng.uniform(0, 255) + rng.uniform(-30, 30, size=3), 0, 255).astype(np.float32)


def _linear_ramp(rng, xx, yy, c1, c2):
    """c1 -> c2 along a random direction across the grid (a gradient background, or an object's shading)."""
    t = rng.uniform(0, 2 * np.pi)
    p = xx * math.cos(t) + yy * math.sin(t)
    p = (p - p.min()) / max(float(p.max() - p.min()), 1e-6)
    return c1 + p[..., None] * (c2 - c1)


def _grid(h, w):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return xx, yy


def _background(rng, h, w):
    """A gradient between two muted colours plus sensor-like noise."""
    xx, yy = _grid(h, w)
    img = _linear_ramp(rng, xx, yy, _muted_colour(rng), _muted_colour(rng))
    img = img + rng.standard_normal((h, w, 3), dtype=np.float32) * rng.uniform(0, 8)
    return np.clip(img, 0, 255)


def _object_appearance(rng, xx, yy, background_colour):
    """A muted colour with soft shading; its mean is kept >= 60 away from the background so the outline shows."""
    for _ in range(20):
        colour = _muted_colour(rng)
        if np.linalg.norm(colour - background_colour) >= 60:
            break
    shade = np.clip(colour + rng.uniform(-20, 20), 0, 255).astype(np.float32)
    return _linear_ramp(rng, xx, yy, colour, shade)


def _composite(img, texture, alpha):
    a = alpha.astype(np.float32)[..., None] / 255.0
    img *= 1.0 - a
    img += texture * a


def _encode_jpeg(rgb_float):
    rgb = np.clip(np.round(rgb_float), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("cv2 could not encode a JPEG")
    return buf.tobytes()


def _write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


# ----------------------------------------------------------------------------------------------------------------
# object-centric images (ImageNet stand-in)


def render_object_image(class_name, size, rng):
    """One object of `class_name` on a gradient background; returns an RGB float32 image (size x size x 3)."""
    img = _background(rng, size, size)
    radius = size * rng.uniform(0.24, 0.42)
    aspect = math.exp(rng.uniform(-0.25, 0.25))
    angle = rng.uniform(-UPRIGHT, UPRIGHT)
    slack = max(0.0, size / 2 - radius * 0.85)
    center = size / 2 + rng.uniform(-slack, slack, 2)
    alpha = _shape_alpha(class_name, center, radius, aspect, angle, (size, size))
    xx, yy = _grid(size, size)
    texture = _object_appearance(rng, xx, yy, img.mean(axis=(0, 1)))
    _composite(img, texture, alpha)
    return img


def _rng(*key):
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def make_imagenet(out_dir, classes, images_per_class, val_per_class, size, seed):
    """Write DIR/imagenet/{train,val}/<class>/<class>_NNNNN.jpg; returns {"train": n, "val": n}."""
    names = _class_list(classes)
    counts = {}
    for split, per_class, stream in (("train", images_per_class, _STREAM_TRAIN), ("val", val_per_class, _STREAM_VAL)):
        for name in names:
            class_dir = os.path.join(out_dir, "imagenet", split, name)
            os.makedirs(class_dir, exist_ok=True)
            class_index = CLASS_NAMES.index(name)
            for i in range(per_class):
                img = render_object_image(name, size, _rng(seed, stream, class_index, i))
                _write_bytes(os.path.join(class_dir, f"{name}_{i:05d}.jpg"), _encode_jpeg(img))
        counts[split] = per_class * len(names)
    return counts


# ----------------------------------------------------------------------------------------------------------------
# multi-object scenes (VOC / COCO stand-in)

_UPSAMPLE = 4  # polygons are traced on a 4x nearest-neighbour copy of the mask: they run 1/8 px inside its edge


def _mask_annotation(mask):
    """Tight box (pixel edges, x0 y0 x1 y1), outline polygons and polygon area of a binary mask, or None.

    Specks (connected parts smaller than 4 px or 5% of the largest part, left by anti-aliasing or occlusion)
    are dropped first, so the box and the polygons describe the same pixels; "mask" is what is left (the
    pixels of the semantic-segmentation labels).
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = 1 + np.nonzero(areas >= max(4, 0.05 * areas.max()))[0]
    kept = np.isin(labels, keep)
    ys, xs = np.nonzero(kept)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    up = cv2.resize(kept.astype(np.uint8), None, fx=_UPSAMPLE, fy=_UPSAMPLE, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons, area = [], 0.0
    for contour in sorted(contours, key=lambda c: (int(c[:, 0, 1].min()), int(c[:, 0, 0].min()))):
        pts = (cv2.approxPolyDP(contour, 1.0, True).reshape(-1, 2) + 0.5) / _UPSAMPLE
        if len(pts) < 3:
            continue
        x, y = pts[:, 0], pts[:, 1]
        area += 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
        polygons.append([float(v) for v in pts.reshape(-1)])
    if not polygons:
        return None
    return {"box": box, "polygons": polygons, "area": area, "mask_pixels": int(kept.sum()), "mask": kept}


def render_scene(class_names, size, rng):
    """A scene of 2-6 objects of `class_names`; returns (RGB float32 image, list of object dicts).

    Objects are drawn in order, later ones on top. A placement is redrawn when it would hide more than 40% of an
    earlier object or leave less than 60% of itself inside the image, so every object stays recognisable; sizes
    are log-uniform from ~14% to 50% of the side, so some are small. Each object dict: name, box, polygons,
    area, truncated (cut by the image border).
    """
    pad = int(size * 0.35)
    big = (size + 2 * pad, size + 2 * pad)
    placed = []  # dicts with name, radius, full (in-image bool mask), alpha, truncated
    for _ in range(rng.integers(2, 7)):
        for _attempt in range(30):
            name = class_names[rng.integers(len(class_names))]
            radius = size * math.exp(rng.uniform(math.log(0.07), math.log(0.25)))
            aspect = math.exp(rng.uniform(-0.25, 0.25))
            angle = rng.uniform(-UPRIGHT, UPRIGHT)
            center = rng.uniform(radius * 0.3, size - radius * 0.3, 2)
            alpha_big = _shape_alpha(name, center + pad, radius, aspect, angle, big)
            alpha = alpha_big[pad:pad + size, pad:pad + size]
            full = alpha >= 128
            inside, total = int(full.sum()), int((alpha_big >= 128).sum())
            if inside < 24 or inside < 0.6 * total:
                continue
            if any((p["visible"] & ~full).sum() < 0.6 * p["full"].sum() for p in placed):
                continue
            for p in placed:
                p["visible"] = p["visible"] & ~full
            placed.append(dict(name=name, radius=radius, full=full, visible=full.copy(), alpha=alpha,
                               truncated=inside < total))
            break

    img = _background(rng, size, size)
    xx, yy = _grid(size, size)
    objects = []
    for p in placed:
        texture = _object_appearance(rng, xx, yy, img.mean(axis=(0, 1)))
        _composite(img, texture, p["alpha"])
    for p in placed:
        ann = _mask_annotation(p["visible"])
        if ann is None:
            continue
        objects.append(dict(name=p["name"], truncated=bool(p["truncated"]), **ann))
    return img, objects


def _scene_split(scenes):
    """(number in VOC trainval / COCO train, number in VOC test / COCO val): a quarter held out, >= 2 each."""
    held_out = max(2, int(round(scenes * 0.25)))
    return scenes - held_out, held_out


def _voc_xml(file_id, size, objects):
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = f"VOC{VOC_YEAR}"
    ET.SubElement(root, "filename").text = f"{file_id}.jpg"
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "mocobench synthetic shapes"
    ET.SubElement(source, "annotation").text = "mocobench.synth"
    size_el = ET.SubElement(root, "size")
    for key, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(size_el, key).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        el = ET.SubElement(root, "object")
        ET.SubElement(el, "name").text = obj["name"]
        ET.SubElement(el, "pose").text = "Unspecified"
        ET.SubElement(el, "truncated").text = str(int(obj["truncated"]))
        ET.SubElement(el, "difficult").text = "0"
        bndbox = ET.SubElement(el, "bndbox")
        # VOC boxes are 1-based inclusive pixel indices: pixel columns x0..x1-1 are xmin=x0+1 .. xmax=x1
        for key, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(bndbox, key).text = str(value)
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="unicode").encode() + b"\n"


def _coco_json(class_names, images, annotations):
    return {
        "info": {"description": "mocobench synthetic shapes (mocobench.synth)", "version": str(META_VERSION),
                 "year": 2017},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(class_names)],
    }


# ----------------------------------------------------------------------------------------------------------------
# the other transfer tasks of the MoCo paper (Table 6): VOC semantic segmentation, LVIS, COCO keypoints, Cityscapes

VOC_SEG_YEAR = 2012  # VOC semantic segmentation is VOC2012's (train_aug / val)
VOC_IGNORE = 255     # VOC's "void" label: object outlines (and, in the real set, hard pixels)


def _voc_palette():
    """PASCAL VOC's colour map (the devkit's bit-interleaving labelcolormap): index i -> RGB, 255 -> (224,224,192)."""
    palette = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, rgb = i, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((c >> channel) & 1) << (7 - bit)
            c >>= 3
        palette[i] = rgb
    return palette


VOC_PALETTE = _voc_palette()


def _png(labels, palette=None):
    """uint8 labels -> PNG bytes: palette ("P") mode like VOC's SegmentationClass, else greyscale ("L")."""
    import io

    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8), mode="L")
    if palette is not None:
        image = image.convert("P")  # indices kept: an "L" image converts to "P" with the identity palette
        image.putpalette(palette.reshape(-1).tolist())
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _voc_seg_labels(names, size, objects):
    """Per-pixel class index (0 background, k+1 for names[k]) with VOC's void band (255) along every outline."""
    labels = np.zeros((size, size), np.uint8)
    for obj in objects:  # visible masks: each pixel belongs to at most one object
        labels[obj["mask"]] = names.index(obj["name"]) + 1
    kernel = np.ones((3, 3), np.uint8)
    border = cv2.dilate(labels, kernel) != cv2.erode(labels, kernel)
    labels[border] = VOC_IGNORE
    return labels


def _lvis_frequency(train_images):
    # LVIS (Gupta et al., 2019, Sec. 4): rare = 1-10 training images, common = 11-100, frequent = > 100
    return "r" if train_images <= 10 else "c" if train_images <= 100 else "f"


def _lvis_json(class_names, split, images, annotations, train):
    """LVIS v0.5 json of COCO-format `images`/`annotations`: federated image lists, category frequencies.

    Every class absent from an image is listed in its neg_category_ids (verified absent: the generator knows),
    none as not exhaustive. Frequencies come from the training split, as in the real files.
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
            "coco_url": f"http://images.cocodataset.org/{split}2017/{image['file_name']}",  # detectron2 reads it
            "not_exhaustive_category_ids": [],
            "neg_category_ids": [c for c in category_ids if c not in present],
        })
    lvis_annotations = [{k: a[k] for k in ("id", "image_id", "category_id", "bbox", "segmentation", "area")}
                        for a in annotations]
    categories = [{
        "id": c, "name": name, "synonyms": [name], "synset": f"{name}.n.01", "def": f"a {name} shape",
        "frequency": _lvis_frequency(len(train_sets.get(c, ()))),
        "image_count": len(split_sets.get(c, ())),
        "instance_count": sum(a["category_id"] == c for a in annotations),
    } for c, name in zip(category_ids, class_names)]
    return {"info": {"description": "mocobench synthetic shapes (mocobench.synth)", "version": "0.5"},
            "licenses": [], "images": lvis_images, "annotations": lvis_annotations, "categories": categories}


# COCO person keypoints: names, order and skeleton of COCO's person_keypoints json (cocodataset.org/#format-data;
# tests compare the names with detectron2's COCO_PERSON_KEYPOINT_NAMES)
COCO_KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
)
COCO_SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9],
                 [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]
KEYPOINT_IMAGE_ID_OFFSET = 1_000_000  # person images get their own ids next to the shape scenes in coco/*2017/


def _person_pose(rng):
    """17 keypoints (COCO order) of an upright stick figure facing the camera, in units of its height.

    The person's left is on the image's right (COCO's convention). Arms and legs swing at random.
    """
    k = {"nose": (0, 0.09), "left_eye": (0.025, 0.07), "right_eye": (-0.025, 0.07), "left_ear": (0.05, 0.08),
         "right_ear": (-0.05, 0.08), "left_shoulder": (0.11, 0.2), "right_shoulder": (-0.11, 0.2),
         "left_hip": (0.07, 0.52), "right_hip": (-0.07, 0.52)}
    for side, sign in (("left", 1), ("right", -1)):
        a, b = rng.uniform(-0.3, 1.6), rng.uniform(-0.5, 1.0)  # upper arm from the vertical, elbow bend
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


_LIMBS = [("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"), ("right_shoulder", "right_elbow"),
          ("right_elbow", "right_wrist"), ("left_hip", "left_knee"), ("left_knee", "left_ankle"),
          ("right_hip", "right_knee"), ("right_knee", "right_ankle")]


def _person_alpha(points, height, canvas_hw):
    """Coverage (uint8) of a stick figure: head disc, torso quadrilateral, neck and limbs as thick lines."""
    alpha = np.zeros(canvas_hw, np.uint8)
    p = {name: np.round((xy - 0.5) * 16).astype(np.int32) for name, xy in zip(COCO_KEYPOINT_NAMES, points)}
    cv2.circle(alpha, tuple(int(v) for v in p["nose"]), int(round(0.075 * height * 16)), 255, -1, cv2.LINE_AA, 4)
    torso = np.stack([p["left_shoulder"], p["right_shoulder"], p["right_hip"], p["left_hip"]])
    cv2.fillPoly(alpha, [torso], 255, cv2.LINE_AA, 4)
    neck = (p["left_shoulder"] + p["right_shoulder"]) // 2
    width = max(2, int(round(0.05 * height)))
    cv2.line(alpha, tuple(int(v) for v in p["nose"]), tuple(int(v) for v in neck), 255, width, cv2.LINE_AA, 4)
    for a, b in _LIMBS:
        cv2.line(alpha, tuple(int(v) for v in p[a]), tuple(int(v) for v in p[b]), 255, width, cv2.LINE_AA, 4)
    return alpha


def render_person_scene(size, rng):
    """1-3 stick figures on a background; returns (RGB float32 image, list of person dicts).

    Each person: box, polygons, area of its visible mask, and 17 keypoints (x, y, v) in COCO's convention:
    integer pixel indices, v=2 visible, v=1 labelled but hidden by a person drawn later, v=0 (and x=y=0) outside
    the image. A placement is redrawn when it would hide more than 40% of an earlier person.
    """
    placed = []
    for _ in range(rng.integers(1, 4)):
        for _attempt in range(30):
            height = size * rng.uniform(0.45, 0.9)
            origin = np.array([rng.uniform(0.1, 0.9) * size, rng.uniform(-0.05 * size, size - 0.9 * height)])
            points = _person_pose(rng) * height + origin
            alpha = _person_alpha(points, height, (size, size))
            full = alpha >= 128
            if full.sum() < 40 or any((p["visible"] & ~full).sum() < 0.6 * p["full"].sum() for p in placed):
                continue
            for p in placed:
                p["visible"] = p["visible"] & ~full
            placed.append(dict(points=points, alpha=alpha, full=full, visible=full.copy()))
            break
    img = _background(rng, size, size)
    xx, yy = _grid(size, size)
    for p in placed:
        _composite(img, _object_appearance(rng, xx, yy, img.mean(axis=(0, 1))), p["alpha"])
    people = []
    for index, p in enumerate(placed):
        ann = _mask_annotation(p["visible"])
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
    """Write person images into DIR/coco/{train,val}2017 and annotations/person_keypoints_*.json; returns counts."""
    coco_dir = os.path.join(out_dir, "coco")
    for sub in ("train2017", "val2017", "annotations"):
        os.makedirs(os.path.join(coco_dir, sub), exist_ok=True)
    n_train, _ = _scene_split(scenes)
    data = {split: {"images": [], "annotations": []} for split in ("train", "val")}
    n_annotations = 0
    for i in range(scenes):
        img, people = render_person_scene(size, _rng(seed, _STREAM_PERSON, i))
        split = "train" if i < n_train else "val"
        image_id = KEYPOINT_IMAGE_ID_OFFSET + i + 1
        file_name = f"{image_id:012d}.jpg"
        _write_bytes(os.path.join(coco_dir, split + "2017", file_name), _encode_jpeg(img))
        data[split]["images"].append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for person in people:
            x0, y0, x1, y1 = person["box"]
            n_annotations += 1
            data[split]["annotations"].append({
                "id": n_annotations, "image_id": image_id, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                "segmentation": person["polygons"], "area": round(person["area"], 4), "iscrowd": 0,
                "keypoints": person["keypoints"], "num_keypoints": sum(v > 0 for v in person["keypoints"][2::3]),
            })
    for split, d in data.items():
        payload = _coco_json(["person"], d["images"], d["annotations"])
        payload["categories"] = [{"id": 1, "name": "person", "supercategory": "person",
                                  "keypoints": list(COCO_KEYPOINT_NAMES), "skeleton": COCO_SKELETON}]
        with atomic_write(os.path.join(coco_dir, "annotations", f"person_keypoints_{split}2017.json"), "w") as f:
            json.dump(payload, f)
    return {split: len(d["images"]) for split, d in data.items()}


# Cityscapes: label names/ids are cityscapesscripts' (helpers/labels.py); its evaluation scripts only know those.
# Shape class k is drawn as the k-th (mod 8) of the 8 instance classes of Cityscapes' instance benchmark.
CITYSCAPES_THINGS = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
CITYSCAPES_CITIES = {"train": "aachen", "val": "frankfurt"}  # one real city name per split


def render_street_scene(class_names, width, height, rng):
    """A 2:1 street scene: sky, buildings, road, and 2-6 non-overlapping objects standing on the road.

    Returns (RGB float32 image, Cityscapes polygon objects in drawing order: stuff first, then things).
    """
    h1 = int(height * rng.uniform(0.2, 0.35))
    h2 = int(height * rng.uniform(0.5, 0.65))
    img = np.zeros((height, width, 3), np.float32)
    img[:h1] = np.array([110, 150, 200], np.float32) + rng.uniform(-20, 20, 3)  # sky
    img[h1:h2] = _muted_colour(rng)  # buildings
    img[h2:] = rng.uniform(60, 110) + rng.uniform(-8, 8, 3)  # road
    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(0, 6)
    objects = [{"label": label, "polygon": [[0, top], [width - 1, top], [width - 1, bottom], [0, bottom]]}
               for label, top, bottom in (("sky", 0, h1), ("building", h1, h2), ("road", h2, height - 1))]
    xx, yy = _grid(height, width)
    occupied = np.zeros((height, width), bool)
    for _ in range(rng.integers(2, 7)):
        for _attempt in range(30):
            name = class_names[rng.integers(len(class_names))]
            radius = height * math.exp(rng.uniform(math.log(0.08), math.log(0.25)))
            center = (rng.uniform(0, width), rng.uniform(h2 - 0.5 * radius, height - 0.3 * radius))
            alpha = _shape_alpha(name, center, radius, math.exp(rng.uniform(-0.25, 0.25)),
                                 rng.uniform(-UPRIGHT, UPRIGHT), (height, width))
            full = alpha >= 128
            ann = _mask_annotation(full)
            if ann is None or full.sum() < 24 or (full & occupied).any():
                continue
            occupied |= full
            _composite(img, _object_appearance(rng, xx, yy, img.mean(axis=(0, 1))), alpha)
            # one polygon per object (the largest part); Cityscapes stores integer pixel indices
            outline = max(ann["polygons"], key=len)
            polygon = [[int(round(x - 0.5)), int(round(y - 0.5))] for x, y in zip(outline[0::2], outline[1::2])]
            objects.append({"label": CITYSCAPES_THINGS[CLASS_NAMES.index(name) % len(CITYSCAPES_THINGS)],
                            "polygon": polygon})
            break
    return np.clip(img, 0, 255), objects


def make_cityscapes(out_dir, classes, scenes, size, seed):
    """Write DIR/cityscapes/{leftImg8bit,gtFine}/{train,val}/<city>/ in Cityscapes' layout; returns counts.

    Street scenes of size x size/2 px; gtFine_polygons.json is written here, and the gtFine labelIds,
    labelTrainIds and instanceIds PNGs are made from it by cityscapesscripts' own preparation tools
    (json2labelImg, createInstanceImage), as the real ones are.
    """
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    names = _class_list(classes)
    width, height = size, size // 2
    n_train, _ = _scene_split(scenes)
    counts = {"train": 0, "val": 0}
    for i in range(scenes):
        split = "train" if i < n_train else "val"
        city = CITYSCAPES_CITIES[split]
        img, objects = render_street_scene(names, width, height, _rng(seed, _STREAM_STREET, i))
        image_dir = os.path.join(out_dir, "cityscapes", "leftImg8bit", split, city)
        gt_dir = os.path.join(out_dir, "cityscapes", "gtFine", split, city)
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(gt_dir, exist_ok=True)
        stem = f"{city}_000000_{i:06d}"
        ok, png = cv2.imencode(".png", np.ascontiguousarray(np.round(img).astype(np.uint8)[..., ::-1]))
        if not ok:
            raise RuntimeError("cv2 could not encode a PNG")
        _write_bytes(os.path.join(image_dir, f"{stem}_leftImg8bit.png"), png.tobytes())
        polygons = os.path.join(gt_dir, f"{stem}_gtFine_polygons.json")
        with atomic_write(polygons, "w") as f:
            json.dump({"imgHeight": height, "imgWidth": width, "objects": objects}, f)
        json2labelImg(polygons, os.path.join(gt_dir, f"{stem}_gtFine_labelIds.png"), "ids")
        json2labelImg(polygons, os.path.join(gt_dir, f"{stem}_gtFine_labelTrainIds.png"), "trainIds")
        # createInstanceImage draws a 32-bit "I" image, which current Pillow cannot write as PNG: saved as the real
        # files are, 16-bit greyscale (ids up to 33999 = label id * 1000 + instance)
        annotation = Annotation()
        annotation.fromJsonFile(polygons)
        instance_ids = np.asarray(createInstanceImage(annotation, "ids"), dtype=np.int64)
        ok, png = cv2.imencode(".png", instance_ids.astype(np.uint16))
        _write_bytes(os.path.join(gt_dir, f"{stem}_gtFine_instanceIds.png"), png.tobytes())
        counts[split] += 1
    return counts


def _make_detection(out_dir, classes, scenes, size, seed, formats):
    """Draw the scenes once and write them in each of `formats` ("voc", "coco", "lvis", "voc_seg"); returns counts.

    "lvis" annotates the images of "coco" (as LVIS annotates COCO's), so it needs "coco" in the same call.
    """
    names = _class_list(classes)
    n_train, _ = _scene_split(scenes)
    voc_dir = os.path.join(out_dir, f"VOC{VOC_YEAR}")
    coco_dir = os.path.join(out_dir, "coco")
    seg_dir = os.path.join(out_dir, f"VOC{VOC_SEG_YEAR}")
    if "lvis" in formats and "coco" not in formats:
        raise ValueError("the LVIS annotations describe the COCO images: write 'coco' with 'lvis'")
    if "voc" in formats:
        for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
            os.makedirs(os.path.join(voc_dir, sub), exist_ok=True)
    if "coco" in formats:
        for sub in ("train2017", "val2017", "annotations"):
            os.makedirs(os.path.join(coco_dir, sub), exist_ok=True)
    if "voc_seg" in formats:
        for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug",
                    os.path.join("ImageSets", "Segmentation")):
            os.makedirs(os.path.join(seg_dir, sub), exist_ok=True)

    voc_ids = {"trainval": [], "test": []}
    voc_class_presence = {"trainval": [], "test": []}
    coco = {split: {"images": [], "annotations": []} for split in ("train", "val")}
    n_objects = {"train": 0, "test": 0}
    for i in range(scenes):
        img, objects = render_scene(names, size, _rng(seed, _STREAM_SCENE, i))
        jpeg = _encode_jpeg(img)
        voc_split, coco_split = ("trainval", "train") if i < n_train else ("test", "val")
        n_objects["train" if i < n_train else "test"] += len(objects)
        file_id = f"{i + 1:06d}"
        if "voc" in formats:
            _write_bytes(os.path.join(voc_dir, "JPEGImages", file_id + ".jpg"), jpeg)
            _write_bytes(os.path.join(voc_dir, "Annotations", file_id + ".xml"), _voc_xml(file_id, size, objects))
            voc_ids[voc_split].append(file_id)
            voc_class_presence[voc_split].append({o["name"] for o in objects})
        if "voc_seg" in formats:
            _write_bytes(os.path.join(seg_dir, "JPEGImages", file_id + ".jpg"), jpeg)
            labels = _voc_seg_labels(names, size, objects)
            _write_bytes(os.path.join(seg_dir, "SegmentationClass", file_id + ".png"), _png(labels, VOC_PALETTE))
            _write_bytes(os.path.join(seg_dir, "SegmentationClassAug", file_id + ".png"), _png(labels))
        if "coco" in formats:
            image_id = i + 1
            file_name = f"{image_id:012d}.jpg"
            _write_bytes(os.path.join(coco_dir, coco_split + "2017", file_name), jpeg)
            coco[coco_split]["images"].append({"id": image_id, "file_name": file_name, "width": size, "height": size})
            for obj in objects:
                x0, y0, x1, y1 = obj["box"]
                coco[coco_split]["annotations"].append({
                    "id": len(coco["train"]["annotations"]) + len(coco["val"]["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": names.index(obj["name"]) + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "segmentation": obj["polygons"],
                    "area": round(obj["area"], 4),
                    "iscrowd": 0,
                })

    counts = {"objects": n_objects}  # train = VOC trainval / COCO train, test = VOC test / COCO val
    if "voc" in formats:
        main_dir = os.path.join(voc_dir, "ImageSets", "Main")
        for split, ids in voc_ids.items():
            _write_bytes(os.path.join(main_dir, split + ".txt"), "".join(f"{i}\n" for i in ids).encode())
            # per-class lists like the real VOC devkit: "<id> 1" if the class is in the image, else "<id> -1"
            for name in names:
                lines = [f"{i} {1 if name in present else -1:2d}\n"
                         for i, present in zip(ids, voc_class_presence[split])]
                _write_bytes(os.path.join(main_dir, f"{name}_{split}.txt"), "".join(lines).encode())
        counts["voc"] = {split: len(ids) for split, ids in voc_ids.items()}
    if "voc_seg" in formats:
        # VOC2012's segmentation lists, plus train_aug (the paper's training set: VOC train + SBD; here: train)
        ids = [f"{i + 1:06d}" for i in range(scenes)]
        lists = {"train": ids[:n_train], "val": ids[n_train:], "trainval": ids, "train_aug": ids[:n_train]}
        for split, split_ids in lists.items():
            _write_bytes(os.path.join(seg_dir, "ImageSets", "Segmentation", split + ".txt"),
                         "".join(f"{i}\n" for i in split_ids).encode())
        counts["voc_seg"] = {split: len(split_ids) for split, split_ids in lists.items()}
    if "coco" in formats:
        for split, data in coco.items():
            path = os.path.join(coco_dir, "annotations", f"instances_{split}2017.json")
            with atomic_write(path, "w") as f:
                json.dump(_coco_json(names, data["images"], data["annotations"]), f)
        counts["coco"] = {split: len(data["images"]) for split, data in coco.items()}
    if "lvis" in formats:
        os.makedirs(os.path.join(out_dir, "lvis"), exist_ok=True)
        for split, data in coco.items():
            with atomic_write(os.path.join(out_dir, "lvis", f"lvis_v0.5_{split}.json"), "w") as f:
                json.dump(_lvis_json(names, split, data["images"], data["annotations"], coco["train"]), f)
    return counts


def make_voc(out_dir, classes, scenes, size, seed):
    """Write DIR/VOC2007 (JPEGImages, Annotations, ImageSets/Main); returns counts."""
    return _make_detection(out_dir, classes, scenes, size, seed, formats=("voc",))


def make_coco(out_dir, classes, scenes, size, seed):
    """Write DIR/coco/{train,val}2017 and annotations/instances_*.json (the same scenes as make_voc)."""
    return _make_detection(out_dir, classes, scenes, size, seed, formats=("coco",))


# ----------------------------------------------------------------------------------------------------------------
# parameters, metadata and the whole tree


def _class_list(classes):
    """`classes` as an int (the first N of CLASS_NAMES) or a sequence of names -> list of names."""
    if isinstance(classes, (int, np.integer)) and not isinstance(classes, bool):
        if not 2 <= classes <= len(CLASS_NAMES):
            raise UsageError(f"classes={classes}: expected 2..{len(CLASS_NAMES)} (CLASS_NAMES has "
                             f"{len(CLASS_NAMES)} shapes: {', '.join(CLASS_NAMES)})")
        return list(CLASS_NAMES[:classes])
    names = list(classes)
    unknown = [n for n in names if n not in CLASS_NAMES]
    if unknown or len(set(names)) != len(names) or len(names) < 2:
        raise UsageError(f"classes={names!r}: expected at least 2 distinct names from {', '.join(CLASS_NAMES)}")
    return names


def _resolve_params(preset, seed, overrides):
    if preset not in PRESETS:
        raise UsageError(f"preset {preset!r}: expected one of {', '.join(PRESETS)}")
    unknown = set(overrides) - set(PRESETS[preset])
    if unknown:
        raise UsageError(f"unknown synth parameter(s) {sorted(unknown)}; expected {sorted(PRESETS[preset])}")
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
    names = _class_list(p["classes"])
    check_int("images_per_class", 1)
    check_int("val_per_class", 1)
    check_int("scenes", 4)  # VOC needs >= 2 ids per split file (detectron2 reads them with np.loadtxt)
    check_int("size", MIN_SIZE, MAX_SIZE)
    check_int("scene_size", MIN_SCENE_SIZE, MAX_SIZE)
    n_train, n_test = _scene_split(p["scenes"])
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
            "imagenet": {"train": p["images_per_class"] * len(names), "val": p["val_per_class"] * len(names)},
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


_OWNED = ("imagenet", f"VOC{VOC_YEAR}", "coco", "lvis", "cityscapes", f"VOC{VOC_SEG_YEAR}", META_FILE)


def synthesize(out_dir, preset="test", seed=0, overwrite=False, **overrides):
    """Write the whole tree (ImageNet, VOC2007, COCO, LVIS, Cityscapes, VOC2012 seg) and synth.json; returns the meta.

    `overrides`: classes, images_per_class, val_per_class, scenes, size (object images), scene_size; None
    keeps the preset's value. If `out_dir` already holds a tree generated with the same parameters, it is reused
    as it is (synth.json is written last, so its presence means the tree is complete). A tree with other
    parameters, or any other non-empty directory, is refused unless `overwrite`, which replaces only the
    paths this module owns (imagenet/, VOC2007/, VOC2012/, coco/, lvis/, cityscapes/, synth.json).
    """
    out_dir = os.fspath(out_dir)
    meta = _resolve_params(preset, seed, overrides)
    if os.path.isfile(out_dir):
        raise UsageError(f"--out {out_dir!r} is a file; expected a directory")
    existing = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    if existing:
        if os.path.isfile(os.path.join(out_dir, META_FILE)):
            old = read_synth_meta(out_dir)
            changed = [k for k in PARAM_KEYS if old.get(k) != meta[k]]
            if not changed and not overwrite:
                return old
            if changed and not overwrite:
                details = ", ".join(f"{k}: {old.get(k)!r} -> {meta[k]!r}" for k in changed)
                raise UsageError(f"{out_dir!r} already holds a dataset generated with other parameters ({details}); "
                                 "use another --out or pass --overwrite")
        elif not overwrite:
            raise UsageError(f"{out_dir!r} is not empty and holds no {META_FILE} (an interrupted run or another "
                             "dataset?); use an empty or new directory, or pass --overwrite")
        for name in _OWNED:
            path = os.path.join(out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(out_dir, exist_ok=True)

    names = meta["class_names"]
    make_imagenet(out_dir, names, meta["images_per_class"], meta["val_per_class"], meta["size"], meta["seed"])
    counts = _make_detection(out_dir, names, meta["scenes"], meta["scene_size"], meta["seed"],
                             formats=("voc", "coco", "lvis", "voc_seg"))
    meta["objects"] = counts["objects"]
    make_coco_keypoints(out_dir, meta["scenes"], meta["scene_size"], meta["seed"])
    make_cityscapes(out_dir, names, meta["scenes"], meta["scene_size"], meta["seed"])
    write_synth_meta(out_dir, meta)
    return meta


# ----------------------------------------------------------------------------------------------------------------
# CLI: mocobench data synth --out DIR


def _build_parser():
    parser = argparse.ArgumentParser(prog="mocobench data", description="Generated datasets in the real formats.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    synth = actions.add_parser(
        "synth", help="write ImageNet-style, VOC, COCO (+ keypoints), LVIS and Cityscapes trees of shape images",
        description="Write DIR/imagenet/{train,val}, DIR/VOC2007, DIR/VOC2012 (segmentation), DIR/coco (instances "
                    "and person keypoints), DIR/lvis, DIR/cityscapes and DIR/synth.json. Explicit flags "
                    "override the preset: " + "; ".join(
                        f"{name}: " + ", ".join(f"{k}={v}" for k, v in p.items()) for name, p in PRESETS.items()))
    synth.add_argument("--out", required=True, help="output directory (empty, new, or a tree with the same params)")
    synth.add_argument("--preset", default="test", choices=sorted(PRESETS), help="size defaults (default: test)")
    synth.add_argument("--seed", type=int, default=0, help="same seed and sizes -> byte-identical files")
    synth.add_argument("--classes", type=int, help=f"number of shape classes (2..{len(CLASS_NAMES)})")
    synth.add_argument("--images-per-class", type=int, help="ImageNet train images per class")
    synth.add_argument("--val-per-class", type=int, help="ImageNet val images per class (default: a fifth, >= 2)")
    synth.add_argument("--scenes", type=int, help="detection scenes (a quarter -> VOC test / COCO val)")
    synth.add_argument("--size", type=int, help=f"object image side in px (>= {MIN_SIZE})")
    synth.add_argument("--scene-size", type=int, help=f"scene image side in px (>= {MIN_SCENE_SIZE})")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing generated tree in --out")
    return parser


def main(argv):
    parser = _build_parser()
    args = parser.parse_args(argv)  # argparse exits 2 on bad flags itself
    if args.action != "synth":
        parser.print_help(sys.stderr)
        return 2
    start = time.perf_counter()
    before = os.path.isfile(os.path.join(args.out, META_FILE))
    meta = synthesize(
        args.out, preset=args.preset, seed=args.seed, overwrite=args.overwrite, classes=args.classes,
        images_per_class=args.images_per_class, val_per_class=args.val_per_class, scenes=args.scenes,
        size=args.size, scene_size=args.scene_size)
    seconds = time.perf_counter() - start
    s = meta["splits"]
    verb = "reused" if before and not args.overwrite else f"wrote in {seconds:.1f} s"
    print(f"{args.out}: {verb} (preset {meta['preset']}, seed {meta['seed']})")
    print(f"  classes ({meta['num_classes']}): {', '.join(meta['class_names'])}")
    print(f"  imagenet/       {s['imagenet']['train']} train + {s['imagenet']['val']} val images, "
          f"{meta['size']} px ({meta['images_per_class']} + {meta['val_per_class']} per class)")
    print(f"  VOC{meta['voc_year']}/        {s['voc']['trainval']} trainval + {s['voc']['test']} test scenes, "
          f"{meta['scene_size']} px")
    print(f"  coco/           {s['coco']['train']} train2017 + {s['coco']['val']} val2017 scenes (same images as VOC)")
    print(f"                  {meta['objects']['train']} + {meta['objects']['test']} annotated objects")
    print(f"                  + {s['coco_keypoints']['train']} + {s['coco_keypoints']['val']} person scenes "
          "(person_keypoints_*.json, 17 COCO keypoints)")
    print(f"  lvis/           LVIS v0.5 json of the coco/ scenes ({s['lvis']['train']} train + {s['lvis']['val']} val)")
    print(f"  cityscapes/     {s['cityscapes']['train']} train + {s['cityscapes']['val']} val street scenes "
          f"({meta['scene_size']}x{meta['scene_size'] // 2} px, leftImg8bit + gtFine)")
    print(f"  VOC{VOC_SEG_YEAR}/        {s['voc_seg']['train_aug']} train_aug + {s['voc_seg']['val']} val "
          "segmentation labels (the VOC2007 scenes)")
    print(f"  {META_FILE}      class names, seed, sizes and preset for the later stages")
    return 0
