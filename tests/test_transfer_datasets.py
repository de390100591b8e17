"""transfer.datasets: where the generated datasets are found, their registration, and the checks
that run before any training process starts (errors name the dataset, the path and the expected
layout)."""
import os
import shutil

import pytest

from mocobench.utils import d2compat  # noqa: F401  (before detectron2)
from mocobench.utils.errors import UsageError
from synth.generate import synthesize
from transfer import datasets
from transfer.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs", "detection")
TINY = dict(classes=2, images_per_class=1, val_per_class=1, scenes=4, size=32, scene_size=64)


def test_synth_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "d2"))
    monkeypatch.delenv(datasets.SYNTH_ENV, raising=False)
    assert datasets.datasets_root() == str(tmp_path / "d2")
    assert datasets.resolve_synth_root() == os.path.join(str(tmp_path / "d2"), "synth")
    monkeypatch.setenv(datasets.SYNTH_ENV, str(tmp_path / "env"))
    assert datasets.resolve_synth_root() == str(tmp_path / "env")
    assert datasets.resolve_synth_root(str(tmp_path / "flag")) == str(tmp_path / "flag")
    monkeypatch.delenv(datasets.SYNTH_ENV)
    monkeypatch.delenv("DETECTRON2_DATASETS")
    assert datasets.datasets_root() == "datasets"  # detectron2's own default
    assert datasets.resolve_synth_root() == os.path.join("datasets", "synth")


def test_registration_follows_the_root_and_sets_the_evaluator(synth_root, tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    other = str(tmp_path / "other")
    meta_other = synthesize(other, seed=5, **TINY)
    for root in (synth_root, other, synth_root):  # re-registered whenever the root changes
        meta = datasets.register_synth_datasets(root)
        for name, (fmt, split) in datasets.SYNTH_DATASETS.items():
            # the other tasks' trees have their own classes (tests/test_tasks.py)
            if fmt not in ("voc", "coco"):
                continue
            info = MetadataCatalog.get(name)
            assert info.synth_root == os.path.abspath(root) \
                and list(info.thing_classes) == meta["class_names"]
            records = DatasetCatalog.get(name)
            assert len(records) == meta["splits"][fmt][split], name
            assert all(r["file_name"].startswith(os.path.abspath(root) + os.sep) for r in records)
            # the images are where it points
            assert all(os.path.isfile(r["file_name"]) for r in records), name
            if fmt == "voc":
                assert info.evaluator_type == "pascal_voc" and info.split == split \
                    and info.year == meta["voc_year"]
            else:
                assert info.evaluator_type == "coco"
    assert len(meta_other["class_names"]) == 2 \
        != len(datasets.register_synth_datasets(synth_root)["class_names"])


def test_names_and_synth_detection_of_a_config():
    cfg = load_config(os.path.join(CONFIG_DIR, "synth_voc_R18_FPN_cpu.yaml"))
    assert datasets.dataset_names(cfg) == ["synth_voc_trainval", "synth_voc_test"]
    assert datasets.uses_synth(cfg)
    voc = load_config(os.path.join(CONFIG_DIR, "pascal_voc_R_50_C4_24k_moco.yaml"))
    assert datasets.dataset_names(voc) \
        == ["voc_2007_trainval", "voc_2012_trainval", "voc_2007_test"]
    assert not datasets.uses_synth(voc)
    voc.DATASETS.TEST = ("synth_voc_test",)
    assert datasets.uses_synth(voc)  # any one generated name counts


def test_unregistered_name_lists_the_known_ones():
    with pytest.raises(UsageError) as e:
        datasets.check_dataset("voc_2007_tset")
    assert str(e.value) == (
        "dataset 'voc_2007_tset' is not registered. PASCAL VOC names: voc_2007_test, "
        "voc_2007_train, voc_2007_trainval, voc_2007_val, voc_2012_sem_seg_train_aug, "
        "voc_2012_sem_seg_val, voc_2012_train, voc_2012_trainval, voc_2012_val; COCO: "
        "coco_2017_train, coco_2017_val, keypoints_coco_2017_train, ...; LVIS: lvis_v0.5_train, "
        "lvis_v0.5_val; Cityscapes: cityscapes_fine_instance_seg_train, "
        "cityscapes_fine_sem_seg_train, ...; generated data: synth_voc_trainval, synth_voc_test, "
        "synth_coco_train, synth_coco_val, synth_keypoints_train, synth_keypoints_val, "
        "synth_lvis_train, synth_lvis_val, synth_cityscapes_fine_instance_seg_train, "
        "synth_cityscapes_fine_instance_seg_val, synth_cityscapes_fine_sem_seg_train, "
        "synth_cityscapes_fine_sem_seg_val, synth_voc_2012_sem_seg_train_aug, "
        "synth_voc_2012_sem_seg_val (with --synth-root DIR or $MOCOBENCH_SYNTH)")


def test_missing_voc_files_of_a_synth_tree_name_the_path_and_root(synth_root, tmp_path):
    root = tmp_path / "synth"
    shutil.copytree(synth_root, root)
    datasets.register_synth_datasets(str(root))
    datasets.check_dataset("synth_voc_test")  # complete: no error
    os.remove(root / "VOC2007" / "ImageSets" / "Main" / "test.txt")
    with pytest.raises(UsageError) as e:
        datasets.check_dataset("synth_voc_test")
    message = str(e.value)
    assert message.startswith("dataset 'synth_voc_test': "
                              f"{str(root / 'VOC2007' / 'ImageSets' / 'Main' / 'test.txt')!r} does "
                              "not exist (generated dataset root")
    layout = (f"{root / 'VOC2007'}/\n  Annotations/<id>.xml\n  ImageSets/Main/test.txt   (one "
              "image id per line)")
    assert layout in message
    assert "JPEGImages/<id>.jpg" in message
    datasets.check_dataset("synth_voc_trainval")  # the other split is still complete
    shutil.rmtree(root / "VOC2007" / "Annotations")
    with pytest.raises(UsageError, match="Annotations' does not exist"):
        datasets.check_dataset("synth_voc_trainval")
    shutil.rmtree(root / "VOC2007" / "JPEGImages")
    os.makedirs(root / "VOC2007" / "Annotations")
    with pytest.raises(UsageError, match="JPEGImages' does not exist"):
        datasets.check_dataset("synth_voc_trainval")
    cfg = load_config(os.path.join(CONFIG_DIR, "synth_voc_R18_FPN_cpu.yaml"))
    # the first of the config's datasets
    with pytest.raises(UsageError, match="synth_voc_trainval"):
        datasets.check_datasets(cfg)


def test_a_json_dataset_with_a_dirname_is_checked_by_its_json(tmp_path):
    """Only datasets that detectron2 evaluates as PASCAL VOC are checked for the VOC layout; any
    other dataset with a json_file is checked for that file, whatever other metadata (a `dirname`)
    it carries."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name = "mocobench_test_json_dataset_with_dirname"
    DatasetCatalog.register(name, list)
    try:
        MetadataCatalog.get(name).set(evaluator_type="coco", dirname=str(tmp_path),
                                      image_root=str(tmp_path),
                                      json_file=str(tmp_path / "instances.json"))
        with pytest.raises(UsageError, match=r"instances.json' does not exist") as e:
            datasets.check_dataset(name)
        assert (f"{tmp_path / 'instances.json'}   (COCO / LVIS json)\n{tmp_path}/<file_name>   "
                "(the images it lists)") in str(e.value)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_builtin_names_point_at_detectron2_datasets():
    with pytest.raises(UsageError) as e:
        datasets.check_dataset("coco_2017_val")
    message = str(e.value)
    assert f"DETECTRON2_DATASETS={datasets.datasets_root()!r}" in message
    assert "instances_val2017.json" in message and "(COCO / LVIS json)" in message


def test_num_classes_follow_a_synth_tree_and_must_match_builtin_data(synth_root):
    datasets.register_synth_datasets(synth_root)
    n = len(datasets.register_synth_datasets(synth_root)["class_names"])
    cfg = load_config(os.path.join(CONFIG_DIR, "synth_voc_R18_FPN_cpu.yaml"),
                      ["MODEL.ROI_HEADS.NUM_CLASSES", "7"])
    notes = datasets.check_num_classes(cfg)
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == n and len(notes) == 1
    assert notes[0] == (f"MODEL.ROI_HEADS.NUM_CLASSES 7 -> {n} (the classes of generated dataset "
                        "'synth_voc_trainval')")
    assert datasets.check_num_classes(cfg) == []  # now it matches: nothing changed
    voc = load_config(os.path.join(CONFIG_DIR, "pascal_voc_R_50_C4_24k_moco.yaml"))
    assert voc.MODEL.ROI_HEADS.NUM_CLASSES == 20 and datasets.check_num_classes(voc) == []
    voc.MODEL.ROI_HEADS.NUM_CLASSES = 21
    with pytest.raises(UsageError,
                       match="NUM_CLASSES is 21 but dataset 'voc_2007_trainval' has 20 classes"):
        datasets.check_num_classes(voc)
    # every dataset is checked, not only up to the first that matches
    cfg.DATASETS.TEST = ("voc_2007_test",)
    with pytest.raises(UsageError,
                       match=f"NUM_CLASSES is {n} but dataset 'voc_2007_test' has 20 classes"):
        datasets.check_num_classes(cfg)


# --------------------------------------------------------------------------------------------------
# every generated name's metadata and records, registered inside the test (a module fixture's
# registration would count for its first test only, and register_synth_datasets skips names already
# registered for the same root)

# evaluator_type per format: what transfer.evaluation dispatches on
SYNTH_EVALUATORS = {"voc": "pascal_voc", "coco": "coco", "coco_keypoints": "coco", "lvis": "lvis",
                    "cityscapes_instance": "cityscapes_instance",
                    "cityscapes_sem_seg": "cityscapes_sem_seg", "voc_sem_seg": "sem_seg"}


@pytest.fixture
def fresh_synth(synth_root):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name in datasets.SYNTH_DATASETS:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    return os.path.abspath(synth_root), datasets.register_synth_datasets(synth_root)


def test_every_synth_name_has_its_evaluator_and_paths_and_passes_the_checks(fresh_synth):
    from detectron2.data import MetadataCatalog

    root, meta = fresh_synth
    for name, (fmt, split) in datasets.SYNTH_DATASETS.items():
        info = MetadataCatalog.get(name)
        assert info.evaluator_type == SYNTH_EVALUATORS[fmt], name
        assert info.synth_root == root
        if fmt.startswith("cityscapes"):
            assert info.image_dir == os.path.join(root, "cityscapes", "leftImg8bit", split)
            assert info.gt_dir == os.path.join(root, "cityscapes", "gtFine", split)
            # detectron2's Cityscapes metadata: 8 instance classes, 19 semantic (train ids), 255
            # ignored
            assert (len(info.thing_classes), len(info.stuff_classes)) == (8, 19)
            assert info.get("ignore_label") == (255 if fmt == "cityscapes_sem_seg" else None)
        elif fmt in ("coco", "coco_keypoints"):
            prefix = "instances" if fmt == "coco" else "person_keypoints"
            assert info.json_file \
                == os.path.join(root, "coco", "annotations", f"{prefix}_{split}2017.json")
            assert info.image_root == os.path.join(root, "coco", f"{split}2017")
            assert list(info.thing_classes) \
                == (meta["class_names"] if fmt == "coco" else ["person"])
        elif fmt == "voc":
            assert (info.dirname, info.split, info.year) \
                == (os.path.join(root, "VOC2007"), split, meta["voc_year"])
            assert list(info.thing_classes) == meta["class_names"]
        elif fmt == "lvis":
            assert info.json_file == os.path.join(root, "lvis", f"lvis_v0.5_{split}.json")
            # detectron2 appends "val2017/<file>"
            assert info.image_root == os.path.join(root, "coco", "")
            assert list(info.thing_classes) == meta["class_names"]
        elif fmt == "voc_sem_seg":
            assert info.dirname == os.path.join(root, "VOC2012") and info.split == split
            assert info.label_dir \
                == {"train_aug": "SegmentationClassAug", "val": "SegmentationClass"}[split]
            assert list(info.stuff_classes) == ["background", *meta["class_names"]] \
                and info.ignore_label == 255
        # every file the checks look for is where the registration points
        datasets.check_dataset(name)
    # greyscale labels
    assert datasets.check_dataset("synth_voc_2012_sem_seg_train_aug", training=True) is None


@pytest.mark.parametrize("split,label_dir",
                         [("train_aug", "SegmentationClassAug"), ("val", "SegmentationClass")])
def test_voc_segmentation_records_follow_the_split_list(fresh_synth, split, label_dir):
    from detectron2.data import DatasetCatalog

    root, meta = fresh_synth
    dirname = os.path.join(root, "VOC2012")
    with open(os.path.join(dirname, "ImageSets", "Segmentation", f"{split}.txt")) as f:
        ids = f.read().split()
    assert len(ids) == meta["splits"]["voc_seg"][split]
    expected = [{"file_name": os.path.join(dirname, "JPEGImages", f"{i}.jpg"),
                 "sem_seg_file_name": os.path.join(dirname, label_dir, f"{i}.png"), "image_id": i}
                for i in ids]
    assert DatasetCatalog.get(f"synth_voc_2012_sem_seg_{split}") == expected
    assert datasets.load_voc_sem_seg(dirname, split, label_dir) == expected
    assert all(os.path.isfile(r["file_name"]) and os.path.isfile(r["sem_seg_file_name"])
               for r in expected)


def test_palette_labels_for_training_name_the_dataset_and_the_png(fresh_synth):
    root, _ = fresh_synth
    dirname = os.path.join(root, "VOC2012")
    with open(os.path.join(dirname, "ImageSets", "Segmentation", "val.txt")) as f:
        first = f.readline().strip()
    # evaluation reads the palette indices: fine
    datasets.check_dataset("synth_voc_2012_sem_seg_val")
    with pytest.raises(UsageError) as e:
        datasets.check_dataset("synth_voc_2012_sem_seg_val", training=True)
    png = os.path.join(dirname, "SegmentationClass", f"{first}.png")
    assert str(e.value) == (
        f"dataset 'synth_voc_2012_sem_seg_val': {png!r} is a 'P' PNG; training reads labels as "
        "greyscale class indices (detectron2's DatasetMapper converts to 'L'), so a palette PNG "
        "would train on its colours' luminance. Train on greyscale labels (VOC: "
        "SegmentationClassAug)")


def test_builtin_voc_segmentation_names_point_under_the_root_once(tmp_path, monkeypatch):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    def unregister():
        for name in datasets.VOC_SEM_SEG_SPLITS:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)

    unregister()
    try:
        datasets.register_builtin_voc_sem_seg(str(tmp_path))
        # registered names are kept
        datasets.register_builtin_voc_sem_seg(str(tmp_path / "elsewhere"))
        for name, split in datasets.VOC_SEM_SEG_SPLITS.items():
            info = MetadataCatalog.get(name)
            assert (info.dirname, info.split, info.evaluator_type) \
                == (str(tmp_path / "VOC2012"), split, "sem_seg")
            # 21: VOC's 20 + background
            assert list(info.stuff_classes) == ["background", *datasets.VOC_CLASS_NAMES]
        # the check looks under $DETECTRON2_DATASETS as it is now (the pipeline's preflight)
        monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
        with pytest.raises(UsageError) as e:
            datasets.check_dataset("voc_2012_sem_seg_train_aug")
        segmentation_list = str(tmp_path / "VOC2012" / "ImageSets" / "Segmentation"
                                / "train_aug.txt")
        assert str(e.value).startswith("dataset 'voc_2012_sem_seg_train_aug': "
                                       f"{segmentation_list!r} does not exist")
        assert "  SegmentationClassAug/<id>.png   (class index per pixel, 255 = ignore)" \
            in str(e.value)
    finally:
        unregister()
        datasets.register_builtin_voc_sem_seg(datasets.datasets_root())


GUIDE = ("\nNothing is downloaded here: put the data there, or point DETECTRON2_DATASETS at its "
         "root.")
# builtin name -> (first missing path, the layout lines), {r} = $DETECTRON2_DATASETS ({{ }}: a
# brace); detectron2 registers the Cityscapes dirs and the LVIS image root with a trailing "/",
# hence the "//"
BUILTIN_LAYOUTS = {
    "voc_2007_test": ("{r}/VOC2007/ImageSets/Main/test.txt",
                      "{r}/VOC2007/\n  Annotations/<id>.xml\n  ImageSets/Main/test.txt   (one "
                      "image id per line)\n  JPEGImages/<id>.jpg"),
    "coco_2017_val": ("{r}/coco/annotations/instances_val2017.json",
                      "{r}/coco/annotations/instances_val2017.json   (COCO / LVIS json)\n"
                      "{r}/coco/val2017/<file_name>   (the images it lists)"),
    "keypoints_coco_2017_train": ("{r}/coco/annotations/person_keypoints_train2017.json",
                                  "{r}/coco/annotations/person_keypoints_train2017.json   (COCO / "
                                  "LVIS json)\n{r}/coco/train2017/<file_name>   (the images it "
                                  "lists)"),
    "lvis_v0.5_val": ("{r}/lvis/lvis_v0.5_val.json",
                      "{r}/lvis/lvis_v0.5_val.json   (COCO / LVIS json)\n"
                      "{r}/coco//<file_name>   (the images it lists)"),
    "cityscapes_fine_sem_seg_train": (
        "{r}/cityscapes/leftImg8bit/train/",
        "{r}/cityscapes/leftImg8bit/train//<city>/<city>_<seq>_<frame>_leftImg8bit.png\n"
        "{r}/cityscapes/gtFine/train//<city>/<city>_<seq>_<frame>_gtFine_{{polygons.json,"
        "labelIds.png,instanceIds.png,labelTrainIds.png}}\n"
        "(labelTrainIds.png: cityscapesscripts/preparation/createTrainIdLabelImgs.py)"),
    "voc_2012_sem_seg_val": ("{r}/VOC2012/ImageSets/Segmentation/val.txt",
                             "{r}/VOC2012/\n  ImageSets/Segmentation/val.txt   (one image id per "
                             "line; train_aug: VOC train + SBD, 10582 ids)\n  "
                             "JPEGImages/<id>.jpg\n  SegmentationClass/<id>.png   (class index per "
                             "pixel, 255 = ignore)"),
}


@pytest.mark.parametrize("name", list(BUILTIN_LAYOUTS))
def test_each_builtin_family_names_its_first_missing_path_and_layout(name):
    r = datasets.datasets_root()
    missing, layout = (text.format(r=r) for text in BUILTIN_LAYOUTS[name])
    with pytest.raises(UsageError) as e:
        datasets.check_dataset(name, training=True)  # nothing to read: the files come first
    assert str(e.value) \
        == (f"dataset {name!r}: {missing!r} does not exist (DETECTRON2_DATASETS={r!r}). Expected "
            f"layout:\n{layout}{GUIDE}")


def test_every_synth_name_loads_its_split_with_detectron2s_reader(fresh_synth):
    """The registered loaders read the registered paths, as detectron2's builtin names do.
    (Cityscapes instances are left out: detectron2 parses them in a process pool, ~30 s here;
    tests/test_tasks.py reads them.)"""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json, load_lvis_json, load_voc_instances
    from detectron2.data.datasets.cityscapes import load_cityscapes_semantic

    root, meta = fresh_synth
    readers = {
        "voc": lambda m: load_voc_instances(m.dirname, m.split, m.thing_classes),
        "coco": lambda m: load_coco_json(m.json_file, m.image_root, m.name),
        "coco_keypoints": lambda m: load_coco_json(m.json_file, m.image_root, m.name),
        "lvis": lambda m: load_lvis_json(m.json_file, m.image_root),
        "cityscapes_sem_seg": lambda m: load_cityscapes_semantic(m.image_dir, m.gt_dir),
        "voc_sem_seg": lambda m: datasets.load_voc_sem_seg(m.dirname, m.split, m.label_dir),
    }
    splits = {"coco_keypoints": "coco_keypoints", "cityscapes_sem_seg": "cityscapes",
              "voc_sem_seg": "voc_seg"}
    for name, (fmt, split) in datasets.SYNTH_DATASETS.items():
        if fmt not in readers:
            continue
        records = DatasetCatalog.get(name)
        assert len(records) == meta["splits"][splits.get(fmt, fmt)][split] > 0, name
        assert records == readers[fmt](MetadataCatalog.get(name)), name
        assert all(r["file_name"].startswith(root + os.sep) and os.path.isfile(r["file_name"])
                   for r in records)


def test_only_training_datasets_need_greyscale_labels(fresh_synth):
    config = os.path.join(REPO, "configs", "semseg", "tiny_synth_voc_R18_FCN_cpu.yaml")
    # trains on train_aug (greyscale), evaluates on val (palette, as SemSegEvaluator reads)
    cfg = load_config(config)
    assert datasets.check_datasets(cfg) is None
    cfg = load_config(config, ["DATASETS.TRAIN", "('synth_voc_2012_sem_seg_val',)"])
    with pytest.raises(UsageError, match=r"^dataset 'synth_voc_2012_sem_seg_val': "
                                         r".*SegmentationClass/.* is a 'P' PNG"):
        datasets.check_datasets(cfg)


def test_each_generated_dataset_gets_its_evaluator_with_the_configs_tasks(fresh_synth, tmp_path):
    """transfer.evaluation.build_evaluator dispatches on the registered evaluator_type: COCO and
    LVIS evaluate the tasks the model predicts (boxes, + masks, + keypoints) into
    OUTPUT_DIR/inference unless told another folder; a dataset without a known evaluator_type is
    a one-line error listing the known ones; a second builder for a type is refused."""
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import (
        COCOEvaluator,
        LVISEvaluator,
        PascalVOCDetectionEvaluator,
        SemSegEvaluator,
    )

    from transfer import evaluation

    cfg = load_config(os.path.join(CONFIG_DIR, "synth_voc_R18_FPN_cpu.yaml"),
                      ["OUTPUT_DIR", str(tmp_path)])
    build = evaluation.build_evaluator
    voc = build(cfg, "synth_voc_test")
    assert type(voc) is PascalVOCDetectionEvaluator and voc._dataset_name == "synth_voc_test"
    coco = build(cfg, "synth_coco_val")
    assert type(coco) is COCOEvaluator and coco._tasks == ("bbox",) and coco._distributed
    assert coco._output_dir == os.path.join(str(tmp_path), "inference")
    cfg.MODEL.MASK_ON = True
    assert build(cfg, "synth_coco_val", str(tmp_path / "elsewhere"))._output_dir \
        == str(tmp_path / "elsewhere")
    assert build(cfg, "synth_coco_val")._tasks == ("bbox", "segm")
    lvis = build(cfg, "synth_lvis_val")
    assert type(lvis) is LVISEvaluator and lvis._tasks == ("bbox", "segm")
    assert lvis._output_dir == os.path.join(str(tmp_path), "inference")
    cfg.MODEL.MASK_ON, cfg.MODEL.KEYPOINT_ON = False, True
    assert build(cfg, "synth_keypoints_val")._tasks == ("bbox", "keypoints")
    sem_seg = build(cfg, "synth_voc_2012_sem_seg_val")
    assert type(sem_seg) is SemSegEvaluator \
        and sem_seg._dataset_name == "synth_voc_2012_sem_seg_val"

    MetadataCatalog.get("test_no_evaluator").set(evaluator_type="nothing_known")
    try:
        with pytest.raises(UsageError) as e:
            build(cfg, "test_no_evaluator")
    finally:
        MetadataCatalog.remove("test_no_evaluator")
    assert str(e.value) == (
        "no evaluator for dataset 'test_no_evaluator' (its evaluator_type metadata is "
        "'nothing_known'); known evaluator types: cityscapes_instance, cityscapes_sem_seg, coco, "
        "lvis, pascal_voc, sem_seg")
    with pytest.raises(KeyError, match="an evaluator for 'coco' is already registered"):
        evaluation.register_evaluator("coco")(lambda cfg, name, folder: None)
    assert evaluation.EVALUATOR_BUILDERS["coco"] is not None


def test_a_cityscapes_split_without_images_names_its_folder_and_the_file_pattern(synth_root,
                                                                                 tmp_path):
    """Cityscapes: city folders without one *_leftImg8bit.png (a half-copied tree) are named with
    the pattern detectron2's reader globs for."""
    root = tmp_path / "synth"
    shutil.copytree(synth_root, root)
    datasets.register_synth_datasets(str(root))
    name = "synth_cityscapes_fine_sem_seg_val"
    datasets.check_dataset(name)  # complete: no error
    images = root / "cityscapes" / "leftImg8bit" / "val"
    for city in os.listdir(images):
        for f in os.listdir(images / city):
            os.remove(images / city / f)
    with pytest.raises(UsageError) as e:
        datasets.check_dataset(name)
    assert str(e.value).startswith(f"dataset '{name}': {str(images)!r} holds no "
                                   "<city>/*_leftImg8bit.png")
