"""Supervised baseline (`mocobench supervised`): it learns, its checkpoint is a plain torchvision
ResNet that `convert` detects and verifies, val accuracy is what the checkpoint computes, exact
resume after SIGKILL."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import torchvision
from conftest import assert_optimizer_states_equal, signal_on_step

from mocobench import cli
from mocobench.utils.errors import UsageError
from mocobench.utils.fileio import atomic_torch_save, load_checkpoint
from pretrain import supervised
from pretrain.augment import build_eval_transform, normalize
from pretrain.data import SafeImageFolder
from synth.imagenet import make_imagenet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUP_CFG = os.path.join(REPO, "configs", "pretrain", "synth_R18_cpu_supervised.yaml")


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    make_imagenet(str(out), classes=4, images_per_class=8, val_per_class=2, size=32, seed=0)
    return os.path.join(str(out), "imagenet")


def make_colour_folder(root, per_class, val_per_class, size=32, seed=0):
    """An easy ImageFolder: 'blue' and 'red' noisy images (colour survives crop and flip)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for name, rgb in (("blue", (40, 60, 200)), ("red", (200, 50, 40))):
            os.makedirs(os.path.join(root, split, name))
            for i in range(n):
                img = np.clip(np.array(rgb) + rng.normal(0, 40, (size, size, 3)),
                              0, 255).astype(np.uint8)
                cv2.imwrite(os.path.join(root, split, name, f"{i:03d}.png"), img[:, :, ::-1])
    return root


def opts(root, out_dir, **extra):
    values = {"DATA.ROOT": root, "OUTPUT_DIR": out_dir, "SOLVER.EPOCHS": 2, "SOLVER.BATCH_SIZE": 8,
              "INPUT.SIZE": 32, "DATALOADER.NUM_WORKERS": 0, "LOG_PERIOD": 2,
              # CPU is what these test (bit-exact resume; CUDA picks kernels per run)
              "DEVICE": "cpu", **extra}
    return [str(x) for kv in values.items() for x in kv]


def test_shipped_config_matches_the_moco_budget():
    from pretrain.config import load_config

    moco = load_config(os.path.join(REPO, "configs", "pretrain", "synth_R18_cpu.yaml"))
    sup = load_config(SUP_CFG)
    for key in ("MODEL.ARCH", "SOLVER.EPOCHS", "SOLVER.BATCH_SIZE", "INPUT.SIZE", "DATA.ROOT"):
        a, b = moco, sup
        for part in key.split("."):
            a, b = a[part], b[part]
        assert a == b, key
    assert sup.SOLVER.SCHEDULE == "cosine" and sup.OUTPUT_DIR != moco.OUTPUT_DIR
    # the MoCo queue constraint (MOCO.K divisible by the batch) does not apply to the supervised
    # baseline
    assert load_config(SUP_CFG, ["SOLVER.BATCH_SIZE", "48"], moco=False).SOLVER.BATCH_SIZE == 48
    with pytest.raises(UsageError, match="MOCO.K = 1024 must be divisible"):
        load_config(SUP_CFG, ["SOLVER.BATCH_SIZE", "48"])


def test_learns_an_easy_task_and_writes_a_verified_torchvision_checkpoint(tmp_path):
    root = make_colour_folder(str(tmp_path / "colour"), per_class=32, val_per_class=8)
    out = str(tmp_path / "run")
    assert supervised.main(["--config-file", SUP_CFG,
                            *opts(root, out, **{"SOLVER.BATCH_SIZE": 16})]) == 0

    records = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_top1" in r]
    assert {"iteration", "epoch", "loss", "acc1", "lr", "img_per_s", "data_time"} <= set(train[-1])
    # 64 images / 16, 2 epochs
    assert [r["epoch"] for r in val] == [1, 2] and train[-1]["iteration"] == 8
    assert train[-1]["loss"] < train[0]["loss"] - 0.2, [r["loss"] for r in train]
    assert train[-1]["acc1"] >= 80.0, [r["acc1"] for r in train]  # 2 classes: chance is 50 %

    # retention: with CHECKPOINT_PERIOD 5 the epoch-1 checkpoint was only a resume point
    assert sorted(f for f in os.listdir(out) if f.startswith("checkpoint_")) == \
        ["checkpoint_0001.pth.tar"]
    assert open(os.path.join(out, "last_checkpoint")).read().strip() == "checkpoint_0001.pth.tar"
    path = os.path.join(out, "checkpoint_0001.pth.tar")
    ckpt = load_checkpoint(path)  # weights_only=True
    assert {"epoch", "arch", "state_dict", "optimizer", "iteration", "rng", "config"} <= set(ckpt)
    assert (ckpt["epoch"], ckpt["arch"], ckpt["iteration"]) == (2, "resnet18", 8)

    # plain torchvision keys: a torchvision resnet18 loads it strictly ...
    model = torchvision.models.resnet18(num_classes=2)
    assert list(ckpt["state_dict"]) == list(model.state_dict())
    model.load_state_dict(ckpt["state_dict"])
    # ... and computes the val accuracy the run logged
    val_set = SafeImageFolder(os.path.join(root, "val"), build_eval_transform(32))
    model.eval()
    with torch.no_grad():
        images = normalize(torch.stack([val_set[i][0] for i in range(len(val_set))]))
        correct = (model(images).argmax(1) == torch.tensor(val_set.targets)).sum().item()
    assert val[-1]["val_top1"] == pytest.approx(100.0 * correct / len(val_set))

    from convert import convert_checkpoint

    # source auto; raises if verification fails
    report = convert_checkpoint(path, str(tmp_path / "sup.pkl"))
    assert report.source == "torchvision" and report.detected and report.arch.depth == 18
    assert report.verified == 100 and report.max_rel_error < 1e-4 and \
        os.path.isfile(tmp_path / "sup.pkl")


def _run(args):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mocobench.cli", "supervised",
                           "--config-file", SUP_CFG, *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def test_exact_resume_after_sigkill(tiny_imagenet, tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    proc = _run(opts(tiny_imagenet, full))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run(opts(tiny_imagenet, killed, **{"DEBUG.SIGKILL_AFTER_EPOCH": 1}))
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert open(os.path.join(killed, "last_checkpoint")).read().strip() == "checkpoint_0000.pth.tar"
    assert not os.path.exists(os.path.join(killed, "checkpoint_0001.pth.tar"))
    proc = _run(["--resume", "auto", *opts(tiny_imagenet, killed)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "epoch 2: val top-1" in proc.stdout

    a = load_checkpoint(os.path.join(full, "checkpoint_0001.pth.tar"))
    b = load_checkpoint(os.path.join(killed, "checkpoint_0001.pth.tar"))
    assert a["iteration"] == b["iteration"] == 8  # 32 images / 8 per batch, 2 epochs
    assert a["state_dict"]["fc.weight"].shape == (4, 512) and \
        not any(k.startswith("module.") for k in a["state_dict"])
    assert list(a["state_dict"]) == list(b["state_dict"])
    for key in a["state_dict"]:  # bit-exact: weights and BN buffers
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    # every parameter's momentum buffer, same keys
    assert_optimizer_states_equal(a["optimizer"], b["optimizer"])
    # the resumed run's epoch-2 val accuracy is the uninterrupted run's
    val = [[json.loads(line)["val_top1"] for line in open(os.path.join(d, "metrics.json"))
            if "val_top1" in line]
           for d in (full, killed)]
    assert val[0] == val[1] and len(val[0]) == 2


def test_bad_input_is_a_clear_error(tiny_imagenet, tmp_path, capsys):
    with pytest.raises(UsageError, match=r"nowhere/train.*does not exist"):
        supervised.main(["--config-file", SUP_CFG,
                         *opts(str(tmp_path / "nowhere"), str(tmp_path / "a"))])
    # through the `mocobench` dispatcher: exit code 2, the key named, no traceback
    assert cli.main(["supervised", "--config-file", SUP_CFG, "SOLVER.NOPE", "1"]) == 2
    err = capsys.readouterr().err
    assert "mocobench supervised: error" in err and "SOLVER.NOPE" in err
    # resuming a 2-class checkpoint on 4-class data names the file and the mismatch
    bad = str(tmp_path / "two_classes.pth.tar")
    atomic_torch_save({"epoch": 1,
                       "state_dict": torchvision.models.resnet18(num_classes=2).state_dict(),
                       "optimizer": {}}, bad)
    with pytest.raises(UsageError,
                       match=r"two_classes.pth.tar: state_dict does not match the model"):
        supervised.main(["--config-file", SUP_CFG, "--resume", bad,
                         *opts(tiny_imagenet, str(tmp_path / "b"))])


def test_a_step_that_draws_torch_rng_resumes_bit_exactly_after_a_mid_epoch_stop(
        tiny_imagenet, tmp_path, monkeypatch, capsys):
    """The supervised step draws no torch random numbers of its own; here it does (a random factor
    on the loss, so the draws reach the gradients): stopped by a real SIGTERM during iteration 3
    and resumed, the run must restore the torch RNG state and end where the uninterrupted one
    does, bit for bit."""
    import signal

    from pretrain import engine

    real_step, real_optimization_step = supervised.SupervisedTask.step, engine.optimization_step

    def step_drawing_torch_rng(self, *args):
        loss, logits, target = real_step(self, *args)
        return loss * (1.0 + 1e-3 * torch.rand(())), logits, target

    monkeypatch.setattr(supervised.SupervisedTask, "step", step_drawing_torch_rng)
    full, stopped = str(tmp_path / "full"), str(tmp_path / "stopped")
    assert cli.main(["supervised", "--config-file", SUP_CFG, *opts(tiny_imagenet, full)]) == 0
    monkeypatch.setattr(engine, "optimization_step", signal_on_step(3, signal.SIGTERM))
    assert cli.main(["supervised", "--config-file", SUP_CFG, *opts(tiny_imagenet, stopped)]) == 143
    assert "stopped by SIGTERM after iteration 3/4 of epoch 1" in capsys.readouterr().err
    assert open(os.path.join(stopped, "last_checkpoint")).read() == \
        "checkpoint_iter_00000003.pth.tar"
    monkeypatch.setattr(engine, "optimization_step", real_optimization_step)
    assert cli.main(["supervised", "--config-file", SUP_CFG, "--resume", "auto",
                     *opts(tiny_imagenet, stopped)]) == 0
    assert "iteration 4/4 of it (iteration 3)" in capsys.readouterr().out

    a = load_checkpoint(os.path.join(full, "checkpoint_0001.pth.tar"))
    b = load_checkpoint(os.path.join(stopped, "checkpoint_0001.pth.tar"))
    assert a["iteration"] == b["iteration"] == 8
    assert list(a["state_dict"]) == list(b["state_dict"])
    for key in a["state_dict"]:  # weights and BN buffers
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert_optimizer_states_equal(a["optimizer"], b["optimizer"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])  # the same 8 draws, no more


def test_uint8_images_train_and_evaluate_as_the_float_worker_path_did(tiny_imagenet, tmp_path,
                                                                      monkeypatch):
    """Normalisation moved from the workers to the device, not changed: an epoch of supervised
    steps and the val evaluation give the same losses, val loss and weights, bit for bit, as the
    former path (workers send float32 normalised images)."""
    from conftest import float_worker_views

    from pretrain import augment

    def run(out):
        assert supervised.main(["--config-file", SUP_CFG,
                                *opts(tiny_imagenet, out, **{"SOLVER.EPOCHS": 1,
                                                             "LOG_PERIOD": 1})]) == 0
        records = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
        return records, load_checkpoint(os.path.join(out, "checkpoint_0000.pth.tar"))

    records, checkpoint = run(str(tmp_path / "uint8"))
    monkeypatch.setattr(augment, "to_chw_tensor", float_worker_views)
    monkeypatch.setattr(supervised, "normalize", lambda images: images)
    former_records, former = run(str(tmp_path / "float"))
    scalars = lambda rs: [(r.get("loss"), r.get("val_loss")) for r in rs]  # noqa: E731
    assert len([r for r in records if "loss" in r]) == 4
    assert len([r for r in records if "val_loss" in r]) == 1
    assert scalars(records) == scalars(former_records)
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(value, former["state_dict"][key]), key
