"""What this installation runs on (collect_env, like detectron2's but short), the versions a run
record keeps, and the TF32 switches every stage sets the same way."""
import importlib.metadata
import os
import platform
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def software_versions() -> dict:
    """The versions a run record or manifest keeps (None: not installed)."""
    out = {"python": sys.version.split()[0]}
    for dist in ("torch", "torchvision", "detectron2", "fvcore", "pycocotools", "mocobench"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def collect_env() -> list:
    """(name, value) rows; never raises, a broken import is reported as such."""
    rows = [("Python", f"{sys.version.split()[0]} ({sys.executable})"),
            ("Platform", platform.platform())]
    import numpy
    import torch
    import torchvision

    rows += [
        ("numpy", numpy.__version__),
        ("torch", f"{torch.__version__} @ {os.path.dirname(torch.__file__)}"),
        ("torchvision", torchvision.__version__),
        ("CUDA available", str(torch.cuda.is_available())),
    ]
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        rows += [("GPU count", str(torch.cuda.device_count())), ("GPU", ", ".join(names)),
                 ("CUDA (torch build)", str(torch.version.cuda)),
                 ("NCCL", ".".join(map(str, torch.cuda.nccl.version())))]
    rows.append(("CPU threads (torch)", str(torch.get_num_threads())))
    try:
        import mocobench.utils.d2compat as d2compat  # first: it makes detectron2 v0.6 importable

        import detectron2

        rows += [
            ("detectron2", f"{detectron2.__version__} @ {os.path.dirname(detectron2.__file__)}"),
            ("detectron2 origin", d2compat.detectron2_origin()),
            ("detectron2 fixes active",
             ", ".join(d2compat.ACTIVE_FIXES) or "none (modern detectron2)"),
        ]
    except Exception as e:  # env must report a broken detectron2, not die of it
        rows.append(("detectron2", f"failed to import: {type(e).__name__}: {e}"))
    for dist in ("fvcore", "iopath", "pycocotools", "opencv-python-headless", "Pillow",
                 "setuptools"):
        rows.append((dist, _version(dist)))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rows.append(("mocobench", f"{_version('mocobench')} @ {repo}"))
    return rows


def set_tf32(enabled: bool) -> dict:
    """Set TF32 tensor-core math for CUDA float32 matmuls and cuDNN convolutions, both explicitly
    (torch's own defaults differ: matmul off, cuDNN on, so an "fp32" run on an Ampere+ GPU is partly
    TF32 unless told). Returns the flags as set, for the log and the run record. False reproduces
    the papers' V100 fp32."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    return {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32}
