"""The package's layers: every import in pes/ points downward (docs/design.md).

    system < estimators < tasks and envs < training < runs < paper < cli

Every import statement counts, at module level or inside a function (a lazy import is still a
dependency), and so does a module named in a string (``importlib.import_module("pes")``, a
runner reference ``"pes.paper.images:compare_images"``). Imports within one layer are free.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pes"

# Lowest first. A module belongs to the layer of the longest prefix that names it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("system", ("pes.system",)),
    ("estimators", ("pes.estimators",)),
    # The tasks' own libraries (datasets, the learned optimizer) sit with the tasks.
    ("tasks and envs", ("pes.tasks", "pes.envs", "pes.data", "pes.learned_optimizer")),
    # The package root re-exports system, estimators and training (the public API).
    ("training", ("pes.training", "pes.diagnostics", "pes")),
    ("runs", ("pes.runs",)),
    ("paper", ("pes.paper",)),
    ("cli", ("pes.cli", "pes.__main__")),
)

# (importer, imported): why the upward import is right. Keep this short.
ALLOWED = {
    ("pes", "pes.runs.checkpoint"): "the root exports the checkpoint API (Checkpointer, "
    "abstract_state) for Python users, imported on first use so that orbax loads only then",
}

_REFERENCE = re.compile(r"pes(\.[A-Za-z_]\w*)+(:[A-Za-z_]\w*)?")  # "pes.x.y[:function]"


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} is in no layer; add it to LAYERS"
    return rank


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    root = PACKAGE.parent
    return (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """The pes modules the file ``path`` imports."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path.parent)
    return imports_in(path.read_text(), package)


def imports_in(source: str, package: str) -> set[str]:
    """The pes modules ``source`` (a module of ``package``) imports: statements anywhere, and
    module names in strings."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:  # from pes import data: the module pes.data
                sub = f"{base}.{a.name}"
                found.add(sub if _is_module(sub) else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if _REFERENCE.fullmatch(node.value):
                found.add(node.value.split(":")[0])
        elif (isinstance(node, ast.Call) and node.args
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and isinstance(node.args[0], ast.Constant)):  # importlib.import_module("pes")
            found.add(node.args[0].value)
    return {m for m in found if m == "pes" or m.startswith("pes.")}


MODULES = sorted(PACKAGE.rglob("*.py"))


def upward_imports() -> list[str]:
    bad = []
    for path in MODULES:
        importer = module_name(path)
        for imported in sorted(imports_of(path)):
            if (layer_of(imported) > layer_of(importer)
                    and (importer, imported) not in ALLOWED):
                bad.append(f"{importer} ({LAYERS[layer_of(importer)][0]}) imports {imported} "
                           f"({LAYERS[layer_of(imported)][0]})")
    return bad


def test_every_module_is_in_a_layer():
    assert MODULES, f"no modules under {PACKAGE}"
    for path in MODULES:
        layer_of(module_name(path))


def test_imports_point_downward():
    bad = upward_imports()
    assert not bad, "imports pointing up the layers:\n" + "\n".join(bad)


def test_allowed_exceptions_are_still_needed():
    for importer, imported in ALLOWED:
        path = PACKAGE.parent / Path(*importer.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        assert imported in imports_of(path), f"{importer} no longer imports {imported}: drop it"


@pytest.mark.parametrize("source, expected", [
    ("import pes.runs.config\n", {"pes.runs.config"}),
    ("def f():\n    from pes.paper import images\n", {"pes.paper.images"}),
    ("from pes import data, PES\n", {"pes.data", "pes"}),
    ("X = 'pes.paper.images:compare_images'\n", {"pes.paper.images"}),
    ("import importlib\nimportlib.import_module('pes')\n", {"pes"}),
    ("NAMES = ('pes', 'tes')\n", set()),
    ("import numpy\nY = 'pes compare: not a module'\n", set()),
    ("from . import base\nfrom ..system import unroll\n", {"pes.tasks.base", "pes.system"}),
])
def test_imports_in_sees_lazy_and_named_imports(source, expected):
    assert imports_in(source, "pes.tasks") == expected


def test_an_upward_import_is_caught(monkeypatch):
    """A task that imports the run layer (a deliberate violation) is reported."""
    original = imports_of

    def with_violation(path):
        found = original(path)
        return found | {"pes.runs.registry"} if module_name(path) == "pes.tasks.lorenz" else found

    monkeypatch.setitem(globals(), "imports_of", with_violation)
    assert any(b.startswith("pes.tasks.lorenz (tasks and envs) imports pes.runs.registry")
               for b in upward_imports())


def test_every_reference_by_name_resolves():
    """The runners and views the experiments name as "module:function" exist, in the paper
    layer, and take what run_experiment and the training-runs runner pass them."""
    import inspect

    from pes.paper.experiments import EXPERIMENTS, load

    for name, experiment in EXPERIMENTS.items():
        for ref, arity in ((experiment.runner, 3), (experiment.views, 3)):
            if ref is None:
                continue
            assert layer_of(ref.split(":")[0]) == layer_of("pes.paper"), (name, ref)
            function = load(ref)
            assert len(inspect.signature(function).parameters) == arity, (name, ref)
