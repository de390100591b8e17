"""Which ResNet a trunk is, read from its tensors, and the detectron2 settings that build the same
network.

torchvision's ResNet family is one constructor, `ResNet(block, layers, groups, width_per_group)`:
    ResNet-18/34            BasicBlock, (2,2,2,2) / (3,4,6,3)
    ResNet-50/101/152       Bottleneck, (3,4,6,3) / (3,4,23,3) / (3,8,36,3), groups 1, width 64
    ResNeXt-50 32x4d        Bottleneck, (3,4,6,3), groups 32, width_per_group 4
    ResNeXt-101 32x8d/64x4d Bottleneck, (3,4,23,3), groups 32/64, width_per_group 8/4
    Wide ResNet-50-2/101-2  Bottleneck, groups 1, width_per_group 128
The bottleneck width of layer1 is groups * width_per_group (= the out-channels of layer1.0.conv2),
and layer1.0.conv2 has in-channels / groups input channels per filter, so both come out of one
tensor shape. detectron2 builds the same network from MODEL.RESNETS.{DEPTH, NUM_GROUPS,
WIDTH_PER_GROUP, RES2_OUT_CHANNELS} (its bottleneck_channels = NUM_GROUPS * WIDTH_PER_GROUP at
res2, doubled per stage; detectron2/modeling/backbone/resnet.py, build_resnet_backbone), with
STRIDE_IN_1X1 False because torchvision strides in the 3x3 conv.
"""
import collections
import re
from dataclasses import dataclass

import torch

from mocobench.utils.errors import UsageError

# depth -> (block, blocks per stage layer1..layer4): torchvision's resnet18 ... resnet152
RESNET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
# (depth, groups, width_per_group) -> torchvision builder, for names in reports; other combinations
# are still ResNets torchvision and detectron2 both build, named by their numbers
TORCHVISION_NAMES = {
    (18, 1, 64): "resnet18",
    (34, 1, 64): "resnet34",
    (50, 1, 64): "resnet50",
    (101, 1, 64): "resnet101",
    (152, 1, 64): "resnet152",
    (50, 32, 4): "resnext50_32x4d",
    (101, 32, 8): "resnext101_32x8d",
    (101, 64, 4): "resnext101_64x4d",
    (50, 1, 128): "wide_resnet50_2",
    (101, 1, 128): "wide_resnet101_2",
}

# trunks that are ResNets in name but not the plain network detectron2 builds: refused, naming what
# it is. Key patterns of timm (resnet50d/seresnet50/ecaresnet50t: timm/models/resnet.py) and
# antialiased-cnns (BlurPool's `filt` buffer); timm's resnetaa*/resnetblur* have no parameters of
# their own, see `refuse_non_plain`
NON_PLAIN = [
    (re.compile(r"^conv1\.\d+\."), "a deep stem (ResNet-C/D/T: conv1 is a sequence of 3x3 convs)"),
    (re.compile(r"\.downsample\.2\."),
     "average-pool shortcuts (ResNet-D: downsample = pool, conv, BN)"),
    (re.compile(r"\.se\.fc\d?\."), "squeeze-and-excitation blocks (SE-ResNet)"),
    (re.compile(r"\.(se|eca|attn)\.conv\."), "efficient channel attention blocks (ECA-ResNet)"),
    (re.compile(r"(^|\.)filt$"), "anti-aliased (BlurPool) downsampling"),
    (re.compile(r"\.conv\d\.(paths|attn)\."), "selective-kernel blocks (SK-ResNet)"),
]
_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")
PLAIN_STEM = (64, 3, 7, 7)


@dataclass(frozen=True)
class Architecture:
    depth: int
    block: str  # "basic" or "bottleneck"
    groups: int = 1
    width_per_group: int = 64

    @property
    def torchvision_name(self):
        return TORCHVISION_NAMES.get((self.depth, self.groups, self.width_per_group))

    @property
    def name(self):
        if self.groups > 1:
            return f"ResNeXt-{self.depth} {self.groups}x{self.width_per_group}d"
        if self.width_per_group != 64:
            return f"Wide ResNet-{self.depth}-{self.width_per_group // 64}"
        return f"ResNet-{self.depth}"

    def detectron2_resnets(self):
        """MODEL.RESNETS keys that make detectron2 build this trunk."""
        return {
            "DEPTH": self.depth,
            "NUM_GROUPS": self.groups,
            "WIDTH_PER_GROUP": self.width_per_group,
            "RES2_OUT_CHANNELS": 64 if self.block == "basic" else 256,
            "STRIDE_IN_1X1": False,
        }

    def build_torchvision(self):
        import torchvision.models.resnet as tv

        block = tv.BasicBlock if self.block == "basic" else tv.Bottleneck
        return tv.ResNet(block, list(RESNET_DEPTHS[self.depth][1]), groups=self.groups,
                         width_per_group=self.width_per_group)

    def reference_state_dict(self):
        """The torchvision trunk's state dict on the meta device: names and shapes, no memory, no
        init cost."""
        with torch.device("meta"):
            model = self.build_torchvision()
        return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}

    def as_dict(self):
        return {"name": self.name, "torchvision": self.torchvision_name, "depth": self.depth,
                "block": self.block, "groups": self.groups, "width_per_group": self.width_per_group}


def refuse_non_plain(names, where):
    """UsageError naming every non-plain feature found among torchvision-style trunk `names`."""
    found = []
    for pattern, what in NON_PLAIN:
        hits = [n for n in names if pattern.search(n)]
        if hits:
            found.append(f"{what} (e.g. {hits[0]!r})")
    if found:
        raise UsageError(f"{where} has {'; '.join(found)}: only plain torchvision-style ResNets "
                         "convert to detectron2's ResNet")


def infer_architecture(shapes, where="the trunk"):
    """Architecture of a torchvision-named trunk from {name: shape}; UsageError saying what does
    not fit."""
    names = list(shapes)
    refuse_non_plain(names, where)
    stem = tuple(shapes.get("conv1.weight", ()))
    if stem != PLAIN_STEM:
        hint = " (a CIFAR-style 3x3 stem?)" if stem[2:] == (3, 3) else ""
        if stem[1:] == PLAIN_STEM[1:] and stem[0] > PLAIN_STEM[0]:
            hint = " (a width-multiplied ResNet such as SwAV's or SimCLR's RN50w2?)"
        raise UsageError(f"{where}: conv1.weight has shape {stem}, a plain ResNet stem is "
                         f"{PLAIN_STEM}{hint}")
    if "bn1.weight" in shapes and "bn1.running_mean" not in shapes:
        raise UsageError(f"{where}: its norm layers have no running statistics (GroupNorm?); "
                         "detectron2's FrozenBN/BN need BatchNorm statistics")
    blocks = collections.defaultdict(set)
    for name in names:
        match = _BLOCK_KEY.match(name)
        if match:
            blocks[int(match.group(1))].add(int(match.group(2)))
    per_stage = tuple(len(blocks[stage]) for stage in (1, 2, 3, 4))
    block = "bottleneck" if "layer1.0.conv3.weight" in shapes else "basic"
    depth = next((d for d, spec in RESNET_DEPTHS.items() if spec == (block, per_stage)), None)
    if depth is None:
        known = ", ".join(f"R{d}: {b} {s}" for d, (b, s) in RESNET_DEPTHS.items())
        raise UsageError(f"{where} has {block} blocks per stage {per_stage}, which is no ResNet "
                         f"depth we convert ({known})")
    groups, width_per_group = 1, 64
    if block == "bottleneck" and "layer1.0.conv2.weight" in shapes:
        width, per_filter = tuple(shapes["layer1.0.conv2.weight"])[:2]
        if per_filter and width % per_filter == 0:
            groups = width // per_filter
            width_per_group = width // groups
    return Architecture(depth, block, groups, width_per_group)
