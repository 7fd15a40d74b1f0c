"""The layout of `helpers`: modules in floors without import circles, short modules, short functions;
and of `coursebuild` (the runner and website builder): no import circle either.

Read with the standard library only (`ast` over the package), so the check runs without importing
anything: an import hidden inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "helpers"
BUILDER = PACKAGE.parent / "coursebuild"


@functools.cache
def _trees(package: Path = PACKAGE) -> dict[str, ast.Module]:
    return {f.stem: ast.parse(f.read_text(), filename=str(f)) for f in sorted(package.glob("*.py"))}


def _imported_modules(tree: ast.Module, modules: set[str], package: str = "helpers") -> set[str]:
    """The modules of `package` a module imports, wherever the import stands (top, function, TYPE_CHECKING)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1 or base == package:  # from . import x / from helpers import x
                found |= {a.name for a in node.names if a.name in modules}
                base = f"{package}." + base if node.level == 1 and base else base
            if base.startswith(f"{package}."):
                found.add(base.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith(f"{package}.")}
    return found & modules


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module of `package` (helpers by default) -> the modules of the same package it imports."""
    trees = _trees(package)
    modules = set(trees) - {"__init__"}
    return {name: _imported_modules(tree, modules, package.name) - {name}
            for name, tree in trees.items() if name != "__init__"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None (depth-first search)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = "active", path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "active":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node], _ = "done", path.pop()
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n))), None)


def test_the_cycle_finder_finds_a_circle_and_accepts_floors() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"plots": {"gradcam"}, "gradcam": {"plots"}}) == ["gradcam", "plots", "gradcam"]
    assert find_cycle({"top": {"mid", "core"}, "mid": {"core"}, "core": set()}) is None


def test_the_graph_sees_every_kind_of_import() -> None:
    tree = ast.parse("from helpers.a import x\nimport helpers.b\nfrom helpers import c\nfrom . import d\n"
                     "def f():\n    from helpers.e import y\n")
    assert _imported_modules(tree, set("abcdef")) == set("abcde")


def test_no_import_circle_among_helpers_modules() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_graph_reads_coursebuild_imports_too() -> None:
    tree = ast.parse("from coursebuild.a import x\ndef f():\n    from coursebuild import b\nimport helpers.c\n")
    assert _imported_modules(tree, set("abc"), "coursebuild") == {"a", "b"}


def test_no_import_circle_among_coursebuild_modules() -> None:
    graph = import_graph(BUILDER)
    assert {"run_all", "site", "chapters", "results"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle in coursebuild: " + " -> ".join(cycle or [])


# The floors of README.md ("The package helpers"): a module imports only from its floor or below.
FLOORS = {
    "core": 0,
    "runs": 1, "synthetic": 1, "images": 1,  # exercises/ is a package on top of them all (helpers/exercises/*.py)
    "datasets": 2, "scan": 2, "data": 2, "augment": 2, "loading": 2, "models": 2, "tta": 2,
    "losses": 3, "evaluate": 3, "train": 3, "gradcam": 3, "reporting": 3,
    "plots": 4,
    "ood": 5,
}


def test_core_is_the_bottom_floor() -> None:
    assert import_graph()["core"] == set(), "helpers.core must not import other helpers modules"


def test_every_module_has_a_floor_and_imports_only_downwards() -> None:
    graph = import_graph()
    assert set(graph) == set(FLOORS), f"modules without a floor (add them to FLOORS and README): {set(graph) ^ set(FLOORS)}"
    upward = [f"{m} (floor {FLOORS[m]}) imports {d} (floor {FLOORS[d]})"
              for m, deps in graph.items() for d in deps if FLOORS[d] > FLOORS[m]]
    assert not upward, upward


def _defined_names(module: str) -> set[str]:
    """Names a helpers module defines at its top level (functions, classes, assignments)."""
    names = set()
    for node in _trees()[module].body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def _calls_through_modules(source: str) -> set[tuple[str, str]]:
    """(module, name) for every `module.name` where `from helpers import module` brought the module in."""
    tree = ast.parse(source)
    aliases = {(a.asname or a.name): a.name for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and node.module == "helpers" for a in node.names}
    return {(aliases[n.value.id], n.attr) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases}


def _notebook_code(path: Path) -> str:
    import json

    cells = json.loads(path.read_text())["cells"]
    code = ("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return "\n".join(line for cell in code for line in cell.splitlines()
                     if not line.lstrip().startswith(("%", "!")))  # no IPython magics


CALLERS = sorted((PACKAGE.parent / "notebooks").glob("*.ipynb")) + sorted((PACKAGE.parent / "app").glob("*.py"))


def test_the_call_finder_reads_module_attributes() -> None:
    calls = _calls_through_modules("from helpers import data, plots as p\ndata.load_splits()\np.plot_x(data.A)\n")
    assert calls == {("data", "load_splits"), ("plots", "plot_x"), ("data", "A")}


@pytest.mark.parametrize("path", CALLERS, ids=lambda p: p.name)
def test_every_name_a_notebook_calls_is_defined_in_that_module(path: Path) -> None:
    """`data.make_loaders(...)` in a notebook means `def make_loaders` in helpers/data.py."""
    source = _notebook_code(path) if path.suffix == ".ipynb" else path.read_text()
    missing = sorted(f"{module}.{name}" for module, name in _calls_through_modules(source)
                     if name not in _defined_names(module))
    assert not missing, f"{path.name} calls names that are not defined in the module it names: {missing}"


@pytest.mark.parametrize("path", [p for p in CALLERS if p.suffix == ".ipynb"], ids=lambda p: p.name)
def test_the_text_of_a_notebook_names_functions_where_they_are(path: Path) -> None:
    """Markdown such as `loading.make_loaders` or `helpers.losses.pos_weight` points at a real definition."""
    import json
    import re

    text = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown")
    refs = set(re.findall(r"`(?:helpers\.)?(" + "|".join(FLOORS) + r")\.(\w+)", text))
    stale = sorted(f"{m}.{n}" for m, n in refs if n not in _defined_names(m))
    assert not stale, f"{path.name} names functions that are not where it says: {stale}"
