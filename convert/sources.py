"""Read a pretraining checkpoint and find the ResNet trunk inside it.

A checkpoint file is flattened into one key space: nested dicts and lists become dotted keys
(`classy_state_dict.base_model.model.trunk._feature_blocks.conv1.weight`), except that the usual
wrapper entry (`state_dict`, `model` or `net`) is unwrapped, so an official MoCo checkpoint reads as
`module.encoder_q.conv1.weight` and its other entries as `optimizer.state.0.momentum_buffer`.

`SOURCES` is a registry of the layouts the field ships: each names the prefixes its trunk lives
under (in order of preference: the online encoder before the momentum one, the teacher before the
student, as each project's own evaluation code reads it), what its other keys are, and -- where two
layouts share a prefix -- a marker that tells them apart. The layout of each is read from the
project's code, cited next to it. Anything no source claims goes through generic discovery: every
prefix under which a complete torchvision-shaped ResNet trunk lives; exactly one must exist, or
`--prefix` picks one.

Nothing here imports detectron2: reading and checking the input is cheap and runs before any model
is built.
"""
import argparse
import collections
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from convert.arch import Architecture, infer_architecture
from mocobench.utils.errors import UsageError
from mocobench.utils.fileio import check_input_file, load_checkpoint, safe_unpickle

WRAPPERS = ("state_dict", "model", "net")
# lightly's documented backbone, nn.Sequential(*list(resnet.children())[:-1]): child index ->
# torchvision name (2 relu, 3 maxpool and 8 avgpool hold no tensors; lightly docs, "Getting started
# / backbone networks")
SEQUENTIAL_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3",
                       "7": "layer4"}
# what a trunk key looks like in torchvision names; the stem and maxpool only carry tensors in
# non-plain nets
_TRUNK_KEY = re.compile(r"^(conv1|bn1|maxpool|layer[1-4])\.")
# entries of training checkpoints that are never weights, whatever the framework
COMMON_OTHERS = {
    "optimizer": "optimizer state",
    "optimizer_states": "optimizer state (Lightning)",
    "lr_schedulers": "LR scheduler state (Lightning)",
    "scheduler": "LR scheduler state",
    "callbacks": "callback state (Lightning)",
    "loops": "training-loop state (Lightning)",
    "amp": "AMP state",
    "scaler": "AMP loss scaler",
    "amp_scaler": "AMP loss scaler",
    "fp16_scaler": "AMP loss scaler",
    "rng": "random number generator state",
}


@dataclass
class Checkpoint:
    """A checkpoint file, flattened: every tensor under a dotted key, plus its top-level plain
    entries."""

    path: str
    tensors: Dict[str, torch.Tensor]
    # top-level entries that are not tensors (epoch, arch, author, args ...)
    entries: Dict[str, object]
    # framework classes read as placeholders (see Opaque)
    opaque: List[str] = field(default_factory=list)


def _has(prefix):
    return lambda ckpt: any(key.startswith(prefix) for key in ckpt.tensors)


def _entry(name, value=None):
    return lambda ckpt: name in ckpt.entries and (value is None or ckpt.entries[name] == value)


def _any(*markers):
    return lambda ckpt: any(marker(ckpt) for marker in markers)


def _all(*markers):
    return lambda ckpt: all(marker(ckpt) for marker in markers)


@dataclass(frozen=True)
class Source:
    """One checkpoint layout: where the trunk lives and what everything else in the file is."""

    name: str
    author: str  # the pkl's "__author__"
    prefixes: Tuple[str, ...]  # where the trunk lives (flattened keys), in order of preference
    layout: str  # the file(s) this layout is read from
    # key prefix outside the trunk -> what it is
    others: Dict[str, str] = field(default_factory=dict)
    head: str = "classifier (fc)"  # what `fc.*` under the trunk prefix is
    # --source auto claims a file only if true
    marker: Optional[Callable[[Checkpoint], bool]] = None
    naming: str = "torchvision"  # or "sequential": lightly's numbered children
    # raises UsageError for files of this source we refuse
    check: Optional[Callable[[Checkpoint], None]] = None

    @property
    def example(self):
        stem = "0.weight" if self.naming == "sequential" else "conv1.weight"
        return self.prefixes[0] + stem


def _wrapped(*names):
    """Each prefix with and without DDP's `module.`."""
    return tuple(p for name in names for p in ("module." + name, name))


def _others(mapping):
    """{prefix: reason} for the DDP-wrapped and the plain spelling of each prefix."""
    out = {}
    for prefix, reason in mapping.items():
        out["module." + prefix] = reason
        out[prefix] = reason
    return out


# timm names of the plain ResNets (timm/models/resnet.py `default_cfgs`); timm's other ResNets
# change the network without changing the weight names (resnetaa50: anti-aliasing, resnetblur50:
# blur pooling)
_TIMM_PLAIN = re.compile(r"^(resnet(18|34|50|101|152)|resnext50_32x4d|resnext101_(32x8d|64x4d)|"
                         r"wide_resnet(50|101)_2)(\.\w+)?$")


def _timm_model_name(ckpt):
    """timm's model name for the file: train.py's args.model, or for hub weights
    (model.safetensors) the `architecture` of the config.json next to it; None if neither."""
    args = ckpt.entries.get("args")
    if args is not None and getattr(args, "model", None) is not None:
        return args.model
    return _hub_architecture(ckpt.path)


def _hub_architecture(path):
    """`architecture` of the config.json next to a timm hub model.safetensors, else None."""
    import json

    config = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if not str(path).endswith(".safetensors") or not os.path.isfile(config):
        return None
    try:
        with open(config) as f:
            name = json.load(f).get("architecture")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def _check_timm_model(ckpt):
    name = _timm_model_name(ckpt)
    if name is not None and not _TIMM_PLAIN.match(str(name)):
        where = "args.model" if ckpt.entries.get("args") is not None else "config.json"
        raise UsageError(f"{ckpt.path!r} is a timm {name!r} ({where}): not a plain ResNet "
                         "(timm's anti-aliased, blur-pool, deep-stem, SE and ECA variants compute "
                         "something detectron2's ResNet does not); supported: resnet18 ... "
                         "resnet152, resnext*, wide_resnet*")


def unnamed_variant_warning(ckpt, arch):
    """The warning for a timm-layout file that names no model (a timm train.py checkpoint without
    args.model, or a timm hub model.safetensors without a config.json that names its
    architecture), else None: timm's anti-aliased (resnetaa*) and blur-pool (resnetblur*) ResNets
    have no weights of their own, so nothing in the file tells them from the plain network."""
    if _timm_model_name(ckpt) is not None:
        return None
    return (f"{ckpt.path!r} names no timm model (no args.model / config.json architecture): "
            f"converted as a plain {arch.name}, but anti-aliased (resnetaa*), blur-pool "
            "(resnetblur*) and other variants without weights of their own cannot be told apart "
            "from the weights; check which model it was")


SOURCES = {
    source.name: source
    for source in [
        # VISSL: checkpoint["classy_state_dict"]["base_model"]["model"]["trunk"], trunk modules in
        # the `_feature_blocks` ModuleDict (vissl/models/trunks/resnext.py;
        # extra_scripts/convert_vissl_to_torchvision.py)
        Source(
            "vissl", "VISSL", ("classy_state_dict.base_model.model.trunk._feature_blocks.",),
            layout="facebookresearch/vissl: vissl/models/trunks/resnext.py, "
                   "extra_scripts/convert_vissl_to_torchvision.py",
            others={"classy_state_dict.base_model.model.heads.":
                        "VISSL heads (projection, prototypes, classifier)",
                    "classy_state_dict.optimizer.": "optimizer state",
                    "classy_state_dict.loss.": "loss state (e.g. SwAV queue)"},
        ),
        # DINO full checkpoint: {"student", "teacher", "optimizer", "epoch", "args", "dino_loss"},
        # both networks MultiCropWrapper(backbone, DINOHead), DDP-wrapped when they have BN
        # (dino/main_dino.py); eval_linear.py/eval_knn.py read the teacher. The backbone-only
        # release dino_resnet50_pretrain.pth is a plain torchvision state dict without fc
        # (dino/hubconf.py: strict=False): `--source dino` reads it at ''.
        Source(
            "dino", "DINO", ("teacher.module.backbone.", "teacher.backbone.", ""),
            layout="facebookresearch/dino: main_dino.py (save_dict), utils.py "
                   "(load_pretrained_weights), hubconf.py",
            others={"student.": "student network (DINO evaluates the teacher: --checkpoint_key "
                                "teacher)",
                    "teacher.module.head.": "DINO projection head",
                    "teacher.head.": "DINO projection head", "dino_loss.": "DINO loss center"},
            marker=_all(_has("teacher."), _has("student.")),
        ),
        # PixPro: {"opt", "model", "optimizer", "scheduler", "epoch"}, model = DDP(PixPro) with
        # encoder, encoder_k, projector(_k), value_transform, projector_instance(_k), predictor
        # (PixPro main_pretrain.py, contrast/models/PixPro.py);
        # transfer/detection/convert_pretrain_to_d2.py keeps `module.encoder.`
        Source(
            "pixpro", "PixPro", _wrapped("encoder."),
            layout="zdaxie/PixPro: contrast/models/PixPro.py, main_pretrain.py, "
                   "transfer/detection/convert_pretrain_to_d2.py",
            others=_others({"encoder_k.": "momentum encoder",
                            "projector.": "PixPro pixel projector",
                            "projector_k.": "momentum pixel projector",
                            "value_transform.": "pixel propagation module (value transform)",
                            "projector_instance.": "instance-branch projector",
                            "projector_instance_k.": "momentum instance-branch projector",
                            "predictor.": "instance-branch predictor"}),
            marker=_any(_has("module.encoder_k."), _has("encoder_k.")),
        ),
        # SwAV: main_swav.py saves DDP(ResNet) with projection_head and prototypes (a Linear, or
        # MultiPrototypes' prototypes0..N); swav_800ep_pretrain.pth.tar is that state dict,
        # hubconf.py strips `module.` and loads with strict=False. Its ConstantPad2d(1) + conv1
        # padding 2 = torchvision's padding 3.
        Source(
            "swav", "SwAV", ("module.", ""),
            layout="facebookresearch/swav: src/resnet50.py, main_swav.py, hubconf.py",
            others=_others({"projection_head.": "SwAV projection head",
                            "prototypes.": "SwAV prototypes"}),
            marker=_any(_has("module.prototypes."), _has("prototypes.")),
        ),
        # Barlow Twins: checkpoint.pth = {"epoch", "model": DDP(BarlowTwins).state_dict(),
        # "optimizer"} with backbone (fc = Identity), projector, bn (BatchNorm1d, affine=False);
        # resnet50.pth = the backbone alone (barlowtwins main.py, hubconf.py):
        # `--source barlowtwins` reads that at ''
        Source(
            "barlowtwins", "BarlowTwins", (*_wrapped("backbone."), ""),
            layout="facebookresearch/barlowtwins: main.py (BarlowTwins, checkpoint.pth, "
                   "resnet50.pth), hubconf.py",
            others=_others({"projector.": "Barlow Twins projector",
                            "bn.": "Barlow Twins normalization of the embeddings (BatchNorm1d, "
                                   "affine=False)"}),
            marker=_any(_has("module.bn.running_mean"),
                        _all(_has("bn.running_mean"), _has("projector."))),
        ),
        # DenseCL (OpenSelfSup): state_dict of DenseCL with encoder_q = Sequential(backbone, neck),
        # encoder_k, `backbone` registered again as encoder_q[0], queue/queue2;
        # tools/extract_backbone_weights.py saves {"state_dict": backbone tensors, "author":
        # "DenseCL"}, the form of the released weights
        Source(
            "densecl", "DenseCL", ("backbone.", ""),
            layout="WXinlong/DenseCL: openselfsup/models/densecl.py, "
                   "tools/extract_backbone_weights.py",
            others={"encoder_q.0.": "query encoder (the same tensors as backbone.*)",
                    "encoder_q.1.": "DenseCL neck (global and dense projection heads)",
                    "neck.": "DenseCL neck", "encoder_k.": "key (momentum) encoder",
                    "queue2_ptr": "dense queue pointer", "queue2": "queue of dense negative keys",
                    "queue_ptr": "queue pointer", "queue": "queue of negative keys"},
            marker=_any(_has("queue2"), _entry("author", "DenseCL")),
        ),
        # solo-learn: Lightning checkpoint, state_dict of BaseMethod (backbone with fc = Identity,
        # classifier) and BaseMomentumMethod (momentum_backbone, momentum_classifier), method heads
        # (projector, predictor, prototypes, queue); solo/methods/base.py,
        # downstream/object_detection/convert_model_to_detectron2.py
        Source(
            "solo-learn", "solo-learn", ("backbone.",),
            layout="vturrisi/solo-learn: solo/methods/base.py, "
                   "downstream/object_detection/convert_model_to_detectron2.py",
            others={"momentum_backbone.": "momentum backbone", "projector.": "projector",
                    "momentum_projector.": "momentum projector", "predictor.": "predictor",
                    "classifier.": "online linear classifier",
                    "momentum_classifier.": "momentum linear classifier",
                    "prototypes.": "prototypes", "queue_ptr": "queue pointer",
                    "queue": "queue of negative keys"},
            marker=_entry("pytorch-lightning_version"),
        ),
        # mmselfsup / OpenSelfSup: runner checkpoint {"meta", "state_dict", "optimizer"...};
        # algorithms hold backbone, neck, head, and a momentum copy: 0.x encoder_q =
        # Sequential(backbone, neck) + encoder_k (mmselfsup/models/algorithms/moco.py @v0.9.1), 1.x
        # encoder_k / target_net / momentum_encoder = ExponentialMovingAverage(Sequential(backbone,
        # neck)) (algorithms/moco.py, byol.py, mocov3.py);
        # tools/model_converters/extract_backbone_weights.py writes {"state_dict", "author":
        # "MMSelfSup"}
        Source(
            "mmselfsup", "MMSelfSup", ("backbone.", ""),
            layout="open-mmlab/mmselfsup: mmselfsup/models/algorithms/{moco,byol,mocov3}.py, "
                   "tools/model_converters/extract_backbone_weights.py",
            others={"neck.": "neck (projection head)", "head.": "head",
                    "encoder_q.": "online encoder (backbone.* and neck.* registered again)",
                    "encoder_k.": "key (momentum) encoder",
                    "target_net.": "target (momentum) network",
                    "momentum_encoder.": "momentum encoder", "queue_ptr": "queue pointer",
                    "queue": "queue of negative keys"},
            marker=_any(_all(_entry("meta"), _has("backbone.")), _entry("author", "MMSelfSup"),
                        _entry("author", "OpenSelfSup")),
        ),
        # lightly: models built as in its docs, backbone =
        # nn.Sequential(*list(resnet.children())[:-1]) with heads next to it (projection_head,
        # prediction_head, backbone_momentum ...); lightly/models/modules/heads.py
        Source(
            "lightly", "lightly", ("backbone.", ""), naming="sequential",
            layout="lightly-ai/lightly: docs examples (SimCLR, MoCo, BYOL), "
                   "lightly/models/modules/heads.py",
            others={"backbone_momentum.": "momentum backbone",
                    "projection_head_momentum.": "momentum projection head",
                    "projection_head.": "projection head", "prediction_head.": "prediction head",
                    "prototypes.": "prototypes"},
        ),
        # official MoCo v1/v2 (main_moco.py saves the DDP-wrapped model) and ours; `encoder_q.`
        # when saved unwrapped
        Source(
            "moco", "MOCO", _wrapped("encoder_q."),
            layout="facebookresearch/moco: moco/builder.py, main_moco.py, "
                   "detection/convert-pretrain-to-detectron2.py",
            head="projection head (MoCo v1 linear fc / v2 MLP fc.0, fc.2)",
            others=_others({"encoder_k.": "key (momentum) encoder", "queue_ptr": "queue pointer",
                            "queue": "queue of negative keys"}),
        ),
        # official MoCo v3 ResNet (moco-v3 main_moco.py): base encoder with its projector in fc.*
        Source(
            "moco-v3", "MOCO", _wrapped("base_encoder."),
            layout="facebookresearch/moco-v3: moco/builder.py, main_moco.py",
            head="projector (fc.*)",
            others=_others({"momentum_encoder.": "momentum encoder", "predictor.": "predictor"}),
        ),
        # timm train.py (CheckpointSaver): {"epoch", "arch", "state_dict", "optimizer", "version",
        # "args", "state_dict_ema"?}; timm's ResNet names its tensors as torchvision does
        # (timm/models/resnet.py)
        Source(
            "timm", "timm", ("",),
            layout="huggingface/pytorch-image-models: timm/utils/checkpoint_saver.py, "
                   "timm/models/resnet.py",
            others={"state_dict_ema.": "EMA weights (convert them with --prefix state_dict_ema.)"},
            marker=_any(_entry("state_dict_ema"), _all(_entry("version"), _entry("arch"))),
            check=_check_timm_model,
        ),
        # a supervised baseline: torchvision's own resnet50-*.pth, a classifier saved from DDP
        # (`module.`), and the backbone-only releases in torchvision names (DINO
        # dino_resnet50_pretrain.pth, Barlow Twins resnet50.pth)
        Source("torchvision", "torchvision", ("", "module."),
               layout="pytorch/vision: torchvision/models/resnet.py"),
    ]
}
GENERIC = Source("generic", "mocobench", (),
                 layout="discovered: the only complete ResNet trunk in the file")


# -- reading ---------------------------------------------------------------------------------------

# Training frameworks pickle their bookkeeping objects into checkpoints (mmengine's message_hub
# HistoryBuffers, Lightning's AttributeDict hyper-parameters, omegaconf configs, pathlib paths).
# torch's weights-only loader refuses them; these namespaces' objects are read as an inert `Opaque`
# placeholder instead -- their classes are never imported, nothing of theirs runs, and they hold no
# weights. Any other global is still refused.
OPAQUE_NAMESPACES = ("mmengine.", "mmcv.", "omegaconf.", "pytorch_lightning.", "lightning.",
                     "lightning_fabric.", "pathlib.")
# numpy arrays and scalars in that bookkeeping (mmengine's HistoryBuffer) are data: numpy's own
# constructors
_NUMPY_DATA = re.compile(r"^numpy\.(ndarray|dtype|dtypes\.\w+DType|"
                         r"(_core|core)\.multiarray\.(_reconstruct|scalar))$")
# type references those objects carry in their metadata (omegaconf: ref_type typing.Any,
# object_type dict)
OPAQUE_TYPES = {"typing.Any", "collections.defaultdict",
                *(f"builtins.{t}" for t in ("dict", "list", "tuple", "set", "int", "float", "str",
                                            "bool"))}


class Opaque:
    """Stands in for a framework object while unpickling: whatever the arguments, an empty
    OrderedDict, which torch's weights-only unpickler lets the pickle fill (dict items, or
    attributes for a BUILD), and nothing runs."""

    def __new__(cls, *args, **kwargs):
        return collections.OrderedDict()


def read_checkpoint(path) -> Checkpoint:
    """The checkpoint, flattened (see the module docstring), never running code from the file."""
    path = os.fspath(path)
    opaque = []
    if path.endswith(".pkl"):
        obj = safe_unpickle(path)
    elif path.endswith(".safetensors"):
        obj = _read_safetensors(path)
    else:
        try:
            obj = _load_torch(path, [])
        except UsageError:
            opaque = _framework_globals(path)
            if not opaque:
                raise
            obj = _load_torch(path, opaque)
    ckpt = flatten_checkpoint(obj, path)
    ckpt.opaque = opaque
    return ckpt


def _load_torch(path, opaque):
    # argparse.Namespace holds plain values: DINO's `args`, PixPro's `opt` and timm's `args` are one
    allowed = [argparse.Namespace, *((_numpy_global(name) or Opaque, name) for name in opaque)]
    # an array's dtype is built as its numpy.dtypes class
    if any(_numpy_global(name) for name in opaque):
        import numpy

        allowed += [getattr(numpy.dtypes, n) for n in dir(numpy.dtypes) if n.endswith("DType")]
    try:
        with torch.serialization.safe_globals(allowed):
            return load_checkpoint(path)
    except (IndexError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        # torch's weights-only unpickler fails this way on some non-checkpoint bytes (e.g. a text
        # file)
        raise UsageError(f"{path!r} is not a readable torch checkpoint (truncated or another "
                         f"format?): {type(e).__name__}: {e}") from None


def _framework_globals(path):
    """The globals of a refused torch checkpoint if every one is a framework's bookkeeping class,
    else []."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint, truncated ...: the first error stands
        return []
    names = [name for name in names if name != "argparse.Namespace"]
    framework = [name for name in names if name.startswith(OPAQUE_NAMESPACES)]
    if framework and all(name in framework or name in OPAQUE_TYPES
                         or _numpy_global(name) for name in names):
        return sorted(names)
    return []


def _numpy_global(name):
    """numpy's array/scalar/dtype constructor named `name`, if it is one, else None."""
    if not _NUMPY_DATA.match(name):
        return None
    import importlib

    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def _read_safetensors(path):
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise UsageError(f"{path!r}: reading .safetensors needs the safetensors package (pip "
                         "install safetensors)") from None

    check_input_file(path, "checkpoint")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"{path!r} is not a readable safetensors file: {e}") from None


def flatten_checkpoint(obj, path="checkpoint") -> Checkpoint:
    if not isinstance(obj, dict):
        raise UsageError(f"{path!r} is not a checkpoint: it holds a {type(obj).__name__}, expected "
                         "a dict of tensors")
    tensors, entries = {}, {}
    wrapper = next((name for name in WRAPPERS if isinstance(obj.get(name), dict)), None)
    if wrapper is not None:
        _flatten(obj[wrapper], "", tensors)
    for key, value in obj.items():
        if key == wrapper:
            continue
        if isinstance(value, (dict, list, tuple)) or _is_array(value):
            _flatten(value, f"{key}.", tensors)
            entries[str(key)] = "<container>" if not _is_array(value) else "<tensor>"
        else:
            entries[str(key)] = value
    if not tensors:
        names = ", ".join(sorted(map(str, obj))[:10]) or "nothing"
        raise UsageError(f"{path!r} holds no tensors (found entries: {names}); expected a model "
                         "checkpoint")
    return Checkpoint(path, tensors, entries)


def _is_array(value):
    """A tensor, or a numeric numpy array (a .pkl of numpy arrays); object/string arrays are no
    weights."""
    if isinstance(value, torch.Tensor):
        return True
    return type(value).__module__ == "numpy" \
        and getattr(getattr(value, "dtype", None), "kind", "") in "biufc"


def _flatten(value, prefix, out):
    if isinstance(value, torch.Tensor):
        out[prefix[:-1]] = value
    elif _is_array(value):  # a .pkl of numpy arrays
        out[prefix[:-1]] = torch.as_tensor(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}{key}.", out)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _flatten(item, f"{prefix}{index}.", out)


def key_prefixes(keys, limit=12):
    """'module.encoder_q (320), module.queue (1)': what a checkpoint holds, for error messages."""
    counts = collections.Counter()
    for key in keys:
        parts = key.split(".")
        depth = 2 if parts[0] == "module" and len(parts) > 2 else 1
        counts[".".join(parts[:depth])] += 1
    # most keys first, then by name
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    shown = [f"{prefix} ({n})" for prefix, n in ranked[:limit]]
    if len(counts) > limit:
        shown.append(f"... {len(counts) - limit} more")
    return ", ".join(shown)


# -- finding the trunk -----------------------------------------------------------------------------

@dataclass
class Trunk:
    """The ResNet trunk found in a checkpoint, in torchvision names, plus what was left out and
    why."""

    source: str
    author: str
    prefix: str  # the prefix the trunk was found under
    arch: Architecture
    # torchvision name -> tensor (trunk only, no num_batches_tracked)
    state: Dict[str, torch.Tensor]
    original_keys: Dict[str, str]  # torchvision name -> key in the checkpoint
    dropped: List[Tuple[str, str]]  # (key in the checkpoint, why it is not converted)
    detected: bool = True  # found by --source auto (not named by --source/--prefix)
    # framework classes in the file, read as placeholders
    opaque: List[str] = field(default_factory=list)
    # converted, but the user should know (unnamed_variant_warning)
    warnings: List[str] = field(default_factory=list)


def _rename(name, naming):
    if naming == "sequential":
        head, _, rest = name.partition(".")
        return f"{SEQUENTIAL_CHILDREN[head]}.{rest}" if head in SEQUENTIAL_CHILDREN else None
    return name


def _naming_at(keys, prefix):
    """'torchvision' or 'sequential' if a ResNet stem and first block live under `prefix`, else
    None."""
    if any(k.startswith(prefix + "layer1.0.") for k in keys) \
            and any(k.startswith(prefix + "conv1.") for k in keys):
        return "torchvision"
    if prefix + "0.weight" in keys and any(k.startswith(prefix + "4.0.") for k in keys):
        return "sequential"
    return None


def _candidate_prefixes(keys):
    """Every prefix with a ResNet stem and first block under it, in either naming, shortest
    first."""
    roots = set()
    for key in keys:
        for marker in ("layer1.0.", "4.0."):
            at = key.find(marker)
            while at >= 0:
                if at == 0 or key[at - 1] == ".":
                    roots.add(key[:at])
                at = key.find(marker, at + 1)
    return sorted((p for p in roots if _naming_at(keys, p)), key=lambda p: (len(p), p))


def _build_trunk(ckpt, source, prefix, naming, detected):
    """Check the trunk under `prefix` completely; UsageError with what is wrong, else the Trunk."""
    where = f"{ckpt.path!r}: the trunk under {prefix!r}"
    encoder = {}  # torchvision name -> checkpoint key
    for key in ckpt.tensors:
        if key.startswith(prefix):
            name = _rename(key[len(prefix):], naming)
            if name is not None:
                encoder[name] = key
    trunk_names = {name: tuple(ckpt.tensors[key].shape)
                   for name, key in encoder.items() if _TRUNK_KEY.match(name)}
    arch = infer_architecture(trunk_names, where)
    reference = arch.reference_state_dict()
    required = {name for name in reference if not name.endswith("num_batches_tracked")}
    missing = sorted(required - set(encoder))
    if missing:
        raise UsageError(
            f"{where} is a {arch.name} that lacks {len(missing)} tensor(s): "
            f"{', '.join(prefix + name for name in missing[:8])}"
            f"{' ...' if len(missing) > 8 else ''}"
        )
    unknown = sorted(name for name in trunk_names if name not in reference)
    if unknown:
        raise UsageError(
            f"{where} holds tensors a torchvision {arch.name} does not have (not a plain ResNet?): "
            f"{', '.join(encoder[name] for name in unknown[:8])}"
            f"{' ...' if len(unknown) > 8 else ''}"
        )
    for name in sorted(required):
        got, want = tuple(ckpt.tensors[encoder[name]].shape), tuple(reference[name].shape)
        if got != want:
            raise UsageError(f"{where}: {encoder[name]!r} has shape {got}, a torchvision "
                             f"{arch.name} has {want}")
    if source.check is not None:
        source.check(ckpt)
    # timm's layout, or its hub format (.safetensors in torchvision names): the file may come from
    # a timm variant whose weights are key for key the plain network's
    warnings = []
    if source.name == "timm" or (str(ckpt.path).endswith(".safetensors")
                                 and naming == "torchvision"):
        _check_timm_model(ckpt)
        warning = unnamed_variant_warning(ckpt, arch)
        if warning:
            warnings.append(warning)

    state = {name: ckpt.tensors[encoder[name]]
             for name in sorted(required, key=list(reference).index)}
    original_keys = {name: encoder[name] for name in state}
    converted = set(original_keys.values())
    other_trunks = [p for p in _candidate_prefixes(ckpt.tensors) if p != prefix]
    dropped = []
    for key in ckpt.tensors:
        if key not in converted:
            dropped.append((key, _what_is(key, prefix, naming, source, other_trunks)))
    return Trunk(source.name, source.author, prefix, arch, state, original_keys, dropped, detected,
                 ckpt.opaque, warnings)


def _matches(key, prefix):
    return key == prefix.rstrip(".") \
        or key.startswith(prefix if prefix.endswith(".") else prefix + ".")


def _what_is(key, prefix, naming, source, other_trunks):
    if key.startswith(prefix):
        name = _rename(key[len(prefix):], naming) or ""
        if name.startswith("fc."):
            return source.head
        if name.endswith("num_batches_tracked") and _TRUNK_KEY.match(name):
            return "BN num_batches_tracked (detectron2 has no such buffer)"
    # longest matching prefix first: "module.queue_ptr" is the pointer, not the queue
    known = {**{k + ".": v for k, v in COMMON_OTHERS.items()}, **source.others}
    for other in sorted(known, key=len, reverse=True):
        if _matches(key, other):
            return known[other]
    for other in sorted(other_trunks, key=len, reverse=True):
        if key.startswith(other):
            return f"another ResNet trunk ({other}*)"
    return "not part of the trunk"


def extract_trunk(ckpt: Checkpoint, source="auto", prefix=None) -> Trunk:
    """Find, check and return the ResNet trunk of a checkpoint (see the module docstring)."""
    if source != "auto" and source not in SOURCES:
        raise UsageError(f"unknown --source {source!r}; expected auto or one of "
                         f"{', '.join(SOURCES)}")
    keys = ckpt.tensors
    if prefix is not None:
        naming = _naming_at(keys, prefix)
        if naming is None:
            raise UsageError(f"{ckpt.path!r}: no ResNet trunk under --prefix {prefix!r} (no "
                             f"{prefix}conv1.* next to {prefix}layer1.0.*). Trunks found: "
                             f"{_describe(_candidate_prefixes(keys))}")
        if source != "auto":
            chosen = SOURCES[source]
        else:
            chosen = next((s for s in SOURCES.values() if prefix in s.prefixes
                           and s.naming == naming
                           and (s.marker is None or s.marker(ckpt))), GENERIC)
        return _build_trunk(ckpt, chosen, prefix, naming, detected=False)
    if source != "auto":
        chosen = SOURCES[source]
        found = next((p for p in chosen.prefixes if _naming_at(keys, p) == chosen.naming), None)
        if found is None:
            raise UsageError(f"{ckpt.path!r} is not a {source} checkpoint: no ResNet trunk at "
                             f"{' or '.join(repr(p + 'conv1.weight') for p in chosen.prefixes)} "
                             f"(it holds keys under: {key_prefixes(keys)})")
        return _build_trunk(ckpt, chosen, found, chosen.naming, detected=False)
    for candidate in SOURCES.values():
        if candidate.marker is not None and not candidate.marker(ckpt):
            continue
        found = next((p for p in candidate.prefixes if _naming_at(keys, p) == candidate.naming),
                     None)
        if found is not None:
            return _build_trunk(ckpt, candidate, found, candidate.naming, detected=True)
    return _discover(ckpt)


def _describe(prefixes):
    return ", ".join(repr(p) for p in prefixes) or "none"


def _discover(ckpt):
    """Generic discovery: the one prefix holding a complete plain ResNet trunk."""
    candidates = _candidate_prefixes(ckpt.tensors)
    if not candidates and any(key.endswith("stem.conv1.weight") for key in ckpt.tensors):
        raise UsageError(f"{ckpt.path!r} is in detectron2's names already (stem.*, res2.* ...): a "
                         "converted backbone? Pass it to transfer as MODEL.WEIGHTS, or convert the "
                         "original checkpoint")
    if not candidates:
        raise UsageError(
            f"{ckpt.path!r} holds no ResNet trunk: no prefix with conv1.* next to layer1.0.* "
            "(torchvision names) or 0.weight next to 4.0.* (nn.Sequential of its children). "
            f"It holds keys under: {key_prefixes(ckpt.tensors)}"
        )
    complete, errors = [], []
    for prefix in candidates:
        try:
            complete.append(_build_trunk(ckpt, GENERIC, prefix, _naming_at(ckpt.tensors, prefix),
                                         True))
        except UsageError as e:
            errors.append(str(e))
    if len(complete) == 1:
        return complete[0]
    if not complete:
        raise UsageError(errors[0])
    names = ", ".join(f"{t.prefix!r} ({t.arch.name})" for t in complete)
    raise UsageError(
        f"{ckpt.path!r} holds {len(complete)} complete ResNet trunks and no known layout says "
        f"which one is the encoder: {names}; choose one with --prefix (e.g. --prefix "
        f"{complete[0].prefix!r})"
    )
