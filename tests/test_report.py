"""`mocobench report` on run directories written by the real `mocobench transfer`, and its
statistics.

The study (built once): a 1-epoch MoCo and a 1-epoch supervised ResNet-18 pretraining on the
generated images, each converted by `mocobench convert` into a file whose name says nothing about
its init (the supervised one into "ok.pkl", run as `--init-name supervised`; the MoCo one into
"swav_resnet18.pkl", run as `--init-name moco_v2`); config A (1 iteration) for both, where one
moco_v2 trial's evaluation is made to return NaN; config B (2 iterations, tested on the same
VOC-format test set and on its COCO-format copy) with one seed each; a plain detectron2 copy of one
trial without its record; and the report called with an overlapping path and the two pretraining
directories.
"""
import csv
import json
import math
import os
import shutil
import statistics

import numpy as np
import pytest
from scipy import stats as scipy_stats

from mocobench.cli import main as mocobench
from mocobench.utils.fileio import file_sha256
from transfer import evaluation, record, report
from transfer.stats import describe, welch_interval

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "detection", "synth_voc_R18_FPN_cpu.yaml")
TINY = ["SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "TEST.PRECISE_BN.ENABLED",
        "False", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MIN_SIZE_TEST", "96",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS",
        "()", "SEED", "0"]
TEST_SET = "synth_voc_test"
NAN_SEED = 2


def transfer(synth_root, out, init_name, weights, seeds, max_iter, opts=()):
    argv = ["transfer", "--config-file", CONFIG, "--synth-root", synth_root, "--seeds", str(seeds),
            "--init-name", init_name, *TINY, "SOLVER.MAX_ITER", str(max_iter), *opts,
            "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(out)]
    assert mocobench(argv) == 0


PRETRAIN = {  # configs/pipeline/tiny_cpu.yaml's shrunken pretraining
    "pretrain": ("synth_R18_cpu.yaml", ["KNN.PERIOD", "1", "MOCO.K", "64", "KNN.BATCH_SIZE", "64"]),
    "supervised": ("synth_R18_cpu_supervised.yaml", []),
}


def pretrain_and_convert(synth_root, root, command, pkl_name):
    from pretrain.checkpoint import find_resume_path

    config, opts = PRETRAIN[command]
    out = root / "pretraining" / command
    assert mocobench([command, "--config-file", os.path.join(REPO, "configs", "pretrain", config),
                      "OUTPUT_DIR", str(out), "DATA.ROOT", os.path.join(synth_root, "imagenet"),
                      "SOLVER.EPOCHS", "1", "SOLVER.BATCH_SIZE", "16", "DATALOADER.NUM_WORKERS",
                      "0", "INPUT.SIZE", "32", "DEVICE", "cpu", *opts]) == 0
    assert mocobench(["convert", find_resume_path(str(out), "auto"), str(root / pkl_name)]) == 0
    return root / pkl_name


def nan_evaluation_for_seed(seed):
    """The VOC evaluator, except that the trial with this seed evaluates to NaN (as COCO does
    without detections)."""
    real = evaluation.EVALUATOR_BUILDERS["pascal_voc"]

    def builder(cfg, dataset_name, output_folder):
        evaluator = real(cfg, dataset_name, output_folder)
        if cfg.SEED == seed:
            evaluator.evaluate = lambda: {"bbox": {"AP": math.nan, "AP50": math.nan,
                                                   "AP75": math.nan}}
        return evaluator

    return builder


@pytest.fixture(scope="module")
def study(synth_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    ok = pretrain_and_convert(synth_root, root, "supervised", "ok.pkl")
    swav = pretrain_and_convert(synth_root, root, "pretrain", "swav_resnet18.pkl")
    runs = root / "runs"
    transfer(synth_root, runs / "A" / "supervised", "supervised", ok, seeds=2, max_iter=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(evaluation.EVALUATOR_BUILDERS, "pascal_voc", nan_evaluation_for_seed(NAN_SEED))
        transfer(synth_root, runs / "A" / "moco_v2", "moco_v2", swav, seeds=3, max_iter=1)
    # config B also evaluates on the COCO-format copy of the test scenes: detectron2 nests results
    # per dataset
    two_tests = ["DATASETS.TEST", "('synth_voc_test', 'synth_coco_val')"]
    transfer(synth_root, runs / "B" / "supervised", "supervised", ok, seeds=1, max_iter=2,
             opts=two_tests)
    transfer(synth_root, runs / "B" / "moco_v2", "moco_v2", swav, seeds=1, max_iter=2,
             opts=two_tests)
    # a plain detectron2 output directory: one trial without its run record
    plain = root / "plain" / "d2run"
    shutil.copytree(runs / "A" / "supervised" / "seed0", plain,
                    ignore=shutil.ignore_patterns("*.pth", "results.json"))
    out = root / "report"
    # runs/A/moco_v2 is inside runs: given twice, counted once
    code = mocobench(["report", str(runs), str(runs / "A" / "moco_v2"), str(root / "plain"),
                      str(root / "pretraining"), "--out", str(out)])
    return {"root": root, "runs": runs, "out": out, "code": code}


def records(directory):
    return [r for _, r in record.trial_records(str(directory))]


@pytest.mark.slow  # the study: 7 real trials, built once
def test_tables_rows_and_n_follow_the_records(study, capsys):
    assert study["code"] == 0
    data = json.loads((study["out"] / "report.json").read_text())
    tables = list(data["tables"].values())
    # two configs evaluated on the same test set: two tables, never averaged together; config B's
    # second test set has its own table with the COCO columns
    assert sorted(t["dataset"] for t in tables) == ["synth_coco_val", TEST_SET, TEST_SET]
    by_iter = {t["identity"]["SOLVER.MAX_ITER"]: t for t in tables if t["dataset"] == TEST_SET}
    a, b = by_iter[1], by_iter[2]
    assert a["identity_sha"] != b["identity_sha"] \
        and a["differs_in"] == ["DATASETS.TEST", "SOLVER.MAX_ITER"]
    [coco] = [t for t in tables if t["dataset"] == "synth_coco_val"]
    assert coco["identity_sha"] == b["identity_sha"] and coco["evaluator_type"] == "coco"
    # no masks: no segm columns
    assert [c["title"] for c in coco["columns"]] == ["AP^bb", "AP^bb_50", "AP^bb_75"]
    assert {i: r["cells"]["bbox/AP"]["n"] for i, r in coco["rows"].items()} \
        == {"supervised": 1, "moco_v2": 1}
    # row names are the --init-name values, not guesses from "ok.pkl" / "swav_resnet18.pkl"; the
    # plain detectron2 copy is labelled by its weights file and marked as guessed
    assert list(a["rows"]) == ["supervised", "moco_v2", "ok"]
    assert [a["rows"][i]["guessed"] for i in a["rows"]] == [False, False, True]
    assert list(b["rows"]) == ["supervised", "moco_v2"]
    n = {init: row["cells"]["bbox/AP"]["n"] for init, row in a["rows"].items()}
    # 3 moco_v2 trials, one NaN; overlap counted once
    assert n == {"supervised": 2, "moco_v2": 2, "ok": 1}
    [failure] = a["failures"]
    assert failure["init"] == "moco_v2" and failure["seed"] == NAN_SEED and "NaN" in failure["why"]
    assert failure["dir"] == str(study["runs"] / "A" / "moco_v2" / f"seed{NAN_SEED}")
    # the means are those of the records' values
    sup = [r["results"][TEST_SET]["bbox"]["AP"]
           for r in records(study["runs"] / "A" / "supervised")]
    cell = a["rows"]["supervised"]["cells"]["bbox/AP"]
    assert cell["mean"] == pytest.approx(statistics.mean(sup)) \
        and cell["std"] == pytest.approx(statistics.stdev(sup))
    assert sorted(cell["values"]) == sorted(sup)
    # the plain copy of supervised seed0 reads the same AP from metrics.json
    assert a["rows"]["ok"]["cells"]["bbox/AP"]["mean"] == pytest.approx(
        records(study["runs"] / "A" / "supervised")[0]["results"][TEST_SET]["bbox"]["AP"])


@pytest.mark.slow  # the study: 7 real trials, built once
def test_markdown_cells_deltas_and_failure_listing(study):
    md = (study["out"] / "report.md").read_text()
    data = json.loads((study["out"] / "report.json").read_text())
    a, b = sorted((t for t in data["tables"].values() if t["dataset"] == TEST_SET),
                  key=lambda t: t["identity"]["SOLVER.MAX_ITER"])
    moco = a["rows"]["moco_v2"]
    delta = moco["deltas"]["bbox/AP"]
    line = next(x for x in md.splitlines() if x.startswith("| moco_v2 |") and "n=2" in x)
    means = [c["mean"] for row in a["rows"].values() for c in row["cells"].values() if c["n"]]
    # a smoke-test table (all AP < 1) prints 2 decimals, else the paper's 1
    d = 2 if max(means) < 1.0 else 1
    assert f"Δ {delta['diff']:+.{d}f} [{delta['low']:+.{d}f}, {delta['high']:+.{d}f}]" in line
    assert "Welch" in md and "Seeds left out of a mean" in md and f"seed {NAN_SEED}): bbox/AP" in md
    # n = 1: the value and n=1, no std, no interval, no verdict
    b_line = next(x for x in md.splitlines() if x.startswith("| moco_v2 |") and "n=1" in x)
    assert "±" not in b_line and "(no CI)" in b_line and "*" not in b_line
    assert b["rows"]["moco_v2"]["deltas"]["bbox/AP"]["significant"] is None
    assert "| ok ‡ |" in md and "synth_voc_R18_FPN_cpu.yaml" in md
    assert "Published" not in md  # a generated-data config is no official MoCo config


@pytest.mark.slow  # the study: 7 real trials, built once
def test_per_seed_values_go_to_csv_including_the_nan_seed(study):
    with open(study["out"] / "report.csv") as f:
        rows = list(csv.DictReader(f))
    ap = [r for r in rows if r["metric"] == "bbox/AP"]
    # every trial once per test set, the plain copy included
    assert len(ap) == 2 + 3 + 1 + 1 + 1 + 2
    nan_row = next(r for r in ap if r["init"] == "moco_v2" and r["seed"] == str(NAN_SEED))
    assert nan_row["value"] == ""


@pytest.mark.slow  # the study: 7 real trials, built once
def test_plots_are_written_with_both_pretraining_runs(study):
    assert (study["out"] / "ap.png").stat().st_size > 10_000
    assert (study["out"] / "pretrain.png").stat().st_size > 10_000
    found = report.find_pretrain_runs([str(study["root"] / "pretraining")])
    assert sorted(label for _, _, label in found) == ["pretrain (MoCo)", "supervised"]


@pytest.mark.slow  # the study: 7 real trials, built once
def test_unreadable_files_are_listed_and_nothing_usable_is_exit_2(study, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(study["runs"] / "B" / "moco_v2", bad / "moco_v2",
                    ignore=shutil.ignore_patterns("*.pth"))
    (bad / "moco_v2" / "seed0" / "results.json").write_bytes(b"\xff\xfe not json")
    broken = json.loads((study["runs"] / "B" / "supervised" / "seed0" / "results.json").read_text())
    broken["seed"] = "zero"
    (bad / "typed").mkdir()
    (bad / "typed" / "results.json").write_text(json.dumps(broken))
    assert mocobench(["report", str(bad), str(study["runs"] / "B"), "--out",
                      str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Not read" in md and "not UTF-8" in md \
        and "field 'seed' is \"zero\", expected an integer" in md
    capsys.readouterr()
    assert mocobench(["report", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mocobench report: error: no transfer results under") \
        and len(err.splitlines()) == 1


def test_official_config_gets_the_published_block_whatever_its_pixel_convention(tmp_path):
    """Supervised (Caffe2 R-50: BGR, caffe mean, stride in 1x1) and MoCo (`_moco`: RGB) configs,
    one table."""
    from transfer.config import load_config

    for name, config in (("supervised", "pascal_voc_R_50_C4_24k.yaml"),
                         ("moco", "pascal_voc_R_50_C4_24k_moco.yaml")):
        path = os.path.join(REPO, "configs", "detection", config)
        cfg = load_config(path, ["OUTPUT_DIR", str(tmp_path / name / "seed0")])
        rec = record.build_record(cfg, config_file=path, opts=[], init_name=name, weights_info=None,
                                  trial=0, world_size=8, eval_only=False, resumed=False,
                                  iteration=24000, seconds=1.0,
                                  results={"bbox": {"AP": 55.0, "AP50": 81.0, "AP75": 61.0}},
                                  evaluator_types={"voc_2007_test": "pascal_voc"})
        record.write_record(tmp_path / name / "seed0" / "results.json", rec)
    summary = report.write_report([str(tmp_path)], str(tmp_path / "out"))
    [table] = summary["tables"].values()
    assert table["official_config"] == "pascal_voc_R_50_C4_24k_moco.yaml"
    assert list(table["rows"]) == ["supervised", "moco"]
    assert table["rows"]["supervised"]["config_files"] == ["pascal_voc_R_50_C4_24k.yaml"]
    sup = next(p for p in table["published"] if p["name"] == "supervised IN-1M")
    assert sup["values"] == {"bbox/AP50": 81.3, "bbox/AP": 53.5, "bbox/AP75": 58.8}
    assert "**Published**" in summary["markdown"] and "moco detection README" in summary["markdown"]


def test_a_metric_missing_for_one_init_is_a_dash_not_a_crash(tmp_path):
    """Mask R-CNN records where one init's segm evaluation is absent: its segm cells print "–" with
    n=0."""
    from transfer.config import load_config

    path = os.path.join(REPO, "configs", "detection", "tiny_synth_coco_R_50_FPN.yaml")
    box = {"AP": 30.0, "AP50": 50.0, "AP75": 31.0}
    nan_ap = dict(box, AP=math.nan)  # NaN and missing metrics in one seed: both named
    for init, seed, results in (("supervised", 0, {"bbox": box, "segm": box}),
                                ("supervised", 1, {"bbox": box}), ("moco", 0, {"bbox": box}),
                                ("moco", 1, {"bbox": nan_ap, "segm": {"AP": 1.0}})):
        cfg = load_config(path,
                          ["OUTPUT_DIR", str(tmp_path / init / f"seed{seed}"), "SEED", str(seed)])
        rec = record.build_record(cfg, config_file=path, opts=[], init_name=init, weights_info=None,
                                  trial=seed, world_size=1, eval_only=False, resumed=False,
                                  iteration=2, seconds=1.0, results=results,
                                  evaluator_types={"synth_coco_val": "coco"})
        record.write_record(tmp_path / init / f"seed{seed}" / "results.json", rec)
    summary = report.write_report([str(tmp_path)], str(tmp_path / "out"))
    [table] = summary["tables"].values()
    assert [c["title"] for c in table["columns"]] \
        == ["AP^bb", "AP^bb_50", "AP^bb_75", "AP^mk", "AP^mk_50", "AP^mk_75"]
    assert [table["rows"][i]["cells"]["segm/AP"]["n"] for i in ("supervised", "moco")] == [1, 1]
    assert [table["rows"][i]["cells"]["segm/AP50"]["n"] for i in ("supervised", "moco")] == [1, 0]
    line = next(x for x in summary["markdown"].splitlines() if x.startswith("| moco |"))
    assert line.count("| – ") == 2 and "30.0 (n=1), Δ +0.0 (no CI)" in line
    assert table["failures"] == [
        {"dir": str(tmp_path / "supervised" / "seed1"), "init": "supervised", "seed": 1,
         "why": "segm/AP, segm/AP50, segm/AP75 missing"},
        {"dir": str(tmp_path / "moco" / "seed0"), "init": "moco", "seed": 0,
         "why": "segm/AP, segm/AP50, segm/AP75 missing"},
        {"dir": str(tmp_path / "moco" / "seed1"), "init": "moco", "seed": 1,
         "why": "bbox/AP NaN (null in results.json; e.g. an evaluation without detections); "
                "segm/AP50, segm/AP75 missing"}]


@pytest.mark.slow  # the study: 7 real trials, built once
def test_record_reader_names_the_file_and_field(study, tmp_path):
    rec = records(study["runs"] / "B" / "supervised")[0]
    assert rec["weights_info"]["sha256"] == file_sha256(study["root"] / "ok.pkl")
    assert rec["weights_info"]["architecture"] == "ResNet-18" \
        and rec["weights_info"]["backbone_loaded"] == 100
    rec["results"][TEST_SET]["bbox"]["AP"] = "high"
    path = tmp_path / "results.json"
    path.write_text(json.dumps(rec))
    with pytest.raises(record.RecordError,
                       match=f"{path}: field 'results.{TEST_SET}.bbox.AP' is \"high\""):
        record.read_record(path)
    rec["version"] = 99
    with pytest.raises(record.RecordError, match="record version 99.*newer mocobench"):
        record.write_record(path, rec)


# --------------------------------------------------------------------------------------------------
# statistics against scipy

@pytest.mark.parametrize("a, b", [([53.1, 53.6, 53.4, 53.9, 53.3], [55.7, 56.1, 55.8]),
                                  ([0.23, 0.0], [0.05, 0.11, 0.19, 0.02]),
                                  ([40.0, 40.2], [40.1, 40.05])])
def test_welch_interval_matches_scipy(a, b):
    mine = welch_interval(describe(b), describe(a))
    ref = scipy_stats.ttest_ind(b, a, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert mine["low"] == pytest.approx(ci.low) and mine["high"] == pytest.approx(ci.high)
    assert mine["df"] == pytest.approx(ref.df)
    assert mine["significant"] == (ref.pvalue < 0.05)
    assert mine["diff"] == pytest.approx(np.mean(b) - np.mean(a))


@pytest.mark.parametrize("end", ["high", "low"])
def test_an_interval_that_ends_at_zero_is_not_significant(end):
    """0 on the interval's end lies in the (closed) 95 % interval: no `*`. The seeds' mean is moved
    one float at a time until that end is exactly 0.0."""
    b = describe([-1.0, 1.0])
    mean = -welch_interval(describe([-1.0, 1.0]), b)[end]  # the end's distance from the diff
    for _ in range(1000):
        w = welch_interval(describe([mean - 1.0, mean + 1.0]), b)
        if w[end] == 0.0:
            break
        mean = math.nextafter(mean, -math.inf if w[end] > 0 else math.inf)
    assert w[end] == 0.0 and w["significant"] is False
    # one float further out: significant
    beyond = math.nextafter(mean, -math.inf if end == "high" else math.inf)
    assert welch_interval(describe([beyond - 1.0, beyond + 1.0]), b)["significant"] is True


def test_one_seed_has_no_std_and_no_interval():
    one = describe([57.0])
    assert (one["mean"], one["std"], one["n"]) == (57.0, None, 1)
    assert welch_interval(one, describe([50.0, 52.0])) is None
    assert describe([]) == {"mean": None, "std": None, "n": 0, "values": []}
    flat = welch_interval(describe([1.0, 1.0]), describe([1.0, 1.0]))
    # zero variance: no interval, no verdict
    assert flat["significant"] is None and flat["low"] is None
    assert welch_interval(describe([1.0, 1.0]), describe([2.5, 2.5, 2.5])) == {
        "diff": -1.5, "low": None, "high": None, "df": None, "significant": None}
