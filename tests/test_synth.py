"""Generated datasets: deterministic, in the real formats, read back through the real loaders."""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from mocobench.utils import d2compat  # noqa: F401  (before any detectron2 import)
from mocobench.utils.errors import UsageError
from mocobench.utils.synth_meta import CLASS_NAMES, META_VERSION, read_synth_meta
from synth.generate import synthesize
from synth.imagenet import make_imagenet

TINY = dict(classes=2, images_per_class=3, val_per_class=2, scenes=4, size=32, scene_size=64)


def _tree_bytes(root):
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def _voc_boxes(voc_dir, file_id):
    root = ET.parse(os.path.join(voc_dir, "Annotations", file_id + ".xml")).getroot()
    return [
        (obj.find("name").text,
         [int(obj.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")])
        for obj in root.findall("object")
    ]


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    a, b, c = (synthesize(str(tmp_path / n), seed=s, **TINY)
               for n, s in (("a", 3), ("b", 3), ("c", 4)))
    assert a == b and a["seed"] == 3 and c["seed"] == 4
    files_a, files_b, files_c = (_tree_bytes(tmp_path / n) for n in "abc")
    # 2 classes x (3 + 2) images, 4 scenes x (jpg + xml) in VOC2007, 4 scene + 4 person jpgs and 4
    # json in COCO, the 4 scenes again in VOC2012 (jpg + 2 label PNGs), 4 Cityscapes scenes
    # (image + 3 gtFine PNGs + json)
    assert len([f for f in files_a if f.startswith("imagenet")]) == 10
    assert len([f for f in files_a if f.endswith(".jpg") and "coco" in f]) == 8
    assert len([f for f in files_a if f.startswith("VOC2012/Segmentation")]) == 8
    assert len([f for f in files_a if f.startswith("cityscapes") and f.endswith(".png")]) == 16
    assert files_a == files_b
    assert files_a.keys() == files_c.keys()
    changed = [k for k in files_a if files_a[k] != files_c[k]]
    assert sum(k.endswith(".jpg") for k in changed) == 10 + 4 + 8 + 4
    assert sum(k.endswith("leftImg8bit.png") for k in changed) == 4
    for name in ("coco/annotations/instances_train2017.json",
                 "coco/annotations/person_keypoints_train2017.json", "lvis/lvis_v0.5_train.json"):
        assert name in changed


def test_class_images_do_not_depend_on_the_number_of_classes(synth_root, tmp_path):
    meta = read_synth_meta(synth_root)
    make_imagenet(str(tmp_path), 2, 2, 1, meta["size"], meta["seed"])
    for name in CLASS_NAMES[:2]:
        for rel in (f"train/{name}/{name}_00001.jpg", f"val/{name}/{name}_00000.jpg"):
            new, old = tmp_path / "imagenet" / rel, os.path.join(synth_root, "imagenet", rel)
            with open(old, "rb") as f:
                assert new.read_bytes() == f.read(), rel


def test_meta_describes_the_tree(synth_root):
    meta = read_synth_meta(synth_root)
    assert meta["preset"] == "test" and meta["seed"] == 0
    assert meta["class_names"] == list(CLASS_NAMES[:4]) and meta["num_classes"] == 4
    assert meta["val_per_class"] == 2  # a fifth of 12, at least 2
    assert meta["splits"]["voc"] == {"trainval": 12, "test": 4} and \
        meta["splits"]["coco"] == {"train": 12, "val": 4}
    for key, rel in meta["paths"].items():
        assert os.path.exists(os.path.join(synth_root, rel)), key


def test_read_synth_meta_rejects_missing_and_broken_files(tmp_path):
    with pytest.raises(UsageError, match="synth.json.*does not exist"):
        read_synth_meta(str(tmp_path))
    (tmp_path / "synth.json").write_text("{not json")
    with pytest.raises(UsageError, match="not readable JSON"):
        read_synth_meta(str(tmp_path))
    (tmp_path / "synth.json").write_text(json.dumps({"format": "mocobench-synth",
                                                     "version": META_VERSION}))
    with pytest.raises(UsageError, match="missing key"):
        read_synth_meta(str(tmp_path))
    # a tree from an older generator (other images for the same seed) must be regenerated, not
    # reused
    (tmp_path / "synth.json").write_text(json.dumps({"format": "mocobench-synth",
                                                     "version": META_VERSION - 1}))
    with pytest.raises(UsageError, match="regenerate the data"):
        read_synth_meta(str(tmp_path))


def test_imagenet_tree_loads_with_torchvision_imagefolder(synth_root):
    from torchvision.datasets import ImageFolder

    train = ImageFolder(os.path.join(synth_root, "imagenet", "train"))
    val = ImageFolder(os.path.join(synth_root, "imagenet", "val"))
    assert sorted(train.classes) == sorted(CLASS_NAMES[:4]) and train.classes == val.classes
    assert len(train) == 4 * 12 and len(val) == 4 * 2
    assert np.bincount(train.targets).tolist() == [12] * 4
    image, target = train[0]
    assert image.size == (64, 64) and image.mode == "RGB" and target == 0


def test_voc_xml_like_the_real_devkit(synth_root):
    voc = os.path.join(synth_root, "VOC2007")
    main = os.path.join(voc, "ImageSets", "Main")
    ids = {s: open(os.path.join(main, s + ".txt")).read().split() for s in ("trainval", "test")}
    assert len(ids["trainval"]) == 12 and len(ids["test"]) == 4 and \
        not set(ids["trainval"]) & set(ids["test"])
    n_objects = 0
    for file_id in ids["trainval"] + ids["test"]:
        root = ET.parse(os.path.join(voc, "Annotations", file_id + ".xml")).getroot()
        assert root.find("filename").text == file_id + ".jpg"
        assert os.path.isfile(os.path.join(voc, "JPEGImages", file_id + ".jpg"))
        assert [int(root.find("size").find(k).text) for k in ("width", "height", "depth")] == \
            [128, 128, 3]
        objects = root.findall("object")
        assert 1 <= len(objects) <= 6
        for obj in objects:
            assert obj.find("name").text in CLASS_NAMES[:4]
            assert obj.find("pose").text == "Unspecified"
            assert obj.find("truncated").text in ("0", "1") and obj.find("difficult").text == "0"
            xmin, ymin, xmax, ymax = (int(obj.find("bndbox").find(k).text)
                                      for k in ("xmin", "ymin", "xmax", "ymax"))
            assert 1 <= xmin < xmax <= 128 and 1 <= ymin < ymax <= 128  # 1-based inclusive
        n_objects += len(objects)
    assert n_objects >= 2 * 16 * 0.8
    # per-class lists: "<id>  1" exactly for the images that contain the class
    circle = dict(line.split() for line in open(os.path.join(main, "circle_trainval.txt")))
    assert list(circle) == ids["trainval"]
    for file_id, flag in circle.items():
        assert (flag == "1") == any(name == "circle" for name, _ in _voc_boxes(voc, file_id))


def test_voc_loads_through_detectron2(synth_root):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_pascal_voc
    from detectron2.structures import BoxMode

    meta = read_synth_meta(synth_root)
    name = "synth_test_voc_2007_trainval"
    if name not in DatasetCatalog.list():
        register_pascal_voc(name, os.path.join(synth_root, "VOC2007"), "trainval", 2007,
                            class_names=meta["class_names"])
    dicts = DatasetCatalog.get(name)
    assert MetadataCatalog.get(name).thing_classes == meta["class_names"]
    assert len(dicts) == 12
    for d in dicts:
        assert os.path.isfile(d["file_name"]) and (d["height"], d["width"]) == (128, 128)
        assert d["annotations"]
        for ann in d["annotations"]:
            x0, y0, x1, y1 = ann["bbox"]
            assert ann["bbox_mode"] == BoxMode.XYXY_ABS and 0 <= ann["category_id"] < 4
            assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128


def _coco(synth_root, split):
    from pycocotools.coco import COCO

    return COCO(os.path.join(synth_root, "coco", "annotations", f"instances_{split}2017.json"))


@pytest.mark.parametrize("split,count", [("train", 12), ("val", 4)])
def test_coco_boxes_polygons_and_areas_match_the_masks(synth_root, split, count):
    coco = _coco(synth_root, split)
    assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == \
        list(enumerate(CLASS_NAMES[:4], 1))
    assert len(coco.getImgIds()) == count
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= 2 * count * 0.8 and len({a["id"] for a in anns}) == len(anns)
    for ann in anns:
        image = coco.loadImgs(ann["image_id"])[0]
        assert os.path.isfile(os.path.join(synth_root, "coco", f"{split}2017", image["file_name"]))
        assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= 4
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= image["width"] and \
            y + h <= image["height"]
        points = np.concatenate([np.reshape(p, (-1, 2)) for p in ann["segmentation"]])
        assert all(len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"])
        # polygons trace the outline 1/8 px inside the pixel edges the box is made of
        assert np.allclose(points.min(0), [x, y], atol=0.5) and \
            np.allclose(points.max(0), [x + w, y + h], atol=0.5)
        mask = coco.annToMask(ann)
        assert abs(mask.sum() - ann["area"]) <= 0.12 * ann["area"]
        ys, xs = np.nonzero(mask)
        assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == \
            [x, y, w, h]


def test_coco_and_voc_describe_the_same_scenes(synth_root):
    coco = _coco(synth_root, "train")
    voc = os.path.join(synth_root, "VOC2007")
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    for image in coco.loadImgs(coco.getImgIds()):
        file_id = "%06d" % image["id"]
        with open(os.path.join(voc, "JPEGImages", file_id + ".jpg"), "rb") as f:
            voc_jpeg = f.read()
        with open(os.path.join(synth_root, "coco", "train2017", image["file_name"]), "rb") as f:
            assert f.read() == voc_jpeg
        coco_boxes = [(names[a["category_id"]], [a["bbox"][0] + 1, a["bbox"][1] + 1,
                                                 a["bbox"][0] + a["bbox"][2],
                                                 a["bbox"][1] + a["bbox"][3]])
                      for a in coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))]
        assert coco_boxes == _voc_boxes(voc, file_id)


def test_coco_loads_through_detectron2(synth_root):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.structures import BoxMode

    meta = read_synth_meta(synth_root)
    name = "synth_test_coco_2017_val"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, os.path.join(synth_root, meta["paths"]["coco_val_json"]),
                                os.path.join(synth_root, meta["paths"]["coco_val_images"]))
    dicts = DatasetCatalog.get(name)
    assert MetadataCatalog.get(name).thing_classes == meta["class_names"]
    assert len(dicts) == 4
    for d in dicts:
        assert os.path.isfile(d["file_name"])
        for ann in d["annotations"]:
            # contiguous ids
            assert ann["bbox_mode"] == BoxMode.XYWH_ABS and 0 <= ann["category_id"] < 4
            assert ann["segmentation"] and ann["iscrowd"] == 0


def test_scenes_vary_in_object_count_and_size(tmp_path):
    meta = synthesize(str(tmp_path), classes=4, images_per_class=1, scenes=40, size=32,
                      scene_size=128)
    coco = _coco(str(tmp_path), "train")
    per_image = np.bincount([a["image_id"] for a in coco.loadAnns(coco.getAnnIds())])[1:]
    assert per_image.min() >= 1 and per_image.max() <= 6 and len(set(per_image.tolist())) >= 3
    sides = np.array([max(a["bbox"][2:]) for a in coco.loadAnns(coco.getAnnIds())])
    assert sides.min() < 20 and sides.max() > 50  # small and large objects
    assert set(a["category_id"] for a in coco.loadAnns(coco.getAnnIds())) == {1, 2, 3, 4}
    assert meta["objects"]["train"] == len(sides)


def test_synthesize_reuses_same_params_and_refuses_others(tmp_path):
    out = str(tmp_path / "d")
    synthesize(out, seed=1, **TINY)
    stamp = os.stat(os.path.join(out, "synth.json")).st_mtime_ns
    assert synthesize(out, seed=1, **TINY)["seed"] == 1
    assert os.stat(os.path.join(out, "synth.json")).st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(UsageError, match=r"other parameters \(seed: 1 -> 2\)"):
        synthesize(out, seed=2, **TINY)
    meta = synthesize(out, seed=2, overwrite=True, **dict(TINY, classes=3))
    assert meta["seed"] == 2 and \
        sorted(os.listdir(os.path.join(out, "imagenet", "train"))) == sorted(CLASS_NAMES[:3])


@pytest.mark.parametrize("overrides,message", [
    (dict(classes=len(CLASS_NAMES) + 1), "classes=13: expected 2..12"),
    (dict(classes=1), "classes=1"),
    (dict(size=16), "size=16: expected an integer 32..1024"),
    (dict(scene_size=40), "scene_size=40"),
    (dict(scenes=3), "scenes=3"),
    (dict(images_per_class=0), "images_per_class=0"),
    (dict(preset="huge"), "preset 'huge'"),
    (dict(colour="red"), "unknown synth parameter"),
])
def test_bad_parameters_raise_usage_error(tmp_path, overrides, message):
    with pytest.raises(UsageError, match=message):
        synthesize(str(tmp_path / "x"), **overrides)
    assert not (tmp_path / "x").exists()


# What the installed `mocobench` console script runs, in a fresh process. (`python -m mocobench.cli`
# would load cli.py twice, as __main__ and as mocobench.cli, and its `except UsageError` would miss
# the stages' UsageError.)
MOCOBENCH = [sys.executable, "-c", "import sys; from mocobench.cli import main; sys.exit(main())"]


def _cli(*args):
    return subprocess.run([*MOCOBENCH, "data", "synth", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_writes_the_tree_and_rejects_bad_input(tmp_path):
    out = str(tmp_path / "cli")
    # the test preset's val default (a fifth, >= 2); the CLI's default preset is demo
    flags = ["--preset", "test", "--classes", "2", "--images-per-class", "2", "--scenes", "4",
             "--size", "32", "--scene-size", "64"]
    result = _cli("--out", out, "--seed", "5", *flags)
    assert result.returncode == 0, result.stderr
    assert "4 train + 4 val images" in result.stdout and "3 trainval + 2 test" not in result.stdout
    assert "2 trainval + 2 test scenes" in result.stdout
    meta = read_synth_meta(out)
    assert (meta["seed"], meta["num_classes"], meta["val_per_class"]) == (5, 2, 2)
    assert sorted(os.listdir(out)) == \
        ["VOC2007", "VOC2012", "cityscapes", "coco", "imagenet", "lvis", "synth.json"]

    again = _cli("--out", out, "--seed", "5", *flags)
    assert again.returncode == 0 and "reused" in again.stdout

    for args, message in [
        (["--out", out, "--seed", "6", *flags], "other parameters (seed: 5 -> 6)"),
        (["--out", str(tmp_path / "n"), "--classes", "99"], "classes=99: expected 2..12"),
        (["--out", str(tmp_path / "n"), "--size", "8"], "size=8"),
        (["--out", str(tmp_path)], "is not empty and holds no synth.json"),
    ]:
        bad = _cli(*args)
        assert bad.returncode == 2, (args, bad.stdout, bad.stderr)
        assert message in bad.stderr and "Traceback" not in bad.stderr
    bad_flag = _cli("--out", out, "--preset", "huge")
    assert bad_flag.returncode == 2 and "invalid choice" in bad_flag.stderr


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_annotation_traces_the_drawn_shape(name):
    from pycocotools import mask as mask_utils

    from synth.raster import mask_annotation, shape_alpha

    alpha = shape_alpha(name, center=(40.3, 37.6), radius=21.0, aspect=1.2, angle=0.7,
                        canvas_hw=(80, 90))
    ann = mask_annotation(alpha >= 128)
    x0, y0, x1, y1 = ann["box"]
    drawn = np.nonzero(alpha >= 128)
    assert (x0, y0, x1, y1) == \
        (drawn[1].min(), drawn[0].min(), drawn[1].max() + 1, drawn[0].max() + 1)
    polygon_mask = mask_utils.decode(
        mask_utils.merge(mask_utils.frPyObjects(ann["polygons"], 80, 90))).astype(bool)
    assert polygon_mask[alpha >= 128].all()  # every drawn pixel is inside the outline...
    assert not polygon_mask[alpha < 64].any() or name == "ring"  # ...and nothing well outside it
    assert abs(polygon_mask.sum() - ann["area"]) <= 0.06 * ann["area"]
    # documented: the outline has no hole, the ring's centre is inside its segmentation
    if name == "ring":
        assert alpha[38, 40] == 0 and polygon_mask[38, 40]
