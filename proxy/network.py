"""Network-management messages the proxy sends to switches, and its own STAN sequence."""

from __future__ import annotations

from datetime import datetime

from codec import Message, Mti

ECHO = "301"
SIGN_ON = "001"
SIGN_OFF = "002"
_REQUEST = Mti.parse("0800")
_MAX_STAN = 999_999


class StanSequence:
    """STANs for the proxy's own 0800s: 000001 to 999999, then round again.

    They cannot collide with a terminal's: terminals' 0800s are answered by the proxy and
    never forwarded, and a switch's 0810 answers go to the link that asked, not to the pool.
    """

    def __init__(self, start: int = 1) -> None:
        self._next = (start - 1) % _MAX_STAN + 1

    def __iter__(self) -> StanSequence:
        return self

    def __next__(self) -> str:
        stan = self._next
        self._next = stan % _MAX_STAN + 1
        return f"{stan:06d}"


def network_request(code: str, stan: str, now: datetime) -> Message:
    """An 0800 with field 70 = `code` (301 echo, 001 sign-on, 002 sign-off)."""
    return Message(_REQUEST, {"7": now.strftime("%m%d%H%M%S"), "11": stan, "70": code})
