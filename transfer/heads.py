"""The C4 box/mask head of the MoCo detection experiments.

MoCo (He et al., 2020, Sec. 4.2 and Appendix) fine-tunes every BN layer ("BN tuned", synchronized across
GPUs) and, for R50-C4, appends one more normalization layer after res5: the pretrained res5 ends in a
residual sum whose scale the new box/mask predictors have never seen, and the extra norm hands them
normalized features. It is newly initialized (weight 1, bias 0) and is absent from any pretrained .pkl.
"""
from mocobench import d2compat  # noqa: F401  (before any detectron2 import)

# isort: split
from detectron2.config import configurable
from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """detectron2's Res5ROIHeads with `get_norm(MODEL.RESNETS.NORM)` applied to the res5 output."""

    @configurable
    def __init__(self, *, extra_norm: str, **kwargs):
        super().__init__(**kwargs)
        # res5 is an nn.Sequential of blocks shared by the box and the mask head: appending the norm to it
        # normalizes the features both heads see, which is where the paper puts it.
        self.res5.add_module("norm", get_norm(extra_norm, self.res5[-1].out_channels))

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["extra_norm"] = cfg.MODEL.RESNETS.NORM
        return ret
