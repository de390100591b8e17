"""`mocobench show`, `mocobench --version` and `--print-config`, on files the real commands write:
a 1-epoch `mocobench pretrain` on the generated images, `mocobench convert` of its checkpoint, a
1-iteration `mocobench transfer` from that .pkl and a 1-epoch `mocobench lincls` on the checkpoint
(built once per module; the tests that use them are slow). Transfer directories with several trials
and non-zero AP are written with transfer.record's real writer, as tests/test_report_tables.py
does."""
import json
import os
import subprocess
import sys

import pytest

from mocobench import cli
from mocobench.utils.fileio import file_sha256, load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_CFG = os.path.join(REPO, "configs", "pretrain", "synth_R18_cpu.yaml")
SUPERVISED_CFG = os.path.join(REPO, "configs", "pretrain", "synth_R18_cpu_supervised.yaml")
DETECTION_CFG = os.path.join(REPO, "configs", "detection", "synth_voc_R18_FPN_cpu.yaml")
TINY_PRETRAIN = ["SOLVER.EPOCHS", "1", "SOLVER.BATCH_SIZE", "16", "MOCO.K", "32", "INPUT.SIZE",
                 "32", "DATALOADER.NUM_WORKERS", "0", "KNN.PERIOD", "1", "KNN.BATCH_SIZE", "64",
                 "MOCO.SHUFFLE_BN_SPLITS", "2", "DEVICE", "cpu"]
TINY_TRANSFER = ["SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
                 "TEST.PRECISE_BN.ENABLED", "False", "INPUT.MIN_SIZE_TRAIN", "(96,)",
                 "INPUT.MIN_SIZE_TEST", "96", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                 "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()", "SEED", "0",
                 "SOLVER.MAX_ITER", "1"]


def show(capsys, *args):
    """(exit code, stdout, stderr) of `mocobench show ARGS` in this process."""
    capsys.readouterr()
    code = cli.main(["show", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def show_json(capsys, path):
    code, out, err = show(capsys, path, "--json")
    assert code == 0, err
    return json.loads(out)


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, files in os.walk(root) for f in files)


@pytest.fixture(scope="module")
def made(synth_root, tmp_path_factory):
    """The files of a real pretrain -> convert -> transfer chain, and a lincls run."""
    root = tmp_path_factory.mktemp("show")
    pre = root / "pre"
    assert cli.main(["pretrain", "--config-file", PRETRAIN_CFG, "DATA.ROOT",
                     os.path.join(synth_root, "imagenet"), "OUTPUT_DIR", str(pre),
                     *TINY_PRETRAIN]) == 0
    checkpoint = pre / "checkpoint_0000.pth.tar"
    pkl = root / "moco.pkl"
    assert cli.main(["convert", str(checkpoint), str(pkl)]) == 0
    voc = root / "voc"
    assert cli.main(["transfer", "--config-file", DETECTION_CFG, "--synth-root", synth_root,
                     "--init-name", "moco_v2", *TINY_TRANSFER, "MODEL.WEIGHTS", str(pkl),
                     "OUTPUT_DIR", str(voc)]) == 0
    lincls = root / "lincls"
    assert cli.main(["lincls", "--data", os.path.join(synth_root, "imagenet"), "--pretrained",
                     str(checkpoint), "--output", str(lincls), "--epochs", "1", "--batch-size",
                     "8", "--size", "32", "--workers", "0", "--device", "cpu"]) == 0
    return {"root": root, "pre": pre, "checkpoint": checkpoint, "pkl": pkl, "voc": voc,
            "lincls": lincls}


# -------------------------------------------------------------------------------------- --version

def test_version_names_mocobench_torch_and_detectron2():
    import importlib.metadata

    import mocobench

    for flag in ("--version", "-V"):
        proc = subprocess.run([sys.executable, "-m", "mocobench", flag], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stderr == ""
        lines = proc.stdout.splitlines()
        assert 1 <= len(lines) <= 2
        assert lines[0] == f"mocobench {mocobench.__version__}"
        assert f"torch {importlib.metadata.version('torch')}" in lines[1]
        assert f"detectron2 {importlib.metadata.version('detectron2')}" in lines[1]


# -------------------------------------------------------------------------------- errors: one line

def _assert_one_line_usage_error(code, out, err, path, *words):
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mocobench show: error: ") and repr(str(path)) in lines[0]
    assert "expected" in lines[0] and "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_bad_inputs_are_one_line_errors_with_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty.pth.tar"
    empty.write_bytes(b"")
    text = tmp_path / "notes.pth"
    text.write_text("these are my notes\nnot a checkpoint\n")
    not_a_run = tmp_path / "photos"
    not_a_run.mkdir()
    (not_a_run / "cat.jpg").write_bytes(b"\xff\xd8\xff\xe0")
    cases = [(tmp_path / "absent", "does not exist"), (empty, "empty"),
             (not_a_run, "directory but not a run"), (text, "text file")]
    for path, words in cases:
        code, out, err = show(capsys, path)
        _assert_one_line_usage_error(code, out, err, path, words)
    # JSON that is none of the known files, and a .pkl that is text
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    code, out, err = show(capsys, other)
    _assert_one_line_usage_error(code, out, err, other, "not a convert report")
    fake = tmp_path / "fake.pkl"
    fake.write_text("plain words")
    code, out, err = show(capsys, fake, "--json")
    _assert_one_line_usage_error(code, out, err, fake, "text file")


def test_bad_input_as_a_user_sees_it(tmp_path, mocobench_cmd):
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    proc = subprocess.run([*mocobench_cmd, "show", str(empty)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and str(empty) in proc.stderr


# --------------------------------------------------------------------------- show on real outputs

@pytest.mark.slow
def test_show_a_pretraining_run_directory(made, capsys):
    pre = made["pre"]
    rows = [json.loads(line) for line in open(pre / "metrics.json")]
    info = show_json(capsys, pre)
    assert info["kind"] == "pretrain run" and info["arch"] == "resnet18"
    assert info["what"] == "MoCo v2 pretraining run (mocobench pretrain)"
    assert info["epochs"] == "1 of 1" and info["iterations"] == rows[-1]["iteration"]
    assert info["config"]["MOCO.K"] == 32 and info["config"]["SOLVER.EPOCHS"] == 1
    assert info["latest_checkpoint"] == "checkpoint_0000.pth.tar"
    hashes = {f["name"]: f["sha256"] for f in info["files"]}
    assert hashes == {name: file_sha256(pre / name)
                      for name in ("config.yaml", "metrics.json", "checkpoint_0000.pth.tar")}
    trained = [r for r in rows if "loss" in r][-1]
    latest = info["results"]["latest: training (metrics.json)"]
    assert latest["loss"] == trained["loss"] and latest["acc1"] == trained["acc1"]

    code, out, _ = show(capsys, pre)
    assert code == 0
    assert "  kind        MoCo v2 pretraining run (mocobench pretrain)" in out
    assert "    MOCO.K 32" in out and "KNN.K" not in out  # key lines only
    assert f"{file_sha256(pre / 'checkpoint_0000.pth.tar')}  checkpoint_0000.pth.tar" in out
    assert f"epoch 1, loss {trained['loss']:.4g}, acc1 {trained['acc1']:.4g}" in out
    knn = [r for r in rows if "knn_top1" in r][-1]
    assert info["results"]["latest: knn_top1 (metrics.json)"] == \
        {"epoch": 1, "knn_top1": knn["knn_top1"]}
    assert f"latest: knn_top1 (metrics.json): epoch 1, knn_top1 {knn['knn_top1']:.4g}" in out
    code, full, _ = show(capsys, pre, "--config")
    assert code == 0 and "  config (full)" in full and "KNN:" in full and "    K: 200" in full


@pytest.mark.slow
def test_show_a_checkpoint(made, capsys):
    path = made["checkpoint"]
    ckpt = load_checkpoint(path)
    info = show_json(capsys, path)
    assert info["kind"] == "checkpoint" and info["arch"] == "resnet18"
    assert info["what"] == "MoCo v2 pretraining checkpoint (mocobench pretrain)"
    assert info["epochs"] == ckpt["epoch"] == 1 and info["iterations"] == ckpt["iteration"]
    assert info["trunk"]["source"] == "moco" and info["trunk"]["author"] == "MOCO"
    assert info["files"] == [{"path": str(path), "name": path.name, "bytes": path.stat().st_size,
                              "sha256": file_sha256(path)}]
    assert info["config"]["MOCO.K"] == 32
    assert [(s["relation"], s["path"], s["kind"]) for s in info["chain"]] == \
        [("written by run", str(made["pre"]), "pretrain run")]
    row = [json.loads(line) for line in open(made["pre"] / "metrics.json") if "loss" in line][-1]
    assert info["results"]["at this checkpoint: training (metrics.json)"]["loss"] == row["loss"]


@pytest.mark.slow
def test_show_a_converted_pkl_and_its_report(made, capsys):
    pkl, report = made["pkl"], made["pkl"].with_suffix(".json")
    info = show_json(capsys, pkl)
    assert info["kind"] == "converted backbone" and info["arch"] == "ResNet-18"
    assert info["resnets"]["DEPTH"] == 18 and info["conversion"]["verified"] == 100
    assert {f["name"]: f["sha256"] for f in info["files"]} == \
        {"moco.pkl": file_sha256(pkl), "moco.json": file_sha256(report)}
    # the chain: the .pkl's report names the checkpoint, the checkpoint's run directory
    first, second = info["chain"]
    assert (first["relation"], first["path"]) == ("converted from", str(made["checkpoint"]))
    assert first["sha256"] == first["recorded_sha256"] == file_sha256(made["checkpoint"])
    assert first["matches"] is True and first["epochs"] == 1
    assert (second["relation"], second["path"], second["kind"]) == \
        ("written by run", str(made["pre"]), "pretrain run")
    code, out, _ = show(capsys, pkl)
    assert code == 0 and f"<- converted from {made['checkpoint']}" in out
    assert "sha256 matches the record" in out
    # the report itself leads to the same files
    info = show_json(capsys, report)
    assert info["kind"] == "convert report" and info["arch"] == "resnet18"
    assert [s["path"] for s in info["chain"]][:2] == [str(pkl), str(made["checkpoint"])]


@pytest.mark.slow
def test_show_a_converted_pkl_whose_checkpoint_changed(made, capsys, tmp_path):
    import shutil

    import torch

    copy = tmp_path / "copy.pth.tar"
    shutil.copy(made["checkpoint"], copy)
    assert cli.main(["convert", str(copy), str(tmp_path / "copy.pkl")]) == 0
    ckpt = load_checkpoint(copy)
    ckpt["epoch"] = 99
    torch.save(ckpt, copy)
    step = show_json(capsys, tmp_path / "copy.pkl")["chain"][0]
    assert step["matches"] is False and step["epochs"] == 99
    code, out, _ = show(capsys, tmp_path / "copy.pkl")
    assert "sha256 DIFFERS from the record" in out


@pytest.mark.slow
def test_show_a_transfer_run_and_its_trial(made, capsys):
    from transfer import record as run_record

    voc = made["voc"]
    record = run_record.read_record(voc / "seed0" / "results.json")
    info = show_json(capsys, voc)
    assert info["kind"] == "transfer run" and info["arch"] == "ResNet-18"
    assert info["results"] == {"seed0 (seed 0)": record["results"]}
    assert {f["name"]: f["sha256"] for f in info["files"]} == \
        {"summary.json": file_sha256(voc / "summary.json"),
         "seed0/results.json": file_sha256(voc / "seed0" / "results.json")}
    # the record names its weights; their report the checkpoint; the checkpoint its run
    assert [(s["relation"], s["path"]) for s in info["chain"]] == [
        ("fine-tuned from", str(made["pkl"])), ("converted from", str(made["checkpoint"])),
        ("written by run", str(made["pre"]))]
    assert all(s["matches"] for s in info["chain"][:2])
    trial = show_json(capsys, voc / "seed0")
    assert trial["kind"] == "transfer trial" and trial["results"] == \
        {"seed 0": record["results"]}
    assert record["results"]["synth_voc_test"]["bbox"]["AP"] is not None
    code, out, _ = show(capsys, voc / "seed0")
    ap = record["results"]["synth_voc_test"]["bbox"]["AP"]
    assert code == 0 and f"seed 0 synth_voc_test: bbox AP {ap:.4g}" in out


@pytest.mark.slow
def test_show_a_detectron2_directory_without_a_record(made, capsys, tmp_path):
    import shutil

    plain = tmp_path / "d2run"
    shutil.copytree(made["voc"] / "seed0", plain, ignore=shutil.ignore_patterns("results.json"))
    info = show_json(capsys, plain)
    assert info["kind"] == "detectron2 run" and info["arch"] == "ResNet-18"
    evaluation = info["results"]["last evaluation (metrics.json)"]
    record = json.load(open(made["voc"] / "seed0" / "results.json"))
    assert evaluation["bbox/AP"] == record["results"]["synth_voc_test"]["bbox"]["AP"]
    assert info["chain"][0]["path"] == str(made["pkl"]) and info["chain"][0]["kind"] == \
        "converted backbone"


@pytest.mark.slow
def test_show_a_lincls_run(made, capsys):
    results = json.load(open(made["lincls"] / "lincls_results.json"))
    info = show_json(capsys, made["lincls"])
    assert info["kind"] == "lincls run" and info["arch"] == "resnet18"
    shown = info["results"]["lincls_results.json"]
    assert shown["top1"] == results["top1"] and shown["top5"] == results["top5"]
    assert info["chain"][0]["relation"] == "linear classifier on"
    assert info["chain"][0]["path"] == str(made["checkpoint"])
    code, out, _ = show(capsys, made["lincls"])
    assert code == 0 and f"top1 {results['top1']:.4g}" in out


@pytest.mark.slow
def test_show_official_moco_and_torchvision_files(made, capsys, tmp_path):
    import torch
    import torchvision

    ckpt = load_checkpoint(made["checkpoint"])
    official = tmp_path / "checkpoint_0199.pth.tar"  # what main_moco.py saves
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": ckpt["state_dict"],
                "optimizer": ckpt["optimizer"]}, official)
    info = show_json(capsys, official)
    assert info["what"].startswith("MoCo v2 checkpoint in the official layout")
    assert info["epochs"] == 200 and info["arch"] == "resnet18" and info["chain"] == []
    plain = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), plain)
    info = show_json(capsys, plain)
    assert info["what"] == "plain state dict (torchvision layout)"
    assert info["arch"] == "resnet18" and info["trunk"]["source"] == "torchvision"
    assert info["files"][0]["sha256"] == file_sha256(plain)


# ------------------------------------------------------------------ transfer runs of several seeds

def write_trials(root, aps):
    """A transfer OUTPUT_DIR with one record per AP, from transfer.record's writer, and its
    summary.json from transfer.run's."""
    from mocobench.utils import d2compat  # noqa: F401  (before detectron2)
    from transfer import record as run_record
    from transfer.config import load_config
    from transfer.run import write_summary

    for seed, ap in enumerate(aps):
        out = root / f"seed{seed}"
        cfg = load_config(DETECTION_CFG, ["OUTPUT_DIR", str(out), "SEED", str(seed)])
        rec = run_record.build_record(
            cfg, config_file=DETECTION_CFG, opts=[], init_name="supervised", weights_info=None,
            trial=seed, world_size=1, eval_only=False, resumed=False, iteration=300, seconds=1.0,
            results={"bbox": {"AP": ap, "AP50": ap + 20.0, "AP75": ap + 5.0}},
            evaluator_types={"synth_voc_test": "pascal_voc"})
        run_record.write_record(out / run_record.RESULTS_FILE, rec)
    write_summary(str(root))


def test_show_a_transfer_run_of_three_seeds(tmp_path, capsys):
    write_trials(tmp_path, [50.0, 52.0, 54.5])
    info = show_json(capsys, tmp_path)
    assert info["what"] == "`mocobench transfer` run: 3 finished trial(s) (seed0, seed1, seed2)"
    assert info["results"]["seed1 (seed 1)"]["synth_voc_test"]["bbox"]["AP"] == 52.0
    mean = info["results"]["mean ± std over trials"]["synth_voc_test"]["bbox/AP"]
    assert mean["mean"] == pytest.approx(52.1666667) and mean["n"] == 3
    assert mean["std"] == pytest.approx(2.2546249)
    assert "MODEL.WEIGHTS empty: trained from random initialisation" in info["notes"]
    code, out, _ = show(capsys, tmp_path)
    assert "mean ± std over trials synth_voc_test: bbox/AP 52.17 ± 2.25 (n=3)" in out
    assert "seed2 (seed 2) synth_voc_test: bbox AP 54.5, AP50 74.5, AP75 59.5" in out
    # a record file on its own
    info = show_json(capsys, tmp_path / "seed2" / "results.json")
    assert info["kind"] == "transfer trial" and info["results"]["seed 2"]["synth_voc_test"] == \
        {"bbox": {"AP": 54.5, "AP50": 74.5, "AP75": 59.5}}


# ---------------------------------------------------------------------------------- --print-config

@pytest.mark.parametrize("command,config", [("pretrain", PRETRAIN_CFG),
                                            ("supervised", SUPERVISED_CFG)])
def test_print_config_of_a_training_command_writes_nothing(command, config, tmp_path, capsys):
    import yaml

    out = tmp_path / "run"
    capsys.readouterr()
    assert cli.main([command, "--config-file", config, "--print-config", "OUTPUT_DIR", str(out),
                     "SOLVER.EPOCHS", "7", "SOLVER.BASE_LR", "0.125"]) == 0
    printed = capsys.readouterr().out
    cfg = yaml.safe_load(printed)
    assert cfg["SOLVER"]["EPOCHS"] == 7 and cfg["SOLVER"]["BASE_LR"] == 0.125
    assert cfg["MODEL"]["ARCH"] == "resnet18" and cfg["OUTPUT_DIR"] == str(out)
    assert "  EPOCHS: 7\n" in printed
    assert not out.exists()
    # an existing OUTPUT_DIR is left as it is
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli.main([command, "--config-file", config, "OUTPUT_DIR", str(out),
                     "--print-config"]) == 0
    assert _tree(out) == ["keep.txt"]
    # bad overrides stay errors
    assert cli.main([command, "--config-file", config, "--print-config", "SOLVER.NOPE", "1"]) == 2


def test_print_config_starts_no_process_and_submits_no_job(tmp_path, capsys):
    """Under the launcher options (several processes, SLURM) this process prints the config once."""
    capsys.readouterr()
    for launch_options in (["--nproc-per-node", "2"],
                           ["--launcher", "slurm", "--job-dir", str(tmp_path / "jobs")]):
        assert cli.main(["pretrain", *launch_options, "--config-file", PRETRAIN_CFG,
                         "--print-config", "MOCO.K", "64"]) == 0
        printed = capsys.readouterr().out
        assert printed.count("\nMOCO:\n") == 1 and "  K: 64\n" in printed
    assert not (tmp_path / "jobs").exists()


def test_print_config_of_transfer_is_its_first_trial(tmp_path, capsys):
    import yaml

    out = tmp_path / "voc"
    capsys.readouterr()
    argv = ["transfer", "--config-file", DETECTION_CFG, "--seeds", "3", "OUTPUT_DIR", str(out),
            "SEED", "5", "SOLVER.MAX_ITER", "77"]
    for where in ("before", "after"):  # the flag before or after the KEY VALUE pairs
        flagged = [*argv[:3], "--print-config", *argv[3:]] if where == "before" \
            else [*argv, "--print-config"]
        assert cli.main(flagged) == 0
        printed = capsys.readouterr().out
        assert printed.startswith("# mocobench transfer: the config of trial 1 of 3 as it "
                                  "would run")
        cfg = yaml.safe_load(printed)
        assert cfg["SOLVER"]["MAX_ITER"] == 77 and cfg["SEED"] == 5
        assert cfg["OUTPUT_DIR"] == str(out / "seed0")
    assert not out.exists()


@pytest.mark.slow
def test_print_config_of_lincls_and_of_transfer_from_a_pkl(made, tmp_path, capsys):
    import yaml

    out = tmp_path / "lin"
    capsys.readouterr()
    assert cli.main(["lincls", "--data", "/nowhere", "--pretrained", str(made["checkpoint"]),
                     "--output", str(out), "--epochs", "3", "--lr", "0.5", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["SOLVER"]["EPOCHS"] == 3 and cfg["LINCLS"]["LR"] == 0.5
    assert cfg["LINCLS"]["PRETRAINED"] == str(made["checkpoint"]) and cfg["LINCLS"]["RECIPE"] == \
        "v1v2"
    assert not out.exists()
    # transfer: MODEL.RESNETS come from the .pkl the config's defaults leave open
    assert cli.main(["transfer", "--config-file",
                     os.path.join(REPO, "configs", "detection", "tiny_synth_coco_R_50_FPN.yaml"),
                     "--print-config", "MODEL.WEIGHTS", str(made["pkl"]), "OUTPUT_DIR",
                     str(tmp_path / "coco")]) == 0
    printed = capsys.readouterr().out
    cfg = yaml.safe_load(printed)
    assert cfg["MODEL"]["RESNETS"]["DEPTH"] == 18 and cfg["MODEL"]["RESNETS"]["RES2_OUT_CHANNELS"] \
        == 64
    assert "# MODEL.RESNETS from moco.pkl (ResNet-18): DEPTH 18" in printed
    assert not (tmp_path / "coco").exists()
