"""pretrain/config.py's validation: every checked key is refused with the one-line message naming it
and the value, at its exact bound, and accepted just inside it; errors from a pipeline's OPTS say
where they came from."""
import re

import pytest

from mocobench.utils.errors import UsageError
from pretrain.config import _CHOICES, get_cfg, load_config, validate

ROOT = ["DATA.ROOT", "/data/imagenet"]  # the default is empty, which is refused on its own
POSITIVE = ["SOLVER.BATCH_SIZE", "SOLVER.EPOCHS", "MOCO.T", "MOCO.DIM", "INPUT.SIZE",
            "MOCO.SHUFFLE_BN_SPLITS", "CHECKPOINT_PERIOD", "LOG_PERIOD", "MOCO.K"]
NON_NEGATIVE = ["SOLVER.BASE_LR", "SOLVER.WEIGHT_DECAY", "SOLVER.MOMENTUM", "SOLVER.WARMUP_EPOCHS",
                "SOLVER.CHECKPOINT_PERIOD_ITERS", "DATALOADER.NUM_WORKERS"]


def _get(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _default(key):
    return _get(get_cfg(), key)


def _value(key, number):
    """`number` in the key's own type, as a command-line override writes it."""
    return repr(float(number)) if isinstance(_default(key), float) else str(int(number))


def _refused(opts, moco=True, **kwargs):
    with pytest.raises(UsageError) as e:
        load_config(None, ROOT + opts, moco=moco, **kwargs)
    return str(e.value)


def test_defaults_with_a_data_root_are_valid_and_frozen():
    cfg = load_config(None, ROOT)
    assert cfg.is_frozen() and cfg.DATA.ROOT == "/data/imagenet"
    with pytest.raises(UsageError, match=r"^DATA.ROOT is empty: set it to the ImageFolder root "
                                         r"that holds train/"):
        load_config(None, [])


@pytest.mark.parametrize("key", POSITIVE)
def test_positive_keys_refuse_zero_and_accept_one(key):
    opts = [key, _value(key, 0)]
    if key == "MOCO.K":
        opts += ["SOLVER.BATCH_SIZE", "1"]
    message = _refused(opts)
    assert message == f"{key} = {_default(key) * 0} must be > 0"
    extra = ["MOCO.K", "4", "SOLVER.BATCH_SIZE", "1", "MOCO.SHUFFLE_BN_SPLITS", "1"]
    assert _get(load_config(None, ROOT + extra + [key, _value(key, 1)]), key) == 1


@pytest.mark.parametrize("key", NON_NEGATIVE)
def test_non_negative_keys_refuse_minus_one_and_accept_zero(key):
    assert _refused([key, _value(key, -1)]) == f"{key} = {_default(key) * 0 - 1} must be >= 0"
    load_config(None, ROOT + [key, _value(key, 0)])


@pytest.mark.parametrize("key", sorted(_CHOICES))
def test_choice_keys_name_their_choices(key):
    assert _refused([key, "bogus"]) == f"{key} = 'bogus' is not one of {_CHOICES[key]}"


def test_arch_momentum_crop_scale_and_queue_bounds():
    expected = (r"MODEL.ARCH = 'resnet7' is not a supported torchvision ResNet; "
                r"expected one of \(.*'resnet50'.*\)")
    assert re.fullmatch(expected, _refused(["MODEL.ARCH", "resnet7"]))
    assert _refused(["MOCO.M", "1.5"]) == "MOCO.M = 1.5 must be in [0, 1]"
    assert _refused(["MOCO.M", "-0.5"]) == "MOCO.M = -0.5 must be in [0, 1]"
    for m in ("0.0", "1.0"):  # both ends are allowed (1.0: a frozen key encoder)
        assert load_config(None, ROOT + ["MOCO.M", m]).MOCO.M == float(m)
    assert _refused(["INPUT.CROP_SCALE", "(0.5, 0.2)"]) == (
        "INPUT.CROP_SCALE = (0.5, 0.2) must be () or (min, max) with 0 < min <= max <= 1")
    assert _refused(["INPUT.CROP_SCALE", "(0.0, 1.0)"]).startswith(
        "INPUT.CROP_SCALE = (0.0, 1.0) must be")
    assert _refused(["INPUT.CROP_SCALE", "(0.2,)"]).startswith("INPUT.CROP_SCALE = (0.2,) must be")
    for scale in ("()", "(0.2, 1.0)", "(1.0, 1.0)"):
        load_config(None, ROOT + ["INPUT.CROP_SCALE", scale])
    assert _refused(["MOCO.K", "10", "SOLVER.BATCH_SIZE", "4"]) == (
        "MOCO.K = 10 must be divisible by the global batch size SOLVER.BATCH_SIZE = 4 "
        "(the queue advances by whole batches)")


def test_queue_checks_concern_moco_v1_v2_only():
    bad_queue = ["MOCO.K", "10", "SOLVER.BATCH_SIZE", "4"]
    assert "MOCO.K = 10 must be divisible" in _refused(bad_queue, moco=True)
    load_config(None, ROOT + bad_queue, moco=False)  # the supervised baseline has no queue
    load_config(None, ROOT + bad_queue + ["MOCO.VERSION", "v3"])  # v3 has no queue either
    assert _refused(["MOCO.K", "0"], moco=True) == "MOCO.K = 0 must be > 0"
    load_config(None, ROOT + ["MOCO.K", "0"], moco=False)
    load_config(None, ROOT + ["MOCO.K", "0", "MOCO.VERSION", "v3"])
    cfg = get_cfg()
    cfg.merge_from_list(ROOT + ["MOCO.K", "0"])
    validate(cfg, moco=False)
    with pytest.raises(UsageError, match="MOCO.K = 0 must be > 0"):
        validate(cfg)  # moco=True by default


def test_errors_from_a_pipeline_name_where_the_overrides_came_from(tmp_path):
    config = tmp_path / "pre.yaml"
    config.write_text("DATA:\n  ROOT: /data/imagenet\n")
    source = "pipeline.yaml: PRETRAIN.OPTS"
    assert _refused(["MOCO.M", "2.0"], opts_source=source) == (
        f"{source} (on None): MOCO.M = 2.0 must be in [0, 1]")
    with pytest.raises(UsageError) as e:
        load_config(str(config), ["MOCO.M", "2.0"], opts_source=source)
    assert str(e.value) == f"{source} (on {config}): MOCO.M = 2.0 must be in [0, 1]"
    with pytest.raises(UsageError) as e:  # an unknown key is named with the same source
        load_config(str(config), ["MOCO.NOPE", "1"], opts_source=source)
    assert str(e.value) == f"{source}: unknown config key MOCO.NOPE"
    with pytest.raises(UsageError) as e:  # the command line's own errors carry no prefix
        load_config(str(config), ["MOCO.M", "2.0"])
    assert str(e.value) == "MOCO.M = 2.0 must be in [0, 1]"
