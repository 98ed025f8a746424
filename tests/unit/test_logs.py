"""Log lines: JSON for shippers, and a transaction line that shows a PAN only masked."""

from __future__ import annotations

import json
import logging

import pytest

from fixtures.messages import TEST_PAN, financial
from proxy.forwarder import _log_outcome
from proxy.logs import JsonFormatter


def test_json_lines() -> None:
    record = logging.LogRecord("iso_proxy.x", logging.WARNING, __file__, 1, "a %s", ("b",), None)
    line = json.loads(JsonFormatter().format(record))
    assert (line["level"], line["logger"], line["message"]) == ("WARNING", "iso_proxy.x", "a b")
    assert line["ts"].endswith("+00:00")


def test_the_transaction_line_masks_the_pan(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="iso_proxy.transactions"):
        _log_outcome(financial(5, "TERM0009"), "00", "alpha", 1.5)
    assert caplog.messages == [
        "0200 stan='000005' tid='TERM0009' pan=411111******1111 rc='00' (alpha) 1.5ms"
    ]
    assert TEST_PAN not in caplog.text
