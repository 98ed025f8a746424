"""Link health: when a connection may carry traffic, and when it must be dropped.

A link is judged by network-management echoes (0800, field 70 = 301), not by whether its
socket is open: a switch can accept connections and answer nothing, or answer echoes and
time out every transaction. Each TCP connection gets a fresh `LinkHealth`:

- it starts on probation (CONNECTING) and becomes UP after `rise` echoes in a row are
  answered with RC 00;
- `fall` failed echoes in a row (no 0810 within `echo_timeout`, or an RC other than 00)
  drop it, whether on probation or up. After an unanswered echo the next one leaves at
  once (the timeout already spaced them), so a switch that goes silent is dropped within
  echo_interval + echo_timeout x fall; after a declined one it waits `rise_interval`, so a
  brief burst of refusals does not spend the whole `fall` budget in one instant;
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


class Echo(StrEnum):
    """How one echo went."""

    APPROVED = "approved"  # 0810 with RC 00
    DECLINED = "declined"  # 0810 with another RC, or it could not even be sent
    UNANSWERED = "unanswered"  # no 0810 within echo_timeout


class LinkHealth:
    """The judgment of one connection, from its echo and transaction results."""

    def __init__(self, config: HealthConfig) -> None:
        self._config = config
        self.state = LinkState.CONNECTING
        self._good_echoes = 0
        self._bad_echoes = 0
        self._last_echo = Echo.APPROVED
        self._timeouts = 0

    def echo(self, outcome: Echo) -> Verdict:
        self._last_echo = outcome
        if outcome is not Echo.APPROVED:
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
        """Seconds to the next echo: none after an unanswered one, shorter on probation or
        after a declined one."""
        if self._last_echo is Echo.UNANSWERED:
            return 0.0
        if self.state is LinkState.UP and self._last_echo is Echo.APPROVED:
            return self._config.echo_interval
        return min(self._config.rise_interval, self._config.echo_interval)
