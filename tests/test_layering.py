"""The house's floors: no stage imports the top floor (cli, pipeline, launchers), no stage imports a later
stage, and the ground modules import no stage. Read from the sources' import statements (AST), so that a
lazy import inside a function counts too."""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUND = ["mocobench/" + m for m in
          ("fileio.py", "comm.py", "config.py", "d2compat.py", "errors.py", "synth.py", "env.py")]
TOP = ("mocobench.cli", "mocobench.pipeline", "mocobench.launch")
STAGES = ["pretrain", "convert", "transfer"]  # in data-flow order


def _imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def _sources(folder):
    for root, _, files in os.walk(os.path.join(REPO, folder)):
        yield from (os.path.join(root, f) for f in sorted(files) if f.endswith(".py"))


def _hits(path, forbidden):
    return sorted({m for m in _imports(path) if any(m == f or m.startswith(f + ".") for f in forbidden)})


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_the_top_floor_or_a_later_stage(stage):
    later = STAGES[STAGES.index(stage) + 1:]
    bad = {os.path.relpath(p, REPO): _hits(p, TOP + tuple(later)) for p in _sources(stage)}
    assert {p: h for p, h in bad.items() if h} == {}


@pytest.mark.parametrize("module", GROUND)
def test_ground_modules_import_no_stage_and_no_top_floor(module):
    path = os.path.join(REPO, module)
    assert _hits(path, TOP + tuple(STAGES)) == []


def test_the_checker_sees_a_lazy_import(tmp_path):
    planted = tmp_path / "x.py"
    planted.write_text("def f():\n    from mocobench.cli import main\n    import transfer.run\n")
    assert _hits(str(planted), TOP + ("transfer",)) == ["mocobench.cli", "mocobench.cli.main", "transfer.run"]
