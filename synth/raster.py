"""What every generated format shares: the shapes, how they are drawn, and the shape scenes.

The class of an object is its shape identity only. Colour (muted), shading, size, a small rotation
(objects stand upright), aspect ratio and the background (gradient and noise) are drawn from the
same distributions for every class, so colour statistics alone do not tell the classes apart while
the shapes do.

Annotations are computed from the rasterised visible mask of each object (after occlusion by the
objects drawn later and clipping at the image border), so boxes, polygons and pixels agree
(mask_annotation):
- the box is the tight box of the mask; in VOC it is written 1-based inclusive ([xmin-1, ymin-1,
  xmax, ymax] in detectron2's loader gives back the pixel-edge box), in COCO as [x, y, w, h] with
  pixel-edge coordinates;
- the polygons trace the outer outline of each visible part (rasterising them with pycocotools gives
  back the mask). Holes are not represented: a ring's segmentation is its outer outline (its hole is
  filled), the same simplification the COCO polygon format forces on real annotators;
- `area` is the area of those polygons.

Every image draws from its own `np.random.SeedSequence([seed, stream, ...])` (seeded_rng), one
stream per kind of image, and JPEGs are encoded with a fixed quality: the same seed and sizes give
the same bytes. The VOC2007, VOC2012 segmentation, COCO and LVIS trees show the same scenes, drawn
once (write_scenes).
"""
import math

import cv2
import numpy as np

from mocobench.utils.errors import UsageError
from mocobench.utils.synth_meta import CLASS_NAMES

JPEG_QUALITY = 90

# seed streams, so that ImageNet train/val and the scenes never share random numbers
STREAM_TRAIN, STREAM_VAL, STREAM_SCENE, STREAM_PERSON, STREAM_STREET = 0, 1, 2, 3, 4


# -----------------------------------------------------------------------------------------------
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
    "cross": lambda: [(np.array([[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3], [1, 0.3],
                                 [0.3, 0.3], [0.3, 1], [-0.3, 1], [-0.3, 0.3], [-1, 0.3],
                                 [-1, -0.3], [-0.3, -0.3]]), 1)],
    "ring": lambda: [(_regular(48), 1), (_regular(48, 0.55), -1)],
    "hexagon": lambda: [(_regular(6), 1)],
    "heart": lambda: [(_heart(), 1)],
    "arrow": lambda: [(np.array([[-1, -0.22], [0.15, -0.22], [0.15, -0.6], [1, 0], [0.15, 0.6],
                                 [0.15, 0.22], [-1, 0.22]]), 1)],
    "crescent": lambda: [(_regular(48), 1), (_regular(48, 0.85) + [0.45, -0.1], -1)],
    "semicircle": lambda: [(_semicircle(), 1)],
    "lshape": lambda: [(np.array([[-0.75, -1], [-0.2, -1], [-0.2, 0.45], [0.75, 0.45], [0.75, 1],
                                  [-0.75, 1]]), 1)],
}
_SHAPE_LAYERS = {name: [(np.asarray(p, np.float64), s) for p, s in build()]
                 for name, build in SHAPES.items()}
assert tuple(SHAPES) == CLASS_NAMES


def shape_alpha(name, center, radius, aspect, angle, canvas_hw):
    """Anti-aliased coverage (uint8 0..255) of one shape placed on a canvas.

    Continuous coordinates: pixel (i, j) covers [j, j+1] x [i, i+1]; cv2 puts integer coordinates at
    pixel centres, hence the -0.5. Drawn with 4 fractional bits so sub-pixel poses look different.
    """
    c, s = math.cos(angle), math.sin(angle)
    scale = np.array([radius * math.sqrt(aspect), radius / math.sqrt(aspect)])
    rot = np.array([[c, -s], [s, c]])
    alpha = np.zeros(canvas_hw, np.uint8)
    for poly, sign in _SHAPE_LAYERS[name]:
        pts = (poly * scale) @ rot.T + np.asarray(center) - 0.5
        cv2.fillPoly(alpha, [np.round(pts * 16).astype(np.int32)], 255 if sign > 0 else 0,
                     cv2.LINE_AA, 4)
    return alpha


def class_list(classes):
    """`classes` as an int (the first N of CLASS_NAMES) or a sequence of names -> list of names."""
    if isinstance(classes, (int, np.integer)) and not isinstance(classes, bool):
        if not 2 <= classes <= len(CLASS_NAMES):
            raise UsageError(f"classes={classes}: expected 2..{len(CLASS_NAMES)} (CLASS_NAMES has "
                             f"{len(CLASS_NAMES)} shapes: {', '.join(CLASS_NAMES)})")
        return list(CLASS_NAMES[:classes])
    names = list(classes)
    unknown = [n for n in names if n not in CLASS_NAMES]
    if unknown or len(set(names)) != len(names) or len(names) < 2:
        raise UsageError(f"classes={names!r}: expected at least 2 distinct names from "
                         f"{', '.join(CLASS_NAMES)}")
    return names


# -----------------------------------------------------------------------------------------------
# appearance: colours, shading and backgrounds, shared by every class
#
# Colours are muted (a grey level with a small tint) and objects stand upright (+-15 degrees, as
# objects do in photographs). Both keep the instance-specific detail that no class owns small: a
# contrastive learner matches two crops of one image by whatever survives the augmentations, and a
# saturated random hue (colour jitter moves hue by at most 0.1) or a random rotation (no
# augmentation rotates) would be that cue instead of the shape.
# Measured (ResNet-18 MoCo v2 at 32 px, 8 classes, 2000 images, kNN top-1, chance 12.5 %):
# saturated random colours and free rotation (no textures, no clutter): 13-15 % through 24 epochs
# (16 % after 8 with the blur scaled to the crop); grey, upright: 40 % after 24 epochs; these muted
# colours, upright: 33 % after 20 epochs (the demo; 21 % after 4).

UPRIGHT = math.radians(15)  # largest rotation of an object


def muted_colour(rng):
    """A grey level plus a tint of at most 30 per channel."""
    return np.clip(rng.uniform(0, 255) + rng.uniform(-30, 30, size=3), 0, 255).astype(np.float32)


def _linear_ramp(rng, xx, yy, c1, c2):
    """c1 -> c2 along a random direction across the grid (a gradient background, or an object's
    shading)."""
    t = rng.uniform(0, 2 * np.pi)
    p = xx * math.cos(t) + yy * math.sin(t)
    p = (p - p.min()) / max(float(p.max() - p.min()), 1e-6)
    return c1 + p[..., None] * (c2 - c1)


def grid(h, w):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return xx, yy


def background(rng, h, w):
    """A gradient between two muted colours plus sensor-like noise."""
    xx, yy = grid(h, w)
    img = _linear_ramp(rng, xx, yy, muted_colour(rng), muted_colour(rng))
    img = img + rng.standard_normal((h, w, 3), dtype=np.float32) * rng.uniform(0, 8)
    return np.clip(img, 0, 255)


def object_appearance(rng, xx, yy, background_colour):
    """A muted colour with soft shading; its mean is kept >= 60 away from the background so the
    outline shows."""
    for _ in range(20):
        colour = muted_colour(rng)
        if np.linalg.norm(colour - background_colour) >= 60:
            break
    shade = np.clip(colour + rng.uniform(-20, 20), 0, 255).astype(np.float32)
    return _linear_ramp(rng, xx, yy, colour, shade)


def composite(img, texture, alpha):
    a = alpha.astype(np.float32)[..., None] / 255.0
    img *= 1.0 - a
    img += texture * a


def encode_jpeg(rgb_float):
    rgb = np.clip(np.round(rgb_float), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]),
                           [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("cv2 could not encode a JPEG")
    return buf.tobytes()


def write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def seeded_rng(*key):
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


# -----------------------------------------------------------------------------------------------
# object-centric images (ImageNet stand-in)


def render_object_image(class_name, size, rng):
    """One object of `class_name` on a gradient background; returns an RGB float32 image (size x
    size x 3)."""
    img = background(rng, size, size)
    radius = size * rng.uniform(0.24, 0.42)
    aspect = math.exp(rng.uniform(-0.25, 0.25))
    angle = rng.uniform(-UPRIGHT, UPRIGHT)
    slack = max(0.0, size / 2 - radius * 0.85)
    center = size / 2 + rng.uniform(-slack, slack, 2)
    alpha = shape_alpha(class_name, center, radius, aspect, angle, (size, size))
    xx, yy = grid(size, size)
    texture = object_appearance(rng, xx, yy, img.mean(axis=(0, 1)))
    composite(img, texture, alpha)
    return img


# -----------------------------------------------------------------------------------------------
# multi-object scenes (VOC / COCO stand-in)

# polygons are traced on a 4x nearest-neighbour copy of the mask: they run 1/8 px inside its edge
_UPSAMPLE = 4


def mask_annotation(mask):
    """Tight box (pixel edges, x0 y0 x1 y1), outline polygons and polygon area of a binary mask, or
    None.

    Specks (connected parts smaller than 4 px or 5% of the largest part, left by anti-aliasing or
    occlusion) are dropped first, so the box and the polygons describe the same pixels; "mask" is
    what is left (the pixels of the semantic-segmentation labels).
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = 1 + np.nonzero(areas >= max(4, 0.05 * areas.max()))[0]
    kept = np.isin(labels, keep)
    ys, xs = np.nonzero(kept)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    up = cv2.resize(kept.astype(np.uint8), None, fx=_UPSAMPLE, fy=_UPSAMPLE,
                    interpolation=cv2.INTER_NEAREST)
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
    return {"box": box, "polygons": polygons, "area": area, "mask_pixels": int(kept.sum()),
            "mask": kept}


def render_scene(class_names, size, rng):
    """A scene of 2-6 objects of `class_names`; returns (RGB float32 image, list of object dicts).

    Objects are drawn in order, later ones on top. A placement is redrawn when it would hide more
    than 40% of an earlier object or leave less than 60% of itself inside the image, so every object
    stays recognisable; sizes are log-uniform from ~14% to 50% of the side, so some are small. Each
    object dict: name, box, polygons, area, truncated (cut by the image border).
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
            alpha_big = shape_alpha(name, center + pad, radius, aspect, angle, big)
            alpha = alpha_big[pad:pad + size, pad:pad + size]
            full = alpha >= 128
            inside, total = int(full.sum()), int((alpha_big >= 128).sum())
            if inside < 24 or inside < 0.6 * total:
                continue
            if any((p["visible"] & ~full).sum() < 0.6 * p["full"].sum() for p in placed):
                continue
            for p in placed:
                p["visible"] = p["visible"] & ~full
            placed.append(dict(name=name, radius=radius, full=full, visible=full.copy(),
                               alpha=alpha, truncated=inside < total))
            break

    img = background(rng, size, size)
    xx, yy = grid(size, size)
    objects = []
    for p in placed:
        texture = object_appearance(rng, xx, yy, img.mean(axis=(0, 1)))
        composite(img, texture, p["alpha"])
    for p in placed:
        ann = mask_annotation(p["visible"])
        if ann is None:
            continue
        objects.append(dict(name=p["name"], truncated=bool(p["truncated"]), **ann))
    return img, objects


def scene_split(scenes):
    """(number in VOC trainval / COCO train, number in VOC test / COCO val): a quarter held out,
    >= 2 each."""
    held_out = max(2, int(round(scenes * 0.25)))
    return scenes - held_out, held_out


def write_scenes(class_names, scenes, size, seed, writers):
    """Draw the shape scenes once and hand each to every writer; returns the counts.

    A writer (voc.VocDetectionWriter, voc.VocSegmentationWriter, coco.CocoInstancesWriter) gets
    `add(index, train, jpeg, objects)` for every scene (`train`: the first part of scene_split, VOC
    trainval / COCO train), then `finish()`, which writes its lists and json and returns its counts.
    """
    n_train, _ = scene_split(scenes)
    n_objects = {"train": 0, "test": 0}
    for i in range(scenes):
        img, objects = render_scene(class_names, size, seeded_rng(seed, STREAM_SCENE, i))
        jpeg = encode_jpeg(img)
        n_objects["train" if i < n_train else "test"] += len(objects)
        for writer in writers:
            writer.add(i, i < n_train, jpeg, objects)
    counts = {"objects": n_objects}  # train = VOC trainval / COCO train, test = VOC test / COCO val
    for writer in writers:
        counts.update(writer.finish())
    return counts
