"""The MoCo paper's other transfer tasks (Table 6): which metrics make each table, and the published rows.

A task is recognized by the test dataset of a run (detectron2's builtin name, or the synth_* twin). For each:

    columns    (results key, title): the paper's columns, read from results.json's evaluation dict
               ("keypoints/AP" is results["keypoints"]["AP"])
    published  {config file name: {init: {results key: value}}}: the paper's Table 6 rows, attached to the
               shipped config that reproduces that row's setup; a report shows them only for runs of that
               config (a reference row is about a recipe, not about a dataset)

Table 6 of He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020
(arXiv:1911.05722): R50, "MoCo IN-1M" = MoCo v1 pretrained 200 epochs on ImageNet-1M, "super. IN-1M" = ImageNet
supervised, "random init." = from scratch; same architecture and schedule for all entries of a task (the
paper's appendix A.2-A.5). The values are transcribed from the table; the text confirms LVIS 24.1 (MoCo IN-1M)
and 24.4 (supervised, BN frozen), Cityscapes semantic segmentation +0.9 and VOC semantic segmentation -0.8 for
MoCo IG-1B (rows not repeated here, since nothing here pretrains on IG-1B).

DensePose (Table 6's fifth task) is not here: see the README ("What DensePose would take").

This module is plain data with no detectron2 import, so that the report can read it anywhere.
"""
from dataclasses import dataclass, field

PAPER = "He et al., CVPR 2020 (arXiv:1911.05722), Table 6"


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    datasets: tuple  # test datasets (builtin, synth) whose runs belong to this task
    columns: tuple  # ((results key, column title), ...)
    published: dict = field(default_factory=dict)  # {config file name: {init: {results key: value}}}
    source: str = PAPER

    @property
    def keys(self):
        return [key for key, _ in self.columns]

    def published_rows(self, config_file: str) -> dict:
        """{init: {results key: value}} published for runs of `config_file` (a path or a file name)."""
        import os

        return self.published.get(os.path.basename(config_file or ""), {})


KEYPOINT_COLUMNS = (("keypoints/AP", "AP^kp"), ("keypoints/AP50", "AP^kp_50"), ("keypoints/AP75", "AP^kp_75"))
MASK_COLUMNS = (("segm/AP", "AP^mk"), ("segm/AP50", "AP^mk_50"), ("segm/AP75", "AP^mk_75"))


def _row(columns, *values):
    return {key: value for (key, _), value in zip(columns, values)}


TASKS = (
    Task(
        name="coco_keypoints",
        title="COCO keypoint detection (Keypoint R-CNN R50-FPN, 2x)",
        datasets=("keypoints_coco_2017_val", "synth_keypoints_val"),
        columns=KEYPOINT_COLUMNS,
        published={
            "keypoint_rcnn_R_50_FPN_2x.yaml": {"supervised": _row(KEYPOINT_COLUMNS, 65.8, 86.9, 71.9)},
            "keypoint_rcnn_R_50_FPN_2x_moco.yaml": {"random": _row(KEYPOINT_COLUMNS, 65.9, 86.5, 71.7),
                                                    "moco": _row(KEYPOINT_COLUMNS, 66.8, 87.4, 72.5)},
        },
    ),
    Task(
        name="lvis_v0.5",
        title="LVIS v0.5 instance segmentation (Mask R-CNN R50-FPN)",
        datasets=("lvis_v0.5_val", "synth_lvis_val"),
        columns=MASK_COLUMNS,
        published={
            # the paper's supervised row (24.4) was fine-tuned with BN frozen (Appendix A.4), a recipe not
            # shipped here, so it is attached to no config
            "mask_rcnn_R_50_FPN_1x_moco.yaml": {"random": _row(MASK_COLUMNS, 22.5, 34.8, 23.8),
                                                "moco": _row(MASK_COLUMNS, 24.1, 37.4, 25.5)},
        },
    ),
    Task(
        name="cityscapes_instance",
        title="Cityscapes instance segmentation (Mask R-CNN R50-FPN)",
        datasets=("cityscapes_fine_instance_seg_val", "synth_cityscapes_fine_instance_seg_val"),
        columns=MASK_COLUMNS[:2],  # cityscapesscripts reports AP and AP50
        published={
            "mask_rcnn_R_50_FPN.yaml": {"supervised": _row(MASK_COLUMNS, 32.9, 59.6)},
            "mask_rcnn_R_50_FPN_moco.yaml": {"random": _row(MASK_COLUMNS, 25.4, 51.1),
                                             "moco": _row(MASK_COLUMNS, 32.3, 59.3)},
        },
    ),
    Task(
        name="cityscapes_sem_seg",
        title="Cityscapes semantic segmentation (FCN, dilated R50)",
        datasets=("cityscapes_fine_sem_seg_val", "synth_cityscapes_fine_sem_seg_val"),
        columns=(("sem_seg/IoU", "mIoU"),),  # CityscapesSemSegEvaluator: mean class IoU over the 19 classes
        published={
            "cityscapes_R_50_FCN_90k.yaml": {"supervised": {"sem_seg/IoU": 74.6}},
            "cityscapes_R_50_FCN_90k_moco.yaml": {"random": {"sem_seg/IoU": 65.3}, "moco": {"sem_seg/IoU": 75.3}},
        },
    ),
    Task(
        name="voc_sem_seg",
        title="VOC semantic segmentation (FCN, dilated R50)",
        datasets=("voc_2012_sem_seg_val", "synth_voc_2012_sem_seg_val"),
        columns=(("sem_seg/mIoU", "mIoU"),),
        published={
            "voc_R_50_FCN_30k.yaml": {"supervised": {"sem_seg/mIoU": 74.4}},
            "voc_R_50_FCN_30k_moco.yaml": {"random": {"sem_seg/mIoU": 39.5}, "moco": {"sem_seg/mIoU": 72.5}},
        },
    ),
)

_BY_DATASET = {dataset: task for task in TASKS for dataset in task.datasets}


def task_for_dataset(dataset_name: str):
    """The Task whose table a run evaluated on `dataset_name` belongs to, or None (VOC/COCO detection)."""
    return _BY_DATASET.get(dataset_name)


def results_value(results: dict, key: str):
    """results["keypoints"]["AP"] for key "keypoints/AP"; None when absent or not a number (NaN -> None).

    LVIS and COCO report -100 (their -1 times 100) for a metric without ground truth (e.g. APr on a split
    without rare classes): that is "not measured", not a score, and reads as None too.
    """
    task, metric = key.split("/", 1)
    value = (results.get(task) or {}).get(metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value or value < 0:
        return None
    return float(value)
