"""`iso-proxy run` sets the process up for a long-running server before it serves."""

from __future__ import annotations

import ctypes
import gc
import subprocess
import sys
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
    monkeypatch.setattr(cli, "tune_malloc", lambda: True)  # not this process's malloc
    gc.set_threshold(700, 10, 10)
    config = tmp_path / "proxy.yaml"
    config.write_text(CONFIG)
    assert cli.main(["run", "-c", str(config)]) == 0
    assert seen == [cli.GC_THRESHOLDS]


def test_run_tunes_malloc_before_serving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps: list[str] = []

    def tune() -> bool:
        steps.append("tuned")
        return True

    def serve(*_: Any) -> int:
        steps.append("served")
        return 0

    monkeypatch.setattr(cli, "tune_malloc", tune)
    monkeypatch.setattr(cli, "_serve", serve)
    config = tmp_path / "proxy.yaml"
    config.write_text(CONFIG)
    assert cli.main(["run", "-c", str(config)]) == 0
    assert steps == ["tuned", "served"]


MMAPPED_BLOCKS = """
import ctypes
from proxy.cli import tune_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)

def mmapped_while_held(count=256):  # asyncio's read buffer is 256 KiB
    # held all at once, so free heap left by the imports (a few MiB at most) cannot serve
    # them all: whether a block of this size gets its own mmap does not depend on luck
    before = libc.mallinfo2().hblks
    held = [libc.malloc(262144) for _ in range(count)]
    during = libc.mallinfo2().hblks
    for block in held:
        libc.free(block)
    return during - before

# glibc's own start: 128 KiB (raised later by the first big block freed); set outright
# here, as imports may have raised it, and so that the frees above cannot raise it
libc.mallopt(-3, 128 * 1024)
print(mmapped_while_held() > 0, tune_malloc(), mmapped_while_held())
"""


def test_tune_malloc_keeps_asyncios_read_buffers_off_mmap() -> None:
    """A 256 KiB buffer was a fresh mmap (and munmap) every journal reply (BENCHMARKS.md)."""
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("not glibc 2.33 or newer")
    result = subprocess.run(
        [sys.executable, "-c", MMAPPED_BLOCKS], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["True", "True", "0"]
