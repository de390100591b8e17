"""Loading a detection config: detectron2's CfgNode plus a small MOCOBENCH namespace, with clear errors."""

from mocobench import d2compat  # noqa: F401  (before any detectron2 import)

# isort: split
from detectron2.config import CfgNode, get_cfg

import transfer.heads  # noqa: F401  (Res5ROIHeadsExtraNorm: configs name it, so loading one registers it)
from mocobench.config import merge_config


def add_mocobench_config(cfg: CfgNode):
    """Keys of our own; everything else is detectron2's, unknown keys stay errors."""
    cfg.MOCOBENCH = CfgNode()
    # period (iterations) of metrics.json / the console metric lines; detectron2's DefaultTrainer uses 20
    cfg.MOCOBENCH.LOG_PERIOD = 20
    # refuse to start training when MODEL.WEIGHTS is empty (the benchmark configs: a transfer run from
    # random init is a different experiment, so it must be asked for explicitly with MODEL.WEIGHTS "")
    cfg.MOCOBENCH.REQUIRE_WEIGHTS = False
    # the generated-dataset directory the synth_* names point at (see transfer.datasets)
    cfg.MOCOBENCH.SYNTH_ROOT = ""
    # TF32 tensor-core math for CUDA fp32 matmuls and cuDNN convolutions (Ampere+), set explicitly at the start of
    # each trial and recorded in results.json; False reproduces the paper's V100 fp32 fine-tuning
    cfg.MOCOBENCH.TF32 = False

def load_config(config_file: str, opts=()) -> CfgNode:
    """get_cfg() + our keys, merged with `config_file` and `opts`; bad keys/values raise UsageError."""
    cfg = get_cfg()
    add_mocobench_config(cfg)
    return merge_config(cfg, config_file, opts)

def _walk(node: CfgNode, prefix=""):
    for key, value in node.items():
        if isinstance(value, CfgNode):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield node, key, f"{prefix}{key}", value

def swap_sync_bn(cfg: CfgNode, replacement: str = "naiveSyncBN") -> list:
    """Every `*.NORM: SyncBN` -> `replacement`; returns the keys changed.

    torch's SyncBatchNorm synchronizes only CUDA tensors in a process group; detectron2's NaiveSyncBatchNorm
    all-reduces the batch statistics with plain collectives, so it synchronizes CPU processes over gloo.
    """
    changed = []
    for node, key, full_key, value in _walk(cfg):
        if key == "NORM" and value == "SyncBN":
            node[key] = replacement
            changed.append(full_key)
    return changed
