"""`mocobench convert` on hostile and broken input: nothing runs, nothing is written, the error
says why."""
import os
import pickle

import pytest
import torch
import torchvision

from convert import convert_checkpoint
from convert.rename import detectron2_name
from convert.sources import extract_trunk, flatten_checkpoint
from mocobench.cli import main as mocobench_main
from mocobench.utils.errors import UsageError


class CreatesFile:
    """Unpickling this opens (so creates) `path`: a stand-in for any code a checkpoint could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def resnet18_state():
    torch.manual_seed(0)
    return torchvision.models.resnet18().state_dict()


def _assert_refused(path, out, marker, match):
    with pytest.raises(UsageError, match=match):
        convert_checkpoint(path, out)
    assert not os.path.exists(marker), "the checkpoint's payload ran"
    assert not os.path.exists(out)


def test_payload_is_live(tmp_path):
    """The payload used below really creates its file when unpickled without restrictions."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(CreatesFile(marker)))
    assert marker.exists()


def test_malicious_torch_checkpoint_is_refused(resnet18_state, tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth.tar"
    state = {"module.encoder_q." + k: v for k, v in resnet18_state.items()}
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": state, "hook": CreatesFile(marker)},
               path)
    assert not marker.exists()
    _assert_refused(path, tmp_path / "out.pkl", marker, "refusing to load .*evil.pth.tar")


def test_malicious_pkl_is_refused(resnet18_state, tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in resnet18_state.items()},
                     "x": CreatesFile(marker)}, f)
    _assert_refused(path, tmp_path / "out.pkl", marker,
                    "refusing to load .*evil.pkl.*not on the allow-list")


def test_malicious_input_through_the_cli_exits_2(resnet18_state, tmp_path, capsys):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": CreatesFile(marker)}}, path)
    assert mocobench_main(["convert", str(path), str(tmp_path / "out.pkl")]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out.pkl").exists()


def test_truncated_and_non_checkpoint_files(resnet18_state, tmp_path):
    whole = tmp_path / "whole.pth"
    torch.save({"state_dict": resnet18_state}, whole)
    data = whole.read_bytes()
    cases = {
        "truncated.pth": (data[: len(data) // 2], "not a readable torch checkpoint"),
        "truncated.pkl": (pickle.dumps({k: v.numpy() for k, v in resnet18_state.items()})[:5000],
                          "truncated"),
        "notes.pth": (b"these are my notes, not a checkpoint\n", "not a readable torch checkpoint"),
        "empty.pth.tar": (b"", r"empty.pth.tar' is empty \(0 bytes\)"),
    }
    for name, (content, match) in cases.items():
        (tmp_path / name).write_bytes(content)
        _assert_refused(tmp_path / name, tmp_path / "out.pkl", tmp_path / "no-marker", match)

    torch.save([1, 2, 3], tmp_path / "list.pth")
    _assert_refused(tmp_path / "list.pth", tmp_path / "out.pkl", tmp_path / "no-marker",
                    "holds a list")
    torch.save({"epoch": 3, "arch": "resnet18"}, tmp_path / "meta.pth")
    _assert_refused(tmp_path / "meta.pth", tmp_path / "out.pkl", tmp_path / "no-marker",
                    "holds no tensors")
    with pytest.raises(UsageError, match="does not exist"):
        convert_checkpoint(tmp_path / "absent.pth", tmp_path / "out.pkl")


def test_non_resnet_checkpoint_lists_the_prefixes_found(tmp_path):
    # a MoCo v2 run on a VGG-like encoder (features.*, classifier.*)
    vgg = {f"module.encoder_q.features.{i}.{p}": torch.zeros(2) for i in range(0, 22, 2)
           for p in ("weight", "bias")}
    vgg["module.encoder_k.features.0.weight"] = torch.zeros(2)
    torch.save({"state_dict": vgg, "arch": "vgg11"}, tmp_path / "vgg.pth.tar")
    with pytest.raises(UsageError) as info:
        convert_checkpoint(tmp_path / "vgg.pth.tar", tmp_path / "out.pkl")
    message = str(info.value)
    assert "holds no ResNet trunk" in message \
        and "module.encoder_q (22), module.encoder_k (1)" in message
    assert "conv1.* next to layer1.0.*" in message

    # a MoCo v3 ViT: the base encoder holds no ResNet stem
    vit = {"module.base_encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 1),
           "module.predictor.0.weight": torch.zeros(1)}
    torch.save({"state_dict": vit}, tmp_path / "vit.pth.tar")
    with pytest.raises(UsageError, match=r"module.base_encoder \(1\), module.predictor \(1\)"):
        convert_checkpoint(tmp_path / "vit.pth.tar", tmp_path / "out.pkl")
    assert not (tmp_path / "out.pkl").exists()


def test_wrong_source_named_explicitly(resnet18_state, tmp_path):
    torch.save(resnet18_state, tmp_path / "resnet18.pth")
    with pytest.raises(UsageError, match=r"not a moco checkpoint: no ResNet trunk at "
                                         r"'module.encoder_q.conv1.weight'"):
        convert_checkpoint(tmp_path / "resnet18.pth", tmp_path / "out.pkl", source="moco")
    with pytest.raises(UsageError, match="unknown --source 'moco-v4'"):
        convert_checkpoint(tmp_path / "resnet18.pth", tmp_path / "out.pkl", source="moco-v4")


def test_not_a_plain_resnet(resnet18_state):
    wide = dict(resnet18_state, **{"layer1.0.conv1.weight": torch.zeros(128, 64, 3, 3)})
    with pytest.raises(UsageError, match=r"'layer1.0.conv1.weight' has shape \(128, 64, 3, "
                                         r"3\).*\(64, 64, 3, 3\)"):
        extract_trunk(flatten_checkpoint(wide, "wide.pth"))

    three_blocks = {k: v for k, v in resnet18_state.items() if not k.startswith("layer3.1.")}
    with pytest.raises(UsageError,
                       match=r"blocks per stage \(2, 2, 1, 2\), which is no ResNet depth"):
        extract_trunk(flatten_checkpoint(three_blocks, "odd.pth"))

    missing = {k: v for k, v in resnet18_state.items() if k != "layer2.0.downsample.1.running_var"}
    with pytest.raises(UsageError, match="lacks 1 tensor.*layer2.0.downsample.1.running_var"):
        extract_trunk(flatten_checkpoint(missing, "missing.pth"))

    extra = dict(resnet18_state, **{"layer1.0.se.fc1.weight": torch.zeros(4, 64)})
    with pytest.raises(UsageError, match=r"squeeze-and-excitation blocks \(SE-ResNet\) \(e.g. "
                                         r"'layer1.0.se.fc1"):
        extract_trunk(flatten_checkpoint(extra, "se.pth"))


def test_existing_output_survives_a_failed_conversion(tmp_path):
    out = tmp_path / "weights.pkl"
    out.write_bytes(b"previous weights")
    (tmp_path / "broken.pth").write_bytes(b"\x80\x02garbage")
    with pytest.raises(UsageError):
        convert_checkpoint(tmp_path / "broken.pth", out)
    assert out.read_bytes() == b"previous weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pth", "weights.pkl"]


def test_output_must_be_a_pkl_and_not_the_input(resnet18_state, tmp_path):
    torch.save(resnet18_state, tmp_path / "r18.pth")
    with pytest.raises(UsageError, match="must end in .pkl"):
        convert_checkpoint(tmp_path / "r18.pth", tmp_path / "r18_d2.pth")
    (tmp_path / "r18.pkl").write_bytes(b"")
    with pytest.raises(UsageError, match="would overwrite the input"):
        convert_checkpoint(tmp_path / "r18.pkl", tmp_path / "r18.pkl")


def test_official_renaming_rules():
    # written from MoCo's convert-pretrain-to-detectron2.py rules, independently of our rule table
    assert detectron2_name("conv1.weight") == "stem.conv1.weight"
    assert detectron2_name("bn1.num_batches_tracked") == "stem.conv1.norm.num_batches_tracked"
    assert detectron2_name("layer1.0.bn3.running_var") == "res2.0.conv3.norm.running_var"
    assert detectron2_name("layer4.1.downsample.0.weight") == "res5.1.shortcut.weight"
    assert detectron2_name("layer2.0.downsample.1.bias") == "res3.0.shortcut.norm.bias"
    assert detectron2_name("layer3.22.conv2.weight") == "res4.22.conv2.weight"


def test_framework_placeholders_do_not_let_other_globals_through(resnet18_state, tmp_path,
                                                                 monkeypatch):
    """Framework bookkeeping objects are read as placeholders; a file that also carries any other
    global (here builtins.open) is still refused as a whole, and nothing in it runs."""
    import sys
    import types

    module = types.ModuleType("lightning.fake")

    class Bookkeeping:
        pass

    Bookkeeping.__module__, Bookkeeping.__qualname__ = module.__name__, "Bookkeeping"
    module.Bookkeeping = Bookkeeping
    monkeypatch.setitem(sys.modules, "lightning", module)
    monkeypatch.setitem(sys.modules, "lightning.fake", module)
    marker, path = tmp_path / "pwned", tmp_path / "mixed.ckpt"
    torch.save({"state_dict": resnet18_state, "loops": Bookkeeping(), "hook": CreatesFile(marker)},
               path)
    clean = tmp_path / "clean.ckpt"
    torch.save({"state_dict": resnet18_state, "loops": Bookkeeping()}, clean)
    monkeypatch.delitem(sys.modules, "lightning.fake")
    monkeypatch.delitem(sys.modules, "lightning")

    _assert_refused(path, tmp_path / "out.pkl", marker, "refusing to load .*mixed.ckpt")
    assert convert_checkpoint(clean, tmp_path / "out.pkl").opaque == ["lightning.fake.Bookkeeping"]


def test_a_converted_pkl_is_not_converted_again(resnet18_state, tmp_path):
    torch.save(resnet18_state, tmp_path / "r18.pth")
    convert_checkpoint(tmp_path / "r18.pth", tmp_path / "r18.pkl", verify=False)
    with pytest.raises(UsageError,
                       match=r"r18.pkl' is in detectron2's names already \(stem.\*, res2.\* ...\)"):
        convert_checkpoint(tmp_path / "r18.pkl", tmp_path / "again.pkl")
    assert not (tmp_path / "again.pkl").exists()
