"""`convert_checkpoint`: a ResNet checkpoint of any known layout -> verified detectron2 .pkl or
torchvision .pth.

The pkl is what MoCo's tool-chain and detectron2 expect, plus the architecture it holds:
    {"model": {detectron2 name: numpy array}, "__author__": source author,
     "matching_heuristics": True, "architecture": "ResNeXt-50 32x4d",
     "resnets": {DEPTH, NUM_GROUPS, WIDTH_PER_GROUP, RES2_OUT_CHANNELS, STRIDE_IN_1X1}}
(mocobench.utils.converted reads and writes it; transfer sets MODEL.RESNETS from it).
`--to torchvision` writes the trunk's plain torchvision state dict instead (a .pth that loads
strictly into the ResNet minus fc). Outputs are written only after verification passed, atomically:
on any error there is no output file (and an older file at that path is left as it was). OUT.json
next to the output records the conversion.
"""
import json
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from convert.arch import Architecture
from convert.rename import detectron2_name, to_detectron2
from convert.sources import extract_trunk, read_checkpoint
from mocobench.utils.converted import read_converted, write_converted
from mocobench.utils.errors import CommandFailed, UsageError
from mocobench.utils.fileio import atomic_torch_save, atomic_write, file_sha256

FORMATS = {"detectron2": ".pkl", "torchvision": ".pth"}


class VerificationError(CommandFailed):
    """Converted weights failed verification (exit code 1); carries the report (`.report`)."""

    def __init__(self, message, report=None):
        super().__init__(message)
        self.report = report


@dataclass
class ConversionReport:
    input_path: str
    output_path: Optional[str]
    source: str  # a name of convert.sources.SOURCES, or "generic"
    detected: bool  # True when --source auto found it
    author: str
    arch: Architecture
    prefix: str  # where the trunk was found
    converted: List[Tuple[str, str]]  # (key in the checkpoint, output name)
    dropped: List[Tuple[str, str]]  # (key in the checkpoint, why it was not converted)
    to: str = "detectron2"
    # tensors checked equal after detectron2 loaded them (0: verification skipped)
    verified: int = 0
    max_rel_error: Optional[float] = None  # worst res2..res5 relative error against torchvision
    stage_errors: Dict[str, float] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)
    seconds: float = 0.0  # reading + conversion + verification + writing
    verify_seconds: float = 0.0
    input_sha256: str = ""
    output_sha256: str = ""
    json_path: Optional[str] = None
    # framework classes read as placeholders (convert.sources)
    opaque: List[str] = field(default_factory=list)
    # converted, with something the user should check (convert.sources.unnamed_variant_warning)
    warnings: List[str] = field(default_factory=list)

    @property
    def verification_ran(self):
        return self.max_rel_error is not None

    def dropped_by_reason(self):
        groups: Dict[str, List[str]] = {}
        for key, reason in self.dropped:
            groups.setdefault(reason, []).append(key)
        return groups

    def as_dict(self):
        return {
            "input": os.path.abspath(self.input_path),
            "input_sha256": self.input_sha256,
            "output": os.path.abspath(self.output_path) if self.output_path else None,
            "output_sha256": self.output_sha256 or None,
            "format": self.to,
            "source": self.source,
            "detected": self.detected,
            "prefix": self.prefix,
            "author": self.author,
            "architecture": self.arch.as_dict(),
            "detectron2_resnets": self.arch.detectron2_resnets(),
            "converted": len(self.converted),
            "dropped": [{"key": key, "reason": reason} for key, reason in self.dropped],
            "ignored_objects": list(self.opaque),
            "verified": self.verified,
            "max_rel_error": self.max_rel_error,
            "stage_rel_errors": dict(self.stage_errors),
            "problems": list(self.problems),
            "warnings": list(self.warnings),
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        how = "detected" if self.detected else "given"
        lines = [
            f"input    {self.input_path}",
            f"source   {self.source} ({how}), {self.arch.name} ({self.arch.block} blocks) under "
            f"{self.prefix!r}, __author__ {self.author!r}",
            "",
            f"  {'converted':<10}{len(self.converted):>8}  tensors (conv weights, BN "
            "weight/bias/running_mean/var)",
        ]
        for reason, keys in self.dropped_by_reason().items():
            example = keys[0] if len(keys) == 1 else f"{keys[0]} ..."
            lines.append(f"  {'dropped':<10}{len(keys):>8}  {reason}: {example}")
        if self.opaque:
            lines.append(f"  {'ignored':<10}{len(self.opaque):>8}  framework objects (no weights, "
                         f"read as placeholders): {', '.join(self.opaque)}")
        if self.verification_ran:
            lines.append(f"  {'verified':<10}{self.verified:>8}  loaded by DetectionCheckpointer, "
                         "equal key by key")
            errors = ", ".join(f"{stage} {error:.1e}" for stage, error in self.stage_errors.items())
            lines.append(f"  {'max error':<10}{self.max_rel_error:>8.1e}  detectron2 vs "
                         f"torchvision in eval mode ({errors})")
        else:
            lines.append(f"  {'verified':<10}{'-':>8}  verification skipped (--no-verify)")
        for problem in self.problems:
            lines.append(f"  FAILED    {problem}")
        lines.append("")
        if self.problems:
            lines.append(f"verification FAILED; nothing written ({self.seconds:.1f} s)")
        else:
            timing = f"{self.seconds:.1f} s"
            if self.verification_ran:
                timing += f", verification {self.verify_seconds:.1f} s"
            lines.append(f"wrote    {self.output_path} ({self.to}, {timing})")
            if self.json_path:
                lines.append(f"report   {self.json_path}")
        return "\n".join(lines)



def report_path(output_path):
    """OUT.json next to OUT.pkl / OUT.pth."""
    return os.path.splitext(os.fspath(output_path))[0] + ".json"


def _verify(weights, trunk, report, norm, reference_state=None):
    """Verification hook between conversion and writing (tests inject faults by wrapping
    `to_detectron2`)."""
    from convert.verify import verify_weights

    started = time.perf_counter()
    result = verify_weights(weights, trunk.state, trunk.arch, author=trunk.author, norm=norm,
                            reference_state=reference_state)
    report.verify_seconds = time.perf_counter() - started
    report.verified = result.verified
    report.stage_errors = dict(result.stage_errors)
    report.max_rel_error = result.max_rel_error
    report.problems = list(result.problems)


def torchvision_state(trunk):
    """The trunk as torchvision's own state dict of the ResNet minus fc: float32,
    num_batches_tracked 0 (the counter only matters to BN momentum None, and detectron2 has none to
    carry)."""
    from convert.verify import build_torchvision_resnet

    model = build_torchvision_resnet(trunk.arch, trunk.state)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def check_output(output_path, force):
    """UsageError when the output (or its OUT.json) is a directory, or exists and `force` is
    False: `mocobench convert` replaces a file only when asked (--force), as pretrain and transfer
    refuse to write into a finished run."""
    for path in (output_path, report_path(output_path)):
        if os.path.isdir(path):
            raise UsageError(f"output {path!r} is a directory, not a file")
        if os.path.lexists(path) and not force:
            raise UsageError(f"output {path!r} already exists; pass --force to replace it, or "
                             "choose another output")


def convert_checkpoint(input_path, output_path, source="auto", verify=True, norm="FrozenBN",
                       prefix=None, to="detectron2", force=True) -> ConversionReport:
    """Convert, verify (unless verify=False), atomically write the output and OUT.json; see the
    module docstring. force=False refuses an output or OUT.json that exists already (the command
    line's default; callers that own their output directory, like the pipeline, replace it).

    Raises UsageError for unusable input (unreadable, code-carrying, not a plain ResNet, no or
    several trunks) and VerificationError when the converted weights do not load completely or
    compute something else.
    """
    started = time.perf_counter()
    input_path, output_path = os.fspath(input_path), os.fspath(output_path)
    if to not in FORMATS:
        raise UsageError(f"--to {to!r}: expected one of {', '.join(FORMATS)}")
    if not output_path.endswith(FORMATS[to]):
        raise UsageError(f"output {output_path!r} must end in {FORMATS[to]} for --to {to}")
    if os.path.abspath(input_path) \
            in (os.path.abspath(output_path), os.path.abspath(report_path(output_path))):
        raise UsageError(f"output {output_path!r} (or its report {report_path(output_path)!r}) "
                         "would overwrite the input")
    check_output(output_path, force)
    trunk = extract_trunk(read_checkpoint(input_path), source, prefix)
    weights = to_detectron2(trunk.state)
    tv_state = None
    if to == "torchvision":
        tv_state = torchvision_state(trunk)
        converted = [(trunk.original_keys[name], name) for name in trunk.state]
    else:
        converted = [(trunk.original_keys[name], detectron2_name(name)) for name in trunk.state]
    report = ConversionReport(
        input_path=input_path, output_path=None, source=trunk.source, detected=trunk.detected,
        author=trunk.author, arch=trunk.arch, prefix=trunk.prefix, converted=converted,
        dropped=trunk.dropped, to=to, opaque=list(trunk.opaque), warnings=list(trunk.warnings),
    )
    if verify:
        _verify(weights, trunk, report, norm, reference_state=tv_state)
        if report.problems:
            report.seconds = time.perf_counter() - started
            raise VerificationError(
                f"{input_path!r}: the converted weights failed verification; nothing was "
                "written:\n  "
                + "\n  ".join(report.problems),
                report,
            )
    if to == "torchvision":
        atomic_torch_save(tv_state, output_path)
    else:
        write_converted(output_path, weights, trunk.author, trunk.arch.name,
                        trunk.arch.detectron2_resnets())
    report.output_path = output_path
    report.input_sha256 = file_sha256(input_path)
    report.output_sha256 = file_sha256(output_path)
    report.seconds = time.perf_counter() - started
    report.json_path = report_path(output_path)
    with atomic_write(report.json_path, "w") as f:
        json.dump(report.as_dict(), f, indent=2)
        f.write("\n")
    return report


def verify_file(pkl_path, original_path, source="auto", norm="FrozenBN") -> ConversionReport:
    """Verify an existing .pkl against the checkpoint it was converted from; VerificationError if
    it fails."""
    started = time.perf_counter()
    pkl_path, original_path = os.fspath(pkl_path), os.fspath(original_path)
    data = read_converted(pkl_path)
    trunk = extract_trunk(read_checkpoint(original_path), source)
    report = ConversionReport(
        input_path=original_path, output_path=pkl_path, source=trunk.source,
        detected=trunk.detected, author=str(data.get("__author__", trunk.author)), arch=trunk.arch,
        prefix=trunk.prefix, converted=[], dropped=[],
    )
    _verify(data["model"], trunk, report, norm)
    report.seconds = time.perf_counter() - started
    if report.problems:
        raise VerificationError(
            f"{pkl_path!r} failed verification against {original_path!r}:\n  "
            + "\n  ".join(report.problems), report
        )
    return report
