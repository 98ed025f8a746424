"""Malformed and oversized frames from terminals: RC 30 or close, and nobody else notices."""

from __future__ import annotations

import struct

import trio

from codec import encode
from fixtures.messages import financial
from fixtures.terminal import Terminal
from tests.conftest import (
    Terminals,
    metrics,
    nonzero_by,
    proxy_config,
    proxy_with_one_switch,
    start_proxy,
    start_switch,
)


def _binary2(body: bytes) -> bytes:
    return struct.pack(">H", len(body)) + body


async def _closed_by_proxy(terminal: Terminal) -> bool:
    with trio.fail_after(5):
        return await terminal.receive_frame() is None


async def test_malformed_and_oversized_frames_while_others_are_served(
    nursery: trio.Nursery,
    terminals: Terminals,
) -> None:
    switch = await start_switch(nursery)
    app, port = await start_proxy(
        nursery, proxy_config({"alpha": switch.port}, listen={"max_frame": 1024})
    )
    spec = app.config.listen.endpoint.spec
    bystander = await terminals.connect(port)
    valid = encode(financial(77, "TERMBAD1"), spec)

    # Readable MTI, 11 and 41, broken after them: answered 0210 RC 30, connection kept.
    for broken in (valid + b"trailing", valid[:-2]):
        terminal = await terminals.connect(port)
        await terminal.stream.send_all(_binary2(broken))
        answer = await terminal.receive()
        assert (answer.mti.code, answer.get("39"), answer.get("11"), answer.get("41")) == (
            "0210",
            "30",
            "000077",
            "TERMBAD1",
        )
        assert (await terminal.request(financial(78))).get("39") == "00"
        assert (await bystander.request(financial(1))).get("39") == "00"

    # Nothing readable: the connection is closed.
    for garbage in (b"\x00\x01garbage", b"02X0" + bytes(8), b"0200" + b"\xff" * 24 + b"X"):
        terminal = await terminals.connect(port)
        await terminal.stream.send_all(_binary2(garbage))
        assert await _closed_by_proxy(terminal)
        assert (await bystander.request(financial(2))).get("39") == "00"

    # A length prefix above max_frame: closed right after the prefix, no body awaited.
    terminal = await terminals.connect(port)
    await terminal.stream.send_all(struct.pack(">H", 60000))
    assert await _closed_by_proxy(terminal)
    assert (await bystander.request(financial(3))).get("39") == "00"

    assert switch.financial_total() == 8  # 2 follow-ups, 6 bystander requests
    rejected = nonzero_by(await metrics(app), "isoproxy_rejections_total", "reason")
    assert rejected == {"format_error": 2, "undecodable": 3, "bad_frame": 1}


async def test_one_byte_chunks_and_many_frames_in_one_write(
    nursery: trio.Nursery,
    terminals: Terminals,
) -> None:
    switch, _, terminal = await proxy_with_one_switch(nursery, terminals)
    data = b"".join(terminal.frame(financial(stan)) for stan in range(1, 11))
    for i in range(len(data)):
        await terminal.stream.send_all(data[i : i + 1])
    first = sorted([(await terminal.receive()).get("11") or "" for _ in range(10)])
    await terminal.stream.send_all(
        b"".join(terminal.frame(financial(stan)) for stan in range(11, 21))
    )
    second = sorted([(await terminal.receive()).get("11") or "" for _ in range(10)])
    assert first == [f"{s:06d}" for s in range(1, 11)]
    assert second == [f"{s:06d}" for s in range(11, 21)]
    assert switch.financial_total() == 20


async def test_keepalive_frames_are_ignored(
    nursery: trio.Nursery,
    terminals: Terminals,
) -> None:
    _, _, terminal = await proxy_with_one_switch(nursery, terminals)
    await terminal.stream.send_all(b"\x00\x00" * 3 + terminal.frame(financial(4)) + b"\x00\x00")
    assert (await terminal.receive()).get("39") == "00"
