"""Score of `make mutation`, per module: killed / (mutants - listed equivalents), from mutmut's ./mutants results.

    python tools/mutation_score.py [--equivalents tests/mutation_equivalents.txt] [--strict]

A mutant counts as killed when a test failed (or timed out: the timeouts column says how many, which on a loaded
machine can be spurious) with it; "no tests" and "survived" are survivors. Mutants listed in the equivalents file
(one `mutant_name  reason` per line, # comments) are left out of the total whatever their status; every other
survivor is printed, so it can get a test. --strict: exit 1 if any unlisted survivor is left.
The lr/momentum schedules of pretrain/config.py are scored on their own (the rest of that file is config
validation, scored as pretrain.config).
"""
import argparse
import glob
import json
import os
import sys

# mutmut's worker exit codes (mutmut/stats.py status_by_exit_code)
KILLED = {1, 3, 24, -24, 36, 152, 255}
TIMEOUT = {24, -24, 36, 152, 255}
NO_TESTS = {5, 33}
SURVIVED = {0}
# function groups scored separately: name -> (module, function-name markers in the mutant key)
GROUPS = {"lr/momentum schedules": ("pretrain.config", ("x_lr_at__", "x_moco_momentum_at__"))}


def read_equivalents(path):
    listed = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.split("#", 1)[0].strip() if line.lstrip().startswith("#") else line.strip()
                if line:
                    name, _, reason = line.partition(" ")
                    listed[name] = reason.strip()
    return listed


def read_results(mutants_dir):
    results = {}
    for meta in glob.glob(os.path.join(mutants_dir, "**", "*.py.meta"), recursive=True):
        with open(meta) as f:
            results.update(json.load(f)["exit_code_by_key"])
    return results


def unit_of(key):
    for group, (module, markers) in GROUPS.items():
        if key.startswith(module + ".") and any(m in key for m in markers):
            return group
    module = key.split(".x", 1)[0] if ".x" in key else key.rsplit(".", 1)[0]
    return module.split(".xǁ", 1)[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", default="mutants")
    parser.add_argument("--equivalents", default=os.path.join("tests", "mutation_equivalents.txt"))
    parser.add_argument("--strict", action="store_true")
    args = parser.parse_args(argv)
    equivalents = read_equivalents(args.equivalents)
    units = {}
    for key, code in sorted(read_results(args.mutants).items()):
        if code is None:
            continue  # not run (a module left out of this run)
        units.setdefault(unit_of(key), []).append((key, code))
    print("| module | mutants | equivalent | killed | (of which timeouts) | survived | no tests | score |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    left = []
    for unit, rows in units.items():
        equivalent = [k for k, c in rows if k in equivalents]  # left out whatever their status
        killed = sum(c in KILLED for k, c in rows if k not in equivalents)
        timeouts = sum(c in TIMEOUT for k, c in rows if k not in equivalents)
        survived = [k for k, c in rows if c in SURVIVED and k not in equivalents]
        no_tests = [k for k, c in rows if c in NO_TESTS and k not in equivalents]
        scored = len(rows) - len(equivalent)
        cells = [unit, len(rows), len(equivalent), killed, timeouts, len(survived), len(no_tests)]
        print("| " + " | ".join(map(str, cells)) + f" | {100.0 * killed / max(scored, 1):.1f} % |")
        left += survived + no_tests
    if left:
        print(f"\n{len(left)} survivor(s) not listed in {args.equivalents} (`mutmut show NAME` shows the diff):")
        print("\n".join(f"  {k}" for k in left))
    return 1 if args.strict and left else 0


if __name__ == "__main__":
    sys.exit(main())
