"""What this installation runs on (collect_env, like detectron2's but short), the versions a run
record keeps, and the TF32 switches every stage sets the same way."""
import importlib.metadata
import os
import platform
import sys

from mocobench.utils.errors import UsageError


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
                 "simplejpeg", "setuptools"):
        rows.append((dist, _version(dist)))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rows.append(("mocobench", f"{_version('mocobench')} @ {repo}"))
    return rows


# TF32 None: what torch does unless told, i.e. what the official scripts ran with on an Ampere+ GPU
# (facebookresearch/moco and moco-v3 never set these switches)
TORCH_DEFAULT_TF32 = {"tf32_matmul": False, "tf32_cudnn": True}


def set_tf32(enabled) -> dict:
    """Set TF32 tensor-core math for CUDA float32 matmuls and cuDNN convolutions (Ampere and newer
    GPUs), both explicitly, so that an earlier run in the same process leaves nothing behind.

    None: torch's defaults (matmul off, cuDNN convolutions on), what the official scripts get on an
    A100/H100; True: both on; False: both off, the papers' V100 fp32 (slower convolutions
    on an A100/H100). Returns the flags as set, for the log and the run record."""
    import torch

    if enabled is None:
        matmul, cudnn = TORCH_DEFAULT_TF32["tf32_matmul"], TORCH_DEFAULT_TF32["tf32_cudnn"]
    else:
        matmul = cudnn = bool(enabled)
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = cudnn
    return {"tf32": enabled, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32}


def check_tf32(key, value):
    """The TF32 switch must be null (torch's defaults), True or False; raises UsageError naming
    `key`."""
    if value is not None and not isinstance(value, bool):
        raise UsageError(f"{key} = {value!r} must be None / null (torch's defaults: cuDNN "
                         "TF32 on, matmul TF32 off), True (both on) or False (both off)")
