"""mocobench: MoCo pretraining -> detectron2 conversion -> VOC/COCO transfer -> AP report.

torch/torchvision and detectron2 are installed by `make setup` (tools/install_detectron2.py), not by
pip's resolver: torch is pinned there, and detectron2 has no usable distribution on PyPI.
"""
from setuptools import find_packages, setup

setup(
    name="mocobench",
    version="0.1.0",
    description="MoCo pretraining and detectron2 transfer benchmark, verified at every hand-off",
    packages=find_packages(include=["mocobench", "mocobench.*", "pretrain", "pretrain.*",
                                    "convert", "convert.*", "transfer", "transfer.*",
                                    "synth", "synth.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy",
        "Pillow",
        "opencv-python-headless",
        # JPEG decoding in the data loader (pretrain.data.read_rgb): libjpeg-turbo with its SIMD
        # code, which OpenCV's bundled copy lacks; pinned, it is on the training input path
        "simplejpeg==1.9.0",
        "fvcore",
        "iopath",
        "pycocotools",
        "PyYAML",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "scipy",  # the report's Welch confidence intervals (t quantiles)
        # detectron2 0.6 runtime needs (its own pins are stale, it is installed with --no-deps)
        "cloudpickle",
        "omegaconf>=2.1",
        "yacs>=0.1.8",
        "termcolor>=1.1",
        "tabulate",
        # `mocobench data synth` makes the Cityscapes gtFine PNGs with its preparation tools;
        # Cityscapes evaluation
        "cityscapesscripts",
    ],
    extras_require={
        "slurm": ["submitit>=1.5"],  # --launcher slurm (mocobench.launch)
        # the paper's other transfer tasks: LVIS evaluation (lvis), Cityscapes polygons in
        # detectron2's loader (shapely)
        "tasks": ["lvis", "shapely"],
        # optional W&B logging (WANDB.ENABLED, MOCOBENCH.WANDB.ENABLED; docs/logging.md)
        "wandb": ["wandb"],
        # timm and lightly: the tests build checkpoints of those layouts with the real packages
        # (convert); pytest-timeout: per-test limit (pytest.ini); pytest-xdist: `pytest -n 2`;
        # mutmut: `make mutation`; wandb: its offline mode is tested (tests/test_run_logging.py)
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "mutmut==3.8.1", "ruff",
                 "submitit>=1.5", "timm>=0.9", "lightly>=1.4", "lvis", "shapely", "wandb"],
    },
    entry_points={"console_scripts": ["mocobench=mocobench.cli:main"]},
)
