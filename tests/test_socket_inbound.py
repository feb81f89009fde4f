"""Direct delivery from trio-websocket's reader task, and the writer's wake-up signal.

The behaviour of connections over both reading paths is covered by running
``test_socket_server.py`` and ``test_socket_client.py`` twice (the
``reading_path`` fixture); here: the hand-over itself, and a check that the
installed trio-websocket takes the fast path (so an upgrade that moves its
internals shows up as a failing test, not as a silent slowdown).
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import open_websocket_url, wrap_client_stream

from meshline._sockets._backoff import ReconnectOptions
from meshline._sockets._client import ClientState, open_socket_client
from meshline._sockets._codes import CloseCode
from meshline._sockets._connection import Connection
from meshline._sockets._frames import (
    MSGPACK_SUBPROTOCOL,
    HelloFrame,
    Message,
    codec_for_subprotocol,
)
from meshline._sockets._inbound import (
    DirectInbound,
    Signal,
    deliver_directly,
    direct_delivery_supported,
)
from meshline._sockets._roles import Role
from meshline._sockets._server import open_socket_server


class ChannelHolder:
    """Keeps a message channel where trio-websocket keeps its own."""

    def __init__(self, size: int = 10) -> None:
        self._send_channel, self._recv_channel = trio.open_memory_channel[Message](size)


def recorder() -> tuple[list[Message], list[str], Any, Any]:
    messages: list[Message] = []
    closes: list[str] = []
    return messages, closes, messages.append, lambda: closes.append("closed")


async def test_waiting_messages_are_handed_over_first_in_order() -> None:
    holder = ChannelHolder()
    holder._send_channel.send_nowait(b"one")
    holder._send_channel.send_nowait("two")
    messages, closes, on_message, on_closed = recorder()
    assert deliver_directly(holder, on_message, on_closed) is not None  # type: ignore[arg-type]
    assert messages == [b"one", "two"] and closes == []
    await holder._send_channel.send(b"three")
    assert messages == [b"one", "two", b"three"]
    await holder._send_channel.aclose()
    await holder._recv_channel.aclose()  # trio-websocket closes either end, or both
    assert closes == ["closed"]
    holder._send_channel.send_nowait(b"late")
    assert messages[-1] == b"three"


async def test_a_channel_that_ended_before_the_switch_reports_the_close_after_its_messages() -> (
    None
):
    holder = ChannelHolder()
    holder._send_channel.send_nowait(b"last words")
    holder._send_channel.close()
    messages, closes, on_message, on_closed = recorder()
    assert deliver_directly(holder, on_message, on_closed) is not None  # type: ignore[arg-type]
    assert messages == [b"last words"] and closes == ["closed"]


async def test_the_stand_in_closes_once_and_has_nothing_to_read() -> None:
    messages, closes, on_message, on_closed = recorder()
    inbound = DirectInbound(on_message, on_closed)
    async with inbound:
        await inbound.send(b"x")
    assert messages == [b"x"] and closes == ["closed"] and inbound.closed
    with pytest.raises(trio.EndOfChannel):
        await inbound.receive()


def test_other_internals_change_nothing_and_say_so() -> None:
    class Elsewhere:
        _send_channel = None

    target = Elsewhere()
    assert not direct_delivery_supported(target)
    assert deliver_directly(target, print, print) is None  # type: ignore[arg-type]
    assert target._send_channel is None


async def test_the_installed_trio_websocket_takes_the_fast_path_on_both_sides() -> None:
    seen: list[bool] = []

    async def on_connect(conn: Connection) -> None:
        seen.append(direct_delivery_supported(conn._ws))

    async with open_socket_server(roles=[Role("user")], on_connect=on_connect) as server:
        async with open_websocket_url(server.url, subprotocols=[MSGPACK_SUBPROTOCOL]) as ws:
            assert direct_delivery_supported(ws)
            await ws.send_message(codec_for_subprotocol(MSGPACK_SUBPROTOCOL).encode(HelloFrame()))
            await ws.get_message()  # the welcome
    assert seen == [True]


async def test_a_signal_remembers_a_set_before_the_wait() -> None:
    signal = Signal()
    signal.set()
    signal.set()
    with trio.fail_after(1):
        await signal.wait()  # both sets count once


async def test_a_signal_wakes_its_waiter_and_a_cancelled_wait_consumes_nothing() -> None:
    signal = Signal()
    woken: list[int] = []

    async def waiter() -> None:
        await signal.wait()
        woken.append(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RuntimeError):
            await signal.wait()  # one waiter at a time
        signal.set()
    assert woken == [1]
    with trio.move_on_after(0):
        await signal.wait()
    signal.set()
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await signal.wait()
    with trio.fail_after(1):
        await signal.wait()  # the set before the cancelled wait is still there


class FaultyStream(trio.abc.Stream):
    """A stream whose writes start failing (``broken``: the peer reset it),
    hanging (``stalled``: the peer stopped reading and the buffer is full) or
    each taking ``delay`` seconds (a slow link) when told to."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.broken = False
        self.stalled = False
        self.delay = 0.0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.broken:
            raise trio.BrokenResourceError("connection reset by peer")
        if self.stalled:
            await trio.sleep_forever()
        if self.delay:
            await trio.sleep(self.delay)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def until(condition: Any, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.005)


async def test_a_close_whose_answer_cannot_be_written_still_ends_the_connection() -> None:
    """The client closes and resets before the server answers the close: trio-websocket
    leaves its reader without a word to the direct delivery; the connection ends anyway."""
    client_end, server_end = trio.testing.memory_stream_pair()
    breaking = FaultyStream(server_end)
    ended: list[str] = []
    async with (
        open_socket_server(
            roles=[Role("user")],
            heartbeat=None,
            listen=False,
            on_disconnect=lambda conn, reason: ended.append(reason),
        ) as server,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(server.serve_stream, breaking)
        ws = await wrap_client_stream(
            nursery, client_end, "h", "/", subprotocols=[MSGPACK_SUBPROTOCOL]
        )
        await ws.send_message(codec_for_subprotocol(MSGPACK_SUBPROTOCOL).encode(HelloFrame()))
        await ws.get_message()
        await until(lambda: len(server.local) == 1)
        breaking.broken = True
        with trio.move_on_after(0.5):
            await ws.aclose(1000, "bye")
        await until(lambda: ended == ["client_closed"])
        assert len(server.local) == 0
        nursery.cancel_scope.cancel()


async def test_a_client_whose_close_answer_fails_reconnects() -> None:
    streams: list[FaultyStream] = []
    async with (
        open_socket_server(roles=[Role("user")], heartbeat=None, listen=False) as server,
        trio.open_nursery() as nursery,
    ):

        async def open_stream(url: str) -> trio.abc.Stream:
            client_end, server_end = trio.testing.memory_stream_pair()
            nursery.start_soon(server.serve_stream, server_end)
            stream = FaultyStream(client_end)
            streams.append(stream)
            return stream

        async with open_socket_client(
            "ws://memory.test/",
            client_id="c",
            open_stream=open_stream,
            reconnect=ReconnectOptions(base=0.01, cap=0.05),
        ) as client:
            await until(lambda: len(server.local) == 1)
            first = next(iter(server.local.connections.values()))
            streams[0].broken = True  # the client's writes fail from now on...
            first.close_nowait(CloseCode.RECONNECT)  # ...as the server sends a close
            await until(lambda: len(streams) == 2 and client.state is ClientState.CONNECTED)
        nursery.cancel_scope.cancel()
