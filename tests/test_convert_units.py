"""The converter's parts one function at a time, on a random ResNet-18: each test runs in well
under a second, so `make mutation` (which runs, per mutant, the tests that call the mutated
function) can afford them all.

Every assertion names exact values: the texts a user reads, the fields OUT.json records, the
problems verification reports. Checkpoints are written with torch.save and read back through
`read_checkpoint`.
"""
import argparse
import collections
import fractions
import hashlib
import json
import pathlib
import pickle

import numpy as np
import pytest
import torch
import torchvision
from conftest import random_resnet_state

import convert.api
from convert import VerificationError, convert_checkpoint, verify_file
from convert.arch import Architecture
from convert.cli import build_parser, list_sources
from convert.cli import main as convert_main
from convert.rename import to_detectron2
from convert.sources import SOURCES, extract_trunk, flatten_checkpoint, read_checkpoint
from convert.verify import (
    STAGES,
    VerifyResult,
    build_detectron2_resnet,
    check_loading,
    check_numerics,
    torchvision_stage_outputs,
    verify_weights,
)
from mocobench.utils import d2compat  # noqa: F401  (before detectron2)
from mocobench.utils.errors import UsageError, run_main
from mocobench.utils.fileio import safe_unpickle

R18 = Architecture(18, "basic")


@pytest.fixture
def state():
    """A ResNet-18 trunk as `extract_trunk` returns it: torchvision names, no fc, no
    num_batches_tracked."""
    return {k: v for k, v in random_resnet_state("resnet18", seed=3).items()
            if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}


def _moco(state, prefix="module.encoder_q."):
    return {prefix + k: v for k, v in state.items()}


# -- convert.arch ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, expected", [
    (Architecture(18, "basic"),
     {"name": "ResNet-18", "torchvision": "resnet18", "depth": 18, "block": "basic",
      "groups": 1, "width_per_group": 64}),
    (Architecture(50, "bottleneck", 32, 4),
     {"name": "ResNeXt-50 32x4d", "torchvision": "resnext50_32x4d",
      "depth": 50, "block": "bottleneck", "groups": 32, "width_per_group": 4}),
    (Architecture(101, "bottleneck", 1, 128),
     {"name": "Wide ResNet-101-2", "torchvision": "wide_resnet101_2",
      "depth": 101, "block": "bottleneck", "groups": 1,
      "width_per_group": 128}),
    (Architecture(34, "bottleneck", 2, 64),
     {"name": "ResNeXt-34 2x64d", "torchvision": None, "depth": 34,
      "block": "bottleneck", "groups": 2, "width_per_group": 64}),
])
def test_architecture_as_dict_names_every_field(arch, expected):
    """What OUT.json records under "architecture": every key and value."""
    assert arch.as_dict() == expected


# -- convert.rename --------------------------------------------------------------------------------

def test_to_detectron2_writes_float32_c_ordered_copies(state):
    half = {name: tensor.half() for name, tensor in state.items()}
    # a non-contiguous view
    half["layer1.0.conv1.weight"] = half["layer1.0.conv1.weight"].permute(0, 1, 3, 2)
    half["bn1.weight"] = state["bn1.weight"].double()
    counter = {"layer1.0.bn1.num_batches_tracked": torch.tensor(1000)}
    weights = to_detectron2(half | counter)
    assert list(weights)[:3] \
        == ["stem.conv1.weight", "stem.conv1.norm.weight", "stem.conv1.norm.bias"]
    assert len(weights) == 101
    for name, array in weights.items():
        assert array.flags["C_CONTIGUOUS"] and array.flags["OWNDATA"], name
        assert array.dtype \
            == (np.int64 if name.endswith("num_batches_tracked") else np.float32), name
    np.testing.assert_array_equal(weights["res2.0.conv1.weight"],
                                  half["layer1.0.conv1.weight"].float().numpy())
    np.testing.assert_array_equal(weights["stem.conv1.norm.weight"], state["bn1.weight"].numpy())
    # float32 input: still a copy, never the checkpoint's own memory
    weights = to_detectron2(state)
    assert not np.shares_memory(weights["stem.conv1.weight"], state["conv1.weight"].numpy())
    state["conv1.weight"].add_(1.0)
    assert not np.array_equal(weights["stem.conv1.weight"], state["conv1.weight"].numpy())


def test_to_detectron2_refuses_two_names_that_rename_to_one(state):
    # torchvision's bn1 and an already detectron2-style conv1.norm both become stem.conv1.norm: one
    # would be lost
    with pytest.raises(ValueError) as e:
        to_detectron2({"bn1.weight": state["bn1.weight"], "conv1.norm.weight": state["bn1.weight"]})
    assert str(e.value) == "renaming maps two tensors to 'stem.conv1.norm.weight'"


# -- convert.sources -------------------------------------------------------------------------------

def test_entry_markers_read_top_level_entries(state):
    from convert.sources import _entry

    ckpt = flatten_checkpoint({"state_dict": state, "author": "DenseCL", "epoch": 200})
    assert _entry("author")(ckpt) is True
    assert _entry("author", "DenseCL")(ckpt) is True
    assert _entry("author", "MMSelfSup")(ckpt) is False
    assert _entry("meta")(ckpt) is False
    assert _entry("epoch", 200)(ckpt) is True and _entry("epoch", 199)(ckpt) is False
    # what the markers decide: DenseCL's released file (author entry) is read as DenseCL, at ''
    trunk = extract_trunk(ckpt)
    assert (trunk.source, trunk.author, trunk.prefix, trunk.detected) \
        == ("densecl", "DenseCL", "", True)


def test_generic_discovery_says_detected(state, tmp_path):
    path = tmp_path / "custom.pth"
    torch.save({"weights": {"my_encoder": state}, "step": 3}, path)
    trunk = extract_trunk(read_checkpoint(path))
    assert (trunk.source, trunk.author, trunk.prefix, trunk.detected) \
        == ("generic", "mocobench", "weights.my_encoder.", True)
    trunk = extract_trunk(read_checkpoint(path), prefix="weights.my_encoder.")
    assert (trunk.source, trunk.detected) == ("generic", False)


def test_argparse_args_next_to_framework_objects(state, tmp_path):
    """A checkpoint with plain argparse args (allowed) and a pathlib path (a framework placeholder)
    converts; the summary and OUT.json name the placeholder, and only it."""
    path = tmp_path / "run.pth"
    torch.save({"state_dict": _moco(state), "args": argparse.Namespace(arch="resnet18", lr=0.03),
                "work_dir": pathlib.PosixPath("/runs/moco")}, path)
    report = convert_checkpoint(path, tmp_path / "out.pkl", verify=False)
    assert (report.source, report.opaque) == ("moco", ["pathlib.PosixPath"])
    # numpy data in that bookkeeping (mmengine's HistoryBuffer) is read with numpy's own
    # constructors and dtypes
    torch.save({"state_dict": _moco(state), "work_dir": pathlib.PosixPath("/runs/moco"),
                "history": {"loss": np.arange(3.0), "step": np.int64(7)}}, tmp_path / "np.pth")
    with_numpy = convert_checkpoint(tmp_path / "np.pth", tmp_path / "np.pkl", verify=False)
    assert "pathlib.PosixPath" in with_numpy.opaque \
        and any(n.startswith("numpy.") for n in with_numpy.opaque)
    # the summary names each of them
    [ignored] = [line for line in with_numpy.summary().splitlines() if "ignored" in line]
    assert ignored == ("  ignored          5  framework objects (no weights, read as "
                       "placeholders): numpy._core.multiarray._reconstruct, "
                       "numpy._core.multiarray.scalar, "
                       "numpy.dtype, numpy.ndarray, pathlib.PosixPath")
    assert np.array_equal(safe_unpickle(tmp_path / "np.pkl")["model"]["stem.conv1.weight"],
                          state["conv1.weight"].numpy())
    lines = report.summary().splitlines()
    assert lines[3:6] == [
        "  converted      100  tensors (conv weights, BN weight/bias/running_mean/var)",
        "  ignored          1  framework objects (no weights, read as placeholders): "
        "pathlib.PosixPath",
        "  verified         -  verification skipped (--no-verify)",
    ]
    assert json.loads((tmp_path / "out.json").read_text())["ignored_objects"] \
        == ["pathlib.PosixPath"]


# -- convert.cli -----------------------------------------------------------------------------------

def test_parser_defaults_and_every_flag():
    parser = build_parser()
    assert vars(parser.parse_args([])) \
        == {"input": None, "output": None, "source": "auto", "prefix": None,
            "to": "detectron2", "verify": True, "force": False, "list_dropped": False,
            "list_sources": False}
    args = parser.parse_args(["in.pth", "out.pth", "--source", "moco", "--prefix",
                              "module.encoder_k.", "--to", "torchvision", "--no-verify",
                              "--force", "--list-dropped", "--list-sources"])
    assert vars(args) \
        == {"input": "in.pth", "output": "out.pth", "source": "moco", "prefix": "module.encoder_k.",
            "to": "torchvision", "verify": False, "force": True, "list_dropped": True,
            "list_sources": True}
    # `--source auto` may be given explicitly, as --list-sources says
    for source in ["auto", *SOURCES]:
        assert parser.parse_args(["a.pth", "b.pkl", "--source", source]).source == source
    for bad in (["--source", "AUTO"], ["--source", "generic"], ["--to", "caffe2"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["a.pth", "b.pkl", *bad])
        assert e.value.code == 2


def test_list_sources_columns_line_up():
    lines = list_sources().splitlines()
    assert len(lines) == len(SOURCES) + 2
    assert " ".join(lines[0].split()) == "source author example trunk key layout read from"
    assert " ".join(lines[-1].split()) \
        == ("(other) mocobench <prefix>conv1.weight generic discovery: the one "
            "complete trunk, or --prefix")
    assert [line.split()[0] for line in lines[1:-1]] == list(SOURCES)
    moco = SOURCES["moco"]
    row = next(line for line in lines if line.startswith("moco "))
    # the four columns start where the header's do, each padded with spaces
    starts = [lines[0].index(title)
              for title in ("author", "example trunk key", "layout read from")]
    assert [row.index(moco.author, len("moco")), row.index(moco.example), row.index(moco.layout)] \
        == starts
    assert lines[-1].index("mocobench") == starts[0] and lines[-1].index("<prefix>") == starts[1]
    assert lines[-1].index("generic discovery") == starts[2]
    assert all(line[starts[i] - 2:starts[i]] == "  " for line in lines for i in range(3))


def test_cli_needs_input_and_output():
    for argv in ([], ["only_input.pth"]):
        with pytest.raises(UsageError) as info:
            convert_main(argv)
        assert str(info.value) == "convert needs INPUT and OUTPUT (or --list-sources)"


def test_cli_passes_every_flag_to_the_conversion(state, tmp_path, capsys):
    path, out = tmp_path / "moco.pth.tar", tmp_path / "k.pth"
    momentum = {k: v * 0.5 if v.is_floating_point() else v for k, v in state.items()}
    queue = {"module.queue": torch.randn(8, 4)}
    torch.save({"state_dict": _moco(state) | _moco(momentum, "module.encoder_k.") | queue}, path)
    argv = [str(path), str(out), "--source", "moco", "--prefix", "module.encoder_k.", "--to",
            "torchvision", "--no-verify"]
    assert convert_main(argv) == 0
    assert "  verified         -  verification skipped (--no-verify)" \
        in capsys.readouterr().out.splitlines()
    written = json.loads((tmp_path / "k.json").read_text())
    seconds = written.pop("seconds")
    assert isinstance(seconds, float) and seconds > 0
    assert written == {
        "input": str(path), "input_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "output": str(out), "output_sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "format": "torchvision", "source": "moco", "detected": False, "prefix": "module.encoder_k.",
        "author": "MOCO", "architecture": R18.as_dict(),
        "detectron2_resnets": {"DEPTH": 18, "NUM_GROUPS": 1, "WIDTH_PER_GROUP": 64,
                               "RES2_OUT_CHANNELS": 64, "STRIDE_IN_1X1": False},
        "converted": 100,
        "dropped": [{"key": f"module.encoder_q.{k}",
                     "reason": "another ResNet trunk (module.encoder_q.*)"}
                    for k in state] + [{"key": "module.queue", "reason": "queue of negative keys"}],
        "ignored_objects": [], "verified": 0, "max_rel_error": None, "stage_rel_errors": {},
        "problems": [], "warnings": [],
    }
    loaded = torch.load(out, weights_only=True)
    assert torch.equal(loaded["layer3.1.conv2.weight"], momentum["layer3.1.conv2.weight"])


# -- convert.api -----------------------------------------------------------------------------------

def test_verify_file_reports_the_given_source_and_the_pkl_author(state, tmp_path):
    """DINO's backbone-only release is a bare torchvision state dict: read as DINO only when told
    so."""
    original, pkl = tmp_path / "dino_resnet18_pretrain.pth", tmp_path / "dino.pkl"
    torch.save(state, original)
    convert_checkpoint(original, pkl, source="dino", verify=False)
    report = verify_file(pkl, original, source="dino")
    assert (report.input_path, report.output_path, report.source, report.detected, report.author,
            report.arch, report.prefix, report.converted, report.dropped, report.verified,
            report.problems) == (
        str(original), str(pkl), "dino", False, "DINO", R18, "", [], [], 100, [])
    assert report.summary().splitlines()[:2] == [
        f"input    {original}",
        "source   dino (given), ResNet-18 (basic blocks) under '', __author__ 'DINO'"]
    assert 0 < report.verify_seconds < report.seconds
    auto = verify_file(pkl, original)
    # the pkl's __author__
    assert (auto.source, auto.detected, auto.author) == ("torchvision", True, "DINO")

    data = safe_unpickle(pkl)
    for author, expected in (("someone", "someone"), (None, "torchvision")):
        if author is None:
            del data["__author__"]
        else:
            data["__author__"] = author
        with open(tmp_path / "edited.pkl", "wb") as f:
            pickle.dump(data, f)
        assert verify_file(tmp_path / "edited.pkl", original).author == expected


def test_to_torchvision_verifies_the_file_it_writes(state, tmp_path, monkeypatch, inject_fault,
                                                    capsys):
    """`--to torchvision`: the numerical reference is the state written to the .pth, checked
    against the original tensor by tensor; a fault in it fails verification and nothing is
    written."""
    path, out = tmp_path / "moco.pth.tar", tmp_path / "out.pth"
    torch.save({"state_dict": _moco(state)}, path)
    inject_fault(convert.api, "torchvision_state", lambda tv: tv["layer4.1.bn2.bias"].add_(1.0))
    with pytest.raises(VerificationError) as info:
        convert_checkpoint(path, out, to="torchvision")
    report = info.value.report
    problems = report.problems
    assert problems[0] \
        == "torchvision tensors that differ from the original checkpoint: layer4.1.bn2.bias"
    assert problems[1] \
        == f"res5: relative error {report.stage_errors['res5']:.3g} > 1e-05 against torchvision"
    assert len(problems) == 2 and report.stage_errors["res5"] > 1e-5
    assert str(info.value) \
        == (f"{str(path)!r}: the converted weights failed verification; nothing was written:"
            f"\n  {problems[0]}\n  {problems[1]}")
    assert not out.exists() and not (tmp_path / "out.json").exists()
    lines = report.summary().splitlines()
    assert lines[-4:] == [f"  FAILED    {problems[0]}", f"  FAILED    {problems[1]}", "",
                          f"verification FAILED; nothing written ({report.seconds:.1f} s)"]
    assert report.output_path is None and report.verified == 100 \
        and 0 < report.verify_seconds < report.seconds
    # the command prints the same summary and exits 1
    capsys.readouterr()
    argv = [str(path), str(out), "--to", "torchvision"]
    assert run_main("mocobench convert", convert_main, argv) == 1
    printed = capsys.readouterr()
    assert printed.out.splitlines()[-1].startswith("verification FAILED; nothing written (")
    assert printed.err.splitlines()[0] \
        == (f"mocobench convert: error: {str(path)!r}: the converted weights failed "
            "verification; nothing was written:")
    assert not out.exists()

    monkeypatch.undo()
    inject_fault(convert.api, "torchvision_state",
                 lambda tv: tv.pop("layer2.0.downsample.1.running_var"))
    with pytest.raises(VerificationError) as info:
        convert_checkpoint(path, out, to="torchvision")
    [problem] = info.value.report.problems
    assert problem.startswith("the weights do not load into torchvision's ResNet-18: Error(s) in "
                              "loading state_dict for ResNet:")
    assert 'Missing key(s) in state_dict: "layer2.0.downsample.1.running_var"' in problem
    assert not out.exists()


# -- convert.verify --------------------------------------------------------------------------------

def test_verify_weights_leaves_the_callers_random_stream_alone(state):
    """The random batch comes from its own seeded generator: the same errors every call, whatever
    the global RNG, which verification does not advance."""
    weights = to_detectron2(state)
    # errors that depend on the batch
    weights["res5.0.conv1.weight"] = weights["res5.0.conv1.weight"] * 1.01
    torch.manual_seed(1)
    first = verify_weights(weights, state, R18)
    after = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after), "verification drew from the global RNG"
    torch.manual_seed(2)
    second = verify_weights(weights, state, R18)
    assert first.stage_errors == second.stage_errors and first.stage_errors["res5"] > 1e-5
    assert first.stage_errors["res4"] <= 1e-6
    other_batch = verify_weights(weights, state, R18, seed=1)
    assert other_batch.stage_errors["res5"] != first.stage_errors["res5"]


def test_check_loading_reports_a_missing_key_both_ways(state):
    weights = to_detectron2(state)
    del weights["res2.0.conv1.weight"]
    result = verify_weights(weights, state, R18)
    assert result.problems[:2] == ["detectron2 parameters/buffers not loaded: res2.0.conv1.weight",
                                   "detectron2 backbone tensors missing from the pkl: "
                                   "res2.0.conv1.weight"]
    assert result.verified == 99


def test_check_loading_compares_in_the_models_dtype(state):
    """A float64 array whose change is below float32 resolution: detectron2 holds exactly the pkl's
    value in float32 (no loading problem); the value check still reports the edit, once."""
    weights = to_detectron2(state)
    edited = weights["res2.0.conv1.weight"].astype(np.float64)
    edited[0, 0, 0, 0] += abs(edited[0, 0, 0, 0]) * 1e-12
    weights["res2.0.conv1.weight"] = edited
    result = verify_weights(weights, state, R18)
    assert result.problems \
        == ["pkl tensors that differ from the original checkpoint: res2.0.conv1.weight (from "
            "layer1.0.conv1.weight)"]
    assert result.verified == 100


def _detectron2_model(state, arch=R18):
    model = build_detectron2_resnet(arch)
    loading = VerifyResult()
    check_loading(model, to_detectron2(state), "MOCO", loading)
    assert loading.problems == [] and loading.verified == len(state)
    return model


def _torchvision_model(state, name="resnet18"):
    model = getattr(torchvision.models, name)()
    model.fc = torch.nn.Identity()
    model.load_state_dict(state, strict=False)
    return model.eval()


def test_check_numerics_relative_error_per_stage(state):
    """relative error = max|d2 - tv| / max|tv| per stage; a fault in layer4 leaves res2..res4
    exact."""
    model = _detectron2_model(state)
    faulty = {k: v.clone() for k, v in state.items()}
    faulty["layer4.1.bn2.bias"] += 1.0
    reference = _torchvision_model(faulty)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = VerifyResult()
    check_numerics(model, reference, images, result)
    with torch.no_grad():
        ours, theirs = model(images)["res5"], torchvision_stage_outputs(reference, images)["res5"]
    expected = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert list(result.stage_errors) == list(STAGES)
    assert all(result.stage_errors[s] <= 1e-6 for s in STAGES[:3])
    assert result.stage_errors["res5"] == pytest.approx(expected, rel=1e-6) and 0.01 < expected < 10
    assert result.problems \
        == [f"res5: relative error {result.stage_errors['res5']:.3g} > 1e-05 against torchvision"]


def test_check_numerics_names_both_shapes(state):
    """A reference of another shape (here a ResNet-50 against detectron2's ResNet-18) fails every
    stage."""
    model = _detectron2_model(state)
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().eval()
    result = VerifyResult()
    check_numerics(model, reference, torch.randn(1, 3, 32, 32), result)
    assert result.problems == [
        "res2: detectron2 output (1, 64, 8, 8) vs torchvision (1, 256, 8, 8)",
        "res3: detectron2 output (1, 128, 4, 4) vs torchvision (1, 512, 4, 4)",
        "res4: detectron2 output (1, 256, 2, 2) vs torchvision (1, 1024, 2, 2)",
        "res5: detectron2 output (1, 512, 1, 1) vs torchvision (1, 2048, 1, 1)",
    ]
    assert result.stage_errors == {stage: float("inf") for stage in STAGES}
    assert result.max_rel_error == float("inf")


def test_verify_file_failure_names_both_files_and_every_problem(state, tmp_path):
    original, pkl = tmp_path / "r18.pth", tmp_path / "r18.pkl"
    torch.save(state, original)
    convert_checkpoint(original, pkl, verify=False)
    data = safe_unpickle(pkl)
    data["model"]["res4.1.conv2.weight"] = data["model"]["res4.1.conv2.weight"] * 2
    with open(tmp_path / "edited.pkl", "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(VerificationError) as info:
        verify_file(tmp_path / "edited.pkl", original)
    report = info.value.report
    assert report.problems[0] \
        == ("pkl tensors that differ from the original checkpoint: res4.1.conv2.weight (from "
            "layer3.1.conv2.weight)")
    assert report.problems[1:] \
        == [f"{stage}: relative error {report.stage_errors[stage]:.3g} > 1e-05 against "
            "torchvision" for stage in ("res4", "res5")]
    assert str(info.value) \
        == (f"{str(tmp_path / 'edited.pkl')!r} failed verification against {str(original)!r}:"
            "\n  " + "\n  ".join(report.problems))
    assert report.verified == 100 and report.seconds > 0


def test_convert_checkpoint_refuses_bad_arguments_before_reading(tmp_path):
    """Checked before the input is read: the input need not even exist."""
    source = tmp_path / "r18.pth"
    cases = [
        (dict(output_path=tmp_path / "o.pkl", to="caffe2"),
         "--to 'caffe2': expected one of detectron2, torchvision"),
        (dict(output_path=tmp_path / "o.pth"),
         f"output {str(tmp_path / 'o.pth')!r} must end in .pkl for --to detectron2"),
        (dict(output_path=tmp_path / "o.pkl", to="torchvision"),
         f"output {str(tmp_path / 'o.pkl')!r} must end in .pth for --to torchvision"),
        (dict(output_path=tmp_path / "r18.pth", to="torchvision"),
         f"output {str(source)!r} (or its report {str(tmp_path / 'r18.json')!r}) would overwrite "
         "the input"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UsageError) as info:
            convert_checkpoint(source, **kwargs)
        assert str(info.value) == message
    json_input = tmp_path / "run.json"  # OUT.json of run.pkl would be the input
    with pytest.raises(UsageError) as info:
        convert_checkpoint(json_input, tmp_path / "run.pkl")
    assert str(info.value) \
        == (f"output {str(tmp_path / 'run.pkl')!r} (or its report {str(json_input)!r}) would "
            "overwrite the input")
    assert list(tmp_path.iterdir()) == []


def test_read_converted_says_what_is_wrong(tmp_path):
    from mocobench.utils.converted import read_converted

    cases = {
        "list.pkl": ([1, 2], "is not a converted backbone: expected a dict with a 'model' dict"),
        "no_model.pkl": ({"blobs": {}},
                         "is not a converted backbone: expected a dict with a 'model' dict"),
        "model_list.pkl": ({"model": []},
                           "is not a converted backbone: expected a dict with a 'model' dict"),
        "tensor.pkl": ({"model": {"stem.conv1.weight": np.zeros(2), "res2.0.conv1.weight": [0.5]}},
                       ": model['res2.0.conv1.weight'] is a list, expected a numpy array"),
    }
    for name, (payload, message) in cases.items():
        with open(tmp_path / name, "wb") as f:
            pickle.dump(payload, f)
        with pytest.raises(UsageError) as info:
            read_converted(tmp_path / name)
        assert str(info.value) == f"{tmp_path / name!r}{' ' if message[0] != ':' else ''}{message}"
    good = {"model": {"stem.conv1.weight": np.zeros(2, np.float32)}, "__author__": "MOCO"}
    with open(tmp_path / "good.pkl", "wb") as f:
        pickle.dump(good, f)
    assert read_converted(tmp_path / "good.pkl")["__author__"] == "MOCO"


@pytest.mark.parametrize("edit, first_problems", [
    # a diverged checkpoint's NaN: NaN equals nothing, not even itself after loading
    ("nan", ["tensors that differ from the pkl after loading: res4.0.conv1.weight",
             "pkl tensors that differ from the original checkpoint: res4.0.conv1.weight (from "
             "layer3.0.conv1.weight)"]),
    ("unexpected", ["pkl tensors detectron2 did not use: res5.3.conv1.weight",
                    "pkl tensors with no place in the detectron2 backbone: res5.3.conv1.weight"]),
    ("shape", ["detectron2 parameters/buffers not loaded: res3.0.conv1.weight",
               "shape mismatch for res3.0.conv1.weight: pkl (128, 63, 3, 3), "
               "detectron2 (128, 64, 3, 3)"]),
    ("seven missing", ["detectron2 parameters/buffers not loaded: res2.0.conv1.weight, "
                       "res2.0.conv2.weight, res2.1.conv1.weight, res2.1.conv2.weight, "
                       "res3.0.conv1.weight, res3.0.conv2.weight ... (7 in all)",
                       "detectron2 backbone tensors missing from the pkl: res2.0.conv1.weight, "
                       "res2.0.conv2.weight, res2.1.conv1.weight, res2.1.conv2.weight, "
                       "res3.0.conv1.weight, res3.0.conv2.weight ... (7 in all)"]),
])
def test_check_loading_problem_texts(edit, first_problems, state):
    weights = to_detectron2(state)
    if edit == "nan":
        weights["res4.0.conv1.weight"] = weights["res4.0.conv1.weight"].copy()
        weights["res4.0.conv1.weight"][0, 0, 0, 0] = np.nan
    elif edit == "unexpected":
        weights["res5.3.conv1.weight"] = np.zeros((1,), np.float32)
    elif edit == "shape":
        weights["res3.0.conv1.weight"] = weights["res3.0.conv1.weight"][:, :-1].copy()
    else:
        for name in ("res2.0.conv1.weight", "res2.0.conv2.weight", "res2.1.conv1.weight",
                     "res2.1.conv2.weight", "res3.0.conv1.weight", "res3.0.conv2.weight",
                     "res3.1.conv1.weight"):
            del weights[name]
    result = verify_weights(weights, state, R18)
    assert result.problems[:2] == first_problems
    assert result.verified == {"nan": 99, "unexpected": 100, "shape": 99,
                               "seven missing": 93}[edit]
    if edit == "unexpected":
        assert len(result.problems) == 2 and result.max_rel_error <= 1e-6


def test_help_text_in_full(monkeypatch):
    """`mocobench convert --help` as a user reads it (its spaces collapsed)."""
    # argparse's textwrap would break "weights-only" at its hyphen
    monkeypatch.setenv("COLUMNS", "1000")
    sources = ",".join(["auto", *SOURCES])
    assert " ".join(build_parser().format_help().split()) == " ".join([
        f"usage: mocobench convert [-h] [--source {{{sources}}}] [--prefix PREFIX] [--to "
        "{detectron2,torchvision}] [--no-verify] [--force] [--list-dropped] [--list-sources] "
        "[input] [output]",
        "Convert a ResNet checkpoint (MoCo, DINO, SwAV, Barlow Twins, DenseCL, PixPro, solo-learn, "
        "mmselfsup, VISSL, lightly, timm, torchvision, or any file with one ResNet trunk) into a "
        "detectron2 backbone .pkl or a torchvision .pth, then prove it: detectron2 must load every "
        "trunk tensor and reproduce torchvision's res2..res5 outputs. OUT.json records the "
        "conversion.",
        "positional arguments:",
        "input checkpoint: .pth / .pth.tar / .ckpt / .torch (torch, weights-only), "
        ".safetensors, or .pkl (numpy arrays)",
        "output the file to write: .pkl (detectron2) or .pth (--to torchvision)",
        "options:",
        "-h, --help show this help message and exit",
        f"--source {{{sources}}}",
        "checkpoint layout (default: detect it; --list-sources shows them)",
        "--prefix PREFIX the key prefix of the trunk to convert, e.g. 'module.encoder_k.' (for "
        "files with several trunks and no known layout)",
        "--to {detectron2,torchvision} output format (default: detectron2 .pkl)",
        "--no-verify skip loading into detectron2 and the numerical comparison (not recommended)",
        "--force replace OUTPUT (and OUT.json) when it exists already (default: refuse)",
        "--list-dropped print every key that was not converted (the summary shows one per reason)",
        "--list-sources print the known layouts and exit",
        "exit codes: 0 ok, 1 verification failed (nothing written), 2 bad input",
    ])


def _shapes(builder):
    """{name: shape} of a torchvision ResNet's trunk, built on the meta device (no memory, no
    init)."""
    with torch.device("meta"):
        model = getattr(torchvision.models, builder)()
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("fc.")}


@pytest.mark.parametrize("builder, expected", [
    ("resnet18", Architecture(18, "basic", 1, 64)),
    ("resnet34", Architecture(34, "basic", 1, 64)),
    ("resnet50", Architecture(50, "bottleneck", 1, 64)),
    ("resnet152", Architecture(152, "bottleneck", 1, 64)),
    ("resnext50_32x4d", Architecture(50, "bottleneck", 32, 4)),
    ("resnext101_64x4d", Architecture(101, "bottleneck", 64, 4)),
    ("wide_resnet50_2", Architecture(50, "bottleneck", 1, 128)),
])
def test_infer_architecture_from_shapes(builder, expected):
    from convert.arch import infer_architecture

    assert infer_architecture(_shapes(builder)) == expected


def test_infer_architecture_refusals_say_what_they_found():
    from convert.arch import infer_architecture

    r18 = _shapes("resnet18")
    plain_r = "only plain torchvision-style ResNets convert to detectron2's ResNet"
    cases = [
        (r18 | {"conv1.0.weight": (32, 3, 3, 3)},
         "x has a deep stem (ResNet-C/D/T: conv1 is a sequence of 3x3 convs) (e.g. "
         f"'conv1.0.weight'): {plain_r}"),
        (r18 | {"layer2.0.downsample.2.weight": (128,), "layer1.0.se.fc1.weight": (4, 64, 1, 1)},
         "x has average-pool shortcuts (ResNet-D: downsample = pool, conv, BN) (e.g. "
         "'layer2.0.downsample.2.weight'); squeeze-and-excitation blocks (SE-ResNet) (e.g. "
         f"'layer1.0.se.fc1.weight'): {plain_r}"),
        (r18 | {"conv1.weight": (64, 3, 3, 3)},
         "x: conv1.weight has shape (64, 3, 3, 3), a plain ResNet stem is (64, 3, 7, 7) (a "
         "CIFAR-style 3x3 stem?)"),
        (r18 | {"conv1.weight": (128, 3, 7, 7)},
         "x: conv1.weight has shape (128, 3, 7, 7), a plain ResNet stem is (64, 3, 7, 7) (a "
         "width-multiplied ResNet such as SwAV's or SimCLR's RN50w2?)"),
        (r18 | {"conv1.weight": (64, 1, 7, 7)},
         "x: conv1.weight has shape (64, 1, 7, 7), a plain ResNet stem is (64, 3, 7, 7)"),
        ({k: v for k, v in r18.items() if k != "conv1.weight"},
         "x: conv1.weight has shape (), a plain ResNet stem is (64, 3, 7, 7)"),
        ({k: v for k, v in r18.items() if "running" not in k},
         "x: its norm layers have no running statistics (GroupNorm?); detectron2's FrozenBN/BN "
         "need BatchNorm statistics"),
        ({k: v for k, v in r18.items() if not k.startswith("layer4.1.")},
         "x has basic blocks per stage (2, 2, 2, 1), which is no ResNet depth we convert (R18: "
         "basic (2, 2, 2, 2), R34: basic (3, 4, 6, 3), R50: bottleneck (3, 4, 6, 3), R101: "
         "bottleneck (3, 4, 23, 3), R152: bottleneck (3, 8, 36, 3))"),
    ]
    for shapes, message in cases:
        with pytest.raises(UsageError) as info:
            infer_architecture(shapes, "x")
        assert str(info.value) == message
    with pytest.raises(UsageError) as info:
        infer_architecture({k: v for k, v in r18.items() if k != "conv1.weight"})
    assert str(info.value).startswith("the trunk: conv1.weight has shape ()")


def test_flatten_checkpoint_keys_entries_and_refusals(state):
    obj = {"epoch": 7, "arch": "resnet18", "model": {"conv1.weight": state["conv1.weight"]},
           "optimizer": {"state": {0: {"momentum_buffer": torch.ones(2)}},
                         "param_groups": [{"lr": 0.1}]},
           "ema": [torch.zeros(1), (np.arange(3.0), np.array(["a"]))],
           "names": np.array(["x", "y"])}
    ckpt = flatten_checkpoint(obj, "ck.pth")
    assert ckpt.path == "ck.pth" and ckpt.opaque == []
    assert list(ckpt.tensors) \
        == ["conv1.weight", "optimizer.state.0.momentum_buffer", "ema.0", "ema.1.0"]
    assert ckpt.tensors["conv1.weight"] is state["conv1.weight"]
    assert torch.equal(ckpt.tensors["ema.1.0"], torch.arange(3.0, dtype=torch.float64))
    # a string array is no weights: an entry
    assert ckpt.entries.pop("names").tolist() == ["x", "y"]
    assert ckpt.entries \
        == {"epoch": 7, "arch": "resnet18", "optimizer": "<container>", "ema": "<container>"}
    # the first wrapper that is a dict is unwrapped, the others are entries
    ckpt = flatten_checkpoint({"state_dict": [1], "model": {"a": torch.ones(1)},
                               "net": {"b": torch.ones(1)}})
    assert list(ckpt.tensors) == ["a", "net.b"] and ckpt.path == "checkpoint"
    for obj, message in [
        ([state["conv1.weight"]],
         "'x.pth' is not a checkpoint: it holds a list, expected a dict of tensors"),
        ({"epoch": 3, "args": {"lr": 0.1}, "b": "s"},
         "'x.pth' holds no tensors (found entries: args, b, epoch); "
         "expected a model checkpoint"),
        ({}, "'x.pth' holds no tensors (found entries: nothing); expected a model checkpoint"),
        ({f"e{i:02d}": i for i in range(12)},
         "'x.pth' holds no tensors (found entries: e00, e01, e02, e03, e04, e05, "
         "e06, e07, e08, e09); expected a model checkpoint"),
    ]:
        with pytest.raises(UsageError) as info:
            flatten_checkpoint(obj, "x.pth")
        assert str(info.value) == message


def test_extract_trunk_of_a_moco_checkpoint_names_every_key(state):
    head = {"fc.0.weight": torch.randn(4, 512), "fc.0.bias": torch.zeros(4)}
    counters = {"bn1.num_batches_tracked": torch.tensor(5)}
    obj = {"epoch": 200, "optimizer": {"state": {0: {"momentum_buffer": torch.ones(1)}}},
           "state_dict": _moco(state | head | counters) | _moco(state, "module.encoder_k.") |
           {"module.queue": torch.randn(2, 2), "module.queue_ptr": torch.zeros(1),
            "module.extra": torch.ones(1)}}
    trunk = extract_trunk(flatten_checkpoint(obj, "m.pth"))
    assert (trunk.source, trunk.author, trunk.prefix, trunk.arch, trunk.detected, trunk.opaque) == (
        "moco", "MOCO", "module.encoder_q.", R18, True, [])
    assert list(trunk.state) == list(state) and all(trunk.state[k] is state[k] for k in state)
    assert trunk.original_keys == {k: f"module.encoder_q.{k}" for k in state}
    dropped = dict(trunk.dropped)
    assert len(trunk.dropped) == 3 + 100 + 3 + 1
    assert {k: dropped[k] for k in ("module.encoder_q.fc.0.weight", "module.encoder_q.fc.0.bias",
                                    "module.encoder_q.bn1.num_batches_tracked",
                                    "module.encoder_k.conv1.weight", "module.queue",
                                    "module.queue_ptr", "module.extra",
                                    "optimizer.state.0.momentum_buffer")} == {
        "module.encoder_q.fc.0.weight": "projection head (MoCo v1 linear fc / v2 MLP fc.0, fc.2)",
        "module.encoder_q.fc.0.bias": "projection head (MoCo v1 linear fc / v2 MLP fc.0, fc.2)",
        "module.encoder_q.bn1.num_batches_tracked": "BN num_batches_tracked (detectron2 has no "
                                                    "such buffer)",
        "module.encoder_k.conv1.weight": "key (momentum) encoder",
        "module.queue": "queue of negative keys", "module.queue_ptr": "queue pointer",
        "module.extra": "not part of the trunk",
        "optimizer.state.0.momentum_buffer": "optimizer state"}
    # --prefix with the source given: that source's names for everything else
    trunk = extract_trunk(flatten_checkpoint(obj, "m.pth"), "moco", prefix="module.encoder_k.")
    assert (trunk.source, trunk.prefix, trunk.detected) == ("moco", "module.encoder_k.", False)
    assert dict(trunk.dropped)["module.encoder_q.conv1.weight"] \
        == "another ResNet trunk (module.encoder_q.*)"


def test_extract_trunk_refusals_say_what_they_found(state):
    from convert.sources import key_prefixes

    plain = flatten_checkpoint(dict(state), "p.pth")
    lacking = flatten_checkpoint({k: v for k, v in state.items()
                                  if not k.startswith("layer1.1.bn")}, "p.pth")
    extra = flatten_checkpoint(state | {"layer1.0.extra.weight": torch.ones(1)}, "p.pth")
    reshaped = flatten_checkpoint(state | {"layer1.0.conv1.weight": torch.ones(64, 64, 1, 1)},
                                  "p.pth")
    d2 = flatten_checkpoint(to_detectron2(state), "d2.pkl")
    heads = flatten_checkpoint({"head.a": torch.ones(1), "head.b": torch.ones(1),
                                "x": torch.ones(1)}, "h.pth")
    two = flatten_checkpoint(_moco(state, "a.") | _moco(state, "b."), "two.pth")
    cases = [
        (plain, dict(source="nope"),
         "unknown --source 'nope'; expected auto or one of " + ", ".join(SOURCES)),
        (plain, dict(prefix="module."),
         "'p.pth': no ResNet trunk under --prefix 'module.' (no module.conv1.* next "
         "to module.layer1.0.*). Trunks found: ''"),
        (heads, dict(prefix="head."),
         "'h.pth': no ResNet trunk under --prefix 'head.' (no head.conv1.* next to "
         "head.layer1.0.*). Trunks found: none"),
        (plain, dict(source="moco"), "'p.pth' is not a moco checkpoint: no ResNet trunk at "
                                     "'module.encoder_q.conv1.weight' or 'encoder_q.conv1.weight' "
                                     f"(it holds keys under: {key_prefixes(state)})"),
        (lacking, {}, "'p.pth': the trunk under '' is a ResNet-18 that lacks 8 tensor(s): "
                      "layer1.1.bn1.bias, layer1.1.bn1.running_mean, layer1.1.bn1.running_var, "
                      "layer1.1.bn1.weight, layer1.1.bn2.bias, layer1.1.bn2.running_mean, "
                      "layer1.1.bn2.running_var, layer1.1.bn2.weight"),
        (extra, {}, "'p.pth': the trunk under '' holds tensors a torchvision ResNet-18 does not "
                    "have (not a plain ResNet?): layer1.0.extra.weight"),
        (reshaped, {}, "'p.pth': the trunk under '': 'layer1.0.conv1.weight' has shape "
                       "(64, 64, 1, 1), a torchvision ResNet-18 has (64, 64, 3, 3)"),
        (d2, {}, "'d2.pkl' is in detectron2's names already (stem.*, res2.* ...): a converted "
                 "backbone? Pass it to transfer as MODEL.WEIGHTS, or convert the original "
                 "checkpoint"),
        (heads, {}, "'h.pth' holds no ResNet trunk: no prefix with conv1.* next to layer1.0.* "
                    "(torchvision names) or 0.weight next to 4.0.* (nn.Sequential of its "
                    "children). It holds keys under: head (2), x (1)"),
        (two, {}, "'two.pth' holds 2 complete ResNet trunks and no known layout says which one is "
                  "the encoder: 'a.' (ResNet-18), 'b.' (ResNet-18); choose one with --prefix (e.g. "
                  "--prefix 'a.')"),
    ]
    for ckpt, kwargs, message in cases:
        with pytest.raises(UsageError) as info:
            extract_trunk(ckpt, **kwargs)
        assert str(info.value) == message
    for count, tail in ((8, "layer1.0.extra7.weight"), (9, "layer1.0.extra7.weight ...")):
        extras = {f"layer1.0.extra{i}.weight": torch.ones(1) for i in range(count)}
        with pytest.raises(UsageError) as info:
            extract_trunk(flatten_checkpoint(state | extras, "p.pth"))
        assert str(info.value).endswith(", layer1.0.extra6.weight, " + tail)
    twelve = flatten_checkpoint({k: v for k, v in state.items()
                                 if not k.startswith(("layer1.1.bn", "layer1.0.bn1."))}, "p.pth")
    # a generic trunk lacking blocks: discovery gives its first error
    with pytest.raises(UsageError) as info:
        extract_trunk(flatten_checkpoint(_moco({k: v for k, v in state.items()
                                                if not k.startswith("layer2.1.bn")},
                                               "enc."), "g.pth"))
    assert str(info.value).startswith("'g.pth': the trunk under 'enc.' is a ResNet-18 that lacks 8 "
                                      "tensor(s): enc.layer2.1.bn1.bias, ")
    with pytest.raises(UsageError) as info:
        extract_trunk(twelve)
    message = str(info.value)
    assert message.startswith("'p.pth': the trunk under '' is a ResNet-18 that lacks 12 tensor(s): "
                              "layer1.0.bn1.bias, ")
    assert message.endswith(", layer1.1.bn1.weight ...") and message.count(", ") == 7


def test_convert_checkpoint_writes_the_pkl_and_its_report(state, tmp_path):
    path, out = tmp_path / "moco_r18.pth.tar", tmp_path / "r18.pkl"
    head = {"fc.weight": torch.randn(128, 512), "fc.bias": torch.zeros(128)}
    torch.save({"epoch": 200, "state_dict": _moco(state | head)}, path)
    report = convert_checkpoint(path, out)
    with open(out, "rb") as f:
        raw = f.read()
    # pickle protocol 4, as MoCo's converter and detectron2's model zoo files
    assert raw[:2] == b"\x80\x04"
    data = safe_unpickle(out)
    model = data.pop("model")
    assert data == {"__author__": "MOCO", "matching_heuristics": True, "architecture": "ResNet-18",
                    "resnets": {"DEPTH": 18, "NUM_GROUPS": 1, "WIDTH_PER_GROUP": 64,
                                "RES2_OUT_CHANNELS": 64, "STRIDE_IN_1X1": False}}
    expected = to_detectron2(state)
    assert list(model) == list(expected)
    assert all(np.array_equal(model[k], expected[k]) and model[k].dtype == np.float32
               for k in expected)
    assert report.converted[:3] == [("module.encoder_q.conv1.weight", "stem.conv1.weight"),
                                    ("module.encoder_q.bn1.weight", "stem.conv1.norm.weight"),
                                    ("module.encoder_q.bn1.bias", "stem.conv1.norm.bias")]
    assert report.converted == [(f"module.encoder_q.{k}", d2) for k, d2 in zip(state, expected)]
    assert report.dropped \
        == [("module.encoder_q.fc.weight", "projection head (MoCo v1 linear fc / v2 MLP fc.0, "
                                           "fc.2)"),
            ("module.encoder_q.fc.bias", "projection head (MoCo v1 linear fc / v2 MLP fc.0, fc.2)")]
    assert (report.input_path, report.output_path, report.json_path, report.to) == (
        str(path), str(out), str(tmp_path / "r18.json"), "detectron2")
    assert (report.source, report.detected, report.author, report.arch, report.prefix,
            report.opaque) == (
        "moco", True, "MOCO", R18, "module.encoder_q.", [])
    assert report.input_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert report.output_sha256 == hashlib.sha256(raw).hexdigest()
    assert report.verified == 100 and report.problems == [] \
        and list(report.stage_errors) == list(STAGES)
    assert report.max_rel_error == max(report.stage_errors.values()) <= 1e-5
    assert 0 < report.verify_seconds < report.seconds
    text = (tmp_path / "r18.json").read_text()
    assert text == json.dumps(report.as_dict(), indent=2) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moco_r18.pth.tar", "r18.json", "r18.pkl"]


def test_detectron2_backbone_settings():
    """The `_moco` transfer configs' input settings (RGB, torchvision's ImageNet mean/std in 0-255:
    0.485/0.456/0.406 and 0.229/0.224/0.225 times 255) and the trunk's architecture, every stage
    out, nothing frozen."""
    from detectron2.layers import FrozenBatchNorm2d

    from convert.verify import detectron2_resnet_cfg

    cfg = detectron2_resnet_cfg(Architecture(50, "bottleneck", 32, 4), norm="BN")
    assert (cfg.MODEL.DEVICE, cfg.INPUT.FORMAT, cfg.MODEL.BACKBONE.FREEZE_AT) == ("cpu", "RGB", 0)
    assert cfg.MODEL.PIXEL_MEAN == pytest.approx([0.485 * 255, 0.456 * 255, 0.406 * 255])
    assert cfg.MODEL.PIXEL_STD == pytest.approx([0.229 * 255, 0.224 * 255, 0.225 * 255])
    assert (cfg.MODEL.RESNETS.OUT_FEATURES, cfg.MODEL.RESNETS.NORM) \
        == (["res2", "res3", "res4", "res5"], "BN")
    assert {k: cfg.MODEL.RESNETS[k]
            for k in ("DEPTH", "NUM_GROUPS", "WIDTH_PER_GROUP", "RES2_OUT_CHANNELS",
                      "STRIDE_IN_1X1")} == {"DEPTH": 50, "NUM_GROUPS": 32, "WIDTH_PER_GROUP": 4,
                                            "RES2_OUT_CHANNELS": 256, "STRIDE_IN_1X1": False}
    assert detectron2_resnet_cfg(R18).MODEL.RESNETS.NORM == "FrozenBN"
    model = build_detectron2_resnet(R18)
    assert not model.training and isinstance(model.stem.conv1.norm, FrozenBatchNorm2d)
    assert {p.device.type for p in model.parameters()} == {"cpu"} \
        and all(p.requires_grad for p in model.parameters())
    assert model.res2[0].conv1.weight.shape == (64, 64, 3, 3) \
        and model.res5[1].conv2.weight.shape == (512, 512, 3, 3)
    assert isinstance(build_detectron2_resnet(R18, norm="BN").stem.conv1.norm, torch.nn.BatchNorm2d)


def test_is_array_takes_numeric_arrays_only():
    from convert.sources import _is_array

    for value in (torch.ones(1), np.zeros(2, np.float32), np.arange(3), np.array([True]),
                  np.array([1j]), np.uint8(3), np.float64(0.5)):
        assert _is_array(value) is True, value
    for value in (np.array(["a"]), np.array([None], dtype=object), [1.0], 1.0, "x", None,
                  {"a": torch.ones(1)}):
        assert _is_array(value) is False, value


def test_configure_resnet_takes_the_pkls_architecture(state, tmp_path):
    from detectron2.config import get_cfg

    from transfer.config import configure_resnet

    torch.save(state, tmp_path / "r18.pth")
    pkl = str(tmp_path / "r18.pkl")
    convert_checkpoint(tmp_path / "r18.pth", pkl, verify=False)

    cfg = get_cfg()  # GeneralizedRCNN with detectron2's default Res5ROIHeads: res5 of bottlenecks
    cfg.MODEL.WEIGHTS = pkl
    with pytest.raises(UsageError) as info:
        configure_resnet(cfg)
    assert str(info.value) \
        == (f"MODEL.WEIGHTS {pkl!r} holds a ResNet-18 (basic blocks) but MODEL.ROI_HEADS.NAME "
            "Res5ROIHeads builds res5 from bottleneck blocks; use an FPN config")
    cfg = get_cfg()
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    assert configure_resnet(cfg, pkl) \
        == ["MODEL.RESNETS from r18.pkl (ResNet-18): DEPTH 18, RES2_OUT_CHANNELS 64, "
            "STRIDE_IN_1X1 False"]
    assert {k: cfg.MODEL.RESNETS[k]
            for k in ("DEPTH", "NUM_GROUPS", "WIDTH_PER_GROUP", "RES2_OUT_CHANNELS",
                      "STRIDE_IN_1X1")} == R18.detectron2_resnets()
    assert configure_resnet(cfg, pkl) == []  # already so
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"  # no ROI heads, whatever their default name
    cfg.MODEL.WEIGHTS = pkl
    assert len(configure_resnet(cfg)) == 1 and cfg.MODEL.RESNETS.DEPTH == 18
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 101
    cfg.MODEL.WEIGHTS = pkl
    with pytest.raises(UsageError) as info:
        configure_resnet(cfg)
    assert str(info.value) \
        == (f"MODEL.RESNETS.DEPTH is 101 but MODEL.WEIGHTS {pkl!r} holds a ResNet-18 (DEPTH 18); "
            "drop the override or convert the matching checkpoint")
    # weights without a recorded architecture leave the config as it is
    with open(tmp_path / "list.pkl", "wb") as f:
        pickle.dump([1], f)
    with open(tmp_path / "zoo.pkl", "wb") as f:
        pickle.dump({"model": {}, "resnets": "R-50"}, f)
    for path in (str(tmp_path / "r18.pth"), str(tmp_path / "absent.pkl"),
                 str(tmp_path / "list.pkl"), str(tmp_path / "zoo.pkl"), ""):
        cfg = get_cfg()
        cfg.MODEL.RESNETS.DEPTH = 101
        cfg.MODEL.WEIGHTS = path
        assert configure_resnet(cfg) == [] and cfg.MODEL.RESNETS.DEPTH == 101, path


def test_infer_architecture_reads_groups_only_from_a_whole_division():
    """layer1.0.conv2 of (width, width / groups) gives groups and width_per_group; a shape that is
    no grouped conv leaves the defaults (the trunk's shape check then names the tensor)."""
    from convert.arch import infer_architecture

    r50 = _shapes("resnet50")
    assert infer_architecture(r50 | {"layer1.0.conv2.weight": (256, 8, 3, 3)}) \
        == Architecture(50, "bottleneck", 32, 8)
    for odd in ((100, 30, 3, 3), (64, 0, 3, 3)):
        assert infer_architecture(r50 | {"layer1.0.conv2.weight": odd}) \
            == Architecture(50, "bottleneck", 1, 64)
    assert infer_architecture({k: v for k, v in r50.items() if k != "layer1.0.conv2.weight"}) == \
        Architecture(50, "bottleneck", 1, 64)
    # basic blocks have no groups (torchvision's BasicBlock refuses them): never read from their
    # conv2
    assert infer_architecture(_shapes("resnet18") | {"layer1.0.conv2.weight": (64, 32, 3, 3)}) \
        == R18


def _sequential(state, prefix):
    """lightly's backbone, nn.Sequential(*list(resnet.children())[:-1]): children numbered 0
    (conv1) ... 7 (layer4)."""
    numbers = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    return {prefix + numbers[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]: v
            for k, v in state.items()}


def test_trunk_prefixes_in_both_namings(state):
    from convert.sources import _candidate_prefixes, _naming_at, _rename

    keys = (_moco(state, "b.") | _sequential(state, "seq.") | _moco(state, "enc.layer1.0.inner.")
            | {"xlayer1.0.w": torch.ones(1), "only.layer1.0.w": torch.ones(1),
               "only.4.0.w": torch.ones(1)})
    assert _candidate_prefixes(keys) == ["b.", "seq.", "enc.layer1.0.inner."]  # shortest first
    assert [_naming_at(keys, p)
            for p in ("b.", "seq.", "enc.layer1.0.inner.", "enc.", "only.", "")] == [
        "torchvision", "sequential", "torchvision", None, None, None]
    assert _candidate_prefixes(_sequential(state, "")) == [""]
    assert [_rename(n, "sequential")
            for n in ("0.weight", "1.running_var", "4.0.conv1.weight", "7.1.bn2.bias",
                      "2.x", "8.y", "fc.weight")] == [
        "conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer4.1.bn2.bias", None, None,
        None]
    assert _rename("4.0.conv1.weight", "torchvision") == "4.0.conv1.weight"
    trunk = extract_trunk(flatten_checkpoint(_sequential(state, "backbone.")
                                             | {"head.w": torch.ones(1)}, "l.pth"))
    assert (trunk.source, trunk.prefix, trunk.original_keys["layer2.1.bn1.weight"]) \
        == ("lightly", "backbone.", "backbone.5.1.bn1.weight")
    assert all(trunk.state[k] is v for k, v in zip(state, _sequential(state, "backbone.").values()))


def test_timm_checkpoints_name_their_model(state):
    """timm's train.py saves args (argparse.Namespace) with the model name: plain ResNets convert,
    others are refused by name."""
    def ckpt(args):
        return flatten_checkpoint({"state_dict": state, "arch": "x", "version": 2, "args": args},
                                  "t.pth.tar")

    for name in ("resnet18", "resnet50.a1_in1k", "resnext101_32x8d", "resnext50_32x4d.fb_ssl",
                 "wide_resnet101_2", "resnet152"):
        trunk = extract_trunk(ckpt(argparse.Namespace(model=name)))
        assert (trunk.source, trunk.author) == ("timm", "timm"), name
    for args in (None, argparse.Namespace(lr=0.1)):  # no model name: nothing to refuse
        assert extract_trunk(ckpt(args)).source == "timm"
    for name in ("resnet50d", "seresnet50", "resnetaa50", "resnet26", "xresnet50",
                 "resnext50d_32x4d"):
        with pytest.raises(UsageError) as info:
            extract_trunk(ckpt(argparse.Namespace(model=name)))
        assert str(info.value) == (
            f"'t.pth.tar' is a timm {name!r} (args.model): not a plain ResNet (timm's "
            "anti-aliased, blur-pool, deep-stem, SE and ECA variants compute something "
            "detectron2's ResNet does not); supported: resnet18 ... resnet152, resnext*, "
            "wide_resnet*")


def test_framework_globals_only_when_every_global_is_bookkeeping(tmp_path):
    from convert.sources import _framework_globals, _numpy_global

    def globals_of(name, obj, **kwargs):
        torch.save(obj, tmp_path / name, **kwargs)
        return _framework_globals(str(tmp_path / name))

    path = pathlib.PosixPath("/runs/moco")
    with_numpy = globals_of("np.pth",
                            {"p": path, "h": np.arange(3.0), "args": argparse.Namespace(lr=0.1)})
    assert "pathlib.PosixPath" in with_numpy and with_numpy == sorted(with_numpy)
    assert "argparse.Namespace" not in with_numpy \
        and all(n.startswith(("pathlib.", "numpy.")) for n in with_numpy)
    assert all(_numpy_global(n) is not None for n in with_numpy if n.startswith("numpy."))
    assert globals_of("p.pth", {"p": path, "t": collections.defaultdict(int)}) == [
        # omegaconf-style type references
        "builtins.int", "collections.defaultdict", "pathlib.PosixPath"]
    # no framework object: the refusal stands
    assert globals_of("np_only.pth", {"h": np.arange(3.0)}) == []
    # another global: refused
    assert globals_of("odd.pth", {"p": path, "f": fractions.Fraction(1, 3)}) == []
    # not a zip
    assert globals_of("legacy.pth", {"p": path}, _use_new_zipfile_serialization=False) == []
    assert _numpy_global("numpy.ndarray") is np.ndarray
    assert _numpy_global("numpy.dtypes.Float64DType") is np.dtypes.Float64DType
    for name in ("numpy.linalg.inv", "numpy.dtypes.NoSuchDType", "numpy.core.multiarray.array",
                 "os.system"):
        assert _numpy_global(name) is None, name


def test_unreadable_safetensors_say_what_they_are(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    cases = [
        ("absent.safetensors",
         f"checkpoint {str(tmp_path / 'absent.safetensors')!r} does not exist"),
        ("bad.safetensors", f"{str(tmp_path / 'bad.safetensors')!r} is not a readable safetensors "
                            "file: "),
    ]
    for name, message in cases:
        with pytest.raises(UsageError) as info:
            read_checkpoint(tmp_path / name)
        assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)
        assert str(info.value) == message or message.endswith(": ")


def test_a_trunk_missing_a_tensor_does_not_fit_torchvisions_resnet(state):
    """build_torchvision_resnet: a trunk state without one of its tensors is refused naming it;
    num_batches_tracked alone may be absent (the trunk as extracted)."""
    from convert.verify import build_torchvision_resnet

    model = build_torchvision_resnet(R18, state)
    assert torch.equal(model.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
    del state["layer1.0.conv1.weight"]
    with pytest.raises(UsageError) as e:
        build_torchvision_resnet(R18, state)
    assert str(e.value) == ("the weights do not fit torchvision's ResNet-18: missing "
                            "['layer1.0.conv1.weight'], unexpected []")


def test_the_numerical_error_is_relative_however_small_the_activations(state):
    """verify_weights' stage errors are max |ours - torchvision's| / max |torchvision's|: a trunk
    whose BN layers scale by 1e-3 (every stage's output far below 1) with its stem weights 1 %
    off shows that 1 % at each stage, and fails verification (an absolute measure would see
    1e-5 and less)."""
    for key in list(state):
        if ".bn" in "." + key or ".downsample.1." in key:  # every BN: y = 1e-3 x
            leaf = key.rsplit(".", 1)[1]
            state[key] = (torch.full_like(state[key], 1e-3) if leaf == "weight" else
                          torch.ones_like(state[key]) if leaf == "running_var" else
                          torch.zeros_like(state[key]))  # bias, running_mean
    weights = to_detectron2(state)
    assert verify_weights(weights, state, R18).problems == []
    weights["stem.conv1.weight"] = weights["stem.conv1.weight"] * np.float32(1.01)
    result = verify_weights(weights, state, R18)
    assert [result.stage_errors[s] for s in ("res2", "res3", "res4")] \
        == pytest.approx([0.01] * 3, abs=1e-4)
    assert "res2: relative error 0.01 > 1e-05 against torchvision" in result.problems
