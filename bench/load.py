"""A load generator: many terminal connections, one request in flight on each.

    python -m bench.load HOST PORT [--connections 50] [--rate TPS | --closed] [--duration S]

Open loop (`--rate`): request k of connection i is due at start + (k * connections + i) /
rate; a request that cannot go out on time (its connection still waits for the previous
answer) goes as soon as it can, and its latency counts from when it was due, so a slow
server is not excused by the generator waiting for it. Closed loop (`--closed`): each
connection sends its next request as soon as the last is answered.

Every request is a purchase with the test PAN and a unique key (terminal ids carry a random
run tag): a journal sees no duplicates across runs. Requests are spliced from one encoded
template (STAN and RRN bytes replaced), so the generator spends little CPU of its own.
Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import secrets
import string
import sys
import time
from array import array
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

import trio

from codec import Frame, FrameFormat, Framer, decode, encode, encode_frame, load_spec
from fixtures.messages import financial

READ_SIZE = 65536
ANSWER_TIMEOUT = 10.0  # a request unanswered this long counts as a timeout
_TAG_ALPHABET = string.ascii_uppercase + string.digits


class Template:
    """Encoded purchases of one terminal that differ only in STAN and RRN."""

    def __init__(self, terminal: str) -> None:
        self._spec = load_spec("default")
        self._format = FrameFormat()
        moment = datetime.now(UTC)
        first = self._frame(terminal, 111_111, moment)
        second = self._frame(terminal, 222_222, moment)
        self._bytes = bytearray(first)
        self._stan_at = [i for i, (a, b) in enumerate(zip(first, second, strict=True)) if a != b]

    def _frame(self, terminal: str, stan: int, moment: datetime) -> bytes:
        message = financial(stan, terminal, when=moment)
        return encode_frame(self._format, Frame(encode(message, self._spec)))

    def request(self, stan: int) -> bytes:
        """The frame of the purchase with this STAN (RRN digits follow the STAN)."""
        digits = f"{stan:06d}".encode()
        for n, at in enumerate(self._stan_at):
            self._bytes[at] = digits[n % 6]
        return bytes(self._bytes)


@dataclass
class Tally:
    latencies: array[float]
    codes: Counter[str]
    sent: int = 0
    unsent: int = 0  # due before the end but never sent (the server was too slow)
    timeouts: int = 0
    broken: int = 0


async def _terminal(
    host: str,
    port: int,
    terminal: str,
    due: list[float] | None,
    stop_at: float,
    tally: Tally,
) -> None:
    """One connection: send, wait for the answer, record; until `stop_at` (or `due` ends)."""
    spec = load_spec("default")
    template = Template(terminal)
    framer = Framer(FrameFormat())
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError:
        tally.broken += 1
        return
    async with stream:
        schedule = due if due is not None else itertools.repeat(0.0)
        for stan, when in enumerate(schedule, start=1):
            now = trio.current_time()
            if now >= stop_at:
                if due is not None:
                    tally.unsent += sum(1 for later in due[stan - 1 :] if later < stop_at)
                return
            if due is not None and when > now:
                await trio.sleep_until(when)
            started = when if due is not None else trio.current_time()
            try:
                await stream.send_all(template.request(stan))
                tally.sent += 1
                frame = None
                with trio.move_on_after(ANSWER_TIMEOUT):
                    while (frame := framer.next_frame()) is None:
                        data = await stream.receive_some(READ_SIZE)
                        if not data:
                            tally.broken += 1
                            return
                        framer.feed(data)
                if frame is None:
                    tally.timeouts += 1
                    return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                tally.broken += 1
                return
            tally.latencies.append(trio.current_time() - started)
            tally.codes[decode(frame.message, spec).get("39") or "none"] += 1


def percentile(ordered: list[float], fraction: float) -> float:
    """The nearest-rank percentile of an ascending list (0.0 when empty)."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


async def run_load(
    host: str,
    port: int,
    *,
    connections: int,
    rate: float | None,
    duration: float,
    tag: str | None = None,
) -> dict[str, object]:
    """Run one load case; its summary (what `python -m bench.load` prints)."""
    tag = tag or "".join(secrets.choice(_TAG_ALPHABET) for _ in range(3))
    tally = Tally(array("d"), Counter())
    cpu_started = time.process_time()
    started = trio.current_time() + 0.2  # time for every connection to open
    stop_at = started + duration
    async with trio.open_nursery() as nursery:
        for i in range(connections):
            due = None
            if rate is not None:
                each = int(rate * duration) // connections + 1
                due = [started + (k * connections + i) / rate for k in range(each)]
            nursery.start_soon(_terminal, host, port, f"L{tag}{i:04d}", due, stop_at, tally)
    elapsed = max(1e-9, trio.current_time() - started)
    ordered = sorted(tally.latencies)
    answered = len(ordered)
    return {
        "mode": "open" if rate is not None else "closed",
        "target_tps": rate,
        "connections": connections,
        "duration_s": round(elapsed, 3),
        "sent": tally.sent,
        "unsent": tally.unsent,
        "answered": answered,
        "approved": tally.codes.get("00", 0),
        "codes": dict(tally.codes),
        "timeouts": tally.timeouts,
        "broken": tally.broken,
        "throughput_tps": round(answered / min(elapsed, duration), 1),
        "cpu_s": round(time.process_time() - cpu_started, 4),  # the generator's own
        "latency_ms": {
            name: round(percentile(ordered, q) * 1000, 3)
            for name, q in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999), ("max", 1.0))
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--connections", type=int, default=50)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=float, help="open loop at this many requests a second")
    mode.add_argument("--closed", action="store_true", help="closed loop: as fast as answered")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--tag", help="3 characters for the terminal ids (default: random)")
    args = parser.parse_args(argv)
    if not 1 <= args.connections <= 9999:
        parser.error("--connections must be 1..9999")
    summary = trio.run(
        lambda: run_load(
            args.host,
            args.port,
            connections=args.connections,
            rate=args.rate,
            duration=args.duration,
            tag=args.tag,
        )
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
