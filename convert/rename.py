"""torchvision ResNet names -> detectron2 ResNet names, by the rules of MoCo's official converter.

  conv1.weight                 -> stem.conv1.weight            (a name without `layer` is the stem)
  bn1.running_mean             -> stem.conv1.norm.running_mean (bnN is the norm of convN)
  layer1.0.conv2.weight        -> res2.0.conv2.weight          (layer1..4 are res2..5)
  layer3.0.downsample.0.weight -> res4.0.shortcut.weight
  layer3.0.downsample.1.bias   -> res4.0.shortcut.norm.bias
"""
import numpy as np
import torch

_STAGES = [(f"layer{i}", f"res{i + 1}") for i in (1, 2, 3, 4)]
_NORMS = [(f"bn{i}", f"conv{i}.norm") for i in (1, 2, 3)]
_SHORTCUT = [("downsample.0", "shortcut"), ("downsample.1", "shortcut.norm")]


def detectron2_name(torchvision_name: str) -> str:
    name = torchvision_name
    if "layer" not in name:
        name = "stem." + name
    for old, new in _STAGES + _NORMS + _SHORTCUT:
        name = name.replace(old, new)
    return name


def to_detectron2(trunk_state):
    """{detectron2 name: float32 numpy array} for a torchvision-named trunk state dict.

    Floating tensors are stored as float32 (what detectron2 trains in; bfloat16 has no numpy type),
    so a half-precision checkpoint converts too.
    """
    weights = {}
    for name, tensor in trunk_state.items():
        new_name = detectron2_name(name)
        if new_name in weights:  # two names collapsing into one would silently lose a tensor
            raise ValueError(f"renaming maps two tensors to {new_name!r}")
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        # a copy: the written arrays must not share memory with the original weights verification
        # compares to
        weights[new_name] = np.array(tensor.numpy(), copy=True, order="C")
    return weights
