"""The scale path on a real SLURM (the `slurm` tier: `make test-slurm`): a one-node cluster on
localhost (tests/slurm_cluster.py: munged, slurmctld, slurmd of Debian's slurm-wlm), real sbatch /
srun job steps, `scancel --signal`, time limits with submitit's `--signal=USR2@N`, requeue by
`scontrol requeue` and `scontrol show job`. Small CPU runs, several jobs side by side (the node
claims 16 CPUs): each interrupted run and its uninterrupted reference are submitted together.

If the cluster cannot start, every test here fails with the reason (never a skip)."""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import slurm_cluster
import torch
from conftest import report_tables

from mocobench.utils.fileio import load_checkpoint

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_CFG = os.path.join(REPO, "configs", "pretrain", "synth_R18_cpu.yaml")
VOC_CFG = os.path.join(REPO, "configs", "detection", "synth_voc_R18_FPN_cpu.yaml")
TINY_PIPELINE = os.path.join(REPO, "configs", "pipeline", "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def cluster():
    """The running cluster's client environment; the daemons stop when the module ends, pass or
    fail. Its state lives in slurm_cluster.DEFAULT_STATE, not in pytest's folder: munged runs as the
    munge user, which may not enter pytest's (mode 0700) temporary folders."""
    state = slurm_cluster.DEFAULT_STATE
    try:
        slurm_env = slurm_cluster.start(state)
    except slurm_cluster.ClusterError as e:
        slurm_cluster.stop(state)
        pytest.fail(f"the test SLURM cluster did not start: {e}", pytrace=False)
    try:
        yield {**os.environ, **slurm_env, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
    finally:
        slurm_cluster.stop(state)


class Job:
    """A job submitted with `mocobench COMMAND --launcher slurm`, and what SLURM says of it."""

    def __init__(self, env, job_dir, printed):
        self.env, self.job_dir = env, job_dir
        self.id = re.search(r"as job ([\d_]+)", printed).group(1)

    def info(self):
        """`scontrol show job -o ID` as {key: value}."""
        out = subprocess.run(["scontrol", "show", "job", "-o", self.id], env=self.env,
                             capture_output=True, text=True, timeout=30).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def log(self):
        """The job's stdout and stderr so far (submitit's files, appended across requeues)."""
        text = ""
        for suffix in ("out", "err"):
            path = os.path.join(self.job_dir, f"{self.id}_0_log.{suffix}")
            text += open(path).read() if os.path.exists(path) else ""
        return text

    def signal(self, name, *flags):
        subprocess.run(["scancel", f"--signal={name}", *flags, self.id], env=self.env,
                       check=True, timeout=30)

    def wait(self, states=("COMPLETED",), timeout=600):
        """Wait until the job is in a final state; return scontrol's record of it (read before
        MinJobAge forgets it)."""
        deadline = time.time() + timeout
        while True:
            info = self.info()
            assert info, f"job {self.id} is unknown to scontrol (older than MinJobAge?)"
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                        "NODE_FAIL", "OUT_OF_MEMORY"):
                assert info["JobState"] in states, (info, self.log()[-4000:])
                return info
            assert time.time() < deadline, (info, self.log()[-4000:])
            time.sleep(1)


def submit(env, tmp_path, command, *argv, slurm=()):
    job_dir = str(tmp_path / "jobs")
    proc = subprocess.run(
        [sys.executable, "-m", "mocobench", command, "--launcher", "slurm", "--gpus-per-node",
         "0", "--mem", "2G", "--timeout", "20", "--job-dir", job_dir, *slurm, *argv],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Job(env, job_dir, proc.stdout)


def wait_for(condition, job, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline and job.info().get("JobState") in ("PENDING", "RUNNING"), \
            (job.info(), job.log()[-4000:])
        time.sleep(0.5)


def pretrain_opts(root, out, **extra):
    values = {"DATA.ROOT": root, "OUTPUT_DIR": out, "SOLVER.EPOCHS": 3, "SOLVER.BATCH_SIZE": 16,
              "MOCO.K": 32, "INPUT.SIZE": 32, "DATALOADER.NUM_WORKERS": 2, "KNN.PERIOD": 0,
              "LOG_PERIOD": 1, "CHECKPOINT_PERIOD": 1, "MOCO.SHUFFLE_BN_SPLITS": 2,
              "DEVICE": "cpu", **extra}
    return ["--config-file", PRETRAIN_CFG, *(str(x) for kv in values.items() for x in kv)]


def assert_same_pretraining(path_a, path_b):
    """Weights, BN buffers, queue and its pointer, optimizer state: bit for bit."""
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert (a["epoch"], a["iteration"]) == (b["epoch"], b["iteration"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


# A hook on a model class's forward, loaded in every process of a job through PYTHONPATH (Python
# imports sitecustomize at start-up): WRAP is the body of `wrap(forward)`, which returns the
# forward pass to use; the hook is installed where CONDITION holds.
FORWARD_HOOK = '''
import importlib.abc, importlib.machinery, os, sys, time

MODULE, CLASS = {module!r}, {cls!r}


def wrap(forward):
{wrap}


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            model = getattr(module, CLASS)
            model.forward = wrap(model.forward)
        spec.loader.exec_module = patched
        return spec


if {condition}:
    sys.meta_path.insert(0, _Hook())
'''


MOCO = ("pretrain.moco", "MoCo")
RESNET = ("torchvision.models.resnet", "ResNet")  # the linear evaluation's model
RCNN = ("detectron2.modeling.meta_arch.rcnn", "GeneralizedRCNN")


def hooked_env(env, tmp_path, wrap, model=MOCO, condition="True"):
    """The job environment with FORWARD_HOOK on MODEL = (module, class) on its PYTHONPATH."""
    hook = tmp_path / "hook"
    hook.mkdir()
    module, cls = model
    (hook / "sitecustomize.py").write_text(FORWARD_HOOK.format(
        module=module, cls=cls, wrap=wrap, condition=condition))
    return {**env, "PYTHONPATH": f"{hook}{os.pathsep}{REPO}"}


# what a rank's own failure looks like: rank 1 alone raises in its 3rd MoCo forward pass, while
# rank 0 waits for it in a collective (a bug, out of memory, a bad shard)
FAILING_THIRD_FORWARD = '''
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected fault on rank 1")
        return forward(self, *args, **kwargs)
    return failing'''



def slow_forward(seconds):
    """A slower machine: every forward pass takes SECONDS more (the numbers do not change). A
    signal sent once the test sees a checkpoint then lands while work is left, however fast the
    machine."""
    return f'''
    def slow(self, *args, **kwargs):
        time.sleep({seconds})
        return forward(self, *args, **kwargs)
    return slow'''


@pytest.fixture(scope="module")
def reference(cluster, tiny_imagenet, tmp_path_factory):
    """An uninterrupted 3-epoch pretraining, a SLURM job of its own (submitted at once, waited for
    where it is compared)."""
    tmp = tmp_path_factory.mktemp("reference")
    job = submit(cluster, tmp, "pretrain", *pretrain_opts(tiny_imagenet, str(tmp / "run")))
    return job, tmp / "run"


def test_pretrain_with_loader_workers_stopped_by_scancel_usr2_requeues_and_ends_bit_exact(
        cluster, tiny_imagenet, reference, tmp_path):
    """`scancel --signal=USR2` reaches every process of the step, the DataLoader workers too: the
    workers ignore it, the training loop finishes its iteration, writes an exact checkpoint, and
    submitit requeues the job (`scontrol requeue`); the requeued job resumes from that checkpoint
    and ends with the uninterrupted run's weights, queue and optimizer, bit for bit."""
    out = tmp_path / "run"
    job = submit(hooked_env(cluster, tmp_path, slow_forward(0.5)), tmp_path, "pretrain",
                 *pretrain_opts(tiny_imagenet, str(out)))
    # epoch 1 is saved: the signal lands in epoch 2 (4 iterations an epoch)
    wait_for(lambda: (out / "last_checkpoint").exists(), job)
    job.signal("USR2")
    info = job.wait()
    log = job.log()
    assert info["Restarts"] == "1", info
    assert "exited unexpectedly" not in log  # no DataLoader worker died of the signal
    assert "stopped by SIGTERM after iteration" in log and "Requeued job" in log, log[-4000:]
    assert f"resumed from {out / 'checkpoint_iter_'}" in log, log[-4000:]
    assert not os.path.exists(os.path.join(job.job_dir, f"{job.id}_error.txt"))
    ref_job, ref_out = reference
    ref_job.wait()
    assert_same_pretraining(ref_out / "checkpoint_0002.pth.tar", out / "checkpoint_0002.pth.tar")


def test_pretrain_reaching_its_time_limit_checkpoints_on_the_warning_and_is_requeued(
        cluster, tiny_imagenet, reference, tmp_path):
    """A 1-minute time limit with SLURM's warning signal 50 s before it (`--signal=USR2@50`): the
    job checkpoints on the warning and requeues itself before the limit, as often as it takes, and
    ends bit-exact. slurmctld checks time limits every 30 s (PERIODIC_TIMEOUT) and sends the warning
    at the first check within warn + 30 s of the end: here at its first check, 0-30 s into each
    run (before, during or after the training loop). So that no machine is fast enough to finish
    before it, every step sleeps 3 s: the 12 steps take over 30 s."""
    out = tmp_path / "run"
    job = submit(hooked_env(cluster, tmp_path, slow_forward(3)), tmp_path, "pretrain",
                 *pretrain_opts(tiny_imagenet, str(out)),
                 slurm=("--timeout", "1", "--signal-delay", "50"))
    info = job.wait(timeout=800)
    log = job.log()
    assert int(info["Restarts"]) >= 1, info
    assert "this job is timed-out" in log and "Requeued job" in log, log[-4000:]
    assert "DUE TO TIME LIMIT" not in log  # never killed by the limit itself
    # a warning that came before the loop started (or after it ended) requeued the job at once:
    # not a failure (no error line kept for the job's end)
    assert not os.path.exists(os.path.join(job.job_dir, f"{job.id}_error.txt"))
    ref_job, ref_out = reference
    ref_job.wait()
    assert_same_pretraining(ref_out / "checkpoint_0002.pth.tar", out / "checkpoint_0002.pth.tar")


def test_transfer_with_loader_workers_stopped_by_sigterm_requeues_and_finishes(
        cluster, synth_root, tmp_path):
    """SIGTERM to every process of the job's step (what SLURM sends on preemption), with 2
    detectron2 loader workers: the trainer saves after its iteration, the job requeues and finishes
    every iteration from that checkpoint."""
    out = tmp_path / "transfer"
    trial = out / "seed0"
    job = submit(hooked_env(cluster, tmp_path, slow_forward(0.5), model=RCNN), tmp_path,
                 "transfer", "--config-file", VOC_CFG, "--synth-root",
                 synth_root, "SOLVER.MAX_ITER", "12", "SOLVER.CHECKPOINT_PERIOD", "1000",
                 "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "2",
                 "MOCOBENCH.LOG_PERIOD", "1", "INPUT.MIN_SIZE_TRAIN", "(64,)",
                 "INPUT.MIN_SIZE_TEST", "64", "TEST.PRECISE_BN.ENABLED", "False", "MODEL.WEIGHTS",
                 "", "MOCOBENCH.REQUIRE_WEIGHTS", "False", "SEED", "3", "OUTPUT_DIR", str(out))
    metrics = trial / "metrics.json"
    wait_for(lambda: metrics.exists() and metrics.read_text().count('"lr"') >= 2, job)
    job.signal("TERM")
    info = job.wait()
    log = job.log()
    assert info["Restarts"] == "1", info
    assert "stopped by SIGTERM after iteration" in log and "Requeued job" in log, log[-4000:]
    saved = sorted(p.name for p in trial.glob("model_0*.pth"))
    assert len(saved) == 1, saved  # the stop's checkpoint (CHECKPOINT_PERIOD is past the schedule)
    assert f"Starting training from iteration {int(saved[0][6:13]) + 1}" in \
        (trial / "log.txt").read_text()
    record = json.loads((trial / "results.json").read_text())
    assert record["resumed"] and record["iteration"] == 12


def test_lincls_requeued_mid_run_ends_with_the_uninterrupted_head(cluster, tiny_imagenet,
                                                                  reference, tmp_path):
    ref_job, ref_out = reference
    ref_job.wait()
    args = ["--data", tiny_imagenet, "--pretrained", str(ref_out / "checkpoint_0002.pth.tar"),
            "--epochs", "4", "--batch-size", "16", "--size", "32", "--workers", "2", "--lr", "0.5",
            "--device", "cpu"]
    full = submit(cluster, tmp_path / "full", "lincls", *args, "--output",
                  str(tmp_path / "full" / "out"))
    stopped_out = tmp_path / "stopped" / "out"
    stopped = submit(hooked_env(cluster, tmp_path, slow_forward(0.5), model=RESNET),
                     tmp_path / "stopped", "lincls", *args, "--output", str(stopped_out))
    wait_for(lambda: (stopped_out / "last_checkpoint").exists(), stopped)
    stopped.signal("USR2")
    info = stopped.wait()
    assert info["Restarts"] == "1", info
    assert "Requeued job" in stopped.log() and "resumed from" in stopped.log()
    full.wait()
    a, b = (load_checkpoint(d / "checkpoint_0003.pth.tar")
            for d in (tmp_path / "full" / "out", stopped_out))
    for key in a["state_dict"]:  # fc and the frozen backbone with its BN buffers
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    ra, rb = (json.loads((d / "lincls_results.json").read_text())
              for d in (tmp_path / "full" / "out", stopped_out))
    assert ra == rb


def test_a_failing_rank_ends_the_whole_job_at_once_with_its_error_last(cluster, tiny_imagenet,
                                                                      tmp_path):
    """A 2-task job in which rank 1 raises: srun's --kill-on-bad-exit ends rank 0 (blocked in a
    collective, which would wait the process group's 60-minute timeout) within seconds, the job
    FAILS, and the failing rank's error is the job's last line."""
    env = hooked_env(cluster, tmp_path, FAILING_THIRD_FORWARD,
                     condition='os.environ.get("SLURM_PROCID") == "1"')
    out = tmp_path / "run"
    start = time.time()
    job = submit(env, tmp_path, "pretrain",
                 *pretrain_opts(tiny_imagenet, str(out), **{"DATALOADER.NUM_WORKERS": 0}),
                 slurm=("--tasks-per-node", "2"))
    info = job.wait(states=("FAILED",), timeout=300)
    elapsed = time.time() - start
    assert elapsed < 120, (elapsed, job.log()[-3000:])
    err = open(os.path.join(job.job_dir, f"{job.id}_0_log.err")).read()
    assert "world size 2" in job.log()  # both ranks were training together
    assert err.strip().splitlines()[-1] == \
        "mocobench pretrain (rank 1): error: RuntimeError: injected fault on rank 1", err[-3000:]
    assert info["ExitCode"] != "0:0"


def test_the_tiny_study_runs_on_slurm_as_a_graph_and_reports_what_the_sequential_run_does(
        cluster, tmp_path):
    """`pipeline --launcher slurm` of the tiny study with 3 inits x 3 seeds: a job per stage and a
    job array per init (a task per trial), each waiting (afterok) only for what it reads; every job
    COMPLETED; `mocobench status` follows it; the report's tables equal those of the same study run
    one stage after another in one process, right before it on this machine."""
    study = ["--config-file", TINY_PIPELINE, "TRANSFER.SEEDS", "3"]
    sequential = tmp_path / "sequential"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "mocobench", "pipeline", *study, "OUTPUT_DIR",
                           str(sequential)], cwd=REPO, env=cluster, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sequential_s = time.time() - t0

    out, job_dir = tmp_path / "graph", tmp_path / "jobs"
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "mocobench", "pipeline", "--launcher", "slurm", "--gpus-per-node",
         "0", "--mem", "2G", "--timeout", "20", "--job-dir", str(job_dir), *study, "OUTPUT_DIR",
         str(out)], cwd=REPO, env=cluster, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = dict(re.findall(r"submitted pipeline stage (\S+) (?:trials \S+ )?as job (?:array )?"
                          r"(\d+)", proc.stdout))
    assert list(ids) == ["data", "pretrain", "supervised", "convert_moco", "convert_supervised",
                         "transfer_moco", "transfer_supervised", "transfer_random", "report"]
    # the batch scripts: an array of 3 per init, dependencies only where data flows
    scripts = {stage: sorted(job_dir.glob(f"{job_id}*_submission.sh"))[0].read_text()
               for stage, job_id in ids.items()}
    for init in ("moco", "supervised", "random"):
        assert "#SBATCH --array=0-2%3" in scripts[f"transfer_{init}"]
    waits = {stage: re.findall(r"#SBATCH --dependency=afterok:(\S+)", script)
             for stage, script in scripts.items()}
    assert waits["transfer_random"] == [ids["data"]]  # nothing from pretraining
    assert waits["transfer_moco"] == [f"{ids['data']}:{ids['convert_moco']}"]
    assert waits["report"] == [":".join(ids[f"transfer_{i}"]
                                        for i in ("moco", "supervised", "random"))]
    status = subprocess.run([sys.executable, "-m", "mocobench", "status", str(out)], cwd=REPO,
                            env=cluster, capture_output=True, text=True, timeout=120).stdout
    assert f"[SLURM {ids['data']} " in status, status

    for stage, job_id in ids.items():  # an array: each of its tasks
        for task in ([f"{job_id}_{i}" for i in range(3)] if stage.startswith("transfer_")
                     else [job_id]):
            Job(cluster, str(job_dir), f"as job {task}").wait(timeout=900)
    graph_s = time.time() - t0
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(stage["status"] == "done" for stage in manifest["stages"].values()), manifest
    status = subprocess.run([sys.executable, "-m", "mocobench", "status", str(out)], cwd=REPO,
                            env=cluster, capture_output=True, text=True, timeout=120).stdout
    assert "seeds finished: moco 3/3, supervised 3/3, random 3/3" in status, status
    assert f"[SLURM {ids['transfer_moco']}_2 COMPLETED]" in status, status
    assert report_tables(out) == report_tables(sequential)
    print(f"\ntiny study, 3 inits x 3 seeds: sequential {sequential_s:.0f} s, as a SLURM graph "
          f"{graph_s:.0f} s (submission to the last job's end)")
