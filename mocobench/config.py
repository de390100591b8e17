"""One way to read a yacs/fvcore config with detectron2's habits: a YAML file (with its `_BASE_` chain), then
`KEY VALUE` overrides from the command line. Used by the pretrain, transfer and pipeline configs."""
import os

from mocobench.errors import UsageError


def _key(e: KeyError) -> str:
    return str(e.args[0]) if e.args else str(e)  # yacs: "Non-existent config key: MODEL.FOO"


def check_yaml_mapping(path):
    """A YAML file that parses to a mapping, or a one-line UsageError naming the file (and line)."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot be read as a YAML text file ({e})") from None
    if data is None:
        raise UsageError(f"{path}: the file is empty; expected a mapping of config keys (e.g. SOLVER: ...)")
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of config keys, got a YAML {type(data).__name__}")
    return data


def merge_config(cfg, config_file, opts=()):
    """cfg <- config_file <- opts, in place; a missing file, unknown key or bad value raises UsageError naming it."""
    import yaml

    if config_file is not None:  # None: defaults and overrides only
        if not os.path.isfile(config_file):
            raise UsageError(f"config file {config_file!r} does not exist")
        check_yaml_mapping(config_file)
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:
            raise UsageError(f"{config_file}: unknown config key ({_key(e)})") from None
        except FileNotFoundError as e:  # a _BASE_ (relative paths resolve against the including file's folder)
            raise UsageError(f"{config_file}: its _BASE_ chain names {e.filename!r}, which does not exist") from None
        except yaml.YAMLError as e:
            raise UsageError(f"{config_file}: a file of its _BASE_ chain is not valid YAML: "
                             f"{' '.join(str(e).split())}") from None
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
