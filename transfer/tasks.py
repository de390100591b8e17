"""The MoCo paper's other transfer tasks (Table 6): which metrics make each table, and the
published rows.

A task's runs are recognized by their evaluator type, under which the report registers the task's
columns; `datasets` names the test datasets (detectron2's builtin name, or the synth_* twin) of the
task. For each:

    columns    (result group, metric, title): the paper's columns, read from the evaluation results
               ("keypoints/AP" is results["keypoints"]["AP"]), registered by evaluator type
    published  {config path under configs/: [(row label, {key: value}, source)]}: the paper's Table
               6 rows, attached to the shipped config that reproduces that setup; a report shows
               them only for runs of that config (a reference row is about a recipe, not about a
               dataset)

Table 6 of He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020
(arXiv:1911.05722): R50, "MoCo IN-1M" = MoCo v1 pretrained 200 epochs on ImageNet-1M, "MoCo IG-1B"
= on Instagram-1B, "super. IN-1M" = ImageNet supervised, "random init." = from scratch; same
architecture and schedule for all entries of a task (the paper's appendix A.2-A.5); averages of 5
trials.

Every published row carries its own source string, which the report prints beside it. How far each
was checked (with the code-search tool, the only reference reachable here; Table 6 itself is an
image in every copy of the paper found, so no cell of it could be read from the paper directly):
  verified      LVIS: Appendix A.4's table of 1x and 2x results (super. IN-1M with BN frozen /
                tuned, MoCo IN-1M, MoCo IG-1B) is text in a transcription of the paper (a public
                repository file with the paper's sections in Chinese, found by find_string "MoCo
                IG-1B"); A.4 says Table 6 quotes the 2x numbers ("24.9 vs. 24.4").
  corroborated  a paper review in a public repository (Chinese-language notes, found by the same
                search; it also reproduces Tables 2, 5b and 5d exactly as transfer/report.py has
                them) quotes Table 6 as one metric per task for super. IN-1M / MoCo IN-1M / MoCo
                IG-1B: AP^kp 65.8 / 66.8 / 66.9, AP^dp_75 50.6 / 53.9 / 54.3, LVIS AP^mk 24.4 /
                24.1 / 24.9, Cityscapes instance AP^mk_50 59.6 / 59.3 / 60.3, Cityscapes semantic
                mIoU 74.6 / 75.3 / 75.5, VOC semantic mIoU 74.4 / 72.5 / 73.6. The paper's Sec.
                4.2.3 text agrees ("up to 0.9" on Cityscapes, "at least 0.8" worse on VOC, AP^dp_75
                +3.7).
  UNVERIFIED    the remaining cells (every random-init row, AP^kp_50 / AP^kp_75, Cityscapes
                instance AP^mk) are the table as remembered: check them against the paper before
                quoting them.

DensePose (Table 6's fifth task) is not here: see the README ("What DensePose would take").

This module is plain data with no detectron2 import, so that the report can read it anywhere.
"""
from dataclasses import dataclass, field

PAPER = "He et al., CVPR 2020 (arXiv:1911.05722)"
T6_UNVERIFIED = f"{PAPER}, Table 6 (UNVERIFIED: remembered, no readable copy found)"
T6_CORROBORATED = f"{PAPER}, Table 6 (corroborated by a review quoting it)"
T6_KP = (f"{PAPER}, Table 6 (AP^kp corroborated by a review quoting it; AP^kp_50, AP^kp_75 "
         "UNVERIFIED)")
T6_CITY = f"{PAPER}, Table 6 (AP^mk_50 corroborated by a review quoting it; AP^mk UNVERIFIED)"


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    # the datasets' evaluator_type metadata, which selects the evaluator and the columns
    evaluator_type: str
    datasets: tuple  # test datasets (builtin, synth) whose runs belong to this task
    columns: tuple  # ((evaluator result group, metric, column title), ...), in the paper's order
    # {config path under configs/: [(row label, {key: value}, source)]}
    published: dict = field(default_factory=dict)


KEYPOINT_COLUMNS = (("keypoints", "AP", "AP^kp"), ("keypoints", "AP50", "AP^kp_50"),
                    ("keypoints", "AP75", "AP^kp_75"))
MASK_COLUMNS = (("segm", "AP", "AP^mk"), ("segm", "AP50", "AP^mk_50"), ("segm", "AP75", "AP^mk_75"))


def _rows(columns, *rows):
    """Published rows: (label key, values in column order (fewer: the first columns), source) ->
    report rows."""
    labels = {"random": "random init", "supervised": "supervised IN-1M", "moco": "MoCo IN-1M",
              "moco_ig1b": "MoCo IG-1B",
              "supervised_frozen_bn": "supervised IN-1M, BN frozen (Appendix A.4)",
              "supervised_tuned_bn": "supervised IN-1M, BN tuned (Appendix A.4)"}
    return [(labels[name], {f"{g}/{m}": v for (g, m, _), v in zip(columns, values)}, source)
            for name, values, source in rows]


def _lvis_a4(schedule):
    return f"{PAPER}, Appendix A.4 LVIS table, {schedule} (verified: transcription of the paper)"


# Published rows are attached to the _moco configs: Table 6 uses one architecture and schedule per
# task for all rows, and the pipeline runs every init through the _moco config (only the
# pretraining differs).
TASKS = (
    Task(
        name="coco_keypoints",
        title="COCO keypoint detection (Keypoint R-CNN R50-FPN, 2x)",
        # COCOEvaluator with the keypoints task: the report's COCO columns gain AP^kp
        evaluator_type="coco",
        datasets=("keypoints_coco_2017_val", "synth_keypoints_val"),
        columns=KEYPOINT_COLUMNS,
        published={"keypoints/keypoint_rcnn_R_50_FPN_2x_moco.yaml": _rows(
            KEYPOINT_COLUMNS, ("random", (65.9, 86.5, 71.7), T6_UNVERIFIED),
            ("supervised", (65.8, 86.9, 71.9), T6_KP), ("moco", (66.8, 87.4, 72.5), T6_KP))},
    ),
    Task(
        name="lvis_v0.5",
        title="LVIS v0.5 instance segmentation (Mask R-CNN R50-FPN)",
        evaluator_type="lvis",
        datasets=("lvis_v0.5_val", "synth_lvis_val"),
        columns=MASK_COLUMNS,
        # Table 6 quotes the 2x schedule (Appendix A.4: "24.9 vs. 24.4, as reported in Table 6"),
        # and its supervised row was fine-tuned with BN frozen, unlike these configs (BN tuned);
        # A.4 gives both BN settings at 1x and 2x
        published={
            "lvis/mask_rcnn_R_50_FPN_2x_moco.yaml": _rows(
                MASK_COLUMNS, ("random", (22.5, 34.8, 23.8), T6_UNVERIFIED),
                ("supervised_frozen_bn", (24.4, 37.8, 25.8), _lvis_a4("2x")),
                ("supervised_tuned_bn", (23.2, 36.0, 24.4), _lvis_a4("2x")),
                ("moco", (24.1, 37.4, 25.5), _lvis_a4("2x")),
                ("moco_ig1b", (24.9, 38.2, 26.4), _lvis_a4("2x"))),
            "lvis/mask_rcnn_R_50_FPN_1x_moco.yaml": _rows(
                MASK_COLUMNS, ("supervised_frozen_bn", (24.1, 37.3, 25.4), _lvis_a4("1x")),
                ("supervised_tuned_bn", (23.5, 36.6, 24.8), _lvis_a4("1x")),
                ("moco", (23.2, 36.0, 24.7), _lvis_a4("1x")),
                ("moco_ig1b", (24.3, 37.4, 25.9), _lvis_a4("1x"))),
        },
    ),
    Task(
        name="cityscapes_instance",
        title="Cityscapes instance segmentation (Mask R-CNN R50-FPN)",
        evaluator_type="cityscapes_instance",
        datasets=("cityscapes_fine_instance_seg_val", "synth_cityscapes_fine_instance_seg_val"),
        columns=MASK_COLUMNS[:2],  # cityscapesscripts reports AP and AP50
        published={"cityscapes/mask_rcnn_R_50_FPN_moco.yaml": _rows(
            MASK_COLUMNS, ("random", (25.4, 51.1), T6_UNVERIFIED),
            ("supervised", (32.9, 59.6), T6_CITY), ("moco", (32.3, 59.3), T6_CITY))},
    ),
    Task(
        name="cityscapes_sem_seg",
        title="Cityscapes semantic segmentation (FCN, dilated R50)",
        evaluator_type="cityscapes_sem_seg",
        datasets=("cityscapes_fine_sem_seg_val", "synth_cityscapes_fine_sem_seg_val"),
        # CityscapesSemSegEvaluator: mean class IoU over the 19 classes
        columns=(("sem_seg", "IoU", "mIoU"),),
        published={"semseg/cityscapes_R_50_FCN_90k_moco.yaml": _rows(
            (("sem_seg", "IoU", "mIoU"),), ("random", (65.3,), T6_UNVERIFIED),
            ("supervised", (74.6,), T6_CORROBORATED), ("moco", (75.3,), T6_CORROBORATED),
            ("moco_ig1b", (75.5,), T6_CORROBORATED))},
    ),
    Task(
        name="voc_sem_seg",
        title="VOC semantic segmentation (FCN, dilated R50)",
        evaluator_type="sem_seg",
        datasets=("voc_2012_sem_seg_val", "synth_voc_2012_sem_seg_val"),
        columns=(("sem_seg", "mIoU", "mIoU"),),
        published={"semseg/voc_R_50_FCN_30k_moco.yaml": _rows(
            (("sem_seg", "mIoU", "mIoU"),), ("random", (39.5,), T6_UNVERIFIED),
            ("supervised", (74.4,), T6_CORROBORATED), ("moco", (72.5,), T6_CORROBORATED),
            ("moco_ig1b", (73.6,), T6_CORROBORATED))},
    ),
)
