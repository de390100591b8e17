"""The paper's other transfer tasks without training: generated data read through detectron2's real
loaders, the real evaluators scoring ground truth (100) and a degenerate prediction (far below),
the dilated FCN head, the configs and the errors a user meets first."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

# before any detectron2 import; its evaluation-module numpy fixes are checked
from mocobench.utils import d2compat

# isort: split
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog, detection_utils
from detectron2.data.datasets.builtin_meta import COCO_PERSON_KEYPOINT_NAMES
from detectron2.modeling import build_model
from detectron2.structures import Instances

from mocobench.pipeline.config import load_pipeline_config
from mocobench.utils.errors import UsageError
from mocobench.utils.synth_meta import read_synth_meta
from synth.coco import COCO_KEYPOINT_NAMES
from synth.voc import VOC_PALETTE
from transfer import record, report
from transfer.config import load_config
from transfer.datasets import check_dataset, register_synth_datasets
from transfer.run import prepare_config
from transfer.tasks import TASKS
from transfer.trainer import semantic_train_augmentations

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
TINY = {
    "keypoints": "keypoints/tiny_synth_keypoint_rcnn_R18_FPN_cpu.yaml",
    "lvis": "lvis/tiny_synth_mask_rcnn_R18_FPN_cpu.yaml",
    "cityscapes_instance": "cityscapes/tiny_synth_mask_rcnn_R18_FPN_cpu.yaml",
    "cityscapes_sem_seg": "semseg/tiny_synth_cityscapes_R18_FCN_cpu.yaml",
    "voc_sem_seg": "semseg/tiny_synth_voc_R18_FCN_cpu.yaml",
}


def task_of(dataset):
    """The registered task whose datasets include `dataset`."""
    [task] = [t for t in TASKS if dataset in t.datasets]
    return task


@pytest.fixture(scope="module")
def registered(synth_root):
    register_synth_datasets(synth_root)
    return synth_root


# --------------------------------------------------------------------------------------------------
# the generated formats, read back through detectron2's loaders


def test_keypoints_json_has_coco_names_skeleton_and_visibility_flags(registered):
    assert COCO_KEYPOINT_NAMES == COCO_PERSON_KEYPOINT_NAMES
    meta = read_synth_meta(registered)
    with open(os.path.join(registered, meta["paths"]["coco_keypoints_val_json"])) as f:
        raw = json.load(f)
    [category] = raw["categories"]
    assert category["name"] == "person" and tuple(category["keypoints"]) == COCO_KEYPOINT_NAMES
    flags = []
    for ann in raw["annotations"]:
        triples = np.array(ann["keypoints"]).reshape(17, 3)
        assert ann["num_keypoints"] == int((triples[:, 2] > 0).sum())
        assert (triples[triples[:, 2] == 0, :2] == 0).all()  # unlabelled: (0, 0, 0), as in COCO
        flags += list(triples[:, 2])
    assert {1, 2} <= set(flags)  # visible and occluded-but-labelled both occur
    dicts = DatasetCatalog.get("synth_keypoints_train")
    assert len(dicts) == meta["splits"]["coco_keypoints"]["train"]
    kp = np.array(dicts[0]["annotations"][0]["keypoints"]).reshape(17, 3)
    labelled = kp[:, 2] > 0
    assert ((kp[labelled, :2] >= 0) & (kp[labelled, :2] <= meta["scene_size"])).all()
    # detectron2's flip pairs for training
    assert MetadataCatalog.get("synth_keypoints_train").keypoint_flip_map


def test_lvis_json_loads_with_the_lvis_api_and_is_federated(registered):
    from lvis import LVIS

    meta = read_synth_meta(registered)
    api = LVIS(os.path.join(registered, meta["paths"]["lvis_val_json"]))
    for image in api.dataset["images"]:
        present = {a["category_id"] for a in api.img_ann_map[image["id"]]}
        assert present and not present & set(image["neg_category_ids"])
        assert present | set(image["neg_category_ids"]) == set(api.cats)
    assert {c["frequency"] for c in api.dataset["categories"]} <= {"r", "c", "f"}
    dicts = DatasetCatalog.get("synth_lvis_val")
    assert all(os.path.isfile(d["file_name"]) for d in dicts)  # coco_url -> DIR/coco/val2017/<file>
    assert {a["category_id"] for d in dicts
            for a in d["annotations"]} <= set(range(meta["num_classes"]))


def test_cityscapes_gtfine_agrees_with_the_polygons_and_the_label_ids(registered):
    from cityscapesscripts.helpers.labels import labels

    instance_ids = {label.id for label in labels if label.hasInstances and not label.ignoreInEval}
    dicts = DatasetCatalog.get("synth_cityscapes_fine_instance_seg_val")
    assert dicts and all(d["width"] == 2 * d["height"] for d in dicts)
    assert {a["category_id"] for d in dicts for a in d["annotations"]} <= set(range(8))
    d = dicts[0]
    gt_file = d["file_name"].replace("leftImg8bit", "gtFine", 1).replace("leftImg8bit.png",
                                                                         "gtFine_instanceIds.png")
    ids = np.array(Image.open(gt_file))
    objects = [i for i in np.unique(ids) if i >= 1000]
    assert len(objects) == len(d["annotations"]) and {i // 1000 for i in objects} <= instance_ids
    train_ids = np.array(Image.open(
        DatasetCatalog.get("synth_cityscapes_fine_sem_seg_val")[0]["sem_seg_file_name"]))
    assert set(np.unique(train_ids)) <= set(range(19)) | {255} \
        and {0, 2, 10} <= set(np.unique(train_ids))


@pytest.mark.slow  # 4 fresh interpreters import detectron2: ~30 s on a loaded 2-core machine
@pytest.mark.timeout(300)  # without the fix the workers die on import and Pool.map waits forever
def test_cityscapes_instances_load_in_spawned_pool_workers(registered):
    # detectron2 parses the polygons in a multiprocessing.Pool; under a spawned launcher
    # (multi-GPU, our CPU processes) its workers are fresh interpreters, which must get d2compat's
    # fixes before detectron2 imports
    import multiprocessing

    from detectron2.data.datasets.cityscapes import load_cityscapes_instances

    meta = MetadataCatalog.get("synth_cityscapes_fine_instance_seg_val")
    previous = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)
    try:
        dicts = load_cityscapes_instances(meta.image_dir, meta.gt_dir, from_json=True,
                                          to_polygons=True)
    finally:
        multiprocessing.set_start_method(previous, force=True)
    assert len(dicts) == read_synth_meta(registered)["splits"]["cityscapes"]["val"]
    assert all(d["annotations"] for d in dicts)


def test_voc_segmentation_pngs_have_the_palette_borders_and_match_the_boxes(registered):
    meta = read_synth_meta(registered)
    assert tuple(VOC_PALETTE[1]) == (128, 0, 0) and tuple(VOC_PALETTE[255]) == (224, 224, 192)
    [first] = DatasetCatalog.get("synth_voc_2012_sem_seg_val")[:1]
    palette_png = Image.open(first["sem_seg_file_name"])
    assert palette_png.mode == "P"
    assert np.array(palette_png.getpalette()[:6]).tolist() == [0, 0, 0, 128, 0, 0]
    labels = np.array(palette_png)
    assert 255 in labels and 0 in labels
    aug = os.path.join(registered, meta["paths"]["voc_seg"], "SegmentationClassAug",
                       os.path.basename(first["sem_seg_file_name"]))
    assert (np.array(Image.open(aug)) == labels).all() and Image.open(aug).mode == "L"
    # the classes painted are exactly the classes of the same scene's VOC detection annotation
    [det] = [d for d in DatasetCatalog.get("synth_voc_test") if d["image_id"] == first["image_id"]]
    names = meta["class_names"]
    assert {names[i - 1] for i in np.unique(labels) if 0 < i < 255} == {names[a["category_id"]]
                                                                     for a in det["annotations"]}


def test_missing_real_datasets_name_the_expected_layout(tmp_path, monkeypatch):
    with pytest.raises(UsageError,
                       match=r"(?s)voc_2012_sem_seg_val.*Segmentation/val.txt.*SegmentationClass/"):
        check_dataset("voc_2012_sem_seg_val")
    with pytest.raises(UsageError, match=r"(?s)lvis_v0.5_val.*lvis_v0.5_val.json.*COCO / LVIS "
                                         r"json"):
        check_dataset("lvis_v0.5_val")
    with pytest.raises(UsageError,
                       match=r"(?s)cityscapes_fine_sem_seg_train.*leftImg8bit.*labelTrainIds"):
        check_dataset("cityscapes_fine_sem_seg_train")
    with pytest.raises(UsageError, match="person_keypoints_train2017.json"):
        check_dataset("keypoints_coco_2017_train")


def test_palette_labels_are_refused_for_training(registered):
    # detectron2's DatasetMapper reads labels as "L": a palette PNG would train on luminance
    with pytest.raises(UsageError, match="'P' PNG.*SegmentationClassAug"):
        check_dataset("synth_voc_2012_sem_seg_val", training=True)
    check_dataset("synth_voc_2012_sem_seg_train_aug", training=True)


# --------------------------------------------------------------------------------------------------
# the real evaluators: ground truth scores 100, a degenerate prediction far less


def _instances_from_gt(d, keypoints):
    # as detectron2's mapper hands them over: keypoints (K, 3), boxes and masks as loaded
    annos = [dict(a, keypoints=np.asarray(a["keypoints"]).reshape(-1, 3)) if "keypoints" in a else a
             for a in d["annotations"] if not a.get("iscrowd", 0)]
    gt = detection_utils.annotations_to_instances(annos, (d["height"], d["width"]),
                                                  mask_format="bitmask")
    out = Instances((d["height"], d["width"]), pred_boxes=gt.gt_boxes, pred_classes=gt.gt_classes,
                    scores=torch.ones(len(gt)), pred_masks=gt.gt_masks.tensor)
    if keypoints:
        kp = gt.gt_keypoints.tensor.clone()
        kp[:, :, 2] = 1.0  # (x, y, score)
        out.pred_keypoints = kp
    return out


@pytest.mark.parametrize("task", ["keypoints", "lvis", "cityscapes_instance"])
def test_instance_evaluators_score_ground_truth_100_and_one_box_low(task, registered, tmp_path,
                                                                    score_outputs):
    cfg, _ = prepare_config(os.path.join(CONFIGS, TINY[task]),
                            ["OUTPUT_DIR", str(tmp_path), "MOCOBENCH.SYNTH_ROOT", registered])
    dataset = cfg.DATASETS.TEST[0]
    key = {"keypoints": "keypoints", "lvis": "segm", "cityscapes_instance": "segm"}[task]
    perfect = score_outputs(cfg, dataset,
                            lambda d: {"instances": _instances_from_gt(d, cfg.MODEL.KEYPOINT_ON)})
    # (Cityscapes: detectron2 reads the polygons dilated by 0.5 px, cityscapesscripts draws them
    # with PIL; the masks still agree above IoU 0.95 on the generated scenes)
    assert perfect[key]["AP"] == pytest.approx(100.0) \
        and perfect[key]["AP50"] == pytest.approx(100.0), perfect

    # every image: one box over the whole image, the first class, an empty-ish mask
    def one_wrong_box(d):
        h, w = d["height"], d["width"]
        out = _instances_from_gt(d, cfg.MODEL.KEYPOINT_ON)[:1]
        out.pred_boxes.tensor[:] = torch.tensor([0.0, 0.0, w, h])
        out.pred_masks[:] = False
        out.pred_masks[:, : h // 8, : w // 8] = True
        if cfg.MODEL.KEYPOINT_ON:
            out.pred_keypoints[:, :, :2] = torch.tensor([w / 2, h / 2])
        return {"instances": out}

    degenerate = score_outputs(cfg, dataset, one_wrong_box)
    assert degenerate[key]["AP"] < 10.0 and degenerate[key]["AP"] < perfect[key]["AP"] - 50
    # their evaluation modules got numpy's old names ...
    if task != "keypoints" and not hasattr(np, "float"):
        assert f"numpy_aliases_{task.split('_')[0]}" in d2compat.ACTIVE_FIXES
        assert np.count_nonzero.__module__.startswith("numpy")  # ... and numpy itself is untouched


@pytest.mark.parametrize("task", ["voc_sem_seg", "cityscapes_sem_seg"])
def test_semantic_evaluators_score_ground_truth_100_and_all_background_low(task, registered,
                                                                           tmp_path, score_outputs):
    cfg, _ = prepare_config(os.path.join(CONFIGS, TINY[task]),
                            ["OUTPUT_DIR", str(tmp_path), "MOCOBENCH.SYNTH_ROOT", registered])
    dataset = cfg.DATASETS.TEST[0]
    num_classes = len(MetadataCatalog.get(dataset).stuff_classes)
    group, metric = task_of(dataset).columns[0][:2]

    def scores(labels):
        labels = torch.as_tensor(labels.astype(np.int64))
        labels[labels == 255] = 0  # ignored pixels: any class
        return {"sem_seg":
                torch.nn.functional.one_hot(labels, num_classes).permute(2, 0, 1).float()}

    def ground_truth(d):
        return scores(np.array(Image.open(d["sem_seg_file_name"])))

    def background(d):
        return scores(np.zeros_like(np.array(Image.open(d["sem_seg_file_name"]))))

    perfect = score_outputs(cfg, dataset, ground_truth)
    degenerate = score_outputs(cfg, dataset, background)
    assert perfect[group][metric] == pytest.approx(100.0)
    assert degenerate[group][metric] < 40.0


# --------------------------------------------------------------------------------------------------
# the dilated FCN head on the paper's R-50 config


def test_paper_fcn_is_stride_16_with_dilation_6_and_predicts_at_input_size():
    cfg = load_config(os.path.join(CONFIGS, "semseg", "voc_R_50_FCN_30k_moco.yaml"),
                      ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN", "MODEL.SEM_SEG_HEAD.NORM",
                       "BN"])
    model = build_model(cfg)
    assert model.backbone.output_shape()["res5"].stride == 16
    head = model.sem_seg_head
    assert [c.dilation for c in head.convs] == [(6, 6), (6, 6)] \
        and head.convs[0].out_channels == 256
    assert head.predictor.out_channels == 21 and head.predictor.kernel_size == (1, 1)
    image = torch.randint(0, 255, (3, 70, 93), dtype=torch.uint8)
    model.train()
    labels = torch.randint(0, 21, (70, 93))
    labels[:5] = 255
    losses = model([{"image": image, "sem_seg": labels}, {"image": image, "sem_seg": labels}])
    assert set(losses) == {"loss_sem_seg"} and torch.isfinite(losses["loss_sem_seg"])
    model.eval()
    with torch.no_grad():
        [out] = model([{"image": image, "height": 140, "width": 186}])
    # original size (sem_seg_postprocess), from stride 16
    assert out["sem_seg"].shape == (21, 140, 186)


def test_segmentation_training_scales_then_crops(registered, tmp_path):
    # shorter side scaled to 96, then a 64 px crop: 64 x 64 (detectron2's default order would crop
    # the 128 px original to 64 and then scale that crop to 96)
    cfg, _ = prepare_config(os.path.join(CONFIGS, TINY["voc_sem_seg"]),
                            ["OUTPUT_DIR", str(tmp_path), "MOCOBENCH.SYNTH_ROOT", registered,
                             "INPUT.MIN_SIZE_TRAIN", "(96, 96)", "INPUT.CROP.SIZE", "(64, 64)"])
    mapper = DatasetMapper(cfg, is_train=True, augmentations=semantic_train_augmentations(cfg))
    for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:3]:
        mapped = mapper(dict(d))
        assert tuple(mapped["image"].shape) == (3, 64, 64) \
            and tuple(mapped["sem_seg"].shape) == (64, 64)
        assert set(mapped["sem_seg"].unique().tolist()) <= set(range(5)) | {255}


# --------------------------------------------------------------------------------------------------
# configs and the task registry


T6 = ["random init", "supervised IN-1M", "MoCo IN-1M"]
# BN frozen, BN tuned, MoCo (A.4's table)
A4 = ["supervised IN-1M", "supervised IN-1M", "MoCo IN-1M", "MoCo IG-1B"]
# config, architecture, MAX_ITER, the published rows' labels (before the first comma)
PAPER_CONFIGS = [
    ("keypoints/keypoint_rcnn_R_50_FPN_2x_moco.yaml", "GeneralizedRCNN", 180000, T6),
    # Table 6's LVIS
    ("lvis/mask_rcnn_R_50_FPN_2x_moco.yaml", "GeneralizedRCNN", 180000, ["random init", *A4]),
    ("lvis/mask_rcnn_R_50_FPN_1x_moco.yaml", "GeneralizedRCNN", 90000, A4),
    ("cityscapes/mask_rcnn_R_50_FPN_moco.yaml", "GeneralizedRCNN", 24000, T6),
    ("semseg/voc_R_50_FCN_30k_moco.yaml", "SemanticSegmentor", 30000, [*T6, "MoCo IG-1B"]),
    ("semseg/cityscapes_R_50_FCN_90k_moco.yaml", "SemanticSegmentor", 90000, [*T6, "MoCo IG-1B"]),
]


@pytest.mark.parametrize("config,arch,iters,labels", PAPER_CONFIGS)
def test_paper_configs_moco_twins_and_their_published_rows(config, arch, iters, labels):
    cfg = load_config(os.path.join(CONFIGS, config))
    assert cfg.MODEL.META_ARCHITECTURE == arch and cfg.SOLVER.MAX_ITER == iters \
        and cfg.MODEL.RESNETS.DEPTH == 50
    assert cfg.INPUT.FORMAT == "RGB" and not cfg.MODEL.RESNETS.STRIDE_IN_1X1
    assert cfg.MODEL.PIXEL_STD == pytest.approx([58.395, 57.120, 57.375])
    norms = {cfg.MODEL.RESNETS.NORM} | ({cfg.MODEL.SEM_SEG_HEAD.NORM} if arch == "SemanticSegmentor"
                                        else {cfg.MODEL.FPN.NORM, cfg.MODEL.ROI_BOX_HEAD.NORM})
    # BN tuned and synchronized, as MoCo's repo
    assert norms == {"naiveSyncBN"} and cfg.MOCOBENCH.REQUIRE_WEIGHTS
    base = load_config(os.path.join(CONFIGS, config.replace("_moco.yaml", ".yaml")))
    assert base.MODEL.RESNETS.NORM == "naiveSyncBN" and base.INPUT.FORMAT == "BGR" \
        and base.MODEL.RESNETS.STRIDE_IN_1X1
    task = task_of(cfg.DATASETS.TEST[0])
    assert task_of("synth_" + cfg.DATASETS.TEST[0].replace("_coco_2017", "")
                   .replace("_v0.5", "")) is task
    rows = task.published[config]
    assert [label.split(",")[0] for label, _, _ in rows] == labels
    for _, values, source in rows:  # every number cited, and whether it was checked
        assert set(values) == {f"{g}/{m}" for g, m, _ in task.columns} \
            and source.startswith("He et al., CVPR 2020")
        assert ("Table 6" in source) != ("Appendix A.4" in source)
        assert any(word in source for word in ("UNVERIFIED", "verified", "corroborated"))
    assert config.replace("_moco.yaml", ".yaml") not in task.published
    # the report finds them by experiment identity: a run of this config with its own weights, seed
    # and device
    run = load_config(os.path.join(CONFIGS, config),
                      ["MODEL.WEIGHTS", "moco.pkl", "SEED", "3", "MODEL.DEVICE", "cpu"])
    assert report.published_for(record.experiment_identity(run)) == (config, rows)
    other = load_config(os.path.join(CONFIGS, config), ["SOLVER.MAX_ITER", str(iters // 2)])
    # another schedule: no reference
    assert report.published_for(record.experiment_identity(other)) == (None, [])


def test_registry_columns_are_the_papers():
    titles = {t.name: [title for _, _, title in t.columns] for t in TASKS}
    assert titles == {"coco_keypoints": ["AP^kp", "AP^kp_50", "AP^kp_75"],
                      "lvis_v0.5": ["AP^mk", "AP^mk_50", "AP^mk_75"],
                      "cityscapes_instance": ["AP^mk", "AP^mk_50"], "cityscapes_sem_seg": ["mIoU"],
                      "voc_sem_seg": ["mIoU"]}
    # detection tables are the report's own
    assert not [t for t in TASKS if {"coco_2017_val", "voc_2007_test"} & set(t.datasets)]


@pytest.mark.parametrize("name", ["keypoints", "lvis", "cityscapes_instance", "cityscapes_semseg",
                                  "voc_semseg"])
def test_pipeline_configs_load_and_their_cpu_twins_find_the_generated_data(name, registered,
                                                                           tmp_path):
    paper = [f for f in os.listdir(os.path.join(CONFIGS, "pipeline"))
             if f.startswith(name + "_R50")]
    assert len(paper) == 1
    paper_cfg = load_pipeline_config(os.path.join(CONFIGS, "pipeline", paper[0]), [])
    assert paper_cfg.TRANSFER.SEEDS == 5 and "moco_v1" in paper_cfg.PRETRAIN.CONFIG_FILE
    # no real data on this machine
    with pytest.raises(UsageError, match="does not exist.*Expected layout"):
        prepare_config(paper_cfg.TRANSFER.CONFIG_FILE, ["OUTPUT_DIR", str(tmp_path)])
    twin = load_pipeline_config(os.path.join(CONFIGS, "pipeline", f"{name}_cpu.yaml"), [])
    assert twin.DATA.SYNTH and twin.TRANSFER.INITS == ["moco", "supervised", "random"]
    cfg, _ = prepare_config(twin.TRANSFER.CONFIG_FILE,
                            [*twin.TRANSFER.OPTS, "OUTPUT_DIR", str(tmp_path),
                             "MOCOBENCH.SYNTH_ROOT", registered])
    assert cfg.SOLVER.MAX_ITER == 120 and cfg.MODEL.DEVICE == "cpu"
