"""The package's layers, read from the source: which part may import which, and no circles.

Every module under edgesplit/ is parsed with `ast` (nothing is imported or run), and each import it makes,
at module level or inside a function or class, becomes an edge of the module graph. The rules:

- the edge client (edgesplit/client/) never reaches the server, the exporter or a PyTorch/ONNX library,
  neither itself nor through anything it imports, because a device installs neither;
- edgesplit/errors.py and edgesplit/devices/profiles.py sit at the bottom: from edgesplit they import
  only the exceptions;
- the exporter does not import the server (the server loads what the exporter wrote, not the other way);
- no two modules import each other in a circle.

Imports under `if TYPE_CHECKING:` never run: they count for the rules about what a part may import, but
not for circles, since naming a type for the checker is how a module refers back without a runtime cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "edgesplit"

# Libraries a device never installs: the edge client must not import them, directly or through edgesplit.
CLIENT_FORBIDDEN_LIBRARIES = ("torch", "transformers", "peft", "onnx")
CLIENT_FORBIDDEN_PARTS = ("edgesplit.server", "edgesplit.export", "edgesplit.profiles")

# Circles tolerated while a change that removes them is in flight; each entry is one edge, (importer,
# imported), that the cycle check leaves out. Empty: the tree has no circle (report.py <-> demo.py was the
# last one, gone since the shared orchestration module).
KNOWN_CIRCLE_EDGES: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Import:
    """One import statement's target, as an absolute dotted name, and where it was written."""

    importer: str  # the module that imports, e.g. "edgesplit.client.energy"
    target: str  # e.g. "edgesplit.devices.profiles" or "torch.nn"
    line: int
    type_checking_only: bool  # under `if TYPE_CHECKING:`: never executed

    def __post_init__(self) -> None:
        if not self.importer or not self.target:
            raise ValueError(f"an import needs an importer and a target, got {self.importer!r} -> {self.target!r}")

    def is_of(self, name: str) -> bool:
        """True when the target is `name` or one of its submodules ("onnx" matches "onnx.helper", not "onnxruntime")."""
        return self.target == name or self.target.startswith(name + ".")


def module_name(path: Path, root: Path) -> str:
    """The dotted name of a source file under `root`'s parent: edgesplit/client/__init__.py -> edgesplit.client."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking_guard(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve_relative(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute name of `from <level dots><module> import ...` written in `importer`."""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    if level - 1 > len(package) - 1:
        raise ValueError(f"{importer}: relative import beyond the top-level package")
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def collect_imports(source: str, importer: str, *, is_package: bool, known_modules: Set[str]) -> list[Import]:
    """Every import in `source`, wherever it is written; `from pkg import sub` names `pkg.sub` when that is a
    module in `known_modules`, else `pkg`. `importlib.import_module("<literal>")` counts as an import too."""
    tree = ast.parse(source)
    guarded_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking_guard(node):
            for statement in node.body:
                for inner in ast.walk(statement):
                    if hasattr(inner, "lineno"):
                        guarded_lines.add(inner.lineno)

    found: list[Import] = []

    def add(target: str, line: int) -> None:
        found.append(Import(importer, target, line, line in guarded_lines))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(importer, is_package, node.level, node.module)
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}" if base else alias.name
                add(submodule if submodule in known_modules else base, node.lineno)
        elif isinstance(node, ast.Call) and _is_dynamic_import(node):
            argument = node.args[0]
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                add(argument.value, node.lineno)
    return found


def _is_dynamic_import(call: ast.Call) -> bool:
    function = call.func
    name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
    return name in ("import_module", "__import__") and bool(call.args)


def package_imports(root: Path) -> dict[str, list[Import]]:
    """Module name -> its imports, for every .py file under `root`."""
    paths = sorted(root.rglob("*.py"))
    modules = {module_name(path, root): path for path in paths}
    return {
        name: collect_imports(
            path.read_text(encoding="utf-8"),
            name,
            is_package=path.name == "__init__.py",
            known_modules=modules.keys(),
        )
        for name, path in modules.items()
    }


def module_graph(
    imports: Mapping[str, Iterable[Import]], *, leave_out: Set[tuple[str, str]] = frozenset()
) -> dict[str, set[str]]:
    """Edges between the package's own modules that run (TYPE_CHECKING imports left out), self-edges dropped."""
    graph: dict[str, set[str]] = {name: set() for name in imports}
    for name, found in imports.items():
        for item in found:
            target = item.target
            if item.type_checking_only or target == name or target not in graph or (name, target) in leave_out:
                continue
            graph[name].add(target)
    return graph


def find_cycles(graph: Mapping[str, Set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative), sorted."""
    index_of: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index_of:
            continue
        work: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        index_of[start] = lowlink[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, pending = work[-1]
            if pending:
                successor = pending.pop(0)
                if successor not in index_of:
                    index_of[successor] = lowlink[successor] = counter
                    counter += 1
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, sorted(graph.get(successor, ()))))
                elif successor in on_stack:
                    lowlink[node] = min(lowlink[node], index_of[successor])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                lowlink[parent] = min(lowlink[parent], lowlink[node])
            if lowlink[node] == index_of[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def reachable(graph: Mapping[str, Set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others, with the packages above each one (whose
    __init__ runs first); `start` itself included."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parents = [".".join(name.split(".")[:depth]) for depth in range(1, name.count(".") + 1)]
        todo.extend(parent for parent in parents if parent in graph)
        todo.extend(graph.get(name, ()))
    return seen


def _describe(found: Iterable[Import]) -> str:
    return "\n".join(f"  {item.importer} (line {item.line}) imports {item.target}" for item in found)


# ----------------------------------------------------------------------------------------- the real package


@pytest.fixture(scope="module")
def imports() -> dict[str, list[Import]]:
    return package_imports(PACKAGE_ROOT)


def test_the_parser_sees_the_package(imports: dict[str, list[Import]]) -> None:
    # Guards the rules below against passing vacuously on a parser that finds nothing.
    assert {"edgesplit.errors", "edgesplit.client.client", "edgesplit.server.server", "edgesplit.cli"} <= set(imports)
    graph = module_graph(imports)
    assert "edgesplit.client.protocol" in graph["edgesplit.client.client"]
    assert "edgesplit.errors" in graph["edgesplit.devices.profiles"]


def test_the_client_imports_no_server_exporter_or_torch(imports: dict[str, list[Import]]) -> None:
    forbidden = CLIENT_FORBIDDEN_LIBRARIES + CLIENT_FORBIDDEN_PARTS
    bad = [
        item
        for name, found in imports.items()
        if name == "edgesplit.client" or name.startswith("edgesplit.client.")
        for item in found
        if any(item.is_of(library) for library in forbidden)
    ]
    assert not bad, "the edge client must not import these (a device installs neither):\n" + _describe(bad)


def test_nothing_the_client_imports_reaches_torch(imports: dict[str, list[Import]]) -> None:
    graph = module_graph(imports)
    client_modules = [name for name in graph if name == "edgesplit.client" or name.startswith("edgesplit.client.")]
    reached = set().union(*(reachable(graph, name) for name in client_modules))
    bad = [
        item
        for name in sorted(reached)
        for item in imports[name]
        if any(item.is_of(library) for library in CLIENT_FORBIDDEN_LIBRARIES + CLIENT_FORBIDDEN_PARTS)
    ]
    assert not bad, "a module the edge client loads imports what a device lacks:\n" + _describe(bad)


@pytest.mark.parametrize("bottom", ["edgesplit.errors", "edgesplit.devices.profiles"])
def test_the_bottom_layer_imports_only_the_exceptions(imports: dict[str, list[Import]], bottom: str) -> None:
    bad = [item for item in imports[bottom] if item.is_of("edgesplit") and item.target != "edgesplit.errors"]
    assert not bad, f"{bottom} may import nothing from edgesplit but edgesplit.errors:\n" + _describe(bad)


def test_the_exporter_does_not_import_the_server(imports: dict[str, list[Import]]) -> None:
    bad = [
        item
        for name, found in imports.items()
        if name.startswith("edgesplit.export")
        for item in found
        if item.is_of("edgesplit.server")
    ]
    assert not bad, "the exporter must not import the server:\n" + _describe(bad)


def test_no_import_circles(imports: dict[str, list[Import]]) -> None:
    cycles = find_cycles(module_graph(imports, leave_out=KNOWN_CIRCLE_EDGES))
    assert not cycles, "modules that import each other in a circle:\n" + "\n".join(
        "  " + " <-> ".join(cycle) for cycle in cycles
    )


def test_the_known_circle_edges_still_exist(imports: dict[str, list[Import]]) -> None:
    # An exception that no longer matches anything must be deleted, or it would hide a new circle later.
    graph = module_graph(imports)
    stale = sorted(edge for edge in KNOWN_CIRCLE_EDGES if edge[1] not in graph.get(edge[0], set()))
    assert not stale, f"remove these from KNOWN_CIRCLE_EDGES, the import is gone: {stale}"


# -------------------------------------------------------------------------------- the checks, on made-up code


def test_imports_inside_functions_relative_and_dynamic_ones_are_seen() -> None:
    source = (
        "from __future__ import annotations\n"
        "import importlib\n"
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "from .. import errors\n"
        "if TYPE_CHECKING:\n"
        "    from pkg.other import Thing\n"
        "def late():\n"
        "    import torch.nn\n"
        "    return importlib.import_module('peft')\n"
    )
    known = {"pkg", "pkg.errors", "pkg.sub", "pkg.sub.sibling", "pkg.sub.mod", "pkg.other"}
    found = collect_imports(source, "pkg.sub.mod", is_package=False, known_modules=known)
    targets = {(item.target, item.type_checking_only) for item in found}
    assert ("pkg.sub.sibling", False) in targets
    assert ("pkg.errors", False) in targets
    assert ("pkg.other", True) in targets
    assert ("torch.nn", False) in targets
    assert ("peft", False) in targets
    torch_import = next(item for item in found if item.target == "torch.nn")
    assert torch_import.line == 9 and torch_import.is_of("torch") and not torch_import.is_of("torc")


def test_relative_imports_resolve_from_a_package_init() -> None:
    found = collect_imports("from .child import x\n", "pkg.sub", is_package=True, known_modules={"pkg.sub.child"})
    assert [item.target for item in found] == ["pkg.sub.child"]
    with pytest.raises(ValueError, match="beyond the top-level package"):
        collect_imports("from ... import x\n", "pkg.mod", is_package=False, known_modules=set())


def test_cycles_are_found_and_acyclic_graphs_pass() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"f"}, "f": {"e"}, "g": set()}
    assert find_cycles(graph) == [["a", "b", "c"], ["e", "f"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []


def test_type_checking_and_left_out_edges_do_not_make_circles() -> None:
    imports = {
        "m.a": [Import("m.a", "m.b", 1, type_checking_only=False)],
        "m.b": [Import("m.b", "m.a", 1, type_checking_only=True), Import("m.b", "m.c", 2, type_checking_only=False)],
        "m.c": [Import("m.c", "m.b", 1, type_checking_only=False)],
    }
    assert find_cycles(module_graph(imports)) == [["m.b", "m.c"]]
    assert find_cycles(module_graph(imports, leave_out={("m.c", "m.b")})) == []


def test_reachable_follows_imports_and_enclosing_packages() -> None:
    graph = {"p": {"lib"}, "p.q": set(), "p.q.r": {"p.s"}, "p.s": set(), "lib": set(), "other": set()}
    assert reachable(graph, "p.q.r") == {"p.q.r", "p", "p.q", "p.s", "lib"}
