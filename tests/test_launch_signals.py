"""The elastic launcher (`mocobench pretrain --nproc-per-node N`) under a scheduler's signals:
SIGTERM / SIGUSR1 to the launcher alone reach the workers, which save an exact mid-epoch
checkpoint; the command ends with their exit code (143 / 138), one line on stderr, no traceback and
no worker left behind; and a multi-node launch without a rendezvous endpoint is a one-line error
(issue 20, items 3 and 8)."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from mocobench import cli, launch
from mocobench.utils.errors import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH_CFG = os.path.join(REPO, "configs", "pretrain", "synth_R18_cpu.yaml")
ENV = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def pretrain_cmd(root, out, *extra):
    # 64 images, global batch 8: 8 iterations per epoch (4 images per process, 2 BN groups)
    values = {"DATA.ROOT": root, "OUTPUT_DIR": out, "SOLVER.EPOCHS": 2, "SOLVER.BATCH_SIZE": 8,
              "MOCO.K": 32, "INPUT.SIZE": 32, "DATALOADER.NUM_WORKERS": 0, "KNN.PERIOD": 0,
              "LOG_PERIOD": 1, "CHECKPOINT_PERIOD": 1, "MOCO.SHUFFLE_BN_SPLITS": 2,
              "DEVICE": "cpu"}
    return [sys.executable, "-m", "mocobench", "pretrain", "--nproc-per-node", "2",
            "--config-file", SYNTH_CFG, *[str(x) for kv in values.items() for x in kv], *extra]


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _iterations_logged(out):
    try:
        lines = open(os.path.join(out, "metrics.json")).read().splitlines()
    except FileNotFoundError:
        return 0
    done = 0
    for line in lines:
        try:
            done = max(done, json.loads(line).get("iteration", 0))
        except ValueError:  # a line being written
            pass
    return done


def _stop_mid_epoch(root, out, signum):
    """Start a 2-process run, send `signum` to the launcher alone once it is a few iterations into
    epoch 1; returns (the finished process, its stdout, stderr, the workers' pids)."""
    proc = subprocess.Popen(pretrain_cmd(root, out), cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 150
        while _iterations_logged(out) < 2:  # of 8 in the epoch: the stop comes mid-epoch
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.1)
        workers = _children(proc.pid)
        assert len(workers) == 2
        os.kill(proc.pid, signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc, stdout, stderr, workers


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)])
def test_a_signal_to_the_launcher_stops_the_workers_cleanly_with_their_exit_code(
        tiny_imagenet, tmp_path, signum, code):
    out = str(tmp_path / "run")
    proc, stdout, stderr, workers = _stop_mid_epoch(tiny_imagenet, out, signum)
    name = signal.Signals(signum).name
    assert proc.returncode == code, stderr[-3000:]
    # one line (rank 0's), no traceback, none of torch elastic's "failed (exitcode ...)" lines
    [line] = stderr.strip().splitlines()
    assert line.startswith(f"mocobench pretrain: stopped by {name} after iteration ") and \
        " of epoch 1 " in line and "resume with: " in line and line.endswith("--resume auto"), line
    # the launcher waited for its workers: none is left running
    time.sleep(0.5)
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")]
    # an exact mid-epoch checkpoint, the one last_checkpoint names
    last = open(os.path.join(out, "last_checkpoint")).read().strip()
    assert last.startswith("checkpoint_iter_") and last.endswith(".pth.tar"), last
    assert os.path.exists(os.path.join(out, last)) and f"saved {os.path.join(out, last)}" in line
    if signum != signal.SIGTERM:
        return
    # the printed command (the same 2 processes per node) resumes from it and completes
    printed = shlex.split(line.split("resume with: ", 1)[1])
    assert printed[:4] == ["mocobench", "pretrain", "--nproc-per-node", "2"], printed
    resumed = subprocess.run([sys.executable, "-m", *printed], cwd=REPO, env=ENV, text=True,
                             capture_output=True, timeout=200)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from " + os.path.join(out, last) in open(os.path.join(out, "log.txt")).read()
    assert open(os.path.join(out, "last_checkpoint")).read().strip() == "checkpoint_0001.pth.tar"
    records = [json.loads(r) for r in open(os.path.join(out, "metrics.json"))]
    assert max(r.get("iteration", 0) for r in records) == 16  # 2 epochs x 8


def test_a_signal_with_no_worker_running_ends_the_launcher_as_torch_elastic_does():
    # before the workers start or after they end there is no one to hand the stop to
    from torch.distributed.elastic.multiprocessing import SignalException

    with launch._StopForwarder((signal.SIGUSR1,)) as stops:
        with pytest.raises(SignalException) as e:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(1)  # the handler runs in this thread, between two bytecodes
    assert e.value.sigval == signal.SIGUSR1 and stops.forwarded is None
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the previous handler is back


# a worker as torch elastic starts one (a session of its own) that says which signals reach it
WORKER = """
import signal, sys, time
signal.signal(signal.SIGUSR1, lambda signum, frame: print("got SIGUSR1", flush=True))
print("ready", flush=True)
time.sleep(60)
"""


def test_a_stop_signal_with_a_worker_running_is_handed_on_and_quiets_torch_elastic(monkeypatch):
    """With a worker running, each stop signal to the launcher goes on to the worker and nothing is
    raised here (the agent keeps watching it); the first is kept (run_elastic reports the workers'
    end against it). Once one is handed on, torch elastic's loggers drop their records (the
    workers' "failure" is the stop) until the forwarder exits; other loggers are untouched."""
    import logging

    import torch.distributed.elastic.agent.server.api  # noqa: F401 - the agent's logger
    import torch.distributed.run  # noqa: F401 - a torch logger outside elastic

    worker = subprocess.Popen([sys.executable, "-c", WORKER], start_new_session=True,
                              stdout=subprocess.PIPE, text=True)
    # only this worker, whatever else runs on the host (_worker_pids has its own test below)
    monkeypatch.setattr(launch, "_worker_pids", lambda: [worker.pid])
    elastic = logging.getLogger("torch.distributed.elastic.agent.server.api")
    other = logging.getLogger("torch.distributed.run")
    record = logging.LogRecord(elastic.name, logging.ERROR, __file__, 0,
                               "failed (exitcode: -15)", None, None)
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        assert worker.stdout.readline() == "ready\n"
        with launch._StopForwarder((signal.SIGUSR1, signal.SIGTERM)) as stops:
            assert elastic.filter(record)  # nothing quieted before a stop
            os.kill(os.getpid(), signal.SIGUSR1)
            assert worker.stdout.readline() == "got SIGUSR1\n"
            assert stops.forwarded == signal.SIGUSR1
            assert not elastic.filter(record) and other.filter(record)
            os.kill(os.getpid(), signal.SIGTERM)  # a second stop goes on too; the first is kept
            assert worker.wait(timeout=30) == -signal.SIGTERM
            assert stops.forwarded == signal.SIGUSR1
            os.kill(os.getpid(), signal.SIGUSR1)  # the worker has ended: nothing to hand it to
        assert elastic.filter(record) and other.filter(record)
        assert signal.getsignal(signal.SIGUSR1) is previous
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        worker.stdout.close()


def test_several_nodes_without_a_rendezvous_endpoint_is_a_one_line_error(tmp_path, capfd,
                                                                          monkeypatch):
    import torch.distributed.run

    def started(*a, **k):
        raise AssertionError("a process was started")

    monkeypatch.setattr(torch.distributed.run, "run", started)
    out = tmp_path / "run"
    for nnodes in ("2", "1:4"):
        assert cli.main(["pretrain", "--nproc-per-node", "2", "--nnodes", nnodes,
                         "--config-file", SYNTH_CFG, "OUTPUT_DIR", str(out)]) == 2
        err = capfd.readouterr().err
        assert err.splitlines() == [
            f"mocobench pretrain: error: --nnodes {nnodes} needs --rdzv-endpoint HOST:PORT: a free "
            "port on one of the nodes that every node reaches, the same on every node (e.g. "
            "--rdzv-endpoint node0:29500)"]
    assert not out.exists()
    with pytest.raises(UsageError, match="--nnodes 2:x: expected N or MIN:MAX"):
        launch.run_elastic("pretrain.train", [], 2, nnodes="2:x")


def test_run_elastic_hands_torchrun_the_rendezvous_of_several_nodes(monkeypatch):
    """What torchrun is asked for (its own parser reads the arguments): the processes, nodes, this
    node's rank and, with an endpoint, the c10d rendezvous under the job's id."""
    import torch.distributed.run

    from mocobench import launch

    seen = []
    monkeypatch.setattr(torch.distributed.run, "run", seen.append)
    assert launch.run_elastic("pretrain.train", ["--config-file", "x.yaml"], 2, nnodes="2",
                              node_rank=1, rdzv_endpoint="node0:29500", rdzv_id="job7") == 0
    [args] = seen
    assert (args.nproc_per_node, args.nnodes, args.node_rank, args.rdzv_backend,
            args.rdzv_endpoint, args.rdzv_id, args.module, args.training_script,
            args.training_script_args) == ("2", "2", 1, "c10d", "node0:29500", "job7", True,
                                           "pretrain.train", ["--config-file", "x.yaml"])


@pytest.mark.parametrize("sig, why", [
    (signal.SIGTERM, "with no worker running"),
    (signal.SIGHUP, "(torch elastic shut the workers down)")])
def test_a_signal_torch_elastic_raises_ends_the_command_with_its_code(monkeypatch, sig, why):
    """A stop signal before any worker ran (torch raises SignalException), or a signal torch's
    agent handles itself: one line, exit 128 + the signal's number, not an error."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing import SignalException

    from mocobench import launch
    from mocobench.utils.errors import CommandFailed

    def run(args):
        raise SignalException("got signal", sigval=signal.Signals(sig))

    monkeypatch.setattr(torch.distributed.run, "run", run)
    with pytest.raises(CommandFailed) as e:
        launch.run_elastic("pretrain.train", [], 2)
    assert str(e.value) == f"stopped by {signal.Signals(sig).name} {why}: nothing new saved"
    assert (e.value.exit_code, e.value.is_error) == (128 + sig, False)


def test_the_workers_are_the_children_that_lead_their_own_session(monkeypatch):
    """_worker_pids (who a forwarded stop signal goes to): this process's children started in a
    session of their own, as torch elastic starts its workers; a process that ends between the
    listing of /proc and the read of its stat is skipped, not the end of the search."""
    plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              start_new_session=True)
    try:
        assert launch._worker_pids() == [worker.pid]
        listdir = os.listdir
        monkeypatch.setattr(os, "listdir",
                            lambda path: ["999999999", *listdir(path)] if path == "/proc"
                            else listdir(path))
        assert launch._worker_pids() == [worker.pid]
    finally:
        for proc in (plain, worker):
            proc.kill()
            proc.wait()
