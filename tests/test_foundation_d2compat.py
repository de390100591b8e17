"""The detectron2 compatibility layer: every fix is active exactly when the breakage it repairs is
real, and with it the v0.6 code paths we depend on (VOC loading, train loader, R50-C4 SyncBN and
Mask R-CNN FPN training, COCO evaluation) work on current numpy/Pillow/setuptools/torch/Python."""
import ast
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from mocobench.utils import d2compat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIXES = d2compat.ACTIVE_FIXES


def raw_import_error(module: str) -> str:
    """Import `module` in a fresh interpreter WITHOUT the compatibility layer; '' if it imports."""
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    return "" if r.returncode == 0 else r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "fix, module, message",
    [
        ("pil_linear", "detectron2.data.transforms", "has no attribute 'LINEAR'"),
        ("no_C_extension", "detectron2.layers", "cannot import name '_C'"),
        ("pkg_resources", "detectron2.model_zoo", "No module named 'pkg_resources'"),
    ],
)
def test_import_time_fix_active_iff_raw_import_breaks(fix, module, message):
    error = raw_import_error(module)
    if fix in FIXES:
        assert message in error, f"{fix} is active but raw `import {module}` gave: {error!r}"
    else:
        assert error == "", f"{fix} is inactive but raw `import {module}` fails: {error}"


def test_no_stand_in_left_visible_after_load():
    import detectron2
    from PIL import Image

    assert "detectron2._C" not in sys.modules and not hasattr(detectron2, "_C")
    assert "pkg_resources" not in sys.modules or \
        "mocobench" not in (sys.modules["pkg_resources"].__doc__ or "")
    assert not hasattr(np, "int") or "numpy_aliases" not in FIXES  # global numpy untouched
    assert not hasattr(Image, "LINEAR") or "pil_linear" not in FIXES
    assert random.sample.__module__ == "random"
    # would import caffe2, which torch no longer ships
    assert "detectron2.export" not in sys.modules


def test_detectron2_only_imported_through_compat_layer():
    """Every project file that imports detectron2 imports mocobench.utils.d2compat first."""
    offenders = []
    for top in ("mocobench", "pretrain", "convert", "transfer", "tools", "tests", "benchmarks"):
        for dirpath, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if not name.endswith(".py") or name == "d2compat.py":
                    continue
                path = os.path.join(dirpath, name)
                compat_seen = False
                for node in ast.walk(ast.parse(open(path).read())):
                    mods = []
                    if isinstance(node, ast.Import):
                        mods = [a.name for a in node.names]
                    elif isinstance(node, ast.ImportFrom) and node.module:
                        mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                    if "mocobench.utils.d2compat" in mods:
                        compat_seen = True
                    elif any(m.split(".")[0] == "detectron2" for m in mods) and not compat_seen:
                        offenders.append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
    assert not offenders, f"detectron2 imported before mocobench.utils.d2compat at {offenders}"


def test_missing_extension_ops_raise_clear_error():
    from detectron2.layers import ROIAlignRotated
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    if "no_C_extension" not in FIXES:
        # a user's full build: nothing to prove
        pytest.skip("this detectron2 has its C++ extension")
    boxes = torch.tensor([[5.0, 5.0, 4.0, 4.0, 30.0]])
    with pytest.raises(RuntimeError, match="built without its C\\+\\+ extension.*box_iou_rotated"):
        pairwise_iou_rotated(boxes, boxes)
    with pytest.raises(RuntimeError, match="built without its C\\+\\+ extension"):
        ROIAlignRotated((2, 2), 1.0, 0)(torch.randn(1, 1, 8, 8),
                                        torch.tensor([[0.0, 4, 4, 4, 4, 0]]))


# ---- data paths ----------------------------------------------------------------------------------


def _register_synth(root):
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances, register_pascal_voc

    from mocobench.utils.synth_meta import read_synth_meta

    classes = read_synth_meta(root)["class_names"]
    names = {"voc": "compat_voc_trainval", "coco": "compat_coco_train"}
    if names["voc"] not in DatasetCatalog.list():
        register_pascal_voc(names["voc"], os.path.join(root, "VOC2007"), "trainval", 2007,
                            class_names=classes)
        register_coco_instances(names["coco"], {},
                                os.path.join(root, "coco/annotations/instances_train2017.json"),
                                os.path.join(root, "coco/train2017"))
    return names, classes


def test_voc_loads_through_register_pascal_voc(synth_root, monkeypatch):
    import xml.etree.ElementTree as ET

    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import pascal_voc

    names, classes = _register_synth(synth_root)
    ids = open(os.path.join(synth_root, "VOC2007/ImageSets/Main/trainval.txt")).read().split()
    records = DatasetCatalog.get(names["voc"])
    assert len(records) == len(ids) >= 2
    first = ET.parse(os.path.join(synth_root, "VOC2007/Annotations", ids[0] + ".xml"))
    objs = first.findall("object")
    assert [classes[a["category_id"]] for a in records[0]["annotations"]] == \
        [o.find("name").text for o in objs]
    box = objs[0].find("bndbox")
    xmin, ymin = float(box.find("xmin").text), float(box.find("ymin").text)
    assert records[0]["annotations"][0]["bbox"][:2] == [xmin - 1.0, ymin - 1.0]  # VOC is 1-based

    if "numpy_aliases" in FIXES:  # needed: the unpatched module dies on np.str
        monkeypatch.setattr(pascal_voc, "np", np)
        with pytest.raises(AttributeError, match="has no attribute 'str'"):
            pascal_voc.load_voc_instances(os.path.join(synth_root, "VOC2007"), "trainval", classes)


def small_cfg(zoo_config, train_set, num_classes, masks):
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(zoo_config))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.MASK_ON", masks,
        "MODEL.ROI_HEADS.NUM_CLASSES", num_classes, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64,
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE", 64, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 200,
        "DATASETS.TRAIN", (train_set,), "DATASETS.TEST", (), "DATALOADER.NUM_WORKERS", 0,
        "INPUT.MIN_SIZE_TRAIN", (128,), "INPUT.MAX_SIZE_TRAIN", 128, "SOLVER.IMS_PER_BATCH", 2,
        "SOLVER.BASE_LR", 0.001, "SOLVER.WARMUP_ITERS", 0, "SEED", 0,
    ])
    return cfg


@pytest.mark.parametrize(
    "zoo_config, dataset, masks, norm",
    [
        ("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml", "voc", False, "SyncBN"),
        ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", "coco", True, "FrozenBN"),
    ],
    ids=["R50-C4-SyncBN", "MaskRCNN-R50-FPN"],
)
def test_two_training_iterations(synth_root, zoo_config, dataset, masks, norm):
    from detectron2.data import build_detection_train_loader
    from detectron2.engine import SimpleTrainer
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer

    names, classes = _register_synth(synth_root)
    cfg = small_cfg(zoo_config, names[dataset], len(classes), masks)
    cfg.MODEL.RESNETS.NORM = norm
    torch.manual_seed(0)
    model = build_model(cfg)
    if norm == "SyncBN":
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = build_detection_train_loader(cfg)  # the class-histogram path (np.int in v0.6)
    trainer = SimpleTrainer(model, loader, build_optimizer(cfg, model))
    trainer.train(0, 2)
    losses = trainer.storage.history("total_loss").values()
    assert len(losses) == 2 and all(np.isfinite(v) for v, _ in losses)
    if masks:
        assert trainer.storage.history("loss_mask").values()
    changed = [k for k, v in model.state_dict().items()
               if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert any(k.startswith("backbone") for k in changed) and \
        any(k.startswith("roi_heads") for k in changed)


def test_class_histogram_needs_numpy_fix(synth_root, monkeypatch):
    from detectron2.data import DatasetCatalog, build
    from detectron2.data.datasets import pascal_voc

    names, classes = _register_synth(synth_root)
    dicts = DatasetCatalog.get(names["voc"])
    build.print_instances_class_histogram(dicts, classes)  # effective
    if "numpy_aliases" in FIXES:
        monkeypatch.setattr(build, "np", np)
        monkeypatch.setattr(pascal_voc, "np", np)
        with pytest.raises(AttributeError, match="has no attribute 'int'"):
            build.print_instances_class_histogram(dicts, classes)


def test_coco_evaluator_scores_ground_truth_as_perfect(synth_root, tmp_path, monkeypatch):
    """Ground truth fed back as predictions must score AP 100 for boxes and masks."""
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import COCOEvaluator, coco_evaluation
    from detectron2.structures import BitMasks, Boxes, BoxMode, Instances, PolygonMasks

    names, _ = _register_synth(synth_root)
    records = DatasetCatalog.get(names["coco"])

    def run():
        evaluator = COCOEvaluator(names["coco"], output_dir=str(tmp_path), tasks=("bbox", "segm"))
        evaluator.reset()
        for r in records:
            inst = Instances((r["height"], r["width"]))
            boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                     for a in r["annotations"]]
            inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
            inst.scores = torch.ones(len(boxes))
            inst.pred_classes = torch.tensor([a["category_id"] for a in r["annotations"]])
            polys = PolygonMasks([a["segmentation"] for a in r["annotations"]])
            inst.pred_masks = BitMasks.from_polygon_masks(polys, r["height"], r["width"]).tensor
            evaluator.process([{"image_id": r["image_id"]}], [{"instances": inst}])
        return evaluator.evaluate()

    results = run()
    assert results["bbox"]["AP"] == pytest.approx(100.0, abs=0.01)
    assert results["segm"]["AP"] == pytest.approx(100.0, abs=0.01)
    if "coco_eval" in FIXES:  # needed: the default fast path calls into the missing extension
        from detectron2.evaluation.fast_eval_api import COCOeval_opt

        monkeypatch.setattr(coco_evaluation, "COCOeval_opt", COCOeval_opt)
        with pytest.raises(RuntimeError, match="C\\+\\+ extension"):
            run()


def test_map_dataset_fallback_recovers_from_a_failed_sample(monkeypatch):
    from detectron2.data import common

    dataset = common.MapDataset(list(range(5)), lambda x: None if x == 0 else x * 10)
    assert dataset[0] in {10, 20, 30, 40}  # sample 0 fails: a random other one is returned
    if "random_sample_set" in FIXES:
        monkeypatch.setattr(common, "random", random)
        with pytest.raises(TypeError, match="must be a sequence"):
            common.MapDataset(list(range(5)), lambda x: None if x == 0 else x)[0]


def test_lr_scheduler_hook_checkpoints_public_schedulers(monkeypatch):
    from detectron2.engine import hooks

    def resumed_lr(hook_cls):
        params = [torch.nn.Parameter(torch.zeros(1))]
        opt = torch.optim.SGD(params, lr=1.0)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1)
        for _ in range(4):
            opt.step()
            sched.step()
        state = hook_cls(opt, sched).state_dict()
        opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=3, gamma=0.1)
        hook_cls(opt2, sched2).load_state_dict(state)
        return sched2.last_epoch, sched2.get_last_lr()[0]

    assert resumed_lr(hooks.LRScheduler) == (4, pytest.approx(0.1))
    if "lr_scheduler_ckpt" in FIXES:  # needed: v0.6 only knew the private _LRScheduler base
        class Unfixed(hooks.LRScheduler):
            def state_dict(self):
                return self.scheduler.state_dict() if isinstance(
                    self.scheduler, torch.optim.lr_scheduler._LRScheduler) else {}

            def load_state_dict(self, state_dict):
                if isinstance(self.scheduler, torch.optim.lr_scheduler._LRScheduler):
                    self.scheduler.load_state_dict(state_dict)

        assert resumed_lr(Unfixed) == (0, 1.0)  # the schedule silently restarts
