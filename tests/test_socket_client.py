"""The Python socket client over real WebSockets on loopback.

The server here is a small protocol-level one (trio-websocket and
``SocketProtocol(Side.SERVER)``, scripted by each test), so that the tests can
provoke what a well-behaved server never does on its own: refuse an upgrade,
close with any code, drop the TCP connection, hold a handshake, stop pinging.
The timing tests (backoff, heartbeat) are in ``test_socket_client_timing.py``, on
``MockClock`` over memory streams, with the same server.
"""

from __future__ import annotations

import contextvars
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import attrs
import msgspec
import pytest
import trio
import trio.lowlevel
import trio.testing
import trio_websocket

from meshline._errors import InvalidArgumentError
from meshline._sockets._backoff import ReconnectOptions
from meshline._sockets._client import (
    ClientState,
    SocketBufferFullError,
    SocketClient,
    SocketConnectError,
    StateChange,
    open_socket_client,
)
from meshline._sockets._codes import CloseCode, ErrorCode
from meshline._sockets._connection import Connection, DisconnectReason
from meshline._sockets._errors import (
    CallFailedError,
    ConnectionRejectedError,
    SocketClosedError,
    SocketError,
    SocketTimeoutError,
)
from meshline._sockets._frames import (
    CallFrame,
    CancelFrame,
    EventFrame,
    HelloFrame,
    PayloadDecodeError,
    PingFrame,
    PongFrame,
    ReplyErrorFrame,
    ReplyFrame,
    Side,
    SubscribeFrame,
    UnsubscribeFrame,
    select_codec,
)
from meshline._sockets._protocol import SocketProtocol
from meshline._sockets._roles import Role
from meshline._sockets._server import Admission, Rejection, SocketRequest, open_socket_server

pytestmark = pytest.mark.usefixtures("reading_path")

FAST = ReconnectOptions(base=0.01, cap=0.05)
"""Reconnects within a few tens of milliseconds on the real clock."""

WEIRD_NAMES = [
    "a.b.c",
    "*",
    ">",
    "with space",
    "new\nline",
    "ünïcødé ✓ 名前",
    "$SYS.>",
    "x" * 1024,
    "é" * 512,
]
"""Names and ids of any content, up to 1 KiB."""


# --- A protocol-level server ----------------------------------------------------------


CallHandler = Callable[["FakeConnection", Any], Awaitable[Any]]


async def echo(conn: FakeConnection, data: Any) -> Any:
    return data


async def refuse(conn: FakeConnection, data: Any) -> Any:
    raise SocketError("not_found", "no such thing", {"id": data})


async def hang(conn: FakeConnection, data: Any) -> Any:
    await trio.sleep_forever()


async def until(predicate: Callable[[], bool]) -> None:
    """Poll a condition on the client's side (the real clock only), for at most 10 s."""
    with trio.fail_after(10):
        while not predicate():
            await trio.sleep(0.001)


class Pulse:
    """Wake whoever waits for a condition, whenever something changed."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def pulse(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._event.wait()


@attrs.define(eq=False)
class FakeConnection:
    server: FakeServer
    ws: trio_websocket.WebSocketConnection
    stream: trio.abc.Stream
    protocol: SocketProtocol
    hello: HelloFrame
    nursery: trio.Nursery
    welcomed_at: float
    connection_id: str
    calls: list[CallFrame] = attrs.Factory(list)
    cancels: list[int] = attrs.Factory(list)
    events: list[tuple[str, Any]] = attrs.Factory(list)
    subscribes: list[str] = attrs.Factory(list)
    unsubscribes: list[str] = attrs.Factory(list)
    pongs: list[int] = attrs.Factory(list)
    replies: dict[int, ReplyFrame | ReplyErrorFrame] = attrs.Factory(dict)
    close_code: int | None = None
    frozen: bool = False
    closing: trio.Event | None = None
    """Set while the server closes the connection (its WebSocket reader must
    outlive :meth:`serve`, or the closing handshake never completes)."""
    running: dict[int, trio.CancelScope] = attrs.Factory(dict)

    def decode(self, raw: Any, data_type: Any = Any) -> Any:
        return self.protocol.codec.decode_data(raw, data_type)

    async def send(self, message: bytes | str) -> None:
        await self.ws.send_message(message)

    async def emit(self, name: str, data: Any = None, *, topic: str | None = None) -> None:
        await self.send(self.protocol.emit(name, data, topic=topic))

    async def request(self, name: str, data: Any = None, timeout: float | None = None) -> int:
        request_id, message = self.protocol.request(name, data, timeout=timeout)
        await self.send(message)
        return request_id

    async def reply_to(self, request_id: int) -> ReplyFrame | ReplyErrorFrame:
        await self.server.changed.wait_for(lambda: request_id in self.replies)
        return self.replies[request_id]

    async def cancel_request(self, request_id: int) -> None:
        message = self.protocol.cancel_request(request_id)
        assert message is not None
        await self.send(message)

    async def close(self, code: int, reason: str = "") -> None:
        self.protocol.close(code, reason)
        self.closing = trio.Event()
        try:
            await self.ws.aclose(code, reason)
        finally:
            self.closing.set()

    async def drop(self) -> None:
        """End the TCP connection without a WebSocket close (the client sees 1006)."""
        await trio.aclose_forcefully(self.stream)

    def freeze(self) -> None:
        """Stop this connection's server side entirely (its WebSocket reader too),
        keeping the stream open: nothing is read or answered any more."""
        self.frozen = True
        self.nursery.cancel_scope.cancel()

    async def end_subscription(self, topic: str) -> None:
        await self.send(self.protocol.end_subscription(topic))

    async def serve(self) -> None:
        protocol = self.protocol
        while True:
            try:
                message = await self.ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                self.close_code = exc.reason.code if exc.reason else None
                self.server.changed.pulse()
                return
            event = protocol.receive(message, trio.current_time())
            match event:
                case CallFrame():
                    self.calls.append(event)
                    scope = trio.CancelScope()
                    self.running[event.id] = scope
                    self.nursery.start_soon(self._run_call, event, scope)
                case CancelFrame(id=call_id):
                    self.cancels.append(call_id)
                    if call_id in self.running:
                        self.running[call_id].cancel()
                case SubscribeFrame(id=call_id, topic=topic):
                    self.subscribes.append(topic)
                    if topic in self.server.refused_topics:
                        await self.send(protocol.error(call_id, ErrorCode.FORBIDDEN, "no"))
                    else:
                        await self.send(protocol.accept_subscribe(call_id).message)
                case UnsubscribeFrame(topic=topic):
                    self.unsubscribes.append(topic)
                case EventFrame(name=name, data=data):
                    self.events.append((name, self.decode(data)))
                case PingFrame(seq=seq):
                    await self.send(protocol.pong(seq))
                case PongFrame(seq=seq):
                    self.pongs.append(seq)
                case ReplyFrame() | ReplyErrorFrame():
                    self.replies[event.id] = event
            self.server.changed.pulse()

    async def _run_call(self, frame: CallFrame, scope: trio.CancelScope) -> None:
        handler = self.server.handlers.get(frame.name)
        protocol = self.protocol
        if handler is None:
            message = protocol.error(frame.id, ErrorCode.UNKNOWN_CALL, f"no {frame.name!r}")
        else:
            result: Any = None
            error: tuple[str, str, Any] | None = None
            with scope:
                try:
                    result = await handler(self, self.decode(frame.data))
                except SocketError as exc:
                    error = (exc.code, exc.message, exc.details)
            if scope.cancelled_caught:
                error = (ErrorCode.CANCELLED, "cancelled", None)
            if not protocol.is_open:
                return
            if error is not None:
                message = protocol.error(frame.id, *error)
            else:
                message = protocol.result(frame.id, result)
        self.running.pop(frame.id, None)
        with suppress(trio_websocket.ConnectionClosed):
            await self.send(message)

    async def ping_every(self, interval: float) -> None:
        while self.protocol.is_open:
            await trio.sleep(interval)
            try:
                await self.send(self.protocol.ping(trio.current_time()))
            except (trio_websocket.ConnectionClosed, Exception):
                return


@attrs.define(eq=False)
class Upgrade:
    path: str
    headers: dict[str, str]
    subprotocols: tuple[str, ...]


class FakeServer:
    """A scripted server: accepts (or refuses) upgrades and serves the protocol."""

    def __init__(
        self,
        *,
        heartbeat_interval: float = 0.0,
        heartbeat_max_missed: int = 2,
        pings: bool = True,
        refused_topics: frozenset[str] = frozenset(),
    ) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_max_missed = heartbeat_max_missed
        self.pings = pings
        self.refused_topics = refused_topics
        self.handlers: dict[str, CallHandler] = {"echo": echo, "refuse": refuse, "hang": hang}
        self.reject_with: int | None = None
        """Refuse upgrades with this HTTP status."""
        self.close_before_welcome: int | None = None
        """Close the WebSocket with this code instead of welcoming the hello."""
        self.hold: trio.Event | None = None
        """While set to an unset event, upgrades wait for it."""
        self.upgrades: list[Upgrade] = []
        self.attempt_times: list[float] = []
        self.connections: list[FakeConnection] = []
        self.changed = Pulse()
        self.url = ""

    @property
    def last(self) -> FakeConnection:
        return self.connections[-1]

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        await self.changed.wait_for(predicate)

    async def wait_connections(self, count: int) -> FakeConnection:
        await self.wait_for(lambda: len(self.connections) >= count)
        return self.connections[count - 1]

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await self._handle(stream, nursery)
                nursery.cancel_scope.cancel()
            if any(conn.frozen for conn in self.connections if conn.stream is stream):
                await trio.sleep_forever()
        except (trio_websocket.ConnectionClosed, trio.BrokenResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _handle(self, stream: trio.abc.Stream, nursery: trio.Nursery) -> None:
        request = await trio_websocket.wrap_server_stream(nursery, stream)
        self.attempt_times.append(trio.current_time())
        self.upgrades.append(
            Upgrade(
                request.path,
                {k.decode().lower(): v.decode("latin-1") for k, v in request.headers},
                request.proposed_subprotocols,
            )
        )
        self.changed.pulse()
        if self.hold is not None:
            await self.hold.wait()
        if self.reject_with is not None:
            await request.reject(self.reject_with, body=b"go away")
            return
        codec = select_codec(request.proposed_subprotocols)
        assert codec is not None
        ws = await request.accept(subprotocol=codec.subprotocol)
        protocol = SocketProtocol(Side.SERVER, codec)
        hello = protocol.receive(await ws.get_message(), trio.current_time())
        assert isinstance(hello, HelloFrame)
        if self.close_before_welcome is not None:
            await ws.aclose(self.close_before_welcome, "not now")
            return
        connection_id = f"conn-{len(self.connections) + 1}"
        welcomed_at = trio.current_time()
        await ws.send_message(
            protocol.welcome(
                connection_id,
                7,
                now=welcomed_at,
                heartbeat_interval=self.heartbeat_interval,
                heartbeat_max_missed=self.heartbeat_max_missed,
            )
        )
        conn = FakeConnection(
            self, ws, stream, protocol, hello, nursery, welcomed_at, connection_id
        )
        self.connections.append(conn)
        self.changed.pulse()
        if self.pings and self.heartbeat_interval > 0:
            nursery.start_soon(conn.ping_every, self.heartbeat_interval)
        await conn.serve()
        if conn.closing is not None:
            await conn.closing.wait()

    async def serve_tcp(self, nursery: trio.Nursery) -> str:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, self.handle_stream, listeners)
        self.url = f"ws://127.0.0.1:{port}/sockets"
        return self.url

    def memory_opener(self, nursery: trio.Nursery) -> Callable[[str], Awaitable[trio.abc.Stream]]:
        """An ``open_stream`` for the client: each attempt gets a memory stream pair."""

        async def open_stream(url: str) -> trio.abc.Stream:
            client_end, server_end = trio.testing.memory_stream_pair()
            nursery.start_soon(self.handle_stream, server_end)
            return client_end

        return open_stream


@asynccontextmanager
async def tcp_server(**options: Any) -> AsyncIterator[FakeServer]:
    server = FakeServer(**options)
    async with trio.open_nursery() as nursery:
        await server.serve_tcp(nursery)
        yield server
        nursery.cancel_scope.cancel()


class Changes:
    """Collects a client's state changes from the start of the block."""

    def __init__(self) -> None:
        self.seen: list[StateChange] = []
        self.pulse = Pulse()

    async def collect(self, client: SocketClient) -> None:
        async with client.state_changes() as changes:
            async for change in changes:
                self.seen.append(change)
                self.pulse.pulse()

    @property
    def states(self) -> list[ClientState]:
        return [change.state for change in self.seen]

    async def wait_for(self, state: ClientState, count: int = 1) -> StateChange:
        await self.pulse.wait_for(lambda: self.states.count(state) >= count)
        return [change for change in self.seen if change.state is state][count - 1]


@asynccontextmanager
async def watched(client: SocketClient) -> AsyncIterator[Changes]:
    changes = Changes()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(changes.collect, client)
        await trio.testing.wait_all_tasks_blocked()
        yield changes
        nursery.cancel_scope.cancel()


# --- Connecting -----------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
async def test_connects_and_calls_on_both_encodings(encoding: Any) -> None:
    async with tcp_server() as server:
        async with open_socket_client(
            server.url,
            client_id="client-1",
            encoding=encoding,
            headers={"Authorization": "Bearer t0ken"},
            query={"room": "a b&c"},
        ) as client:
            assert client.state is ClientState.CONNECTED
            assert client.connection_id == "conn-1"
            assert client.node_id == 7
            assert await client.call("echo", {"n": [1, 2.5, "x", None]}) == {
                "n": [1, 2.5, "x", None]
            }
        upgrade = server.upgrades[0]
        assert upgrade.path == "/sockets?room=a+b%26c"
        assert upgrade.headers["authorization"] == "Bearer t0ken"
        assert upgrade.subprotocols == (f"meshline.v1.{encoding}",)
        hello = server.connections[0].hello
        assert hello.client_id == "client-1"
        assert hello.previous_connection_id == ""
        assert hello.client_name == "meshline-python"


async def test_first_connect_tries_each_url_once_then_raises() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    dead_port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    dead = f"ws://127.0.0.1:{dead_port}/"
    with pytest.raises(SocketConnectError):
        async with open_socket_client([dead, dead], client_id="c", connect_timeout=5):
            pytest.fail("connected to nothing")
    async with tcp_server() as server:
        async with open_socket_client([dead, server.url], client_id="c") as client:
            assert await client.call("echo", 1) == 1
        assert len(server.upgrades) == 1


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_first_connect_raises_and_does_not_retry(status: int) -> None:
    async with tcp_server() as server:
        server.reject_with = status
        with pytest.raises(ConnectionRejectedError) as caught:
            async with open_socket_client([server.url, server.url], client_id="c"):
                pytest.fail("connected though refused")
        assert caught.value.status == status
        assert caught.value.reason == "go away"
        assert len(server.upgrades) == 1


async def test_bad_options_are_refused_before_connecting() -> None:
    for kwargs in (
        {"url_or_urls": "http://x/"},
        {"url_or_urls": []},
        {"url_or_urls": "ws://x/", "encoding": "xml"},
        {"url_or_urls": "ws://x/", "call_timeout": 0},
        {"url_or_urls": "ws://x/", "max_buffered_bytes": 0},
        {"url_or_urls": "ws://x/", "headers": {"x": "☃"}},
    ):
        with pytest.raises(InvalidArgumentError):
            async with open_socket_client(client_id="c", **kwargs):
                pass
    with pytest.raises(InvalidArgumentError):
        ReconnectOptions(base=1, cap=0.5)


# --- Calls ----------------------------------------------------------------------------


@attrs.define
class Point:
    x: int
    y: int = 0


class Pair(msgspec.Struct):
    a: str
    b: list[int]


async def test_call_result_is_converted_into_result_type() -> None:
    async with tcp_server() as server, open_socket_client(server.url, client_id="c") as client:
        assert await client.call("echo", Point(3, 4), result_type=Point) == Point(3, 4)
        assert await client.call("echo", {"a": "x", "b": [1]}, result_type=Pair) == Pair("x", [1])
        with pytest.raises(PayloadDecodeError) as caught:
            await client.call("echo", {"x": "not an int"}, result_type=Point)
        assert "$.x" in str(caught.value)


async def test_call_errors_are_typed() -> None:
    async with tcp_server() as server, open_socket_client(server.url, client_id="c") as client:
        with pytest.raises(CallFailedError) as caught:
            await client.call("refuse", 5)
        assert (caught.value.code, caught.value.message) == ("not_found", "no such thing")
        assert caught.value.details == {"id": 5}
        assert caught.value.application
        with pytest.raises(CallFailedError) as caught:
            await client.call("no such call")
        assert caught.value.code == ErrorCode.UNKNOWN_CALL
        assert not caught.value.application
        assert await client.call("echo", "still fine") == "still fine"


async def test_call_timeout_raises_and_sends_a_cancel() -> None:
    async with tcp_server() as server, open_socket_client(server.url, client_id="c") as client:
        with pytest.raises(SocketTimeoutError):
            await client.call("hang", timeout=0.05)
        conn = server.last
        await server.wait_for(lambda: conn.cancels == [conn.calls[0].id])
        assert await client.call("echo", 2) == 2  # the late "cancelled" answer was ignored


async def test_a_cancelled_caller_sends_a_cancel() -> None:
    async with tcp_server() as server, open_socket_client(server.url, client_id="c") as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.call, "hang")
            await server.wait_for(lambda: bool(server.last.calls))
            nursery.cancel_scope.cancel()
        conn = server.last
        await server.wait_for(lambda: conn.cancels == [conn.calls[0].id])


@pytest.mark.parametrize("how", ["drop", "close 1012", "close 4501"])
async def test_a_call_in_flight_fails_at_once_when_the_connection_ends(how: str) -> None:
    async with (
        tcp_server() as server,
        open_socket_client(
            server.url, client_id="c", reconnect=FAST, call_timeout=math.inf
        ) as client,
    ):
        failure: list[BaseException] = []

        async def caller() -> None:
            try:
                await client.call("hang")
            except SocketClosedError as exc:
                failure.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            await server.wait_for(lambda: bool(server.last.calls))
            if how == "drop":
                await server.last.drop()
            else:
                await server.last.close(int(how.split()[1]), "bye")
        # The caller's nursery exited: the call failed without any timeout.
        [error] = failure
        assert isinstance(error, SocketClosedError)
        assert error.close_code == {"drop": 1006, "close 1012": 1012, "close 4501": 4501}[how]


async def test_a_call_made_while_reconnecting_waits_for_the_new_connection() -> None:
    async with (
        tcp_server() as server,
        open_socket_client(server.url, client_id="c", reconnect=FAST) as client,
        watched(client) as changes,
    ):
        server.hold = trio.Event()
        await server.last.close(CloseCode.SERVICE_RESTART)
        await changes.wait_for(ClientState.RECONNECTING)
        await server.wait_for(lambda: len(server.upgrades) == 2)  # attempt held
        results: list[Any] = []
        async with trio.open_nursery() as nursery:

            async def caller() -> None:
                results.append(await client.call("echo", "after"))

            nursery.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(SocketClosedError):
                client.emit("while-down")  # emits do not wait
            server.hold.set()
        assert results == ["after"]
        second = server.connections[1]
        assert [call.name for call in second.calls] == ["echo"]
        assert second.hello.previous_connection_id == "conn-1"
        assert client.connection_id == "conn-2"


async def test_a_call_waiting_for_a_reconnect_times_out() -> None:
    async with (
        tcp_server() as server,
        open_socket_client(server.url, client_id="c", reconnect=FAST) as client,
        watched(client) as changes,
    ):
        server.hold = trio.Event()
        await server.last.close(CloseCode.GOING_AWAY)
        await changes.wait_for(ClientState.RECONNECTING)
        with pytest.raises(SocketTimeoutError):
            await client.call("echo", 1, timeout=0.05)
        server.hold.set()


# --- Events ---------------------------------------------------------------------------


async def test_events_both_ways_with_sync_and_async_handlers_in_order() -> None:
    async with tcp_server() as server, open_socket_client(server.url, client_id="c") as client:
        seen: list[tuple[str, Any]] = []

        def sync_handler(data: Any) -> None:
            seen.append(("sync", data))

        async def async_handler(data: Any) -> None:
            await trio.lowlevel.checkpoint()
            seen.append(("async", data))

        client.on("news", sync_handler)
        remove = client.on("news", async_handler)
        client.on("point", lambda point: seen.append(("point", point)), input=Point)
        conn = server.last
        for n in range(3):
            await conn.emit("news", n)
        await conn.emit("point", {"x": 1})
        await conn.emit("point", {"x": "bad"})  # skipped: does not fit Point
        await conn.emit("unheard", 1)
        await until(lambda: len(seen) == 7)
        assert seen == [
            ("sync", 0),
            ("async", 0),
            ("sync", 1),
            ("async", 1),
            ("sync", 2),
            ("async", 2),
            ("point", Point(1)),
        ]
        remove()
        remove()  # twice is harmless
        await conn.emit("news", 9)
        client.emit("mark")  # the server's event came before; handlers ran in order
        await server.wait_for(lambda: ("mark", None) in conn.events)
        client.emit("up", {"k": "v"})
        client.emit("up", [1, 2])
        await server.wait_for(lambda: len(conn.events) == 3)
        assert conn.events == [("mark", None), ("up", {"k": "v"}), ("up", [1, 2])]
        await until(lambda: ("sync", 9) in seen)
        assert ("async", 9) not in seen


async def test_plain_handlers_run_at_once_only_when_no_event_waits_before_them() -> None:
    async with tcp_server() as server, open_socket_client(server.url, client_id="c") as client:
        seen: list[str] = []
        release = trio.Event()

        async def slow(data: Any) -> None:
            await release.wait()
            seen.append("slow")

        async def returned(data: Any) -> None:
            await trio.lowlevel.checkpoint()
            seen.append("awaited")

        client.on("slow", slow)
        client.on("quick", lambda data: seen.append("quick"))
        client.on("coroutine", lambda data: returned(data))  # a plain function returning one
        conn = server.last
        await conn.emit("quick", 0)
        await until(lambda: seen == ["quick"])  # nothing before it: run at once
        await conn.emit("slow", 1)
        await conn.emit("quick", 2)
        await conn.emit("coroutine", 3)
        client.emit("mark")
        await server.wait_for(lambda: ("mark", None) in conn.events)
        assert seen == ["quick"]  # the quick event waits behind the slow handler
        release.set()
        await until(lambda: len(seen) == 4)
        assert seen == ["quick", "slow", "quick", "awaited"]
        await conn.emit("coroutine", 4)
        await until(lambda: len(seen) == 5)


async def test_a_handler_that_raises_is_logged_and_the_others_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with tcp_server() as server, open_socket_client(server.url, client_id="c") as client:
        seen: list[Any] = []

        def broken(data: Any) -> None:
            raise RuntimeError("handler bug")

        client.on("e", broken)
        client.on("e", seen.append)
        await server.last.emit("e", 1)
        await server.last.emit("e", 2)
        await until(lambda: len(seen) == 2)
        assert seen == [1, 2]
        assert "handler bug" in caplog.text


async def test_coalesced_emits_keep_only_the_newest_waiting_value() -> None:
    async with tcp_server() as server, open_socket_client(server.url, client_id="c") as client:
        for n in range(100):
            client.emit("cursor", n, coalesce="cursor")  # no checkpoint: all queued at once
        client.emit("done")
        conn = server.last
        await server.wait_for(lambda: ("done", None) in conn.events)
        assert conn.events == [("cursor", 99), ("done", None)]


async def test_emit_past_max_buffered_bytes_raises() -> None:
    async with (
        tcp_server() as server,
        open_socket_client(server.url, client_id="c", max_buffered_bytes=1000) as client,
    ):
        client.emit("big", "x" * 900)
        with pytest.raises(SocketBufferFullError):
            client.emit("big", "x" * 900)  # the first one is still queued
        conn = server.last
        await server.wait_for(lambda: len(conn.events) == 1)
        client.emit("big", "y")  # drained: room again
        await server.wait_for(lambda: len(conn.events) == 2)


# --- Server-to-client requests --------------------------------------------------------


async def test_implement_answers_server_requests() -> None:
    async with tcp_server() as server, open_socket_client(server.url, client_id="c") as client:
        cancelled = trio.Event()
        started = trio.Event()

        def add(point: Point) -> int:
            return point.x + point.y

        async def deny(data: Any) -> Any:
            raise SocketError("denied", "not you", {"who": data})

        def crash(data: Any) -> Any:
            raise RuntimeError("implementation bug")

        async def slow(data: Any) -> Any:
            started.set()
            try:
                await trio.sleep_forever()
            finally:
                cancelled.set()

        def deny_now(data: Any) -> Any:
            raise SocketError("denied", "not now")

        client.implement("add", add, input=Point)
        client.implement("deny", deny)
        client.implement("deny_now", deny_now)
        client.implement("crash", crash)
        client.implement("later", lambda data: slow(data))  # plain, returns a coroutine
        remove = client.implement("slow", slow)
        with pytest.raises(InvalidArgumentError):
            client.implement("add", add)
        conn = server.last

        reply = await conn.reply_to(await conn.request("add", {"x": 2, "y": 3}))
        assert isinstance(reply, ReplyFrame) and conn.decode(reply.data) == 5
        reply = await conn.reply_to(await conn.request("add", {"x": "two"}))
        assert isinstance(reply, ReplyErrorFrame) and reply.code == ErrorCode.BAD_INPUT
        reply = await conn.reply_to(await conn.request("deny", 1))
        assert isinstance(reply, ReplyErrorFrame)
        assert (reply.code, reply.message, conn.decode(reply.details)) == (
            "denied",
            "not you",
            {"who": 1},
        )
        reply = await conn.reply_to(await conn.request("deny_now"))
        assert isinstance(reply, ReplyErrorFrame)
        assert (reply.code, reply.message) == ("denied", "not now")
        reply = await conn.reply_to(await conn.request("crash"))
        assert isinstance(reply, ReplyErrorFrame) and reply.code == ErrorCode.INTERNAL
        assert "bug" not in reply.message  # no traceback or message leaks
        reply = await conn.reply_to(await conn.request("nobody"))
        assert isinstance(reply, ReplyErrorFrame) and reply.code == ErrorCode.UNKNOWN_REQUEST

        request_id = await conn.request("slow")
        await started.wait()
        await conn.cancel_request(request_id)
        await cancelled.wait()
        # The "cancelled" answer came back and was ignored as late.
        await server.wait_for(lambda: conn.protocol.counters.late_answers == 1)
        # A plain implementation's awaitable is awaited in a task, and cancelled too.
        started, cancelled = trio.Event(), trio.Event()
        request_id = await conn.request("later")
        await started.wait()
        await conn.cancel_request(request_id)
        await cancelled.wait()
        await server.wait_for(lambda: conn.protocol.counters.late_answers == 2)

        remove()
        reply = await conn.reply_to(await conn.request("slow"))
        assert isinstance(reply, ReplyErrorFrame) and reply.code == ErrorCode.UNKNOWN_REQUEST


async def test_an_implementation_that_cannot_be_called_is_answered_internal() -> None:
    """Calling an async implementation raises at once (it takes no argument): the
    request is answered ``internal`` and the connection stays (it used to close
    the connection with 1011)."""
    async with tcp_server() as server, open_socket_client(server.url, client_id="c") as client:

        async def takes_nothing() -> Any:
            return 1

        client.implement("broken", takes_nothing)  # type: ignore[arg-type]
        conn = server.last
        reply = await conn.reply_to(await conn.request("broken"))
        assert isinstance(reply, ReplyErrorFrame) and reply.code == ErrorCode.INTERNAL
        reply = await conn.reply_to(await conn.request("broken"))  # the same connection
        assert isinstance(reply, ReplyErrorFrame) and reply.code == ErrorCode.INTERNAL
        assert client.state is ClientState.CONNECTED


_TAG: contextvars.ContextVar[str] = contextvars.ContextVar("_TAG", default="unset")


async def test_plain_handlers_do_not_leak_context_into_the_next_one() -> None:
    """A plain implementation or event handler runs in a context of its own, as it
    would in a task: what it sets is not seen by the next one (run in the
    client's reader, they shared its context)."""
    async with tcp_server() as server, open_socket_client(server.url, client_id="c") as client:
        seen: list[str] = []

        def tag(data: Any) -> None:
            _TAG.set(data)

        client.implement("tag", tag)
        client.implement("read", lambda data: _TAG.get())
        client.on("tag", tag)
        client.on("read", lambda data: seen.append(_TAG.get()))
        conn = server.last
        await conn.reply_to(await conn.request("tag", "request 1"))
        reply = await conn.reply_to(await conn.request("read"))
        assert isinstance(reply, ReplyFrame) and conn.decode(reply.data) == "unset"
        await conn.emit("tag", "event 1")
        await conn.emit("read")
        with trio.fail_after(10):
            while not seen:
                await trio.sleep(0.01)
        assert seen == ["unset"]


async def test_request_handlers_are_cancelled_when_the_connection_drops() -> None:
    async with (
        tcp_server() as server,
        open_socket_client(server.url, client_id="c", reconnect=FAST) as client,
    ):
        started, cancelled = trio.Event(), trio.Event()

        async def slow(data: Any) -> Any:
            started.set()
            try:
                await trio.sleep_forever()
            finally:
                cancelled.set()

        client.implement("slow", slow)
        await server.last.request("slow")
        await started.wait()
        await server.last.drop()
        await cancelled.wait()


# --- Topics ---------------------------------------------------------------------------


async def test_subscribe_refusal_topic_events_and_unsubscribe() -> None:
    async with (
        tcp_server(refused_topics=frozenset({"secret"})) as server,
        open_socket_client(server.url, client_id="c") as client,
    ):
        seen: list[Any] = []
        client.on("price", lambda data: seen.append(("any", data)))
        client.on("price", lambda data: seen.append(("eur", data)), topic="eur")
        await client.subscribe("eur")
        await client.subscribe("eur")  # already subscribed: no second frame
        assert client.topics == {"eur"}
        with pytest.raises(CallFailedError) as caught:
            await client.subscribe("secret")
        assert caught.value.code == ErrorCode.FORBIDDEN
        assert client.topics == {"eur"}
        conn = server.last
        assert conn.subscribes == ["eur", "secret"]
        await conn.emit("price", 1, topic="eur")
        await conn.emit("price", 2)
        await until(lambda: len(seen) == 3)
        assert seen == [("any", 1), ("eur", 1), ("any", 2)]
        client.unsubscribe("eur")
        assert client.topics == frozenset()
        await server.wait_for(lambda: conn.unsubscribes == ["eur"])


async def test_topics_are_subscribed_again_after_a_reconnect_and_on_reconnect_runs() -> None:
    reconnected: list[str | None] = []

    async def on_reconnect(client: SocketClient) -> None:
        reconnected.append(client.connection_id)
        await client.call("echo", "from the hook")

    async with (
        tcp_server() as server,
        open_socket_client(
            server.url, client_id="c", reconnect=FAST, on_reconnect=on_reconnect
        ) as client,
    ):
        await client.subscribe("a.b")
        await client.subscribe("ended")
        await server.last.end_subscription("ended")
        await until(lambda: "ended" not in client.topics)
        assert reconnected == []
        await server.last.drop()
        second = await server.wait_connections(2)
        await server.wait_for(lambda: [call.name for call in second.calls] == ["echo"])
        assert second.subscribes == ["a.b"]
        assert reconnected == ["conn-2"]
        assert client.topics == {"a.b"}
        await second.emit("tick", 1, topic="a.b")  # the server accepted it again


async def test_auth_gives_a_fresh_token_for_every_connection() -> None:
    tokens = iter(["t1", "t2"])

    async def auth() -> str:
        return next(tokens)

    async with (
        tcp_server() as server,
        open_socket_client(server.url, client_id="c", reconnect=FAST, auth=auth),
    ):
        await server.last.drop()
        await server.wait_connections(2)
    assert [upgrade.headers["authorization"] for upgrade in server.upgrades] == [
        "Bearer t1",
        "Bearer t2",
    ]


@pytest.mark.parametrize("auth", [KeyError("vault down"), 42, "two\nlines"])
async def test_an_auth_that_fails_fails_the_connect_clearly(auth: object) -> None:
    def give() -> Any:
        if isinstance(auth, Exception):
            raise auth
        return auth

    async with tcp_server() as server:
        with pytest.raises(SocketConnectError) as caught:
            async with open_socket_client(server.url, client_id="c", auth=give):
                pass
        assert "auth" in str(caught.value)
        assert server.upgrades == []


async def test_auth_options_are_checked_before_connecting() -> None:
    for options in [
        {"auth": 42},
        {"auth": ""},
        {"auth": "t", "headers": {"Authorization": "Bearer x"}},
    ]:
        with pytest.raises(InvalidArgumentError):
            async with open_socket_client("ws://127.0.0.1:1/", client_id="c", **options):
                pass


async def test_a_refused_resubscribe_drops_the_topic() -> None:
    async with (
        tcp_server() as server,
        open_socket_client(server.url, client_id="c", reconnect=FAST) as client,
        watched(client) as changes,
    ):
        await client.subscribe("t")
        server.refused_topics = frozenset({"t"})
        await server.last.close(CloseCode.GOING_AWAY)
        await changes.wait_for(ClientState.CONNECTED, 1)
        second = await server.wait_connections(2)
        await server.wait_for(lambda: second.subscribes == ["t"])
        await until(lambda: not client.topics)


# --- Close codes and reconnects -------------------------------------------------------


@pytest.mark.parametrize(
    "code", [CloseCode.GOING_AWAY, CloseCode.SERVICE_RESTART, CloseCode.TRY_AGAIN_LATER, 4001, None]
)
async def test_a_reconnect_band_close_reconnects(code: int | None) -> None:
    async with (
        tcp_server() as server,
        open_socket_client(server.url, client_id="c", reconnect=FAST) as client,
        watched(client) as changes,
    ):
        if code is None:
            await server.last.drop()
        else:
            await server.last.close(code, "later")
        await changes.wait_for(ClientState.CONNECTED)
        lost = changes.seen[0]
        assert lost.state is ClientState.RECONNECTING
        assert lost.close_code == (1006 if code is None else code)
        assert lost.attempt == 1
        assert await client.call("echo", "back") == "back"
        assert client.connection_id == "conn-2"


@pytest.mark.parametrize(
    "code",
    [CloseCode.KICKED, CloseCode.SUPERSEDED, CloseCode.FORBIDDEN, CloseCode.PROTOCOL_ERROR, 1008],
)
async def test_a_terminal_close_stops_the_client_for_good(code: int) -> None:
    async with (
        tcp_server() as server,
        open_socket_client(server.url, client_id="c", reconnect=FAST) as client,
        watched(client) as changes,
    ):
        await server.last.close(code, "go")
        failed = await changes.wait_for(ClientState.FAILED)
        assert (failed.close_code, failed.close_reason) == (code, "go")
        assert client.state is ClientState.FAILED
        with pytest.raises(SocketClosedError) as caught:
            await client.call("echo", 1)
        assert caught.value.close_code == code
        with pytest.raises(SocketClosedError):
            client.emit("x")
        with pytest.raises(SocketClosedError):
            await client.subscribe("x")
        assert changes.states == [ClientState.FAILED]
    assert len(server.upgrades) == 1


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_reconnect_fails_the_client_and_its_waiting_calls(status: int) -> None:
    async with (
        tcp_server() as server,
        open_socket_client(server.url, client_id="c", reconnect=FAST) as client,
        watched(client) as changes,
    ):
        server.hold = trio.Event()
        server.reject_with = status
        await server.last.close(CloseCode.GOING_AWAY)
        await server.wait_for(lambda: len(server.upgrades) == 2)
        async with trio.open_nursery() as nursery:

            async def caller() -> None:
                with pytest.raises(ConnectionRejectedError) as caught:
                    await client.call("echo", 1)
                assert caught.value.status == status

            nursery.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()
            server.hold.set()
        failed = await changes.wait_for(ClientState.FAILED)
        assert isinstance(failed.error, ConnectionRejectedError)
        assert changes.states == [ClientState.RECONNECTING, ClientState.FAILED]
    assert len(server.upgrades) == 2


async def test_a_server_error_refusal_is_retried() -> None:
    async with (
        tcp_server() as server,
        open_socket_client(server.url, client_id="c", reconnect=FAST) as client,
        watched(client) as changes,
    ):
        server.reject_with = 503
        await server.last.close(CloseCode.GOING_AWAY)
        await server.wait_for(lambda: len(server.upgrades) == 3)
        server.reject_with = None
        await changes.wait_for(ClientState.CONNECTED)
        retried = [change for change in changes.seen if change.error is not None]
        assert retried and all(
            isinstance(change.error, ConnectionRejectedError) and change.error.status == 503
            for change in retried
        )
        assert [change.attempt for change in changes.seen[:3]] == [1, 2, 3]


async def test_without_reconnect_a_lost_connection_closes_the_client() -> None:
    async with (
        tcp_server() as server,
        open_socket_client(server.url, client_id="c", reconnect=None) as client,
        watched(client) as changes,
    ):
        await server.last.close(CloseCode.GOING_AWAY)
        closed = await changes.wait_for(ClientState.CLOSED)
        assert closed.close_code == CloseCode.GOING_AWAY
        with pytest.raises(SocketClosedError) as caught:
            await client.call("echo")
        assert caught.value.close_code == CloseCode.GOING_AWAY
    assert len(server.upgrades) == 1


async def test_state_changes_are_reported_in_order() -> None:
    async with tcp_server() as server:
        changes = Changes()
        async with trio.open_nursery() as nursery:
            async with open_socket_client(server.url, client_id="c", reconnect=FAST) as client:
                nursery.start_soon(changes.collect, client)
                await trio.testing.wait_all_tasks_blocked()
                await server.last.close(CloseCode.SERVICE_RESTART, "restart")
                await changes.wait_for(ClientState.CONNECTED)
            await changes.wait_for(ClientState.CLOSED)  # the channel ends after it
        lost, back, closed = changes.seen
        assert (lost.state, lost.previous) == (ClientState.RECONNECTING, ClientState.CONNECTED)
        assert (lost.close_code, lost.close_reason, lost.attempt) == (1012, "restart", 1)
        assert lost.delay is not None and 0 <= lost.delay <= FAST.base
        assert (back.state, back.previous, back.connection_id) == (
            ClientState.CONNECTED,
            ClientState.RECONNECTING,
            "conn-2",
        )
        assert (closed.state, closed.previous) == (ClientState.CLOSED, ClientState.CONNECTED)
        async with client.state_changes() as late:  # already final: an ended channel
            assert [change async for change in late] == []


# --- Leaving the block ----------------------------------------------------------------


async def test_leaving_the_block_flushes_closes_normally_and_fails_pending_calls() -> None:
    async with tcp_server() as server:
        failures: list[BaseException] = []
        async with trio.open_nursery() as nursery:
            async with open_socket_client(server.url, client_id="c") as client:

                async def caller() -> None:
                    try:
                        await client.call("hang")
                    except SocketClosedError as exc:
                        failures.append(exc)

                nursery.start_soon(caller)
                await server.wait_for(lambda: bool(server.last.calls))
                client.emit("last words")
            assert client.state is ClientState.CLOSED
        conn = server.last
        await server.wait_for(lambda: conn.close_code is not None)
        assert conn.close_code == CloseCode.NORMAL
        assert conn.events == [("last words", None)]
        [failure] = failures
        assert isinstance(failure, SocketClosedError)
        with pytest.raises(SocketClosedError):
            await client.call("echo")


async def test_an_error_in_the_block_propagates_as_itself() -> None:
    async with tcp_server() as server:
        with pytest.raises(KeyError):
            async with open_socket_client(server.url, client_id="c"):
                raise KeyError("mine")
        await server.wait_for(lambda: server.last.close_code == CloseCode.NORMAL)


# --- Strings of any content -----------------------------------------------------------


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
async def test_names_and_ids_of_any_content_survive(encoding: Any) -> None:
    async with tcp_server() as server:
        for name in WEIRD_NAMES:
            server.handlers[name] = echo
        for client_id in WEIRD_NAMES:
            async with open_socket_client(
                server.url, client_id=client_id, encoding=encoding
            ) as client:
                assert server.last.hello.client_id == client_id
        async with open_socket_client(server.url, client_id="c", encoding=encoding) as client:
            conn = server.last
            heard: list[tuple[str, Any]] = []
            for name in WEIRD_NAMES:
                assert await client.call(name, name) == name
                client.emit(name, name)
                await client.subscribe(name)
                client.on(name, lambda data, name=name: heard.append((name, data)), topic=name)
                await conn.emit(name, name, topic=name)
                client.implement(name, lambda data: data)
                reply = await conn.reply_to(await conn.request(name, name))
                assert isinstance(reply, ReplyFrame) and conn.decode(reply.data) == name
            await server.wait_for(lambda: len(conn.events) == len(WEIRD_NAMES))
            assert conn.events == [(name, name) for name in WEIRD_NAMES]
            assert conn.subscribes == WEIRD_NAMES
            assert client.topics == set(WEIRD_NAMES)
            await until(lambda: len(heard) == len(WEIRD_NAMES))
            assert heard == [(name, name) for name in WEIRD_NAMES]


async def test_logs_name_the_failure(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="meshline.sockets")
    async with (
        tcp_server() as server,
        open_socket_client(server.url, client_id="logged", reconnect=FAST) as client,
        watched(client) as changes,
    ):
        await server.last.close(CloseCode.KICKED, "bye")
        await changes.wait_for(ClientState.FAILED)
    assert "stopped for good" in caplog.text


# --- Against meshline's own server -----------------------------------------------------


@attrs.define(eq=False)
class Backend:
    """What the real server's handlers and hooks saw."""

    server: Any = None
    refuse_with: int | None = None
    connected: list[Connection] = attrs.Factory(list)
    disconnected: list[tuple[Connection, DisconnectReason]] = attrs.Factory(list)
    typing: list[Any] = attrs.Factory(list)
    cancelled: list[str] = attrs.Factory(list)
    changed: Pulse = attrs.Factory(Pulse)

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        await self.changed.wait_for(predicate)

    @property
    def last(self) -> Connection:
        return self.connected[-1]


def backend_roles(backend: Backend, extra_calls: tuple[str, ...]) -> Role:
    user = Role("user")

    @user.call("echo")
    async def echo_call(conn: Connection, data: Any) -> Any:
        return data

    @user.call("swap", input=Point, output=Point)
    async def swap(conn: Connection, point: Point) -> Point:
        return Point(point.y, point.x)

    @user.call("refuse")
    async def refuse_call(conn: Connection, data: Any) -> Any:
        raise SocketError("not_found", "no such thing", {"id": data})

    @user.call("hang")
    async def hang_call(conn: Connection, data: Any) -> Any:
        try:
            await trio.sleep_forever()
        finally:
            backend.cancelled.append("hang")
            backend.changed.pulse()

    @user.on("typing")
    def typing(conn: Connection, data: Any) -> None:
        backend.typing.append(data)
        backend.changed.pulse()

    for name in extra_calls:
        user.call(name)(echo_call)
        user.on(name)(typing)
    return user


@asynccontextmanager
async def real_server(
    backend: Backend, *, extra_calls: tuple[str, ...] = (), **options: Any
) -> AsyncIterator[Any]:
    def authenticate(request: SocketRequest) -> Admission:
        if backend.refuse_with is not None:
            raise Rejection(backend.refuse_with, "not you")
        if request.headers.get("authorization") == "Bearer crash":
            raise RuntimeError("authenticate bug")
        return Admission("user", user_id=request.query.get("user"))

    def on_connect(conn: Connection) -> None:
        backend.connected.append(conn)
        backend.changed.pulse()

    def on_disconnect(conn: Connection, reason: DisconnectReason) -> None:
        backend.disconnected.append((conn, reason))
        backend.changed.pulse()

    options.setdefault("authorize_topic", lambda conn, topic: topic != "secret")
    async with open_socket_server(
        roles=[backend_roles(backend, extra_calls)],
        authenticate=authenticate,
        on_connect=on_connect,
        on_disconnect=on_disconnect,
        **options,
    ) as server:
        backend.server = server
        yield server


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
async def test_real_server_calls_events_and_requests(encoding: Any) -> None:
    backend = Backend()
    async with (
        real_server(backend) as server,
        open_socket_client(
            server.url + "ws?user=u1", client_id="client-1", encoding=encoding
        ) as client,
    ):
        conn = backend.last
        assert (conn.id, conn.client_id, conn.user_id) == (client.connection_id, "client-1", "u1")
        assert client.node_id == server.node_id
        assert await client.call("echo", {"a": [1, "b"]}) == {"a": [1, "b"]}
        assert await client.call("swap", Point(1, 2), result_type=Point) == Point(2, 1)
        with pytest.raises(CallFailedError) as caught:
            await client.call("refuse", 3)
        assert (caught.value.code, caught.value.details, caught.value.application) == (
            "not_found",
            {"id": 3},
            True,
        )
        for name, data, code in [
            ("nothing", None, ErrorCode.UNKNOWN_CALL),
            ("swap", {"x": "one"}, ErrorCode.BAD_INPUT),
        ]:
            with pytest.raises(CallFailedError) as caught:
                await client.call(name, data)
            assert caught.value.code == code and not caught.value.application

        client.emit("typing", {"on": True})
        await backend.wait_for(lambda: backend.typing == [{"on": True}])
        heard: list[Any] = []
        client.on("news", heard.append)
        conn.emit("news", "extra")
        await until(lambda: heard == ["extra"])

        def confirm(data: Any) -> Any:
            if data == "no":
                raise SocketError("refused", "said no")
            if data == "crash":
                raise RuntimeError("client bug")
            return {"ok": data}

        client.implement("confirm", confirm)
        assert await conn.request("confirm", "yes") == {"ok": "yes"}
        with pytest.raises(CallFailedError) as caught:
            await conn.request("confirm", "no")
        assert (caught.value.code, caught.value.application) == ("refused", True)
        with pytest.raises(CallFailedError) as caught:
            await conn.request("confirm", "crash")
        assert caught.value.code == ErrorCode.INTERNAL


async def test_real_server_timeout_and_cancellation_reach_the_handler() -> None:
    backend = Backend()
    async with (
        real_server(backend) as server,
        open_socket_client(server.url, client_id="c") as client,
    ):
        with pytest.raises(SocketTimeoutError):
            await client.call("hang", timeout=0.05)
        await backend.wait_for(lambda: backend.cancelled == ["hang"])
        with trio.move_on_after(0.05):
            await client.call("hang")
        await backend.wait_for(lambda: backend.cancelled == ["hang", "hang"])
        assert await client.call("echo", "fine") == "fine"


async def test_real_server_topics_survive_a_reconnect() -> None:
    backend = Backend()
    reconnects: list[str | None] = []
    async with (
        real_server(backend) as server,
        open_socket_client(
            server.url,
            client_id="client-1",
            reconnect=FAST,
            on_reconnect=lambda client: reconnects.append(client.connection_id),
        ) as client,
        watched(client) as changes,
    ):
        heard: list[Any] = []
        client.on("tick", heard.append, topic="prices")
        await client.subscribe("prices")
        with pytest.raises(CallFailedError) as caught:
            await client.subscribe("secret")
        assert caught.value.code == ErrorCode.FORBIDDEN
        assert server.topic("prices").publish("tick", 1) == 1
        await until(lambda: heard == [1])
        first = backend.last
        first.close_nowait(CloseCode.SERVICE_RESTART)
        lost = await changes.wait_for(ClientState.RECONNECTING)
        assert lost.close_code == CloseCode.SERVICE_RESTART
        await changes.wait_for(ClientState.CONNECTED)
        second = backend.last
        assert second is not first
        assert (second.client_id, second.previous_connection_id) == ("client-1", first.id)
        await until(lambda: server.topic("prices").size == 1)
        assert server.topic("prices").publish("tick", 2) == 1
        await until(lambda: heard == [1, 2])
        await until(lambda: reconnects == [second.id])


async def test_real_server_call_in_flight_fails_at_once_when_the_server_closes() -> None:
    backend = Backend()
    async with (
        real_server(backend) as server,
        open_socket_client(
            server.url, client_id="c", reconnect=FAST, call_timeout=math.inf
        ) as client,
    ):
        failure: list[SocketClosedError] = []

        async def caller() -> None:
            with pytest.raises(SocketClosedError) as caught:
                await client.call("hang")
            failure.append(caught.value)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            await backend.wait_for(lambda: backend.last.is_open)
            await trio.testing.wait_all_tasks_blocked()
            backend.last.close_nowait(CloseCode.GOING_AWAY)
        assert failure[0].close_code == CloseCode.GOING_AWAY
        assert await client.call("echo", "again") == "again"  # waited for the reconnect


async def test_real_server_kick_is_terminal() -> None:
    backend = Backend()
    async with (
        real_server(backend) as server,
        open_socket_client(server.url, client_id="c", reconnect=FAST) as client,
        watched(client) as changes,
    ):
        await backend.last.close()  # kicked (4501)
        failed = await changes.wait_for(ClientState.FAILED)
        assert failed.close_code == CloseCode.KICKED
        with pytest.raises(SocketClosedError):
            await client.call("echo")
    assert len(backend.connected) == 1


@pytest.mark.parametrize("status", [401, 403])
async def test_real_server_refusals(status: int) -> None:
    backend = Backend()
    async with real_server(backend) as server:
        backend.refuse_with = status
        with pytest.raises(ConnectionRejectedError) as caught:
            async with open_socket_client(server.url, client_id="c"):
                pytest.fail("admitted")
        assert (caught.value.status, caught.value.reason) == (status, "not you")
        backend.refuse_with = None
        async with open_socket_client(server.url, client_id="c", reconnect=FAST) as client:
            async with watched(client) as changes:
                backend.refuse_with = status
                backend.last.close_nowait(CloseCode.GOING_AWAY)
                failed = await changes.wait_for(ClientState.FAILED)
                assert isinstance(failed.error, ConnectionRejectedError)
                assert failed.error.status == status
    assert len(backend.connected) == 1


async def test_real_server_crashing_authenticate_is_a_500() -> None:
    backend = Backend()
    async with real_server(backend) as server:
        with pytest.raises(ConnectionRejectedError) as caught:
            async with open_socket_client(
                server.url, client_id="c", headers={"Authorization": "Bearer crash"}
            ):
                pytest.fail("admitted")
        assert caught.value.status == 500


async def test_real_server_sees_a_normal_close_when_the_block_ends() -> None:
    backend = Backend()
    async with real_server(backend) as server:
        async with open_socket_client(server.url, client_id="c") as client:
            client.emit("typing", "bye")
        await backend.wait_for(lambda: len(backend.disconnected) == 1)
        conn, reason = backend.disconnected[0]
        assert (reason, conn.close_code) == (DisconnectReason.CLIENT_CLOSED, CloseCode.NORMAL)
        assert backend.typing == ["bye"]


async def test_real_server_names_of_any_content() -> None:
    backend = Backend()
    names = [name for name in WEIRD_NAMES if name not in ("echo", "typing")]
    async with real_server(backend, extra_calls=tuple(names)) as server:
        for name in names:
            async with open_socket_client(server.url, client_id=name) as client:
                assert backend.last.client_id == name
        async with open_socket_client(server.url, client_id="c") as client:
            heard: list[tuple[str, Any]] = []
            for name in names:
                assert await client.call(name, name) == name
                client.emit(name, name)
                await client.subscribe(name)
                client.on(name, lambda data, name=name: heard.append((name, data)), topic=name)
                assert server.topic(name).publish(name, name) == 1
            await backend.wait_for(lambda: len(backend.typing) == len(names))
            assert backend.typing == names
            await until(lambda: len(heard) == len(names))
            assert heard == [(name, name) for name in names]
