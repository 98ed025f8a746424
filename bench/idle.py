"""Idle terminal connections: open many, hold them until stdin closes.

    python -m bench.idle HOST PORT COUNT

Prints one JSON line (`{"opened": N, "failed": K}`) once every connection was tried, then
holds the open ones, sending nothing, until its standard input closes.
"""

from __future__ import annotations

import argparse
import json
import sys

import trio

from fixtures.flood import raise_fd_limit

CONCURRENCY = 200


async def hold(host: str, port: int, count: int) -> None:
    opened: list[trio.SocketStream] = []
    failed = 0
    limit = trio.CapacityLimiter(CONCURRENCY)

    async def one() -> None:
        nonlocal failed
        async with limit:
            try:
                opened.append(await trio.open_tcp_stream(host, port))
            except OSError:
                failed += 1

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    print(json.dumps({"opened": len(opened), "failed": failed}), flush=True)
    await trio.to_thread.run_sync(sys.stdin.read)
    for stream in opened:
        await stream.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__)
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("count", type=int)
    args = parser.parse_args(argv)
    raise_fd_limit()
    trio.run(hold, args.host, args.port, args.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
