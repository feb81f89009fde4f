"""The socket client's timing logic, on ``MockClock(autojump_threshold=0)``.

The client runs over ``trio.testing.memory_stream_pair`` (its ``open_stream``
option) against the protocol-level server of ``test_socket_client.py``, with
trio-websocket on both ends: backoff delays, the silent-server deadline, storm
avoidance and the bound on closing are exact in virtual time.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from meshline._sockets._backoff import Backoff, ReconnectOptions
from meshline._sockets._client import (
    CLOSE_TIMEOUT,
    ClientState,
    SocketClient,
    SocketConnectError,
    SocketConnectTimeoutError,
    open_socket_client,
)
from meshline._sockets._codes import CloseCode
from meshline._sockets._errors import ConnectionRejectedError, SocketClosedError, SocketTimeoutError
from meshline._sockets._server import HeartbeatOptions

from .test_socket_client import Backend, Changes, FakeServer, real_server
from .test_socket_inbound import FaultyStream

URL = "ws://memory.test/sockets"


class Highest:
    """A jitter that always picks the ceiling, and records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[float, float]] = []

    def __call__(self, low: float, high: float) -> float:
        self.asked.append((low, high))
        return high


@asynccontextmanager
async def memory_client(
    server: FakeServer, **options: Any
) -> AsyncIterator[tuple[SocketClient, Changes]]:
    async with trio.open_nursery() as nursery:
        options.setdefault("open_stream", server.memory_opener(nursery))
        async with open_socket_client(URL, client_id="c", **options) as client:
            changes = Changes()
            nursery.start_soon(changes.collect, client)
            await trio.testing.wait_all_tasks_blocked()
            yield client, changes
        nursery.cancel_scope.cancel()


# --- Backoff, sans-IO -----------------------------------------------------------------


def test_backoff_ceilings_grow_by_the_factor_up_to_the_cap() -> None:
    jitter = Highest()
    backoff = Backoff(ReconnectOptions(jitter=jitter))
    delays = [backoff.next_delay() for _ in range(9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert all(low == 0 for low, _ in jitter.asked)  # full jitter: from zero
    backoff.reset()
    assert backoff.next_delay() == 0.5
    assert Backoff(ReconnectOptions()).ceiling(10_000) == 30.0  # no overflow
    assert Backoff(ReconnectOptions(factor=1, base=2, cap=5)).ceiling(50) == 2.0


def test_backoff_delays_stay_within_full_jitter_bounds() -> None:
    backoff = Backoff(ReconnectOptions(base=0.5, cap=30))
    for attempt in range(200):
        ceiling = backoff.ceiling(attempt)
        assert 0 <= backoff.next_delay() <= ceiling
    for wild in (-1.0, 99.0, math.nan, math.inf):
        delay = Backoff(ReconnectOptions(jitter=lambda low, high, wild=wild: wild)).next_delay()
        assert 0 <= delay <= 0.5


def test_backoff_max_attempts() -> None:
    backoff = Backoff(ReconnectOptions(max_attempts=2))
    assert not backoff.exhausted
    backoff.next_delay()
    backoff.next_delay()
    assert backoff.exhausted
    backoff.reset()
    assert not backoff.exhausted


# --- Backoff, in the client -----------------------------------------------------------


async def test_reconnect_attempts_follow_the_backoff(autojump_clock: trio.abc.Clock) -> None:
    server = FakeServer()
    jitter = Highest()
    async with trio.open_nursery() as nursery:
        real_opener = server.memory_opener(nursery)
        failures = 6
        attempts: list[float] = []

        async def open_stream(url: str) -> trio.abc.Stream:
            attempts.append(trio.current_time())
            if 1 < len(attempts) <= 1 + failures:
                raise OSError("connection refused")
            return await real_opener(url)

        async with memory_client(
            server, open_stream=open_stream, reconnect=ReconnectOptions(jitter=jitter)
        ) as (_client, changes):
            lost_at = trio.current_time()
            await server.last.close(CloseCode.GOING_AWAY)
            back = await changes.wait_for(ClientState.CONNECTED)
            gaps = [b - a for a, b in zip([lost_at, *attempts[1:]], attempts[1:], strict=False)]
            assert gaps == pytest.approx([0.5, 1, 2, 4, 8, 16, 30])
            assert jitter.asked == [(0.0, c) for c in (0.5, 1, 2, 4, 8, 16, 30)]
            assert back.connection_id == "conn-2"
            retries = [change for change in changes.seen if change.error is not None]
            assert len(retries) == failures
            assert all(isinstance(change.error, SocketConnectError) for change in retries)
            # A success resets the backoff: the next loss waits the base again.
            await server.last.close(CloseCode.GOING_AWAY)
            await changes.wait_for(ClientState.CONNECTED, 2)
            assert jitter.asked[-1] == (0.0, 0.5)
        nursery.cancel_scope.cancel()


async def test_each_attempt_has_the_connect_timeout(autojump_clock: trio.abc.Clock) -> None:
    server = FakeServer()
    async with trio.open_nursery() as nursery:
        real_opener = server.memory_opener(nursery)
        attempts: list[float] = []

        async def open_stream(url: str) -> trio.abc.Stream:
            attempts.append(trio.current_time())
            if len(attempts) == 2:
                await trio.sleep_forever()  # a connect that hangs
            return await real_opener(url)

        async with memory_client(
            server,
            open_stream=open_stream,
            connect_timeout=3,
            reconnect=ReconnectOptions(jitter=lambda low, high: 0.0),
        ) as (_client, changes):
            await server.last.close(CloseCode.GOING_AWAY)
            await changes.wait_for(ClientState.CONNECTED)
            [timed_out] = [change for change in changes.seen if change.error is not None]
            assert isinstance(timed_out.error, SocketConnectTimeoutError)
            assert attempts[2] - attempts[1] == pytest.approx(3)
        nursery.cancel_scope.cancel()


async def test_the_first_connect_raises_after_its_timeout(autojump_clock: trio.abc.Clock) -> None:
    async def open_stream(url: str) -> trio.abc.Stream:
        await trio.sleep_forever()
        raise AssertionError

    started = trio.current_time()
    with pytest.raises(SocketConnectTimeoutError):
        async with open_socket_client(URL, client_id="c", open_stream=open_stream):
            pytest.fail("connected")
    assert trio.current_time() - started == pytest.approx(10.0)


async def test_max_attempts_gives_up(autojump_clock: trio.abc.Clock) -> None:
    server = FakeServer()
    async with trio.open_nursery() as nursery:
        real_opener = server.memory_opener(nursery)
        attempts = 0

        async def open_stream(url: str) -> trio.abc.Stream:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                raise OSError("down")
            return await real_opener(url)

        async with memory_client(
            server, open_stream=open_stream, reconnect=ReconnectOptions(max_attempts=3)
        ) as (_client, changes):
            await server.last.close(CloseCode.GOING_AWAY)
            failed = await changes.wait_for(ClientState.FAILED)
            assert isinstance(failed.error, SocketClosedError)
            assert attempts == 1 + 3
        nursery.cancel_scope.cancel()


# --- Storm avoidance ------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_client_makes_exactly_one_attempt(
    autojump_clock: trio.abc.Clock, status: int
) -> None:
    server = FakeServer()
    async with memory_client(server) as (client, changes):
        server.reject_with = status
        await server.last.close(CloseCode.SERVICE_RESTART)
        failed = await changes.wait_for(ClientState.FAILED)
        assert isinstance(failed.error, ConnectionRejectedError)
        await trio.sleep(24 * 3600)  # a virtual day later: still no second attempt
        assert len(server.upgrades) == 2
        with pytest.raises(ConnectionRejectedError):
            await client.call("echo")


async def test_a_kicked_client_never_comes_back(autojump_clock: trio.abc.Clock) -> None:
    server = FakeServer()
    async with memory_client(server) as (_client, changes):
        await server.last.close(CloseCode.KICKED, "kicked")
        await changes.wait_for(ClientState.FAILED)
        await trio.sleep(24 * 3600)
        assert len(server.upgrades) == 1


async def test_a_terminal_close_before_the_welcome_stops_the_client(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = FakeServer()
    async with memory_client(server) as (_client, changes):
        server.close_before_welcome = CloseCode.UNAUTHORIZED
        await server.last.close(CloseCode.GOING_AWAY)
        failed = await changes.wait_for(ClientState.FAILED)
        assert (failed.close_code, failed.close_reason) == (CloseCode.UNAUTHORIZED, "not now")
        await trio.sleep(24 * 3600)
        assert len(server.upgrades) == 2
    async with trio.open_nursery() as nursery:
        with pytest.raises(SocketConnectError) as caught:
            async with open_socket_client(
                URL, client_id="c", open_stream=server.memory_opener(nursery)
            ):
                pytest.fail("welcomed")
        assert caught.value.close_code == CloseCode.UNAUTHORIZED
        nursery.cancel_scope.cancel()


async def test_a_reconnect_band_close_before_the_welcome_is_retried(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = FakeServer()
    async with memory_client(server) as (_client, changes):
        server.close_before_welcome = CloseCode.TRY_AGAIN_LATER
        await server.last.close(CloseCode.GOING_AWAY)
        retry = await changes.wait_for(ClientState.RECONNECTING, 2)
        assert isinstance(retry.error, SocketConnectError)
        assert retry.error.close_code == CloseCode.TRY_AGAIN_LATER
        server.close_before_welcome = None
        await changes.wait_for(ClientState.CONNECTED)


# --- Heartbeat ------------------------------------------------------------------------


@pytest.mark.parametrize("grace", [None, 3.0])
async def test_a_silent_server_is_detected_after_interval_times_max_missed_plus_one(
    autojump_clock: trio.abc.Clock, grace: float | None
) -> None:
    server = FakeServer(heartbeat_interval=5.0, heartbeat_max_missed=2, pings=False)
    async with memory_client(
        server, heartbeat_grace=grace, reconnect=ReconnectOptions(jitter=lambda low, high: 0.0)
    ) as (_client, changes):
        first = server.last
        lost = await changes.wait_for(ClientState.RECONNECTING)
        detected_at = trio.current_time()
        assert lost.close_code == CloseCode.HEARTBEAT_MISSED
        assert detected_at - first.welcomed_at == pytest.approx(5.0 * 3 + (grace or 0.0))
        await server.wait_for(lambda: first.close_code is not None)
        assert first.close_code == CloseCode.HEARTBEAT_MISSED
        await changes.wait_for(ClientState.CONNECTED)


async def test_any_frame_counts_as_life(autojump_clock: trio.abc.Clock) -> None:
    server = FakeServer(heartbeat_interval=5.0, heartbeat_max_missed=2, pings=False)
    async with memory_client(server) as (client, changes):
        conn = server.last
        for _ in range(10):
            await trio.sleep(14)  # just under the 15 s deadline each time
            await conn.emit("alive")
        assert client.state is ClientState.CONNECTED
        assert changes.seen == []


async def test_the_client_answers_pings_and_stays_connected(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = FakeServer(heartbeat_interval=5.0, heartbeat_max_missed=2)
    async with memory_client(server) as (client, changes):
        conn = server.last
        await server.wait_for(lambda: len(conn.pongs) >= 20)
        assert conn.pongs[:20] == list(range(1, 21))
        assert client.state is ClientState.CONNECTED
        assert changes.seen == []


async def test_heartbeat_off_never_declares_the_server_dead(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = FakeServer(heartbeat_interval=0.0)
    async with memory_client(server) as (client, _changes):
        await trio.sleep(24 * 3600)
        assert client.state is ClientState.CONNECTED
        assert await client.call("echo", 1) == 1


# --- Closing --------------------------------------------------------------------------


async def test_leaving_is_bounded_when_the_server_never_answers_the_close(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = FakeServer()
    async with trio.open_nursery() as nursery:
        async with memory_client(server) as (client, _changes):
            conn = server.last
            conn.freeze()  # the close frame is never answered
            await trio.testing.wait_all_tasks_blocked()
            left_at = trio.current_time()
        assert trio.current_time() - left_at <= 2 * CLOSE_TIMEOUT
        assert client.state is ClientState.CLOSED
        nursery.cancel_scope.cancel()


async def test_cancelling_the_block_still_closes_within_the_bound(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = FakeServer()
    async with trio.open_nursery() as outer:
        opener = server.memory_opener(outer)
        with trio.CancelScope() as scope:
            async with open_socket_client(URL, client_id="c", open_stream=opener):
                conn = server.last
                scope.cancel()
                await trio.sleep_forever()
        await server.wait_for(lambda: conn.close_code is not None)
        assert conn.close_code == CloseCode.NORMAL
        outer.cancel_scope.cancel()


# --- Against meshline's own server, over memory streams ------------------------------------------


async def test_real_server_heartbeat_keeps_an_answering_client(
    autojump_clock: trio.abc.Clock,
) -> None:
    backend = Backend()
    async with trio.open_nursery() as nursery:
        async with real_server(
            backend, listen=False, heartbeat=HeartbeatOptions(interval=5.0, max_missed=2)
        ) as server:

            async def open_stream(url: str) -> trio.abc.Stream:
                client_end, server_end = trio.testing.memory_stream_pair()
                nursery.start_soon(server.serve_stream, server_end)
                return client_end

            async with open_socket_client(
                URL, client_id="c", open_stream=open_stream, reconnect=ReconnectOptions(base=1.0)
            ) as client:
                changes = Changes()
                nursery.start_soon(changes.collect, client)
                await trio.sleep(3600)  # a virtual hour of pings and pongs
                conn = backend.last
                assert conn.is_open and backend.disconnected == []
                assert conn.last_pong_at is not None
                assert changes.seen == []
                # The server shuts down: a reconnect-band close, then 503s, retried.
                async with trio.open_nursery() as shutting:
                    shutting.start_soon(server.shutdown)
                    lost = await changes.wait_for(ClientState.RECONNECTING)
                    assert lost.close_code == CloseCode.GOING_AWAY
                    retry = await changes.wait_for(ClientState.RECONNECTING, 2)
                    assert isinstance(retry.error, ConnectionRejectedError)
                    assert retry.error.status == 503
                assert client.state is ClientState.RECONNECTING
        nursery.cancel_scope.cancel()


async def test_a_call_times_out_on_time_while_writes_hang(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The call's frame cannot be written (the server stopped reading): the call
    still fails at its timeout, neither earlier nor stuck behind the write."""
    backend = Backend()
    streams: list[FaultyStream] = []
    async with real_server(backend, heartbeat=None, listen=False) as server:
        async with trio.open_nursery() as nursery:

            async def open_stream(url: str) -> trio.abc.Stream:
                client_end, server_end = trio.testing.memory_stream_pair()
                nursery.start_soon(server.serve_stream, server_end)
                streams.append(FaultyStream(client_end))
                return streams[-1]

            async with open_socket_client(URL, client_id="c", open_stream=open_stream) as client:
                assert await client.call("echo", 1) == 1
                streams[0].stalled = True
                start = trio.current_time()
                with trio.fail_after(60), pytest.raises(SocketTimeoutError):
                    await client.call("echo", 2, timeout=7)
                assert trio.current_time() - start == 7
                nursery.cancel_scope.cancel()
