"""Links: persistent connections to a switch, judged by echoes and kept up with reconnects."""

from __future__ import annotations

import itertools
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime

import trio

from codec import CodecError, Frame, Framer, Message, decode, encode, encode_frame
from proxy import decisions
from proxy.backoff import Backoff
from proxy.config import HealthConfig, SwitchConfig
from proxy.errors import ConfigError, LinkLost, NotWritten
from proxy.health import Echo, LinkHealth, LinkState, Verdict
from proxy.latency import Histogram, PeakEwma
from proxy.network import ECHO, SIGN_OFF, SIGN_ON, network_request
from proxy.responses import answer
from proxy.streams import NothingWritten, close, receive, send_whole
from proxy.tls import client_context

log = logging.getLogger("iso_proxy.upstream")

READ_SIZE = 65536
# A connection that stayed up this long was healthy: the next reconnect starts from the
# initial delay again. Shorter ones (a switch that accepts and closes) keep backing off.
STABLE_AFTER = 10.0
# Answers to a switch's own network-management requests waiting to be written; beyond
# this a flood of them is dropped rather than queued.
MAX_PENDING_REPLIES = 8
# A write that starts just before its request's deadline may still take this long: cutting
# it short would leave half a frame on the wire and cost the whole connection.
WRITE_GRACE = 1.0
# At most this many frames leave in one write: a batch that gathered during a stall must
# still fit in what is left of its writer's deadline (the rest goes in the next turns).
MAX_BATCH_FRAMES = 16
# Called with the connection's id right before a frame's first byte; may refuse (NotWritten)
# and may return what undoes it, called if the write then fails with no byte written.
BeforeWrite = Callable[[str], Callable[[], None] | None]
# Numbers for connections, unique in the process: requests are tied to a connection by its
# name, and a replaced switch's old link, still closing, has the new link's name.
_CONNECTION_NUMBERS = itertools.count(1)
# Echo round-trip times kept per link for status and percentiles.
ECHO_SAMPLES = 256

# Called by a link's reader with every transaction response it receives.
ResponseSink = Callable[["Link", Message], None]
# Called after every change of a link's state.
StateSink = Callable[["Link"], None]
# Opens a stream to a switch (TCP by default; tests pass in-memory streams).
Dialer = Callable[[SwitchConfig], Awaitable[trio.abc.Stream]]


def tcp_dialer(key_password: str | None = None) -> Dialer:
    """Opens TCP to a switch, and TLS over it when the switch's config asks for it (the
    chain and host name verified; a failed handshake is a failed connect). The TLS files
    are read at each connect, so rotated certificates take effect at the next one."""

    async def dial(switch: SwitchConfig) -> trio.abc.Stream:
        stream = await trio.open_tcp_stream(switch.host, switch.port)
        if switch.tls is None:
            return stream
        try:
            context = client_context(switch.tls, key_password, f"switch {switch.name}")
            secure = trio.SSLStream(stream, context, server_hostname=switch.tls.server_name)
            await secure.do_handshake()
        except ConfigError as error:
            await trio.aclose_forcefully(stream)
            raise ConnectionError(str(error)) from None
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(stream)
            cause = exc.__cause__
            reason = getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
            reason = str(reason or "connection lost").lower().replace("_", " ")
            log.warning("switch %s: TLS handshake failed: %s", switch.name, reason)
            raise ConnectionError(f"TLS handshake failed: {reason}") from None
        except BaseException:  # cancelled (the connect timeout): never leave the socket
            await trio.aclose_forcefully(stream)
            raise
        return secure

    return dial


dial_tcp = tcp_dialer()


class _Exchange:
    """One of the link's own 0800s, waiting for its 0810."""

    __slots__ = ("answer", "event")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.answer: Message | None = None


class _Entry:
    """A frame waiting in a batch, and why it was not written, if it was not."""

    __slots__ = ("before_write", "data", "deadline", "refusal", "traffic", "undo")

    def __init__(
        self,
        data: bytes,
        deadline: float,
        before_write: BeforeWrite | None,
        traffic: bool,
    ) -> None:
        self.data = data
        self.deadline = deadline
        self.before_write = before_write
        self.traffic = traffic
        self.refusal: Exception | None = None
        self.undo: Callable[[], None] | None = None  # before_write's, if nothing is written


class _Batch:
    """Frames written together, in one write. `turn`: the write before it ended, this one
    goes now (its first frame's sender writes it); `written`: it ended (each entry's
    `refusal` says how it went for that frame)."""

    __slots__ = ("entries", "turn", "written")

    def __init__(self, entries: list[_Entry]) -> None:
        self.entries = entries
        self.turn = trio.Event()
        self.written = trio.Event()


class Link:
    """One persistent connection to a switch.

    `run` connects, signs on when configured, probes with echoes, reads answers and
    reconnects with backoff until cancelled. Only an UP link carries traffic. `send` writes
    one whole frame or raises: `NotWritten` when no byte left (safe to fail over),
    `LinkLost` when the write broke part-way (the request may have reached the switch).
    Each TCP connection has its own `connection` id: a reconnect is a new connection.
    """

    def __init__(
        self,
        switch: SwitchConfig,
        index: int,
        health: HealthConfig,
        stans: Iterator[str],
        on_response: ResponseSink,
        on_state: StateSink,
        rng: random.Random,
        dial: Dialer = dial_tcp,
    ) -> None:
        self.switch = switch
        self.name = f"{switch.name}/{index}"
        self.state = LinkState.CONNECTING
        self.connects = 0
        self.connection = ""
        self.latency = PeakEwma()
        self.echo_rtts: deque[float] = deque(maxlen=ECHO_SAMPLES)
        self.echo_histogram = Histogram()
        self.echoes_failed = 0
        self._health_config = health
        self._health = LinkHealth(health)
        self._stans = stans
        self._on_response = on_response
        self._on_state = on_state
        self._rng = rng
        self._dial = dial
        self._backoff = Backoff(switch.reconnect.initial_delay, switch.reconnect.max_delay)
        self._stream: trio.abc.Stream | None = None
        self._serving = trio.CancelScope()
        self._writing: trio.abc.Stream | None = None  # the stream a write is going to
        self._waiting: deque[_Batch] = deque()  # frames waiting for that write to end
        self._exchanges: dict[str, _Exchange] = {}
        self._pending_replies = 0
        self._signed_on = False
        self._up_since: float | None = None
        self._failing: str | None = None  # why the last connect attempts failed

    @property
    def is_up(self) -> bool:
        return self.state is LinkState.UP

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the link connected until cancelled; ready as soon as the first attempt ends."""
        attempt = 0
        while True:
            stream = await self._connect()
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            if stream is not None:
                self._up_since = None
                try:
                    try:
                        with self._serving:
                            await self._serve(stream)
                    except* trio.Cancelled:  # shutting down (a recycle is caught by _serving)
                        await self._sign_off()
                        raise
                except Exception as exc:  # a bug must cost one connection, not the whole pool
                    log.error("link %s: internal error: %s", self.name, type(exc).__name__)
                finally:
                    await self._close(stream)
                up_since = self._up_since
                if up_since is not None and trio.current_time() - up_since >= STABLE_AFTER:
                    attempt = 0
            await trio.sleep(self._backoff.delay(attempt, self._rng))
            attempt += 1

    def recycle(self) -> None:
        """Drop the current connection (its written requests fail) and reconnect."""
        self._serving.cancel()

    def transaction_done(self, connection: str, answered: bool, rtt: float) -> None:
        """A transaction written on `connection` was answered (after `rtt`) or timed out."""
        if connection != self.connection:
            return
        if answered:
            self.latency.observe(rtt, trio.current_time())
        if self._health.transaction(answered) is Verdict.DROP:
            log.warning("link %s: transactions keep timing out; reconnecting", self.name)
            self.recycle()

    async def send(
        self,
        message: Message,
        *,
        deadline: float,
        before_write: BeforeWrite | None = None,
        traffic: bool = True,
    ) -> None:
        """Write `message` as one frame, starting before `deadline`.

        A transaction (`traffic`) needs the link UP; the link's own network-management
        messages only need it connected. `before_write(connection)` runs right before the
        first byte and may refuse by raising NotWritten; what it returns is called if the
        write then fails with no byte written (NotWritten then: safe to fail over). Raises
        CodecError when the message does not fit this switch's spec.

        A frame the socket takes at once leaves in one system call (`send_whole`). Frames
        that come while a write is still on the wire (the socket was full) wait and leave
        together, in one write, when it is done (`_Batch`).
        """
        data = self._frame(message)
        stream = self._stream
        if stream is None or (traffic and not self.is_up):
            raise NotWritten(f"link {self.name} is not up")
        entry = _Entry(data, deadline, before_write, traffic)
        if self._writing is None:  # nothing on the wire: write at once
            self._writing = stream
            await self._write(stream, _Batch([entry]))
        elif self._writing is stream:
            await self._ride(stream, entry)
        else:  # the last connection's final write is still going
            raise NotWritten(f"link {self.name} is reconnecting")
        if entry.refusal is not None:
            raise entry.refusal

    async def _ride(self, stream: trio.abc.Stream, entry: _Entry) -> None:
        """Join the batch that leaves when the write on the wire is done, and wait for its
        turn: give up, unwritten, if it does not come by the deadline. When it comes, the
        batch's first frame's sender writes it."""
        if not self._waiting or len(self._waiting[-1].entries) >= MAX_BATCH_FRAMES:
            self._waiting.append(_Batch([]))
        batch = self._waiting[-1]
        batch.entries.append(entry)
        try:
            with trio.move_on_at(entry.deadline):
                await batch.turn.wait()
        except BaseException:  # cancelled
            if not batch.turn.is_set():
                batch.entries.remove(entry)
            elif not batch.written.is_set() and batch.entries[0] is entry:  # others wait
                with trio.CancelScope(shield=True):
                    await self._write(stream, batch)
            raise
        if not batch.turn.is_set():
            batch.entries.remove(entry)
            raise NotWritten(f"link {self.name}: no turn to write before the deadline")
        if batch.written.is_set():  # settled unwritten: the connection went
            return
        if batch.entries[0] is entry:
            await self._write(stream, batch)
        else:
            await batch.written.wait()  # a cancel here leaves its frame to the writer

    async def _write(self, stream: trio.abc.Stream, batch: _Batch) -> None:
        """Write `batch`, then give the next batch its turn (or end the writing). Never
        interrupted: the write is shielded, and bounded."""
        try:
            await self._write_batch(stream, batch)
        finally:
            batch.written.set()
            if self._stream is not stream:  # the connection went: nothing waiting can go
                self._refuse_waiting()
            while self._waiting and not self._waiting[0].entries:  # all gave up
                self._waiting.popleft()
            if self._waiting:
                self._waiting.popleft().turn.set()
            else:
                self._writing = None

    def _refuse_waiting(self) -> None:
        """Settle every waiting batch unwritten, at once (not a turn at a time)."""
        for waiting in self._waiting:
            for entry in waiting.entries:
                entry.refusal = NotWritten(f"link {self.name} is not up")
            waiting.turn.set()
            waiting.written.set()
        self._waiting.clear()

    async def _write_batch(self, stream: trio.abc.Stream, batch: _Batch) -> None:
        now = trio.current_time()
        data = bytearray()
        for entry in batch.entries:
            try:
                if self._stream is not stream or (entry.traffic and not self.is_up):
                    raise NotWritten(f"link {self.name} is not up")
                if now >= entry.deadline:
                    raise NotWritten(f"link {self.name}: deadline passed before the write")
                if entry.before_write is not None:
                    entry.undo = entry.before_write(self.connection)
            except Exception as refusal:  # NotWritten, or a fault of that frame's own
                entry.refusal = refusal
                continue
            data += entry.data
        if not data:
            return
        # Bounded by the writer's own deadline (whoever waits for it is bounded too): a
        # switch that stops reading cannot hold the writer forever.
        writer_deadline = max(batch.entries[0].deadline, now + WRITE_GRACE)
        try:
            failure = None if await send_whole(stream, data, writer_deadline) else "timed out"
        except NothingWritten as error:  # none of these frames left: each may go elsewhere
            log.warning("link %s: write refused before any byte left (%s)", self.name, error)
            # No await from the claims (before_write) to here and on into _close, which
            # takes the connection down before its first: no reader can fail these
            # requests, nor another be claimed on the connection, in between.
            try:
                for entry in batch.entries:
                    if entry.refusal is None:
                        entry.refusal = NotWritten(f"link {self.name} broke before the write")
                        if entry.undo is not None:
                            entry.undo()
            finally:
                await self._close(stream)
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            failure = f"failed ({error})"
        if failure is not None:
            log.warning("link %s: write %s", self.name, failure)
            # The frames may be partly on the wire: the stream is unusable from here on.
            await self._close(stream)
            for entry in batch.entries:  # an error each: each is raised in its own task
                entry.refusal = entry.refusal or LinkLost(
                    f"write to link {self.name} {failure}", switch=self.switch.name
                )

    def _frame(self, message: Message) -> bytes:
        endpoint = self.switch.endpoint
        return encode_frame(
            endpoint.framing, Frame(encode(message, endpoint.spec), self.switch.tpdu)
        )

    async def _connect(self) -> trio.abc.Stream | None:
        self._set_state(LinkState.CONNECTING)
        with trio.move_on_after(self.switch.connect_timeout):
            try:
                stream = await self._dial(self.switch)
            except OSError as exc:
                self._connect_failed(_why(exc))
                return None
            self._stream = stream
            self.connects += 1
            self.connection = f"{self.name}#{next(_CONNECTION_NUMBERS)}"
            self._serving = trio.CancelScope()
            self._health = LinkHealth(self._health_config)
            self._signed_on = False
            self._failing = None
            log.info("link %s: connected; on probation", self.name)
            return stream
        self._connect_failed("timed out")
        return None

    def _connect_failed(self, reason: str) -> None:
        """A failed attempt: a warning when the reason is new (a wrong host name or a
        refused port must show at the default log level), DEBUG while it repeats."""
        level = logging.DEBUG if reason == self._failing else logging.WARNING
        log.log(level, "link %s: connect to %s:%d failed: %s",
                self.name, self.switch.host, self.switch.port, reason)  # fmt: skip
        self._failing = reason
        self._set_state(LinkState.DOWN)

    async def _serve(self, stream: trio.abc.Stream) -> None:
        """Read and probe until the switch closes, the stream breaks or the link is dropped."""
        async with trio.open_nursery() as tasks:
            tasks.start_soon(self._probe, stream)
            framer = Framer(self.switch.endpoint.framing)
            read_full = False  # the last read filled its buffer: more may be waiting
            try:
                while True:
                    frame = framer.next_frame()
                    if frame is None:
                        data = await receive(stream, READ_SIZE, more_waiting=read_full)
                        read_full = len(data) == READ_SIZE
                        if not data:
                            log.warning("link %s: closed by the switch", self.name)
                            break
                        framer.feed(data)
                        continue
                    self._dispatch(decode(frame.message, self.switch.endpoint.spec), tasks)
            except CodecError as exc:
                log.warning("link %s: bad frame from the switch (%s); reconnecting", self.name, exc)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                log.warning("link %s: connection lost", self.name)
            # Down first, so nothing waits on replies still being written to a dead stream.
            await self._close(stream)
            tasks.cancel_scope.cancel()

    async def _probe(self, stream: trio.abc.Stream) -> None:
        """Sign on if configured, then echo at the health cadence; act on each verdict."""
        if self.switch.sign_on:
            reply, _ = await self._exchange(SIGN_ON)
            if reply is None or reply.get("39") != decisions.APPROVED:
                log.warning("link %s: sign-on not approved; reconnecting", self.name)
                self.recycle()
                return
            self._signed_on = True
        next_echo = trio.current_time()
        while True:
            reply, rtt = await self._exchange(ECHO)
            if reply is None:
                outcome = Echo.UNANSWERED if rtt is not None else Echo.DECLINED
            elif reply.get("39") == decisions.APPROVED:
                outcome = Echo.APPROVED
            else:
                outcome = Echo.DECLINED
            if outcome is Echo.APPROVED and rtt is not None:
                self.echo_rtts.append(rtt)
                self.echo_histogram.observe(rtt)
                self.latency.observe(rtt, trio.current_time())
            else:
                self.echoes_failed += 1
            verdict = self._health.echo(outcome)
            if verdict is Verdict.UP and self._stream is stream:  # not if it just closed
                log.info("link %s: up", self.name)
                self._up_since = trio.current_time()
                self._set_state(LinkState.UP)
            elif verdict is Verdict.DROP:
                log.warning("link %s: echoes failing; reconnecting", self.name)
                self.recycle()
                return
            next_echo = max(next_echo + self._health.next_echo_in(), trio.current_time())
            await trio.sleep_until(next_echo)

    async def _exchange(self, code: str) -> tuple[Message | None, float | None]:
        """Send one of the link's own 0800s. Its 0810, or None when it did not come within
        echo_timeout; the round trip from the write, or None when it could not be sent."""
        stan = next(self._stans)
        pending = _Exchange()
        self._exchanges[stan] = pending
        deadline = trio.current_time() + self._health_config.echo_timeout
        written_at: list[float] = []

        def writing(_: str) -> Callable[[], None]:
            written_at.append(trio.current_time())
            return written_at.clear  # no byte written after all

        try:
            await self.send(
                network_request(code, stan, datetime.now(UTC)),
                deadline=deadline,
                before_write=writing,
                traffic=False,
            )
            with trio.move_on_at(deadline):
                await pending.event.wait()
        except (NotWritten, LinkLost, CodecError) as exc:
            log.warning("link %s: 0800/%s not sent: %s", self.name, code, exc)
        finally:
            del self._exchanges[stan]
        if not written_at:
            return None, None
        return pending.answer, trio.current_time() - written_at[0]

    async def _sign_off(self) -> None:
        """On a clean shutdown, tell the switch, then half-close and drain until it closes
        (or echo_timeout passes) so the sign-off is not lost to a reset."""
        stream = self._stream
        if not self._signed_on or stream is None:
            return
        with trio.CancelScope(shield=True):
            deadline = trio.current_time() + self._health_config.echo_timeout
            try:
                message = network_request(SIGN_OFF, next(self._stans), datetime.now(UTC))
                await self.send(message, deadline=deadline, traffic=False)
            except (NotWritten, LinkLost, CodecError) as exc:
                log.warning("link %s: sign-off not sent: %s", self.name, exc)
                return
            with trio.move_on_at(deadline):
                try:
                    if isinstance(stream, trio.abc.HalfCloseableStream):
                        await stream.send_eof()
                    while await stream.receive_some(READ_SIZE):
                        pass
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

    def _dispatch(self, message: Message, tasks: trio.Nursery) -> None:
        decision = decisions.from_switch(message)
        if decision.action is decisions.Action.MATCH:
            self._on_response(self, message)
        elif decision.action is decisions.Action.OWN:
            pending = self._exchanges.get(message.get("11") or "")
            if pending is None or pending.event.is_set():
                log.warning("link %s: unexpected %s dropped", self.name, message.mti)
                return
            pending.answer = message
            pending.event.set()
        elif decision.action is decisions.Action.ANSWER and decision.rc is not None:
            if self._pending_replies >= MAX_PENDING_REPLIES:
                log.warning("link %s: %s from the switch dropped (flood)", self.name, message.mti)
                return
            self._pending_replies += 1
            tasks.start_soon(self._reply, answer(message, decision.rc), decision.drop_link)
        else:
            log.warning("link %s: dropped %s (%s)", self.name, message.mti, decision.reason)

    async def _reply(self, message: Message, then_drop: bool) -> None:
        """Answer the switch without holding up the reader (it may be waiting to write)."""
        try:
            deadline = trio.current_time() + self._health_config.echo_timeout
            await self.send(message, deadline=deadline, traffic=False)
        except (NotWritten, LinkLost, CodecError) as exc:
            log.warning("link %s: %s to the switch not sent: %s", self.name, message.mti, exc)
        finally:
            self._pending_replies -= 1
        if then_drop:
            log.warning("link %s: the switch signed off; reconnecting", self.name)
            self.recycle()

    async def _close(self, stream: trio.abc.Stream) -> None:
        """Mark the link down (once per connection) and close `stream`."""
        if self._stream is stream:
            self._stream = None
            self._signed_on = False
        if self._stream is None and self.state is not LinkState.DOWN:
            log.warning("link %s: down", self.name)
            self._set_state(LinkState.DOWN)
        with trio.CancelScope(shield=True):
            await close(stream)  # under TLS, a close_notify to a switch that may not read

    def _set_state(self, state: LinkState) -> None:
        self.state = state
        self._on_state(self)


def _why(error: OSError) -> str:
    """The reason a connect failed: "Connection refused" rather than trio's summary of
    the attempts (the underlying errors are its cause)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, BaseExceptionGroup):
            cause = cause.exceptions[0]
        elif isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        else:
            cause = cause.__cause__
    return str(error)
