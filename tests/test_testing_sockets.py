"""meshline.testing's socket helpers, used as an application's tests would use them.

Each behaviour runs over loopback TCP (``open_test_socket_server`` and
``open_test_client``) and over memory streams (``open_memory_client`` against a
server that does not listen). The timing tests run on
``MockClock(autojump_threshold=0)`` over memory streams, through the helpers only:
a silent client is reaped, an answering one stays, a client that stops reading is
closed by backpressure.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import meshline
from meshline import (
    BackpressureOptions,
    ClientState,
    CloseCode,
    Connection,
    DisconnectReason,
    HeartbeatOptions,
    Role,
    SocketClient,
    SocketRequest,
    SocketServer,
    StateChange,
)
from meshline.testing import (
    MEMORY_URL,
    MemoryStreamOpener,
    open_memory_client,
    open_test_client,
    open_test_socket_server,
)

SOCKETS_PAGE = Path(__file__).parent.parent / "docs" / "sockets.rst"


class Recorder:
    """The server's hooks: who connected, who left and why, on the trio clock."""

    def __init__(self, *, connect_delay: float = 0.0, disconnect_delay: float = 0.0) -> None:
        self.connect_delay = connect_delay
        self.disconnect_delay = disconnect_delay
        self.requests: list[SocketRequest] = []
        self.disconnects: list[tuple[Connection, DisconnectReason, float]] = []

    def authenticate(self, request: SocketRequest) -> meshline.Admission:
        self.requests.append(request)
        return meshline.Admission("user", user_id=request.query.get("user"))

    async def on_connect(self, conn: Connection) -> None:
        if self.connect_delay:
            await trio.sleep(self.connect_delay)  # a slow on_connect: a database, say
        conn.join("lobby")

    async def on_disconnect(self, conn: Connection, reason: DisconnectReason) -> None:
        if self.disconnect_delay:
            await trio.sleep(self.disconnect_delay)  # a slow on_disconnect: a database, say
        self.disconnects.append((conn, reason, trio.current_time()))


def make_role() -> Role:
    user = Role("user")

    @user.call("echo")
    async def echo(conn: Connection, data: Any) -> Any:
        return data

    @user.call("ask")
    async def ask(conn: Connection, question: str) -> Any:
        return await conn.request("confirm", question)

    return user


@pytest.fixture(params=["loopback", "memory"])
def how(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def serve(how: str, recorder: Recorder, **options: Any) -> AsyncIterator[SocketServer]:
    """A server for the test: listening on loopback, or not listening at all."""
    options.setdefault("roles", [make_role()])
    hooks: dict[str, Any] = {
        "authenticate": recorder.authenticate,
        "on_connect": recorder.on_connect,
        "on_disconnect": recorder.on_disconnect,
    }
    if how == "loopback":
        async with open_test_socket_server(**hooks, **options) as server:
            yield server
    else:
        async with meshline.open_socket_server(listen=False, **hooks, **options) as server:
            yield server


def connect(
    how: str, server: SocketServer, **options: Any
) -> AbstractAsyncContextManager[SocketClient]:
    if how == "loopback":
        return open_test_client(server, **options)
    return open_memory_client(server, **options)


def connection_of(server: SocketServer, client: SocketClient) -> Connection:
    assert client.connection_id is not None
    conn = server.connection(client.connection_id)
    assert conn is not None, "the server does not show the client's connection"
    return conn


# --- Both ways: loopback TCP and memory streams ------------------------------------------


async def test_the_block_starts_once_the_server_shows_the_connection(how: str) -> None:
    recorder = Recorder(connect_delay=0.05)
    async with serve(how, recorder) as server, connect(how, server) as client:
        assert client.state is ClientState.CONNECTED
        conn = connection_of(server, client)
        assert conn.client_id == client.client_id
        assert "lobby" in conn.rooms  # on_connect has returned
        assert server.room("lobby").ids == {conn.id}


async def test_leaving_the_block_waits_for_the_server_to_finish_the_connection(
    how: str,
) -> None:
    recorder = Recorder(disconnect_delay=0.05)
    async with serve(how, recorder) as server:
        async with connect(how, server) as client:
            conn = connection_of(server, client)
        assert [(c, reason) for c, reason, _ in recorder.disconnects] == [
            (conn, DisconnectReason.CLIENT_CLOSED)
        ]
        assert conn.close_code == CloseCode.NORMAL
        assert server.local.connections == {}


async def test_leaving_waits_for_the_server_also_over_a_shared_opener(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder(disconnect_delay=1)
    async with serve("memory", recorder) as server, trio.open_nursery() as nursery:
        link = MemoryStreamOpener(server, nursery)  # serves in the test's nursery
        for n in range(2):
            async with open_memory_client(server, open_stream=link) as client:
                conn = connection_of(server, client)
            assert recorder.disconnects[n][:2] == (conn, DisconnectReason.CLIENT_CLOSED)
        assert link.opened == 2


async def test_calls_requests_and_room_events_flow(how: str) -> None:
    recorder = Recorder()
    async with serve(how, recorder, client_requests={"confirm": (str, bool)}) as server:
        async with connect(how, server) as ana, connect(how, server) as bo:
            assert await ana.call("echo", {"n": 1}) == {"n": 1}
            bo.implement("confirm", lambda question: question == "ok?")
            assert await bo.call("ask", "ok?") is True
            heard: list[tuple[str, Any]] = []
            got = trio.Event()

            def note(who: str) -> Callable[[Any], None]:
                def handler(data: Any) -> None:
                    heard.append((who, data))
                    if len(heard) == 2:
                        got.set()

                return handler

            ana.on("news", note("ana"))
            bo.on("news", note("bo"))
            assert server.room("lobby").emit("news", "hello") == 2
            await got.wait()
            assert sorted(heard) == [("ana", "hello"), ("bo", "hello")]


async def test_client_ids_are_new_and_options_reach_the_client(how: str) -> None:
    recorder = Recorder()
    async with serve(how, recorder) as server:
        async with connect(how, server) as first, connect(how, server) as second:
            assert first.client_id != second.client_id
            assert first.client_id.startswith("test-client-")
        async with connect(
            how, server, client_id="ana", path="/app", query={"user": "u1"}, encoding="json"
        ) as client:
            conn = connection_of(server, client)
            assert (conn.client_id, conn.user_id) == ("ana", "u1")
            assert conn.subprotocol == meshline.JSON_SUBPROTOCOL
            assert recorder.requests[-1].path == "/app"


# --- What the helpers refuse ------------------------------------------------------------


async def test_the_test_server_picks_its_own_loopback_address() -> None:
    for option in ({"port": 8080}, {"host": "0.0.0.0"}, {"listen": False}):
        with pytest.raises(meshline.InvalidArgumentError, match="picks its own address"):
            async with open_test_socket_server(roles=[make_role()], **option):
                pass  # pragma: no cover
    async with open_test_socket_server(roles=make_role()) as server:
        assert server.url.startswith("ws://127.0.0.1:")
        assert server.port != 0


async def test_a_server_that_does_not_listen_needs_the_memory_client() -> None:
    async with meshline.open_socket_server(roles=[make_role()], listen=False) as server:
        with pytest.raises(meshline.InvalidArgumentError, match="open_memory_client"):
            async with open_test_client(server):
                pass  # pragma: no cover
        with pytest.raises(meshline.InvalidArgumentError, match="path"):
            async with open_memory_client(server, path="no-slash"):
                pass  # pragma: no cover


# --- On MockClock, over memory streams -----------------------------------------------------


async def test_a_silent_client_is_reaped_and_an_answering_one_stays(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    heartbeat = HeartbeatOptions(interval=10, max_missed=2)
    async with (
        serve("memory", recorder, heartbeat=heartbeat, close_timeout=1) as server,
        trio.open_nursery() as nursery,
    ):
        silent_link = MemoryStreamOpener(server, nursery)
        async with (
            open_memory_client(server, client_id="steady") as steady,
            # The silent client's own watchdog would give up on the server at the
            # same moment the server reaps it: give it more patience.
            open_memory_client(
                server, client_id="silent", open_stream=silent_link, heartbeat_grace=100
            ) as silent,
        ):
            start = trio.current_time()
            steady_conn = connection_of(server, steady)
            silent_conn = connection_of(server, silent)
            silent_link.stop_reading()  # no pings reach it, so it answers none
            with trio.fail_after(1000):  # virtual seconds: a hang fails at once
                await silent_conn.wait_closed()
            [(conn, reason, at)] = recorder.disconnects
            assert conn is silent_conn and reason is DisconnectReason.REAPED
            assert silent_conn.close_code == CloseCode.HEARTBEAT_MISSED
            # Silent for interval * (max_missed + 1), then close_timeout for the
            # close it cannot take either.
            assert at - start == 30 + 1
            # The other one was pinged at 10, 20 and 30 s and answered each time.
            assert steady_conn.is_open and steady.state is ClientState.CONNECTED
            assert steady_conn.last_ping_at == pytest.approx(steady_conn.connected_at + 30)
            assert steady_conn.last_pong_at == pytest.approx(steady_conn.connected_at + 30)
        nursery.cancel_scope.cancel()


async def test_a_client_that_stops_reading_is_closed_by_backpressure_and_comes_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    backpressure = BackpressureOptions(max_buffered_bytes=8000, policy="close")
    async with (
        serve("memory", recorder, backpressure=backpressure, close_timeout=1) as server,
        trio.open_nursery() as nursery,
    ):
        link = MemoryStreamOpener(server, nursery)
        async with open_memory_client(server, open_stream=link) as client:
            received: list[str] = []
            client.on("blob", received.append)
            conn = connection_of(server, client)
            link.stop_reading()
            assert not link.reading
            emitted = 0
            while conn.is_open:
                assert emitted < 1000, "the connection never closed"
                conn.emit("blob", "x" * 1000)
                emitted += 1
                await trio.sleep(0.001)
            assert conn.disconnect_reason is DisconnectReason.BACKPRESSURE
            assert conn.close_code == CloseCode.TRY_AGAIN_LATER
            with trio.fail_after(1000):
                await conn.wait_closed()
            assert received == []  # nothing got through while it was not reading
            async with client.state_changes() as changes:
                link.resume_reading()
                seen: list[StateChange] = []
                async for change in changes:
                    seen.append(change)
                    if change.state is ClientState.CONNECTED:
                        break
            # Too stuck to be told 1013, the client finds its connection gone once
            # it reads again (the end of the stream: 1006, reconnect band), and
            # comes back on a new connection.
            assert seen[0].state is ClientState.RECONNECTING
            assert seen[0].close_code == CloseCode.ABNORMAL
            assert client.connection_id != conn.id
            assert len(received) < emitted
            assert link.opened == 2
        nursery.cancel_scope.cancel()


async def test_a_cancelled_memory_client_block_ends_its_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    async with serve("memory", recorder) as server:
        start = trio.current_time()
        with trio.move_on_after(5):
            async with open_memory_client(server) as client:
                conn = connection_of(server, client)
                await trio.sleep_forever()
        # The client's close is shielded and bounded (flush, then handshake: 2 s each).
        assert 5 <= trio.current_time() - start <= 5 + 2 * 2
        assert conn.is_closed  # its on_disconnect has run
        assert server.local.connections == {}
        assert client.state is ClientState.CLOSED


async def test_the_memory_url_is_only_a_name(autojump_clock: trio.testing.MockClock) -> None:
    recorder = Recorder()
    async with serve("memory", recorder) as server, trio.open_nursery() as nursery:
        link = MemoryStreamOpener(server, nursery)
        async with meshline.open_socket_client(
            MEMORY_URL + "v1?user=u2", client_id="plain", open_stream=link
        ) as client:
            conn = connection_of(server, client)
            assert conn.user_id == "u2" and recorder.requests[-1].path == "/v1"
        nursery.cancel_scope.cancel()


# --- The docs ----------------------------------------------------------------------------


def test_the_sockets_page_testing_example_passes(tmp_path: Path) -> None:
    section = SOCKETS_PAGE.read_text().split("\nTesting your application\n", 1)[1]
    lines = section.split(".. code-block:: python\n\n", 1)[1].splitlines()
    block = itertools.takewhile(lambda line: not line or line.startswith("    "), lines)
    code = "\n".join(line.removeprefix("    ") for line in block)
    (tmp_path / "test_example.py").write_text(code)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,  # an example that hangs fails here, before the test's own timeout
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
