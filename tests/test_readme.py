"""The documentation is executable: every `mocobench` command of the block in docs/commands.md
(the README's Commands section points there) runs as written, from a scratch directory, on generated
data. The substitutions (data paths, sizes) are listed here and in that page."""
import os
import re
import shlex
import sys
import time

import pytest

from mocobench import cli
from synth.generate import synthesize
from synth.imagenet import make_imagenet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Size-only overrides appended per subcommand (the README's commands are sized for ImageNet and
# 8 GPUs), and the CPU (one process; without it a GPU machine would start one per GPU)
SHRINK = {
    "pretrain": ["SOLVER.EPOCHS", "1", "SOLVER.BATCH_SIZE", "16", "MOCO.K", "64",
                 "INPUT.SIZE", "32", "DATALOADER.NUM_WORKERS", "0", "KNN.PERIOD", "0",
                 "MOCO.SHUFFLE_BN_SPLITS", "2", "DEVICE", "cpu"],
    "supervised": ["SOLVER.EPOCHS", "1", "DATALOADER.NUM_WORKERS", "0", "DEVICE", "cpu"],
    "lincls": ["--epochs", "1", "--batch-size", "16", "--workers", "0", "--size", "32",
               "--device", "cpu"],
}


def readme_commands(section="# Commands", page="docs/commands.md"):
    """The `mocobench ...` lines of the first code block after `section` of `page`, continuation
    lines joined."""
    text = open(os.path.join(REPO, page), encoding="utf-8").read()
    block = re.search(r"```\n(.*?)```", text[text.index(section):], re.S).group(1)
    block = block.replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        line = line.split("  #")[0].strip()
        if line.startswith("mocobench "):
            commands.append(shlex.split(line)[1:])
    return commands


def substitute(argv, data):
    """Generated data for the real datasets, 1 process / 1 seed / 1 epoch for the real scale."""
    swap = {"/data/imagenet": data["imagenet"],
            "/ckpt/resnet50-0676ba61.pth": "out/sup_r18/checkpoint_0000.pth.tar",
            "configs/detection/pascal_voc_R_50_C4_24k_moco.yaml":
                "configs/detection/tiny_synth_voc_R_50_C4.yaml"}
    out = []
    for i, token in enumerate(argv):
        if i and argv[i - 1] in ("--num-gpus", "--seeds"):
            token = "1"
        token = swap.get(token, token).replace("checkpoint_0199", "checkpoint_0000")
        out.append(data["synth"] + token[3:] if token == "DIR" or token.startswith("DIR/")
                   else token)
    if out[0] == "transfer":  # VOC: the small generated VOC of the `test` preset
        out += ["MOCOBENCH.SYNTH_ROOT", data["voc"]]
    if out[0] == "report":  # the block trains the moco run only
        out = [t for t in out if not t.startswith("out/voc_") or os.path.isdir(t)]
    return out + SHRINK.get(out[0], [])


@pytest.mark.slow
def test_every_readme_command_runs_as_written_on_generated_data(tmp_path, monkeypatch, capsys):
    commands = readme_commands()
    assert [c[0] for c in commands] == ["--version", "env", "configs", "data", "pretrain",
                                        "supervised", "lincls", "convert", "show", "transfer",
                                        "show", "report", "pipeline"]
    data = {"imagenet": os.path.join(str(tmp_path), "small", "imagenet"),
            "synth": str(tmp_path / "synth"), "voc": str(tmp_path / "small_voc")}
    make_imagenet(os.path.dirname(data["imagenet"]), classes=4, images_per_class=8, val_per_class=2,
                  size=40, seed=0)
    synthesize(data["voc"], preset="test", seed=0)
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        argv = substitute(argv, data)
        start = time.time()
        assert cli.main(argv) == 0, argv
        print(f"README: mocobench {argv[0]} {time.time() - start:.1f} s", file=sys.__stdout__)
        printed = capsys.readouterr()
        assert "Traceback" not in printed.err, argv
        if argv[0] == "show":  # the .pkl, then the transfer run: each names where it came from
            assert "<- converted from " in printed.out
            assert "sha256 matches the record" in printed.out
        if argv[0] == "configs":
            assert re.search(r"configs/pipeline/demo_cpu.yaml +cpu +The embedded demo", printed.out)
            assert re.search(r"configs/pretrain/moco_v2_R50_200ep.yaml +paper +MoCo v2",
                             printed.out)
    for path in ("out/mocov2/checkpoint_0000.pth.tar", "out/sup_r18/checkpoint_0000.pth.tar",
                 "out/lincls/lincls_results.json", "mocov2.pkl", "out/voc_moco/seed0/results.json",
                 "out/report/report.md"):
        assert os.path.isfile(tmp_path / path), path
    # the pipeline's preflight found every substituted input
    assert "all inputs present" in printed.out
