"""Training on generated data through detectron2's engine: R50-C4, R50-FPN Mask R-CNN, gloo, seeds,
resume."""
import json
import os

import pytest
import torch

from mocobench.utils import d2compat  # noqa: F401  (before detectron2)
from transfer import run_transfer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs", "detection")
R18 = os.path.join(CONFIG_DIR, "synth_voc_R18_FPN_cpu.yaml")
# ResNet-18 FPN at 2 images of 128 px per iteration, one precise-BN batch, no data-loader workers
R18_TINY = ["SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "TEST.PRECISE_BN.NUM_ITER",
            "1", "MOCOBENCH.LOG_PERIOD", "1", "INPUT.MIN_SIZE_TRAIN", "(96,)",
            "INPUT.MIN_SIZE_TEST", "96",
            # keep low-score boxes: AP is NaN without detections
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]


def read_metrics(path):
    """Training lines of metrics.json by iteration (a resumed run appends: the last line for an
    iteration wins).

    Lines without "lr" are the final evaluation's (bbox/AP, ...), which detectron2 logs after the
    last step.
    """
    by_iter = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if "lr" in record:
                by_iter[record["iteration"]] = record
    return by_iter


def assert_ap_metrics(metrics):
    assert set(metrics) >= {"AP", "AP50", "AP75"}
    assert all(0.0 <= metrics[k] <= 100.0 for k in ("AP", "AP50", "AP75"))


def _truth_as_predictions(records, shift_classes=0, num_classes=1):
    """detectron2 model outputs that repeat the annotations of `records` (score 1), classes shifted
    by `shift_classes` modulo `num_classes`."""
    from detectron2.structures import Boxes, BoxMode, Instances

    outputs = []
    for r in records:
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                 for a in r["annotations"]]
        instances = Instances((r["height"], r["width"]))
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        instances.scores = torch.ones(len(boxes))
        instances.pred_classes = torch.tensor(
            [(a["category_id"] + shift_classes) % num_classes for a in r["annotations"]],
            dtype=torch.long)
        outputs.append({"instances": instances})
    return outputs


def test_voc_evaluation_scores_the_test_split_against_ground_truth(synth_root, tmp_path):
    """The generated VOC test split, evaluated by the evaluator the trainer builds for it, scored
    with truth taken from the other writer of the same scenes (COCO val = VOC test): boxes of the
    right images and classes give AP 100; the right boxes with classes shifted, or the boxes of the
    trainval scenes, give ~0."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from transfer.evaluation import build_evaluator
    from transfer.run import prepare_config

    cfg, _ = prepare_config(R18, ["MOCOBENCH.SYNTH_ROOT", synth_root, "OUTPUT_DIR", str(tmp_path)])
    assert list(cfg.DATASETS.TEST) == ["synth_voc_test"]
    meta = json.loads(open(os.path.join(synth_root, "synth.json")).read())
    classes = MetadataCatalog.get("synth_voc_test").thing_classes
    assert list(classes) == meta["class_names"] \
        == list(MetadataCatalog.get("synth_coco_val").thing_classes)
    coco_val, coco_train = (DatasetCatalog.get("synth_coco_val"),
                            DatasetCatalog.get("synth_coco_train"))
    voc_test = DatasetCatalog.get("synth_voc_test")
    # the VOC test split holds the COCO val scenes: image i of the generator is VOC id {i:06d} and
    # COCO id i
    assert [r["image_id"] for r in voc_test] == [f"{r['image_id']:06d}" for r in coco_val]
    assert len(voc_test) == meta["splits"]["voc"]["test"] >= 2

    def evaluate(records, **shift):
        evaluator = build_evaluator(cfg, "synth_voc_test")
        evaluator.reset()
        # the boxes of `records`, one per test image
        inputs = [{"image_id": r["image_id"]} for r in voc_test]
        evaluator.process(inputs, _truth_as_predictions(records, num_classes=len(classes), **shift))
        return evaluator.evaluate()["bbox"]

    perfect = evaluate(coco_val)
    assert perfect == pytest.approx({"AP": 100.0, "AP50": 100.0, "AP75": 100.0})
    assert evaluate(coco_val, shift_classes=1)["AP50"] < 10.0
    assert evaluate(coco_train[:len(voc_test)])["AP50"] < 10.0  # the trainval scenes' boxes


@pytest.mark.slow
def test_r50_c4_naive_syncbn_single_process_trains_and_evaluates_voc(synth_root, tmp_path):
    out = tmp_path / "c4"
    [result] = run_transfer(os.path.join(CONFIG_DIR, "tiny_synth_voc_R_50_C4.yaml"),
                            ["OUTPUT_DIR", str(out)], init_name="random", synth_root=synth_root)
    assert result["iteration"] == 2 and result["init_name"] == "random" \
        and result["world_size"] == 1
    assert_ap_metrics(result["results"]["synth_voc_test"]["bbox"])
    trial = out / "seed0"
    assert json.loads((trial / "results.json").read_text()) == result
    # set explicitly at the start, recorded (splits tables)
    assert result["identity"]["MOCOBENCH.TF32"] is None  # torch's defaults
    assert sorted(read_metrics(trial / "metrics.json")) == [0, 1]
    state = torch.load(trial / "model_final.pth", weights_only=True)["model"]
    # the extra norm after res5 is a (Sync)BatchNorm with running statistics, trained with the rest
    assert state["roi_heads.res5.norm.running_var"].shape == (2048,)
    config = (trial / "config.yaml").read_text()
    assert "NORM: naiveSyncBN" in config and "Res5ROIHeadsExtraNorm" in config


@pytest.mark.slow
def test_r50_fpn_mask_rcnn_trains_and_evaluates_coco_bbox_and_segm(synth_root, tmp_path):
    [result] = run_transfer(os.path.join(CONFIG_DIR, "tiny_synth_coco_R_50_FPN.yaml"),
                            ["OUTPUT_DIR", str(tmp_path / "fpn")], synth_root=synth_root)
    assert set(result["results"]["synth_coco_val"]) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        assert_ap_metrics(result["results"]["synth_coco_val"][task])
    assert sorted(read_metrics(tmp_path / "fpn" / "seed0" / "metrics.json")) == [0, 1]


@pytest.mark.slow
def test_two_cpu_processes_over_gloo_with_naive_sync_bn(synth_root, tmp_path, rendezvous):
    out = tmp_path / "gloo"
    [result] = run_transfer(R18, R18_TINY
                            + ["SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out), "SEED", "5"],
                            num_gpus=2, synth_root=synth_root, dist_url=rendezvous)
    # the process group's size, recorded by rank 0
    assert result["world_size"] == 2 and result["seed"] == 5
    assert_ap_metrics(result["results"]["synth_voc_test"]["bbox"])
    trial = out / "seed0"
    config = (trial / "config.yaml").read_text()
    assert "NORM: naiveSyncBN" in config and "NORM: SyncBN" not in config
    assert "SyncBN -> naiveSyncBN" in (trial / "log.txt").read_text()
    assert "trial 1/1: seed 5" in (trial / "log.txt.rank1").read_text()  # rank 1 ran the same trial
    metrics = read_metrics(trial / "metrics.json")
    assert sorted(metrics) == [0, 1]


@pytest.mark.slow
def test_seeds_write_one_result_per_trial_with_distinct_seeds(synth_root, tmp_path):
    out = tmp_path / "seeds"
    results = run_transfer(R18,
                           R18_TINY + ["SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(out), "SEED", "11",
                                       "TEST.PRECISE_BN.ENABLED", "False"],
                           seeds=2, init_name="scratch", synth_root=synth_root)
    assert [r["seed"] for r in results] == [11, 12]
    for i in range(2):
        on_disk = json.loads((out / f"seed{i}" / "results.json").read_text())
        assert on_disk["seed"] == 11 + i and on_disk["init_name"] == "scratch"
        # the shipped config by its configs/ name, which resolves from any directory
        assert on_disk["config_file"] == "configs/detection/synth_voc_R18_FPN_cpu.yaml" \
            and on_disk["weights"] == ""
        assert_ap_metrics(on_disk["results"]["synth_voc_test"]["bbox"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [11, 12]
    ap = summary["metrics"]["synth_voc_test"]["bbox/AP"]
    assert ap["n"] == 2 \
        and ap["values"] == [r["results"]["synth_voc_test"]["bbox"]["AP"] for r in results]
    assert ap["mean"] == pytest.approx(sum(ap["values"]) / 2)


@pytest.mark.slow
def test_resume_restores_iteration_and_lr_schedule_across_steps_then_eval_only(synth_root,
                                                                               tmp_path):
    # 5 iterations at 64 px, warm-up over 1, lr x0.1 at 3 and again at 4; checkpoints after
    # iterations 1 and 3
    schedule = R18_TINY \
        + ["SOLVER.MAX_ITER", "5", "SOLVER.STEPS", "(3, 4)", "SOLVER.WARMUP_ITERS", "1",
           "SOLVER.CHECKPOINT_PERIOD", "2", "SEED", "0", "TEST.PRECISE_BN.ENABLED", "False",
           "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64"]
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    run_transfer(R18, schedule + ["OUTPUT_DIR", str(unbroken)], synth_root=synth_root)
    full = read_metrics(unbroken / "seed0" / "metrics.json")
    assert sorted(full) == list(range(5))
    lrs = [full[i]["lr"] for i in range(5)]
    assert lrs[1:] == pytest.approx([0.01, 0.01, 0.001, 1e-4])

    # an interrupted run: its directory as it was after iteration 1 (checkpoint model_0000001.pth)
    trial = resumed / "seed0"
    trial.mkdir(parents=True)
    for name in ("model_0000001.pth", "config.yaml"):
        (trial / name).write_bytes((unbroken / "seed0" / name).read_bytes())
    (trial / "last_checkpoint").write_text("model_0000001.pth")
    (trial / "metrics.json").write_text("".join(json.dumps(full[i]) + "\n" for i in (0, 1)))

    [result] = run_transfer(R18, schedule + ["OUTPUT_DIR", str(resumed)], resume=True,
                            synth_root=synth_root)
    assert result["resumed"] and result["iteration"] == 5 and result["seed"] == 0
    assert "Starting training from iteration 2" in (trial / "log.txt").read_text()
    again = read_metrics(trial / "metrics.json")
    assert sorted(again) == list(range(5))
    # iterations 2..4 (across the steps at 3 and 4) have the lr of the unbroken run, not a
    # restarted warm-up
    for i in range(2, 5):
        assert again[i]["lr"] == pytest.approx(full[i]["lr"], rel=1e-9), i
    a = torch.load(unbroken / "seed0" / "model_final.pth", weights_only=True)
    b = torch.load(trial / "model_final.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == 4
    assert a["trainer"]["hooks"]["LRScheduler"] == b["trainer"]["hooks"]["LRScheduler"]
    assert b["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == 5
    opt_a, opt_b = a["trainer"]["_trainer"]["optimizer"], b["trainer"]["_trainer"]["optimizer"]
    assert [g["lr"] for g in opt_a["param_groups"]] == [g["lr"] for g in opt_b["param_groups"]]
    # momentum buffers are checkpointed (detectron2 v0.6 alone drops them)
    assert len(opt_b["state"]) > 0

    # --eval-only --resume evaluates the trial's last checkpoint: the same numbers as the end of
    # training
    [evaluated] = run_transfer(R18, schedule + ["OUTPUT_DIR", str(resumed)], resume=True,
                               eval_only=True, synth_root=synth_root)
    assert evaluated["eval_only"] and evaluated["seed"] == 0
    bbox = evaluated["results"]["synth_voc_test"]["bbox"]
    assert bbox == pytest.approx(result["results"]["synth_voc_test"]["bbox"])
