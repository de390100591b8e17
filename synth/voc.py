"""PASCAL VOC as the devkit lays it out: VOC2007 detection and VOC2012 semantic segmentation.

Both show the shape scenes (raster.write_scenes), read back by detectron2's own VOC loaders:
VOC2007 as XML annotations with 1-based inclusive pixel boxes and the ImageSets/Main lists (per
class too), VOC2012 as palette PNG labels with VOC's 255 "void" band along every outline, plus the
greyscale SegmentationClassAug copy that train_aug uses.
"""
import io
import os
import xml.etree.ElementTree as ET

import cv2
import numpy as np

from synth.raster import class_list, write_bytes, write_scenes

VOC_YEAR = 2007
VOC_SEG_YEAR = 2012  # VOC semantic segmentation is VOC2012's (train_aug / val)
VOC_IGNORE = 255     # VOC's "void" label: object outlines (and, in the real set, hard pixels)


# -----------------------------------------------------------------------------------------------
# detection: VOC2007


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
        # VOC boxes are 1-based inclusive pixel indices: pixel columns x0..x1-1 are
        # xmin=x0+1 .. xmax=x1
        for key, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(bndbox, key).text = str(value)
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="unicode").encode() + b"\n"


class VocDetectionWriter:
    """DIR/VOC2007: JPEGImages, Annotations (XML) and ImageSets/Main of the scenes
    (write_scenes)."""

    def __init__(self, out_dir, class_names, size):
        self.dir = os.path.join(out_dir, f"VOC{VOC_YEAR}")
        self.names, self.size = class_names, size
        for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        self.ids = {"trainval": [], "test": []}
        self.class_presence = {"trainval": [], "test": []}

    def add(self, index, train, jpeg, objects):
        split = "trainval" if train else "test"
        file_id = f"{index + 1:06d}"
        write_bytes(os.path.join(self.dir, "JPEGImages", file_id + ".jpg"), jpeg)
        write_bytes(os.path.join(self.dir, "Annotations", file_id + ".xml"),
                    _voc_xml(file_id, self.size, objects))
        self.ids[split].append(file_id)
        self.class_presence[split].append({o["name"] for o in objects})

    def finish(self):
        main_dir = os.path.join(self.dir, "ImageSets", "Main")
        for split, ids in self.ids.items():
            write_bytes(os.path.join(main_dir, split + ".txt"),
                        "".join(f"{i}\n" for i in ids).encode())
            # per-class lists like the real VOC devkit: "<id> 1" if the class is in the image, else
            # "<id> -1"
            for name in self.names:
                lines = [f"{i} {1 if name in present else -1:2d}\n"
                         for i, present in zip(ids, self.class_presence[split])]
                write_bytes(os.path.join(main_dir, f"{name}_{split}.txt"), "".join(lines).encode())
        return {"voc": {split: len(ids) for split, ids in self.ids.items()}}


def make_voc(out_dir, classes, scenes, size, seed):
    """Write DIR/VOC2007 (JPEGImages, Annotations, ImageSets/Main); returns counts."""
    names = class_list(classes)
    return write_scenes(names, scenes, size, seed, [VocDetectionWriter(out_dir, names, size)])


# -----------------------------------------------------------------------------------------------
# semantic segmentation: VOC2012 (the paper's VOC seg transfer task, Table 6)


def _voc_palette():
    """PASCAL VOC's colour map (the devkit's bit-interleaving labelcolormap): index i -> RGB,
    255 -> (224,224,192)."""
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
    """uint8 labels -> PNG bytes: palette ("P") mode like VOC's SegmentationClass, else greyscale
    ("L")."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8), mode="L")
    if palette is not None:
        # indices kept: an "L" image converts to "P" with the identity palette
        image = image.convert("P")
        image.putpalette(palette.reshape(-1).tolist())
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _voc_seg_labels(names, size, objects):
    """Per-pixel class index (0 background, k+1 for names[k]) with VOC's void band (255) along every
    outline."""
    labels = np.zeros((size, size), np.uint8)
    for obj in objects:  # visible masks: each pixel belongs to at most one object
        labels[obj["mask"]] = names.index(obj["name"]) + 1
    kernel = np.ones((3, 3), np.uint8)
    border = cv2.dilate(labels, kernel) != cv2.erode(labels, kernel)
    labels[border] = VOC_IGNORE
    return labels


class VocSegmentationWriter:
    """DIR/VOC2012: JPEGImages, SegmentationClass(Aug) and ImageSets/Segmentation of the scenes."""

    def __init__(self, out_dir, class_names, size):
        self.dir = os.path.join(out_dir, f"VOC{VOC_SEG_YEAR}")
        self.names, self.size = class_names, size
        for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug",
                    os.path.join("ImageSets", "Segmentation")):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        self.ids = {"train": [], "val": []}

    def add(self, index, train, jpeg, objects):
        file_id = f"{index + 1:06d}"
        write_bytes(os.path.join(self.dir, "JPEGImages", file_id + ".jpg"), jpeg)
        labels = _voc_seg_labels(self.names, self.size, objects)
        write_bytes(os.path.join(self.dir, "SegmentationClass", file_id + ".png"),
                    _png(labels, VOC_PALETTE))
        write_bytes(os.path.join(self.dir, "SegmentationClassAug", file_id + ".png"), _png(labels))
        self.ids["train" if train else "val"].append(file_id)

    def finish(self):
        # VOC2012's segmentation lists, plus train_aug (the paper's training set: VOC train + SBD;
        # here: train)
        train, val = self.ids["train"], self.ids["val"]
        lists = {"train": train, "val": val, "trainval": train + val, "train_aug": train}
        for split, split_ids in lists.items():
            write_bytes(os.path.join(self.dir, "ImageSets", "Segmentation", split + ".txt"),
                        "".join(f"{i}\n" for i in split_ids).encode())
        return {"voc_seg": {split: len(split_ids) for split, split_ids in lists.items()}}
