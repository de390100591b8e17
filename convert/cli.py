"""`mocobench convert INPUT OUTPUT [--source ...] [--prefix P] [--to detectron2|torchvision]
[--no-verify] [--force]`.

Exit codes: 0 converted (and verified), 1 verification failed (nothing written), 2 bad input.
"""
import argparse
import sys

from convert.api import FORMATS, VerificationError, convert_checkpoint
from convert.sources import SOURCES
from mocobench.utils.errors import UsageError


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mocobench convert",
        description="Convert a ResNet checkpoint (MoCo, DINO, SwAV, Barlow Twins, DenseCL, PixPro, "
        "solo-learn, mmselfsup, VISSL, lightly, timm, torchvision, or any file with one ResNet "
        "trunk) into a detectron2 backbone .pkl or a torchvision .pth, then prove it: detectron2 "
        "must load every trunk tensor and reproduce torchvision's res2..res5 outputs. OUT.json "
        "records the conversion.",
        epilog="exit codes: 0 ok, 1 verification failed (nothing written), 2 bad input",
    )
    parser.add_argument("input", nargs="?",
                        help="checkpoint: .pth / .pth.tar / .ckpt / .torch (torch, weights-only), "
                             ".safetensors, or .pkl (numpy arrays)")
    parser.add_argument("output", nargs="?",
                        help="the file to write: .pkl (detectron2) or .pth (--to torchvision)")
    parser.add_argument("--source", default="auto", choices=["auto", *SOURCES],
                        help="checkpoint layout (default: detect it; --list-sources shows them)")
    parser.add_argument("--prefix", default=None,
                        help="the key prefix of the trunk to convert, e.g. 'module.encoder_k.' "
                             "(for files with several trunks and no known layout)")
    parser.add_argument("--to", default="detectron2", choices=list(FORMATS),
                        help="output format (default: detectron2 .pkl)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip loading into detectron2 and the numerical comparison (not "
                             "recommended)")
    parser.add_argument("--force", action="store_true",
                        help="replace OUTPUT (and OUT.json) when it exists already (default: "
                             "refuse)")
    parser.add_argument("--list-dropped", action="store_true",
                        help="print every key that was not converted (the summary shows one per "
                             "reason)")
    parser.add_argument("--list-sources", action="store_true",
                        help="print the known layouts and exit")
    return parser


def list_sources():
    rows = [("source", "author", "example trunk key", "layout read from")]
    rows += [(s.name, s.author, s.example, s.layout) for s in SOURCES.values()]
    rows.append(("(other)", "mocobench", "<prefix>conv1.weight",
                 "generic discovery: the one complete trunk, or --prefix"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3]
                     for row in rows)


def main(argv):
    args = build_parser().parse_args(argv)
    if args.list_sources:
        print(list_sources())
        return 0
    if not args.input or not args.output:
        raise UsageError("convert needs INPUT and OUTPUT (or --list-sources)")
    try:
        report = convert_checkpoint(args.input, args.output, source=args.source, verify=args.verify,
                                    prefix=args.prefix, to=args.to, force=args.force)
    except VerificationError as e:  # what was checked, then the error (mocobench.utils.errors)
        if e.report is not None:
            print(e.report.summary())
        raise
    print(report.summary())
    for warning in report.warnings:  # also in OUT.json ("warnings")
        print(f"mocobench convert: warning: {warning}", file=sys.stderr)
    if args.list_dropped:
        for reason, keys in report.dropped_by_reason().items():
            print(f"\ndropped: {reason} ({len(keys)})")
            print("\n".join(f"  {key}" for key in keys))
    return 0
