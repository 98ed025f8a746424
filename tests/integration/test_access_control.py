"""Client profiles by source network, RC 58 for what a profile does not allow, and rate
limits per source address. Loopback addresses 127.0.0.x play different clients."""

from __future__ import annotations

from typing import Any

import trio

from codec import Mti
from fixtures.messages import echo, financial
from fixtures.terminal import Terminal
from proxy.access import Rejection
from proxy.app import App
from proxy.server import FRAMES_PER_TURN
from tests.conftest import Terminals, proxy_config, start_proxy, start_switch

PROFILES: list[dict[str, Any]] = [
    {"name": "noc", "networks": ["127.0.0.3/32"], "allow": ["0800"]},
    {
        "name": "stores",
        "networks": ["127.0.0.0/30"],  # 127.0.0.0 - 127.0.0.3 (noc's address matched first)
        "allow": ["0100", "0200", "0400", "0420"],
        "rate": {"tps": 0.01, "burst": 5},  # 5 at once, then one per 100 s: exact counts
        "rate_rc": "91",
    },
]


async def closed_at_once(terminal: Terminal) -> bool:
    with trio.fail_after(2):
        return await terminal.receive_frame() is None


async def test_clients_outside_every_profile_are_closed_and_ops_may_only_echo(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    switch = await start_switch(nursery)
    app, port = await start_proxy(nursery, proxy_config({"alpha": switch.port}, clients=PROFILES))

    outsider = await terminals.connect(port, source="127.0.0.9")
    assert await closed_at_once(outsider)
    assert app.server.rejections[Rejection.NO_PROFILE] == 1

    ops = await terminals.connect(port, source="127.0.0.3")
    assert (await ops.request(echo(1))).get("39") == "00"
    refused = await ops.request(financial(2, "OPSDESK1"))
    assert (refused.mti.code, refused.get("39"), refused.get("41")) == ("0210", "58", "OPSDESK1")
    refused = await ops.request(financial(3).with_fields({}, mti=Mti.parse("0201")))  # repeat
    assert refused.get("39") == "58"
    assert (await ops.request(echo(4))).get("39") == "00"  # the connection stays open
    assert switch.financial_total() == 0  # the switch saw none of it
    assert app.server.rejections[Rejection.NOT_PERMITTED] == 2

    store = await terminals.connect(port, source="127.0.0.2")
    assert (await store.request(financial(5))).get("39") == "00"
    assert switch.financial_total() == 1


async def test_a_client_over_its_rate_gets_the_rate_rc_and_other_clients_do_not(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    switch = await start_switch(nursery)
    app, port = await start_proxy(nursery, proxy_config({"alpha": switch.port}, clients=PROFILES))
    greedy = [await terminals.connect(port, source="127.0.0.1") for _ in range(2)]
    other = await terminals.connect(port, source="127.0.0.2")

    # 8 from one address over two connections: its burst of 5 passes, 3 are refused
    # (well within 100 s, the time one more token takes).
    codes = [
        (await greedy[n % 2].request(financial(n + 1, "TERMGRDY"))).get("39") or ""
        for n in range(8)
    ]
    assert sorted(codes) == ["00"] * 5 + ["91"] * 3
    assert codes[:5] == ["00"] * 5
    # Another address of the same profile has its own bucket.
    assert [(await other.request(financial(n, "TERMOTHR"))).get("39") for n in range(1, 6)] == [
        "00"
    ] * 5
    assert switch.financial_total() == 10
    assert app.server.rejections[Rejection.RATE_LIMITED] == 3


async def test_repeats_and_reversals_never_wait_on_the_rate(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    """A terminal that repeats because its timer ran out must not be told 91 while its
    original is approved; a reversal must always get through."""
    switch = await start_switch(nursery)
    strict = [{"name": "p", "networks": ["127.0.0.1/32"], "rate": {"tps": 0.01, "burst": 1}}]
    app, port = await start_proxy(nursery, proxy_config({"alpha": switch.port}, clients=strict))
    terminal = await terminals.connect(port)
    assert (await terminal.request(financial(1))).get("39") == "00"
    for mti in ("0201", "0400", "0401", "0420"):
        reply = await terminal.request(financial(1).with_fields({}, mti=Mti.parse(mti)))
        assert reply.get("39") == "00", mti
    assert (await terminal.request(financial(2))).get("39") == "91"  # a new one waits
    assert app.server.rejections[Rejection.RATE_LIMITED] == 1


class _MostInOneStep(trio.abc.Instrument):
    """The most refusals the server counted within one task step (one stretch of running
    without letting other tasks in)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.most = 0
        self._before = 0

    def _count(self) -> int:
        return self.app.server.rejections[Rejection.NOT_PERMITTED]

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._before = self._count()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.most = max(self.most, self._count() - self._before)


async def test_a_burst_of_refused_requests_in_one_read_lets_other_tasks_run(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    """Refusals are answered without a checkpoint each: a terminal that packs hundreds into
    one write must still not hold every other connection and link until it is done."""
    switch = await start_switch(nursery)
    app, port = await start_proxy(nursery, proxy_config({"alpha": switch.port}, clients=PROFILES))
    ops = await terminals.connect(port, source="127.0.0.3")  # may only echo
    burst = 200
    steps = _MostInOneStep(app)
    trio.lowlevel.add_instrument(steps)
    try:
        await ops.stream.send_all(
            b"".join(ops.frame(financial(n, "OPSDESK1")) for n in range(burst))
        )
        answers = [await ops.receive() for _ in range(burst)]
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert [a.get("39") for a in answers] == ["58"] * burst
    assert app.server.rejections[Rejection.NOT_PERMITTED] == burst
    assert 0 < steps.most <= FRAMES_PER_TURN
