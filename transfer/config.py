"""Loading a detection config: detectron2's CfgNode plus a small MOCOBENCH namespace, with clear
errors."""

from mocobench.utils import d2compat  # noqa: F401  (before any detectron2 import)

# isort: split
import os

from detectron2.config import CfgNode, get_cfg

# Res5ROIHeadsExtraNorm, DilatedFCNHead: configs name them, loading registers
import transfer.heads  # noqa: F401
from mocobench.utils.config import merge_config
from mocobench.utils.converted import recorded_resnets
from mocobench.utils.env import check_tf32
from mocobench.utils.errors import UsageError
from mocobench.utils.events import check_wandb

# the MODEL.RESNETS keys a converted .pkl records; a config that leaves one at detectron2's default
# takes its value
RESNET_KEYS = ("DEPTH", "NUM_GROUPS", "WIDTH_PER_GROUP", "RES2_OUT_CHANNELS", "STRIDE_IN_1X1")


def add_mocobench_config(cfg: CfgNode):
    """Keys of our own; everything else is detectron2's, unknown keys stay errors."""
    cfg.MOCOBENCH = CfgNode()
    # period (iterations) of metrics.json / the console metric lines; detectron2's DefaultTrainer
    # uses 20
    cfg.MOCOBENCH.LOG_PERIOD = 20
    # refuse to start training when MODEL.WEIGHTS is empty (the benchmark configs: a transfer run
    # from random init is a different experiment, so it must be asked for explicitly with
    # MODEL.WEIGHTS "")
    cfg.MOCOBENCH.REQUIRE_WEIGHTS = False
    # the generated-dataset directory the synth_* names point at (see transfer.datasets)
    cfg.MOCOBENCH.SYNTH_ROOT = ""
    # TF32 tensor-core math for CUDA fp32 matmuls and cuDNN convolutions (Ampere+), set explicitly
    # at the start of each trial and recorded in results.json (mocobench.utils.env.set_tf32): None
    # = torch's defaults (cuDNN on, matmul off), what detectron2's train_net.py runs with on an
    # A100/H100; False reproduces the paper's V100 fp32 fine-tuning; True: both on
    cfg.MOCOBENCH.TF32 = None
    # optional Weights & Biases logging of each trial (pip install -e '.[wandb]'; docs/logging.md):
    # the scalars of its metrics.json, its config and run record as the W&B run's config
    cfg.MOCOBENCH.WANDB = CfgNode()
    cfg.MOCOBENCH.WANDB.ENABLED = False
    cfg.MOCOBENCH.WANDB.PROJECT = "mocobench"
    # transfer.heads.DilatedFCNHead (the MoCo paper's semantic-segmentation head): its 3x3 convs
    # and their dilation
    cfg.MODEL.SEM_SEG_HEAD.NUM_CONVS = 2
    cfg.MODEL.SEM_SEG_HEAD.DILATION = 6

def load_config(config_file: str, opts=()) -> CfgNode:
    """get_cfg() + our keys, merged with `config_file` and `opts`; bad keys/values raise
    UsageError."""
    cfg = get_cfg()
    add_mocobench_config(cfg)
    cfg = merge_config(cfg, config_file, opts)
    check_tf32("MOCOBENCH.TF32", cfg.MOCOBENCH.TF32)
    if cfg.MOCOBENCH.WANDB.ENABLED:
        check_wandb("MOCOBENCH.WANDB.ENABLED")
    return cfg

def _walk(node: CfgNode, prefix=""):
    for key, value in node.items():
        if isinstance(value, CfgNode):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield node, key, f"{prefix}{key}", value

def swap_sync_bn(cfg: CfgNode, replacement: str = "naiveSyncBN") -> list:
    """Every `*.NORM: SyncBN` -> `replacement`; returns the keys changed.

    torch's SyncBatchNorm synchronizes only CUDA tensors in a process group; detectron2's
    NaiveSyncBatchNorm all-reduces the batch statistics with plain collectives, so it synchronizes
    CPU processes over gloo.
    """
    changed = []
    for node, key, full_key, value in _walk(cfg):
        if key == "NORM" and value == "SyncBN":
            node[key] = replacement
            changed.append(full_key)
    return changed


def configure_resnet(cfg, weights_path=None, explicit=()):
    """Make a detectron2 cfg build the ResNet that a converted .pkl holds; returns notes for the
    log.

    MODEL.RESNETS keys the config leaves at detectron2's defaults take the .pkl's values; a key set
    to something else, or set explicitly (`explicit`: the full keys the yaml chain and the
    command line set, mocobench.utils.config.set_keys; `MODEL.RESNETS.DEPTH 50` is detectron2's
    default but still the user's word), must agree, or UsageError naming both. Weights without a
    recorded architecture (detectron2 model-zoo files, URLs, .pth checkpoints) leave the config as
    it is.
    """
    path = weights_path if weights_path is not None else cfg.MODEL.WEIGHTS
    if not path or not str(path).endswith(".pkl") or not os.path.isfile(path):
        return []
    recorded, architecture = recorded_resnets(path)
    if recorded is None:
        return []
    resnets, changed, defaults = cfg.MODEL.RESNETS, [], get_cfg().MODEL.RESNETS
    for key in RESNET_KEYS:
        if key not in recorded:
            continue
        default = defaults[key]
        want, have = recorded[key], resnets[key]
        if have == want:
            continue
        if have != default or f"MODEL.RESNETS.{key}" in explicit:
            raise UsageError(f"MODEL.RESNETS.{key} is {have} but MODEL.WEIGHTS {path!r} holds a "
                             f"{architecture or 'ResNet'} ({key} {want}); drop the override or "
                             "convert the matching checkpoint")
        resnets[key] = want
        changed.append(f"{key} {want}")
    # unused by a SemanticSegmentor, whose default still names Res5ROIHeads
    head = cfg.MODEL.ROI_HEADS.NAME
    if recorded["RES2_OUT_CHANNELS"] == 64 and head.startswith("Res5ROIHeads") and \
            cfg.MODEL.META_ARCHITECTURE != "SemanticSegmentor":
        raise UsageError(f"MODEL.WEIGHTS {path!r} holds a {architecture} (basic blocks) but "
                         f"MODEL.ROI_HEADS.NAME {head} builds res5 from bottleneck blocks; use an "
                         "FPN config")
    if changed:
        return [f"MODEL.RESNETS from {os.path.basename(path)} ({architecture}): "
                f"{', '.join(changed)}"]
    return []
