"""Prove a converted .pkl: detectron2 loads all of it and computes what the original network
computed.

1. Loading: the weights go into detectron2's own ResNet backbone through `DetectionCheckpointer`
   (name-matching heuristics included, as training loads them). detectron2 only *logs* what it
   could not load, so we take the `_IncompatibleKeys` that `_load_model` returns and, because
   FrozenBatchNorm2d quietly fills a missing running_mean/var with 0/1, also compare the model's
   state dict with the pkl key by key.
2. Values: every array equals the original tensor it was renamed from.
3. Numerics: in eval mode, detectron2's res2..res5 outputs on a random batch must equal the stage
   outputs of torchvision's ResNet holding the original weights (relative error max|d2 - tv| /
   max|tv| <= 1e-5, float32).

The backbone is built with the settings of the `_moco` transfer configs (RGB input, torchvision
mean/std) and the trunk's architecture (convert.arch): DEPTH, NUM_GROUPS, WIDTH_PER_GROUP,
RES2_OUT_CHANNELS (64 for the basic blocks of R18/R34), STRIDE_IN_1X1 False (torchvision puts the
stride in the 3x3 conv).
"""
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np
import torch

from mocobench.utils import d2compat  # before any detectron2 import
from mocobench.utils.errors import UsageError

TOLERANCE = 1e-5
STAGES = ("res2", "res3", "res4", "res5")
# the normalisation of the `_moco` detection configs: RGB in [0, 255], torchvision's ImageNet
# mean/std
PIXEL_MEAN = [123.675, 116.280, 103.530]
PIXEL_STD = [58.395, 57.120, 57.375]


@dataclass
class VerifyResult:
    verified: int = 0  # tensors checked equal after loading into detectron2
    stage_errors: Dict[str, float] = field(default_factory=dict)  # res2..res5 -> relative error
    problems: List[str] = field(default_factory=list)

    @property
    def max_rel_error(self):
        return max(self.stage_errors.values()) if self.stage_errors else float("nan")

    @property
    def ok(self):
        return not self.problems


def detectron2_resnet_cfg(arch, norm="FrozenBN"):
    """A detectron2 cfg for the backbone alone: the `_moco` transfer settings and `arch`'s
    MODEL.RESNETS."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = list(PIXEL_MEAN)
    cfg.MODEL.PIXEL_STD = list(PIXEL_STD)
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.OUT_FEATURES = list(STAGES)
    cfg.MODEL.RESNETS.NORM = norm
    for key, value in arch.detectron2_resnets().items():
        cfg.MODEL.RESNETS[key] = value
    return cfg


def build_detectron2_resnet(arch, norm="FrozenBN"):
    """detectron2's ResNet for `arch`, built on the meta device and materialised uninitialised:
    every tensor is then loaded from the weights (and what is not loaded is caught key by key), so
    random init is wasted."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    with torch.device("meta"):
        model = build_resnet_backbone(detectron2_resnet_cfg(arch, norm), ShapeSpec(channels=3))
    return model.to_empty(device="cpu").eval()


def build_torchvision_resnet(arch, trunk_state, strict=False):
    """torchvision ResNet `arch` minus fc, in eval mode, holding `trunk_state` (num_batches_tracked
    may be absent unless `strict`). Raises UsageError when the state does not fit."""
    with torch.device("meta"):
        model = arch.build_torchvision()
    model.fc = torch.nn.Identity()
    model = model.to_empty(device="cpu")
    for module in model.modules():  # the one buffer a trunk state may lack; keep it defined
        if isinstance(module, torch.nn.BatchNorm2d):
            module.num_batches_tracked.zero_()
    try:
        incompatible = model.load_state_dict({k: v.float() if v.is_floating_point() else v
                                              for k, v in trunk_state.items()}, strict=strict)
    except RuntimeError as e:
        raise UsageError(f"the weights do not load into torchvision's {arch.name}: {e}") from None
    left = [k for k in incompatible.missing_keys if not k.endswith("num_batches_tracked")]
    if left or incompatible.unexpected_keys:
        raise UsageError(f"the weights do not fit torchvision's {arch.name}: missing {left[:5]}, "
                         f"unexpected {incompatible.unexpected_keys[:5]}")
    return model.eval()


def torchvision_stage_outputs(model, images):
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    outputs = {}
    for stage, layer in zip(STAGES, (model.layer1, model.layer2, model.layer3, model.layer4)):
        x = layer(x)
        outputs[stage] = x
    return outputs


def _short(names, limit=6):
    names = list(names)
    return ", ".join(map(str, names[:limit])) \
        + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def check_loading(model, weights, author, result):
    """Load `weights` through DetectionCheckpointer; every gap or surplus becomes a problem in
    `result`."""
    from detectron2.checkpoint import DetectionCheckpointer

    checkpoint = {"model": dict(weights), "__author__": author, "matching_heuristics": True}
    try:
        with d2compat.quiet_checkpoint_logs():  # the problems list below is the account
            incompatible = DetectionCheckpointer(model)._load_model(checkpoint)
    except (ValueError, RuntimeError) as e:  # e.g. one pkl name matching two model names
        result.problems.append(f"DetectionCheckpointer could not load the weights: {e}")
        return
    missing = [k for k in incompatible.missing_keys if not k.endswith("num_batches_tracked")]
    if missing:
        result.problems.append(f"detectron2 parameters/buffers not loaded: {_short(missing)}")
    if incompatible.unexpected_keys:
        result.problems.append("pkl tensors detectron2 did not use: "
                               f"{_short(incompatible.unexpected_keys)}")
    for key, shape_pkl, shape_model in incompatible.incorrect_shapes:
        result.problems.append(f"shape mismatch for {key}: pkl {tuple(shape_pkl)}, detectron2 "
                               f"{tuple(shape_model)}")

    # key by key: the backbone's whole state (parameters and BN buffers) must be exactly the pkl's
    # arrays
    model_state = {k: v for k, v in model.state_dict().items()
                   if not k.endswith("num_batches_tracked")}
    absent = sorted(set(model_state) - set(weights))
    extra = sorted(set(weights) - set(model_state))
    if absent:
        result.problems.append("detectron2 backbone tensors missing from the pkl: "
                               f"{_short(absent)}")
    if extra:
        result.problems.append("pkl tensors with no place in the detectron2 backbone: "
                               f"{_short(extra)}")
    unequal = []
    for key in sorted(set(model_state) & set(weights)):
        array = np.asarray(weights[key])
        if tuple(array.shape) != tuple(model_state[key].shape):
            continue  # reported above as a shape mismatch
        if torch.equal(model_state[key].cpu(),
                       torch.as_tensor(array, dtype=model_state[key].dtype)):
            result.verified += 1
        else:
            unequal.append(key)
    if unequal:
        result.problems.append(f"tensors that differ from the pkl after loading: {_short(unequal)}")


def check_values(weights, trunk_state, result):
    """Every pkl array equals the original tensor it was renamed from (catches edits numerics can
    miss: a weight that only meets zeros or padding on the random batch)."""
    from convert.rename import detectron2_name

    changed = []
    for name, tensor in trunk_state.items():
        key = detectron2_name(name)
        if key in weights:
            array = np.asarray(weights[key])
            original = tensor.detach().cpu().float().numpy()
            if array.shape == original.shape and not np.array_equal(array, original):
                changed.append(f"{key} (from {name})")
    if changed:
        result.problems.append("pkl tensors that differ from the original checkpoint: "
                               f"{_short(changed)}")


def check_numerics(model, reference, images, result):
    with torch.no_grad():
        ours = model(images)
        theirs = torchvision_stage_outputs(reference, images)
    for stage in STAGES:
        a, b = ours[stage].float(), theirs[stage].float()
        if a.shape != b.shape:
            result.problems.append(f"{stage}: detectron2 output {tuple(a.shape)} vs torchvision "
                                   f"{tuple(b.shape)}")
            result.stage_errors[stage] = float("inf")
            continue
        error = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        result.stage_errors[stage] = error
        if not error <= TOLERANCE:  # NaN fails too
            result.problems.append(f"{stage}: relative error {error:.3g} > {TOLERANCE:g} against "
                                   "torchvision")


def verify_weights(weights, trunk_state, arch, author="MOCO", norm="FrozenBN", image_size=64,
                   batch=2, seed=0, reference_state=None):
    """Check converted detectron2 `weights` (name -> array) against the original `trunk_state` of
    `arch`.

    The numerical reference is torchvision's ResNet holding `reference_state` (default: the
    original trunk; for `--to torchvision` the written file's contents, loaded strictly). Returns a
    VerifyResult; callers decide whether its problems are fatal (`convert_checkpoint` raises).
    """
    result = VerifyResult()
    model = build_detectron2_resnet(arch, norm)
    check_loading(model, weights, author, result)
    check_values(weights, trunk_state, result)
    if reference_state is None:
        reference = build_torchvision_resnet(arch, trunk_state)
    else:
        try:
            reference = build_torchvision_resnet(arch, reference_state, strict=True)
        except UsageError as e:
            result.problems.append(str(e))
            return result
        changed = [name for name, tensor in trunk_state.items()
                   if not torch.equal(reference_state[name].float(), tensor.detach().cpu().float())]
        if changed:
            result.problems.append("torchvision tensors that differ from the original checkpoint: "
                                   f"{_short(changed)}")
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    check_numerics(model, reference, images, result)
    return result
