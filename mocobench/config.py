"""One way to read a yacs/fvcore config with detectron2's habits: a YAML file (with its `_BASE_` chain), then
`KEY VALUE` overrides from the command line. Used by the pretrain, transfer and pipeline configs."""
import os

from mocobench.errors import UsageError


def _key(e: KeyError) -> str:
    return str(e.args[0]) if e.args else str(e)  # yacs: "Non-existent config key: MODEL.FOO"


def merge_config(cfg, config_file, opts=()):
    """cfg <- config_file <- opts, in place; a missing file, unknown key or bad value raises UsageError naming it."""
    if config_file is not None:  # None: defaults and overrides only
        if not os.path.isfile(config_file):
            raise UsageError(f"config file {config_file!r} does not exist")
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:
            raise UsageError(f"{config_file}: unknown config key ({_key(e)})") from None
        except (ValueError, AssertionError, TypeError) as e:
            raise UsageError(f"{config_file}: {e}") from None
    opts = list(opts)
    if len(opts) % 2:
        raise UsageError(f"config overrides must be KEY VALUE pairs; got an odd number of items: {opts}")
    try:
        cfg.merge_from_list(opts)
    except KeyError as e:
        raise UsageError(f"command-line override: unknown config key ({_key(e)})") from None
    except (ValueError, AssertionError, TypeError) as e:
        raise UsageError(f"command-line override: {e}") from None
    return cfg
