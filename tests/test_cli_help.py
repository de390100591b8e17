"""The options of `mocobench transfer` and of the launch layer in front of every command, as a user
reads them in --help, and what they parse to when not given."""
import pytest

from mocobench.launch import build_parser as launch_parser
from transfer.run import build_parser as transfer_parser


def _help(parser):
    return " ".join(parser.format_help().split())


@pytest.fixture(autouse=True)
def _wide(monkeypatch):
    # argparse's textwrap would break lines at hyphens
    monkeypatch.setenv("COLUMNS", "1000")


SLURM_HELP = (
    "SLURM (submitit): --launcher {local,slurm} local: this node (default); slurm: submit a job "
    "with the options below --nodes NODES --gpus-per-node GPUS_PER_NODE also the processes (tasks) "
    "per node --cpus-per-task CPUS_PER_TASK default: a CPU per DataLoader worker + 1 per process "
    "of the task, from the command's config: (NUM_WORKERS + 1) for a task per GPU (pretrain, "
    "supervised: DATALOADER.NUM_WORKERS; lincls: --workers), (NUM_WORKERS + 1) x GPUs for "
    "transfer (one task per node that starts a process per GPU) and each pipeline stage "
    "--partition PARTITION --timeout MINUTES the job's time limit; before it, the job checkpoints "
    "and requeues itself --signal-delay SECONDS SLURM sends the warning signal (USR2) this long "
    "before the time limit: the time the job has to checkpoint and requeue itself --account "
    "ACCOUNT --qos QOS --constraint CONSTRAINT e.g. volta32gb --mem MEM SLURM --mem (per node), "
    "e.g. 400G; default: 40G x GPUs per node (at least one GPU's worth), as the MoCo v3 / DeiT / "
    "MAE submitit launchers ask; 0: all of the node's memory --comment COMMENT --max-concurrent N "
    "pipeline: at most N tasks of a job array (a transfer stage's trials) running at once (SLURM "
    "--array=...%N); default: no cap --job-dir JOB_DIR submitit's folder: logs and job pickles")
SLURM_USAGE = (
    "[--launcher {local,slurm}] [--nodes NODES] [--gpus-per-node GPUS_PER_NODE] [--cpus-per-task "
    "CPUS_PER_TASK] [--partition PARTITION] [--timeout MINUTES] [--signal-delay SECONDS] "
    "[--account ACCOUNT] [--qos QOS] [--constraint CONSTRAINT] [--mem MEM] [--comment COMMENT] "
    "[--max-concurrent N] [--job-dir JOB_DIR]")
SLURM_DEFAULTS = {"launcher": "local", "nodes": 1, "gpus_per_node": 8, "tasks_per_node": None,
                  "cpus_per_task": None, "partition": None, "timeout": 72 * 60,
                  "signal_delay": 120, "account": None, "qos": None, "constraint": None,
                  "mem": None, "comment": None, "max_concurrent": None,
                  "job_dir": "slurm_jobs/%j"}


def test_launch_options_of_a_per_rank_command_in_full():
    parser = launch_parser("pretrain")
    assert _help(parser) == (
        "usage: mocobench pretrain [--nproc-per-node NPROC_PER_NODE] [--nnodes NNODES] "
        "[--node-rank NODE_RANK] [--rdzv-endpoint RDZV_ENDPOINT] [--rdzv-id RDZV_ID] "
        + SLURM_USAGE + " processes (torchrun's options and meaning): --nproc-per-node "
        "NPROC_PER_NODE processes on this node (default: every visible CUDA device; 1 without "
        "CUDA) --nnodes NNODES nodes (or MIN:MAX for elastic jobs) --node-rank NODE_RANK "
        "--rdzv-endpoint RDZV_ENDPOINT HOST:PORT every node reaches (several nodes); default: a "
        "free local port --rdzv-id RDZV_ID the job's id, the same on every node " + SLURM_HELP)
    args, rest = parser.parse_known_args([])
    assert (vars(args), rest) == ({"nproc_per_node": None, "nnodes": "1", "node_rank": 0,
                                   "rdzv_endpoint": "", "rdzv_id": "mocobench",
                                   **SLURM_DEFAULTS}, [])
    # numbers are numbers; the command's own options (and abbreviations of ours, which may be its
    # own) and -h pass through to the command
    args, rest = parser.parse_known_args(
        ["--nproc-per-node", "2", "--node-rank", "1", "--nodes", "3", "--gpus-per-node", "4",
         "--tasks-per-node", "2", "--cpus-per-task", "5", "--timeout", "60", "--signal-delay",
         "30", "--max-concurrent", "7", "--gpus", "9", "-h", "--config-file", "x.yaml"])
    assert (args.nproc_per_node, args.node_rank, args.nodes, args.gpus_per_node,
            args.tasks_per_node, args.cpus_per_task, args.timeout, args.signal_delay,
            args.max_concurrent) == (2, 1, 3, 4, 2, 5, 60, 30, 7)
    assert rest == ["--gpus", "9", "-h", "--config-file", "x.yaml"]
    with pytest.raises(SystemExit):
        parser.parse_known_args(["--launcher", "cluster"])


def test_launch_options_of_a_single_process_command_in_full():
    parser = launch_parser("transfer")
    assert _help(parser) == "usage: mocobench transfer " + SLURM_USAGE + " " + SLURM_HELP
    args, rest = parser.parse_known_args(["--seeds", "3"])
    assert (vars(args), rest) == (SLURM_DEFAULTS, ["--seeds", "3"])


def test_transfer_help_in_full_and_its_defaults():
    parser = transfer_parser()
    assert _help(parser) == (
        "usage: mocobench transfer [-h] --config-file FILE [--num-gpus NUM_GPUS] [--num-machines "
        "NUM_MACHINES] [--machine-rank MACHINE_RANK] [--dist-url DIST_URL] [--seeds SEEDS] "
        "[--eval-only] [--resume] [--synth-root DIR] [--init-name INIT_NAME] [--print-config] ... "
        "Fine-tune detectron2 from converted weights and evaluate (detectron2's train_net "
        "conventions). positional arguments: opts detectron2 config overrides: KEY VALUE pairs, "
        "e.g. MODEL.WEIGHTS x.pkl options: -h, --help show this help message and exit "
        "--config-file FILE path to a detection config --num-gpus NUM_GPUS processes per machine: "
        "CUDA devices, or CPU processes (gloo) with MODEL.DEVICE cpu --num-machines NUM_MACHINES "
        "--machine-rank MACHINE_RANK the rank of this machine --dist-url DIST_URL initialization "
        "URL for torch.distributed, e.g. tcp://HOST:PORT ('auto': a free local port, one machine "
        "only) --seeds SEEDS independent trials: the i-th (i = 0, 1, ...) into "
        "OUTPUT_DIR/seed{i}/, its seed recorded in its results.json --eval-only evaluate "
        "MODEL.WEIGHTS (or with --resume, each trial's last checkpoint) without training --resume "
        "continue each trial from the last checkpoint in its directory (iteration, optimizer and "
        "lr schedule restored) --synth-root DIR generated dataset (mocobench data synth) behind "
        "the synth_* dataset names (default: $MOCOBENCH_SYNTH, else $DETECTRON2_DATASETS/synth) "
        "--init-name INIT_NAME the initialization's name (e.g. moco_v2, supervised): recorded in "
        "each trial's results.json, the row name in `mocobench report` (default: inferred from "
        "the record chain of MODEL.WEIGHTS: random without weights; for a .pkl from `mocobench "
        "convert`, moco_v1/v2/v3 or supervised by the checkpoint it was converted from; else the "
        "weights file's name, marked as guessed) --print-config print the config of the first "
        "trial as it would run (the merged config, MODEL.RESNETS from the weights' .pkl, "
        "OUTPUT_DIR/seed0 and its SEED; later trials differ in those two only) as YAML and exit; "
        "writes nothing, starts nothing, checks no dataset Example: mocobench transfer "
        "--config-file configs/detection/pascal_voc_R_50_C4_24k_moco.yaml --num-gpus 8 --seeds 5 "
        "MODEL.WEIGHTS moco.pkl OUTPUT_DIR out/voc")
    assert vars(parser.parse_args(["--config-file", "x.yaml"])) == {
        "config_file": "x.yaml", "num_gpus": 1, "num_machines": 1, "machine_rank": 0,
        "dist_url": "auto", "seeds": 1, "eval_only": False, "resume": False, "synth_root": None,
        "init_name": None, "print_config": False, "opts": []}
    args = parser.parse_args(["--config-file", "x.yaml", "--num-gpus", "2", "--num-machines", "3",
                              "--machine-rank", "1", "--seeds", "5", "--eval-only", "--resume",
                              "--print-config", "MODEL.WEIGHTS", "m.pkl"])
    assert (args.num_gpus, args.num_machines, args.machine_rank, args.seeds, args.eval_only,
            args.resume, args.print_config, args.opts) \
        == (2, 3, 1, 5, True, True, True, ["MODEL.WEIGHTS", "m.pkl"])
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --config-file is required


def test_slurm_without_submitit_is_a_one_line_error(monkeypatch):
    import argparse
    import sys

    from mocobench import launch
    from mocobench.utils.errors import UsageError

    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    with pytest.raises(UsageError) as e:
        launch._executor(argparse.Namespace(job_dir="jobs/%j"))
    assert str(e.value) == "--launcher slurm needs submitit: pip install -e '.[slurm]'"


def test_the_batch_scripts_last_lines_print_the_failing_ranks_error_from_the_jobs_folder(
        tmp_path):
    """submitit's job folder names the job id as %j; the batch script reads the failure file of
    its own job (SLURM_JOB_ID), quoted, and keeps srun's exit code."""
    from mocobench import launch

    folder = tmp_path / "my jobs"
    lines = launch._failure_teardown(str(folder / "%j"))
    assert lines == [
        "rc=$?",
        f"error_file='{folder}/'\"${{SLURM_JOB_ID}}\"/\"${{SLURM_JOB_ID}}\"_error.txt",
        'if [ "$rc" -ne 0 ] && [ -s "$error_file" ]; then cat "$error_file" >&2; fi',
        'exit "$rc"']


def test_a_machine_rank_outside_the_machines_is_refused_naming_both():
    from mocobench.utils.errors import UsageError
    from transfer.run import main

    with pytest.raises(UsageError) as e:
        main(["--config-file", "configs/detection/synth_voc_R18_FPN_cpu.yaml", "--num-machines",
              "2", "--machine-rank", "2"])
    assert str(e.value) == "--machine-rank 2 with --num-machines 2: expected 0 <= rank < machines"


def test_several_machines_need_a_rendezvous_address(synth_root):
    from mocobench.utils.errors import UsageError
    from transfer.run import main

    with pytest.raises(UsageError) as e:
        main(["--config-file", "configs/detection/synth_voc_R18_FPN_cpu.yaml", "--num-machines",
              "2", "--machine-rank", "0", "--synth-root", synth_root])
    assert str(e.value) == ("--dist-url auto picks a free port on this machine only; with "
                            "--num-machines 2 pass --dist-url tcp://HOST:PORT (HOST: the machine "
                            "of rank 0)")


def test_more_gpus_than_visible_are_refused_naming_both(monkeypatch):
    import torch

    from mocobench.utils.errors import UsageError
    from transfer.config import load_config
    from transfer.run import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = load_config("configs/detection/synth_voc_R18_FPN_cpu.yaml", ["MODEL.DEVICE", "cuda"])
    check_device(cfg, 1)
    with pytest.raises(UsageError) as e:
        check_device(cfg, 2)
    assert str(e.value) == "--num-gpus 2 but only 1 CUDA device(s) are visible"



def test_pipeline_help_lists_every_option_with_what_it_takes():
    from mocobench import pipeline

    text = _help(pipeline.build_parser())
    assert text.startswith(
        "usage: mocobench pipeline [-h] --config-file FILE [--dry-run] [--redo STAGE] [--jobs N] "
        "[--stage STAGE] [--trial I] [--num-machines NUM_MACHINES] [--machine-rank MACHINE_RANK] "
        "[--dist-url DIST_URL] [KEY VALUE ...] ")
    assert text.endswith(
        "positional arguments: KEY VALUE config overrides (flags may come before or after) "
        "options: -h, --help show this help message and exit --config-file FILE "
        "configs/pipeline/*.yaml --dry-run validate every stage, list the stages, their inputs "
        "(what is missing) and expected times; run nothing, write nothing --redo STAGE run STAGE "
        "again even if it is done (its old outputs go to superseded/); repeatable --jobs N run "
        "the study's jobs (a stage, or one transfer trial: init x seed) side by side on this "
        "machine, up to N at once, each in its own process, when what it reads is done (default: "
        "visible GPUs // TRANSFER.NUM_GPUS; 1 on CPU: one stage after another) --stage STAGE run "
        "STAGE alone; the stages before it must be done (what each job of --launcher slurm runs) "
        "--trial I with --stage transfer_INIT: run its trial I alone (seed SEED + I; what each "
        "task of a --launcher slurm job array runs) machines of a stage that spans NUM_NODES "
        "nodes (set by --launcher slurm; transfer's meaning): --num-machines NUM_MACHINES "
        "--machine-rank MACHINE_RANK --dist-url DIST_URL tcp://HOST:PORT of machine 0")
