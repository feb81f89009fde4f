"""The socket server: :func:`open_socket_server`, :func:`serve_sockets`, :class:`SocketServer`.

The server listens on TCP (or TLS), and serves each accepted stream with
trio-websocket's :func:`~trio_websocket.wrap_server_stream`; the same path
serves any already-accepted stream (:meth:`SocketServer.serve_stream`), which is
how tests run a server over :func:`trio.testing.memory_stream_pair` on a
``MockClock``. Owning the stream (rather than using trio-websocket's
``serve_websocket``) lets the server close it itself: after a rejection, after
trio-websocket's own 1009 close (which leaves it open), and when a client does
not take the close in time.

Before the upgrade
    1. The subprotocol: the server picks the first one the client offers among
       ``meshline.v1.msgpack`` and ``meshline.v1.json``. With none, the upgrade
       is refused with HTTP 400 (a client that speaks neither is not a meshline
       client; there is no WebSocket to send a 4505 on).
    2. ``authenticate(request)`` (plain or async) sees a :class:`SocketRequest`
       and returns an :class:`Admission`, or raises :class:`Rejection` (the
       upgrade is refused with its status, usually 401 or 403, and its reason as
       the body). Any other exception, or a return value that is not an
       admission for a declared role, refuses with 500 and is logged. Without
       ``authenticate``, the server must have exactly one role, which every
       connection gets.
    3. While the server shuts down, new upgrades are refused with 503.

    The whole of it is bounded by ``handshake_timeout``.

Shutdown
    Leaving :func:`open_socket_server`'s block stops listening, then closes the
    connections in batches of ``shutdown.batch_size``, ``shutdown.batch_interval``
    apart, with ``shutdown.code`` (1001 going away by default, reconnect band),
    so that a fleet of clients reconnects spread over time instead of all at
    once. Each close is bounded by ``close_timeout``; whatever is still running
    after that is cancelled. :meth:`SocketServer.shutdown` does the same before
    the block ends (with 1012, say, for a restart).
"""

from __future__ import annotations

import inspect
import logging
import math
import secrets
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    wrap_server_stream,
)

from .._cluster._link import (
    ClusterLink,
    ClusterOrphanHandler,
    ClusterView,
    ConnectionTarget,
    MeshOptions,
    RoomTarget,
    TopicTarget,
    UserTarget,
    open_cluster_link,
)
from .._errors import InvalidArgumentError, MeshlineError
from .._mesh._declarations import BroadcastType
from .._mesh._node import DEFAULT_REQUEST_TIMEOUT
from .._registry._memory import MemoryRegistryBackend
from .._transport._memory import MemoryHub, open_memory_transport
from ._codes import CloseCode
from ._connection import (
    Connection,
    ConnectionHub,
    ConnectionSettings,
    DisconnectReason,
    check_close_code,
)
from ._frames import MAX_ID, Codec, select_codec
from ._local import LocalRegistry, LocalView, Room, Topic
from ._outbox import OverflowPolicy
from ._roles import RoleTable, check_name, check_timeout

__all__ = [
    "Admission",
    "BackpressureOptions",
    "HeartbeatOptions",
    "Rejection",
    "ShutdownOptions",
    "SocketRequest",
    "SocketServer",
    "open_socket_server",
    "serve_sockets",
]

logger = logging.getLogger("meshline.sockets")

MiB = 1024 * 1024

PRIVATE_MESH_KEY = "local"
"""The key of the mesh a server without ``mesh`` runs alone on (on a memory
transport of its own)."""

PRIVATE_MESH_TTL = 3600
"""Seconds: the private mesh's node ttl and re-assertion interval. Alone, in its own
process's memory, the node cannot be seen dead nor lose its writes; long periods
keep its upkeep out of the way (a test on a ``MockClock`` that jumps hours ahead
would otherwise run thousands of heartbeats)."""


def _positive_number(what: str, *, allow_inf: bool = False) -> Callable[[Any, Any, Any], None]:
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise InvalidArgumentError(f"{what} must be a number: {value!r}")
        if value <= 0 or (value == math.inf and not allow_inf) or (value > 1e9 and not allow_inf):
            raise InvalidArgumentError(f"{what} must be positive and finite: {value!r}")

    return check


def _int_at_least(what: str, low: int, high: int = MAX_ID) -> Callable[[Any, Any, Any], None]:
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgumentError(f"{what} must be an int: {value!r}")
        if not low <= value <= high:
            raise InvalidArgumentError(f"{what} must be between {low} and {high}: {value!r}")

    return check


def _policy(value: Any) -> OverflowPolicy:
    try:
        return OverflowPolicy(value)
    except ValueError:
        raise InvalidArgumentError(
            f"policy must be one of {[p.value for p in OverflowPolicy]}: {value!r}"
        ) from None


@attrs.frozen
class HeartbeatOptions:
    """The server's heartbeat: a ping every ``interval`` seconds, through the
    connection's outgoing queue; a client silent for ``interval * (max_missed +
    1)`` seconds (any frame counts as life) is closed with 4001 and reported
    ``reaped``.

    :raises InvalidArgumentError: a non-positive interval, or ``max_missed`` below 1.
    """

    interval: float = attrs.field(default=25.0, validator=_positive_number("interval"))
    max_missed: int = attrs.field(default=2, validator=_int_at_least("max_missed", 1, 1_000_000))


@attrs.frozen
class BackpressureOptions:
    """What happens when more than ``max_buffered_bytes`` wait for one client.

    ``policy`` is ``"close"`` (the default: close with 1013), ``"drop"`` (drop
    the frame, counted on the connection and logged) or ``"latest"`` (events
    emitted with a coalescing key keep only their newest value; others drop).
    Answers, requests and heartbeats are never dropped; see the Sockets docs.

    :raises InvalidArgumentError: a limit below 1, or an unknown policy.
    """

    max_buffered_bytes: int = attrs.field(
        default=8 * MiB, validator=_int_at_least("max_buffered_bytes", 1)
    )
    policy: OverflowPolicy = attrs.field(default=OverflowPolicy.CLOSE, converter=_policy)


@attrs.frozen
class ShutdownOptions:
    """How the server closes its connections when it exits: ``batch_size``
    connections at a time, ``batch_interval`` seconds apart, with ``code``.

    :raises InvalidArgumentError: a batch size below 1, a negative interval, or a
        code that cannot be sent.
    """

    batch_size: int = attrs.field(default=500, validator=_int_at_least("batch_size", 1))
    batch_interval: float = attrs.field(default=0.05)
    code: int = attrs.field(default=CloseCode.GOING_AWAY)

    @batch_interval.validator
    def _check_interval(self, attribute: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e9:
            raise InvalidArgumentError(f"batch_interval must be a number of seconds: {value!r}")

    @code.validator
    def _check_code(self, attribute: Any, value: Any) -> None:
        check_close_code(value)


@attrs.frozen
class SocketRequest:
    """The upgrade request, as ``authenticate`` sees it.

    ``path`` is the URL path without the query string; ``query`` its parameters
    (the last value wins when one repeats; ``raw_query`` has them all);
    ``headers`` the HTTP headers with lower-case names (repeated ones joined with
    ``", "``); ``remote`` the peer's address (``host:port``); ``subprotocol`` the
    one the server picked.
    """

    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    remote: str
    subprotocol: str = ""
    raw_query: str = ""


@attrs.frozen
class Admission:
    """What ``authenticate`` grants: the connection's ``role`` (a declared role's
    name), its ``user_id``, its ``client_id`` (wins over the one the client sends
    in its hello) and a ``context`` the application keeps on the connection."""

    role: str
    user_id: str | None = None
    client_id: str | None = None
    context: Any = None


class Rejection(MeshlineError):
    """Raised by ``authenticate`` to refuse the upgrade with HTTP ``status`` (401:
    not authenticated, 403: not allowed; any 4xx or 5xx) and ``reason`` as the body.

    A meshline client stops for good on 401 and 403.
    """

    def __init__(self, status: int = 403, reason: str = "") -> None:
        super().__init__(f"HTTP {status}" + (f": {reason}" if reason else ""))
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise InvalidArgumentError(f"a rejection status must be 4xx or 5xx: {status!r}")
        self.status = status
        self.reason = reason


def _peer_of(stream: trio.abc.Stream) -> str:
    """The peer's address as ``host:port``, read once when the stream is accepted
    (a peer that has already reset the connection has none: ``"unknown peer"``);
    a description of the stream when it is not a socket."""
    inner: object = stream
    while isinstance(inner, trio.SSLStream):
        inner = inner.transport_stream
    if not isinstance(inner, trio.SocketStream):
        return repr(stream)
    try:
        peer = inner.socket.getpeername()
    except OSError:
        return "unknown peer"
    if not isinstance(peer, tuple) or len(peer) < 2:
        return str(peer)
    host, port = str(peer[0]), peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _request_info(request: WebSocketRequest, codec: Codec, remote: str) -> SocketRequest:
    target = request.path
    path, _, query = target.partition("?")
    headers: dict[str, str] = {}
    for raw_name, raw_value in request.headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return SocketRequest(
        path=urllib.parse.unquote(path),
        query=dict(urllib.parse.parse_qsl(query, keep_blank_values=True)),
        headers=headers,
        remote=remote,
        subprotocol=codec.subprotocol,
        raw_query=query,
    )


class SocketServer:
    """A running socket server (see :func:`open_socket_server`).

    Introspection is synchronous and local to this node: :attr:`local`,
    :meth:`room`, :meth:`topic`, :meth:`connection`.
    """

    def __init__(
        self,
        *,
        roles: Any,
        authenticate: Callable[[SocketRequest], Admission | Awaitable[Admission]] | None,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        client_requests: Mapping[str, tuple[Any, Any]] | None,
        client_events: Mapping[str, Any] | None,
        heartbeat: HeartbeatOptions | None,
        backpressure: BackpressureOptions,
        max_message_size: int,
        call_timeout: float | None,
        close_timeout: float,
        handshake_timeout: float,
        max_concurrent_calls: int,
        shutdown: ShutdownOptions,
        authorize_topic: Callable[[Connection, str], bool | Awaitable[bool]] | None,
        on_connect: Callable[[Connection], Awaitable[None] | None] | None,
        on_disconnect: Callable[[Connection, DisconnectReason], Awaitable[None] | None] | None,
        node_id: int | None,
        authorize_presence: Callable[[Connection, str], bool | Awaitable[bool]] | None = None,
    ) -> None:
        table = RoleTable(roles)
        if authenticate is None and table.only is None:
            raise InvalidArgumentError(
                "without authenticate, the server needs exactly one role "
                f"(it has {sorted(table.by_name)})"
            )
        for name, hook in (
            ("authenticate", authenticate),
            ("authorize_topic", authorize_topic),
            ("authorize_presence", authorize_presence),
            ("on_connect", on_connect),
            ("on_disconnect", on_disconnect),
        ):
            if hook is not None and not callable(hook):
                raise InvalidArgumentError(f"{name} must be callable: {hook!r}")
        if not isinstance(host, str):
            raise InvalidArgumentError(f"host must be a string: {host!r}")
        _int_at_least("port", 0, 65535)(None, None, port)
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise InvalidArgumentError(f"ssl_context must be an ssl.SSLContext: {ssl_context!r}")
        if heartbeat is not None and not isinstance(heartbeat, HeartbeatOptions):
            raise InvalidArgumentError(f"heartbeat must be HeartbeatOptions or None: {heartbeat!r}")
        if not isinstance(backpressure, BackpressureOptions):
            raise InvalidArgumentError(
                f"backpressure must be BackpressureOptions: {backpressure!r}"
            )
        if not isinstance(shutdown, ShutdownOptions):
            raise InvalidArgumentError(f"shutdown must be ShutdownOptions: {shutdown!r}")
        _int_at_least("max_message_size", 1)(None, None, max_message_size)
        _int_at_least("max_concurrent_calls", 1)(None, None, max_concurrent_calls)
        check_timeout(call_timeout, "call_timeout")
        check_timeout(close_timeout, "close_timeout", allow_none=False)
        check_timeout(handshake_timeout, "handshake_timeout", allow_none=False)
        if close_timeout == math.inf or handshake_timeout == math.inf:
            raise InvalidArgumentError("close_timeout and handshake_timeout must be finite")
        requests = _check_declarations("client_requests", client_requests, pairs=True)
        events = _check_declarations("client_events", client_events, pairs=False)
        if node_id is None:
            node_id = secrets.randbelow(2**32)
        _int_at_least("node_id", 0)(None, None, node_id)

        self.node_id: int = node_id
        """The node id in this server's connection ids (random unless given)."""
        self.host = host
        self._requested_port = port
        self._ssl_context = ssl_context
        self._authenticate = authenticate
        self._roles = table
        self._shutdown_options = shutdown
        self._max_message_size = max_message_size
        self._handshake_timeout = float(handshake_timeout)
        self._close_timeout = float(close_timeout)
        self.heartbeat = heartbeat
        self.backpressure = backpressure
        settings = ConnectionSettings(
            node_id=node_id,
            roles=table,
            client_requests=requests,
            client_events=events,
            heartbeat_interval=0.0 if heartbeat is None else float(heartbeat.interval),
            heartbeat_max_missed=2 if heartbeat is None else heartbeat.max_missed,
            max_buffered_bytes=backpressure.max_buffered_bytes,
            policy=backpressure.policy,
            max_message_size=max_message_size,
            call_timeout=math.inf if call_timeout is None else float(call_timeout),
            close_timeout=float(close_timeout),
            handshake_timeout=float(handshake_timeout),
            max_concurrent_calls=max_concurrent_calls,
            authorize_topic=authorize_topic,
            authorize_presence=authorize_presence,
            on_connect=on_connect,
            on_disconnect=on_disconnect,
        )
        self._registry = LocalRegistry(self._check_event)
        self._hub = ConnectionHub(settings, self._registry)
        self._hub.server = self
        self.local = LocalView(self._registry)
        """Synchronous introspection of this node's connections, rooms and topics."""
        self._listeners: list[trio.SocketListener] | list[trio.SSLListener[trio.SocketStream]] = []
        self._listen_scope: trio.CancelScope | None = None
        self._shutdown_done: trio.Event | None = None
        self._link: ClusterLink | None = None
        self._cluster: ClusterView | None = None

    def _join(self, link: ClusterLink) -> None:
        """Take the node id the link routes by, and route through ``link``."""
        self.node_id = link.route_id
        self._hub.adopt_node_id(link.route_id)
        self._link = link
        self._cluster = ClusterView(link)

    def _linked(self) -> ClusterLink:
        if self._link is None:
            raise MeshlineError("the server is not running: use open_socket_server")
        return self._link

    # --- The cluster ---------------------------------------------------------------------

    @property
    def cluster(self) -> ClusterView:
        """Queries over every connection of the cluster, from this node's replica
        of the presence registry (see :class:`~meshline.ClusterView`).

        """
        self._linked()
        assert self._cluster is not None
        return self._cluster

    def to_conn(self, connection_id: str) -> ConnectionTarget:
        """One connection, wherever it is: ``await server.to_conn(id).emit(...)``.

        :raises InvalidArgumentError: not a connection id.
        """
        return ConnectionTarget(self._linked(), connection_id)

    def to_user(self, user_id: str) -> UserTarget:
        """Every connection of the user, on every node (see :class:`~meshline.UserTarget`).

        :raises InvalidArgumentError: a bad user id.
        """
        return UserTarget(self._linked(), user_id)

    def to_room(self, name: str) -> RoomTarget:
        """Every member of the room, on every node (see :class:`~meshline.RoomTarget`).
        :meth:`room` is this node's members only.

        :raises InvalidArgumentError: a bad room name.
        """
        return RoomTarget(self._linked(), name)

    def to_topic(self, name: str) -> TopicTarget:
        """Every subscriber of the topic, on every node (see
        :class:`~meshline.TopicTarget`). :meth:`topic` is this node's only.

        :raises InvalidArgumentError: a bad topic name.
        """
        return TopicTarget(self._linked(), name)

    def update_client_metadata(self, client_id: str, fields: Mapping[str, Any]) -> bool:
        """Replace the ``describe`` fields in the registration of the client's
        connection on this node; the registry is written in the background (other
        nodes see it within milliseconds). Returns False if no connection of that
        client is open here.

        :raises InvalidArgumentError: ``fields`` is not a mapping.
        :raises PayloadError: ``fields`` cannot be encoded (nothing changed).
        """
        return self._linked().update_fields(check_name(client_id, "client id"), fields)

    def register_broadcast_handler(
        self, kind: str | BroadcastType[Any], handler: Callable[[Any, int], Any]
    ) -> Callable[[], None]:
        """Call ``handler(data, sender_node_id)`` for every :meth:`broadcast` of
        ``kind`` (see :meth:`Node.register_broadcast_handler
        <meshline.Node.register_broadcast_handler>`); returns a function that
        removes it.

        """
        return self._linked().service.register_broadcast_handler(kind, handler)

    async def broadcast(
        self, kind: str | BroadcastType[Any], data: Any, *, skip_self: bool = False
    ) -> None:
        """Send ``data`` to the broadcast handlers of ``kind`` on every node of the
        cluster (see :meth:`Node.broadcast <meshline.Node.broadcast>`).

        """
        await self._linked().service.broadcast(kind, data, skip_self=skip_self)

    async def invoke(
        self,
        client_id: str,
        name: str,
        data: Any = None,
        *,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> Any:
        """Send the server-to-client request ``name`` to the client's current
        connection, on whichever node holds it, and return its answer.

        Errors are the client service's (:meth:`ClientService.invoke
        <meshline.ClientService.invoke>`): :class:`~meshline.ClientNotFoundError`,
        :class:`~meshline.ClientDisconnectedError`,
        :class:`~meshline.ClientInvocationError` (the client answered with an
        error, or its connection closed mid-request) and
        :class:`~meshline.MeshRequestTimeoutError`. Cancellation cancels the
        request on the owning node.

        """
        return await self._linked().service.invoke(client_id, name, data, timeout=timeout)

    def _check_event(self, event: str) -> None:
        self._hub.check_event(event)

    # --- Introspection ---------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the server listens on (the one the OS chose, for port 0).

        :raises RuntimeError: the server is not listening (a server used through
            :meth:`serve_stream` only).
        """
        if not self._listeners:
            raise RuntimeError("the server is not listening")
        listener = self._listeners[0]
        socket_listener = (
            listener.transport_listener if isinstance(listener, trio.SSLListener) else listener
        )
        assert isinstance(socket_listener, trio.SocketListener)
        port: int = socket_listener.socket.getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """``ws://host:port/`` (``wss://`` with an ssl context)."""
        scheme = "wss" if self._ssl_context is not None else "ws"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/"

    def room(self, name: str) -> Room:
        """The room ``name`` on this node (a view; empty if nobody is in it).

        :raises InvalidArgumentError: a bad name.
        """
        return self.local.room(name)

    def topic(self, name: str) -> Topic:
        """The topic ``name`` on this node (a view). :raises InvalidArgumentError: a bad name."""
        return self.local.topic(name)

    def connection(self, connection_id: str) -> Connection | None:
        """The connection with this id on this node, or None."""
        return self.local.connection(connection_id)

    @property
    def closing(self) -> bool:
        """Whether the server is shutting down."""
        return self._hub.closing

    def __repr__(self) -> str:
        where = self.url if self._listeners else "unbound"
        return f"<SocketServer node={self.node_id} {where} connections={len(self.local)}>"

    # --- Serving ---------------------------------------------------------------------

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one already-accepted stream as a WebSocket connection, until it is over.

        The stream is closed on return. This is what the listener does for each
        TCP (or TLS) connection; tests and :mod:`meshline.testing` use it with
        :func:`trio.testing.memory_stream_pair`. Failures are logged, never
        raised (a server must not fall over because of one stream).

        Cancellation: the connection ends as ``server_exit`` and the stream is closed.
        """
        try:
            async with trio.open_nursery() as nursery:
                await self._serve_stream(nursery, stream)
                nursery.cancel_scope.cancel()
        except Exception:
            logger.exception("socket server: a connection failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_stream(self, nursery: trio.Nursery, stream: trio.abc.Stream) -> None:
        remote = _peer_of(stream)
        admitted: tuple[WebSocketConnection, Codec, Admission] | None = None
        with trio.move_on_after(self._handshake_timeout) as scope:
            try:
                request = await wrap_server_stream(
                    nursery, stream, max_message_size=self._max_message_size
                )
                admitted = await self._admit(request, remote)
            except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                logger.info(
                    "socket server: %s went away during the upgrade (%s)",
                    remote,
                    type(exc).__name__,
                )
                return
        if scope.cancelled_caught:
            logger.info(
                "socket server: upgrade not done within %g s; dropped", self._handshake_timeout
            )
            return
        if admitted is None:
            return
        ws, codec, admission = admitted
        await self._hub.run_connection(
            ws,
            codec,
            stream=stream,
            role=admission.role,
            user_id=admission.user_id,
            client_id=admission.client_id,
            context=admission.context,
            remote=remote,
            nursery=nursery,
        )

    async def _admit(
        self, request: WebSocketRequest, remote: str
    ) -> tuple[WebSocketConnection, Codec, Admission] | None:
        """Subprotocol, authentication; the accepted WebSocket, or None if refused.

        :raises ConnectionClosed: the peer went away before the answer was sent.
        """
        codec = select_codec(request.proposed_subprotocols)
        if codec is None:
            logger.info(
                "socket server: %s offered no meshline subprotocol (%r): refused with 400",
                remote,
                request.proposed_subprotocols,
            )
            await _reject(
                request,
                400,
                "no supported subprotocol: offer meshline.v1.msgpack or meshline.v1.json",
            )
            return None
        if self._hub.closing:
            await _reject(request, 503, "the server is shutting down")
            return None
        info = _request_info(request, codec, remote)
        admission = await self._authenticate_request(info)
        if isinstance(admission, Rejection):
            await _reject(request, admission.status, admission.reason)
            return None
        ws = await request.accept(subprotocol=codec.subprotocol)
        return ws, codec, admission

    async def _authenticate_request(self, info: SocketRequest) -> Admission | Rejection:
        authenticate = self._authenticate
        if authenticate is None:
            only = self._roles.only
            assert only is not None
            return Admission(only.name)
        try:
            admission = authenticate(info)
            if inspect.isawaitable(admission):
                admission = await admission
        except Rejection as rejection:
            logger.info(
                "socket server: %s %s refused with %d: %s",
                info.remote,
                info.path,
                rejection.status,
                rejection.reason,
            )
            return rejection
        except Exception:
            logger.exception(
                "socket server: authenticate failed for %s; refused with 500", info.remote
            )
            return Rejection(500, "internal server error")
        if not isinstance(admission, Admission):
            logger.error(
                "socket server: authenticate returned %r, not an Admission; refused with 500",
                admission,
            )
            return Rejection(500, "internal server error")
        problem = _admission_problem(admission, self._roles)
        if problem:
            logger.error(
                "socket server: authenticate returned %r: %s; refused with 500", admission, problem
            )
            return Rejection(500, "internal server error")
        return admission

    async def _keep_timers(self) -> None:
        await self._hub.timers.run()

    async def _keep_writing(self, nursery: trio.Nursery) -> None:
        await self._hub.writer.run(nursery)

    async def _listen(self, nursery: trio.Nursery, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as scope:
            self._listen_scope = scope
            listeners: list[trio.SocketListener] | list[trio.SSLListener[trio.SocketStream]]
            if self._ssl_context is None:
                listeners = await trio.open_tcp_listeners(self._requested_port, host=self.host)
            else:
                listeners = await trio.open_ssl_over_tcp_listeners(
                    self._requested_port, self._ssl_context, host=self.host, https_compatible=True
                )
            self._listeners = listeners
            logger.info("socket server: node %d listening on %s", self.node_id, self.url)
            task_status.started()
            streams: list[trio.abc.Listener[trio.abc.Stream]] = list(listeners)
            await trio.serve_listeners(self.serve_stream, streams, handler_nursery=nursery)

    async def shutdown(self, code: int | None = None) -> None:
        """Stop listening and close every connection, in batches (see the module).

        ``code`` overrides ``shutdown.code`` (1012, say, for a restart). Calling it
        again waits for the first call's work. Bounded by about ``close_timeout``
        plus the batches' spacing, twice over (the close, then ``on_disconnect``).

        Cancellation: the connections not yet closed are left to the server's
        exit, which cancels them.
        """
        if code is not None:
            check_close_code(code)
        if self._shutdown_done is not None:
            await self._shutdown_done.wait()
            return
        done = self._shutdown_done = trio.Event()
        try:
            hub = self._hub
            hub.closing = True
            if self._listen_scope is not None:
                self._listen_scope.cancel()
            options = self._shutdown_options
            close_code = options.code if code is None else code
            connections = sorted(hub.serving, key=lambda conn: conn.connected_at)
            if connections:
                logger.info(
                    "socket server: closing %d connection(s) with %d, %d at a time",
                    len(connections),
                    close_code,
                    options.batch_size,
                )
            size = options.batch_size
            with trio.move_on_after(
                2 * self._close_timeout + options.batch_interval * (len(connections) // size) + 0.1
            ):
                for start in range(0, len(connections), size):
                    if start:
                        await trio.sleep(options.batch_interval)
                    hub.end_all(connections[start : start + size], close_code)
                # Connections that arrived meanwhile (mid-handshake) go too.
                hub.end_all(list(hub.serving), close_code)
                for conn in connections:
                    await conn.wait_closed()
        finally:
            done.set()


def _admission_problem(admission: Admission, roles: RoleTable) -> str:
    if admission.role not in roles:
        return f"no role named {admission.role!r}"
    for what, value in (("user_id", admission.user_id), ("client_id", admission.client_id)):
        if value is not None:
            try:
                check_name(value, what)
            except InvalidArgumentError as exc:
                return str(exc)
    return ""


async def _reject(request: WebSocketRequest, status: int, reason: str) -> None:
    await request.reject(
        status,
        extra_headers=[(b"content-type", b"text/plain; charset=utf-8")],
        body=reason.encode("utf-8", "replace") or None,
    )


def _check_declarations(
    what: str, declared: Mapping[str, Any] | None, *, pairs: bool
) -> Mapping[str, Any] | None:
    if declared is None:
        return None
    if not isinstance(declared, Mapping):
        raise InvalidArgumentError(f"{what} must be a mapping of names: {declared!r}")
    for name, spec in declared.items():
        check_name(name, f"a name in {what}")
        if pairs and not (isinstance(spec, tuple) and len(spec) == 2):
            raise InvalidArgumentError(
                f"{what}[{name!r}] must be a pair (input type, output type): {spec!r}"
            )
    return dict(declared)


@asynccontextmanager
async def open_socket_server(
    *,
    roles: Any,
    authenticate: Callable[[SocketRequest], Admission | Awaitable[Admission]] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
    client_requests: Mapping[str, tuple[Any, Any]] | None = None,
    client_events: Mapping[str, Any] | None = None,
    heartbeat: HeartbeatOptions | None = HeartbeatOptions(),
    backpressure: BackpressureOptions = BackpressureOptions(),
    max_message_size: int = MiB,
    call_timeout: float | None = 30.0,
    close_timeout: float = 2.0,
    handshake_timeout: float = 10.0,
    max_concurrent_calls: int = 100,
    shutdown: ShutdownOptions = ShutdownOptions(),
    authorize_topic: Callable[[Connection, str], bool | Awaitable[bool]] | None = None,
    authorize_presence: Callable[[Connection, str], bool | Awaitable[bool]] | None = None,
    presence_fields: Iterable[str] = (),
    on_connect: Callable[[Connection], Awaitable[None] | None] | None = None,
    on_disconnect: Callable[[Connection, DisconnectReason], Awaitable[None] | None] | None = None,
    node_id: int | None = None,
    listen: bool = True,
    mesh: MeshOptions | None = None,
    describe: Callable[[Connection], Any] | None = None,
    on_orphaned: ClusterOrphanHandler | None = None,
    on_restored: ClusterOrphanHandler | None = None,
    on_user_online: Callable[[str], Awaitable[None] | None] | None = None,
    on_user_offline: Callable[[str], Awaitable[None] | None] | None = None,
    on_client_connected: Callable[[Connection], Awaitable[None] | None] | None = None,
    on_client_disconnected: Callable[[Connection, DisconnectReason], Awaitable[None] | None]
    | None = None,
    offline_grace: float = 0.0,
) -> AsyncIterator[SocketServer]:
    """Run a socket server for the duration of the block; yields the :class:`SocketServer`.

    ``roles``: the :class:`Role` objects (a list, or one). ``authenticate``: see the
    module (None: every connection gets the only role). ``host``, ``port`` (0:
    the OS picks; read :attr:`SocketServer.port`), ``ssl_context`` (serve
    ``wss://``). ``client_requests`` declares the server-to-client requests
    (name -> (input type, output type)) and ``client_events`` the
    server-to-client events (name -> data type); None leaves them open.
    ``heartbeat`` (None: off), ``backpressure``, ``max_message_size`` (bytes;
    bigger messages close the connection with 1009), ``call_timeout`` (seconds
    per call, None: none), ``close_timeout`` (how long a close may take),
    ``handshake_timeout`` (upgrade, authentication and hello),
    ``max_concurrent_calls`` (per connection; more are answered
    ``too_many_calls``), ``shutdown``, ``authorize_topic(conn, topic) -> bool``
    (plain or async; None: every topic allowed),
    ``authorize_presence(conn, room) -> bool`` (plain or async; whether the
    client may watch who is in ``room``; None: the rooms it is in), and
    ``presence_fields`` (the fields of ``describe`` that watchers of a room see;
    none by default: they see connection, client, node and user ids and the
    accept time), ``on_connect(conn)`` and
    ``on_disconnect(conn, reason)`` (plain or async), ``node_id`` (the node
    named in connection ids, for a server without a mesh; the mesh's node id by
    default). ``listen=False`` opens no
    socket: connections come only through :meth:`SocketServer.serve_stream`.

    ``mesh`` (a :class:`~meshline.MeshOptions`) joins the server to a cluster: its
    node id is then the mesh's, every connection is registered in the presence
    registry, and :attr:`SocketServer.cluster`, ``to_conn``, ``to_user``,
    ``to_room``, ``to_topic`` and ``invoke`` reach the whole cluster (see the
    Cluster sockets docs). Without a mesh, the server runs alone on a mesh of its
    own, on a memory transport: the same API, for one node.

    ``describe(conn)`` (plain or async) returns a mapping of fields kept in the
    connection's registration, asked once after ``on_connect``.
    ``on_orphaned(node_id, connections)`` runs on the leader for the connections
    of a node that died; ``on_restored(node_id, connections)`` on a node whose
    registrations had gone missing (it was thought dead) and were written again.

    The cluster's hooks (plain or async; see the Cluster sockets docs):
    ``on_user_online(user_id)`` when a user's first connection anywhere appears
    and ``on_user_offline(user_id)`` when their last one anywhere has been gone
    for ``offline_grace`` seconds (both run on the leader, once);
    ``on_client_connected(conn)`` on the node a client connected to, once its
    registration landed; ``on_client_disconnected(conn, reason)`` on the node
    its connection ended on, ``offline_grace`` seconds later, only if the client
    truly left (not superseded, not connected again anywhere).

    Cancellation: leaving the block (normally, by an exception or cancelled)
    shuts the server down as :meth:`SocketServer.shutdown` does, shielded and
    bounded; then every remaining task is cancelled.

    :raises InvalidArgumentError: a bad option (before anything starts).
    :raises OSError: the address cannot be bound.
    """
    server = SocketServer(
        roles=roles,
        authenticate=authenticate,
        host=host,
        port=port,
        ssl_context=ssl_context,
        client_requests=client_requests,
        client_events=client_events,
        heartbeat=heartbeat,
        backpressure=backpressure,
        max_message_size=max_message_size,
        call_timeout=call_timeout,
        close_timeout=close_timeout,
        handshake_timeout=handshake_timeout,
        max_concurrent_calls=max_concurrent_calls,
        shutdown=shutdown,
        authorize_topic=authorize_topic,
        on_connect=on_connect,
        on_disconnect=on_disconnect,
        node_id=node_id,
        authorize_presence=authorize_presence,
    )
    if isinstance(presence_fields, str) or not all(
        isinstance(field, str) for field in presence_fields
    ):
        raise InvalidArgumentError(
            f"presence_fields must be a collection of field names: {presence_fields!r}"
        )
    cluster_hooks = {
        "describe": describe,
        "on_orphaned": on_orphaned,
        "on_restored": on_restored,
        "on_user_online": on_user_online,
        "on_user_offline": on_user_offline,
        "on_client_connected": on_client_connected,
        "on_client_disconnected": on_client_disconnected,
    }
    for hook_name, hook in cluster_hooks.items():
        if hook is not None and not callable(hook):
            raise InvalidArgumentError(f"{hook_name} must be callable: {hook!r}")
    if (
        isinstance(offline_grace, bool)
        or not isinstance(offline_grace, int | float)
        or not 0 <= offline_grace < 1e9
    ):
        raise InvalidArgumentError(
            f"offline_grace must be a finite number of seconds >= 0: {offline_grace!r}"
        )
    async with AsyncExitStack() as stack:
        if mesh is not None:
            if not isinstance(mesh, MeshOptions):
                raise InvalidArgumentError(f"mesh must be MeshOptions: {mesh!r}")
            if node_id is not None:
                raise InvalidArgumentError("with a mesh, the mesh gives the node id: drop node_id")
            route_id = None
        else:
            transport = await stack.enter_async_context(open_memory_transport(MemoryHub()))
            mesh = MeshOptions(
                transport,
                PRIVATE_MESH_KEY,
                backend=MemoryRegistryBackend(),
                node={"ttl": PRIVATE_MESH_TTL},
                reassert_interval=PRIVATE_MESH_TTL,
            )
            route_id = node_id
        link = await stack.enter_async_context(
            open_cluster_link(
                mesh,
                server._hub,
                server._registry,
                describe=describe,
                on_orphaned=on_orphaned,
                on_restored=on_restored,
                on_user_online=on_user_online,
                on_user_offline=on_user_offline,
                on_client_connected=on_client_connected,
                on_client_disconnected=on_client_disconnected,
                offline_grace=offline_grace,
                route_id=route_id,
                presence_fields=frozenset(presence_fields),
            )
        )
        server._join(link)
        async with _run_server(server, listen=listen) as running:
            yield running


@asynccontextmanager
async def _run_server(server: SocketServer, *, listen: bool) -> AsyncIterator[SocketServer]:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server._keep_timers)
        nursery.start_soon(server._keep_writing, nursery)
        if listen:
            await nursery.start(server._listen, nursery)
        try:
            yield server
        finally:
            with trio.CancelScope(shield=True):
                await server.shutdown()
            nursery.cancel_scope.cancel()


async def serve_sockets(
    *,
    task_status: trio.TaskStatus[SocketServer] = trio.TASK_STATUS_IGNORED,
    **options: Any,
) -> None:
    """Run a socket server until cancelled: :func:`open_socket_server`'s serve form.

    Takes the same keyword arguments; ``await nursery.start(serve_sockets, ...)``
    returns the :class:`SocketServer` once it listens (``nursery.start`` passes
    only positional arguments, so use :func:`functools.partial` for the options).

    Cancellation: the server shuts down as when leaving :func:`open_socket_server`.
    """
    async with open_socket_server(**options) as server:
        task_status.started(server)
        await trio.sleep_forever()
