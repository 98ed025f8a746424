"""The CPU regression check: the proxy's CPU per transaction at saturation, relative to
what the simulated switch spends per transaction when the same load goes straight at it,
in the same run, against the ratio recorded in bench/baseline.json.

    python -m bench.regression [--record] [--dsn DSN]

Measures like the benchmark (real processes, journal on): `RUNS` closed-loop runs
straight at a simulated switch and through the proxy, interleaved, and keeps the lowest
figure of each. CPU time rather than wall time, since the machine is shared; and the
ratio rather than the proxy's figure alone, since machines of one kind differ by 2x and
more. The switch is the yardstick because it does the proxy's kind of work (trio,
sockets, pyiso8583, waking for every batch of frames) on the same machine at the same
time, without any of the proxy's own code: where a machine's wake-ups are dear, both
pay. Exits 1 when the ratio is more than `TOLERANCE` above the recorded one `ATTEMPTS`
times running; `--record` writes the median of `RECORDINGS` measurements.

The baseline names the simulated switch it was measured with (a digest of the bytes of
fixtures/sim_switch.py, the switch's own code; not the codec or trio it shares with the
proxy, which move both halves of the ratio): a cheaper switch raises the ratio as a
dearer proxy would, so once that file changes, even by a comment, the check refuses to run
(exit 2) until the baseline is recorded again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio

from bench.cast import Cast, database, running_cast
from bench.processes import machine, measured, until_signalled

BASELINE = Path(__file__).with_name("baseline.json")
YARDSTICK = Path(__file__).parent.parent / "fixtures" / "sim_switch.py"
TOLERANCE = 1.30
RUNS = 5
# A measurement above the limit is taken again, up to ATTEMPTS in all: on the ninth
# machine one in three or so read above it with no regression (5.02 against a limit of
# 4.75, then 3.81), so three could all be unlucky a few times in a hundred CI runs.
ATTEMPTS = 5
RECORDINGS = 3
DURATION = 3.0
CONNECTIONS = 50


async def _cpu_per_transaction(cast: Cast, port: int, pid: int) -> float:
    """CPU microseconds process `pid` spends per transaction of a closed-loop run at
    `port`."""
    with measured(pid) as cost:
        summary = await cast.load(port, CONNECTIONS, DURATION)
    if not summary["sent"] or summary["approved"] != summary["sent"]:
        raise RuntimeError(f"the load saw failures: {summary}")
    return float(cost["cpu_s"] * 1e6 / summary["answered"])


async def proxy_cpu_per_transaction(dsn: str) -> dict[str, Any]:
    """The lowest CPU per transaction (microseconds) of the proxy and of the switch taking
    the load directly, over `RUNS` interleaved runs each, and their ratio (the figure
    checked)."""
    proxy, switch = [], []
    async with running_cast(dsn) as cast:
        await cast.load(cast.proxy.port, CONNECTIONS, 1.0)  # warm up
        for _ in range(RUNS):
            switch.append(await _cpu_per_transaction(cast, cast.switch.port, cast.switch.pid))
            proxy.append(await _cpu_per_transaction(cast, cast.proxy.port, cast.proxy.pid))
    return {
        "ratio": round(min(proxy) / min(switch), 3),
        "proxy_cpu_us_per_txn": round(min(proxy), 1),
        "switch_cpu_us_per_txn": round(min(switch), 1),
        "proxy_runs": [round(f) for f in proxy],
        "switch_runs": [round(f) for f in switch],
    }


class StaleBaseline(Exception):
    """The baseline was measured with another simulated switch: its ratio says nothing."""


def yardstick() -> str:
    """A digest of the simulated switch's source, the yardstick's own code."""
    return hashlib.sha256(YARDSTICK.read_bytes()).hexdigest()[:16]


async def check(dsn: str) -> tuple[bool, list[dict[str, Any]]]:
    """Whether the proxy is within `TOLERANCE` of the recorded ratio, and the
    measurements. A ratio above the limit is measured again (up to `ATTEMPTS` in all): a
    regression is there every time, a busy machine is not. StaleBaseline when the
    simulated switch is not the one the baseline was measured with."""
    limit = recorded() * TOLERANCE
    found = []
    for _ in range(ATTEMPTS):
        found.append(await proxy_cpu_per_transaction(dsn))
        if found[-1]["ratio"] <= limit:
            return True, found
    return False, found


async def measure_repeatedly(dsn: str) -> list[dict[str, Any]]:
    """`RECORDINGS` measurements, for recording the typical one."""
    return [await proxy_cpu_per_transaction(dsn) for _ in range(RECORDINGS)]


def recorded() -> float:
    """The recorded ratio of the proxy's CPU per transaction to the switch's; StaleBaseline
    when the simulated switch has changed since."""
    baseline = json.loads(BASELINE.read_text())
    if baseline.get("yardstick") != yardstick():
        raise StaleBaseline(
            f"{YARDSTICK.name} changed since {BASELINE.name} was recorded (a cheaper or "
            "dearer switch moves the ratio as the proxy would): record it again with "
            "`python -m bench.regression --record`"
        )
    ratio: float = baseline["ratio"]
    return ratio


def describe(found: list[dict[str, Any]]) -> str:
    """The measurements, for a person: each ratio with the figures it came from."""
    return "; ".join(
        f"ratio {f['ratio']} (proxy {f['proxy_cpu_us_per_txn']} / switch "
        f"{f['switch_cpu_us_per_txn']} us/txn)"
        for f in found
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.regression", description=__doc__)
    parser.add_argument("--dsn", help="PostgreSQL for the journal (as for python -m bench)")
    parser.add_argument("--record", action="store_true", help="write bench/baseline.json")
    args = parser.parse_args(argv)
    if not args.record:
        try:
            recorded()
        except StaleBaseline as error:
            print(f"python -m bench.regression: {error}", file=sys.stderr)
            return 2
    dsn = database(args.dsn)
    if args.record:
        found = trio.run(until_signalled, partial(measure_repeatedly, dsn))
        typical = sorted(found, key=lambda f: float(f["ratio"]))[len(found) // 2]
        BASELINE.write_text(
            json.dumps(
                {
                    **typical,
                    "ratios_measured": [f["ratio"] for f in found],
                    "yardstick": yardstick(),
                    "date": datetime.now(UTC).date().isoformat(),
                    "machine": machine(),
                    "method": f"min of {RUNS} closed-loop runs of {DURATION:g} s, "
                    f"{CONNECTIONS} connections, journal on, through the proxy and (interleaved) "
                    "straight at a simulated switch; ratio = proxy us/txn / switch us/txn "
                    f"(direct); the median of {RECORDINGS} such",
                },
                indent=2,
            )
            + "\n"
        )
        print(f"recorded ratio {typical['ratio']} in {BASELINE}: {describe(found)}")
        return 0
    ok, found = trio.run(until_signalled, partial(check, dsn))
    verdict = "ok" if ok else "REGRESSION"
    print(f"{describe(found)}; limit {recorded() * TOLERANCE:.3f}: {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
