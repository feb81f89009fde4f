"""Mesh nodes: the :class:`Node` facade and :func:`open_node`.

A node is assembled from parts that each do one thing:

* :mod:`._identity`: the mesh's names, and a node id that is never reused;
* :mod:`._liveness`: the heartbeat of the liveness key, and the watch and expiry
  timer that keep the (sans-IO) :mod:`._membership` view current;
* :mod:`._lease`: the leader lease, a sans-IO state machine and the task driving it;
* :mod:`._duties`: the leader duties, run in one nursery per term;
* :mod:`._requests`: the request server with its worker pool, and the requester;
* :mod:`._broadcast`: typed broadcast.

Everything a node keeps in the mesh's KV bucket: ``ids`` (the id counter),
``nodes.<id>`` (one liveness key per node, with a TTL) and ``leader`` (the lease).
Subjects: ``ml.<key>.n.<id>`` carries requests (and cancellations) to one node;
``ml.<key>.b`` carries broadcasts. ``<key>`` is the encoded mesh key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypedDict, TypeVar, overload

import trio

from .._errors import InvalidArgumentError, NodeClosedError
from .._transport._buffer import DEFAULT_BUFFER
from .._transport._seam import (
    ConnectionEvent,
    ConnectionEventKind,
    KeyValue,
    Subscription,
    Transport,
    check_timeout,
)
from .._util import single_exceptions
from ._broadcast import BroadcastHandler, Broadcasts
from ._declarations import BroadcastType, RequestType, resolve_name
from ._duties import Duties, Duty
from ._identity import allocate_id, mesh_names
from ._lease import LeaseKeeper
from ._liveness import Heartbeat, Membership, MembershipEvents, MembershipHandler
from ._requests import RequestClient, RequestHandler, RequestServer

__all__ = [
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_TTL",
    "MembershipEvents",
    "Node",
    "NodeOptions",
    "mesh_names",
    "open_node",
    "open_node_in_namespace",
]

DEFAULT_TTL = 2
"""Seconds without a refresh after which a node counts as dead (and the lease lapses)."""

DEFAULT_REQUEST_TIMEOUT = 5.0
"""Seconds a node request waits for its answer unless told otherwise."""


class NodeOptions(TypedDict, total=False):
    """The keyword options of :func:`open_node`, for layers that pass them on."""

    ttl: int
    heartbeat_interval: float | None
    can_lead: bool
    max_concurrent_handlers: int
    buffer: int
    shutdown_timeout: float


RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")
DataT = TypeVar("DataT")


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
        self._bucket, prefix = mesh_names(key, namespace)
        self._ttl = ttl
        self._can_lead = can_lead
        self._id = 0
        self._closed = False
        self._joined = False
        self._subscriptions: list[Subscription] = []
        self._remove_connection_listener: Callable[[], None] | None = None
        self._duties = Duties(retry_interval=heartbeat_interval)
        self._requests = RequestServer(transport, max_concurrent_handlers=max_concurrent_handlers)
        self._broadcasts = Broadcasts(transport, f"{prefix}.b")
        self._membership = Membership(
            ttl=ttl,
            heartbeat_interval=heartbeat_interval,
            on_down=self._on_down,
            on_leader_entry=self._on_leader_entry,
            confirm=self._confirm_deaths,
            connected=lambda: transport.connected,
        )
        self._requester = RequestClient(
            transport, prefix, self._requests, self._membership.view.is_alive
        )
        self._lease = LeaseKeeper(
            self._membership.view, self._duties, ttl=ttl, refresh_interval=heartbeat_interval
        )
        self._heartbeat = Heartbeat(
            ttl=ttl, interval=heartbeat_interval, publish=self._membership.publish
        )

    def _on_down(self, node_id: int) -> None:
        self._requester.abandon(node_id)

    def _on_leader_entry(self) -> None:
        self._lease.leader_entry_seen()

    def _confirm_deaths(self) -> None:
        """A peer's death waits for this node's own heartbeat: beat now."""
        self._heartbeat.beat_now()

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
        return self._heartbeat.incarnation

    def incarnation_of(self, node_id: int) -> int | None:
        """The incarnation this node last saw from ``node_id``, alive or dead."""
        if node_id == self._id:
            return self._heartbeat.incarnation
        return self._membership.view.incarnation_of(node_id)

    @property
    def view_is_trustworthy(self) -> bool:
        """Whether this node's view may declare other nodes dead right now.

        It may not while the transport is disconnected, while this node's own
        heartbeats are not coming back through its watch, and for ``ttl`` seconds
        after a reconnect (so every node gets the chance to re-assert first).
        The transport's own connection state counts at once, before the
        ``DISCONNECTED`` event has reached the view.
        """
        return self._membership.is_trustworthy()

    async def wait_for_trustworthy_view(self) -> None:
        """Return once :attr:`view_is_trustworthy` holds. Cancellable."""
        await self._membership.wait_for_trustworthy()

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
        return self._lease.is_leader()

    @property
    def leader_id(self) -> int | None:
        """The lease holder according to this node's view, or None while vacant."""
        return self._membership.view.leader_id

    def alive_nodes(self) -> frozenset[int]:
        """The ids of the nodes this node currently sees as alive, itself included."""
        return self._membership.view.alive

    def is_alive(self, node_id: int) -> bool:
        """Whether ``node_id`` is in this node's view of the alive nodes."""
        return self._membership.view.is_alive(node_id)

    @property
    def watch_failures(self) -> int:
        """How many times the membership watch failed and had to be reopened."""
        return self._membership.watch_failures

    @property
    def reply_failures(self) -> int:
        """Answers this node could not send (too large, or the transport failed)."""
        return self._requests.reply_failures

    @property
    def unhandled_broadcasts(self) -> int:
        """Broadcasts that arrived for a type with no handler here."""
        return self._broadcasts.unhandled

    @property
    def handlers_running(self) -> int:
        """Request handlers running on this node right now."""
        return self._requests.running

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
        return self._requests.register(kind, handler)

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
        return self._broadcasts.register(kind, handler)

    def add_membership_handler(self, handler: MembershipHandler) -> Callable[[], None]:
        """Call ``handler(event)`` for every :class:`MembershipEvent`, in order.

        Handlers run one at a time in a task of the node; an exception is logged.
        Returns a function that removes the handler.
        """
        return self._membership.add_handler(handler)

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
        async with self._membership.events(limit) as events:
            yield events

    def add_leader_duty(self, duty: Duty) -> Callable[[], None]:
        """Run ``await duty()`` whenever this node becomes the leader.

        The duty runs in a nursery that lives as long as this node's leadership term:
        it is cancelled when the lease is lost or the node closes, and started again
        in the next term. If the node leads already, the duty starts at once. An
        exception from a duty is logged, and the duty starts again after one
        heartbeat interval. Returns a function that removes the duty and cancels it
        if it is running.
        """
        return self._duties.add(duty)

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
        return await self._requester.request(node_id, name, data, response_type, timeout)

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
        await self._broadcasts.send(kind, data, skip_self)

    # ------------------------------------------------------------------ lifecycle

    async def _start(self, nursery: trio.Nursery) -> None:
        kv: KeyValue = await self._transport.key_value(self._bucket)
        self._id = node_id = await allocate_id(kv)
        self._duties.node_id = self._requests.node_id = self._broadcasts.node_id = node_id
        self._membership.node_id = self._requester.node_id = node_id
        self._lease.node_id = self._heartbeat.node_id = node_id
        inbox = await self._transport.open_subscription(
            self._requester.subject(node_id), limit=self._buffer
        )
        self._subscriptions.append(inbox)
        broadcasts = await self._transport.open_subscription(
            self._broadcasts.subject, limit=self._buffer
        )
        self._subscriptions.append(broadcasts)
        await self._heartbeat.join(kv)
        self._joined = True
        self._membership.view.own_id = node_id
        self._remove_connection_listener = self._transport.add_connection_listener(
            self._on_connection_event
        )
        nursery.start_soon(self._membership.run_handlers)
        await nursery.start(self._membership.follow, kv)
        nursery.start_soon(self._membership.expire)
        nursery.start_soon(self._membership.reopen_silent_watch)
        nursery.start_soon(self._heartbeat.run)
        self._requests.start(nursery, inbox)
        nursery.start_soon(self._broadcasts.serve, broadcasts)
        if self._can_lead:
            await nursery.start(self._lease.run, kv)

    def _on_connection_event(self, event: ConnectionEvent) -> None:
        """Disconnected: the view turns stale. Reconnected: the watch reopens, the
        view holds for ``ttl``, and the heartbeat runs at once."""
        self._membership.connection_event(event)
        if event.kind is ConnectionEventKind.RECONNECTED:
            self._heartbeat.beat_now()

    async def _shutdown(self) -> None:
        """Stop serving, then withdraw from the mesh: release the lease and remove
        the liveness key, so others see this node leave at once (a crash skips this,
        and the others notice through the TTL instead)."""
        self._closed = True
        if self._remove_connection_listener is not None:
            self._remove_connection_listener()
        self._membership.close()
        for subscription in self._subscriptions:
            await subscription.aclose()
        if self._joined:
            await self._lease.release()
            await self._heartbeat.withdraw()


def _check_options(
    ttl: int,
    heartbeat_interval: float | None,
    max_concurrent_handlers: int,
    buffer: int,
    shutdown_timeout: float,
) -> float:
    """Validate :func:`open_node`'s options; return the heartbeat interval."""
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
    return interval


@asynccontextmanager
async def open_node_in_namespace(
    transport: Transport,
    key: str,
    namespace: str,
    *,
    ttl: int = DEFAULT_TTL,
    heartbeat_interval: float | None = None,
    can_lead: bool = True,
    max_concurrent_handlers: int = 1000,
    buffer: int = DEFAULT_BUFFER,
    shutdown_timeout: float = 2.0,
) -> AsyncIterator[Node]:
    """:func:`open_node` for a layer built on nodes: its mesh's names carry
    ``namespace`` (lowercase letters; see :func:`mesh_names`), so they never meet a
    plain node's mesh of the same key. Internal to meshline."""
    interval = _check_options(
        ttl, heartbeat_interval, max_concurrent_handlers, buffer, shutdown_timeout
    )
    node = Node(
        transport,
        key,
        ttl=ttl,
        heartbeat_interval=interval,
        can_lead=can_lead,
        max_concurrent_handlers=max_concurrent_handlers,
        buffer=buffer,
        namespace=namespace,
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
    async with open_node_in_namespace(
        transport,
        key,
        "",
        ttl=ttl,
        heartbeat_interval=heartbeat_interval,
        can_lead=can_lead,
        max_concurrent_handlers=max_concurrent_handlers,
        buffer=buffer,
        shutdown_timeout=shutdown_timeout,
    ) as node:
        yield node
