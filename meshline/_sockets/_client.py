"""The Python socket client: :func:`open_socket_client` and :class:`SocketClient`.

An I/O shell around the sans-IO :class:`~meshline._sockets._protocol.SocketProtocol`
(client side), on trio-websocket.

Tasks
    The client's nursery holds a *supervisor* (connects, reconnects with
    :class:`~meshline._sockets._backoff.Backoff`) and an *event dispatcher* (runs
    the ``on`` handlers, in order). Each connection (a *session*) has a nursery of
    its own with:

    * one reader, which drains trio-websocket's ``get_message`` into the protocol
      machine and never waits on anything else (answers wake their callers,
      events go to the dispatcher's bounded queue, requests start their own
      tasks, pings are answered through the outbox);
    * one writer, the only task that sends: it drains the session's outbox, a
      queue that counts its bytes, so enqueueing never waits on the socket;
    * a heartbeat watchdog, which gives up on a server that sent nothing at all
      for ``interval * (max_missed + 1)`` seconds (from the welcome);
    * one task per server request being answered, and the ``on_reconnect`` hook.

    A session ends once, by the first of: the server closed or the connection
    dropped (the reader sees it), a protocol violation, the watchdog, or the
    application leaving the block. Its pending calls then fail at once, and the
    client decides what comes next from the close code's band.

Close codes
    Whichever side closed, the client obeys the band of the close code
    (:func:`~meshline._sockets._codes.should_reconnect`): reconnect band (going
    away, restart, slow, server error, missed heartbeat, connection lost):
    reconnect with backoff; terminal band (kicked, superseded, forbidden, protocol
    violation, message too big): stop for good, state ``FAILED``. An HTTP 401 or
    403 refusal of a reconnect attempt is terminal too; other refusals (a 500, a
    503 from a proxy) are retried.
"""

from __future__ import annotations

import contextvars
import enum
import functools
import importlib.metadata
import inspect
import logging
import math
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar, cast, overload

import attrs
import trio
import trio_websocket

from .._errors import InvalidArgumentError, MeshlineError
from .._util import single_exceptions
from ._backoff import Backoff, ReconnectOptions
from ._codes import CloseCode, ErrorCode, should_reconnect
from ._errors import (
    CallFailedError,
    ConnectionRejectedError,
    SocketClosedError,
    SocketError,
    SocketTimeoutError,
)
from ._frames import (
    JSON,
    MSGPACK,
    CancelFrame,
    Codec,
    ErrorFrame,
    EventFrame,
    FrameEncodeError,
    LocalProtocolError,
    Message,
    PayloadDecodeError,
    PeerLimitExceededError,
    PingFrame,
    PongFrame,
    PresenceDiffFrame,
    PresenceStateFrame,
    ProtocolClosedError,
    RemoteProtocolError,
    RequestFrame,
    ResultFrame,
    Side,
    UnsubscribeFrame,
    UnwatchFrame,
    WelcomeFrame,
    codec_for_subprotocol,
)
from ._inbound import Latch, ReaderEnd, Signal, deliver_directly
from ._outbox import Outbox, OverflowPolicy, PutOutcome
from ._presence import (
    Applied,
    PresenceBook,
    PresenceChange,
    RoomPresence,
    presence_changed,
    presence_ended,
)
from ._protocol import (
    Event,
    SocketProtocol,
    Subscribed,
    SubscribeRefused,
    Watching,
    WatchRefused,
)
from ._timers import Timers

__all__ = [
    "CLOSE_TIMEOUT",
    "ClientState",
    "SocketBufferFullError",
    "SocketClient",
    "SocketConnectError",
    "SocketConnectTimeoutError",
    "StateChange",
    "StreamOpener",
    "open_socket_client",
]

logger = logging.getLogger("meshline.sockets")

T = TypeVar("T")

CLOSE_TIMEOUT = 2.0
"""Seconds a connection may take to close: to flush what the application queued
before leaving the block, and for the WebSocket closing handshake. trio-websocket's
own default (60 s) is far too long for a client that is leaving."""

DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024
DEFAULT_MAX_BUFFERED_BYTES = 8 * 1024 * 1024
DEFAULT_EVENT_BUFFER = 1000

StreamOpener = Callable[[str], Awaitable[trio.abc.Stream]]
"""Opens the byte stream a connection runs over, given the URL being connected to
(in place of a TCP or TLS connection): memory streams in tests, say."""

_REFUSED_STATUSES = frozenset({401, 403})
_MESHLINE_ERROR_CODES = frozenset(code.value for code in ErrorCode)


def _client_version() -> str:
    try:
        return importlib.metadata.version("meshline")
    except importlib.metadata.PackageNotFoundError:
        return ""


_CLIENT_NAME = "meshline-python"
_CLIENT_VERSION = _client_version()


# --- Errors -----------------------------------------------------------------------


class SocketConnectError(MeshlineError):
    """A connection attempt failed before the server's welcome: the server could
    not be reached, the WebSocket upgrade or the handshake failed, or the server
    closed first. (A refusal with an HTTP status is
    :class:`~meshline.ConnectionRejectedError` instead.)

    ``close_code`` and ``reason`` say how the WebSocket closed when it was open
    already (None otherwise); a terminal-band code stops the client for good,
    as after a welcome.
    """

    def __init__(self, message: str, close_code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.close_code = close_code
        self.reason = reason


class SocketConnectTimeoutError(SocketConnectError, TimeoutError):
    """A connection attempt did not reach the server's welcome within the connect timeout."""


class SocketBufferFullError(MeshlineError):
    """:meth:`SocketClient.emit` found more than ``max_buffered_bytes`` waiting to be
    sent: the server (or the network) is not keeping up. Nothing was queued."""

    def __init__(self, buffered: int, limit: int) -> None:
        super().__init__(f"{buffered} bytes already wait to be sent (limit {limit})")
        self.buffered = buffered
        self.limit = limit


# --- Public data ------------------------------------------------------------------


class ClientState(enum.Enum):
    """Where a :class:`SocketClient` is in its life."""

    CONNECTING = "connecting"
    """The first connection is being made (inside :func:`open_socket_client`)."""
    CONNECTED = "connected"
    """A connection is open: calls and events flow."""
    RECONNECTING = "reconnecting"
    """The connection was lost with a reconnect-band code; the client waits out
    its backoff delay or is making an attempt. Calls wait; emits fail."""
    CLOSED = "closed"
    """The application left the block (or the connection ended while reconnecting
    is off). Final."""
    FAILED = "failed"
    """Stopped for good: the server refused a reconnect with 401 or 403, closed
    with a terminal-band code, or ``max_attempts`` ran out. Final."""

    @property
    def is_final(self) -> bool:
        """Whether the client never leaves this state."""
        return self in (ClientState.CLOSED, ClientState.FAILED)


@attrs.frozen
class StateChange:
    """One transition of a :class:`SocketClient`'s state (see
    :meth:`SocketClient.state_changes`).

    A failed reconnect attempt is reported as a change from ``RECONNECTING`` to
    ``RECONNECTING``, with its ``error`` and the next ``delay``.
    """

    state: ClientState
    previous: ClientState
    close_code: int | None = None
    """For a change caused by the connection's end: its close code (the server's,
    or the one this client sent: 4001 for a silent server; 1006 when the
    connection dropped)."""
    close_reason: str = ""
    error: BaseException | None = None
    """What made an attempt or the client fail (a
    :class:`~meshline.ConnectionRejectedError`, a :class:`SocketConnectError`, a
    :class:`~meshline.SocketClosedError` for a terminal close code)."""
    attempt: int = 0
    """``RECONNECTING``: how many attempts have been scheduled since the last
    connection (1 for the first)."""
    delay: float | None = None
    """``RECONNECTING``: seconds before the next attempt."""
    connection_id: str = ""
    """``CONNECTED``: the new connection's id."""


# --- Helpers ----------------------------------------------------------------------


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        leaves: list[BaseException] = []
        for inner in error.exceptions:
            leaves.extend(_leaves(inner))
        return leaves
    return [error]


_CONNECT_FAILURES = (OSError, trio_websocket.HandshakeError, trio.BrokenResourceError)


def _connect_error(error: BaseException, url: str) -> BaseException:
    """The meshline error for a failed attempt (anything raised before the welcome)."""
    leaves = [leaf for leaf in _leaves(error) if not isinstance(leaf, trio.Cancelled)]
    if len(leaves) != 1:
        return error  # a real concurrency failure, or a cancellation: not ours to map
    leaf = leaves[0]
    if isinstance(leaf, ConnectionRejectedError | SocketConnectError):
        return leaf
    if isinstance(leaf, trio_websocket.ConnectionRejected):
        body = (leaf.body or b"").decode("utf-8", "replace")[:200]
        return ConnectionRejectedError(leaf.status_code, body)
    if isinstance(leaf, trio.TooSlowError):
        return SocketConnectTimeoutError(f"no welcome from {url} within the connect timeout")
    if isinstance(leaf, trio_websocket.ConnectionClosed):
        close = leaf.reason
        code = close.code if close is not None else None
        reason = (close.reason or "") if close is not None else ""
        return SocketConnectError(
            f"{url} closed the connection before its welcome (code {code})", code, reason
        )
    if isinstance(leaf, RemoteProtocolError):
        return SocketConnectError(
            f"handshake with {url} failed: {leaf}", leaf.close_code, leaf.reason
        )
    if isinstance(leaf, _CONNECT_FAILURES):
        return SocketConnectError(f"cannot connect to {url}: {leaf!r}")
    return error


async def _maybe_await(result: object) -> Any:
    if inspect.isawaitable(result):
        return await result
    return result


@attrs.frozen
class _Target:
    """Where to connect: one URL, split for trio-websocket."""

    url: str
    hostname: str
    port: int
    host_header: str
    resource: str
    ssl_context: ssl.SSLContext | None
    open_stream: StreamOpener | None

    @classmethod
    def parse(
        cls,
        url: str,
        query: Mapping[str, str] | None,
        ssl_context: ssl.SSLContext | None,
        open_stream: StreamOpener | None,
    ) -> _Target:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise InvalidArgumentError(f"a socket URL starts with ws:// or wss://: {url!r}")
        hostname = parts.hostname
        if not hostname:
            raise InvalidArgumentError(f"a socket URL names a host: {url!r}")
        secure = parts.scheme == "wss"
        try:
            port = parts.port or (443 if secure else 80)
        except ValueError as exc:
            raise InvalidArgumentError(f"bad port in {url!r}: {exc}") from None
        host = f"[{hostname}]" if ":" in hostname else hostname
        host_header = host if port == (443 if secure else 80) else f"{host}:{port}"
        resource = parts.path or "/"
        query_string = parts.query
        if query:
            extra = urllib.parse.urlencode(list(query.items()))
            query_string = f"{query_string}&{extra}" if query_string else extra
        if query_string:
            resource = f"{resource}?{query_string}"
        if secure and ssl_context is None:
            ssl_context = ssl.create_default_context()
        return cls(
            url, hostname, port, host_header, resource, ssl_context if secure else None, open_stream
        )

    async def connect(self) -> trio.abc.Stream:
        if self.open_stream is not None:
            return await self.open_stream(self.url)
        if self.ssl_context is None:
            return await trio.open_tcp_stream(self.hostname, self.port)
        return await trio.open_ssl_over_tcp_stream(
            self.hostname, self.port, ssl_context=self.ssl_context, https_compatible=True
        )


class _Sender:
    """One session's outgoing queue: the shared byte-counted
    :class:`~meshline._sockets._outbox.Outbox` (policy ``latest``, so a keyed
    event replaces its waiting predecessor), with the wake-ups its single writer
    task waits on.

    :meth:`put` never waits. Past ``max_buffered_bytes``, application frames are
    refused (the outbox drops them; :meth:`SocketClient.emit` raises); control
    frames (pongs, cancels, replies, unsubscribes, calls that waited for room)
    go in up to twice the limit, and past that the outbox overflows: the session
    then closes with 1013 and the client reconnects.
    """

    def __init__(self, limit: int) -> None:
        self.outbox = Outbox(limit, OverflowPolicy.LATEST)
        self.closed = False
        self._queued = Signal()
        self._room: trio.Event | None = None

    def put(self, message: Message, *, key: str | None = None, control: bool = False) -> PutOutcome:
        if self.closed:
            return PutOutcome.DROPPED
        outcome = self.outbox.put(message, key=key, control=control)
        if outcome is PutOutcome.QUEUED:
            self._queued.set()
        return outcome

    async def get(self) -> Message:
        """The oldest message; waits for one.

        :raises trio.EndOfChannel: closed and empty.
        """
        outbox = self.outbox
        while True:
            message = outbox.take()
            if message is not None:
                if self._room is not None and outbox.buffered_bytes < outbox.max_buffered_bytes:
                    self._room.set()
                    self._room = None
                return message
            if self.closed:
                raise trio.EndOfChannel
            await self._queued.wait()

    def has_room(self) -> bool:
        """Whether fewer than ``max_buffered_bytes`` wait."""
        return self.outbox.buffered_bytes < self.outbox.max_buffered_bytes

    async def wait_for_room(self) -> None:
        """Wait until fewer than ``max_buffered_bytes`` wait (or the queue closes)."""
        outbox = self.outbox
        while not self.closed and outbox.buffered_bytes >= outbox.max_buffered_bytes:
            if self._room is None:
                self._room = trio.Event()
            await self._room.wait()

    def close(self, *, discard: bool) -> None:
        """No more messages; ``discard`` drops those still waiting."""
        self.closed = True
        if discard:
            self.outbox.clear()
        self._queued.set()
        if self._room is not None:
            self._room.set()
            self._room = None


class _Pending:
    """A call or subscribe waiting for its answer."""

    __slots__ = ("answer", "call_id", "done", "error", "on_answer")

    def __init__(
        self, call_id: int, on_answer: Callable[[Event | None], None] | None = None
    ) -> None:
        self.call_id = call_id
        self.done = Latch()
        self.answer: Event | None = None
        self.error: BaseException | None = None
        self.on_answer = on_answer

    def resolve(self, answer: Event) -> None:
        self.answer = answer
        self.done.set()
        if self.on_answer is not None:
            self.on_answer(answer)

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()
        if self.on_answer is not None:
            self.on_answer(None)


class _EndKind(enum.Enum):
    PEER = "peer"
    """The server closed, or the connection dropped."""
    LOCAL = "local"
    """This client closed it: a silent server, a protocol violation."""
    APPLICATION = "application"
    """The application is closing the client."""


@attrs.frozen
class _End:
    kind: _EndKind
    code: int
    reason: str


@attrs.frozen
class _Listener:
    handler: Callable[[Any], object]
    input: Any
    topic: str | None
    is_async: bool = attrs.field(init=False)

    @is_async.default
    def _is_async(self) -> bool:
        handler = self.handler
        return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            type(handler).__call__
        )


_Queued = tuple[EventFrame, Codec] | Awaitable[object]
"""What waits for the client's handler task: an event, or what a plain handler
run at once returned that must be awaited (it returned a coroutine)."""


@attrs.frozen
class _Implementation:
    handler: Callable[[Any], object]
    input: Any


@attrs.frozen
class _Prepared:
    """A request's implementation and its decoded data."""

    implementation: _Implementation
    decoded: Any


class _Session:
    """One connection: its WebSocket, protocol machine, outbox and tasks."""

    def __init__(
        self,
        client: SocketClient,
        ws: trio_websocket.WebSocketConnection,
        protocol: SocketProtocol,
        welcome: WelcomeFrame,
    ) -> None:
        self.client = client
        self.ws = ws
        self.protocol = protocol
        self.codec: Codec = protocol.codec
        self.welcome = welcome
        self.outbox = _Sender(client.max_buffered_bytes)
        self.calls: dict[int, _Pending] = {}
        self.requests: dict[int, trio.CancelScope] = {}
        self.end: _End | None = None
        self.ended = trio.Event()
        self.drained = trio.Event()
        self.closed = trio.Event()
        self.nursery: trio.Nursery | None = None
        self.context: contextvars.Context | None = None
        """The context the session's handler tasks start in (the session task's,
        not that of trio-websocket's reader, where messages arrive)."""

    @property
    def is_open(self) -> bool:
        return self.end is None

    # --- Running -------------------------------------------------------------------

    async def run(self, opened: Callable[[_Session], None]) -> None:
        """Run the session's tasks until it ends, then close it (bounded)."""
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._write)
                nursery.start_soon(self._watch_heartbeat)
                opened(self)
                self.context = contextvars.copy_context()
                reader_end = deliver_directly(self.ws, self._on_message, self._on_inbound_closed)
                if reader_end is None:
                    nursery.start_soon(self._read)
                else:
                    nursery.start_soon(self._watch_reader, reader_end)
                await self.ended.wait()
                assert self.end is not None
                if self.end.kind is _EndKind.APPLICATION:
                    with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                        await self.drained.wait()
                nursery.cancel_scope.cancel()
        finally:
            if self.end is None:  # cancelled from outside: the client is going away
                self.finish(_EndKind.APPLICATION, CloseCode.NORMAL, "client closed")
            assert self.end is not None
            if self.end.kind is not _EndKind.PEER:
                with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                    await self.ws.aclose(self.end.code, self.end.reason)
            self.closed.set()

    def finish(self, kind: _EndKind, code: int | None, reason: str) -> None:
        """End the session (the first call wins): record the close, fail the
        pending calls at once, and let the client decide what comes next."""
        if self.end is not None:
            return
        if kind is _EndKind.PEER:
            self.protocol.peer_closed(code, reason)
        else:
            self.protocol.close(CloseCode.NORMAL if code is None else code, reason)
        assert self.protocol.close_code is not None
        self.end = _End(kind, self.protocol.close_code, self.protocol.close_reason)
        self.outbox.close(discard=kind is not _EndKind.APPLICATION)
        what = (
            "the client closed"
            if kind is _EndKind.APPLICATION
            else "the connection closed while the call was in flight"
        )
        calls, self.calls = self.calls, {}
        for pending in calls.values():
            pending.fail(SocketClosedError(what, self.end.code, self.end.reason))
        self.ended.set()
        self.client._session_ended(self)

    # --- Tasks ---------------------------------------------------------------------

    async def _read(self) -> None:
        """Read with ``get_message``, when trio-websocket's channel cannot be
        replaced (see :func:`~meshline._sockets._inbound.deliver_directly`)."""
        while self.end is None:
            try:
                message = await self.ws.get_message()
            except trio_websocket.ConnectionClosed:
                self._on_inbound_closed()
                return
            self._on_message(message)

    def _on_message(self, message: Message) -> None:
        """One message from the server, in trio-websocket's reader task: into the
        protocol, then to whoever waits for it. Never waits, never raises."""
        if self.end is not None:
            return
        try:
            try:
                event = self.protocol.receive(message, trio.current_time())
            except RemoteProtocolError as exc:
                # The machine logged the violation and is closed.
                self.finish(_EndKind.LOCAL, exc.close_code, exc.reason)
                return
            if event is not None:
                self._handle(event)
        except Exception:  # a bug here must not take trio-websocket's reader down
            logger.exception("socket client: failed to handle a message")
            self.finish(_EndKind.LOCAL, CloseCode.INTERNAL_ERROR, "client error")

    def _on_inbound_closed(self) -> None:
        """trio-websocket says the WebSocket closed."""
        if self.end is not None:
            return
        close = self.ws.closed
        code = close.code if close is not None else None
        reason = (close.reason or "") if close is not None else ""
        logger.info(
            "socket client %r: connection closed by the server or lost (%s %s)",
            self.client.client_id,
            code,
            reason,
        )
        self.finish(_EndKind.PEER, code, reason)

    def _handle(self, event: Event) -> None:
        match event:
            case ResultFrame(id=call_id) | ErrorFrame(id=call_id):
                self._answer(call_id, event)
            case Subscribed(id=call_id) | SubscribeRefused(id=call_id):
                self._answer(call_id, event)
            case Watching(id=call_id) | WatchRefused(id=call_id):
                self._answer(call_id, event)
            case PresenceStateFrame() | PresenceDiffFrame():
                self.client._presence_frame(event, self)
            case EventFrame():
                self.client._deliver(event, self.codec)
            case RequestFrame():
                self._start_request(event)
            case CancelFrame(id=request_id):
                running = self.requests.get(request_id)
                if running is not None:
                    running.cancel()
            case UnsubscribeFrame(topic=topic):
                self.client._subscription_ended(topic)
            case UnwatchFrame(room=room, code=code):
                self.client._watch_ended(room, code, self)
            case PingFrame(seq=seq):
                self.send_control(lambda: self.protocol.pong(seq))
            case PongFrame():
                pass
            case _:  # the machine lets nothing else through on an open client
                logger.warning("socket client: unexpected event %r ignored", event)

    def _answer(self, call_id: int, answer: Event) -> None:
        pending = self.calls.pop(call_id, None)
        if pending is not None:
            pending.resolve(answer)

    async def _watch_reader(self, reader_end: ReaderEnd) -> None:
        """trio-websocket's reader ended: the connection is over, whether or not
        it said so (see :class:`~meshline._sockets._inbound.ReaderEnd`)."""
        await reader_end.wait()
        self._on_inbound_closed()

    async def _write(self) -> None:
        try:
            while True:
                try:
                    message = await self.outbox.get()
                except trio.EndOfChannel:
                    return
                try:
                    await self.ws.send_message(message)
                except trio_websocket.ConnectionClosed:
                    self._on_inbound_closed()
                    return
        finally:
            self.drained.set()

    async def _watch_heartbeat(self) -> None:
        protocol = self.protocol
        grace = self.client.heartbeat_grace
        while True:
            await trio.sleep_until(protocol.next_deadline() + grace)
            if protocol.is_dead(trio.current_time() - grace):
                silence = trio.current_time() - (protocol.last_received_at or 0.0)
                logger.warning(
                    "socket client %r: nothing from the server for %.1f s: connection lost",
                    self.client.client_id,
                    silence,
                )
                self.finish(_EndKind.LOCAL, CloseCode.HEARTBEAT_MISSED, "heartbeat missed")
                return

    def _start_request(self, frame: RequestFrame) -> None:
        """Answer the server's request: at once when its implementation is a plain
        function that returns the reply (called here, in the reader, in a context
        of its own as a task would have), else from a task of its own that awaits
        what it returned, cancelled when the server cancels the request."""
        try:
            prepared = self._prepare_request(frame)
            if not isinstance(prepared, _Prepared):
                self.queue(prepared, control=True)
                return
            try:
                started = contextvars.copy_context().run(
                    prepared.implementation.handler, prepared.decoded
                )
            except Exception as exc:  # a plain one raised, or an async one cannot be called
                self.queue(self._request_failed(frame, exc), control=True)
                return
            if not inspect.isawaitable(started):
                self.queue(self._reply(frame, started), control=True)
                return
        except ProtocolClosedError:
            logger.debug("socket client: request %r outlived its connection", frame.name)
            return
        scope = trio.CancelScope()
        if frame.timeout is not None:
            scope.deadline = trio.current_time() + frame.timeout
        self.requests[frame.id] = scope
        assert self.nursery is not None and self.context is not None
        self.context.run(self.nursery.start_soon, self._answer_request, frame, scope, started)

    def _prepare_request(self, frame: RequestFrame) -> _Prepared | Message:
        """The request's implementation, with its data decoded; or the error
        reply when there is none, or the data does not fit its input."""
        implementation = self.client._implementations.get(frame.name)
        if implementation is None:
            logger.warning("socket client: the server requested %r, not implemented", frame.name)
            return self.protocol.reply_error(
                frame.id, ErrorCode.UNKNOWN_REQUEST, f"no implementation of {frame.name!r}"
            )
        try:
            data = self.codec.decode_data(frame.data, implementation.input)
        except PayloadDecodeError as exc:
            logger.warning("socket client: bad input for request %r: %s", frame.name, exc)
            return self.protocol.reply_error(frame.id, ErrorCode.BAD_INPUT, str(exc))
        return _Prepared(implementation, data)

    async def _answer_request(
        self, frame: RequestFrame, scope: trio.CancelScope, started: object
    ) -> None:
        """Await the reply ``started`` (what the implementation returned), under
        ``scope``; send it (or the error, or ``cancelled``)."""
        answer: Message | None = None
        try:
            with scope:
                try:
                    result = await _maybe_await(started)
                except Exception as exc:
                    answer = self._request_failed(frame, exc)
                else:
                    answer = self._reply(frame, result)
            if scope.cancelled_caught:
                logger.debug("socket client: request %r cancelled", frame.name)
                answer = self.protocol.reply_error(frame.id, ErrorCode.CANCELLED, "cancelled")
        except ProtocolClosedError:
            logger.debug("socket client: request %r outlived its connection", frame.name)
            answer = None
        finally:
            self.requests.pop(frame.id, None)
        if answer is not None:
            self.queue(answer, control=True)

    def _request_failed(self, frame: RequestFrame, exc: Exception) -> Message:
        """The error reply for an implementation that raised ``exc``."""
        if isinstance(exc, SocketError):
            logger.debug("socket client: request %r refused: %s", frame.name, exc)
            return self._reply_error(frame.id, exc.code, exc.message, exc.details)
        logger.error("socket client: the implementation of %r raised", frame.name, exc_info=exc)
        return self.protocol.reply_error(frame.id, ErrorCode.INTERNAL, "internal error")

    def _reply(self, frame: RequestFrame, result: object) -> Message:
        """The reply carrying ``result``, or the error when it cannot be sent."""
        try:
            return self.protocol.reply(frame.id, result)
        except PeerLimitExceededError as exc:
            logger.warning("socket client: the reply to %r is too large: %s", frame.name, exc)
            return self.protocol.reply_error(frame.id, ErrorCode.TOO_LARGE, str(exc))
        except FrameEncodeError as exc:
            logger.warning("socket client: the reply to %r cannot be encoded: %s", frame.name, exc)
            return self.protocol.reply_error(frame.id, ErrorCode.INTERNAL, "reply not encodable")

    def _reply_error(self, request_id: int, code: str, message: str, details: Any) -> Message:
        try:
            return self.protocol.reply_error(request_id, code, message, details)
        except (FrameEncodeError, PeerLimitExceededError) as exc:
            logger.warning("socket client: error details dropped: %s", exc)
            return self.protocol.reply_error(request_id, code, message)

    # --- Sending -------------------------------------------------------------------

    def queue(self, message: Message, *, key: str | None = None, control: bool = False) -> bool:
        """Queue ``message`` for the writer. False when it was not queued: the
        session ended, the message was refused past ``max_buffered_bytes``, or the
        outbox overflowed (the session then ends with 1013, and the client
        reconnects)."""
        if not self.is_open:
            return False
        outcome = self.outbox.put(message, key=key, control=control)
        if outcome is PutOutcome.OVERFLOW:
            logger.warning(
                "socket client %r: more than %d bytes wait to be sent: closing with 1013",
                self.client.client_id,
                self.outbox.outbox.hard_limit,
            )
            self.finish(_EndKind.LOCAL, CloseCode.TRY_AGAIN_LATER, "send queue overflow")
            return False
        return outcome is not PutOutcome.DROPPED

    def send_control(self, make: Callable[[], Message | None]) -> None:
        """Queue a control frame made by ``make`` (nothing if the session ended)."""
        if not self.is_open:
            return
        message = make()
        if message is not None:
            self.queue(message, control=True)

    def start_call(self, name: str, data: object) -> _Pending:
        call_id, message = self.protocol.call(name, data)
        pending = _Pending(call_id)
        self.calls[call_id] = pending
        self.queue(message, control=True)  # the caller waited for room
        return pending

    def cancel_call(self, pending: _Pending) -> None:
        if self.calls.pop(pending.call_id, None) is not None:
            self.send_control(lambda: self.protocol.cancel_call(pending.call_id))

    def start_subscribe(
        self, topic: str, on_answer: Callable[[Event | None], None] | None = None
    ) -> _Pending:
        call_id, message = self.protocol.subscribe(topic)
        pending = _Pending(call_id, on_answer)
        self.calls[call_id] = pending
        self.queue(message, control=True)
        return pending

    def start_watch(
        self, room: str, on_answer: Callable[[Event | None], None] | None = None
    ) -> _Pending:
        call_id, message = self.protocol.watch(room)
        pending = _Pending(call_id, on_answer)
        self.calls[call_id] = pending
        self.queue(message, control=True)
        return pending

    def withdraw_watch(self, room: str) -> None:
        """Stop watching ``room`` on this connection; its pending watches fail as withdrawn."""
        self.send_control(lambda: self.protocol.unwatch(room))
        self._fail_withdrawn(f"watch of {room!r} withdrawn")

    def _fail_withdrawn(self, why: str) -> None:
        still_pending = self.protocol.pending_calls
        for call_id in [key for key in self.calls if key not in still_pending]:
            self.calls.pop(call_id).fail(CallFailedError(ErrorCode.CANCELLED, why))

    def withdraw_subscribe(self, topic: str) -> None:
        """Leave ``topic`` on this connection; its pending subscribes fail as withdrawn."""
        self.send_control(lambda: self.protocol.unsubscribe(topic))
        self._fail_withdrawn(f"subscription to {topic!r} withdrawn")


class SocketClient:
    """A connection to a meshline socket server that survives the server's restarts.

    Made by :func:`open_socket_client`; everything it does happens inside that
    block. It reconnects by itself (see the function), so it outlives any one
    connection: :attr:`connection_id` changes with each.
    """

    def __init__(
        self,
        targets: Sequence[_Target],
        *,
        client_id: str,
        headers: list[tuple[bytes, bytes]],
        auth: str | Callable[[], str | Awaitable[str]] | None,
        codec: Codec,
        connect_timeout: float,
        call_timeout: float,
        reconnect: ReconnectOptions | None,
        heartbeat_grace: float,
        on_reconnect: Callable[[SocketClient], object] | None,
        max_message_size: int,
        max_buffered_bytes: int,
        event_buffer: int,
    ) -> None:
        self.client_id = client_id
        """The stable id this client sends in every hello."""
        self.codec = codec
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        self.reconnect = reconnect
        self.heartbeat_grace = heartbeat_grace
        self.max_message_size = max_message_size
        self.max_buffered_bytes = max_buffered_bytes
        self.dropped_events = 0
        """Events dropped because more than ``event_buffer`` waited for the ``on``
        handlers (each drop is logged)."""
        self._targets = list(targets)
        self._next_target = 0
        self._headers = headers
        self._auth = auth
        self._timers = Timers()
        self._on_reconnect = on_reconnect
        self._backoff = Backoff(reconnect or ReconnectOptions())
        self._state = ClientState.CONNECTING
        self._changed = trio.Event()
        self._watchers: set[trio.MemorySendChannel[StateChange]] = set()
        self._failure: Callable[[], BaseException] | None = None
        self._retry_delay = 0.0
        self._session: _Session | None = None
        self._sessions_opened = 0
        self._connection_id: str | None = None
        self._node_id: int | None = None
        self._topics: set[str] = set()
        self._watches: dict[str, _Watch] = {}
        self._listeners: dict[str, list[_Listener]] = {}
        self._implementations: dict[str, _Implementation] = {}
        self._events_in, self._events_out = trio.open_memory_channel[_Queued](event_buffer)
        self._backlog = 0
        """Events queued for the handler task or being handled there: while any
        are, later events queue behind them (handlers run in arrival order)."""

    def __repr__(self) -> str:
        return (
            f"<SocketClient {self.client_id!r} {self._state.value}"
            f" connection={self._connection_id!r}>"
        )

    # --- State -----------------------------------------------------------------------

    @property
    def state(self) -> ClientState:
        """The current state (see :class:`ClientState`)."""
        return self._state

    @property
    def connection_id(self) -> str | None:
        """The id the server gave the current connection (the last one while
        reconnecting or after the end)."""
        return self._connection_id

    @property
    def node_id(self) -> int | None:
        """The id of the node the current (or last) connection is on."""
        return self._node_id

    @property
    def topics(self) -> frozenset[str]:
        """The topics this client is subscribed to, and subscribes to again after
        every reconnect."""
        return frozenset(self._topics)

    @asynccontextmanager
    async def state_changes(
        self, *, buffer: int = 64
    ) -> AsyncIterator[trio.MemoryReceiveChannel[StateChange]]:
        """Watch the client's state: yields a channel of :class:`StateChange`, in order.

        ::

            async with client.state_changes() as changes:
                async for change in changes:
                    ...

        The channel ends after the change to a final state (``CLOSED``,
        ``FAILED``); it is empty and ended if the client is already there. A
        watcher that falls more than ``buffer`` changes behind misses the newer
        ones (logged); :attr:`state` is always current.
        """
        send, receive = trio.open_memory_channel[StateChange](buffer)
        if self._state.is_final:
            send.close()
        else:
            self._watchers.add(send)
        try:
            yield receive
        finally:
            self._watchers.discard(send)
            send.close()
            receive.close()

    def _set_state(self, state: ClientState, **details: Any) -> None:
        change = StateChange(state, self._state, **details)
        self._state = state
        logger.debug("socket client %r: %s", self.client_id, change)
        for watcher in list(self._watchers):
            try:
                watcher.send_nowait(change)
            except trio.WouldBlock:
                logger.warning("socket client %r: a state watcher fell behind", self.client_id)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._watchers.discard(watcher)
            if state.is_final:
                watcher.close()
        if state.is_final:
            self._watchers.clear()
            watches, self._watches = self._watches, {}
            for watch in watches.values():
                watch.book.reset()
                presence_ended(watch.presence)
        self._changed.set()
        self._changed = trio.Event()

    def _fail(self, make_error: Callable[[], BaseException], **details: Any) -> None:
        self._failure = make_error
        error = make_error()
        logger.warning("socket client %r: stopped for good: %s", self.client_id, error)
        self._set_state(ClientState.FAILED, error=error, **details)

    def _final_error(self) -> BaseException:
        if self._failure is not None:
            return self._failure()
        return SocketClosedError("the client is closed")

    async def _wait_session(self) -> _Session:
        """The open session; waits through a reconnect.

        :raises SocketClosedError, ConnectionRejectedError: the client is closed
            or failed for good.
        """
        while True:
            session = self._session
            if session is not None and session.is_open:
                return session
            if self._state.is_final:
                raise self._final_error()
            await self._changed.wait()

    # --- Connecting --------------------------------------------------------------------

    async def _supervise(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Connect, then reconnect for as long as the bands allow."""
        started = False
        first_tries = 0

        def opened(session: _Session) -> None:
            nonlocal started
            self._opened(session)
            if not started:
                started = True
                task_status.started()

        while True:
            target = self._targets[self._next_target]
            self._next_target = (self._next_target + 1) % len(self._targets)
            try:
                await self._connect_and_run(target, opened)
            except (SocketConnectError, ConnectionRejectedError) as exc:
                refusal = (
                    exc
                    if isinstance(exc, ConnectionRejectedError) and exc.status in _REFUSED_STATUSES
                    else None
                )
                terminal = (
                    exc
                    if isinstance(exc, SocketConnectError) and not should_reconnect(exc.close_code)
                    else None
                )
                if not started:
                    first_tries += 1
                    logger.warning("socket client %r: %s", self.client_id, exc)
                    if refusal or terminal or first_tries >= len(self._targets):
                        raise
                    continue  # the first connect tries every URL once
                if refusal is not None:
                    self._fail(
                        functools.partial(ConnectionRejectedError, refusal.status, refusal.reason)
                    )
                    return
                if terminal is not None:
                    code, reason = terminal.close_code, terminal.reason
                    self._fail(
                        functools.partial(
                            SocketClosedError,
                            f"closed for good with {code} ({reason})",
                            code,
                            reason,
                        ),
                        close_code=code,
                        close_reason=reason,
                    )
                    return
                logger.info("socket client %r: attempt failed: %s", self.client_id, exc)
                if not self._schedule_retry(error=exc):
                    return
            else:
                if self._state is not ClientState.RECONNECTING:
                    return
            await trio.sleep(self._retry_delay)

    def _schedule_retry(self, **details: Any) -> bool:
        """Pick the next delay and announce it; False when attempts ran out."""
        if self.reconnect is None or self._backoff.exhausted:
            error = details.get("error")
            self._fail(
                lambda: SocketClosedError(f"gave up reconnecting: {error}"),
                **{key: value for key, value in details.items() if key != "error"},
            )
            return False
        self._retry_delay = self._backoff.next_delay()
        logger.info(
            "socket client %r: reconnecting in %.2f s (attempt %d)",
            self.client_id,
            self._retry_delay,
            self._backoff.attempt,
        )
        self._set_state(
            ClientState.RECONNECTING,
            attempt=self._backoff.attempt,
            delay=self._retry_delay,
            **details,
        )
        return True

    async def _connect_and_run(self, target: _Target, opened: Callable[[_Session], None]) -> None:
        """One attempt: connect and handshake within the connect timeout, then run
        the session until it ends.

        :raises SocketConnectError, ConnectionRejectedError: the attempt failed
            before the welcome.
        """
        streams: list[trio.abc.Stream] = []
        session: _Session | None = None
        try:
            async with trio.open_nursery() as ws_nursery:
                with trio.fail_after(self.connect_timeout):
                    session = await self._handshake(ws_nursery, target, streams)
                await session.run(opened)
                ws_nursery.cancel_scope.cancel()
        except BaseException as exc:
            if session is not None:
                raise
            error = _connect_error(exc, target.url)
            if error is exc:
                raise
            raise error from None
        finally:
            for stream in streams:
                await trio.aclose_forcefully(stream)

    async def _handshake(
        self, ws_nursery: trio.Nursery, target: _Target, streams: list[trio.abc.Stream]
    ) -> _Session:
        headers = self._headers + await self._auth_headers()
        stream = await target.connect()
        streams.append(stream)
        ws = await trio_websocket.wrap_client_stream(
            ws_nursery,
            cast(Any, stream),
            target.host_header,
            target.resource,
            subprotocols=[self.codec.subprotocol],
            extra_headers=headers,
            max_message_size=self.max_message_size,
        )
        try:
            codec = codec_for_subprotocol(ws.subprotocol)
            protocol = SocketProtocol(Side.CLIENT, codec, max_message_size=self.max_message_size)
            hello = protocol.hello(
                self.client_id,
                client_name=_CLIENT_NAME,
                client_version=_CLIENT_VERSION,
                previous_connection_id=self._connection_id or "",
            )
            await ws.send_message(hello)
            event = protocol.receive(await ws.get_message(), trio.current_time())
        except RemoteProtocolError as exc:
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await ws.aclose(exc.close_code, exc.reason)
            raise
        assert isinstance(event, WelcomeFrame)  # the machine accepts nothing else
        return _Session(self, ws, protocol, event)

    async def _keep_timers(self) -> None:
        await self._timers.run()

    async def _auth_headers(self) -> list[tuple[bytes, bytes]]:
        """``Authorization: Bearer <token>`` from ``auth``, asked afresh for every
        connection attempt (nothing without ``auth``).

        :raises SocketConnectError: ``auth`` raised, or gave no usable token.
        """
        auth = self._auth
        if auth is None:
            return []
        try:
            token = auth if isinstance(auth, str) else await _maybe_await(auth())
        except Exception as exc:
            logger.warning("socket client %r: auth failed", self.client_id, exc_info=True)
            raise SocketConnectError(f"auth failed: {exc!r}") from exc
        try:
            return [(b"authorization", b"Bearer " + _checked_token(token).encode("latin-1"))]
        except InvalidArgumentError as exc:
            logger.warning("socket client %r: %s", self.client_id, exc)
            raise SocketConnectError(str(exc)) from None

    def _opened(self, session: _Session) -> None:
        welcome = session.welcome
        reconnected = self._sessions_opened > 0
        self._sessions_opened += 1
        self._session = session
        self._connection_id = welcome.connection_id
        self._node_id = welcome.node_id
        self._backoff.reset()
        logger.info(
            "socket client %r: connected as %s on node %d",
            self.client_id,
            welcome.connection_id,
            welcome.node_id,
        )
        for topic in sorted(self._topics):
            session.start_subscribe(topic, self._resubscribed(topic))
        for room, watch in sorted(self._watches.items()):
            watch.book.reset()
            try:
                session.start_watch(room, self._rewatched(room, watch))
            except LocalProtocolError as exc:  # the new node's server is older
                logger.warning(
                    "socket client %r: cannot watch %r again: %s", self.client_id, room, exc
                )
                del self._watches[room]
                presence_ended(watch.presence)
        self._set_state(ClientState.CONNECTED, connection_id=welcome.connection_id)
        if reconnected and self._on_reconnect is not None:
            assert session.nursery is not None
            session.nursery.start_soon(self._run_on_reconnect, self._on_reconnect)

    async def _run_on_reconnect(self, hook: Callable[[SocketClient], object]) -> None:
        try:
            await _maybe_await(hook(self))
        except Exception:
            logger.exception("socket client %r: on_reconnect raised", self.client_id)

    def _resubscribed(self, topic: str) -> Callable[[Event | None], None]:
        def on_answer(answer: Event | None) -> None:
            if isinstance(answer, SubscribeRefused):
                logger.warning(
                    "socket client %r: re-subscribing to %r refused: %s %s",
                    self.client_id,
                    topic,
                    answer.code,
                    answer.message,
                )
                self._topics.discard(topic)

        return on_answer

    def _session_ended(self, session: _Session) -> None:
        """Decide what comes after a session's end (called by the session, at once)."""
        if self._session is session:
            self._session = None
        end = session.end
        assert end is not None
        if end.kind is _EndKind.APPLICATION or self._state.is_final:
            return
        for watch in self._watches.values():  # no longer the server's word
            watch.book.reset()
            presence_changed(watch.presence)
        details = {"close_code": end.code, "close_reason": end.reason}
        if not should_reconnect(end.code):
            self._fail(
                lambda: SocketClosedError(
                    f"closed for good with {end.code} ({end.reason})", end.code, end.reason
                ),
                **details,
            )
        elif self.reconnect is None:
            logger.info("socket client %r: connection ended; reconnect is off", self.client_id)
            self._failure = lambda: SocketClosedError(
                f"the connection closed with {end.code} ({end.reason})", end.code, end.reason
            )
            self._set_state(ClientState.CLOSED, **details)
        else:
            self._schedule_retry(**details)

    # --- Closing -----------------------------------------------------------------------

    def _begin_close(self) -> _Session | None:
        """The application leaves: end the session (flushing what it queued) and
        move to ``CLOSED`` (a failed client stays ``FAILED``)."""
        session = self._session
        if not self._state.is_final:
            self._set_state(ClientState.CLOSED)
        if session is not None:
            session.finish(_EndKind.APPLICATION, CloseCode.NORMAL, "client closed")
        return session

    # --- Calls -------------------------------------------------------------------------

    @overload
    async def call(
        self,
        name: str,
        data: object = None,
        *,
        timeout: float | None = None,
        result_type: type[T],
    ) -> T: ...

    @overload
    async def call(
        self,
        name: str,
        data: object = None,
        *,
        timeout: float | None = None,
        result_type: None = None,
    ) -> Any: ...

    async def call(
        self,
        name: str,
        data: object = None,
        *,
        timeout: float | None = None,
        result_type: Any = None,
    ) -> Any:
        """Call ``name`` on the server with ``data``; return its result.

        ``data`` is anything msgspec encodes (builtins, msgspec structs, attrs
        classes, dataclasses). The result is decoded into ``result_type`` when
        given (msgspec validates it), as plain builtins otherwise.

        ``timeout`` (seconds; ``call_timeout`` by default, ``math.inf`` for none)
        covers the whole call: waiting for a reconnect, for room in the outbox,
        and for the answer. A call made while the client reconnects waits for the
        new connection within it.

        :raises CallFailedError: the server answered with an error. ``code`` is
            the server handler's own when it raised ``SocketError`` (then
            ``application`` is True), or meshline's (``bad_input``,
            ``unknown_call``, ``forbidden``, ``internal``...).
        :raises SocketTimeoutError: no answer within ``timeout``; a cancel was
            sent to the server.
        :raises SocketClosedError: the connection dropped (or was closed) while
            the call was in flight: raised at once, not at the timeout. The call
            is not retried (it may or may not have run). Also raised when the
            client is closed, or failed for good on a terminal close code.
        :raises ConnectionRejectedError: the client failed for good because the
            server refused a reconnect (401, 403).
        :raises PayloadDecodeError: the result does not fit ``result_type``.
        :raises FrameEncodeError: ``data`` cannot be encoded (nothing was sent).
        :raises PeerLimitExceededError: the call is bigger than the server accepts.

        Cancellation: if the caller is cancelled while the call is in flight, a
        cancel is sent to the server (and its answer ignored).
        """
        limit = self.call_timeout if timeout is None else timeout
        if not limit >= 0:
            raise InvalidArgumentError(f"timeout must be >= 0: {timeout!r}")
        session = self._session
        if session is not None and session.is_open and session.outbox.has_room():
            # The common case, with no cancel scope: the timeout is a timer.
            return await self._call_on(session, name, data, result_type, limit)
        with trio.move_on_after(limit):
            return await self._call(name, data, result_type)
        raise self._timed_out(name, limit)

    def _timed_out(self, name: str, limit: float) -> SocketTimeoutError:
        logger.info("socket client %r: call %r timed out after %g s", self.client_id, name, limit)
        return SocketTimeoutError(f"no answer to {name!r} within {limit:g} s")

    def _expire_call(
        self, session: _Session, pending: _Pending, name: str, limit: float, now: float
    ) -> None:
        """A call's timer ran out: the server is sent a cancel, and the call fails
        with :class:`SocketTimeoutError`."""
        if not pending.done.is_set():
            session.cancel_call(pending)
            pending.fail(self._timed_out(name, limit))

    async def _call(self, name: str, data: object, result_type: Any) -> Any:
        """A call that first waits for a connection, or for room to queue it (the
        caller's cancel scope bounds the whole of it)."""
        session = await self._wait_session()
        await session.outbox.wait_for_room()
        if not session.is_open:
            return await self._call(name, data, result_type)
        return await self._call_on(session, name, data, result_type, math.inf)

    async def _call_on(
        self, session: _Session, name: str, data: object, result_type: Any, limit: float
    ) -> Any:
        """Queue the call on ``session`` and wait for its answer, failing it with
        :class:`SocketTimeoutError` after ``limit`` seconds (a timer; ``inf``: none).

        Cancellation: the server is sent a cancel, and the answer is ignored.
        """
        pending = session.start_call(name, data)
        timer = None
        if limit < math.inf:
            expire = functools.partial(self._expire_call, session, pending, name, limit)
            timer = self._timers.add(trio.current_time() + limit, expire)
        try:
            await pending.done.wait()
        finally:
            if timer is not None:
                self._timers.withdraw(timer)
            if not pending.done.is_set():
                session.cancel_call(pending)
        return self._call_result(session, pending, result_type)

    def _call_result(self, session: _Session, pending: _Pending, result_type: Any) -> Any:
        if pending.error is not None:
            raise pending.error
        answer = pending.answer
        if isinstance(answer, ErrorFrame):
            raise self._call_failed(answer.code, answer.message, answer.details, session.codec)
        assert isinstance(answer, ResultFrame)
        return session.codec.decode_data(answer.data, Any if result_type is None else result_type)

    @staticmethod
    def _call_failed(code: str, message: str, details: Any, codec: Codec) -> CallFailedError:
        decoded: Any = None
        if details is not None:
            try:
                decoded = codec.decode_data(details, Any)
            except PayloadDecodeError:
                decoded = None
        application = code not in _MESHLINE_ERROR_CODES
        return CallFailedError(code, message, decoded, application=application)

    # --- Events ------------------------------------------------------------------------

    def emit(self, event: str, data: object = None, *, coalesce: str | None = None) -> None:
        """Send the event ``event`` with ``data`` to the server.

        Synchronous: the event is encoded and queued for the connection's writer
        task, so ``emit`` never waits on the network and can be called from
        synchronous code (an ``on`` handler, a callback). Events and calls keep
        their order. With ``coalesce``, an event with the same key that is still
        waiting to be sent is replaced by this one (only the newest value waits:
        for cursors and progress).

        Events are not kept across reconnects (they would arrive late, in a
        burst): use a call for something that must arrive.

        :raises SocketClosedError: not connected (reconnecting, closed, failed).
        :raises ConnectionRejectedError: the client failed for good because the
            server refused a reconnect.
        :raises SocketBufferFullError: more than ``max_buffered_bytes`` wait to be
            sent.
        :raises FrameEncodeError: ``data`` cannot be encoded.
        :raises PeerLimitExceededError: the event is bigger than the server accepts.
        """
        session = self._session
        if session is None or not session.is_open:
            if self._state.is_final:
                raise self._final_error()
            raise SocketClosedError("not connected (reconnecting): the event was not sent")
        if not session.queue(session.protocol.emit(event, data), key=coalesce):
            outbox = session.outbox.outbox
            logger.warning(
                "socket client %r: event %r not sent: %d bytes wait to be sent",
                self.client_id,
                event,
                outbox.buffered_bytes,
            )
            raise SocketBufferFullError(outbox.buffered_bytes, outbox.max_buffered_bytes)

    def on(
        self,
        event: str,
        handler: Callable[[Any], object],
        *,
        input: Any = Any,
        topic: str | None = None,
    ) -> Callable[[], None]:
        """Call ``handler(data)`` for every event ``event`` from the server.

        ``handler`` is a function or an async function. Handlers run one at a
        time, in the order events arrived and, for one event, in the order they
        were added. Async handlers run in a task of the client's (never in the
        reader, so a slow handler delays the next events, not the connection);
        when an event has only plain-function handlers and no event waits before
        it, they run at once, as the event is read, which saves a task switch
        per event (a plain function blocks the whole Trio loop while it runs,
        wherever it runs). ``data`` is decoded
        into ``input`` (builtins by default); an event whose data does not fit is
        logged and skipped. With ``topic``, only events published to that topic
        are handled; without, every event of that name (direct, room or topic).

        If more than ``event_buffer`` events wait for the handlers, newer ones are
        dropped, logged and counted in :attr:`dropped_events`. A handler that
        raises is logged; the others still run. Returns a function that removes
        the handler.
        """
        listener = _Listener(handler, input, topic)
        listeners = self._listeners.setdefault(event, [])
        listeners.append(listener)

        def remove() -> None:
            if listener in listeners:
                listeners.remove(listener)

        return remove

    def _deliver(self, frame: EventFrame, codec: Codec) -> None:
        if not self._backlog:
            listeners = self._listeners.get(frame.name, ())
            if not any(listener.is_async for listener in listeners):
                for listener in list(listeners):
                    result = self._run_listener(listener, frame, codec)
                    if inspect.isawaitable(result):
                        self._queue(result)
                return
        self._queue((frame, codec))

    def _queue(self, item: _Queued) -> None:
        try:
            self._events_in.send_nowait(item)
        except trio.WouldBlock:
            if not isinstance(item, tuple):
                logger.warning(
                    "socket client %r: what an event handler returned was not awaited: "
                    "the handlers are %d events behind",
                    self.client_id,
                    self._events_in.statistics().current_buffer_used,
                )
                close = getattr(item, "close", None)
                if close is not None:
                    close()
                return
            frame = item[0]
            self.dropped_events += 1
            logger.warning(
                "socket client %r: event %r dropped: the handlers are %d events behind",
                self.client_id,
                frame.name,
                self._events_in.statistics().current_buffer_used,
            )

        else:
            self._backlog += 1

    def _run_listener(self, listener: _Listener, frame: EventFrame, codec: Codec) -> object:
        """Call one handler with the event's data; what it returned (None when
        it raised, was skipped or the data did not fit: all logged)."""
        if listener.topic is not None and listener.topic != frame.topic:
            return None
        try:
            data = codec.decode_data(frame.data, listener.input)
        except PayloadDecodeError as exc:
            logger.warning(
                "socket client %r: event %r skipped by a handler: %s",
                self.client_id,
                frame.name,
                exc,
            )
            return None
        try:
            return contextvars.copy_context().run(listener.handler, data)
        except Exception:
            logger.exception(
                "socket client %r: a handler of event %r raised", self.client_id, frame.name
            )
            return None

    async def _dispatch_events(self) -> None:
        async for item in self._events_out:
            try:
                if isinstance(item, tuple):
                    frame, codec = item
                    for listener in list(self._listeners.get(frame.name, ())):
                        await self._await_handler(
                            self._run_listener(listener, frame, codec), frame.name
                        )
                else:
                    await self._await_handler(item, "(returned by a plain handler)")
            finally:
                self._backlog -= 1

    async def _await_handler(self, result: object, event: str) -> None:
        if not inspect.isawaitable(result):
            return
        try:
            await result
        except Exception:
            logger.exception(
                "socket client %r: a handler of event %r raised", self.client_id, event
            )

    # --- Server requests ----------------------------------------------------------------

    def implement(
        self, name: str, handler: Callable[[Any], object], *, input: Any = Any
    ) -> Callable[[], None]:
        """Answer the server's requests ``name`` with ``handler(data)``.

        ``handler`` is a function or an async function; it gets the request's
        data decoded into ``input`` (builtins by default; data that does not fit
        is answered ``bad_input``) and returns the reply (anything msgspec
        encodes). A plain function is called as the request is read, in the
        client's reader, so it must not block (if it returns an awaitable, that
        is awaited in a task of its own); an async function runs in a task of its
        own per request, so several may run at once.

        Errors: raising :class:`~meshline.SocketError` answers with its code,
        message and details; any other exception is logged and answered
        ``internal`` (no traceback is sent). A request with no implementation is
        answered ``unknown_request``.

        Cancellation: when the server cancels the request (its timeout ran out,
        its caller gave up), or the request's own timeout passes, the task is
        cancelled and the answer is ``cancelled`` (a plain function has answered
        before a cancel can arrive). When the connection drops, the
        handler is cancelled and nothing is sent.

        Returns a function that removes the implementation.

        :raises InvalidArgumentError: ``name`` is already implemented.
        """
        if name in self._implementations:
            raise InvalidArgumentError(f"{name!r} is already implemented")
        implementation = _Implementation(handler, input)
        self._implementations[name] = implementation

        def remove() -> None:
            if self._implementations.get(name) is implementation:
                del self._implementations[name]

        return remove

    # --- Topics --------------------------------------------------------------------------

    async def subscribe(self, topic: str, *, timeout: float | None = None) -> None:
        """Subscribe to ``topic``; returns once the server accepted.

        From then on, events published to the topic reach the ``on`` handlers,
        and the client subscribes again after every reconnect (a refusal then is
        logged and drops the topic). Subscribing to a topic already subscribed
        returns at once. ``timeout`` works as in :meth:`call`.

        :raises CallFailedError: the server refused (usually ``forbidden``).
        :raises SocketTimeoutError, SocketClosedError, ConnectionRejectedError:
            as for :meth:`call`.

        Cancellation (and timeout): the pending subscription is withdrawn.
        """
        limit = self.call_timeout if timeout is None else timeout
        if not limit >= 0:
            raise InvalidArgumentError(f"timeout must be >= 0: {timeout!r}")
        with trio.move_on_after(limit):
            await self._subscribe(topic)
            return
        raise SocketTimeoutError(f"no answer to the subscription to {topic!r} within {limit:g} s")

    async def _subscribe(self, topic: str) -> None:
        if topic in self._topics:
            return
        session = await self._wait_session()
        pending = session.start_subscribe(topic)
        try:
            await pending.done.wait()
        finally:
            if not pending.done.is_set() and topic not in self._topics and session.is_open:
                session.withdraw_subscribe(topic)
        if pending.error is not None:
            raise pending.error
        answer = pending.answer
        if isinstance(answer, SubscribeRefused):
            raise self._call_failed(answer.code, answer.message, answer.details, session.codec)
        self._topics.add(topic)

    def unsubscribe(self, topic: str) -> None:
        """Leave ``topic`` (also withdraws a subscription not yet answered).

        Synchronous: the unsubscribe is queued, and events of the topic still on
        the way are dropped. Leaving a topic not subscribed does nothing.
        """
        self._topics.discard(topic)
        session = self._session
        if session is not None and session.is_open:
            session.withdraw_subscribe(topic)

    def _subscription_ended(self, topic: str) -> None:
        logger.info(
            "socket client %r: the server ended the subscription to %r", self.client_id, topic
        )
        self._topics.discard(topic)

    # --- Room presence -------------------------------------------------------------------

    @property
    def watched_rooms(self) -> frozenset[str]:
        """The rooms whose presence this client watches, and watches again after
        every reconnect."""
        return frozenset(self._watches)

    async def watch(
        self,
        room: str,
        *,
        on_change: Callable[[PresenceChange], object] | None = None,
        timeout: float | None = None,
    ) -> RoomPresence:
        """Watch who is in ``room``; returns its :class:`RoomPresence` once the
        server's state of the room is in.

        The server decides whether this client may (its ``authorize_presence``
        hook; by default, a client may watch the rooms its connection is in).
        From then on the presence follows the room's joins and leaves across the
        cluster, and ``on_change(change)`` (a plain function, called in the
        client's reader, so it must not block; what it raises is logged) hears
        each :class:`PresenceChange`. After a reconnect the client watches the
        room again and the new node's state replaces the old (the change says
        what differs). Watching a room already watched (or being watched by
        another task) returns the same presence once its state is in; the
        first watch's ``on_change`` stays the only one.
        ``timeout`` works as in :meth:`call`.

        :raises CallFailedError: the server refused (``forbidden``), or it does
            not speak room presence (an older server).
        :raises SocketTimeoutError, SocketClosedError, ConnectionRejectedError:
            as for :meth:`call`.

        Cancellation (and timeout): the pending watch is withdrawn.
        """
        limit = self.call_timeout if timeout is None else timeout
        if not limit >= 0:
            raise InvalidArgumentError(f"timeout must be >= 0: {timeout!r}")
        if on_change is not None and not callable(on_change):
            raise InvalidArgumentError(f"on_change must be callable: {on_change!r}")
        with trio.move_on_after(limit):
            while True:
                watch = self._watches.get(room)
                if watch is None:
                    opened = await self._watch(room, on_change)
                    if opened is not None:
                        return opened
                    continue
                presence = watch.presence
                await presence.wait_until(lambda presence: presence.synced or not presence.watching)
                if presence.watching:
                    return presence
                # the other task's watch failed: try our own
        raise SocketTimeoutError(f"no presence of {room!r} within {limit:g} s")

    async def _watch(
        self, room: str, on_change: Callable[[PresenceChange], object] | None
    ) -> RoomPresence | None:
        session = await self._wait_session()
        watch = self._watches.get(room)
        if watch is not None:  # watched by another task meanwhile: wait for it
            return None
        book = PresenceBook(room)
        watch = self._watches[room] = _Watch(book, RoomPresence(book), on_change)
        done = sent = False
        try:
            try:
                pending = session.start_watch(room)
            except LocalProtocolError as exc:  # an older server: nothing was sent
                raise CallFailedError(ErrorCode.UNKNOWN_CALL, str(exc)) from None
            sent = True
            await pending.done.wait()
            if pending.error is not None:
                raise pending.error
            answer = pending.answer
            if isinstance(answer, WatchRefused):
                raise self._call_failed(answer.code, answer.message, answer.details, session.codec)
            await watch.presence.wait_until(lambda presence: presence.synced)
            done = True
            return watch.presence
        finally:
            if not done and self._watches.get(room) is watch:
                del self._watches[room]
                presence_ended(watch.presence)
                if sent and session.is_open:
                    session.withdraw_watch(room)

    def unwatch(self, room: str) -> None:
        """Stop watching ``room`` (also withdraws a watch not yet answered).

        Synchronous: the unwatch is queued, the room's :class:`RoomPresence`
        stops changing, and its waiters wake. Leaving a room not watched does
        nothing.
        """
        watch = self._watches.pop(room, None)
        if watch is None:
            return
        presence_ended(watch.presence)
        session = self._session
        if session is not None and session.is_open:
            session.withdraw_watch(room)

    def _rewatched(self, room: str, watch: _Watch) -> Callable[[Event | None], None]:
        def on_answer(answer: Event | None) -> None:
            if isinstance(answer, WatchRefused) and self._watches.get(room) is watch:
                logger.warning(
                    "socket client %r: watching %r again refused: %s %s",
                    self.client_id,
                    room,
                    answer.code,
                    answer.message,
                )
                del self._watches[room]
                presence_ended(watch.presence)
                session = self._session
                if session is not None and session.is_open:  # the server must stop too
                    session.withdraw_watch(room)

        return on_answer

    def _watch_ended(self, room: str, code: str, session: _Session) -> None:
        """The server ended the watch of ``room`` (``code``: why)."""
        watch = self._watches.pop(room, None)
        if watch is None:
            return
        logger.warning(
            "socket client %r: the server ended the watch of %r (%s)",
            self.client_id,
            room,
            code or "no reason given",
        )
        watch.presence.end_code = code or None
        presence_ended(watch.presence)
        if session.protocol.watch_pending(room):  # a watch again crossed the end
            session.withdraw_watch(room)

    def _presence_frame(
        self, frame: PresenceStateFrame | PresenceDiffFrame, session: _Session
    ) -> None:
        watch = self._watches.get(frame.room)
        if watch is None:
            return
        if isinstance(frame, PresenceStateFrame):
            change: PresenceChange | Applied | None = watch.book.state(frame)
        else:
            change = watch.book.diff(frame)
        if change is Applied.GAP:
            session.start_watch(frame.room, self._rewatched(frame.room, watch))
            return
        if isinstance(frame, PresenceStateFrame) or isinstance(change, PresenceChange):
            presence_changed(watch.presence)
        if isinstance(change, PresenceChange) and watch.on_change is not None:
            try:
                watch.on_change(change)
            except Exception:
                logger.exception(
                    "socket client %r: on_change of room %r raised", self.client_id, frame.room
                )


@attrs.define
class _Watch:
    """A room this client watches."""

    book: PresenceBook
    presence: RoomPresence
    on_change: Callable[[PresenceChange], object] | None


def _checked_token(token: object) -> str:
    """:raises InvalidArgumentError: not a string that fits in an HTTP header."""
    if not isinstance(token, str):
        raise InvalidArgumentError(f"auth must give a string token, not {type(token).__name__}")
    if not token or not token.isprintable() or not token.isascii():
        raise InvalidArgumentError("an auth token must be printable ASCII, and not empty")
    return token


def _header_list(headers: Mapping[str, str] | None) -> list[tuple[bytes, bytes]]:
    result = []
    for name, value in (headers or {}).items():
        try:
            result.append((name.encode("latin-1"), value.encode("latin-1")))
        except UnicodeEncodeError:
            raise InvalidArgumentError(f"header {name!r} is not latin-1") from None
    return result


@asynccontextmanager
async def open_socket_client(
    url_or_urls: str | Sequence[str],
    *,
    client_id: str,
    auth: str | Callable[[], str | Awaitable[str]] | None = None,
    headers: Mapping[str, str] | None = None,
    query: Mapping[str, str] | None = None,
    encoding: Literal["msgpack", "json"] = "msgpack",
    ssl_context: ssl.SSLContext | None = None,
    connect_timeout: float = 10.0,
    call_timeout: float = 30.0,
    reconnect: ReconnectOptions | None = ReconnectOptions(),  # noqa: B008 (immutable)
    heartbeat_grace: float | None = None,
    on_reconnect: Callable[[SocketClient], object] | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
    event_buffer: int = DEFAULT_EVENT_BUFFER,
    open_stream: StreamOpener | None = None,
) -> AsyncIterator[SocketClient]:
    """Connect to a meshline socket server, for the duration of the block.

    :param url_or_urls: ``ws://`` or ``wss://`` URL, or several (the nodes of one
        service): each attempt takes the next one, round robin.
    :param client_id: this client's stable id, sent in every hello (any string).
    :param auth: a token sent as ``Authorization: Bearer <token>`` with every
        upgrade request, or a function (plain or async) that returns one: it is
        called before every connection attempt, so a reconnect presents a fresh
        token. If it raises, that attempt fails (:class:`SocketConnectError`; a
        reconnect is retried with backoff).
    :param headers: HTTP headers for the upgrade request, which the server's
        ``authenticate`` hook sees (not ``Authorization`` together with ``auth``).
    :param query: query parameters added to the URL.
    :param encoding: ``"msgpack"`` (binary frames, the default) or ``"json"``.
    :param ssl_context: for ``wss://`` URLs (the system's default context otherwise).
    :param connect_timeout: seconds each attempt may take, from the TCP connect to
        the server's welcome.
    :param call_timeout: the default timeout of :meth:`SocketClient.call` and
        :meth:`SocketClient.subscribe`.
    :param reconnect: the backoff (:class:`ReconnectOptions`: full jitter, 0.5 s
        base, 30 s cap, factor 2), or None never to reconnect.
    :param heartbeat_grace: extra seconds of silence tolerated beyond the
        server's ``interval * (max_missed + 1)`` before the server is declared
        dead (None: none).
    :param on_reconnect: called with the client (function or async function)
        after each reconnect, not after the first connect: to restore state that
        the server does not (rooms are the server's to rejoin; topics are
        subscribed again by the client itself). It runs in the connection's
        task group; an exception is logged.
    :param max_message_size: the largest message accepted from the server, in bytes
        (told to the server in the hello); bigger ones close the connection
        (1009, terminal).
    :param max_buffered_bytes: how much may wait to be sent before
        :meth:`SocketClient.emit` raises :class:`SocketBufferFullError` (calls wait).
    :param event_buffer: how many events may wait for the ``on`` handlers.
    :param open_stream: opens the byte stream for a URL instead of TCP/TLS (the URL
        still gives the Host header, path and query): memory streams, say.

    **First connect.** Entering the block makes one attempt per URL, each within
    ``connect_timeout``, and raises if none succeeds: the first connect is not
    retried with backoff, so a wrong URL or wrong credentials show at once
    (wrap the block in a loop of your own to wait for a server that is starting).

    :raises ConnectionRejectedError: the server refused the upgrade (401 or 403
        from its ``authenticate`` hook, 500 when that hook failed).
    :raises SocketConnectError: no URL could be reached, or the handshake failed
        (:class:`SocketConnectTimeoutError` past ``connect_timeout``).

    **Reconnects.** When the connection ends with a reconnect-band close code
    (going away, restart, slow reader, server error, missed heartbeat, lost), the
    client moves to ``RECONNECTING``: calls in flight fail at once with
    :class:`~meshline.SocketClosedError`; new calls wait for the next connection
    within their timeout; emits raise. It retries with backoff until it connects
    (``CONNECTED`` again: topics re-subscribed, then ``on_reconnect``). It stops
    for good (``FAILED``: everything raises) on a terminal-band close code
    (kicked, superseded, forbidden, protocol violation), on a 401 or 403 refusal,
    or when ``max_attempts`` ran out. Leaving the block while failed does not
    raise: watch :meth:`SocketClient.state_changes`.

    **Leaving the block** closes the connection normally (1000) after flushing
    what was queued, within :data:`CLOSE_TIMEOUT` seconds for the flush and as
    much for the closing handshake (also when the block is cancelled), fails
    pending calls with :class:`~meshline.SocketClosedError`, and cancels the
    client's tasks (handlers included).
    """
    urls = [url_or_urls] if isinstance(url_or_urls, str) else list(url_or_urls)
    if not urls:
        raise InvalidArgumentError("open_socket_client needs at least one URL")
    codecs = {"msgpack": MSGPACK, "json": JSON}
    if encoding not in codecs:
        raise InvalidArgumentError(f"encoding must be 'msgpack' or 'json': {encoding!r}")
    for name, value in (("connect_timeout", connect_timeout), ("call_timeout", call_timeout)):
        if not value > 0:
            raise InvalidArgumentError(f"{name} must be > 0: {value!r}")
    grace = 0.0 if heartbeat_grace is None else heartbeat_grace
    if not (math.isfinite(grace) and grace >= 0):
        raise InvalidArgumentError(f"heartbeat_grace must be >= 0: {heartbeat_grace!r}")
    for name, count in (
        ("max_message_size", max_message_size),
        ("max_buffered_bytes", max_buffered_bytes),
        ("event_buffer", event_buffer),
    ):
        if count < 1:
            raise InvalidArgumentError(f"{name} must be at least 1: {count!r}")
    if auth is not None:
        if isinstance(auth, str):
            _checked_token(auth)
        elif not callable(auth):
            raise InvalidArgumentError(f"auth must be a token or a function: {auth!r}")
        if any(name.lower() == "authorization" for name in headers or {}):
            raise InvalidArgumentError("give auth or an Authorization header, not both")
    targets = [_Target.parse(url, query, ssl_context, open_stream) for url in urls]
    client = SocketClient(
        targets,
        client_id=client_id,
        headers=_header_list(headers),
        auth=auth,
        codec=codecs[encoding],
        connect_timeout=connect_timeout,
        call_timeout=call_timeout,
        reconnect=reconnect,
        heartbeat_grace=grace,
        on_reconnect=on_reconnect,
        max_message_size=max_message_size,
        max_buffered_bytes=max_buffered_bytes,
        event_buffer=event_buffer,
    )
    with single_exceptions():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._dispatch_events)
            nursery.start_soon(client._keep_timers)
            await nursery.start(client._supervise)
            try:
                yield client
            finally:
                session = client._begin_close()
                if session is not None:
                    with trio.move_on_after(2 * CLOSE_TIMEOUT + 1, shield=True):
                        await session.closed.wait()
                nursery.cancel_scope.cancel()
