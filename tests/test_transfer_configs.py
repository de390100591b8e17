"""Every shipped detection config merges and builds; key values equal MoCo's; bad input fails
clearly (exit 2)."""
import glob
import os
import socket

import mocobench.utils.d2compat  # noqa: F401  (before any detectron2 import)

import pytest
import torch

from mocobench import cli
from mocobench.utils.errors import UsageError
from transfer.config import load_config, swap_sync_bn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs", "detection")
CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))
MOCO_PIXELS = dict(mean=[123.675, 116.280, 103.530], std=[58.395, 57.120, 57.375])


def cfg_of(name, *opts):
    return load_config(os.path.join(CONFIG_DIR, name), list(opts))


def test_the_expected_configs_ship():
    names = {os.path.basename(p) for p in CONFIGS}
    for stem in ("pascal_voc_R_50_C4_24k", "coco_R_50_C4_1x", "coco_R_50_C4_2x", "coco_R_50_FPN_1x",
                 "coco_R_50_FPN_2x", "synth_voc_R18_FPN_cpu"):
        assert f"{stem}.yaml" in names and f"{stem}_moco.yaml" in names
    assert "Base-RCNN-C4-BN.yaml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_merges_and_builds_its_model(path):
    from detectron2.modeling import build_model

    cfg = load_config(path, ["MODEL.DEVICE", "cpu"])  # no unknown keys, types right
    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    depth = cfg.MODEL.RESNETS.DEPTH
    assert n_params > (10e6 if depth == 18 else 30e6)
    if cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm":
        from detectron2.layers import NaiveSyncBatchNorm

        norm = model.roi_heads.res5.norm
        expected = NaiveSyncBatchNorm if cfg.MODEL.RESNETS.NORM == "naiveSyncBN" \
            else torch.nn.SyncBatchNorm
        assert isinstance(norm, expected) and norm.num_features == 2048
    if cfg.MODEL.MASK_ON:
        assert hasattr(model.roi_heads, "mask_head")


def test_base_c4_values_equal_moco():
    cfg = cfg_of("Base-RCNN-C4-BN.yaml")
    assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
    assert (cfg.MODEL.RPN.PRE_NMS_TOPK_TEST, cfg.MODEL.RPN.POST_NMS_TOPK_TEST) == (6000, 1000)
    assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm"
    # naiveSyncBN: the official repository since commit d00ef73 ("use naiveSyncBN for moco")
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0 and cfg.MODEL.RESNETS.NORM == "naiveSyncBN"
    assert cfg.TEST.PRECISE_BN.ENABLED and cfg.SOLVER.IMS_PER_BATCH == 16 \
        and cfg.SOLVER.BASE_LR == 0.02


def test_voc_values_equal_moco():
    cfg = cfg_of("pascal_voc_R_50_C4_24k_moco.yaml")
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 20 and not cfg.MODEL.MASK_ON
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(480, 801, 32)) \
        and cfg.INPUT.MIN_SIZE_TEST == 800
    assert tuple(cfg.DATASETS.TRAIN) == ("voc_2007_trainval", "voc_2012_trainval")
    assert tuple(cfg.DATASETS.TEST) == ("voc_2007_test",)
    assert tuple(cfg.SOLVER.STEPS) == (18000, 22000) and cfg.SOLVER.MAX_ITER == 24000
    assert cfg.SOLVER.WARMUP_ITERS == 100
    assert list(cfg.MODEL.PIXEL_MEAN) == MOCO_PIXELS["mean"] \
        and list(cfg.MODEL.PIXEL_STD) == MOCO_PIXELS["std"]
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    msra = cfg_of("pascal_voc_R_50_C4_24k.yaml")
    assert msra.INPUT.FORMAT == "BGR" and msra.MODEL.RESNETS.STRIDE_IN_1X1 is True
    assert list(msra.MODEL.PIXEL_MEAN) == [103.530, 116.280, 123.675]


@pytest.mark.parametrize("arch", ["C4", "FPN"])
def test_coco_schedules(arch):
    two = cfg_of(f"coco_R_50_{arch}_2x_moco.yaml")
    one = cfg_of(f"coco_R_50_{arch}_1x_moco.yaml")
    assert (tuple(two.SOLVER.STEPS), two.SOLVER.MAX_ITER) == ((120000, 160000), 180000)
    assert (tuple(one.SOLVER.STEPS), one.SOLVER.MAX_ITER) == ((60000, 80000), 90000)
    for cfg in (one, two):
        assert cfg.MODEL.MASK_ON and tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(640, 801, 32))
        assert tuple(cfg.DATASETS.TRAIN) == ("coco_2017_train",) \
            and tuple(cfg.DATASETS.TEST) == ("coco_2017_val",)
        assert list(cfg.MODEL.PIXEL_MEAN) == MOCO_PIXELS["mean"] and cfg.INPUT.FORMAT == "RGB"
    if arch == "FPN":
        assert {one.MODEL.RESNETS.NORM, one.MODEL.FPN.NORM, one.MODEL.ROI_BOX_HEAD.NORM,
                one.MODEL.ROI_MASK_HEAD.NORM} == {"naiveSyncBN"}


def test_swap_sync_bn_changes_every_norm_key():
    # SyncBN is one override per norm away from the shipped naiveSyncBN
    cfg = cfg_of("coco_R_50_FPN_1x_moco.yaml", "MODEL.RESNETS.NORM", "SyncBN", "MODEL.FPN.NORM",
                 "SyncBN", "MODEL.ROI_BOX_HEAD.NORM", "SyncBN", "MODEL.ROI_MASK_HEAD.NORM",
                 "SyncBN")
    changed = swap_sync_bn(cfg)
    assert sorted(changed) == ["MODEL.FPN.NORM", "MODEL.RESNETS.NORM", "MODEL.ROI_BOX_HEAD.NORM",
                               "MODEL.ROI_MASK_HEAD.NORM"]
    assert cfg.MODEL.FPN.NORM == "naiveSyncBN"


def test_unknown_key_in_file_and_in_overrides(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{os.path.join(CONFIG_DIR, "Base-RCNN-C4-BN.yaml")}"\nMODEL:\n  '
                   'ROI_HEADZ:\n    X: 1\n')
    with pytest.raises(UsageError, match="MODEL.ROI_HEADZ"):
        load_config(str(bad))
    with pytest.raises(UsageError, match="SOLVER.MAX_ITERS"):
        cfg_of("Base-RCNN-C4-BN.yaml", "SOLVER.MAX_ITERS", "5")
    with pytest.raises(UsageError, match="odd number"):
        cfg_of("Base-RCNN-C4-BN.yaml", "SOLVER.MAX_ITER")


def test_cli_unknown_key_exits_2(capsys):
    rc = cli.main(["transfer", "--config-file",
                   os.path.join(CONFIG_DIR, "synth_voc_R18_FPN_cpu.yaml"), "MODEL.RESNETS.DEPTHH",
                   "50"])
    assert rc == 2
    assert "MODEL.RESNETS.DEPTHH" in capsys.readouterr().err


def test_cli_missing_voc_names_the_path_and_layout(tmp_path, monkeypatch, capsys):
    # the builtin voc_* names resolve under DETECTRON2_DATASETS, read when detectron2 is imported
    # ("datasets")
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["transfer", "--config-file",
                   os.path.join(CONFIG_DIR, "pascal_voc_R_50_C4_24k_moco.yaml"), "MODEL.DEVICE",
                   "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "voc_2007_trainval" in err \
        and os.path.join("VOC2007", "ImageSets", "Main", "trainval.txt") in err
    assert "JPEGImages" in err and "Annotations" in err


def test_missing_synth_root_names_synth_json(tmp_path, capsys):
    missing = tmp_path / "nothing_here"
    rc = cli.main(["transfer", "--config-file",
                   os.path.join(CONFIG_DIR, "synth_voc_R18_FPN_cpu.yaml"), "--synth-root",
                   str(missing)])
    assert rc == 2
    assert os.path.join(str(missing), "synth.json") in capsys.readouterr().err


def test_missing_coco_files_of_a_synth_tree(synth_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "synth"
    shutil.copytree(synth_root, root)
    os.remove(root / "coco" / "annotations" / "instances_val2017.json")
    rc = cli.main(["transfer", "--config-file",
                   os.path.join(CONFIG_DIR, "tiny_synth_coco_R_50_FPN.yaml"), "--synth-root",
                   str(root)])
    err = capsys.readouterr().err
    assert rc == 2 and "synth_coco_val" in err
    assert str(root / "coco" / "annotations" / "instances_val2017.json") in err


def test_weights_required_and_must_exist(synth_root, tmp_path, capsys):
    moco = os.path.join(CONFIG_DIR, "synth_voc_R18_FPN_cpu_moco.yaml")
    assert cli.main(["transfer", "--config-file", moco, "--synth-root", synth_root]) == 2
    assert "MODEL.WEIGHTS is empty" in capsys.readouterr().err
    missing = str(tmp_path / "nope.pkl")
    assert cli.main(["transfer", "--config-file", moco, "--synth-root", synth_root, "MODEL.WEIGHTS",
                     missing]) == 2
    assert missing in capsys.readouterr().err
    # a URL whose fetch fails: the error says nothing is downloaded by mocobench. The port is bound
    # here and never listened on, so the connection is refused (a fixed port such as 9 may have a
    # listener on some machine)
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed_port.getsockname()[1]}/R-50.pkl"
        assert cli.main(["transfer", "--config-file", moco, "--synth-root", synth_root,
                         "MODEL.WEIGHTS", url]) == 2
    err = capsys.readouterr().err
    assert url in err and "downloads nothing" in err
    # --eval-only of random init: nothing to evaluate (SOLVER.MAX_ITER 1 only bounds a run that
    # should not start)
    assert cli.main(["transfer", "--config-file", moco, "--synth-root", synth_root, "--eval-only",
                     "OUTPUT_DIR", str(tmp_path / "eval"), "MOCOBENCH.REQUIRE_WEIGHTS", "False",
                     "SOLVER.MAX_ITER", "1"]) == 2
    assert capsys.readouterr().err == ("mocobench transfer: error: --eval-only needs MODEL.WEIGHTS "
                                       "(a trained model) or --resume (the trial's last "
                                       "checkpoint)\n")
    assert not (tmp_path / "eval").exists()


def test_cuda_device_without_cuda_is_a_usage_error(synth_root, capsys, monkeypatch):
    # a machine without CUDA, also on a GPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = cli.main(["transfer", "--config-file",
                   os.path.join(CONFIG_DIR, "synth_voc_R18_FPN_cpu.yaml"), "--synth-root",
                   synth_root, "MODEL.DEVICE", "cuda"])
    assert rc == 2 and capsys.readouterr().err == (
        "mocobench transfer: error: MODEL.DEVICE is 'cuda' but no CUDA device is available here; "
        "pass MODEL.DEVICE cpu (with --num-gpus N for N CPU processes)\n")


def test_console_logging_follows_the_current_stdout(monkeypatch, tmp_path):
    """detectron2's setup_logger is cached: a second transfer in the same process (a notebook, the
    README test after another test) must log to the stdout of now, not to a closed earlier one
    (which printed a '--- Logging error ---' traceback, or raised on the way)."""
    import io
    import logging

    from transfer import run

    def console_streams():
        return [h.stream for h in logging.getLogger("transfer").handlers
                if type(h) is logging.StreamHandler]

    # real files: a closed one refuses a flush, as pytest's closed capture does
    first, second = open(tmp_path / "first", "w"), open(tmp_path / "second", "w")
    monkeypatch.setattr("sys.stdout", first)
    run._setup_console_logging()
    assert console_streams() == [first]
    first.close()  # as pytest closes a test's capture, or a notebook replaces its stdout
    monkeypatch.setattr("sys.stdout", second)
    run._setup_console_logging()
    assert console_streams() == [second]
    errors = io.StringIO()
    monkeypatch.setattr("sys.stderr", errors)
    logging.getLogger("transfer").info("after the stream changed")
    second.close()
    monkeypatch.undo()
    run._setup_console_logging()  # back to this process's stdout for the tests after this one
    assert "after the stream changed" in (tmp_path / "second").read_text()
    assert errors.getvalue() == ""
