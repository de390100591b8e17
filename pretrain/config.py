"""Pretraining config: an fvcore CfgNode with every key and its default (detectron2 style).

A YAML file sets what differs from these defaults and may inherit from another file with `_BASE_`;
`KEY VALUE` pairs on the command line come last. Unknown keys are an error that names the key.

Learning rate: SOLVER.BASE_LR is per 256 images (linear scaling rule, Goyal et al. 2017), the
optimizer gets
    lr = SOLVER.BASE_LR * SOLVER.BATCH_SIZE / 256
with SOLVER.BATCH_SIZE the global batch (all processes together), so a config trains the same way on
any number of devices.
"""

from fvcore.common.config import CfgNode as _FvcoreCfgNode

from mocobench.utils.config import merge_config
from mocobench.utils.env import check_tf32
from mocobench.utils.errors import UsageError


class CfgNode(_FvcoreCfgNode):
    pass


_C = CfgNode()
_C.MODEL = CfgNode()
_C.MODEL.ARCH = "resnet50"  # any torchvision ResNet: resnet18/34/50/101/152, resnext*, wide_resnet*
# MoCo v3 builds its ResNet with zero-initialised last BN of each block
_C.MODEL.ZERO_INIT_RESIDUAL = False

_C.MOCO = CfgNode()
_C.MOCO.VERSION = "v1"  # v1 | v2 | v3
_C.MOCO.DIM = 128  # feature dimension of q and k
_C.MOCO.K = 65536  # queue size (v1/v2); must be divisible by SOLVER.BATCH_SIZE
_C.MOCO.M = 0.999  # key encoder momentum (v3: start value of the cosine schedule to 1 when M_COS)
_C.MOCO.M_COS = False
_C.MOCO.T = 0.07  # softmax temperature
_C.MOCO.MLP = False  # v2: 2-layer MLP head (hidden = encoder feature width, ReLU)
_C.MOCO.MLP_DIM = 4096  # v3: hidden width of projector and predictor
# One process: BN statistics over this many groups of the batch in both encoders, emulating the
# per-device BN of a multi-GPU run (the key batch is shuffled first: shuffle BN). Ignored (each rank
# is a group) with >1 process.
_C.MOCO.SHUFFLE_BN_SPLITS = 8

_C.INPUT = CfgNode()
_C.INPUT.SIZE = 224
_C.INPUT.AUG = "v1"  # v1 | v2 (aug+) | v3 (asymmetric, crop scale 0.08-1): pretrain.augment
# RandomResizedCrop area range (min, max); () = the recipe's own (0.2-1 for v1/v2, 0.08-1 for v3 and
# supervised). Small object-centric images (the generated data) need a larger minimum, or crops miss
# the object entirely.
_C.INPUT.CROP_SCALE = ()

_C.DATA = CfgNode()
_C.DATA.ROOT = ""  # ImageFolder root holding train/ (and val/ for the kNN monitor)

_C.DATALOADER = CfgNode()
_C.DATALOADER.NUM_WORKERS = 8  # per process

_C.SOLVER = CfgNode()
_C.SOLVER.OPTIMIZER = "sgd"  # sgd | lars
_C.SOLVER.EPOCHS = 200
_C.SOLVER.BATCH_SIZE = 256  # global
_C.SOLVER.BASE_LR = 0.03  # per 256 images
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.WEIGHT_DECAY = 1e-4
_C.SOLVER.SCHEDULE = "step"  # step | cosine
_C.SOLVER.STEPS = (120, 160)  # epochs at which the step schedule multiplies lr by GAMMA
_C.SOLVER.GAMMA = 0.1
_C.SOLVER.WARMUP_EPOCHS = 0  # linear warmup from 0 (per iteration)
# False: lr changes once per epoch (official v1/v2); True: every iteration (official v3)
_C.SOLVER.LR_PER_ITER = False
# A mid-epoch resume point every this many iterations (0 = none): bounds what a SIGKILL loses to
# this many iterations; each one replaces the previous (pretrain.resume). SIGTERM/SIGUSR1/Ctrl-C
# always save one.
_C.SOLVER.CHECKPOINT_PERIOD_ITERS = 0

# Precision. The official recipes: MoCo v1/v2 train in fp32 (facebookresearch/moco main_moco.py has
# no autocast); MoCo v3 trains under fp16 autocast with a GradScaler (facebookresearch/moco-v3
# main_moco.py: torch.cuda.amp.autocast(True) + torch.cuda.amp.GradScaler()). Under AMP the MoCo
# v1/v2 logits and loss are still computed in fp32 against the fp32 queue
# (pretrain.moco.MoCo.contrastive_logits).
_C.AMP = CfgNode()
# None = the recipe's: on for MoCo v3 on CUDA, off for v1/v2 and on CPU. True/False forces it
_C.AMP.ENABLED = None
# float16 (official v3, with a GradScaler) | bfloat16 (opt-in; fp16 on GPUs without bf16)
_C.AMP.DTYPE = "float16"
# TF32 tensor-core math for CUDA float32 matmuls and cuDNN convolutions (Ampere and newer GPUs).
# None (null) = torch's defaults, what the official scripts run with on an A100/H100: cuDNN
# convolutions in TF32, matmuls in IEEE fp32. True: both TF32 (faster still); False: both IEEE fp32,
# the papers' V100 numerics (no TF32 there), slower convolutions on an A100/H100. Set
# explicitly at start, written to log.txt and OUTPUT_DIR/precision.json (mocobench.utils.env).
_C.TF32 = None

_C.CHANNELS_LAST = None  # None = auto: on for CUDA, off for CPU
_C.COMPILE = False  # torch.compile the encoders (opt-in)
_C.DEVICE = ""  # "" = cuda if available else cpu
_C.SEED = 0

_C.KNN = CfgNode()
_C.KNN.PERIOD = 10  # epochs; 0 = never. Runs on DATA.ROOT/train -> DATA.ROOT/val when val/ exists
_C.KNN.K = 200
_C.KNN.T = 0.1
_C.KNN.BATCH_SIZE = 256

_C.LOG_PERIOD = 20  # iterations between metrics.json / TensorBoard records

# Optional Weights & Biases logging (pip install -e '.[wandb]'; docs/logging.md): the scalars of
# metrics.json and this config as the W&B run's config. Off by default.
_C.WANDB = CfgNode()
_C.WANDB.ENABLED = False
_C.WANDB.PROJECT = "mocobench"
_C.WANDB.NAME = ""  # "" = the OUTPUT_DIR's name
# A checkpoint is written after every epoch (resume point); one every CHECKPOINT_PERIOD epochs and
# the last one are kept, the others are deleted once the next one is written.
_C.CHECKPOINT_PERIOD = 10
_C.OUTPUT_DIR = "./output/pretrain"

# The linear protocol (`mocobench lincls`, pretrain.lincls) builds its config from its flags: these
# are the values it resolved from them and the recipe (recorded in config.yaml and every
# checkpoint).
_C.LINCLS = CfgNode()
_C.LINCLS.PRETRAINED = ""  # the MoCo checkpoint whose frozen backbone is evaluated (absolute path)
_C.LINCLS.RECIPE = "v1v2"  # v1v2 | v3: the official main_lincls recipe
_C.LINCLS.LR = 30.0  # the learning rate itself (the v3 recipe's batch scaling already applied)
_C.LINCLS.MILESTONES = (60, 80)  # epochs at which lr drops x0.1; () = cosine

_C.DEBUG = CfgNode()
# tests: the process SIGKILLs itself after writing this epoch's checkpoint
_C.DEBUG.SIGKILL_AFTER_EPOCH = 0


def get_cfg() -> CfgNode:
    return _C.clone()


_CHOICES = {
    "MOCO.VERSION": ("v1", "v2", "v3"),
    "INPUT.AUG": ("v1", "v2", "v3"),
    "SOLVER.OPTIMIZER": ("sgd", "lars"),
    "SOLVER.SCHEDULE": ("step", "cosine"),
    "AMP.DTYPE": ("bfloat16", "float16"),
}


def _lookup(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def load_config(config_file=None, opts=(), moco=True,
                opts_source="command-line override") -> CfgNode:
    """Defaults <- config_file (with its _BASE_ chain) <- opts (KEY VALUE ...); validated and
    frozen. Bad files, unknown keys and bad values raise UsageError naming them (opts_source: where
    opts came from). moco=False (the supervised baseline, which ignores MOCO.*) skips the checks
    that only concern MoCo's queue."""
    cfg = merge_config(get_cfg(), config_file, opts, opts_source)
    try:
        validate(cfg, moco=moco)
    except UsageError as e:
        if opts_source == "command-line override":
            raise
        raise UsageError(f"{opts_source} (on {config_file}): {e}") from None
    cfg.freeze()
    return cfg


def validate(cfg, moco=True):
    from pretrain.moco import RESNET_ARCHS

    for key, choices in _CHOICES.items():
        if _lookup(cfg, key) not in choices:
            raise UsageError(f"{key} = {_lookup(cfg, key)!r} is not one of {choices}")
    if cfg.MODEL.ARCH not in RESNET_ARCHS:
        raise UsageError(f"MODEL.ARCH = {cfg.MODEL.ARCH!r} is not a supported torchvision ResNet; "
                         f"expected one of {RESNET_ARCHS}")
    positive = {"SOLVER.BATCH_SIZE": cfg.SOLVER.BATCH_SIZE, "SOLVER.EPOCHS": cfg.SOLVER.EPOCHS,
                "MOCO.T": cfg.MOCO.T, "MOCO.DIM": cfg.MOCO.DIM, "INPUT.SIZE": cfg.INPUT.SIZE,
                "MOCO.SHUFFLE_BN_SPLITS": cfg.MOCO.SHUFFLE_BN_SPLITS,
                "CHECKPOINT_PERIOD": cfg.CHECKPOINT_PERIOD, "LOG_PERIOD": cfg.LOG_PERIOD}
    if moco and cfg.MOCO.VERSION != "v3":
        positive["MOCO.K"] = cfg.MOCO.K
    for key, value in positive.items():
        if value <= 0:
            raise UsageError(f"{key} = {value} must be > 0")
    non_negative = {"SOLVER.BASE_LR": cfg.SOLVER.BASE_LR,
                    "SOLVER.WEIGHT_DECAY": cfg.SOLVER.WEIGHT_DECAY,
                    "SOLVER.MOMENTUM": cfg.SOLVER.MOMENTUM,
                    "SOLVER.WARMUP_EPOCHS": cfg.SOLVER.WARMUP_EPOCHS,
                    "SOLVER.CHECKPOINT_PERIOD_ITERS": cfg.SOLVER.CHECKPOINT_PERIOD_ITERS,
                    "DATALOADER.NUM_WORKERS": cfg.DATALOADER.NUM_WORKERS}
    for key, value in non_negative.items():
        if value < 0:
            raise UsageError(f"{key} = {value} must be >= 0")
    check_tf32("TF32", cfg.TF32)
    if not 0.0 <= cfg.MOCO.M <= 1.0:
        raise UsageError(f"MOCO.M = {cfg.MOCO.M} must be in [0, 1]")
    scale = tuple(cfg.INPUT.CROP_SCALE)
    if scale and not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise UsageError(
            f"INPUT.CROP_SCALE = {scale} must be () or (min, max) with 0 < min <= max <= 1")
    if moco and cfg.MOCO.VERSION != "v3" and cfg.MOCO.K % cfg.SOLVER.BATCH_SIZE != 0:
        raise UsageError(
            f"MOCO.K = {cfg.MOCO.K} must be divisible by the global batch size "
            f"SOLVER.BATCH_SIZE = {cfg.SOLVER.BATCH_SIZE} (the queue advances by whole batches)")
    if cfg.WANDB.ENABLED:
        from mocobench.utils.events import check_wandb

        check_wandb("WANDB.ENABLED")
    if not cfg.DATA.ROOT:
        raise UsageError(
            "DATA.ROOT is empty: set it to the ImageFolder root that holds train/ (and val/)")


def lr_at(cfg, epoch_float) -> float:
    """Learning rate at a (fractional) epoch: linear scaling, warmup, then the step or cosine
    schedule."""
    import math

    base = cfg.SOLVER.BASE_LR * cfg.SOLVER.BATCH_SIZE / 256
    e = epoch_float if cfg.SOLVER.LR_PER_ITER else math.floor(epoch_float)
    warmup, total = cfg.SOLVER.WARMUP_EPOCHS, cfg.SOLVER.EPOCHS
    if e < warmup:
        return base * e / warmup
    if cfg.SOLVER.SCHEDULE == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * (e - warmup) / (total - warmup)))
    return base * cfg.SOLVER.GAMMA ** sum(e >= step for step in cfg.SOLVER.STEPS)


def moco_momentum_at(cfg, epoch_float) -> float:
    """Key encoder momentum; with MOCO.M_COS it rises from MOCO.M to 1 on a half cosine
    (MoCo v3)."""
    import math

    if not cfg.MOCO.M_COS:
        return cfg.MOCO.M
    return 1.0 - (0.5 * (1.0 + math.cos(math.pi * epoch_float / cfg.SOLVER.EPOCHS))
                  * (1.0 - cfg.MOCO.M))
