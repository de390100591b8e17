"""Stage 2: pretraining checkpoint -> verified detectron2 backbone .pkl (`mocobench convert`)."""
from convert.api import ConversionReport, VerificationError, configure_resnet, convert_checkpoint, verify_file

__all__ = ["ConversionReport", "VerificationError", "configure_resnet", "convert_checkpoint", "verify_file"]
