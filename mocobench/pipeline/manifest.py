"""manifest.json: the run directory's record of what ran, read to skip, resume or redo a stage.

Per stage: its inputs, outputs, status (running / failed / done), error, timings and the git commit
that ran it; for the run: the pipeline config, the software versions and the commit. This module
alone reads and writes the file, rewriting it atomically after every change, so an interrupted
process leaves the last complete record. Each change re-reads the file under a lock
(manifest.json.lock, flock) first: the jobs of one study on SLURM (a stage each, a trial each)
record their stages side by side without losing each other's changes.
"""
import contextlib
import json
import os
import socket
import subprocess
import time

from mocobench.utils.env import software_versions
from mocobench.utils.fileio import atomic_write

MANIFEST = "manifest.json"


def git_commit():
    """The commit of this source tree ("-dirty" when tracked files changed); None outside git or
    where git is not installed (a compute node)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        r = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                           text=True)
    except FileNotFoundError:
        return None
    if r.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return r.stdout.strip() + ("-dirty" if dirty else "")


class Manifest:
    """manifest.json in the run directory; `writable` False: read only (the other machines of a
    multi-node stage: machine 0 records)."""

    def __init__(self, run_dir, writable=True):
        self.path = os.path.join(run_dir, MANIFEST)
        self.writable = writable
        self._locked = False  # inside changing()
        self._data = {"stages": {}}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self._data = json.load(f)

    def save(self):
        if not self.writable:
            return
        with atomic_write(self.path, "w") as f:
            json.dump(self._data, f, indent=2)
            f.write("\n")

    def stage(self, name):
        """What the manifest says of stage `name` ({} when it has not run)."""
        return self._data["stages"].get(name, {})

    def finished_seconds(self):
        """{stage: seconds} of the stages that are done."""
        return {n: s.get("seconds") for n, s in self._data["stages"].items()
                if s.get("status") == "done" and s.get("seconds")}

    @contextlib.contextmanager
    def changing(self):
        """The file as it is now (another job may have changed it), locked until saved; nested
        calls share the outer one's lock and save."""
        if not self.writable or self._locked:
            yield
            return
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError:  # a file system without flock: one writer at a time, as before
                pass
            if os.path.exists(self.path):
                with open(self.path) as f:
                    self._data = json.load(f)
            self._locked = True
            try:
                yield
            finally:
                self._locked = False
            self.save()

    def record_run(self, config_file, config, commit):
        """The run's own fields, written before its first stage starts."""
        with self.changing():
            self._data.update(config_file=config_file, config=config,
                              versions=software_versions(), git_commit=commit)

    def forget(self, name):
        """Drop a stage's record (it is redone; its old outputs were moved aside)."""
        with self.changing():
            self._data["stages"].pop(name, None)

    def start(self, name, inputs, commit):
        # pid and host: `mocobench status` tells a running stage from one whose process is gone
        self._update(name, status="running", inputs=inputs,
                     started=time.strftime("%Y-%m-%dT%H:%M:%S"), git_commit=commit,
                     pid=os.getpid(), host=socket.gethostname(), failed_jobs={})

    def note(self, name, **fields):
        """Fields of a stage's record besides its status: its failed jobs, its SLURM job ids."""
        self._update(name, **fields)

    def record_slurm_jobs(self, jobs):
        """{job name (a stage, or transfer_INIT/seedI): SLURM job id} of a submission, added to
        the earlier ones (`mocobench status` asks SLURM for their states)."""
        with self.changing():
            self._data.setdefault("slurm", {}).setdefault("jobs", {}).update(jobs)

    def fail(self, name, error, seconds):
        self._update(name, status="failed", error=error, seconds=seconds)

    def finish(self, name, outputs, seconds):
        self._update(name, status="done", outputs=outputs, seconds=seconds, error=None)

    def _update(self, name, **fields):
        with self.changing():
            self._data["stages"].setdefault(name, {}).update(fields)
