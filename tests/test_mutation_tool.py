"""tools/mutation.py, the sample and the score of `make mutation`: the names are mutmut's own, the
sample is seeded and stratified by module, listed equivalents are never drawn, and the interval is
Wilson's."""
import importlib.util
import os
import subprocess
import sys
from collections import Counter

import pytest
from scipy.stats import binomtest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "mutation.py")
spec = importlib.util.spec_from_file_location("mutation_tool", TOOL)
mutation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutation)


def _sample(*args):
    out = subprocess.run([sys.executable, TOOL, "sample", *args], cwd=REPO, capture_output=True,
                         text=True, check=True)
    return out.stdout.split()


def test_sample_draws_n_per_module_from_mutmuts_names_seeded_and_without_equivalents():
    names = mutation.mutant_names(["transfer.stats", "pretrain.config"])
    by_unit = {}
    for name in names:
        by_unit.setdefault(mutation.unit_of(name), []).append(name)
    # the three scored units of these files, each with more mutants than the sample takes
    assert set(by_unit) == {"transfer.stats", "pretrain.config", "lr/momentum schedules"}
    assert all(len(v) > 12 for v in by_unit.values())
    # mutmut's numbering: <module>.x_<function>__mutmut_<k>, k from 1 in source order, per function
    assert "transfer.stats.x_welch_interval__mutmut_1" in names \
        and "pretrain.config.x_lr_at__mutmut_1" in names
    with open(os.path.join(REPO, "transfer", "stats.py")) as f:
        source = f.read()
    for name in by_unit["transfer.stats"]:
        function = name.split(".x_", 1)[1].split("__mutmut_")[0]
        assert f"def {function}(" in source

    sample = _sample("--per-module", "12", "--seed", "3", "transfer.stats", "pretrain.config")
    counts = {}
    for name in sample:
        counts[mutation.unit_of(name)] = counts.get(mutation.unit_of(name), 0) + 1
    assert counts == {"transfer.stats": 12, "pretrain.config": 12, "lr/momentum schedules": 12}
    assert set(sample) <= set(names) and len(set(sample)) == 36
    assert _sample("--per-module", "12", "--seed", "3", "transfer.stats", "pretrain.config") \
        == sample
    assert _sample("--per-module", "12", "--seed", "4", "transfer.stats", "pretrain.config") \
        != sample

    # listed equivalents are never drawn; a module smaller than N is taken whole
    equivalents = {n: "reason" for n in by_unit["transfer.stats"][:5]}
    everything = mutation.draw_sample(names, 10_000, 0, equivalents)
    assert sorted(everything) == sorted(set(names) - set(equivalents))
    assert set(mutation.draw_sample(names, 12, 0, equivalents)).isdisjoint(equivalents)


def test_sample_of_an_unknown_module_is_an_error():
    out = subprocess.run([sys.executable, TOOL, "sample", "pretrain.nothing"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "no mutants in modules ['pretrain.nothing']" in out.stderr


@pytest.mark.parametrize("killed,n", [(0, 20), (17, 20), (20, 20), (45, 50)])
def test_wilson_interval_is_scipys(killed, n):
    reference = binomtest(killed, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert mutation.wilson_interval(killed, n) \
        == pytest.approx((reference.low, reference.high), abs=1e-6)


def test_score_counts_only_the_sample_and_leaves_equivalents_out():
    results = {  # mutmut exit codes: 1 killed, 0 survived, 33 no tests, 24 timeout, None not run
        "transfer.stats.x_describe__mutmut_1": 1, "transfer.stats.x_describe__mutmut_2": 0,
        "transfer.stats.x_describe__mutmut_3": 24, "transfer.stats.x_describe__mutmut_4": 33,
        "transfer.stats.x_describe__mutmut_5": 0, "transfer.stats.x_describe__mutmut_6": None,
        "pretrain.config.x_lr_at__mutmut_1": 1, "pretrain.config.x_validate__mutmut_1": 0,
    }
    equivalents = {"transfer.stats.x_describe__mutmut_5": "same values"}
    sample = set(results) - {"pretrain.config.x_validate__mutmut_1"}
    table, left = mutation.score_table(results, equivalents, sample)
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()[2:]}
    assert set(rows) == {"transfer.stats", "lr/momentum schedules"}
    # stats: 6 in the module, 5 sampled and run (the 6th not run), 1 equivalent; killed 2 of 4 (one
    # by timeout)
    assert rows["transfer.stats"][1:8] == ["6", "5", "1", "2", "1", "1", "1"]
    low, high = mutation.wilson_interval(2, 4)
    assert rows["transfer.stats"][8:] == ["50.0 %", f"{100 * low:.0f}-{100 * high:.0f} % |"]
    assert sorted(left) \
        == ["transfer.stats.x_describe__mutmut_2", "transfer.stats.x_describe__mutmut_4"]
    # without a sample every run mutant counts (the validate survivor too)
    _, left = mutation.score_table(results, equivalents)
    assert "pretrain.config.x_validate__mutmut_1" in left
    # a mutant that SIGKILLs the tests' process is killed; a "suspicious" one (35) is listed
    crashes = {"transfer.stats.x_describe__mutmut_7": -9, "transfer.stats.x_describe__mutmut_8": 35}
    table, left = mutation.score_table({**results, **crashes}, equivalents, sample | set(crashes))
    stats = next(line for line in table.splitlines() if line.startswith("| transfer.stats "))
    assert stats.split(" | ")[2:5] == ["7", "1", "3"]  # sampled, equivalent, killed
    assert "transfer.stats.x_describe__mutmut_8" in left \
        and "transfer.stats.x_describe__mutmut_7" not in left


def test_the_pipeline_package_is_scored_as_one_module_and_convert_per_file():
    # two small files of the package and one of convert (mutant generation costs ~1 s per file)
    names = mutation.mutant_names(["mocobench.pipeline.machines", "mocobench.pipeline.manifest",
                                   "convert.rename"])
    files = {name.split(".x", 1)[0] for name in names}
    assert files == {"mocobench.pipeline.machines", "mocobench.pipeline.manifest",
                     "convert.rename"}
    assert {mutation.unit_of(name) for name in names} == {"mocobench.pipeline", "convert.rename"}
    # a method of a class in one of its files too
    assert mutation.unit_of("mocobench.pipeline.graph.xǁGraphǁrun__mutmut_1") \
        == "mocobench.pipeline"
    counts = Counter(mutation.unit_of(n) for n in mutation.draw_sample(names, 7, 0))
    assert counts == {"mocobench.pipeline": 7, "convert.rename": 7}
