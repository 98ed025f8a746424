"""The admin HTTP server (h11): /healthz, /readyz, /status and /metrics."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("iso_proxy.admin")

MAX_REQUEST = 8192  # bytes of request line and headers; admin requests carry no body
REQUEST_DEADLINE = 10.0  # seconds a client may take to send its request and read the answer

# What keeps the proxy from being ready; empty when it is.
Readiness = Callable[[], list[str]]
# Each switch and link as operators see them (JSON-ready).
Status = Callable[[], Awaitable[dict[str, Any]]]
# An admin action on a switch ("drain" or "enable"); False when there is no such switch
# (or it is being removed by a reload).
SwitchAction = Callable[[str, str], bool]
# Re-read the switch list; the problems found, [] when done.
Reload = Callable[[], Awaitable[list[str]]]


class AdminServer:
    """Answers one request per connection, then closes it."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        readiness: Readiness,
        status: Status,
        act: SwitchAction,
        reload: Reload,
        token: str | None,
    ) -> None:
        self._host = host
        self._port = port
        self._registry = registry
        self._readiness = readiness
        self._status = status
        self._act = act
        self._reload = reload
        self._token = token

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, self._serve, self._port, host=self._host)
            )
            port: int = listeners[0].socket.getsockname()[1]
            log.info("admin listening on %s:%d", self._host, port)
            task_status.started(port)

    async def _serve(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        async with stream:
            with trio.move_on_after(REQUEST_DEADLINE):
                try:
                    request = await _next_request(stream, connection)
                    if request is not None:
                        await self._answer(stream, connection, request)
                except h11.RemoteProtocolError:
                    await _send(stream, connection, 400, b"bad request\n", "text/plain")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    async def _answer(
        self, stream: trio.SocketStream, connection: h11.Connection, request: h11.Request
    ) -> None:
        path = request.target.decode("ascii", "replace").split("?", 1)[0]
        if request.method == b"POST" and path == "/reload":
            refusal = self._refusal(request)
            if refusal is not None:
                await _send(stream, connection, *refusal, "text/plain")
                return
            problems = await self._reload()
            body = ("\n".join(problems) if problems else "reloaded").encode() + b"\n"
            await _send(stream, connection, 400 if problems else 200, body, "text/plain")
        elif request.method == b"POST" and path.startswith("/switches/"):
            status, body = self._action(request, path)
            await _send(stream, connection, status, body, "text/plain")
        elif request.method != b"GET":
            await _send(stream, connection, 405, b"GET, or POST for actions\n", "text/plain")
        elif path == "/healthz":
            await _send(stream, connection, 200, b"ok\n", "text/plain")
        elif path == "/readyz":
            problems = self._readiness()
            body = json.dumps({"ready": not problems, "problems": problems}).encode() + b"\n"
            await _send(stream, connection, 503 if problems else 200, body, "application/json")
        elif path == "/status":
            body = json.dumps(await self._status(), indent=2).encode() + b"\n"
            await _send(stream, connection, 200, body, "application/json")
        elif path == "/metrics":
            await _send(
                stream, connection, 200, generate_latest(self._registry), CONTENT_TYPE_LATEST
            )
        else:
            await _send(stream, connection, 404, b"not found\n", "text/plain")

    def _refusal(self, request: h11.Request) -> tuple[int, bytes] | None:
        """Why an action is refused (no token configured, or not presented), if it is."""
        if self._token is None:
            return 403, b"admin actions are off: set ISO_PROXY_ADMIN_TOKEN\n"
        presented = dict(request.headers).get(b"authorization", b"")
        expected = b"Bearer " + self._token.encode()
        if not hmac.compare_digest(presented, expected):
            return 401, b"missing or wrong bearer token\n"
        return None

    def _action(self, request: h11.Request, path: str) -> tuple[int, bytes]:
        """POST /switches/NAME/drain or /enable, with `Authorization: Bearer <token>`."""
        if (refusal := self._refusal(request)) is not None:
            return refusal
        parts = path.strip("/").split("/")
        if len(parts) != 3 or parts[2] not in ("drain", "enable"):
            return 404, b"POST /switches/NAME/drain or /switches/NAME/enable\n"
        if not self._act(parts[1], parts[2]):
            return 404, b"no such switch\n"
        log.warning(
            "admin: switch %r %s", parts[1], "drained" if parts[2] == "drain" else "enabled"
        )
        return 200, f"{parts[1]}: {'drained' if parts[2] == 'drain' else 'enabled'}\n".encode()


async def _next_request(
    stream: trio.SocketStream, connection: h11.Connection
) -> h11.Request | None:
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(MAX_REQUEST))
        elif isinstance(event, h11.Request):
            return event
        else:  # the client went away, or something else h11 reports
            return None


async def _send(
    stream: trio.SocketStream, connection: h11.Connection, status: int, body: bytes, kind: str
) -> None:
    if connection.our_state is not h11.SEND_RESPONSE and connection.our_state is not h11.IDLE:
        return
    headers = [
        ("content-type", kind),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    data = connection.send(h11.Response(status_code=status, headers=headers)) or b""
    data += connection.send(h11.Data(data=body)) or b""
    data += connection.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
