"""A fixed piece of work whose CPU time says how fast this machine is right now, for the
regression check to measure the proxy against: the proxy's own kind of work, without the
proxy. Prints `{"cpu_ms": ...}`.

    python -m bench.calibration

Two parts, in one fresh process: pyiso8583 decoding and encoding (`CODEC_ROUNDS` answers
decoded, changed and encoded), and trio over sockets (`PAIRS` socket pairs exchanging
`EXCHANGES` small messages each way, all at once).
"""

from __future__ import annotations

import json
import time

import trio

from codec import decode, encode, load_spec
from fixtures.messages import financial

CODEC_ROUNDS = 3000
PAIRS = 20
EXCHANGES = 300


def _codec() -> None:
    spec = load_spec("default_ascii")
    raw = encode(financial(1).with_fields({"39": "00"}), spec)
    for _ in range(CODEC_ROUNDS):
        encode(decode(raw, spec).with_fields({"39": "05"}), spec)


async def _sockets() -> None:
    async def exchange() -> None:
        left, right = trio.socket.socketpair()
        with left, right:
            for _ in range(EXCHANGES):
                await left.send(b"q" * 150)
                await right.recv(4096)
                await right.send(b"a" * 150)
                await left.recv(4096)

    async with trio.open_nursery() as nursery:
        for _ in range(PAIRS):
            nursery.start_soon(exchange)


def cpu_ms() -> float:
    """CPU milliseconds the fixed work took."""
    started = time.process_time()
    _codec()
    trio.run(_sockets)
    return (time.process_time() - started) * 1000


if __name__ == "__main__":
    print(json.dumps({"cpu_ms": round(cpu_ms(), 1)}))
