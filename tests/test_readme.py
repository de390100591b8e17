"""The README is executable: every `mocobench` command of its Commands block runs as written, from a
scratch directory, on generated data. The substitutions (data paths, sizes) are listed here and in
the README. The block is looked for in README.md and then in the pages under docs/ that the README
links (the reference moved there), so it runs wherever it lives."""
import glob
import json
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


def documentation_pages():
    """README.md, then every page under docs/ (sorted)."""
    docs = os.path.join(REPO, "docs")
    pages = sorted(glob.glob(os.path.join(docs, "*.md"))) if os.path.isdir(docs) else []
    return [os.path.join(REPO, "README.md"), *pages]


def section_text(section):
    """The text from the heading `section` (its title, at any heading level) to the end of the
    first page that has it with a code block after it (the README's Commands section is a pointer
    to docs/commands.md, which holds the block)."""
    heading = re.compile(r"^#+ " + re.escape(section.lstrip("# ")) + r"\s*$", re.M)
    for path in documentation_pages():
        text = open(path, encoding="utf-8").read()
        found = heading.search(text)
        if found and "```" in text[found.start():]:
            return text[found.start():]
    raise AssertionError(f"no page has the heading {section!r} with a code block after it")


def readme_commands(section="## Commands"):
    """The `mocobench ...` lines of the first code block after `section` (in README.md or a page
    under docs/), continuation lines joined."""
    block = re.search(r"```\n(.*?)```", section_text(section), re.S).group(1)
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
        if argv[0] == "pipeline":  # its preflight reads VOC07+12 under $DETECTRON2_DATASETS:
            # the generated VOC2007 detection layout in both places
            datasets = tmp_path / "datasets"
            datasets.mkdir(exist_ok=True)
            for year in ("VOC2007", "VOC2012"):
                (datasets / year).symlink_to(os.path.join(data["voc"], "VOC2007"))
            monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
        start = time.time()
        assert cli.main(argv) == 0, argv
        print(f"README: mocobench {argv[0]} {time.time() - start:.1f} s", file=sys.__stdout__)
        printed = capsys.readouterr()
        assert "Traceback" not in printed.err, argv
        if argv[0] == "show":  # the .pkl, then the transfer run: each names where it came from
            assert "<- converted from " in printed.out
            assert "sha256 matches the record" in printed.out
        if argv[0] == "configs":
            # PATH  KIND, then the purpose on indented lines
            assert re.search(r"configs/pipeline/demo_cpu.yaml +cpu\n +The embedded demo",
                             printed.out)
            assert re.search(r"configs/pretrain/moco_v2_R50_200ep.yaml +paper\n +MoCo v2",
                             printed.out)
    for path in ("out/mocov2/checkpoint_0000.pth.tar", "out/sup_r18/checkpoint_0000.pth.tar",
                 "out/lincls/lincls_results.json", "mocov2.pkl", "out/voc_moco/seed0/results.json",
                 "out/report/report.md"):
        assert os.path.isfile(tmp_path / path), path
    # the pipeline's preflight found every substituted input
    assert "all inputs present" in printed.out
    check_report_table(tmp_path)


def markdown_tables(text):
    """Every markdown table in `text`: (header cells, [row cells]), a table being a `| ... |` line,
    a `|---|...` separator and the `|` lines that follow."""
    def cells(line):
        assert line.startswith("| ") and line.endswith(" |"), line
        return [c.strip() for c in line[2:-2].split(" | ")]

    lines, tables = text.splitlines(), []
    for i, line in enumerate(lines):
        if i and re.fullmatch(r"\|(---\|)+", line):
            rows = []
            for row in lines[i + 1:]:
                if not row.startswith("|"):
                    break
                rows.append(cells(row))
            tables.append((cells(lines[i - 1]), rows))
    return tables


def check_report_table(root):
    """report.md holds the VOC table of the one trial the block trained: the paper's columns, a row
    for its init (moco_v2: inferred from mocov2.pkl's conversion record and the MoCo v2 run it was
    converted from; the block passes no --init-name), in each cell the record's number with n=1."""
    text = (root / "out" / "report" / "report.md").read_text(encoding="utf-8")
    rec = json.loads((root / "out" / "voc_moco" / "seed0" / "results.json").read_text())
    tables = markdown_tables(text)
    # one table: no published block, the tiny config is not an official one
    assert len(tables) == 1, f"report.md has {len(tables)} tables:\n{text}"
    [(header, rows)] = tables
    assert header == ["pre-train", "AP50", "AP", "AP75", "config file"], text
    assert [row[0] for row in rows] == ["moco_v2"], text
    [row] = rows
    assert len(row) == len(header) and row[-1] == "tiny_synth_voc_R_50_C4.yaml", row
    [results] = rec["results"].values()
    for metric, cell in zip(header[1:-1], row[1:-1]):
        match = re.fullmatch(r"(-?\d+)\.(\d+) \(n=1\)", cell)
        assert match, (metric, cell)
        value, decimals = float(cell.split()[0]), len(match.group(2))
        assert decimals in (1, 2) \
            and value == pytest.approx(results["bbox"][metric], abs=0.5 * 10 ** -decimals), \
            (metric, cell, results)
