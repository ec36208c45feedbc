"""The package's map stays true: each subsystem imports only what its docstring says it may.

Every folder of `mimo_mlx` (and each top-level module) is a room; its docstring ends with a line
"May import: a, b, c." naming the rooms below it. Read with `ast` (nothing is imported), every
`import` and `from ... import`, at module level or inside a function, must go to the room itself
or to one it names; the rooms' declarations must form no cycle; and no two modules may import each
other, directly or around a longer loop.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mimo_mlx"
CONVERT = ROOT / "convert"  # installed as mimo_mlx.convert


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted name under the package (e.g. "model.cache", "errors", "convert.plan") -> file."""
    found = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        found[".".join(p for p in parts if p != "__init__") or "__init__"] = path
    if package == PACKAGE:
        for path in CONVERT.glob("*.py"):
            found["convert" if path.stem == "__init__" else f"convert.{path.stem}"] = path
    return found


def _package_of(name: str, path: Path) -> list[str]:
    """The package a module's relative imports start from."""
    parts = [] if name == "__init__" else name.split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def _imports(name: str, path: Path, modules: dict[str, Path] | None = None) -> set[str]:
    """Modules of the package that `name` imports, anywhere in the file, as dotted names."""
    modules = MODULES if modules is None else modules
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = _package_of(name, path)
            base = base[: len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
            if node.module:  # `from . import x` names modules of the package, not the package
                targets.add(module)
            targets.update(f"{module}.{a.name}" if module else a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mimo_mlx."):
            module = node.module.removeprefix("mimo_mlx.")
            targets.add(module)
            targets.update(f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mimo_mlx."):
                    targets.add(alias.name.removeprefix("mimo_mlx."))
    return {t for t in targets if t in modules and t != name}


def _room(module: str) -> str:
    return module.split(".")[0]


def _declared(module: str) -> set[str] | None:
    """The rooms a room's docstring says it may import; None where it says nothing."""
    doc = ast.get_docstring(ast.parse(MODULES[module].read_text())) or ""
    match = re.search(r"May import:\s*(.*?)\.\s*$", doc, re.S)
    if match is None:
        return None
    text = match.group(1).strip()
    if text == "nothing of the package":
        return set()
    return {word.strip() for word in re.split(r",\s*", " ".join(text.split()))}


MODULES = _modules()
ROOMS = sorted({_room(m) for m in MODULES} - {"__init__", "__main__"})
IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_says_what_it_may_import(room):
    declared = _declared(room)
    assert declared is not None, f"{MODULES[room]}: its docstring needs a 'May import: ...' line"
    assert declared <= set(ROOMS), f"{room} names rooms that do not exist: {declared - set(ROOMS)}"


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_imports_only_what_it_says(room):
    allowed = _declared(room) | {room}
    wrong = sorted(
        f"{name} imports {target}"
        for name, targets in IMPORTS.items()
        if _room(name) == room
        for target in targets
        if _room(target) not in allowed
    )
    assert not wrong, f"{room} may import only {sorted(allowed)}:\n" + "\n".join(wrong)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph, or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_rooms_declare_no_cycle():
    graph = {room: _declared(room) for room in ROOMS}
    cycle = _cycle(graph)
    assert cycle is None, "the rooms' declarations go round: " + " -> ".join(cycle)


def test_no_module_imports_itself_round_a_loop():
    cycle = _cycle(IMPORTS)
    assert cycle is None, "modules import each other: " + " -> ".join(cycle)


def test_benchmarks_import_no_loop():
    """The harness's modules too: run, ranks and the report used to import each other."""
    modules = _modules(ROOT / "benchmarks")
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "report.sections.ranks" in graph["ranks"]  # the reader sees relative imports here
    cycle = _cycle(graph)
    assert cycle is None, "benchmark modules import each other: " + " -> ".join(cycle)


def test_the_map_sees_the_imports():
    """Guards the reader above: the known imports of a few modules are found."""
    assert "model.cache" in IMPORTS["model.mimo_vl"]
    assert "errors" in IMPORTS["model.config"]
    assert "model.checkpoint" in IMPORTS["convert.plan"]  # absolute import from convert/
    assert "cli.main" in IMPORTS["__main__"]
    assert "conversation.file" in IMPORTS["conversation.conversation"]


def test_a_broken_rule_is_caught():
    """The same checks on a made-up graph: an upward import and a loop are reported."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
