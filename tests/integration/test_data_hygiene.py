"""Data hygiene (scenarios 30, 31 and 33): card data and secrets stay out of logs, the
database, the admin endpoints, error messages and exception reprs, and the CLI's output."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import signal
import ssl
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit, urlunsplit

import pytest
import trio
import trustme
from cryptography.hazmat.primitives import serialization

from codec import (
    DecodeError,
    EncodeError,
    Frame,
    FrameFormat,
    Message,
    decode,
    encode,
    encode_frame,
    load_spec,
)
from fixtures.messages import TEST_PAN, echo, financial
from fixtures.terminal import Terminal
from proxy import tls
from proxy.app import App, Secrets
from proxy.config import Config, load_config, parse_config
from proxy.decisions import repeat_of
from proxy.errors import ConfigError
from proxy.logs import setup_logging
from proxy.store import StoreSettings
from proxy.transactions import original_data_elements
from proxy.watch import Watch
from tests.conftest import (
    Database,
    Terminals,
    all_links,
    journal_dsn,
    proxy_config,
    start_switch,
    unused_port,
)

REPO = Path(__file__).resolve().parents[2]
SPEC = load_spec("default")

# Card data, each value recognisable wherever it lands.
TRACK2_TAIL = "2512101987654321"  # expiry, service code, discretionary data
TRACK2 = f"{TEST_PAN}={TRACK2_TAIL}"
PIN_HEX = "7A3C91E04B5D26F8"
CHIP_HEX = "9F2608A1B2C3D4E5F607189F2701809F360200419F37045A3B7C1D"
MASKED_PAN = "411111******1111"


def _raw_forms(label: str, raw: bytes) -> dict[str, str]:
    text = raw.decode("latin-1")  # bytes haystacks are searched as latin-1 text too
    return {
        f"{label} (hex)": raw.hex().upper(),
        f"{label} (hex, lower)": raw.hex(),
        f"{label} (raw)": text,
        f"{label} (repr)": repr(raw)[2:-1],
        f"{label} (json)": json.dumps(text)[1:-1],
    }


CARD_DATA: dict[str, str] = {
    "PAN": TEST_PAN,
    "PAN (hex)": TEST_PAN.encode().hex(),
    "track 2": TRACK2,
    "track 2 discretionary data": TRACK2_TAIL,
    **_raw_forms("PIN block", bytes.fromhex(PIN_HEX)),
    **_raw_forms("chip data", bytes.fromhex(CHIP_HEX)),
}

# Secrets, each recognisable wherever it lands.
DSN_PASSWORD = "Dsn-Pw-9qX4t7Lm"
PAN_KEY = b"pan-hmac-key-R5v8Kw2Zp1"
ADMIN_TOKEN = "admin-token-J6n3Qy0Hs4"
TLS_PASSWORD = "tls-key-pw-B2m7Xc5Ve8"
WRONG_TLS_PASSWORD = TLS_PASSWORD + "-typo"  # a near miss is a secret too
SECRETS: dict[str, str] = {
    "DSN password": DSN_PASSWORD,
    "PAN key": PAN_KEY.decode(),
    "PAN key (hex)": PAN_KEY.hex(),
    "admin token": ADMIN_TOKEN,
    "TLS key password": TLS_PASSWORD,
}
SECRET_ENV = {
    "ISO_PROXY_PAN_KEY": PAN_KEY.decode(),
    "ISO_PROXY_ADMIN_TOKEN": ADMIN_TOKEN,
    "ISO_PROXY_TLS_KEY_PASSWORD": TLS_PASSWORD,
}


def leaks(haystack: str | bytes, needles: Mapping[str, str]) -> list[str]:
    """The labels of the needles found in `haystack`."""
    text = haystack.decode("latin-1") if isinstance(haystack, bytes) else haystack
    return [label for label, needle in needles.items() if needle in text]


def assert_clean(places: Mapping[str, str | bytes], needles: Mapping[str, str]) -> None:
    """No needle in any place; the failure names places and needles, never the text."""
    found = {where: hit for where, text in places.items() if (hit := leaks(text, needles))}
    assert not found, f"sensitive data found: {found}"


def with_dsn(dsn: str, *, password: str, user: str | None = None, path: str | None = None) -> str:
    """`dsn` with a password (and optionally another user or database)."""
    url = urlsplit(dsn)
    host = url.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{url.port}" if url.port else ""
    netloc = f"{user or url.username or 'postgres'}:{password}@{host}{port}"
    return urlunsplit(url._replace(netloc=netloc, path=url.path if path is None else path))


def exception_texts(error: BaseException) -> dict[str, str | bytes]:
    """str, repr, args, traceback and pickle of an error and of every cause and context."""
    texts: dict[str, str | bytes] = {
        "traceback": "".join(traceback.format_exception(error)),
    }
    seen: set[int] = set()
    chain: list[tuple[str, BaseException | None]] = [("error", error)]
    while chain:
        name, current = chain.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        texts[f"{name} str"] = str(current)
        texts[f"{name} repr"] = repr(current)
        texts[f"{name} args"] = repr(current.args)
        texts[f"{name} attributes"] = repr(getattr(current, "__dict__", {}))
        chain += [
            (f"{name}.__cause__", current.__cause__),
            (f"{name}.__context__", current.__context__),
        ]
        if isinstance(current, BaseExceptionGroup):
            chain += [(f"{name}[{i}]", leaf) for i, leaf in enumerate(current.exceptions)]
    try:
        texts["pickle"] = pickle.dumps(error)
    except Exception as unpicklable:
        texts["pickle"] = type(unpicklable).__name__
    return texts


class RecordWatch(logging.Handler):
    """Keeps every log record; a trio task can wait for a message to show up."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._watch = Watch()
        self._trio_thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if threading.get_ident() == self._trio_thread:  # worker threads (DNS lookups) log too
            self._watch.changed()

    def count(self, text: str) -> int:
        return sum(text in record.getMessage() for record in self.records)

    async def wait_for(self, text: str, count: int = 1) -> None:
        await self._watch.wait_until(lambda: self.count(text) >= count)


@contextmanager
def captured_logs() -> Iterator[tuple[RecordWatch, dict[str, io.StringIO]]]:
    """Every record at DEBUG, and the proxy's own text and JSON log lines (`setup_logging`,
    as `iso-proxy run` installs it), next to pytest's handlers."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    watch = RecordWatch()
    streams = {"text": io.StringIO(), "json": io.StringIO()}
    added: list[logging.Handler] = [watch]
    try:
        for style, stream in streams.items():
            with mock.patch.object(sys, "stderr", stream):
                setup_logging("DEBUG", style)
            added.append(root.handlers[0])
        root.handlers[:] = saved_handlers + added
        root.setLevel(logging.DEBUG)
        yield watch, streams
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def log_places(
    caplog: pytest.LogCaptureFixture, watch: RecordWatch, streams: Mapping[str, io.StringIO]
) -> dict[str, str | bytes]:
    """Every form a log record takes: pytest's text, the proxy's text and JSON lines, each
    record's message, arguments and exception."""
    places: dict[str, str | bytes] = {
        "caplog": caplog.text,
        "text log": streams["text"].getvalue(),
        "json log": streams["json"].getvalue(),
    }
    formatter = logging.Formatter()
    for index, record in enumerate(watch.records):
        where = f"record {index} ({record.name})"
        places[f"{where} message"] = record.getMessage()
        places[f"{where} args"] = repr(record.args)
        if record.exc_info is not None:
            places[f"{where} exception"] = formatter.formatException(record.exc_info)
    return places


async def http(port: int, path: str, *, method: str = "GET", token: str | None = None) -> bytes:
    """One plain HTTP/1.1 request to the admin server; the whole response."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n"
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    response = bytearray()
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(f"{head}Connection: close\r\n\r\n".encode())
        while chunk := await stream.receive_some(65536):
            response += chunk
    return bytes(response)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


async def scrape(app: App, tag: str) -> dict[str, str | bytes]:
    """/metrics, /status and /readyz, as an operator's tools see them."""
    return {
        f"{tag} {path}": await http(app.admin_port, path)
        for path in ("/metrics", "/status", "/readyz")
    }


def with_card_data(stan: int, **options: Any) -> Message:
    """A purchase carrying PAN, track 2, a PIN block and chip data."""
    return financial(stan, **options).with_fields({"35": TRACK2, "52": PIN_HEX, "55": CHIP_HEX})


async def links_up(app: App) -> None:
    await app.pool.wait_until(lambda: all(link.is_up for link in all_links(app)))


async def start_app(nursery: trio.Nursery, config: Config, secrets: Secrets) -> tuple[App, int]:
    app = App(config, secrets)
    port: int = await nursery.start(app.run)
    return app, port


# Scenario 30 -------------------------------------------------------------------------------


async def test_card_data_stays_out_of_logs_database_and_admin_endpoints(
    nursery: trio.Nursery,
    terminals: Terminals,
    database: Database,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Approval, replay, decline, timeout (and its automatic reversal), RC 30 after field 2,
    a terminal's reversal and an undecodable frame, all carrying card data; then every log
    record, every table, /metrics and /status are searched. Secrets are in play too."""
    caplog.set_level(logging.DEBUG)
    switch = await start_switch(nursery, silent_stans=frozenset({"000003"}))
    config = proxy_config(
        {"alpha": switch.port},
        switch={"timeout": 0.5},
        store={"schema": database.schema, "timeout": 2},
        reversal={"backoff_initial": 0.1, "backoff_max": 0.5},
    )
    password_dsn = with_dsn(database.dsn, password=DSN_PASSWORD)
    with captured_logs() as (watch, streams), trio.fail_after(10):
        app, port = await start_app(
            nursery, config, Secrets(dsn=password_dsn, pan_key=PAN_KEY, admin_token=ADMIN_TOKEN)
        )
        store, reversals = app.store, app.reversals
        assert store is not None and reversals is not None
        await store.wait_ready()  # the password DSN connects (trust ignores it)
        await links_up(app)
        terminal = await terminals.connect(port)

        approved = with_card_data(1)
        assert (await terminal.request(approved)).get("39") == "00"
        repeat = approved.with_fields({}, mti=repeat_of(approved.mti))
        assert (await terminal.request(repeat)).get("39") == "00"  # replayed from the journal
        switch.options = replace(switch.options, rc="05")
        assert (await terminal.request(with_card_data(2))).get("39") == "05"
        switch.options = replace(switch.options, rc="00")
        assert (await terminal.request(with_card_data(3))).get("39") == "91"  # timed out

        broken_after_41 = encode(with_card_data(4), SPEC)[:-4]  # field 55 cut short
        await terminal.stream.send_all(encode_frame(terminal.framing, Frame(broken_after_41)))
        salvaged = await terminal.receive()
        assert (salvaged.mti.code, salvaged.get("39"), salvaged.get("11")) == (
            "0210",
            "30",
            "000004",
        )

        reversal = with_card_data(5, mti="0400").with_fields(
            {"90": original_data_elements(approved.fields, "0200")}
        )
        assert (await terminal.request(reversal)).get("39") == "00"

        undecodable = encode(with_card_data(6), SPEC).replace(
            b"000000001000", b"00000000\xff\xfe00"
        )
        closed = await terminals.connect(port)
        await closed.stream.send_all(encode_frame(closed.framing, Frame(undecodable)))
        assert await closed.receive_frame() is None

        await reversals.wait_until(lambda: reversals.acknowledged >= 1)
        assert switch.received_reversals() == 2  # the terminal's and the timeout's

        enable = await http(
            app.admin_port, "/switches/alpha/enable", method="POST", token=ADMIN_TOKEN
        )
        assert status_of(enable) == 200
        admin = await scrape(app, "after traffic") | {"enable": enable}

    tables = await database.fetch(
        "SELECT table_name FROM information_schema.tables"
        f" WHERE table_schema = '{database.schema}' ORDER BY table_name"
    )
    dumps: dict[str, str | bytes] = {}
    for row in tables:
        name = row["table_name"]
        rows = await database.fetch(f'SELECT t::text AS row FROM "{database.schema}"."{name}" t')
        dumps[f"table {name}"] = "\n".join(r["row"] for r in rows)
    assert {"transactions", "reversals"} <= {row["table_name"] for row in tables}
    transactions = await database.fetch("SELECT stan, state, rc, pan_masked FROM transactions")
    assert {(r["stan"], r["state"], r["rc"]) for r in transactions} >= {
        ("000001", "answered", "00"),
        ("000002", "answered", "05"),
        ("000003", "timed_out", "91"),
        ("000005", "answered", "00"),
    }
    assert {r["pan_masked"] for r in transactions} == {MASKED_PAN}

    logs = log_places(caplog, watch, streams)
    assert_clean(logs | dumps | admin, CARD_DATA | SECRETS)
    # The scan would see card data if it were there: the masked PAN is, in every log form.
    for where in ("caplog", "text log", "json log", "table transactions"):
        text = (logs | dumps)[where]
        assert isinstance(text, str) and MASKED_PAN in text, where
    assert "format error from terminal" in caplog.text
    assert "undecodable message" in caplog.text
    metrics = admin["after traffic /metrics"]
    assert isinstance(metrics, bytes)
    for rc in (b'rc="00"', b'rc="05"', b'rc="91"'):
        assert rc in metrics


# Scenario 31 -------------------------------------------------------------------------------

_RAW = encode(with_card_data(7), SPEC)
_CHIP_AT = _RAW.index(bytes.fromhex(CHIP_HEX))
_PIN_AT = _RAW.index(bytes.fromhex(PIN_HEX))
DECODE_CASES = {
    "track 2 longer than its maximum": (
        _RAW.replace(b"33" + TRACK2.encode(), b"38" + TRACK2.encode()),
        "35",
    ),
    "track 2 not ASCII": (_RAW.replace(TRACK2.encode(), TRACK2.encode()[:-1] + b"\xff"), "35"),
    "PIN block cut short": (_RAW[: _PIN_AT + 3], "52"),
    "chip data cut short": (_RAW[:-4], "55"),
    "chip data length above its maximum": (_RAW[: _CHIP_AT - 3] + b"999" + _RAW[_CHIP_AT:], "55"),
    "extra data after chip data": (_RAW + b"X", None),
}


@pytest.mark.parametrize("case", sorted(DECODE_CASES))
def test_decode_errors_after_field_2_carry_no_card_data(case: str) -> None:
    """Decoding fails after the PAN (and, further on, after track 2, PIN block and chip data
    were read): nothing of them in the error, its chain, traceback, pickle or salvage."""
    raw, field = DECODE_CASES[case]
    assert TEST_PAN.encode() in raw
    with pytest.raises(DecodeError) as caught:
        decode(raw, SPEC)
    error = caught.value
    assert error.field == field
    places = exception_texts(error) | {"salvage": repr(error.salvage)}
    assert_clean(places, CARD_DATA)
    for frame, _ in traceback.walk_tb(error.__traceback__):
        if f"{os.sep}codec{os.sep}" in frame.f_code.co_filename:
            assert not leaks(repr(frame.f_locals), CARD_DATA), frame.f_code.co_name


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"35": TRACK2 + "01234"}, "35"),  # longer than 37
        ({"52": PIN_HEX + "AB"}, "52"),  # not 8 bytes
        ({"52": "Z" + PIN_HEX[1:]}, "52"),  # not hex
        ({"55": CHIP_HEX + "F"}, "55"),  # odd-length hex
    ],
)
def test_encode_errors_carry_no_card_data(change: dict[str, str], field: str) -> None:
    with pytest.raises(EncodeError) as caught:
        encode(with_card_data(8).with_fields(change), SPEC)
    assert caught.value.field == field
    assert_clean(exception_texts(caught.value), CARD_DATA | {"value": next(iter(change.values()))})


# Scenario 33 -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A CA, and a listener certificate whose key is encrypted with TLS_PASSWORD."""

    ca: trustme.CA
    cert: Path
    key: Path


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    private = serialization.load_pem_private_key(issued.private_key_pem.bytes(), None)
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(TLS_PASSWORD.encode()),
        )
    )
    return TlsFiles(ca, cert, key)


def _tls_listen(files: TlsFiles) -> dict[str, Any]:
    return {"tls": {"cert": str(files.cert), "key": str(files.key)}}


def test_secrets_stay_out_of_reprs_and_configuration_errors(
    tmp_path: Path, tls_files: TlsFiles
) -> None:
    """repr/str of Secrets, Config and StoreSettings; every ConfigError a DSN or a wrong
    TLS key password can cause."""
    password_dsn = f"postgresql://app:{DSN_PASSWORD}@db.example:5432/iso"
    secrets = Secrets(
        dsn=password_dsn, pan_key=PAN_KEY, admin_token=ADMIN_TOKEN, tls_key_password=TLS_PASSWORD
    )
    raw = {
        "listen": {"port": 0, **_tls_listen(tls_files)},
        "switches": [{"name": "alpha", "host": "127.0.0.1", "port": 7001}],
        "store": {"dsn": password_dsn},
    }
    config = parse_config(raw, base_dir=tmp_path)
    assert config.store.dsn == password_dsn
    tls.check(config, TLS_PASSWORD)  # the right password opens the key
    app = App(config, secrets)
    places: dict[str, str | bytes] = {
        "repr(Secrets)": repr(secrets),
        "str(Secrets)": str(secrets),
        "repr(Config)": repr(config),
        "str(Config)": str(config),
        "repr(app.config)": repr(app.config),
        "repr(StoreSettings)": repr(
            StoreSettings(password_dsn, None, 1.0, 1, 1, 0.001, "instance")
        ),
    }

    broken_files = {
        "problems": "listen: {port: -1}\nswitches: []\n"
        f"store: {{dsn: '{password_dsn}', schema: Bad-Schema, timeout: x, bogus: 1}}\n",
        "dsn of the wrong type": f"switches: []\nstore: {{dsn: {{password: {DSN_PASSWORD}}}}}\n",
        "invalid YAML": f"store:\n  dsn: '{password_dsn}'\n   schema: [\n",
    }
    for name, text in broken_files.items():
        path = tmp_path / f"{name.replace(' ', '-')}.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert caught.value.problems
        places |= {f"{name}: {k}": v for k, v in exception_texts(caught.value).items()}

    with pytest.raises(ConfigError) as wrong_key:
        tls.check(config, WRONG_TLS_PASSWORD)
    assert "listen.tls: cannot use certificate" in str(wrong_key.value)
    places |= {f"tls.check: {k}": v for k, v in exception_texts(wrong_key.value).items()}
    with pytest.raises(ConfigError) as wrong_app:
        App(config, replace(secrets, tls_key_password=WRONG_TLS_PASSWORD))
    places |= {f"App: {k}": v for k, v in exception_texts(wrong_app.value).items()}

    assert_clean(places, SECRETS | {"wrong TLS password": WRONG_TLS_PASSWORD})


async def test_a_failing_store_connection_never_shows_the_dsn(
    nursery: trio.Nursery, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """With every secret set (and the TLS listener's key opened with its password), a DSN
    that is unreachable, names a missing database or a missing role: logs at DEBUG, /metrics,
    /status, /readyz and the admin actions show none of them."""
    caplog.set_level(logging.DEBUG)
    switch = await start_switch(nursery)
    dsn = journal_dsn()
    bad_dsns = {
        "unreachable": f"postgresql://postgres:{DSN_PASSWORD}@127.0.0.1:{await unused_port()}/x",
        "no such database": with_dsn(dsn, password=DSN_PASSWORD, path="/no_such_db_hygiene"),
        "no such role": with_dsn(dsn, password=DSN_PASSWORD, user="no_such_role_hygiene"),
    }
    config = proxy_config(
        {"alpha": switch.port}, listen=_tls_listen(tls_files), store={"timeout": 0.5}
    )
    client_context = ssl.create_default_context()
    tls_files.ca.configure_trust(client_context)
    admin: dict[str, str | bytes] = {}
    with captured_logs() as (watch, streams), trio.fail_after(10):
        for number, (name, bad) in enumerate(bad_dsns.items(), start=1):
            secrets = Secrets(
                dsn=bad, pan_key=PAN_KEY, admin_token=ADMIN_TOKEN, tls_key_password=TLS_PASSWORD
            )
            async with trio.open_nursery() as running:
                app, port = await start_app(running, config, secrets)
                await watch.wait_for("store: cannot connect", count=number)
                await links_up(app)
                tcp = await trio.open_tcp_stream("127.0.0.1", port)
                stream = trio.SSLStream(tcp, client_context, server_hostname="localhost")
                terminal = Terminal(stream, FrameFormat(), SPEC)
                assert (await terminal.request(echo(number))).get("39") == "00"
                assert (await terminal.request(financial(number))).get("39") == "96"
                await terminal.aclose()
                admin |= await scrape(app, name)
                assert b"store unreachable" in admin[f"{name} /readyz"]
                drain = await http(
                    app.admin_port, "/switches/alpha/drain", method="POST", token=ADMIN_TOKEN
                )
                refused = await http(
                    app.admin_port, "/switches/alpha/enable", method="POST", token=ADMIN_TOKEN[:-1]
                )
                assert (status_of(drain), status_of(refused)) == (200, 401)
                admin |= {f"{name} drain": drain, f"{name} refused": refused}
                running.cancel_scope.cancel()
    logs = log_places(caplog, watch, streams)
    assert watch.count("store: cannot connect") >= len(bad_dsns)
    wrong_token = {"wrong admin token": ADMIN_TOKEN[:-1]}
    assert_clean(logs | admin, SECRETS | wrong_token | {f"{k} DSN": v for k, v in bad_dsns.items()})


async def _cli(
    *args: str, env: Mapping[str, str], stop_at: bytes | None = None
) -> tuple[int, bytes]:
    """`iso-proxy ARGS` with `env` added; stdout and stderr together. A run that reaches
    `stop_at` in its output gets SIGTERM; anything still running at the deadline is killed."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "proxy", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
        cwd=REPO,
    )
    output = bytearray()
    try:
        assert process.stdout is not None
        with trio.fail_after(10):
            signalled = False
            while chunk := await process.stdout.receive_some(65536):
                output += chunk
                if stop_at is not None and not signalled and stop_at in output:
                    process.send_signal(signal.SIGTERM)
                    signalled = True
            returncode = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
    return returncode, bytes(output)


def _run_config(path: Path, switch_port: int, store: str, log_format: str = "text") -> str:
    """A config file for `iso-proxy run` logging at DEBUG; its path."""
    path.write_text(
        "listen: {host: 127.0.0.1, port: 0}\nadmin: {port: 0}\n"
        f"log: {{level: DEBUG, format: {log_format}}}\n"
        f"switches: [{{name: alpha, host: 127.0.0.1, port: {switch_port}}}]\n"
        f"store: {store}\n"
    )
    return str(path)


async def test_cli_output_never_shows_a_secret(
    tmp_path: Path, nursery: trio.Nursery, database: Database, tls_files: TlsFiles
) -> None:
    """`check-config` and `run` with every secret in the environment: a broken config, a
    wrong TLS key password, a missing PAN key, an unreachable or refusing database (at DEBUG,
    text and JSON), and a clean start and stop. The output holds no secret."""
    switch = await start_switch(nursery)
    dsn = journal_dsn()
    password_dsn = with_dsn(dsn, password=DSN_PASSWORD)
    unreachable = f"postgresql://postgres:{DSN_PASSWORD}@127.0.0.1:{await unused_port()}/x"
    missing_db = with_dsn(dsn, password=DSN_PASSWORD, path="/no_such_db_hygiene")
    env = SECRET_ENV | {"ISO_PROXY_DSN": password_dsn}
    wrong_tls = env | {"ISO_PROXY_TLS_KEY_PASSWORD": WRONG_TLS_PASSWORD}
    broken, with_tls = tmp_path / "broken.yaml", tmp_path / "tls.yaml"
    broken.write_text(
        f"listen: {{port: 99999}}\nswitches: []\nstore: {{dsn: '{password_dsn}', bogus: 1}}\n"
    )
    with_tls.write_text(
        f"listen: {{host: 127.0.0.1, port: 0, tls: {{cert: {tls_files.cert}, "
        f"key: {tls_files.key}}}}}\nadmin: {{port: 0}}\nstore: {{enabled: false}}\n"
        f"switches: [{{name: alpha, host: 127.0.0.1, port: {switch.port}}}]\n"
    )
    broken_run, tls_run = str(broken), str(with_tls)
    journaled = f"{{schema: {database.schema}, timeout: 0.5}}"
    text_run = _run_config(tmp_path / "text.yaml", switch.port, journaled)
    json_run = _run_config(tmp_path / "json.yaml", switch.port, journaled, "json")
    # name: (arguments, environment, output on which the run is stopped, exit code)
    cases: dict[str, tuple[tuple[str, ...], dict[str, str], bytes | None, int]] = {
        "check-config, broken": (("check-config", "-c", broken_run), env, None, 2),
        "check-config, TLS password": (("check-config", "-c", tls_run), env, None, 0),
        "check-config, wrong TLS password": (("check-config", "-c", tls_run), wrong_tls, None, 2),
        "run, broken": (("run", "-c", broken_run), env, None, 2),
        "run, wrong TLS password": (("run", "-c", tls_run), wrong_tls, None, 2),
        "run, no PAN key": (("run", "-c", text_run), env | {"ISO_PROXY_PAN_KEY": ""}, None, 2),
        "run, database unreachable": (
            ("run", "-c", text_run), env | {"ISO_PROXY_DSN": unreachable}, b"cannot connect", 0
        ),
        "run, no such database (json)": (
            ("run", "-c", json_run), env | {"ISO_PROXY_DSN": missing_db}, b"cannot connect", 0
        ),
        "run, connected": (("run", "-c", text_run), env, b"store: connected", 0),
    }  # fmt: skip
    results: dict[str, tuple[int, bytes]] = {}

    async def one(name: str) -> None:
        args, case_env, stop_at, _ = cases[name]
        results[name] = await _cli(*args, env=case_env, stop_at=stop_at)

    async with trio.open_nursery() as running:
        for name in cases:
            running.start_soon(one, name)

    outputs = {name: output for name, (_, output) in results.items()}
    assert {name: code for name, (code, _) in results.items()} == {
        name: case[3] for name, case in cases.items()
    }, {name: output.decode(errors="replace")[-1500:] for name, output in outputs.items()}
    assert b"invalid configuration" in outputs["run, broken"]
    assert b"listen.tls: cannot use certificate" in outputs["run, wrong TLS password"]
    assert b"ISO_PROXY_PAN_KEY is not set" in outputs["run, no PAN key"]
    assert b" DEBUG " in outputs["run, database unreachable"]
    assert b'"level": "DEBUG"' in outputs["run, no such database (json)"]
    assert b"store: applied migration" in outputs["run, connected"]
    assert_clean(
        outputs,
        SECRETS
        | {"wrong TLS password": WRONG_TLS_PASSWORD, "DSN": password_dsn, "bad DSN": unreachable},
    )


def test_a_malformed_dsn_never_shows_its_password(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A DSN asyncpg cannot parse (an unescaped '#' in the password) is refused at startup
    as a config error; its password appears neither in the errors the app raises, nor in
    its logs, nor in `iso-proxy run`'s output.
    (Synchronous, so a leak fails as a plain AssertionError, not inside a group.)"""
    caplog.set_level(logging.DEBUG)
    places = trio.run(_malformed_dsn_places, tmp_path, caplog)
    assert_clean(places, SECRETS)


async def _malformed_dsn_places(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> dict[str, str | bytes]:
    malformed = f"postgresql://postgres:{DSN_PASSWORD}#x@127.0.0.1:5432/test"
    places: dict[str, str | bytes] = {}
    async with trio.open_nursery() as nursery:
        switch = await start_switch(nursery)
        config = proxy_config({"alpha": switch.port}, store={"timeout": 0.5})
        with captured_logs() as (watch, streams), trio.fail_after(10):
            try:
                async with trio.open_nursery() as running:
                    await start_app(running, config, Secrets(dsn=malformed, pan_key=PAN_KEY))
                    await watch.wait_for("store: cannot connect")
                    running.cancel_scope.cancel()
            except Exception as error:
                places |= exception_texts(error)
        places |= log_places(caplog, watch, streams)
        path = _run_config(tmp_path / "run.yaml", switch.port, "{timeout: 0.5}")
        env = SECRET_ENV | {"ISO_PROXY_DSN": malformed}
        code, output = await _cli("run", "-c", path, env=env, stop_at=b"cannot connect")
        places["run output"] = output
        nursery.cancel_scope.cancel()
    # Refused at startup, with the fix named, before anything could echo it.
    assert code == 2
    assert b"ISO_PROXY_DSN: not a valid postgresql:// URL" in output
    return places
