"""`mocobench report`: aggregation against hand-computed numbers, plain detectron2 directories, bad input."""
import json
import os
import subprocess
import sys

import pytest

from transfer import report

VOC = "voc_2007_test"


def write_run(root, init, seed, ap50, ap, ap75, task=VOC):
    d = os.path.join(root, init, f"seed{seed}")
    os.makedirs(d)
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump({"init": init, "seed": seed, "dataset": task,
                   "results": {"bbox": {"AP50": ap50, "AP": ap, "AP75": ap75}}}, f)
    return d


@pytest.fixture
def voc_runs(tmp_path):
    root = str(tmp_path / "runs")
    for seed, ap in enumerate([50.0, 52.0, 54.0]):
        write_run(root, "supervised", seed, 80.0 + seed, ap, 55.0)
    for seed, ap in enumerate([56.0, 57.0, 58.0]):
        write_run(root, "moco", seed, 81.0, ap, 55.2)
    write_run(root, "random", 0, 60.0, 30.0, 28.0)
    return root


def test_mean_std_and_deltas_match_hand_computation(voc_runs):
    summary = report.summarize(report.find_runs([voc_runs]))
    rows = summary["tables"][VOC]["rows"]
    assert list(rows) == ["random", "supervised", "moco"]  # the paper's row order
    sup, moco = rows["supervised"]["bbox/AP"], rows["moco"]["bbox/AP"]
    assert (sup["mean"], sup["std"], sup["n"]) == (52.0, 2.0, 3)  # std of 50,52,54 (ddof=1) = 2
    assert (moco["mean"], moco["std"], moco["n"]) == (57.0, 1.0, 3)
    assert rows["random"]["bbox/AP"]["std"] == 0.0 and rows["random"]["bbox/AP"]["n"] == 1
    md = report.to_markdown(summary)
    # moco AP: +5.0 vs combined std sqrt(4+1)=2.24 -> significant; AP75: +0.2 vs 0 std... AP50 81 vs 81: 0.0
    moco_line = next(line for line in md.splitlines() if line.startswith("| moco"))
    assert "57.0 ± 1.0 (n=3) (+5.0)" in moco_line
    assert "81.0 ± 0.0 (n=3) (+0.0†)" in moco_line  # supervised AP50 = 80,81,82: std 1 > |0|
    assert md.splitlines()[4].startswith("| pre-train | AP50 | AP | AP75 |")


def test_report_cli_writes_files_and_lists_incomplete(voc_runs, tmp_path):
    broken = os.path.join(voc_runs, "moco", "seed9")
    os.makedirs(broken)
    with open(os.path.join(broken, "metrics.json"), "w") as f:
        f.write(json.dumps({"iteration": 9, "total_loss": 1.0}) + "\n")
    with open(os.path.join(broken, "config.yaml"), "w") as f:
        f.write("MODEL:\n  WEIGHTS: moco.pkl\nDATASETS:\n  TEST: [voc_2007_test]\nSEED: 9\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "mocobench", "report", voc_runs, "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["ap.png", "report.json", "report.md"]
    data = json.loads((out / "report.json").read_text())
    assert data["tables"][VOC]["rows"]["moco"]["bbox/AP"]["n"] == 3  # the unfinished seed is not averaged
    assert [i["dir"] for i in data["incomplete"]] == [broken]
    assert "Incomplete runs" in r.stdout and broken in r.stdout


def test_plain_detectron2_output_directory(tmp_path):
    """A directory written by detectron2's own tools: config.yaml + metrics.json with EvalHook scalars."""
    d = tmp_path / "d2run"
    d.mkdir()
    (d / "config.yaml").write_text("MODEL:\n  WEIGHTS: /ckpt/R-50.pkl\nDATASETS:\n  TEST: [coco_2017_val]\nSEED: 3\n")
    lines = [{"iteration": 9, "total_loss": 1.2},
             {"iteration": 19, "total_loss": 1.0, "bbox/AP": 38.9, "bbox/AP50": 59.6, "bbox/AP75": 42.2,
              "segm/AP": 34.1, "segm/AP50": 56.1, "segm/AP75": 36.0}]
    (d / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    summary = report.summarize(report.find_runs([str(tmp_path)]))
    table = summary["tables"]["coco_2017_val"]
    assert table["columns"] == ["bbox/AP", "bbox/AP50", "bbox/AP75", "segm/AP", "segm/AP50", "segm/AP75"]
    assert table["rows"]["supervised"]["segm/AP"]["mean"] == 34.1
    assert "AP^mk50" in report.to_markdown(summary)


def test_directory_without_results_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "-m", "mocobench", "report", str(tmp_path / "empty")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "no detectron2 results under" in r.stderr and "results.json" in r.stderr


def test_pretraining_directories_are_plotted_not_counted_as_incomplete(voc_runs, tmp_path):
    pre = tmp_path / "pretrain"
    pre.mkdir()
    (pre / "config.yaml").write_text("MOCO:\n  K: 1024\n")
    rows = [{"iteration": 31 * e, "epoch": e, "loss": 6.5 - e / 10, "acc1": 10.0 * e, "moco_m": 0.99}
            for e in (1, 2)] + [{"iteration": 62, "epoch": 2, "knn_top1": 17.0}]
    (pre / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = report.write_report([voc_runs, str(pre)], str(tmp_path / "out"))
    assert summary["incomplete"] == []
    assert report.pretrain_curves(rows)["knn_top1"] == [(2, 17.0)]
    assert (tmp_path / "out" / "pretrain.png").stat().st_size > 0
