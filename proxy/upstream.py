"""Links: persistent connections to a switch, kept up with reconnects and backoff."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from enum import StrEnum

import trio

from codec import CodecError, Frame, Framer, Message, decode, encode, encode_frame
from proxy import decisions
from proxy.backoff import Backoff
from proxy.config import SwitchConfig
from proxy.errors import LinkLost, NotWritten
from proxy.responses import answer

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

# Called by a link's reader with every response it receives.
ResponseSink = Callable[["Link", Message], None]
# Called after every change of a link's state.
StateSink = Callable[["Link"], None]


class LinkState(StrEnum):
    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"


class Link:
    """One persistent TCP connection to a switch.

    `run` connects, reads answers and reconnects with backoff until cancelled. `send`
    writes one whole frame or raises: `NotWritten` when no byte left (safe to fail over),
    `LinkLost` when the write broke part-way (the request may have reached the switch).
    Each TCP connection has its own `connection` id: a reconnect is a new connection.
    """

    def __init__(
        self,
        switch: SwitchConfig,
        index: int,
        on_response: ResponseSink,
        on_state: StateSink,
        rng: random.Random,
    ) -> None:
        self.switch = switch
        self.name = f"{switch.name}/{index}"
        self.state = LinkState.CONNECTING
        self.connects = 0
        self.connection = ""
        self._serving = trio.CancelScope()
        self._on_response = on_response
        self._on_state = on_state
        self._rng = rng
        self._backoff = Backoff(switch.reconnect.initial_delay, switch.reconnect.max_delay)
        self._stream: trio.SocketStream | None = None
        self._write_lock = trio.Lock()
        self._pending_replies = 0

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
                connected_at = trio.current_time()
                try:
                    with self._serving:
                        await self._serve(stream)
                except Exception as exc:  # a bug must cost one connection, not the whole pool
                    log.error("link %s: internal error: %s", self.name, type(exc).__name__)
                finally:
                    await self._close(stream)
                if trio.current_time() - connected_at >= STABLE_AFTER:
                    attempt = 0
            await trio.sleep(self._backoff.delay(attempt, self._rng))
            attempt += 1

    def recycle(self) -> None:
        """Drop the current connection (its written requests fail) and reconnect."""
        self._serving.cancel()

    async def send(
        self,
        message: Message,
        *,
        deadline: float,
        before_write: Callable[[str], None] | None = None,
    ) -> None:
        """Write `message` as one frame, starting before `deadline`.

        `before_write(connection)` runs once the link is known to be up, right before the
        first byte; it may refuse by raising NotWritten. Raises CodecError when the message
        does not fit this switch's spec.
        """
        data = self._frame(message)
        acquired = False
        with trio.move_on_at(deadline):
            await self._write_lock.acquire()
            acquired = True
        if not acquired:
            raise NotWritten(f"link {self.name}: no turn to write before the deadline")
        try:
            stream = self._stream
            if stream is None or not self.is_up:
                raise NotWritten(f"link {self.name} is not up")
            now = trio.current_time()
            if now >= deadline:
                raise NotWritten(f"link {self.name}: deadline passed before the write")
            if before_write is not None:
                before_write(self.connection)
            failure = None
            # Shielded: a cancel must not leave half a frame on the wire. Bounded: a switch
            # that stops reading cannot hold the writer forever.
            with trio.CancelScope(deadline=max(deadline, now + WRITE_GRACE), shield=True) as scope:
                try:
                    await stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    failure = "failed"
            if scope.cancelled_caught:
                failure = "timed out"
            if failure is not None:
                # The frame may be partly on the wire: the stream is unusable from here on.
                await self._close(stream)
                raise LinkLost(f"write to link {self.name} {failure}")
        finally:
            self._write_lock.release()

    def _frame(self, message: Message) -> bytes:
        endpoint = self.switch.endpoint
        return encode_frame(
            endpoint.framing, Frame(encode(message, endpoint.spec), self.switch.tpdu)
        )

    async def _connect(self) -> trio.SocketStream | None:
        self._set_state(LinkState.CONNECTING)
        with trio.move_on_after(self.switch.connect_timeout):
            try:
                stream = await trio.open_tcp_stream(self.switch.host, self.switch.port)
            except OSError as exc:
                log.debug("link %s: connect failed: %s", self.name, exc.strerror)
                self._set_state(LinkState.DOWN)
                return None
            self._stream = stream
            self.connects += 1
            self.connection = f"{self.name}#{self.connects}"
            self._serving = trio.CancelScope()
            log.info("link %s: up", self.name)
            self._set_state(LinkState.UP)
            return stream
        log.debug("link %s: connect timed out", self.name)
        self._set_state(LinkState.DOWN)
        return None

    async def _serve(self, stream: trio.SocketStream) -> None:
        """Read frames until the switch closes, the stream breaks or the switch misbehaves."""
        framer = Framer(self.switch.endpoint.framing)
        async with trio.open_nursery() as replies:
            try:
                while True:
                    frame = framer.next_frame()
                    if frame is None:
                        data = await stream.receive_some(READ_SIZE)
                        if not data:
                            log.warning("link %s: closed by the switch", self.name)
                            break
                        framer.feed(data)
                        continue
                    self._dispatch(decode(frame.message, self.switch.endpoint.spec), replies)
            except CodecError as exc:
                log.warning("link %s: bad frame from the switch (%s); reconnecting", self.name, exc)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                log.warning("link %s: connection lost", self.name)
            # Down first, so nothing waits on replies still being written to a dead stream.
            await self._close(stream)
            replies.cancel_scope.cancel()

    def _dispatch(self, message: Message, replies: trio.Nursery) -> None:
        decision = decisions.from_switch(message)
        if decision.action is decisions.Action.MATCH:
            self._on_response(self, message)
        elif decision.action is decisions.Action.ANSWER and decision.rc is not None:
            if self._pending_replies >= MAX_PENDING_REPLIES:
                log.warning("link %s: %s from the switch dropped (flood)", self.name, message.mti)
                return
            self._pending_replies += 1
            replies.start_soon(self._reply, answer(message, decision.rc))
        else:
            log.warning("link %s: dropped %s (%s)", self.name, message.mti, decision.reason)

    async def _reply(self, message: Message) -> None:
        """Answer the switch without holding up the reader (it may be waiting to write)."""
        try:
            await self.send(message, deadline=trio.current_time() + self.switch.timeout)
        except (NotWritten, LinkLost, CodecError) as exc:
            log.warning("link %s: %s to the switch not sent: %s", self.name, message.mti, exc)
        finally:
            self._pending_replies -= 1

    async def _close(self, stream: trio.SocketStream) -> None:
        """Mark the link down (once per connection) and close `stream`."""
        if self._stream is stream:
            self._stream = None
            log.warning("link %s: down", self.name)
            self._set_state(LinkState.DOWN)
        with trio.CancelScope(shield=True):
            await stream.aclose()

    def _set_state(self, state: LinkState) -> None:
        self.state = state
        self._on_state(self)
