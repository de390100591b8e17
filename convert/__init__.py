"""Stage 2: pretraining checkpoint -> verified detectron2 backbone .pkl (`mocobench convert`)."""
from convert.api import ConversionReport, VerificationError, convert_checkpoint, verify_file

__all__ = ["ConversionReport", "VerificationError", "convert_checkpoint", "verify_file"]
