"""`mocobench pipeline --jobs N`: the study's graph (graph.py) on this machine, up to N jobs at
once, each in its own process (forked from a server that imported the heavy modules once, before
any CUDA state) writing its own directory and its own log, logs/JOB.log in the run directory.

This process alone writes manifest.json: a stage is recorded running when its first job starts and
done (or failed) when its last one ends, as in a sequential run. Jobs start longest-remaining-path
first (pretraining before the random-init trials that wait for nothing); a job that needs GPUs
starts when enough are free and sees only its own (CUDA_VISIBLE_DEVICES). Every trial draws the
seed it would draw in a sequential run (trial i: SEED + i), so the records and the report are the
same. A failed job stops only the jobs that wait for it; the others run on, a partial report is
written whenever a trial ends, and the command ends with an error naming each failed job.
"""
import concurrent.futures
import multiprocessing
import os
import sys
import time
import traceback

from mocobench.pipeline.graph import priorities, ready
from mocobench.pipeline.plan import decide
from mocobench.utils.errors import CommandFailed, UsageError

# imported once by the fork server (what every job imports)
PRELOAD = ["torch", "mocobench.pipeline.stages", "transfer.run", "transfer.report",
           "pretrain.train", "pretrain.supervised", "convert"]


def run_job(cfg, config_file, name, stage, trial, outputs, log, devices):
    """One job in a spawned process: the stage's run, or trial `trial` of a transfer stage, with
    the outputs of the stages before it; stdout and stderr to `log`. Returns ("done", outputs) or
    ("failed", (one-line error, exit code))."""
    from mocobench.pipeline.stages import Wiring

    if devices is not None:  # before anything touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
    os.makedirs(os.path.dirname(log), exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        wiring = Wiring(cfg, config_file)
        wiring.outputs.update(outputs)
        if trial is None:
            [run] = [s.run for s in wiring.stages() if s.name == stage]
            return "done", run()
        return "done", wiring.run_transfer(stage.removeprefix("transfer_"), trials=[trial])
    except (UsageError, CommandFailed) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return "failed", (str(e), e.exit_code)
    except BaseException as e:  # noqa: BLE001 - the job's own failure: its traceback in its log
        traceback.print_exc()
        return "failed", (f"{type(e).__name__}: {e}", 1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


class LocalRunner:
    """Runs the jobs of one pipeline (driver.Pipeline) on this machine."""

    def __init__(self, pipeline, jobs, slots, gpus):
        self.pipeline, self.jobs, self.slots, self.gpus = pipeline, jobs, slots, gpus
        self.wiring, self.manifest = pipeline.wiring, pipeline.manifest
        self.stage_jobs = {}  # stage -> its job names not ended yet
        for job in jobs:
            self.stage_jobs.setdefault(job.stage, set()).add(job.name)
        self.started, self.failed = {}, {}  # stage -> time.time(); job -> error
        self.free = list(range(gpus))

    def run(self, stamp):
        """Every job, N at once; returns the failed jobs {name: error}."""
        waiting = {job.name: job for job in self.jobs}
        remaining = priorities(self.jobs)
        done = set()
        running = {}  # future -> (job, devices)
        # each job a fresh process forked from a server that imported the heavy modules once (a
        # spawned interpreter spends ~10 s importing torch and detectron2); nothing in the server
        # has touched CUDA
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        with concurrent.futures.ProcessPoolExecutor(self.slots, mp_context=context,
                                                    max_tasks_per_child=1) as pool:
            while waiting or running:
                for job in sorted(ready(waiting.values(), done), key=lambda j: -remaining[j.name]):
                    if len(running) >= self.slots:
                        break
                    # it can never run (the report runs over the trials that finished)
                    if job.stage != "report" and any(a in self.failed for a in job.after):
                        del waiting[job.name]
                        self.failed[job.name] = "not run: " + ", ".join(
                            a for a in job.after if a in self.failed) + " failed"
                        done.add(job.name)
                        continue
                    need = job.gpus if self.gpus else 0
                    if need > len(self.free):
                        continue
                    devices, self.free = self.free[:need], self.free[need:]
                    self._start_stage(job.stage, stamp)
                    log = self.wiring.path("logs", job.name.replace("/", "_") + ".log")
                    future = pool.submit(run_job, self.wiring.cfg, self.wiring.config_file,
                                         job.name, job.stage, job.trial,
                                         dict(self.wiring.outputs), log,
                                         devices if self.gpus else None)
                    running[future] = (job, devices, time.time())
                    del waiting[job.name]
                    print(f"started {job.name} ({len(running)} running; log "
                          f"{os.path.relpath(log, self.wiring.run_dir)})", flush=True)
                if not running:
                    continue
                finished, _ = concurrent.futures.wait(
                    running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    job, devices, t0 = running.pop(future)
                    self.free += devices
                    try:
                        status, value = future.result()
                    except Exception as e:  # noqa: BLE001 - the process died (killed, out of memory)
                        status, value = "failed", (f"{type(e).__name__}: {e}", 1)
                    done.add(job.name)
                    self._end(job, status, value, time.time() - t0)
        return self.failed

    def _start_stage(self, stage, stamp):
        """The stage's first job: its decision taken again with its inputs now known (plan.decide,
        as the sequential run does), a redone stage's old outputs moved aside, its record
        started."""
        if stage in self.started:
            return
        self.started[stage] = time.time()
        [spec] = [s for s in self.wiring.stages() if s.name == stage]
        inputs = spec.inputs()
        decision = decide(stage, self.manifest.stage(stage), inputs, self.pipeline.redo)
        if decision.kind == "redo":
            self.pipeline._move_aside(stage, stage, decision.reason, stamp)
        self.manifest.start(stage, inputs, self.pipeline.commit)

    def _end(self, job, status, value, seconds):
        left = self.stage_jobs[job.stage]
        left.discard(job.name)
        if status == "done":
            print(f"finished {job.name} in {seconds:.0f} s", flush=True)
        else:
            self.failed[job.name] = value[0]
            print(f"FAILED {job.name} after {seconds:.0f} s: {value[0]}", flush=True)
            failed = {n: e for n, e in self.failed.items() if n.startswith(job.stage)}
            self.manifest.note(job.stage, failed_jobs=failed)  # for `mocobench status`
        if job.trial is not None:
            self.wiring.partial_report()
        if left:
            return
        stage_seconds = time.time() - self.started[job.stage]
        failed = sorted(n for n in self.failed if n.startswith(job.stage))
        if failed:
            self.manifest.fail(job.stage, f"{', '.join(failed)} failed: "
                                          f"{self.failed[failed[0]]}", stage_seconds)
            return
        if job.trial is not None:  # every trial of the stage ended: its outputs, as in one run
            value = self.wiring.close_transfer(job.stage.removeprefix("transfer_"))
        self.wiring.outputs[job.stage] = value
        self.manifest.finish(job.stage, value, stage_seconds)
