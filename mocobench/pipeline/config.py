"""The pipeline yaml: its keys, loading it, and each stage's own config as the pipeline gives it.

Loading makes every path absolute (sub-configs found by resolve_config_path, relative to the yaml's
folder first), so a run does not depend on the working directory it was started from. A stage's
config is merged and validated here, once for the preflight and again when the stage runs, so an
error names the pipeline yaml and the OPTS list it came from.
"""
import os

from fvcore.common.config import CfgNode

from mocobench.utils.config import (
    CONFIGS_DIR,
    config_path,
    full_keys,
    merge_config,
    resolve_config_path,
)
from mocobench.utils.errors import UsageError

INITS = ("moco", "supervised", "random")


def get_pipeline_cfg() -> CfgNode:
    cfg = CfgNode()
    cfg.OUTPUT_DIR = "output/pipeline"
    cfg.DATA = CfgNode()
    cfg.DATA.SYNTH = False  # generate the datasets into OUTPUT_DIR/data (`mocobench data synth`)
    cfg.DATA.SYNTH_PRESET = "demo"
    cfg.DATA.SYNTH_SEED = 0
    cfg.DATA.SYNTH_OPTS = []  # extra `mocobench data synth` flags, e.g. ["--scenes", "64"]
    # ImageFolder root with train/ (and val/ for kNN); synth: data/imagenet
    cfg.DATA.PRETRAIN_ROOT = ""
    cfg.PRETRAIN = CfgNode()
    cfg.PRETRAIN.CONFIG_FILE = ""
    cfg.PRETRAIN.OPTS = []
    # processes for pretrain and supervised on each node: 0 = every visible GPU (1 on CPU);
    # mocobench.launch
    cfg.PRETRAIN.NPROC_PER_NODE = 0
    cfg.SUPERVISED = CfgNode()
    # train the supervised baseline on the same images with labels ...
    cfg.SUPERVISED.CONFIG_FILE = ""
    cfg.SUPERVISED.OPTS = []
    # ... or use this torchvision checkpoint (resnet50-*.pth) or MSRA R-50.pkl
    cfg.SUPERVISED.WEIGHTS = ""
    cfg.TRANSFER = CfgNode()
    cfg.TRANSFER.CONFIG_FILE = ""
    # per init, the detection config to use instead of CONFIG_FILE ("" = CONFIG_FILE). The paper's
    # supervised row: SUPERVISED.WEIGHTS /path/R-50.pkl (MSRA, BGR, caffe-style; used as is, no
    # conversion) with CONFIG_FILES.SUPERVISED configs/detection/pascal_voc_R_50_C4_24k.yaml;
    # torchvision weights need the _moco one.
    cfg.TRANSFER.CONFIG_FILES = CfgNode({init.upper(): "" for init in INITS})
    cfg.TRANSFER.OPTS = []
    cfg.TRANSFER.INITS = list(INITS)
    cfg.TRANSFER.SEEDS = 3
    # 0 = every visible GPU when the detection config runs on CUDA, else 1 process
    cfg.TRANSFER.NUM_GPUS = 0
    cfg.TRANSFER.RANDOM_OPTS = []  # extra overrides for the random-init runs
    # nodes of the stages that train (pretrain, supervised, transfer_*); the others run on one.
    # Several nodes need a launcher that starts each stage on all of them:
    # `mocobench pipeline --launcher slurm` (a job per stage)
    cfg.NUM_NODES = 1
    return cfg


def load_pipeline_config(config_file, opts) -> CfgNode:
    """The pipeline config, checked, with every path made absolute: sub-configs found by
    resolve_config_path (relative to this yaml's folder first), data paths and OUTPUT_DIR relative
    to the working directory."""
    _refuse_other_kinds(config_file)
    cfg = merge_config(get_pipeline_cfg(), config_file, opts)
    _check(cfg, config_file)
    _make_paths_absolute(cfg, config_file)
    cfg.freeze()
    return cfg


def config_kind(config_file):
    """'pipeline', 'pretrain' or 'transfer': the first config whose keys include every key the
    file (with its _BASE_ chain) sets; None when none does or it cannot be read (merge_config then
    says why)."""
    try:
        keys = set(full_keys(CfgNode.load_yaml_with_base(config_path(config_file))))
    except Exception:  # missing, not YAML, a broken _BASE_ ...: merge_config names the problem
        return None

    def pretrain():
        from pretrain.config import get_cfg

        return get_cfg()

    def transfer():  # detectron2's config, after mocobench.utils.d2compat
        from transfer.config import add_mocobench_config, get_cfg

        cfg = get_cfg()
        add_mocobench_config(cfg)
        return cfg

    for kind, defaults in (("pipeline", get_pipeline_cfg), ("pretrain", pretrain),
                           ("transfer", transfer)):
        if keys <= set(full_keys(defaults())):
            return kind
    return None


# what a stage config given to `mocobench pipeline` is, and where it belongs
_OTHER_KINDS = {
    "pretrain": ("a pretrain config", "mocobench pretrain", " (a supervised baseline: mocobench "
                 "supervised)", "PRETRAIN.CONFIG_FILE"),
    "transfer": ("a transfer (detectron2) config", "mocobench transfer", "",
                 "TRANSFER.CONFIG_FILE"),
}


def _refuse_other_kinds(config_file):
    """A pretrain or transfer yaml given as the pipeline config: one line saying what it is and the
    command that takes it, not "unknown config key MODEL"."""
    kind = config_kind(config_file)
    if kind in _OTHER_KINDS:
        what, command, other, key = _OTHER_KINDS[kind]
        name = config_file
        if os.path.abspath(config_file).startswith(CONFIGS_DIR + os.sep):  # a shipped config
            name = os.path.relpath(os.path.abspath(config_file), os.path.dirname(CONFIGS_DIR))
        raise UsageError(f"{name} is {what}, not a pipeline config: run it with `{command} "
                         f"--config-file {name}`{other}, or name it as {key} in a pipeline "
                         "config (configs/pipeline/)")


def _check(cfg, config_file):
    unknown = [i for i in cfg.TRANSFER.INITS if i not in INITS]
    if unknown or not cfg.TRANSFER.INITS:
        raise UsageError(f"TRANSFER.INITS {list(cfg.TRANSFER.INITS)}: expected a non-empty subset "
                         f"of {list(INITS)}")
    for key in ("PRETRAIN.CONFIG_FILE", "TRANSFER.CONFIG_FILE"):
        node, leaf = key.split(".")
        if not cfg[node][leaf]:
            raise UsageError(f"{config_file}: {key} is required")
    if cfg.TRANSFER.SEEDS < 1:
        raise UsageError(f"{config_file}: TRANSFER.SEEDS = {cfg.TRANSFER.SEEDS} must be >= 1")
    if cfg.NUM_NODES < 1:
        raise UsageError(f"{config_file}: NUM_NODES = {cfg.NUM_NODES} must be >= 1")


def _make_paths_absolute(cfg, config_file):
    here = os.path.dirname(os.path.abspath(config_file))
    for node in ("PRETRAIN", "SUPERVISED", "TRANSFER"):
        if cfg[node].CONFIG_FILE:
            cfg[node].CONFIG_FILE = resolve_config_path(cfg[node].CONFIG_FILE, here,
                                                        f"{config_file}: {node}.CONFIG_FILE")
    for init, path in cfg.TRANSFER.CONFIG_FILES.items():
        if path:
            cfg.TRANSFER.CONFIG_FILES[init] = resolve_config_path(
                path, here, f"{config_file}: TRANSFER.CONFIG_FILES.{init}")
    for node, key in (("DATA", "PRETRAIN_ROOT"), ("SUPERVISED", "WEIGHTS")):
        if cfg[node][key]:
            cfg[node][key] = os.path.abspath(cfg[node][key])
    cfg.OUTPUT_DIR = os.path.abspath(cfg.OUTPUT_DIR)


def trains_classifier(cfg, name):
    """The stages that train a ResNet classifier: pretrain, and supervised unless its weights are
    given (SUPERVISED.WEIGHTS)."""
    return name == "pretrain" or (name == "supervised" and not cfg.SUPERVISED.WEIGHTS)


def transfer_config_file(cfg, init):
    """The detection config of `init`: TRANSFER.CONFIG_FILES.INIT, else TRANSFER.CONFIG_FILE."""
    return cfg.TRANSFER.CONFIG_FILES[init.upper()] or cfg.TRANSFER.CONFIG_FILE


def stage_config(cfg, config_file, name, init=None):
    """The merged, validated config of stage PRETRAIN / SUPERVISED / TRANSFER (of `init`, which may
    have its own CONFIG_FILES entry) with its OPTS (run paths left at their defaults: they are the
    pipeline's to set); errors name the pipeline yaml and the list."""
    node = cfg[name]
    source = f"{os.path.relpath(config_file)}: {name}.OPTS"
    if name == "TRANSFER":
        # detectron2's config, after mocobench.utils.d2compat
        from transfer.config import add_mocobench_config, get_cfg

        d2_cfg = get_cfg()
        add_mocobench_config(d2_cfg)
        path = transfer_config_file(cfg, init) if init else node.CONFIG_FILE
        opts = list(node.OPTS)
        if init == "random":  # what its trials run with (stages.Wiring.run_transfer)
            opts += list(node.RANDOM_OPTS)
            source += " + RANDOM_OPTS"
        return merge_config(d2_cfg, path, opts, source)
    from pretrain.config import load_config

    return load_config(node.CONFIG_FILE, [*node.OPTS, "DATA.ROOT", "<pipeline>"],
                       moco=name == "PRETRAIN", opts_source=source)
