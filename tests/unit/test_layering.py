"""The house stays one-way: ``fedpeft/`` never imports the packages built on it, only
``wire.py`` inside it touches Flower, and ``server/`` and ``client/`` never import each
other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UPPER = {"server", "client", "strategies", "attacks"}


def _imports(path: Path) -> set[str]:
    """Top-level package names a module imports (absolute imports, anywhere in it)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", _modules("fedpeft"), ids=lambda p: str(p.relative_to(ROOT)))
def test_fedpeft_imports_nothing_above_it(path: Path) -> None:
    imported = _imports(path)
    assert not imported & UPPER, f"{path} imports {sorted(imported & UPPER)}"
    if path.name != "wire.py":
        assert "flwr" not in imported, f"{path} imports flwr; only fedpeft/wire.py may"


@pytest.mark.parametrize(("package", "forbidden"), [("server", "client"),
                                                     ("client", "server")])
def test_server_and_client_stay_apart(package: str, forbidden: str) -> None:
    offenders = [p for p in _modules(package) if forbidden in _imports(p)]
    assert not offenders
