"""`mocobench configs [--kind paper|cpu|test|base]`: the shipped configs, each with its kind and
one-line purpose.

The purpose is the first line of the file's header comment (every shipped config starts with one);
the kind comes from the file name: tiny_* are test configs, *cpu* / synth_* run on CPUs in minutes,
Base-* are only inherited (_BASE_), everything else reproduces a paper setting.
"""
import argparse
import os

from mocobench.utils.config import CONFIGS_DIR

KINDS = ("paper", "cpu", "test", "base")


def config_kind(name):
    if name.startswith("tiny_"):
        return "test"
    if name.startswith("Base-"):
        return "base"
    if "cpu" in name or name.startswith("synth_"):
        return "cpu"
    return "paper"


def config_purpose(path, limit=140):
    """The header comment's first sentence (up to the first line that ends one), at most `limit`
    characters."""
    text = ""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                break
            text += " " + line.lstrip("#").strip()
            if text.endswith((".", ":")):
                break
    text = text.strip().rstrip(":")
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def list_configs(root=CONFIGS_DIR):
    """[(path relative to the repository, kind, purpose)] for every yaml under root, sorted by
    folder."""
    rows = []
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(f for f in files if f.endswith(".yaml")):
            path = os.path.join(folder, name)
            rows.append((os.path.relpath(path, os.path.dirname(root)), config_kind(name),
                         config_purpose(path)))
    return rows


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="mocobench configs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=KINDS, help="only configs of this kind")
    args = parser.parse_args(argv)
    rows = [r for r in list_configs() if args.kind in (None, r[1])]
    width = max(len(r[0]) for r in rows)
    for path, kind, purpose in rows:
        print(f"{path:<{width}}  {kind:<5}  {purpose}")
    return 0
