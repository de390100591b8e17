"""Defaults that fit: every shipped CPU pretrain config trains on what `mocobench data synth` writes
without --preset (at least one full batch per epoch, the queue a whole number of batches, the BN
groups dividing the batch), with the sizes read from synth.presets, not copied here."""
import os

import pytest
import torch

from mocobench.catalog import config_kind
from pretrain.config import load_config
from pretrain.data import build_loader
from synth import cli as synth_cli
from synth.presets import DEFAULT_PRESET, resolve_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_DIR = os.path.join(REPO, "configs", "pretrain")
CPU_CONFIGS = sorted(name for name in os.listdir(PRETRAIN_DIR)
                     if name.endswith(".yaml") and config_kind(name) == "cpu")


class Sized(torch.utils.data.Dataset):
    """Stands in for the ImageFolder: only its length matters to the batching."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def test_the_cli_default_is_the_default_preset():
    args = synth_cli._build_parser().parse_args(["synth", "--out", "x"])
    assert args.preset == DEFAULT_PRESET


def test_there_are_cpu_pretrain_configs():
    assert "synth_R18_cpu.yaml" in CPU_CONFIGS and "synth_R18_cpu_supervised.yaml" in CPU_CONFIGS


@pytest.mark.parametrize("name", CPU_CONFIGS)
def test_cpu_pretrain_config_has_a_full_batch_on_the_default_preset(name):
    images = resolve_params(DEFAULT_PRESET, 0, {})["splits"]["imagenet"]["train"]
    moco = "supervised" not in name
    # load_config refuses MOCO.K not divisible by the batch
    cfg = load_config(os.path.join(PRETRAIN_DIR, name), moco=moco)
    batch = cfg.SOLVER.BATCH_SIZE  # one process (the CPU default)
    # the loader the tasks build (drop_last: only full batches)
    loader = build_loader(Sized(images), batch, 0, shuffle=True, drop_last=True)
    assert len(loader) >= 1, f"{name}: {images} images of preset {DEFAULT_PRESET} < batch {batch}"
    assert len(next(iter(loader))) == batch
    if moco:
        assert cfg.MOCO.K % batch == 0 and batch % cfg.MOCO.SHUFFLE_BN_SPLITS == 0
