"""Provenance a reader can trust: init names from the record chain, a --baseline that must exist,
summary.json naming each trial's directory and seed, a config path that resolves, tables headed in
words.

Inputs come from the real writers: pretraining checkpoints from `pretrain.checkpoint.
save_checkpoint` (MoCo v1/v2/v3 models from `pretrain.moco.build_model`, the supervised classifier
from `pretrain.supervised.build_classifier`, configs from `pretrain.config.load_config`), converted
by `mocobench convert`; what transfer records from the .pkl by `transfer.checkpoint.inspect_weights`
(as transfer/run.py does); run records by `transfer.record.build_record`/`write_record` on a config
from `transfer.config.load_config`. Fast except the end-to-end transfer at the bottom (slow).
"""
import json
import os
import shutil

import pytest
import torch

from mocobench.cli import main as mocobench
from mocobench.utils import d2compat  # noqa: F401  (before detectron2)
from mocobench.utils.config import resolve_config_path
from mocobench.utils.errors import UsageError
from mocobench.utils.fileio import file_sha256
from transfer import record, report
from transfer.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "detection", "synth_voc_R18_FPN_cpu.yaml")
SHIPPED = "configs/detection/synth_voc_R18_FPN_cpu.yaml"
PRETRAIN_MOCO = os.path.join(REPO, "configs", "pretrain", "synth_R18_cpu.yaml")
PRETRAIN_SUPERVISED = os.path.join(REPO, "configs", "pretrain", "synth_R18_cpu_supervised.yaml")
TEST_SET = "synth_voc_test"
VOC = ("AP50", "AP", "AP75")


def _save_run(run_dir, cfg, model, state_dict_fn=None, config_entry=True, config_yaml=True):
    """What `mocobench pretrain`/`supervised` leave: config.yaml and a checkpoint (the real
    writer); returns the checkpoint's path."""
    from pretrain.checkpoint import official_state_dict, save_checkpoint

    os.makedirs(run_dir)
    if config_yaml:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(cfg.dump())
    model.ddp_modules = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    path = save_checkpoint(run_dir, 0, model, optimizer, None, 1, cfg,
                           state_dict_fn=state_dict_fn or official_state_dict)
    if not config_entry:  # an official MoCo release: no config in the file
        ckpt = torch.load(path, weights_only=True)
        del ckpt["config"]
        torch.save(ckpt, path)
    return path


def _convert(checkpoint, pkl):
    assert mocobench(["convert", str(checkpoint), str(pkl), "--no-verify"]) == 0
    return str(pkl)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """{case: .pkl path ("" for none)}: every link of the chain written by the real tools."""
    from pretrain.checkpoint import official_state_dict, plain_state_dict
    from pretrain.config import load_config as pretrain_config
    from pretrain.moco import build_model
    from pretrain.supervised import build_classifier

    root = tmp_path_factory.mktemp("chain")
    small = ["MOCO.K", "64", "MOCO.DIM", "16"]
    out = {"no weights": ""}

    def moco(name, opts, **kwargs):
        cfg = pretrain_config(PRETRAIN_MOCO, ["OUTPUT_DIR", str(root / name), *small, *opts])
        return _save_run(str(root / name), cfg, build_model(cfg), **kwargs)

    # MoCo v2 (the shipped CPU config): the checkpoint's config entry says v2
    out["moco v2 checkpoint"] = _convert(moco("v2", []), root / "moco_v2.pkl")
    # v1 with an MLP head: the config says v1 though the layout looks like v2 (the config wins);
    # the checkpoint is gone after the conversion, so its run directory's config.yaml is read
    ckpt = moco("v1", ["MOCO.VERSION", "v1", "MOCO.MLP", "True"])
    out["moco v1, checkpoint gone, config.yaml"] = _convert(ckpt, root / "v1.pkl")
    os.remove(ckpt)
    # an official release: no config entry, no config.yaml; the MLP head says v2
    ckpt = moco("official", [], config_entry=False, config_yaml=False)
    out["moco v2 release, layout only"] = _convert(ckpt, root / "release.pkl")
    # an official v1 release (linear head): the layout says v1
    ckpt = moco("official_v1", ["MOCO.VERSION", "v1", "MOCO.MLP", "False"], config_entry=False,
                config_yaml=False)
    out["moco v1 release, layout only"] = _convert(ckpt, root / "release_v1.pkl")
    # a release without its projection head, replaced by another file after the conversion:
    # nothing tells the version
    def no_head(model):
        return {k: v for k, v in official_state_dict(model).items() if ".fc." not in k}

    ckpt = moco("headless", [], config_entry=False, config_yaml=False, state_dict_fn=no_head)
    out["moco release without head, file changed"] = _convert(ckpt, root / "headless.pkl")
    # the same release, still the file converted: the reason does not claim a change
    kept = shutil.copy(ckpt, root / "headless_kept.pth")
    out["moco release without head"] = _convert(kept, root / "headless_kept.pkl")
    with open(ckpt, "ab") as f:
        f.write(b"changed")
    out["moco v3 checkpoint"] = _convert(
        moco("v3", ["MOCO.VERSION", "v3", "MOCO.MLP_DIM", "32"]), root / "v3.pkl")
    # the supervised baseline (plain torchvision keys, its fc dropped by the converter)
    cfg = pretrain_config(PRETRAIN_SUPERVISED, ["OUTPUT_DIR", str(root / "sup")], moco=False)
    ckpt = _save_run(str(root / "sup"), cfg, build_classifier(cfg, 10),
                     state_dict_fn=plain_state_dict)
    out["supervised checkpoint"] = _convert(ckpt, root / "supervised.pkl")
    # a torchvision-layout backbone without its classifier (as DINO's and Barlow Twins' releases)
    state = {k: v for k, v in build_classifier(cfg, 10).state_dict().items()
             if not k.startswith("fc.")}
    torch.save(state, root / "backbone.pth")
    out["backbone without classifier"] = _convert(root / "backbone.pth", root / "backbone.pkl")
    # a .pkl without the converter's report beside it
    os.makedirs(root / "elsewhere")
    out["no conversion report"] = str(shutil.copy(out["moco v2 checkpoint"],
                                                  root / "elsewhere" / "mocov2.pkl"))
    # a report that describes another file: supervised weights under the MoCo file's report
    os.makedirs(root / "swapped")
    shutil.copy(out["supervised checkpoint"], root / "swapped" / "moco_v2.pkl")
    shutil.copy(root / "moco_v2.json", root / "swapped" / "moco_v2.json")
    out["report of another file"] = str(root / "swapped" / "moco_v2.pkl")
    return out


def weights_info(pkl):
    """What transfer/run.py records for MODEL.WEIGHTS before any trial starts."""
    from transfer.checkpoint import inspect_weights

    return inspect_weights(load_config(CONFIG, ["MODEL.WEIGHTS", pkl])) if pkl else None


@pytest.mark.parametrize("case, name, how", [
    ("moco v2 checkpoint", "moco_v2", "a MoCo v1/v2 checkpoint: its config entry says "
                                      "MOCO.VERSION v2"),
    ("moco v1, checkpoint gone, config.yaml", "moco_v1",
     "a MoCo v1/v2 checkpoint: its run directory's config.yaml says MOCO.VERSION v1"),
    ("moco v2 release, layout only", "moco_v2",
     "a MoCo v1/v2 checkpoint: its projection head is an MLP (fc.0, fc.2): MoCo v2's layout"),
    ("moco v1 release, layout only", "moco_v1",
     "a MoCo v1/v2 checkpoint: its projection head is linear (fc): MoCo v1's layout"),
    ("moco release without head", None,
     "a MoCo v1/v2 checkpoint, but its MoCo version is recorded nowhere (no config entry, no "
     "projection head)"),
    ("moco release without head, file changed", None,
     "a MoCo v1/v2 checkpoint, but its MoCo version is recorded nowhere (no config entry, and the "
     "file changed since the conversion, no projection head)"),
    ("moco v3 checkpoint", "moco_v3", "a MoCo v3 checkpoint (base_encoder layout)"),
    ("supervised checkpoint", "supervised", "a torchvision-layout classifier (its fc was "
                                            "dropped)"),
    ("no weights", "random", "no MODEL.WEIGHTS: random initialisation"),
    ("backbone without classifier", None,
     "a torchvision-layout backbone without a classifier: a supervised model or a backbone-only "
     "release of a self-supervised one (DINO, Barlow Twins) cannot be told apart"),
    ("no conversion report", None, "mocov2.pkl has no readable conversion report beside it (the "
                                   "OUT.json of `mocobench convert`)"),
    ("report of another file", None, "moco_v2.json records the conversion of another file (its "
                                     "output sha256 is not that of moco_v2.pkl)"),
])
def test_init_names_are_inferred_from_the_record_chain(weights, case, name, how):
    pkl = weights[case]
    inferred, why = record.infer_init_name(pkl, weights_info(pkl))
    assert inferred == name
    assert why.endswith(how)
    if name not in (None, "random"):  # names the file and the checkpoint it came from
        conversion = json.loads(open(os.path.splitext(pkl)[0] + ".json").read())
        assert why.startswith(f"{os.path.basename(pkl)} was converted "
                              f"({os.path.basename(pkl)[:-4]}.json) from {conversion['input']}, ")


def test_choose_init_name_given_kept_on_resume_inferred_or_said_why(weights, tmp_path):
    from transfer.run import choose_init_name, trial_dir

    pkl = weights["moco v2 checkpoint"]
    cfg = load_config(CONFIG, ["MODEL.WEIGHTS", pkl, "OUTPUT_DIR", str(tmp_path)])
    info = weights_info(pkl)
    dirs = [trial_dir(str(tmp_path), i) for i in range(2)]
    assert choose_init_name("mine", cfg, info, dirs, resume=False) == ("mine", "--init-name")
    name, how = choose_init_name(None, cfg, info, dirs, resume=True)  # nothing finished yet
    assert name == "moco_v2" and how.startswith("inferred: moco_v2.pkl was converted (")
    # --resume: the name the finished trials recorded, so that all trials are one row
    rec = record.build_record(cfg, config_file=CONFIG, opts=[], init_name="alpha",
                              init_name_from="--init-name", weights_info=info, trial=0,
                              world_size=1, eval_only=False, resumed=False, iteration=1,
                              seconds=1.0, results={}, evaluator_types={})
    record.write_record(os.path.join(dirs[0], record.RESULTS_FILE), rec)
    assert choose_init_name(None, cfg, info, dirs, resume=True) \
        == ("alpha", "kept from the finished trials' records (--resume)")
    name, how = choose_init_name(None, cfg, info, dirs, resume=False)
    assert name == "moco_v2"  # without --resume check_output_dir refuses the directory anyway
    unknown = load_config(CONFIG, ["MODEL.WEIGHTS", weights["no conversion report"]])
    assert choose_init_name(None, unknown, weights_info(weights["no conversion report"]), dirs,
                            resume=False) \
        == (None, "not inferred: mocov2.pkl has no readable conversion report beside it (the "
                  "OUT.json of `mocobench convert`)")


def test_the_fallback_is_logged_with_the_row_name_the_report_will_use(caplog):
    import logging

    from transfer.run import _log_init_name

    with caplog.at_level(logging.INFO, logger="transfer.run"):
        _log_init_name(None, "not inferred: x", "/w/mocov2.pkl")
        _log_init_name("moco_v2", "inferred: y", "/w/mocov2.pkl")
        _log_init_name("mine", "--init-name", "/w/mocov2.pkl")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "init name: none given, not inferred: x; the report names this run after its "
                    "weights file ('mocov2', marked ‡): pass --init-name NAME to name it"),
        ("INFO", "init name 'moco_v2', inferred: y; --init-name NAME chooses another")]


# --------------------------------------------------------------------------------------------------
# the run record's config file, summary.json

def test_a_shipped_config_is_recorded_by_a_name_that_resolves_from_any_directory(tmp_path,
                                                                                monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    own = elsewhere / "mine.yaml"
    own.write_text(f'_BASE_: "{CONFIG}"\nSOLVER:\n  MAX_ITER: 7\n')
    for given, expected, path in [
            (SHIPPED, SHIPPED, CONFIG),  # named from another directory: before, a path under it
            (CONFIG, SHIPPED, CONFIG),  # absolute, inside configs/
            ("mine.yaml", str(own), str(own))]:  # any other file: its absolute path
        cfg = load_config(given, ["OUTPUT_DIR", str(tmp_path / "seed0")])
        rec = record.build_record(cfg, config_file=given, opts=[], init_name="x", weights_info=None,
                                  trial=0, world_size=1, eval_only=False, resumed=False,
                                  iteration=1, seconds=1.0, results={}, evaluator_types={})
        record.write_record(tmp_path / "seed0" / record.RESULTS_FILE, rec)
        back = record.read_record(tmp_path / "seed0" / record.RESULTS_FILE)
        assert back["config_file"] == expected
        assert back["config_file_sha256"] == file_sha256(path)
        # it resolves, from here and from the repository
        assert resolve_config_path(back["config_file"], str(elsewhere), "config") == path
        monkeypatch.chdir(REPO)
        assert resolve_config_path(back["config_file"], REPO, "config") == path
        monkeypatch.chdir(elsewhere)
    assert not (elsewhere / "configs").exists()


def test_records_written_before_the_new_fields_still_read(tmp_path):
    cfg = load_config(CONFIG, ["OUTPUT_DIR", str(tmp_path / "seed0")])
    rec = record.build_record(cfg, config_file=CONFIG, opts=[], init_name=None, weights_info=None,
                              trial=0, world_size=1, eval_only=False, resumed=False, iteration=1,
                              seconds=1.0, results={}, evaluator_types={})
    del rec["init_name_from"], rec["config_file_sha256"]
    path = tmp_path / "seed0" / record.RESULTS_FILE
    os.makedirs(path.parent)
    path.write_text(json.dumps(rec))
    assert record.read_record(path)["init_name"] is None
    rec["init_name_from"] = 3
    path.write_text(json.dumps(rec))
    with pytest.raises(record.RecordError, match="field 'init_name_from' is 3, expected a string "
                                                 "or null"):
        record.read_record(path)


def _trial(out, index, seed, init_name, values, weights="", init_name_from=None):
    directory = out / f"seed{index}"
    cfg = load_config(CONFIG, ["OUTPUT_DIR", str(directory), "SEED", str(seed), "MODEL.WEIGHTS",
                               weights])
    rec = record.build_record(cfg, config_file=SHIPPED, opts=[], init_name=init_name,
                              init_name_from=init_name_from, weights_info=None, trial=index,
                              world_size=1, eval_only=False, resumed=False, iteration=300,
                              seconds=1.0, results={"bbox": dict(zip(VOC, values))},
                              evaluator_types={TEST_SET: "pascal_voc"})
    record.write_record(directory / record.RESULTS_FILE, rec)


def test_summary_names_each_trials_directory_and_seed_and_the_row_names(tmp_path):
    from transfer.run import write_summary

    out = tmp_path / "voc_moco"
    _trial(out, 0, 1385853283, "moco_v2", (80.0, 50.0, 55.0), init_name_from="inferred: ...")
    _trial(out, 1, 982451653, "moco_v2", (81.0, 52.0, 56.0), init_name_from="inferred: ...")
    summary = write_summary(str(out))
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["trials"] == [
        {"dir": "seed0", "trial": 0, "seed": 1385853283, "init_name": "moco_v2",
         "record": "seed0/results.json"},
        {"dir": "seed1", "trial": 1, "seed": 982451653, "init_name": "moco_v2",
         "record": "seed1/results.json"}]
    assert summary["seeds"] == [1385853283, 982451653]
    assert summary["init_names"] == ["moco_v2"] and summary["init_names_guessed"] == []
    assert summary["config_files"] == [SHIPPED]
    assert summary["metrics"][TEST_SET]["bbox/AP"]["values"] == [50.0, 52.0]
    # no name given or inferred: the report's row name, said to be guessed (was ['None'])
    _trial(out, 2, 7, None, (1.0, 2.0, 3.0), weights="/w/mocov2.pkl")
    summary = write_summary(str(out))
    assert summary["init_names"] == ["moco_v2", "mocov2"]
    assert summary["init_names_guessed"] == ["mocov2"]
    assert summary["trials"][2]["init_name"] is None


# --------------------------------------------------------------------------------------------------
# the report: --baseline, headers in words

def test_a_baseline_that_is_no_row_is_a_one_line_error_listing_the_rows(tmp_path, capsys):
    runs = tmp_path / "runs"
    for init in ("supervised", "moco_v2"):
        _trial(runs / init, 0, 0, init, (80.0, 50.0, 55.0))
    _trial(runs / "scratch", 0, 0, None, (10.0, 5.0, 4.0))  # row "random init", guessed
    code = mocobench(["report", str(runs), "--out", str(tmp_path / "out"), "--baseline", "nosuch"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err == ("mocobench report: error: --baseline 'nosuch' names no row of the "
                            "report; its rows are 'moco_v2', 'random init', 'supervised'\n")
    assert not (tmp_path / "out").exists()  # nothing written
    with pytest.raises(UsageError):
        report.write_report([str(runs)], str(tmp_path / "out"), baseline="Supervised")
    # any row may be the baseline, a guessed one included; no --baseline: supervised, which a
    # table may lack
    for baseline in ("random init", "moco_v2"):
        assert mocobench(["report", str(runs), "--out", str(tmp_path / baseline), "--baseline",
                          baseline]) == 0
    assert mocobench(["report", str(runs / "moco_v2"), "--out", str(tmp_path / "one")]) == 0


@pytest.mark.parametrize("config, header", [
    ("detection/pascal_voc_R_50_C4_24k_moco.yaml",
     "VOC07+12 detection, R50-C4, 24k iterations, test on VOC07 test"),
    ("detection/pascal_voc_R_50_C4_24k.yaml",
     "VOC07+12 detection, R50-C4, 24k iterations, test on VOC07 test"),
    ("detection/coco_R_50_FPN_1x_moco.yaml",
     "COCO detection and instance segmentation, R50-FPN, 90k iterations, test on COCO val2017"),
    ("detection/coco_R_50_C4_2x_moco.yaml",
     "COCO detection and instance segmentation, R50-C4, 180k iterations, test on COCO val2017"),
    ("keypoints/keypoint_rcnn_R_50_FPN_2x_moco.yaml",
     "COCO keypoint detection, R50-FPN, 180k iterations, test on COCO val2017"),
    ("lvis/mask_rcnn_R_50_FPN_1x_moco.yaml", "LVIS v0.5 detection and instance segmentation, "
                                             "R50-FPN, 90k iterations, test on LVIS v0.5 val"),
    ("cityscapes/mask_rcnn_R_50_FPN_moco.yaml", "Cityscapes detection and instance segmentation, "
                                                "R50-FPN, 24k iterations, test on Cityscapes val"),
    ("semseg/voc_R_50_FCN_30k_moco.yaml",
     "VOC12 train_aug semantic segmentation, R50-FCN, 30k iterations, test on VOC12 val"),
    ("semseg/cityscapes_R_50_FCN_90k_moco.yaml",
     "Cityscapes semantic segmentation, R50-FCN, 90k iterations, test on Cityscapes val"),
    ("detection/synth_voc_R18_FPN_cpu.yaml",
     "synth_voc_trainval detection, R18-FPN, 300 iterations, test on synth_voc_test"),
    ("detection/tiny_synth_voc_R_50_C4.yaml",
     "synth_voc_trainval detection, R50-C4, 2 iterations, test on synth_voc_test"),
])
def test_table_headers_say_what_the_table_is_in_words(config, header):
    cfg = load_config(os.path.join(REPO, "configs", config))
    assert report.describe_experiment(record.experiment_identity(cfg), cfg.DATASETS.TEST[0]) \
        == header


def test_the_report_header_is_words_and_the_hash_stays_in_report_json(tmp_path):
    path = os.path.join(REPO, "configs", "detection", "pascal_voc_R_50_C4_24k_moco.yaml")
    out = tmp_path / "runs" / "moco_v2" / "seed0"
    cfg = load_config(path, ["OUTPUT_DIR", str(out)])
    rec = record.build_record(cfg, config_file=path, opts=[], init_name="moco_v2",
                              weights_info=None, trial=0, world_size=8, eval_only=False,
                              resumed=False, iteration=24000, seconds=1.0,
                              results={"bbox": {"AP": 57.0, "AP50": 82.0, "AP75": 63.5}},
                              evaluator_types={"voc_2007_test": "pascal_voc"})
    record.write_record(out / record.RESULTS_FILE, rec)
    summary = report.write_report([str(tmp_path / "runs")], str(tmp_path / "out"))
    lines = summary["markdown"].splitlines()
    assert lines[2] == "## 1. VOC07+12 detection, R50-C4, 24k iterations, test on VOC07 test"
    [table] = json.loads((tmp_path / "out" / "report.json").read_text())["tables"].values()
    assert table["identity_sha"] == rec["identity_sha"] \
        and rec["identity_sha"] not in summary["markdown"]
    assert table["header"] == lines[2][len("## 1. "):]


# --------------------------------------------------------------------------------------------------
# end to end

@pytest.mark.slow  # 2 real (1-iteration) trials
def test_transfer_without_init_name_records_the_inferred_name(weights, synth_root, tmp_path,
                                                              monkeypatch):
    """`mocobench transfer` from another directory, naming the shipped config by its configs/
    name, with a .pkl converted from a MoCo v2 run and no --init-name: every record, summary.json
    and the report say moco_v2; the records' config_file resolves."""
    tiny = ["SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "TEST.PRECISE_BN.ENABLED",
            "False", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MIN_SIZE_TEST", "96",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "SOLVER.WARMUP_ITERS", "1",
            "SOLVER.STEPS", "()", "SOLVER.MAX_ITER", "1", "SEED", "-1"]
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "voc"
    assert mocobench(["transfer", "--config-file", SHIPPED, "--synth-root", synth_root,
                      "--seeds", "2", *tiny, "MODEL.WEIGHTS", weights["moco v2 checkpoint"],
                      "OUTPUT_DIR", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = [record.read_record(out / f"seed{i}" / "results.json") for i in range(2)]
    for i, rec in enumerate(records):
        assert rec["init_name"] == "moco_v2" and rec["trial"] == i
        assert rec["init_name_from"].startswith("inferred: moco_v2.pkl was converted (")
        assert rec["config_file"] == SHIPPED and rec["config_file_sha256"] == file_sha256(CONFIG)
        assert summary["trials"][i] == {"dir": f"seed{i}", "trial": i, "seed": rec["seed"],
                                        "init_name": "moco_v2",
                                        "record": f"seed{i}/results.json"}
    assert summary["init_names"] == ["moco_v2"] and summary["config_files"] == [SHIPPED]
    # the seeds are random (SEED -1): the directory names are trial indices
    assert [rec["seed"] for rec in records] == summary["seeds"] != [0, 1]
    # each trial's log.txt says where its name came from
    log = (out / "seed1" / "log.txt").read_text()
    assert f"trial 2/2 in {out / 'seed1'}: seed {records[1]['seed']}, init name 'moco_v2' " \
        "(inferred: moco_v2.pkl was converted (moco_v2.json) from " in log
    md = report.write_report([str(out)], str(tmp_path / "report"))["markdown"]
    assert "| moco_v2 |" in md and "‡" not in md


@pytest.mark.parametrize("changed, shown", [(5, ""), (6, "...")])
def test_a_state_dict_with_missing_or_unexpected_keys_names_the_first_five(tmp_path, changed,
                                                                            shown):
    """load_plain_state_dict / load_official_state_dict refuse a state dict that lacks keys of the
    model or holds keys it has not, naming the first five of each and marking that there are
    more."""
    import torchvision

    from pretrain import checkpoint as ckpt

    model = torchvision.models.resnet18(num_classes=4)
    plain = ckpt.plain_state_dict(model)
    # (not num_batches_tracked: BatchNorm fills it in for a state dict without torch's metadata)
    missing = [k for k in plain if not k.endswith("num_batches_tracked")][:changed]
    for key in missing:
        del plain[key]
    unexpected = [f"head.{i}.weight" for i in range(changed)]
    plain.update({key: torch.zeros(1) for key in unexpected})
    official = {"module." + k: v for k, v in plain.items()}
    for load, state in ((ckpt.load_plain_state_dict, plain),
                        (ckpt.load_official_state_dict, official)):
        with pytest.raises(UsageError) as e:
            load(torchvision.models.resnet18(num_classes=4), state, "x.pth.tar")
        assert str(e.value).endswith(
            f"missing keys {missing[:5]}{shown}, unexpected keys {unexpected[:5]}{shown}"), \
            str(e.value)


@pytest.mark.parametrize("stem", [0, 1, 2])
def test_a_state_dict_of_other_shapes_is_refused_in_one_line_naming_them(stem):
    """A state dict whose tensors have other shapes (another number of classes, and `stem` other
    stem tensors): one line naming the first three such tensors in torch's words, "..." when
    there are more."""
    import torchvision

    from pretrain import checkpoint as ckpt

    plain = ckpt.plain_state_dict(torchvision.models.resnet18(num_classes=4))
    stems = {"conv1.weight": ((64, 3, 3, 3), (64, 3, 7, 7)),
             "layer1.0.conv1.weight": ((64, 64, 1, 1), (64, 64, 3, 3))}
    sizes = dict(list(stems.items())[:stem])
    for key, (ours, _) in sizes.items():
        plain[key] = torch.zeros(ours)
    sizes.update({"fc.weight": ((4, 512), (3, 512)), "fc.bias": ((4,), (3,))})
    named = [f"size mismatch for {key}: copying a param with shape torch.Size({list(ours)}) from "
             f"checkpoint, the shape in current model is torch.Size({list(theirs)})."
             for key, (ours, theirs) in sizes.items()]
    shown = "; ".join(named[:3]) + (" ..." if len(named) > 3 else "")
    for load, state, what in ((ckpt.load_plain_state_dict, plain, "classes"),
                              (ckpt.load_official_state_dict,
                               {"module." + k: v for k, v in plain.items()}, "MOCO.*")):
        with pytest.raises(UsageError) as e:
            load(torchvision.models.resnet18(num_classes=3), state, "x.pth.tar")
        assert str(e.value) == (f"x.pth.tar: state_dict does not match the model (MODEL.ARCH / "
                                f"{what} differ?): {shown}")


def test_a_classifier_wrapped_in_ddp_is_saved_under_plain_torchvision_keys(rendezvous):
    """plain_state_dict: the supervised baseline's checkpoint has torchvision's keys whether or not
    the model is wrapped in DistributedDataParallel (a one-process gloo group here)."""
    import torch.distributed as dist
    import torchvision
    from torch.nn.parallel import DistributedDataParallel

    from pretrain.checkpoint import plain_state_dict

    model = torchvision.models.resnet18(num_classes=4)
    dist.init_process_group("gloo", init_method=rendezvous, rank=0, world_size=1)
    try:
        wrapped = plain_state_dict(DistributedDataParallel(model))
    finally:
        dist.destroy_process_group()
    assert list(wrapped) == list(model.state_dict()) and "conv1.weight" in wrapped
    assert all(torch.equal(wrapped[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("version", [["MOCO.VERSION", "v2"],
                                     ["MOCO.VERSION", "v3", "MOCO.MLP_DIM", "32"]])
def test_a_moco_model_wrapped_in_ddp_is_saved_under_the_official_keys(rendezvous, version):
    """official_state_dict: the submodules the engine wraps in DDP (v2: encoder_q; v3: base_encoder
    and predictor) are saved as if unwrapped, under the official "module." prefix (a gloo group of
    one process here, as every launched run)."""
    import copy

    import torch.distributed as dist

    from pretrain.checkpoint import official_state_dict
    from pretrain.config import load_config as pretrain_config
    from pretrain.moco import build_model
    from pretrain.train import wrap_ddp

    cfg = pretrain_config(PRETRAIN_MOCO, ["MOCO.K", "64", "MOCO.DIM", "16", *version])
    model = build_model(cfg)
    unwrapped = official_state_dict(copy.deepcopy(model))
    dist.init_process_group("gloo", init_method=rendezvous, rank=0, world_size=1)
    try:
        wrap_ddp(model, torch.device("cpu"))
        assert all(type(getattr(model, n)).__name__ == "DistributedDataParallel"
                   for n in model.ddp_modules)
        wrapped = official_state_dict(model)
    finally:
        dist.destroy_process_group()
    assert list(wrapped) == list(unwrapped) and not any(".module." in k for k in wrapped)
    assert all(k.startswith("module.") and torch.equal(wrapped[k], v)
               for k, v in unwrapped.items())


def test_a_resumed_run_gets_its_grad_scalers_state_back(tmp_path):
    """load_for_resume restores the GradScaler a fp16 run saved (its loss scale and growth
    tracker), not a fresh one's."""
    import torchvision

    from pretrain.checkpoint import (
        load_for_resume,
        load_plain_state_dict,
        plain_state_dict,
        save_checkpoint,
    )
    from pretrain.config import load_config as pretrain_config

    cfg = pretrain_config(PRETRAIN_SUPERVISED, ["OUTPUT_DIR", str(tmp_path)], moco=False)
    model = torchvision.models.resnet18(num_classes=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    scaler.load_state_dict({**scaler.state_dict(), "_growth_tracker": 7})
    path = save_checkpoint(str(tmp_path), 0, model, optimizer, scaler, 3, cfg,
                           state_dict_fn=plain_state_dict)
    fresh = torch.amp.GradScaler("cpu")
    assert load_for_resume(path, torchvision.models.resnet18(num_classes=4),
                           torch.optim.SGD(model.parameters(), lr=0.1), fresh,
                           load_plain_state_dict) == (1, 3, 0)
    assert fresh.state_dict()["scale"] == 512.0 and fresh.state_dict()["_growth_tracker"] == 7
    # the official main_moco.py's checkpoint (epoch, arch, state_dict, optimizer): its epoch, and
    # the iteration count starts again from 0 (it records none)
    official = {k: v for k, v in torch.load(path, weights_only=True).items()
                if k in ("epoch", "arch", "state_dict", "optimizer")}
    torch.save(official, tmp_path / "checkpoint_0001.pth.tar")
    assert load_for_resume(str(tmp_path / "checkpoint_0001.pth.tar"),
                           torchvision.models.resnet18(num_classes=4),
                           torch.optim.SGD(model.parameters(), lr=0.1), None,
                           load_plain_state_dict) == (1, 0, 0)


def test_a_resnext_trunk_is_named_by_its_groups_and_width():
    """X101-32x8d (detectron2's ResNeXt settings: NUM_GROUPS x WIDTH_PER_GROUP)."""
    cfg = load_config(os.path.join(REPO, "configs", "detection", "coco_R_50_FPN_1x_moco.yaml"),
                      ["MODEL.RESNETS.DEPTH", "101", "MODEL.RESNETS.NUM_GROUPS", "32",
                       "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
                       "MODEL.RESNETS.STRIDE_IN_1X1", "False"])
    assert report.describe_experiment(record.experiment_identity(cfg), cfg.DATASETS.TEST[0]) \
        == "COCO detection and instance segmentation, X101-32x8d-FPN, 90k iterations, test on " \
           "COCO val2017"
