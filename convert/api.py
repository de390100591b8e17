"""`convert_checkpoint`: MoCo / torchvision ResNet checkpoint -> verified detectron2 backbone .pkl.

The pkl is what MoCo's tool-chain and detectron2 expect:
    {"model": {detectron2 name: numpy array}, "__author__": "MOCO" | "torchvision", "matching_heuristics": True}
It is written only after verification passed, atomically: on any error there is no output file (and an
older file at that path is left as it was).
"""
import os
import pickle
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from convert.rename import detectron2_name, to_detectron2
from convert.sources import extract_trunk, read_checkpoint
from mocobench.errors import UsageError
from mocobench.fileio import atomic_write, safe_unpickle

# the protocol MoCo's converter and detectron2's model zoo files use; any reader since Python 3.4 takes it
PICKLE_PROTOCOL = 4


class VerificationError(Exception):
    """Raised when converted weights fail verification; carries the report (`.report`)."""

    def __init__(self, message, report=None):
        super().__init__(message)
        self.report = report


@dataclass
class ConversionReport:
    input_path: str
    output_path: Optional[str]
    source: str  # moco, moco-v3 or torchvision
    detected: bool  # True when --source auto found it
    author: str
    depth: int
    block: str
    converted: List[Tuple[str, str]]  # (key in the checkpoint, detectron2 name)
    dropped: List[Tuple[str, str]]  # (key in the checkpoint, why it was not converted)
    verified: int = 0  # tensors checked equal after detectron2 loaded them (0: verification skipped)
    max_rel_error: Optional[float] = None  # worst res2..res5 relative error against torchvision
    stage_errors: Dict[str, float] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)
    seconds: float = 0.0  # reading + conversion + verification + writing
    verify_seconds: float = 0.0

    @property
    def verification_ran(self):
        return self.max_rel_error is not None

    def dropped_by_reason(self):
        groups: Dict[str, List[str]] = {}
        for key, reason in self.dropped:
            groups.setdefault(reason, []).append(key)
        return groups

    def summary(self) -> str:
        how = "detected" if self.detected else "given"
        lines = [
            f"input    {self.input_path}",
            f"source   {self.source} ({how}), ResNet-{self.depth} ({self.block} blocks), __author__ {self.author!r}",
            "",
            f"  {'converted':<10}{len(self.converted):>8}  tensors (conv weights, BN weight/bias/running_mean/var)",
        ]
        for reason, keys in self.dropped_by_reason().items():
            example = keys[0] if len(keys) == 1 else f"{keys[0]} ..."
            lines.append(f"  {'dropped':<10}{len(keys):>8}  {reason}: {example}")
        if self.verification_ran:
            lines.append(f"  {'verified':<10}{self.verified:>8}  loaded by DetectionCheckpointer, equal key by key")
            errors = ", ".join(f"{stage} {error:.1e}" for stage, error in self.stage_errors.items())
            lines.append(f"  {'max error':<10}{self.max_rel_error:>8.1e}  vs torchvision in eval mode ({errors})")
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
            lines.append(f"wrote    {self.output_path} ({timing})")
        return "\n".join(lines)


def _verify(weights, trunk, report, norm):
    """Verification hook between conversion and writing (tests inject faults by wrapping `to_detectron2`)."""
    from convert.verify import verify_weights

    started = time.perf_counter()
    result = verify_weights(weights, trunk.state, trunk.depth, author=trunk.author, norm=norm)
    report.verify_seconds = time.perf_counter() - started
    report.verified = result.verified
    report.stage_errors = dict(result.stage_errors)
    report.max_rel_error = result.max_rel_error
    report.problems = list(result.problems)


def convert_checkpoint(input_path, output_path, source="auto", verify=True, norm="FrozenBN") -> ConversionReport:
    """Convert, verify (unless verify=False) and atomically write; see the module docstring.

    Raises UsageError for unusable input (unreadable, code-carrying, not a ResNet, unknown layout) and
    VerificationError when the converted weights do not load completely or compute something else.
    """
    started = time.perf_counter()
    input_path, output_path = os.fspath(input_path), os.fspath(output_path)
    if not output_path.endswith(".pkl"):
        raise UsageError(f"output {output_path!r} must end in .pkl (detectron2 reads .pkl files as converted weights)")
    if os.path.abspath(input_path) == os.path.abspath(output_path):
        raise UsageError(f"output {output_path!r} would overwrite the input")
    trunk = extract_trunk(read_checkpoint(input_path), source, input_path)
    weights = to_detectron2(trunk.state)
    report = ConversionReport(
        input_path=input_path,
        output_path=None,
        source=trunk.source,
        detected=source == "auto",
        author=trunk.author,
        depth=trunk.depth,
        block=trunk.block,
        converted=[(trunk.original_keys[name], detectron2_name(name)) for name in trunk.state],
        dropped=trunk.dropped,
    )
    if verify:
        _verify(weights, trunk, report, norm)
        if report.problems:
            report.seconds = time.perf_counter() - started
            raise VerificationError(
                f"{input_path!r}: the converted weights failed verification; nothing was written:\n  "
                + "\n  ".join(report.problems),
                report,
            )
    payload = {"model": weights, "__author__": trunk.author, "matching_heuristics": True}
    with atomic_write(output_path) as f:
        pickle.dump(payload, f, protocol=PICKLE_PROTOCOL)
    report.output_path = output_path
    report.seconds = time.perf_counter() - started
    return report


def read_converted(pkl_path):
    """The `model` dict of a converted .pkl, loaded with the allow-list unpickler and checked for format."""
    data = safe_unpickle(pkl_path)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise UsageError(f"{pkl_path!r} is not a converted backbone: expected a dict with a 'model' dict")
    for name, array in data["model"].items():
        if not isinstance(array, np.ndarray):
            raise UsageError(f"{pkl_path!r}: model[{name!r}] is a {type(array).__name__}, expected a numpy array")
    return data


def verify_file(pkl_path, original_path, source="auto", norm="FrozenBN") -> ConversionReport:
    """Verify an existing .pkl against the checkpoint it was converted from; VerificationError if it fails."""
    started = time.perf_counter()
    pkl_path, original_path = os.fspath(pkl_path), os.fspath(original_path)
    data = read_converted(pkl_path)
    trunk = extract_trunk(read_checkpoint(original_path), source, original_path)
    report = ConversionReport(
        input_path=original_path,
        output_path=pkl_path,
        source=trunk.source,
        detected=source == "auto",
        author=str(data.get("__author__", trunk.author)),
        depth=trunk.depth,
        block=trunk.block,
        converted=[],
        dropped=[],
    )
    _verify(data["model"], trunk, report, norm)
    report.seconds = time.perf_counter() - started
    if report.problems:
        raise VerificationError(
            f"{pkl_path!r} failed verification against {original_path!r}:\n  " + "\n  ".join(report.problems), report
        )
    return report
