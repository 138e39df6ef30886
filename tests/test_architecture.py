"""The import graph keeps the layers of docs/architecture.md: a module imports only its own layer
or lower ones, never a private name of another package, and the service app stays thin."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "slmtune"

# Highest layer first; a module belongs to the first prefix it matches.
LAYERS = [
    ("slmtune.cli", 7),
    ("slmtune.service", 6),
    ("slmtune.serve", 5),
    ("slmtune.chat", 4), ("slmtune.evaluate", 4), ("slmtune.export", 4), ("slmtune.plot", 4),
    ("slmtune.training", 3),
    ("slmtune.config", 2), ("slmtune.generation", 2), ("slmtune.scoring", 2), ("slmtune.data.validate", 2), ("slmtune.data.convert", 2),
    ("slmtune.data.dataset", 2), ("slmtune.data.batching", 2),
    ("slmtune.tasks", 1),
    ("slmtune.atomic", 0), ("slmtune.auto", 0), ("slmtune.http", 0), ("slmtune.models", 0), ("slmtune.methods", 0),
    ("slmtune.data.formats", 0), ("slmtune.data.tokenize", 0), ("slmtune.data", 0), ("slmtune", 0),
]


def layer(module: str) -> int:
    return next(level for prefix, level in LAYERS if module == prefix or module.startswith(prefix + "."))


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every slmtune import, function-level included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.startswith("slmtune")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slmtune"):
            out += [(node.module, a.name, node.lineno) for a in node.names]
    return out


MODULES = modules()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_respect_the_layers(name):
    mine = layer(name)
    for target, imported, line in imports(MODULES[name]):
        full = f"{target}.{imported}" if imported and f"{target}.{imported}" in MODULES else target
        assert layer(full) <= mine, f"{name}:{line} imports {full} (layer {layer(full)} above {mine})"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_names_across_packages(name):
    for target, imported, line in imports(MODULES[name]):
        if imported and imported.startswith("_") and package_of(target) != package_of(name):
            raise AssertionError(f"{name}:{line} imports the private {target}.{imported}")


def test_the_service_app_is_thin():
    lines = (PACKAGE / "service" / "app.py").read_text().count("\n")
    assert lines < 250, f"service/app.py has {lines} lines; put routes in service/routes/ and logic beside them"
