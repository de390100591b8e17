"""The one door to detectron2: `from mocobench.utils import d2compat` before any
`import detectron2...`.

detectron2 v0.6 (the last release, and what the pb1-detectron2 sdist holds) breaks on current
libraries. Importing this module imports detectron2's public packages once, applying each fix below
only when the thing it repairs is really missing, so on a modern or self-built detectron2 every fix
is a no-op. `ACTIVE_FIXES` lists what was applied; `mocobench env` prints it.

Fixes are as local as possible: module-level names inside the affected detectron2 modules are
rebound; stand-in modules exist in `sys.modules` only while detectron2 itself is being imported, so
no other library ever sees them afterwards.

  numpy_aliases     numpy >= 1.24 dropped np.int/np.float/np.str/np.object, used by data/build.py
                    (class histogram of every train loader) and data/datasets/pascal_voc.py (every
                    VOC load). Those modules get a numpy proxy that has the aliases; global numpy is
                    untouched.
  pil_linear        Pillow >= 10 dropped Image.LINEAR, a default argument in
                    data/transforms/transform.py: present only while that module is imported (the
                    default becomes BILINEAR, its value).
  no_C_extension    the build has no detectron2._C: a stand-in is importable only while detectron2
                    loads; deformable convs, rotated boxes and ROIAlignRotated then raise a clear
                    error when used.
  coco_eval         COCOEvaluator's default use_fast_impl=True needs the C++ COCOeval from _C:
                    routed to pycocotools' COCOeval (same results; the fast one is only faster).
  pkg_resources     setuptools >= 81 has no pkg_resources, imported by model_zoo: model_zoo gets a
                    private resource_filename() built on importlib.resources.
  random_sample_set Python >= 3.11 random.sample() refuses sets; data/common.py MapDataset samples
                    its fallback candidates (a set) exactly when a mapper returns None. Its Random
                    sorts first.
  numpy_aliases_{lvis,cityscapes}  the same numpy aliases (and np.in1d, gone in numpy 2.4;
                    count_nonzero returning a Python int, as before numpy 2) for the lvis and
                    cityscapesscripts evaluation modules, applied when such an evaluator is built
                    (`fix_evaluation_numpy`): importing them costs a second.
  cityscapes_pool   load_cityscapes_instances' multiprocessing.Pool: under a spawned launcher its
                    workers are fresh interpreters that import detectron2 without the fixes above;
                    they import this module first.
  lr_scheduler_ckpt torch >= 2.0: the LRScheduler hook saves/loads state only for the private
                    _LRScheduler; schedulers derived from the public LRScheduler (StepLR, ...) were
                    silently not checkpointed and restarted on resume.
detectron2.export (which imports caffe2, gone from torch) is never imported through here.
"""
import contextlib
import importlib
import importlib.util
import random
import sys
import types

ACTIVE_FIXES = []

_MISSING_C = (
    "detectron2 was built without its C++ extension (detectron2._C), so {what} is unavailable. "
    "Faster/Mask R-CNN need none of it (ROIAlign and NMS come from torchvision). For deformable "
    "convs, rotated boxes or ROIAlignRotated install a full detectron2 build; "
    "`tools/install_detectron2.py` keeps it."
)


class _MissingExtension(types.ModuleType):
    """Stand-in for detectron2._C: importing succeeds, calling anything raises a clear error."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(_MISSING_C.format(what=f"'_C.{name}'"))

        return unavailable


@contextlib.contextmanager
def _temporary_module(name, module):
    """Make `module` importable as `name` for the duration of the block only."""
    sys.modules[name] = module
    try:
        yield
    finally:
        sys.modules.pop(name, None)
        parent, _, child = name.rpartition(".")
        if parent and getattr(sys.modules.get(parent), child, None) is module:
            delattr(sys.modules[parent], child)


@contextlib.contextmanager
def _no_C_extension():
    if importlib.util.find_spec("detectron2._C") is not None:
        yield
        return
    ACTIVE_FIXES.append("no_C_extension")
    with _temporary_module("detectron2._C", _MissingExtension("detectron2._C")):
        yield


@contextlib.contextmanager
def _pil_linear():
    from PIL import Image

    if hasattr(Image, "LINEAR"):
        yield
        return
    ACTIVE_FIXES.append("pil_linear")
    Image.LINEAR = Image.BILINEAR
    try:
        yield
    finally:
        del Image.LINEAR


def _resource_filename(package, resource):
    import importlib.resources

    return str(importlib.resources.files(package).joinpath(resource))


@contextlib.contextmanager
def _pkg_resources():
    if importlib.util.find_spec("pkg_resources") is not None:
        yield
        return
    ACTIVE_FIXES.append("pkg_resources")
    shim = types.ModuleType("pkg_resources",
                            "mocobench stand-in: resource_filename via importlib.resources")
    shim.resource_filename = _resource_filename
    with _temporary_module("pkg_resources", shim):
        yield


def _numpy_with_aliases():
    import numpy

    proxy = types.ModuleType("numpy",
                             "numpy with the aliases removed in numpy 1.24 (for detectron2 v0.6)")
    proxy.__getattr__ = lambda name: getattr(numpy, name)
    proxy.int, proxy.float, proxy.str, proxy.object = int, float, str, object
    if not hasattr(numpy, "in1d"):  # removed in numpy 2.4; isin(...).ravel() is what in1d returned
        proxy.in1d = lambda a, b, assume_unique=False, invert=False: numpy.isin(
            a, b, assume_unique=assume_unique, invert=invert).ravel()
    return proxy


def _count_nonzero_as_int(a, axis=None, **kwargs):
    """numpy < 2 returned a Python int without `axis`; cityscapesscripts json-dumps those counts
    with `default=lambda o: o.__dict__`, which a numpy integer does not have."""
    import numpy

    count = numpy.count_nonzero(a, axis=axis, **kwargs)
    return int(count) if axis is None else count


def _fix_numpy_aliases():
    import numpy

    if hasattr(numpy, "int"):
        return
    ACTIVE_FIXES.append("numpy_aliases")
    proxy = _numpy_with_aliases()
    for name in ("detectron2.data.build", "detectron2.data.datasets.pascal_voc",
                 "detectron2.evaluation.sem_seg_evaluation"):
        importlib.import_module(name).np = proxy


# Evaluation code that detectron2's evaluators call, from the `lvis` and `cityscapesscripts`
# packages, written for numpy < 1.24 / < 2 (np.float in lvis' accumulate; np.in1d and int-valued
# count_nonzero in the Cityscapes ones). They are imported only when an evaluator of that family is
# built (lvis pulls in matplotlib: ~1 s), so the fix is applied then.
EVALUATION_MODULES = {
    "lvis": ("lvis.eval",),
    "cityscapes": ("cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling",
                   "cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling"),
}


def fix_evaluation_numpy(family: str):
    """Give the `family` evaluation modules a numpy with the removed names; a no-op on a numpy that
    has them."""
    import numpy

    numpy2 = isinstance(numpy.count_nonzero(numpy.ones(1)), numpy.integer)
    if hasattr(numpy, "float") and hasattr(numpy, "in1d") and not numpy2:
        return
    fix = f"numpy_aliases_{family}"
    if fix not in ACTIVE_FIXES:
        ACTIVE_FIXES.append(fix)
    proxy = _numpy_with_aliases()
    if numpy2:
        proxy.count_nonzero = _count_nonzero_as_int
    for name in EVALUATION_MODULES[family]:
        importlib.import_module(name).np = proxy


def _fix_coco_eval():
    from detectron2.evaluation import coco_evaluation

    if importlib.util.find_spec("detectron2._C") is not None:
        return
    from pycocotools.cocoeval import COCOeval

    ACTIVE_FIXES.append("coco_eval")
    coco_evaluation.COCOeval_opt = COCOeval


class _SetSamplingRandom(random.Random):
    def sample(self, population, k, **kwargs):
        if isinstance(population, (set, frozenset)):
            # sorted: the same draw for the same seed, as before 3.11
            population = sorted(population)
        return super().sample(population, k, **kwargs)


def _fix_random_sample_set():
    try:
        random.Random(0).sample({0}, 1)
        return
    except TypeError:
        pass
    from detectron2.data import common

    ACTIVE_FIXES.append("random_sample_set")
    local_random = types.ModuleType("random",
                                    "random whose Random.sample accepts sets (for detectron2 v0.6)")
    local_random.__getattr__ = lambda name: getattr(random, name)
    local_random.Random = _SetSamplingRandom
    common.random = local_random


def _import_d2compat():
    importlib.import_module("mocobench.utils.d2compat")


def _fix_cityscapes_pool():
    """load_cityscapes_instances parses the json files in a multiprocessing.Pool. Under a spawned
    launcher (detectron2's `launch`, our CPU launcher) the pool's workers are fresh interpreters
    that import detectron2 by unpickling the task, without the import-time fixes above; their pool
    now imports this module first."""
    if not {"no_C_extension", "pil_linear", "pkg_resources"} & set(ACTIVE_FIXES):
        return
    import multiprocessing

    from detectron2.data.datasets import cityscapes

    ACTIVE_FIXES.append("cityscapes_pool")

    def pool(processes=None):  # detectron2 calls mp.Pool(processes=...)
        # spawn, not fork: forking a process that runs torch's and pytest-xdist's threads hung a
        # worker for good
        return multiprocessing.get_context("spawn").Pool(processes, initializer=_import_d2compat)

    local_mp = types.ModuleType(
        "multiprocessing", "multiprocessing whose Pool workers import mocobench.utils.d2compat")
    local_mp.__getattr__ = lambda name: getattr(multiprocessing, name)
    local_mp.Pool = pool
    cityscapes.mp = local_mp


def _fix_lr_scheduler_ckpt():
    import torch
    from detectron2.engine import hooks

    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if hooks.LRScheduler(probe, torch.optim.lr_scheduler.StepLR(probe, 1)).state_dict():
        return
    ACTIVE_FIXES.append("lr_scheduler_ckpt")
    public_base = torch.optim.lr_scheduler.LRScheduler

    def state_dict(self):
        return self.scheduler.state_dict() if isinstance(self.scheduler, public_base) else {}

    def load_state_dict(self, state_dict):
        if isinstance(self.scheduler, public_base):
            self.scheduler.load_state_dict(state_dict)

    hooks.LRScheduler.state_dict = state_dict
    hooks.LRScheduler.load_state_dict = load_state_dict


def _load_detectron2():
    import warnings

    with _no_C_extension(), _pil_linear(), _pkg_resources(), warnings.catch_warnings():
        # v0.6 decorates a few helpers with torch.jit.script, deprecated in torch >= 2.10: not our
        # users' concern
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
        for name in ("detectron2.layers", "detectron2.data", "detectron2.modeling",
                     "detectron2.checkpoint", "detectron2.solver", "detectron2.engine",
                     "detectron2.evaluation", "detectron2.model_zoo"):
            importlib.import_module(name)
    _fix_numpy_aliases()
    _fix_coco_eval()
    _fix_random_sample_set()
    _fix_lr_scheduler_ckpt()
    _fix_cityscapes_pool()


def detectron2_origin() -> str:
    """'mocobench sdist build (...)' for our wheel, else 'user build'."""
    import json
    import os

    import detectron2

    marker = os.path.join(os.path.dirname(detectron2.__file__), "_mocobench_build.json")
    if os.path.exists(marker):
        with open(marker) as f:
            meta = json.load(f)
        return (f"{meta['origin']} from {meta['sdist']} (sha256 {meta['sha256'][:12]}..., "
                "no C++ extension)")
    return "user build"


def builtin_dataset_paths(name, root):
    """The files of detectron2's builtin dataset `name` under the datasets root `root`, as
    detectron2.data.datasets.builtin lays them out (its own tables: COCO, keypoints, LVIS,
    Cityscapes; VOC by its registered folder name), or None when `name` is not one of its names.

    detectron2 registers its builtin names once, at import, under the $DETECTRON2_DATASETS of that
    moment; a check made later (the pipeline's preflight) asks here with the root of now."""
    import os

    from detectron2.data import MetadataCatalog
    from detectron2.data.datasets import builtin

    for splits in (*builtin._PREDEFINED_SPLITS_COCO.values(),
                   *builtin._PREDEFINED_SPLITS_LVIS.values()):
        if name in splits:
            image_root, json_file = splits[name]
            return {"json_file": os.path.join(root, json_file),
                    "image_root": os.path.join(root, image_root)}
    for key, (image_dir, gt_dir) in builtin._RAW_CITYSCAPES_SPLITS.items():
        if name in (key.format(task="instance_seg"), key.format(task="sem_seg")):
            return {"image_dir": os.path.join(root, image_dir),
                    "gt_dir": os.path.join(root, gt_dir)}
    if name.startswith("voc_") and name in MetadataCatalog.list():
        meta = MetadataCatalog.get(name)
        if meta.get("dirname", None):  # register_all_pascal_voc: ROOT/VOC2007, ROOT/VOC2012
            return {"dirname": os.path.join(root, os.path.basename(meta.dirname))}
    return None


# the loggers that print a matching table or a "loading from" line on every checkpoint load
CHECKPOINT_LOGGERS = ("fvcore.common.checkpoint", "detectron2.checkpoint.c2_model_loading",
                      "detectron2.checkpoint.detection_checkpoint")


@contextlib.contextmanager
def quiet_checkpoint_logs(*more_loggers):
    """Only errors from detectron2/fvcore's checkpoint loggers (and `more_loggers`) inside the
    block: callers that check a load themselves and report the result would otherwise print the same
    account twice."""
    import logging

    loggers = [logging.getLogger(n) for n in CHECKPOINT_LOGGERS + more_loggers]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_load_detectron2()
