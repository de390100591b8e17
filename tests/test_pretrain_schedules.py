"""Learning-rate and key-momentum schedules of pretraining, value by value against the official
formulas.

facebookresearch/moco main_moco.py adjust_learning_rate: lr = args.lr, times
0.5 * (1 + cos(pi * epoch / epochs)) with --cos, else times 0.1 for each milestone the epoch has
reached (epoch >= milestone). facebookresearch/moco-v3 main_moco.py: linear warm-up
lr * epoch / warmup_epochs, then lr * 0.5 * (1 + cos(pi * (epoch - warmup) / (epochs - warmup))),
with the fractional epoch of each iteration; momentum
1 - 0.5 * (1 + cos(pi * epoch / epochs)) * (1 - moco_m). lr is per 256 images (linear scaling):
BASE_LR * BATCH_SIZE / 256.
"""
import math
import os

import pytest

from pretrain.config import load_config, lr_at, moco_momentum_at

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V1 = os.path.join(REPO, "configs", "pretrain", "moco_v1_R50.yaml")
V3 = os.path.join(REPO, "configs", "pretrain", "moco_v3_R50.yaml")


def cfg_of(path, **opts):
    return load_config(path, ["DATA.ROOT", "unused", *[str(x) for kv in opts.items() for x in kv]])


def test_step_schedule_drops_by_gamma_at_each_reached_milestone_of_whole_epochs():
    # base 0.03 x 512 / 256 = 0.06; milestones 120 and 160; LR_PER_ITER False: the epoch's integer
    # part counts
    cfg = cfg_of(V1, **{"SOLVER.BATCH_SIZE": 512, "SOLVER.STEPS": "(120, 160)",
                        "SOLVER.GAMMA": 0.5})
    expected = {0: 0.06, 119: 0.06, 119.99: 0.06, 120: 0.03, 120.5: 0.03, 159.9: 0.03, 160: 0.015,
                199.9: 0.015}
    for epoch, lr in expected.items():
        assert lr_at(cfg, epoch) == pytest.approx(lr, rel=1e-12), epoch


def test_cosine_schedule_whole_epochs_and_per_iteration():
    cfg = cfg_of(V1, **{"SOLVER.SCHEDULE": "cosine", "SOLVER.EPOCHS": 200,
                        "SOLVER.BATCH_SIZE": 256})
    for epoch in (0, 1, 50, 100, 150, 199):
        assert lr_at(cfg, epoch + 0.75) == pytest.approx(
            0.03 * 0.5 * (1 + math.cos(math.pi * epoch / 200)), rel=1e-12, abs=1e-15), epoch
    assert lr_at(cfg, 100) == pytest.approx(0.015)
    per_iter = cfg_of(V1, **{"SOLVER.SCHEDULE": "cosine", "SOLVER.LR_PER_ITER": True})
    assert lr_at(per_iter, 100.5) == pytest.approx(
        0.03 * 0.5 * (1 + math.cos(math.pi * 100.5 / 200)), rel=1e-12)
    assert lr_at(per_iter, 100.5) < lr_at(per_iter, 100.0)


def test_v3_warmup_then_cosine_per_iteration():
    # the shipped v3 recipe: BASE_LR 0.6 per 256, batch 4096 -> 9.6; 10 warm-up epochs of 100
    cfg = cfg_of(V3)
    assert cfg.SOLVER.LR_PER_ITER and cfg.SOLVER.WARMUP_EPOCHS == 10 and cfg.SOLVER.EPOCHS == 100
    peak = 0.6 * 4096 / 256
    assert lr_at(cfg, 0.0) == 0.0
    assert lr_at(cfg, 2.5) == pytest.approx(peak * 0.25, rel=1e-12)
    assert lr_at(cfg, 9.999) == pytest.approx(peak * 0.9999, rel=1e-12)
    assert lr_at(cfg, 10.0) == pytest.approx(peak, rel=1e-12)
    assert lr_at(cfg, 55.0) == pytest.approx(peak * 0.5, rel=1e-12)
    assert lr_at(cfg, 32.5) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 22.5 / 90)),
                                             rel=1e-12)
    assert lr_at(cfg, 100.0) == pytest.approx(0.0, abs=1e-12)


def test_key_momentum_constant_or_half_cosine_to_one():
    constant = cfg_of(V1, **{"MOCO.M": 0.995})
    assert [moco_momentum_at(constant, e) for e in (0, 57.3, 199.9)] == [0.995] * 3
    cfg = cfg_of(V3)  # M 0.99 rising to 1 over 100 epochs
    assert cfg.MOCO.M_COS and cfg.MOCO.M == 0.99
    for epoch in (0.0, 12.5, 50.0, 80.25, 100.0):
        expected = 1 - 0.5 * (1 + math.cos(math.pi * epoch / 100)) * (1 - 0.99)
        assert moco_momentum_at(cfg, epoch) == pytest.approx(expected, rel=0, abs=1e-15), epoch
    assert moco_momentum_at(cfg, 0.0) == pytest.approx(0.99, abs=1e-15)
    assert moco_momentum_at(cfg, 50.0) == pytest.approx(0.995, abs=1e-15)
    assert moco_momentum_at(cfg, 100.0) == pytest.approx(1.0, abs=1e-15)
