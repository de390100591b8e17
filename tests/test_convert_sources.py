"""Every layout `mocobench convert` reads, built the way each project saves it, around a random
ResNet.

lightly and timm checkpoints come from the real packages (test extras); the others follow the key
structure of each project's code (cited in convert/sources.py next to its reader). Each conversion
must carry every trunk tensor unchanged, verify (detectron2 res2..res5 == torchvision's, <= 1e-5
relative), and name what it dropped and why.
"""
import argparse
import copy
import functools
import hashlib
import json
import pickle
import shutil
import sys

import numpy as np
import pytest
import torch
import torchvision
from conftest import random_resnet_state

from convert import convert_checkpoint
from convert.rename import detectron2_name
from mocobench.cli import main as mocobench_main
from mocobench.utils import d2compat  # noqa: F401  (before detectron2)
from mocobench.utils.errors import UsageError
from mocobench.utils.fileio import safe_unpickle

# conv weights + 4 BN tensors per BN (test_convert.py)
TRUNK_TENSORS = {"resnet18": 100, "resnet50": 265}


@functools.cache
def _random_trunk(arch, seed):
    return {k: v for k, v in random_resnet_state(arch, seed).items() if not k.startswith("fc.")}


@pytest.fixture
def trunk():
    """Factory: the random trunk state (no fc) of a torchvision arch; built once per (arch, seed)
    per session."""
    def make(arch="resnet18", seed=0):
        return {k: v.clone() for k, v in _random_trunk(arch, seed).items()}
    return make


def _prefixed(prefix, state):
    return {prefix + k: v for k, v in state.items()}


def _perturbed(state):
    """A second trunk of the same shape (a momentum encoder / student): never the one to convert."""
    return {k: v * 0.9 if v.is_floating_point() else v.clone() for k, v in state.items()}


def _mlp(prefix, dims, bn=True):
    """Linear(/BN1d) stack as the projectors of these projects: {prefix}0.weight,
    {prefix}1.running_mean ..."""
    state, index = {}, 0
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        state[f"{prefix}{index}.weight"] = torch.randn(d_out, d_in)
        if bn:
            bn_prefix = f"{prefix}{index + 1}."
            state |= {bn_prefix + "weight": torch.ones(d_out),
                      bn_prefix + "bias": torch.zeros(d_out),
                      bn_prefix + "running_mean": torch.zeros(d_out),
                      bn_prefix + "running_var": torch.ones(d_out),
                      bn_prefix + "num_batches_tracked": torch.tensor(5)}
        index += 3
    return state


def _optimizer():
    return {"state": {0: {"momentum_buffer": torch.zeros(3)}},
            "param_groups": [{"lr": 0.1, "params": [0]}]}


# -- the layouts, each as its project writes it ----------------------------------------------------

def vissl_checkpoint(t):
    # classy_state_dict -> base_model -> model -> {trunk: _feature_blocks.*, heads}; SwAV heads as
    # an example
    heads = _mlp("0.projection_head.", [512, 64, 32]) \
        | {"0.prototypes0.weight": torch.randn(30, 32)}
    return {"phase_idx": 3, "iteration": 400, "train_phase_idx": 3,
            "classy_state_dict": {
                "train": True,
                "base_model": {"model": {"trunk": _prefixed("_feature_blocks.", t), "heads": heads},
                               "meta": {}},
                "optimizer": _optimizer(), "loss": {"queue": torch.zeros(2, 8)}}}


def dino_checkpoint(t):
    # main_dino.py: student/teacher = MultiCropWrapper(backbone with fc = Identity, DINOHead),
    # DDP-wrapped (BN)
    def network(state):
        head = _mlp("module.head.mlp.", [2048 if len(state) > 200 else 512, 64, 32], bn=False)
        head |= {"module.head.last_layer.weight_g": torch.ones(100, 1),
                 "module.head.last_layer.weight_v": torch.randn(100, 32)}
        return _prefixed("module.backbone.", state) | head
    return {"student": network(_perturbed(t)), "teacher": network(t), "optimizer": _optimizer(),
            "epoch": 100, "args": argparse.Namespace(arch="resnet50", out_dim=60000, lr=0.03),
            "dino_loss": {"center": torch.zeros(1, 100)}}


def pixpro_checkpoint(t):
    # main_pretrain.py save_checkpoint: {"opt": args, "model": DDP(PixPro).state_dict(),
    # "optimizer", ...}
    def proj(prefix):
        return {prefix + "linear1.weight": torch.randn(64, 512, 1, 1),
                prefix + "linear1.bias": torch.zeros(64), prefix + "bn1.weight": torch.ones(64),
                prefix + "bn1.bias": torch.zeros(64), prefix + "bn1.running_mean": torch.zeros(64),
                prefix + "bn1.running_var": torch.ones(64),
                prefix + "bn1.num_batches_tracked": torch.tensor(3),
                prefix + "linear2.weight": torch.randn(32, 64, 1, 1),
                prefix + "linear2.bias": torch.zeros(32)}
    model = _prefixed("module.encoder.", t) | _prefixed("module.encoder_k.", _perturbed(t))
    model |= proj("module.projector.") | proj("module.projector_k.")
    model |= {"module.value_transform.weight": torch.randn(32, 32, 1, 1),
              "module.value_transform.bias": torch.zeros(32)}
    return {"opt": argparse.Namespace(arch="resnet50", pixpro_p=2.0), "model": model,
            "optimizer": _optimizer(), "scheduler": {"last_epoch": 400}, "epoch": 400}


def swav_checkpoint(t):
    # swav_800ep_pretrain.pth.tar: DDP(ResNet with projection_head and prototypes).state_dict()
    return (_prefixed("module.", t) | _mlp("module.projection_head.", [512, 64, 32])
            | {"module.prototypes.weight": torch.randn(30, 32)})


def barlowtwins_checkpoint(t):
    # main.py: checkpoint.pth = {"epoch", "model": DDP(BarlowTwins).state_dict(), "optimizer"}
    model = _prefixed("module.backbone.", t) | _mlp("module.projector.", [512, 64, 64])
    model |= {"module.bn.running_mean": torch.zeros(64), "module.bn.running_var": torch.ones(64),
              "module.bn.num_batches_tracked": torch.tensor(9)}
    return {"epoch": 1000, "model": model, "optimizer": _optimizer()}


def densecl_checkpoint(t):
    # OpenSelfSup runner checkpoint of DenseCL: encoder_q = (backbone, neck), encoder_k, backbone
    # again, 2 queues
    neck = {"mlp.0.weight": torch.randn(64, 512), "mlp2.0.weight": torch.randn(64, 512, 1, 1)}
    state = _prefixed("encoder_q.0.", t) | _prefixed("encoder_q.1.", neck)
    state |= _prefixed("encoder_k.0.", _perturbed(t)) | _prefixed("encoder_k.1.", neck)
    state |= _prefixed("backbone.", t)
    state |= {"queue": torch.randn(32, 64), "queue_ptr": torch.zeros(1, dtype=torch.long),
              "queue2": torch.randn(32, 64), "queue2_ptr": torch.zeros(1, dtype=torch.long)}
    return {"meta": {"epoch": 200, "iter": 1000}, "state_dict": state, "optimizer": _optimizer()}


def solo_learn_checkpoint(t):
    # Lightning checkpoint of solo-learn's BYOL (BaseMomentumMethod): backbone/momentum_backbone
    # with fc = Identity
    state = _prefixed("backbone.", t) | _prefixed("momentum_backbone.", _perturbed(t))
    state |= _mlp("projector.", [512, 64, 32]) | _mlp("momentum_projector.", [512, 64, 32])
    state |= _mlp("predictor.", [32, 64, 32])
    state |= {"classifier.weight": torch.randn(10, 512), "classifier.bias": torch.zeros(10)}
    return {"epoch": 399, "global_step": 50000, "pytorch-lightning_version": "2.0.2",
            "state_dict": state,
            "loops": {"fit_loop": {"epoch_progress": {"total": {"completed": 399}}}},
            "callbacks": {}, "optimizer_states": [_optimizer()],
            "lr_schedulers": [{"last_epoch": 399}]}


def mmselfsup_checkpoint(t):
    # mmselfsup 0.x MoCo: encoder_q = Sequential(backbone, neck), encoder_k, backbone/neck
    # registered again
    neck = {"mlp.0.weight": torch.randn(64, 512), "mlp.0.bias": torch.zeros(64),
            "mlp.2.weight": torch.randn(32, 64)}
    state = _prefixed("encoder_q.0.", t) | _prefixed("encoder_q.1.", neck)
    state |= _prefixed("encoder_k.0.", _perturbed(t)) | _prefixed("encoder_k.1.", neck)
    state |= _prefixed("backbone.", t) | _prefixed("neck.", neck)
    state |= {"queue": torch.randn(32, 64), "queue_ptr": torch.zeros(1, dtype=torch.long)}
    return {"meta": {"epoch": 200, "mmcv_version": "1.3.16"}, "state_dict": state,
            "optimizer": _optimizer()}


def mmselfsup_v1_byol_checkpoint(t):
    # mmselfsup 1.x BYOL: target_net = CosineEMA(Sequential(backbone, neck)) ->
    # target_net.module.0.*, .steps
    neck = {"mlp.0.weight": torch.randn(64, 512), "mlp.1.running_mean": torch.zeros(64)}
    state = _prefixed("backbone.", t) | _prefixed("neck.", neck) \
        | {"head.predictor.mlp.0.weight": torch.randn(8, 8)}
    state |= _prefixed("target_net.module.0.", _perturbed(t)) \
        | _prefixed("target_net.module.1.", neck)
    state |= {"target_net.steps": torch.tensor(100)}
    return {"meta": {"epoch": 200, "seed": 0}, "state_dict": state, "optimizer": _optimizer()}


def lightly_checkpoint(t):
    # lightly docs: backbone = nn.Sequential(*list(resnet.children())[:-1]) with lightly's own
    # heads next to it
    from lightly.models.modules import MoCoProjectionHead

    resnet = torchvision.models.resnet18()
    resnet.load_state_dict(t, strict=False)
    model = torch.nn.Module()
    model.backbone = torch.nn.Sequential(*list(resnet.children())[:-1])
    model.projection_head = MoCoProjectionHead(512, 512, 128)
    model.backbone_momentum = copy.deepcopy(model.backbone)
    model.projection_head_momentum = copy.deepcopy(model.projection_head)
    for p in model.backbone_momentum.parameters():
        p.data.add_(1.0)
    return model.state_dict()


def timm_checkpoint(t, model_name="resnet18"):
    # timm train.py CheckpointSaver: {"epoch", "arch", "state_dict", "optimizer", "version",
    # "args", "state_dict_ema"}
    import timm

    model = timm.create_model("resnet18")
    model.load_state_dict(t, strict=False)
    ema = _perturbed(model.state_dict())
    return {"epoch": 10, "arch": type(model).__name__.lower(), "state_dict": model.state_dict(),
            "optimizer": _optimizer(), "version": 2, "state_dict_ema": ema, "metric": 71.2,
            "args": argparse.Namespace(model=model_name, lr=0.1, model_ema=True)}


# source -> (builder, trunk prefix, {dropped key: reason fragment})
LAYOUTS = {
    "vissl": (vissl_checkpoint, "classy_state_dict.base_model.model.trunk._feature_blocks.", {
        "classy_state_dict.base_model.model.heads.0.prototypes0.weight": "VISSL heads",
        "classy_state_dict.loss.queue": "loss state",
        "classy_state_dict.optimizer.state.0.momentum_buffer": "optimizer state"}),
    "dino": (dino_checkpoint, "teacher.module.backbone.", {
        "student.module.backbone.conv1.weight": "student network",
        "teacher.module.head.mlp.0.weight": "DINO", "dino_loss.center": "DINO loss center"}),
    "pixpro": (pixpro_checkpoint, "module.encoder.", {
        "module.encoder_k.layer1.0.conv1.weight": "momentum encoder",
        "module.projector.linear1.weight": "PixPro pixel projector",
        "module.value_transform.weight": "pixel propagation module"}),
    "swav": (swav_checkpoint, "module.", {
        "module.prototypes.weight": "SwAV prototypes",
        "module.projection_head.1.running_var": "projection head"}),
    "barlowtwins": (barlowtwins_checkpoint, "module.backbone.", {
        "module.projector.3.weight": "Barlow Twins projector",
        "module.bn.running_var": "affine=False"}),
    "densecl": (densecl_checkpoint, "backbone.", {
        "encoder_q.0.conv1.weight": "the same tensors as backbone",
        "encoder_k.0.conv1.weight": "momentum", "queue2": "dense negative keys",
        "queue2_ptr": "dense queue pointer", "queue_ptr": "queue pointer"}),
    "solo-learn": (solo_learn_checkpoint, "backbone.", {
        "momentum_backbone.layer4.1.bn2.bias": "momentum backbone",
        "classifier.weight": "online linear classifier", "predictor.0.weight": "predictor",
        "optimizer_states.0.state.0.momentum_buffer": "optimizer state"}),
    "mmselfsup": (mmselfsup_checkpoint, "backbone.", {
        "encoder_q.0.layer1.0.conv1.weight": "online encoder",
        "encoder_k.0.bn1.weight": "key (momentum) encoder", "neck.mlp.0.weight": "neck",
        "queue": "queue of negative keys"}),
    "lightly": (lightly_checkpoint, "backbone.", {
        "backbone_momentum.0.weight": "momentum backbone",
        "projection_head.layers.0.weight": "projection head"}),
    "timm": (timm_checkpoint, "",
             {"state_dict_ema.conv1.weight": "EMA weights", "fc.weight": "classifier"}),
}


def _check_conversion(report, data, state, prefix, arch="resnet18"):
    """Every trunk tensor carried unchanged under its detectron2 name; the numbers verified."""
    assert report.verified == TRUNK_TENSORS[arch] == len(report.converted) == len(data["model"])
    assert report.max_rel_error <= 1e-5 \
        and set(report.stage_errors) == {"res2", "res3", "res4", "res5"}
    for name, tensor in state.items():
        if name.endswith("num_batches_tracked"):
            continue
        np.testing.assert_array_equal(data["model"][detectron2_name(name)], tensor.numpy())
    converted_keys = {key for key, _ in report.converted}
    if report.source == "lightly":
        assert prefix + "4.0.conv1.weight" in converted_keys \
            and prefix + "0.weight" in converted_keys
    else:
        assert {prefix + name for name in state if not name.endswith("num_batches_tracked")} \
            == converted_keys


@pytest.mark.parametrize("source", list(LAYOUTS))
def test_each_source_is_detected_converted_and_verified(source, trunk, tmp_path):
    build, prefix, expected_dropped = LAYOUTS[source]
    state = trunk()
    path = tmp_path / f"{source}.pth"
    torch.save(build(state), path)
    report = convert_checkpoint(path, tmp_path / "out.pkl")

    assert (report.source, report.detected, report.prefix) == (source, True, prefix)
    data = safe_unpickle(tmp_path / "out.pkl")
    assert data["__author__"] == report.author and data["architecture"] == "ResNet-18"
    _check_conversion(report, data, state, prefix)
    dropped = dict(report.dropped)
    for key, reason in expected_dropped.items():
        assert reason in dropped[key], (key, dropped[key])
    # every tensor of the file is accounted for: converted, or dropped with a reason
    assert not any(why == "not part of the trunk" for why in dropped.values()), report.dropped


@pytest.mark.parametrize("source", ["dino", "barlowtwins", "densecl", "mmselfsup"])
def test_backbone_only_releases(source, trunk, tmp_path):
    """dino_resnet50_pretrain.pth and Barlow Twins' resnet50.pth are torchvision trunks without fc
    (hubconf.py loads them with strict=False); DenseCL's and mmselfsup's
    extract_backbone_weights.py add an author."""
    state = trunk()
    path = tmp_path / "release.pth"
    if source in ("densecl", "mmselfsup"):
        author = {"densecl": "DenseCL", "mmselfsup": "MMSelfSup"}[source]
        torch.save({"state_dict": state, "author": author}, path)
        report = convert_checkpoint(path, tmp_path / "out.pkl")
        assert report.source == source and report.detected
    else:
        torch.save(state, path)
        # the same names
        assert convert_checkpoint(path, tmp_path / "auto.pkl").source == "torchvision"
        report = convert_checkpoint(path, tmp_path / "out.pkl", source=source)
        assert report.source == source and not report.detected
    assert report.prefix == ""
    _check_conversion(report, safe_unpickle(tmp_path / "out.pkl"), state, "")


def test_resnet50_release_layout_and_json_report(trunk, tmp_path):
    """A ResNet-50 in the DINO full-checkpoint layout; OUT.json carries what the summary says."""
    state = trunk("resnet50", seed=1)
    path, out = tmp_path / "dino_resnet50_full.pth", tmp_path / "dino_r50.pkl"
    torch.save(dino_checkpoint(state), path)
    report = convert_checkpoint(path, out)
    data = safe_unpickle(out)
    _check_conversion(report, data, state, "teacher.module.backbone.", "resnet50")
    assert data["resnets"] \
        == {"DEPTH": 50, "NUM_GROUPS": 1, "WIDTH_PER_GROUP": 64, "RES2_OUT_CHANNELS": 256,
            "STRIDE_IN_1X1": False}

    record = json.loads((tmp_path / "dino_r50.json").read_text())
    assert record["input_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["output_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert (record["source"], record["prefix"], record["format"]) \
        == ("dino", "teacher.module.backbone.", "detectron2")
    assert record["architecture"]["name"] == "ResNet-50" \
        and record["architecture"]["torchvision"] == "resnet50"
    assert record["converted"] == 265 and record["verified"] == 265
    assert set(record["stage_rel_errors"]) == {"res2", "res3", "res4", "res5"}
    assert record["max_rel_error"] == max(record["stage_rel_errors"].values()) <= 1e-5
    dropped = {d["key"]: d["reason"] for d in record["dropped"]}
    assert "student network" in dropped["student.module.backbone.layer3.5.bn3.running_mean"]
    assert len(dropped) == len(report.dropped)


def test_to_torchvision_loads_strictly_and_computes_the_same(trunk, tmp_path):
    state = trunk()
    path, out = tmp_path / "solo.ckpt", tmp_path / "backbone.pth"
    torch.save(solo_learn_checkpoint(state), path)
    report = convert_checkpoint(path, out, to="torchvision")
    assert report.to == "torchvision" and report.max_rel_error <= 1e-5 and report.verified == 100

    written = torch.load(out, weights_only=True)
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    # torchvision's own names, nothing missing, nothing extra
    model.load_state_dict(written, strict=True)
    original = torchvision.models.resnet18()
    original.load_state_dict(state, strict=False)
    original.fc = torch.nn.Identity()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), original.eval()(images), rtol=0, atol=0)
    assert json.loads((tmp_path / "backbone.json").read_text())["format"] == "torchvision"
    with pytest.raises(UsageError, match=r"must end in .pth for --to torchvision"):
        convert_checkpoint(path, tmp_path / "backbone.pkl", to="torchvision")


def test_torchvision_wrappers(trunk, tmp_path):
    """{"net": ...} (and "state_dict"/"model", test_convert.py) around a DDP-saved classifier."""
    state = trunk()
    torch.save({"net": _prefixed("module.", state) | {"module.fc.weight": torch.zeros(10, 512)},
                "acc": 0.5},
               tmp_path / "classifier.pth")
    report = convert_checkpoint(tmp_path / "classifier.pth", tmp_path / "out.pkl")
    assert (report.source, report.prefix) == ("torchvision", "module.")
    assert dict(report.dropped)["module.fc.weight"] == "classifier (fc)"
    _check_conversion(report, safe_unpickle(tmp_path / "out.pkl"), state, "module.")


def test_safetensors_weights(trunk, tmp_path):
    """timm's hub weights (model.safetensors): torchvision names in a safetensors file."""
    from safetensors.torch import save_file

    state = trunk()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    report = convert_checkpoint(tmp_path / "model.safetensors", tmp_path / "out.pkl")
    assert (report.source, report.prefix) == ("torchvision", "")
    _check_conversion(report, safe_unpickle(tmp_path / "out.pkl"), state, "")
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(UsageError, match="is not a readable safetensors file"):
        convert_checkpoint(tmp_path / "broken.safetensors", tmp_path / "x.pkl")


# -- generic discovery -----------------------------------------------------------------------------

def test_generic_discovery_finds_the_only_trunk(trunk, tmp_path):
    state = trunk()
    path = tmp_path / "custom.pth"
    torch.save({"model": _prefixed("net.body.", state) | {"net.head.weight": torch.randn(5, 512)},
                "step": 7}, path)
    report = convert_checkpoint(path, tmp_path / "out.pkl")
    assert (report.source, report.prefix, report.author) == ("generic", "net.body.", "mocobench")
    _check_conversion(report, safe_unpickle(tmp_path / "out.pkl"), state, "net.body.")
    assert dict(report.dropped)["net.head.weight"] == "not part of the trunk"


def test_two_trunks_without_a_rule_are_refused_and_prefix_picks_one(trunk, tmp_path, capsys):
    state = trunk()
    path = tmp_path / "byol.pt"  # e.g. byol-pytorch: online and target networks side by side
    torch.save(_prefixed("online_network.encoder.", state)
               | _prefixed("target_network.encoder.", _perturbed(state)), path)
    assert mocobench_main(["convert", str(path), str(tmp_path / "out.pkl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "holds 2 complete ResNet trunks" in err and "--prefix" in err
    assert "'online_network.encoder.' (ResNet-18), 'target_network.encoder.' (ResNet-18)" in err
    assert not (tmp_path / "out.pkl").exists()

    report = convert_checkpoint(path, tmp_path / "out.pkl", prefix="online_network.encoder.")
    assert (report.source, report.detected) == ("generic", False)
    _check_conversion(report, safe_unpickle(tmp_path / "out.pkl"), state, "online_network.encoder.")
    assert dict(report.dropped)["target_network.encoder.conv1.weight"] == \
        "another ResNet trunk (target_network.encoder.*)"
    with pytest.raises(UsageError,
                       match=r"no ResNet trunk under --prefix 'online_network.'.*Trunks found: "
                             r"'online_network.encoder.', 'target_network.encoder.'"):
        convert_checkpoint(path, tmp_path / "x.pkl", prefix="online_network.")


def test_prefix_converts_a_momentum_encoder_of_a_known_source(trunk, tmp_path):
    state = trunk()
    path = tmp_path / "moco_like.pth"
    torch.save(pixpro_checkpoint(state), path)
    report = convert_checkpoint(path, tmp_path / "k.pkl", prefix="module.encoder_k.")
    assert report.prefix == "module.encoder_k." and report.source == "generic"
    np.testing.assert_array_equal(safe_unpickle(tmp_path / "k.pkl")["model"]["stem.conv1.weight"],
                                  state["conv1.weight"].numpy() * np.float32(0.9))


# -- refusals --------------------------------------------------------------------------------------

def _timm_state(name):
    """A timm model's state dict: real names and shapes (values are irrelevant to a refusal)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(name)
    return {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name, what", [
    ("resnet18d", "a deep stem"),
    ("seresnet18", "squeeze-and-excitation"),
    ("ecaresnet26t", "efficient channel attention"),
    ("skresnet18", "selective-kernel"),
])
def test_non_plain_timm_resnets_are_refused_with_one_line(name, what, tmp_path, capsys):
    path = tmp_path / f"{name}.pth"
    torch.save(_timm_state(name), path)
    assert mocobench_main(["convert", str(path), str(tmp_path / "out.pkl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and what in err \
        and "only plain torchvision-style ResNets" in err
    assert not (tmp_path / "out.pkl").exists()


def test_antialiased_and_cifar_trunks_are_refused(trunk, tmp_path):
    # timm resnetaa* have no tensors of their own: only the checkpoint's args.model tells them apart
    path = tmp_path / "aa.pth"
    torch.save(timm_checkpoint(trunk(), model_name="resnetaa50d"), path)
    with pytest.raises(UsageError, match=r"timm 'resnetaa50d' \(args.model\): not a plain ResNet"):
        convert_checkpoint(path, tmp_path / "out.pkl")
    # antialiased-cnns registers its blur filters as buffers
    state = trunk() | {"layer2.0.conv2.1.filt": torch.ones(128, 1, 3, 3),
                       "maxpool.1.filt": torch.ones(64, 1, 3, 3)}
    torch.save(state, path)
    with pytest.raises(UsageError, match=r"anti-aliased \(BlurPool\) downsampling \(e.g. '"):
        convert_checkpoint(path, tmp_path / "out.pkl")
    # solo-learn on CIFAR swaps the stem for a 3x3 conv without max-pool
    state = trunk() | {"conv1.weight": torch.zeros(64, 3, 3, 3)}
    torch.save(solo_learn_checkpoint(state), path)
    with pytest.raises(UsageError,
                       match=r"conv1.weight has shape \(64, 3, 3, 3\).*CIFAR-style 3x3 stem"):
        convert_checkpoint(path, tmp_path / "out.pkl")
    # SwAV/SimCLR RN50w2 widen every layer, the stem included
    torch.save(swav_checkpoint(trunk() | {"conv1.weight": torch.zeros(128, 3, 7, 7)}), path)
    with pytest.raises(UsageError,
                       match=r"\(128, 3, 7, 7\).*width-multiplied ResNet such as SwAV's"):
        convert_checkpoint(path, tmp_path / "out.pkl")
    assert not (tmp_path / "out.pkl").exists()


def test_list_sources(capsys):
    assert mocobench_main(["convert", "--list-sources"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for source, (_, prefix, _) in LAYOUTS.items():
        line = next(line for line in lines if line.startswith(source + " "))
        assert prefix + ("0.weight" if source == "lightly" else "conv1.weight") in line
    for source in ("moco", "moco-v3", "torchvision", "(other)"):
        assert any(line.startswith(source + " ") for line in lines)
    assert mocobench_main(["convert", "only_input.pth"]) == 2


# -- every ResNet shape ----------------------------------------------------------------------------

# torchvision builder -> (name, MODEL.RESNETS DEPTH, NUM_GROUPS, WIDTH_PER_GROUP,
# RES2_OUT_CHANNELS), written from torchvision's resnet.py constructors (groups / width_per_group)
# and detectron2's build_resnet_backbone
ARCHITECTURES = {
    "resnet18": ("ResNet-18", 18, 1, 64, 64),
    "resnet34": ("ResNet-34", 34, 1, 64, 64),
    "resnet50": ("ResNet-50", 50, 1, 64, 256),
    "resnext50_32x4d": ("ResNeXt-50 32x4d", 50, 32, 4, 256),
    "resnet101": ("ResNet-101", 101, 1, 64, 256),
    "resnet152": ("ResNet-152", 152, 1, 64, 256),
    "resnext101_32x8d": ("ResNeXt-101 32x8d", 101, 32, 8, 256),
    "resnext101_64x4d": ("ResNeXt-101 64x4d", 101, 64, 4, 256),
    "wide_resnet50_2": ("Wide ResNet-50-2", 50, 1, 128, 256),
    "wide_resnet101_2": ("Wide ResNet-101-2", 101, 1, 128, 256),
}
# the others: 3-8 s CPU each
CI_ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnext50_32x4d")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Factory: (arch) -> (report, trunk state), converted once per module from a MoCo v2-layout
    checkpoint. The inputs are deleted once converted and the outputs when the module ends: all
    nine ResNets together are 4 GB on disk."""
    cache, root = {}, tmp_path_factory.mktemp("convert_arch")

    def make(arch):
        if arch not in cache:
            state = {k: v.clone() for k, v in _random_trunk(arch, 0).items()}
            path = root / f"{arch}.pth.tar"
            torch.save({"arch": arch, "state_dict": _prefixed("module.encoder_q.", state)}, path)
            cache[arch] = convert_checkpoint(path, root / f"{arch}.pkl"), state
            path.unlink()
        return cache[arch]
    yield make
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("arch",
                         [a if a in CI_ARCHITECTURES else pytest.param(a, marks=pytest.mark.slow)
                          for a in ARCHITECTURES])
def test_every_architecture_converts_and_verifies(arch, converted):
    report, state = converted(arch)
    name, depth, groups, width, res2 = ARCHITECTURES[arch]
    assert (report.arch.name, report.arch.torchvision_name, report.source) == (name, arch, "moco")
    data = safe_unpickle(report.output_path)
    assert data["architecture"] == name
    assert data["resnets"] == {"DEPTH": depth, "NUM_GROUPS": groups, "WIDTH_PER_GROUP": width,
                               "RES2_OUT_CHANNELS": res2, "STRIDE_IN_1X1": False}
    tensors = [k for k in state if not k.endswith("num_batches_tracked")]
    assert report.verified == len(tensors) == len(data["model"]) and report.max_rel_error <= 1e-5
    np.testing.assert_array_equal(data["model"]["res3.1.conv2.weight"],
                                  state["layer2.1.conv2.weight"].numpy())


def _transfer_cfg(config_file, *opts):
    from transfer.config import load_config

    return load_config(config_file, list(opts))


def test_transfer_takes_the_architecture_from_the_pkl(converted, tmp_path):
    from detectron2.modeling import build_model

    from transfer.checkpoint import SafeDetectionCheckpointer
    from transfer.config import configure_resnet
    from transfer.run import prepare_config

    report, _ = converted("resnext50_32x4d")
    pkl = report.output_path
    cfg = _transfer_cfg("configs/detection/tiny_synth_voc_R_50_C4.yaml", "MODEL.WEIGHTS", pkl,
                        "MODEL.DEVICE", "cpu")
    notes = configure_resnet(cfg)
    assert (cfg.MODEL.RESNETS.NUM_GROUPS, cfg.MODEL.RESNETS.WIDTH_PER_GROUP,
            cfg.MODEL.RESNETS.DEPTH) == (32, 4, 50)
    assert "NUM_GROUPS 32, WIDTH_PER_GROUP 4" in notes[0]
    # the detector built from that config takes every tensor of the pkl, shapes and all
    model = build_model(cfg)
    checkpointer = SafeDetectionCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(pkl))
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    assert torch.equal(model.backbone.res2[0].conv2.weight,
                       torch.as_tensor(safe_unpickle(pkl)["model"]["res2.0.conv2.weight"]))
    # the transfer command does the same before any process starts
    cfg, _ = prepare_config("configs/detection/tiny_synth_voc_R_50_C4.yaml",
                            ["MODEL.WEIGHTS", pkl, "DATASETS.TRAIN", "()", "DATASETS.TEST", "()"])
    assert cfg.MODEL.RESNETS.NUM_GROUPS == 32

    # a config that says otherwise is refused in one line
    cfg = _transfer_cfg("configs/detection/tiny_synth_voc_R_50_C4.yaml", "MODEL.WEIGHTS", pkl,
                        "MODEL.RESNETS.NUM_GROUPS", "64")
    with pytest.raises(UsageError,
                       match=r"^MODEL.RESNETS.NUM_GROUPS is 64 but MODEL.WEIGHTS .* holds a "
                             r"ResNeXt-50 32x4d \(NUM_GROUPS 32\)"):
        configure_resnet(cfg)


def test_transfer_refuses_basic_blocks_under_a_c4_head_and_keeps_foreign_weights(converted,
                                                                                 tmp_path):
    from transfer.config import configure_resnet

    report, _ = converted("resnet18")
    cfg = _transfer_cfg("configs/detection/tiny_synth_voc_R_50_C4.yaml", "MODEL.WEIGHTS",
                        report.output_path)
    with pytest.raises(UsageError, match="builds res5 from bottleneck blocks; use an FPN config"):
        configure_resnet(cfg)
    cfg = _transfer_cfg("configs/detection/synth_voc_R18_FPN_cpu_moco.yaml", "MODEL.WEIGHTS",
                        report.output_path)
    # the config already says so
    assert configure_resnet(cfg) == [] and cfg.MODEL.RESNETS.DEPTH == 18
    # weights without a recorded architecture (a model-zoo or older pkl) leave the config alone
    data = safe_unpickle(report.output_path)
    with open(tmp_path / "zoo.pkl", "wb") as f:
        pickle.dump({"model": data["model"], "__author__": "zoo"}, f)
    with open(tmp_path / "caffe2.pkl", "wb") as f:  # MSRA R-50.pkl style: Caffe2 blob names
        pickle.dump({"blobs": {"conv1_w": np.zeros((64, 3, 7, 7), np.float32)}}, f)
    for name in ("zoo.pkl", "caffe2.pkl"):
        cfg = _transfer_cfg("configs/detection/tiny_synth_voc_R_50_C4.yaml", "MODEL.WEIGHTS",
                            str(tmp_path / name))
        assert configure_resnet(cfg) == [] and cfg.MODEL.RESNETS.DEPTH == 50


def test_framework_objects_in_a_checkpoint_are_read_as_placeholders(trunk, tmp_path, monkeypatch):
    """mmengine's message_hub and Lightning's omegaconf hyper-parameters are pickled objects that
    torch's weights-only loader refuses; they carry no weights and are read as inert placeholders
    (never imported)."""
    import types

    from omegaconf import OmegaConf

    module = types.ModuleType("mmengine.logging.history_buffer")

    class HistoryBuffer:  # what mmengine's MessageHub.state_dict() holds per logged scalar
        def __init__(self):
            self._log_history = np.arange(3.0)

    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = module.__name__, "HistoryBuffer"
    module.HistoryBuffer = HistoryBuffer
    for name in ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer"):
        monkeypatch.setitem(sys.modules, name, module)
    state = trunk()
    mm = mmselfsup_v1_byol_checkpoint(state) \
        | {"message_hub": {"log_scalars": {"train/loss": HistoryBuffer()}}}
    torch.save(mm, tmp_path / "mm.pth")
    solo = solo_learn_checkpoint(state) | {"hparams_name": "kwargs", "hyper_parameters": {
        "cfg": OmegaConf.create({"method": "byol", "max_epochs": 400, "optimizer": {"lr": 1.0}})}}
    torch.save(solo, tmp_path / "solo.ckpt")
    for name in ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer"):
        monkeypatch.delitem(sys.modules, name)  # the reader must not need (or import) the class

    report = convert_checkpoint(tmp_path / "mm.pth", tmp_path / "mm.pkl")
    assert report.source == "mmselfsup" \
        and "mmengine.logging.history_buffer.HistoryBuffer" in report.opaque
    # its numpy history too
    assert all(name.startswith(("mmengine.", "numpy.")) for name in report.opaque)
    assert dict(report.dropped)["target_net.module.0.conv1.weight"] == "target (momentum) network"
    _check_conversion(report, safe_unpickle(tmp_path / "mm.pkl"), state, "backbone.")
    assert "mmengine" not in sys.modules
    report = convert_checkpoint(tmp_path / "solo.ckpt", tmp_path / "solo.pkl")
    assert report.source == "solo-learn" and "omegaconf.dictconfig.DictConfig" in report.opaque
    assert json.loads((tmp_path / "solo.json").read_text())["ignored_objects"] == report.opaque


def test_the_summary_and_the_json_report_say_what_was_converted(converted):
    """What `mocobench convert` prints and writes to OUT.json for the MoCo v2-layout R-18 of
    `converted`."""
    import re

    report, state = converted("resnet18")
    path = report.input_path
    prefix = "module.encoder_q."
    lines = report.summary().splitlines()
    assert lines[:7] == [
        f"input    {path}",
        f"source   moco (detected), ResNet-18 (basic blocks) under {prefix!r}, __author__ 'MOCO'",
        "",
        "  converted      100  tensors (conv weights, BN weight/bias/running_mean/var)",
        "  dropped         20  BN num_batches_tracked (detectron2 has no such buffer): "
        f"{prefix}bn1.num_batches_tracked ...",
        "  verified       100  loaded by DetectionCheckpointer, equal key by key",
        f"  max error  {report.max_rel_error:.1e}  detectron2 vs torchvision in eval mode (res2 "
        f"{report.stage_errors['res2']:.1e}, res3 {report.stage_errors['res3']:.1e}, res4 "
        f"{report.stage_errors['res4']:.1e}, res5 {report.stage_errors['res5']:.1e})",
    ]
    assert lines[7] == ""
    assert re.fullmatch(rf"wrote    {re.escape(report.output_path)} \(detectron2, \d+\.\d s, "
                        r"verification \d+\.\d s\)",
                        lines[8])
    assert lines[9:] == [f"report   {report.json_path}"]
    assert report.json_path == report.output_path[:-len(".pkl")] + ".json"
    with open(report.json_path) as f:
        written = json.load(f)
    bns = sorted(k[:-len(".num_batches_tracked")] for k in state
                 if k.endswith("num_batches_tracked"))
    assert len(bns) == 20
    assert written["dropped"] == [
        {"key": f"{prefix}{bn}.num_batches_tracked",
         "reason": "BN num_batches_tracked (detectron2 has no such buffer)"}
        for bn in sorted(bns, key=lambda b: list(state).index(f"{b}.num_batches_tracked"))]
    assert {k: written[k]
            for k in ("input", "output", "format", "source", "detected", "prefix", "author",
                      "converted", "verified", "ignored_objects", "problems")} == {
        "input": path, "output": report.output_path, "format": "detectron2", "source": "moco",
        "detected": True, "prefix": prefix, "author": "MOCO", "converted": 100, "verified": 100,
        "ignored_objects": [], "problems": []}
    assert written["architecture"] \
        == {"name": "ResNet-18", "torchvision": "resnet18", "depth": 18, "block": "basic",
            "groups": 1, "width_per_group": 64}
    assert written["detectron2_resnets"] == {"DEPTH": 18, "NUM_GROUPS": 1, "WIDTH_PER_GROUP": 64,
                                             "RES2_OUT_CHANNELS": 64, "STRIDE_IN_1X1": False}
    # (the fixture deletes its inputs once converted: the input's hash is the one the report
    # computed)
    assert written["input_sha256"] == report.input_sha256 and len(report.input_sha256) == 64
    assert written["output_sha256"] \
        == hashlib.sha256(open(report.output_path, "rb").read()).hexdigest()
    assert written["max_rel_error"] == report.max_rel_error <= 1e-5
    assert written["stage_rel_errors"] == report.stage_errors \
        and list(report.stage_errors) == ["res2", "res3", "res4", "res5"]
    assert 0 < written["seconds"] == round(report.seconds, 3) \
        and report.verify_seconds < report.seconds
    assert (report.arch.depth, report.arch.block) == (18, "basic")


def test_cli_flags_no_verify_list_dropped_and_help(trunk, tmp_path, capsys):
    state = trunk()
    torch.save({"state_dict": _prefixed("module.encoder_q.", state)}, tmp_path / "moco.pth.tar")
    out = tmp_path / "fast.pkl"
    assert mocobench_main(["convert", str(tmp_path / "moco.pth.tar"), str(out), "--no-verify",
                           "--list-dropped"]) == 0
    printed = capsys.readouterr().out
    assert "  verified         -  verification skipped (--no-verify)" in printed.splitlines()
    bns = [k for k in state if k.endswith("num_batches_tracked")]
    listing = printed.split("\ndropped: BN num_batches_tracked (detectron2 has no such buffer) "
                            "(20)\n", 1)[1]
    assert listing.splitlines() == [f"  module.encoder_q.{k}" for k in bns]
    assert len(safe_unpickle(out)["model"]) == 100
    with pytest.raises(SystemExit) as e:
        mocobench_main(["convert", "--help"])
    assert e.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert help_text.startswith("usage: mocobench convert [-h]")
    assert ("Convert a ResNet checkpoint (MoCo, DINO, SwAV, Barlow Twins, DenseCL, PixPro, "
            "solo-learn") in help_text
    assert "exit codes: 0 ok, 1 verification failed (nothing written), 2 bad input" in help_text
    for flag in ("--source", "--prefix", "--to {detectron2,torchvision}", "--no-verify",
                 "--list-dropped", "--list-sources"):
        assert flag in help_text


def test_key_prefixes_shows_the_largest_twelve_then_a_count():
    from convert.sources import key_prefixes

    keys = [f"head{i:02d}.w{j}" for i in range(13) for j in range(i + 1)] \
        + ["module.encoder_q.conv1.weight", "x"]
    assert key_prefixes(keys, limit=15) == ", ".join(  # 15 prefixes, most keys first, then by name
        [f"head{i:02d} ({i + 1})" for i in range(12, 0, -1)]
        + ["head00 (1)", "module.encoder_q (1)", "x (1)"])
    twelve = key_prefixes(keys[:-2])  # 13 prefixes: 12 shown
    assert twelve.endswith("head01 (2), ... 1 more") and "head00" not in twelve
    # exactly 12
    assert key_prefixes(keys[1:-2]) == ", ".join(f"head{i:02d} ({i + 1})" for i in range(12, 0, -1))
