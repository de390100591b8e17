"""`make mutation`: which mutants to run, and the score per module from mutmut's ./mutants results.

    python tools/mutation.py sample [--per-module N] [--seed S] MODULE...
        (prints mutant names, one per line)
    python tools/mutation.py score [--sample FILE] [--equivalents FILE] [--strict]

sample: the mutants mutmut makes of MODULE's files (its own generator, so the names are the ones
`mutmut run` uses), less those listed as equivalent, then N drawn at random per scored module (all
when a module has fewer). The same seed and sources give the same sample. A whole run (5,746
mutants at ~11 s each on 2 cores) takes hours; a sample of N per module bounds the time and still
gives each module's score to within its interval.

score: killed / (mutants - listed equivalents) per module; with --sample, over the sampled mutants
only, with a Wilson 95 % interval for the module's whole score. A mutant counts as killed when a
test failed (or timed out: the timeouts column says how many, which on a loaded machine can be
spurious) with it; "no tests" and "survived" are survivors. Mutants listed in the equivalents file
(one `mutant_name  reason` per line, # comments) are left out of the total whatever their status;
every other survivor is printed, so it can get a test. --strict: exit 1 if any unlisted survivor is
left. The lr/momentum schedules of pretrain/config.py are scored on their own (the rest of that
file is config validation, scored as pretrain.config); the files of mocobench.pipeline are
scored as one module.
"""
import argparse
import configparser
import glob
import json
import math
import os
import random
import sys
from collections import Counter
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP_CFG = os.path.join(REPO, "setup.cfg")  # [mutmut] only_mutate: the files mutated
# mutmut's worker exit codes (mutmut/stats.py status_by_exit_code)
# -9 / -11 (mutmut: "segfault") and -15: the mutant killed or crashed the tests' own process (a
# mutant of the SIGKILL test hook; a signal handler left uninstalled): the run failed, a kill
KILLED = {1, 3, 24, -24, 36, 152, 255, -9, -11, -15}
TIMEOUT = {24, -24, 36, 152, 255}
NO_TESTS = {5, 33}
SURVIVED = {0}
# function groups scored separately: name -> (module, function-name markers in the mutant key)
GROUPS = {"lr/momentum schedules": ("pretrain.config", ("x_lr_at__", "x_moco_momentum_at__"))}
# packages scored as one module over their files (the pipeline's files are small and share one job)
PACKAGES = ("mocobench.pipeline",)


def read_equivalents(path):
    listed = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
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
    """The scored module of a mutant: its module, or the function group it belongs to."""
    for group, (module, markers) in GROUPS.items():
        if key.startswith(module + ".") and any(m in key for m in markers):
            return group
    module = key.split(".x", 1)[0] if ".x" in key else key.rsplit(".", 1)[0]
    module = module.split(".xǁ", 1)[0]
    for package in PACKAGES:
        if module.startswith(package + "."):
            return package
    return module


def mutant_names(modules, setup_cfg=SETUP_CFG):
    """Every mutant name of the files in setup.cfg's only_mutate that belong to one of `modules`
    (dotted)."""
    from mutmut.mutation.file_mutation import mutate_file_contents
    from mutmut.utils.format_utils import get_mutant_name

    parser = configparser.ConfigParser()
    parser.read(setup_cfg)
    patterns = parser["mutmut"]["only_mutate"].split()
    files = sorted({f for p in patterns for f in glob.glob(os.path.join(REPO, p))
                    if f.endswith(".py")})
    names = []
    for path in files:
        relative = Path(os.path.relpath(path, REPO))
        module = str(relative.with_suffix("")).replace(os.sep, ".")
        if not any(module == m or module.startswith(m + ".") for m in modules):
            continue
        with open(path) as f:
            mutated = mutate_file_contents(str(relative), f.read())
        names += [get_mutant_name(relative, name) for name in mutated.mutant_names]
    return names


def draw_sample(names, per_module, seed, equivalents=()):
    """`per_module` names drawn per scored module (all of a smaller one), listed equivalents left
    out; sorted."""
    by_unit = {}
    for name in sorted(set(names) - set(equivalents)):
        by_unit.setdefault(unit_of(name), []).append(name)
    rng = random.Random(seed)
    sample = []
    for unit in sorted(by_unit):
        pool = by_unit[unit]
        sample += pool if per_module <= 0 or len(pool) <= per_module \
            else rng.sample(pool, per_module)
    return sorted(sample)


def wilson_interval(killed, n, z=1.959964):
    """95 % score interval of a binomial proportion (Wilson 1927): sound at 0 and n, unlike the
    normal one."""
    if n == 0:
        return 0.0, 1.0
    p = killed / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def score_table(results, equivalents, sample=None):
    """(markdown table, unlisted survivors) from mutmut's exit codes per mutant name."""
    units = {}
    for key, code in sorted(results.items()):
        if code is None or (sample is not None and key not in sample):
            continue  # not run (a module left out of this run, or not in the sample)
        units.setdefault(unit_of(key), []).append((key, code))
    population = Counter(unit_of(key) for key in results)
    header = ["module", "mutants", "equivalent", "killed", "(of which timeouts)", "survived",
              "no tests", "score"]
    if sample is not None:
        header[1:2] = ["mutants in module", "sampled"]
        header.append("95 % interval")
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    left = []
    for unit, rows in units.items():
        equivalent = [k for k, c in rows if k in equivalents]  # left out whatever their status
        killed = sum(c in KILLED for k, c in rows if k not in equivalents)
        timeouts = sum(c in TIMEOUT for k, c in rows if k not in equivalents)
        survived = [k for k, c in rows if c in SURVIVED and k not in equivalents]
        no_tests = [k for k, c in rows if c in NO_TESTS and k not in equivalents]
        # any other verdict (mutmut's "suspicious", "skipped", an interrupted run) is no kill:
        # listed with the survivors, not left out
        other = [k for k, c in rows if c not in KILLED | SURVIVED | NO_TESTS
                 and k not in equivalents]
        scored = len(rows) - len(equivalent)
        cells = [unit, len(rows), len(equivalent), killed, timeouts, len(survived), len(no_tests),
                 f"{100.0 * killed / max(scored, 1):.1f} %"]
        if sample is not None:
            low, high = wilson_interval(killed, scored)
            cells[1:1] = [population[unit]]
            cells.append(f"{100 * low:.0f}-{100 * high:.0f} %")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
        left += survived + no_tests + other
    return "\n".join(lines), left


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--equivalents",
                        default=os.path.join(REPO, "tests", "mutation_equivalents.txt"))
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("sample",
                                 help="print a seeded sample of mutant names, N per module")
    sample.add_argument("modules", nargs="+",
                        help="dotted module or package names (pretrain.moco, convert)")
    sample.add_argument("--per-module", type=int, default=20,
                        help="mutants per scored module; 0: all")
    sample.add_argument("--seed", type=int, default=0)
    score = commands.add_parser("score", help="print the score per module from ./mutants")
    score.add_argument("--mutants", default="mutants")
    score.add_argument("--sample",
                       help="file of the sampled names: score those only, with intervals")
    score.add_argument("--strict", action="store_true")
    args = parser.parse_args(argv)
    equivalents = read_equivalents(args.equivalents)
    if args.command == "sample":
        names = mutant_names(args.modules)
        if not names:
            print(f"error: no mutants in modules {args.modules} (setup.cfg [mutmut] only_mutate)",
                  file=sys.stderr)
            return 2
        print("\n".join(draw_sample(names, args.per_module, args.seed, equivalents)))
        return 0
    sampled = None
    if args.sample:
        with open(args.sample) as f:
            sampled = set(f.read().split())
    table, left = score_table(read_results(args.mutants), equivalents, sampled)
    print(table)
    if left:
        print(f"\n{len(left)} survivor(s) not listed in {args.equivalents} (`mutmut show NAME` "
              "shows the diff):")
        print("\n".join(f"  {k}" for k in left))
    return 1 if args.strict and left else 0


if __name__ == "__main__":
    sys.exit(main())
