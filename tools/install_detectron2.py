#!/usr/bin/env python3
"""Install detectron2 into the current Python environment (called by `make setup`).

Route:
1. If `import detectron2` already works (a user's own CUDA build, say), keep it.
2. Otherwise build detectron2 v0.6 from the PyPI sdist `pb1-detectron2==0.6`, whose Python files
   are the official v0.6 tag's but which lacks the C++ sources (`detectron2/layers/csrc`). We
   verify the sdist's sha256, then build a pure-Python wheel with our own tiny setup script: no
   extension, the model-zoo yaml files kept inside the package, none of the stale pins
   (black==21.4b2, iopath<0.1.10, fvcore<0.1.6). It is installed with --no-deps; setup.py lists the
   runtime needs. ROIAlign and NMS come from torchvision, so Faster/Mask R-CNN are complete; only
   rotated boxes and deformable convs (which need `detectron2._C`) are missing, and
   `mocobench.utils.d2compat` makes them fail with a clear error.
A marker file `detectron2/_mocobench_build.json` records the origin for `mocobench env`.
"""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

# the project is installed (editable) before this runs
from mocobench.utils.fileio import file_sha256

SDIST = "pb1-detectron2==0.6"
SDIST_FILE = "pb1-detectron2-0.6.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
MARKER = "_mocobench_build.json"

SETUP_PY = """
from setuptools import find_packages, setup
setup(
    name="detectron2",
    version="0.6",
    description="detectron2 v0.6 Python sources (from the pb1-detectron2 sdist), built without "
                "the C++ extension",
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    package_data={"detectron2": ["%s"],
                  "detectron2.model_zoo": ["configs/*.yaml", "configs/**/*.yaml",
                                           "configs/**/*.py"]},
    python_requires=">=3.7",
)
""" % MARKER


def run(cmd, **kw):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def detectron2_importable(report_failure=False) -> bool:
    probe = "import detectron2, sys; sys.stdout.write(detectron2.__file__)"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if r.returncode == 0:
        print(f"detectron2 importable from {r.stdout}: keeping it")
    elif report_failure:
        print(f"error: detectron2 does not import after the install:\n{r.stderr}", file=sys.stderr)
    return r.returncode == 0


def fetch_sdist(cache_dir) -> str:
    path = os.path.join(cache_dir, SDIST_FILE)
    if not os.path.exists(path):
        # --no-build-isolation: the sdist's setup.py imports torch, which must come from this
        # environment
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
             "--no-binary", ":all:", "-d", cache_dir, SDIST])
    digest = file_sha256(path)
    if digest != SDIST_SHA256:
        sys.exit(f"error: {path} has sha256 {digest}, expected {SDIST_SHA256}. Refusing to build "
                 "from an unverified detectron2 source; delete the file to download it again.")
    print(f"verified {SDIST_FILE} sha256 {digest}")
    return path


def build_wheel(sdist, cache_dir) -> str:
    work = tempfile.mkdtemp(prefix="d2build-")
    try:
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        src = os.path.join(work, "pb1-detectron2-0.6")
        configs = os.path.join(src, "detectron2", "model_zoo", "configs")
        n_yaml = sum(f.endswith(".yaml") for _, _, files in os.walk(configs) for f in files)
        if n_yaml == 0:
            sys.exit(f"error: no model-zoo yaml files under {configs} in {sdist}")
        with open(os.path.join(src, "detectron2", MARKER), "w") as f:
            json.dump({"origin": "mocobench sdist build", "sdist": SDIST, "sha256": SDIST_SHA256,
                       "extension": False}, f)
        with open(os.path.join(src, "setup.py"), "w") as f:
            f.write(SETUP_PY)
        # the sdist's own metadata and setup.cfg describe the package we are replacing
        shutil.rmtree(os.path.join(src, "pb1_detectron2.egg-info"), ignore_errors=True)
        if os.path.exists(os.path.join(src, "setup.cfg")):
            os.remove(os.path.join(src, "setup.cfg"))
        wheel_dir = os.path.join(cache_dir, "wheels")
        os.makedirs(wheel_dir, exist_ok=True)
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
             wheel_dir, src])
        wheels = [w for w in os.listdir(wheel_dir) if w.startswith("detectron2-0.6-")]
        return os.path.join(wheel_dir, wheels[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    if detectron2_importable():
        return 0
    cache_dir = os.path.abspath(sys.argv[1] if len(sys.argv) > 1
                                else os.path.join(".venv", "d2cache"))
    os.makedirs(cache_dir, exist_ok=True)
    wheel = build_wheel(fetch_sdist(cache_dir), cache_dir)
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", wheel])
    return 0 if detectron2_importable(report_failure=True) else 1


if __name__ == "__main__":
    sys.exit(main())
