"""The heads of the MoCo transfer experiments that detectron2 lacks: the C4 box/mask head with an
extra norm (detection) and the dilated FCN head (semantic segmentation), each in its detectron2
registry.

MoCo (He et al., 2020, Sec. 4.2 and Appendix) fine-tunes every BN layer ("BN tuned", synchronized
across GPUs) and, for R50-C4, appends one more normalization layer after res5: the pretrained res5
ends in a residual sum whose scale the new box/mask predictors have never seen, and the extra norm
hands them normalized features. It is newly initialized (weight 1, bias 0) and is absent from any
pretrained .pkl.
"""
from mocobench.utils import d2compat  # noqa: F401  (before any detectron2 import)

# isort: split
import fvcore.nn.weight_init as weight_init
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads
from torch import nn
from torch.nn import functional as F


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """detectron2's Res5ROIHeads with `get_norm(MODEL.RESNETS.NORM)` applied to the res5 output."""

    @configurable
    def __init__(self, *, extra_norm: str, **kwargs):
        super().__init__(**kwargs)
        # res5 is an nn.Sequential of blocks shared by the box and the mask head: appending the
        # norm to it normalizes the features both heads see, which is where the paper puts it.
        self.res5.add_module("norm", get_norm(extra_norm, self.res5[-1].out_channels))

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["extra_norm"] = cfg.MODEL.RESNETS.NORM
        return ret


@SEM_SEG_HEADS_REGISTRY.register()
class DilatedFCNHead(nn.Module):
    """The semantic-segmentation head of the MoCo paper (He et al., 2020, Appendix A, "semantic
    segmentation").

    On the res5 features of a ResNet whose conv5 3x3 convs have dilation 2 and stride 1 (total
    stride 16, FCN-16s; MODEL.RESNETS.RES5_DILATION 2): NUM_CONVS (2) 3x3 convs of CONVS_DIM (256)
    channels with dilation DILATION (6, DeepLab's large field of view), each followed by NORM and
    ReLU, then a 1x1 conv to the per-pixel class scores, upsampled bilinearly to the input
    resolution. Loss: per-pixel cross-entropy ignoring IGNORE_VALUE (255), as detectron2's
    SemSegFPNHead.
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, num_classes: int, in_feature: str, conv_dims: int,
                 num_convs: int, dilation: int, norm: str, ignore_value: int = -1,
                 loss_weight: float = 1.0):
        super().__init__()
        self.in_feature = in_feature
        self.stride = input_shape.stride
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        layers = []
        channels = input_shape.channels
        for i in range(num_convs):
            conv = Conv2d(channels, conv_dims, kernel_size=3, padding=dilation, dilation=dilation,
                          bias=not norm, norm=get_norm(norm, conv_dims), activation=F.relu)
            weight_init.c2_msra_fill(conv)
            self.add_module(f"conv{i + 1}", conv)
            layers.append(conv)
            channels = conv_dims
        self.convs = layers
        self.predictor = Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.predictor.weight, 0, 0.001)
        nn.init.constant_(self.predictor.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape):
        head = cfg.MODEL.SEM_SEG_HEAD
        if len(head.IN_FEATURES) != 1:
            raise ValueError("DilatedFCNHead reads one feature map, "
                             f"MODEL.SEM_SEG_HEAD.IN_FEATURES is {list(head.IN_FEATURES)}")
        return {
            "input_shape": input_shape[head.IN_FEATURES[0]],
            "in_feature": head.IN_FEATURES[0],
            "num_classes": head.NUM_CLASSES,
            "conv_dims": head.CONVS_DIM,
            "num_convs": head.NUM_CONVS,
            "dilation": head.DILATION,
            "norm": head.NORM,
            "ignore_value": head.IGNORE_VALUE,
            "loss_weight": head.LOSS_WEIGHT,
        }

    def forward(self, features, targets=None):
        x = features[self.in_feature]
        for conv in self.convs:
            x = conv(x)
        # feature i covers input pixels [stride*i, stride*(i+1)): upsampling by the stride lines
        # the scores up with the (padded) input, which is at most one stride smaller (ResNet rounds
        # sizes up)
        x = F.interpolate(self.predictor(x), scale_factor=self.stride, mode="bilinear",
                          align_corners=False)
        if self.training:
            x = x[..., :targets.shape[-2], :targets.shape[-1]]
            loss = F.cross_entropy(x, targets, reduction="mean", ignore_index=self.ignore_value)
            return None, {"loss_sem_seg": loss * self.loss_weight}
        return x, {}
