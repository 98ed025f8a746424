"""What every integration test also holds (DESIGN.md section 4): no file descriptor is
left open once the test, its proxy, switches, terminals and journal are done."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from tests.conftest import open_fds


@pytest.fixture(autouse=True)
def no_descriptor_left_open() -> Iterator[None]:
    before = open_fds()
    yield
    gc.collect()  # garbage with a socket in it fails on its own: ResourceWarning is an error
    assert open_fds() == before, "file descriptors left open by the test"
