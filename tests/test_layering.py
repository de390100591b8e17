"""The house's floors, read from the sources' import statements (AST, so a lazy import inside a
function counts too):

    top      mocobench/*.py (cli, pipeline, launchers, commands)      may import anything
    stages   pretrain/ convert/ transfer/ synth/                      the ground and themselves only
    ground   mocobench/utils/                                         nothing above it

Stages meet only through files; only the top imports stages."""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("pretrain", "convert", "transfer", "synth")
GROUND = "mocobench.utils"


def _imports(source, filename="<planted>"):
    tree = ast.parse(source, filename=filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def _floor(module):
    """'ground', 'top', a stage's name, or None (third-party, tests, tools) for a dotted module
    name."""
    top = module.split(".")[0]
    if top in STAGES:
        return top
    if module == GROUND or module.startswith(GROUND + "."):
        return "ground"
    if top == "mocobench":
        return "top" if module != "mocobench" else None  # the bare package holds only __version__
    return None


def violations(module, source):
    """The imports of `module` (dotted name) that break the floors' rule, sorted."""
    floor = _floor(module)
    bad = set()
    for imported in _imports(source):
        target = _floor(imported)
        if target is None or floor in ("top", None):
            continue
        if floor == "ground" and target != "ground":
            bad.add(imported)
        elif floor in STAGES and target not in ("ground", floor):
            bad.add(imported)
    return sorted(bad)


def _project_modules():
    for folder in ("mocobench", *STAGES):
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    yield rel[: -len(".__init__")] if rel.endswith(".__init__") else rel, path


def test_every_package_of_the_house_exists():
    assert all(os.path.isfile(os.path.join(REPO, p, "__init__.py"))
               for p in (*STAGES, "mocobench/utils"))


@pytest.mark.parametrize("floor", ["ground", *STAGES])
def test_no_module_imports_above_or_beside_its_floor(floor):
    bad = {m: violations(m, open(p, encoding="utf-8").read())
           for m, p in _project_modules() if _floor(m) == floor}
    assert bad, f"no modules found on the {floor} floor"
    assert {m: v for m, v in bad.items() if v} == {}


# Each sideways or upward import the tree had before the ground package existed, planted where it
# stood: the rule must refuse every one of them.
PLANTED = [
    # ground code that lived in a stage
    ("transfer.run", "from pretrain.preempt import EXIT_CODES"),
    ("transfer.trainer", "from pretrain.preempt import signal_name"),
    # a stage's function used by another stage
    ("transfer.run", "from convert import configure_resnet"),
    ("transfer.datasets", "def f():\n    from synth.cli import main\n"),  # lazy, inside a function
    ("pretrain.train", "from mocobench.launch import STAGES"),  # a stage reaching the top floor
    ("pretrain.lincls", "import mocobench.cli"),
    ("convert.api", "from transfer.config import load_config"),  # a later stage
    ("synth.voc", "from transfer.datasets import register"),
    ("mocobench.utils.comm", "from pretrain.moco import MoCo"),  # the ground reaching a stage
    ("mocobench.utils.synth_meta", "from synth.presets import PRESETS"),
    ("mocobench.utils.fileio", "from mocobench.pipeline import Pipeline"),  # ... or the top
]


@pytest.mark.parametrize("module,source", PLANTED)
def test_the_rule_refuses_each_old_sideways_import(module, source):
    assert violations(module, source) != []


def test_what_the_rule_allows():
    assert violations("transfer.run",
                      "from mocobench.utils import comm\nfrom transfer import record") == []
    assert violations("mocobench.pipeline",
                      "from pretrain import train\nfrom transfer import run") == []
    assert violations("mocobench.utils.comm",
                      "import torch\nfrom mocobench.utils.errors import UsageError") == []
    assert violations("synth.voc", "import mocobench\nfrom synth.raster import render") == []
