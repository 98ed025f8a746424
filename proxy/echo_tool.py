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
    rtt: float | None  # None: no answer in time
    rc: str | None = None


@dataclass(frozen=True, slots=True)
class EchoSummary:
    sent: int
    answered: int
    approved: int
    rtts: tuple[float, ...]

    @property
    def loss(self) -> float:
        return 0.0 if not self.sent else 100.0 * (self.sent - self.answered) / self.sent

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
    rtts = tuple(r.rtt for r in results if r.rtt is not None)
    return EchoSummary(
        sent=len(results),
        answered=len(rtts),
        approved=sum(1 for r in results if r.rtt is not None and r.rc == APPROVED),
        rtts=rtts,
    )


async def echo(
    host: str,
    port: int,
    plan: EchoPlan,
    results: list[EchoResult],
    out: Callable[[str], None],
) -> None:
    """Send the planned echoes on one connection, appending each result as it ends."""
    target = f"{host}:{port}"
    stans = StanSequence(random.randrange(1, 1_000_000))
    with trio.fail_after(plan.wait):
        terminal = await Terminal.connect(host, port, plan.framing, plan.spec)
    async with terminal.stream:
        next_at = trio.current_time()
        for _ in range(plan.count):
            await trio.sleep_until(next_at)
            next_at = max(next_at + plan.interval, trio.current_time())  # no catch-up burst
            stan = next(stans)
            started = trio.current_time()
            await terminal.send(network_request(ECHO, stan, datetime.now(UTC)))
            results.append(EchoResult(stan, None))  # lost, unless answered below
            with trio.move_on_after(plan.wait):
                while True:
                    reply = await terminal.receive()
                    if reply.mti.code == "0810" and reply.get("11") == stan:
                        rtt = trio.current_time() - started
                        results[-1] = EchoResult(stan, rtt, reply.get("39"))
                        break
            result = results[-1]
            if result.rtt is None:
                out(f"no answer for stan={stan} within {plan.wait:g} s")
            else:
                ms = result.rtt * 1000
                out(f"0810 from {target}: stan={stan} rc={result.rc} time={ms:.2f} ms")


async def run_echo(host: str, port: int, plan: EchoPlan, out: Callable[[str], None]) -> bool:
    """The whole tool: a header, a line per echo, the summary. True when all were approved."""
    target = f"{host}:{port}"
    out(f"ECHO {target} ({plan.framing.prefix}, {plan.count} echoes, {plan.interval:g} s apart)")
    results: list[EchoResult] = []
    interrupted = False
    try:
        await echo(host, port, plan, results, out)
    except trio.TooSlowError:
        out(f"connection to {target} failed: no answer within {plan.wait:g} s")
    except (OSError, EOFError, trio.BrokenResourceError) as exc:
        out(f"connection to {target} failed: {exc or 'closed by the other side'}")
    except CodecError as exc:
        out(f"undecodable answer from {target}: {exc}")
    except KeyboardInterrupt:
        interrupted = True
    summary = summarize(results)
    for line in summary.lines(target):
        out(line)
    if interrupted:
        raise KeyboardInterrupt
    return summary.sent == plan.count and summary.approved == plan.count
