"""Prometheus metrics, read from the live services when scraped (nothing on the hot path).

Labels are bounded: switch, link, state, action, reason. Never a STAN, RRN or PAN.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy.access import Rejection
from proxy.forwarder import Forwarder
from proxy.health import LinkState
from proxy.latency import Histogram
from proxy.pool import Pool
from proxy.reversals import ReversalWorker
from proxy.server import Server


class ProxyCollector(Collector):
    """Gauges and counters of the pool, the server, the journal and the reversal worker."""

    def __init__(
        self,
        pool: Pool,
        server: Server,
        forwarder: Forwarder,
        reversals: ReversalWorker | None,
    ) -> None:
        self._pool = pool
        self._server = server
        self._forwarder = forwarder
        self._reversals = reversals

    def collect(self) -> Iterator[Metric]:
        switch_up = GaugeMetricFamily(
            "isoproxy_switch_up", "1 when at least one link of the switch is up", labels=["switch"]
        )
        link_state = GaugeMetricFamily(
            "isoproxy_link_state",
            "1 for the state each link is in",
            labels=["switch", "link", "state"],
        )
        inflight = GaugeMetricFamily(
            "isoproxy_inflight",
            "Requests written to the switch, not yet answered",
            labels=["switch"],
        )
        for name, links in self._pool.links.items():
            switch_up.add_metric([name], float(any(link.is_up for link in links)))
            inflight.add_metric([name], float(sum(self._pool.in_flight(link) for link in links)))
            for link in links:
                for state in LinkState:
                    link_state.add_metric(
                        [name, link.name, state.value], float(link.state is state)
                    )
        yield switch_up
        yield link_state
        yield inflight
        echo = HistogramMetricFamily(
            "isoproxy_echo_latency_seconds", "Echo round trips, per switch", labels=["switch"]
        )
        for name, links in self._pool.links.items():
            merged = Histogram()
            for link in links:
                merged.merge(link.echo_histogram)
            echo.add_metric([name], merged.cumulative(), merged.total)
        yield echo
        upstream = HistogramMetricFamily(
            "isoproxy_upstream_latency_seconds",
            "Switch answer times (write to answer), per switch and MTI",
            labels=["switch", "mti"],
        )
        for (switch, mti), histogram in sorted(self._forwarder.upstream_latency.items()):
            upstream.add_metric([switch, mti], histogram.cumulative(), histogram.total)
        yield upstream
        duration = HistogramMetricFamily(
            "isoproxy_request_duration_seconds",
            "Whole path as the terminal sees it, per request MTI",
            labels=["mti"],
        )
        for mti, histogram in sorted(self._forwarder.request_duration.items()):
            duration.add_metric([mti], histogram.cumulative(), histogram.total)
        yield duration
        transactions = CounterMetricFamily(
            "isoproxy_transactions",
            "Answers to terminals' forwarded requests, by switch (empty: none took it), MTI, RC",
            labels=["switch", "mti", "rc"],
        )
        for (switch, mti, rc), count in sorted(self._forwarder.transactions.items()):
            transactions.add_metric([switch, mti, rc], float(count))
        yield transactions
        timeouts = CounterMetricFamily(
            "isoproxy_timeouts", "Requests without an answer by the deadline", labels=["switch"]
        )
        for switch, count in sorted(self._forwarder.timeouts.items()):
            timeouts.add_metric([switch], float(count))
        yield timeouts
        rejections = CounterMetricFamily(
            "isoproxy_rejections",
            "Connections and messages from terminals refused, by reason",
            labels=["reason"],
        )
        for reason in Rejection:
            rejections.add_metric([reason.value], float(self._server.rejections[reason]))
        yield rejections
        yield GaugeMetricFamily(
            "isoproxy_client_connections",
            "Terminal connections open",
            value=float(self._server.connections),
        )
        yield CounterMetricFamily(
            "isoproxy_late_responses",
            "Switch answers that came after their deadline (recorded, never delivered)",
            value=float(self._pool.late_count),
        )
        yield CounterMetricFamily(
            "isoproxy_unmatched_responses",
            "Switch answers that matched no request",
            value=float(self._pool.unmatched_count),
        )
        duplicates = CounterMetricFamily(
            "isoproxy_duplicates", "Duplicates answered without a switch", labels=["action"]
        )
        for action, count in sorted(self._forwarder.duplicates.items()):
            duplicates.add_metric([action.value], float(count))
        yield duplicates
        reversals = CounterMetricFamily(
            "isoproxy_reversals", "Reversal attempts recorded, by result", labels=["result"]
        )
        if self._reversals is not None:  # none without the journal
            reversals.add_metric(["acknowledged"], float(self._reversals.acknowledged))
            reversals.add_metric(["failed"], float(self._reversals.failed))
            reversals.add_metric(["tried"], float(self._reversals.tried))
        yield reversals
        yield CounterMetricFamily(
            "isoproxy_recovered",
            "Open claims closed by crash recovery (a reversal queued where due, once)",
            value=float(self._reversals.recovered if self._reversals is not None else 0),
        )


def registry_for(collector: Collector) -> CollectorRegistry:
    """A registry of this proxy's own (never the process-wide default: tests run several)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    return registry
