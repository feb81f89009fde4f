"""Mesh nodes: identity, liveness, membership, the leader lease, requests, broadcast.

Everything a node keeps in the mesh's KV bucket:

* ``ids``: the last node id handed out. Ids come from compare-and-set increments of
  this counter, so an id is never handed out twice, even across crashes.
* ``nodes.<id>``: one liveness key per node, written with a TTL and refreshed by the
  heartbeat. Its value records the node's TTL, so observers know its deadline.
* ``leader``: the leader lease, held by compare-and-set and refreshed like a
  liveness key.

Subjects: ``ml.<key>.n.<id>`` carries requests (and cancellations) to one node;
``ml.<key>.b`` carries broadcasts. ``<key>`` is the encoded mesh key.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any, Self, TypeVar, overload

import msgspec
import trio

from .._errors import (
    InvalidArgumentError,
    KeyExistsError,
    KVConflictError,
    MeshRequestTimeoutError,
    NodeClosedError,
    NodeNotAliveError,
    NoHandlerError,
    NoRespondersError,
    PayloadError,
    PayloadTooLargeError,
    RemoteHandlerError,
    RequestAbandonedError,
    RequestTimeoutError,
    RevisionMismatchError,
    TransportClosedError,
    TransportError,
)
from .._transport._buffer import DEFAULT_BUFFER, MessageBuffer, Overflow
from .._transport._names import encode_bounded_token, encode_token
from .._transport._seam import (
    ConnectionEvent,
    ConnectionEventKind,
    KeyValue,
    Message,
    Subscription,
    Transport,
    check_timeout,
)
from .._util import single_exceptions
from ._declarations import BroadcastType, RequestType, resolve_name
from ._membership import (
    LEADER_KEY,
    MembershipEvent,
    MembershipEventKind,
    MembershipView,
    node_key,
)
from ._wire import (
    BroadcastFrame,
    CancelFrame,
    ErrorReply,
    FailureKind,
    LeaderRecord,
    NodeFrame,
    NodeRecord,
    OkReply,
    Reply,
    decode_payload,
    encode,
    encode_broadcast,
    encode_ok_reply,
    encode_payload,
    encode_request,
)

__all__ = ["DEFAULT_REQUEST_TIMEOUT", "DEFAULT_TTL", "Node", "open_node"]

logger = logging.getLogger("meshline.node")

DEFAULT_TTL = 2
"""Seconds without a refresh after which a node counts as dead (and the lease lapses)."""

DEFAULT_REQUEST_TIMEOUT = 5.0
"""Seconds a node request waits for its answer unless told otherwise."""

_IDS_KEY = "ids"
_SWEEP_INTERVAL = 0.25
"""Seconds between checks for request handlers that outlived their timeout."""
_LEASE_SAFETY = 0.9
"""A leader stops acting as one after this fraction of its TTL without a refresh,
before any other node may take the lease over. A node whose heartbeats stopped
landing for this fraction of its TTL assumes it may have been declared dead."""
_WATCH_RETRY = 0.5
"""Seconds between attempts to reopen a failed membership watch, at most."""

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")
DataT = TypeVar("DataT")

RequestHandler = Callable[[Any, int], Awaitable[Any]]
BroadcastHandler = Callable[[Any, int], Awaitable[None] | None]
MembershipHandler = Callable[[MembershipEvent], Awaitable[None] | None]

_frame_decoder = msgspec.msgpack.Decoder(NodeFrame)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_generic_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder()
_broadcast_decoder = msgspec.msgpack.Decoder(BroadcastFrame)
_int_decoder = msgspec.msgpack.Decoder(int)


def mesh_names(key: str, namespace: str = "") -> tuple[str, str]:
    """The KV bucket and the subject prefix of the mesh called ``key``.

    Layers built on nodes (the client service) pass a ``namespace`` of lowercase
    letters, so their meshes never share names with a plain node's mesh: encoded
    keys always start with ``b`` or ``h`` followed by base64, never with a
    namespace and a separator.
    """
    token = encode_token(key, "mesh key")
    if namespace:
        bucket = f"ml-{namespace}-" + encode_bounded_token(key, 60 - len(namespace), "mesh key")
        return bucket, f"ml.{namespace}.{token}"
    return "ml-" + encode_bounded_token(key, 61, "mesh key"), f"ml.{token}"


_NO_HANDLER_REPLY = encode(ErrorReply(FailureKind.NO_HANDLER, "", ""))


class _Worker:
    """A request worker: the cancel scope it runs handlers in, and what it runs now."""

    __slots__ = ("expires_after_sweep", "request", "scope")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.request: tuple[int, int] | None = None
        self.expires_after_sweep = 0

    def cancel(self) -> None:
        """Cancel the handler running now (a no-op between requests)."""
        if self.request is not None:
            self.scope.cancel()


class _Handler:
    __slots__ = ("data_type", "function", "is_async")

    def __init__(self, function: Callable[..., Any], data_type: Any) -> None:
        self.function = function
        self.data_type = data_type
        self.is_async = inspect.iscoroutinefunction(function)
        """Known coroutine functions are awaited directly; anything else goes
        through ``_call``, which also copes with plain functions."""


def _qualified_name(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


async def _call(function: Callable[..., Any], *args: Any) -> Any:
    """Call a handler that may be a plain function or a coroutine function."""
    result = function(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


class MembershipEvents:
    """Membership events as they happen; iterate with ``async for``.

    Iteration ends when the node closes. See :meth:`Node.membership_events`.
    """

    def __init__(self, buffer: MessageBuffer[MembershipEvent]) -> None:
        self._buffer = buffer

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> MembershipEvent:
        return await self._buffer.receive()

    async def receive(self) -> MembershipEvent:
        """Return the next event.

        :raises trio.EndOfChannel: the node closed and every event was read.
        :raises SubscriptionOverflowError: the consumer fell ``limit`` events behind.
        """
        try:
            return await self._buffer.receive()
        except StopAsyncIteration:
            raise trio.EndOfChannel from None


class Node:
    """One member of a mesh. Create it with :func:`open_node`; it lives in that block.

    A node has a unique integer :attr:`id`, proves it is alive through a liveness key
    with a TTL, keeps a view of the other alive nodes, competes for the mesh's leader
    lease, answers requests addressed to it, and hears the mesh's broadcasts.
    """

    def __init__(
        self,
        transport: Transport,
        key: str,
        *,
        ttl: int,
        heartbeat_interval: float,
        can_lead: bool,
        max_concurrent_handlers: int,
        buffer: int,
        namespace: str = "",
    ) -> None:
        self._buffer = buffer
        self._transport = transport
        self._key = key
        self._namespace = namespace
        self._bucket, self._prefix = mesh_names(key, namespace)
        self._broadcast_subject = f"{self._prefix}.b"
        self._ttl = ttl
        self._heartbeat_interval = heartbeat_interval
        self._can_lead = can_lead
        self._max_handlers = max_concurrent_handlers
        self._id = 0
        self._kv: KeyValue
        self._nursery: trio.Nursery
        self._closed = False
        self._started_at_ms = int(time.time() * 1000)
        self._liveness_revision = 0
        self._view = MembershipView()
        self._view_changed = trio.Event()
        self._leader_changed = trio.Event()
        self._lease_revision: int | None = None
        self._handlers: dict[str, _Handler] = {}
        self._broadcast_handlers: dict[str, list[_Handler]] = {}
        self._membership_handlers: list[MembershipHandler] = []
        self._membership_queue: MessageBuffer[MembershipEvent] = MessageBuffer(
            10_000, Overflow.DROP_OLDEST, "membership handlers"
        )
        self._joined = False
        self._membership_buffers: set[MessageBuffer[MembershipEvent]] = set()
        self._leader_duties: list[Callable[[], Awaitable[None]]] = []
        self._duty_scopes: dict[Callable[[], Awaitable[None]], trio.CancelScope] = {}
        self._term_nursery: trio.Nursery | None = None
        self._lease_valid_until = -math.inf
        self._incarnation = 1
        self._beat_now = trio.Event()
        self._watch_scope: trio.CancelScope | None = None
        self._remove_connection_listener: Callable[[], None] | None = None
        self.watch_failures = 0
        """How many times the membership watch failed and had to be reopened."""
        self.reply_failures = 0
        """Answers this node could not send (too large, or the transport failed)."""
        self._request_ids = itertools.count(1)
        self._running: dict[tuple[int, int], _Worker] = {}
        self._workers = 0
        self._idle_workers = 0
        self._sweeps = 0
        self._node_subjects: dict[int, str] = {}
        self._subscriptions: list[Subscription] = []
        self.unhandled_broadcasts = 0
        """Broadcasts that arrived for a type with no handler here."""

    # ------------------------------------------------------------------ properties

    @property
    def id(self) -> int:
        """This node's id: unique within the mesh key, never reused."""
        return self._id

    @property
    def key(self) -> str:
        """The mesh key this node joined."""
        return self._key

    @property
    def ttl(self) -> int:
        """Seconds without a heartbeat after which others count this node as dead."""
        return self._ttl

    @property
    def transport(self) -> Transport:
        """The transport this node talks through."""
        return self._transport

    @property
    def namespace(self) -> str:
        """The layer namespace of this node's mesh ("" for a plain node)."""
        return self._namespace

    @property
    def incarnation(self) -> int:
        """Grows by one each time this node re-asserts its liveness after a gap in
        which others may have declared it dead. State written for an older
        incarnation may be cleaned up by the leader; state of the current one is not."""
        return self._incarnation

    def incarnation_of(self, node_id: int) -> int | None:
        """The incarnation this node last saw from ``node_id``, alive or dead."""
        if node_id == self._id:
            return self._incarnation
        return self._view.incarnation_of(node_id)

    @property
    def view_is_trustworthy(self) -> bool:
        """Whether this node's view may declare other nodes dead right now.

        It may not while the transport is disconnected, while this node's own
        heartbeats are not coming back through its watch, and for ``ttl`` seconds
        after a reconnect (so every node gets the chance to re-assert first).
        """
        return self._view.is_trustworthy(trio.current_time())

    async def wait_for_trustworthy_view(self) -> None:
        """Return once :attr:`view_is_trustworthy` holds. Cancellable."""
        while not self._view.is_trustworthy(trio.current_time()):
            changed = self._view_changed
            with trio.move_on_after(self._heartbeat_interval):
                await changed.wait()

    @property
    def dropped(self) -> int:
        """Requests and broadcasts discarded so far because their buffer was full."""
        return sum(subscription.dropped for subscription in self._subscriptions)

    @property
    def is_leader(self) -> bool:
        """Whether this node holds the leader lease right now.

        This is the node's own, conservative judgement: it turns False before the
        lease could pass to another node, so two nodes never both see True at once
        (given clocks that run at the same rate), even while refreshes are failing.
        """
        return self._term_nursery is not None and trio.current_time() < self._lease_valid_until

    @property
    def leader_id(self) -> int | None:
        """The lease holder according to this node's view, or None while vacant."""
        return self._view.leader_id

    def alive_nodes(self) -> frozenset[int]:
        """The ids of the nodes this node currently sees as alive, itself included."""
        return self._view.alive

    def is_alive(self, node_id: int) -> bool:
        """Whether ``node_id`` is in this node's view of the alive nodes."""
        return self._view.is_alive(node_id)

    def _check_open(self) -> None:
        if self._closed:
            raise NodeClosedError(f"node {self._id} of mesh {self._key!r} is closed")

    # ------------------------------------------------------------------ handlers

    @overload
    def register_handler(
        self,
        kind: RequestType[RequestT, ResponseT],
        handler: Callable[[RequestT, int], Awaitable[ResponseT]],
    ) -> Callable[[], None]: ...

    @overload
    def register_handler(
        self, kind: str, handler: Callable[[Any, int], Awaitable[Any]]
    ) -> Callable[[], None]: ...

    def register_handler(
        self, kind: str | RequestType[Any, Any], handler: RequestHandler
    ) -> Callable[[], None]:
        """Answer requests of type ``kind`` with ``handler(data, sender_node_id)``.

        The handler runs in its own task in the node's nursery. What it returns is
        sent back; if it raises, the requester gets :class:`RemoteHandlerError`. It is
        cancelled when the requester gives up (cancellation or timeout) and when the
        node closes. Returns a function that removes the handler.

        :raises InvalidArgumentError: a handler for ``kind`` is already registered.
        """
        name = resolve_name(kind)
        if name in self._handlers:
            raise InvalidArgumentError(f"a handler for request type {name!r} is already registered")
        data_type = kind.request if isinstance(kind, RequestType) else Any
        entry = _Handler(handler, data_type)
        self._handlers[name] = entry

        def unregister() -> None:
            if self._handlers.get(name) is entry:
                del self._handlers[name]

        return unregister

    @overload
    def register_broadcast_handler(
        self,
        kind: BroadcastType[DataT],
        handler: Callable[[DataT, int], Awaitable[None] | None],
    ) -> Callable[[], None]: ...

    @overload
    def register_broadcast_handler(
        self, kind: str, handler: Callable[[Any, int], Awaitable[None] | None]
    ) -> Callable[[], None]: ...

    def register_broadcast_handler(
        self, kind: str | BroadcastType[Any], handler: BroadcastHandler
    ) -> Callable[[], None]:
        """Call ``handler(data, sender_node_id)`` for every broadcast of type ``kind``.

        Several handlers may share a type. Broadcasts are handled one at a time, in
        the order they arrive, in one task of the node: a slow handler delays the
        rest, so hand long work to a task of your own. An exception from a handler
        is logged and does not stop later deliveries. Returns a function that removes
        the handler.
        """
        name = resolve_name(kind)
        data_type = kind.data if isinstance(kind, BroadcastType) else Any
        entry = _Handler(handler, data_type)
        self._broadcast_handlers.setdefault(name, []).append(entry)

        def unregister() -> None:
            handlers = self._broadcast_handlers.get(name, [])
            if entry in handlers:
                handlers.remove(entry)

        return unregister

    def add_membership_handler(self, handler: MembershipHandler) -> Callable[[], None]:
        """Call ``handler(event)`` for every :class:`MembershipEvent`, in order.

        Handlers run one at a time in a task of the node; an exception is logged.
        Returns a function that removes the handler.
        """
        self._membership_handlers.append(handler)

        def remove() -> None:
            if handler in self._membership_handlers:
                self._membership_handlers.remove(handler)

        return remove

    @asynccontextmanager
    async def membership_events(self, *, limit: int = 1000) -> AsyncIterator[MembershipEvents]:
        """Iterate membership events from now on, for the duration of the block.

        .. code-block:: python

            async with node.membership_events() as events:
                async for event in events:
                    ...

        Iteration ends when the node closes. A consumer that falls more than
        ``limit`` events behind gets :class:`SubscriptionOverflowError` after the
        buffered ones; :meth:`alive_nodes` always has the current picture.
        """
        self._check_open()
        buffer: MessageBuffer[MembershipEvent] = MessageBuffer(
            limit, Overflow.ERROR, "membership events"
        )
        self._membership_buffers.add(buffer)
        try:
            yield MembershipEvents(buffer)
        finally:
            self._membership_buffers.discard(buffer)
            buffer.close()

    def add_leader_duty(self, duty: Callable[[], Awaitable[None]]) -> Callable[[], None]:
        """Run ``await duty()`` whenever this node becomes the leader.

        The duty runs in a nursery that lives as long as this node's leadership term:
        it is cancelled when the lease is lost or the node closes, and started again
        in the next term. If the node leads already, the duty starts at once. An
        exception from a duty is logged, and the duty starts again after one
        heartbeat interval. Returns a function that removes the duty and cancels it
        if it is running.
        """
        self._leader_duties.append(duty)
        if self._term_nursery is not None:
            self._term_nursery.start_soon(self._run_duty, duty)

        def remove() -> None:
            if duty in self._leader_duties:
                self._leader_duties.remove(duty)
            scope = self._duty_scopes.pop(duty, None)
            if scope is not None:
                scope.cancel()

        return remove

    # ------------------------------------------------------------------ requests

    @overload
    async def request(
        self,
        node_id: int,
        kind: RequestType[RequestT, ResponseT],
        data: RequestT,
        *,
        timeout: float = ...,
    ) -> ResponseT: ...

    @overload
    async def request(self, node_id: int, kind: str, data: Any, *, timeout: float = ...) -> Any: ...

    async def request(
        self,
        node_id: int,
        kind: str | RequestType[Any, Any],
        data: Any,
        *,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> Any:
        """Run the handler for ``kind`` on node ``node_id`` and return its answer.

        A request to this node itself calls the handler directly, without the
        network; the data still goes through encoding and decoding, so handlers see
        the same values either way.

        If the caller is cancelled, the request is abandoned at once and the handler
        on the target is cancelled too (a cancellation message follows the request).
        The handler is given the caller's effective deadline: ``timeout``, or less if
        an enclosing cancel scope ends sooner.

        :raises NodeNotAliveError: the target is not alive in this node's view; raised
            at once, or as soon as the target is declared dead mid-request.
        :raises NoHandlerError: the target has no handler for ``kind``.
        :raises RemoteHandlerError: the handler raised.
        :raises MeshRequestTimeoutError: no answer within ``timeout`` seconds.
        :raises PayloadError: ``data`` cannot be encoded, the target could not decode
            it as the declared type, or the answer does not decode as declared.
        :raises PayloadTooLargeError: the handler's answer was too large to send.
        :raises NodeClosedError: this node is closed.
        """
        if self._closed:
            self._check_open()
        if kind.__class__ is str:
            name, response_type = resolve_name(kind), Any
        else:
            name = resolve_name(kind)
            response_type = kind.response if isinstance(kind, RequestType) else Any
        if node_id == self._id:
            return await self._request_self(name, data, response_type, timeout)
        if not self._view.is_alive(node_id):
            raise NodeNotAliveError(node_id)
        check_timeout(timeout)
        handler_timeout = timeout
        deadline = trio.current_effective_deadline()
        if deadline != math.inf:
            handler_timeout = max(min(timeout, deadline - trio.current_time()), 0.001)
        request_id = next(self._request_ids)
        try:
            frame = encode_request(request_id, self._id, name, handler_timeout, data)
        except (TypeError, ValueError, OverflowError) as exc:
            raise PayloadError(f"cannot encode data for {name!r}: {exc}") from exc
        subject = self._node_subject(node_id)
        try:
            reply = await self._transport._request_trusted(subject, frame, timeout)
        except RequestTimeoutError:
            await self._send_cancel(subject, request_id)
            raise MeshRequestTimeoutError(node_id, name, timeout) from None
        except (NoRespondersError, RequestAbandonedError):
            await self._send_cancel(subject, request_id)
            raise NodeNotAliveError(node_id) from None
        except trio.Cancelled:
            await self._send_cancel(subject, request_id)
            raise
        return self._read_reply(node_id, name, reply, response_type)

    async def _send_cancel(self, subject: str, request_id: int) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self._transport.publish(subject, encode(CancelFrame(request_id, self._id)))
            except TransportError:
                logger.debug("could not send cancellation of request %d", request_id)

    def _read_reply(self, node_id: int, name: str, reply: Message, response_type: Any) -> Any:
        if response_type is Any:  # the common untyped case: decode in one pass
            try:
                decoded = _generic_decoder.decode(reply.data)
            except msgspec.MsgspecError:
                decoded = None
            if decoded.__class__ is list and len(decoded) == 2 and decoded[0] == 0:
                return decoded[1]
        try:
            answer = _reply_decoder.decode(reply.data)
        except msgspec.MsgspecError as exc:
            raise PayloadError(f"malformed reply from node {node_id}: {exc}") from None
        if isinstance(answer, OkReply):
            try:
                return decode_payload(answer.data, response_type)
            except msgspec.MsgspecError as exc:
                raise PayloadError(f"answer to {name!r} from node {node_id}: {exc}") from None
        if answer.kind is FailureKind.NO_HANDLER:
            raise NoHandlerError(node_id, name)
        if answer.kind is FailureKind.BAD_PAYLOAD:
            raise PayloadError(f"node {node_id} could not decode {name!r}: {answer.message}")
        if answer.kind is FailureKind.REPLY_TOO_LARGE:
            raise PayloadTooLargeError(
                f"the answer of node {node_id} to {name!r}: {answer.message}"
            )
        raise RemoteHandlerError(node_id, name, answer.error_type, answer.message)

    def _node_subject(self, node_id: int) -> str:
        subject = self._node_subjects.get(node_id)
        if subject is None:
            subject = self._node_subjects[node_id] = f"{self._prefix}.n.{node_id}"
        return subject

    async def _request_self(self, name: str, data: Any, response_type: Any, timeout: float) -> Any:
        check_timeout(timeout)
        try:
            payload = encode_payload(data)
        except (TypeError, ValueError, OverflowError) as exc:
            raise PayloadError(f"cannot encode data for {name!r}: {exc}") from exc
        handler = self._handlers.get(name)
        if handler is None:
            raise NoHandlerError(self._id, name)
        try:
            data = decode_payload(payload, handler.data_type)
        except msgspec.MsgspecError as exc:
            raise PayloadError(f"node {self._id} could not decode {name!r}: {exc}") from None
        with trio.move_on_after(timeout) as scope:
            try:
                result = await handler.function(data, self._id)
            except Exception as exc:
                raise RemoteHandlerError(self._id, name, _qualified_name(exc), str(exc)) from exc
        if scope.cancelled_caught:
            raise MeshRequestTimeoutError(self._id, name, timeout)
        try:
            return decode_payload(encode_payload(result), response_type)
        except (TypeError, ValueError, OverflowError) as exc:
            raise RemoteHandlerError(self._id, name, _qualified_name(exc), str(exc)) from exc

    # ------------------------------------------------------------------ broadcast

    @overload
    async def broadcast(
        self, kind: BroadcastType[DataT], data: DataT, *, skip_self: bool = False
    ) -> None: ...

    @overload
    async def broadcast(self, kind: str, data: Any, *, skip_self: bool = False) -> None: ...

    async def broadcast(
        self, kind: str | BroadcastType[Any], data: Any, *, skip_self: bool = False
    ) -> None:
        """Deliver ``data`` to the broadcast handlers for ``kind`` on every node.

        This node's handlers get it too, unless ``skip_self`` is true. Delivery is
        at most once per node (NATS core), in order per sender. Cancellation before
        this returns means the broadcast was not sent.

        :raises PayloadError: ``data`` cannot be encoded.
        :raises NodeClosedError: this node is closed.
        """
        if self._closed:
            self._check_open()
        name = resolve_name(kind)
        try:
            frame = encode_broadcast(self._id, name, bool(skip_self), data)
        except (TypeError, ValueError, OverflowError) as exc:
            raise PayloadError(f"cannot encode data for broadcast {name!r}: {exc}") from exc
        await self._transport._publish_trusted(self._broadcast_subject, frame)

    # ------------------------------------------------------------------ lifecycle

    async def _start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._kv = await self._transport.key_value(self._bucket)
        self._id = await self._allocate_id()
        inbox = await self._transport.open_subscription(
            self._node_subject(self._id), limit=self._buffer
        )
        self._subscriptions.append(inbox)
        broadcasts = await self._transport.open_subscription(
            self._broadcast_subject, limit=self._buffer
        )
        self._subscriptions.append(broadcasts)
        self._liveness_revision = await self._kv.put(
            node_key(self._id), self._liveness_record(), ttl=self._ttl
        )
        self._joined = True
        self._view.own_id = self._id
        self._remove_connection_listener = self._transport.add_connection_listener(
            self._on_connection_event
        )
        await nursery.start(self._watch_loop)
        nursery.start_soon(self._expiry_loop)
        nursery.start_soon(self._heartbeat_loop)
        nursery.start_soon(self._sweep_handlers)
        nursery.start_soon(self._serve_requests, inbox)
        nursery.start_soon(self._serve_broadcasts, broadcasts)
        if self._can_lead:
            await nursery.start(self._leader_loop)

    def _liveness_record(self, incarnation: int | None = None) -> bytes:
        incarnation = self._incarnation if incarnation is None else incarnation
        return encode(NodeRecord(self._id, self._ttl, self._started_at_ms, incarnation))

    def _on_connection_event(self, event: ConnectionEvent) -> None:
        """React to the transport losing or regaining its connection.

        While disconnected the view is stale and declares nobody dead. On reconnect,
        the watch is reopened (a watch from before may stay silent), the heartbeat
        runs at once, and the view holds for ``ttl`` so every node can re-assert.
        """
        if event.kind is ConnectionEventKind.DISCONNECTED:
            logger.warning("node %d: connection lost; the view is stale", self._id)
            self._view.disconnected()
        elif event.kind is ConnectionEventKind.RECONNECTED:
            logger.info(
                "node %d: reconnected; reopening the watch, holding %d s", self._id, self._ttl
            )
            self._view.reconnected(trio.current_time(), self._ttl)
            if self._watch_scope is not None:
                self._watch_scope.cancel()
            self._beat_now.set()
        else:
            return
        self._observe([])

    async def _allocate_id(self) -> int:
        while True:
            entry = await self._kv.get(_IDS_KEY)
            if entry is None:
                floor = 0
                for key in await self._kv.keys():
                    digits = key.removeprefix("nodes.")
                    if key.startswith("nodes.") and digits.isdigit():
                        floor = max(floor, int(digits))
                try:
                    await self._kv.create(_IDS_KEY, encode(floor + 1))
                except KeyExistsError:
                    continue
                return floor + 1
            node_id = _int_decoder.decode(entry.value) + 1
            try:
                await self._kv.update(_IDS_KEY, encode(node_id), revision=entry.revision)
            except RevisionMismatchError:
                continue
            return node_id

    async def _shutdown(self) -> None:
        """Stop serving, then withdraw from the mesh."""
        self._closed = True
        if self._remove_connection_listener is not None:
            self._remove_connection_listener()
        for buffer in self._membership_buffers:
            buffer.close()
        self._membership_queue.close()
        for subscription in self._subscriptions:
            await subscription.aclose()
        if self._joined:
            await self._withdraw()

    async def _withdraw(self) -> None:
        """Release the lease and remove the liveness key, so others see us leave now.

        A crash skips this, and the others notice through the TTL instead.
        """
        # A conflict means the lease or the key moved on already; a transport error
        # leaves the TTL to remove them.
        with suppress(KVConflictError, TransportError):
            if self._lease_revision is not None:
                await self._kv.delete(LEADER_KEY, revision=self._lease_revision)
        with suppress(KVConflictError, TransportError):
            await self._kv.delete(node_key(self._id), revision=self._liveness_revision)

    # ------------------------------------------------------------------ background tasks

    def _publish_events(self, events: list[MembershipEvent]) -> None:
        for event in events:
            if event.kind is MembershipEventKind.DOWN and event.node_id is not None:
                self._transport.abandon_requests(self._node_subject(event.node_id))
            for buffer in self._membership_buffers:
                buffer.push(event)
            if self._membership_handlers:
                self._membership_queue.push(event)

    async def _watch_loop(self, task_status: trio.TaskStatus[None]) -> None:
        """Feed the view from a KV watch; reopen it after any failure or reconnect.

        A failed watch is logged, counted in :attr:`watch_failures` and reopened;
        only a closed transport ends this task. The fresh snapshot replaces the view.
        """
        self._nursery.start_soon(self._run_membership_handlers)
        started = False
        while True:
            with trio.CancelScope() as scope:
                self._watch_scope = scope
                try:
                    async with self._kv.watch() as watch:
                        self._observe(self._view.load(watch.snapshot, trio.current_time()))
                        self._signal_lease_change()
                        if not started:
                            started = True
                            task_status.started()
                        async for entry in watch:
                            self._observe(self._view.apply(entry, trio.current_time()))
                            if entry.key == LEADER_KEY:
                                self._signal_lease_change()
                    raise TransportError("the watch ended")
                except TransportClosedError:
                    raise
                except Exception as exc:
                    if not started:
                        raise
                    self.watch_failures += 1
                    logger.warning(
                        "node %d: membership watch failed (%s: %s); reopening",
                        self._id,
                        type(exc).__name__,
                        exc,
                    )
                    await trio.sleep(_WATCH_RETRY)
            self._watch_scope = None

    def _signal_lease_change(self) -> None:
        self._leader_changed.set()
        self._leader_changed = trio.Event()

    def _observe(self, events: list[MembershipEvent]) -> None:
        self._view_changed.set()
        self._view_changed = trio.Event()
        self._publish_events(events)

    async def _expiry_loop(self) -> None:
        while True:
            changed = self._view_changed
            with trio.move_on_at(self._view.next_deadline(trio.current_time())):
                await changed.wait()
            self._publish_events(self._view.expire(trio.current_time()))

    async def _run_membership_handlers(self) -> None:
        while True:
            try:
                event = await self._membership_queue.receive()
            except StopAsyncIteration:
                return
            for handler in list(self._membership_handlers):
                try:
                    await _call(handler, event)
                except Exception:
                    logger.exception("membership handler %r failed", handler)

    async def _heartbeat_loop(self) -> None:
        """Refresh the liveness key every interval, and at once after a reconnect.

        No failure ends this task but a closed transport: a failed refresh is
        logged and retried on the next beat. When no refresh has landed for most of
        the TTL (a stall, or an outage), others may have declared this node dead, so
        the next one re-asserts it under a new incarnation.
        """
        key = node_key(self._id)
        last_landed = trio.current_time()
        while True:
            beat_now = self._beat_now
            with trio.move_on_after(self._heartbeat_interval):
                await beat_now.wait()
            if beat_now.is_set():
                self._beat_now = trio.Event()
            sent_at = trio.current_time()
            gap = sent_at - last_landed
            try:
                with trio.fail_after(self._ttl):
                    if gap >= self._ttl * _LEASE_SAFETY:
                        await self._reassert(f"no heartbeat landed for {gap:.2f} s")
                    else:
                        try:
                            self._liveness_revision = await self._kv.update(
                                key,
                                self._liveness_record(),
                                revision=self._liveness_revision,
                                ttl=self._ttl,
                            )
                        except RevisionMismatchError:
                            await self._reassert("the liveness key was gone")
                last_landed = sent_at
            except TransportClosedError:
                raise
            except (TransportError, trio.TooSlowError) as exc:
                logger.warning(
                    "node %d: heartbeat failed (%s: %s); retrying",
                    self._id,
                    type(exc).__name__,
                    exc,
                )

    async def _reassert(self, why: str) -> None:
        """Write the liveness key again under a new incarnation; emit REASSERTED.

        The incarnation moves on only once the write landed.
        """
        incarnation = self._incarnation + 1
        logger.warning("node %d: %s; re-asserting as incarnation %d", self._id, why, incarnation)
        self._liveness_revision = await self._kv.put(
            node_key(self._id), self._liveness_record(incarnation), ttl=self._ttl
        )
        self._incarnation = incarnation
        self._publish_events(
            [MembershipEvent(MembershipEventKind.REASSERTED, self._id, self._incarnation)]
        )

    async def _serve_requests(self, inbox: Subscription) -> None:
        """One worker of the pool that answers requests.

        Workers take frames from the inbox one at a time. The pool grows by one
        whenever a worker takes a frame and no other worker is left idle, up to
        ``max_concurrent_handlers``, so a blocking handler never holds up the rest.
        Workers stay until the node closes.

        Each worker runs handlers inside a cancel scope of its own, reused from one
        request to the next. A remote cancellation or a handler timeout cancels that
        scope, and the worker carries on under a fresh one. Reusing scopes instead of
        opening one (and a task) per request is what makes a request cheap.
        """
        worker = _Worker()
        receive = inbox._buffer.receive  # the buffer's own method: one call less per request
        self._workers += 1
        self._idle_workers += 1
        try:
            while True:
                with trio.CancelScope() as scope:
                    worker.scope = scope
                    while True:
                        message = await receive()
                        self._idle_workers -= 1
                        try:
                            if not self._idle_workers and self._workers < self._max_handlers:
                                self._nursery.start_soon(self._serve_requests, inbox)
                            await self._handle_frame(worker, message)
                        finally:
                            self._idle_workers += 1
        except StopAsyncIteration:
            return
        finally:
            self._workers -= 1
            self._idle_workers -= 1

    async def _handle_frame(self, worker: _Worker, message: Message) -> None:
        try:
            frame = _frame_decoder.decode(message.data)
        except msgspec.MsgspecError:
            logger.warning("node %d: dropped a malformed frame", self._id)
            return
        if isinstance(frame, CancelFrame):
            running = self._running.get((frame.sender, frame.request_id))
            if running is not None:
                running.cancel()
            return
        reply_to = message.reply
        if reply_to is None:
            return
        handler = self._handlers.get(frame.kind)
        if handler is None:
            await self._send_reply(reply_to, _NO_HANDLER_REPLY, frame.kind)
            return
        key = (frame.sender, frame.request_id)
        worker.request = key
        worker.expires_after_sweep = self._sweeps + int(frame.timeout / _SWEEP_INTERVAL) + 1
        self._running[key] = worker
        try:
            try:
                data = decode_payload(frame.data, handler.data_type)
            except msgspec.MsgspecError as exc:
                reply = encode(ErrorReply(FailureKind.BAD_PAYLOAD, _qualified_name(exc), str(exc)))
            else:
                try:
                    reply = encode_ok_reply(await handler.function(data, frame.sender))
                except Exception as exc:
                    failure = ErrorReply(FailureKind.HANDLER_RAISED, _qualified_name(exc), str(exc))
                    reply = encode(failure)
        finally:
            worker.request = None
            del self._running[key]
        await self._send_reply(reply_to, reply, frame.kind)

    async def _send_reply(self, reply_to: str, reply: bytes, kind: str) -> None:
        """Send an answer; if it cannot go, tell the requester why instead.

        A failure here must never end the node: it is logged and counted.
        """
        try:
            await self._transport._publish_trusted(reply_to, reply)
            return
        except TransportClosedError:
            logger.debug("node %d: transport closed before answering %r", self._id, kind)
            return
        except PayloadTooLargeError as exc:
            failure = ErrorReply(FailureKind.REPLY_TOO_LARGE, _qualified_name(exc), str(exc))
        except TransportError as exc:
            failure = ErrorReply(FailureKind.REPLY_FAILED, _qualified_name(exc), str(exc))
        self.reply_failures += 1
        logger.warning("node %d: could not send the answer to %r (%s)", self._id, kind, failure)
        try:
            await self._transport._publish_trusted(reply_to, encode(failure))
        except TransportError as exc:
            logger.warning("node %d: could not report the failed answer (%s)", self._id, exc)

    async def _sweep_handlers(self) -> None:
        """Cancel handlers that outlived the timeout their requester gave them.

        The requester cancels its handler itself when it gives up; this is the safety
        net for when that message never comes (the requester crashed, say). Sweeping
        a few times a second costs less than a timer per request, and a handler
        overstays its timeout by at most two sweep intervals.
        """
        while True:
            await trio.sleep(_SWEEP_INTERVAL)
            self._sweeps += 1
            for worker in list(self._running.values()):
                if worker.expires_after_sweep <= self._sweeps:
                    worker.cancel()

    async def _serve_broadcasts(self, broadcasts: Subscription) -> None:
        receive = broadcasts._buffer.receive  # the buffer's own method: one call less
        while True:
            try:
                message = await receive()
            except StopAsyncIteration:
                return
            try:
                frame = _broadcast_decoder.decode(message.data)
            except msgspec.MsgspecError:
                logger.warning("node %d: dropped a malformed broadcast", self._id)
                continue
            if frame.skip_sender and frame.sender == self._id:
                continue
            handlers = self._broadcast_handlers.get(frame.kind)
            if not handlers:
                self.unhandled_broadcasts += 1
                continue
            for handler in list(handlers):
                try:
                    data = decode_payload(frame.data, handler.data_type)
                    if handler.is_async:
                        await handler.function(data, frame.sender)
                    else:
                        await _call(handler.function, data, frame.sender)
                except Exception:
                    logger.exception(
                        "node %d: broadcast handler for %r failed", self._id, frame.kind
                    )

    # ------------------------------------------------------------------ leader lease

    def _lease_record(self) -> bytes:
        return encode(LeaderRecord(self._id, self._ttl))

    async def _leader_loop(self, task_status: trio.TaskStatus[None]) -> None:
        started = False
        while True:
            if not started and self._view.leader_id not in (None, self._id):
                started = True
                task_status.started()  # another node leads; following it takes a while
            try:
                acquired = await self._campaign()
            except TransportClosedError:
                raise
            except TransportError as exc:
                logger.warning("node %d: leader campaign failed (%s)", self._id, exc)
                acquired = None
            if not started:
                started = True
                task_status.started()
            if acquired is None:
                await self._wait_for_lease_change(self._heartbeat_interval)
                continue
            revision, valid_until = acquired
            self._lease_revision = revision
            self._lease_valid_until = valid_until
            try:
                async with trio.open_nursery() as term:
                    self._term_nursery = term
                    for duty in list(self._leader_duties):
                        term.start_soon(self._run_duty, duty)
                    await self._hold_lease(revision, valid_until)
                    term.cancel_scope.cancel()
            finally:
                self._term_nursery = None
                self._lease_valid_until = -math.inf
            self._lease_revision = None

    async def _campaign(self) -> tuple[int, float] | None:
        """Bid for the lease; returns (revision, valid until) on success.

        While another node holds a lease that has not lapsed, this waits, following
        its refreshes, until it lapses or is released. Returns None if a bid loses.
        """
        while True:
            view = self._view
            if view.leader_id is None:
                return await self._try_create_lease()
            if view.leader_id == self._id:
                return await self._try_take_lease(view.leader_revision)
            revision, lapses_at = view.leader_revision, view.leader_seen_at + view.leader_ttl
            changed = self._leader_changed
            with trio.move_on_at(lapses_at):
                await changed.wait()
            if not changed.is_set():
                return await self._try_take_lease(revision)

    async def _try_create_lease(self) -> tuple[int, float] | None:
        sent_at = trio.current_time()
        try:
            revision = await self._kv.create(LEADER_KEY, self._lease_record(), ttl=self._ttl)
        except KeyExistsError:
            return None
        return revision, sent_at + self._ttl * _LEASE_SAFETY

    async def _try_take_lease(self, revision: int) -> tuple[int, float] | None:
        sent_at = trio.current_time()
        try:
            new_revision = await self._kv.update(
                LEADER_KEY, self._lease_record(), revision=revision, ttl=self._ttl
            )
        except RevisionMismatchError:
            if await self._kv.get(LEADER_KEY) is None:
                return await self._try_create_lease()
            return None
        return new_revision, sent_at + self._ttl * _LEASE_SAFETY

    async def _wait_for_lease_change(self, at_most: float) -> None:
        with trio.move_on_after(at_most):
            await self._leader_changed.wait()

    async def _hold_lease(self, revision: int, valid_until: float) -> None:
        """Refresh the lease every heartbeat; return once it is lost or lapses.

        The loop never sleeps past ``valid_until``: however fast refreshes fail, the
        term ends when the lease could next pass to another node.
        """
        next_beat = trio.current_time() + self._heartbeat_interval
        while True:
            await trio.sleep_until(min(next_beat, valid_until))
            now = trio.current_time()
            if now >= valid_until:
                logger.warning(
                    "node %d: leader lease lapsed before it could be refreshed", self._id
                )
                return
            next_beat = now + self._heartbeat_interval
            with trio.move_on_at(valid_until):
                try:
                    revision = await self._kv.update(
                        LEADER_KEY, self._lease_record(), revision=revision, ttl=self._ttl
                    )
                except KVConflictError:
                    logger.warning("node %d: lost the leader lease", self._id)
                    return
                except TransportClosedError:
                    raise
                except TransportError as exc:
                    logger.warning("node %d: lease refresh failed (%s)", self._id, exc)
                    continue
                self._lease_revision = revision
                valid_until = now + self._ttl * _LEASE_SAFETY
                self._lease_valid_until = valid_until
                continue
            logger.warning("node %d: leader lease lapsed before it could be refreshed", self._id)
            return

    async def _run_duty(self, duty: Callable[[], Awaitable[None]]) -> None:
        """Run ``duty`` for the term; restart it after an error; stop when removed."""
        with trio.CancelScope() as scope:
            self._duty_scopes[duty] = scope
            try:
                while True:
                    try:
                        await duty()
                        return
                    except Exception:
                        logger.exception(
                            "node %d: leader duty %r failed; restarting it", self._id, duty
                        )
                    await trio.sleep(self._heartbeat_interval)
            finally:
                if self._duty_scopes.get(duty) is scope:
                    del self._duty_scopes[duty]


@asynccontextmanager
async def open_node(
    transport: Transport,
    key: str,
    *,
    ttl: int = DEFAULT_TTL,
    heartbeat_interval: float | None = None,
    can_lead: bool = True,
    max_concurrent_handlers: int = 1000,
    buffer: int = DEFAULT_BUFFER,
    shutdown_timeout: float = 2.0,
    _namespace: str = "",
) -> AsyncIterator[Node]:
    """Join the mesh called ``key`` as a new node, for the duration of the block.

    On entry the node gets a fresh id, writes its liveness key, subscribes to its
    requests and to broadcasts, loads the membership view and makes its first bid for
    the leader lease; so a lone node is the leader when the block starts.

    :param ttl: whole seconds without a heartbeat after which other nodes count this
        node as dead, and after which its leader lease lapses. At least 1.
    :param heartbeat_interval: seconds between refreshes; ``ttl / 4`` by default.
        Must be below ``ttl``.
    :param can_lead: whether this node competes for the leader lease.
    :param max_concurrent_handlers: requests handled at once; beyond it the node
        reads no further requests until one finishes.
    :param buffer: how many incoming requests, and separately how many broadcasts,
        may wait to be handled. Beyond that, new ones are dropped (requesters then
        time out) and counted in :attr:`Node.dropped`.
    :param shutdown_timeout: seconds the cleanup on exit may take at most.

    Leaving the block cancels every task of the node (request handlers, leader
    duties, heartbeats), then, shielded and within ``shutdown_timeout``, releases the
    lease and deletes the liveness key, so the other nodes see it leave at once. A
    node that crashes instead is seen dead within ``ttl`` seconds.
    """
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
        raise InvalidArgumentError(f"ttl is a whole number of seconds >= 1, got {ttl!r}")
    interval = ttl / 4 if heartbeat_interval is None else check_timeout(heartbeat_interval)
    if interval >= ttl:
        raise InvalidArgumentError(
            f"heartbeat_interval ({interval:g} s) must be shorter than ttl ({ttl} s)"
        )
    if not (isinstance(max_concurrent_handlers, int) and max_concurrent_handlers >= 1):
        raise InvalidArgumentError("max_concurrent_handlers must be an int >= 1")
    if isinstance(buffer, bool) or not (isinstance(buffer, int) and buffer >= 1):
        raise InvalidArgumentError("buffer must be an int >= 1")
    check_timeout(shutdown_timeout)
    node = Node(
        transport,
        key,
        ttl=ttl,
        heartbeat_interval=interval,
        can_lead=can_lead,
        max_concurrent_handlers=max_concurrent_handlers,
        buffer=buffer,
        namespace=_namespace,
    )
    with single_exceptions():
        async with trio.open_nursery() as nursery:
            try:
                await node._start(nursery)
                yield node
            finally:
                nursery.cancel_scope.cancel()
                with trio.move_on_after(shutdown_timeout, shield=True):
                    await node._shutdown()
