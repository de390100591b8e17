"""What a run reports agrees with itself: log.txt's metrics lines print the numbers metrics.json
records for the same iteration (window means, said so), and the optional W&B run (offline) holds the
same scalars under the same keys, with the run's config (transfer: and its run record)."""
import glob
import json
import os
import re
import struct
import subprocess
import sys

import pytest

from synth.imagenet import make_imagenet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH_CFG = os.path.join(REPO, "configs", "pretrain", "synth_R18_cpu.yaml")
LINE = re.compile(r"epoch (\d+)/\d+ iter (\d+)/(\d+)  mean of (\d+) \(iterations? ([\d-]+)\): "
                  r"(.*)  \| at iteration (\d+): (.*)$")


def tiny_pretrain(tmp_path, *opts, env_extra=None):
    """2 epochs of 3 iterations (48 images, batch 16), a metrics line every 2 iterations and at
    each epoch's end: windows of 2 and 1 iterations. stdout is a pipe (no progress bar)."""
    data = tmp_path / "data"
    make_imagenet(str(data), classes=4, images_per_class=12, val_per_class=2, size=32, seed=0)
    out = tmp_path / "run"
    args = ["DATA.ROOT", str(data / "imagenet"), "OUTPUT_DIR", str(out), "SOLVER.EPOCHS", "2",
            "SOLVER.BATCH_SIZE", "16", "MOCO.K", "32", "INPUT.SIZE", "32",
            "DATALOADER.NUM_WORKERS", "0", "KNN.PERIOD", "1", "LOG_PERIOD", "2",
            "MOCO.SHUFFLE_BN_SPLITS", "2", "DEVICE", "cpu", *opts]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "mocobench.cli", "pretrain", "--config-file",
                           SYNTH_CFG, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def read_metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def pairs(text):
    """'loss 4.3400  acc1 39.58' -> {'loss': '4.3400', 'acc1': '39.58'} (the printed strings)."""
    tokens = text.split()
    return dict(zip(tokens[0::2], tokens[1::2]))


def tolerance(printed):
    """Half a unit of the last printed digit, plus metrics.json's own rounding (6 decimals)."""
    mantissa, _, exponent = printed.partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return 0.5 * 10 ** (-decimals) * 10 ** int(exponent or 0) + 5e-7


def test_log_lines_print_the_window_means_that_metrics_json_records(tmp_path):
    out, proc = tiny_pretrain(tmp_path)
    records = {r["iteration"]: r for r in read_metrics(out) if "loss" in r}
    assert sorted(records) == [2, 3, 4, 6]  # every 2 iterations and at each epoch's end
    lines = [LINE.search(line) for line in open(out / "log.txt")]
    lines = [m for m in lines if m]
    assert [int(m.group(7)) for m in lines] == [2, 3, 4, 6]
    assert len([m for m in map(LINE.search, proc.stdout.splitlines()) if m]) == 4  # on stdout too
    for m in lines:
        iteration = int(m.group(7))
        record = records[iteration]
        n = int(m.group(4))
        assert int(m.group(1)) == record["epoch"] and n == {2: 2, 3: 1, 4: 1, 6: 2}[iteration]
        assert m.group(5) == (str(iteration) if n == 1 else f"{iteration - n + 1}-{iteration}")
        means, now = pairs(m.group(6)), pairs(m.group(8))
        assert set(means) == {"loss", "acc1", "img_per_s", "data_time"}
        assert set(means) | set(now) == set(record) - {"iteration", "epoch"}
        for key, printed in {**means, **now}.items():
            assert float(printed) == pytest.approx(record[key], abs=tolerance(printed)), \
                (iteration, key, printed, record[key])
    # the window mean is not the last iteration's value: the first line averages 2 iterations
    # whose losses differ (the queue fills with real keys)
    assert records[2]["loss"] != records[3]["loss"]


# ------------------------------------------------------------------------------------------ W&B
def wandb_records(run_dir):
    """(history rows, config) of an offline W&B run, read from its run-*.wandb file: wandb's own
    protobuf records in its LevelDB-style log (wandb has no reader for it in its Python API)."""
    from wandb.proto import wandb_internal_pb2 as pb

    [path] = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, chunk, history, config = 7, b"", [], {}
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind not in (1, 4):  # FULL or LAST ends a record
            continue
        record = pb.Record()
        record.ParseFromString(chunk)
        chunk = b""
        which = record.WhichOneof("record_type")
        if which == "history":
            history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                            for i in record.history.item})
        elif which in ("run", "config"):
            update = record.run.config.update if which == "run" else record.config.update
            for item in update:
                config["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return history, config


def offline_run_dir(wandb_dir):
    [run_dir] = glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*"))
    return run_dir


def by_step(history):
    rows = {}
    for row in history:
        rows.setdefault(row["_step"], {}).update(row)
    return {step: {k: v for k, v in row.items() if not k.startswith("_")}
            for step, row in rows.items()}


@pytest.mark.slow
def test_wandb_offline_pretrain_holds_the_scalars_of_metrics_json_and_the_config(tmp_path):
    wandb_dir = tmp_path / "wandb_files"
    wandb_dir.mkdir()
    out, _ = tiny_pretrain(tmp_path, "WANDB.ENABLED", "True", "WANDB.PROJECT", "tiny",
                           env_extra={"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir),
                                      "WANDB_SILENT": "true"})
    history, config = wandb_records(offline_run_dir(wandb_dir))
    expected = {}
    for record in read_metrics(out):
        expected.setdefault(record["iteration"], {}).update(record)
    got = by_step(history)
    assert sorted(got) == sorted(expected) == [2, 3, 4, 6]
    for step, row in got.items():
        want = {k: v for k, v in expected[step].items() if k != "iteration"}
        assert set(row) == set(want), step
        assert row == pytest.approx(want, abs=1e-6), step
    assert "knn_top1" in got[3]  # the per-epoch evaluation too
    assert config["SOLVER"]["BATCH_SIZE"] == 16 and config["WANDB"]["PROJECT"] == "tiny"
    assert config["OUTPUT_DIR"] == str(out)
    assert (out / "wandb_run_id.txt").read_text().strip() in offline_run_dir(wandb_dir)


def test_wandb_enabled_without_wandb_is_a_usage_error(tmp_path, monkeypatch):
    import importlib.util

    from mocobench.utils.errors import UsageError
    from pretrain.config import load_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UsageError, match=r"WANDB.ENABLED.*pip install -e '.\[wandb\]'"):
        load_config(SYNTH_CFG, ["WANDB.ENABLED", "True", "DATA.ROOT", str(tmp_path)])
    assert load_config(SYNTH_CFG, ["DATA.ROOT", str(tmp_path)]).WANDB.ENABLED is False


@pytest.mark.slow
def test_wandb_offline_transfer_trial_holds_metrics_json_scalars_config_and_run_record(
        synth_root, tmp_path, monkeypatch):
    from mocobench.utils import d2compat  # noqa: F401  (before detectron2)
    from transfer import run_transfer

    wandb_dir = tmp_path / "wandb_files"
    wandb_dir.mkdir()
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir),
                       "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "voc"
    config = os.path.join(REPO, "configs", "detection", "synth_voc_R18_FPN_cpu.yaml")
    [record] = run_transfer(config, [
        "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "SOLVER.MAX_ITER", "2",
        "TEST.PRECISE_BN.ENABLED", "False", "MOCOBENCH.LOG_PERIOD", "1",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MOCOBENCH.WANDB.ENABLED", "True",
        "OUTPUT_DIR", str(out)], init_name="random", synth_root=synth_root)
    # logging does not change what is measured: the experiment's identity leaves the keys out
    assert not any(k.startswith("MOCOBENCH.WANDB") for k in record["identity"])
    history, wb_config = wandb_records(offline_run_dir(wandb_dir))
    expected = {}
    for line in read_metrics(out / "seed0"):
        expected.setdefault(line["iteration"], {}).update(line)
    got = by_step(history)
    assert sorted(got) == sorted(expected)
    for step, row in got.items():
        want = {k: v for k, v in expected[step].items() if k != "iteration"}
        assert set(row) == set(want), step
        assert row == pytest.approx(want, rel=1e-6, abs=1e-9), step
    assert any("bbox/AP" in row for row in got.values())  # the final evaluation too
    assert wb_config["config"]["SOLVER"]["MAX_ITER"] == 2
    assert wb_config["run_record"] == json.loads(json.dumps(record))


ETA = re.compile(r"eta: (\d+):(\d\d):(\d\d) \(epoch (\d+)/2\)  eta run: (\d+):(\d\d):(\d\d)  "
                 r"iter (\d+)/3  ([\d.]+) s/it$")


def test_a_log_that_is_not_a_terminal_says_the_eta_of_the_epoch_and_the_run(tmp_path):
    """stdout a pipe (a SLURM log): after each metrics line, the time left of the epoch and of the
    run, detectron2's `eta:` style; it counts down to 0 at the run's last iteration."""
    out, proc = tiny_pretrain(tmp_path)
    for text in (proc.stdout, (out / "log.txt").read_text()):
        etas = [ETA.search(line) for line in text.splitlines() if "eta: " in line]
        metrics = [line for line in text.splitlines() if LINE.search(line)]
        assert etas and all(etas) and len(etas) == len(metrics)  # one after each metrics line
        # (epoch, iteration) at each line: every 2 iterations and at each epoch's end
        assert [(int(m.group(4)), int(m.group(8))) for m in etas] == [(1, 2), (1, 3), (2, 1),
                                                                    (2, 3)]
        run_left = [int(m.group(5)) * 3600 + int(m.group(6)) * 60 + int(m.group(7)) for m in etas]
        assert run_left[-1] == 0 and run_left == sorted(run_left, reverse=True)
        assert all(float(m.group(9)) > 0 for m in etas)
