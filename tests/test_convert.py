"""`mocobench convert`: official layouts in, detectron2 .pkl out, and verification that catches
faults.

Checkpoints are made here from randomly initialised torchvision ResNets (no downloads), in the
layouts the official MoCo v1/v2 and v3 scripts save. BN statistics and affine parameters are
randomised: torchvision's defaults (mean 0, var 1, weight 1, bias 0) would hide a swapped mean/var
or weight/bias.
"""
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import random_resnet_state

import convert.api
from convert import VerificationError, convert_checkpoint, verify_file
from mocobench.cli import main as mocobench_main
from mocobench.utils import d2compat  # noqa: F401  (before detectron2)
from mocobench.utils.errors import UsageError
from mocobench.utils.fileio import safe_unpickle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# trunk tensors, counted by hand: every conv has a weight, every BN
# weight/bias/running_mean/running_var.
# R50: 1 stem conv + 16 bottlenecks x 3 convs + 4 downsample convs = 53 convs (and 53 BNs)
#      -> 53 * 5 = 265
# R18: 1 stem conv + 8 basic blocks x 2 convs + 3 downsample convs = 20 convs (and 20 BNs)
#      -> 20 * 5 = 100
TRUNK_TENSORS = {50: 265, 18: 100}
NUM_BNS = {50: 53, 18: 20}

# the official renaming, written out by hand for a few keys of each kind
EXPECTED_NAMES = {
    50: {
        "conv1.weight": "stem.conv1.weight",
        "bn1.running_var": "stem.conv1.norm.running_var",
        "layer1.0.downsample.0.weight": "res2.0.shortcut.weight",
        "layer1.0.downsample.1.running_mean": "res2.0.shortcut.norm.running_mean",
        "layer2.3.bn2.weight": "res3.3.conv2.norm.weight",
        "layer3.5.bn3.bias": "res4.5.conv3.norm.bias",
        "layer4.2.conv3.weight": "res5.2.conv3.weight",
    },
    18: {
        "bn1.bias": "stem.conv1.norm.bias",
        "layer1.1.conv2.weight": "res2.1.conv2.weight",
        "layer2.0.downsample.1.weight": "res3.0.shortcut.norm.weight",
        "layer4.0.downsample.0.weight": "res5.0.shortcut.weight",
        "layer4.1.bn1.running_mean": "res5.1.conv1.norm.running_mean",
    },
}




def _mlp_state(prefix, dims, last_bn_affine=True):
    """An MLP head's state (Linear, BN1d, ReLU, ...) under `prefix`, shaped like MoCo v3's
    projector/predictor."""
    state, index = {}, 0
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        state[f"{prefix}{index}.weight"] = torch.randn(d_out, d_in)
        bn = f"{prefix}{index + 1}."
        if not last or last_bn_affine:
            state[bn + "weight"], state[bn + "bias"] = torch.ones(d_out), torch.zeros(d_out)
        state[bn + "running_mean"], state[bn + "running_var"] = (torch.zeros(d_out),
                                                                 torch.ones(d_out))
        state[bn + "num_batches_tracked"] = torch.tensor(7)
        index += 3
    return state


def moco_v2_checkpoint(trunk, depth):
    """main_moco.py of MoCo v1/v2: DDP-wrapped query/key encoders with an MLP head, a queue, the
    optimizer."""
    dim_mlp = 2048 if depth >= 50 else 512
    head = {"fc.0.weight": torch.randn(dim_mlp, dim_mlp), "fc.0.bias": torch.zeros(dim_mlp),
            "fc.2.weight": torch.randn(128, dim_mlp), "fc.2.bias": torch.zeros(128)}
    encoder = {k: v for k, v in trunk.items() if not k.startswith("fc.")} | head
    state = {"module.encoder_q." + k: v for k, v in encoder.items()}
    state |= {"module.encoder_k." + k: v.clone() for k, v in encoder.items()}
    state["module.queue"] = torch.randn(128, 512)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": 200, "arch": f"resnet{depth}", "state_dict": state,
            "optimizer": {"state": {},
                          "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0, 1]}]}}


def moco_v3_checkpoint(trunk, depth):
    """main_moco.py of MoCo v3 (ResNet): base/momentum encoders with the projector in fc.*, a
    predictor."""
    width = 2048 if depth >= 50 else 512
    encoder = {k: v for k, v in trunk.items() if not k.startswith("fc.")}
    encoder |= _mlp_state("fc.", [width, 64, 32], last_bn_affine=False)
    state = {"module.base_encoder." + k: v for k, v in encoder.items()}
    state |= {"module.momentum_encoder." + k: v.clone() for k, v in encoder.items()}
    state |= _mlp_state("module.predictor.", [32, 64, 32], last_bn_affine=False)
    return {"epoch": 100, "arch": f"resnet{depth}", "state_dict": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.6, "params": [0]}]},
            "scaler": {"scale": 65536.0}}


LAYOUTS = {
    "moco": moco_v2_checkpoint,
    "moco-v3": moco_v3_checkpoint,
    # e.g. a user's own resnet50-*.pth: the bare state dict
    "torchvision": lambda trunk, depth: dict(trunk),
}
PREFIX = {"moco": "module.encoder_q.", "moco-v3": "module.base_encoder.", "torchvision": ""}


@pytest.fixture(scope="session")
def trunks():
    return {depth: random_resnet_state(f"resnet{depth}", seed=depth) for depth in (18, 50)}


@pytest.fixture(scope="module")
def checkpoints(trunks, tmp_path_factory):
    """(layout, depth) -> path of a saved checkpoint (0.7 GB in all: deleted when the module
    ends)."""
    root = tmp_path_factory.mktemp("convert_ckpts")
    paths = {}
    for depth, trunk in trunks.items():
        for layout, make in LAYOUTS.items():
            name = f"resnet{depth}-random.pth" if layout == "torchvision" \
                else f"{layout}_r{depth}.pth.tar"
            paths[layout, depth] = str(root / name)
            torch.save(make(trunk, depth), paths[layout, depth])
    yield paths
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def r50_moco_pkl(checkpoints, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("convert_out") / "moco_r50.pkl")
    convert_checkpoint(checkpoints["moco", 50], out)
    return out


@pytest.mark.parametrize("depth", [50, 18])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_conversion_follows_official_rules_and_verifies(layout, depth, trunks, checkpoints,
                                                        tmp_path):
    out = tmp_path / "out.pkl"
    report = convert_checkpoint(checkpoints[layout, depth], out)

    assert (report.source, report.detected, report.arch.depth) == (layout, True, depth)
    assert report.arch.block == ("bottleneck" if depth == 50 else "basic")
    assert report.verified == TRUNK_TENSORS[depth]
    assert report.max_rel_error <= 1e-5 and not report.problems
    assert set(report.stage_errors) == {"res2", "res3", "res4", "res5"}

    data = safe_unpickle(out)
    assert set(data) == {"model", "__author__", "matching_heuristics", "architecture", "resnets"}
    assert data["architecture"] == f"ResNet-{depth}"
    assert data["resnets"] \
        == {"DEPTH": depth, "NUM_GROUPS": 1, "WIDTH_PER_GROUP": 64, "STRIDE_IN_1X1": False,
            "RES2_OUT_CHANNELS": 256 if depth == 50 else 64}
    assert data["__author__"] == ("torchvision" if layout == "torchvision" else "MOCO")
    assert data["matching_heuristics"] is True
    model = data["model"]
    assert len(model) == len(report.converted) == TRUNK_TENSORS[depth]
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in model.values())
    for old, new in EXPECTED_NAMES[depth].items():
        np.testing.assert_array_equal(model[new], trunks[depth][old].numpy())
        assert (PREFIX[layout] + old, new) in report.converted
    # nothing but the trunk, and every trunk tensor equals the original under its official name
    assert not any(k.endswith("num_batches_tracked") or ".fc." in k or k.startswith("stem.fc")
                   for k in model)
    for old, new in report.converted:
        np.testing.assert_array_equal(model[new], trunks[depth][old[len(PREFIX[layout]):]].numpy())

    dropped = dict(report.dropped)
    counters = [k for k, why in dropped.items() if why.startswith("BN num_batches_tracked")]
    assert len(counters) == NUM_BNS[depth] and all(k.startswith(PREFIX[layout]) for k in counters)
    if layout == "moco":
        assert {"module.queue", "module.queue_ptr", "module.encoder_q.fc.0.weight",
                "module.encoder_q.fc.2.bias", "module.encoder_k.conv1.weight",
                "module.encoder_k.fc.0.weight"} <= set(dropped)
        assert dropped["module.encoder_k.layer1.0.conv1.weight"] == "key (momentum) encoder"
        assert dropped["module.queue_ptr"] == "queue pointer"
    elif layout == "moco-v3":
        assert {"module.base_encoder.fc.0.weight", "module.base_encoder.fc.4.running_mean",
                "module.predictor.0.weight", "module.momentum_encoder.conv1.weight"} <= set(dropped)
        assert dropped["module.predictor.3.weight"] == "predictor"
    else:
        assert {"fc.weight", "fc.bias"} <= set(dropped)
    # every key of the checkpoint is accounted for: converted or dropped with a reason
    state = torch.load(checkpoints[layout, depth], weights_only=True)
    state = state.get("state_dict", state)
    assert {old for old, _ in report.converted} | set(dropped) == set(state)


def test_plain_state_dict_under_model_entry_and_unwrapped_moco(trunks, tmp_path):
    """Our supervised classifier may save {"model": state}; a MoCo model saved without DDP has no
    `module.`."""
    classifier = tmp_path / "supervised.pth"
    torch.save({"model": {"module." + k: v for k, v in trunks[18].items()}, "epoch": 90},
               classifier)
    report = convert_checkpoint(classifier, tmp_path / "sup.pkl")
    assert (report.source, report.author, report.verified) == ("torchvision", "torchvision", 100)

    unwrapped = tmp_path / "ours.pth"
    state = moco_v2_checkpoint(trunks[18], 18)
    state["state_dict"] = {k[len("module."):]: v for k, v in state["state_dict"].items()}
    torch.save(state, unwrapped)
    report = convert_checkpoint(unwrapped, tmp_path / "ours.pkl", source="moco")
    assert report.source == "moco" and not report.detected and report.verified == 100
    assert ("encoder_q.layer2.0.downsample.1.running_var", "res3.0.shortcut.norm.running_var") \
        in report.converted


def test_pkl_input_of_numpy_arrays(trunks, tmp_path):
    path = tmp_path / "numpy_resnet18.pkl"
    with open(path, "wb") as f:
        pickle.dump({k: v.numpy() for k, v in trunks[18].items()}, f)
    report = convert_checkpoint(path, tmp_path / "out.pkl")
    assert report.source == "torchvision" and report.verified == 100


def test_no_verify_writes_the_same_weights(checkpoints, tmp_path):
    verified, unverified = tmp_path / "a.pkl", tmp_path / "b.pkl"
    convert_checkpoint(checkpoints["moco", 18], verified)
    report = convert_checkpoint(checkpoints["moco", 18], unverified, verify=False)
    assert report.verified == 0 and report.max_rel_error is None
    assert "verification skipped" in report.summary()
    a, b = safe_unpickle(verified), safe_unpickle(unverified)
    assert a.keys() == b.keys() and a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        np.testing.assert_array_equal(a["model"][key], b["model"][key])


# -- faults injected between conversion and verification -------------------------------------------

@pytest.mark.parametrize("depth", [18, 50])
def test_verification_catches_a_corrupted_tensor(depth, checkpoints, tmp_path, inject_fault):
    def corrupt(weights):
        weights["res4.1.conv1.weight"] = weights["res4.1.conv1.weight"] * 1.01

    inject_fault(convert.api, "to_detectron2", corrupt)
    out = tmp_path / "out.pkl"
    with pytest.raises(VerificationError) as info:
        convert_checkpoint(checkpoints["moco", depth], out)
    assert not out.exists() and not list(tmp_path.iterdir())  # not even a temp file
    report = info.value.report
    assert report.stage_errors["res2"] <= 1e-5 and report.stage_errors["res3"] <= 1e-5
    assert report.stage_errors["res4"] > 1e-5 and report.stage_errors["res5"] > 1e-5
    assert "res4: relative error" in str(info.value)
    assert "differ from the original checkpoint: res4.1.conv1.weight" in str(info.value)


def test_verification_catches_a_missing_key(checkpoints, tmp_path, inject_fault):
    # FrozenBatchNorm2d fills a missing running_var with ones *without* reporting it missing: must
    # still fail
    inject_fault(convert.api, "to_detectron2",
                 lambda weights: weights.pop("res3.1.conv1.norm.running_var"))
    with pytest.raises(VerificationError) as info:
        convert_checkpoint(checkpoints["moco-v3", 18], tmp_path / "out.pkl")
    assert "missing from the pkl: res3.1.conv1.norm.running_var" in str(info.value)
    assert info.value.report.verified == TRUNK_TENSORS[18] - 1
    assert not (tmp_path / "out.pkl").exists()


def test_cli_exit_code_1_on_verification_failure(checkpoints, tmp_path, inject_fault, capsys):
    inject_fault(convert.api, "to_detectron2",
                 lambda weights: weights["stem.conv1.norm.bias"].__iadd__(0.5))
    out = tmp_path / "out.pkl"
    assert mocobench_main(["convert", checkpoints["torchvision", 18], str(out)]) == 1
    captured = capsys.readouterr()
    assert "verification FAILED; nothing written" in captured.out
    assert "res2: relative error" in captured.err and not out.exists()


# -- faults made by hand in a written .pkl ---------------------------------------------------------

def _edit_pkl(src, dst, edit):
    data = safe_unpickle(src)
    edit(data["model"])
    with open(dst, "wb") as f:
        pickle.dump(data, f)


def test_verify_file_passes_untouched_and_catches_hand_edits(checkpoints, tmp_path):
    original, converted = checkpoints["moco", 18], tmp_path / "converted.pkl"
    convert_checkpoint(original, converted)
    report = verify_file(converted, original)
    assert report.verified == TRUNK_TENSORS[18] and report.max_rel_error <= 1e-5

    def scale(model):
        model["res4.0.conv2.weight"] *= 1.01

    # one weight: it may only meet zeros on the random batch, the value check must catch it
    def poke(model):
        model["res5.0.conv2.weight"][0, 0, 0, 0] += 1.0

    edits = {
        "scaled": (scale, ["res4: relative error", "res5: relative error",
                           "differ from the original checkpoint: res4.0.conv2.weight (from "
                           "layer3.0.conv2.weight)"]),
        "poked": (poke, ["differ from the original checkpoint: res5.0.conv2.weight"]),
        "missing": (lambda model: model.pop("res3.0.shortcut.norm.running_mean"),
                    ["missing from the pkl: res3.0.shortcut.norm.running_mean"]),
        "unexpected": (lambda model: model.__setitem__("res5.3.conv1.weight",
                                                       np.zeros((1,), np.float32)),
                       ["no place in the detectron2 backbone: res5.3.conv1.weight"]),
        "shape": (lambda model: model.__setitem__("res3.0.conv1.weight",
                                                  model["res3.0.conv1.weight"][:, :-1]),
                  ["shape mismatch for res3.0.conv1.weight"]),
    }
    for name, (edit, messages) in edits.items():
        edited = tmp_path / f"{name}.pkl"
        _edit_pkl(converted, edited, edit)
        with pytest.raises(VerificationError) as info:
            verify_file(edited, original)
        for message in messages:
            assert message in str(info.value), name


def test_verify_file_refuses_a_file_that_is_not_converted_weights(checkpoints, tmp_path):
    path = tmp_path / "other.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": "not an array"}, "__author__": "MOCO"}, f)
    with pytest.raises(UsageError, match="expected a numpy array"):
        verify_file(path, checkpoints["moco", 18])


# -- the output in full detectron2 detectors -------------------------------------------------------

def _detector(config_file, **overrides):
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(config_file))
    # the `_moco` transfer settings
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.280, 103.530]
    cfg.MODEL.PIXEL_STD = [58.395, 57.120, 57.375]
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return build_model(cfg)


@pytest.mark.parametrize(
    "config_file, placement, backbone_regions",
    [
        # C4: res2..res4 are the backbone, res5 is the box head (Res5ROIHeads) -- heuristic
        # matching puts it there
        ("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml",
         lambda k: ("roi_heads." if k.startswith("res5.") else "backbone.") + k,
         ("backbone.", "roi_heads.res5.")),
        ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
         lambda k: "backbone.bottom_up." + k,
         ("backbone.bottom_up.",)),
    ],
    ids=["C4", "FPN"],
)
def test_output_loads_into_detectors_leaving_only_heads(config_file, placement, backbone_regions,
                                                        r50_moco_pkl):
    from detectron2.checkpoint import DetectionCheckpointer

    model = _detector(config_file,
                      **{"MODEL.RESNETS.NORM": "SyncBN"} if "FPN" in config_file else {})
    checkpointer = DetectionCheckpointer(model)
    # detectron2's own reader and loader, as training does (our freshly written file, so a plain
    # pickle is fine)
    incompatible = checkpointer._load_model(checkpointer._load_file(r50_moco_pkl))
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []

    weights = safe_unpickle(r50_moco_pkl)["model"]
    state = model.state_dict()
    for key, array in weights.items():
        np.testing.assert_array_equal(state[placement(key)].numpy(), array)
    # what the pkl did not provide is exactly the model's keys outside the backbone trunk: the heads
    provided = {placement(key) for key in weights}
    not_provided = {k for k in state if k not in provided and not k.endswith("num_batches_tracked")}
    trunk_keys = {k for k in state
                  if k.startswith(backbone_regions) and not k.endswith("num_batches_tracked")}
    if "FPN" not in config_file:
        trunk_keys -= {k for k in trunk_keys if k.startswith("backbone.fpn")}
    assert trunk_keys == provided
    assert not_provided and not any(k in trunk_keys for k in not_provided)
    assert set(incompatible.missing_keys) - {k for k in state
                                             if k.endswith("num_batches_tracked")} == not_provided
    assert any(k.startswith("roi_heads.box_predictor.") for k in not_provided)


# -- the command line ------------------------------------------------------------------------------

def test_cli_end_to_end(checkpoints, tmp_path):
    out = tmp_path / "r18.pkl"
    cmd = [sys.executable, "-m", "mocobench.cli", "convert", checkpoints["moco-v3", 18], str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "source   moco-v3 (detected), ResNet-18 (basic blocks)" in proc.stdout
    assert "converted      100" in proc.stdout and "verified       100" in proc.stdout
    assert "predictor: module.predictor." in proc.stdout
    assert "BN num_batches_tracked" in proc.stdout and f"wrote    {out}" in proc.stdout
    assert len(safe_unpickle(out)["model"]) == 100

    bad = [sys.executable, "-m", "mocobench.cli", "convert", str(tmp_path / "absent.pth"),
           str(tmp_path / "x.pkl")]
    proc = subprocess.run(bad, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "mocobench convert: error:" in proc.stderr \
        and "absent.pth' does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
