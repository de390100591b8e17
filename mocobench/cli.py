"""The `mocobench` command: one table of commands, each a module with `main(argv) -> int` that owns
its argparse parser (so `mocobench env` never pays for importing torch or detectron2). The commands
that run on many processes or a cluster go through mocobench.launch; how any command ends becomes
its exit code in one place, mocobench.utils.errors.run_main."""
import dataclasses
import importlib
import sys
from typing import Optional

from mocobench.utils.errors import run_main


@dataclasses.dataclass(frozen=True)
class Command:
    module: str  # main(argv) -> int
    help: str
    launched: bool = False  # through mocobench.launch: --nproc-per-node ..., --launcher slurm
    per_rank: bool = False  # launched: one process (SLURM task) per GPU, env://; else one per node
    # launched: the flags a requeued job continues with; None: not requeued
    resume: Optional[tuple] = None


def _trained(module, help_):  # a training command: a process per GPU, requeued with --resume auto
    return Command(module, help_, launched=True, per_rank=True, resume=("--resume", "auto"))


COMMANDS = {  # in the order data flows
    "env": Command("mocobench.info",
                   "print the software environment and the active detectron2 fixes"),
    "configs": Command("mocobench.catalog",
                       "list the shipped configs: kind (paper / cpu / test / base) and purpose"),
    "data": Command("synth.cli",
                    "generate datasets in the real on-disk formats: "
                    "mocobench data synth --out DIR"),
    "pretrain": _trained("pretrain.train",
                         "MoCo v1/v2/v3 pretraining of a torchvision ResNet "
                         "(configs/pretrain/*.yaml)"),
    "supervised": _trained("pretrain.supervised",
                           "supervised pretraining of a torchvision ResNet: the baseline"),
    "lincls": _trained("pretrain.lincls",
                       "linear classification on a frozen MoCo backbone (official protocol)"),
    "convert": Command("convert.cli",
                       "ResNet checkpoint of any SSL framework -> verified detectron2 .pkl / "
                       "torchvision .pth"),
    # detectron2's launch spawns a process per GPU; --resume continues the trials
    "transfer": Command("transfer.run",
                        "fine-tune detectron2 from a converted .pkl on VOC/COCO, "
                        "N seeds, AP per seed", launched=True, resume=("--resume",)),
    "report": Command("transfer.report",
                      "AP tables (mean ± std over seeds, deltas to supervised) "
                      "and plots from run dirs"),
    # its manifest resumes every stage
    "pipeline": Command("mocobench.pipeline",
                        "data -> pretrain -> convert -> transfer (inits x seeds) -> report, "
                        "resumable",
                        launched=True, resume=()),
    # reads a pipeline's run directory and asks the scheduler; writes nothing
    "status": Command("mocobench.status",
                      "where a study stands: each stage and trial, SLURM job states, seeds "
                      "finished, AP, ETA"),
    # reads what any of the above wrote
    "show": Command("mocobench.show",
                    "what a run dir, checkpoint or .pkl is and how it was made (sha256, "
                    "results)"),
}


def version_text() -> str:
    """`mocobench --version`: this mocobench and the versions it runs on (package metadata only:
    no torch import)."""
    import mocobench
    from mocobench.utils.env import software_versions

    v = software_versions()
    others = ", ".join(f"{name} {v[name] or 'not installed'}"
                       for name in ("torch", "torchvision", "detectron2"))
    return f"mocobench {mocobench.__version__}\n{others}, python {v['python']}"


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: mocobench <command> [args...]", "       mocobench --version", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {command.help}" for name, command in COMMANDS.items()]
    lines += ["", "`mocobench <command> --help` shows a command's options."]
    return "\n".join(lines)


def _print_and_exit(text, code):
    """A main() that prints `text` (through run_main: a closed pipe ends quietly)."""
    def main(_argv):
        print(text)
        return code
    return main


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        return run_main("mocobench", _print_and_exit(_usage(), 0 if argv else 2), argv)
    if argv[0] in ("-V", "--version"):
        return run_main("mocobench", _print_and_exit(version_text(), 0), argv)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mocobench: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if COMMANDS[name].launched:
        from mocobench import launch

        return run_main(f"mocobench {name}", lambda args: launch.main(name, args), rest)
    return run_main(f"mocobench {name}", importlib.import_module(COMMANDS[name].module).main, rest)


if __name__ == "__main__":
    sys.exit(main())
