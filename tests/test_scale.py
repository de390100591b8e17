"""Scale out on CPU (gloo, 2 processes): the elastic launcher, torchrun, submitit's requeue, the
sharded kNN bank, DDP lincls, and the cross-rank checks (NaN agreement, resume, replicas). Ports:
the elastic launcher rendezvous on port 0 (the OS picks), the in-test process groups use a
FileStore (no port at all)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from mocobench import launch
from mocobench.utils.errors import UsageError
from mocobench.utils.fileio import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH_CFG = os.path.join(REPO, "configs", "pretrain", "synth_R18_cpu.yaml")
ENV = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def opts(root, out_dir, **extra):
    values = {"DATA.ROOT": root, "OUTPUT_DIR": out_dir, "SOLVER.EPOCHS": 2, "SOLVER.BATCH_SIZE": 16,
              "MOCO.K": 32, "INPUT.SIZE": 32, "DATALOADER.NUM_WORKERS": 0, "KNN.PERIOD": 0,
              "LOG_PERIOD": 2, "CHECKPOINT_PERIOD": 1, "MOCO.SHUFFLE_BN_SPLITS": 2, "DEVICE": "cpu",
              **extra}
    return [str(x) for kv in values.items() for x in kv]


def run(cmd, timeout=240, env=None):
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env or ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def assert_same_checkpoint(path_a, path_b):
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert a["iteration"] == b["iteration"] and a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    return a


# ---------------------------------------------------------------------------- one node, N processes
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_nproc_per_node_2_matches_torchrun_and_writes_one_set_of_files(tiny_imagenet, tmp_path):
    ours, torchrun = str(tmp_path / "ours"), str(tmp_path / "torchrun")
    args = ["--config-file", SYNTH_CFG, *opts(tiny_imagenet, "X", **{"KNN.PERIOD": 1})]
    proc = run([sys.executable, "-m", "mocobench", "pretrain", "--nproc-per-node", "2",
                *[ours if a == "X" else a for a in args]])
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
         "pretrain.train", *[torchrun if a == "X" else a for a in args]])

    # the log's first line says how the run is split; one writer: one log, one metrics stream, one
    # events file
    log = open(os.path.join(ours, "log.txt")).read()
    assert "world size 2 (2 per node) on cpu; global batch 16 = 8 per process; " \
           "BN statistics over 8 images; lr = 0.06 x 16/256 = 0.00375" in log
    assert log.count("saved ") == 2 and proc.stdout.count("saved ") == 2
    files = sorted(os.listdir(ours))
    assert [f for f in files if f.startswith("checkpoint")] == \
        ["checkpoint_0000.pth.tar", "checkpoint_0001.pth.tar"]
    assert {"config.yaml", "last_checkpoint", "log.txt", "metrics.json"} <= set(files)
    assert sum(f.startswith("events.out.tfevents") for f in files) == 1
    # the same layout as torchrun's run (one events file each, named by time and pid)
    assert [f for f in files if not f.startswith("events")] == \
        sorted(f for f in os.listdir(torchrun) if not f.startswith("events"))
    records = [json.loads(line) for line in open(os.path.join(ours, "metrics.json"))]
    # 64 images / 16 per step, 2 epochs
    assert [r["iteration"] for r in records if "loss" in r] == [2, 4, 6, 8]
    # the sharded kNN monitor ran each epoch
    assert [r["epoch"] for r in records if "knn_top1" in r] == [1, 2]

    # bit for bit the run torchrun starts: weights, BN buffers, queue, pointer, optimizer state
    ckpt = assert_same_checkpoint(os.path.join(ours, "checkpoint_0001.pth.tar"),
                                  os.path.join(torchrun, "checkpoint_0001.pth.tar"))
    assert ckpt["iteration"] == 8 and int(ckpt["state_dict"]["module.queue_ptr"]) == (8 * 16) % 32
    # the queue holds every rank's keys: the training checks at every epoch that all ranks hold the
    # same momentum encoder and queue (mocobench.utils.comm.check_replicas_equal); a mismatch would
    # have failed the run
    torch.testing.assert_close(ckpt["state_dict"]["module.queue"].norm(dim=0), torch.ones(32))


def test_launcher_arguments_and_errors(tmp_path, capfd, monkeypatch):
    parser = launch.build_parser("pretrain")
    args, rest = parser.parse_known_args(["--nproc-per-node", "2", "--config-file", "x.yaml",
                                          "--resume", "auto", "SOLVER.EPOCHS", "3"])
    assert args.nproc_per_node == 2 and rest == ["--config-file", "x.yaml", "--resume", "auto",
                                                 "SOLVER.EPOCHS", "3"]
    assert launch.with_resume(["--config-file", "x", "--resume", "a/b.pth", "K", "V"],
                              ("--resume", "auto")) == \
        ["--resume", "auto", "--config-file", "x", "K", "V"]
    assert launch.with_resume(["--resume", "--seeds", "5"], ("--resume",)) == \
        ["--resume", "--seeds", "5"]
    assert launch.default_nproc_per_node(["DEVICE", "cpu"]) == 1
    # what submitit requeues on a timeout: the same command with --resume auto (lincls too: it
    # checkpoints every epoch, on the same engine)
    requeued = launch.StageJob("pretrain", ["--config-file", "x", "K", "V"]).checkpoint()
    assert requeued.function.argv == ["--resume", "auto", "--config-file", "x", "K", "V"]
    requeued = launch.StageJob("lincls", ["--data", "d", "--resume", "x.pth"]).checkpoint()
    assert requeued.function.argv == ["--resume", "auto", "--data", "d"]
    # a pipeline stage's job: requeued as it was, except that a --redo (begun) is not done again
    requeued = launch.StageJob("pipeline", ["--config-file", "x", "--stage", "s", "--redo", "s",
                                            "K", "V"]).checkpoint()
    assert requeued.function.argv == ["--config-file", "x", "--stage", "s", "K", "V"]
    # FLAG=VALUE: that one argument goes, the ones after it stay
    requeued = launch.StageJob("pipeline", ["--config-file", "x", "--redo=s", "--stage", "s",
                                            "K", "V"]).checkpoint()
    assert requeued.function.argv == ["--config-file", "x", "--stage", "s", "K", "V"]
    assert launch.with_resume(["--resume=a/b.pth", "--config-file", "x"], ("--resume", "auto")) \
        == ["--resume", "auto", "--config-file", "x"]
    with pytest.raises(UsageError, match="--nproc-per-node 0"):
        launch.main("pretrain", ["--nproc-per-node", "0", "--config-file", SYNTH_CFG])
    # --nproc-per-node 1 is torchrun's: one process of the elastic launcher (a process group of
    # 1); without it one device trains in this process (no group)
    started = []
    monkeypatch.setattr(launch, "run_elastic", lambda module, argv, nproc: started.append(
        ("elastic", module, nproc)) or 0)
    monkeypatch.setattr(launch, "run_on_this_node", lambda module, argv, nproc: started.append(
        ("this process", module, nproc)) or 0)
    launch.main("pretrain", ["--nproc-per-node", "1", "--config-file", SYNTH_CFG])
    launch.main("pretrain", ["--config-file", SYNTH_CFG, "DEVICE", "cpu"])
    assert started == [("elastic", "pretrain.train", 1), ("this process", "pretrain.train", 1)]
    monkeypatch.undo()
    # a worker's UsageError: exit code 2 from the launcher, the one-line error on stderr, no
    # traceback
    for key in ("PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(key, ENV[key])
    code = launch.run_elastic("pretrain.train", ["--config-file", SYNTH_CFG, "SOLVER.NOPE", "1"],
                              nproc=2)
    err = capfd.readouterr().err
    assert code == 2, err[-2000:]
    assert "mocobench pretrain: error:" in err and "SOLVER.NOPE" in err and "Traceback" not in err


def test_device_cuda_n_is_refused_under_a_launcher(monkeypatch):
    from mocobench.utils.comm import setup_device

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError,
                       match="'cuda:1' with 2 processes would put every rank on the same GPU"):
        setup_device("cuda:1")


# ---------------------------------------------------------------------------- cross-rank mechanisms
class _Normalize(torch.nn.Module):
    def forward(self, images):  # the loader's uint8 images, as pretrain.train's kNN monitor
        from pretrain.augment import normalize

        return normalize(images)


def _features_fn():
    torch.manual_seed(0)
    net = torch.nn.Sequential(_Normalize(), torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()).eval()
    return net


def _knn_inputs(root):
    from pretrain.augment import build_eval_transform
    from pretrain.data import SafeImageFolder

    transform = build_eval_transform(32)
    return (SafeImageFolder(os.path.join(root, "train"), transform),
            SafeImageFolder(os.path.join(root, "val"), transform))


def _rank_worker(rank, world, store, root, out):
    import torch.distributed as dist

    from mocobench.utils import comm
    from mocobench.utils.comm import check_replicas_equal, check_same_resume
    from pretrain.data import build_loader
    from pretrain.knn import extract_features, knn_accuracy, shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    report = {}
    # kNN: each rank extracts its shard (counted at the feature function) and keeps it
    net, seen = _features_fn(), []

    def features(x):
        seen.append(x.shape[0])
        return net(x)

    train_set, val_set = _knn_inputs(root)
    loaders = [build_loader(shard(s), 5, 0, shuffle=False, drop_last=False, seed=0)
               for s in (train_set, val_set)]
    bank, labels = extract_features(features, loaders[0], "cpu")
    report["bank_share"] = sum(seen)
    torch.save({"bank": bank, "labels": labels}, os.path.join(out, f"bank{rank}.pt"))
    report["top1"] = knn_accuracy(net, *loaders, k=5, t=0.1)
    # all_gather_cat keeps NHWC images NHWC (the shuffle-BN gather of channels_last key batches)
    images = (torch.arange(2 * 3 * 2 * 2.0).view(2, 3, 2, 2) + 100 * rank).to(
        memory_format=torch.channels_last)
    gathered = comm.all_gather_cat(images)
    report["gather_nhwc"] = gathered.is_contiguous(memory_format=torch.channels_last)
    report["gather_ok"] = torch.equal(gathered,
                                      torch.cat([images - 100 * rank, images - 100 * rank + 100]))
    # NaN agreement: rank 1 alone sees a NaN, both ranks learn it
    report["agree"] = comm.all_ranks_agree(rank != 1)
    # replicas: equal passes, one differing bit fails on every rank
    check_replicas_equal("queue", [torch.arange(6.0)])
    try:
        check_replicas_equal("queue", [torch.arange(6.0) + (rank == 1)])
    except RuntimeError as e:
        report["replicas"] = str(e)
    # resume: rank 0 found a checkpoint, rank 1 (another node, no shared OUTPUT_DIR) none
    ckpt = os.path.join(out, "fake.pth")
    if rank == 0:
        open(ckpt, "wb").write(b"x")
    try:
        check_same_resume(ckpt if rank == 0 else None, 3 if rank == 0 else 0,
                          12 if rank == 0 else 0)
    except UsageError as e:
        report["resume"] = str(e)
    json.dump(report, open(os.path.join(out, f"rank{rank}.json"), "w"))
    dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_knn_bank_is_sharded_and_equals_one_process_and_ranks_agree(tiny_imagenet, tmp_path):
    from pretrain.data import build_loader
    from pretrain.knn import extract_features, knn_accuracy

    train_set, val_set = _knn_inputs(tiny_imagenet)
    loaders = [build_loader(s, 5, 0, shuffle=False, drop_last=False, seed=0)
               for s in (train_set, val_set)]
    net = _features_fn()
    bank, labels = extract_features(net, loaders[0], "cpu")
    top1 = knn_accuracy(net, *loaders, k=5, t=0.1)

    mp.spawn(_rank_worker, args=(2, str(tmp_path / "store"), tiny_imagenet, str(tmp_path)),
             nprocs=2, join=True)
    reports = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    # 64 train images, half extracted by each rank
    assert [r["bank_share"] for r in reports] == [32, 32]
    for r in range(2):
        kept = torch.load(tmp_path / f"bank{r}.pt")
        # each rank keeps its shard of the bank (images r, r + 2, ...): the top-k is sharded
        torch.testing.assert_close(kept["bank"], bank[r::2], rtol=1e-5, atol=1e-6)
        assert torch.equal(kept["labels"], labels[r::2])
    assert reports[0]["top1"] == reports[1]["top1"] == top1
    assert [r["agree"] for r in reports] == [False, False]
    assert all(r["gather_nhwc"] and r["gather_ok"] for r in reports)
    assert all("queue differs between ranks" in r["replicas"] for r in reports)
    for r in reports:
        assert "ranks resume from different checkpoints" in r["resume"] and \
            "rank 1: no checkpoint" in r["resume"]
        assert "rank 0: epoch 3, iteration 12" in r["resume"]


# ---------------------------------------------------------------------------- a process group of 1
# torchrun's environment of one process: pretrain joins a process group of 1 (gloo on CPU)
ONE_RANK_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}  # port 0: the OS picks, no race
V3_OPTS = ["MOCO.VERSION", "v3", "MOCO.DIM", "16", "MOCO.MLP_DIM", "32", "MOCO.MLP", "False",
           "SOLVER.OPTIMIZER", "sgd", "SOLVER.WARMUP_EPOCHS", "0", "SOLVER.EPOCHS", "1"]


def _caller():
    """'file:function' of the first frame in the project's packages outside comm.py: who asked for
    a collective (torch's frames are skipped wherever the venv lies, in the checkout or not)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.relpath(frame.f_code.co_filename, REPO)
        if (path.split(os.sep)[0] in ("pretrain", "mocobench", "transfer", "convert", "synth")
                and path != os.path.join("mocobench", "utils", "comm.py")):
            return f"{path}:{frame.f_code.co_qualname}"
        frame = frame.f_back
    return "?"


def _one_rank_runs(rank, root, out):
    """MoCo v2 with the kNN monitor (1 epoch, then extended to 2: a resume), and v3 (SyncBN), each
    through pretrain.train.main in torchrun's environment of one process, recording who calls
    which collective and what DDP wraps."""
    import torch.distributed as dist

    from mocobench.utils import comm
    from pretrain import train as train_mod

    os.environ.update(ONE_RANK_ENV)
    torch.set_num_threads(1)
    calls = set()

    def counted(name, real):
        def wrapper(*args, **kwargs):
            calls.add(f"{name} <- {_caller()}")
            return real(*args, **kwargs)
        return wrapper

    for name in ("all_reduce", "broadcast", "all_gather_object", "barrier"):
        setattr(dist, name, counted(name, getattr(dist, name)))
    comm._all_gather_single = counted("all_gather", comm._all_gather_single)
    real_ddp = train_mod.DistributedDataParallel
    train_mod.DistributedDataParallel = lambda module, **kw: (
        calls.add(f"DDP <- {type(module).__name__} in a group of {dist.get_world_size()}"),
        real_ddp(module, **kw))[1]
    v2 = ["--config-file", SYNTH_CFG, *opts(root, os.path.join(out, "v2"), **{
        "SOLVER.EPOCHS": 1, "KNN.PERIOD": 1})]
    assert train_mod.main(v2) == 0
    assert train_mod.main([*v2, "SOLVER.EPOCHS", "2", "--resume", "auto", "--extend"]) == 0
    assert train_mod.main(["--config-file", SYNTH_CFG, *opts(root, os.path.join(out, "v3")),
                           *V3_OPTS]) == 0
    json.dump(sorted(calls), open(os.path.join(out, "calls.json"), "w"), indent=1)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_process_group_of_one_runs_every_collective_and_trains_as_no_group(tiny_imagenet,
                                                                              tmp_path):
    """In torchrun's environment of one process (`--nproc-per-node 1`) pretraining joins a gloo
    group of 1 and every cross-rank path runs, as on N GPUs: DDP, SyncBN (v3), shuffle BN's
    gathers and broadcast, the queue's gather, the folded NaN/stop vote, the stop agreement, the
    kNN monitor's sharded top-k, the replica and resume checks, the barriers. A gather of 1 is the
    identity: the v2 run's weights, queue and optimizer equal a run without a group bit for bit."""
    from pretrain import train as train_mod

    out = str(tmp_path / "group")
    mp.spawn(_one_rank_runs, args=(tiny_imagenet, out), nprocs=1, join=True)
    calls = set(json.load(open(os.path.join(out, "calls.json"))))
    print("\n".join(sorted(calls)))
    expected = {
        "DDP <- ResNet in a group of 1",  # v2's encoder_q, v3's base_encoder
        "DDP <- Sequential in a group of 1",  # v3's predictor
        "broadcast <- pretrain/train.py:MocoTask.wrap",  # rank 0's state
        "barrier <- pretrain/engine.py:train",
        "barrier <- pretrain/resume.py:Checkpointer._save",
        "all_gather <- pretrain/moco.py:batch_shuffle",  # shuffle BN
        "broadcast <- pretrain/moco.py:batch_shuffle",
        "all_gather <- pretrain/moco.py:batch_unshuffle",
        "all_gather <- pretrain/moco.py:MoCo.dequeue_and_enqueue",  # the queue's keys
        "all_gather <- pretrain/moco.py:MoCoV3.contrastive_loss",  # v3's keys of every rank
        "all_reduce <- pretrain/moco.py:_AllReduceSum.forward",  # SyncBN (AllReduceBatchNorm)
        "all_reduce <- pretrain/engine.py:vote",  # NaN + stop vote
        "all_reduce <- mocobench/utils/preempt.py:Preemption.agreed",  # stop after an epoch
        "all_gather_object <- pretrain/train.py:MocoTask.check_replicas",
        "all_gather_object <- pretrain/engine.py:train",  # check_same_resume
        "broadcast <- pretrain/train.py:knn_monitor",  # rank 0's BN statistics
        "all_gather <- pretrain/knn.py:unshard",  # the queries of every rank
        "all_gather <- pretrain/knn.py:sharded_top_k",  # every shard's k nearest
    }
    assert expected <= calls, sorted(expected - calls)
    for name in ("v2", "v3"):
        record = json.load(open(os.path.join(out, name, "topology.json")))
        assert (record["world_size"], record["process_group"]) == (1, "gloo")
        assert "process group gloo" in open(os.path.join(out, name, "log.txt")).read()

    # the same two v2 runs in this process, no group: the same state, bit for bit
    alone = str(tmp_path / "alone")
    v2 = ["--config-file", SYNTH_CFG, *opts(tiny_imagenet, alone, **{
        "SOLVER.EPOCHS": 1, "KNN.PERIOD": 1})]
    assert train_mod.main(v2) == 0
    assert train_mod.main([*v2, "SOLVER.EPOCHS", "2", "--resume", "auto", "--extend"]) == 0
    assert json.load(open(os.path.join(alone, "topology.json")))["process_group"] is None
    a = assert_same_checkpoint(os.path.join(out, "v2", "checkpoint_0001.pth.tar"),
                               os.path.join(alone, "checkpoint_0001.pth.tar"))
    assert a["iteration"] == 8 and int(a["state_dict"]["module.queue_ptr"]) == 8 * 16 % 32
    knn = [[r["knn_top1"] for r in map(json.loads, open(os.path.join(d, "metrics.json")))
            if "knn_top1" in r] for d in (os.path.join(out, "v2"), alone)]
    assert knn[0] == knn[1] and len(knn[0]) == 2


# ---------------------------------------------------------------------------- lincls, SLURM requeue
@pytest.fixture(scope="module")
def reference_run(tiny_imagenet, tmp_path_factory):
    """An uninterrupted 3-epoch single-process run (the reference of the requeue test, the input of
    lincls)."""
    out = str(tmp_path_factory.mktemp("reference"))
    run([sys.executable, "-m", "mocobench", "pretrain", "--config-file", SYNTH_CFG,
         *opts(tiny_imagenet, out, **{"SOLVER.EPOCHS": 3})])
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lincls_on_2_processes_equals_one_process(tiny_imagenet, reference_run, tmp_path):
    from mocobench import cli

    args = ["--data", tiny_imagenet,
            "--pretrained", os.path.join(reference_run, "checkpoint_0002.pth.tar"),
            "--epochs", "2", "--batch-size", "16", "--lr", "1.0", "--workers", "0", "--size", "32",
            "--device", "cpu"]
    assert cli.main(["lincls", *args, "--output", str(tmp_path / "one")]) == 0
    proc = run([sys.executable, "-m", "mocobench", "lincls", "--nproc-per-node", "2", *args,
                "--output", str(tmp_path / "two")])
    assert proc.stdout.count("sanity check passed") == 1  # rank 0 prints and writes
    # the evaluation records, one per epoch (the iteration records hold each rank's own share)
    one, two = ([r for r in map(json.loads, open(tmp_path / d / "metrics.json")) if "val_top1" in r]
                for d in ("one", "two"))
    assert [r["epoch"] for r in one] == [r["epoch"] for r in two] == [1, 2]
    for a, b in zip(one, two, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert (b["train_top1"], b["val_top1"], b["val_top5"]) == \
            (a["train_top1"], a["val_top1"], a["val_top5"])
    results = json.load(open(tmp_path / "two" / "lincls_results.json"))
    assert results["world_size"] == 2
    assert results["top1"] == pytest.approx(one[-1]["val_top1"], abs=1e-6)  # metrics.json rounds


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slurm_launcher_requeues_a_preempted_job_and_resumes_bit_exact(
        tiny_imagenet, reference_run, tmp_path, monkeypatch, capsys):
    from mocobench import cli

    # the real --launcher slurm path; only the executor is submitit's local one instead of sbatch
    monkeypatch.setenv(launch.SUBMITIT_CLUSTER_ENV, "local")
    for key in ("PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(key, ENV[key])
    out, jobs = str(tmp_path / "job"), str(tmp_path / "jobs")
    assert cli.main(["pretrain", "--launcher", "slurm", "--gpus-per-node", "0", "--timeout", "10",
                     "--job-dir", jobs, "--config-file", SYNTH_CFG,
                     *opts(tiny_imagenet, out, **{"SOLVER.EPOCHS": 3})]) == 0
    printed = capsys.readouterr().out
    job_id = printed.split("as job ")[1].split()[0]
    stdout = os.path.join(jobs, f"{job_id}_0_log.out")
    assert f"stdout: {stdout}" in printed and f"tail -f {stdout}" in printed

    deadline = time.time() + 200
    # epoch 1 done: preempt during epoch 2
    while not os.path.exists(os.path.join(out, "last_checkpoint")):
        assert time.time() < deadline, open(stdout).read()[-3000:]
        time.sleep(0.2)
    [task] = _children(int(job_id))
    # what SLURM sends before a timeout / preemption (submitit's signal)
    os.kill(task, signal.SIGUSR2)
    result = os.path.join(jobs, f"{job_id}_0_result.pkl")
    while not os.path.exists(result):
        assert time.time() < deadline, open(stdout).read()[-3000:]
        time.sleep(0.5)
    log = open(stdout).read() + open(os.path.join(jobs, f"{job_id}_0_log.err")).read()
    # the signal reached the training loop's clean stop: an exact mid-epoch checkpoint, then
    # submitit's requeue
    assert "stopped by SIGTERM" in log and "Requeued job" in log and \
        "Job completed successfully" in log
    assert "resumed from " + os.path.join(out, "checkpoint_iter_") in log
    submitted = open(os.path.join(jobs, f"{job_id}_submitted.pkl"), "rb").read()
    assert b"auto" in submitted  # the requeued submission carries --resume auto
    assert_same_checkpoint(os.path.join(reference_run, "checkpoint_0002.pth.tar"),
                           os.path.join(out, "checkpoint_0002.pth.tar"))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_slurm_transfer_job_stopped_by_sigterm_is_requeued_and_finishes(
        synth_root, tmp_path, monkeypatch, capsys):
    """transfer under --launcher slurm: SIGTERM (SLURM's preemption) -> detectron2's loop saves the
    running iteration and exits 143 -> the job requeues itself with --resume and finishes the
    schedule."""
    from mocobench import cli

    monkeypatch.setenv(launch.SUBMITIT_CLUSTER_ENV, "local")
    for key in ("PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(key, ENV[key])
    out, jobs = tmp_path / "transfer", str(tmp_path / "jobs")
    trial = out / "seed0"
    assert cli.main(["transfer", "--launcher", "slurm", "--gpus-per-node", "0", "--timeout", "10",
                     "--job-dir", jobs, "--config-file",
                     os.path.join(REPO, "configs", "detection", "synth_voc_R18_FPN_cpu.yaml"),
                     "--synth-root", synth_root, "SOLVER.MAX_ITER", "12",
                     "SOLVER.CHECKPOINT_PERIOD", "1000", "SOLVER.IMS_PER_BATCH", "2",
                     "DATALOADER.NUM_WORKERS", "0", "MOCOBENCH.LOG_PERIOD", "1",
                     "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64",
                     "TEST.PRECISE_BN.ENABLED", "False", "MODEL.WEIGHTS", "",
                     "MOCOBENCH.REQUIRE_WEIGHTS", "False", "SEED", "3",
                     "OUTPUT_DIR", str(out)]) == 0
    job_id = capsys.readouterr().out.split("as job ")[1].split()[0]
    stdout = os.path.join(jobs, f"{job_id}_0_log.out")
    deadline = time.time() + 300
    while not (trial / "metrics.json").exists() or \
            (trial / "metrics.json").read_text().count('"lr"') < 2:
        assert time.time() < deadline, open(stdout).read()[-3000:]
        time.sleep(0.2)
    [task] = _children(int(job_id))
    os.kill(task, signal.SIGTERM)
    result = os.path.join(jobs, f"{job_id}_0_result.pkl")
    while not os.path.exists(result):
        assert time.time() < deadline, open(stdout).read()[-3000:]
        time.sleep(0.5)
    log = open(stdout).read() + open(os.path.join(jobs, f"{job_id}_0_log.err")).read()
    assert "stopped by SIGTERM after iteration" in log and "Requeued job" in log, log[-3000:]
    assert "Job completed successfully" in log
    saved = sorted(p.name for p in trial.glob("model_0*.pth"))
    assert len(saved) == 1  # the stop's checkpoint (CHECKPOINT_PERIOD is past the schedule)
    assert f"Starting training from iteration {int(saved[0][6:13]) + 1}" in \
        (trial / "log.txt").read_text()
    record = json.loads((trial / "results.json").read_text())
    assert record["resumed"] and record["iteration"] == 12


def test_transfer_launch_errors_come_before_any_process():
    from transfer.config import load_config
    from transfer.launch import check_launch

    cfg = load_config(os.path.join(REPO, "configs", "detection", "tiny_synth_voc_R_50_C4.yaml"),
                      ["MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "6"])
    check_launch(cfg, num_gpus=3)
    check_launch(cfg, num_gpus=3, num_machines=2, dist_url="tcp://10.0.0.1:23456")
    with pytest.raises(UsageError,
                       match=r"SOLVER.IMS_PER_BATCH 6 .* not divisible by the 4 processes"):
        check_launch(cfg, num_gpus=4)
    with pytest.raises(UsageError, match="--dist-url auto .* with --num-machines 2 pass "
                                         "--dist-url tcp://HOST:PORT"):
        check_launch(cfg, num_gpus=3, num_machines=2)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pipeline_runs_pretraining_and_transfer_on_2_processes(tmp_path):
    from mocobench import pipeline

    out = tmp_path / "run"
    tiny = os.path.join(REPO, "configs", "pipeline", "tiny_cpu.yaml")
    assert pipeline.main(["--config-file", tiny, "OUTPUT_DIR", str(out),
                          "PRETRAIN.NPROC_PER_NODE", "2", "TRANSFER.NUM_GPUS", "2",
                          "TRANSFER.INITS", "['moco']", "TRANSFER.SEEDS", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(stage["status"] == "done" for stage in manifest["stages"].values())
    log = (out / "pretrain" / "log.txt").read_text()
    assert "world size 2 (2 per node) on cpu; global batch 16 = 8 per process" in log
    seed = out / "transfer" / "moco" / "seed0"
    assert "2 CPU processes (gloo)" in (seed / "log.txt").read_text() and \
        (seed / "log.txt.rank1").exists()


# ---------------------------------------------------------------------------- the pipeline on SLURM
TINY_PIPELINE = os.path.join(REPO, "configs", "pipeline", "tiny_cpu.yaml")
FAKE_SBATCH = """#!/bin/sh
# what sbatch answers; keeps the submitted script (submitit's own: the #SBATCH lines it wrote)
n=$(($(cat "{state}/count" 2>/dev/null || echo 100) + 1))
echo $n > "{state}/count"
cp "$1" "{state}/job$n.sh"
echo "Submitted batch job $n"
"""


def _sbatch_flags(path):
    flags = {}
    for line in open(path):
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].strip().partition("=")
            flags[key] = value
    return flags


def _fake_slurm(tmp_path, monkeypatch):
    """sbatch and srun replaced by scripts on PATH (sbatch keeps each submitted script in the
    returned folder as jobN.sh); --launcher slurm then takes submitit's real SLURM path."""
    bin_dir, state = tmp_path / "bin", tmp_path / "sbatch"
    bin_dir.mkdir()
    state.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(state=state))
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only looks for it on PATH
    for exe in ("sbatch", "srun"):
        (bin_dir / exe).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.delenv(launch.SUBMITIT_CLUSTER_ENV, raising=False)
    return state


def _srun_line(path):
    return next(line for line in open(path) if line.startswith("srun "))


def _opts_with(opts, *pairs):
    """A stage's OPTS list (KEY VALUE ...) with each KEY of `pairs` (KEY, VALUE, ...) set to its
    VALUE, as a config override."""
    opts = list(opts)
    for key, value in zip(pairs[::2], pairs[1::2]):
        if key in opts:
            opts[opts.index(key) + 1] = value
        else:
            opts += [key, value]
    return repr(opts)


def test_slurm_jobs_ask_for_the_cpus_of_their_loaders_memory_and_end_on_a_failing_task(
        tmp_path, monkeypatch, capsys):
    """The sbatch scripts submitit's SlurmExecutor writes (sbatch and srun replaced by scripts): a
    task per GPU with (NUM_WORKERS + 1) CPUs each, read from the command's config, or one task per
    node with (NUM_WORKERS + 1) x GPUs for transfer; --mem 40G per GPU; an explicit
    --cpus-per-task / --mem wins; --gpus-per-node 0 is a CPU job; each task runs the command
    (StageJob, the pickle submitit wrote); srun ends the step when a task exits non-zero, and the
    batch script prints the failing rank's error last."""
    import submitit

    from mocobench import cli

    state, jobs = _fake_slurm(tmp_path, monkeypatch), tmp_path / "jobs"
    slurm = ["--launcher", "slurm", "--gpus-per-node", "8", "--job-dir", str(jobs / "%j")]
    pretrain = ["--config-file", SYNTH_CFG, "DATA.ROOT", "d", "OUTPUT_DIR", "o",
                "DATALOADER.NUM_WORKERS", "6"]
    transfer = ["--config-file",
                os.path.join(REPO, "configs", "detection", "tiny_synth_voc_R_50_C4.yaml"),
                "MODEL.WEIGHTS", "m.pkl", "DATALOADER.NUM_WORKERS", "4"]
    lincls = ["--data", "d", "--pretrained", "p.pth", "--output", "o", "--workers", "3"]
    # (command line, the argv its tasks run, (tasks per node, GPUs per node, CPUs per task, mem)):
    # transfer is given --num-gpus (a process per GPU; one on a CPU node) unless it has its own
    submissions = [
        (["pretrain", *slurm, *pretrain], pretrain, ("8", "8", "7", "320G")),
        (["transfer", *slurm, *transfer], ["--num-gpus", "8", *transfer], ("1", "8", "40", "320G")),
        (["lincls", *slurm, *lincls], lincls, ("8", "8", "4", "320G")),
        (["pretrain", *slurm, "--cpus-per-task", "12", "--mem", "500G", *pretrain], pretrain,
         ("8", "8", "12", "500G")),
        (["transfer", *slurm, "--cpus-per-task", "16", *transfer], ["--num-gpus", "8", *transfer],
         ("1", "8", "16", "320G")),
        (["transfer", *slurm, "--num-gpus=2", *transfer], ["--num-gpus=2", *transfer],
         ("1", "8", "10", "320G")),
        # a CPU job: no GPU asked for, one process, one GPU's worth of memory
        (["transfer", *slurm, "--gpus-per-node", "0", *transfer], ["--num-gpus", "1", *transfer],
         ("1", "0", "5", "40G"))]
    for i, (argv, task_argv, (tasks, gpus, cpus, mem)) in enumerate(submissions):
        assert cli.main(argv) == 0, argv
        printed = capsys.readouterr().out
        assert f"1 node(s) x {tasks} task(s), {gpus} GPU(s) per node, {cpus} CPU(s) per task, " \
               f"--mem {mem} per node, timeout" in printed, printed
        job_id = str(101 + i)
        script = state / f"job{job_id}.sh"
        flags = _sbatch_flags(script)
        # a CPU job asks for no GPU (no --gpus-per-node line)
        assert (flags["nodes"], flags["ntasks-per-node"], flags.get("gpus-per-node"),
                flags["cpus-per-task"], flags["mem"]) == ("1", tasks, None if gpus == "0" else gpus,
                                                          cpus, mem), argv
        assert "--kill-on-bad-exit=1" in _srun_line(script).split()
        # what every task runs: the callable submitit pickled in the job's folder (JOBS/%j)
        job = submitit.helpers.DelayedSubmission.load(
            jobs / job_id / f"{job_id}_submitted.pkl").function
        assert type(job) is launch.StageJob, (argv, job)
        assert (job.command, job.argv) == (argv[0], task_argv), argv
    assert capsys.readouterr().err == ""
    # bad input of the command is an error before anything is submitted
    assert cli.main(["pretrain", *slurm, *pretrain, "SOLVER.NOPE", "1"]) == 2
    assert "SOLVER.NOPE" in capsys.readouterr().err and not (state / "job108.sh").exists()
    assert cli.main(["pretrain", *slurm, "--cpus-per-task", "0", *pretrain]) == 2
    assert "--cpus-per-task 0: expected >= 1" in capsys.readouterr().err

    # the batch script as SLURM runs it, srun failing (exit 3) after the first failing rank wrote
    # its error line: that line is the job's last, and the job fails with srun's exit code
    script = state / "job101.sh"
    (state / "srun").write_text("#!/bin/sh\necho 'srun: error: node1: task 5: Exited with exit "
                                "code 1' >&2\nexit 3\n")
    (state / "srun").chmod(0o755)
    (jobs / "101").mkdir(parents=True, exist_ok=True)  # --job-dir JOBS/%j: %j is SLURM's job id
    env = {**ENV, "PATH": f"{state}:{ENV['PATH']}", "SLURM_JOB_ID": "101"}
    line = "mocobench pretrain (rank 5): error: RuntimeError: CUDA out of memory."
    (jobs / "101" / "101_error.txt").write_text(line + "\n")
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 3 and proc.stderr.splitlines()[-2:] == [
        "srun: error: node1: task 5: Exited with exit code 1", line], proc.stderr
    (state / "srun").write_text("#!/bin/sh\nexit 0\n")  # success: nothing more, exit 0
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""


def _slurm_task(tmp_path, job_id, tasks, rank):
    """(submitit's job folder, the environment) of task `rank` of a one-node SLURM job, as srun and
    submitit set them."""
    folder = tmp_path / "jobs" / str(job_id)
    folder.mkdir(parents=True)
    return folder, {**ENV, "SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": str(folder),
                    "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NUM_NODES": "1",
                    "SLURM_NTASKS": str(tasks), "SLURM_JOB_NODELIST": "localhost",
                    "SLURM_NODEID": "0", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)}


def test_a_failing_rank_says_its_error_and_the_jobs_last_line_is_it(tmp_path, monkeypatch, capsys):
    """Under a launcher rank 0 alone prints an error that every rank raises alike (bad input, an
    agreed stop); a rank's own error (its shard's bad images) is printed by that rank. In a SLURM
    task the failing rank's one-line error is the task's exception (JobFailed: its log's last line)
    and is kept in the job's folder for the batch script (the first failing rank's); outside a
    submitit job nothing is kept."""
    from mocobench.utils.errors import run_main
    from pretrain.data import TooManyBadImagesError

    def fails(error):
        def main(argv):
            raise error
        return main

    for rank, error, printed in [
            ("0", UsageError("bad key"), "mocobench pretrain: error: bad key\n"),
            ("3", UsageError("bad key"), ""),
            ("3", TooManyBadImagesError("12 of 100 images"),
             "mocobench pretrain (rank 3): error: 12 of 100 images\n")]:
        monkeypatch.setenv("RANK", rank)
        assert run_main("mocobench pretrain", fails(error), []) == 2
        assert capsys.readouterr().err == printed

    # rank 1 of a 2-task SLURM job (per rank: lincls), failing on its input: StageJob in this
    # process, under the environment srun and submitit give the task
    folder, env = _slurm_task(tmp_path, job_id=77, tasks=2, rank=1)
    for key, value in env.items():
        if key.startswith(("SLURM_", "SUBMITIT_")):
            monkeypatch.setenv(key, value)
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                "LOCAL_WORLD_SIZE"):  # the task exports the env:// variables: unset them after
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    warning = launch._submitit_signal()
    previous = signal.getsignal(warning)  # the task handles submitit's warning signal
    lines = []
    try:
        for name in ("missing.pth", "other.pth"):  # the first failing rank's line stays
            argv = ["--data", "d", "--pretrained", str(tmp_path / name), "--output", "o"]
            lines.append(f"mocobench lincls (rank 1): error: checkpoint '{tmp_path / name}' "
                         "does not exist")
            with pytest.raises(launch.JobFailed) as e:
                launch.StageJob("lincls", argv)()
            assert str(e.value) == lines[-1]
            assert (folder / "77_error.txt").read_text() == lines[0] + "\n"
    finally:
        signal.signal(warning, previous)
    # outside a submitit job there is no job folder: nothing is kept, nothing raised
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    launch._record_failure("mocobench lincls: error: not in a job")
    assert os.listdir(folder) == ["77_error.txt"]


# a SLURM task's handler for submitit's warning signal as submitit installs it (requeue, then
# sys.exit(-1) on rank 0), then StageJob running a command whose main is `main`
WARNING_TASK = """
import os, signal, sys
import pretrain.lincls
from mocobench.launch import StageJob

def submitit_requeue(signum, frame):
    print("requeued", flush=True)
    sys.exit(-1)

signal.signal(signal.SIGUSR2, submitit_requeue)
pretrain.lincls.main = {main}
StageJob("lincls", [])()
os.kill(os.getpid(), signal.SIGUSR2)  # a late warning: the command has ended
print("alive after the warning", flush=True)
"""


@pytest.mark.parametrize("main,code,stdout", [
    # before the training loop: submitit requeues at once; no failure is kept for the job
    ("lambda argv: os.kill(os.getpid(), signal.SIGUSR2)", 255, "requeued\n"),
    # after the command ended: nothing requeues, nothing kills the finished task
    ("lambda argv: 0", 0, "alive after the warning\n")])
def test_submitits_warning_outside_the_loop_requeues_without_a_failure_and_is_ignored_after_it(
        tmp_path, main, code, stdout):
    folder, env = _slurm_task(tmp_path, job_id=78, tasks=1, rank=0)
    proc = subprocess.run([sys.executable, "-c", WARNING_TASK.format(main=main)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (code, stdout), proc.stderr[-3000:]
    assert "JobFailed" not in proc.stderr and not (folder / "78_error.txt").exists()


def _gpu_cluster_study(out):
    """The tiny study's config and overrides as a GPU cluster runs it: 2 nodes, 8 pretraining
    processes, loader workers, the stages not pinned to the CPU (DEVICE "": CUDA there), MoCo and
    random init."""
    from mocobench.pipeline.config import load_pipeline_config

    tiny = load_pipeline_config(TINY_PIPELINE, [])
    return ["--config-file", TINY_PIPELINE, "OUTPUT_DIR", str(out), "NUM_NODES", "2",
            "PRETRAIN.NPROC_PER_NODE", "8",
            "PRETRAIN.OPTS", _opts_with(tiny.PRETRAIN.OPTS, "DATALOADER.NUM_WORKERS", "6",
                                        "DEVICE", ""),
            "TRANSFER.OPTS", _opts_with(tiny.TRANSFER.OPTS, "DATALOADER.NUM_WORKERS", "4",
                                        "MODEL.DEVICE", "cuda"),
            "TRANSFER.INITS", "['moco', 'random']"]


def test_pipeline_on_slurm_submits_a_job_per_stage_chained_with_afterok(
        tmp_path, monkeypatch, capsys):
    """The real SLURM path of submitit (sbatch scripts written by its SlurmExecutor), with sbatch
    and srun replaced by scripts: each stage its own job with its own resources (nodes, GPUs, the
    CPUs of its loaders, memory), each after the previous one."""
    import submitit

    from mocobench import cli

    state = _fake_slurm(tmp_path, monkeypatch)
    out, jobs = tmp_path / "run", tmp_path / "jobs"
    assert cli.main(["pipeline", "--launcher", "slurm", "--gpus-per-node", "4", "--partition", "P",
                     "--timeout", "600", "--job-dir", str(jobs), "--max-concurrent", "1",
                     *_gpu_cluster_study(out), "--redo", "transfer_moco"]) == 0
    printed = capsys.readouterr().out
    stages = ["data", "pretrain", "convert_moco", "transfer_moco", "transfer_random", "report"]
    ids = [str(101 + i) for i in range(len(stages))]
    for stage, job_id in zip(stages, ids):
        if stage.startswith("transfer_"):  # a job array, a task per trial (TRANSFER.SEEDS 2)
            assert f"submitted pipeline stage {stage} trials 0-1 as job array {job_id} (2 " \
                   f"task(s)" in printed
        else:
            assert f"submitted pipeline stage {stage} as job {job_id} " in printed
            assert f"tail -f {jobs / f'{job_id}_0_log.out'}" in printed
    assert f"follow them: squeue -j {','.join(ids)}; mocobench status {out}" in printed
    # the SLURM ids are kept for `mocobench status`; nothing has run
    assert json.loads((out / "manifest.json").read_text())["slurm"]["jobs"] == {
        "data": "101", "pretrain": "102", "convert_moco": "103", "transfer_moco/seed0": "104_0",
        "transfer_moco/seed1": "104_1", "transfer_random/seed0": "105_0",
        "transfer_random/seed1": "105_1", "report": "106"}
    assert not (out / "pretrain").exists()

    flags = [_sbatch_flags(state / f"job{job_id}.sh") for job_id in ids]
    assert [f["job-name"] for f in flags] == [f"mocobench-pipeline-{s}" for s in stages]
    # each job waits only for the jobs whose outputs it reads: the random-init trials for the data
    # alone, the report for both arrays (all their tasks)
    waits = {s: f.get("dependency") for s, f in zip(stages, flags)}
    assert waits == {"data": None, "pretrain": "afterok:101", "convert_moco": "afterok:102",
                     "transfer_moco": "afterok:101:103", "transfer_random": "afterok:101",
                     "report": "afterok:104:105"}
    assert all(f["kill-on-invalid-dep"] == "yes" for f in flags[1:])
    # --max-concurrent 1: one trial of an array at a time
    assert [f.get("array") for f in flags] == [None, None, None, "0-1%1", "0-1%1", None]
    # the stages that train span NUM_NODES nodes with their own process counts; the others: one
    # node, no GPU
    # node, no GPU. One task per node, which starts a process per GPU: (NUM_WORKERS + 1) x GPUs
    # CPUs from the stage's config (pretrain 7 x 8, transfer 5 x 4), 40G of memory per GPU
    resources = {s: (f["nodes"], f.get("gpus-per-node"), f["ntasks-per-node"], f["cpus-per-task"],
                     f["mem"]) for s, f in zip(stages, flags)}
    assert resources == {"data": ("1", None, "1", "1", "40G"),
                         "pretrain": ("2", "8", "1", "56", "320G"),
                         "convert_moco": ("1", None, "1", "1", "40G"),
                         "transfer_moco": ("2", "4", "1", "20", "160G"),
                         "transfer_random": ("2", "4", "1", "20", "160G"),
                         "report": ("1", None, "1", "1", "40G")}
    assert "submitted pipeline stage pretrain as job 102 (slurm: 2 node(s), 8 GPU(s) per node, " \
           "56 CPU(s) per task, --mem 320G per node, timeout 600 min, after job 101)" in printed
    assert all(f["partition"] == "P" and f["time"] == "600" for f in flags)
    assert all("--kill-on-bad-exit=1" in _srun_line(state / f"job{job_id}.sh").split()
               for job_id in ids)
    # each job runs its own stage (a task: its trial) of the same pipeline through the manifest
    for stage, job_id in zip(stages, ids):
        tasks = ([f"{job_id}_{i}" for i in range(2)] if stage.startswith("transfer_")
                 else [job_id])
        for task, name in enumerate(tasks):
            job = submitit.helpers.DelayedSubmission.load(
                jobs / f"{name}_submitted.pkl").function
            trial = ["--trial", str(task)] if stage.startswith("transfer_") else []
            assert job.command == "pipeline" and \
                job.argv[:4 + len(trial)] == ["--config-file", TINY_PIPELINE, "--stage", stage,
                                              *trial]
            assert job.argv[-2:] == ["OUTPUT_DIR", str(out)]
            # --redo goes to its stage's jobs only
            assert ("--redo" in job.argv) == (stage == "transfer_moco")


def test_pipeline_dry_run_on_slurm_says_what_each_job_would_ask_for_and_submits_nothing(
        tmp_path, monkeypatch, capsys):
    """`--launcher slurm --dry-run`: after the preflight, a line per job it would submit (a stage,
    or a transfer stage's array) with its nodes, GPUs, the CPUs of its stage's config (no
    --cpus-per-task), --mem and the stages it waits for; nothing written, nothing submitted, no
    sbatch needed."""
    from mocobench import cli

    # git alone on PATH (the pipeline records its source's commit): no sbatch, no srun
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "git").symlink_to(shutil.which("git"))
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv(launch.SUBMITIT_CLUSTER_ENV, raising=False)
    out, jobs = tmp_path / "run", tmp_path / "jobs"
    argv = ["pipeline", "--launcher", "slurm", "--gpus-per-node", "4", "--job-dir", str(jobs),
            *_gpu_cluster_study(out)]
    # the same command without --dry-run cannot submit here
    assert cli.main(argv) == 2
    assert "submitit cannot use cluster 'slurm' here" in capsys.readouterr().err
    assert cli.main([*argv, "--dry-run"]) == 0
    printed = capsys.readouterr()
    # (NUM_WORKERS + 1) x GPUs CPUs: pretrain 7 x 8, transfer 5 x 4; 40G per GPU (one without)
    cpu_job = "1 node(s), 0 GPU(s) per node, 1 CPU(s) per task, --mem 40G per node"
    transfer = "2 node(s), 4 GPU(s) per node, 20 CPU(s) per task, --mem 160G per node"
    assert [line for line in printed.out.splitlines() if line.startswith("would submit")] == [
        f"would submit data as a job: {cpu_job}",
        "would submit pretrain as a job: 2 node(s), 8 GPU(s) per node, 56 CPU(s) per task, "
        "--mem 320G per node, after data",
        f"would submit convert_moco as a job: {cpu_job}, after pretrain",
        f"would submit transfer_moco as an array of 2 trial(s): {transfer}, after convert_moco, "
        "data",
        f"would submit transfer_random as an array of 2 trial(s): {transfer}, after data",
        f"would submit report as a job: {cpu_job}, after transfer_moco, transfer_random"]
    assert "submitted" not in printed.out and printed.err == ""
    assert not out.exists() and not jobs.exists()


def test_num_nodes_and_single_stage_errors(tmp_path, capsys):
    from mocobench import cli

    base = ["pipeline", "--config-file", TINY_PIPELINE, "OUTPUT_DIR", str(tmp_path / "run")]
    cases = [
        (["NUM_NODES", "2"], f"{TINY_PIPELINE}: NUM_NODES 2: stage pretrain spans 2 nodes, which "
                             "needs a launcher that starts it on each: mocobench pipeline "
                             "--launcher slurm"),
        (["--stage", "transfer_moco", "NUM_NODES", "2"],
         "NUM_NODES 2: stage transfer_moco spans 2 nodes"),
        (["NUM_NODES", "0"], "NUM_NODES = 0 must be >= 1"),
        (["--stage", "pretrian"],
         "--stage pretrian: not a stage of this pipeline; stages: data, pretrain"),
        (["--stage", "report", "--redo", "pretrain"],
         "--redo pretrain with --stage report: a single-stage run"),
        (["--stage", "data", "--num-machines", "2", "--dist-url", "tcp://h:1"],
         "--num-machines 2: stage data runs on 1 machine(s)"),
        (["--stage", "pretrain", "--num-machines", "2", "NUM_NODES", "2"],
         "--dist-url auto with --num-machines 2"),
        (["--stage", "convert_moco"],
         "--stage convert_moco: the earlier stage data is not done (run)"),
        (["--launcher", "slurm", "--nodes", "2"],
         "--nodes 2: the pipeline's stages take their node count from its config (NUM_NODES 2)"),
        (["--launcher", "slurm", "--stage", "data"],
         "--stage / --num-machines with --launcher slurm"),
    ]
    for extra, expected in cases:
        assert cli.main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1 and \
            err.startswith("mocobench pipeline: error:"), err
    assert not (tmp_path / "run").exists()  # nothing written


def test_transfer_on_two_slurm_nodes_takes_its_place_from_submitit(monkeypatch):
    """What SLURM exports to the task on each node of a 2-node job, read by submitit's own
    JobEnvironment."""
    import submitit

    from transfer.run import build_parser

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "2",
                       "SLURM_JOB_NODELIST": "gpu-node[07-08]", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(key, value)
    argv = ["--num-gpus", "8", "--config-file", "x.yaml", "--seeds", "5", "MODEL.WEIGHTS", "m.pkl"]
    places = []
    for node in (0, 1):
        monkeypatch.setenv("SLURM_NODEID", str(node))
        monkeypatch.setenv("SLURM_PROCID", str(node))
        env = submitit.JobEnvironment()
        node_argv = launch.StageJob("transfer", argv)._node_argv(env)
        assert node_argv[6:] == argv
        # a pipeline stage: the same place
        assert launch.StageJob("pipeline", argv)._node_argv(env) == node_argv
        args = build_parser().parse_args(node_argv)
        places.append((args.num_machines, args.machine_rank, args.dist_url, args.num_gpus))
    (m0, r0, url0, g0), (m1, r1, url1, g1) = places
    assert (m0, r0, m1, r1, g0, g1) == (2, 0, 2, 1, 8, 8)
    # machine 0's host, one port for the whole job
    assert url0 == url1 and url0.startswith("tcp://gpu-node07:")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    assert launch.StageJob("transfer", argv)._node_argv(submitit.JobEnvironment()) == argv


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pipeline_on_slurm_runs_each_stage_as_its_own_job_in_order_and_a_resubmission_skips_done_stages(  # noqa: E501
        tmp_path, monkeypatch, capsys):
    from mocobench import cli

    # the real --launcher slurm path; only the executor is submitit's local one (it runs the chain
    # in order)
    monkeypatch.setenv(launch.SUBMITIT_CLUSTER_ENV, "local")
    out, jobs = tmp_path / "run", tmp_path / "jobs"
    argv = ["pipeline", "--launcher", "slurm", "--gpus-per-node", "0", "--timeout", "10",
            "--job-dir", str(jobs), "--config-file", TINY_PIPELINE, "OUTPUT_DIR", str(out),
            "TRANSFER.INITS", "['moco']", "TRANSFER.SEEDS", "1"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    stages = ["data", "pretrain", "convert_moco", "transfer_moco", "report"]
    assert "submitting 5 job(s) (5 task(s)), each after the jobs whose outputs it reads" in printed
    # (submitit's local executor runs an array's task as a job of its own)
    ids = [re.search(rf"submitted pipeline stage {stage} (trials 0-0 )?as job (array )?(\d+)",
                     printed).group(3) for stage in stages]
    assert len(set(ids)) == len(stages)  # a job (a process of its own) per stage and trial
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["stages"]) == stages and \
        all(s["status"] == "done" for s in manifest["stages"].values())
    # what each job found done in the manifest first: only the stages whose outputs it reads,
    # directly or not; then its own stage, or its trial
    reads = {"data": [], "pretrain": ["data"], "convert_moco": ["data", "pretrain"],
             "transfer_moco": ["data", "pretrain", "convert_moco"], "report": stages[:-1]}
    for i, (stage, job_id) in enumerate(zip(stages, ids)):
        log = (jobs / f"{job_id}_0_log.out").read_text()
        own = (f"=== [{i + 1}/5] transfer_moco: trial 0 of 1 (transfer_moco/seed0)"
               if stage == "transfer_moco" else f"=== [{i + 1}/5] {stage} | pipeline elapsed")
        assert own in log, log[-2000:]
        assert all(f"] {earlier}: done earlier" in log for earlier in reads[stage])
        assert not any(re.search(rf"=== \[\d/5\] {other}\b", log) for other in stages
                       if other not in reads[stage] and other != stage), log[-2000:]
    assert (out / "report.md").exists()

    # submitted again: the manifest says what is done; only the report (always redone) gets a job
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "submitting 1 job(s)" in printed and printed.count("submitted pipeline stage ") == 1
    assert "submitted pipeline stage report as job" in printed
    again = json.loads((out / "manifest.json").read_text())["stages"]
    assert all(again[s]["started"] == manifest["stages"][s]["started"] for s in stages[:-1])


def _job_id_with_a_free_port():
    """A SLURM job id whose port (StageJob derives it from the id, the same on every node) is free
    here."""
    import random
    import socket

    job_id = 4242
    while True:
        with socket.socket() as s:
            if s.connect_ex(("localhost", random.Random(str(job_id)).randint(20000, 60000))) != 0:
                return job_id
        job_id += 1


def _run_on_two_simulated_slurm_nodes(command, argv, job_id, tmp_path):
    """StageJob(command, argv) in the two tasks of a 2-node SLURM job, as submitit runs it, both on
    this machine (node list "localhost"); SLURM's variables as SLURM sets them. Returns the two
    logs."""
    code = ("import sys; from mocobench.launch import StageJob; "
            f"StageJob({command!r}, sys.argv[1:])()")
    procs = []
    for node in (0, 1):
        env = {**ENV, "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": str(job_id),
               "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost",
               "SLURM_NODEID": str(node), "SLURM_PROCID": str(node), "SLURM_LOCALID": "0"}
        procs.append(subprocess.Popen([sys.executable, "-c", code, *argv], cwd=REPO, env=env,
                                      text=True, stdout=open(tmp_path / f"node{node}.log", "w"),
                                      stderr=subprocess.STDOUT))
    logs = []
    for node, proc in enumerate(procs):
        rc = proc.wait(timeout=540)  # 100-180 s on 2 loaded cores
        logs.append((tmp_path / f"node{node}.log").read_text())
        assert rc == 0, logs[-1][-3000:]
    return logs


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_transfer_job_on_two_simulated_slurm_nodes_trains_as_one_world(synth_root, tmp_path):
    """Two tasks of a 2-node SLURM job (both on this machine, node list "localhost"): each runs the
    transfer job as submitit would (StageJob), takes its machine rank from submitit's
    JobEnvironment, and the two form one gloo world of 2 processes that trains and evaluates
    once."""
    job_id = _job_id_with_a_free_port()
    out = tmp_path / "run"
    config = os.path.join(REPO, "configs", "detection", "synth_voc_R18_FPN_cpu.yaml")
    argv = ["--num-gpus", "1", "--config-file", config,
            "--synth-root", synth_root, "MODEL.WEIGHTS", "", "MOCOBENCH.REQUIRE_WEIGHTS", "False",
            "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
            "SOLVER.STEPS", "()", "DATALOADER.NUM_WORKERS", "0", "TEST.PRECISE_BN.ENABLED", "False",
            "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MIN_SIZE_TEST", "96", "SEED", "0",
            "OUTPUT_DIR", str(out)]
    _run_on_two_simulated_slurm_nodes("transfer", argv, job_id, tmp_path)
    record = json.loads((out / "seed0" / "results.json").read_text())
    assert record["world_size"] == 2 and record["iteration"] == 2
    log = (out / "seed0" / "log.txt").read_text()
    # rank 1: machine 1
    assert "2 CPU processes (gloo)" in log and (out / "seed0" / "log.txt.rank1").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pipeline_pretrain_stage_spans_num_nodes_under_slurm(tmp_path):
    """NUM_NODES 2: the pretrain stage's job on two simulated SLURM nodes (both here) rendezvous as
    one world of 2 processes (1 per node); machine 0 records the stage in the manifest."""
    from mocobench import pipeline

    out = tmp_path / "run"
    argv = ["--config-file", TINY_PIPELINE, "OUTPUT_DIR", str(out), "TRANSFER.INITS", "['moco']",
            "NUM_NODES", "2", "PRETRAIN.NPROC_PER_NODE", "1"]
    assert pipeline.main([*argv, "--stage", "data"]) == 0  # a one-node stage; its job ran before
    logs = _run_on_two_simulated_slurm_nodes("pipeline", [*argv, "--stage", "pretrain"],
                                             _job_id_with_a_free_port(), tmp_path)
    assert all("=== [2/5] pretrain | pipeline elapsed" in log and "stage pretrain finished" in log
               for log in logs)
    stage = json.loads((out / "manifest.json").read_text())["stages"]["pretrain"]
    assert stage["status"] == "done" and os.path.isfile(stage["outputs"]["checkpoint"])
    log = (out / "pretrain" / "log.txt").read_text()
    assert "world size 2 (1 per node) on cpu; global batch 16 = 8 per process" in log
