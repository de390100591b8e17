"""The run record (transfer/record.py): what the writer puts in it, what the reader refuses, and
the identity.

Every record here comes from the real writer (`build_record` on a config loaded by
`transfer.config.load_config`, saved by `write_record`), the path `mocobench transfer` takes after
training (transfer/run.py); a broken record is a written one edited afterwards, as a user or a
crash would. Fast (no training): these tests are what `make mutation` runs against
transfer/record.py.
"""
import hashlib
import json
import math
import os
import re

import numpy as np
import pytest

from transfer import record
from transfer.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "detection", "synth_voc_R18_FPN_cpu.yaml")
TEST_SET = "synth_voc_test"


def config(tmp_path, *opts):
    return load_config(CONFIG, ["OUTPUT_DIR", str(tmp_path / "seed0"), *opts])


def written(tmp_path, cfg=None, name="seed0", **overrides):
    """A record as `mocobench transfer` writes it (transfer/run.py), saved under
    tmp_path/name/results.json."""
    cfg = cfg if cfg is not None else config(tmp_path)
    kwargs = dict(config_file=CONFIG, opts=["SEED", 3], init_name="moco_v2",
                  weights_info={"sha256": "ab" * 32}, trial=0, world_size=1, eval_only=False,
                  resumed=False, iteration=300, seconds=12.34567,
                  results={"bbox": {"AP": np.float64(41.5), "AP50": np.float32(70.25),
                                    "AP75": math.nan}},
                  evaluator_types={TEST_SET: "pascal_voc"})
    kwargs.update(overrides)
    rec = record.build_record(cfg, **kwargs)
    path = tmp_path / name / record.RESULTS_FILE
    record.write_record(path, rec)
    return path, rec


def test_the_written_record_reads_back_with_every_field(tmp_path):
    cfg = config(tmp_path, "SEED", "3", "MODEL.WEIGHTS", "weights/moco.pkl")
    path, rec = written(tmp_path, cfg)
    # indent 2
    assert path.read_text().endswith("}\n") and path.read_text().startswith('{\n  "format"')
    back = record.read_record(path)
    assert back == json.loads(json.dumps(rec))
    assert (back["format"], back["version"]) == ("mocobench.transfer.run", 1)
    assert back["init_name"] == "moco_v2" and back["weights"] == "weights/moco.pkl"
    # a shipped config by its configs/ name (resolves from any directory), with the file's sha256
    assert back["config_file"] == "configs/detection/synth_voc_R18_FPN_cpu.yaml" \
        and back["opts"] == ["SEED", "3"]
    assert back["config_file_sha256"] == hashlib.sha256(open(CONFIG, "rb").read()).hexdigest()
    assert back["init_name_from"] is None  # not given to build_record here
    assert back["seed"] == 3 and back["trial"] == 0 and back["world_size"] == 1 \
        and back["iteration"] == 300
    assert back["eval_only"] is False and back["resumed"] is False and back["device"] == "cpu"
    assert back["seconds"] == 12.346  # rounded to milliseconds
    assert back["output_dir"] == str(tmp_path / "seed0")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", back["finished_at"])
    assert {"python", "torch", "detectron2"} <= set(back["versions"])
    assert back["datasets"] == {"train": ["synth_voc_trainval"], "test": [TEST_SET]}
    assert back["evaluator_types"] == {TEST_SET: "pascal_voc"}
    # the schedule, from the merged config (the yaml's values)
    assert back["schedule"] \
        == {"MAX_ITER": 300, "STEPS": [225, 275], "BASE_LR": 0.01, "IMS_PER_BATCH": 8}
    # the init keys, as the config had them
    assert list(back["init_config"]) == list(record.INIT_KEYS)
    assert back["init_config"] \
        == {"MODEL.WEIGHTS": "weights/moco.pkl", "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
            "MODEL.PIXEL_STD": [58.395, 57.12, 57.375], "INPUT.FORMAT": "RGB",
            "MODEL.RESNETS.STRIDE_IN_1X1": False}
    # one test dataset: detectron2 drops the dataset level, the record puts it back; NaN is null,
    # numpy is float
    assert back["results"] == {TEST_SET: {"bbox": {"AP": 41.5, "AP50": 70.25, "AP75": None}}}
    flat = record.flatten_config(cfg)
    assert back["config_sha256"] \
        == hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()
    assert back["identity_sha"] == record.identity_sha(back["identity"]) \
        and len(back["identity_sha"]) == 12
    assert back["weights_info"] == {"sha256": "ab" * 32}


# written out here, not read from transfer/record.py: a key dropped from (or added to) the module's
# sets is caught by the tests below. Each with a value other than synth_voc_R18_FPN_cpu.yaml's.
INIT_KEYS = {"MODEL.WEIGHTS": "x.pkl", "MODEL.PIXEL_MEAN": "[103.53, 116.28, 123.675]",
             "MODEL.PIXEL_STD": "[1.0, 1.0, 1.0]", "INPUT.FORMAT": "BGR",
             "MODEL.RESNETS.STRIDE_IN_1X1": "True"}
RUN_KEYS = {"SEED": "7", "OUTPUT_DIR": "elsewhere", "MODEL.DEVICE": "cuda",
            "DATALOADER.NUM_WORKERS": "0", "SOLVER.CHECKPOINT_PERIOD": "7", "TEST.EVAL_PERIOD": "3",
            "VIS_PERIOD": "5", "CUDNN_BENCHMARK": "True", "GLOBAL.HACK": "0.5",
            "MOCOBENCH.LOG_PERIOD": "1", "MOCOBENCH.REQUIRE_WEIGHTS": "True",
            "MOCOBENCH.SYNTH_ROOT": "/synth", "MOCOBENCH.WANDB.ENABLED": "True",
            "MOCOBENCH.WANDB.PROJECT": "elsewhere"}
# keys of the experiment: a change is another experiment
EXPERIMENT_KEYS = {"SOLVER.MAX_ITER": "2", "SOLVER.BASE_LR": "0.02", "SOLVER.WEIGHT_DECAY": "0.001",
                   "MODEL.RESNETS.DEPTH": "34", "MODEL.RESNETS.NORM": "BN",
                   "MODEL.ROI_HEADS.SCORE_THRESH_TEST": "0.5", "MODEL.RPN.NMS_THRESH": "0.6",
                   "INPUT.MIN_SIZE_TEST": "160", "INPUT.MIN_SIZE_TRAIN": "(128,)",
                   "TEST.DETECTIONS_PER_IMAGE": "50", "DATASETS.TRAIN": "('synth_voc_test',)"}


def test_the_identity_is_the_config_minus_the_init_and_run_keys_written_out(tmp_path):
    assert record.NOT_IDENTITY == set(INIT_KEYS) | set(RUN_KEYS)
    assert set(record.INIT_KEYS) == set(INIT_KEYS) and set(record.RUN_KEYS) == set(RUN_KEYS)
    flat = record.flatten_config(config(tmp_path))
    base = record.experiment_identity(config(tmp_path))
    # every init/run key is in the config (so leaving it out means something), every other key stays
    assert set(INIT_KEYS) | set(RUN_KEYS) <= set(flat)
    assert set(base) == set(flat) - set(INIT_KEYS) - set(RUN_KEYS) and list(base) == sorted(base)
    assert base == {k: v for k, v in flat.items() if k in base}
    assert base["MODEL.RESNETS.DEPTH"] == 18 \
        and base["INPUT.MIN_SIZE_TRAIN"] == [96, 112, 128, 144, 160]
    # tuples as lists: equal after a JSON trip
    assert base["DATASETS.TRAIN"] == ["synth_voc_trainval"]
    # all init and run keys changed at once: still the same experiment
    same = config(tmp_path, *[x for kv in {**INIT_KEYS, **RUN_KEYS}.items() for x in kv])
    assert record.experiment_identity(same) == base
    assert record.identity_sha(record.experiment_identity(same)) == record.identity_sha(base)


@pytest.mark.parametrize("key", sorted({**INIT_KEYS, **RUN_KEYS}))
def test_an_init_or_run_key_leaves_the_identity_alone(tmp_path, key):
    base_cfg = config(tmp_path)
    changed_cfg = config(tmp_path, key, {**INIT_KEYS, **RUN_KEYS}[key])
    flat, changed_flat = record.flatten_config(base_cfg), record.flatten_config(changed_cfg)
    # the override took: the configs differ in this key only ...
    assert [k for k in flat if flat[k] != changed_flat[k]] == [key]
    # ... and that is the same experiment
    base, changed = record.experiment_identity(base_cfg), record.experiment_identity(changed_cfg)
    assert changed == base and record.identity_sha(changed) == record.identity_sha(base)
    assert key not in changed


@pytest.mark.parametrize("key", sorted(EXPERIMENT_KEYS))
def test_an_experiment_key_changes_the_identity(tmp_path, key):
    base = record.experiment_identity(config(tmp_path))
    changed = record.experiment_identity(config(tmp_path, key, EXPERIMENT_KEYS[key]))
    assert record.identity_diff(base, changed) == [key]
    assert record.identity_sha(changed) != record.identity_sha(base)


def test_identity_diff_names_the_keys(tmp_path):
    base = record.experiment_identity(config(tmp_path))
    # a different schedule or architecture: another experiment, and the diff names the keys
    other = record.experiment_identity(config(tmp_path, "SOLVER.MAX_ITER", "2",
                                              "MODEL.RESNETS.DEPTH", "34"))
    assert record.identity_sha(other) != record.identity_sha(base)
    assert record.identity_diff(base, other) == ["MODEL.RESNETS.DEPTH", "SOLVER.MAX_ITER"]
    assert record.identity_diff(base, base) == []
    fewer = {k: v for k, v in base.items() if k != "SOLVER.MAX_ITER"}
    assert record.identity_diff(base, fewer) == ["SOLVER.MAX_ITER"] \
        == record.identity_diff(fewer, base)
    # a key whose value is None (detectron2's SOLVER.WEIGHT_DECAY_BIAS) against a config without it
    # (a config.yaml of a detectron2 before the key existed): absent is not the same as None, from
    # either side
    assert base["SOLVER.WEIGHT_DECAY_BIAS"] is None
    older = {k: v for k, v in base.items() if k != "SOLVER.WEIGHT_DECAY_BIAS"}
    assert record.identity_diff(base, older) == ["SOLVER.WEIGHT_DECAY_BIAS"] \
        == record.identity_diff(older, base)


def test_the_identity_sha_survives_the_json_trip(tmp_path):
    path, rec = written(tmp_path)
    back = record.read_record(path)
    assert record.identity_sha(back["identity"]) == rec["identity_sha"]
    # key order
    assert record.identity_sha(dict(reversed(list(back["identity"].items())))) \
        == rec["identity_sha"]
    assert re.fullmatch(r"[0-9a-f]{12}", rec["identity_sha"])


def test_results_nested_per_test_dataset(tmp_path):
    two = ("synth_voc_test", "synth_coco_val")
    cfg = config(tmp_path, "DATASETS.TEST", str(two))
    box = {"AP": 1.0}
    # several test datasets: detectron2 keeps the dataset level; a dataset it has no results for is
    # empty
    _, rec = written(tmp_path, cfg, name="a", results={"synth_coco_val": {"bbox": box}})
    assert rec["results"] == {"synth_voc_test": {}, "synth_coco_val": {"bbox": box}}
    _, rec = written(tmp_path, cfg, name="b", results=None)  # evaluation failed: no results at all
    assert rec["results"] == {"synth_voc_test": {}, "synth_coco_val": {}}
    _, rec = written(tmp_path, name="c", results={})
    assert rec["results"] == {TEST_SET: {}}
    # a one-dataset result that already names its dataset is kept as it is
    _, rec = written(tmp_path, name="d", results={TEST_SET: {"bbox": box}})
    assert rec["results"] == {TEST_SET: {"bbox": box}}


def test_plain_makes_evaluator_output_json_safe():
    out = record.plain({1: (np.float32(0.5), [np.int64(3), math.inf, -math.inf]),
                        "b": {"c": np.float64(math.nan)}})
    assert out == {"1": [0.5, [3, None, None]], "b": {"c": None}}
    assert type(out["1"][0]) is float and type(out["1"][1][0]) is int
    assert record.plain("text") == "text" and record.plain(None) is None and record.plain(2) == 2


# --------------------------------------------------------------------------------------------------
# the reader refuses what the writer would not write, naming the file and the field

def edited(path, edit):
    rec = json.loads(path.read_text())
    edit(rec)
    path.write_text(json.dumps(rec))
    return path


@pytest.mark.parametrize("field, value, expected", [
    ("init_name", 3, "a string or null"),
    ("weights", None, "a string"),
    ("weights_info", [], "an object or null"),
    ("opts", "SEED 3", "a list"),
    ("seed", "zero", "an integer"),
    ("seed", True, "an integer"),  # a bool is not an integer here
    ("seed", 1.5, "an integer"),
    ("iteration", "300", "an integer or null"),
    ("eval_only", 0, "true/false"),
    ("resumed", None, "true/false"),
    ("seconds", True, "a number"),
    ("seconds", "1.0", "a number"),
    ("results", [], "an object"),
    ("device", 0, "a string"),
    ("init_name_from", ["--init-name"], "a string or null"),
    ("config_file_sha256", 1, "a string or null"),
])
def test_a_field_of_the_wrong_type_is_named(tmp_path, field, value, expected):
    path, _ = written(tmp_path)
    edited(path, lambda r: r.__setitem__(field, value))
    message = f"{path}: field '{field}' is {json.dumps(value)}, expected {expected}"
    with pytest.raises(record.RecordError) as e:
        record.read_record(path)
    assert str(e.value) == message


@pytest.mark.parametrize("field, value",
                         [("init_name", None), ("weights_info", None), ("iteration", None),
                          ("seconds", 3), ("seconds", 0.5)])
def test_nullable_fields_and_numbers_are_accepted(tmp_path, field, value):
    path, _ = written(tmp_path)
    edited(path, lambda r: r.__setitem__(field, value))
    assert record.read_record(path)[field] == value


def test_every_field_is_required(tmp_path):
    path, rec = written(tmp_path)
    for field in record.FIELDS:
        edited(path, lambda r, field=field: r.pop(field))
        with pytest.raises(record.RecordError) as e:
            record.read_record(path)
        assert str(e.value) == f"{path}: field {field!r} is missing"
        path.write_text(json.dumps(rec))
    assert record.read_record(path) == rec


def test_format_and_version(tmp_path):
    path, rec = written(tmp_path)
    edited(path, lambda r: r.pop("format"))
    with pytest.raises(record.RecordError) as e:
        record.read_record(path)
    assert str(e.value) == (f"{path}: not a mocobench run record (field 'format' is None, expected "
                            "'mocobench.transfer.run'; records without it were written by "
                            "mocobench before record version 1)")
    edited(path, lambda r: r.update(format="another.tool"))
    with pytest.raises(record.RecordError) as e:
        record.read_record(path)
    assert "(field 'format' is 'another.tool', expected 'mocobench.transfer.run';" in str(e.value)
    for version, newer in ((2, True), (0, True), (True, False), ("1", False), (1.0, False)):
        rec["version"] = version
        path.write_text(json.dumps(rec))
        with pytest.raises(record.RecordError) as e:
            record.read_record(path)
        assert str(e.value) \
            == (f"{path}: record version {version!r}; this mocobench reads versions 1..1"
                + (" (written by a newer mocobench: update it)" if newer else ""))
    path.write_text("[1, 2]")
    with pytest.raises(record.RecordError) as e:
        record.read_record(path)
    assert str(e.value) == f"{path}: expected a JSON object (a mocobench run record), got list"


@pytest.mark.parametrize("edit, field, shown, expected", [
    (lambda r: r["datasets"].pop("train"), "datasets.train", "null", "a list of dataset names"),
    (lambda r: r["datasets"].__setitem__("test", "synth_voc_test"), "datasets.test",
     '"synth_voc_test"', "a list of dataset names"),
    (lambda r: r["datasets"].__setitem__("train", ["a", 1]), "datasets.train", '["a", 1]',
     "a list of dataset names"),
    (lambda r: r["results"].__setitem__("voc_2007_test", {}), "results.voc_2007_test", "{}",
     "results of a test dataset ['synth_voc_test']"),
    (lambda r: r["results"].__setitem__(TEST_SET, [1]), f"results.{TEST_SET}", "[1]",
     "an object {task: {metric: value}}"),
    (lambda r: r["results"][TEST_SET].__setitem__("bbox", 41.5), f"results.{TEST_SET}.bbox", "41.5",
     "an object {metric: value}"),
    (lambda r: r["results"][TEST_SET]["bbox"].__setitem__("AP", "high"),
     f"results.{TEST_SET}.bbox.AP", '"high"', "a number or null (NaN)"),
    (lambda r: r["results"][TEST_SET]["bbox"].__setitem__("AP", False),
     f"results.{TEST_SET}.bbox.AP", "false", "a number or null (NaN)"),
])
def test_datasets_and_results_are_checked_to_the_metric(tmp_path, edit, field, shown, expected):
    path, _ = written(tmp_path)
    edited(path, edit)
    with pytest.raises(record.RecordError) as e:
        record.read_record(path)
    assert str(e.value) == f"{path}: field '{field}' is {shown}, expected {expected}"


def test_a_long_value_is_shortened_in_the_message(tmp_path):
    path, _ = written(tmp_path)
    edited(path, lambda r: r.__setitem__("seed", "x" * 80))
    with pytest.raises(record.RecordError) as e:
        record.read_record(path)
    shown = json.dumps("x" * 80)[:57] + "..."
    assert str(e.value) == f"{path}: field 'seed' is {shown}, expected an integer"
    # 59 characters with its quotes: shown whole
    edited(path, lambda r: r.__setitem__("seed", "x" * 57))
    with pytest.raises(record.RecordError) as e:
        record.read_record(path)
    assert f"is {json.dumps('x' * 57)}, expected" in str(e.value)
    edited(path, lambda r: r.__setitem__("seed", "x" * 58))  # 60 characters: shortened
    with pytest.raises(record.RecordError) as e:
        record.read_record(path)
    assert f"is {json.dumps('x' * 58)[:57]}..., expected" in str(e.value)


def test_unreadable_files_are_named(tmp_path):
    path = tmp_path / "results.json"
    path.write_bytes(b'{"a": 1}\n\xff\xfe')
    with pytest.raises(record.RecordError) as e:
        record.read_record(path)
    assert str(e.value) == f"{path}: not UTF-8 text (invalid start byte at byte 9)"
    path.write_text('{"format": "mocobench.transfer.run",\n  "version": }')
    with pytest.raises(record.RecordError) as e:
        record.read_record(path)
    assert str(e.value) == f"{path}: not valid JSON (Expecting value at line 2, column 14)"
    with pytest.raises(record.RecordError) as e:
        record.read_record(tmp_path / "absent.json")
    assert str(e.value) == f"{tmp_path / 'absent.json'}: cannot be read (No such file or directory)"
    assert isinstance(e.value, record.UsageError)  # a one-line error, exit code 2


def test_the_writer_refuses_what_the_reader_would_refuse_and_writes_nothing(tmp_path):
    _, rec = written(tmp_path)
    rec["seed"] = "zero"
    target = tmp_path / "new" / "results.json"
    with pytest.raises(record.RecordError, match=re.escape(f"{target}: field 'seed' is \"zero\"")):
        record.write_record(target, rec)
    assert not target.exists()


def test_trial_records_in_trial_order_with_errors_in_place(tmp_path):
    for seed in (10, 2, 0):
        written(tmp_path, name=f"seed{seed}", trial=seed)
    path, _ = written(tmp_path, name="seed4", trial=4)
    path.write_text("{")  # a torn record: reported in its place, not dropped
    written(tmp_path, name="seedx")  # not a trial directory
    written(tmp_path, name="other")
    (tmp_path / "seed3").mkdir()  # a trial without a record (unfinished)
    found = record.trial_records(str(tmp_path))
    assert [os.path.basename(d) for d, _ in found] == ["seed0", "seed2", "seed4", "seed10"]
    assert [r["trial"] if isinstance(r, dict) else type(r).__name__ for _, r in found] \
        == [0, 2, "RecordError", 10]
    assert str(found[2][1]).startswith(f"{path}: not valid JSON")
    assert found[0][0] == str(tmp_path / "seed0")
    assert record.trial_records(str(tmp_path), record.EVAL_FILE) == []
    eval_path, _ = written(tmp_path, name="seed2", eval_only=True)
    os.replace(eval_path, eval_path.with_name(record.EVAL_FILE))
    [(directory, rec)] = record.trial_records(str(tmp_path), record.EVAL_FILE)
    assert directory == str(tmp_path / "seed2") and rec["eval_only"] is True
    assert record.trial_records(str(tmp_path / "absent")) == []


def test_the_summary_printed_after_the_trials_comes_from_their_records(tmp_path):
    """`mocobench transfer`'s last lines: each trial's headline metrics (NaN for a metric that was
    NaN), then with several trials the mean and sample std of each metric over the seeds where it
    is valid (AP75 is valid in one: left out)."""
    from transfer.run import _format_summary

    _, first = written(tmp_path)
    cfg = load_config(CONFIG, ["OUTPUT_DIR", str(tmp_path / "seed1"), "SEED", "4"])
    _, second = written(tmp_path, cfg=cfg, name="seed1", trial=1,
                        results={"bbox": {"AP": 43.5, "AP50": 72.25, "AP75": 40.0}})
    one = (f"trial 0 (seed -1) {TEST_SET}: bbox AP 41.50 AP50 70.25 AP75 NaN  "
           f"({tmp_path / 'seed0'})")
    assert _format_summary([first]) == one
    assert _format_summary([first, second]).split("\n") == [
        one,
        f"trial 1 (seed 4) {TEST_SET}: bbox AP 43.50 AP50 72.25 AP75 40.00  ({tmp_path / 'seed1'})",
        f"{TEST_SET}: mean ± sample std over the valid seeds: bbox/AP 42.50 ± 1.41 (n=2), "
        "bbox/AP50 71.25 ± 1.41 (n=2)"]


@pytest.mark.parametrize("processes, machines, swapped", [(1, 1, False), (2, 1, True),
                                                          (1, 2, True)])
def test_the_first_trials_config_on_several_cpu_processes_names_every_syncbn_it_swaps(
        tmp_path, processes, machines, swapped):
    """--print-config's config: on several CPU processes (gloo) SyncBN becomes naiveSyncBN, in a
    note naming every key; one process keeps the config's SyncBN (plain BN there)."""
    from transfer.run import first_trial_config

    cfg, notes = first_trial_config(CONFIG, ["OUTPUT_DIR", str(tmp_path)], num_gpus=processes,
                                    num_machines=machines)
    norm = "naiveSyncBN" if swapped else "SyncBN"
    assert cfg.MODEL.FPN.NORM == cfg.MODEL.RESNETS.NORM == norm
    assert ("SyncBN -> naiveSyncBN in MODEL.FPN.NORM, MODEL.RESNETS.NORM (several CPU processes)"
            in notes) == swapped


def _trial_config(directory, seed):
    """DIRECTORY/config.yaml as a trial that ran with SEED `seed` wrote it."""
    from transfer.run import write_trial_config

    os.makedirs(directory)
    write_trial_config(load_config(CONFIG, ["OUTPUT_DIR", str(directory), "SEED", str(seed)]))


def test_trials_continued_take_the_seeds_they_recorded_and_new_ones_seed_plus_index(tmp_path):
    """The trials' seeds: with --resume / --eval-only (reuse_recorded) each trial's SEED from its
    config.yaml where it has one, else SEED + its index; a negative SEED draws one per trial."""
    from transfer.run import choose_seeds

    dirs = [str(tmp_path / f"seed{i}") for i in range(3)]
    _trial_config(tmp_path / "seed0", 11)
    _trial_config(tmp_path / "seed2", 40)
    cfg = load_config(CONFIG, ["OUTPUT_DIR", str(tmp_path), "SEED", "5"])
    assert choose_seeds(cfg, dirs, reuse_recorded=True) == [11, 6, 40]
    assert choose_seeds(cfg, dirs, reuse_recorded=False) == [5, 6, 7]
    drawn = choose_seeds(load_config(CONFIG, ["SEED", "-1"]), dirs, reuse_recorded=False)
    assert all(0 <= s < 2**31 - 1 for s in drawn) and len(set(drawn)) == 3


@pytest.mark.parametrize("flags, seed", [({}, 5), ({"resume": True}, 11),
                                         ({"eval_only": True}, 11)])
def test_print_config_shows_the_seed_the_first_trial_recorded_when_it_continues(tmp_path, flags,
                                                                                 seed):
    """--print-config with --resume or --eval-only: the first trial runs with the SEED in its
    seed0/config.yaml (what its earlier run wrote), not SEED from the command line."""
    from transfer.run import first_trial_config

    _trial_config(tmp_path / "seed0", 11)
    cfg, notes = first_trial_config(CONFIG, ["OUTPUT_DIR", str(tmp_path), "SEED", "5"], **flags)
    assert cfg.SEED == seed and cfg.OUTPUT_DIR == str(tmp_path / "seed0")
    assert notes[-2] == (f"SEED 11: recorded in {tmp_path / 'seed0'}/config.yaml" if seed == 11
                         else "SEED 5: trial i runs with SEED + i")


def test_started_json_reads_back_and_is_written_for_people_too(tmp_path):
    """started.json (written when a trial starts): the identity, init name and weights' sha256,
    indented two spaces with a final newline, as results.json."""
    cfg = config(tmp_path)
    record.write_started(str(tmp_path), cfg, "moco_v2", {"sha256": "ab" * 32})
    path = tmp_path / record.STARTED_FILE
    started = record.read_started(path)
    assert (started["init_name"], started["weights_sha256"]) == ("moco_v2", "ab" * 32)
    assert started["identity"] == record.experiment_identity(cfg)
    assert path.read_text() == json.dumps(started, indent=2) + "\n"
    # another version's record (its identity may be built otherwise) is refused, naming both
    path.write_text(path.read_text().replace('"version": 1,', '"version": 2,'))
    with pytest.raises(record.RecordError) as e:
        record.read_started(path)
    assert str(e.value) == f"{path}: version 2; this mocobench reads version 1"


def test_resume_checks_every_trial_past_one_that_recorded_nothing(tmp_path):
    """--resume: a trial directory with training files but no record (an older mocobench) is not
    checked; the trials after it still are: a finished one of this experiment is skipped, one of
    another experiment is refused."""
    from transfer.run import check_output_dir

    (tmp_path / "seed0").mkdir()
    (tmp_path / "seed0" / "last_checkpoint").write_text("model_0000009.pth")
    written(tmp_path, name="seed1", trial=1)
    cfg = config(tmp_path)
    dirs = [str(tmp_path / "seed0"), str(tmp_path / "seed1")]
    info = {"sha256": "ab" * 32}
    assert check_output_dir(cfg, dirs, True, False, "moco_v2", info) == [1]
    with pytest.raises(record.UsageError) as e:
        check_output_dir(cfg, dirs, True, False, "supervised", info)
    assert str(e.value) == (
        f"--resume: {tmp_path / 'seed1' / record.RESULTS_FILE} was made by another experiment "
        "(differs in --init-name ('moco_v2' -> 'supervised')); its trials and this call's would "
        "be averaged together. Use another OUTPUT_DIR")


def _pretrain_config_text(version):
    """The `config` entry our pretraining writes into its checkpoints (cfg.dump())."""
    from pretrain.config import load_config as pretrain_config

    return pretrain_config(os.path.join(REPO, "configs", "pretrain", "synth_R18_cpu.yaml"),
                           ["MOCO.VERSION", version]).dump()


@pytest.mark.parametrize("text, version", [
    ("ours v1", "v1"), ("ours v3", "v3"),
    ("MOCO:\n  VERSION: v2\n", "v2"),
    # another tool's config: anything under any key, never an error
    ("MOCO: v2\n", None), ("MOCO: [v2]\n", None), ("- MOCO\n- VERSION: v2\n", None),
    ("just a note", None), ("", None), ("MOCO:\n  VERSION: v4\n", None),
    ("MOCO: {VERSION: [", None),
])
def test_the_moco_version_is_read_only_from_a_moco_mapping(text, version):
    if text.startswith("ours "):
        text = _pretrain_config_text(text.split()[1])
    assert record._moco_version_of_config(text) == version


def test_a_new_run_refuses_a_directory_of_earlier_trials_naming_them(tmp_path):
    """Without --resume or --eval-only, trials already there (finished: their results.json; only
    started: their training files) are named and nothing is overwritten; --eval-only writes only
    results_eval.json, so it checks nothing."""
    from transfer.run import check_output_dir

    cfg = load_config(CONFIG, ["OUTPUT_DIR", str(tmp_path)])
    dirs = [str(tmp_path / f"seed{i}") for i in range(3)]
    (tmp_path / "seed1").mkdir()
    for name in ("last_checkpoint", "model_0000009.pth", "metrics.json", "log.txt"):
        (tmp_path / "seed1" / name).write_text("x")
    advice = ("; a new run would overwrite them or append to their logs. Pass --resume to keep "
              "finished trials and continue the others, --eval-only to re-evaluate (writes "
              "results_eval.json), or choose another OUTPUT_DIR")

    def refusal():
        with pytest.raises(record.UsageError) as e:
            check_output_dir(cfg, dirs, False, False, "moco_v2", {"sha256": "ab" * 32})
        return str(e.value)

    started = refusal()
    assert started.startswith(f"OUTPUT_DIR {str(tmp_path)!r} already holds a started trial "
                              "(seed1: ") and started.endswith(advice)
    assert started.count(", ") - advice.count(", ") == 2  # its first 3 files
    written(tmp_path, name="seed0")
    written(tmp_path, name="seed2", trial=2)
    assert refusal() == (f"OUTPUT_DIR {str(tmp_path)!r} already holds finished trials "
                         f"(seed0/{record.RESULTS_FILE}, seed2/{record.RESULTS_FILE}){advice}")
    assert check_output_dir(cfg, dirs, False, True, "moco_v2", None) == []


def test_the_prepared_config_keeps_every_note_on_what_mocobench_changed(synth_root):
    """prepare_config's notes (each trial's log.txt says them): the SyncBN swap on several CPU
    processes and the generated datasets' root, with the class-count checks after them."""
    from transfer.run import prepare_config

    cfg, notes = prepare_config(CONFIG, ["MOCOBENCH.SYNTH_ROOT", synth_root], world_size=2)
    assert cfg.MODEL.RESNETS.NORM == "naiveSyncBN"
    assert notes[:2] == [
        "2 CPU processes (gloo): SyncBN -> naiveSyncBN in MODEL.FPN.NORM, MODEL.RESNETS.NORM "
        "(torch's SyncBatchNorm synchronizes CUDA tensors only)",
        f"generated datasets (synth_*) from {os.path.abspath(synth_root)}"]
