"""Wall time of a study run one job after another against `--jobs N`, one right after the other on
this machine, and whether their report tables are the same.

    python benchmarks/study_jobs.py [--config configs/pipeline/tiny_cpu.yaml] [--jobs 2] [--out DIR]

Each run is a fresh `mocobench pipeline` process into its own directory (removed unless --keep).
Prints the two wall times and "report tables identical: True/False".
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(config, out, *flags):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mocobench", "pipeline", "--config-file", config,
                           *flags, "OUTPUT_DIR", out], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO})
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(flags) or 'sequential'} failed ({proc.returncode}):\n"
                 f"{proc.stderr[-2000:]}")
    return seconds


def tables(out):
    with open(os.path.join(out, "report.json")) as f:
        return json.loads(f.read().replace(out, "RUN"))["tables"]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(REPO, "configs/pipeline/tiny_cpu.yaml"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    root = args.out or tempfile.mkdtemp(prefix="study_jobs_")
    sequential, parallel = os.path.join(root, "sequential"), os.path.join(root, "jobs")
    t_seq = run(args.config, sequential)
    t_par = run(args.config, parallel, "--jobs", str(args.jobs))
    print(f"{os.path.relpath(args.config, REPO)} on {os.cpu_count()} CPU(s)")
    print(f"sequential:   {t_seq:.1f} s wall")
    print(f"--jobs {args.jobs}:     {t_par:.1f} s wall")
    print(f"report tables identical: {tables(sequential) == tables(parallel)}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
