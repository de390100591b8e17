"""Linear protocol on a frozen MoCo backbone: end-to-end on a tiny ImageFolder, and its sanity
check."""
import json
import os
import shlex

import cv2
import numpy as np
import pytest
import torch
import torchvision
from conftest import signal_on_step
from scipy.stats import binom

from mocobench import cli
from mocobench.utils.errors import UsageError
from pretrain import engine, lincls
from pretrain.lincls import (
    BackboneChangedError,
    LinearTask,
    build_linear_model,
    check_backbone_unchanged,
    extract_backbone,
    learning_rate,
)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def make_image_folder(root, per_class_train=6, per_class_val=3, size=32, seed=0):
    """ROOT/{train,val}/<colour>/*.jpg: a coloured disc or square on a grey noisy background."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class_train), ("val", per_class_val)):
        for name, colour in COLOURS.items():
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(count):
                img = rng.integers(90, 140, (size, size + 8, 3)).astype(np.uint8)
                centre = (int(rng.integers(10, size - 2)), int(rng.integers(10, size - 10)))
                if i % 2:
                    cv2.circle(img, centre, 8, colour, -1)
                else:
                    cv2.rectangle(img, (centre[0] - 7, centre[1] - 7),
                                  (centre[0] + 7, centre[1] + 7), colour, -1)
                cv2.imwrite(os.path.join(root, split, name, f"{name}_{i}.jpg"), img[..., ::-1])


def fake_moco_checkpoint(path, layout="v2", arch="resnet18", seed=0):
    """A checkpoint laid out like the official ones, from a randomly initialised (BN stats
    perturbed) ResNet."""
    torch.manual_seed(seed)
    encoder = torchvision.models.__dict__[arch](num_classes=128)
    for module in encoder.modules():
        # non-trivial running stats, so a BN update would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = encoder.state_dict()
    if layout == "v2":  # main_moco.py: encoder_q / encoder_k / queue, DDP prefix
        state_dict = {f"module.encoder_q.{k}": v for k, v in state.items()}
        # (the rest left out: speed)
        state_dict["module.encoder_k.conv1.weight"] = state["conv1.weight"].clone()
        state_dict["module.queue"] = torch.randn(128, 64)
        state_dict["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    else:  # moco-v3: base_encoder with an MLP head in fc, momentum_encoder, predictor
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        state.update({"fc.0.weight": torch.randn(64, 512), "fc.1.weight": torch.ones(64),
                      "fc.3.weight": torch.randn(32, 64)})
        state_dict = {f"module.base_encoder.{k}": v for k, v in state.items()}
        state_dict["module.predictor.0.weight"] = torch.randn(64, 32)
    torch.save({"epoch": 200, "arch": arch, "state_dict": state_dict, "optimizer": {}}, path)
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lincls_data"))
    make_image_folder(root, per_class_train=12, per_class_val=8)
    return root


@pytest.fixture(scope="module")
def v2_checkpoint(tmp_path_factory):
    """(path, backbone state dict) of an official-layout MoCo v2 resnet18 checkpoint."""
    path = str(tmp_path_factory.mktemp("ckpt") / "checkpoint_0199.pth.tar")
    return path, fake_moco_checkpoint(path, layout="v2")


def test_lincls_end_to_end_v2_checkpoint(tiny_data, v2_checkpoint, tmp_path, capsys):
    ckpt = v2_checkpoint[0]
    out = str(tmp_path / "out")
    rc = cli.main(["lincls", "--data", tiny_data, "--pretrained", ckpt, "--output", out,
                   "--epochs", "3", "--batch-size", "6", "--size", "32", "--workers", "0",
                   "--lr", "0.5", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "recipe v1v2" in printed and "sanity check passed" in printed and "top-5" in printed
    results = json.load(open(os.path.join(out, "lincls_results.json")))
    assert results["recipe"] == "v1v2" and results["arch"] == "resnet18" and \
        results["num_classes"] == 3
    assert results["epochs"] == 3 and results["lr"] == 0.5 and results["schedule"] == [60, 80]
    # 24 val images, 3 classes: P(hits or more | guessing) = binomial(24, 1/3) tail < 1e-3 needs
    # >= 16 hits (p = 8.6e-4; the seeded run has 20). The colours are separable even on a random
    # backbone, so a classifier that learns gets there. (top-5 is not checked: with 3 classes it is
    # 100 % whatever the model does.)
    hits = round(results["top1"] * 24 / 100)
    assert binom.sf(hits - 1, 24, 1 / 3) < 1e-3, results
    assert results["backbone_unchanged"] is True
    lines = open(os.path.join(out, "metrics.json")).read().splitlines()
    records = [json.loads(line) for line in lines]
    # one per epoch; the others are iteration records
    evaluations = [r for r in records if "val_top1" in r]
    # 36 training images in batches of 6 (the last batch is kept: drop_last False, as officially)
    assert [r["epoch"] for r in evaluations] == [1, 2, 3] and \
        [r["iteration"] for r in evaluations] == [6, 12, 18]
    assert all(np.isfinite(r["train_loss"]) and 0 <= r["val_top1"] <= 100 for r in evaluations)
    # metrics.json rounds
    assert evaluations[-1]["val_top1"] == pytest.approx(results["top1"], abs=1e-6)


def test_lincls_v3_checkpoint_auto_recipe(tiny_data, tmp_path, capsys):
    ckpt = str(tmp_path / "v3.pth.tar")
    fake_moco_checkpoint(ckpt, layout="v3")
    out = str(tmp_path / "out")
    assert lincls.main(["--data", tiny_data, "--pretrained", ckpt, "--output", out, "--epochs", "1",
                        "--batch-size", "8", "--size", "32", "--workers", "0",
                        "--device", "cpu"]) == 0
    results = json.load(open(os.path.join(out, "lincls_results.json")))
    assert results["recipe"] == "v3" and results["schedule"] == "cosine"
    assert results["lr"] == pytest.approx(0.1 * 8 / 256)  # v3 scales lr by batch / 256


def test_extract_backbone_layouts(tmp_path):
    for layout, recipe, prefix in [("v2", "v1v2", "module.encoder_q."),
                                   ("v3", "v3", "module.base_encoder.")]:
        path = str(tmp_path / f"{layout}.pth")
        expected = fake_moco_checkpoint(path, layout=layout)
        backbone, got_recipe, got_prefix = extract_backbone(torch.load(path, weights_only=True),
                                                            path)
        assert (got_recipe, got_prefix) == (recipe, prefix)
        assert set(backbone) == set(expected) and not any(k.startswith("fc") for k in backbone)
    with pytest.raises(UsageError, match=r"not a MoCo checkpoint.*encoder_q"):
        extract_backbone({"state_dict": {"conv1.weight": torch.zeros(1)}}, "x.pth")


def test_bad_checkpoints_exit_2(tiny_data, v2_checkpoint, tmp_path, capsys):
    not_moco = str(tmp_path / "plain.pth")
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}, "arch": "resnet18"},
               not_moco)
    args = ["--data", tiny_data, "--output", str(tmp_path / "o"), "--epochs", "1", "--workers", "0",
            "--device", "cpu"]
    assert cli.main(["lincls", "--pretrained", not_moco, *args]) == 2
    assert "not a MoCo checkpoint" in capsys.readouterr().err
    wrong_shape = str(tmp_path / "wrong_shape.pth")
    torch.save({"state_dict": {"module.encoder_q.conv1.weight": torch.zeros(64, 3, 3, 3)},
                "arch": "resnet18"}, wrong_shape)
    assert cli.main(["lincls", "--pretrained", wrong_shape, *args]) == 2
    assert "do not fit resnet18" in capsys.readouterr().err
    partial = str(tmp_path / "partial.pth")
    torch.save({"state_dict": {"module.encoder_q.conv1.weight": torch.zeros(64, 3, 7, 7)},
                "arch": "resnet18"}, partial)
    assert cli.main(["lincls", "--pretrained", partial, *args]) == 2
    assert "do not match resnet18: missing ['bn1.weight'" in capsys.readouterr().err
    vit = str(tmp_path / "vit.pth")
    torch.save({"state_dict": {"module.base_encoder.cls_token": torch.zeros(1)},
                "arch": "vit_small"}, vit)
    assert cli.main(["lincls", "--pretrained", vit, *args]) == 2
    assert "arch 'vit_small' is not supported" in capsys.readouterr().err
    assert cli.main(["lincls", "--pretrained", str(tmp_path / "missing.pth"), *args]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["lincls", "--pretrained", v2_checkpoint[0], "--data", str(tmp_path / "nodata"),
                     "--output", str(tmp_path / "o")]) == 2
    assert "nodata/train" in capsys.readouterr().err


def _linear_task(checkpoint, tmp_path):
    """The task `mocobench lincls` trains, built from its flags."""
    args = lincls.build_parser().parse_args(["--data", str(tmp_path), "--pretrained", checkpoint,
                                             "--output", str(tmp_path / "out"), "--lr", "1.0"])
    return LinearTask(*lincls.build_config(args))


def test_frozen_model_trains_fc_only_and_keeps_bn_stats(v2_checkpoint, tmp_path):
    path, backbone = v2_checkpoint
    model = build_linear_model("resnet18", 3, backbone)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    assert float(model.fc.bias.detach().abs().max()) == 0.0 and \
        0.005 < float(model.fc.weight.detach().std()) < 0.015
    check_backbone_unchanged(model.state_dict(), backbone)  # freshly loaded: identical
    fc_before = model.fc.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    # uint8 images, as the data loader's workers send them (the step normalises)
    loader = [(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g),
               torch.tensor([0, 1, 2, 0])) for _ in range(2)]
    task = _linear_task(path, tmp_path)
    optimizer = task.build_optimizer(model, task.lr_at(0.0))
    assert [p.shape for g in optimizer.param_groups for p in g["params"]] == [(3, 512), (3,)]
    task.train_mode(model)  # what the engine's loop does for the linear task: eval mode, then steps
    for batch in loader:
        loss, _, _ = task.step(model, batch, torch.device("cpu"), 0.0, torch.contiguous_format)
        engine.optimization_step(loss, optimizer, None)
    assert not torch.equal(model.fc.weight, fc_before)  # the classifier learned
    assert task.totals[2] == 8  # the epoch's training statistics counted both batches
    check_backbone_unchanged(model.state_dict(), backbone)  # BN running stats included

    # The sanity check catches a BN left in train mode: it updates running statistics without any
    # gradient.
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(BackboneChangedError, match=r"bn1\.running_mean"):
        check_backbone_unchanged(model.state_dict(), backbone)
    # ... and a single weight nudged mid-run.
    model.load_state_dict(backbone, strict=False)
    check_backbone_unchanged(model.state_dict(), backbone)
    with torch.no_grad():
        model.layer3[1].conv2.weight[0, 0, 0, 0] += 1e-3
    with pytest.raises(BackboneChangedError,
                       match=r"1 frozen backbone tensor.*layer3\.1\.conv2\.weight"):
        check_backbone_unchanged(model.state_dict(), backbone)


def test_learning_rate_schedules():
    assert [learning_rate(30.0, e, 100, (60, 80)) for e in (0, 59, 60, 79, 80, 99)] == \
        pytest.approx([30, 30, 3, 3, 0.3, 0.3])
    assert learning_rate(0.4, 0, 90, ()) == pytest.approx(0.4)
    assert learning_rate(0.4, 45, 90, ()) == pytest.approx(0.2)


def test_lincls_sigterm_mid_epoch_exits_143_and_resumes_to_the_same_head(
        tiny_data, v2_checkpoint, tmp_path, monkeypatch, capsys):
    """A real SIGTERM to this process during iteration 5 (epoch 2): the engine finishes the
    iteration, writes an exact checkpoint and exits 143 (a scheduler requeues); `--resume auto` then
    ends with the head, BN buffers, optimizer state and results of an uninterrupted run, bit for
    bit."""
    import signal

    args = ["--data", tiny_data, "--pretrained", v2_checkpoint[0], "--epochs", "2",
            "--batch-size", "12", "--size", "32", "--workers", "0", "--lr", "0.5",
            "--device", "cpu"]
    full, stopped = str(tmp_path / "full"), str(tmp_path / "stopped")
    assert cli.main(["lincls", *args, "--output", full]) == 0
    real_step = engine.optimization_step
    monkeypatch.setattr(engine, "optimization_step", signal_on_step(5, signal.SIGTERM))
    assert cli.main(["lincls", *args, "--output", stopped]) == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after iteration 2/3 of epoch 2" in err and \
        "checkpoint_iter_00000005" in err
    resume_cmd = shlex.split(err.split("resume with: ", 1)[1].strip())
    assert resume_cmd[:2] == ["mocobench", "lincls"] and resume_cmd[-2:] == ["--resume", "auto"]
    assert not os.path.exists(os.path.join(stopped, "lincls_results.json"))
    assert cli.main(["lincls", *args, "--output", stopped]) == 2  # a second run is refused ...
    assert "already holds a linear evaluation" in capsys.readouterr().err
    monkeypatch.setattr(engine, "optimization_step", real_step)
    assert cli.main(resume_cmd[1:]) == 0  # ... the printed command continues it
    assert "resumed from" in capsys.readouterr().out
    a = torch.load(os.path.join(full, "checkpoint_0001.pth.tar"), weights_only=True)
    b = torch.load(os.path.join(stopped, "checkpoint_0001.pth.tar"), weights_only=True)
    assert a["iteration"] == b["iteration"] == 6 and set(a["state_dict"]) == set(b["state_dict"])
    for key in a["state_dict"]:  # fc and the frozen backbone with its BN buffers
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    ra, rb = (json.load(open(os.path.join(d, "lincls_results.json"))) for d in (full, stopped))
    assert ra == rb  # top-1, top-5, best top-1 (kept across the resume) and the rest
    assert [n for n in os.listdir(stopped) if n.endswith(".pth.tar")] == ["checkpoint_0001.pth.tar"]
