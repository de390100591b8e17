"""One way to read a yacs/fvcore config with detectron2's habits: a YAML file (with its `_BASE_`
chain), then `KEY VALUE` overrides from the command line. Used by the pretrain, transfer and
pipeline configs."""
import os
import re

from mocobench.utils.errors import UsageError


def _key(e: Exception) -> str:
    return str(e.args[0]) if e.args else str(e)  # yacs: "Non-existent config key: MODEL.FOO"


# yacs names an unknown key "Non-existent config key: K" (a file: KeyError) or "Non-existent key: K"
# (an override: AssertionError)
_UNKNOWN_KEY = re.compile(r"^Non-existent (?:config )?key: (\S+)$")


def _unknown_key(e: Exception):
    """The key yacs refused as unknown, else None."""
    match = _UNKNOWN_KEY.match(_key(e).strip())
    return match.group(1) if match else None


def full_keys(node, prefix=""):
    """Every key of a nested mapping (a CfgNode, a loaded yaml), dotted: MODEL, MODEL.RESNETS,
    MODEL.RESNETS.DEPTH ..."""
    for key, value in node.items():
        yield prefix + key
        if isinstance(value, dict):
            yield from full_keys(value, f"{prefix}{key}.")


def close_keys(cfg, key):
    """The known keys closest to an unknown `key` (difflib's ratio, at least 0.6; ties all): among
    its siblings when its parent exists (MODEL.RESNETS.DEPHT -> MODEL.RESNETS.DEPTH), else among
    the full keys as deep (MODEL.RESNET.DEPTH -> MODEL.RESNETS.DEPTH)."""
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        prefix = "".join(part + "." for part in parents)
        return [prefix + k for k in _closest(leaf, list(node))]
    return _closest(key, [k for k in full_keys(cfg) if k.count(".") == key.count(".")])


def _closest(word, candidates, cutoff=0.6, n=3):
    import difflib

    scored = []
    for candidate in candidates:
        matcher = difflib.SequenceMatcher(None, word, candidate)
        if matcher.ratio() >= cutoff:
            scored.append((matcher.ratio(), candidate))
    best = max((score for score, _ in scored), default=None)
    return [candidate for score, candidate in sorted(scored, reverse=True)
            if score == best][:n]


def unknown_key_message(cfg, key):
    """'unknown config key K; did you mean A or B?' (no suggestion when none is close)."""
    close = close_keys(cfg, key)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"unknown config key {key}{hint}"


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
        config_file = config_path(config_file)
        check_yaml_mapping(config_file)
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:
            key = _unknown_key(e)
            if key is None:
                raise UsageError(f"{config_file}: {_key(e)}") from None
            raise UsageError(f"{config_file}: {unknown_key_message(cfg, key)}") from None
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
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        key = _unknown_key(e)
        if key is not None:
            raise UsageError(f"{opts_source}: {unknown_key_message(cfg, key)}") from None
        raise UsageError(f"{opts_source}: {_key(e) if isinstance(e, KeyError) else e}") from None
    return cfg


def config_path(config_file):
    """The file a --config-file names: as given, or a shipped config named "configs/..." from any
    working directory; UsageError when it does not exist or is a directory."""
    shipped = os.path.join(os.path.dirname(CONFIGS_DIR), config_file)
    if (not os.path.isfile(config_file) and not os.path.isabs(config_file)
            and os.path.isfile(shipped)):
        config_file = shipped
    if os.path.isdir(config_file):
        raise UsageError(f"config file {config_file!r} is a directory, not a file")
    if not os.path.isfile(config_file):
        raise UsageError(f"config file {config_file!r} does not exist")
    return config_file


def set_keys(config_file, opts=()):
    """The full keys a config file (with its _BASE_ chain) and `KEY VALUE` overrides set
    explicitly, e.g. {"MODEL.RESNETS.DEPTH", "MODEL.WEIGHTS"}: a value set to a default is still
    the user's choice (transfer.config.configure_resnet). Call after merge_config accepted them."""
    from fvcore.common.config import CfgNode

    keys = set()
    if config_file is not None:
        keys.update(full_keys(CfgNode.load_yaml_with_base(config_path(config_file))))
    keys.update(str(key) for key in list(opts)[0::2])
    return keys


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
