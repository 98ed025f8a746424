"""`iso-proxy run` sets the process up for a long-running server before it serves."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy import cli

CONFIG = """
listen: {host: 127.0.0.1, port: 0}
switches: [{name: alpha, host: 127.0.0.1, port: 9}]
store: {enabled: false}
"""


@pytest.fixture
def thresholds() -> Iterator[None]:
    before = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*before)


def test_run_raises_the_garbage_collector_thresholds_before_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thresholds: None
) -> None:
    """With CPython's default the proxy stalled 280 ms every few seconds beside 10 000 idle
    terminals (a full collection walking every connection's objects; BENCHMARKS.md)."""
    seen: list[tuple[int, int, int]] = []

    def serve(*_: Any) -> int:
        seen.append(gc.get_threshold())
        return 0

    monkeypatch.setattr(cli, "_serve", serve)
    gc.set_threshold(700, 10, 10)
    config = tmp_path / "proxy.yaml"
    config.write_text(CONFIG)
    assert cli.main(["run", "-c", str(config)]) == 0
    assert seen == [cli.GC_THRESHOLDS]
