"""The frame deadline runs from a frame's first byte the proxy is ready to read: never
while the proxy itself holds back (backpressure), never on a finished keep-alive."""

from __future__ import annotations

import trio

from fixtures.messages import financial
from proxy.access import Rejection
from tests.conftest import Terminals, proxy_with_one_switch


async def test_backpressure_does_not_count_against_the_frame_deadline(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    """Frames 1 and 2 and the start of 3 arrive together; the proxy takes 3's rest only
    after the slow switch answered 1 (in-flight cap 1), long after the frame deadline.
    That wait is the proxy's, not the terminal's: all three are answered."""
    _, app, terminal = await proxy_with_one_switch(
        nursery,
        terminals,
        listen={"max_inflight_per_connection": 1, "frame_timeout": 0.5},
        delay=1.0,
    )
    frames = [terminal.frame(financial(stan)) for stan in (1, 2, 3)]
    await terminal.stream.send_all(frames[0] + frames[1] + frames[2][:3])
    await terminal.stream.send_all(frames[2][3:])
    with trio.fail_after(10):
        answers = sorted([(await terminal.receive()).get("11") or "" for _ in range(3)])
    assert answers == ["000001", "000002", "000003"]
    assert app.server.rejections[Rejection.FRAME_TIMEOUT] == 0


async def test_a_keepalive_split_in_two_leaves_no_frame_deadline_behind(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    _, app, terminal = await proxy_with_one_switch(
        nursery, terminals, listen={"frame_timeout": 0.3, "idle_timeout": 30}
    )
    await terminal.stream.send_all(b"\x00")
    await trio.sleep(0.05)  # the second half of the keep-alive comes in its own segment
    await terminal.stream.send_all(b"\x00")
    await trio.sleep(0.6)  # twice the frame deadline, with nothing of a frame pending
    assert (await terminal.request(financial(1))).get("39") == "00"
    assert app.server.rejections[Rejection.FRAME_TIMEOUT] == 0
