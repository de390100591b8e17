"""Every message of issue 24 ("Silent changes" and "Messages"), one table row each: the command
line run through mocobench.cli.main, its input made by the real writer (torch.save of a torchvision
model, `mocobench convert`, timm's CheckpointSaver, a shipped config), the exit code and the exact
one line on stderr (no traceback).

Then what a row cannot show: --force replaces, OUT.json records the timm warning, `mocobench
configs` fits the terminal with whole sentences, and a closed stdout pipe ends quietly.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mocobench import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_CFG = "configs/pretrain/synth_R18_cpu.yaml"
TRANSFER_CFG = "configs/detection/synth_voc_R18_FPN_cpu_moco.yaml"


@pytest.fixture(scope="module")
def f(tmp_path_factory):
    """The inputs, each made by the tool that makes it for real; returns {name: path}."""
    import torchvision

    root = tmp_path_factory.mktemp("messages")
    paths = {name: str(root / name) for name in (
        "r18.pth", "r18.pkl", "other.pkl", "module.pth", "empty.pth", "empty.pkl", "run",
        "pipeline_typo.yaml", "transfer_r50.yaml", "timm")}
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), paths["r18.pth"])
    # a real converted .pkl (and its OUT.json), verified
    assert cli.main(["convert", paths["r18.pth"], paths["r18.pkl"]]) == 0
    # OUT.json of another conversion, its .pkl gone
    shutil.copy(str(root / "r18.json"), str(root / "other.json"))
    # torch.save(model), not model.state_dict()
    torch.save(torchvision.models.resnet18(), paths["module.pth"])
    # an interrupted download: the file exists, nothing in it
    open(paths["empty.pth"], "wb").close()
    open(paths["empty.pkl"], "wb").close()
    os.makedirs(paths["run"])  # a run directory given where its checkpoint belongs
    with open(paths["pipeline_typo.yaml"], "w") as out:
        out.write(f'_BASE_: "{REPO}/configs/pipeline/tiny_cpu.yaml"\nTRANSFER:\n  SEEDZ: 2\n')
    with open(paths["transfer_r50.yaml"], "w") as out:  # DEPTH 50 = detectron2's default
        out.write(f'_BASE_: "{REPO}/{TRANSFER_CFG}"\nMODEL:\n  RESNETS:\n    DEPTH: 50\n')
    # timm's train.py checkpoint of its blur-pool ResNet-18, saved without args: nothing names
    # the model, and resnetblur18's weights are key for key a plain ResNet-18's
    timm = pytest.importorskip("timm")
    from timm.utils import CheckpointSaver

    model = timm.create_model("resnetblur18")
    os.makedirs(paths["timm"])
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1),
                            checkpoint_dir=paths["timm"], recovery_dir=paths["timm"])
    saver.save_checkpoint(epoch=0)
    paths["timm.pth.tar"] = os.path.join(paths["timm"], "last.pth.tar")
    return paths


TIMM_WARNING = ("{path!r} names no timm model (no args.model / config.json architecture): "
                "converted as a plain ResNet-18, but anti-aliased (resnetaa*), blur-pool "
                "(resnetblur*) and other variants without weights of their own cannot be told "
                "apart from the weights; check which model it was")

# (id, argv from the inputs, exit code, the one stderr line from the inputs)
MESSAGES = [
    # -- silent changes -------------------------------------------------------------------------
    ("convert onto an existing .pkl",
     lambda f: ["convert", f["r18.pth"], f["r18.pkl"]], 2,
     lambda f: f"mocobench convert: error: output {f['r18.pkl']!r} already exists; pass --force "
               "to replace it, or choose another output"),
    ("convert onto an existing OUT.json",
     lambda f: ["convert", f["r18.pth"], f["other.pkl"]], 2,
     lambda f: f"mocobench convert: error: output {f['other.pkl'][:-4] + '.json'!r} already "
               "exists; pass --force to replace it, or choose another output"),
    ("command-line DEPTH 50 (the default) against a ResNet-18 .pkl",
     lambda f: ["transfer", "--config-file", TRANSFER_CFG, "MODEL.WEIGHTS", f["r18.pkl"],
                "MODEL.RESNETS.DEPTH", "50", "OUTPUT_DIR", f["run"] + "/t"], 2,
     lambda f: f"mocobench transfer: error: MODEL.RESNETS.DEPTH is 50 but MODEL.WEIGHTS "
               f"{f['r18.pkl']!r} holds a ResNet-18 (DEPTH 18); drop the override or convert the "
               "matching checkpoint"),
    ("yaml DEPTH 50 (the default) against a ResNet-18 .pkl",
     lambda f: ["transfer", "--config-file", f["transfer_r50.yaml"], "MODEL.WEIGHTS", f["r18.pkl"],
                "OUTPUT_DIR", f["run"] + "/t"], 2,
     lambda f: f"mocobench transfer: error: MODEL.RESNETS.DEPTH is 50 but MODEL.WEIGHTS "
               f"{f['r18.pkl']!r} holds a ResNet-18 (DEPTH 18); drop the override or convert the "
               "matching checkpoint"),
    ("timm checkpoint without a model name: converted with a warning",
     lambda f: ["convert", f["timm.pth.tar"], f["run"] + "/timm.pkl"], 0,
     lambda f: "mocobench convert: warning: " + TIMM_WARNING.format(path=f["timm.pth.tar"])),
    # -- messages -------------------------------------------------------------------------------
    ("empty .pth",
     lambda f: ["convert", f["empty.pth"], f["run"] + "/out.pkl"], 2,
     lambda f: f"mocobench convert: error: checkpoint {f['empty.pth']!r} is empty (0 bytes)"),
    ("empty .pkl",
     lambda f: ["convert", f["empty.pkl"], f["run"] + "/out.pkl"], 2,
     lambda f: f"mocobench convert: error: file {f['empty.pkl']!r} is empty (0 bytes)"),
    ("a directory for a checkpoint",
     lambda f: ["convert", f["run"], f["run"] + "/out.pkl"], 2,
     lambda f: f"mocobench convert: error: checkpoint {f['run']!r} is a directory, not a file"),
    ("a pickled nn.Module",
     lambda f: ["convert", f["module.pth"], f["run"] + "/out.pkl"], 2,
     lambda f: f"mocobench convert: error: {f['module.pth']!r} holds a pickled module "
               "(torchvision.models.resnet.ResNet: code), not a state dict; save the weights with "
               "torch.save(model.state_dict(), PATH) and pass that file"),
    ("a pretrain yaml given to pipeline",
     lambda f: ["pipeline", "--config-file", PRETRAIN_CFG, "--dry-run"], 2,
     lambda f: f"mocobench pipeline: error: {PRETRAIN_CFG} is a pretrain config, not a pipeline "
               f"config: run it with `mocobench pretrain --config-file {PRETRAIN_CFG}` (a "
               "supervised baseline: mocobench supervised), or name it as PRETRAIN.CONFIG_FILE "
               "in a pipeline config (configs/pipeline/)"),
    ("a transfer yaml given to pipeline",
     lambda f: ["pipeline", "--config-file", TRANSFER_CFG, "--dry-run"], 2,
     lambda f: f"mocobench pipeline: error: {TRANSFER_CFG} is a transfer (detectron2) config, not "
               f"a pipeline config: run it with `mocobench transfer --config-file {TRANSFER_CFG}`, "
               "or name it as TRANSFER.CONFIG_FILE in a pipeline config (configs/pipeline/)"),
    ("unknown key on the pretrain command line",
     lambda f: ["pretrain", "--config-file", PRETRAIN_CFG, "SOLVER.BASE_LRR", "0.1"], 2,
     lambda f: "mocobench pretrain: error: command-line override: unknown config key "
               "SOLVER.BASE_LRR; did you mean SOLVER.BASE_LR?"),
    ("unknown key on the transfer command line",
     lambda f: ["transfer", "--config-file", TRANSFER_CFG, "MODEL.RESNET.DEPTH", "18"], 2,
     lambda f: "mocobench transfer: error: command-line override: unknown config key "
               "MODEL.RESNET.DEPTH; did you mean MODEL.RESNETS.DEPTH?"),
    ("unknown key in a pipeline yaml",
     lambda f: ["pipeline", "--config-file", f["pipeline_typo.yaml"], "--dry-run"], 2,
     lambda f: f"mocobench pipeline: error: {f['pipeline_typo.yaml']}: unknown config key "
               "TRANSFER.SEEDZ; did you mean TRANSFER.SEEDS?"),
]


@pytest.mark.parametrize("argv,code,message", [row[1:] for row in MESSAGES],
                         ids=[row[0] for row in MESSAGES])
def test_message(argv, code, message, f, capsys):
    assert cli.main(argv(f)) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.rstrip("\n") == message(f)
    assert not os.path.exists(os.path.join(f["run"], "out.pkl"))
    assert not os.path.exists(os.path.join(f["run"], "t"))


def test_force_replaces_and_out_json_records_the_timm_warning(f, tmp_path):
    out = str(tmp_path / "r18.pkl")
    assert cli.main(["convert", f["r18.pth"], out, "--no-verify"]) == 0
    before = os.stat(out).st_mtime_ns
    assert cli.main(["convert", f["r18.pth"], out, "--no-verify"]) == 2
    assert os.stat(out).st_mtime_ns == before  # refused: untouched
    assert cli.main(["convert", f["r18.pth"], out, "--no-verify", "--force"]) == 0
    with open(tmp_path / "r18.json") as j:
        assert json.load(j)["warnings"] == []  # torchvision: nothing to warn about
    timm_out = str(tmp_path / "timm.pkl")
    assert cli.main(["convert", f["timm.pth.tar"], timm_out, "--no-verify"]) == 0
    with open(tmp_path / "timm.json") as j:
        assert json.load(j)["warnings"] == [TIMM_WARNING.format(path=f["timm.pth.tar"])]


def test_an_explicit_value_that_agrees_with_the_weights_is_kept(f):
    """The other side of the DEPTH rows: the shipped R18 config sets DEPTH 18 and agrees; a key
    nobody set takes the .pkl's value as before."""
    from mocobench.utils.config import set_keys
    from transfer.config import configure_resnet, load_config

    cfg = load_config(TRANSFER_CFG, ["MODEL.WEIGHTS", f["r18.pkl"]])
    assert configure_resnet(cfg, explicit=set_keys(TRANSFER_CFG, [])) == []
    assert "MODEL.RESNETS.DEPTH" in set_keys(TRANSFER_CFG, [])
    opts = ["MODEL.WEIGHTS", f["r18.pkl"], "MODEL.RESNETS.DEPTH", "50",
            "MODEL.RESNETS.RES2_OUT_CHANNELS", "256"]
    cfg = load_config(TRANSFER_CFG, opts)
    assert configure_resnet(cfg) == ["MODEL.RESNETS from r18.pkl (ResNet-18): DEPTH 18, "
                                     "RES2_OUT_CHANNELS 64"]  # nobody said which: taken


def test_configs_fit_the_terminal_with_whole_sentences(monkeypatch, capsys):
    from mocobench.catalog import config_purpose, list_configs

    for columns, limit in (("80", 80), ("300", 100)):
        monkeypatch.setenv("COLUMNS", columns)
        assert cli.main(["configs"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines and all(len(line) <= limit for line in lines), max(lines, key=len)
    rows = list_configs()
    assert sum(line.startswith("configs/") for line in lines) == len(rows)
    for path, _, purpose in rows:
        with open(os.path.join(REPO, path)) as header:
            prose = " ".join(" ".join(line.lstrip("#").strip() for line in header
                                      if line.startswith("#")).split())
        # the header's own words from its start, ending where a sentence ends
        assert prose.startswith(purpose), path
        rest = prose[len(purpose):]
        assert purpose[-1] in ".)" or rest.startswith(":") or not rest, (path, purpose)
        assert not purpose.endswith("..."), path
    assert config_purpose(os.path.join(REPO, "configs/pretrain/moco_v3_R50.yaml")) \
        == "MoCo v3 (Chen, Xie, He, ICCV 2021), ResNet-50, 100 epochs."
    # a long first sentence stays whole (it was cut at 140 characters with "...")
    assert config_purpose(os.path.join(REPO, "configs/semseg/voc_R_50_FCN_30k.yaml")).endswith(
        "with detectron2's SemSegEvaluator.")


def test_a_closed_pipe_ends_quietly():
    # the shell's way: `head -1` keeps the first line and closes the pipe
    proc = subprocess.run(["bash", "-c", f"{sys.executable} -m mocobench configs | head -1"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.startswith("configs/"), proc
    assert proc.stdout.count("\n") == 1
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    # a reader gone before the first write: always EPIPE, exit 1 as Python's own convention;
    # the same for the command list that `mocobench --help` prints before any command runs
    for argv in (["configs"], ["--help"], ["--version"]):
        read, write = os.pipe()
        os.close(read)
        try:
            proc = subprocess.run([sys.executable, "-m", "mocobench", *argv], stdout=write,
                                  stderr=subprocess.PIPE, text=True)
        finally:
            os.close(write)
        assert (proc.returncode, proc.stderr) == (1, ""), argv


def test_timm_hub_weights_are_named_by_their_config_json(f, tmp_path):
    """timm's hub format: model.safetensors in torchvision names next to config.json, whose
    `architecture` names the model; without it the warning, with a non-plain name a refusal."""
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    from convert import convert_checkpoint
    from mocobench.utils.errors import UsageError

    weights = str(tmp_path / "model.safetensors")
    state = torch.load(f["r18.pth"], weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, weights)
    report = convert_checkpoint(weights, tmp_path / "a.pkl", verify=False)
    assert report.warnings == [TIMM_WARNING.format(path=weights)]
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet18"}))
    assert convert_checkpoint(weights, tmp_path / "b.pkl", verify=False).warnings == []
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnetblur18"}))
    with pytest.raises(UsageError, match=r"is a timm 'resnetblur18' \(config.json\): not a plain "):
        convert_checkpoint(weights, tmp_path / "c.pkl", verify=False)
    assert not (tmp_path / "c.pkl").exists()
