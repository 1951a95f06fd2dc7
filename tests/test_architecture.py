"""The package's shape, read with ``ast``: rooms whose imports flow one way, no two modules that
import each other, no function over 60 lines, no module over 500."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "skinlesion"
PACKAGE = "skinlesion"
# The order the data moves; a module may import its own room and the rooms before it. Rooms of
# equal rank (entry points side by side) may not import each other.
ROOMS: dict[str, int] = {
    "core": 0,
    "data": 1,
    "models": 2,
    "inference": 3,
    "evaluation": 4,
    "training": 5,
    "publishing": 6,
    "benchmark": 7,
    "serving": 8,
    "cli": 9,
}
# The package's own entry files, which may import any room.
TOP = {"__init__", "__main__"}
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join((PACKAGE, *parts))] = path
    return out


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``module`` imports, lazily or not."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import mod`` names the module; ``from mod import f`` names ``mod``.
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        for name in names:
            if name == PACKAGE:
                name = f"{PACKAGE}.__init__"  # the package top, which imports every room
            # The deepest module of the package that the name refers to.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


MODULES = _modules()
GRAPH = {m: _imports(m, p, set(MODULES)) for m, p in MODULES.items()}


def test_every_room_is_placed() -> None:
    rooms = {_room(m) for m in MODULES} - {""}
    unplaced = sorted(r for r in rooms if r not in ROOMS and r not in TOP)
    assert not unplaced, f"rooms {unplaced} have no place in ROOMS; add them in data order"


def room_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, imported in graph.items():
        room = _room(module)
        if room in TOP or room not in ROOMS:
            continue
        for other in imported:
            other_room = _room(other)
            if other_room == room:
                continue
            if other_room in TOP:
                bad.append(f"{module} imports the package top {other} (which imports every room)")
                continue
            if other_room not in ROOMS or ROOMS[other_room] >= ROOMS[room]:
                bad.append(f"{module} imports {other} (room {other_room!r} is not before {room!r})")
    return bad


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every import cycle that a depth-first search meets, not only pairs."""
    cycles: list[str] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_imports_flow_one_way() -> None:
    bad = room_violations(GRAPH)
    assert not bad, "\n".join(bad)


def test_no_two_modules_import_each_other() -> None:
    cycles = find_cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_checks_catch_known_faults() -> None:
    graph = {
        "skinlesion.data.a": {"skinlesion.training.b"},  # a later room
        "skinlesion.training.b": {"skinlesion.training.c"},
        "skinlesion.training.c": {"skinlesion.training.b"},  # a pair
        "skinlesion.serving.app": {"skinlesion.cli"},  # an entry point imports a later one
        "skinlesion.cli": {"skinlesion.serving.app"},
        "skinlesion.inference.d": {"skinlesion.__init__"},  # the package top
    }
    assert room_violations(graph) == [
        "skinlesion.data.a imports skinlesion.training.b (room 'training' is not before 'data')",
        "skinlesion.serving.app imports skinlesion.cli (room 'cli' is not before 'serving')",
        "skinlesion.inference.d imports the package top skinlesion.__init__ (which imports every "
        "room)",
    ]
    assert find_cycles(graph) == [
        "skinlesion.cli -> skinlesion.serving.app -> skinlesion.cli",
        "skinlesion.training.b -> skinlesion.training.c -> skinlesion.training.b",
    ]


def long_functions(sources: dict[str, str], limit: int) -> list[str]:
    """``module.function: N lines`` for every function (methods and nested ones too) longer than
    ``limit`` lines, decorators left out."""
    long = []
    for module, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > limit:
                    long.append(f"{module}.{node.name}: {n} lines")
    return long


def long_modules(sources: dict[str, str], limit: int) -> list[str]:
    """``module: N lines`` for every module longer than ``limit`` lines."""
    return [
        f"{module}: {n} lines"
        for module, text in sources.items()
        if (n := len(text.splitlines())) > limit
    ]


SOURCES = {m: p.read_text() for m, p in MODULES.items()}


def test_functions_are_short() -> None:
    long = long_functions(SOURCES, MAX_FUNCTION_LINES)
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_modules_are_short() -> None:
    long = long_modules(SOURCES, MAX_MODULE_LINES)
    assert not long, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(long)


def test_length_checks_catch_known_faults() -> None:
    def lines(indent: int, n: int) -> str:
        return "".join(f"{' ' * indent}x{i} = {i}\n" for i in range(n))

    sources = {
        "skinlesion.a": "def short():\n" + lines(4, 4),  # 5 lines: at the limit
        "skinlesion.b": "class C:\n    def long(self):\n" + lines(8, 5),  # a 6-line method
        "skinlesion.c": "def outer():\n    async def inner():\n" + lines(8, 5),  # 7 and 6
    }
    assert long_functions(sources, 5) == [
        "skinlesion.b.long: 6 lines",
        "skinlesion.c.outer: 7 lines",
        "skinlesion.c.inner: 6 lines",
    ]
    assert long_modules(sources, 6) == ["skinlesion.b: 7 lines", "skinlesion.c: 7 lines"]
    assert long_modules(sources, 7) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from skinlesion.data.folds import make_folds", {"skinlesion.data.folds"}),
        ("from skinlesion.data import folds", {"skinlesion.data.folds"}),
        ("import skinlesion.models.factory", {"skinlesion.models.factory"}),
        ("from . import cache", {"skinlesion.data.cache"}),
        ("from ..core.labels import CLASSES", {"skinlesion.core.labels"}),
        ("import numpy", set()),
        ("from skinlesion import __version__", {"skinlesion.__init__"}),
        ("import skinlesion", {"skinlesion.__init__"}),
    ],
)
def test_import_reader(source: str, expected: set[str], tmp_path: Path) -> None:
    path = tmp_path / "probe.py"
    path.write_text(f"def f():\n    {source}\n")  # lazy imports count too
    known = {
        "skinlesion.data",
        "skinlesion.data.folds",
        "skinlesion.data.cache",
        "skinlesion.core.labels",
        "skinlesion.models.factory",
        "skinlesion.__init__",
    }
    assert _imports("skinlesion.data.probe", path, known) == expected
