"""The pure core imports no I/O framework (DESIGN.md section 2)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PURE_CORE = {
    "backoff", "balancer", "config", "correlator", "decisions", "errors", "health", "keys",
    "latency", "network", "responses", "transactions",
}  # fmt: skip
PURE = [
    *sorted((REPO / "codec").glob("*.py")),
    *(REPO / "proxy" / f"{name}.py" for name in sorted(PURE_CORE)),
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


@pytest.mark.parametrize("path", PURE, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pure_module_imports_only_the_pure_core(path: Path) -> None:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (module := node.module or "").startswith("proxy"):
            modules = [module] if module != "proxy" else [f"proxy.{a.name}" for a in node.names]
            for module in modules:
                assert module.removeprefix("proxy.") in PURE_CORE, module


def test_codec_knows_nothing_of_the_proxy() -> None:
    for path in (REPO / "codec").glob("*.py"):
        assert "proxy" not in {
            (node.module or "").split(".")[0]
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom)
        }, path
