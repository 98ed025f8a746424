"""`iso-proxy status [HOST:PORT]`: a running proxy's /status as a table for humans."""

from __future__ import annotations

import json
from typing import Any

import h11
import trio

TIMEOUT = 5.0
MAX_BODY = 1 << 20


async def fetch_status(host: str, port: int) -> dict[str, Any]:
    """GET /status from the admin server (h11 on the client side)."""
    client = h11.Connection(h11.CLIENT)
    body = b""
    with trio.fail_after(TIMEOUT):
        async with await trio.open_tcp_stream(host, port) as stream:
            request = h11.Request(method="GET", target="/status", headers=[("host", host)])
            await stream.send_all(client.send(request) + client.send(h11.EndOfMessage()))
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response) and event.status_code != 200:
                    raise ValueError(f"HTTP {event.status_code}")
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_BODY:
                        raise ValueError("answer too large")
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
    report: dict[str, Any] = json.loads(body)
    return report


def status_lines(report: dict[str, Any]) -> list[str]:
    """One line per link under its switch, then readiness and the reversal queue."""
    lines = [
        f"{'switch/link':<18}{'state':<12}{'in flight':>10}{'echo ms':>10}{'p50':>9}{'p99':>9}"
    ]
    for name, switch in report.get("switches", {}).items():
        state = "up" if switch.get("up") else "DOWN"
        lines.append(f"{name:<18}{state:<12}{switch.get('in_flight', 0):>10}")
        for link_name, link in switch.get("links", {}).items():
            lines.append(
                f"  {link_name:<16}{link.get('state', '?'):<12}{link.get('in_flight', 0):>10}"
                f"{_ms(link.get('last_echo_ms')):>10}{_ms(link.get('echo_p50_ms')):>9}"
                f"{_ms(link.get('echo_p99_ms')):>9}"
            )
    queued = report.get("reversals_queued")
    lines.append(f"ready: {'yes' if report.get('ready') else 'NO'}; reversals queued: {queued}")
    return lines


def _ms(value: object) -> str:
    return "-" if not isinstance(value, int | float) else f"{float(value):.2f}"
