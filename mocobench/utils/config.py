"""One way to read a yacs/fvcore config with detectron2's habits: a YAML file (with its `_BASE_`
chain), then `KEY VALUE` overrides from the command line. Used by the pretrain, transfer and
pipeline configs."""
import os

from mocobench.utils.errors import UsageError


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
        raise UsageError(f"{path}: not valid YAML{where}: "
                         f"{getattr(e, 'problem', None) or e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot be read as a YAML text file ({e})") from None
    if data is None:
        raise UsageError(f"{path}: the file is empty; expected a mapping of config keys "
                         "(e.g. SOLVER: ...)")
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of config keys, got a YAML "
                         f"{type(data).__name__}")
    return data


def merge_config(cfg, config_file, opts=(), opts_source="command-line override"):
    """cfg <- config_file <- opts, in place; a missing file, unknown key or bad value raises
    UsageError naming it (opts_source says where the overrides came from, e.g.
    "pipeline.yaml: PRETRAIN.OPTS")."""
    import yaml

    if config_file is not None:  # None: defaults and overrides only
        shipped = os.path.join(os.path.dirname(CONFIGS_DIR), config_file)
        if (not os.path.isfile(config_file) and not os.path.isabs(config_file)
                and os.path.isfile(shipped)):
            # "configs/pretrain/x.yaml" names a shipped config from any working directory
            config_file = shipped
        if not os.path.isfile(config_file):
            raise UsageError(f"config file {config_file!r} does not exist")
        check_yaml_mapping(config_file)
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:
            raise UsageError(f"{config_file}: unknown config key ({_key(e)})") from None
        except FileNotFoundError as e:
            # a _BASE_ (relative paths resolve against the including file's folder)
            raise UsageError(f"{config_file}: its _BASE_ chain names {e.filename!r}, which does "
                             "not exist") from None
        except yaml.YAMLError as e:
            raise UsageError(f"{config_file}: a file of its _BASE_ chain is not valid YAML: "
                             f"{' '.join(str(e).split())}") from None
        except (ValueError, AssertionError, TypeError) as e:
            raise UsageError(f"{config_file}: {e}") from None
    opts = list(opts)
    if len(opts) % 2:
        raise UsageError(f"{opts_source}: config overrides must be KEY VALUE pairs; got an odd "
                         f"number of items: {opts}")
    try:
        cfg.merge_from_list(opts)
    except KeyError as e:
        raise UsageError(f"{opts_source}: unknown config key ({_key(e)})") from None
    except (ValueError, AssertionError, TypeError) as e:
        raise UsageError(f"{opts_source}: {e}") from None
    return cfg


# The shipped configs: configs/ next to the packages (a source checkout, as `make setup`
# installs it)
# the repository root is three levels above this file (mocobench/utils/config.py)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS_DIR = os.path.join(REPO, "configs")


def resolve_config_path(path, relative_to, what):
    """An existing config file for `path`: as given when absolute; else relative to `relative_to`
    (the folder of the file that names it), then to the directory holding the shipped configs/ (so
    "configs/pretrain/x.yaml" works from any working directory), then to the working directory.
    UsageError naming `what` otherwise."""
    if os.path.isabs(path):
        candidates = [path]
    else:
        candidates = [os.path.join(relative_to, path),
                      os.path.join(os.path.dirname(CONFIGS_DIR), path),
                      os.path.join(CONFIGS_DIR, path), os.path.abspath(path)]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return os.path.normpath(candidate)
    raise UsageError(f"{what} {path!r} does not exist "
                     f"(looked in {', '.join(dict.fromkeys(candidates))})")
