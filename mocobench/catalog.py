"""`mocobench configs [--kind paper|cpu|test|base]`: the shipped configs, each with its kind and
one-line purpose.

The purpose is the first line of the file's header comment (every shipped config starts with one);
the kind comes from the file name: tiny_* are test configs, *cpu* / synth_* run on CPUs in minutes,
Base-* are only inherited (_BASE_), everything else reproduces a paper setting.
"""
import argparse
import os
import re
import shutil
import textwrap

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


# a sentence ends at ". " before a capital letter, a quote, a backquote or a parenthesis; "et al.",
# "e.g.", "i.e." and "vs." end none
_SENTENCE_END = re.compile(r"(?<=\.)(?<!e\.g\.)(?<!i\.e\.)(?<!vs\.)(?<!al\.)\s+(?=[A-Z`\"'(])")


def config_purpose(path, limit=160):
    """The header comment's opening sentences, whole (never cut mid-sentence): the first always,
    then the next ones while the text stays within `limit` characters. The header's prose ends at
    its first blank or indented comment line (a command line, a diagram); a sentence that ends in
    ':' introduces such a listing and is left out unless it is the first."""
    text = ""
    with open(path, encoding="utf-8") as f:
        for line in f:
            prose = line.rstrip()[2:] if line.startswith("# ") else ""
            if not prose.strip() or prose[0].isspace():
                break
            text += " " + prose.strip()
    sentences = _SENTENCE_END.split(" ".join(text.split()))
    purpose = sentences[0]
    for sentence in sentences[1:]:
        if sentence.endswith(":") or len(purpose) + 1 + len(sentence) > limit:
            break
        purpose += " " + sentence
    return purpose.rstrip(":")


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
    print("\n".join(format_rows(rows, output_width())))
    return 0


def output_width():
    """The terminal's width, at most 100 columns (100 when stdout is not a terminal)."""
    return max(40, min(100, shutil.get_terminal_size((100, 24)).columns))


def format_rows(rows, width=100):
    """`PATH  KIND` on one line, the purpose wrapped on indented lines below it, every line within
    `width` columns (a path longer than that stays whole)."""
    lines = []
    for path, kind, purpose in rows:
        lines.append(f"{path}  {kind}")
        lines += textwrap.wrap(purpose, width, initial_indent="    ", subsequent_indent="    ",
                               break_on_hyphens=False)
    return lines
