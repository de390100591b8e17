"""`mocobench convert INPUT OUTPUT.pkl [--source ...] [--no-verify]`.

Exit codes: 0 converted (and verified), 1 verification failed (nothing written), 2 bad input.
"""
import argparse
import sys

from convert.api import VerificationError, convert_checkpoint
from convert.sources import SOURCES


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mocobench convert",
        description="Convert a MoCo v1/v2/v3 or torchvision ResNet checkpoint into a detectron2 backbone .pkl, "
        "then prove it: detectron2 must load every backbone tensor and reproduce torchvision's res2..res5 outputs.",
        epilog="exit codes: 0 ok, 1 verification failed (nothing written), 2 bad input",
    )
    parser.add_argument("input", help="checkpoint: .pth / .pth.tar (torch, weights-only) or .pkl (numpy arrays)")
    parser.add_argument("output", help="the detectron2 weights file to write (.pkl)")
    parser.add_argument("--source", default="auto", choices=["auto", *SOURCES],
                        help="checkpoint layout (default: detect it from the keys)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip loading into detectron2 and the numerical comparison (not recommended)")
    parser.add_argument("--list-dropped", action="store_true",
                        help="print every key that was not converted (the summary shows one per reason)")
    return parser


def main(argv):
    args = build_parser().parse_args(argv)
    try:
        report = convert_checkpoint(args.input, args.output, source=args.source, verify=args.verify)
    except VerificationError as e:
        if e.report is not None:
            print(e.report.summary())
        print(f"mocobench convert: error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    if args.list_dropped:
        for reason, keys in report.dropped_by_reason().items():
            print(f"\ndropped: {reason} ({len(keys)})")
            print("\n".join(f"  {key}" for key in keys))
    return 0
