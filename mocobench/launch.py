"""Where a command's processes run: this process, every GPU of this node, several nodes, or a SLURM
cluster.

    mocobench pretrain --config-file X.yaml ...       every visible GPU of this node (1 on CPU)
    mocobench pretrain --nproc-per-node 8 --nnodes 2 --node-rank R --rdzv-endpoint HOST:PORT ...
    mocobench pretrain --launcher slurm --nodes 2 --gpus-per-node 8 --partition P --timeout 4320 ...

Processes are started by torch's elastic launcher (`torch.distributed.run`, the engine behind
torchrun: the options mean what torchrun's mean, and `torchrun -m pretrain.train ...` gives the same
run); SLURM jobs are submitted with submitit (the launcher of the MoCo v3, DeiT and MAE codebases;
`pip install -e '.[slurm]'`). A timed-out or preempted SLURM job checkpoints and requeues itself
with the command's resume flag (`--resume auto` for pretraining); a requeued pipeline continues from
its manifest.

This is the top floor: the stages know nothing of it; they read the env:// variables their launcher
exports.
"""
import argparse
import importlib
import os
import shlex
import signal
import sys

from mocobench.cli import COMMANDS
from mocobench.utils.errors import CommandFailed, UsageError, error_line
from mocobench.utils.preempt import REQUEUE_EXIT_CODES, Preemption, SignalHandlers

# Tests only: run the real `--launcher slurm` path on submitit's local executor ("local") instead of
# sbatch.
SUBMITIT_CLUSTER_ENV = "MOCOBENCH_SUBMITIT_CLUSTER"

# --mem when not given, per node: 40 GB per GPU (one GPU's worth without a GPU), what the submitit
# launchers of MoCo v3, DeiT and MAE ask for (mem_gb=40 * num_gpus_per_node). Without a request
# SLURM gives the partition's DefMemPerCPU / DefMemPerNode (often a few GB per CPU: too little for
# 8 GPUs' loaders) or, with none set, the whole node
MEM_PER_GPU_GB = 40
# srun ends the whole step when a task exits non-zero: a failing rank ends the job at once instead
# of leaving the others blocked in a collective for the process group's timeout (60 min)
SRUN_ARGS = ("--kill-on-bad-exit=1",)


def build_parser(command):
    spec = COMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"mocobench {command}", add_help=False,
                                     allow_abbrev=False)
    if spec.per_rank:
        group = parser.add_argument_group("processes (torchrun's options and meaning)")
        group.add_argument("--nproc-per-node", type=int, default=None,
                           help="processes on this node (default: every visible CUDA device; "
                                "1 without CUDA)")
        group.add_argument("--nnodes", default="1", help="nodes (or MIN:MAX for elastic jobs)")
        group.add_argument("--node-rank", type=int, default=0)
        group.add_argument("--rdzv-endpoint", default="",
                           help="HOST:PORT every node reaches (several nodes); "
                                "default: a free local port")
        group.add_argument("--rdzv-id", default="mocobench",
                           help="the job's id, the same on every node")
    group = parser.add_argument_group("SLURM (submitit)")
    group.add_argument("--launcher", choices=("local", "slurm"), default="local",
                       help="local: this node (default); "
                            "slurm: submit a job with the options below")
    group.add_argument("--nodes", type=int, default=1)
    group.add_argument("--gpus-per-node", type=int, default=8,
                       help="also the processes (tasks) per node")
    # CPU tests
    group.add_argument("--tasks-per-node", type=int, default=None, help=argparse.SUPPRESS)
    group.add_argument("--cpus-per-task", type=int, default=None,
                       help="default: a CPU per DataLoader worker + 1 per process of the task, "
                            "from the command's config: (NUM_WORKERS + 1) for a task per GPU "
                            "(pretrain, supervised: DATALOADER.NUM_WORKERS; lincls: --workers), "
                            "(NUM_WORKERS + 1) x GPUs for transfer (one task per node that "
                            "starts a process per GPU) and each pipeline stage")
    group.add_argument("--partition", default=None)
    group.add_argument("--timeout", type=int, default=72 * 60, metavar="MINUTES",
                       help="the job's time limit; "
                            "before it, the job checkpoints and requeues itself")
    group.add_argument("--signal-delay", type=int, default=120, metavar="SECONDS",
                       help="SLURM sends the warning signal (USR2) this long before the time "
                            "limit: the time the job has to checkpoint and requeue itself")
    group.add_argument("--account", default=None)
    group.add_argument("--qos", default=None)
    group.add_argument("--constraint", default=None, help="e.g. volta32gb")
    group.add_argument("--mem", default=None,
                       help=f"SLURM --mem (per node), e.g. 400G; default: {MEM_PER_GPU_GB}G x "
                            "GPUs per node (at least one GPU's worth), as the MoCo v3 / DeiT / MAE "
                            "submitit launchers ask; 0: all of the node's memory")
    group.add_argument("--comment", default=None)
    group.add_argument("--max-concurrent", type=int, default=None, metavar="N",
                       help="pipeline: at most N tasks of a job array (a transfer stage's trials) "
                            "running at once (SLURM --array=...%%N); default: no cap")
    group.add_argument("--job-dir", default="slurm_jobs/%j",
                       help="submitit's folder: logs and job pickles")
    return parser


def main(command, argv) -> int:
    """`mocobench COMMAND [launch options] [the command's own arguments]`."""
    spec = COMMANDS[command]
    parser = build_parser(command)
    args, rest = parser.parse_known_args(argv)
    # the launch options, then the command's own (from its parser)
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        print()
        return int(importlib.import_module(spec.module).main(rest) or 0)
    if "--print-config" in rest:  # one process prints, here: nothing is launched or submitted
        return int(importlib.import_module(spec.module).main(rest) or 0)
    if args.launcher == "slurm":
        submit(command, args, rest)
        return 0
    if not spec.per_rank:
        return int(importlib.import_module(spec.module).main(rest) or 0)
    if args.nproc_per_node is None and args.nnodes == "1":
        return run_on_this_node(spec.module, rest, default_nproc_per_node(rest))
    # --nproc-per-node N, 1 included, means torchrun's: N processes of the elastic launcher in a
    # process group (DDP, SyncBN, the gathers and votes run; one GPU's smoke test of them)
    nproc = (args.nproc_per_node if args.nproc_per_node is not None
             else default_nproc_per_node(rest))
    if nproc < 1:
        raise UsageError(f"--nproc-per-node {nproc}: expected >= 1")
    if args.nnodes == "1":
        return run_elastic(spec.module, rest, nproc)
    return run_elastic(spec.module, rest, nproc, args.nnodes, args.node_rank, args.rdzv_endpoint,
                       args.rdzv_id)


def default_nproc_per_node(argv=()) -> int:
    """Every visible CUDA device; 1 without CUDA or when the command pins the CPU (DEVICE /
    MODEL.DEVICE / --device cpu)."""
    import torch

    pins_cpu = any(a in ("DEVICE", "MODEL.DEVICE", "--device") and b == "cpu"
                   for a, b in zip(argv, argv[1:]))
    return torch.cuda.device_count() if torch.cuda.is_available() and not pins_cpu else 1


def run_on_this_node(module, argv, nproc) -> int:
    """MODULE.main(ARGV) on `nproc` processes of this node: in this process when 1 (no launcher in
    the way), else through the elastic launcher. Returns the exit code. (`mocobench pretrain` and
    the pipeline.)"""
    if nproc < 1:
        raise UsageError(f"--nproc-per-node {nproc}: expected >= 1")
    if nproc == 1:
        return int(importlib.import_module(module).main(argv) or 0)
    return run_elastic(module, argv, nproc)


def run_elastic(module, argv, nproc, nnodes="1", node_rank=0, rdzv_endpoint="",
                rdzv_id="mocobench") -> int:
    """`torchrun --nproc-per-node N [--nnodes ...] -m MODULE ARGV` through torch's own code; returns
    the exit code of the first process that failed (2 for a UsageError), 0 when all succeed. One
    node without an endpoint rendezvous on localhost port 0 (the OS picks a free one: no port
    race); several nodes need one (UsageError, before anything starts).

    SIGTERM / SIGUSR1 / SIGINT to this process are handed on to the workers, which stop cleanly
    (mocobench.utils.preempt: finish the iteration, save, exit 143 / 138 / 130); the agent keeps
    watching them and the command ends with their exit code (see _StopForwarder)."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, parse_min_max_nnodes, run

    from mocobench.utils.preempt import EXIT_CODES, SIGNALS, signal_name

    try:
        _, max_nodes = parse_min_max_nnodes(str(nnodes))
    except (RuntimeError, ValueError):
        raise UsageError(f"--nnodes {nnodes}: expected N or MIN:MAX") from None
    if max_nodes > 1 and not rdzv_endpoint:
        raise UsageError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT: a free port on one "
                         "of the nodes that every node reaches, the same on every node (e.g. "
                         "--rdzv-endpoint node0:29500)")
    torchrun_argv = ["--nproc-per-node", str(nproc), "--nnodes", str(nnodes),
                     "--node-rank", str(node_rank),
                     # how often the agent polls its workers (torchrun's default: 0.1-5 s)
                     "--monitor-interval", "0.5",
                     # the agent's own signal handling (raise, shut the workers down with that
                     # signal, exit with a traceback) only for the signals that no worker stops on
                     "--signals-to-handle", ",".join(
                         s for s in _TORCHRUN_SIGNALS if getattr(signal, s) not in SIGNALS)]
    if rdzv_endpoint:
        torchrun_argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint,
                          "--rdzv-id", rdzv_id]
    with _StopForwarder(SIGNALS) as stops:
        try:
            run(get_args_parser().parse_args([*torchrun_argv, "-m", module, *argv]))
        except ChildFailedError as e:
            rank, failure = e.get_first_failure()
            code = failure.exitcode if failure.exitcode > 0 else 1
            if stops.forwarded and failure.exitcode != EXIT_CODES[stops.forwarded]:
                # torch's own report is silenced once the stop is handed on: say it here
                how = (f"exit code {failure.exitcode}" if failure.exitcode > 0
                       else f"killed by {signal_name(-failure.exitcode)}")
                raise CommandFailed(f"{signal_name(stops.forwarded)} handed on to the workers: "
                                    f"rank {rank} (pid {failure.pid}) ended with {how}",
                                    code) from None
            return code
        except SignalException as e:  # no worker was running, or a signal torch handles
            why = ("with no worker running" if e.sigval in SIGNALS
                   else "(torch elastic shut the workers down)")
            raise CommandFailed(f"stopped by {signal_name(e.sigval)} {why}: nothing new saved",
                                128 + int(e.sigval), is_error=False) from None
    return 0


# torchrun's default --signals-to-handle
_TORCHRUN_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


class _StopForwarder(SignalHandlers):
    """While torch's elastic agent runs the workers: the stop signals (SIGTERM, SIGUSR1, SIGINT)
    that reach this process are handed on to every worker, as torch's own shutdown sends a signal
    (to the worker's process group: each worker leads its own session), and nothing more: the
    agent keeps watching the workers, which finish their iteration, save and exit with 128 + N;
    the command then ends with their code. (torch's own handling would raise in the agent, give the
    workers its shutdown timeout, then exit 1 with a traceback, and it does not handle SIGUSR1 at
    all: the launcher died and left the workers running.) A second Ctrl-C is handed on too (the
    workers stop at once). Once a stop is handed on, torch's log lines about the workers' "failure"
    are silenced (run_elastic reports an unexpected end itself). With no worker to hand it to
    (before they start, after they end), the signal ends the agent as torch's own handler does
    (SignalException)."""

    def __init__(self, signals):
        super().__init__(signals)
        self.forwarded = None  # the first signal handed on
        self._quieted = []

    def __exit__(self, *exc):
        super().__exit__(*exc)
        for logger in self._quieted:
            logger.removeFilter(_drop_record)
        self._quieted.clear()
        return False

    def _handle(self, signum, frame):
        from torch.distributed.elastic.multiprocessing import SignalException

        workers = _worker_pids()
        if not workers:
            raise SignalException(f"Process {os.getpid()} got signal: {signum}",
                                  sigval=signal.Signals(signum))
        if self.forwarded is None:
            self.forwarded = int(signum)
            self._quiet_torch_elastic()
        for pid in workers:
            try:
                os.killpg(pid, signum)
            except (ProcessLookupError, PermissionError):  # it has just ended
                pass

    def _quiet_torch_elastic(self):
        import logging

        for name, logger in list(logging.root.manager.loggerDict.items()):
            if name.startswith("torch.distributed.elastic") and isinstance(logger, logging.Logger):
                logger.addFilter(_drop_record)
                self._quieted.append(logger)


def _drop_record(record):
    return False


def _worker_pids():
    """The children of this process that lead their own session: the workers torch's elastic agent
    started (its SubprocessHandler: Popen(start_new_session=True)); not, e.g., multiprocessing's
    resource tracker. From /proc (Linux); [] elsewhere (then torch's own shutdown hands the signal
    on, through SignalException)."""
    me, pids = os.getpid(), []
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return pids
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as f:
                # pid (comm) state ppid pgrp session ...; comm may hold spaces and parentheses
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me and int(fields[3]) == int(entry):
            pids.append(int(entry))
    return pids


# ------------------------------------------------------------------------------------------ SLURM
def with_resume(argv, resume_flags):
    """argv with any resume flag removed and `resume_flags` in front (what a requeued job runs)."""
    if not resume_flags:
        return list(argv)
    return [*resume_flags, *without_flag(argv, resume_flags[0], takes_value=len(resume_flags) == 2)]


def without_flag(argv, flag, takes_value):
    """argv without `flag` (and its value: `flag V` or `flag=V`)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == flag:
            i += 2 if takes_value else 1
            continue
        if argv[i].startswith(flag + "="):
            i += 1
            continue
        out.append(argv[i])
        i += 1
    return out


class StageJob:
    """What submitit runs in every task of the job; picklable. checkpoint() is submitit's requeue
    hook."""

    def __init__(self, command, argv):
        self.command, self.argv = command, list(argv)

    def __call__(self):
        import submitit

        spec = COMMANDS[self.command]
        argv = self.argv
        if spec.per_rank:  # one task per GPU: each is a rank of the env:// process group
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                  overwrite=True)
        else:
            argv = self._node_argv(submitit.JobEnvironment())
        module = importlib.import_module(spec.module)
        # pretrain / supervised train in this task: submitit's warning signal is handed to their
        # loop, which stops cleanly. transfer and the pipeline spawn their workers: submitit's
        # handler requeues at once on it. Every stage that stopped on SIGTERM after its checkpoint
        # (exit 143 / 138) is requeued below.
        warning = (SubmititWarning(forward_to_loop=spec.per_rank) if spec.resume is not None
                   else None)
        prog, rank = f"mocobench {self.command}", submitit.JobEnvironment().global_rank
        try:
            code = int(module.main(argv) or 0)
        # bad input, a failed stage (its exit code), a clean stop after a checkpoint
        except (UsageError, CommandFailed) as e:
            code, line = e.exit_code, error_line(prog, e, rank)
        except SystemExit as e:
            if warning is not None and warning.requeued:
                raise  # submitit requeued the job on its warning (outside the loop): no failure
            # a command's own exit (argparse: it said why)
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
            line = f"{prog}: exited with code {code}"
        except Exception as e:  # this rank's own failure (out of memory, a bug): its traceback
            _record_failure(f"{prog} (rank {rank}): error: {type(e).__name__}: "
                            f"{(str(e).strip().splitlines() or [''])[0]}")
            raise
        # stopped on the signal after an exact checkpoint: requeue the job now
        if warning is not None and code in REQUEUE_EXIT_CODES:
            print(line, file=sys.stderr, flush=True)
            warning.requeue()
            return code
        if warning is not None:
            warning.ignore()
        if code:
            _record_failure(line)
            # the last line of this task's log; submitit records it as the job's error
            raise JobFailed(line)
        return code

    def _node_argv(self, env):
        """transfer (and a pipeline stage) on several nodes: this node's place, from submitit's
        JobEnvironment (SLURM_JOB_NUM_NODES, SLURM_NODEID, SLURM_JOB_NODELIST), in transfer's
        --num-machines / --machine-rank / --dist-url (machine 0: the job's first host)."""
        if self.command not in ("transfer", "pipeline") or env.num_nodes == 1:
            return self.argv
        import random

        port = random.Random(env.job_id).randint(20000, 60000)  # the same on every node of this job
        return ["--num-machines", str(env.num_nodes), "--machine-rank", str(env.node),
                "--dist-url", f"tcp://{env.hostnames[0]}:{port}", *self.argv]

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on timeout / preemption (on rank 0): the same job, continuing where it
        stopped (None: not requeued)."""
        import submitit

        if COMMANDS[self.command].resume is None:
            return None
        argv = with_resume(self.argv, COMMANDS[self.command].resume)
        # the redo has begun (old outputs moved aside): the requeued job resumes it
        if self.command == "pipeline":
            argv = without_flag(argv, "--redo", takes_value=True)
        return submitit.helpers.DelayedSubmission(StageJob(self.command, argv))


class JobFailed(RuntimeError):
    """A command that failed in a SLURM task; str(): its one-line error (mocobench.utils.errors)."""


# the first failing rank's error line, which the batch script prints last (_failure_teardown)
FAILURE_FILE = "%j_error.txt"


def _record_failure(line):
    """Keep `line` in the job's folder for the batch script to print after srun, as the job's last
    line. The first failing rank wins: a rank that fails next, when its peer is gone, fails because
    of it."""
    import submitit

    try:
        env = submitit.JobEnvironment()
        path = env.paths.folder / FAILURE_FILE.replace("%j", str(env.job_id))
        with open(path, "x") as f:
            f.write(line + "\n")
    except (OSError, RuntimeError):  # another rank's is there; not under submitit
        pass


def _failure_teardown(job_dir):
    """The batch script's lines after srun: the failing rank's error line (_record_failure) to the
    job's stderr, last; the script's exit code stays srun's (a failed job stays FAILED, afterok
    holds)."""
    folder = os.path.abspath(os.path.expanduser(job_dir))
    path = '"${SLURM_JOB_ID}"'.join(shlex.quote(part)
                                    for part in os.path.join(folder, FAILURE_FILE).split("%j"))
    return ["rc=$?", f"error_file={path}",
            'if [ "$rc" -ne 0 ] && [ -s "$error_file" ]; then cat "$error_file" >&2; fi',
            'exit "$rc"']


def _submitit_signal():
    import submitit

    return submitit.JobEnvironment._usr_sig()  # USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise


class SubmititWarning:
    """submitit's warning signal in a SLURM task (USR2 unless SUBMITIT_PREEMPT_SIGNAL names another;
    SLURM sends it --signal-delay s before the time limit, scancel --signal=USR2 at any time).
    submitit's own handler would requeue at once, in the middle of an iteration (the run then
    repeats the work since the last epoch checkpoint). With `forward_to_loop`, while the training
    loop runs (mocobench.utils.preempt.Preemption holds SIGTERM: it finishes the iteration, writes
    an exact checkpoint and returns a requeue exit code) the signal is handed to it as a SIGTERM;
    before and after the loop, and without `forward_to_loop` (transfer and the pipeline, whose
    workers stop on SLURM's SIGTERM), submitit's handler requeues the job at once."""

    def __init__(self, forward_to_loop):
        self.signum = _submitit_signal()
        self._submitit_handler = signal.getsignal(self.signum)
        self.requeued = False
        signal.signal(self.signum, self._handle if forward_to_loop else self.requeue)

    def _handle(self, signum, frame):
        if isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), Preemption):
            os.kill(os.getpid(), signal.SIGTERM)  # the loop saves at the end of this iteration
        else:  # before or after the loop: nothing in flight to save
            self.requeue(signum, frame)

    def requeue(self, signum=None, frame=None):
        """submitit's handler: StageJob.checkpoint(), `scontrol requeue`, then SystemExit(-1) (on
        rank 0; nothing on the others)."""
        self.requeued = True
        self._submitit_handler(signum or self.signum, frame)

    def ignore(self):
        """The command has ended: a warning now changes nothing. (Left to Python, a warning during
        the interpreter's exit, which restores the signal's default action, would kill the finished
        task and FAIL the job.)"""
        signal.signal(self.signum, signal.SIG_IGN)


def submit(command, args, argv):
    """Submit the command as a submitit job (sbatch); prints the job id and log paths; returns the
    job (the pipeline: a job per stage, see submit_pipeline; returns the list)."""
    spec = COMMANDS[command]
    if command == "pipeline" and args.nodes != 1:
        raise UsageError(f"--nodes {args.nodes}: the pipeline's stages take their node count from "
                         f"its config (NUM_NODES {args.nodes})")
    if args.nodes < 1 or args.gpus_per_node < 0:
        raise UsageError(f"--nodes {args.nodes} --gpus-per-node {args.gpus_per_node}: "
                         "expected >= 1 and >= 0")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise UsageError(f"--cpus-per-task {args.cpus_per_task}: expected >= 1")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UsageError(f"--max-concurrent {args.max_concurrent}: expected >= 1")
    if not 0 <= args.signal_delay < 60 * args.timeout:
        raise UsageError(f"--signal-delay {args.signal_delay}: expected 0 <= seconds < the time "
                         f"limit (--timeout {args.timeout} min = {60 * args.timeout} s)")
    if command == "pipeline":
        return submit_pipeline(args, argv)
    tasks = args.tasks_per_node or (max(args.gpus_per_node, 1) if spec.per_rank else 1)
    if command == "transfer" and not any(a == "--num-gpus" or a.startswith("--num-gpus=")
                                         for a in argv):
        argv = ["--num-gpus", str(max(args.gpus_per_node, 1)), *argv]
    workers, processes = loader_workers(command, argv)
    cpus = args.cpus_per_task or (workers + 1) * processes
    executor, cluster = _executor(args)
    executor.update_parameters(**_job_parameters(args, f"mocobench-{command}", args.nodes,
                                                 args.gpus_per_node, tasks, cpus))
    job = executor.submit(StageJob(command, argv))
    _print_job(job, f"mocobench {command}",
               f"{cluster}: {args.nodes} node(s) x {tasks} task(s), "
               f"{args.gpus_per_node} GPU(s) per node, "
               f"{_cpus_and_mem(args, cpus, args.gpus_per_node)}, timeout {args.timeout} min")
    return job


def loader_workers(command, argv):
    """(DataLoader workers per process, processes per task) of `mocobench COMMAND ARGV` as it will
    run, from its config: pretrain / supervised: DATALOADER.NUM_WORKERS of the merged config, a task
    per GPU; lincls: --workers, a task per GPU; transfer: DATALOADER.NUM_WORKERS of its detectron2
    config, a task per node that starts --num-gpus processes. Bad input is an error here, before
    anything is submitted."""
    module = importlib.import_module(COMMANDS[command].module)
    if command in ("pretrain", "supervised"):
        from pretrain.config import load_config

        args = module.build_parser().parse_intermixed_args(argv)
        cfg = load_config(args.config_file, args.opts, moco=command == "pretrain")
        return cfg.DATALOADER.NUM_WORKERS, 1
    if command == "lincls":
        return module.build_parser().parse_args(argv).workers, 1
    if command == "transfer":
        from transfer.config import load_config

        args = module.build_parser().parse_args(argv)
        cfg = load_config(args.config_file, args.opts or [])
        return cfg.DATALOADER.NUM_WORKERS, max(args.num_gpus, 1)
    return 0, 1


def job_mem(args, gpus_per_node):
    """The job's --mem: the one given, else MEM_PER_GPU_GB per GPU of a node (at least one)."""
    return args.mem or f"{MEM_PER_GPU_GB * max(gpus_per_node, 1)}G"


def _cpus_and_mem(args, cpus, gpus_per_node):
    return f"{cpus} CPU(s) per task, --mem {job_mem(args, gpus_per_node)} per node"


def submit_pipeline(args, argv):
    """`mocobench pipeline --launcher slurm`: the preflight and the study's graph here, then a
    job per stage that is not done and a job array per transfer stage (a task per trial: init x
    seed). Each has its own resources (pretrain / supervised / transfer: NUM_NODES nodes x their
    GPUs, a task per node of (NUM_WORKERS + 1) x processes CPUs from the stage's config; data,
    convert, report: one node, no GPU, 1 CPU) and waits (SLURM afterok) only for the jobs whose
    outputs it reads: supervised and random-init trials start at once, MoCo trials after the
    conversion, the report after every trial. `--max-concurrent N` caps the running tasks of an
    array. Every job runs `mocobench pipeline --stage STAGE [--trial I]` through the shared
    manifest: a requeued job resumes, a failed trial is rerun alone, and the same command again
    submits only what is not done. Returns the jobs."""
    from mocobench import pipeline

    graph, study, dry_run = pipeline.slurm_jobs(argv, args.gpus_per_node)
    groups = []  # [(stage, [(graph job, argv)])]: a stage's trials form one array
    for job, job_argv in graph:
        if job.trial is not None and groups and groups[-1][0] == job.stage:
            groups[-1][1].append((job, job_argv))
        else:
            groups.append((job.stage, [(job, job_argv)]))
    if dry_run:
        for stage, members in groups:
            job = members[0][0]
            what = f"an array of {len(members)} trial(s)" if job.trial is not None else "a job"
            print(f"would submit {stage} as {what}: {job.nodes} node(s), {job.gpus} GPU(s) per "
                  f"node, {_cpus_and_mem(args, _stage_cpus(args, job), job.gpus)}"
                  + (f", after {', '.join(sorted({a.split('/')[0] for a in job.after}))}"
                     if job.after else ""))
        return []
    # submitit is there and can submit, before anything is said to be submitted
    _, cluster = _executor(args)
    print(f"submitting {len(groups)} job(s) ({len(graph)} task(s)), each after the jobs whose "
          "outputs it reads", flush=True)
    ids, submitted = {}, []  # graph job name -> SLURM job id (an array's task: ID_I); the jobs
    for stage, members in groups:
        job, cpus = members[0][0], _stage_cpus(args, members[0][0])
        # a fresh executor per submission: submitit's parameters only accumulate
        executor, cluster = _executor(args)
        after = _array_ids(ids[a] for a in job.after)
        executor.update_parameters(**_job_parameters(
            args, f"mocobench-pipeline-{stage}", job.nodes, job.gpus, tasks=1, cpus=cpus,
            after=":".join(after) or None))
        if job.trial is None:
            jobs = [executor.submit(StageJob("pipeline", members[0][1]))]
        else:
            if args.max_concurrent:
                executor.update_parameters(slurm_array_parallelism=args.max_concurrent)
            with executor.batch():
                jobs = [executor.submit(StageJob("pipeline", job_argv))
                        for _, job_argv in members]
        for (member, _), submitted_job in zip(members, jobs, strict=True):
            ids[member.name] = submitted_job.job_id
        submitted += jobs
        what = (f"pipeline stage {stage}" if job.trial is None
                else f"pipeline stage {stage} trials {members[0][0].trial}-{members[-1][0].trial}")
        _print_job(jobs[0], what,
                   f"{cluster}: {job.nodes} node(s), {job.gpus} GPU(s) per node, "
                   f"{_cpus_and_mem(args, cpus, job.gpus)}, timeout "
                   f"{args.timeout} min" + (f", after job {', '.join(after)}" if after else ""),
                   array=len(jobs) if job.trial is not None else 0)
        if cluster == "local":
            # submitit's local executor (tests) ignores SLURM dependencies: run them in order here
            _wait_locally(stage, jobs)
    if ids:  # the run's config and its jobs' SLURM ids, for `mocobench status`
        study.open_manifest()
        study.manifest.record_slurm_jobs(ids)
        print(f"follow them: squeue -j {','.join(_array_ids(ids.values()))}; "
              f"mocobench status {study.run_dir}")
    sys.stdout.flush()
    return submitted


def _stage_cpus(args, job):
    """The CPUs of a graph job's task: --cpus-per-task, else its stage's own (its workers and
    processes, from its config)."""
    return args.cpus_per_task or job.cpus


def _array_ids(job_ids):
    """The SLURM job ids, each once, of `job_ids` (an array's task ID_I counts as ID), in order."""
    return sorted({job_id.split("_")[0] for job_id in job_ids}, key=int)


def _wait_locally(stage, jobs):
    for job in jobs:
        try:
            job.result()
        # submitit's FailedJobError carries the job's traceback
        except Exception as e:  # noqa: BLE001
            last_line = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise UsageError(f"pipeline stage {stage} (job {job.job_id}) failed: "
                             f"see {job.paths.stderr}: {last_line}") from None


def _executor(args):
    """(submitit executor, cluster name): sbatch, or submitit's local executor under the test
    switch."""
    try:
        import submitit
    except ImportError:
        raise UsageError("--launcher slurm needs submitit: pip install -e '.[slurm]'") from None
    cluster = os.environ.get(SUBMITIT_CLUSTER_ENV, "slurm")
    try:
        return (submitit.AutoExecutor(folder=args.job_dir, cluster=cluster,
                                      slurm_max_num_timeout=30), cluster)
    except Exception as e:  # noqa: BLE001 - submitit says why (no sbatch on PATH, unknown cluster)
        raise UsageError(f"--launcher slurm: submitit cannot use cluster {cluster!r} here: "
                         f"{e}") from None


def _job_parameters(args, name, nodes, gpus_per_node, tasks, cpus, after=None):
    """submitit's parameters of one job: `tasks` per node of `cpus` CPUs each, --mem (job_mem),
    srun ending the step when a task fails (SRUN_ARGS) and the failing rank's error as the job's
    last line (_failure_teardown); `after`: the job id it waits for (runs only if that one
    succeeded)."""
    dependency = {}
    # kill_on_invalid_dep: a failed predecessor cancels this job instead of leaving it pending;
    # `after`: job ids joined by ":" (an array's id waits for all its tasks)
    if after is not None:
        dependency = {"slurm_dependency": f"afterok:{after}",
                      "slurm_additional_parameters": {"kill_on_invalid_dep": "yes"}}
    return dict(
        name=name, nodes=nodes, gpus_per_node=gpus_per_node or None, tasks_per_node=tasks,
        cpus_per_task=cpus, timeout_min=args.timeout,
        slurm_partition=args.partition, slurm_account=args.account, slurm_qos=args.qos,
        slurm_constraint=args.constraint, slurm_mem=job_mem(args, gpus_per_node),
        slurm_comment=args.comment,
        # time between SLURM's warning signal and the kill: enough to checkpoint
        slurm_signal_delay_s=args.signal_delay,
        slurm_srun_args=list(SRUN_ARGS), slurm_teardown=_failure_teardown(args.job_dir),
        **dependency,
    )


def _print_job(job, what, resources, array=0):
    stdout, stderr = job.paths.stdout, job.paths.stderr
    if array:
        print(f"submitted {what} as job array {job.job_id.split('_')[0]} ({array} task(s); "
              f"{resources})")
        print(f"  first task's stdout: {stdout}\n  stderr: {stderr}", flush=True)
        return
    print(f"submitted {what} as job {job.job_id} ({resources})")
    print(f"  stdout: {stdout}\n  stderr: {stderr}\n  follow: tail -f {stdout}", flush=True)
