"""`mocobench transfer` never destroys results, and never trains from weights that do not fit the
backbone.

Re-runs: a plain re-run into a finished OUTPUT_DIR is refused (nothing touched); --resume keeps
finished trials byte for byte and trains only the missing ones; summary.json covers every trial
present; --eval-only writes results_eval.json; --resume with another config is refused. Weights: a
ResNet-18 .pkl made by the real `mocobench convert` in an R50-C4 config stops with exit 2 before
any trial directory exists.
"""
import json
import os
import pickle
import shutil

import pytest
import torch
import torchvision

from mocobench.cli import main as mocobench
from mocobench.utils import d2compat  # noqa: F401  (before detectron2)
from mocobench.utils.fileio import file_sha256, safe_unpickle
from transfer import record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R18 = os.path.join(REPO, "configs", "detection", "synth_voc_R18_FPN_cpu.yaml")
TINY_C4 = os.path.join(REPO, "configs", "detection", "tiny_synth_voc_R_50_C4.yaml")
TINY = ["SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "TEST.PRECISE_BN.ENABLED",
        "False", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MIN_SIZE_TEST", "96",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS",
        "()", "SEED", "0", "SOLVER.MAX_ITER", "1"]
TRAINING_FILES = ("results.json", "metrics.json", "config.yaml", "model_final.pth",
                  "last_checkpoint")


def r18_pkl(tmp_path, seed=0, name="r18"):
    """tmp_path/name.pkl: a random ResNet-18 (torch seed `seed`) through the real `mocobench
    convert`."""
    torch.manual_seed(seed)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / f"{name}.pth")
    assert mocobench(["convert", str(tmp_path / f"{name}.pth"),
                      str(tmp_path / f"{name}.pkl")]) == 0
    return str(tmp_path / f"{name}.pkl")


def error_lines(capsys):
    """The command's error lines on stderr (one per error; detectron2's loggers may write there
    too)."""
    return [line for line in capsys.readouterr().err.splitlines()
            if line.startswith("mocobench transfer: error:")]


def snapshot(trial):
    files = {name: (trial / name).read_bytes() for name in TRAINING_FILES}
    files["events"] = sorted((p.name, p.stat().st_size)
                             for p in trial.glob("events.out.tfevents.*"))
    return files


@pytest.mark.slow  # 3 real trials and 3 refused calls
def test_reruns_keep_finished_trials_and_eval_only_has_its_own_file(synth_root, tmp_path, capsys):
    pkl, out = r18_pkl(tmp_path), tmp_path / "run"

    def transfer(*flags, opts=(), weights=None):
        return mocobench(["transfer", "--config-file", R18, "--synth-root", synth_root,
                          "--init-name", "alpha", *flags, *TINY, *opts,
                          "MODEL.WEIGHTS", weights or pkl, "OUTPUT_DIR", str(out)])

    def summary_n():
        return json.loads((out / "summary.json").read_text())["metrics"]["synth_voc_test"][
            "bbox/AP"]["n"]

    assert transfer("--seeds", "1") == 0
    seed0 = out / "seed0"
    before = snapshot(seed0)
    capsys.readouterr()

    # a plain re-run would overwrite seed0 and append to its logs
    assert transfer("--seeds", "1") == 2
    [err] = error_lines(capsys)
    assert "already holds finished trials (seed0/results.json)" in err and "--resume" in err
    assert snapshot(seed0) == before

    assert transfer("--resume", "--seeds", "2") == 0  # seed0 kept as it was, seed1 trained
    assert snapshot(seed0) == before and (out / "seed1" / "results.json").is_file()
    assert summary_n() == 2
    # nothing to train; the summary still has every trial
    assert transfer("--resume", "--seeds", "1") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary_n() == 2 and summary["seeds"] == [0, 1] and summary["init_names"] == ["alpha"]
    assert [(t["dir"], t["trial"], t["seed"]) for t in summary["trials"]] \
        == [("seed0", 0, 0), ("seed1", 1, 1)]

    assert transfer("--eval-only", "--resume", "--seeds", "1") == 0
    evaluated = record.read_record(seed0 / "results_eval.json")
    assert evaluated["eval_only"] and evaluated["seed"] == 0 and evaluated["iteration"] is None
    assert snapshot(seed0) == before  # the training record, config and logs are untouched

    capsys.readouterr()
    assert transfer("--resume", "--seeds", "2", opts=["SOLVER.MAX_ITER", "2"]) == 2
    [err] = error_lines(capsys)
    assert "was made by another experiment (differs in SOLVER.MAX_ITER)" in err \
        and snapshot(seed0) == before

    rec = record.read_record(seed0 / "results.json")  # what was loaded is recorded
    assert rec["weights_info"]["sha256"] == file_sha256(pkl) \
        and rec["weights_info"]["author"] == "torchvision"
    assert rec["schedule"] == {"MAX_ITER": 1, "STEPS": [], "BASE_LR": 0.01, "IMS_PER_BATCH": 2}

    # a trial started but not finished (stopped before its results.json) is checked the same way,
    # against the started.json it wrote when it started: neither other weights nor another config
    # may continue it (seed0 is moved aside so that only the unfinished trial is checked)
    seed1, aside = out / "seed1", tmp_path / "seed0_aside"
    started = record.read_started(seed1 / record.STARTED_FILE)
    assert started["identity"] == record.read_record(seed1 / "results.json")["identity"]
    assert started["weights_sha256"] == file_sha256(pkl) and started["init_name"] == "alpha"
    finished_record = (seed1 / "results.json").read_bytes()
    (seed1 / "results.json").unlink()
    seed0.rename(aside)
    unfinished = sorted((p.name, p.read_bytes()) for p in seed1.iterdir() if p.is_file())
    for weights, opts, differs in ((r18_pkl(tmp_path, seed=2, name="third"), (),
                                    "MODEL.WEIGHTS (another file)"),
                                   (None, ("SOLVER.BASE_LR", "0.5"), "SOLVER.BASE_LR")):
        capsys.readouterr()
        assert transfer("--resume", "--seeds", "2", opts=opts, weights=weights) == 2
        [err] = error_lines(capsys)
        assert f"seed1/started.json was made by another experiment (differs in {differs})" in err \
            and "one trial of two experiments" in err, err
        assert sorted((p.name, p.read_bytes()) for p in seed1.iterdir() if p.is_file()) \
            == unfinished and not seed0.exists()
    aside.rename(seed0)
    (seed1 / "results.json").write_bytes(finished_record)

    # other weights, the config unchanged: the finished trials were trained from another
    # initialization, refused like another config. Another converted file, then the same path
    # holding other bytes (only its sha256 tells)
    other = r18_pkl(tmp_path, seed=1, name="other")
    for report in (".pkl.json", ".json"):  # the converter's report beside it, if any
        if os.path.exists(other[:-4] + report):
            shutil.copyfile(other[:-4] + report, pkl[:-4] + report)
    for weights in (other, shutil.copyfile(other, pkl)):
        capsys.readouterr()
        assert transfer("--resume", "--seeds", "2", weights=weights) == 2
        [err] = error_lines(capsys)
        assert "was made by another experiment (differs in MODEL.WEIGHTS (another file))" in err
        assert snapshot(seed0) == before and (out / "seed1" / "results.json").is_file()


def test_resnet18_weights_in_an_r50_c4_config_stop_before_training(synth_root, tmp_path, capsys):
    pkl, out = r18_pkl(tmp_path), tmp_path / "r50"
    capsys.readouterr()
    # the converter records the architecture in the .pkl: the config is checked against it first
    # (convert.api)
    code = mocobench(["transfer", "--config-file", TINY_C4, "--synth-root", synth_root,
                      "MODEL.WEIGHTS", pkl, "OUTPUT_DIR", str(out)])
    [err] = error_lines(capsys)
    assert code == 2 and "holds a ResNet-18 (basic blocks)" in err \
        and "builds res5 from bottleneck blocks" in err
    assert not out.exists()
    # weights that record nothing (another converter, an older file) meet the post-load check of
    # the backbone
    data = safe_unpickle(pkl)
    with open(tmp_path / "bare.pkl", "wb") as f:
        pickle.dump({"model": data["model"], "__author__": "torchvision",
                     "matching_heuristics": True}, f)
    code = mocobench(["transfer", "--config-file", TINY_C4, "--synth-root", synth_root,
                      "MODEL.WEIGHTS", str(tmp_path / "bare.pkl"), "OUTPUT_DIR", str(out)])
    [err] = error_lines(capsys)
    assert code == 2 and "a ResNet-18 checkpoint in a DEPTH 50 config" in err
    assert "backbone.res2.0.conv1.weight (file (64, 64, 3, 3), model (64, 64, 1, 1))" in err
    assert not out.exists()  # stopped before the first iteration: no trial directory, no metrics


def test_c4_backbone_includes_res5_of_the_roi_head_but_not_the_new_norm():
    from detectron2.modeling import build_model

    from transfer.checkpoint import backbone_keys
    from transfer.config import load_config

    model = build_model(load_config(TINY_C4))
    keys = backbone_keys(model)
    assert "roi_heads.res5.2.conv3.norm.running_var" in keys \
        and "backbone.stem.conv1.weight" in keys
    assert not any(k.startswith("roi_heads.res5.norm") or k.endswith("num_batches_tracked")
                   for k in keys)
    # ResNet-50: stem 5 + 16 bottlenecks x 3 convs x 5 tensors + 4 shortcuts x 5 (conv + BN with
    # stats)
    assert len(keys) == 5 + 16 * 15 + 4 * 5
