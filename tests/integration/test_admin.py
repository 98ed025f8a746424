"""The admin HTTP server: health, readiness and Prometheus metrics, read with real clients."""

from __future__ import annotations

import json
import re
import sys
from functools import partial
from pathlib import Path

import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from fixtures.chaos import Mode
from fixtures.messages import financial
from fixtures.sim_switch import SimSwitch, SimSwitchOptions
from fixtures.terminal import Terminal
from proxy.app import App, Secrets
from proxy.config import load_config
from tests.conftest import (
    TEST_ADMIN_TOKEN,
    Database,
    Terminals,
    all_links,
    http,
    metric_samples,
    proxy_config,
    start_killable_switch,
    start_proxy,
    start_switch,
)


async def test_health_readiness_and_metrics(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    alpha, alpha_scope = await start_killable_switch(nursery)
    alpha_port = alpha.port
    beta = await start_switch(nursery)
    app, port = await start_proxy(
        nursery,
        proxy_config({"alpha": alpha_port, "beta": beta.port}, store=database.store()),
    )
    assert app.store is not None
    await app.store.wait_ready()
    admin = app.admin_port

    assert await http(admin, "/healthz") == (200, b"ok\n")
    status, body = await http(admin, "/readyz")
    assert (status, json.loads(body)) == (200, {"ready": True, "problems": []})

    terminal = await terminals.connect(port)
    for stan in (1, 2, 3, 4):
        assert (await terminal.request(financial(stan))).get("39") == "00"
    assert (await terminal.request(financial(4))).get("39") == "00"  # a re-send: replayed
    status, text = await http(admin, "/metrics")
    assert status == 200
    samples = metric_samples(text)
    assert samples[("isoproxy_switch_up", (("switch", "alpha"),))] == 1
    assert samples[("isoproxy_switch_up", (("switch", "beta"),))] == 1
    assert samples[("isoproxy_duplicates_total", (("action", "replay"),))] == 1
    assert samples[("isoproxy_client_connections", ())] == 1
    assert (
        samples[
            ("isoproxy_link_state", (("link", "alpha/0"), ("state", "up"), ("switch", "alpha")))
        ]
        == 1
    )

    # Every switch down: not ready (503), and back when one returns.
    alpha_scope.cancel()
    beta_links = app.pool.links["beta"]
    beta_sim_scope = None
    del beta_sim_scope
    await app.pool.wait_until(lambda: not any(link.is_up for link in app.pool.links["alpha"]))
    assert (await http(admin, "/readyz"))[0] == 200  # beta is still up
    samples = metric_samples((await http(admin, "/metrics"))[1])
    assert samples[("isoproxy_switch_up", (("switch", "alpha"),))] == 0
    assert all(link.is_up for link in beta_links)


async def test_not_ready_without_links_or_store_and_ready_when_they_return(
    nursery: trio.Nursery, database: Database
) -> None:
    sim, switch_scope = await start_killable_switch(nursery)
    switch_port = sim.port
    postgres, dsn = await database.behind_chaos(nursery, Mode.REFUSE)
    app, _ = await start_proxy(
        nursery,
        proxy_config(
            {"alpha": switch_port}, store={"dsn": dsn, "schema": database.schema, "timeout": 1}
        ),
    )
    status, body = await http(app.admin_port, "/readyz")
    assert (status, json.loads(body)["problems"]) == (503, ["store unreachable"])
    postgres.mode = Mode.RELAY
    assert app.store is not None
    with trio.fail_after(15):
        await app.store.wait_ready()
    assert (await http(app.admin_port, "/readyz"))[0] == 200

    switch_scope.cancel()
    await app.pool.wait_until(lambda: not any(link.is_up for link in app.pool.links["alpha"]))
    status, body = await http(app.admin_port, "/readyz")
    assert (status, json.loads(body)["problems"]) == (503, ["no switch link up"])

    revived = SimSwitch(SimSwitchOptions(port=switch_port))
    await nursery.start(revived.run)
    with trio.fail_after(10):
        await app.pool.wait_until(lambda: any(link.is_up for link in app.pool.links["alpha"]))
    assert (await http(app.admin_port, "/readyz"))[0] == 200


async def test_unknown_paths_methods_and_garbage(nursery: trio.Nursery) -> None:
    switch = await start_switch(nursery)
    app, _ = await start_proxy(nursery, proxy_config({"alpha": switch.port}))
    assert (await http(app.admin_port, "/nothing"))[0] == 404
    assert (await http(app.admin_port, "/metrics", method="POST"))[0] == 405
    async with await trio.open_tcp_stream("127.0.0.1", app.admin_port) as stream:
        await stream.send_all(b"\x16\x03\x01 not http at all\r\n\r\n")
        assert (await stream.receive_some(1024)).startswith(b"HTTP/1.1 400")
    assert (await http(app.admin_port, "/healthz"))[0] == 200  # still serving


async def test_metrics_count_per_switch_and_rc_and_echo_latency_shows_the_slow_switch(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    fast = await start_switch(nursery)
    slow = await start_switch(nursery, delay=0.05, echo_delay=0.05)
    app, port = await start_proxy(
        nursery,
        proxy_config(
            {"fast": fast.port, "slow": slow.port},
            switch={"connections": 1},
            health={"echo_interval": 0.1, "echo_timeout": 0.1},
        ),
    )
    terminal = await terminals.connect(port)
    for stan in range(1, 7):
        assert (await terminal.request(financial(stan))).get("39") == "00"
    with trio.fail_after(5):  # several echoes each
        await slow.wait_until(lambda: slow.received["0800"] >= 5)
    samples = metric_samples((await http(app.admin_port, "/metrics"))[1])
    assert (
        samples[
            ("isoproxy_transactions_total", (("mti", "0200"), ("rc", "00"), ("switch", "fast")))
        ]
        == 3
    )
    assert (
        samples[
            ("isoproxy_transactions_total", (("mti", "0200"), ("rc", "00"), ("switch", "slow")))
        ]
        == 3
    )
    slow_sum = samples[("isoproxy_echo_latency_seconds_sum", (("switch", "slow"),))]
    slow_count = samples[("isoproxy_echo_latency_seconds_count", (("switch", "slow"),))]
    fast_sum = samples[("isoproxy_echo_latency_seconds_sum", (("switch", "fast"),))]
    fast_count = samples[("isoproxy_echo_latency_seconds_count", (("switch", "fast"),))]
    assert slow_count >= 3 and fast_count >= 3
    assert slow_sum / slow_count >= 0.05 > fast_sum / fast_count
    assert samples[("isoproxy_request_duration_seconds_count", (("mti", "0200"),))] == 6


async def test_status_json_and_the_status_command(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    switch = await start_switch(nursery)
    app, port = await start_proxy(
        nursery,
        proxy_config({"alpha": switch.port}, store=database.store()),
    )
    assert app.store is not None
    await app.store.wait_ready()
    terminal = await terminals.connect(port)
    assert (await terminal.request(financial(1))).get("39") == "00"
    status, body = await http(app.admin_port, "/status")
    report = json.loads(body)
    assert status == 200
    assert report["ready"] is True
    assert report["reversals_queued"] == 0
    alpha = report["switches"]["alpha"]
    assert (alpha["up"], alpha["in_flight"]) == (True, 0)
    assert set(alpha["links"]) == {"alpha/0", "alpha/1"}
    assert all(
        link["state"] == "up" and link["last_echo_ms"] is not None
        for link in alpha["links"].values()
    )

    result = await trio.run_process(
        [sys.executable, "-m", "proxy", "status", f"127.0.0.1:{app.admin_port}"],
        capture_stdout=True,
        check=False,
    )
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 0
    assert lines[0].split() == ["switch/link", "state", "in", "flight", "echo", "ms", "p50", "p99"]
    assert lines[1].split()[:3] == ["alpha", "up", "0"]
    assert {line.split()[0] for line in lines[2:4]} == {"alpha/0", "alpha/1"}
    assert lines[-1] == "ready: yes; reversals queued: 0"


async def test_a_drained_switch_takes_nothing_new_lets_in_flight_finish_and_comes_back(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    alpha = await start_switch(nursery, delay=0.3)
    beta = await start_switch(nursery)
    app, port = await start_proxy(
        nursery, proxy_config({"alpha": alpha.port, "beta": beta.port}, switch={"connections": 1})
    )
    admin = app.admin_port
    assert (await http(admin, "/switches/alpha/drain", "POST"))[0] == 401
    assert (await http(admin, "/switches/alpha/drain", "POST", token="wrong"))[0] == 401
    terminal = await terminals.connect(port)
    await terminal.send(financial(1))  # goes to alpha (its turn), answered in 0.3 s
    with trio.fail_after(5):
        await alpha.wait_until(lambda: alpha.financial_total() == 1)
    assert await http(admin, "/switches/alpha/drain", "POST", token=TEST_ADMIN_TOKEN) == (
        200,
        b"alpha: drained\n",
    )
    assert (await terminal.receive()).get("39") == "00"  # the one in flight finished
    others = await terminals.connect(port)
    for stan in range(2, 8):
        assert (await others.request(financial(stan))).get("39") == "00"
    assert (alpha.financial_total(), beta.financial_total()) == (1, 6)
    report = json.loads((await http(admin, "/status"))[1])
    assert report["switches"]["alpha"]["drained"] is True
    assert report["switches"]["alpha"]["up"] is True  # echoes go on

    assert (await http(admin, "/switches/alpha/enable", "POST", token=TEST_ADMIN_TOKEN))[0] == 200
    for stan in range(8, 12):
        assert (await others.request(financial(stan))).get("39") == "00"
    assert alpha.financial_total() == 3
    assert (await http(admin, "/switches/nowhere/drain", "POST", token=TEST_ADMIN_TOKEN))[0] == 404


DASHBOARD = Path(__file__).resolve().parents[2] / "ops" / "grafana" / "iso-proxy.json"


async def test_the_dashboard_is_grafana_json_and_queries_only_exported_metrics(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    exprs = []
    for panel in dashboard["panels"]:
        assert {"id", "type", "title", "gridPos", "targets"} <= set(panel), panel
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        exprs += [target["expr"] for target in panel["targets"]]
    queried = {
        re.sub(r"_(total|bucket|sum|count)$", "", name)
        for expr in exprs
        for name in re.findall(r"isoproxy_[a-z_]+", expr)
    }

    switch = await start_switch(nursery)
    app, port = await start_proxy(nursery, proxy_config({"alpha": switch.port}))
    terminal = await terminals.connect(port)
    assert (await terminal.request(financial(1))).get("39") == "00"
    exported = {
        family.name
        for family in text_string_to_metric_families(
            (await http(app.admin_port, "/metrics"))[1].decode()
        )
    }
    assert queried <= exported, queried - exported
    assert len(queried) >= 10


def _write_switches(path: Path, ports: dict[str, int], *names: str) -> None:
    """A config file listing the switches `names` (on `ports`), for the reload tests."""
    switches = "".join(
        f"  - {{name: {n}, host: 127.0.0.1, port: {ports[n]}, connections: 1}}\n" for n in names
    )
    path.write_text(
        "listen: {host: 127.0.0.1, port: 0}\nadmin: {port: 0}\nstore: {enabled: false}\n"
        "health: {echo_interval: 5, echo_timeout: 1, rise_interval: 0.05, rise: 1}\n"
        f"switches:\n{switches}"
    )


async def _app_from_file(nursery: trio.Nursery, path: Path) -> tuple[App, int]:
    """A proxy run from the config file at `path` (so that it can reload it), its links up."""
    app = App(load_config(path), Secrets(admin_token=TEST_ADMIN_TOKEN), config_path=path)
    port: int = await nursery.start(app.run)
    await app.pool.wait_until(lambda: all(link.is_up for link in all_links(app)))
    return app, port


async def _two_in_flight(terminals: Terminals, port: int, beta: SimSwitch) -> Terminal:
    """A terminal with two requests in flight (STANs 1 and 2), one of them at beta (slow)."""
    terminal = await terminals.connect(port)
    await terminal.stream.send_all(terminal.frame(financial(1)) + terminal.frame(financial(2)))
    with trio.fail_after(5):
        await beta.wait_until(lambda: beta.financial_total() == 1)
    return terminal


async def _settled_on(app: App, names: set[str]) -> None:
    """Wait until no removal is under way and `names` are the switches, their links up."""
    with trio.fail_after(10):
        await app.pool.wait_until(
            lambda: (
                not app.pool.removing
                and set(app.pool.links) == names
                and all(link.is_up for link in all_links(app))
            )
        )


async def _both_approved(terminal: Terminal) -> None:
    """The answers to the terminal's two requests in flight (STANs 1 and 2): approvals."""
    answers = [await terminal.receive() for _ in range(2)]
    assert sorted((a.get("11"), a.get("39")) for a in answers) == [
        ("000001", "00"),
        ("000002", "00"),
    ]


async def test_reload_adds_and_removes_switches_without_touching_terminals(
    nursery: trio.Nursery, terminals: Terminals, tmp_path: Path
) -> None:
    alpha = await start_switch(nursery)
    beta = await start_switch(nursery, delay=0.5)
    gamma = await start_switch(nursery)
    path = tmp_path / "config.yaml"

    write = partial(
        _write_switches, path, {"alpha": alpha.port, "beta": beta.port, "gamma": gamma.port}
    )

    write("alpha", "beta")
    app, port = await _app_from_file(nursery, path)
    terminal = await _two_in_flight(terminals, port, beta)

    write("alpha", "gamma")
    assert await http(app.admin_port, "/reload", "POST") == (
        401,
        b"missing or wrong bearer token\n",
    )
    assert await http(app.admin_port, "/reload", "POST", token=TEST_ADMIN_TOKEN) == (
        200,
        b"reloaded\n",
    )
    await _both_approved(terminal)
    with trio.fail_after(10):
        await app.pool.wait_until(
            lambda: "beta" not in app.pool.links and all(link.is_up for link in all_links(app))
        )
    listener_spec = app.config.listen.endpoint.spec
    assert all(s.endpoint.spec is listener_spec for s in app.pool.switches.values())
    for stan in range(3, 9):  # the same terminal connection, never closed
        assert (await terminal.request(financial(stan))).get("39") == "00"
    assert (alpha.financial_total(), beta.financial_total(), gamma.financial_total()) == (4, 1, 3)

    path.write_text("switches: []\n")  # a broken file changes nothing
    status, body = await http(app.admin_port, "/reload", "POST", token=TEST_ADMIN_TOKEN)
    assert (status, body) == (400, b"switches: must be a non-empty list of switches\n")
    assert set(app.pool.links) == {"alpha", "gamma"}


async def test_reloads_while_a_switch_is_being_removed_neither_crash_nor_lose_it(
    nursery: trio.Nursery, terminals: Terminals, tmp_path: Path
) -> None:
    """Beta is being removed (a request of its still in flight) when the file is reloaded
    again without it, then with it: the proxy keeps running, and beta comes back."""
    alpha = await start_switch(nursery)
    beta = await start_switch(nursery, delay=0.5)
    path = tmp_path / "config.yaml"

    write = partial(_write_switches, path, {"alpha": alpha.port, "beta": beta.port})

    write("alpha", "beta")
    app, port = await _app_from_file(nursery, path)
    terminal = await _two_in_flight(terminals, port, beta)
    write("alpha")
    assert await app.reload() == []
    await trio.testing.wait_all_tasks_blocked()
    assert "beta" in app.pool.removing  # waiting for its request in flight
    assert await app.reload() == []  # again, while it is being removed
    write("alpha", "beta")
    assert await app.reload() == []  # and wanted back
    await _both_approved(terminal)
    await _settled_on(app, {"alpha", "beta"})
    for stan in range(3, 7):
        assert (await terminal.request(financial(stan))).get("39") == "00"
    assert beta.financial_total() == 3  # its first, and its turns since


async def test_reloads_back_to_back_end_as_the_latest_file_says(
    nursery: trio.Nursery, terminals: Terminals, tmp_path: Path
) -> None:
    """Reloads one right after another (no pause between): beta removed then wanted back
    comes back; gamma added then unwanted goes (and the proxy keeps running)."""
    alpha, beta, gamma = [await start_switch(nursery) for _ in range(3)]
    path = tmp_path / "config.yaml"

    write = partial(
        _write_switches, path, {"alpha": alpha.port, "beta": beta.port, "gamma": gamma.port}
    )

    write("alpha", "beta")
    app, port = await _app_from_file(nursery, path)
    write("alpha")
    assert await app.reload() == []
    write("alpha", "beta", "gamma")
    assert await app.reload() == []
    write("alpha", "beta")
    assert await app.reload() == []
    await _settled_on(app, {"alpha", "beta"})
    terminal = await terminals.connect(port)
    for stan in range(1, 5):
        assert (await terminal.request(financial(stan))).get("39") == "00"
    assert (alpha.financial_total(), beta.financial_total(), gamma.financial_total()) == (2, 2, 0)


async def test_admin_actions_are_off_without_a_configured_token(nursery: trio.Nursery) -> None:
    switch = await start_switch(nursery)
    app = App(proxy_config({"alpha": switch.port}), Secrets())
    await nursery.start(app.run)
    status, body = await http(app.admin_port, "/switches/alpha/drain", "POST", token="anything")
    assert (status, body) == (403, b"admin actions are off: set ISO_PROXY_ADMIN_TOKEN\n")
    assert (await http(app.admin_port, "/reload", "POST", token="anything"))[0] == 403
    assert app.pool.drained == set()
