"""Reading, writing and closing the proxy's byte streams (terminals' and switches').

`send_now` is the hot path's write: most frames fit in the socket's send buffer, and one
system call sends them without the trio machinery around `send_all` (a lock, a cancel
scope and two scheduler passes). `send_whole`, what both sides call, sends what it could
not with `send_all` as before. With it, the proxy spent up to a quarter less CPU a transaction
(1-25 % in two stretches of runs; BENCHMARKS.md, "Done so far").

`receive` is the hot path's read. `receive_some` tries the socket first and waits only
when it has nothing; a terminal with one request in flight has sent nothing more when
its frame has been read, so that first try is a wasted system call almost every time.
`receive` waits for the socket to be readable first, then reads it once.
"""

from __future__ import annotations

import errno
import os

import trio

# How long closing a connection may take: a TLS close_notify to a peer that never reads
# (trio closes the socket even when cut short).
CLOSE_TIMEOUT = 1.0


def send_now(stream: trio.abc.Stream, data: bytes | bytearray | memoryview) -> int:
    """Write what a plain TCP `stream` takes of `data` right now, without waiting or
    yielding: the number of bytes written, 0 when it takes none now or is not plain TCP
    (TLS, in-memory). The caller must be the stream's only writer (it holds the write
    lock) and send the rest itself. BrokenResourceError when the connection is broken,
    ClosedResourceError when the stream was closed."""
    if type(stream) is not trio.SocketStream:
        return 0
    try:
        return os.write(_descriptor(stream.socket), data)
    except BlockingIOError:
        return 0
    except OSError as error:
        raise _stream_error(error) from error


async def receive(
    stream: trio.abc.Stream, max_bytes: int, *, more_waiting: bool = False
) -> bytes | bytearray:
    """The next bytes of `stream`, at most `max_bytes`; b"" at its end. A plain TCP stream
    is read once it is readable; with `more_waiting` (the last read filled its buffer, so
    more is likely there already), and for any other stream, as `receive_some` reads.
    BrokenResourceError and ClosedResourceError as `receive_some` raises them."""
    if max_bytes < 1:
        raise ValueError("max_bytes must be >= 1")  # 0 would read as the stream's end
    if more_waiting or type(stream) is not trio.SocketStream:
        return await stream.receive_some(max_bytes)
    socket = stream.socket
    while True:
        _descriptor(socket)  # closed already: ClosedResourceError (wait_readable would fail)
        try:  # ClosedResourceError if closed meanwhile; OSError if epoll cannot watch it
            await trio.lowlevel.wait_readable(socket)
            return os.read(_descriptor(socket), max_bytes)  # no await since: still open
        except BlockingIOError:  # readable, then not: wait again
            continue
        except OSError as error:
            raise _stream_error(error) from error


def _descriptor(socket: trio.socket.SocketType) -> int:
    """The socket's descriptor; ClosedResourceError once it is closed (-1 then, so a
    descriptor number reused since is never touched)."""
    fd = socket.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("stream closed")
    return fd


def _stream_error(error: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    """An OS error of a socket read or write, as trio's streams report it: closed for a
    descriptor already closed here, broken for anything else."""
    if error.errno == errno.EBADF:
        return trio.ClosedResourceError("stream closed")
    return trio.BrokenResourceError(f"connection lost: {error.strerror}")


class NothingWritten(trio.BrokenResourceError):
    """The connection was broken or closed before any byte of this write left: the peer
    got none of it (a write system call that fails has written nothing)."""


async def send_whole(stream: trio.abc.Stream, data: bytes | bytearray, deadline: float) -> bool:
    """Send all of `data`: at once when the socket takes it (`send_now`), else the rest
    with `send_all`, shielded (a cancel never leaves part of a frame on the wire) and cut
    at `deadline`. False when the deadline cut it short: part of a frame may be on the
    wire, so the stream is unusable. NothingWritten when the first write failed; else
    BrokenResourceError or ClosedResourceError as `send_all` raises them."""
    try:
        sent = send_now(stream, data)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
        raise NothingWritten(str(error)) from error
    if sent == len(data):
        return True
    with trio.CancelScope(deadline=deadline, shield=True) as scope:
        await stream.send_all(memoryview(data)[sent:])
    return not scope.cancelled_caught


async def close(stream: trio.abc.AsyncResource) -> None:
    """Close without waiting long on the peer (trio closes the socket even if cancelled)."""
    with trio.move_on_after(CLOSE_TIMEOUT):
        await stream.aclose()
