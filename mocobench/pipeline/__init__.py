"""`mocobench pipeline`: its command line, and the stage jobs `--launcher slurm` submits.

The package runs the stages of the whole experiment as one resumable command: config.py reads the
pipeline yaml, stages.py wires each stage to its own command, plan.py decides what happens to each
stage (done / redo / resume / run), manifest.py records what ran, estimate.py says how long it
takes, machines.py where it runs, and driver.py runs the plan.
"""
import argparse
import os

from mocobench.pipeline.config import load_pipeline_config
from mocobench.pipeline.driver import Pipeline
from mocobench.pipeline.machines import Place
from mocobench.utils.config import resolve_config_path
from mocobench.utils.errors import UsageError

HELP = """`mocobench pipeline --config-file configs/pipeline/X.yaml [--dry-run] [--redo STAGE]
                    [KEY VALUE ...]`.

    data (optional: generate) -> pretrain MoCo -> supervised baseline (train, or a given checkpoint)
    -> convert both (verified) -> transfer {moco, supervised, random} x seeds -> report

Each stage calls the same function as its own subcommand (`mocobench data synth`, `pretrain`,
`supervised`, `convert`, `transfer`, `report`); there is no second implementation here, only the
wiring.

Before any stage runs (and alone with --dry-run) a preflight merges and validates every stage's
config with its OPTS (an error names the pipeline yaml and the list), checks that every input
file exists, and prints the plan: each stage, what it needs, what is missing, whether it is
done, to run, to resume or to redo, and its size and expected time: from this run's own
measurements, else scaled from the same work measured by an earlier pipeline on this machine
(`stage_seconds.json` in $MOCOBENCH_CACHE, default ~/.cache/mocobench). Relative sub-config
paths resolve against the pipeline yaml's folder, then the shipped configs
(mocobench.utils.config.resolve_config_path), so a pipeline runs from any working directory.

The run directory's `manifest.json` records, per stage, its inputs (merged config, overrides,
sha256 of the checkpoints it reads), outputs, status, timings and the git commit that ran it,
plus the software versions. Re-running the same command skips stages that are done with
unchanged inputs, resumes an interrupted or failed one (pretraining from its last checkpoint,
transfer from each seed's), and redoes a stage whose inputs changed, or one named with --redo:
its old outputs are moved to superseded/<time>/, never deleted, and the stages after it see the
new inputs and are redone in turn.

The study is a graph (graph.py): a job per stage and per transfer trial (init x seed), each waiting
only for the stages whose outputs it reads (random-init trials for nothing but the data). --dry-run
prints it with the critical path and the wall time with fan-out against the sequential sum;
`--jobs N` runs it on this machine, N jobs at once, each in its own process (local.py), with the
same records and report as one job after another. `mocobench status RUN_DIR` shows where it stands.

`--stage STAGE` runs one stage (those before it must be done). `--launcher slurm`
(mocobench.launch) submits one job per stage that is not done, each running `--stage STAGE` with
the stage's own resources (NUM_NODES nodes for pretrain, supervised and transfer) after the
previous job succeeded; a stage that spans several nodes gets this node's place as transfer's
--num-machines / --machine-rank / --dist-url, and machine 0 writes the manifest.
"""


def build_parser():
    parser = argparse.ArgumentParser(prog="mocobench pipeline", description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE",
                        help="configs/pipeline/*.yaml")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate every stage, list the stages, their inputs (what is "
                             "missing) and expected times; run nothing, write nothing")
    parser.add_argument("--redo", action="append", default=[], metavar="STAGE",
                        help="run STAGE again even if it is done (its old outputs go to "
                             "superseded/); repeatable")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="run the study's jobs (a stage, or one transfer trial: init x seed) "
                             "side by side on this machine, up to N at once, each in its own "
                             "process, when what it reads is done (default: visible GPUs // "
                             "TRANSFER.NUM_GPUS; 1 on CPU: one stage after another)")
    parser.add_argument("--stage", default=None, metavar="STAGE",
                        help="run STAGE alone; the stages before it must be done (what each job of "
                             "--launcher slurm runs)")
    parser.add_argument("--trial", type=int, default=None, metavar="I",
                        help="with --stage transfer_INIT: run its trial I alone (seed SEED + I; "
                             "what each task of a --launcher slurm job array runs)")
    group = parser.add_argument_group("machines of a stage that spans NUM_NODES nodes (set by "
                                      "--launcher slurm; transfer's meaning)")
    group.add_argument("--num-machines", type=int, default=1)
    group.add_argument("--machine-rank", type=int, default=0)
    group.add_argument("--dist-url", default="auto", help="tcp://HOST:PORT of machine 0")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE",
                        help="config overrides (flags may come before or after)")
    return parser


def parse(argv):
    """(args, Pipeline) of a `mocobench pipeline` command line; the config is merged and
    validated."""
    args = build_parser().parse_intermixed_args(argv)
    args.config_file = resolve_config_path(args.config_file, os.getcwd(), "--config-file")
    cfg = load_pipeline_config(args.config_file, args.opts)
    if not 0 <= args.machine_rank < args.num_machines:
        raise UsageError(f"--machine-rank {args.machine_rank} with --num-machines "
                         f"{args.num_machines}: expected 0 <= rank < machines")
    if args.trial is not None and not (args.stage or "").startswith("transfer_"):
        raise UsageError(f"--trial {args.trial}: expected with --stage transfer_INIT")
    if args.trial is not None and not 0 <= args.trial < cfg.TRANSFER.SEEDS:
        raise UsageError(f"--trial {args.trial}: expected 0 <= trial < TRANSFER.SEEDS "
                         f"({cfg.TRANSFER.SEEDS})")
    place = Place(args.num_machines, args.machine_rank, args.dist_url)
    return args, Pipeline(cfg, args.config_file, redo=args.redo, only=args.stage, place=place,
                          trial=args.trial)


def slurm_jobs(argv, gpus_per_node):
    """For `mocobench pipeline --launcher slurm ARGV`: the preflight and the study's graph (printed;
    a missing input is an error, nothing is submitted), then the graph's jobs that are not done, in
    dependency order, as [(graph.Job, its `mocobench pipeline` argv)]: `--stage STAGE` for a stage,
    `--stage transfer_INIT --trial I` for a trial; the Pipeline; and whether it is a --dry-run.
    Every job runs through the manifest, so a requeued job resumes and a re-submitted pipeline
    submits only what is not done."""
    from mocobench.pipeline.graph import build_jobs, print_graph

    args, pipeline = parse(argv)
    if args.stage or args.num_machines != 1:
        raise UsageError("--stage / --num-machines with --launcher slurm: the launcher submits a "
                         "job per stage and per trial and sets them; submit the whole pipeline")
    graph = []

    def show_graph(rows):
        graph.extend(build_jobs(pipeline.wiring, rows, gpus_per_node))
        print_graph(graph, slots=len(graph) or 1, gpus=0)

    pipeline.preflight(then=show_graph)
    jobs = []
    for job in graph:
        redo = ["--redo", job.stage] if job.stage in pipeline.redo else []
        trial = [] if job.trial is None else ["--trial", str(job.trial)]
        # OUTPUT_DIR absolute: the same run wherever the job starts
        jobs.append((job, ["--config-file", pipeline.config_file, "--stage", job.stage, *trial,
                           *redo, *args.opts, "OUTPUT_DIR", pipeline.run_dir]))
    return jobs, pipeline, args.dry_run


def main(argv) -> int:
    args, pipeline = parse(argv)
    pipeline.run(dry_run=args.dry_run, jobs=args.jobs)
    return 0
