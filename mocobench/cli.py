"""The `mocobench` command: a thin dispatcher over the stage modules.

Each subcommand is a module with `main(argv: list[str]) -> int` that owns its own argparse parser,
so `mocobench env` never pays for importing torch or detectron2. Register a subcommand by adding one
line to SUBCOMMANDS.
"""
import importlib
import sys

from mocobench.utils.errors import CommandFailed, UsageError

# name -> (module, one-line help)
SUBCOMMANDS = {  # in the order data flows
    "env": ("mocobench.info", "print the software environment and the active detectron2 fixes"),
    "configs": ("mocobench.catalog", "list the shipped configs: kind (paper / cpu / test / base) and purpose"),
    "data": ("synth.generate", "generate datasets in the real on-disk formats: mocobench data synth --out DIR"),
    "pretrain": ("pretrain.train", "MoCo v1/v2/v3 pretraining of a torchvision ResNet (configs/pretrain/*.yaml)"),
    "supervised": ("pretrain.supervised", "supervised pretraining of a torchvision ResNet: the baseline"),
    "lincls": ("pretrain.lincls", "linear classification on a frozen MoCo backbone (official protocol)"),
    "convert": ("convert.cli", "ResNet checkpoint of any SSL framework -> verified detectron2 .pkl / torchvision .pth"),
    "transfer": ("transfer.run", "fine-tune detectron2 from a converted .pkl on VOC/COCO, N seeds, AP per seed"),
    "report": ("transfer.report", "AP tables (mean ± std over seeds, deltas to supervised) and plots from run dirs"),
    "pipeline": ("mocobench.pipeline", "data -> pretrain -> convert -> transfer x inits x seeds -> report, resumable "
                                      "(--dry-run: the plan and what is missing)"),
}


def _usage() -> str:
    width = max(len(n) for n in SUBCOMMANDS)
    lines = ["usage: mocobench <command> [args...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "`mocobench <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"mocobench: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        from mocobench import launch  # commands that run on many processes / a cluster go through the launcher

        if name in launch.STAGES:
            return launch.main(name, rest)
        return int(importlib.import_module(SUBCOMMANDS[name][0]).main(rest) or 0)
    except UsageError as e:
        print(f"mocobench {name}: error: {e}", file=sys.stderr)
        return 2
    except CommandFailed as e:  # it ran, then failed or stopped: its line says why and what next
        print(e, file=sys.stderr, flush=True)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
