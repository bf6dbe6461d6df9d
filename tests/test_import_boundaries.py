"""The walls of the house, as imports: what may import what.

The rules (docs/development.md, "The map of the house"):

1. What a build machine installs (``signery.client``, ``signery.formats``,
   ``signery.keystores``, ``signery.agent``) never imports the server, not even
   for type checking;
   the CLI imports the server only inside the functions of its server commands
   (or for type checking), so that ``signery --help`` and ``signery sign`` never
   load it.
2. Routes translate HTTP to calls and back: a ``routes.py`` (or ``*_routes.py``)
   never imports SQLAlchemy or a key store.
3. Nothing imports another package's private module (``signery.x._y`` is for
   ``signery.x`` and below only).
4. No cycles between modules, counting the imports behind ``TYPE_CHECKING`` and
   inside functions (a lazy import hides a cycle, it does not break it).
5. No cycles between the rooms of the server (``signery.server.<room>``), and the
   ground floor (``persistence``, ``access``, ``runtime``) imports nothing else of
   the server but the settings (``signery.server.config``); the Alembic
   environment alone reads every table (``signery.server.schema``).

Each rule is checked on the real tree and, so that no rule can pass by being
blind, on a small broken tree written for the test where it must fire.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

INSTALLED_ON_BUILD_MACHINES = (
    "signery.client",
    "signery.formats",
    "signery.keystores",
    "signery.agent",
)
GROUND_FLOOR = frozenset({"persistence", "access", "runtime"})
# What the ground floor may import of the server above it, and who may.
GROUND_FLOOR_MAY_IMPORT = {
    "signery.server.config": "signery.server",
    "signery.server.schema": "signery.server.persistence.migrations",
}
SERVER = "signery.server"


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (a name imported from a module counts as it)
    line: int
    lazy: bool  # inside a function body
    typing_only: bool  # under ``if TYPE_CHECKING:``


def _modules(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


class _Visitor(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, known: set[str]) -> None:
        self.module, self.is_package, self.known = module, is_package, known
        self.depth = 0
        self.typing = 0
        self.found: list[Import] = []

    def _add(self, target: str, line: int) -> None:
        self.found.append(Import(self.module, target, line, self.depth > 0, self.typing > 0))

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._function(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._function(node)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        guarded = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        )
        self.typing += guarded
        for child in node.body:
            self.visit(child)
        self.typing -= guarded
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.module.split(".")
            base = base if self.is_package else base[:-1]
            base = base[: len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        for alias in node.names:
            submodule = f"{module}.{alias.name}"
            self._add(submodule if submodule in self.known else module, node.lineno)


def import_graph(root: Path) -> list[Import]:
    """Every import of every module below ``root``, third-party ones included."""
    modules = _modules(root)
    known = set(modules)
    found: list[Import] = []
    for name, path in modules.items():
        visitor = _Visitor(name, path.name == "__init__.py", known)
        visitor.visit(ast.parse(path.read_text(), str(path)))
        found.extend(visitor.found)
    return found


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _room(module: str) -> str | None:
    """The room of the server a module is in (``keys``, ``persistence``...), or
    None for the server's own top-level modules and everything outside it."""
    parts = module.split(".")
    if not _within(module, SERVER) or len(parts) < 4:
        return None
    return parts[2]


def _is_route(module: str) -> bool:
    leaf = module.rsplit(".", 1)[-1]
    return _within(module, SERVER) and (leaf == "routes" or leaf.endswith("_routes"))


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def violations(imports: list[Import], known: set[str]) -> dict[str, list[str]]:
    """What each rule finds, as lines a developer can act on."""
    found: dict[str, list[str]] = {
        "server": [],
        "routes": [],
        "private": [],
        "module_cycles": [],
        "room_cycles": [],
        "ground_floor": [],
    }
    module_edges: dict[str, set[str]] = {}
    room_edges: dict[str, set[str]] = {}
    for imp in imports:
        where = f"{imp.source}:{imp.line} imports {imp.target}"
        if _within(imp.target, SERVER):
            if any(_within(imp.source, p) for p in INSTALLED_ON_BUILD_MACHINES):
                found["server"].append(where)
            elif _within(imp.source, "signery.cli") and not (imp.lazy or imp.typing_only):
                found["server"].append(where + " at module level")
        if _is_route(imp.source) and (
            _within(imp.target, "sqlalchemy") or _within(imp.target, "signery.keystores")
        ):
            found["routes"].append(where)
        owner, _, leaf = imp.target.rpartition(".")
        if leaf.startswith("_") and not leaf.startswith("__") and not _within(imp.source, owner):
            found["private"].append(where)
        if imp.target in known and not (
            _within(imp.target, imp.source) or _within(imp.source, imp.target)
        ):
            module_edges.setdefault(imp.source, set()).add(imp.target)
        source_room, target_room = _room(imp.source), _room(imp.target)
        if source_room and target_room and source_room != target_room:
            room_edges.setdefault(source_room, set()).add(target_room)
            if source_room in GROUND_FLOOR and target_room not in GROUND_FLOOR:
                found["ground_floor"].append(where)
        elif source_room in GROUND_FLOOR and _within(imp.target, SERVER) and not target_room:
            allowed_for = GROUND_FLOOR_MAY_IMPORT.get(imp.target)
            if imp.target != SERVER and not (allowed_for and _within(imp.source, allowed_for)):
                found["ground_floor"].append(where)
    for rule, lines in found.items():
        found[rule] = list(dict.fromkeys(lines))  # one line per import, not per name
    found["module_cycles"] = [" <-> ".join(c) for c in _cycles(module_edges)]
    found["room_cycles"] = [" <-> ".join(c) for c in _cycles(room_edges)]
    return found


def test_the_real_tree_keeps_every_rule() -> None:
    found = violations(import_graph(SRC), set(_modules(SRC)))
    assert {rule: lines for rule, lines in found.items() if lines} == {}


BROKEN_TREE = {
    "signery/__init__.py": "",
    "signery/client/__init__.py": "",
    "signery/client/_api.py": """
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from signery.server.keys import service
    """,
    "signery/cli/__init__.py": "from signery.server.app import create_app\n",
    "signery/cli/lazy.py": "def serve():\n    from signery.server.app import create_app\n",
    "signery/keystores/__init__.py": "",
    "signery/keystores/_builtin.py": "",
    "signery/server/__init__.py": "",
    "signery/server/app.py": "",
    "signery/server/keys/__init__.py": "",
    "signery/server/keys/routes.py": """
        from sqlalchemy import select
        from signery.keystores import _builtin
    """,
    "signery/server/keys/service.py": "from signery.server.ca import service\n",
    "signery/server/ca/__init__.py": "",
    "signery/server/ca/service.py": """
        def issue():
            from signery.server.keys import service
    """,
    "signery/server/persistence/__init__.py": "",
    "signery/server/persistence/db.py": "from signery.server.keys.service import x\n",
}


def test_every_rule_fires_on_a_broken_tree(tmp_path: Path) -> None:
    for relative, text in BROKEN_TREE.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    found = violations(import_graph(tmp_path), set(_modules(tmp_path)))
    assert found["server"] == [
        "signery.cli:1 imports signery.server.app at module level",
        "signery.client._api:4 imports signery.server.keys.service",
    ]
    assert found["routes"] == [
        "signery.server.keys.routes:2 imports sqlalchemy",
        "signery.server.keys.routes:3 imports signery.keystores._builtin",
    ]
    assert found["private"] == ["signery.server.keys.routes:3 imports signery.keystores._builtin"]
    assert found["module_cycles"] == ["signery.server.ca.service <-> signery.server.keys.service"]
    assert found["room_cycles"] == ["ca <-> keys"]
    assert found["ground_floor"] == [
        "signery.server.persistence.db:1 imports signery.server.keys.service"
    ]


@pytest.mark.parametrize("rule", ["server", "routes", "private", "module_cycles", "room_cycles"])
def test_a_rule_is_quiet_on_a_clean_tree(tmp_path: Path, rule: str) -> None:
    (tmp_path / "signery" / "server" / "keys").mkdir(parents=True)
    for relative in ("signery/__init__.py", "signery/server/__init__.py"):
        (tmp_path / relative).write_text("")
    (tmp_path / "signery/server/keys/__init__.py").write_text("")
    (tmp_path / "signery/server/keys/service.py").write_text("import json\n")
    assert violations(import_graph(tmp_path), set(_modules(tmp_path)))[rule] == []
