"""Property-based fuzzing of the terminal side (promise 7, scenario 20).

Requests with one mutation, random bytes (framed and raw) and valid and mutated frames in
random chunkings go to one proxy per test, for a fixed, derandomized number of examples.
A model built on the codec (`Framer`, `decode`) and the documented policy predicts every
answer: a malformed message whose MTI, 11 and 41 can be read gets x1x0 RC 30, any other
malformed input closes the connection, and bytes that still decode to a message are handled
like any terminal's message (a mutated amount is forwarded and approved, a 0210 is dropped).
After each example the proxy still approves a fresh terminal, no task, connection, request
or file descriptor is left behind, and nothing was logged at ERROR.

Hypothesis drives examples from a plain test; the switch and the proxy live in a trio loop
on a helper thread and each example runs there through `trio.from_thread.run`.
"""

from __future__ import annotations

import logging
import queue
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import count, cycle
from typing import Any, Literal, TypeVar

import pytest
import trio
import trio.testing
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

from codec import (
    DecodeError,
    EncodeError,
    Frame,
    FrameFormat,
    Framer,
    FramingError,
    Message,
    decode,
    encode,
    encode_frame,
    load_spec,
)
from fixtures.messages import financial
from proxy.app import App
from tests.conftest import open_fds, proxy_config, start_proxy, start_switch

T = TypeVar("T")

SPEC = load_spec("default")
FRAMING = FrameFormat()
WHEN = datetime(2024, 5, 17, 12, 34, 56, tzinfo=UTC)  # fixed, so examples replay byte for byte
BASE = encode(financial(4242, "TERMFUZZ", when=WHEN), SPEC)
# MTI, primary bitmap and the PAN's length digits, and the last byte.
HOT_OFFSETS = (*range(14), len(BASE) - 1)
MATCH_FIELDS = ("41", "11")
ANSWER_TIMEOUT = 2.0  # for all answers and the proxy's close (they take milliseconds)
SETTLE_TIMEOUT = 2.0  # for connections, requests and tasks to be back at baseline
READ_SIZE = 65536
# Bits 1 and 65 set, then a third bitmap: pyiso8583 raises KeyError, not DecodeError.
KEY_ERROR_TRAP = b"0200" + (b"\x80" + bytes(7)) * 3 + b"X"

Answer = tuple[str, str | None, str | None, str | None]  # MTI, 39, 11, 41
Kind = Literal["format_error", "closed", "forwarded", "answered", "dropped", "incomplete"]


def frame(body: bytes) -> bytes:
    """`body` behind a correct length prefix (an empty body is a keep-alive)."""
    return encode_frame(FRAMING, Frame(body))


def valid_frame(stan: int, terminal: str) -> bytes:
    return frame(encode(financial(stan, terminal, when=WHEN), SPEC))


def _masked(data: bytes) -> str:
    """Bytes for a report: digit runs long enough to be a card number are hidden."""
    return repr(re.sub(rb"[0-9]{12,}", lambda run: b"#" * len(run[0]), data))


# --- inputs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutation:
    """One edit of `BASE`: flip bit `value`, replace or insert byte `value`, or delete."""

    kind: Literal["flip", "replace", "insert", "delete"]
    offset: int
    value: int = 0

    def apply(self, body: bytes) -> bytes:
        head, tail = body[: self.offset], body[self.offset :]
        if self.kind == "insert":
            return head + bytes([self.value]) + tail
        if self.kind == "delete":
            return head + tail[1:]
        byte = tail[0] ^ (1 << self.value) if self.kind == "flip" else self.value
        return head + bytes([byte]) + tail[1:]


@dataclass(frozen=True, repr=False)
class Noise:
    """Random bytes, behind a correct length prefix (`framed`) or straight to the socket."""

    data: bytes
    framed: bool

    def wire(self) -> bytes:
        return frame(self.data) if self.framed else self.data

    def __repr__(self) -> str:
        return f"Noise(framed={self.framed}, data={_masked(self.data)})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """How Hypothesis reports a failing example (else it shows the raw arguments)."""
        printer.text(repr(self))


@dataclass(frozen=True)
class Chunked:
    """Valid requests around one mutated request (or none), sent `sizes` bytes at a time."""

    before: int
    mutation: Mutation | None
    after: int
    sizes: tuple[int, ...]

    def wire(self) -> bytes:
        valid = [valid_frame(n, f"TERMOK{n:02d}") for n in range(1, self.before + self.after + 1)]
        middle = [] if self.mutation is None else [frame(self.mutation.apply(BASE))]
        return b"".join([*valid[: self.before], *middle, *valid[self.before :]])


_digits = st.sampled_from(list(b"0123456789"))
_bytes = st.one_of(st.integers(0, 255), _digits, st.just(ord(" ")))
_offsets = st.one_of(st.sampled_from(HOT_OFFSETS), st.integers(0, len(BASE) - 1))
mutations = st.one_of(
    st.builds(Mutation, st.just("flip"), _offsets, st.integers(0, 7)),
    st.builds(Mutation, st.just("replace"), _offsets, _bytes).filter(
        lambda m: BASE[m.offset] != m.value
    ),
    st.builds(Mutation, st.just("insert"), st.one_of(_offsets, st.just(len(BASE))), _bytes),
    st.builds(Mutation, st.just("delete"), _offsets),
    # Another MTI that still decodes: a response, a repeat, another class or version.
    st.builds(Mutation, st.just("replace"), st.integers(0, 3), _digits).filter(
        lambda m: BASE[m.offset] != m.value
    ),
)


def _joined(head: bytes, tail: bytes) -> bytes:
    return head + tail


def _frames(bodies: list[bytes], tail: bytes) -> bytes:
    return b"".join(frame(body) for body in bodies) + tail


_plausible_bodies = st.one_of(
    st.builds(_joined, st.sampled_from([b"0200", b"0210", b"0800", b"0420"]), st.binary()),
    st.builds(_joined, st.integers(0, len(BASE)).map(lambda k: BASE[:k]), st.binary(max_size=40)),
)
noise = st.one_of(
    st.builds(Noise, st.binary(max_size=200), st.just(True)),
    st.builds(Noise, _plausible_bodies, st.just(True)),
    st.builds(Noise, st.binary(max_size=200), st.just(False)),
    st.builds(
        Noise,
        st.builds(_frames, st.lists(st.binary(max_size=40), max_size=4), st.binary(max_size=8)),
        st.just(False),
    ),
)


@st.composite
def chunkings(draw: st.DrawFn) -> Chunked:
    largest = draw(st.integers(1, 24))
    return Chunked(
        before=draw(st.integers(0, 2)),
        mutation=draw(st.one_of(st.none(), mutations)),
        after=draw(st.integers(0, 2)),
        sizes=tuple(draw(st.lists(st.integers(1, largest), min_size=1, max_size=8))),
    )


# --- the model -------------------------------------------------------------------------


@dataclass
class Prediction:
    """What the proxy does with a byte stream, frame by frame."""

    inline: Counter[Answer] = field(default_factory=Counter)  # written before reading on
    spawned: Counter[Answer] = field(default_factory=Counter)  # by the request's own task
    closes: bool = False  # the proxy ends the connection by itself
    at_boundary: bool = True  # the bytes end between frames: a next request would be read
    kinds: list[Kind] = field(default_factory=list)


def predict(data: bytes) -> Prediction:
    """Frames as the proxy's framer cuts them, each decoded as the proxy decodes it."""
    framer = Framer(FRAMING)
    framer.feed(data)
    prediction = Prediction()
    while True:
        try:
            next_frame = framer.next_frame()
        except FramingError:  # bad or oversized length prefix
            prediction.closes = True
            prediction.kinds.append("closed")
            return prediction
        if next_frame is None:
            break
        if not _predict_message(next_frame.message, prediction):
            prediction.closes = True
            return prediction
    prediction.at_boundary = framer.buffered == 0
    if not prediction.at_boundary:
        prediction.kinds.append("incomplete")
    return prediction


def _predict_message(body: bytes, prediction: Prediction) -> bool:
    """Adds what one message gets; False when it closes the connection."""
    try:
        message = decode(body, SPEC)
    except DecodeError as error:
        salvage = error.salvage
        if salvage is None or not salvage.mti.is_request:
            prediction.kinds.append("closed")
            return False
        prediction.kinds.append("format_error")
        prediction.inline[(salvage.mti.response().code, "30", salvage.stan, salvage.terminal)] += 1
        return True
    mti = message.mti
    if mti.is_response:  # a response from a terminal answers nothing: dropped
        prediction.kinds.append("dropped")
        return True
    if mti.message_class in (1, 2, 4):  # carried to the switch, which approves everything
        rc = "00" if _forwardable(message) else "30"
        prediction.kinds.append("forwarded")
    else:  # the proxy's own echo test, or a message type it does not carry
        rc = "00" if mti.message_class == 8 and message.get("70") == "301" else "12"
        prediction.kinds.append("answered")
    prediction.spawned[(mti.response().code, rc, message.get("11"), message.get("41"))] += 1
    return True


def _forwardable(message: Message) -> bool:
    """Whether a request can be matched (41 and 11) and re-encoded for the switch."""
    if any(message.get(name) is None for name in MATCH_FIELDS):
        return False
    try:
        encode(message, SPEC)
    except EncodeError:
        return False
    return True


def summary(message: Message) -> Answer:
    return (message.mti.code, message.get("39"), message.get("11"), message.get("41"))


# --- the proxy on a helper thread ------------------------------------------------------


class ErrorLog(logging.Handler):
    """Keeps the proxy's ERROR records (a handler failure, an answer that could not be sent)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        taken, self.records = self.records, []
        return [f"{record.name}: {record.getMessage()}" for record in taken]


@dataclass
class Host:
    """A switch and the proxy in front of it, served by a trio loop on another thread."""

    token: trio.lowlevel.TrioToken
    app: App
    port: int
    errors: ErrorLog
    stans: Iterator[int] = field(default_factory=lambda: count(1))

    def run(self, afn: Callable[..., Awaitable[T]], *args: object) -> T:
        return trio.from_thread.run(afn, *args, trio_token=self.token)


def live_tasks() -> int:
    """Every task in this trio run, counted through the nursery tree."""

    def walk(task: trio.lowlevel.Task) -> int:
        children = (child for n in task.child_nurseries for child in n.child_tasks)
        return 1 + sum(walk(child) for child in children)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


@pytest.fixture
def host() -> Iterator[Host]:
    """One switch and one proxy for the whole test (store disabled)."""
    ready: queue.Queue[Host | None] = queue.Queue()
    stop = trio.CancelScope()
    errors = ErrorLog()
    logger = logging.getLogger("iso_proxy")
    assert logger.isEnabledFor(logging.ERROR)

    async def serve() -> None:
        with stop:
            async with trio.open_nursery() as nursery:
                switch = await start_switch(nursery)
                app, port = await start_proxy(nursery, proxy_config({"alpha": switch.port}))
                ready.put(Host(trio.lowlevel.current_trio_token(), app, port, errors))
                await trio.sleep_forever()

    logger.addHandler(errors)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="proxy") as pool:
            running = pool.submit(trio.run, serve)
            running.add_done_callback(lambda _: ready.put(None))
            started = ready.get(timeout=30)
            if started is None:
                running.result()
                pytest.fail("the proxy stopped before it started")
            endpoint = started.app.config.listen.endpoint
            assert (endpoint.spec_ref, endpoint.framing) == ("default", FRAMING)
            try:
                started.run(_warm_up, started)
                yield started
            finally:
                if not running.done():
                    trio.from_thread.run_sync(stop.cancel, trio_token=started.token)
                running.result(timeout=30)  # an exception that took the proxy down
    finally:
        logger.removeHandler(errors)


async def _warm_up(host: Host) -> None:
    """One request served before the first example measures the proxy's footprint."""
    await _bystander(host)
    await trio.testing.wait_all_tasks_blocked(0.01)


# --- one example -----------------------------------------------------------------------


async def _converse(host: Host, chunks: list[bytes], *, half_close: bool) -> list[Answer]:
    """Send `chunks` (each read by the proxy before the next goes), half-close if asked,
    and return every answer until the proxy closes the connection."""
    received = bytearray()
    stream = await trio.open_tcp_stream("127.0.0.1", host.port)
    async with stream:
        with trio.move_on_after(ANSWER_TIMEOUT) as waiting:
            try:
                for chunk in chunks:
                    await stream.send_all(chunk)
                    if len(chunks) > 1:
                        await trio.testing.wait_all_tasks_blocked()
                if half_close:
                    await stream.send_eof()
            except trio.BrokenResourceError:
                pass  # the proxy closed already; what it wrote before is still readable
            try:
                while data := await stream.receive_some(READ_SIZE):
                    received += data
            except trio.BrokenResourceError:
                pass  # reset: the proxy closed with bytes of ours unread
        assert not waiting.cancelled_caught, f"connection still open after {ANSWER_TIMEOUT}s"
    framer = Framer(FRAMING)
    framer.feed(received)
    answers = []
    while (answer := framer.next_frame()) is not None:
        answers.append(summary(decode(answer.message, SPEC)))
    assert framer.buffered == 0, "the proxy left part of a frame on the wire"
    return answers


def _check(prediction: Prediction, answers: list[Answer]) -> None:
    got = Counter(answers)
    # When the proxy closes, answers of requests it had already dispatched may be lost.
    allowed = prediction.inline + prediction.spawned
    required = prediction.inline if prediction.closes else allowed
    unexpected, missing = got - allowed, required - got
    assert not unexpected and not missing, (
        f"unexpected answers {list(unexpected.elements())}, "
        f"missing answers {list(missing.elements())}, kinds {prediction.kinds}"
    )


async def _bystander(host: Host) -> None:
    """A fresh, well-formed terminal request is still approved."""
    stan = next(host.stans)
    answers = await _converse(host, [valid_frame(stan, "BYSTAND1")], half_close=True)
    assert answers == [("0210", "00", f"{stan:06d}", "BYSTAND1")]


def _footprint(host: Host) -> tuple[int, int, int, int]:
    server = host.app.server
    return (server.connections, server.in_flight, live_tasks(), open_fds())


async def _settle(host: Host, before: tuple[int, int, int, int]) -> None:
    """Wait, by the proxy's own counters, until every connection and request is gone, then
    require tasks and file descriptors back where they were before the example."""
    with trio.move_on_after(SETTLE_TIMEOUT):
        # Nothing announces a closed connection; all tasks blocked means it is done.
        while _footprint(host) != before:
            await trio.testing.wait_all_tasks_blocked(0.001)
    assert _footprint(host) == before, "(connections, in flight, tasks, fds) changed"


def _cut(data: bytes, sizes: tuple[int, ...]) -> list[bytes]:
    """`data` in pieces of `sizes` bytes, the sizes repeated as needed."""
    chunks, start, steps = [], 0, cycle(sizes)
    while start < len(data):
        size = next(steps)
        chunks.append(data[start : start + size])
        start += size
    return chunks


def run_example(host: Host, fuzz: bytes, sizes: tuple[int, ...] = ()) -> list[Kind]:
    """Send `fuzz` (then a valid request when the connection should still be usable),
    check every answer against the model, the bystander and the baseline."""
    prediction = predict(fuzz)
    kinds = prediction.kinds
    wire = fuzz
    if not prediction.closes and prediction.at_boundary:
        wire += valid_frame(next(host.stans), "PROBE001")
        prediction = predict(wire)
    chunks = _cut(wire, sizes) if sizes else [wire]

    async def run() -> None:
        await trio.testing.wait_all_tasks_blocked()  # not mid-way through a link's echo
        before = _footprint(host)
        answers = await _converse(host, chunks, half_close=not prediction.closes)
        _check(prediction, answers)
        await _bystander(host)
        await _settle(host, before)

    host.run(run)
    assert host.errors.take() == []
    return kinds


# --- the properties ----------------------------------------------------------------------

# Fixed examples and no database, for reproducible CI. No shrinking: the inputs are small
# already, and each failing run may cost ANSWER_TIMEOUT, so shrinking could outlast the
# test timeout.
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    phases=(Phase.explicit, Phase.generate),
)


def test_one_mutation_of_a_valid_request(host: Host) -> None:
    seen: Counter[Kind] = Counter()

    @settings(FUZZ, max_examples=400)
    @given(mutation=mutations)
    @example(mutation=Mutation("replace", 2, ord("1")))  # 0210: dropped
    @example(mutation=Mutation("replace", 1, ord("3")))  # 0300: not carried, RC 12
    @example(mutation=Mutation("delete", len(BASE) - 1))  # field 49 short: RC 30
    def one(mutation: Mutation) -> None:
        seen.update(run_example(host, frame(mutation.apply(BASE))))

    one()
    assert seen.keys() >= {"format_error", "closed", "forwarded", "dropped", "answered"}, seen


def test_random_bytes_framed_and_raw(host: Host) -> None:
    seen: Counter[Kind] = Counter()

    @settings(FUZZ, max_examples=400)
    @given(noise=noise)
    @example(noise=Noise(KEY_ERROR_TRAP, framed=True))
    @example(noise=Noise(b"\xff\xff", framed=False))  # far above max_frame
    @example(noise=Noise(b"\x00\x00" * 3, framed=False))  # keep-alives only
    @example(noise=Noise(BASE[:-5], framed=True))  # truncated
    def one(noise: Noise) -> None:
        seen.update(run_example(host, noise.wire()))

    one()
    assert seen.keys() >= {"format_error", "closed", "incomplete"}, seen


def test_valid_and_mutated_frames_in_random_chunks(host: Host) -> None:
    seen: Counter[Kind] = Counter()

    @settings(FUZZ, max_examples=150)
    @given(case=chunkings())
    def one(case: Chunked) -> None:
        seen.update(run_example(host, case.wire(), case.sizes))

    one()
    assert seen.keys() >= {"format_error", "closed", "forwarded"}, seen
