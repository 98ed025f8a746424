"""TLS: the listener (with and without client certificates) and the links to switches.

Certificates are minted for each test by trustme; nothing secret is on disk in the repo.
"""

from __future__ import annotations

import ssl
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme

from codec import Frame, FrameFormat, encode, encode_frame, load_spec
from fixtures.chaos import ChaosProxy, Mode
from fixtures.messages import echo, financial
from fixtures.terminal import Terminal
from proxy.access import Rejection
from proxy.app import App
from tests.conftest import all_links, open_fds, proxy_config, start_proxy, start_switch

TERMINAL = "term-001.stores.example"
OPERATOR = "noc.bank.example"


@dataclass
class Pki:
    """A server CA and its proxy certificate, a client CA and a stranger CA, as files."""

    folder: Path
    server_ca: trustme.CA
    client_ca: trustme.CA
    stranger_ca: trustme.CA

    def listen_tls(self, **overrides: Any) -> dict[str, Any]:
        return {
            "cert": str(self.folder / "server.pem"),
            "key": str(self.folder / "server.pem"),
            "client_ca": str(self.folder / "clients-ca.pem"),
            **overrides,
        }

    def client(
        self,
        name: str | None = TERMINAL,
        *,
        ca: trustme.CA | None = None,
        expired: bool = False,
        versions: tuple[ssl.TLSVersion, ssl.TLSVersion] | None = None,
    ) -> ssl.SSLContext:
        """A terminal's context: trusts the proxy, presents a certificate for `name`."""
        context = ssl.create_default_context()
        self.server_ca.configure_trust(context)
        if name is not None:
            issuer = ca or self.client_ca
            if expired:
                now = datetime.now(UTC)
                leaf = issuer.issue_cert(
                    name, not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
                )
            else:
                leaf = issuer.issue_cert(name)
            leaf.configure_cert(context)
        if versions is not None:
            context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer old versions
            with warnings.catch_warnings():  # setting TLS 1.0 / 1.1 warns: we mean it
                warnings.simplefilter("ignore", DeprecationWarning)
                context.minimum_version, context.maximum_version = versions
        return context


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    pki = Pki(tmp_path, trustme.CA(), trustme.CA(), trustme.CA())
    pki.server_ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "server.pem")
    )
    pki.client_ca.cert_pem.write_to_path(str(tmp_path / "clients-ca.pem"))
    return pki


async def connect(port: int, context: ssl.SSLContext) -> Terminal:
    """A terminal over TLS (the handshake done, or its failure raised)."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, context, server_hostname="localhost")
    try:
        await stream.do_handshake()
    except BaseException:
        await tcp.aclose()
        raise
    return Terminal(stream, FrameFormat(), load_spec("default"))


async def served(port: int, context: ssl.SSLContext, stan: int) -> str | None:
    """The RC the proxy answers a purchase with over TLS; None when it refuses the client
    (at the handshake, or, under TLS 1.3, at the first read after it)."""
    try:
        terminal = await connect(port, context)
    except trio.BrokenResourceError:
        return None
    try:
        answer = await terminal.request(financial(stan))
    except (trio.BrokenResourceError, EOFError):
        return None
    finally:
        await terminal.aclose()
    return answer.get("39")


async def tls_proxy(
    nursery: trio.Nursery,
    pki: Pki,
    clients: list[dict[str, Any]] | None = None,
    listen: dict[str, Any] | None = None,
    **tls: Any,
) -> tuple[App, int]:
    """A switch, and the proxy in front of it with mutual TLS and certificate profiles."""
    switch = await start_switch(nursery)
    config = proxy_config(
        {"alpha": switch.port},
        listen={"tls": pki.listen_tls(**tls), **(listen or {})},
        clients=clients or [{"name": "stores", "networks": ["127.0.0.0/8"], "cert_cn": TERMINAL}],
    )
    return await start_proxy(nursery, config)


async def test_tls_12_and_13_with_a_valid_certificate_are_served_and_the_rest_refused(
    nursery: trio.Nursery, pki: Pki
) -> None:
    app, port = await tls_proxy(nursery, pki)
    v12, v13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
    assert await served(port, pki.client(versions=(v12, v12)), 1) == "00"
    assert await served(port, pki.client(versions=(v13, v13)), 2) == "00"

    refused = {
        "TLS 1.0": pki.client(versions=(ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1)),
        "TLS 1.1": pki.client(versions=(ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_1)),
        "no client certificate": pki.client(None),
        "another CA": pki.client(ca=pki.stranger_ca),
        "expired": pki.client(expired=True),
    }
    for stan, (case, context) in enumerate(refused.items(), start=3):
        before = app.server.rejections[Rejection.TLS_HANDSHAKE]
        assert await served(port, context, stan) is None, case
        assert app.server.rejections[Rejection.TLS_HANDSHAKE] == before + 1, case
    assert await served(port, pki.client(), 99) == "00"  # still serving


async def test_old_protocol_versions_are_refused_by_the_proxy_not_the_client(
    nursery: trio.Nursery, pki: Pki
) -> None:
    """The TLS 1.1 client really sends its hello (it does not give up before a byte leaves,
    as a client whose OpenSSL forbids 1.1 would) and the proxy is the one that ends it."""
    app, port = await tls_proxy(nursery, pki)
    context = pki.client(versions=(ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_1))
    with pytest.raises(trio.BrokenResourceError) as caught:
        await connect(port, context)
    reason = getattr(caught.value.__cause__, "reason", "")
    assert reason != "NO_PROTOCOLS_AVAILABLE"
    assert app.server.rejections[Rejection.TLS_HANDSHAKE] == 1


async def test_certificate_profiles_decide_what_each_client_may_send(
    nursery: trio.Nursery, pki: Pki
) -> None:
    app, port = await tls_proxy(
        nursery,
        pki,
        [
            {"name": "ops", "cert_cn": OPERATOR, "networks": ["127.0.0.0/8"], "allow": ["0800"]},
            {"name": "stores", "cert_cn": TERMINAL, "allow": ["0200", "0400"]},
        ],
    )
    operator = await connect(port, pki.client(OPERATOR))
    assert (await operator.request(echo(5))).get("39") == "00"
    refused = await operator.request(financial(6))
    assert (refused.mti.code, refused.get("39"), refused.get("11")) == ("0210", "58", "000006")
    await operator.aclose()
    assert app.server.rejections[Rejection.NOT_PERMITTED] == 1

    assert await served(port, pki.client(TERMINAL), 7) == "00"
    before = app.server.rejections[Rejection.NO_PROFILE]
    assert await served(port, pki.client("someone-else.example"), 8) is None
    assert app.server.rejections[Rejection.NO_PROFILE] == before + 1


async def test_a_stalled_handshake_is_closed_at_its_deadline_while_others_are_served(
    nursery: trio.Nursery, pki: Pki
) -> None:
    app, port = await tls_proxy(nursery, pki, handshake_timeout=0.5)
    stalled = await trio.open_tcp_stream("127.0.0.1", port)
    started = trio.current_time()
    await stalled.send_all(b"\x16\x03\x01")  # the first bytes of a ClientHello, and no more
    served_meanwhile = [await served(port, pki.client(), stan) for stan in range(1, 4)]
    with trio.fail_after(5):
        assert await stalled.receive_some(100) == b""
    waited = trio.current_time() - started
    await stalled.aclose()
    assert served_meanwhile == ["00", "00", "00"]
    assert waited >= 0.5
    assert app.server.rejections[Rejection.HANDSHAKE_TIMEOUT] == 1


def _switch_context(ca: trustme.CA, name: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return context


async def test_links_verify_the_switch_certificate_and_its_host_name(
    nursery: trio.Nursery, pki: Pki, terminals: Any, caplog: pytest.LogCaptureFixture
) -> None:
    switch_ca = trustme.CA()
    switch_ca.cert_pem.write_to_path(str(pki.folder / "switch-ca.pem"))
    good = await start_switch(nursery, tls=_switch_context(switch_ca, "alpha.switch.example"))
    wrong_name = await start_switch(nursery, tls=_switch_context(switch_ca, "other.example"))
    stranger = await start_switch(nursery, tls=_switch_context(pki.stranger_ca, "beta.example"))
    tls = {"ca": str(pki.folder / "switch-ca.pem")}
    config = proxy_config(
        {"alpha": good.port, "beta": wrong_name.port, "gamma": stranger.port},
        each={
            "alpha": {"tls": {**tls, "server_name": "alpha.switch.example"}},
            "beta": {"tls": {**tls, "server_name": "beta.switch.example"}},
            "gamma": {"tls": {**tls, "server_name": "beta.example"}},
        },
    )
    app, port = await start_proxy(nursery, config, links_up=False)
    with trio.fail_after(10):
        await app.pool.wait_until(lambda: all(link.is_up for link in app.pool.links["alpha"]))
    terminal = await terminals.connect(port)
    for stan in range(1, 5):
        assert (await terminal.request(financial(stan))).get("39") == "00"
    assert good.financial_total() == 4
    assert not any(link.is_up for link in all_links(app) if not link.name.startswith("alpha"))
    assert (wrong_name.total, stranger.total) == (0, 0)  # not a byte of ISO 8583 reached them
    messages = "\n".join(record.getMessage() for record in caplog.records)
    assert "switch beta: tls handshake failed: hostname mismatch" in messages.lower()
    assert "switch gamma: TLS handshake failed" in messages


async def test_a_frame_trickled_inside_one_tls_record_meets_the_frame_deadline(
    nursery: trio.Nursery, pki: Pki
) -> None:
    """Slowloris under TLS: no plaintext shows until the record is whole, yet the frame
    deadline runs from the record's first byte (not the much longer idle timeout)."""
    app, port = await tls_proxy(nursery, pki, listen={"frame_timeout": 0.5, "idle_timeout": 30})
    context = pki.client()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    while True:  # the handshake, by hand, so the record can be cut into single bytes
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            await sock.send(outgoing.read())
            incoming.write(await sock.recv(65536))
    await sock.send(outgoing.read())
    tls.write(encode_frame(FrameFormat(), Frame(encode(financial(1), load_spec("default")))))
    record = outgoing.read()
    started = trio.current_time()
    with trio.fail_after(5):
        for byte in record[:-1]:
            try:
                await sock.send(bytes([byte]))
            except OSError:
                break
            await trio.sleep(0.05)  # the attack: a byte every 50 ms
    waited = trio.current_time() - started
    sock.close()
    assert 0.5 <= waited < 5
    assert app.server.rejections[Rejection.FRAME_TIMEOUT] == 1
    assert await served(port, context, 2) == "00"


async def test_a_switch_that_never_answers_the_handshake_leaves_no_socket_behind(
    nursery: trio.Nursery, pki: Pki
) -> None:
    """Each connect attempt is cut short by connect_timeout mid-handshake; every one of
    its sockets is closed (not left to the garbage collector)."""
    hung = ChaosProxy(("127.0.0.1", 9), Mode.BLACKHOLE)  # accepts, never says a word
    await nursery.start(hung.run)
    config = proxy_config(
        {"alpha": hung.port},
        switch={"connect_timeout": 0.1, "tls": {"server_name": "localhost"}},
    )
    app, _ = await start_proxy(nursery, config, links_up=False)
    baseline = open_fds()
    with trio.fail_after(10):
        await hung.wait_until(lambda: hung.accepted >= 12)  # rounds of attempts by both links
    assert not any(link.is_up for link in all_links(app))
    hung.sever()  # the black hole's own ends of those connections
    await trio.testing.wait_all_tasks_blocked()
    assert open_fds() <= baseline + 2 * 2  # at most each link's attempt in progress, twice
