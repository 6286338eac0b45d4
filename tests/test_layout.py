"""The core's subpackages import one another one way, and never the host."""

from __future__ import annotations

import ast
from pathlib import Path

LIB = Path(__file__).resolve().parent.parent / "lib_mos"


def package_imports() -> dict[str, set[str]]:
    """Subpackage -> the other subpackages its modules import (at any depth, lazily or not)."""
    edges: dict[str, set[str]] = {}
    for path in LIB.rglob("*.py"):
        parts = path.relative_to(LIB).parts
        own = parts[0] if len(parts) > 1 else path.stem
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                bits = name.split(".")
                if bits[0] == "modules":
                    edges.setdefault(own, set()).add("<host>")
                if bits[0] == "lib_mos" and len(bits) > 1 and bits[1] != own:
                    edges.setdefault(own, set()).add(bits[1])
    return edges


def test_no_import_circle_between_subpackages():
    edges = package_imports()
    seen: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if seen.get(node) == 1:
            raise AssertionError("import circle: " + " -> ".join([*path, node]))
        if seen.get(node) == 2:
            return
        seen[node] = 1
        for nxt in sorted(edges.get(node, ())):
            visit(nxt, [*path, node])
        seen[node] = 2

    for node in sorted(edges):
        visit(node, [])


def test_the_core_never_imports_the_host():
    assert not [pkg for pkg, targets in package_imports().items() if "<host>" in targets]


def test_models_is_the_bottom_layer():
    edges = package_imports()
    # files (atomic writes), tensorfile (the .safetensors format) and allocator: leaf utilities
    assert edges.get("models", set()) <= {"files", "tensorfile", "allocator"}, edges.get("models")
