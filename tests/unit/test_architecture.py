"""The pure core imports no I/O framework (DESIGN.md section 2)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PURE = [
    *sorted((REPO / "codec").glob("*.py")),
    *(
        REPO / "proxy" / f"{name}.py"
        for name in (
            "backoff",
            "balancer",
            "config",
            "correlator",
            "decisions",
            "errors",
            "keys",
            "responses",
        )
    ),
]
FORBIDDEN = {"trio", "asyncio", "asyncpg", "socket", "selectors", "threading"}


@pytest.mark.parametrize("path", PURE, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pure_module_imports_no_io(path: Path) -> None:
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN


def test_codec_knows_nothing_of_the_proxy() -> None:
    for path in (REPO / "codec").glob("*.py"):
        assert "proxy" not in {
            (node.module or "").split(".")[0]
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom)
        }, path
