"""`send_now` and `receive`, the hot path's write and read, over real TCP sockets: what
`send_now` reports is what the peer receives, a full socket makes it stop short (the
caller sends the rest); `receive` returns what arrives, b"" at the end; and a broken or
closed stream is told apart the way trio's `send_all` and `receive_some` tell them."""

from __future__ import annotations

import errno
import socket
import struct

import pytest
import trio
import trio.testing

from proxy.streams import receive, send_now, send_whole

SMALL_BUFFER = 4096


async def _connected_pair(
    sender_buffer: int | None = None,
) -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of a loopback TCP connection (the first with the send buffer given)."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = trio.socket.socket()
    if sender_buffer is not None:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sender_buffer)
    await client.connect(listener.getsockname())
    server, _ = await listener.accept()
    listener.close()
    return trio.SocketStream(client), trio.SocketStream(server)


async def _receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        chunk = await stream.receive_some(65536)
        assert chunk, "the connection ended early"
        received += chunk
    return bytes(received)


async def test_a_frame_that_fits_leaves_whole_in_one_call() -> None:
    writer, reader = await _connected_pair()
    async with writer, reader:
        frame = b"\x00\x0b0800-echo!"
        assert send_now(writer, frame) == len(frame)
        assert await _receive_exactly(reader, len(frame)) == frame


async def test_a_full_socket_takes_part_and_the_rest_follows_with_send_all() -> None:
    writer, reader = await _connected_pair(sender_buffer=SMALL_BUFFER)
    async with writer, reader:
        data = bytes(range(256)) * 4096  # 1 MiB: far more than both buffers hold
        sent = send_now(writer, data)
        assert 0 < sent < len(data)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.send_all, memoryview(data)[sent:])
            assert await _receive_exactly(reader, len(data)) == data


async def test_send_whole_sends_past_a_full_socket_and_stops_at_its_deadline() -> None:
    data = bytes(range(256)) * 4096  # 1 MiB: far more than both buffers hold
    writer, reader = await _connected_pair(sender_buffer=SMALL_BUFFER)
    async with writer, reader, trio.open_nursery() as nursery:
        nursery.start_soon(_receive_exactly, reader, len(data))
        assert await send_whole(writer, data, trio.current_time() + 30)
    writer, reader = await _connected_pair(sender_buffer=SMALL_BUFFER)
    async with writer, reader:  # the peer never reads
        started = trio.current_time()
        assert not await send_whole(writer, data, started + 0.2)
        assert trio.current_time() - started >= 0.2


async def test_a_socket_that_takes_nothing_more_gets_nothing() -> None:
    writer, reader = await _connected_pair(sender_buffer=SMALL_BUFFER)
    async with writer, reader:
        chunk = b"x" * 65536
        for _ in range(1000):  # the buffers fill long before: the peer does not read
            if send_now(writer, chunk) == 0:
                break
        else:
            pytest.fail("the socket kept taking data its peer never read")


async def test_a_closed_stream_never_writes_to_the_descriptor_reused_since() -> None:
    writer, reader = await _connected_pair()
    descriptor = writer.socket.fileno()
    await writer.aclose()
    other_writer, other_reader = await _connected_pair()  # takes the lowest free numbers
    async with reader, other_writer, other_reader:
        reused = {other_writer.socket.fileno(), other_reader.socket.fileno()}
        assert descriptor in reused
        with pytest.raises(trio.ClosedResourceError):
            send_now(writer, b"for the old peer")
        for one, peer in ((other_writer, other_reader), (other_reader, other_writer)):
            await one.send_all(b"!")  # the first bytes either end gets are its peer's
            assert await peer.receive_some(100) == b"!"


async def test_streams_other_than_plain_tcp_are_left_to_send_all() -> None:
    memory, _ = trio.testing.memory_stream_pair()
    assert send_now(memory, b"frame") == 0


async def test_a_closed_stream_and_a_reset_connection_are_told_apart() -> None:
    writer, reader = await _connected_pair()
    await writer.aclose()
    with pytest.raises(trio.ClosedResourceError):
        send_now(writer, b"frame")
    await reader.aclose()

    writer, reader = await _connected_pair()
    reader.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await reader.aclose()  # RST: the peer is gone (over loopback, before close returns)
    async with writer:
        with pytest.raises(trio.BrokenResourceError):
            send_now(writer, b"frame")


async def test_receive_waits_for_bytes_and_returns_them_then_the_end() -> None:
    writer, reader = await _connected_pair()
    async with writer, reader, trio.open_nursery() as nursery:

        async def later() -> None:
            await trio.testing.wait_all_tasks_blocked()  # the reader is waiting by then
            await writer.send_all(b"\x00\x040800")
            await writer.send_eof()

        nursery.start_soon(later)
        assert await receive(reader, 1024) == b"\x00\x040800"
        assert await receive(reader, 1024) == b""


async def test_receive_reads_what_is_there_with_more_waiting_too() -> None:
    writer, reader = await _connected_pair()
    async with writer, reader:
        await writer.send_all(b"abcdef")
        assert await _receive_some_bytes(reader, 4, more_waiting=True) == b"abcd"
        assert await receive(reader, 4) == b"ef"


async def _receive_some_bytes(stream: trio.SocketStream, size: int, more_waiting: bool) -> bytes:
    with trio.fail_after(5):
        while not (data := await receive(stream, size, more_waiting=more_waiting)):
            pass  # the bytes are in flight on loopback
    return bytes(data)


async def test_receive_on_a_stream_closed_while_waiting_is_closed() -> None:
    writer, reader = await _connected_pair()
    async with writer:
        async with trio.open_nursery() as nursery:

            async def close_it() -> None:
                await trio.testing.wait_all_tasks_blocked()
                await reader.aclose()

            nursery.start_soon(close_it)
            with pytest.raises(trio.ClosedResourceError):
                await receive(reader, 1024)
        with pytest.raises(trio.ClosedResourceError):
            await receive(reader, 1024)


async def test_receive_on_a_reset_connection_is_broken() -> None:
    writer, reader = await _connected_pair()
    async with reader:
        writer.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await writer.aclose()  # RST
        with pytest.raises(trio.BrokenResourceError):
            await receive(reader, 1024)


async def test_receive_from_a_stream_other_than_tcp_reads_as_receive_some() -> None:
    left, right = trio.testing.memory_stream_pair()
    await left.send_all(b"tls or in-memory")
    assert await receive(right, 1024) == b"tls or in-memory"


async def test_receive_of_nothing_is_refused_not_read_as_the_end() -> None:
    writer, reader = await _connected_pair()
    async with writer, reader:
        with pytest.raises(ValueError):
            await receive(reader, 0)


async def test_receive_when_the_socket_cannot_be_watched_is_broken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """epoll refusing the descriptor (no watches left) ends this connection, as
    receive_some reports it, rather than escaping as an OSError."""

    async def no_watches_left(_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    writer, reader = await _connected_pair()
    async with writer, reader:
        monkeypatch.setattr(trio.lowlevel, "wait_readable", no_watches_left)
        with pytest.raises(trio.BrokenResourceError):
            await receive(reader, 1024)
