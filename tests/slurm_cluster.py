"""A real one-node SLURM cluster on localhost for the `slurm` test tier (Debian's slurm-wlm:
munged, slurmctld, slurmd), every file of it under one state folder.

    python tests/slurm_cluster.py start [STATE_DIR]   # prints the SLURM_CONF line to export
    python tests/slurm_cluster.py stop [STATE_DIR]

`make test-slurm` installs slurm-wlm (apt-get, as root) and runs the tier; its session fixture
(tests/conftest.py: slurm_cluster) starts the cluster and stops it when the tier ends, pass or fail.
A start first stops whatever an earlier run left in the same folder (by its pid files), so a second
run starts cleanly. Nothing outside the folder is written: munged runs on its own socket and key
copy, the daemons' ports are their own.
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_STATE = Path(os.environ.get("MOCOBENCH_SLURM_STATE", "/tmp/mocobench-slurm"))
# the node claims more CPUs and memory than the machine has (SlurmdParameters=config_overrides), so
# that several small CPU jobs (2-task jobs, the pipeline's stages side by side) fit at once
NODE_CPUS = 16
NODE_MEMORY_MB = 64000
# ports of their own, not a system SLURM's 6817/6818
CTLD_PORT, SLURMD_PORT = 16817, 16818
DAEMONS = ("slurmd", "slurmctld", "munged")  # stop order

SLURM_CONF = """\
# written by tests/slurm_cluster.py: a one-node test cluster on localhost
ClusterName=mocobench-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={state}/munge/munge.socket,cred_expire=10
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/spool/%n
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/log/slurmctld.log
SlurmdLogFile={state}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups in a container: processes are tracked by their parent pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# requeue allowed (scontrol requeue, submitit's timeout / preemption handler)
JobRequeue=1
# a finished job stays visible to `scontrol show job` (Restarts=, ExitCode=) for 10 minutes
MinJobAge=600
# scancel / a time limit: SIGTERM, then SIGKILL after this many seconds
KillWait=30
ReturnToService=2
SchedulerParameters=defer_batch=0,sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


class ClusterError(RuntimeError):
    """The cluster could not start; str(): why, with the daemon's log lines."""


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _pid(path):
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill(pid, timeout=15.0):
    """SIGTERM, then SIGKILL after `timeout` s."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)


def _tail(path, lines=15):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


def conf_path(state=DEFAULT_STATE):
    return Path(state) / "slurm.conf"


def env(state=DEFAULT_STATE):
    """The environment the cluster's clients (sbatch, srun, squeue, submitit) need."""
    return {"SLURM_CONF": str(conf_path(state))}


def stop(state=DEFAULT_STATE):
    """Stop the daemons an earlier start() left in `state` (by their pid files) and their jobs'
    processes. Safe to call on a folder with nothing running."""
    state = Path(state)
    for name in DAEMONS:
        pid = _pid(state / f"{name}.pid")
        if pid and _alive(pid):
            _kill(pid)
    # the steps' processes slurmd started (slurmstepd) die with their jobs; a leftover is killed
    for line in _run(["pgrep", "-f", f"slurmstepd.*{state}"]).stdout.split():
        _kill(int(line), timeout=2.0)


def start(state=DEFAULT_STATE, timeout=60.0):
    """Start munged, slurmctld and slurmd on a fresh state folder; return when the node is idle.
    Raises ClusterError with the reason (a missing program, a daemon's log) otherwise."""
    state = Path(state)
    missing = [p for p in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(p) is None]
    if missing:
        raise ClusterError(f"{', '.join(missing)} not found: install Debian's slurm-wlm "
                           "(make slurm-setup, as root)")
    if os.geteuid() != 0:
        raise ClusterError("the test cluster's daemons run as root (SlurmUser=root): run as root")
    stop(state)
    shutil.rmtree(state, ignore_errors=True)
    for sub in ("munge", "ctld", "spool", "log"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    state.chmod(0o755)
    _start_munged(state)
    conf_path(state).write_text(SLURM_CONF.format(
        state=state, cpus=NODE_CPUS, memory=NODE_MEMORY_MB, ctld_port=CTLD_PORT,
        slurmd_port=SLURMD_PORT))
    conf = str(conf_path(state))
    # -c: a clean start (no jobs from an earlier run's state); -i: ignore an unreadable state
    for cmd, log in ((["slurmctld", "-f", conf, "-c", "-i"], "slurmctld"),
                     (["slurmd", "-f", conf, "-N", "localhost"], "slurmd")):
        result = _run(cmd, env={**os.environ, **env(state)})
        if result.returncode:
            raise ClusterError(f"{' '.join(cmd)} exited {result.returncode}: "
                               f"{result.stderr.strip()}\n{_tail(state / 'log' / f'{log}.log')}")
    _wait_idle(state, timeout)
    return env(state)


def _start_munged(state):
    """munged as the munge user, on a socket and key of its own (it refuses to run as root and
    wants its folders owned by its user)."""
    munge = state / "munge"
    key = munge / "munge.key"
    if Path("/etc/munge/munge.key").exists():
        shutil.copyfile("/etc/munge/munge.key", key)
    else:  # any 1 KiB of random bytes is a key munged accepts
        key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    _run(["chown", "-R", "munge:munge", str(munge)], check=True)
    munge.chmod(0o700)
    # munged checks its socket folder's permissions: only its owner may write; clients must reach it
    munge.chmod(0o755)
    cmd = ["runuser", "-u", "munge", "--", "munged", f"--socket={munge}/munge.socket",
           f"--key-file={key}", f"--pid-file={state}/munge/munged.pid",
           f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"]
    result = _run(cmd)
    if result.returncode:
        raise ClusterError(f"munged exited {result.returncode}: {result.stderr.strip()} "
                           f"{_tail(munge / 'munged.log', 5)}")
    # the pid file stop() reads
    shutil.copyfile(munge / "munged.pid", state / "munged.pid")


def _wait_idle(state, timeout):
    deadline = time.monotonic() + timeout
    states = ""
    while time.monotonic() < deadline:
        result = _run(["sinfo", "-h", "-N", "-o", "%T"], env={**os.environ, **env(state)})
        states = result.stdout.strip() or result.stderr.strip()
        if states == "idle":
            return
        time.sleep(0.5)
    raise ClusterError(f"the node is not idle after {timeout:.0f} s (sinfo: {states!r})\n"
                       f"slurmctld.log:\n{_tail(state / 'log' / 'slurmctld.log')}\n"
                       f"slurmd.log:\n{_tail(state / 'log' / 'slurmd.log')}")


def main(argv):
    if not argv or argv[0] not in ("start", "stop"):
        print(__doc__.strip().splitlines()[2:5], file=sys.stderr)
        return 2
    state = Path(argv[1]) if len(argv) > 1 else DEFAULT_STATE
    if argv[0] == "stop":
        stop(state)
        return 0
    try:
        start(state)
    except ClusterError as e:
        print(f"slurm_cluster: {e}", file=sys.stderr)
        return 1
    print(f"export SLURM_CONF={conf_path(state)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
