"""Evaluator by dataset: a registry keyed by the dataset's `evaluator_type` metadata.

detectron2's builtin registrations set `evaluator_type` ("pascal_voc" for voc_*, "coco" for
coco_*), and `transfer.datasets` sets it for the generated datasets, so a new family of datasets
needs one entry here rather than another branch on the dataset's name.
"""
import os

# before any detectron2 import; its numpy fixes for the lvis/Cityscapes scripts
from mocobench.utils import d2compat

# isort: split
from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    LVISEvaluator,
    PascalVOCDetectionEvaluator,
    SemSegEvaluator,
)
from detectron2.utils import comm

from mocobench.utils.errors import UsageError

# evaluator_type -> builder(cfg, dataset_name, output_folder) -> DatasetEvaluator
EVALUATOR_BUILDERS = {}

def register_evaluator(evaluator_type):
    def register(builder):
        if evaluator_type in EVALUATOR_BUILDERS:
            raise KeyError(f"an evaluator for {evaluator_type!r} is already registered")
        EVALUATOR_BUILDERS[evaluator_type] = builder
        return builder

    return register

@register_evaluator("pascal_voc")
def _pascal_voc(cfg, dataset_name, output_folder):
    # AP (mean over IoU .50:.05:.95), AP50, AP75; the 11-point VOC07 metric when the dataset's year
    # is 2007
    return PascalVOCDetectionEvaluator(dataset_name)

def _instance_tasks(cfg):
    return ("bbox",) + (("segm",) if cfg.MODEL.MASK_ON else ()) \
        + (("keypoints",) if cfg.MODEL.KEYPOINT_ON else ())


@register_evaluator("coco")
def _coco(cfg, dataset_name, output_folder):
    # keypoints: OKS with COCO's per-keypoint sigmas (pycocotools' defaults unless
    # TEST.KEYPOINT_OKS_SIGMAS)
    return COCOEvaluator(dataset_name, tasks=_instance_tasks(cfg), distributed=True,
                         output_dir=output_folder, kpt_oks_sigmas=cfg.TEST.KEYPOINT_OKS_SIGMAS)


@register_evaluator("lvis")
def _lvis(cfg, dataset_name, output_folder):
    # the `lvis` package's LVISEval: AP over all categories, plus APr/APc/APf by category frequency
    d2compat.fix_evaluation_numpy("lvis")
    return LVISEvaluator(dataset_name, tasks=_instance_tasks(cfg), distributed=True,
                         output_dir=output_folder)


class _CityscapesInstanceEvaluator(CityscapesInstanceEvaluator):
    """detectron2's evaluator, run inside its temporary directory: cityscapesscripts'
    evaluateImgLists writes a "matches.json" into the current directory, which would otherwise land
    wherever the user started."""

    def evaluate(self):
        if comm.get_rank() > 0:
            return super().evaluate()
        cwd = os.getcwd()
        os.chdir(self._temp_dir)
        try:
            return super().evaluate()
        finally:
            os.chdir(cwd)


@register_evaluator("cityscapes_instance")
def _cityscapes_instance(cfg, dataset_name, output_folder):
    # cityscapesscripts' evalInstanceLevelSemanticLabeling: mask AP and AP50 over the 8 instance
    # classes
    d2compat.fix_evaluation_numpy("cityscapes")
    return _CityscapesInstanceEvaluator(dataset_name)


@register_evaluator("cityscapes_sem_seg")
def _cityscapes_sem_seg(cfg, dataset_name, output_folder):
    # cityscapesscripts' evalPixelLevelSemanticLabeling: class IoU (mean over the 19 classes) and
    # iIoU
    d2compat.fix_evaluation_numpy("cityscapes")
    return CityscapesSemSegEvaluator(dataset_name)


@register_evaluator("sem_seg")
def _sem_seg(cfg, dataset_name, output_folder):
    # mIoU, fwIoU, mACC, pACC over the dataset's stuff_classes, pixels labelled ignore_label left
    # out
    return SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)

def build_evaluator(cfg, dataset_name, output_folder=None):
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if evaluator_type not in EVALUATOR_BUILDERS:
        raise UsageError(
            f"no evaluator for dataset {dataset_name!r} (its evaluator_type metadata is "
            f"{evaluator_type!r}); known evaluator types: {', '.join(sorted(EVALUATOR_BUILDERS))}"
        )
    return EVALUATOR_BUILDERS[evaluator_type](cfg, dataset_name, output_folder)
