"""The benchmark: the proxy against a direct connection to the same simulated switch.

    python -m bench [--quick] [--out bench-results] [--dsn DSN] [--repeats 3]
                    [--rates 500,1000,2000,4000] [--duration 6] [--connections 50]
                    [--idle 10000]

Starts two simulated switches, the proxy as its own process with a real config (journal,
health checks and metrics on; the database from --dsn, ISO_PROXY_TEST_DSN or
ISO_PROXY_DSN, else the embedded PostgreSQL), then runs the load generator
(`bench.load`, its own process) at each fixed rate (open loop) and as fast as answers come
(closed loop), straight at a switch (the baseline) and through the proxy, interleaved,
`--repeats` times; the closed loop also through a bare trio byte forwarder
(`fixtures.bare_forwarder`), whose CPU a transaction is the yardstick for the proxy's.
Then, with `--idle` terminal connections held open, an active client at 2000 TPS. Prints
a table of the medians; writes `results.json` (every run and the medians) and, when
matplotlib is installed, `latency.png` to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio

from bench.cast import Cast, database, journal_rows, running_cast, wait_admitted
from bench.processes import machine, measured, rss_bytes, until_signalled
from bench.report import plot, summarize, table

IDLE_ACTIVE_RATE = 2000.0
TARGETS_CLOSED = ("direct", "bare", "proxy")  # the bare forwarder: closed loop only


@dataclass(frozen=True)
class Plan:
    rates: tuple[float, ...]
    duration: float
    repeats: int
    connections: int
    idle: int
    out: Path


async def run_case(
    cast: Cast, plan: Plan, target: str, rate: float | None, repeat: int
) -> dict[str, Any]:
    """One load run, straight at the switch, through the bare forwarder or through the
    proxy, with what it cost."""
    middle = cast.forwarder if target == "bare" else cast.proxy  # its CPU: bare and proxy
    port = cast.switch.port if target == "direct" else middle.port
    rows_before = await journal_rows(cast)
    with measured(middle.pid, [switch.pid for switch in cast.switches]) as cost:
        summary = await cast.load(port, plan.connections, plan.duration, rate)
    rows = await journal_rows(cast) - rows_before
    answered = max(1, summary["answered"])
    result = {
        **summary,
        "target": target,
        "repeat": repeat,
        "proxy_rss_mb": round(rss_bytes(cast.proxy.pid) / 2**20, 1),
        "journal_rows": rows,
        # The rest of the box's CPU a transaction: what caps the ceiling here.
        "switches_cpu_us_per_txn": round(cost["switches_cpu_s"] * 1e6 / answered, 1),
        "load_cpu_us_per_txn": round(summary["cpu_s"] * 1e6 / answered, 1),
    }
    if target == "bare":
        result["forwarder_cpu_us_per_txn"] = round(cost["cpu_s"] * 1e6 / answered, 1)
    if target == "proxy":
        result["proxy_cpu_us_per_txn"] = round(cost["cpu_s"] * 1e6 / answered, 1)
        result["postgres_cpu_us_per_row"] = round(cost["postgres_cpu_s"] * 1e6 / max(1, rows), 1)
    print(
        f"  {target:<6} {_rate_name(rate):>7}: {summary['throughput_tps']:>8.0f} tps, "
        f"p99 {summary['latency_ms']['p99']:.2f} ms",
        file=sys.stderr,
    )
    return result


async def run_idle(cast: Cast, plan: Plan) -> dict[str, Any]:
    """RSS with `plan.idle` idle terminals connected, and an active client's latency."""
    rss_before = rss_bytes(cast.proxy.pid)
    # The flood fixture opens them (no verdict wait: each counts as held) and holds them
    # until its stdin closes.
    argv = [sys.executable, "-m", "fixtures.flood", "127.0.0.1", str(cast.proxy.port)]
    argv += [str(plan.idle), "--verdict", "0", "--hold", "inf"]
    holder = await trio.lowlevel.open_process(argv, stdin=-1, stdout=-1)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        with trio.fail_after(300):
            line = b""
            while not line.endswith(b"\n"):
                chunk = await holder.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError("the idle connections' holder ended before it reported")
                line += chunk
        held = json.loads(line)
        await wait_admitted(cast, held["opened"])  # opened is not yet admitted by the proxy
        rss_idle = rss_bytes(cast.proxy.pid)
        active = await cast.load(cast.proxy.port, plan.connections, plan.duration, IDLE_ACTIVE_RATE)
        rss_active = rss_bytes(cast.proxy.pid)
        await holder.stdin.aclose()
        with trio.fail_after(60):
            await holder.wait()
    finally:
        if holder.returncode is None:
            holder.kill()
    return {
        "idle_connections": held["opened"],
        "idle_failed": held["errors"],
        "proxy_rss_mb_before": round(rss_before / 2**20, 1),
        "proxy_rss_mb_idle": round(rss_idle / 2**20, 1),
        "proxy_rss_mb_active": round(rss_active / 2**20, 1),
        "active": active,
    }


def _rate_name(rate: float | None) -> str:
    return "closed" if rate is None else f"{rate:g}"


async def run(plan: Plan, dsn: str) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    idle = None
    async with running_cast(dsn) as cast:
        await cast.load(cast.proxy.port, plan.connections, 2.0)  # warm up: links, pool, caches
        for repeat in range(1, plan.repeats + 1):
            print(f"repeat {repeat}/{plan.repeats}", file=sys.stderr)
            for rate in (*plan.rates, None):
                for target in ("direct", "proxy") if rate is not None else TARGETS_CLOSED:
                    runs.append(await run_case(cast, plan, target, rate, repeat))
        if plan.idle:
            print(f"{plan.idle} idle connections", file=sys.stderr)
            idle = await run_idle(cast, plan)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "plan": {
            "rates": plan.rates,
            "duration_s": plan.duration,
            "repeats": plan.repeats,
            "connections": plan.connections,
            "idle": plan.idle,
        },
        "runs": runs,
        "medians": summarize(runs),
        "idle": idle,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--dsn", help="PostgreSQL for the journal (default: see above)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--rates", default="500,1000,2000,4000", help="open-loop TPS, commas")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--idle", type=int, default=10_000, help="0: skip the idle run")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 3 s runs, 1000 idle")
    args = parser.parse_args(argv)
    plan = Plan(
        rates=tuple(float(r) for r in args.rates.split(",") if r),
        duration=3.0 if args.quick else args.duration,
        repeats=1 if args.quick else args.repeats,
        connections=args.connections,
        idle=min(args.idle, 1000) if args.quick else args.idle,
        out=args.out,
    )
    dsn = database(args.dsn)
    result = trio.run(until_signalled, partial(run, plan, dsn))
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "results.json").write_text(json_text(result))
    print(table(result))
    picture = plot(result, plan.out / "latency.png")
    print(f"\nwrote {plan.out / 'results.json'}" + (f" and {picture}" if picture else ""))
    return 0


def json_text(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2) + "\n"


if __name__ == "__main__":
    sys.exit(main())
