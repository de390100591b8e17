"""Never lose a run: SIGKILL at random moments (during saves too), SIGTERM / Ctrl-C mid-epoch, a
second run into the same directory, and every bad input a one-line error. Real processes, real
signals, real files."""
import hashlib
import json
import logging
import os
import random
import shlex
import shutil
import signal
import sys
import time

import pytest
import torch
from conftest import signal_on_step

from mocobench import cli
from mocobench.utils.fileio import RunLock, load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH_CFG = os.path.join(REPO, "configs", "pretrain", "synth_R18_cpu.yaml")
ITERS_PER_EPOCH, EPOCHS = 8, 2  # 64 images / batch 8


def opts(root, out_dir, **extra):
    kv = {"DATA.ROOT": root, "OUTPUT_DIR": out_dir, "SOLVER.EPOCHS": EPOCHS, "SOLVER.BATCH_SIZE": 8,
          "MOCO.K": 32, "INPUT.SIZE": 32, "DATALOADER.NUM_WORKERS": 0, "KNN.PERIOD": 0,
          "LOG_PERIOD": 1, "CHECKPOINT_PERIOD": 1, "MOCO.SHUFFLE_BN_SPLITS": 2,
          "DEVICE": "cpu", **extra}  # CPU: bit-exact resume is what these check
    return [str(x) for pair in kv.items() for x in pair]


def command(*args):
    return ["pretrain", "--config-file", SYNTH_CFG, *args]


class Run:
    """`mocobench ARGV` in a child process forked from this one (a real process that real signals
    reach; no second import of torch, which costs more CPU than the training these tests do).
    stdout and stderr go to files, as a scheduler's job log would."""

    _count = 0

    def __init__(self, argv, log_dir, own_group=False, prepare=None):
        """own_group: the child leads a session and process group of its own, as a scheduler's job
        step does, so that signal_group reaches it and its DataLoader workers (and not pytest).
        prepare: called in the child before the command (a scheduler's signal handlers)."""
        import multiprocessing

        Run._count += 1
        self.log = os.path.join(str(log_dir), f"run{Run._count}")
        self.proc = multiprocessing.get_context("fork").Process(
            target=self._child, args=(list(argv), self.log, own_group, prepare))
        self.proc.start()

    @staticmethod
    def _child(argv, log, own_group=False, prepare=None):
        if own_group:
            os.setsid()
        torch.set_num_threads(1)
        if prepare is not None:
            prepare()
        out, err = open(log + ".out", "w", buffering=1), open(log + ".err", "w", buffering=1)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout, sys.stderr = out, err
        code = cli.main(argv)
        out.flush()
        err.flush()
        os._exit(code)

    def poll(self):
        return self.proc.exitcode

    def send_signal(self, sig):
        os.kill(self.proc.pid, sig)

    def signal_group(self, sig):
        """sig to every process of the run's group (own_group): the main process and its DataLoader
        workers, as SLURM, Kubernetes or a terminal's Ctrl-C deliver it."""
        os.killpg(self.proc.pid, sig)

    def communicate(self, timeout=300):
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            self.proc.kill()
            raise TimeoutError(self.log)
        return open(self.log + ".out").read(), open(self.log + ".err").read()

    @property
    def returncode(self):
        return self.proc.exitcode


def wait_for(predicate, proc, timeout=120):
    """Poll predicate() every 5 ms until it holds (True) or the process has exited (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise TimeoutError


def metrics_iterations(out):
    path = os.path.join(out, "metrics.json")
    if not os.path.exists(path):
        return []
    rows = []
    for line in open(path):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # being written
    return [r["iteration"] for r in rows if "loss" in r]


def assert_same_final_state(reference_dir, out_dir):
    a = load_checkpoint(os.path.join(reference_dir, "checkpoint_0001.pth.tar"))
    b = load_checkpoint(os.path.join(out_dir, "checkpoint_0001.pth.tar"))
    assert a["iteration"] == b["iteration"] == ITERS_PER_EPOCH * EPOCHS
    assert set(a["state_dict"]) == set(b["state_dict"])
    for key in a["state_dict"]:  # weights, BN buffers, queue, queue_ptr
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def sha256_tree(directory):
    return {name: hashlib.sha256(open(os.path.join(directory, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(directory))
            if os.path.isfile(os.path.join(directory, name))}


def stat_tree(directory):
    """(inode, size, mtime) per file: any rewrite, even an atomic replace, changes it."""
    return {e.name: (e.inode(), e.stat().st_size, e.stat().st_mtime_ns)
            for e in os.scandir(directory)}


@pytest.fixture(scope="module")
def reference(tiny_imagenet, tmp_path_factory):
    """An uninterrupted run (no iteration checkpoints), in this process."""
    out = str(tmp_path_factory.mktemp("reference") / "run")
    assert cli.main(command(*opts(tiny_imagenet, out))) == 0
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_exact(tiny_imagenet, reference, tmp_path):
    out = str(tmp_path / "killed")
    args = command("--resume", "auto",
                   *opts(tiny_imagenet, out, **{"SOLVER.CHECKPOINT_PERIOD_ITERS": 1}))
    rng = random.Random(0)
    kills = during_save = 0
    torn_temp_files = set()
    for round_ in range(30):
        if kills == 10:
            break
        # a temp file that the last kill left: the new run removes it at start, and it is no sign of
        # a save
        stale = {n for n in os.listdir(out) if n.endswith(".tmp")} if os.path.isdir(out) else set()
        proc = Run(args, tmp_path)
        pointer = os.path.join(out, "last_checkpoint")
        before = open(pointer).read() if os.path.exists(pointer) else None
        if round_ % 2 == 0:  # during a save: the moment this run's temporary file exists
            def saving(stale=stale):
                return any(n.startswith(".checkpoint_") and n.endswith(".tmp") and n not in stale
                           for n in (os.listdir(out) if os.path.isdir(out) else []))
            alive = wait_for(saving, proc)
        else:  # a random moment after this process saved at least once
            def saved_once(pointer=pointer, before=before):
                return os.path.exists(pointer) and open(pointer).read() != before
            alive = wait_for(saved_once, proc)
            time.sleep(rng.uniform(0.0, 0.2))  # at most a few of the 16 iterations per round
            alive = alive and proc.poll() is None
        if not alive:
            proc.communicate()
            break  # the run finished before the kill
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        kills += 1
        temps = {n for n in os.listdir(out) if n.endswith(".tmp")}
        during_save += bool(temps - stale) and round_ % 2 == 0
        torn_temp_files |= temps
        for name in os.listdir(out):  # every checkpoint on disk is whole and weights-only loadable
            if name.endswith(".pth.tar"):
                load_checkpoint(os.path.join(out, name))
    proc = Run(args, tmp_path)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert kills == 10 and during_save >= 4, (kills, during_save)
    assert torn_temp_files and not torn_temp_files & set(os.listdir(out)), \
        "a killed save's temp file survived"
    assert not [n for n in os.listdir(out)
                if n.endswith(".tmp") or n.startswith("checkpoint_iter_")]
    assert_same_final_state(reference, out)
    assert metrics_iterations(out) == list(range(1, 17))  # no row twice after 10 resumes
    print(f"\nfault injection: {kills} SIGKILLs ({during_save} during a save), {kills} resumes, "
          "final state bit-exact")


@pytest.mark.slow
def test_sigterm_and_ctrl_c_mid_epoch_save_exactly_and_print_the_resume_command(
        tiny_imagenet, reference, tmp_path, capsys):
    out = str(tmp_path / "preempted")
    resume_cmd = None
    for sig, stop_at, code in ((signal.SIGTERM, 3, 143), (signal.SIGINT, 11, 130)):
        proc = Run(resume_cmd or command(*opts(tiny_imagenet, out)), tmp_path)
        assert wait_for(lambda: any(i >= stop_at for i in metrics_iterations(out)),  # noqa: B023
                        proc)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == code, stderr[-3000:]
        [line] = [x for x in stderr.splitlines() if "stopped by" in x]
        saved = load_checkpoint(os.path.join(
            out, open(os.path.join(out, "last_checkpoint")).read().strip()))
        done = saved["iteration"]
        assert done >= stop_at and saved["epoch_iteration"] == (done - 1) % ITERS_PER_EPOCH + 1
        assert saved["epoch"] == (done - 1) // ITERS_PER_EPOCH
        assert f"stopped by {sig.name} after iteration {saved['epoch_iteration']}/" \
               f"{ITERS_PER_EPOCH} of epoch {saved['epoch'] + 1}" in line and \
               f"checkpoint_iter_{done:08d}.pth.tar" in line
        assert metrics_iterations(out)[-1] == done
        printed = shlex.split(line.split("resume with: ", 1)[1])
        assert printed[:2] == ["mocobench", "pretrain"] and "--resume" in printed
        resume_cmd = printed[1:]  # the printed command, as printed, after `mocobench`
    proc = Run(resume_cmd, tmp_path)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "resumed from" in stdout and \
        f"iteration {done % ITERS_PER_EPOCH + 1}/{ITERS_PER_EPOCH}" in stdout
    assert_same_final_state(reference, out)
    assert metrics_iterations(out) == list(range(1, 17))
    # resume points are scratch
    assert not [n for n in os.listdir(out) if n.startswith("checkpoint_iter_")]
    # once more: the run is finished, it says so, exits 0 and writes nothing
    before = sha256_tree(out)
    assert cli.main(resume_cmd) == 0
    assert "already finished (2 epochs done, SOLVER.EPOCHS = 2" in capsys.readouterr().out
    assert sha256_tree(out) == before


def test_second_run_into_the_same_directory_is_refused_and_changes_nothing(
        tiny_imagenet, reference, capsys):
    before = sha256_tree(reference)
    assert cli.main(["pretrain", "--config-file", SYNTH_CFG, *opts(tiny_imagenet, reference)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # the first three of its run files, and how to continue it
    assert err == [f"mocobench pretrain: error: OUTPUT_DIR {reference!r} already holds a run "
                   "(checkpoint_0000.pth.tar, checkpoint_0001.pth.tar, last_checkpoint); continue "
                   "it with --resume auto, or set another OUTPUT_DIR"]
    # resuming it with a bad DATA.ROOT: refused before config.yaml or anything else is rewritten
    assert cli.main(["pretrain", "--config-file", SYNTH_CFG, "--resume", "auto", "--extend",
                     *opts(reference + "/nope", reference, **{"SOLVER.EPOCHS": 3})]) == 2
    assert "nope/train' does not exist" in capsys.readouterr().err
    # lincls: one evaluation per --output too
    lincls_out = os.path.join(os.path.dirname(reference), "lincls")
    lincls = ["lincls", "--data", tiny_imagenet,
              "--pretrained", os.path.join(reference, "checkpoint_0001.pth.tar"),
              "--output", lincls_out, "--epochs", "1", "--batch-size", "16", "--workers", "0",
              "--size", "32", "--device", "cpu"]
    assert cli.main(lincls) == 0
    results = open(os.path.join(lincls_out, "lincls_results.json")).read()
    assert cli.main(lincls) == 2 and "already holds a linear evaluation" in capsys.readouterr().err
    # ... and a finished one is not extended to more epochs unless asked for (--extend)
    longer = [*lincls[:lincls.index("--epochs") + 1], "2", *lincls[lincls.index("--epochs") + 2:]]
    assert cli.main([*longer, "--resume", "auto"]) == 2
    assert "--epochs = 2 would extend it and change its schedule from 1 to 2 epochs" in \
        capsys.readouterr().err
    assert open(os.path.join(lincls_out, "lincls_results.json")).read() == results
    # while another process holds the run, --resume auto is refused too
    lock = RunLock(reference)
    try:
        assert cli.main(["pretrain", "--config-file", SYNTH_CFG, "--resume", "auto", "--extend",
                         *opts(tiny_imagenet, reference, **{"SOLVER.EPOCHS": 3})]) == 2
        assert f"(pid {os.getpid()}) is writing into" in capsys.readouterr().err
    finally:
        lock.close()
    after = sha256_tree(reference)
    assert {k: v for k, v in after.items() if k != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"}
    mode = os.stat(os.path.join(reference, "checkpoint_0001.pth.tar")).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not mkstemp's 0600


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "run").mkdir()
    (d / "run" / "results.json").write_bytes(bytes(random.Random(0).randrange(256)
                                                   for _ in range(300)))
    return {
        "syntax": _write(d / "syntax.yaml", "SOLVER:\n  EPOCHS: [1,\n"),
        "empty": _write(d / "empty.yaml", ""),
        "list": _write(d / "list.yaml", "- 1\n- 2\n"),
        "base": _write(d / "base.yaml", '_BASE_: "nope.yaml"\nSOLVER:\n  EPOCHS: 1\n'),
        "text": _write(d / "notes.txt", "hello\n"),
        "json": _write(d / "weights.json", '{"a": 1}\n'),
        "file": _write(d / "a_file", "x"),
        "dir": str(d),
    }


BAD_INPUTS = [  # (argv builder, expected text in the one-line error)
    ("negative lr", lambda f, r, ref: ["pretrain", "--config-file", SYNTH_CFG,
                                       *opts(r, f["dir"] + "/o", **{"SOLVER.BASE_LR": -0.1})],
     "SOLVER.BASE_LR = -0.1 must be >= 0"),
    ("YAML syntax", lambda f, r, ref: ["pretrain", "--config-file", f["syntax"]],
     "not valid YAML at line 3"),
    ("empty YAML", lambda f, r, ref: ["supervised", "--config-file", f["empty"]],
     "the file is empty"),
    ("YAML list", lambda f, r, ref: ["pretrain", "--config-file", f["list"]], "expected a mapping"),
    ("missing _BASE_", lambda f, r, ref: ["pretrain", "--config-file", f["base"]],
     "_BASE_ chain names"),
    ("changed MOCO.K", lambda f, r, ref: ["pretrain", "--config-file", SYNTH_CFG,
                                          "--resume", "auto",
                                          *opts(r, ref, **{"MOCO.K": 64, "SOLVER.EPOCHS": 3})],
     "the config changes what shapes its state: MOCO.K 32 -> 64"),
    ("OUTPUT_DIR a file",
     lambda f, r, ref: ["pretrain", "--config-file", SYNTH_CFG, *opts(r, f["file"])],
     "is a file, not a directory"),
    ("convert a text file", lambda f, r, ref: ["convert", f["text"], f["dir"] + "/o.pkl"],
     "not a checkpoint at all"),
    ("convert a JSON file", lambda f, r, ref: ["convert", f["json"], f["dir"] + "/o.pkl"],
     "not a checkpoint at all"),
    ("report on random bytes",
     lambda f, r, ref: ["report", f["dir"] + "/run", "--out", f["dir"] + "/rep"],
     "not UTF-8 text"),
]


@pytest.mark.parametrize("argv_fn,expected", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2(argv_fn, expected, bad_files, tiny_imagenet, reference,
                                      capsys):
    before = stat_tree(reference)
    assert cli.main(argv_fn(bad_files, tiny_imagenet, reference)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "Traceback" not in err[0], err
    assert stat_tree(reference) == before


def test_flags_may_follow_the_overrides(tiny_imagenet, reference, capsys):
    # `--resume auto` after KEY VALUE pairs is a flag, not an override key
    assert cli.main(["pretrain", "--config-file", SYNTH_CFG, *opts(tiny_imagenet, reference),
                     "--resume", "auto"]) == 0
    assert (f"{reference}: the run is already finished (2 epochs done, SOLVER.EPOCHS = 2; "
            "checkpoint_0001.pth.tar). Nothing to do; to train longer, raise SOLVER.EPOCHS and "
            "pass --extend\n") in capsys.readouterr().out


CHANGED_STATE_KEYS = [  # (key, value in the reference run, a value that changes its state)
    ("SOLVER.BATCH_SIZE", 8, 16),
    ("SEED", 0, 1),
    ("SOLVER.OPTIMIZER", "sgd", "lars"),
    ("MODEL.ARCH", "resnet18", "resnet34"),
]


@pytest.mark.parametrize("key,old,new", CHANGED_STATE_KEYS, ids=[c[0] for c in CHANGED_STATE_KEYS])
def test_resume_that_changes_what_shapes_the_state_is_refused_and_writes_nothing(
        key, old, new, tiny_imagenet, reference, capsys):
    # the finished 2-epoch run, continued to a 3rd epoch with one state-shaping key changed
    before, stats = sha256_tree(reference), stat_tree(reference)
    argv = command("--resume", "auto",
                   *opts(tiny_imagenet, reference, **{"SOLVER.EPOCHS": 3, key: new}))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"cannot resume from {os.path.join(reference, 'checkpoint_0001.pth.tar')}: the config " \
           f"changes what shapes its state: {key} {old!r} -> {new!r}. Keep those values" in err[0]
    assert sha256_tree(reference) == before and stat_tree(reference) == stats


@pytest.fixture(scope="module")
def stopped_mid_epoch(tiny_imagenet, tmp_path_factory):
    """A real run (this process, one process) stopped by a real SIGTERM during iteration 3 of
    epoch 1: OUTPUT_DIR holds the mid-epoch checkpoint_iter_00000003.pth.tar it saved."""
    from pretrain import engine

    out = str(tmp_path_factory.mktemp("stopped") / "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "optimization_step", signal_on_step(3, signal.SIGTERM))
        assert cli.main(command(*opts(tiny_imagenet, out))) == 143
    assert open(os.path.join(out, "last_checkpoint")).read() == "checkpoint_iter_00000003.pth.tar"
    yield out
    shutil.rmtree(out, ignore_errors=True)


def test_a_mid_epoch_checkpoint_is_refused_with_another_process_count(
        stopped_mid_epoch, reference, tiny_imagenet):
    from mocobench.utils.errors import UsageError
    from pretrain.config import load_config
    from pretrain.resume import plan_resume
    from pretrain.train import MocoTask

    before, stats = sha256_tree(stopped_mid_epoch), stat_tree(stopped_mid_epoch)
    cfg = load_config(SYNTH_CFG, opts(tiny_imagenet, stopped_mid_epoch))
    point = plan_resume(cfg, "auto", 1, MocoTask(cfg))  # the process count that wrote it
    assert os.path.basename(point.path) == "checkpoint_iter_00000003.pth.tar"
    assert (point.checkpoint["epoch_iteration"], point.checkpoint["world_size"]) == (3, 1)
    assert not point.finished
    with pytest.raises(UsageError) as refused:
        plan_resume(cfg, "auto", 2, MocoTask(cfg))
    message = str(refused.value)
    assert "\n" not in message and message.startswith(
        f"cannot resume the mid-epoch checkpoint {point.path} with 2 process(es): it was written "
        "by 1 (the data order of the epoch is sharded by the process count)")
    assert sha256_tree(stopped_mid_epoch) == before and stat_tree(stopped_mid_epoch) == stats
    # an epoch boundary has no position in the epoch's order: another process count may go on
    cfg = load_config(SYNTH_CFG, opts(tiny_imagenet, reference, **{"SOLVER.EPOCHS": 3}))
    point = plan_resume(cfg, "auto", 2, MocoTask(cfg), extend=True)
    assert os.path.basename(point.path) == "checkpoint_0001.pth.tar" and not point.finished
    assert point.extends and point.epochs_before == 2


def test_extending_a_finished_run_is_refused_without_extend_and_writes_nothing(
        tiny_imagenet, reference, tmp_path, capsys):
    out = str(tmp_path / "finished")
    shutil.copytree(reference, out)
    before, stats = sha256_tree(out), stat_tree(out)
    assert cli.main(command("--resume", "auto", *opts(tiny_imagenet, out,
                                                      **{"SOLVER.EPOCHS": 3}))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{out}: the run is finished (2 epochs done, checkpoint_0001.pth.tar); SOLVER.EPOCHS " \
           "= 3 would extend it and change its schedule from 2 to 3 epochs" in err[0]
    assert "pass --extend" in err[0]
    assert sha256_tree(out) == before and stat_tree(out) == stats


def test_extend_continues_a_finished_run_keeps_its_final_checkpoint_and_says_so(
        tiny_imagenet, reference, tmp_path, capsys):
    out = str(tmp_path / "extended")
    shutil.copytree(reference, out)
    final = os.path.join(out, "checkpoint_0001.pth.tar")
    digest = hashlib.sha256(open(final, "rb").read()).hexdigest()
    # CHECKPOINT_PERIOD 3: under 3 epochs, epoch 2's checkpoint is not one the schedule keeps
    argv = command("--resume", "auto", "--extend",
                   *opts(tiny_imagenet, out, **{"SOLVER.EPOCHS": 3, "CHECKPOINT_PERIOD": 3}))
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert os.path.isfile(final), "the earlier run's final checkpoint was deleted"
    assert hashlib.sha256(open(final, "rb").read()).hexdigest() == digest
    assert load_checkpoint(os.path.join(out, "checkpoint_0002.pth.tar"))["epoch"] == 3
    assert open(os.path.join(out, "last_checkpoint")).read().strip() == "checkpoint_0002.pth.tar"
    said = "the schedule changed from 2 to 3 epochs"
    assert said in printed and said in open(os.path.join(out, "log.txt")).read()
    [record] = json.load(open(os.path.join(out, "extended.json")))
    assert (record["from_epochs"], record["to_epochs"], record["checkpoint"], record["sha256"]) \
        == (2, 3, "checkpoint_0001.pth.tar", digest)
    assert metrics_iterations(out)[-1] == 3 * ITERS_PER_EPOCH
    # done: the same command says so and writes nothing
    before = sha256_tree(out)
    assert cli.main(argv) == 0
    assert "already finished (3 epochs done" in capsys.readouterr().out
    assert sha256_tree(out) == before


def test_resume_from_a_checkpoint_outside_output_dir_never_deletes_it(
        stopped_mid_epoch, reference, tiny_imagenet, tmp_path):
    # a resume point (the name of a scratch checkpoint) copied out of its run: the run continued
    # from it with --resume PATH into a new OUTPUT_DIR must leave it alone
    outside = tmp_path / "kept" / "checkpoint_iter_00000003.pth.tar"
    outside.parent.mkdir()
    shutil.copyfile(os.path.join(stopped_mid_epoch, "checkpoint_iter_00000003.pth.tar"), outside)
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    out = str(tmp_path / "continued")
    assert cli.main(command("--resume", str(outside), *opts(tiny_imagenet, out))) == 0
    assert outside.exists(), "the --resume PATH checkpoint outside OUTPUT_DIR was deleted"
    assert hashlib.sha256(outside.read_bytes()).hexdigest() == digest
    assert os.listdir(outside.parent) == [outside.name]
    assert_same_final_state(reference, out)  # and the resume from it was exact


def group_members(pgid):
    """pids of the live (not zombie) processes in process group pgid (Linux /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue  # exited meanwhile
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            pids.append(int(entry))
    return pids


def submitit_like_handlers():
    """In a run's child: the signal handlers of a `--launcher slurm` task. submitit's handler for
    its warning signal (USR2) checkpoints, requeues and exits (SignalHandler: sys.exit(-1) on rank
    0); mocobench.launch hands that signal to the training loop as a SIGTERM while the loop runs.
    Installed in the main process before the DataLoader workers fork: the workers inherit both."""
    from mocobench import launch

    def requeue_and_exit(signum, frame):
        sys.exit(-1)

    signal.signal(signal.SIGUSR2, requeue_and_exit)
    launch.SubmititWarning(forward_to_loop=True)


def _stop_the_process_group_mid_epoch(sig, tiny_imagenet, out, tmp_path, prepare=None):
    """A 2-worker pretrain run in its own process group, `sig` to the whole group during epoch 1;
    returns the saved iteration (after checking the exit code, the one-line message, the
    checkpoint)."""
    workers = {"DATALOADER.NUM_WORKERS": 2}
    proc = Run(command(*opts(tiny_imagenet, out, **workers)), tmp_path, own_group=True,
               prepare=prepare)
    assert wait_for(lambda: any(i >= 3 for i in metrics_iterations(out)), proc)
    # the main process and both (persistent) loader workers are there to be signalled
    assert len(group_members(proc.proc.pid)) == 3, group_members(proc.proc.pid)
    proc.signal_group(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    [line] = [x for x in stderr.splitlines() if "stopped by" in x]
    saved = load_checkpoint(os.path.join(
        out, open(os.path.join(out, "last_checkpoint")).read().strip()))
    done = saved["iteration"]
    assert 3 <= done < ITERS_PER_EPOCH * EPOCHS
    assert f"stopped by SIGTERM after iteration {saved['epoch_iteration']}/{ITERS_PER_EPOCH}" \
        in line and f"checkpoint_iter_{done:08d}.pth.tar" in line
    assert metrics_iterations(out)[-1] == done
    return done


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_saves_and_resumes_bit_exactly(
        tiny_imagenet, reference, tmp_path):
    # SLURM, Kubernetes and Ctrl-C signal the whole group: the workers ignore the stop (else the
    # main process fails with "DataLoader worker exited unexpectedly" and saves nothing), the main
    # process finishes the iteration, saves and exits 143. The reference ran without workers: data
    # order and augmentation are functions of (SEED, epoch, index), not of the worker count.
    out = str(tmp_path / "group")
    _stop_the_process_group_mid_epoch(signal.SIGTERM, tiny_imagenet, out, tmp_path)
    proc = Run(command("--resume", "auto",
                       *opts(tiny_imagenet, out, **{"DATALOADER.NUM_WORKERS": 2})),
               tmp_path, own_group=True)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "resumed from" in stdout
    assert_same_final_state(reference, out)
    assert metrics_iterations(out) == list(range(1, 17))


def test_submitit_warning_signal_to_the_process_group_stops_cleanly_with_loader_workers(
        tiny_imagenet, tmp_path):
    # `--launcher slurm`: USR2 reaches every process of the task. The main process turns it into a
    # clean stop (exit 143, a checkpoint); the forked workers must not run submitit's handler they
    # inherited (it exits, and the main process then fails with "DataLoader worker exited
    # unexpectedly").
    out = str(tmp_path / "usr2")
    _stop_the_process_group_mid_epoch(signal.SIGUSR2, tiny_imagenet, out, tmp_path,
                                      prepare=submitit_like_handlers)


def test_supervised_stops_on_sigusr1_mid_epoch_and_resumes_bit_exactly(
        tiny_imagenet, tmp_path, monkeypatch, capsys):
    # the supervised loop shares the mechanism: SIGUSR1 (a real signal to this process) during
    # iteration 3
    from pretrain import engine

    sup_cfg = os.path.join(REPO, "configs", "pretrain", "synth_R18_cpu_supervised.yaml")
    kv = ["DATA.ROOT", tiny_imagenet, "SOLVER.EPOCHS", "2", "SOLVER.BATCH_SIZE", "8",
          "INPUT.SIZE", "32", "DATALOADER.NUM_WORKERS", "0", "LOG_PERIOD", "1",
          "CHECKPOINT_PERIOD", "1", "DEVICE", "cpu"]
    full, stopped = str(tmp_path / "full"), str(tmp_path / "stopped")
    assert cli.main(["supervised", "--config-file", sup_cfg, *kv, "OUTPUT_DIR", full]) == 0
    real_step = engine.optimization_step
    monkeypatch.setattr(engine, "optimization_step", signal_on_step(3, signal.SIGUSR1))
    assert cli.main(["supervised", "--config-file", sup_cfg, *kv, "OUTPUT_DIR", stopped]) == 138
    printed = capsys.readouterr()
    assert "stopped by SIGUSR1 after iteration 3/8 of epoch 1" in printed.err and \
        "stopped by" not in printed.out
    assert open(os.path.join(stopped, "log.txt")).read().count("stopped by SIGUSR1") == 1
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the old handler is back
    monkeypatch.setattr(engine, "optimization_step", real_step)
    assert cli.main(["supervised", "--config-file", sup_cfg, *kv, "OUTPUT_DIR", stopped,
                     "--resume", "auto"]) == 0
    a = load_checkpoint(os.path.join(full, "checkpoint_0001.pth.tar"))
    b = load_checkpoint(os.path.join(stopped, "checkpoint_0001.pth.tar"))
    assert a["iteration"] == b["iteration"] == 16
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key


def _agree(rank, port, queue, signalled_ranks=(1,)):
    import torch.distributed as dist

    from mocobench.utils.preempt import Preemption

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    with Preemption() as stop:
        before = stop.agreed()
        if rank in signalled_ranks:
            os.kill(os.getpid(), signal.SIGTERM)
        after = stop.agreed()
    queue.put((rank, before, after))
    dist.destroy_process_group()


def _agreement_of_two_gloo_ranks(signalled_ranks):
    """[(rank, agreed before the signal, agreed after it)] of 2 forked gloo processes, SIGTERM sent
    to each of `signalled_ranks` by itself between the two votes."""
    import multiprocessing
    import socket

    from mocobench.utils.preempt import Preemption

    # one process alone votes in this process, without torch.distributed (and this call is what
    # tells mutmut, which sees only this process's calls, that the test exercises agreed())
    with Preemption() as stop:
        assert stop.agreed() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.agreed() == signal.SIGUSR1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_agree, args=(rank, port, queue, signalled_ranks))
             for rank in (0, 1)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    return results


def test_every_rank_agrees_to_stop_when_one_is_signalled():
    assert _agreement_of_two_gloo_ranks(signalled_ranks=(1,)) == \
        [(0, None, signal.SIGTERM), (1, None, signal.SIGTERM)]


def test_every_rank_agrees_on_the_signal_when_all_are_signalled():
    # SLURM signals every task of the job: both ranks hold SIGTERM (15) and must agree on 15, the
    # signal they got (exit 143, requeued), not on a sum of the ranks' signals (30)
    assert _agreement_of_two_gloo_ranks(signalled_ranks=(0, 1)) == \
        [(0, None, signal.SIGTERM), (1, None, signal.SIGTERM)]


TRANSFER_CFG = os.path.join(REPO, "configs", "detection", "synth_voc_R18_FPN_cpu.yaml")


def tiny_transfer(synth_root, out, workers):
    """`mocobench transfer` argv: 12 iterations of the synth VOC config into `out`, a metrics line
    every iteration, no periodic checkpoint before the end, `workers` DataLoader workers."""
    return ["transfer", "--config-file", TRANSFER_CFG, "--synth-root", synth_root,
            "SOLVER.MAX_ITER", "12", "SOLVER.CHECKPOINT_PERIOD", "1000",
            "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", str(workers),
            "MOCOBENCH.LOG_PERIOD", "1", "INPUT.MIN_SIZE_TRAIN", "(64,)",
            "INPUT.MIN_SIZE_TEST", "64",
            "TEST.PRECISE_BN.ENABLED", "False", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
            "SEED", "3", "OUTPUT_DIR", str(out)]


@pytest.mark.slow
def test_transfer_stops_on_sigterm_after_the_iteration_and_resumes_from_it(synth_root, tmp_path):
    """detectron2 fine-tuning under a scheduler's SIGTERM: a checkpoint of the running iteration
    (not only the last periodic one), exit 143 with the resume command, and the printed command
    finishes the schedule."""
    import transfer.run  # noqa: F401  (detectron2 loaded once here, not in every forked run)

    out = tmp_path / "transfer"
    trial = out / "seed0"
    argv = tiny_transfer(synth_root, out, workers=0)
    proc = Run(argv, tmp_path)
    assert wait_for(lambda: len(metrics_iterations_d2(trial)) >= 2, proc, timeout=500)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    [line] = [x for x in stderr.splitlines() if "stopped by" in x]
    name = (trial / "last_checkpoint").read_text().strip()
    # detectron2 counts from 0: iteration `done` finished
    done = load_checkpoint(trial / name)["iteration"]
    assert name == f"model_{done:07d}.pth" and 2 <= done + 1 < 12
    assert f"trial 1/1 stopped by SIGTERM after iteration {done + 1}/12, " \
           f"saved {trial / name}" in line
    assert not (trial / "model_final.pth").exists() and not (trial / "results.json").exists()
    printed = shlex.split(line.split("resume with: ", 1)[1])
    assert printed[:3] == ["mocobench", "transfer", "--resume"] and printed[3:] == argv[1:]

    proc = Run(printed[1:], tmp_path)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"Starting training from iteration {done + 1}" in (trial / "log.txt").read_text()
    record = json.loads((trial / "results.json").read_text())
    assert record["resumed"] and record["iteration"] == 12


def metrics_iterations_d2(trial):
    """Training iterations detectron2 wrote to metrics.json so far (lines with an lr)."""
    path = trial / "metrics.json"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # being written
    return [r["iteration"] for r in rows if "lr" in r]


def restored_optimizer_saved_to(path):
    """A `prepare` for Run: the transfer trainer, right after resume_or_load, saves the state of
    the optimizer it will train with to `path` (what the resume actually restored)."""
    def prepare():
        from transfer.trainer import Trainer

        real = Trainer.resume_or_load

        def resume_or_load(self, *args, **kwargs):
            ret = real(self, *args, **kwargs)
            torch.save(self._trainer.optimizer.state_dict(), path)
            return ret

        Trainer.resume_or_load = resume_or_load

    return prepare


@pytest.mark.slow
def test_transfer_with_loader_workers_stops_on_sigterm_to_the_process_group_and_resumes(
        synth_root, tmp_path):
    """SIGTERM to the whole process group of a transfer run with 2 loader workers (detectron2's
    workers keep default handlers unless told otherwise: they die first and the run fails with
    exit 1, nothing saved): a checkpoint of the running iteration, exit 143, and `--resume`
    restores that checkpoint's optimizer state (the momentum buffers) and finishes every
    iteration."""
    from conftest import assert_optimizer_states_equal

    import transfer.run  # noqa: F401  (detectron2 loaded once here, not in every forked run)

    out = tmp_path / "transfer"
    trial = out / "seed0"
    argv = tiny_transfer(synth_root, out, workers=2)
    proc = Run(argv, tmp_path, own_group=True)
    assert wait_for(lambda: len(metrics_iterations_d2(trial)) >= 2, proc, timeout=500)
    # the main process and both loader workers are there to be signalled
    assert len(group_members(proc.proc.pid)) == 3, group_members(proc.proc.pid)
    proc.signal_group(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    [line] = [x for x in stderr.splitlines() if "stopped by" in x]
    name = (trial / "last_checkpoint").read_text().strip()
    saved = load_checkpoint(trial / name)
    done = saved["iteration"]
    assert name == f"model_{done:07d}.pth" and 2 <= done + 1 < 12
    assert f"trial 1/1 stopped by SIGTERM after iteration {done + 1}/12, " \
           f"saved {trial / name}" in line
    assert not (trial / "model_final.pth").exists()
    printed = shlex.split(line.split("resume with: ", 1)[1])

    restored = tmp_path / "restored_optimizer.pth"
    proc = Run(printed[1:], tmp_path, own_group=True,
               prepare=restored_optimizer_saved_to(restored))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"Starting training from iteration {done + 1}" in (trial / "log.txt").read_text()
    # the momentum buffers and lr the stopped run had, not a fresh optimizer
    assert_optimizer_states_equal(saved["trainer"]["_trainer"]["optimizer"],
                                  torch.load(restored, weights_only=True))
    record = json.loads((trial / "results.json").read_text())
    assert record["resumed"] and record["iteration"] == 12
    assert metrics_iterations_d2(trial)[-1] == 11


def children_of(pid):
    """pids of the live child processes of pid (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                state, ppid = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[:2]
            except OSError:
                continue
            if int(ppid) == pid and state != "Z":
                found.append(int(entry))
    return found


def test_transfer_loader_workers_for_training_and_evaluation_survive_stop_signals(synth_root):
    """The final evaluation runs inside the trial's stop handling too: a SIGTERM to the group then
    must not kill the evaluation loader's workers (the run would fail after training, exit 1)."""
    from transfer.run import prepare_config
    from transfer.trainer import Trainer

    cfg, _ = prepare_config(TRANSFER_CFG, ["MOCOBENCH.SYNTH_ROOT", synth_root,
                                           "DATALOADER.NUM_WORKERS", "1",
                                           "SOLVER.IMS_PER_BATCH", "2"])
    loaders = {"training": Trainer.build_train_loader(cfg),
               "evaluation": Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0])}
    for what, loader in loaders.items():
        before = set(children_of(os.getpid()))
        batches = iter(loader)
        next(batches)  # the worker has started (and run its worker_init_fn)
        [worker] = set(children_of(os.getpid())) - before
        for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT, signal.SIGUSR1):
            os.kill(worker, sig)
        time.sleep(0.2)
        # "DataLoader worker ... exited unexpectedly" if it died
        more = [b for _, b in zip(range(3), batches, strict=False)]
        assert len(more) == 3 and worker in children_of(os.getpid()), what
        del batches  # ends the worker


@pytest.mark.parametrize("named, expected", [(None, signal.SIGUSR2), ("TERM", signal.SIGTERM),
                                             ("HUP", signal.SIGHUP), ("NOSUCH", None)])
def test_submitits_warning_signal_is_usr2_unless_the_environment_names_another(
        monkeypatch, named, expected):
    from mocobench.utils.preempt import submitit_warning_signal

    if named is None:
        monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    else:
        monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", named)
    assert submitit_warning_signal() == expected


@pytest.mark.parametrize("named, warning", [("HUP", signal.SIGHUP), ("NOSUCH", None)])
def test_a_loader_worker_ignores_the_stop_signals_and_submitits_warning(monkeypatch, named,
                                                                        warning):
    """ignore_in_worker, run in this process (as a DataLoader worker runs it): SIGTERM, SIGUSR1,
    SIGINT and the warning signal ignored; a name that is no signal is skipped, not an error."""
    from mocobench.utils.preempt import ignore_in_worker

    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", named)
    watched = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
    # from the default handlers (whatever this process inherited: nohup ignores SIGHUP)
    before = {s: signal.signal(s, signal.SIG_DFL) for s in watched}
    try:
        ignore_in_worker()
        after = {s: signal.getsignal(s) for s in watched}
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    ignored = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT} | ({warning} - {None})
    assert {s for s in watched if after[s] == signal.SIG_IGN} == ignored
    assert all(after[s] == signal.SIG_DFL for s in set(watched) - ignored)


def test_ctrl_c_once_is_a_stop_request_twice_stops_at_once():
    """Preemption records the first signal; a second SIGINT after a SIGINT raises
    KeyboardInterrupt (the user insists); a SIGINT after a SIGTERM, or a SIGTERM after a SIGINT,
    is only recorded (the first stays the one to stop for)."""
    from mocobench.utils.preempt import EXIT_CODES, Preempted, Preemption

    def requested_after_each(*signals):
        seen = []
        with Preemption() as stop:
            for s in signals:
                try:
                    os.kill(os.getpid(), s)
                    seen.append(stop.requested)
                except KeyboardInterrupt:
                    seen.append("KeyboardInterrupt")
        return seen

    INT, TERM = signal.SIGINT, signal.SIGTERM
    assert requested_after_each(INT, TERM, INT) == [INT, INT, "KeyboardInterrupt"]
    assert requested_after_each(TERM, INT, INT) == [TERM, TERM, TERM]
    # the exit code says which signal stopped it: 128 + its number; 1 for one it does not handle
    assert [Preempted(s, "stopped").exit_code for s in (signal.SIGINT, signal.SIGTERM,
                                                        signal.SIGUSR1, signal.SIGHUP)] \
        == [130, 143, 138, 1]
    assert EXIT_CODES == {2: 130, 15: 143, 10: 138}


def test_which_epoch_checkpoints_are_scratch_and_the_recorded_schedule(tmp_path):
    """Checkpointer._is_scratch: mid-epoch checkpoints always; an epoch checkpoint unless it is
    every CHECKPOINT_PERIOD-th or the last; nothing outside OUTPUT_DIR and no other file.
    saved_epochs: SOLVER.EPOCHS of a checkpoint's config, None when it records none."""
    from pretrain.config import load_config
    from pretrain.resume import Checkpointer, saved_epochs

    cfg = load_config(SYNTH_CFG, ["OUTPUT_DIR", str(tmp_path), "SOLVER.EPOCHS", "5",
                                  "CHECKPOINT_PERIOD", "2", "DATA.ROOT", str(tmp_path)])
    keeper = Checkpointer(cfg, None, None, None, None, None, "cpu")
    scratch = {name: keeper._is_scratch(str(tmp_path / name))
               for name in ("checkpoint_0000.pth.tar", "checkpoint_0001.pth.tar",
                            "checkpoint_0004.pth.tar", "checkpoint_iter_00000012.pth.tar",
                            "checkpoint_best.pth.tar", "metrics.json")}
    assert scratch == {"checkpoint_0000.pth.tar": True, "checkpoint_0001.pth.tar": False,
                       "checkpoint_0004.pth.tar": False, "checkpoint_iter_00000012.pth.tar": True,
                       "checkpoint_best.pth.tar": False, "metrics.json": False}
    assert not keeper._is_scratch(str(tmp_path / "elsewhere" / "checkpoint_0000.pth.tar"))
    assert saved_epochs({"config": cfg.dump()}) == 5
    assert saved_epochs({"config": "SOLVER: {}\n"}) is None
    assert saved_epochs({"config": "SOLVER:\n  EPOCHS: '5'\n"}) is None
    assert saved_epochs({}) is None


# Unit tests of pretrain.resume / pretrain.checkpoint in this process (mutation testing counts only
# in-process calls): the real config, writer and Checkpointer around a 2x2 linear model.
def _small_cfg(out, **extra):
    from pretrain.config import load_config

    kv = {"OUTPUT_DIR": out, "DATA.ROOT": out, "SOLVER.EPOCHS": 2, "SOLVER.BATCH_SIZE": 8,
          "MOCO.K": 32, **extra}
    return load_config(SYNTH_CFG, [str(x) for pair in kv.items() for x in pair])


def _checkpointer(cfg, stop, previous=None):
    from pretrain.checkpoint import plain_state_dict
    from pretrain.resume import Checkpointer

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return Checkpointer(cfg, model, optimizer, None, plain_state_dict, stop, "cpu", previous)


def _save_final_checkpoint(cfg):
    """checkpoint_{EPOCHS-1:04d}.pth.tar of a finished run (the real writer); returns its path."""
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with _preemption() as stop:
        return _checkpointer(cfg, stop).save_epoch(cfg.SOLVER.EPOCHS - 1, 8 * cfg.SOLVER.EPOCHS)


def _preemption():
    from mocobench.utils.preempt import Preemption

    return Preemption()


def test_a_restarted_run_removes_the_temp_file_of_a_killed_save_from_its_own_directory(
        tmp_path, monkeypatch, capsys):
    """open_run_dir -> remove_stale_temp_files deletes the temp file a save killed mid-write left in
    OUTPUT_DIR (named relative to OUTPUT_DIR, not the working directory), and no other file."""
    from mocobench.utils.fileio import atomic_write
    from pretrain.resume import open_run_dir

    out = tmp_path / "run"
    cfg = _small_cfg(str(out))
    _save_final_checkpoint(cfg)
    # a save stopped inside the writer (as by SIGKILL): its temp file stays
    killed = atomic_write(out / "checkpoint_0002.pth.tar")
    killed.__enter__().write(b"half a checkpoint")
    [temp] = [n for n in os.listdir(out) if n.endswith(".tmp")]
    foreign = out / ".notes.txt.abc123.tmp"  # not one of the run's own files
    foreign.write_text("someone else's")
    # the working directory holds a file of the same name: it is not the run's
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / temp).write_text("not the run's")
    monkeypatch.chdir(elsewhere)
    lock = open_run_dir(cfg)
    lock.close()
    assert sorted(os.listdir(out)) == sorted([".lock", foreign.name, "checkpoint_0001.pth.tar",
                                              "last_checkpoint"])
    assert (elsewhere / temp).read_text() == "not the run's"
    assert f"removed 1 file(s) a killed run left in {out}: ['{temp}']" in capsys.readouterr().out


def test_a_state_key_the_checkpoints_config_lacks_is_compared_as_its_default(tmp_path):
    """changed_state_keys (through plan_resume): a checkpoint whose config has no MOCO.MLP (an older
    version's) counts as the default False: resuming with MOCO.MLP True is refused naming it,
    with False it resumes."""
    import yaml

    from mocobench.utils.errors import UsageError
    from pretrain.resume import plan_resume
    from pretrain.train import MocoTask

    out = str(tmp_path / "run")
    cfg = _small_cfg(out, **{"SOLVER.EPOCHS": 3})
    assert cfg.MOCO.MLP  # the synth recipe is MoCo v2
    path = _save_final_checkpoint(_small_cfg(out))
    saved = torch.load(path, weights_only=True)
    config = yaml.safe_load(saved["config"])
    del config["MOCO"]["MLP"]
    torch.save({**saved, "config": yaml.safe_dump(config)}, path)
    with pytest.raises(UsageError, match=r"the config changes what shapes its state: MOCO.MLP "
                                         r"False -> True\. Keep those values"):
        plan_resume(cfg, "auto", 1, MocoTask(cfg), extend=True)
    cfg = _small_cfg(out, **{"SOLVER.EPOCHS": 3, "MOCO.MLP": False})
    point = plan_resume(cfg, "auto", 1, MocoTask(cfg), extend=True)
    assert point.path == path and point.extends


def test_the_same_extension_resumed_again_is_recorded_once(tmp_path, caplog):
    """schedule_change: extending a finished 2-epoch run to 3 epochs appends one entry to
    extended.json; resumed again before its first checkpoint (same checkpoint, same to_epochs) it
    appends none; extended to 4 epochs instead, it appends another."""
    from pretrain.resume import extended_records, plan_resume, schedule_change
    from pretrain.train import MocoTask

    out = str(tmp_path / "run")
    _save_final_checkpoint(_small_cfg(out))

    def extend_to(epochs):
        cfg = _small_cfg(out, **{"SOLVER.EPOCHS": epochs})
        point = plan_resume(cfg, "auto", 1, MocoTask(cfg), extend=True)
        schedule_change(cfg, point, logging.getLogger("mocobench.test"))
        return [(r["from_epochs"], r["to_epochs"], r["checkpoint"]) for r in extended_records(out)]

    with caplog.at_level(logging.WARNING):
        assert extend_to(3) == [(2, 3, "checkpoint_0001.pth.tar")]
    assert "the schedule changed from 2 to 3 epochs" in caplog.text
    assert extend_to(3) == [(2, 3, "checkpoint_0001.pth.tar")]
    assert extend_to(4) == [(2, 3, "checkpoint_0001.pth.tar"), (2, 4, "checkpoint_0001.pth.tar")]


def test_a_stop_signal_after_the_last_epoch_lets_the_run_finish(tmp_path):
    """Checkpointer.after_epoch: a stop agreed after an epoch raises Preempted naming its
    checkpoint, unless that epoch was the last (the run is done: nothing to resume)."""
    from mocobench.utils.preempt import Preempted

    cfg = _small_cfg(str(tmp_path), **{"SOLVER.EPOCHS": 3})
    with _preemption() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == signal.SIGTERM
        keeper = _checkpointer(cfg, stop)
        with pytest.raises(Preempted, match="stopped by SIGTERM after epoch 2: saved C1") as e:
            keeper.after_epoch(1, "C1")
        assert e.value.exit_code == 143
        assert keeper.after_epoch(2, "C2") is None  # the last epoch: no Preempted


def test_no_mid_epoch_checkpoint_on_the_last_iteration_of_an_epoch(tmp_path):
    """Checkpointer.after_iteration with SOLVER.CHECKPOINT_PERIOD_ITERS 2 and 4 iterations per
    epoch: a mid-epoch checkpoint after iteration 2 of the run; none after iteration 4 (the
    epoch's last: its epoch checkpoint comes next), then one after iteration 6 (epoch 2), which
    replaces the scratch checkpoint of epoch 1 (CHECKPOINT_PERIOD 5, 2 epochs)."""
    out = tmp_path / "run"
    out.mkdir()
    cfg = _small_cfg(str(out), **{"SOLVER.CHECKPOINT_PERIOD_ITERS": 2})

    def checkpoints():
        pointer = out / "last_checkpoint"
        return (sorted(n for n in os.listdir(out) if n.startswith("checkpoint_")),
                pointer.read_text() if pointer.exists() else None)

    with _preemption() as stop:
        keeper = _checkpointer(cfg, stop)
        seen = []
        for epoch in range(2):
            for i in range(4):
                keeper.after_iteration(epoch, i, 4, 4 * epoch + i + 1, None)
                seen.append(checkpoints())
            if epoch == 0:
                keeper.save_epoch(epoch, 4)
    iter2, iter6 = "checkpoint_iter_00000002.pth.tar", "checkpoint_iter_00000006.pth.tar"
    assert seen == [([], None), ([iter2], iter2), ([iter2], iter2), ([iter2], iter2),
                    (["checkpoint_0000.pth.tar"], "checkpoint_0000.pth.tar"),
                    ([iter6], iter6), ([iter6], iter6), ([iter6], iter6)]


def test_without_resume_a_run_never_picks_up_a_checkpoint(tmp_path, capsys):
    """plan_resume without --resume, or with an empty one (`--resume "$CKPT"`, CKPT unset): an
    OUTPUT_DIR holding a run is refused, naming its files and --resume auto; an absent or empty one
    starts fresh (None) and stays as it was. Only --resume auto picks up the checkpoint."""
    from mocobench.utils.errors import UsageError
    from pretrain.resume import plan_resume
    from pretrain.train import MocoTask

    out = str(tmp_path / "run")
    cfg = _small_cfg(out)
    path = _save_final_checkpoint(cfg)
    refusal = (f"OUTPUT_DIR {out!r} already holds a run (checkpoint_0001.pth.tar, "
               "last_checkpoint); continue it with --resume auto, or set another OUTPUT_DIR")
    for resume in (None, ""):
        with pytest.raises(UsageError) as refused:
            plan_resume(cfg, resume, 1, MocoTask(cfg))
        assert str(refused.value) == refusal
    # the command line's empty --resume: the same one-line refusal, exit 2, before any training
    assert cli.main(command("--resume", "", *opts(out, out))) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"mocobench pretrain: error: {refusal}"]
    point = plan_resume(cfg, "auto", 1, MocoTask(cfg))
    assert point.path == path and point.finished
    # a new run: nothing to pick up, nothing written
    absent, empty = str(tmp_path / "absent"), tmp_path / "empty"
    empty.mkdir()
    for fresh in (absent, str(empty)):
        cfg = _small_cfg(fresh)
        assert plan_resume(cfg, None, 1, MocoTask(cfg)) is None
        assert plan_resume(cfg, "", 1, MocoTask(cfg)) is None
    assert not os.path.exists(absent) and os.listdir(empty) == []


def test_extending_a_finished_run_without_extend_names_the_epochs_key_and_both_lengths(tmp_path):
    """plan_resume: a finished 2-epoch run resumed with SOLVER.EPOCHS 3 and no --extend is refused
    with the whole message (the task's name for the epochs setting, both schedule lengths, the
    checkpoint, how to go on); with --extend it resumes from that checkpoint."""
    from mocobench.utils.errors import UsageError
    from pretrain.resume import plan_resume
    from pretrain.train import MocoTask

    out = str(tmp_path / "run")
    path = _save_final_checkpoint(_small_cfg(out))
    cfg = _small_cfg(out, **{"SOLVER.EPOCHS": 3})
    with pytest.raises(UsageError) as refused:
        plan_resume(cfg, "auto", 1, MocoTask(cfg))
    assert str(refused.value) == (
        f"{out}: the run is finished (2 epochs done, checkpoint_0001.pth.tar); SOLVER.EPOCHS = 3 "
        "would extend it and change its schedule from 2 to 3 epochs (not the same as a 3-epoch "
        "run); pass --extend to continue it so (its final checkpoint is kept), or start a 3-epoch "
        "run in another OUTPUT_DIR")
    point = plan_resume(cfg, "auto", 1, MocoTask(cfg), extend=True)
    assert (point.path, point.extends, point.epochs_before) == (path, True, 2)


def test_a_mid_epoch_checkpoint_resumes_only_with_the_process_count_that_wrote_it(tmp_path):
    """plan_resume: the mid-epoch checkpoint save_checkpoint wrote for 2 processes (world_size=2)
    is refused with 1, naming both counts, and resumes with 2; the one the Checkpointer of this
    1-process run writes resumes with 1."""
    from mocobench.utils.errors import UsageError
    from mocobench.utils.preempt import Preempted
    from pretrain.checkpoint import plain_state_dict, save_checkpoint
    from pretrain.resume import plan_resume
    from pretrain.train import MocoTask

    out = tmp_path / "run"
    out.mkdir()
    cfg = _small_cfg(str(out))
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # stopped after iteration 3 of epoch 1 by 2 processes
    path = save_checkpoint(str(out), 0, model, optimizer, None, 3, cfg, plain_state_dict,
                           epoch_iteration=3, world_size=2)
    with pytest.raises(UsageError) as refused:
        plan_resume(cfg, "auto", 1, MocoTask(cfg))
    assert str(refused.value) == (
        f"cannot resume the mid-epoch checkpoint {path} with 1 process(es): it was written by 2 "
        "(the data order of the epoch is sharded by the process count); resume with that many "
        "processes")
    point = plan_resume(cfg, "auto", 2, MocoTask(cfg))
    assert point.path == path and (point.checkpoint["epoch_iteration"],
                                   point.checkpoint["world_size"]) == (3, 2)
    # this process (1) stopped by SIGTERM after iteration 5 (epoch 1, iteration 5 of 8)
    with _preemption() as stop:
        with pytest.raises(Preempted, match="saved .*checkpoint_iter_00000005.pth.tar"):
            _checkpointer(cfg, stop, previous=path).after_iteration(0, 4, 8, 5, signal.SIGTERM)
    point = plan_resume(cfg, "auto", 1, MocoTask(cfg))
    assert os.path.basename(point.path) == "checkpoint_iter_00000005.pth.tar"
    assert (point.checkpoint["epoch_iteration"], point.checkpoint["world_size"]) == (5, 1)
    assert not point.finished
