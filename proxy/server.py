"""The terminal-facing listener: one task per connection, many requests in flight on each."""

from __future__ import annotations

import contextlib
import logging

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
from proxy.config import ListenConfig
from proxy.decisions import FORMAT_ERROR, SYSTEM_MALFUNCTION
from proxy.forwarder import Forwarder, Reply
from proxy.responses import answer, answer_salvaged
from proxy.watch import Watch

log = logging.getLogger("iso_proxy.server")

READ_SIZE = 16384


class Server:
    """Accepts terminal connections and serves each until it closes."""

    def __init__(self, listen: ListenConfig, forwarder: Forwarder) -> None:
        self._listen = listen
        self._forwarder = forwarder
        self.connections = 0
        self.malformed = 0  # frames from terminals answered RC 30 or closing their connection
        self.in_flight = 0  # requests taken from terminals and not answered yet
        self._settled = Watch()  # a request was answered
        self._accepting = trio.CancelScope()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; reports the bound port (useful with port 0)."""
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(self._listen.port, host=self._listen.host)
            port: int = listeners[0].socket.getsockname()[1]
            log.info("listening on %s:%d", self._listen.host, port)
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

    def count_malformed(self) -> None:
        self.malformed += 1

    async def _serve(self, stream: trio.SocketStream) -> None:
        if self.connections >= self._listen.max_connections:
            log.warning("connection refused: %d connections open", self.connections)
            await stream.aclose()
            return
        self.connections += 1
        try:
            async with stream:
                await _Connection(stream, self._listen, self._forwarder, self).run()
        except Exception as exc:  # a handler's failure must never take the server down
            log.error("connection failed: %s", type(exc).__name__)
        finally:
            self.connections -= 1


class _Connection:
    """One terminal connection: a reader, a task per request, frames written whole."""

    def __init__(
        self,
        stream: trio.SocketStream,
        listen: ListenConfig,
        forwarder: Forwarder,
        server: Server,
    ) -> None:
        self._server = server
        self._stream = stream
        self._listen = listen
        self._endpoint = listen.endpoint
        self._forwarder = forwarder
        self._write_lock = trio.Lock()
        self._in_flight = trio.Semaphore(listen.max_inflight_per_connection)

    async def run(self) -> None:
        # When reading stops, requests in flight still run to completion: a terminal that
        # half-closed its side still gets every answer.
        async with trio.open_nursery() as nursery:
            await self._read(nursery)

    async def _read(self, nursery: trio.Nursery) -> None:
        framer = Framer(self._endpoint.framing)
        try:
            while True:
                frame = framer.next_frame()
                if frame is None:
                    data = await self._stream.receive_some(READ_SIZE)
                    if not data:
                        return
                    framer.feed(data)
                    continue
                try:
                    message = decode(frame.message, self._endpoint.spec)
                except DecodeError as exc:
                    salvage = exc.salvage
                    if salvage is None or not salvage.mti.is_request:
                        log.warning("closing connection: undecodable message (%s)", exc)
                        self._server.count_malformed()
                        await self._stream.aclose()
                        return
                    log.warning("format error from terminal %r: %s", salvage.terminal, exc)
                    self._server.count_malformed()
                    await self._reply(None, answer_salvaged(salvage, FORMAT_ERROR), frame.tpdu)
                    continue
                await self._in_flight.acquire()  # backpressure: stop reading at the cap
                nursery.start_soon(self._handle, message, frame.tpdu)
        except FramingError as exc:
            log.warning("closing connection: %s", exc)
            self._server.count_malformed()
            await self._stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    async def _handle(self, request: Message, tpdu: bytes | None) -> None:
        self._server.request_started()
        try:
            try:
                reply = await self._forwarder.handle(request)
            except Exception as exc:  # one request's failure must not cancel its neighbours
                log.error("%s failed inside the proxy: %s", request.mti, type(exc).__name__)
                reply = Reply(answer(request, SYSTEM_MALFUNCTION))
            if reply is None:
                return
            delivered = await self._reply(request, reply.message, tpdu)
            if reply.receipt is not None:
                if delivered:
                    self._forwarder.delivered(reply.receipt)
                else:
                    await self._forwarder.undelivered(reply.receipt)
        finally:
            self._in_flight.release()
            self._server.request_done()

    async def _reply(self, request: Message | None, response: Message, tpdu: bytes | None) -> bool:
        """Send `response` (one the terminal's format cannot carry becomes RC 96); whether
        the terminal got `response` itself."""
        try:
            data = self._frame(response, tpdu)
        except CodecError as exc:
            log.error("%s answer does not fit the terminal's format: %s", response.mti, exc)
            if request is not None:
                with contextlib.suppress(CodecError):
                    await self._write(
                        self._frame(answer(request, SYSTEM_MALFUNCTION), tpdu), response
                    )
            return False
        return await self._write(data, response)

    def _frame(self, message: Message, tpdu: bytes | None) -> bytes:
        return encode_frame(
            self._endpoint.framing,
            Frame(encode(message, self._endpoint.spec), swap_tpdu(tpdu) if tpdu else None),
        )

    async def _write(self, data: bytes, message: Message) -> bool:
        """Write one whole frame (a cancel never leaves half a frame on the wire); whether
        it was written."""
        async with self._write_lock:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self._listen.write_timeout
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    log.warning("answer %s undelivered: terminal gone", message.mti)
                    return False
            if scope.cancelled_caught:
                log.warning("terminal not reading; closing connection")
                await self._stream.aclose()
                return False
        return True
