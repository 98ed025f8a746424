"""`iso-proxy demo`: the whole system on one machine, with nothing to set up.

An embedded PostgreSQL, two simulated switches (beta answers a little later), the proxy on
port 6000 with its admin server on 9100, a gentle stream of sample traffic (approvals, a
decline, a duplicate, a repeat, an echo) and a live table of what each switch is doing.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import trio

from codec import FrameFormat, Message, Mti, load_spec
from fixtures.messages import echo, financial
from fixtures.sim_switch import SimSwitch, SimSwitchOptions
from fixtures.terminal import Terminal
from proxy.app import App, Secrets
from proxy.config import Config, parse_config

PAN_KEY = b"demo-only-pan-key-not-a-secret"
SLOWER_BY = 0.05  # seconds beta adds to each answer
DECLINE_OVER = 100_000  # the switches decline amounts above 1000.00 (RC 51)
PACE = 0.7  # seconds between sample messages
REFRESH = 1.0  # seconds between tables on a terminal (5x that when output is a file)


@dataclass(frozen=True)
class DemoPlan:
    port: int
    admin_port: int
    traffic: bool
    dsn: str


def demo_config(plan: DemoPlan, switch_ports: dict[str, int]) -> Config:
    """The proxy's config: loopback only, journal on, echoes often enough to watch."""
    return parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": plan.port},
            "switches": [
                {"name": name, "host": "127.0.0.1", "port": port, "connections": 2, "timeout": 10}
                for name, port in switch_ports.items()
            ],
            "health": {"echo_interval": 3, "echo_timeout": 1, "rise_interval": 0.2},
            "store": {"dsn": plan.dsn},
            "admin": {"host": "127.0.0.1", "port": plan.admin_port},
            "log": {"level": "WARNING"},
        },
        base_dir=Path.cwd(),
    )


async def run_demo(plan: DemoPlan, out: TextIO = sys.stdout) -> None:
    """Run everything until cancelled (Ctrl-C)."""
    async with trio.open_nursery() as nursery:
        ports = {}
        for name, delay in (("alpha", 0.0), ("beta", SLOWER_BY)):
            switch = SimSwitch(
                SimSwitchOptions(delay=delay, decline_over=DECLINE_OVER, record_limit=0)
            )
            ports[name] = await nursery.start(switch.run)
        app = App(demo_config(plan, ports), Secrets(pan_key=PAN_KEY))
        port = await nursery.start(app.run)
        if plan.traffic:
            nursery.start_soon(sample_traffic, port)
        nursery.start_soon(show, app, plan, out)


async def sample_traffic(port: int) -> None:
    """One terminal, a purchase or so a second: approvals, a decline, a duplicate (the same
    request again: answered from the journal), a repeat (0201: the same), an echo."""
    terminal = await Terminal.connect("127.0.0.1", port, FrameFormat(), load_spec("default"))
    # A terminal id of this run's own: the journal outlives runs, and a key seen before
    # would be answered from it instead of going to a switch.
    terminal_id = f"D{int(time.time()) % 10**7:07d}"
    stans = itertools.count(1)
    last: Message | None = None
    async with terminal.stream:
        for step in itertools.cycle(
            ("buy", "buy", "decline", "duplicate", "buy", "repeat", "echo")
        ):
            await trio.sleep(PACE)
            stan = next(stans) % 1_000_000
            if step == "echo":
                await terminal.request(echo(stan))
            elif step == "duplicate" and last is not None:
                await terminal.request(last)
            elif step == "repeat" and last is not None:
                await terminal.request(last.with_fields({}, mti=Mti.parse("0201")))
            else:
                amount = DECLINE_OVER * 3 if step == "decline" else 1000 + stan * 37 % 9000
                last = financial(stan, terminal_id, amount=amount)
                await terminal.request(last)


async def show(app: App, plan: DemoPlan, out: TextIO) -> None:
    """Redraw the table in place on a terminal; print it now and then to a file."""
    live = out.isatty()
    while True:
        lines = table(app, plan)
        if live:
            out.write("\x1b[H\x1b[J")  # cursor home, clear to the end
        out.write("\n".join(lines) + "\n\n")
        out.flush()
        await trio.sleep(REFRESH if live else REFRESH * 5)


def table(app: App, plan: DemoPlan) -> list[str]:
    """Per switch: state, links up, last echo round trip, transactions and their RCs."""
    counts: Counter[str] = Counter()
    codes: dict[str, Counter[str]] = {}
    for (switch, _mti, rc), n in app.forwarder.transactions.items():
        counts[switch] += n
        codes.setdefault(switch, Counter())[rc] += n
    lines = [
        f"iso-proxy demo: terminals on 127.0.0.1:{plan.port}, "
        f"admin http://127.0.0.1:{plan.admin_port}/status (Ctrl-C stops)",
        "",
        f"{'switch':<8}{'state':<7}{'links up':>9}{'echo ms':>9}{'txns':>7}  RCs",
    ]
    for name, links in app.pool.links.items():
        up = sum(link.is_up for link in links)
        rtts = [link.echo_rtts[-1] for link in links if link.echo_rtts]
        echo_ms = f"{min(rtts) * 1000:.2f}" if rtts else "-"
        rcs = " ".join(f"{rc}:{n}" for rc, n in sorted(codes.get(name, Counter()).items()))
        lines.append(
            f"{name:<8}{'up' if up else 'down':<7}{f'{up}/{len(links)}':>9}{echo_ms:>9}"
            f"{counts[name]:>7}  {rcs or '-'}"
        )
    duplicates = ", ".join(f"{a.value} {n}" for a, n in sorted(app.forwarder.duplicates.items()))
    lines += [
        "",
        f"answered from the journal (duplicates, repeats): {duplicates or 'none yet'}",
        f"terminal connections: {app.server.connections}; "
        f"ready: {'yes' if not app.readiness() else ', '.join(app.readiness())}",
    ]
    return lines
