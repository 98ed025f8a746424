"""The benchmark's medians: the proxy's CPU as a multiple of the bare forwarder's."""

from __future__ import annotations

from typing import Any

import pytest

from bench.report import summarize


def _run(target: str, cpu: float | None) -> dict[str, Any]:
    run: dict[str, Any] = {
        "target": target,
        "target_tps": None,
        "throughput_tps": 1000.0,
        "latency_ms": {"p50": 1.0, "p99": 2.0, "p999": 3.0},
        "answered": 10,
        "approved": 10,
        "broken": 0,
        "unsent": 0,
        "timeouts": 0,
        "journal_rows": 10 if target == "proxy" else 0,
    }
    if target == "proxy":
        run["proxy_cpu_us_per_txn"] = cpu
    if target == "bare":
        run["forwarder_cpu_us_per_txn"] = cpu
    return run


@pytest.mark.parametrize(("bare_cpu", "expected"), [(80.0, 5.0), (0.0, None)])
def test_the_proxy_cpu_as_a_multiple_of_the_forwarders(
    bare_cpu: float, expected: float | None
) -> None:
    rows = summarize([_run("direct", None), _run("bare", bare_cpu), _run("proxy", 400.0)])
    (proxy,) = [row for row in rows if row["target"] == "proxy"]
    assert proxy.get("cpu_times_bare") == expected  # a forwarder too quick to measure: none
