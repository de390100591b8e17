"""The study as a graph: a job per stage, and a job per transfer trial (init x seed), each waiting
only for the jobs whose outputs it reads.

    data -> pretrain -> convert_moco -> transfer_moco/seed{i} --+
         -> supervised -> convert_supervised -> transfer_supervised/seed{i} --> report
         -> transfer_random/seed{i} -----------------------------------------+

Random-init trials need nothing from pretraining and every trial is independent, so the study takes
about its critical path (pretraining + conversion + one trial) on enough machines instead of the
sum of its jobs. The local runner (local.py, `--jobs N`) and the SLURM launcher (mocobench.launch:
a job array per init) both schedule this graph; --dry-run prints it.
"""
import dataclasses
import os
from typing import Optional

from mocobench.pipeline.machines import stage_cpus, stage_gpus, stage_nodes, stage_processes


@dataclasses.dataclass(frozen=True)
class Job:
    name: str  # the stage, or transfer_INIT/seedI for a trial
    stage: str
    trial: Optional[int]  # the trial's index (transfer); None for a stage
    after: tuple  # the names of the jobs it waits for (those not done yet)
    nodes: int
    gpus: int  # per node
    cpus: int  # of its task
    seconds: Optional[float]  # expected; None when unknown


def trial_name(stage, index):
    return f"{stage}/seed{index}"


def upstream(cfg, name):
    """The stages whose outputs stage `name` reads."""
    synth = ["data"] if cfg.DATA.SYNTH else []
    if name in ("pretrain", "supervised"):
        return synth if name == "pretrain" or not cfg.SUPERVISED.WEIGHTS else []
    if name.startswith("convert_"):
        init = name.removeprefix("convert_")
        return ["pretrain" if init == "moco" else "supervised"]
    if name.startswith("transfer_"):
        init = name.removeprefix("transfer_")
        return synth + ([] if init == "random" else [f"convert_{init}"])
    return []


def upstream_closure(cfg, name, names):
    """Every stage of `names` whose outputs stage `name` reads, directly or not (the report: every
    stage before it)."""
    if name == "report":
        return set(names) - {"report"}
    seen, todo = set(), list(upstream(cfg, name))
    while todo:
        stage = todo.pop()
        if stage in names and stage not in seen:
            seen.add(stage)
            todo += upstream(cfg, stage)
    return seen


def finished_trials(wiring, init):
    """The trial indices of `init` that wrote their results.json."""
    from transfer.record import RESULTS_FILE

    return [i for i in range(wiring.cfg.TRANSFER.SEEDS)
            if os.path.isfile(os.path.join(wiring.trial_dir(init, i), RESULTS_FILE))]


def build_jobs(wiring, rows, gpus_per_node):
    """[Job] of the stages and trials the plan `rows` (plan.make_plan) leaves to do, in an order
    that respects their dependencies. A transfer stage that resumes keeps its finished trials;
    one redone runs them all again."""
    cfg = wiring.cfg
    seeds = cfg.TRANSFER.SEEDS
    pending = {row.name for row in rows if row.decision.kind != "done"}
    names = {}  # stage -> the job names that stand for it
    jobs = []
    for row in rows:
        if row.name not in pending:
            continue
        processes = stage_processes(cfg, row.name, gpus_per_node)
        resources = dict(nodes=stage_nodes(cfg, row.name),
                         gpus=stage_gpus(cfg, wiring.config_file, row.name, gpus_per_node),
                         cpus=stage_cpus(cfg, wiring.config_file, row.name, processes))
        after = [n for stage in upstream(cfg, row.name) if stage in pending for n in names[stage]]
        if row.name == "report":
            after = [job.name for job in jobs if job.trial is not None]
        if row.name.startswith("transfer_"):
            init = row.name.removeprefix("transfer_")
            done = finished_trials(wiring, init) if row.decision.kind == "resume" else []
            each = row.seconds / seeds if row.seconds else None
            trials = [Job(trial_name(row.name, i), row.name, i, tuple(after), seconds=each,
                          **resources) for i in range(seeds) if i not in done]
            jobs += trials
            names[row.name] = [job.name for job in trials]
        else:
            jobs.append(Job(row.name, row.name, None, tuple(after), seconds=row.seconds,
                            **resources))
            names[row.name] = [row.name]
    return jobs


def critical_path(jobs):
    """(the job names of the longest chain of waits, its seconds): the study's wall time with a
    machine for every job that is ready. Unknown times count as 0."""
    by_name = {job.name: job for job in jobs}
    finish, via = {}, {}
    for job in jobs:  # in dependency order
        start = max((finish[a] for a in job.after), default=0.0)
        via[job.name] = max(job.after, key=lambda a: finish[a]) if job.after else None
        finish[job.name] = start + (job.seconds or 0.0)
    if not finish:
        return [], 0.0
    last = max(reversed(list(finish)), key=finish.get)  # a tie: the later job (the report)
    path = [last]
    while via[path[-1]]:
        path.append(via[path[-1]])
    assert all(name in by_name for name in path)
    return path[::-1], finish[last]


def simulate(jobs, slots, gpus):
    """Wall seconds of the jobs on one machine with `slots` jobs at once and `gpus` GPUs (0: the
    jobs' GPUs are not counted, as on CPU), started longest-remaining-path first as local.py
    does. Unknown times count as 0."""
    remaining = priorities(jobs)
    waiting = {job.name: job for job in jobs}
    running, done, now = [], set(), 0.0
    while waiting or running:
        free_gpus = gpus - sum(job.gpus for _, job in running)
        for job in sorted(ready(waiting.values(), done), key=lambda j: -remaining[j.name]):
            need = job.gpus if gpus else 0
            if len(running) < slots and need <= free_gpus:
                running.append((now + (job.seconds or 0.0), job))
                free_gpus -= need
                del waiting[job.name]
        if not running:  # a job that can never fit: count it as run alone
            job = next(iter(ready(waiting.values(), done)))
            running.append((now + (job.seconds or 0.0), job))
            del waiting[job.name]
        running.sort(key=lambda item: item[0])
        now, job = running.pop(0)
        done.add(job.name)
    return now


def ready(jobs, done):
    return [job for job in jobs if all(a in done for a in job.after)]


def priorities(jobs):
    """{job: seconds of the longest chain from its start to the end of the study}: the order in
    which ready jobs start (the critical path's first; a job of unknown time counts as 1 s, so
    the longer chain of waits goes first)."""
    later = {job.name: [] for job in jobs}
    for job in jobs:
        for a in job.after:
            later[a].append(job.name)
    seconds = {job.name: job.seconds or 1.0 for job in jobs}
    rest = {}
    for job in reversed(jobs):
        rest[job.name] = seconds[job.name] + max((rest[n] for n in later[job.name]), default=0.0)
    return rest


def duration(seconds):
    """'~53.0 h', '~12 min', '~30 s'; 'unknown' for None."""
    if seconds is None:
        return "unknown"
    if seconds >= 2 * 3600:
        return f"~{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds:.0f} s"


def print_graph(jobs, slots, gpus):
    """The jobs, what each waits for, its resources and expected time; the critical path and the
    study's wall time with fan-out against the sequential sum."""
    if not jobs:
        print("  jobs: none, every stage is done", flush=True)
        return
    width = max(len(job.name) for job in jobs)
    print(f"  jobs ({len(jobs)}), each waiting only for what it reads:")
    for job in jobs:
        waits = ", ".join(_compact(job.after)) or "-"
        print(f"    {job.name:<{width}}  after {waits} | {job.nodes} node(s) x {job.gpus} GPU(s), "
              f"{job.cpus} CPU(s) | {duration(job.seconds)}")
    path, longest = critical_path(jobs)
    total = sum(job.seconds or 0.0 for job in jobs)
    unknown = sum(job.seconds is None for job in jobs)
    note = f" ({unknown} job(s) of unknown time counted as 0)" if unknown else ""
    print(f"  critical path: {' -> '.join(path)}: {duration(longest)}{note}")
    print(f"  study wall time with fan-out (a machine per ready job, e.g. SLURM): "
          f"{duration(longest)}; sequential (one job after another): {duration(total)}")
    on_cpu = "" if gpus else ", GPUs not counted"
    print(f"  on this machine with --jobs {slots}{on_cpu}: "
          f"{duration(simulate(jobs, slots, gpus))}", flush=True)


def _compact(names):
    """'transfer_moco/seed0..4' for a run of one stage's trials."""
    out, groups = [], {}
    for name in names:
        stage, _, seed = name.partition("/seed")
        if seed:
            groups.setdefault(stage, []).append(int(seed))
        else:
            out.append(name)
    for stage, seeds in groups.items():
        out.append(trial_name(stage, seeds[0]) if len(seeds) == 1 else
                   f"{stage}/seed{{{','.join(map(str, seeds))}}}")
    return out
