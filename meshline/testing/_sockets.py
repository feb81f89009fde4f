"""Testing helpers for applications built on meshline's sockets (for pytest-trio).

Two ways to connect a test's clients to a test's server:

* over **loopback TCP**: :func:`open_test_socket_server` listens on a free port of
  127.0.0.1 and :func:`open_test_client` connects a :class:`~meshline.SocketClient`
  to it. Everything is real, down to the sockets; timing runs on the real clock.
* over **in-memory streams**: :func:`open_memory_client` (or a
  :class:`MemoryStreamOpener` given to :func:`~meshline.open_socket_client`) joins
  a client to a server through a pair of Trio memory streams, which the server
  serves with :meth:`SocketServer.serve_stream <meshline.SocketServer.serve_stream>`.
  No socket is involved, so tests can run on ``trio.testing.MockClock``: heartbeats,
  reaping, timeouts and reconnect backoff take no real time. The server may be
  opened with ``listen=False``. :meth:`MemoryStreamOpener.stop_reading` makes the
  link stop carrying the server's bytes to the client, which is what a client that
  stops reading looks like to the server: its writes wait and its outgoing queue
  grows, until backpressure acts.

Either way, the client helpers return once the client is welcomed *and* the server
shows the connection in its introspection (``on_connect`` has returned), and leaving
their block waits until the server has finished the connection (its
``on_disconnect`` has run), so a test can check both sides without waiting itself.

The socket layer runs on one node for now. The cluster version of these helpers,
several servers joined by the in-memory transport, comes with the socket cluster
(issue 12).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing

from .._errors import InvalidArgumentError
from .._sockets._client import (
    ClientState,
    SocketClient,
    SocketConnectTimeoutError,
    open_socket_client,
)
from .._sockets._connection import Connection
from .._sockets._server import SocketServer, open_socket_server

__all__ = [
    "MEMORY_URL",
    "MemoryStreamOpener",
    "open_memory_client",
    "open_test_client",
    "open_test_socket_server",
]

logger = logging.getLogger("meshline.sockets")

MEMORY_URL = "ws://meshline.test/"
"""The URL memory clients connect to. Nothing resolves it: the client only takes its
Host header, path and query from it."""

_SERVER_CLOSE_WAIT = 30.0
"""How long (seconds) leaving a client helper's block waits for the server to
finish the connection. The server's own closing is bounded by its
``close_timeout``; this bound only keeps a test from hanging on a bug."""

_FIRST_POLL = 0.001
_LONGEST_POLL = 0.05
_LOOPBACK_OPTIONS = ("host", "port", "listen")
_client_numbers = itertools.count(1)


def _new_client_id() -> str:
    return f"test-client-{next(_client_numbers)}"


def _url_with_path(base: str, path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidArgumentError(f"path must start with '/': {path!r}")
    return base.rstrip("/") + path


# --- The server ---------------------------------------------------------------------


@asynccontextmanager
async def open_test_socket_server(*, roles: Any, **options: Any) -> AsyncIterator[SocketServer]:
    """Run a socket server on a free port of 127.0.0.1 for the block; yields the
    :class:`~meshline.SocketServer` (its ``url`` is where to connect).

    ``roles`` and every other keyword argument go to
    :func:`~meshline.open_socket_server` unchanged (heartbeat, backpressure,
    ``authenticate``, hooks...), so the server under test is configured as in
    production. The address is the helper's: ``host``, ``port`` and ``listen``
    are refused.

    This is one node: the socket layer has no transport yet. The cluster version
    (several servers on the in-memory transport, so that rooms, presence and
    server-to-client requests cross nodes in a test) comes with issue 12.

    Cancellation and errors: as :func:`~meshline.open_socket_server`. Leaving the
    block (normally, by an exception or cancelled) shuts the server down, closing
    its connections with 1001 within its ``close_timeout``.

    :raises InvalidArgumentError: ``host``, ``port`` or ``listen`` was given, or an
        option is bad (before anything starts).
    :raises OSError: no loopback port could be bound.
    """
    given = sorted(name for name in _LOOPBACK_OPTIONS if name in options)
    if given:
        raise InvalidArgumentError(
            f"open_test_socket_server picks its own address; not {given}"
            " (use open_socket_server for a chosen address)"
        )
    async with open_socket_server(roles=roles, host="127.0.0.1", port=0, **options) as server:
        yield server


# --- Clients ------------------------------------------------------------------------


async def _until_visible(server: SocketServer, client: SocketClient) -> Connection | None:
    """Wait until ``server`` shows the client's connection in its introspection.

    A connection becomes visible once the server's ``on_connect`` returned; with an
    async ``on_connect`` the client may be welcomed before that, so this polls,
    every millisecond at first and then less often (on a ``MockClock``, virtual
    time moves on meanwhile). It stops waiting when the client leaves
    ``CONNECTED`` (the server refused or closed the connection): None then.

    :raises SocketConnectTimeoutError: not visible within the client's
        ``connect_timeout``.
    """
    delay = _FIRST_POLL
    with trio.move_on_after(client.connect_timeout):
        while client.state is ClientState.CONNECTED:
            connection_id = client.connection_id
            conn = None if connection_id is None else server.connection(connection_id)
            if conn is not None:
                return conn
            await trio.sleep(delay)
            delay = min(2 * delay, _LONGEST_POLL)
        return None
    logger.warning(
        "test client %r: welcomed, but the server did not show connection %s within %g s",
        client.client_id,
        client.connection_id,
        client.connect_timeout,
    )
    raise SocketConnectTimeoutError(
        f"the server did not finish admitting {client.connection_id} (its on_connect)"
        f" within {client.connect_timeout:g} s"
    )


@asynccontextmanager
async def open_test_client(
    server: SocketServer,
    *,
    client_id: str | None = None,
    path: str = "/",
    **options: Any,
) -> AsyncIterator[SocketClient]:
    """Connect a :class:`~meshline.SocketClient` to ``server`` over loopback TCP,
    for the block; yields it once it is connected.

    ``client_id`` defaults to a new ``"test-client-<n>"``; ``path`` is the URL path
    (``authenticate`` sees it); every other keyword argument goes to
    :func:`~meshline.open_socket_client` unchanged (``headers``, ``query``,
    ``encoding``, ``reconnect``, ``call_timeout``...): the client under test is the
    production client.

    The block starts once the client is welcomed and the server shows the
    connection (``server.connection(client.connection_id)`` is its
    :class:`~meshline.Connection`: ``on_connect`` has returned). Leaving the block
    closes the client as :func:`~meshline.open_socket_client` does (1000, after
    flushing what it queued); leaving it normally then waits until the server has
    finished the client's last connection: its ``on_disconnect`` has run (bounded
    by 30 s; past it, a warning is logged).

    Cancellation (and an exception from the block): the client still closes
    (shielded and bounded, as :func:`~meshline.open_socket_client` does), but the
    helper does not wait for the server, which finishes the connection on its own.

    :raises InvalidArgumentError: the server does not listen (opened with
        ``listen=False``: use :func:`open_memory_client`), a bad ``path``, or a bad
        option.
    :raises ConnectionRejectedError, SocketConnectError: as
        :func:`~meshline.open_socket_client` (the server refused, or could not be
        reached).
    :raises SocketConnectTimeoutError: also when the server welcomed the client
        but did not show the connection within ``connect_timeout``.
    """
    try:
        base = server.url
    except RuntimeError:
        raise InvalidArgumentError(
            "the server does not listen (listen=False): connect with open_memory_client"
        ) from None
    url = _url_with_path(base, path)
    async with open_socket_client(
        url, client_id=_new_client_id() if client_id is None else client_id, **options
    ) as client:
        await _until_visible(server, client)
        try:
            yield client
        finally:
            last = _current_connection(server, client)
    await _until_finished(last, client)


def _current_connection(server: SocketServer, client: SocketClient) -> Connection | None:
    connection_id = client.connection_id
    return None if connection_id is None else server.connection(connection_id)


async def _until_finished(conn: Connection | None, client: SocketClient) -> None:
    """Wait (within 30 s) until the server finished ``conn``."""
    if conn is None:
        return
    with trio.move_on_after(_SERVER_CLOSE_WAIT) as scope:
        await conn.wait_closed()
    if scope.cancelled_caught:
        logger.warning(
            "test client %r: the server had not finished connection %s %g s after"
            " the client closed",
            client.client_id,
            conn.id,
            _SERVER_CLOSE_WAIT,
        )


class MemoryStreamOpener:
    """Connects clients to ``server`` over in-memory streams: an ``open_stream``
    for :func:`~meshline.open_socket_client`.

    Each call (each connection attempt of a client, reconnects included) makes a
    pair of streams like :func:`trio.testing.memory_stream_pair`'s, starts
    ``server.serve_stream`` on one end in ``nursery``, and returns the other end
    to the client. ::

        async with trio.open_nursery() as nursery:
            opener = MemoryStreamOpener(server, nursery)
            async with open_socket_client(MEMORY_URL, client_id="c", open_stream=opener):
                ...

    The server side of every connection runs in ``nursery``: cancelling it ends
    them (the server reports ``server_exit``); otherwise each ends when its
    connection does, so the nursery's block ends once the server has finished
    them all (``on_disconnect`` included).

    **A client that stops reading.** :meth:`stop_reading` stops carrying the
    server's bytes to the clients of this opener (those connected and those to
    come), until :meth:`resume_reading`. To the server this is a client that
    stopped reading, once its socket buffers are full: its writes wait, the
    connection's outgoing queue grows, and backpressure acts (closing with 1013 by
    default). The clients see nothing more, neither the server's pings (so the
    server reaps a stopped client that sends nothing), nor a close, nor the end of
    the stream: a stopped client finds its connection gone by its own heartbeat
    (or when reading resumes). What was held back is delivered, in order, on
    :meth:`resume_reading`. What the clients send still reaches the server.
    """

    def __init__(self, server: SocketServer, nursery: trio.Nursery) -> None:
        if not isinstance(server, SocketServer):
            raise InvalidArgumentError(f"server must be a SocketServer: {server!r}")
        self.server = server
        self.opened = 0
        """How many streams this opener made (one per connection attempt)."""
        self._nursery = nursery
        self._flowing = trio.Event()
        self._flowing.set()
        self._held: list[Callable[[], None]] = []

    @property
    def reading(self) -> bool:
        """Whether the server's bytes reach the clients (False after
        :meth:`stop_reading`)."""
        return self._flowing.is_set()

    def stop_reading(self) -> None:
        """Hold back everything the server sends to this opener's clients, from now
        on (see the class). Stopping again does nothing."""
        if self._flowing.is_set():
            self._flowing = trio.Event()

    def resume_reading(self) -> None:
        """Deliver what was held back, in order, and carry the server's bytes again
        (a stream the server closed meanwhile ends after its data)."""
        if self._flowing.is_set():
            return
        self._flowing.set()
        held, self._held = self._held, []
        for deliver in held:
            # A client that closed its end has nothing more to receive.
            with contextlib.suppress(trio.BrokenResourceError):
                deliver()

    async def __call__(self, url: str) -> trio.abc.Stream:
        """A new stream to the server (``url`` is not used: there is one server).

        The server's end is served in the opener's nursery.
        """
        client_end, server_end = self._stream_pair()
        self.opened += 1
        self._nursery.start_soon(self.server.serve_stream, server_end)
        return client_end

    def _stream_pair(self) -> tuple[trio.StapledStream[Any, Any], trio.StapledStream[Any, Any]]:
        """Two one-way memory pipes, as :func:`trio.testing.memory_stream_pair`
        makes them, except that the server-to-client one delivers only while the
        clients read."""
        to_server, server_in = trio.testing.memory_stream_one_way_pair()
        to_client = trio.testing.MemorySendStream()
        client_in = trio.testing.MemoryReceiveStream()

        def deliver() -> None:
            trio.testing.memory_stream_pump(to_client, client_in)

        async def deliver_when_reading() -> None:
            while not self._flowing.is_set():
                self._held.append(deliver)
                await self._flowing.wait()
            deliver()

        def close_when_reading() -> None:
            if self._flowing.is_set():
                deliver()
            else:
                self._held.append(deliver)

        to_client.send_all_hook = deliver_when_reading
        to_client.close_hook = close_when_reading
        return trio.StapledStream(to_server, client_in), trio.StapledStream(to_client, server_in)


@asynccontextmanager
async def open_memory_client(
    server: SocketServer,
    *,
    client_id: str | None = None,
    path: str = "/",
    **options: Any,
) -> AsyncIterator[SocketClient]:
    """Connect a :class:`~meshline.SocketClient` to ``server`` over in-memory
    streams, for the block; yields it once it is connected.

    The server may listen or not (``listen=False``). Without ``open_stream``, the
    helper makes a :class:`MemoryStreamOpener` of its own; pass one
    (``open_stream=opener``) to stop the client's reading, or to share it among
    clients. ``client_id``, ``path`` and the other keyword arguments are as for
    :func:`open_test_client`. Over memory streams, heartbeats, reaping, timeouts
    and reconnect backoff run on ``trio.testing.MockClock`` without real waits.

    The block starts once the client is welcomed and the server shows the
    connection (``on_connect`` has returned). Leaving the block closes the client
    (1000, after flushing what it queued); leaving it normally then waits until
    the server has finished the client's connections (``on_disconnect`` has run),
    which the server bounds by its ``close_timeout`` (close handshake, then
    handlers, then ``on_disconnect``).

    Cancellation (and an exception from the block): the client still closes
    (shielded and bounded, as :func:`~meshline.open_socket_client` does), and the
    server's side of the helper's own streams is cancelled with the block: the
    server reports those connections ``server_exit``, unless they had already
    ended.

    :raises InvalidArgumentError: a bad ``path``, or a bad option.
    :raises ConnectionRejectedError, SocketConnectError: as
        :func:`~meshline.open_socket_client`.
    :raises SocketConnectTimeoutError: the server did not welcome the client, or
        did not show its connection, within ``connect_timeout``.
    """
    url = _url_with_path(MEMORY_URL, path)
    client_id = _new_client_id() if client_id is None else client_id
    async with trio.open_nursery() as nursery:
        open_stream = options.pop("open_stream", None) or MemoryStreamOpener(server, nursery)
        async with open_socket_client(
            url, client_id=client_id, open_stream=open_stream, **options
        ) as client:
            await _until_visible(server, client)
            try:
                yield client
            finally:
                last = _current_connection(server, client)
        await _until_finished(last, client)
