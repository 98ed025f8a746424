"""The terminal-facing listener: one task per connection, many requests in flight on each.

Every connection passes, in order: a profile that may take its address, the connection
caps, the TLS handshake (with its deadline), the profile that takes its certificate.
Every message then passes the frame deadline and size, decoding, the profile's allowed
MTIs and its rate. Each refusal is counted by reason (`Rejection`) and logged at DEBUG
only, so a flood of bad input cannot flood the logs as well.
"""

from __future__ import annotations

import contextlib
import logging
import math
import ssl
from collections import Counter
from collections.abc import Callable

import trio

from codec import (
    CodecError,
    DecodeError,
    Frame,
    Framer,
    FramingError,
    Message,
    decode,
    encode,
    encode_frame,
    swap_tpdu,
)
from proxy.access import (
    NOT_PERMITTED,
    Address,
    Admission,
    Rejection,
    address_of,
    effective,
    match,
    may_match,
    permits,
    spends_token,
)
from proxy.config import ClientProfile, ListenConfig
from proxy.decisions import FORMAT_ERROR, SYSTEM_MALFUNCTION
from proxy.forwarder import Forwarder, Reply
from proxy.responses import answer, answer_salvaged
from proxy.streams import close, receive, send_whole
from proxy.tls import cert_names
from proxy.watch import Watch

log = logging.getLogger("iso_proxy.server")

READ_SIZE = 16384
# Frames a reader takes from one read before it lets other tasks run: refusals are answered
# and requests dispatched without a checkpoint each, and 16 KiB can hold hundreds.
FRAMES_PER_TURN = 16


class Server:
    """Accepts terminal connections and serves each until it closes."""

    def __init__(
        self,
        listen: ListenConfig,
        clients: tuple[ClientProfile, ...],
        forwarder: Forwarder,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._listen = listen
        self._profiles = effective(clients)
        self._forwarder = forwarder
        if (tls is None) != (listen.tls is None):
            raise ValueError("a TLS context goes with listen.tls")
        self._tls = tls
        self._handshake_timeout = listen.tls.handshake_timeout if listen.tls else 0.0
        self.admission = Admission(listen.max_connections, listen.max_connections_per_ip)
        self.rejections: Counter[Rejection] = Counter()
        self.in_flight = 0  # requests taken from terminals and not answered yet
        self.draining = False  # stopping: no new connections
        self._settled = Watch()  # a request was answered
        self._admissions = Watch()  # a connection came or went, or was refused
        self._accepting = trio.CancelScope()
        if not clients:
            log.warning("no client profiles configured: accepting loopback clients only")

    @property
    def connections(self) -> int:
        return self.admission.connections

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; reports the bound port (useful with port 0)."""
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(self._listen.port, host=self._listen.host)
            port: int = listeners[0].socket.getsockname()[1]
            log.info(
                "listening on %s:%d%s",
                self._listen.host,
                port,
                " (TLS)" if self._tls is not None else "",
            )
            nursery.start_soon(self._accept, listeners, nursery)
            task_status.started(port)

    async def _accept(self, listeners: list[trio.SocketListener], nursery: trio.Nursery) -> None:
        with self._accepting:
            await trio.serve_listeners(self._serve, listeners, handler_nursery=nursery)
        for listener in listeners:
            await listener.aclose()

    async def drain(self, grace: float) -> bool:
        """Stop accepting connections and wait (at most `grace` seconds) until every request
        taken is answered. Whether it got there."""
        self.draining = True
        self._accepting.cancel()
        log.info("draining: %d request(s) in flight", self.in_flight)
        with trio.move_on_after(grace):
            await self._settled.wait_until(lambda: not self.in_flight)
            return True
        return False

    def request_started(self) -> None:
        self.in_flight += 1

    def request_done(self) -> None:
        self.in_flight -= 1
        self._settled.changed()

    def reject(self, reason: Rejection) -> None:
        self.rejections[reason] += 1
        self._admissions.changed()
        log.debug("rejected: %s", reason)

    async def refuse(self, stream: trio.abc.AsyncResource, reason: Rejection) -> None:
        """Count a refusal and close the connection it ends."""
        self.reject(reason)
        await close(stream)

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until `condition()` holds; checked when connections come, go or are refused
        and when a refusal is counted."""
        await self._admissions.wait_until(condition)

    async def _serve(self, stream: trio.SocketStream) -> None:
        try:
            await self._admit(stream)
        except Exception as exc:  # a handler's failure must never take the server down
            log.error("connection failed: %s", _innermost(exc))
            await close(stream)

    async def _admit(self, stream: trio.SocketStream) -> None:
        try:
            address = address_of(stream.socket.getpeername()[0])
        except (OSError, ValueError):  # gone already, or not an IP peer
            await close(stream)
            return
        refusal = None if may_match(self._profiles, address) else Rejection.NO_PROFILE
        refusal = refusal or self.admission.admit(address, trio.current_time())
        if refusal is not None:
            await self.refuse(stream, refusal)
            return
        self._admissions.changed()
        try:
            await self._serve_admitted(stream, address)
        finally:
            self.admission.release(address, trio.current_time())
            self._admissions.changed()

    async def _serve_admitted(self, tcp: trio.SocketStream, address: Address) -> None:
        stream: trio.abc.Stream = tcp
        names: frozenset[str] = frozenset()
        tap = None
        if self._tls is not None:
            tap = _CiphertextTap(tcp)
            secure = trio.SSLStream(tap, self._tls, server_side=True)
            refusal = await self._handshake(secure)
            if refusal is not None:
                await self.refuse(secure, refusal)
                return
            stream = secure
            names = cert_names(secure.getpeercert())
        profile = match(self._profiles, address, names)
        if profile is None:
            await self.refuse(stream, Rejection.NO_PROFILE)
            return
        try:
            connection = _Connection(stream, self._listen, profile, address, self._forwarder, self)
            if tap is not None:
                tap.on_arrival = connection.ciphertext_arrived
            await connection.run()
        finally:
            await close(stream)

    async def _handshake(self, stream: trio.SSLStream[_CiphertextTap]) -> Rejection | None:
        with trio.move_on_after(self._handshake_timeout):
            try:
                await stream.do_handshake()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return Rejection.TLS_HANDSHAKE
            return None
        return Rejection.HANDSHAKE_TIMEOUT


def _innermost(error: BaseException) -> str:
    """The name of the error inside the nursery groups it may come wrapped in."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return type(error).__name__


class _CiphertextTap(trio.abc.Stream):
    """The TCP stream under TLS, telling the connection when bytes arrive: a frame
    trickled inside one TLS record shows no plaintext until the record is whole, and its
    frame deadline must run from its first byte all the same."""

    def __init__(self, transport: trio.SocketStream) -> None:
        self.transport = transport
        self.on_arrival: Callable[[], None] = _nothing

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.transport.receive_some(max_bytes)
        if data:
            self.on_arrival()
        return data

    async def aclose(self) -> None:
        await self.transport.aclose()


async def _acquire(resource: trio.Lock | trio.Semaphore) -> None:
    """Acquire `resource`: at once, with no scheduler pass, when it is free (nearly always
    on the hot path), else by waiting for it."""
    try:
        resource.acquire_nowait()
    except trio.WouldBlock:
        await resource.acquire()


def _nothing() -> None:
    return None


class _Connection:
    """One terminal connection: a reader, a task per request, frames written whole."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        listen: ListenConfig,
        profile: ClientProfile,
        address: Address,
        forwarder: Forwarder,
        server: Server,
    ) -> None:
        self._server = server
        self._stream = stream
        self._listen = listen
        self._profile = profile
        self._address = address
        self._endpoint = listen.endpoint
        self._forwarder = forwarder
        self._write_lock = trio.Lock()
        self._in_flight = trio.Semaphore(listen.max_inflight_per_connection)
        self._waiting: trio.CancelScope | None = None  # the reader, waiting for bytes
        self._read_full = False  # the last read filled its buffer: more may be waiting
        self._ciphertext_since: float | None = None  # TLS bytes came, no plaintext yet

    def ciphertext_arrived(self) -> None:
        """Bytes came under TLS: if the reader waits, the frame deadline starts now."""
        if self._waiting is not None and self._ciphertext_since is None:
            now = trio.current_time()
            self._ciphertext_since = now
            deadline = now + self._listen.frame_timeout
            self._waiting.deadline = min(self._waiting.deadline, deadline)

    async def run(self) -> None:
        # When reading stops, requests in flight still run to completion: a terminal that
        # half-closed its side still gets every answer.
        async with trio.open_nursery() as nursery:
            await self._read(nursery)

    async def _read(self, nursery: trio.Nursery) -> None:
        framer = Framer(self._endpoint.framing)
        partial_since: float | None = None  # when the reader met an unfinished frame
        taken = 0  # frames taken since the reader last let other tasks run
        try:
            while True:
                frame = framer.next_frame()
                if frame is None:
                    taken = 0
                    # The clock starts when the reader is ready for the rest: not while
                    # it was held back by the in-flight cap with those bytes unread.
                    if not framer.buffered:
                        partial_since = None
                    elif partial_since is None:
                        partial_since = trio.current_time()
                    data = await self._receive(partial_since)
                    if not data:
                        return
                    framer.feed(data)
                    continue
                partial_since = None
                taken += 1
                if taken % FRAMES_PER_TURN == 0:  # a burst in one read must not hold the loop
                    await trio.lowlevel.checkpoint()
                if not await self._take(frame, nursery):
                    return
        except FramingError as exc:
            log.debug("closing connection: %s", exc)
            await self._close(Rejection.BAD_FRAME)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    async def _receive(self, partial_since: float | None) -> bytes | bytearray | None:
        """The next bytes; b"" when the terminal closed, None when its time ran out: a frame
        begun and not finished by the frame deadline, or nothing at all (and no answer
        owed) for the idle timeout."""
        while True:
            if partial_since is not None:
                deadline = partial_since + self._listen.frame_timeout
            else:
                deadline = trio.current_time() + self._listen.idle_timeout
            self._ciphertext_since = None
            waiting = self._waiting = trio.CancelScope(deadline=deadline)
            with waiting:
                try:
                    data = await receive(self._stream, READ_SIZE, more_waiting=self._read_full)
                    self._read_full = len(data) == READ_SIZE
                    return data
                finally:
                    self._waiting = None
            if partial_since is not None or self._ciphertext_since is not None:
                await self._close(Rejection.FRAME_TIMEOUT)
                return None
            if self._in_flight.value == self._listen.max_inflight_per_connection:
                await self._close(Rejection.IDLE_TIMEOUT)
                return None

    async def _take(self, frame: Frame, nursery: trio.Nursery) -> bool:
        """Decode a frame and answer or dispatch it; False when the connection is closed."""
        try:
            message = decode(frame.message, self._endpoint.spec)
        except DecodeError as exc:
            salvage = exc.salvage
            if salvage is None or not salvage.mti.is_request:
                log.debug("closing connection: undecodable message (%s)", exc)
                await self._close(Rejection.UNDECODABLE)
                return False
            log.debug("format error from terminal %r: %s", salvage.terminal, exc)
            self._server.reject(Rejection.FORMAT_ERROR)
            await self._reply(None, answer_salvaged(salvage, FORMAT_ERROR), frame.tpdu)
            return True
        if message.mti.is_response:
            self._server.reject(Rejection.RESPONSE_FROM_TERMINAL)
            return True
        if message.mti.is_request:
            refusal = self._refusal(message)
            if refusal is not None:
                self._server.reject(refusal)
                rc = NOT_PERMITTED if refusal is Rejection.NOT_PERMITTED else self._profile.rate_rc
                await self._reply(message, answer(message, rc), frame.tpdu)
                return True
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled reader dispatches no more
        await _acquire(self._in_flight)  # backpressure: stop reading at the cap
        nursery.start_soon(self._handle, message, frame.tpdu)
        return True

    def _refusal(self, request: Message) -> Rejection | None:
        if not permits(self._profile, request.mti):
            return Rejection.NOT_PERMITTED
        if spends_token(request.mti) and not self._server.admission.allow(
            self._address, self._profile, trio.current_time()
        ):
            return Rejection.RATE_LIMITED
        return None

    async def _close(self, reason: Rejection) -> None:
        await self._server.refuse(self._stream, reason)

    async def _handle(self, request: Message, tpdu: bytes | None) -> None:
        self._server.request_started()
        slot_held = True  # one of the connection's in-flight slots, taken by `_read`
        try:
            try:
                reply = await self._forwarder.handle(request)
            except Exception as exc:  # one request's failure must not cancel its neighbours
                log.error("%s failed inside the proxy: %s", request.mti, type(exc).__name__)
                reply = Reply(answer(request, SYSTEM_MALFUNCTION))
            if reply is None:
                return
            delivered = False
            try:
                delivered = await self._reply(request, reply.message, tpdu, reply.write_by)
            finally:  # settled even when cancelled mid-write: it may owe a reversal
                # The terminal has its answer (or never will): its next request may be
                # read while a reversal is queued, which may take retries.
                self._in_flight.release()
                slot_held = False
                if reply.receipt is not None:
                    if delivered and not reply.stands_in:
                        await self._forwarder.delivered(reply.receipt)
                    else:
                        await self._forwarder.undelivered(reply.receipt)
        finally:
            if slot_held:
                self._in_flight.release()
            self._server.request_done()

    async def _reply(
        self,
        request: Message | None,
        response: Message,
        tpdu: bytes | None,
        by: float | None = None,
    ) -> bool:
        """Send `response` (one the terminal's format cannot carry becomes RC 96); whether
        the terminal got `response` itself. With `by`, it is written by then or not at all
        (see `_write`)."""
        try:
            data = self._frame(response, tpdu)
        except CodecError as exc:
            log.error("%s answer does not fit the terminal's format: %s", response.mti, exc)
            if request is not None:
                with contextlib.suppress(CodecError):
                    await self._write(
                        self._frame(answer(request, SYSTEM_MALFUNCTION), tpdu), response, by
                    )
            return False
        return await self._write(data, response, by)

    def _frame(self, message: Message, tpdu: bytes | None) -> bytes:
        return encode_frame(
            self._endpoint.framing,
            Frame(encode(message, self._endpoint.spec), swap_tpdu(tpdu) if tpdu else None),
        )

    async def _write(self, data: bytes, message: Message, by: float | None = None) -> bool:
        """Write one whole frame (a cancel never leaves half a frame on the wire); whether
        it was written. Most answers leave in one system call (`send_whole`); what the
        socket cannot take at once follows under the write deadline, or by `by` when that
        is sooner (an answer not begun by then is not written at all)."""
        if by is None:
            await _acquire(self._write_lock)
        else:
            with trio.move_on_at(by) as waited:
                await _acquire(self._write_lock)
            if waited.cancelled_caught:  # not begun: nothing of it on the wire
                log.warning("answer %s undelivered: earlier answers still wait", message.mti)
                return False
        try:
            deadline = trio.current_time() + self._listen.write_timeout
            if by is not None:
                deadline = min(deadline, by)
            try:
                written = await send_whole(self._stream, data, deadline)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.warning("answer %s undelivered: terminal gone", message.mti)
                return False
            if not written:  # closed before another answer can follow half a frame
                log.debug("terminal not reading; closing connection")
                with trio.move_on_at(by if by is not None else math.inf):  # closed at once
                    await self._server.refuse(self._stream, Rejection.WRITE_TIMEOUT)
            return written
        finally:
            self._write_lock.release()
