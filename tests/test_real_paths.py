"""Our own writers feed our own readers: checkpoints from `mocobench pretrain` (MoCo v3) and
`mocobench supervised` go through `mocobench convert` and `mocobench lincls` as a user would pass
them, not hand-built look-alikes.

(The convert tests with official-layout inputs are in tests/test_convert*.py.)
"""
import json
import os

import pytest
import torch

from mocobench import cli
from mocobench.utils.fileio import load_checkpoint, safe_unpickle
from synth.imagenet import make_imagenet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V3_CFG = os.path.join(REPO, "configs", "pretrain", "moco_v3_R50.yaml")
SUP_CFG = os.path.join(REPO, "configs", "pretrain", "synth_R18_cpu_supervised.yaml")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """A 4-class generated ImageFolder (16 train, 4 val images per class); read only by the
    tests."""
    out = tmp_path_factory.mktemp("real_paths")
    make_imagenet(str(out), classes=4, images_per_class=16, val_per_class=4, size=40, seed=0)
    return os.path.join(str(out), "imagenet")


def _opts(**kv):
    return [str(x) for item in kv.items() for x in item]


@pytest.mark.slow
def test_our_moco_v3_checkpoint_converts_from_the_base_encoder_and_feeds_lincls(
        imagenet, tmp_path, capsys):
    out = str(tmp_path / "v3")
    # the shipped v3 recipe (LARS, SyncBN-less single process, projector + predictor), shrunk:
    # ResNet-18, 32 px, 4 iterations of 16 images
    assert cli.main(["pretrain", "--config-file", V3_CFG, *_opts(**{
        "DATA.ROOT": imagenet, "OUTPUT_DIR": out, "MODEL.ARCH": "resnet18", "INPUT.SIZE": 32,
        "SOLVER.BATCH_SIZE": 16, "SOLVER.EPOCHS": 1, "SOLVER.WARMUP_EPOCHS": 0, "MOCO.DIM": 16,
        "MOCO.MLP_DIM": 32, "DATALOADER.NUM_WORKERS": 0, "KNN.PERIOD": 0, "DEVICE": "cpu"})]) == 0
    ckpt = os.path.join(out, "checkpoint_0000.pth.tar")
    state = load_checkpoint(ckpt)["state_dict"]
    base, momentum = (state["module.base_encoder.conv1.weight"],
                      state["module.momentum_encoder.conv1.weight"])
    assert not torch.equal(base, momentum)  # 4 steps apart: converting the wrong encoder would show

    pkl = str(tmp_path / "v3.pkl")
    # verified: detectron2 reproduces torchvision's res2..res5
    assert cli.main(["convert", ckpt, pkl]) == 0
    assert "moco" in capsys.readouterr().out.lower()
    converted = safe_unpickle(pkl)["model"]
    # the backbone MoCo v3 transfers is the base encoder (official moco-v3 convert_to_deit.py:
    # base_encoder)
    assert torch.equal(torch.as_tensor(converted["stem.conv1.weight"]), base)
    assert torch.equal(torch.as_tensor(converted["res5.1.conv2.norm.running_var"]),
                       state["module.base_encoder.layer4.1.bn2.running_var"])
    assert not any("fc" in k or "predictor" in k for k in converted)

    lin = str(tmp_path / "lincls")
    assert cli.main(["lincls", "--data", imagenet, "--pretrained", ckpt, "--output", lin,
                     "--epochs", "1", "--batch-size", "16", "--size", "32", "--workers", "0",
                     "--device", "cpu"]) == 0
    results = json.load(open(os.path.join(lin, "lincls_results.json")))
    assert results["recipe"] == "v3" and results["arch"] == "resnet18" and \
        results["num_classes"] == 4
    assert results["backbone_unchanged"] is True


@pytest.mark.slow
def test_our_supervised_checkpoint_converts_through_the_command(imagenet, tmp_path, capsys):
    out = str(tmp_path / "sup")
    assert cli.main(["supervised", "--config-file", SUP_CFG, *_opts(**{
        "DATA.ROOT": imagenet, "OUTPUT_DIR": out, "SOLVER.BATCH_SIZE": 16, "SOLVER.EPOCHS": 1,
        "INPUT.SIZE": 32, "DATALOADER.NUM_WORKERS": 0, "KNN.PERIOD": 0, "DEVICE": "cpu"})]) == 0
    ckpt = os.path.join(out, "checkpoint_0000.pth.tar")
    trained = load_checkpoint(ckpt)["state_dict"]
    pkl = str(tmp_path / "sup.pkl")
    assert cli.main(["convert", ckpt, pkl]) == 0
    assert "torchvision" in capsys.readouterr().out
    converted = safe_unpickle(pkl)["model"]
    assert torch.equal(torch.as_tensor(converted["stem.conv1.weight"]), trained["conv1.weight"])
    assert torch.equal(torch.as_tensor(converted["res4.0.shortcut.norm.running_mean"]),
                       trained["layer3.0.downsample.1.running_mean"])
    assert not any(k.startswith("fc") for k in converted)


def _pretrain_rank(rank, world, init_method, argv):
    """One process of a multi-process `mocobench pretrain`: the process group torchrun would set up
    (here through a file rendezvous), then the command's own main."""
    import datetime

    import torch.distributed as dist

    from pretrain import train as train_mod

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    assert train_mod.main(argv) == 0  # destroys the process group on its way out


@pytest.mark.slow
def test_two_process_moco_v2_pretraining_through_the_command(imagenet, tmp_path, rendezvous):
    import torch.multiprocessing as mp

    out = str(tmp_path / "ddp")
    config = os.path.join(REPO, "configs", "pretrain", "synth_R18_cpu.yaml")
    argv = ["--config-file", config, *_opts(**{
        "DATA.ROOT": imagenet, "OUTPUT_DIR": out, "SOLVER.EPOCHS": 1, "SOLVER.BATCH_SIZE": 16,
        "MOCO.K": 48, "INPUT.SIZE": 32, "DATALOADER.NUM_WORKERS": 0, "KNN.PERIOD": 0,
        "LOG_PERIOD": 1, "DEVICE": "cpu"})]
    mp.spawn(_pretrain_rank, args=(2, rendezvous, argv), nprocs=2, join=True)
    log = open(os.path.join(out, "log.txt")).read()
    assert "world size 2 (2 per node) on cpu; global batch 16 = 8 per process" in log
    steps = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    # 64 images / global batch 16, rank 0 writes
    assert [r["iteration"] for r in steps] == [1, 2, 3, 4]
    ckpt = load_checkpoint(os.path.join(out, "checkpoint_0000.pth.tar"))
    assert ckpt["iteration"] == 4
    # the queue advanced by the global batch each step (both ranks' keys): 4 x 16 = 64
    # -> 64 % 48 = 16 (a rank's own 8 keys per step would leave it at 32)
    state = ckpt["state_dict"]
    assert int(state["module.queue_ptr"]) == 16
    # the DDP wrapper is unwrapped
    assert not any(k.startswith("module.encoder_q.module.") for k in state)
    assert cli.main(["convert", os.path.join(out, "checkpoint_0000.pth.tar"),
                     str(tmp_path / "ddp.pkl")]) == 0
