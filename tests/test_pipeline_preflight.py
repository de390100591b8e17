"""The pipeline's preflight reads every input of every stage before anything runs: each task's
datasets under $DETECTRON2_DATASETS in detectron2's own layout (down to the annotation files and one
image that opens), the ImageFolder of pretraining (each class holds an image) and the weights.
Each case breaks one input of a complete tree (written by `mocobench data synth`, whose tree is
detectron2's builtin layout) and the dry-run of the paper's pipeline config for that task must
refuse it: exit 2, one line naming the stage and the path."""
import json
import os
import shutil

import pytest

from mocobench import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINES = os.path.join(REPO, "configs", "pipeline")
TRANSFERS = "transfer_moco, transfer_supervised, transfer_random"


def _first_line(path):
    with open(path) as f:
        return next(line.strip() for line in f if line.strip())


def _first_json_image(root, json_file, folder):
    with open(os.path.join(root, json_file)) as f:
        image = json.load(f)["images"][0]
    name = image["coco_url"].split("/")[-1] if "coco_url" in image else image["file_name"]
    return os.path.join("coco", folder, name)


def _first_cityscapes(root, split, suffix):
    city_dir = os.path.join(root, "cityscapes", "leftImg8bit", split)
    city = sorted(os.listdir(city_dir))[0]
    image = sorted(os.listdir(os.path.join(city_dir, city)))[0]
    return os.path.join("cityscapes", "gtFine", split, city,
                        image.replace("leftImg8bit.png", suffix))


def _remove(root, rel):
    path = os.path.join(root, rel)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return rel


def _corrupt(root, rel):
    with open(os.path.join(root, rel), "wb") as f:
        f.write(b"not an image")
    return rel


def _empty(root, rel):
    open(os.path.join(root, rel), "w").close()
    return rel


def _empty_class(root):
    folder = os.path.join(root, "imagenet", "train", "square")
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    return "imagenet/train"


# (pipeline config, the stages that read the input, break the complete tree -> the path it broke,
#  what the error says of it)
CASES = {
    "coco json missing": (
        "coco_R50_FPN_moco_v2", TRANSFERS,
        lambda r: _remove(r, "coco/annotations/instances_train2017.json"), "does not exist"),
    "coco image broken": (
        "coco_R50_FPN_moco_v2", TRANSFERS,
        lambda r: _corrupt(r, _first_json_image(r, "coco/annotations/instances_val2017.json",
                                                "val2017")),
        "does not open as an image"),
    "keypoints json missing": (
        "keypoints_R50_FPN_moco_v1", TRANSFERS,
        lambda r: _remove(r, "coco/annotations/person_keypoints_val2017.json"), "does not exist"),
    "lvis image missing": (
        "lvis_R50_FPN_moco_v1", TRANSFERS,
        lambda r: _remove(r, _first_json_image(r, "lvis/lvis_v0.5_val.json", "val2017")),
        "does not exist"),
    "lvis json missing": (
        "lvis_R50_FPN_moco_v1", TRANSFERS,
        lambda r: _remove(r, "lvis/lvis_v0.5_train.json"), "does not exist"),
    "voc list missing": (
        "voc_R50_C4_moco_v2", TRANSFERS,
        lambda r: _remove(r, "VOC2007/ImageSets/Main/test.txt"), "does not exist"),
    "voc annotation missing": (
        "voc_R50_C4_moco_v2", TRANSFERS,
        lambda r: _remove(r, "VOC2007/Annotations/"
                          + _first_line(f"{r}/VOC2007/ImageSets/Main/trainval.txt") + ".xml"),
        "does not exist (the annotation of"),
    "voc image broken": (
        "voc_R50_C4_moco_v2", TRANSFERS,
        lambda r: _corrupt(r, "VOC2007/JPEGImages/"
                           + _first_line(f"{r}/VOC2007/ImageSets/Main/test.txt") + ".jpg"),
        "does not open as an image"),
    "cityscapes polygons missing": (
        "cityscapes_instance_R50_FPN_moco_v1", TRANSFERS,
        lambda r: _remove(r, _first_cityscapes(r, "train", "gtFine_polygons.json")),
        "does not exist (the ground truth of"),
    "cityscapes images missing": (
        "cityscapes_semseg_R50_FCN_moco_v1", TRANSFERS,
        lambda r: _remove(r, "cityscapes/leftImg8bit/val"), "does not exist"),
    "cityscapes train ids missing": (
        "cityscapes_semseg_R50_FCN_moco_v1", TRANSFERS,
        lambda r: _remove(r, _first_cityscapes(r, "train", "gtFine_labelTrainIds.png")),
        "does not exist (the ground truth of"),
    "voc segmentation label missing": (
        "voc_semseg_R50_FCN_moco_v1", TRANSFERS,
        lambda r: _remove(r, "VOC2012/SegmentationClassAug/"
                          + _first_line(f"{r}/VOC2012/ImageSets/Segmentation/train_aug.txt")
                          + ".png"),
        "does not exist (the annotation of"),
    "voc segmentation list empty": (
        "voc_semseg_R50_FCN_moco_v1", TRANSFERS,
        lambda r: _empty(r, "VOC2012/ImageSets/Segmentation/val.txt"), "lists no image id"),
    "empty ImageFolder class": (
        "coco_R50_FPN_moco_v2", "pretrain", _empty_class,
        "class folder 'square' holds no images"),
    "empty weights file": (
        "coco_R50_FPN_moco_v2", "supervised", lambda r: _empty(r, "weights.pth"),
        "is not a non-empty file"),
}


@pytest.fixture
def tree(synth_root, tmp_path, monkeypatch):
    """A complete datasets root (a copy of the generated tree) as $DETECTRON2_DATASETS, with
    weights for the supervised row."""
    root = str(tmp_path / "datasets")
    shutil.copytree(synth_root, root)
    with open(os.path.join(root, "weights.pth"), "wb") as f:
        f.write(b"weights")
    monkeypatch.setenv("DETECTRON2_DATASETS", root)
    return root


def dry_run(config, root, out, capsys):
    code = cli.main(["pipeline", "--config-file", os.path.join(PIPELINES, f"{config}.yaml"),
                     "--dry-run", "DATA.PRETRAIN_ROOT", os.path.join(root, "imagenet"),
                     "SUPERVISED.WEIGHTS", os.path.join(root, "weights.pth"),
                     "OUTPUT_DIR", str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("config", ["coco_R50_FPN_moco_v2", "keypoints_R50_FPN_moco_v1",
                                    "lvis_R50_FPN_moco_v1", "cityscapes_instance_R50_FPN_moco_v1",
                                    "cityscapes_semseg_R50_FCN_moco_v1",
                                    "voc_semseg_R50_FCN_moco_v1"])
def test_a_complete_tree_passes_the_preflight(tree, tmp_path, capsys, config):
    code, out, err = dry_run(config, tree, tmp_path / "run", capsys)
    assert (code, err) == (0, "")
    assert "all inputs present" in out
    datasets = [line for line in out.splitlines() if "needs dataset" in line]
    assert len(datasets) == 6 and all(line.endswith("[ok]") for line in datasets)


@pytest.mark.parametrize("case", list(CASES))
def test_the_dry_run_refuses_a_missing_or_broken_input(tree, tmp_path, capsys, case):
    config, stages, breaks, says = CASES[case]
    broken = os.path.join(tree, breaks(tree))
    code, out, err = dry_run(config, tree, tmp_path / "run", capsys)
    assert code == 2
    assert err.startswith("mocobench pipeline: error: ") and err.count("\n") == 1
    assert "Traceback" not in err
    assert f"(stage {stages})" in err and says in err
    assert broken in err  # the path it broke
    assert "BROKEN" in out or "MISSING" in out  # the plan marks it too
    assert not (tmp_path / "run").exists()  # nothing ran, nothing was written


def test_dry_run_prints_the_study_graph_and_its_critical_path(tree, tmp_path, capsys):
    """The COCO paper study: random-init trials wait for nothing, MoCo's for its conversion, the
    report for every trial; with the 8 x V100 figures (53 h of pretraining, 90k iterations at
    0.210 s) the study takes pretraining + one trial with a machine per job, against pretraining +
    15 trials one after another."""
    import re

    code, out, err = dry_run("coco_R50_FPN_moco_v2", tree, tmp_path / "run", capsys)
    assert (code, err) == (0, "")
    jobs = {line.split()[0]: line for line in out.splitlines() if line.startswith("    ")
            and " after " in line}
    assert len(jobs) == 20  # pretrain, supervised, 2 conversions, 15 trials, the report
    for i in range(5):
        assert " after convert_moco |" in jobs[f"transfer_moco/seed{i}"]
        assert " after convert_supervised |" in jobs[f"transfer_supervised/seed{i}"]
        assert " after - |" in jobs[f"transfer_random/seed{i}"]  # needs nothing from pretraining
        assert "1 node(s) x 8 GPU(s)" in jobs[f"transfer_moco/seed{i}"]
        assert jobs[f"transfer_moco/seed{i}"].endswith("| ~5.2 h")  # 90000 x 0.210 s
    assert " after convert_moco " not in jobs["report"]
    assert "after transfer_moco/seed{0,1,2,3,4}, transfer_supervised/seed{0,1,2,3,4}, " \
           "transfer_random/seed{0,1,2,3,4} |" in jobs["report"]
    assert jobs["pretrain"].endswith("| ~53.0 h")
    [path] = [line for line in out.splitlines() if "critical path:" in line]
    assert "critical path: pretrain -> convert_moco -> transfer_moco/seed0 -> report: " in path
    [wall] = [line for line in out.splitlines() if "with fan-out" in line]
    fan_out, sequential = (float(h) for h in re.findall(r"~([\d.]+) h", wall))
    trial = 90000 * 0.210 / 3600
    assert fan_out == pytest.approx(53 + trial, abs=0.1)
    assert sequential == pytest.approx(53 + 15 * trial, abs=0.1)
