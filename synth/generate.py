"""Generated datasets in the real on-disk formats, read through the real loaders: the whole tree.

Nothing can be downloaded here, so every test and the demo use data drawn by this package. It
mirrors the real transfer setting: object-centric images for pretraining (ImageNet) -> multi-object
scenes for detection (PASCAL VOC 2007, COCO 2017) and the paper's other transfer tasks, all of the
same shape classes. One module per format (imagenet, voc, coco, cityscapes) writes its part
of the tree under DIR:

  imagenet/{train,val}/<class>/<class>_00000.jpg  one object per image (torchvision ImageFolder)
  VOC2007/JPEGImages/000001.jpg                   2-6 objects per scene
  VOC2007/Annotations/000001.xml                  VOC XML, 1-based inclusive pixel boxes
  VOC2007/ImageSets/Main/{trainval,test}.txt      (+ <class>_<split>.txt like the real set)
  coco/{train,val}2017/000000000001.jpg           the same scenes as VOC (trainval->train,
                                                  test->val)
  coco/annotations/instances_{train,val}2017.json bbox xywh, polygon segmentation, area, iscrowd 0
  coco/annotations/person_keypoints_{train,val}2017.json
                                                  stick figures (images 001000000001.jpg, ...)
                                                  with COCO's 17 keypoints and visibility flags
  lvis/lvis_v0.5_{train,val}.json                 the COCO scenes in LVIS v0.5's federated format
  cityscapes/leftImg8bit/{train,val}/<city>/*.png 2:1 street scenes; gtFine/ polygons json + the
                                                  labelIds/labelTrainIds/instanceIds PNGs
  VOC2012/SegmentationClass/000001.png            the VOC2007 scenes' labels, VOC palette, 255
                                                  borders
  VOC2012/SegmentationClassAug/000001.png         the same labels as greyscale (train_aug's format)
  VOC2012/ImageSets/Segmentation/{train_aug,val}.txt
  synth.json                                      class names, seed, sizes, preset (read_synth_meta)

Everything is deterministic from the seed (see raster) and the JSON has no timestamps, so the same
seed and sizes give byte-identical files. synth.json is written last: its presence means the tree
is complete, and its parameters decide whether an existing tree can be reused.
"""
import os
import shutil

from mocobench.utils.errors import UsageError
from mocobench.utils.synth_meta import META_FILE, PARAM_KEYS, read_synth_meta, write_synth_meta
from synth.cityscapes import make_cityscapes
from synth.coco import CocoInstancesWriter, make_coco_keypoints
from synth.imagenet import make_imagenet
from synth.presets import resolve_params
from synth.raster import write_scenes
from synth.voc import VOC_SEG_YEAR, VOC_YEAR, VocDetectionWriter, VocSegmentationWriter

_OWNED = ("imagenet", f"VOC{VOC_YEAR}", "coco", "lvis", "cityscapes", f"VOC{VOC_SEG_YEAR}",
          META_FILE)


def synthesize(out_dir, preset="test", seed=0, overwrite=False, **overrides):
    """Write the whole tree (ImageNet, VOC2007, COCO, LVIS, Cityscapes, VOC2012 seg) and synth.json;
    returns the meta.

    `overrides`: classes, images_per_class, val_per_class, scenes, size (object images), scene_size;
    None keeps the preset's value. If `out_dir` already holds a tree generated with the same
    parameters, it is reused as it is (synth.json is written last, so its presence means the tree is
    complete). A tree with other parameters, or any other non-empty directory, is refused unless
    `overwrite`, which replaces only the paths this module owns (imagenet/, VOC2007/, VOC2012/,
    coco/, lvis/, cityscapes/, synth.json).
    """
    out_dir = os.fspath(out_dir)
    meta = resolve_params(preset, seed, overrides)
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
                raise UsageError(f"{out_dir!r} already holds a dataset generated with other "
                                 f"parameters ({details}); use another --out or pass --overwrite")
        elif not overwrite:
            raise UsageError(f"{out_dir!r} is not empty and holds no {META_FILE} (an interrupted "
                             "run or another dataset?); use an empty or new directory, or pass "
                             "--overwrite")
        for name in _OWNED:
            path = os.path.join(out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(out_dir, exist_ok=True)

    names, size = meta["class_names"], meta["scene_size"]
    make_imagenet(out_dir, names, meta["images_per_class"], meta["val_per_class"], meta["size"],
                  meta["seed"])
    # the VOC2007, COCO (+ LVIS) and VOC2012 seg trees show the same scenes, drawn once
    writers = [VocDetectionWriter(out_dir, names, size),
               CocoInstancesWriter(out_dir, names, size, lvis=True),
               VocSegmentationWriter(out_dir, names, size)]
    counts = write_scenes(names, meta["scenes"], size, meta["seed"], writers)
    meta["objects"] = counts["objects"]
    make_coco_keypoints(out_dir, meta["scenes"], meta["scene_size"], meta["seed"])
    make_cityscapes(out_dir, names, meta["scenes"], meta["scene_size"], meta["seed"])
    write_synth_meta(out_dir, meta)
    return meta
