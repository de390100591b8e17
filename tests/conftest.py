"""Shared fixtures and the test environment.

The environment is pinned before any test runs, so results do not depend on the user's shell: a
DETECTRON2_DATASETS pointing at real data, a torchrun's WORLD_SIZE/RANK, a warm model cache or a
second checkout on PYTHONPATH would all change what the code under test sees. Subprocesses inherit
the same environment, and PYTHONPATH names the checkout whose code the tests import (under
`make mutation` that is ./mutants), so a command run as a subprocess runs the same code as the test.
"""
import os
import shutil
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# variables whose user values would change what the tests see; unset for the whole session
CLEARED_ENV = (
    "MOCOBENCH_SYNTH",
    "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
    "MASTER_ADDR", "MASTER_PORT",
    "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
    "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SUBMITIT_EXECUTOR",
    "DETECTRON2_ENV_MODULE",
)
_SESSION_DIR = None


def pytest_configure(config):
    global _SESSION_DIR
    import pretrain

    _SESSION_DIR = tempfile.mkdtemp(prefix="mocobench-tests-env-")
    for var in CLEARED_ENV:
        os.environ.pop(var, None)
    os.environ.update(
        # an empty datasets root: builtin VOC/COCO names resolve to paths that do not exist
        DETECTRON2_DATASETS=os.path.join(_SESSION_DIR, "datasets"),
        # empty download caches (detectron2/fvcore, torch hub): nothing is found or fetched from a
        # previous run
        FVCORE_CACHE=os.path.join(_SESSION_DIR, "fvcore_cache"),
        TORCH_HOME=os.path.join(_SESSION_DIR, "torch_home"),
        # the pipeline's machine-local stage timings (estimates of later runs): this session's, not
        # the user's
        MOCOBENCH_CACHE=os.path.join(_SESSION_DIR, "mocobench_cache"),
        MPLBACKEND="Agg",
        PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(pretrain.__file__))),
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_unconfigure(config):
    if _SESSION_DIR:
        shutil.rmtree(_SESSION_DIR, ignore_errors=True)


def _tree_state(root):
    """{relative path: (size, mtime)} of every file under root."""
    state = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            state[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return state


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """DIR with imagenet/, VOC2007/, coco/ and synth.json, generated once (seed 0, test preset).

    Shared by every test that uses it, so no test may change it (copy it to tmp_path first): the
    session ends with an error naming the files if one did. (Permission bits would not stop a test
    running as root.)"""
    from synth.generate import synthesize

    root = str(tmp_path_factory.mktemp("synth"))
    synthesize(root, preset="test", seed=0)
    before = _tree_state(root)
    yield root
    after = _tree_state(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test changed the shared synth_root tree: {changed[:10]}"


@pytest.fixture
def mocobench_cmd():
    """The installed command line, run as a fresh process (exit codes and stderr as a user sees
    them)."""
    return [sys.executable, "-m", "mocobench"]


def random_resnet_state(arch, seed=0):
    """state_dict of torchvision's `arch` (e.g. "resnet50", "resnext50_32x4d") with random weights
    and BN tensors far from their defaults (mean 0, var 1, weight 1, bias 0 would hide a swapped
    mean/var or weight/bias); the same values for the same (arch, seed)."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0.0, 0.1)
            module.running_mean.normal_(0.0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(1000)
    return model.state_dict()


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    """A generated ImageFolder root (4 classes, 16 train and 4 val images each, 40 px), one per test
    module."""
    from synth.imagenet import make_imagenet

    out = tmp_path_factory.mktemp("synth")
    make_imagenet(str(out), classes=4, images_per_class=16, val_per_class=4, size=40, seed=0)
    return os.path.join(str(out), "imagenet")


@pytest.fixture
def rendezvous(tmp_path):
    """A torch.distributed init_method for the processes of one test: a file store, so no TCP port
    is picked, released and re-bound (another process can take a free port in between)."""
    return f"file://{tmp_path / 'rendezvous'}"


def assert_optimizer_states_equal(a, b):
    """Two optimizer state_dicts hold the same state for the same parameters (no zip that stops at
    the shorter)."""
    import torch

    assert len(a["state"]) > 0, "an empty optimizer state compares equal to anything"
    assert a["state"].keys() == b["state"].keys()
    for index, state in a["state"].items():
        assert state.keys() == b["state"][index].keys(), index
        for name, value in state.items():
            other = b["state"][index][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, \
                (index, name)
    assert a["param_groups"] == b["param_groups"]


@pytest.fixture
def inject_fault(monkeypatch):
    """inject_fault(module, name, fault): for this test, module.name hands its result to
    fault(result) (which corrupts it in place) before returning it; the converter's tests plant
    faults between its steps this way."""
    def inject(module, name, fault):
        real = getattr(module, name)

        def faulty(*args, **kwargs):
            result = real(*args, **kwargs)
            fault(result)
            return result

        monkeypatch.setattr(module, name, faulty)

    return inject


@pytest.fixture
def score_outputs():
    """score_outputs(cfg, dataset, outputs_of): the evaluation results that the dataset's real
    evaluator (transfer.evaluation) gives when the model's output for each record d is
    outputs_of(d)."""
    from mocobench.utils import d2compat  # noqa: F401  (before any detectron2 import)
    from transfer.evaluation import build_evaluator

    def score(cfg, dataset, outputs_of):
        from detectron2.data import DatasetCatalog

        evaluator = build_evaluator(cfg, dataset, output_folder=None)
        evaluator.reset()
        for d in DatasetCatalog.get(dataset):
            inputs = [{k: d[k] for k in ("file_name", "image_id", "height", "width") if k in d}]
            evaluator.process(inputs, [outputs_of(d)])
        return evaluator.evaluate()

    return score


def signal_on_step(step, signum):
    """pretrain.engine.optimization_step that sends `signum` to this process (a real signal)
    during its `step`-th call, as a scheduler does mid-epoch; install it with monkeypatch."""
    from pretrain import engine

    real_step, calls = engine.optimization_step, []

    def step_then_signal(*args):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signum)
        return real_step(*args)

    return step_then_signal


def float_worker_views(img):
    """What a data loader worker sent before it sent uint8: the view as a float32 CHW tensor,
    normalised by per-channel float32 tables of (x / 255 - mean) / std computed in float64 (the
    former pretrain.augment.to_normalized_tensor, verbatim). Monkeypatched over
    pretrain.augment.to_chw_tensor, it brings back the former path to compare against."""
    import cv2
    import numpy as np
    import torch

    from pretrain.augment import IMAGENET_MEAN, IMAGENET_STD

    luts = [((np.arange(256, dtype=np.float64) / 255.0 - m) / s).astype(np.float32)
            for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    h, w = img.shape[:2]
    out = np.empty((3, h, w), dtype=np.float32)
    for c, channel in enumerate(cv2.split(img)):
        out[c] = cv2.LUT(channel, luts[c])
    return torch.from_numpy(out)


def report_tables(run_dir):
    """The tables of a study's report.json (its real writer: the pipeline's report stage), with the
    run directory taken out of the trials' paths: two runs of the same study compare equal."""
    import json

    text = (run_dir / "report.json").read_text().replace(str(run_dir), "RUN")
    return json.loads(text)["tables"]
