"""The plan: what happens to each stage (done / redo / check / resume / run) and why.

decide() is the one decision, from the manifest's record of the stage and its inputs now; the
preflight (alone with --dry-run) prints it for every stage with what the stage needs, its size and
expected time, and the run follows it stage by stage, so the plan printed is the run that follows.
The preflight also merges every stage's config and checks every input file before anything runs.
"""
import dataclasses
from typing import Optional

from mocobench.pipeline.config import trains_classifier
from mocobench.pipeline.estimate import expected_seconds, read_rates, size
from mocobench.utils.errors import UsageError

# a stage's inputs when they read the outputs of an earlier stage that has not run yet
UNKNOWN = object()


@dataclasses.dataclass(frozen=True)
class Decision:
    kind: str  # "done", "redo", "check", "resume" or "run"
    reason: str = ""  # why: "--redo", "inputs changed: seeds", "failed: ...", ...

    def __str__(self):
        return f"{self.kind} ({self.reason})" if self.reason else self.kind


def changed_inputs(recorded, inputs):
    """The input keys that differ from what the stage recorded (it then has to be redone)."""
    if inputs is None or recorded is None:
        return []
    return sorted(k for k in set(inputs) | set(recorded) if inputs.get(k) != recorded.get(k))


def decide(name, previous, inputs, redo):
    """What to do with stage `name`, given its manifest record `previous` ({} when it has not run),
    its `inputs` now (UNKNOWN before an earlier stage has run; None: none to compare, it always
    runs) and the stages named with --redo."""
    status = previous.get("status")
    if name in redo:
        return Decision("redo", "--redo")
    if inputs is UNKNOWN:
        if status:  # it ran before: done, resumed or redone, once its inputs can be compared
            return Decision("check", "its inputs are known once an earlier stage has run")
        return Decision("run")
    changed = changed_inputs(previous.get("inputs"), inputs)
    if changed:
        return Decision("redo", f"inputs changed: {', '.join(changed)}")
    if status == "done" and inputs is not None:
        return Decision("done")
    if status in ("running", "failed"):
        error = previous.get("error")
        return Decision("resume", status + (f": {error}" if error else ""))
    return Decision("run")


@dataclasses.dataclass(frozen=True)
class PlanRow:
    index: int  # 1-based
    name: str
    decision: Decision
    needs: list  # [stages.Need]
    size: str
    seconds: Optional[float]  # expected; None when done or not measured yet

    @property
    def action(self):
        return str(self.decision)

    @property
    def missing(self):
        """[(the input, what is wrong with it)] of the inputs the stage cannot read."""
        return [(f"{need.what} {need.path}", need.problem) for need in self.needs if need.missing]


def make_plan(wiring, manifest, redo):
    """Every stage's config merged and validated, every input checked: [PlanRow]; writes nothing."""
    stages = wiring.stages()
    names = [stage.name for stage in stages]
    unknown = sorted(set(redo) - set(names))
    if unknown:
        raise UsageError(f"--redo {', '.join(unknown)}: not a stage of this pipeline; stages: "
                         f"{', '.join(names)}")
    _validate_stage_configs(wiring)
    rates, finished = read_rates(), manifest.finished_seconds()
    rows = []
    try:
        for index, stage in enumerate(stages, 1):
            previous = manifest.stage(stage.name)
            # a stage that ran before: compare its inputs (known when the stages it reads are done)
            decision = decide(stage.name, previous, _inputs(stage) if previous else UNKNOWN, redo)
            if decision.kind == "done":  # its outputs are known, so are the inputs of later stages
                wiring.outputs[stage.name] = previous["outputs"]
            seconds = None if decision.kind == "done" else \
                expected_seconds(wiring, manifest, stage.name, finished, rates)
            rows.append(PlanRow(index, stage.name, decision, wiring.needs(stage.name),
                                size(wiring, stage.name), seconds))
    finally:
        wiring.outputs.clear()
    return rows


def _validate_stage_configs(wiring):
    cfg = wiring.cfg
    for name in ("PRETRAIN", "SUPERVISED"):
        if cfg[name].CONFIG_FILE and trains_classifier(cfg, name.lower()):
            wiring.stage_config(name)  # raises naming the pipeline yaml and the list
    for init in cfg.TRANSFER.INITS:
        wiring.stage_config("TRANSFER", init)


def _inputs(stage):
    try:
        return stage.inputs()
    except KeyError:  # an earlier stage has no outputs yet (it runs first)
        return UNKNOWN


def print_plan(rows, config_file, run_dir):
    """The plan as the preflight prints it; returns the missing inputs."""
    print(f"pipeline {config_file} -> {run_dir}")
    for row in rows:
        eta = f"~{row.seconds:.0f} s" if row.seconds else \
            "time unknown until it runs once on this machine"
        size = f" | {row.size}" if row.size else ""
        print(f"  [{row.index}/{len(rows)}] {row.name:<20} {row.action}{size}"
              + ("" if row.action == "done" else f" | {eta}"))
        for need in row.needs:
            print(f"        needs {need.what}: {need.path} [{need.state}]")
    missing = missing_inputs(rows)
    known = [row.seconds for row in rows if row.action != "done"]
    if all(known):
        print(f"  expected time of the remaining stages: ~{sum(known):.0f} s")
    print(f"  missing inputs: {', '.join(missing)}" if missing else "  all inputs present",
          flush=True)
    return missing


def missing_inputs(rows):
    """One line per input some stage cannot read, naming the stages that read it and what is wrong
    (a dataset's expected layout); an input several stages read is listed once."""
    stages = {}
    for row in rows:
        for what, problem in row.missing:
            stages.setdefault((what, problem), []).append(row.name)
    return [f"{what} (stage {', '.join(names)})"
            + ("" if problem == "does not exist" else f": {problem}")
            for (what, problem), names in stages.items()]


def preflight(wiring, manifest, redo, then=None):
    """make_plan(), printed (and `then(rows)`: the graph); a missing input is an error before
    anything runs or is written."""
    rows = make_plan(wiring, manifest, redo)
    missing = print_plan(rows, wiring.config_file, wiring.run_dir)
    if then is not None:
        then(rows)
    if missing:
        raise UsageError(f"{wiring.config_file}: missing input(s): {'; '.join(missing)} "
                         f"(nothing was run)")
    return rows
