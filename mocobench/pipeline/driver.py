"""The run: the checks and the preflight, then each stage in order as the plan decided.

A stage that is done is skipped; one redone has its old outputs moved to superseded/<time>/ (never
deleted) first; every stage run is recorded in the manifest before it starts and when it ends, so
the same command run again continues where this one stopped.
"""
import os
import time

from mocobench.pipeline.estimate import record_rate, time_left
from mocobench.pipeline.graph import (
    build_jobs,
    finished_trials,
    print_graph,
    trial_name,
    upstream_closure,
)
from mocobench.pipeline.machines import ONE_MACHINE, check_machines
from mocobench.pipeline.manifest import Manifest, git_commit
from mocobench.pipeline.plan import changed_inputs, decide, preflight
from mocobench.pipeline.stages import Wiring
from mocobench.utils.errors import UsageError


def visible_gpus():
    """CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_jobs(cfg, gpus):
    """Trials side by side on this machine: as many as its GPUs hold (8 GPUs, 2 per trial: 4);
    1 without CUDA (--jobs N asks for more) or when a trial takes every GPU."""
    if not gpus or not cfg.TRANSFER.NUM_GPUS:
        return 1
    return max(1, gpus // cfg.TRANSFER.NUM_GPUS)


class Pipeline:
    """One `mocobench pipeline` command: its stages, its manifest and what it was asked to redo."""

    def __init__(self, cfg, config_file, redo=(), only=None, place=ONE_MACHINE, trial=None):
        """`only`: run this stage alone (the stages it reads must be done): one job of
        `--launcher slurm`; `trial`: with a transfer stage, only its trial of that index (a task
        of a job array). `place`: this machine's place in a stage that spans NUM_NODES machines;
        machine 0 writes the manifest."""
        self.wiring = Wiring(cfg, config_file, place)
        # read only until the preflight has passed
        self.manifest = Manifest(self.wiring.run_dir, writable=place.machine_rank == 0)
        self.redo = set(redo)
        self.only, self.trial = only, trial
        self.commit = git_commit()

    @property
    def config_file(self):
        return self.wiring.config_file

    @property
    def run_dir(self):
        return self.wiring.run_dir

    def preflight(self, then=None):
        return preflight(self.wiring, self.manifest, self.redo, then)

    def run(self, dry_run=False, jobs=None):
        """Every stage in order (with `only`: the stages up to it, those before it done); returns
        the outputs of the stages, or None with `dry_run` (the preflight and the graph alone).
        `jobs` > 1: the study's graph, up to `jobs` jobs at once on this machine (local.py);
        None: visible GPUs // a trial's GPUs, 1 without CUDA."""
        stages = self.wiring.stages()
        names = [stage.name for stage in stages]
        self._check_selection(names)
        gpus = visible_gpus()
        slots = jobs or default_jobs(self.wiring.cfg, gpus)
        if slots < 1:
            raise UsageError(f"--jobs {slots}: expected >= 1")
        graph = None if self.only else \
            (lambda rows: print_graph(build_jobs(self.wiring, rows, gpus), slots, gpus))
        rows = self.preflight(then=graph)
        # with --stage: the stages it reads (the others are other jobs' to run)
        reads = upstream_closure(self.wiring.cfg, self.only, names) if self.only else set(names)
        if self.only:
            self._check_earlier_stages_done([row for row in rows[:names.index(self.only)]
                                             if row.name in reads])
        if dry_run:
            return None
        self.open_manifest()
        if slots > 1 and not self.only:
            return self._run_graph(rows, slots, gpus)
        end = names.index(self.only) + 1 if self.only else len(stages)  # later: their own jobs
        start, stamp = time.time(), time.strftime("%Y%m%d-%H%M%S")
        measured = {}  # stage -> seconds, of the stages this command ran
        for index, stage in enumerate(stages[:end], 1):
            header = f"[{index}/{len(stages)}] {stage.name}"
            if stage.name not in reads | {self.only}:
                continue
            if self.trial is not None and stage.name == self.only:
                measured[stage.name] = self._run_trial(stage, header, stamp)
                continue
            inputs = stage.inputs()
            previous = self.manifest.stage(stage.name)
            decision = decide(stage.name, previous, inputs, self.redo)
            if decision.kind == "done":
                print(f"\n=== {header}: done earlier ({previous.get('seconds', 0):.0f} s), skipped",
                      flush=True)
                self.wiring.outputs[stage.name] = previous["outputs"]
                continue
            if decision.kind == "redo" and self.manifest.writable:
                self._move_aside(stage.name, header, decision.reason, stamp)
            left = time_left(self.wiring, self.manifest, names[index - 1:], measured)
            resuming = " (resuming)" if decision.kind == "resume" else ""
            print(f"\n=== {header}{resuming} | pipeline elapsed {time.time() - start:.0f} s{left}",
                  flush=True)
            measured[stage.name] = self._run_stage(stage, inputs)
        what = f"stage {self.only}" if self.only else "pipeline"
        print(f"\n{what} finished in {time.time() - start:.0f} s: {self.run_dir}", flush=True)
        return self.wiring.outputs

    def _run_graph(self, rows, slots, gpus):
        """The graph's jobs, `slots` at once, each in its own process (local.LocalRunner)."""
        from mocobench.pipeline.local import LocalRunner

        for row in rows:  # what the jobs read from the stages done earlier
            if row.decision.kind == "done":
                self.wiring.outputs[row.name] = self.manifest.stage(row.name)["outputs"]
        start, stamp = time.time(), time.strftime("%Y%m%d-%H%M%S")
        jobs = build_jobs(self.wiring, rows, gpus)
        print(f"\n=== {len(jobs)} job(s), up to {slots} at once", flush=True)
        failed = LocalRunner(self, jobs, slots, gpus).run(stamp)
        if failed:
            first = next(iter(failed))
            raise UsageError(f"{len(failed)} job(s) failed: {', '.join(failed)}; {first}: "
                             f"{failed[first]} (see logs/ in {self.run_dir}); run the same "
                             "command again to rerun only those")
        print(f"\npipeline finished in {time.time() - start:.0f} s: {self.run_dir}", flush=True)
        return self.wiring.outputs

    def _run_trial(self, stage, header, stamp):
        """`--stage transfer_INIT --trial I` (a task of a SLURM job array): that trial alone. The
        first trial of the stage to start opens it (run / resume / redo decided under the
        manifest's lock; a redone stage's old outputs moved aside), the others join it; the last to
        finish closes it with the outputs of every trial. A partial report follows every finished
        trial, so a failed seed hides none of the others. Returns the trial's seconds."""
        init = stage.name.removeprefix("transfer_")
        name = trial_name(stage.name, self.trial)
        inputs = stage.inputs()
        with self.manifest.changing():
            previous = self.manifest.stage(stage.name)
            opened = previous.get("status") == "running" and \
                not changed_inputs(previous.get("inputs"), inputs)
            if not opened:
                decision = decide(stage.name, previous, inputs, self.redo)
                if decision.kind == "done":
                    print(f"\n=== {header}: done earlier, skipped", flush=True)
                    return 0.0
                if decision.kind == "redo" and self.manifest.writable:
                    self._move_aside(stage.name, header, decision.reason, stamp)
                self.manifest.start(stage.name, inputs, self.commit)
        print(f"\n=== {header}: trial {self.trial} of {self.wiring.cfg.TRANSFER.SEEDS} ({name})",
              flush=True)
        t0 = time.time()
        try:
            self.wiring.run_transfer(init, trials=[self.trial])
        except BaseException as e:
            self._note_trial(stage.name, name, f"{type(e).__name__}: {e}")
            raise
        seconds = time.time() - t0
        self._note_trial(stage.name, name, None)
        seeds = self.wiring.cfg.TRANSFER.SEEDS
        with self.manifest.changing():
            record = self.manifest.stage(stage.name)
            if record.get("status") != "done" and \
                    len(finished_trials(self.wiring, init)) == seeds:
                started = time.mktime(time.strptime(record["started"], "%Y-%m-%dT%H:%M:%S"))
                self.manifest.finish(stage.name, self.wiring.close_transfer(init),
                                     time.time() - started)
        self.wiring.partial_report()
        return seconds

    def _note_trial(self, stage, name, error):
        """The stage's failed trials (`mocobench status`): `name` failed with `error`, or not (None:
        it finished)."""
        with self.manifest.changing():
            failed = dict(self.manifest.stage(stage).get("failed_jobs") or {})
            failed.pop(name, None)
            if error is not None:
                failed[name] = error
            self.manifest.note(stage, failed_jobs=failed)

    def _check_selection(self, names):
        """--stage and --redo name stages of this pipeline; the stages this command runs are
        started on as many machines as they span."""
        if self.only and self.only not in names:
            raise UsageError(f"--stage {self.only}: not a stage of this pipeline; stages: "
                             f"{', '.join(names)}")
        if self.only and self.redo - {self.only}:
            raise UsageError(f"--redo {', '.join(sorted(self.redo - {self.only}))} with --stage "
                             f"{self.only}: a single-stage run redoes only its own stage")
        check_machines(self.wiring.cfg, self.config_file, [self.only] if self.only else names,
                       self.wiring.place)

    def _check_earlier_stages_done(self, rows):
        """With --stage, the stages it reads are other runs' (jobs') to do first."""
        for row in rows:
            if row.decision.kind != "done":
                raise UsageError(f"--stage {self.only}: the earlier stage {row.name} is not done "
                                 f"({row.action}); run the pipeline (or its --stage {row.name}) "
                                 f"first")

    def open_manifest(self):
        if self.manifest.writable:
            os.makedirs(self.run_dir, exist_ok=True)
        self.manifest.record_run(self.config_file, self.wiring.cfg.dump(), self.commit)

    def _move_aside(self, name, header, why, stamp):
        """A redone stage: its old outputs to superseded/<stamp>/ (nothing is deleted), its record
        dropped."""
        moved = []
        for path in self.wiring.stage_outputs(name):
            if os.path.exists(path):
                target = self.wiring.path("superseded", stamp, os.path.relpath(path, self.run_dir))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(path, target)
                moved.append(os.path.relpath(target, self.run_dir))
        self.manifest.forget(name)
        print(f"\n=== {header}: redo ({why})"
              + (f"; old outputs moved to {', '.join(moved)}" if moved else ""))

    def _run_stage(self, stage, inputs):
        """Runs the stage, recorded in the manifest (running, then done or failed); returns its
        seconds."""
        t0 = time.time()
        self.manifest.start(stage.name, inputs, self.commit)
        try:
            outputs = stage.run()
        except BaseException as e:
            self.manifest.fail(stage.name, f"{type(e).__name__}: {e}", time.time() - t0)
            raise
        seconds = time.time() - t0
        self.wiring.outputs[stage.name] = outputs
        self.manifest.finish(stage.name, outputs, seconds)
        if self.wiring.place.machine_rank == 0:
            record_rate(self.wiring, stage.name, seconds)
        return seconds
