"""`iso-proxy echo HOST:PORT`: an ops echo test, like ping, against the proxy or a switch."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import trio

from codec import CodecError, FrameFormat, Spec
from fixtures.terminal import Terminal
from proxy.decisions import APPROVED
from proxy.latency import percentile
from proxy.network import ECHO, StanSequence, network_request


@dataclass(frozen=True, slots=True)
class EchoPlan:
    """What to send: `count` echoes, `interval` seconds apart, each awaited `wait` seconds."""

    count: int
    interval: float
    wait: float
    framing: FrameFormat
    spec: Spec = field(repr=False)


@dataclass(frozen=True, slots=True)
class EchoResult:
    stan: str
    rc: str | None  # None: no answer in time
    rtt: float | None


@dataclass(frozen=True, slots=True)
class EchoSummary:
    sent: int
    answered: int
    approved: int
    rtts: tuple[float, ...]

    @property
    def loss(self) -> float:
        return 0.0 if not self.sent else 100.0 * (self.sent - self.answered) / self.sent

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.approved == self.sent

    def lines(self, target: str) -> list[str]:
        lines = [
            f"--- {target} echo statistics ---",
            f"{self.sent} sent, {self.answered} answered, {self.approved} approved, "
            f"{self.loss:.0f}% loss",
        ]
        if self.rtts:
            ms = [rtt * 1000 for rtt in self.rtts]
            lines.append(
                f"rtt min/avg/max/p99 = {min(ms):.2f}/{sum(ms) / len(ms):.2f}/"
                f"{max(ms):.2f}/{percentile(ms, 0.99):.2f} ms"
            )
        return lines


def summarize(results: list[EchoResult]) -> EchoSummary:
    answered = [r for r in results if r.rc is not None]
    return EchoSummary(
        sent=len(results),
        answered=len(answered),
        approved=sum(1 for r in answered if r.rc == APPROVED),
        rtts=tuple(r.rtt for r in answered if r.rtt is not None),
    )


async def echo(
    host: str, port: int, plan: EchoPlan, out: Callable[[str], None]
) -> list[EchoResult]:
    """Send the planned echoes on one connection; report each as it ends."""
    target = f"{host}:{port}"
    stans = StanSequence(random.randrange(1, 1_000_000))
    results: list[EchoResult] = []
    terminal = await Terminal.connect(host, port, plan.framing, plan.spec)
    async with terminal.stream:
        next_at = trio.current_time()
        for _ in range(plan.count):
            await trio.sleep_until(next_at)
            next_at += plan.interval
            stan = next(stans)
            started = trio.current_time()
            await terminal.send(network_request(ECHO, stan, datetime.now(UTC)))
            result = EchoResult(stan, None, None)
            with trio.move_on_after(plan.wait):
                while True:
                    reply = await terminal.receive()
                    if reply.mti.code == "0810" and reply.get("11") == stan:
                        result = EchoResult(stan, reply.get("39"), trio.current_time() - started)
                        break
            results.append(result)
            if result.rtt is None:
                out(f"no answer for stan={stan} within {plan.wait:g} s")
            else:
                ms = result.rtt * 1000
                out(f"0810 from {target}: stan={stan} rc={result.rc} time={ms:.2f} ms")
    return results


async def run_echo(host: str, port: int, plan: EchoPlan, out: Callable[[str], None]) -> bool:
    """The whole tool: a header, a line per echo, the summary. True when all were approved."""
    target = f"{host}:{port}"
    out(f"ECHO {target} ({plan.framing.prefix}, {plan.count} echoes, {plan.interval:g} s apart)")
    results: list[EchoResult] = []
    try:
        results = await echo(host, port, plan, out)
    except (OSError, EOFError, trio.BrokenResourceError) as exc:
        out(f"connection to {target} failed: {exc or type(exc).__name__}")
    except CodecError as exc:
        out(f"undecodable answer from {target}: {exc}")
    summary = summarize(results)
    for line in summary.lines(target):
        out(line)
    return summary.ok and summary.sent == plan.count
