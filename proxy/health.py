"""Link health: when a connection may carry traffic, and when it must be dropped.

A link is judged by network-management echoes (0800, field 70 = 301), not by whether its
socket is open: a switch can accept connections and answer nothing, or answer echoes and
time out every transaction. Each TCP connection gets a fresh `LinkHealth`:

- it starts on probation (CONNECTING) and becomes UP after `rise` echoes in a row are
  answered with RC 00;
- `fall` failed echoes in a row (no 0810 within `echo_timeout`, or an RC other than 00)
  drop it, whether on probation or up. After a failed echo the next one leaves at once,
  so a switch that stops answering is dropped within echo_interval + echo_timeout x fall;
- while UP, `timeout_threshold` transactions in a row without an answer drop it too;
  any answered transaction resets that count.

A dropped connection is closed; the link reconnects with backoff and starts on probation
again. Only UP links carry traffic.
"""

from __future__ import annotations

from enum import StrEnum

from proxy.config import HealthConfig


class LinkState(StrEnum):
    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"


class Verdict(StrEnum):
    KEEP = "keep"
    UP = "up"
    DROP = "drop"


class LinkHealth:
    """The judgment of one connection, from its echo and transaction results."""

    def __init__(self, config: HealthConfig) -> None:
        self._config = config
        self.state = LinkState.CONNECTING
        self._good_echoes = 0
        self._bad_echoes = 0
        self._timeouts = 0

    def echo(self, approved: bool) -> Verdict:
        if not approved:
            self._good_echoes = 0
            self._bad_echoes += 1
            return Verdict.DROP if self._bad_echoes >= self._config.fall else Verdict.KEEP
        self._bad_echoes = 0
        self._good_echoes += 1
        if self.state is LinkState.CONNECTING and self._good_echoes >= self._config.rise:
            self.state = LinkState.UP
            return Verdict.UP
        return Verdict.KEEP

    def transaction(self, answered: bool) -> Verdict:
        if answered:
            self._timeouts = 0
            return Verdict.KEEP
        if self.state is not LinkState.UP:
            return Verdict.KEEP
        self._timeouts += 1
        return Verdict.DROP if self._timeouts >= self._config.timeout_threshold else Verdict.KEEP

    def next_echo_in(self) -> float:
        """Seconds to the next echo: none after a failure, shorter while on probation."""
        if self._bad_echoes:
            return 0.0
        if self.state is LinkState.UP:
            return self._config.echo_interval
        return min(self._config.rise_interval, self._config.echo_interval)
