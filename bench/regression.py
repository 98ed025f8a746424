"""The CPU regression check: proxy CPU per transaction at saturation, against the figure
recorded in bench/baseline.json.

    python -m bench.regression [--record] [--dsn DSN]

Measures like the benchmark (real processes, journal on), closed loop, `RUNS` short runs,
and keeps the lowest figure, the most repeatable one here (about ±7 % from check to
check, where single runs move ±15 %). CPU time rather than wall time, since the machine is
shared; the figure still depends on the machine (and, through batch sizes, on load), so
the recorded one is for this machine kind, which CI runs on. Exits 1 when it is more than
`TOLERANCE` above the recorded one `ATTEMPTS` times running; `--record` writes the new
figure instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio

from bench.cast import database, running_cast
from bench.processes import machine, measured, run_json, until_signalled

BASELINE = Path(__file__).with_name("baseline.json")
TOLERANCE = 1.30
RUNS = 3
ATTEMPTS = 3
DURATION = 3.0
CONNECTIONS = 50


async def proxy_cpu_per_transaction(dsn: str) -> dict[str, Any]:
    """The lowest proxy CPU (microseconds per transaction) over `RUNS` closed-loop runs."""
    figures = []
    async with running_cast(dsn) as cast:
        load = ["bench.load", "127.0.0.1", str(cast.proxy.port), "--closed"]
        load += ["--connections", str(CONNECTIONS)]
        await run_json([*load, "--duration", "1", "--tag", cast.next_tag()])  # warm up
        for _ in range(RUNS):
            with measured(cast.proxy.pid) as cost:
                summary = await run_json(
                    [*load, "--duration", str(DURATION), "--tag", cast.next_tag()]
                )
            if not summary["sent"] or summary["approved"] != summary["sent"]:
                raise RuntimeError(f"the load saw failures: {summary}")
            figures.append(cost["cpu_s"] * 1e6 / summary["answered"])
    return {"proxy_cpu_us_per_txn": round(min(figures), 1), "runs": [round(f) for f in figures]}


async def check(dsn: str) -> tuple[bool, list[dict[str, Any]]]:
    """Whether the proxy is within `TOLERANCE` of the recorded figure, and the measurements.
    A figure above the limit is measured again (up to `ATTEMPTS` in all): a regression is
    there every time, a busy machine is not."""
    limit = recorded() * TOLERANCE
    found = []
    for _ in range(ATTEMPTS):
        found.append(await proxy_cpu_per_transaction(dsn))
        if found[-1]["proxy_cpu_us_per_txn"] <= limit:
            return True, found
    return False, found


def recorded() -> float:
    figure: float = json.loads(BASELINE.read_text())["proxy_cpu_us_per_txn"]
    return figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.regression", description=__doc__)
    parser.add_argument("--dsn", help="PostgreSQL for the journal (as for python -m bench)")
    parser.add_argument("--record", action="store_true", help="write bench/baseline.json")
    args = parser.parse_args(argv)
    dsn = database(args.dsn)
    if args.record:
        measured_now = trio.run(until_signalled, partial(proxy_cpu_per_transaction, dsn))
        figure = measured_now["proxy_cpu_us_per_txn"]
        BASELINE.write_text(
            json.dumps(
                {
                    **measured_now,
                    "date": datetime.now(UTC).date().isoformat(),
                    "machine": machine(),
                    "method": f"min of {RUNS} closed-loop runs of {DURATION:g} s, "
                    f"{CONNECTIONS} connections, journal on",
                },
                indent=2,
            )
            + "\n"
        )
        print(f"recorded {figure} us/txn in {BASELINE}")
        return 0
    ok, found = trio.run(until_signalled, partial(check, dsn))
    figures = [f["proxy_cpu_us_per_txn"] for f in found]
    verdict = "ok" if ok else "REGRESSION"
    print(f"proxy CPU {figures} us/txn; limit {recorded() * TOLERANCE:.0f}: {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
