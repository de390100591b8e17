"""`mocobench status RUN_DIR`: where a study stands. Each stage and each transfer trial (done /
running / queued / failed / stopped / not started), the SLURM job ids and states where the study was
submitted with --launcher slurm (squeue, and sacct where accounting is on; neither is needed), the
seeds finished per init, the newest AP of each finished trial, the time spent and the study's ETA.

It reads only the run directory (manifest.json, each trial's started.json / results.json) and asks
the scheduler; it writes nothing and takes no lock, so it is safe at any time, also while the study
runs.
"""
import argparse
import json
import os
import socket
import subprocess
import sys

import yaml

from mocobench.utils.errors import UsageError

MANIFEST = "manifest.json"
INITS = ("moco", "supervised", "random")
# the first of these a trial's results hold is its headline number
HEADLINE = (("bbox", "AP"), ("segm", "AP"), ("keypoints", "AP"), ("sem_seg", "mIoU"))


def build_parser():
    parser = argparse.ArgumentParser(prog="mocobench status", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a `mocobench pipeline` OUTPUT_DIR")
    return parser


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # absent, or being written by a job: not there yet
        return None


def process_alive(record):
    """False when the stage's process ran on this host and is gone (killed, crashed); True when
    it lives or cannot be seen from here (another host: a SLURM node)."""
    pid, host = record.get("pid"), record.get("host")
    if not pid or host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it lives
        return True
    return True


def headline(results):
    """'bbox AP 41.23 (coco_2017_val)' of a trial's results, or ''."""
    for dataset, tasks in (results or {}).items():
        for task, metric in HEADLINE:
            value = (tasks.get(task) or {}).get(metric)
            if value is not None:
                return f"{task} {metric} {value:.2f} ({dataset})"
    return ""


def scheduler_states(job_ids):
    """{job id: state} from squeue (pending / running jobs), sacct (finished ones, where accounting
    is on) and else scontrol (recently ended ones); (states, notes on what could not be asked)."""
    states, notes = {}, []
    if not job_ids:
        return states, notes
    ids = ",".join(sorted(set(job_ids)))
    for command in (["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ids],
                    ["squeue", "-h", "-r", "-o", "%i|%T", "-j", ids]):
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            notes.append(f"{command[0]} unavailable ({type(e).__name__})")
            continue
        if proc.returncode != 0:
            notes.append(f"{command[0]}: {(proc.stderr.strip().splitlines() or ['failed'])[0]}")
            continue
        for line in proc.stdout.splitlines():
            job, _, state = line.strip().partition("|")
            if job and state:
                states[job] = state.split()[0]  # squeue, the live one, last: it wins
    # a job that has ended, without accounting: slurmctld still knows it for MinJobAge
    for job in sorted(set(job_ids) - set(states)):
        try:
            proc = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True,
                                  text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            break
        fields = dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv)
        if proc.returncode == 0 and "JobState" in fields:
            states[job] = fields["JobState"]
    return states, notes


def study_status(run_dir):
    """The status lines of the study in `run_dir`; UsageError when it is not a pipeline run."""
    manifest = read_json(os.path.join(run_dir, MANIFEST))
    if manifest is None:
        raise UsageError(f"{run_dir}: no readable {MANIFEST} (not a `mocobench pipeline` run "
                         "directory, or it has not started)")
    cfg = yaml.safe_load(manifest.get("config") or "") or {}
    transfer = cfg.get("TRANSFER", {})
    inits = [i for i in transfer.get("INITS", INITS) if i in INITS]
    seeds = int(transfer.get("SEEDS", 1))
    stages = ((["data"] if cfg.get("DATA", {}).get("SYNTH") else []) + ["pretrain"]
              + (["supervised"] if "supervised" in inits else [])
              + [f"convert_{i}" for i in ("moco", "supervised") if i in inits]
              + [f"transfer_{i}" for i in inits] + ["report"])
    records = manifest.get("stages", {})
    slurm = manifest.get("slurm", {}).get("jobs", {})
    states, notes = scheduler_states([str(j) for j in slurm.values()])

    def slurm_note(name):
        job = slurm.get(name)
        if job is None:
            return ""
        return f"  [SLURM {job} {states.get(str(job), 'state unknown')}]"

    lines = [f"study {run_dir} ({manifest.get('config_file', '?')})"]
    spent, finished, trial_seconds, left = 0.0, {}, [], 0
    for name in stages:
        record = records.get(name, {})
        status = record.get("status") or "not started"
        alive = status != "running" or process_alive(record)
        if not alive:
            status = "stopped (its process is gone: run the same command again to resume)"
        spent += record.get("seconds") or 0.0
        line = f"  {name:<20} {status}"
        if record.get("status") == "done" and record.get("seconds") is not None:
            line += f" ({record['seconds']:.0f} s)"
        if record.get("status") == "failed" and record.get("error"):
            line += f": {record['error'].splitlines()[0][:160]}"
        if not name.startswith("transfer_"):
            lines.append(line + slurm_note(name))
            left += record.get("status") != "done"
            continue
        init = name.removeprefix("transfer_")
        trial_lines, done = [], 0
        for index in range(seeds):
            trial = f"{name}/seed{index}"
            directory = os.path.join(run_dir, "transfer", init, f"seed{index}")
            result = read_json(os.path.join(directory, "results.json"))
            failed = (record.get("failed_jobs") or {}).get(trial)
            if result is not None:
                done += 1
                trial_seconds.append(result.get("seconds") or 0.0)
                state = f"done  {headline(result.get('results'))}  " \
                        f"({result.get('seconds') or 0:.0f} s)"
            elif failed:
                state = f"failed: {failed.splitlines()[0][:160]}"
            elif os.path.isfile(os.path.join(directory, "started.json")):
                state = "running" if record.get("status") == "running" and alive else \
                    "stopped (resumes from its last checkpoint)"
            elif record.get("status") == "running" and alive:
                state = "queued"
            else:
                state = "not started"
            left += result is None
            trial_lines.append(f"      seed{index:<14} {state}{slurm_note(trial)}")
        finished[init] = done
        lines.append(f"{line}: {done}/{seeds} seeds done")
        lines += trial_lines
    lines.append("  seeds finished: " + ", ".join(f"{i} {n}/{seeds}" for i, n in finished.items()))
    running = [name for name in stages if records.get(name, {}).get("status") == "running"]
    eta = "done" if not left else "unknown until a trial has finished"
    if left and trial_seconds:
        each = sum(trial_seconds) / len(trial_seconds)
        eta = (f"~{each * left:.0f} s of work left ({left} job(s) at ~{each:.0f} s each, the "
               "trials' mean; less where jobs run side by side)")
    lines.append(f"  time spent in finished stages: {spent:.0f} s"
                 + (f"; running: {', '.join(running)}" if running else ""))
    lines.append(f"  ETA: {eta}")
    if slurm and notes:
        lines.append(f"  scheduler: {'; '.join(notes)}")
    return lines


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    print("\n".join(study_status(os.path.abspath(args.run_dir))), flush=True)
    return 0
