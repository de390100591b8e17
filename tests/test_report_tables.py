"""`mocobench report` on run directories made by the real writers, fast: the numbers in every
table, line and file.

Inputs come from the writers `mocobench transfer` and pretraining use, without training: run
records from `transfer.record.build_record`/`write_record` on a config loaded by
`transfer.config.load_config` (what transfer/run.py does after its final evaluation), a plain
detectron2 directory from `CfgNode.dump` and detectron2's own `EventStorage` + `JSONWriter` (what
`DefaultTrainer` writes), and a pretraining run from `mocobench.utils.events.MetricsWriter`.
tests/test_report.py runs the same report on real trials (slow); these are what `make mutation`
runs against transfer/report.py.
"""
import csv
import json
import math
import os
import statistics

import pytest

from mocobench.utils import d2compat  # noqa: F401  (before detectron2)
from mocobench.utils.errors import UsageError
from transfer import record, report
from transfer.config import load_config
from transfer.stats import welch_interval

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "detection", "synth_voc_R18_FPN_cpu.yaml")
TEST_SET = "synth_voc_test"
VOC = ("AP50", "AP", "AP75")
# (init name, seed) -> (AP50, AP, AP75) of config A (MAX_ITER 300, the yaml's)
A = {("supervised", 0): (80.0, 50.0, 55.0), ("supervised", 1): (81.0, 52.0, 56.0),
     ("supervised", 2): (82.0, 51.0, 60.0),
     ("moco_v2", 0): (83.0, 53.0, 58.0), ("moco_v2", 1): (84.0, 54.0, 59.0),
     ("moco_v2", 2): (85.5, 55.5, math.nan)}


def write_trial(root, init, seed, values, opts=(), weights="", results_key=None):
    out = root / (init or "none") / f"seed{seed}"
    cfg = load_config(CONFIG, ["OUTPUT_DIR", str(out), "SEED", str(seed), "MODEL.WEIGHTS", weights,
                               *opts])
    results = {"bbox": dict(zip(VOC, values))}
    rec = record.build_record(cfg, config_file=CONFIG, opts=list(opts), init_name=init,
                              weights_info=None, trial=seed, world_size=1, eval_only=False,
                              resumed=False, iteration=300, seconds=1.0,
                              results={results_key: results} if results_key else results,
                              evaluator_types={TEST_SET: "pascal_voc"})
    record.write_record(out / record.RESULTS_FILE, rec)
    return out


def write_plain_detectron2_run(directory, cfg, results, iterations=3):
    """What DefaultTrainer leaves: config.yaml (cfg.dump) and metrics.json (JSONWriter), the
    evaluation last."""
    from detectron2.evaluation.testing import flatten_results_dict
    from detectron2.utils.events import EventStorage, JSONWriter

    os.makedirs(directory)
    with open(os.path.join(directory, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    writer = JSONWriter(os.path.join(directory, "metrics.json"))
    with EventStorage(0) as storage:
        for iteration in range(iterations):
            storage.iter = iteration
            # with the "group/name" scalars GeneralizedRCNN logs every step (detectron2 v0.6
            # fast_rcnn.py, roi_heads.py, rpn.py): not evaluation results
            storage.put_scalars(total_loss=1.0 / (iteration + 1), lr=0.02, **{
                "fast_rcnn/cls_accuracy": 0.9, "fast_rcnn/fg_cls_accuracy": 0.5,
                "roi_head/num_fg_samples": 12.0, "rpn/num_pos_anchors": 30.0})
            if iteration == iterations - 1 and results:
                storage.put_scalars(**flatten_results_dict(results), smoothing_hint=False)
            writer.write()
    writer.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Config A: supervised and moco_v2 x 3 seeds (moco seed 2's AP75 NaN), a random-init run
    without a name, a plain detectron2 copy of an R-18 run with swav weights; config B (MAX_ITER
    2): one supervised seed."""
    root = tmp_path_factory.mktemp("runs")
    for (init, seed), values in A.items():
        write_trial(root / "A", init, seed, values)
    # no --init-name, no weights: "random init", guessed
    write_trial(root / "A", None, 0, (10.0, 5.0, 4.0))
    write_trial(root / "B", "supervised", 0, (0.75, 0.5, 0.25), opts=["SOLVER.MAX_ITER", "2"])
    cfg = load_config(CONFIG, ["OUTPUT_DIR", str(root / "plain"), "MODEL.WEIGHTS",
                               "/w/swav_800ep.pkl"])
    write_plain_detectron2_run(str(root / "plain" / "d2run"), cfg,
                               {"bbox": {"AP": 40.0, "AP50": 70.0, "AP75": 41.0}})
    return root


@pytest.fixture
def summary(runs, tmp_path):
    # per test, not per module: `make mutation` picks the tests that call a function, and a module
    # fixture's call would count for the first test only (the others' assertions would never meet
    # report.py's mutants)
    return report.write_report([str(runs)], str(tmp_path / "out"))


def table_of(summary, max_iter):
    [table] = [t for t in summary["tables"].values()
               if t["identity"]["SOLVER.MAX_ITER"] == max_iter]
    return table


def column(values, metric):
    return [v[VOC.index(metric)] for v in values if not math.isnan(v[VOC.index(metric)])]


def test_one_table_per_experiment_rows_in_order(summary, runs):
    assert len(summary["tables"]) == 2
    a, b = table_of(summary, 300), table_of(summary, 2)
    assert list(summary["tables"]) == sorted(summary["tables"])
    assert list(summary["tables"]) \
        == [f"{TEST_SET} {t['identity_sha']}" for t in summary["tables"].values()]
    assert a["dataset"] == b["dataset"] == TEST_SET and a["evaluator_type"] == "pascal_voc"
    # random init first, then the baseline, then the others by name
    assert list(a["rows"]) == ["random init", "supervised", "moco_v2", "swav_800ep"]
    assert [a["rows"][i]["guessed"] for i in a["rows"]] == [True, False, False, True]
    assert [c["key"] for c in a["columns"]] == ["bbox/AP50", "bbox/AP", "bbox/AP75"]
    assert [c["title"] for c in a["columns"]] == ["AP50", "AP", "AP75"]
    assert a["rows"]["swav_800ep"]["config_files"] == ["config.yaml"]
    assert a["rows"]["supervised"]["config_files"] == ["synth_voc_R18_FPN_cpu.yaml"]
    assert [s["seed"] for s in a["rows"]["supervised"]["seeds"]] == [0, 1, 2]
    assert a["rows"]["supervised"]["seeds"][1]["dir"] == str(runs / "A" / "supervised" / "seed1")
    assert list(b["rows"]) == ["supervised"] and b["baseline"] == "supervised"
    assert a["differs_in"] == b["differs_in"] == ["SOLVER.MAX_ITER"]
    assert a["official_config"] is None and a["published"] == []
    assert a["title"] == ("R-18 resnet_fpn, StandardROIHeads, norm SyncBN; 300 it x 8 img, lr "
                          "0.01, steps 225,275; min size train 96,112,128,144,160 / test 128; "
                          "train synth_voc_trainval")


def test_cells_are_mean_std_n_of_the_valid_seeds(summary):
    a = table_of(summary, 300)
    for init in ("supervised", "moco_v2"):
        values = [v for (i, _), v in A.items() if i == init]
        for metric in VOC:
            cell = a["rows"][init]["cells"][f"bbox/{metric}"]
            valid = column(values, metric)
            assert cell["n"] == len(valid) and cell["values"] == valid
            assert cell["mean"] == pytest.approx(statistics.mean(valid))
            assert cell["std"] == pytest.approx(statistics.stdev(valid))
    assert a["rows"]["moco_v2"]["cells"]["bbox/AP75"]["n"] == 2  # the NaN seed is left out of n
    assert a["rows"]["swav_800ep"]["cells"]["bbox/AP"] \
        == {"mean": 40.0, "std": None, "n": 1, "values": [40.0]}


def test_deltas_are_welch_intervals_to_the_baseline(summary):
    a = table_of(summary, 300)
    sup, moco = a["rows"]["supervised"], a["rows"]["moco_v2"]
    assert sup["deltas"] == {}  # the baseline has no difference to itself
    for key in ("bbox/AP50", "bbox/AP", "bbox/AP75"):
        assert moco["deltas"][key] == welch_interval(moco["cells"][key], sup["cells"][key])
    assert moco["deltas"]["bbox/AP"]["significant"] is True  # 54.2 vs 51.0, stds ~1.3 and 1.0
    assert moco["deltas"]["bbox/AP"]["diff"] == pytest.approx(54.1666667 - 51.0)
    # one seed: the difference of means without an interval
    assert a["rows"]["swav_800ep"]["deltas"]["bbox/AP"] \
        == {"diff": pytest.approx(-11.0), "low": None, "high": None, "df": None,
            "significant": None}


# supervised above moco on every metric: AP50 and AP by far more than their seed noise, AP75 by
# less
WORSE = {"supervised": [(82.0, 55.0, 60.0), (83.0, 56.0, 62.0), (82.5, 55.5, 58.0),
                        (83.5, 56.5, 61.0)],
         "moco": [(80.0, 52.0, 59.0), (79.0, 51.0, 62.0), (80.5, 52.5, 57.0)]}


def welch_by_hand(a, b):
    """mean(a) - mean(b) and its 95 % Welch interval, written out: sample variances, the standard
    error, the Welch–Satterthwaite degrees of freedom and scipy's t quantile."""
    from scipy.stats import t

    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    diff = statistics.mean(a) - statistics.mean(b)
    half = t.ppf(0.975, df) * math.sqrt(va + vb)
    return diff, diff - half, diff + half, df


def test_a_significantly_negative_difference_is_marked_with_its_sign(tmp_path):
    for init, seeds in WORSE.items():
        for seed, values in enumerate(seeds):
            write_trial(tmp_path / "runs", init, seed, values)
    summary = report.write_report([str(tmp_path / "runs")], str(tmp_path / "out"))
    [table] = summary["tables"].values()
    deltas = table["rows"]["moco"]["deltas"]
    [moco] = [x for x in summary["markdown"].splitlines() if x.startswith("| moco |")]
    cells = moco.split(" | ")[1:4]
    for metric, cell, significant in zip(VOC, cells, (True, True, False)):
        i = VOC.index(metric)
        diff, low, high, df = welch_by_hand([v[i] for v in WORSE["moco"]],
                                            [v[i] for v in WORSE["supervised"]])
        assert diff < 0 and (high < 0) == significant, (metric, diff, low, high)
        d = deltas[f"bbox/{metric}"]
        assert d["diff"] == pytest.approx(diff) and d["df"] == pytest.approx(df)
        assert d["low"] == pytest.approx(low) and d["high"] == pytest.approx(high)
        assert d["significant"] is significant
        text = f"Δ {diff:+.1f} [{low:+.1f}, {high:+.1f}]" + ("*" if significant else "")
        assert cell.endswith(text), (metric, cell, text)
    # the numbers themselves (AP: 51.83 - 55.75, se 0.546, df 3.96, t 2.78): the whole interval
    # below zero
    assert deltas["bbox/AP"]["diff"] == pytest.approx(-3.9166667)
    assert deltas["bbox/AP"]["df"] == pytest.approx(3.959, abs=1e-3)
    assert cells[1] == "51.8 ± 0.8 (n=3), Δ -3.9 [-5.4, -2.4]*"


def test_failures_name_the_seed_and_the_nan_metric(summary, runs):
    a = table_of(summary, 300)
    assert a["failures"] \
        == [{"dir": str(runs / "A" / "moco_v2" / "seed2"), "init": "moco_v2", "seed": 2,
             "why": "bbox/AP75 NaN (null in results.json; e.g. an evaluation without detections)"}]
    assert table_of(summary, 2)["failures"] == []


def test_markdown_lines(summary):
    md = summary["markdown"]
    lines = md.splitlines()
    a = table_of(summary, 300)
    index = list(summary["tables"].values()).index(a) + 1
    other = 3 - index
    assert lines[0] == "# Transfer results"
    # the header says what the table is in words; the identity hash is in report.json only
    assert f"## {index}. synth_voc_trainval detection, R18-FPN, 300 iterations, test on " \
        f"{TEST_SET}" in lines
    assert a["header"] \
        == "synth_voc_trainval detection, R18-FPN, 300 iterations, test on synth_voc_test"
    assert a["identity_sha"] not in md
    assert (f"Not averaged with table {other} (also {TEST_SET}): the configs differ in "
            "SOLVER.MAX_ITER = 300 here, 2 there.") in lines
    assert "| pre-train | AP50 | AP | AP75 | config file |" in lines \
        and "|---|---|---|---|---|" in lines
    assert ("| supervised | 81.0 ± 1.0 (n=3) | 51.0 ± 1.0 (n=3) | 57.0 ± 2.6 (n=3) | "
            "synth_voc_R18_FPN_cpu.yaml |"
            in lines)
    d = a["rows"]["moco_v2"]["deltas"]["bbox/AP"]
    moco = next(x for x in lines if x.startswith("| moco_v2 |"))
    assert f"54.2 ± 1.3 (n=3), Δ {d['diff']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]*" in moco
    assert "| random init ‡ | 10.0 (n=1), Δ -71.0 (no CI) | 5.0 (n=1), Δ -46.0 (no CI) |" in md
    assert "| swav_800ep ‡ | 70.0 (n=1), Δ -11.0 (no CI) |" in md
    assert ("Mean ± sample std over the valid seeds (n); n=1: the single value, no std. Δ: "
            "difference of means to the `supervised` row with its 95% confidence interval (Welch's "
            "t-test: unequal variances, Welch–Satterthwaite degrees of freedom); * the interval "
            "excludes 0. No CI when either row has n < 2 (or zero variance). ‡ row name guessed "
            "from the MODEL.WEIGHTS file name (a plain detectron2 directory, or a run whose init "
            "name was neither given with --init-name nor inferred from its weights' record "
            "chain).") in lines
    i = lines.index("Seeds left out of a mean:")
    assert lines[i + 1:i + 3] \
        == ["", f"- `{a['failures'][0]['dir']}` (moco_v2, seed 2): {a['failures'][0]['why']}"]
    # config B: every mean below 1 AP, so 2 decimals
    assert "| supervised | 0.75 (n=1) | 0.50 (n=1) | 0.25 (n=1) | synth_voc_R18_FPN_cpu.yaml |" \
        in lines
    assert "## Not read" not in md


def test_csv_and_json_hold_every_seed(summary, runs):
    out = os.path.dirname(summary["files"][0])
    assert [os.path.basename(f) for f in summary["files"]] \
        == ["report.md", "report.json", "report.csv", "ap.png"]
    assert all(os.path.getsize(f) > 0 for f in summary["files"])
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        assert f.read() == summary["markdown"]
    with open(os.path.join(out, "report.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["dataset", "config", "init", "seed", "metric", "value", "dir"]
    # (seeds of A's four rows + B's one) x 3 metrics
    assert len(rows) == 1 + 3 * (3 + 3 + 1 + 1 + 1)
    a = table_of(summary, 300)
    nan_row = [TEST_SET, a["identity_sha"], "moco_v2", "2", "bbox/AP75", "",
               str(runs / "A" / "moco_v2" / "seed2")]
    assert nan_row in rows
    assert [TEST_SET, a["identity_sha"], "supervised", "1", "bbox/AP", "52.0",
            str(runs / "A" / "supervised" / "seed1")] in rows
    with open(os.path.join(out, "report.json")) as f:
        data = json.load(f)
    assert data["baseline"] == "supervised" and data["confidence"] == 0.95 \
        and data["not_read"] == []
    assert data["tables"][f"{TEST_SET} {a['identity_sha']}"]["rows"]["moco_v2"]["cells"][
        "bbox/AP75"]["n"] == 2


def test_plain_detectron2_run_reads_its_metrics(runs):
    run, problem = report._plain_detectron2_run(str(runs / "plain" / "d2run"))
    assert problem is None
    assert run["results"] == {TEST_SET: {"bbox": {"AP": 40.0, "AP50": 70.0, "AP75": 41.0}}}
    assert (run["init"], run["guessed"], run["seed"], run["source"]) \
        == ("swav_800ep", True, -1, "metrics.json")
    assert run["test_datasets"] == [TEST_SET] and run["weights"] == "/w/swav_800ep.pkl"
    # the same experiment as the records of config A
    [sha] = {r["identity_sha"] for r in report.find_runs([str(runs / "A" / "supervised")])[0]}
    assert run["identity_sha"] == sha


def test_plain_detectron2_run_edge_cases(tmp_path):
    cfg = load_config(CONFIG, ["OUTPUT_DIR", str(tmp_path), "DATASETS.TEST",
                               "('synth_voc_test', 'synth_coco_val')"])
    # two test datasets: detectron2 keeps the dataset level in the scalar names; a NaN AP is null
    results = {TEST_SET: {"bbox": {"AP": 40.0}},
               "synth_coco_val": {"bbox": {"AP": math.nan, "AP50": 1.5}}}
    write_plain_detectron2_run(str(tmp_path / "two"), cfg, results)
    run, _ = report._plain_detectron2_run(str(tmp_path / "two"))
    assert run["results"] \
        == {TEST_SET: {"bbox": {"AP": 40.0}}, "synth_coco_val": {"bbox": {"AP": None, "AP50": 1.5}}}
    # training without an evaluation: a run without results, and why
    write_plain_detectron2_run(str(tmp_path / "unfinished"), cfg, None)
    run, problem = report._plain_detectron2_run(str(tmp_path / "unfinished"))
    assert problem is None and run["results"] == {}
    assert run["why"] \
        == "metrics.json has no final evaluation (training unfinished, or evaluation failed)"
    # a pretraining run also has config.yaml + metrics.json: not a detectron2 run, not a problem
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "config.yaml").write_text("MOCO:\n  K: 64\n")
    (tmp_path / "pre" / "metrics.json").write_text(json.dumps({"iteration": 1, "loss": 2.0}) + "\n")
    assert report._plain_detectron2_run(str(tmp_path / "pre")) == (None, None)
    # an unreadable config
    (tmp_path / "two" / "config.yaml").write_text("- a list\n")
    run, problem = report._plain_detectron2_run(str(tmp_path / "two"))
    assert run is None \
        and problem == (f"{tmp_path / 'two' / 'config.yaml'}: not a readable detectron2 config "
                        "(ValueError: not a mapping)")
    (tmp_path / "two" / "metrics.json").write_bytes(b"\xff\xfe")
    run, problem = report._plain_detectron2_run(str(tmp_path / "two"))
    assert problem \
        == f"{tmp_path / 'two' / 'metrics.json'}: not UTF-8 text (invalid start byte at byte 0)"


def test_torn_last_line_still_counts_the_lines_before(tmp_path):
    cfg = load_config(CONFIG, ["OUTPUT_DIR", str(tmp_path)])
    write_plain_detectron2_run(str(tmp_path / "run"), cfg,
                               {"bbox": {"AP": 12.5, "AP50": 20.0, "AP75": 10.0}})
    with open(tmp_path / "run" / "metrics.json", "a") as f:
        f.write('{"iteration": 3, "total_lo')  # killed mid-write
    rows, problem = report._read_json_lines(str(tmp_path / "run" / "metrics.json"))
    assert problem is None and len(rows) == 3 and rows[-1]["bbox/AP"] == 12.5
    absent = report._read_json_lines(str(tmp_path / "absent.json"))
    assert absent == (None, "cannot be read (No such file or directory)")


def test_find_runs_counts_a_directory_once_and_lists_what_it_cannot_read(runs, tmp_path):
    found, problems = report.find_runs([str(runs / "A"), str(runs / "A" / "moco_v2"),
                                        str(tmp_path / "absent")])
    assert len(found) == 7  # 3 + 3 + the random-init run; moco_v2 given twice counts once
    assert problems == [{"path": str(tmp_path / "absent"), "why": "not a directory"}]
    bad = tmp_path / "bad" / "seed0"
    bad.mkdir(parents=True)
    (bad / "results.json").write_text("{")
    (tmp_path / "bad" / "seed1").mkdir()
    os.symlink(runs / "A" / "supervised" / "seed0", tmp_path / "bad" / "seed1" / "link")
    found, problems = report.find_runs([str(tmp_path / "bad")])
    assert [r["seed"] for r in found] == [0] and found[0]["source"] == "results.json"
    assert problems == [{"path": str(bad / "results.json"),
                         "why": f"{bad / 'results.json'}: not valid JSON (Expecting property name "
                                "enclosed in double quotes at line 1, column 2)"}]
    # an evaluation-only record is read under its own name
    os.rename(runs / "B" / "supervised" / "seed0" / "results.json", tmp_path / "kept.json")
    try:
        os.symlink(tmp_path / "kept.json",
                   runs / "B" / "supervised" / "seed0" / "results_eval.json")
        [run], _ = report.find_runs([str(runs / "B")])
        assert run["source"] == "results_eval.json" and run["init"] == "supervised"
    finally:
        os.remove(runs / "B" / "supervised" / "seed0" / "results_eval.json")
        os.rename(tmp_path / "kept.json", runs / "B" / "supervised" / "seed0" / "results.json")


def test_another_baseline_and_none(runs, tmp_path, capsys):
    assert report.main([str(runs / "A"), "--out", str(tmp_path / "o"),
                        "--baseline", "moco_v2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Transfer results\n")
    assert out.rstrip().endswith("wrote " + ", ".join(str(tmp_path / "o" / f) for f in
                                                      ("report.md", "report.json", "report.csv",
                                                       "ap.png")))
    with open(tmp_path / "o" / "report.json") as f:
        [table] = json.load(f)["tables"].values()
    assert list(table["rows"]) == ["random init", "moco_v2", "supervised"]
    assert table["rows"]["moco_v2"]["deltas"] == {} and table["baseline"] == "moco_v2"
    assert table["rows"]["supervised"]["deltas"]["bbox/AP"]["diff"] \
        == pytest.approx(51.0 - 54.1666667)
    assert "difference of means to the `moco_v2` row" in out
    # the default baseline, which a table may lack: no differences, and how to choose one; --out
    # defaults to the first directory
    copy = tmp_path / "B"
    os.makedirs(copy / "x" / "seed0")
    with open(runs / "B" / "supervised" / "seed0" / "results.json") as f:
        rec = json.loads(f.read())
    rec["init_name"] = "moco_v2"
    (copy / "x" / "seed0" / "results.json").write_text(json.dumps(rec))
    assert report.main([str(copy)]) == 0
    md = (copy / "report.md").read_text()
    assert "No `supervised` row in this table, so no differences (choose one with --baseline " \
        "NAME)." in md
    assert "| moco_v2 | 0.75 (n=1) | 0.50 (n=1) | 0.25 (n=1) |" in md


def test_nothing_usable_is_a_one_line_usage_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError) as e:
        report.write_report([str(tmp_path / "empty")], str(tmp_path / "out"))
    assert str(e.value) \
        == (f"no transfer results under {str(tmp_path / 'empty')!r}: expected run directories with "
            "results.json (mocobench transfer) or a detectron2 config.yaml + metrics.json, or "
            "pretraining runs")
    bad = tmp_path / "bad" / "seed0"
    bad.mkdir(parents=True)
    (bad / "results.json").write_text("[]")
    nan = write_trial(tmp_path / "nan", "supervised", 0, (math.nan, math.nan, math.nan))
    with pytest.raises(UsageError) as e:
        report.write_report([str(tmp_path / "bad"), str(tmp_path / "nan")], str(tmp_path / "out"))
    assert str(e.value).endswith(
        f" (1 unreadable, 1 without results: {bad / 'results.json'}: {bad / 'results.json'}: "
        f"expected a JSON object (a mocobench run record), got list; {nan}: bbox/AP50, bbox/AP, "
        "bbox/AP75 NaN (null in results.json; e.g. an evaluation without detections))")
    assert not (tmp_path / "out").exists()  # nothing written


def test_pretraining_runs_are_found_and_their_curves_averaged_per_epoch(tmp_path):
    from mocobench.utils.events import MetricsWriter

    moco = tmp_path / "pretraining" / "m1"
    moco.mkdir(parents=True)
    writer = MetricsWriter(str(moco))
    for iteration, (epoch, loss, acc1) in enumerate(
            [(1, 6.0, 10.0), (1, 5.0, 20.0), (2, 4.0, 40.0)], 1):
        writer.write(iteration, epoch=epoch, loss=loss, acc1=acc1, moco_m=0.99)
    writer.write(3, epoch=2, knn_top1=35.5)
    writer.close()
    supervised = tmp_path / "pretraining" / "supervised"
    supervised.mkdir()
    writer = MetricsWriter(str(supervised))
    writer.write(1, epoch=1, loss=2.0, acc1=30.0)
    writer.write(1, epoch=1, val_top1=28.0)
    writer.close()
    # epochs without acc@1, acc@1 without epochs: not a pretraining
    other = tmp_path / "pretraining" / "neither"
    other.mkdir()
    writer = MetricsWriter(str(other))
    writer.write(1, epoch=1, lr=0.1)
    writer.write(2, acc1=3.0)
    writer.close()
    found = report.find_pretrain_runs([str(tmp_path)])
    assert [(d, label) for d, _, label in found] \
        == [(str(moco), "m1 (MoCo)"), (str(supervised), "supervised")]
    rows = found[0][1]
    assert report.pretrain_curves(rows) \
        == {"loss": [(1, 5.5), (2, 4.0)], "acc1": [(1, 15.0), (2, 40.0)],
            "knn_top1": [(2, 35.5)]}
    assert report.pretrain_curves(found[1][1]) \
        == {"loss": [(1, 2.0)], "acc1": [(1, 30.0)], "val_top1": [(1, 28.0)]}
    # pretraining runs alone make a report: the plot, no table
    summary = report.write_report([str(tmp_path)], str(tmp_path / "out"))
    assert summary["tables"] == {}
    assert [os.path.basename(f) for f in summary["files"]] \
        == ["report.md", "report.json", "report.csv", "pretrain.png"]
    assert os.path.getsize(tmp_path / "out" / "pretrain.png") > 0


@pytest.mark.parametrize("config, title", [
    ("keypoints/tiny_synth_keypoint_rcnn_R18_FPN_cpu.yaml",
     "R-18 resnet_fpn, StandardROIHeads + keypoints, "),
    ("detection/tiny_synth_coco_R_50_FPN.yaml", "R-50 resnet_fpn, StandardROIHeads + mask, "),
    ("detection/tiny_synth_voc_R_50_C4.yaml", "R-50 resnet, Res5ROIHeadsExtraNorm, "),
    # a SemanticSegmentor has no RoI heads (whatever MASK_ON/KEYPOINT_ON say): its segmentation
    # head is named
    ("semseg/voc_R_50_FCN_30k_moco.yaml", "R-50 resnet, DilatedFCNHead, "),
])
def test_table_titles_name_the_heads(config, title):
    identity = record.experiment_identity(load_config(os.path.join(REPO, "configs", config),
                                                      ["MODEL.MASK_ON", "True", "MODEL.KEYPOINT_ON",
                                                       "True"]
                                                      if config.startswith("semseg") else []))
    assert report.describe_identity(identity).startswith(title)


def test_a_plain_detectron2_run_alone_gets_its_evaluator_guessed(runs, tmp_path):
    summary = report.write_report([str(runs / "plain")], str(tmp_path / "out"))
    [table] = summary["tables"].values()
    # results with bbox AP/AP50/AP75 only: the VOC columns
    assert table["evaluator_type"] == "pascal_voc"
    assert [c["key"] for c in table["columns"]] == ["bbox/AP50", "bbox/AP", "bbox/AP75"]
    assert table["baseline"] is None and list(table["rows"]) == ["swav_800ep"]


def test_configs_differing_in_many_keys_show_six_then_dots(tmp_path):
    write_trial(tmp_path, "supervised", 0, (1.0, 2.0, 3.0))
    many = ["SOLVER.MAX_ITER", "7", "SOLVER.BASE_LR", "0.5", "SOLVER.IMS_PER_BATCH", "4",
            "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "99", "SOLVER.WARMUP_ITERS", "3",
            "SOLVER.STEPS", "(5,)"]
    write_trial(tmp_path / "other", "supervised", 0, (1.0, 2.0, 3.0), opts=many)
    md = report.write_report([str(tmp_path)], str(tmp_path / "out"))["markdown"]
    [line] = [x for x in md.splitlines() if x.startswith("Not averaged with table 2")]
    assert line.count(" here, ") == 6 and line.endswith("; ....")
    # the keys sorted, each with both values (which table is "here" follows the identities' hash)
    assert "INPUT.MAX_SIZE_TEST = 213 here, 99 there; INPUT.MIN_SIZE_TEST = 128 here, 64 there" \
        in line or \
        "INPUT.MAX_SIZE_TEST = 99 here, 213 there; INPUT.MIN_SIZE_TEST = 64 here, 128 there" in line


def test_a_new_task_registers_its_columns_once_and_is_recognised(monkeypatch):
    # the registries, restored after
    monkeypatch.setattr(report, "METRIC_COLUMNS", dict(report.METRIC_COLUMNS))
    monkeypatch.setattr(report, "_RECOGNIZERS", list(report._RECOGNIZERS))
    report.register_metrics("depth", [("depth", "AbsRel", "AbsRel"), ("depth", "RMSE", "RMSE")],
                            recognizes=lambda r: set(r) == {"depth"})
    assert report.METRIC_COLUMNS["depth"] == [report.Column("depth", "AbsRel", "AbsRel"),
                                              report.Column("depth", "RMSE", "RMSE")]
    assert report.guess_evaluator_type({"depth": {"RMSE": 0.3}}) == "depth"
    assert report.columns_for("depth", [{"depth": {"RMSE": 0.3}}]) \
        == [report.Column("depth", "RMSE", "RMSE")]
    assert report.guess_evaluator_type({"bbox": {"AP": 1.0, "AP50": 2.0}}) == "pascal_voc"
    assert report.guess_evaluator_type({"bbox": {"APs": 1.0}}) == "coco"
    assert report.guess_evaluator_type({"panoptic": {"PQ": 1.0}}) is None
    # an unregistered type: every task/metric seen, by name
    assert report.columns_for(None, [{"panoptic": {"PQ": 1.0, "SQ": 2.0}}]) == [
        report.Column("panoptic", "PQ", "panoptic/PQ"),
        report.Column("panoptic", "SQ", "panoptic/SQ")]
    with pytest.raises(KeyError, match="metric columns for 'depth' are already registered"):
        report.register_metrics("depth", [("depth", "AbsRel", "AbsRel")])


def test_help_names_the_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        report.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert ("--out OUT where to write report.md/.json/.csv and the plots (default: the first "
            "RUN_DIR)") in text
    assert "--baseline NAME the init name the differences are taken to (default: supervised); " \
        "a NAME that is no row of the report is an error" in text
    assert "RUN_DIR run directories (searched recursively)" in text


def test_unreadable_runs_are_listed_after_the_tables(runs, tmp_path):
    bad = tmp_path / "bad" / "seed0"
    bad.mkdir(parents=True)
    (bad / "results.json").write_text("[]")
    summary = report.write_report([str(runs / "B"), str(tmp_path / "bad")], str(tmp_path / "out"))
    assert set(summary) == {"tables", "not_read", "markdown", "files"}
    why = f"{bad / 'results.json'}: expected a JSON object (a mocobench run record), got list"
    assert summary["not_read"] == [{"path": str(bad / "results.json"), "why": why}]
    md = summary["markdown"]
    lines = md.splitlines()
    assert lines[0] == "# Transfer results" \
        and "| supervised | 0.75 (n=1) | 0.50 (n=1) | 0.25 (n=1) |" in md
    i = lines.index("## Not read")
    assert lines[i + 1:] \
        == ["", f"- `{bad / 'results.json'}`: {bad / 'results.json'}: expected a JSON object (a "
                "mocobench run record), got list"]


@pytest.mark.parametrize("config, results, column", [
    # detectron2's SemSegEvaluator (VOC) and CityscapesSemSegEvaluator: their headline metrics are
    # mIoU and IoU
    ("tiny_synth_voc_R18_FCN_cpu.yaml", {"mIoU": 61.5, "fwIoU": 70.25, "mACC": 66.0, "pACC": 80.5},
     "mIoU"),
    ("tiny_synth_cityscapes_R18_FCN_cpu.yaml",
     {"IoU": 41.5, "iIoU": 20.0, "IoU_sup": 70.0, "iIoU_sup": 50.0}, "IoU"),
])
def test_a_plain_detectron2_semantic_run_reads_its_evaluation(tmp_path, config, results, column):
    cfg = load_config(os.path.join(REPO, "configs", "semseg", config),
                      ["OUTPUT_DIR", str(tmp_path)])
    [dataset] = cfg.DATASETS.TEST
    write_plain_detectron2_run(str(tmp_path / "runs" / "d2run"), cfg, {"sem_seg": results})
    run, problem = report._plain_detectron2_run(str(tmp_path / "runs" / "d2run"))
    assert problem is None and "why" not in run
    assert run["results"] == {dataset: {"sem_seg": results}}
    summary = report.write_report([str(tmp_path / "runs")], str(tmp_path / "out"))
    [table] = summary["tables"].values()
    assert [c["key"] for c in table["columns"]] == [f"sem_seg/{column}"] and table["failures"] == []
    assert f"| random init ‡ | {results[column]:.1f} (n=1) | config.yaml |" \
        in summary["markdown"].splitlines()


def test_seeds_without_results_say_why(tmp_path):
    write_trial(tmp_path, "supervised", 0, (80.0, 50.0, 55.0))
    # a record whose evaluation returned nothing, and a plain detectron2 run that stopped before
    # its evaluation
    out = tmp_path / "moco" / "seed1"
    cfg = load_config(CONFIG, ["OUTPUT_DIR", str(out), "SEED", "1"])
    rec = record.build_record(cfg, config_file=CONFIG, opts=[], init_name="moco", weights_info=None,
                              trial=1, world_size=1, eval_only=False, resumed=False, iteration=300,
                              seconds=1.0, results={}, evaluator_types={})
    record.write_record(out / record.RESULTS_FILE, rec)
    plain = tmp_path / "plain" / "d2run"
    write_plain_detectron2_run(str(plain), load_config(CONFIG, ["MODEL.WEIGHTS", "/w/swav.pkl"]),
                               None)
    summary = report.write_report([str(tmp_path)], str(tmp_path / "out"))
    [table] = summary["tables"].values()
    assert table["failures"] == [
        {"dir": str(out), "init": "moco", "seed": 1,
         "why": f"no results for {TEST_SET} (evaluation failed, or no evaluator for it)"},
        {"dir": str(plain), "init": "swav", "seed": -1,
         "why": "metrics.json has no final evaluation (training unfinished, or evaluation failed)"}]
    lines = summary["markdown"].splitlines()
    i = lines.index("Seeds left out of a mean:")
    assert lines[i + 1:i + 4] == [
        "", f"- `{out}` (moco, seed 1): no results for {TEST_SET} (evaluation failed, or no "
            "evaluator for it)",
        f"- `{plain}` (swav, seed -1): metrics.json has no final evaluation (training unfinished, "
        "or evaluation failed)"]


def test_a_config_without_the_title_keys_gets_question_marks():
    """A config.yaml of another detectron2 version may lack any key: its title says "?" (or None),
    not crash."""
    for architecture in ("GeneralizedRCNN", "SemanticSegmentor"):
        identity = record.experiment_identity({"MODEL": {"META_ARCHITECTURE": architecture,
                                                         "MASK_ON": True}})
        assert report.describe_identity(identity) == (
            ("R-? ?, ? + mask, " if architecture == "GeneralizedRCNN" else "R-? ?, ?, ")
            + "norm None; None it x None img, lr None, steps None; min size train None / test "
              "None; train ")


def test_the_published_block_of_an_official_config(tmp_path):
    path = os.path.join(REPO, "configs", "detection", "pascal_voc_R_50_C4_24k_moco.yaml")
    out = tmp_path / "runs" / "moco" / "seed0"
    cfg = load_config(path, ["OUTPUT_DIR", str(out)])
    rec = record.build_record(cfg, config_file=path, opts=[], init_name="moco", weights_info=None,
                              trial=0, world_size=8, eval_only=False, resumed=False,
                              iteration=24000, seconds=1.0,
                              results={"bbox": {"AP": 57.0, "AP50": 82.0, "AP75": 63.5}},
                              evaluator_types={"voc_2007_test": "pascal_voc"})
    record.write_record(out / record.RESULTS_FILE, rec)
    lines = report.write_report([str(tmp_path / "runs")],
                                str(tmp_path / "out"))["markdown"].splitlines()
    i = lines.index("**Published** for this config (pascal_voc_R_50_C4_24k_moco.yaml): what a "
                    "faithful reproduction should be near (means of 5 trials).")
    readme, table2 = "moco detection README", "He et al. 2020, Table 2"
    assert lines[i + 1:] == [  # the last block of the report
        "", "| published pre-train | AP50 | AP | AP75 | source |", "|---|---|---|---|---|",
        f"| supervised IN-1M | 81.3 | 53.5 | 58.8 | {table2}; {readme} |",
        f"| MoCo v1 IN-1M, 200ep | 81.5 | 55.9 | 62.6 | {table2}; {readme} |",
        f"| MoCo v1 IG-1B | 82.2 | 57.2 | 63.7 | {table2} |",
        f"| MoCo v2 IN-1M, 200ep | 82.4 | 57.0 | 63.6 | {readme} |",
        f"| MoCo v2 IN-1M, 800ep | 82.5 | 57.4 | 64.0 | {readme} |"]


def test_a_records_weights_lead_to_the_pretraining_run_they_were_converted_from(tmp_path):
    """The converter's report beside the .pkl names the checkpoint it read: that run's curves are
    plotted under the record's init name, though the pretraining directory is not among the
    report's paths."""
    import torch

    from convert.api import convert_checkpoint
    from mocobench.utils.events import MetricsWriter
    from tests.conftest import random_resnet_state
    from transfer.checkpoint import inspect_weights

    pretraining = tmp_path / "pretraining" / "run7"
    pretraining.mkdir(parents=True)
    writer = MetricsWriter(str(pretraining))
    writer.write(1, epoch=1, loss=6.0, acc1=10.0, moco_m=0.99)
    writer.close()
    # the official MoCo layout: module.encoder_q.<torchvision>
    checkpoint = pretraining / "checkpoint_0001.pth.tar"
    torch.save({"state_dict": {f"module.encoder_q.{k}": v
                               for k, v in random_resnet_state("resnet18").items()
                               if not k.startswith("fc.")}, "arch": "resnet18", "epoch": 1},
               checkpoint)
    weights = tmp_path / "weights" / "w.pkl"
    os.makedirs(weights.parent)
    convert_checkpoint(str(checkpoint), str(weights), verify=False)
    out = tmp_path / "runs" / "moco_v2" / "seed0"
    cfg = load_config(CONFIG, ["OUTPUT_DIR", str(out), "MODEL.WEIGHTS", str(weights)])
    info = inspect_weights(cfg)  # what transfer/run.py records
    assert info["converter_report"]["input"] == str(checkpoint)
    rec = record.build_record(cfg, config_file=CONFIG, opts=[], init_name="moco_v2",
                              weights_info=info, trial=0, world_size=1, eval_only=False,
                              resumed=False, iteration=300, seconds=1.0,
                              results={"bbox": dict(zip(VOC, (80.0, 50.0, 55.0)))},
                              evaluator_types={TEST_SET: "pascal_voc"})
    record.write_record(out / record.RESULTS_FILE, rec)
    runs, _ = report.find_runs([str(tmp_path / "runs")])
    found = report.find_pretrain_runs([str(tmp_path / "runs")], runs)
    assert [(d, label) for d, _, label in found] == [(str(pretraining), "moco_v2 (MoCo)")]
    summary = report.write_report([str(tmp_path / "runs")], str(tmp_path / "out"))
    assert [os.path.basename(f) for f in summary["files"]] \
        == ["report.md", "report.json", "report.csv", "ap.png", "pretrain.png"]
    os.remove(checkpoint)  # 2 x 45 MB: the suite writes little
    os.remove(weights)
