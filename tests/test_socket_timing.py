"""The socket server's timing logic on a MockClock, over in-memory streams.

Heartbeat pings and reaping, handshake and call timeouts, backpressure against a
client that stops reading, and batched shutdown. The server serves each stream
with :meth:`SocketServer.serve_stream`; the client is trio-websocket's, wrapped
around the other end. A client "stops reading" on a lockstep stream pair (no
buffer in between: the server's writes wait for the client's reads), once
trio-websocket's own one-message queue on the client is full.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, wrap_client_stream

from meshline._sockets._codes import CloseCode, ErrorCode, should_reconnect
from meshline._sockets._connection import Connection, DisconnectReason
from meshline._sockets._errors import SocketTimeoutError
from meshline._sockets._frames import (
    MSGPACK_SUBPROTOCOL,
    CancelFrame,
    ErrorFrame,
    EventFrame,
    PingFrame,
    RequestFrame,
    ResultFrame,
)
from meshline._sockets._roles import Role
from meshline._sockets._server import (
    BackpressureOptions,
    HeartbeatOptions,
    ShutdownOptions,
    SocketServer,
    open_socket_server,
)

from .test_socket_inbound import FaultyStream
from .test_socket_server import RawClient


def make_role() -> Role:
    role = Role("user")

    @role.call("finish_anyway")
    async def finish_anyway(conn: Connection, data: Any) -> str:
        with trio.CancelScope(shield=True):
            await trio.sleep(60)  # past the call timeout, shielded from it
        return "finished"

    @role.call("sleep")
    async def sleep(conn: Connection, data: Any) -> None:
        await trio.sleep_forever()

    @role.call("nap")
    async def nap(conn: Connection, data: Any) -> None:
        await trio.sleep(data)

    @role.call("quick", timeout=100)
    async def quick(conn: Connection, data: Any) -> None:
        await trio.sleep(data or 0)

    @role.call("sleep_briefly_timed", timeout=3)
    async def sleep_briefly_timed(conn: Connection, data: Any) -> None:
        await trio.sleep_forever()

    @role.on("alive")
    def alive(conn: Connection, data: Any) -> None:
        pass

    return role


class Recorder:
    """on_connect / on_disconnect hooks that note when, on the (mock) clock."""

    def __init__(self) -> None:
        self.connections: list[Connection] = []
        self.disconnects: list[tuple[Connection, DisconnectReason, float]] = []
        self.changed = trio.Event()

    def on_connect(self, conn: Connection) -> None:
        self.connections.append(conn)
        self._changed()

    def on_disconnect(self, conn: Connection, reason: DisconnectReason) -> None:
        self.disconnects.append((conn, reason, trio.current_time()))
        self._changed()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


@asynccontextmanager
async def memory_server(**options: Any) -> AsyncIterator[tuple[SocketServer, Recorder, Any]]:
    """A server with no listener, a recorder, and a function that connects clients."""
    recorder = Recorder()
    options.setdefault("roles", [make_role()])
    async with open_socket_server(
        listen=False,
        on_connect=recorder.on_connect,
        on_disconnect=recorder.on_disconnect,
        **options,
    ) as server:
        async with trio.open_nursery() as nursery:

            async def connect(
                *,
                lockstep: bool = False,
                hello: bool = True,
                client_id: str = "c",
                server_side: Callable[[trio.abc.Stream], trio.abc.Stream] | None = None,
            ) -> RawClient:
                client_stream: trio.abc.Stream
                server_stream: trio.abc.Stream
                if lockstep:
                    client_stream, server_stream = trio.testing.lockstep_stream_pair()
                else:
                    client_stream, server_stream = trio.testing.memory_stream_pair()
                if server_side is not None:
                    server_stream = server_side(server_stream)
                nursery.start_soon(server.serve_stream, server_stream)
                ws = await wrap_client_stream(
                    nursery,
                    client_stream,  # type: ignore[arg-type]
                    "localhost",
                    "/",
                    subprotocols=[MSGPACK_SUBPROTOCOL],
                )
                client = RawClient(ws)
                if hello:
                    await client.hello(client_id)
                return client

            # On the MockClock a hang fails at once, in virtual time.
            with trio.fail_after(100_000):
                yield server, recorder, connect
            nursery.cancel_scope.cancel()


def only_connection(server: SocketServer) -> Connection:
    [conn] = server.local.connections.values()
    return conn


def writer_tasks() -> int:
    """How many tasks write for the server's connections: the shared writer's lead,
    and any connection's own writer (a stalled lead that stayed with it); read
    through trio's task tree."""
    names = ("SocketServer._keep_writing", "SharedWriter._write_in_turn")
    count = 0
    tasks = [trio.lowlevel.current_root_task()]
    while tasks:
        task = tasks.pop()
        count += task.name.endswith(names)
        tasks.extend(child for nursery in task.child_nurseries for child in nursery.child_tasks)
    return count


class FaultySides:
    """``server_side`` for ``connect``: wraps each server-side stream in a
    :class:`FaultyStream`, kept in :attr:`streams`."""

    def __init__(self) -> None:
        self.streams: list[FaultyStream] = []

    def __call__(self, stream: trio.abc.Stream) -> trio.abc.Stream:
        self.streams.append(FaultyStream(stream))
        return self.streams[-1]


async def wait_until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll ``condition`` (on the MockClock: 60 virtual seconds, then fail)."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


# --- Heartbeat -------------------------------------------------------------------------------


async def test_pings_go_out_at_the_interval_and_an_answering_client_stays(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_server(heartbeat=HeartbeatOptions(interval=10, max_missed=2)) as (
        server,
        _,
        connect,
    ):
        client = await connect()
        client.answer_pings = False
        start = trio.current_time()
        conn = only_connection(server)
        seen = []
        for _ in range(5):
            ping = await client.next()
            assert isinstance(ping, PingFrame)
            seen.append((ping.seq, trio.current_time() - start))
            await client.send(client.protocol.pong(ping.seq))
        assert seen == [(1, 10), (2, 20), (3, 30), (4, 40), (5, 50)]
        assert conn.is_open
        assert conn.last_ping_at == pytest.approx(conn.connected_at + 50, abs=1e-6)
        await trio.sleep(1)
        assert conn.last_pong_at == pytest.approx(conn.connected_at + 50, abs=1e-6)
        assert conn.round_trip_time == 0


async def test_a_silent_client_is_reaped_after_interval_times_max_missed_plus_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_server(heartbeat=HeartbeatOptions(interval=10, max_missed=2)) as (
        server,
        recorder,
        connect,
    ):
        client = await connect()
        start = trio.current_time()
        conn = only_connection(server)
        client.answer_pings = False
        pings = [await client.next(), await client.next()]
        assert [ping.seq for ping in pings] == [1, 2]
        code = await client.closed()
        assert code == CloseCode.HEARTBEAT_MISSED
        assert should_reconnect(code)
        await conn.wait_closed()
        [(_, reason, at)] = recorder.disconnects
        assert reason is DisconnectReason.REAPED
        assert at - start == 30
        assert conn.close_code == CloseCode.HEARTBEAT_MISSED
        assert conn.id not in server.local.connections


async def test_any_frame_counts_as_life(autojump_clock: trio.testing.MockClock) -> None:
    async with memory_server(heartbeat=HeartbeatOptions(interval=10, max_missed=2)) as (
        server,
        recorder,
        connect,
    ):
        client = await connect()
        client.answer_pings = False
        conn = only_connection(server)

        async def read_and_ignore() -> None:
            with pytest.raises(ConnectionClosed):
                while True:
                    await client.ws.get_message()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_and_ignore)
            for _ in range(10):
                await trio.sleep(25)
                await client.emit("alive")
            await trio.sleep(29)
            assert conn.is_open and recorder.disconnects == []
            await trio.sleep(1.5)  # 30 s since the last frame
            assert recorder.disconnects[0][1] is DisconnectReason.REAPED
            nursery.cancel_scope.cancel()


async def test_no_heartbeat_no_pings_and_no_reaping(autojump_clock: trio.testing.MockClock) -> None:
    async with memory_server(heartbeat=None) as (server, _, connect):
        client = await connect()
        assert client.welcome is not None and client.welcome.heartbeat_interval == 0
        conn = only_connection(server)
        with trio.move_on_after(10_000):
            await client.next()
            pytest.fail("something arrived")
        assert conn.is_open and conn.last_ping_at is None


# --- Timeouts -------------------------------------------------------------------------------


async def test_a_client_that_sends_no_hello_is_closed_with_4002(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_server(handshake_timeout=5) as (_, recorder, connect):
        client = await connect(hello=False)
        start = trio.current_time()
        assert await client.closed() == CloseCode.HANDSHAKE_TIMEOUT
        assert trio.current_time() - start == 5
        assert recorder.connections == [] and recorder.disconnects == []


async def test_a_call_is_answered_timeout_at_the_call_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_server(call_timeout=30) as (_, _, connect):
        client = await connect()
        start = trio.current_time()
        call_id, message = client.protocol.call("sleep")
        await client.send(message)
        answer = await client.next()
        assert isinstance(answer, ErrorFrame) and answer.id == call_id
        assert answer.code == ErrorCode.TIMEOUT
        assert trio.current_time() - start == 30


async def test_calls_one_after_another_each_time_out_at_their_own_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Calls that come one at a time share one timer (the call runner's): each must
    still time out exactly at its own deadline, later or earlier than the last."""
    async with memory_server(call_timeout=30) as (_, _, connect):
        client = await connect()

        async def call(name: str, data: Any = None) -> tuple[Any, float]:
            start = trio.current_time()
            call_id, message = client.protocol.call(name, data)
            await client.send(message)
            answer = await client.next()
            assert answer.id == call_id
            return answer, trio.current_time() - start

        answer, _ = await call("nap", 10)  # the runner's timer: 30 s from its start
        assert isinstance(answer, ResultFrame)
        await trio.sleep(5)
        # A deadline later than the armed timer's (45 s against 30 s from the
        # nap's start): not cut at the earlier one, timed out at its own 30 s.
        answer, took = await call("sleep")
        assert isinstance(answer, ErrorFrame) and answer.code == ErrorCode.TIMEOUT
        assert took == 30
        answer, _ = await call("quick", 20)  # a fresh runner; its timer: 100 s on
        assert isinstance(answer, ResultFrame)
        # A deadline earlier than the armed timer's: timed out at its own 3 s.
        answer, took = await call("sleep_briefly_timed")
        assert isinstance(answer, ErrorFrame) and answer.code == ErrorCode.TIMEOUT
        assert took == 3
        answer, took = await call("quick", 99)  # within its 100 s: answered
        assert isinstance(answer, ResultFrame) and took == 99


async def test_a_handler_that_returns_after_its_timeout_still_has_its_answer_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cancelled (by its timeout) as it returns: the answer it returned is sent, not
    lost with a write cancelled in the same scope; the connection goes on."""
    async with memory_server(call_timeout=30) as (_, _, connect):
        client = await connect()
        for _ in range(2):  # the first runs in a fresh runner, the second in a new one
            call_id, message = client.protocol.call("finish_anyway")
            await client.send(message)
            answer = await client.next()
            assert isinstance(answer, ResultFrame) and answer.id == call_id
            assert client.codec.decode_data(answer.data, str) == "finished"


async def test_a_request_times_out_at_its_timeout_and_the_client_sees_a_cancel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_server() as (server, _, connect):
        client = await connect()
        conn = only_connection(server)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def ask() -> None:
                with pytest.raises(SocketTimeoutError):
                    await conn.request("confirm", {"q": "?"}, timeout=7)
                assert trio.current_time() - start == 7

            nursery.start_soon(ask)
            request = await client.next()
            assert isinstance(request, RequestFrame) and request.timeout == 7
            assert await client.next() == CancelFrame(request.id, "request")


# --- Backpressure ---------------------------------------------------------------------------


async def emit_until_closed(conn: Connection, size: int, limit: int = 1000) -> int:
    """Emit ``size``-byte events, a tick apart, until the connection closes; how many."""
    for count in range(limit):
        if not conn.is_open:
            return count
        conn.emit("blob", "x" * size)
        await trio.sleep(0.001)
    raise AssertionError("the connection never closed")


async def test_a_client_that_stops_reading_is_closed_with_1013(
    autojump_clock: trio.testing.MockClock,
) -> None:
    options = BackpressureOptions(max_buffered_bytes=8000, policy="close")
    async with memory_server(backpressure=options, close_timeout=2) as (
        server,
        recorder,
        connect,
    ):
        client = await connect(lockstep=True)
        conn = only_connection(server)
        emitted = await emit_until_closed(conn, 1000)
        closed_at = trio.current_time()
        assert 8 <= emitted <= 20  # about max_buffered_bytes, plus what the client took
        assert conn.disconnect_reason is DisconnectReason.BACKPRESSURE
        assert conn.close_code == CloseCode.TRY_AGAIN_LATER
        assert should_reconnect(CloseCode.TRY_AGAIN_LATER)
        await conn.wait_closed()
        # The client does not take the close: dropped after close_timeout.
        [(_, reason, at)] = recorder.disconnects
        assert reason is DisconnectReason.BACKPRESSURE
        assert at - closed_at == pytest.approx(2, abs=0.01)
        # The client finds the connection gone (too stuck to be told 1013).
        with pytest.raises(ConnectionClosed):
            while True:
                await client.ws.get_message()


async def test_drop_policy_drops_and_counts_every_frame_it_does_not_deliver(
    autojump_clock: trio.testing.MockClock,
) -> None:
    options = BackpressureOptions(max_buffered_bytes=8000, policy="drop")
    async with memory_server(backpressure=options) as (server, _, connect):
        client = await connect(lockstep=True)
        conn = only_connection(server)
        total = 200
        for seq in range(total):
            conn.emit("seq", {"seq": seq, "pad": "x" * 500})
            await trio.sleep(0.001)
        assert conn.is_open
        assert conn.dropped > 0
        received = []
        while len(received) < total - conn.dropped:
            event = await client.next()
            assert isinstance(event, EventFrame)
            received.append(client.codec.decode_data(event.data, Any)["seq"])
        assert received == sorted(received)
        assert len(received) + conn.dropped == total
        assert conn.is_open


async def test_latest_policy_keeps_only_the_newest_value_per_key(
    autojump_clock: trio.testing.MockClock,
) -> None:
    options = BackpressureOptions(max_buffered_bytes=8000, policy="latest")
    async with memory_server(backpressure=options) as (server, _, connect):
        client = await connect(lockstep=True)
        conn = only_connection(server)
        for value in range(300):
            conn.emit("log", "x" * 500)  # fills the queue, then drops
            conn.emit("cursor", value, coalesce="cursor")
            await trio.sleep(0.001)
        assert conn.is_open
        assert conn.coalesced > 0 and conn.dropped > 0
        cursors = []
        while not cursors or cursors[-1] != 299:
            event = await client.next()
            assert isinstance(event, EventFrame)
            if event.name == "cursor":
                cursors.append(client.codec.decode_data(event.data, int))
        assert cursors == sorted(set(cursors))
        assert len(cursors) < 300
        assert len(cursors) + conn.coalesced == 300


async def stuck_and_fast(
    connect: Any, recorder: Recorder
) -> tuple[RawClient, RawClient, Connection, Connection]:
    """A client that stops reading (lockstep) and one that reads, both in "room":
    the clients, then their connections."""
    stuck = await connect(lockstep=True, client_id="stuck")
    fast = await connect(client_id="fast")
    for conn in recorder.connections:
        conn.join("room")
    stuck_conn, fast_conn = recorder.connections
    return stuck, fast, stuck_conn, fast_conn


async def test_a_slow_client_never_blocks_a_room_emit_to_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    options = BackpressureOptions(max_buffered_bytes=8000, policy="close")
    async with memory_server(backpressure=options) as (server, recorder, connect):
        stuck, fast, stuck_conn, fast_conn = await stuck_and_fast(connect, recorder)
        total = 300
        received: list[int] = []

        async def read_fast() -> None:
            while len(received) < total:
                event = await fast.next()
                received.append(fast.codec.decode_data(event.data, int))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_fast)
            for seq in range(total):
                server.room("room").emit("seq", seq)
                server.room("room").emit("pad", "x" * 1000, skip=fast_conn)
                await trio.sleep(0.001)
        assert received == list(range(total))
        assert stuck_conn.disconnect_reason is DisconnectReason.BACKPRESSURE
        assert fast_conn.is_open
        assert server.room("room").ids == {fast_conn.id}
        del stuck


async def test_a_client_that_stops_reading_holds_up_nobody_and_gets_everything_later(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The server writes its connections' messages in turn from one task; a write
    # that waits on this client must not hold the others up, and the client's own
    # messages must still all arrive, in order, once it reads again.
    options = BackpressureOptions(max_buffered_bytes=1_000_000, policy="drop")
    async with memory_server(backpressure=options, heartbeat=None) as (server, recorder, connect):
        stuck, fast, stuck_conn, fast_conn = await stuck_and_fast(connect, recorder)
        total = 300
        received: list[int] = []

        async def read_fast(until: int) -> None:
            while len(received) < until:
                event = await fast.next()
                assert isinstance(event, EventFrame)
                received.append(fast.codec.decode_data(event.data, int))

        for first, until in ((0, total), (total, 2 * total)):  # stalled, then known slow
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_fast, until)
                for seq in range(first, until):
                    server.room("room").emit("seq", seq)
                    await trio.sleep(0.001)
            assert received == list(range(until))
            assert stuck_conn.is_open and stuck_conn.buffered_bytes > 0
        stuck_seqs = []
        while len(stuck_seqs) < 2 * total:
            event = await stuck.next()
            assert isinstance(event, EventFrame)
            stuck_seqs.append(stuck.codec.decode_data(event.data, int))
        assert stuck_seqs == list(range(2 * total))
        assert stuck_conn.dropped == 0 and stuck_conn.is_open and fast_conn.is_open
        # Caught up: its writer task ends, the shared writer writes for it again.
        await wait_until(lambda: writer_tasks() == 1)
        server.room("room").emit("seq", -1)
        for client in (stuck, fast):
            event = await client.next()
            assert client.codec.decode_data(event.data, int) == -1
        assert writer_tasks() == 1


async def test_a_client_slow_to_take_each_write_holds_up_nobody(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Every write to this client takes 9 ms: never stuck, but a turn of many
    # writes for it would hold the others up for much longer than one write.
    slow_side = FaultySides()
    options = BackpressureOptions(max_buffered_bytes=10_000_000, policy="drop")
    async with memory_server(backpressure=options, heartbeat=None) as (server, recorder, connect):
        slow = await connect(client_id="slow", server_side=slow_side)
        fast = await connect(client_id="fast")
        for conn in recorder.connections:
            conn.join("room")
        slow_side.streams[0].delay = 0.009
        total = 300
        emitted_at: list[float] = []
        lags: list[float] = []

        async def read_fast() -> None:
            while len(lags) < total:
                event = await fast.next()
                seq = fast.codec.decode_data(event.data, int)
                lags.append(trio.current_time() - emitted_at[seq])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_fast)
            for seq in range(total):
                emitted_at.append(trio.current_time())
                server.room("room").emit("seq", seq)
                await trio.sleep(0.001)
        assert max(lags) < 0.03  # a stall is noticed within two 10 ms ticks
        seqs = [slow.codec.decode_data((await slow.next()).data, int) for _ in range(total)]
        assert seqs == list(range(total))
        await wait_until(lambda: writer_tasks() == 1)


async def test_the_end_of_a_connection_cancels_a_write_stalled_for_good(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A stream whose write never returns, even once closed: the connection's end
    # must cancel the task stalled in it, not leave it parked until the server exits.
    stalling_side = FaultySides()
    async with memory_server(heartbeat=None) as (server, recorder, connect):
        await connect(client_id="stalled", server_side=stalling_side)
        conn = only_connection(server)
        stalling_side.streams[0].stalled = True
        conn.emit("seq", 1)
        await wait_until(lambda: writer_tasks() == 2)  # the lead stalled and was replaced
        await conn.close()
        await conn.wait_closed()
        assert recorder.disconnects[0][1] is DisconnectReason.SERVER_CLOSED
        await wait_until(lambda: writer_tasks() == 1)


# --- Shutdown -------------------------------------------------------------------------------


async def test_shutdown_closes_in_batches_spread_in_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shutdown = ShutdownOptions(batch_size=2, batch_interval=1.0)
    codes: list[int] = []
    async with memory_server(shutdown=shutdown) as (server, recorder, connect):
        clients = [await connect(client_id=f"c{n}") for n in range(5)]
        start = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def until_closed(client: RawClient) -> None:
                codes.append(await client.closed())

            for client in clients:
                nursery.start_soon(until_closed, client)
            await server.shutdown()
    assert codes == [CloseCode.GOING_AWAY] * 5
    times = sorted(round(at - start, 3) for _, _, at in recorder.disconnects)
    assert times == [0, 0, 1, 1, 2]
    assert {reason for _, reason, _ in recorder.disconnects} == {DisconnectReason.SERVER_EXIT}


async def test_a_request_with_no_timeout_waits_as_long_as_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_server(heartbeat=None) as (server, _, connect):
        client = await connect()
        conn = only_connection(server)
        async with trio.open_nursery() as nursery:
            answers: list[Any] = []

            async def ask() -> None:
                answers.append(await conn.request("confirm", None, timeout=math.inf))

            nursery.start_soon(ask)
            request = await client.next()
            assert isinstance(request, RequestFrame) and request.timeout is None
            await trio.sleep(80_000)
            await client.send(client.protocol.reply(request.id, "yes"))
        assert answers == ["yes"]
