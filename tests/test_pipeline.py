"""`mocobench pipeline`: a shrunken demo end to end from another working directory, then a real
kill mid-transfer and a re-run, skip / redo decisions, the dry-run preflight and fail-fast config
errors."""
import datetime
import json
import os
import shutil
import signal
import sys
import time

import pytest
from conftest import report_tables

from mocobench import pipeline
from mocobench.pipeline.config import load_pipeline_config
from mocobench.pipeline.plan import UNKNOWN, decide
from mocobench.utils.errors import UsageError
from mocobench.utils.fileio import file_sha256

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "pipeline", "tiny_cpu.yaml")
STAGES = ["data", "pretrain", "supervised", "convert_moco", "convert_supervised",
          "transfer_moco", "transfer_supervised", "transfer_random", "report"]


def run(out, *opts):
    return pipeline.main(["--config-file", TINY, "OUTPUT_DIR", str(out), *opts])


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The tiny pipeline, run from a working directory that is not the repository (shipped
    sub-config paths are relative: they must resolve against the pipeline yaml / the shipped
    configs, not the cwd)."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        assert run(out) == 0
    finally:
        os.chdir(cwd)
    assert not os.listdir(elsewhere)  # nothing written into the working directory
    yield out
    shutil.rmtree(out, ignore_errors=True)  # 1.3 GB of checkpoints


def test_shrunken_demo_runs_every_stage_and_reports(finished_run):
    out = finished_run
    m = manifest(out)
    assert list(m["stages"]) == STAGES
    assert all(m["stages"][n]["status"] == "done" for n in STAGES)
    assert m["versions"]["torch"] and "git_commit" in m
    assert all("git_commit" in m["stages"][n] for n in STAGES)  # the commit that ran each stage
    assert m["stages"]["convert_moco"]["outputs"]["verified"] > 0
    assert m["stages"]["convert_supervised"]["outputs"]["source"] == "torchvision"
    pretrain_sha = m["stages"]["convert_moco"]["inputs"]["checkpoint_sha256"]
    assert pretrain_sha == file_sha256(m["stages"]["pretrain"]["outputs"]["checkpoint"])
    report = json.loads((out / "report.json").read_text())
    [table] = report["tables"].values()
    assert list(table["rows"]) == ["random", "supervised", "moco"]
    # 2 seeds each
    assert all(table["rows"][i]["cells"]["bbox/AP"]["n"] == 2 for i in table["rows"])
    for init in ("moco", "supervised", "random"):
        seeds = {json.loads(
                     (out / "transfer" / init / f"seed{i}" / "results.json").read_text())["seed"]
                 for i in range(2)}
        assert seeds == {0, 1}
    md = (out / "report.md").read_text()
    assert "| moco |" in md and "(n=2)" in md
    assert (out / "ap.png").stat().st_size > 0 and (out / "pretrain.png").stat().st_size > 0


def _fork(argv, log):
    """pipeline.main(argv) in a forked child (a real process for a real SIGKILL); returns its
    pid."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = pipeline.main(argv)
        except BaseException:  # noqa: BLE001 - the exit code says it
            code = 3
        os._exit(code)
    return pid


def test_killed_mid_transfer_then_rerun_gives_the_same_report(finished_run, tmp_path, capsys):
    out = finished_run
    report_before = json.loads((out / "report.json").read_text())["tables"]
    started = manifest(out)["stages"]
    # redo transfer_moco and SIGKILL the process while its second seed trains
    pid = _fork(["--config-file", TINY, "OUTPUT_DIR", str(out), "--redo", "transfer_moco"],
                str(tmp_path / "log"))
    deadline = time.time() + 300
    def second_seed_of_the_redo_started():  # the old transfer/moco is moved to superseded/ first
        moved = out / "superseded"
        return moved.exists() and any((moved / stamp / "transfer" / "moco").exists()
                                      for stamp in os.listdir(moved)) \
            and (out / "transfer" / "moco" / "seed1").exists()

    while not second_seed_of_the_redo_started():
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), open(tmp_path / "log").read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    assert os.waitpid(pid, 0)[1] == signal.SIGKILL
    m = manifest(out)
    assert m["stages"]["transfer_moco"]["status"] == "running"
    [stamp] = os.listdir(out / "superseded")  # the old outputs were moved, not deleted
    assert (out / "superseded" / stamp / "transfer" / "moco" / "seed1" / "results.json").exists()
    assert (out / "transfer" / "moco" / "seed0" / "results.json").exists()
    assert not (out / "transfer" / "moco" / "seed1" / "results.json").exists()

    assert run(out) == 0  # the same command again, no hand edits
    printed = capsys.readouterr().out
    after = manifest(out)["stages"]
    for name in ("data", "pretrain", "supervised", "convert_moco", "convert_supervised",
                 "transfer_supervised", "transfer_random"):
        assert after[name]["started"] == started[name]["started"], f"{name} ran again"
        assert f"{name}: done earlier" in printed
    assert "transfer_moco (resuming)" in printed and after["transfer_moco"]["status"] == "done"
    assert json.loads((out / "report.json").read_text())["tables"] == report_before


def test_dry_run_lists_the_plan_and_what_changed_and_writes_nothing(finished_run, capsys):
    before = (finished_run / "manifest.json").read_text()
    assert run(finished_run, "--dry-run", "TRANSFER.SEEDS", "3") == 0
    printed = capsys.readouterr().out
    lines = {line.split()[1]: line for line in printed.splitlines() if line.strip().startswith("[")}
    assert list(lines) == STAGES
    assert " done" in lines["pretrain"] and " done" in lines["convert_moco"]
    for init in ("moco", "supervised", "random"):
        assert "redo (inputs changed: seeds)" in lines[f"transfer_{init}"]
        assert "3 seeds x 2 iterations" in lines[f"transfer_{init}"]
        # an expected time from the measured run
        assert " s" in lines[f"transfer_{init}"].split("|")[-1]
    assert "all inputs present" in printed
    assert (finished_run / "manifest.json").read_text() == before
    with pytest.raises(UsageError, match="--redo pretrian: not a stage of this pipeline; "
                                         "stages: data, pretrain"):
        run(finished_run, "--redo", "pretrian", "--dry-run")


def test_dry_run_of_a_new_run_estimates_every_stage_from_this_machines_earlier_pipeline(  # noqa: E501
        finished_run, tmp_path, capsys):
    def estimates(*opts):
        assert run(tmp_path / "new", "--dry-run", *opts) == 0
        rows = [line for line in capsys.readouterr().out.splitlines()
                if line.strip().startswith("[")]
        return {line.split()[1]: float(line.rsplit("~", 1)[1].split()[0])
                for line in rows if "~" in line}

    measured = {name: stage["seconds"] for name, stage in manifest(finished_run)["stages"].items()}
    two_seeds = estimates()
    # nothing of this run has run: every estimate is the earlier pipeline's
    assert list(two_seeds) == STAGES
    assert two_seeds["pretrain"] == pytest.approx(measured["pretrain"], abs=0.5)
    # the same work, twice as long: twice the time (transfer: seconds per seed-iteration; pretrain:
    # per epoch)
    pretrain_opts = list(load_pipeline_config(TINY, []).PRETRAIN.OPTS)
    pretrain_opts[pretrain_opts.index("SOLVER.EPOCHS") + 1] = "2"
    longer = estimates("TRANSFER.SEEDS", "4", "PRETRAIN.OPTS", repr(pretrain_opts))
    for name in ("transfer_moco", "transfer_random"):
        assert longer[name] == pytest.approx(2 * two_seeds[name], abs=1.0)
    assert longer["pretrain"] == pytest.approx(2 * measured["pretrain"], abs=1.0)
    # other work (another input size; other data) has no rate yet
    assert "transfer_moco" not in estimates("TRANSFER.OPTS", "['INPUT.MIN_SIZE_TRAIN', '(72,)']")
    assert "data" not in estimates("DATA.SYNTH_PRESET", "demo")
    assert not (tmp_path / "new").exists()  # a dry run writes nothing
    # the rates this machine measured, each with the day it was measured (ISO, for people)
    from mocobench.pipeline.estimate import read_rates

    rates = read_rates()
    today = datetime.date.today()
    assert {"convert", "report"} <= set(rates) and all(  # the module's run: today or yesterday
        0 <= (today - datetime.date.fromisoformat(r["measured"])).days <= 1
        and r["seconds_per_unit"] > 0 for r in rates.values())


def test_missing_checkpoint_is_caught_before_anything_runs(finished_run):
    m = manifest(finished_run)
    ckpt = m["stages"]["pretrain"]["outputs"]["checkpoint"]
    os.rename(ckpt, ckpt + ".moved")
    try:
        with pytest.raises(UsageError, match="moco checkpoint .* does not exist"):
            run(finished_run)
    finally:
        os.rename(ckpt + ".moved", ckpt)
    assert manifest(finished_run) == m


@pytest.mark.parametrize("opts,expected", [
    (["TRANSFER.INITS", "['moco', 'imagenet21k']"], "TRANSFER.INITS"),
    (["TRANSFER.NOPE", "1"], "unknown config key TRANSFER.NOPE"),
    (["TRANSFER.OPTS", "['SOLVER.MAX_ITRE', '2']"],
     "tiny_cpu.yaml: TRANSFER.OPTS: unknown config key SOLVER.MAX_ITRE; did you mean "
     "SOLVER.MAX_ITER?"),
    (["PRETRAIN.OPTS", "['SOLVER.BASE_LR', '-1.0']"], "tiny_cpu.yaml: PRETRAIN.OPTS (on "),
    (["PRETRAIN.CONFIG_FILE", "nope.yaml"], "PRETRAIN.CONFIG_FILE 'nope.yaml' does not exist"),
    (["DATA.SYNTH", "False", "DATA.PRETRAIN_ROOT", "/nonexistent/imagenet"],
     "missing input(s): ImageFolder train/ /nonexistent/imagenet/train"),
    (["SUPERVISED.WEIGHTS", "/nonexistent/r50.pth"],
     "missing input(s): SUPERVISED.WEIGHTS /nonexistent/r50.pth"),
])
def test_bad_pipeline_config_fails_before_any_stage(tmp_path, opts, expected):
    with pytest.raises(UsageError) as e:
        run(tmp_path / "x", *opts)
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()  # nothing written, no stage started



def test_a_stage_stopped_by_a_signal_stops_the_pipeline_with_its_exit_code(tmp_path, monkeypatch,
                                                                           capsys):
    from mocobench import cli

    monkeypatch.setattr("synth.cli.main", lambda argv: 143)  # `mocobench data`, on SIGTERM
    out = tmp_path / "run"
    assert cli.main(["pipeline", "--config-file", TINY, "OUTPUT_DIR", str(out)]) == 143
    assert capsys.readouterr().err == ("mocobench pipeline: mocobench data stopped by a signal "
                                       "(exit 143); run the same pipeline command again to "
                                       "resume\n")
    data = manifest(out)["stages"]["data"]
    assert data["status"] == "failed" and "(exit 143)" in data["error"]
    assert run(out, "--dry-run") == 0
    printed = capsys.readouterr().out
    assert "data                 resume (failed: CommandFailed: mocobench data stopped" in printed


DONE = {"status": "done", "inputs": {"seeds": 2}}
FAILED = {"status": "failed", "inputs": {"seeds": 2}, "error": "E: x"}
CHECK = "check (its inputs are known once an earlier stage has run)"


@pytest.mark.parametrize("previous,inputs,redo,expected", [
    ({}, {"seeds": 2}, (), "run"),
    ({}, UNKNOWN, (), "run"),
    (DONE, {"seeds": 2}, (), "done"),
    (DONE, {"seeds": 3}, (), "redo (inputs changed: seeds)"),
    (DONE, {"seeds": 2}, ("s",), "redo (--redo)"),
    (DONE, UNKNOWN, (), CHECK),
    ({"status": "done", "inputs": None}, None, (), "run"),  # the report: nothing to compare
    (FAILED, {"seeds": 2}, (), "resume (failed: E: x)"),
    ({"status": "running", "inputs": {"seeds": 2}}, {"seeds": 2}, (), "resume (running)"),
    (FAILED, {"seeds": 3}, (), "redo (inputs changed: seeds)"),
    (FAILED, UNKNOWN, (), CHECK),
])
def test_the_plan_and_the_run_take_one_decision(previous, inputs, redo, expected):
    """decide() is what --dry-run prints and what the run does (so an interrupted stage whose inputs
    changed is planned as redone, as the run does, not resumed)."""
    assert str(decide("s", previous, inputs, redo)) == expected


def _fork_cli(argv, log):
    """`mocobench pipeline ARGV` in a forked child, exit code as a user gets it; returns its pid."""
    from mocobench import cli

    pid = os.fork()
    if pid == 0:  # child
        code = 3
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__  # to fd 1 / 2: not pytest's
            code = cli.main(["pipeline", *argv])
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    return pid


@pytest.mark.slow
def test_jobs_side_by_side_a_failed_trial_reruns_alone_and_the_report_is_the_sequential_one(
        finished_run, tmp_path, capsys):
    """--jobs 2 runs the study's graph two jobs at a time, each in its own process. One trial
    fails for real (its directory is taken by a file): the others finish, a partial report holds
    them, `mocobench status` says which failed, and the same command again runs that trial alone;
    the report tables then equal the sequential run's (the same seeds, the same records)."""
    from mocobench.status import study_status

    out = tmp_path / "run"
    os.makedirs(out / "transfer" / "random")
    (out / "transfer" / "random" / "seed1").write_text("in the way")
    log = tmp_path / "log"
    pid = _fork_cli(["--config-file", TINY, "--jobs", "2", "OUTPUT_DIR", str(out)], str(log))
    seen = set()
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if (out / "manifest.json").exists():
            for line in study_status(str(out)):
                seen.update(w for w in ("running", "queued", "not started") if f" {w}" in line)
        time.sleep(0.05)
    assert {"running", "not started"} <= seen  # status while the study ran
    printed = log.read_text()
    assert printed.rstrip().splitlines()[-1].startswith(
        "mocobench pipeline: error: 1 job(s) failed: transfer_random/seed1; "
        "transfer_random/seed1: ")
    assert "(2 running" in printed  # two jobs at once
    m = manifest(out)["stages"]
    assert m["transfer_random"]["status"] == "failed"
    assert all(m[n]["status"] == "done" for n in STAGES if n not in ("transfer_random", "report"))
    # the partial report: every finished trial, the failed one missing
    partial = json.loads((out / "report.json").read_text())["tables"]
    [table] = partial.values()
    assert {r: table["rows"][r]["cells"]["bbox/AP"]["n"] for r in table["rows"]} \
        == {"moco": 2, "supervised": 2, "random": 1}
    status = "\n".join(study_status(str(out)))
    assert "transfer_random      failed: transfer_random/seed1 failed" in status
    assert "seed1              failed: " in status
    assert "seeds finished: moco 2/2, supervised 2/2, random 1/2" in status

    os.remove(out / "transfer" / "random" / "seed1")
    capsys.readouterr()
    assert run(out, "--jobs", "2") == 0  # the same command again
    rerun = capsys.readouterr().out
    assert [line.split()[1] for line in rerun.splitlines() if line.startswith("started ")] \
        == ["transfer_random/seed1", "report"]
    assert report_tables(out) == report_tables(finished_run)
    for init in ("moco", "supervised", "random"):
        for i in range(2):
            ours, theirs = (json.loads((o / "transfer" / init / f"seed{i}" / "results.json")
                                       .read_text()) for o in (out, finished_run))
            assert (ours["seed"], ours["results"]) == (theirs["seed"], theirs["results"])
    status = "\n".join(study_status(str(out)))
    assert "seeds finished: moco 2/2, supervised 2/2, random 2/2" in status
    assert "ETA: done" in status and "failed" not in status
    shutil.rmtree(out, ignore_errors=True)


def test_a_transfer_stage_closes_over_its_trials_records(tmp_path):
    """Wiring.close_transfer (the --jobs runner and a SLURM trial job end a transfer stage with
    it): the results of every trial, read from the results.json each wrote (`mocobench transfer`'s
    writer), in trial order, and summary.json over them; a missing trial is a one-line error naming
    its file."""
    from mocobench.pipeline.stages import Wiring
    from transfer import record
    from transfer.config import load_config

    cfg = load_pipeline_config(TINY, ["OUTPUT_DIR", str(tmp_path / "run")])
    wiring = Wiring(cfg, TINY)
    stage_dir = tmp_path / "run" / "transfer" / "moco"
    detection = os.path.join(REPO, "configs", "detection", "synth_voc_R18_FPN_cpu.yaml")

    def write_trial(index, ap):
        trial_cfg = load_config(detection, ["OUTPUT_DIR", str(stage_dir / f"seed{index}"),
                                            "SEED", str(index)])
        rec = record.build_record(
            trial_cfg, config_file=detection, opts=[], init_name="moco", weights_info=None,
            trial=index, world_size=1, eval_only=False, resumed=False, iteration=2, seconds=1.0,
            results={"bbox": {"AP": ap, "AP50": 2 * ap, "AP75": ap / 2}},
            evaluator_types={"synth_voc_test": "pascal_voc"})
        record.write_record(stage_dir / f"seed{index}" / record.RESULTS_FILE, rec)

    write_trial(1, 20.0)
    with pytest.raises(UsageError) as e:
        wiring.close_transfer("moco")
    assert str(e.value) == (f"transfer of moco: trial seed0 left no "
                            f"{stage_dir / 'seed0' / record.RESULTS_FILE}: see its log.txt")
    write_trial(0, 10.0)
    outputs = wiring.close_transfer("moco")
    assert outputs == {"output_dir": str(stage_dir), "results": [
        {"synth_voc_test": {"bbox": {"AP": ap, "AP50": 2 * ap, "AP75": ap / 2}}}
        for ap in (10.0, 20.0)]}
    assert wiring.trial_outputs("moco", [1])["results"] == outputs["results"][1:]
    summary = json.loads((stage_dir / "summary.json").read_text())
    assert [t["trial"] for t in summary["trials"]] == [0, 1]


def _results(run_dir, init, index):
    record = json.loads((run_dir / "transfer" / init / f"seed{index}" / "results.json").read_text())
    return record["seed"], record["results"]


def _superseded_since(run_dir, stamps):
    """The superseded/<stamp>/ folder a redo made (of those not in `stamps`)."""
    [stamp] = set(os.listdir(run_dir / "superseded")) - set(stamps)
    return run_dir / "superseded" / stamp


def test_trial_jobs_redo_their_stage_together_and_the_last_to_finish_closes_it(finished_run,
                                                                                capsys):
    """`--stage transfer_INIT --trial I` (the task of a SLURM job array; here in this process):
    the first trial job to start redoes the stage (its old outputs moved aside, nothing deleted)
    and leaves it running; the next joins it (no second redo) and, its last trial, closes it with
    every trial's results. The records and the report are the sequential run's."""
    out = finished_run
    stage = manifest(out)["stages"]["transfer_random"]
    trials = {i: _results(out, "random", i) for i in range(2)}
    tables = report_tables(out)
    stamps = os.listdir(out / "superseded") if (out / "superseded").exists() else []

    assert run(out, "--stage", "transfer_random", "--trial", "1", "--redo", "transfer_random") == 0
    printed = capsys.readouterr().out
    moved = _superseded_since(out, stamps)
    assert f"transfer_random: redo (--redo); old outputs moved to " \
           f"{os.path.relpath(moved, out)}/transfer/random" in printed
    assert "trial 1 of 2 (transfer_random/seed1)" in printed
    assert {i: _results(moved, "random", i) for i in range(2)} == trials  # kept, not deleted
    now = manifest(out)["stages"]["transfer_random"]
    assert now["status"] == "running" and now["started"] != stage["started"]
    assert not (out / "transfer" / "random" / "seed0").exists()
    assert _results(out, "random", 1) == trials[1]

    assert run(out, "--stage", "transfer_random", "--trial", "0") == 0  # joins, redoes nothing
    printed = capsys.readouterr().out
    assert ": redo" not in printed and "trial 0 of 2 (transfer_random/seed0)" in printed
    assert _superseded_since(out, stamps) == moved and os.listdir(moved / "transfer") == ["random"]
    now = manifest(out)["stages"]["transfer_random"]
    assert now["status"] == "done" and now["failed_jobs"] == {}
    assert now["outputs"] == stage["outputs"]
    assert {i: _results(out, "random", i) for i in range(2)} == trials
    assert report_tables(out) == tables
    shutil.rmtree(moved)  # superseded/ as it was: other tests count its folders


def test_jobs_in_this_process_failed_trials_fail_their_stage_and_a_rerun_ends_it(finished_run,
                                                                                 capsys):
    """--jobs 2 with the runner in this process (each job forked from its fork server): a redone
    stage's old outputs are moved aside when its first job starts; trials that fail (their logs
    cannot be opened: folders are in the way) fail their stage in the manifest with each named,
    and the command fails naming them; the same command without the obstacles runs those trials
    alone and closes the stage with the results of the sequential run."""
    out = finished_run
    stage = manifest(out)["stages"]["transfer_random"]
    trials = {i: _results(out, "random", i) for i in range(2)}
    stamps = os.listdir(out / "superseded") if (out / "superseded").exists() else []
    for i in range(2):
        os.makedirs(out / "logs" / f"transfer_random_seed{i}.log")
    with pytest.raises(UsageError) as e:
        run(out, "--jobs", "2", "--redo", "transfer_random")
    assert str(e.value).startswith("2 job(s) failed: transfer_random/seed0, transfer_random/seed1; "
                                   "transfer_random/seed0: IsADirectoryError: ")
    assert "FAILED transfer_random/seed1 after " in capsys.readouterr().out
    moved = _superseded_since(out, stamps)
    assert {i: _results(moved, "random", i) for i in range(2)} == trials  # kept, not deleted
    now = manifest(out)["stages"]["transfer_random"]
    assert now["status"] == "failed" and sorted(now["failed_jobs"]) \
        == ["transfer_random/seed0", "transfer_random/seed1"]
    assert now["error"].startswith("transfer_random/seed0, transfer_random/seed1 failed: "
                                   "IsADirectoryError: ")
    assert not (out / "transfer" / "random" / "seed1" / "results.json").exists()

    for i in range(2):
        os.rmdir(out / "logs" / f"transfer_random_seed{i}.log")
    assert run(out, "--jobs", "2") == 0  # the same study again: only the failed trials run
    rerun = capsys.readouterr().out
    assert sorted(line.split()[1] for line in rerun.splitlines() if line.startswith("started ")) \
        == ["report", "transfer_random/seed0", "transfer_random/seed1"]
    now = manifest(out)["stages"]["transfer_random"]
    assert now["status"] == "done" and now["outputs"] == stage["outputs"]
    assert {i: _results(out, "random", i) for i in range(2)} == trials
    shutil.rmtree(moved)  # superseded/ as it was: other tests count its folders


def test_each_stage_names_every_file_a_redo_moves_aside(finished_run):
    """Wiring.stage_outputs, what a redo moves to superseded/: each stage's folder or files as the
    run wrote them, the converter's report beside its weights included (a superseded .pkl keeps
    the record of where it came from); the run directory holds nothing else of the stages."""
    from mocobench.pipeline.stages import Wiring

    out = finished_run
    wiring = Wiring(load_pipeline_config(TINY, ["OUTPUT_DIR", str(out)]), TINY)
    outputs = {name: [os.path.relpath(p, out) for p in wiring.stage_outputs(name)]
               for name in STAGES}
    assert outputs == {
        "data": ["data"], "pretrain": ["pretrain"], "supervised": ["supervised"],
        "convert_moco": ["convert/moco.pkl", "convert/moco.json"],
        "convert_supervised": ["convert/supervised.pkl", "convert/supervised.json"],
        "transfer_moco": ["transfer/moco"], "transfer_supervised": ["transfer/supervised"],
        "transfer_random": ["transfer/random"], "report": []}
    written = {f"{d}/{f}" for d in ("convert", "transfer") for f in os.listdir(out / d)} \
        | set(os.listdir(out))
    assert {p for paths in outputs.values() for p in paths} <= written
    assert sorted(os.listdir(out / "convert")) == sorted(
        os.path.basename(p) for name in ("convert_moco", "convert_supervised")
        for p in outputs[name])
    assert sorted(os.listdir(out / "transfer")) == ["moco", "random", "supervised"]


def test_the_commit_is_recorded_where_git_is_and_none_where_it_is_not(tmp_path, monkeypatch):
    """manifest.json's git_commit: this checkout's HEAD (with "-dirty" when tracked files
    changed); None on a machine without git (a compute node), where every pipeline command
    crashed with FileNotFoundError."""
    import subprocess

    from mocobench.pipeline.manifest import git_commit

    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    recorded = git_commit()
    if head.returncode == 0:
        assert recorded.removesuffix("-dirty") == head.stdout.strip()
    else:  # a copy of the tree outside git
        assert recorded is None
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no git
    assert git_commit() is None


def test_a_new_machine_estimates_only_the_work_the_reference_figures_describe(tmp_path):
    """With no rate measured here yet, the estimates come from the 8 x V100 reference figures
    (estimate.py: the official R-50 200-epoch pretraining's 53 h, detectron2's R-50 FPN s/iter)
    for the work they describe alone: R-50 pretraining at 224 px, R-50 transfer on CUDA; given
    SUPERVISED.WEIGHTS take ~no time; anything else (the tiny CPU study) has no estimate."""
    from mocobench.pipeline.estimate import reference_seconds
    from mocobench.pipeline.stages import Wiring

    def references(*opts):
        cfg = load_pipeline_config(TINY, ["OUTPUT_DIR", str(tmp_path), *opts])
        return {name: reference_seconds(Wiring(cfg, TINY), name) for name in STAGES}

    assert set(references().values()) == {None}
    paper = references(
        "SUPERVISED.WEIGHTS", str(tmp_path / "R-50.pkl"),
        "PRETRAIN.OPTS", "['MODEL.ARCH', 'resnet50', 'INPUT.SIZE', '224', 'SOLVER.EPOCHS', '3']",
        "TRANSFER.OPTS", "['MODEL.RESNETS.DEPTH', '50', 'MODEL.DEVICE', 'cuda', "
                         "'SOLVER.MAX_ITER', '100']")
    transfer = pytest.approx(0.210 * 100 * 2)  # FPN s/iter x iterations x 2 seeds
    assert paper == {"data": None, "pretrain": pytest.approx(53 * 3600 / 200 * 3),
                     "supervised": 1.0, "convert_moco": None, "convert_supervised": None,
                     "transfer_moco": transfer, "transfer_supervised": transfer,
                     "transfer_random": transfer, "report": None}


def test_each_stage_says_its_size_from_the_config_its_runs_use(tmp_path):
    """The plan's sizes: the classifier stages' epochs, batch, arch and input size; a transfer
    stage's seeds, iterations and batch from its own trials' config (the random-init trials' with
    RANDOM_OPTS, which they run with: they had the other inits' size); an error in RANDOM_OPTS is
    found with the config, before anything runs."""
    from mocobench.pipeline.estimate import size
    from mocobench.pipeline.stages import Wiring

    cfg = load_pipeline_config(TINY, ["OUTPUT_DIR", str(tmp_path), "TRANSFER.RANDOM_OPTS",
                                      "['SOLVER.MAX_ITER', '5']"])
    wiring = Wiring(cfg, TINY)
    classifier = "1 epochs at batch 16, resnet18 at 32 px"
    assert {name: size(wiring, name) for name in STAGES} == {
        "data": "", "pretrain": classifier, "supervised": classifier, "convert_moco": "",
        "convert_supervised": "", "transfer_moco": "2 seeds x 2 iterations at 2 images",
        "transfer_supervised": "2 seeds x 2 iterations at 2 images",
        "transfer_random": "2 seeds x 5 iterations at 2 images", "report": ""}
    bad = load_pipeline_config(TINY, ["OUTPUT_DIR", str(tmp_path), "TRANSFER.RANDOM_OPTS",
                                      "['SOLVER.MAX_ITERS', '5']"])
    with pytest.raises(UsageError, match=r"TRANSFER.OPTS \+ RANDOM_OPTS.*SOLVER.MAX_ITERS"):
        Wiring(bad, TINY).stage_config("TRANSFER", "random")
