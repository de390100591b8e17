"""Shared fixtures: one generated dataset per test session (the `test` preset of `mocobench data synth`)."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """DIR with imagenet/, VOC2007/, coco/ and synth.json, generated once (seed 0, test preset)."""
    from mocobench.synth import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(str(root), preset="test", seed=0)
    return str(root)


@pytest.fixture
def mocobench_cmd():
    """The installed command line, run as a fresh process (exit codes and stderr as a user sees them)."""
    return [sys.executable, "-m", "mocobench"]
