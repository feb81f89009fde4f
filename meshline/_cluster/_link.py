"""A socket server's link to the cluster: presence, interest routing, targeted delivery.

:func:`open_cluster_link` joins the server to a client service (its own mesh node
and presence registry) and keeps three things in line with the server's local
connections:

Presence
    Every open connection is registered under its client id, with a
    :class:`~meshline._cluster._index.Descriptor` (connection id, user, role,
    rooms, ``describe`` fields) as metadata. The writes of one client id go
    through one worker at a time, in order: a newer connection's registration is
    never overtaken by an older one's. A registration of the same client id made
    elsewhere (another node, or a newer connection here) supersedes this one: the
    registry's change feed says so, and the connection is closed with 4502.

Interest routing
    The node subscribes to a user's, room's or topic's subject only while it
    holds a local member of it; one task reconciles the subscriptions with the
    local registry, and one task reads them all (they share one buffer).

Targeted delivery
    ``to_conn``, ``to_user``, ``to_room`` and ``to_topic`` deliver to the local
    members directly, then publish once on the target's subject: NATS carries it
    to the nodes that listen, and no other. Nothing on this path reads the
    registry.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import msgspec
import trio

from .._errors import (
    InvalidArgumentError,
    MeshlineError,
    MeshRequestTimeoutError,
    NodeNotAliveError,
    NoHandlerError,
    PayloadError,
    RemoteHandlerError,
    TransportError,
)
from .._mesh._identity import mesh_names
from .._mesh._membership import MembershipEvent, MembershipEventKind
from .._mesh._node import NodeOptions
from .._registry._core import ChangeFeed, ClientRecord, LocalLookup, RegisteredClient
from .._service._service import ClientService, open_client_service
from .._sockets._codes import CloseCode, ErrorCode
from .._sockets._connection import (
    ConnectionHub,
    check_close_code,
    fan_out,
    fan_out_presence,
    node_of_connection,
)
from .._sockets._errors import (
    CallFailedError,
    ConnectionNotFoundError,
    SocketClosedError,
    SocketTimeoutError,
)
from .._sockets._frames import FrameEncodeError, PresenceDiffFrame, PresenceMember
from .._sockets._local import LocalRegistry
from .._sockets._roles import check_name
from .._transport._buffer import MessageBuffer, Overflow
from .._transport._names import check_name as check_key
from .._transport._names import encode_bounded_token
from .._transport._seam import KeyValue, KVOperation, Message, Subscription, Transport
from ._index import (
    ClusterConnection,
    ClusterIndex,
    Descriptor,
    NodeSummary,
    described_connection,
)
from ._interest import InterestKind, interest_subject
from ._reporting import (
    ClientConnectedHook,
    ClientDisconnectedHook,
    PresenceReporter,
    UserHook,
)
from ._watch import WatchBook

if TYPE_CHECKING:
    from .._registry._core import RegistryBackend
    from .._sockets._connection import Connection

__all__ = [
    "ClusterLink",
    "ClusterOrphanHandler",
    "ClusterView",
    "ConnectionTarget",
    "MeshOptions",
    "RoomTarget",
    "TopicTarget",
    "UserTarget",
    "open_cluster_link",
]

logger = logging.getLogger("meshline.cluster")

SOCKETS_NAMESPACE = "sock"

PRESENCE_WORKERS = 16
"""Registry writes in flight at once for one server's connections."""

_RETRY_DELAY = 0.5
"""Seconds before a failed presence write or subscription change is tried again."""

DESCRIBE_TIMEOUT = 5.0
"""Seconds an async ``describe`` hook may take; after that the connection is
registered without fields (the presence workers cannot wait on it for ever)."""

NO_LIMIT = 1e9
"""Seconds a node request waits when the socket request has no timeout (it ends
when the connection does: its node answers then)."""

REQUEST_MARGIN = 1.0
"""Seconds a request across nodes waits for the owning node beyond the request's
own timeout, so that the owning node's answer (a timeout included) comes first."""

SOCKET_REQUEST = "meshline.socket-request"
"""The node request type that carries server-to-client requests to the owning
node. Its data is ``[connection_id, name, timeout, data]`` (timeout None: none);
its answer one of :class:`_Answer`'s forms."""

USERS_NAMESPACE = "users"
"""The namespace of the KV bucket where the leader records the users it reported
online (see :class:`~meshline._cluster._reporting.ReportedUsers`)."""

INBOX_LIMIT = 100_000
"""Routed messages buffered for this node before the oldest are dropped (counted)."""


def _check_transport(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, Transport):
        raise InvalidArgumentError(f"transport must be a meshline Transport: {value!r}")


def _check_mesh_key(instance: Any, attribute: Any, value: Any) -> None:
    check_key(value, "mesh key")


def _check_node_options(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, Mapping):
        raise InvalidArgumentError(f"node must be a mapping of open_node options: {value!r}")
    unknown = sorted(set(value) - set(NodeOptions.__optional_keys__))
    if unknown:
        raise InvalidArgumentError(
            f"unknown node options {unknown}: use {sorted(NodeOptions.__optional_keys__)}"
        )


@attrs.frozen
class MeshOptions:
    """Where a socket server joins its cluster: ``open_socket_server(mesh=...)``.

    ``transport`` and ``key`` name the cluster (every node of one cluster uses the
    same key). ``backend`` is the presence registry's (a KV bucket on the
    transport by default; it must keep a local replica with a change feed, as
    the KV and memory backends do). ``node`` holds :func:`~meshline.open_node`'s
    options (``ttl``, ``heartbeat_interval``...). ``reassert_interval`` is the
    registry's (see :func:`~meshline.open_client_registry`).

    :raises InvalidArgumentError: a bad transport or key.
    """

    transport: Transport = attrs.field(validator=_check_transport)
    key: str = attrs.field(validator=_check_mesh_key)
    backend: RegistryBackend | None = None
    node: Mapping[str, Any] = attrs.field(factory=dict, validator=_check_node_options)
    reassert_interval: float = 10.0


class _Routed(msgspec.Struct, array_like=True, tag=True):
    origin: int
    """The node that published it: it delivered to its own members already."""


class _Emit(_Routed, tag="e"):
    target: str
    """The connection id, on a node's connection subject; "" elsewhere."""
    event: str
    data: msgspec.Raw
    coalesce: str | None = None
    skip: str | None = None


class _Close(_Routed, tag="c"):
    target: str
    code: int
    reason: str | None = None


class _Answer(msgspec.Struct, array_like=True, frozen=True):
    """The owning node's answer to a request across nodes: ``kind`` is ``"ok"``
    (``value`` is the reply), ``"missing"`` (no such connection there),
    ``"closed"``, ``"timeout"`` or ``"error"`` (the client's error: ``code``,
    ``message``, ``details``, ``application``)."""

    kind: str
    value: Any = None
    code: str = ""
    message: str = ""
    details: Any = None
    application: bool = False


_decoder = msgspec.msgpack.Decoder(_Emit | _Close)
_encoder = msgspec.msgpack.Encoder()
_descriptor_decoder = msgspec.msgpack.Decoder(Descriptor)


def _encode_data(data: Any) -> msgspec.Raw:
    try:
        return msgspec.Raw(_encoder.encode(data))
    except (TypeError, ValueError, OverflowError) as exc:
        raise FrameEncodeError(f"cannot encode the event's data: {exc}") from exc


class _KVReportedUsers:
    """The users the leader reported online, one key each in a KV bucket (the value
    is the user id: keys of long ids are hashed)."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @staticmethod
    def _key(user_id: str) -> str:
        return "u." + encode_bounded_token(user_id, 200, "user id")

    async def load(self) -> set[str]:
        async with self._kv.watch("u.>", removals=False) as watch:
            entries = watch.take_snapshot()
        users: dict[str, str] = {}
        """Key -> user, in the snapshot's order: a removal that arrived while it
        loaded undoes the value before it."""
        for entry in entries:
            if entry.operation is not KVOperation.PUT:
                users.pop(entry.key, None)
                continue
            try:
                users[entry.key] = entry.value.decode("utf-8", "surrogatepass")
            except UnicodeDecodeError:
                logger.warning("cluster: a reported user's record does not decode")
        return set(users.values())

    async def record(self, user_id: str, online: bool) -> None:
        key = self._key(user_id)
        if online:
            await self._kv.put(key, user_id.encode("utf-8", "surrogatepass"))
        else:
            await self._kv.delete(key)


class _Entry:
    """One local connection's registration, as the presence workers keep it."""

    __slots__ = ("announced", "attempted", "changed", "conn", "fields", "token", "written")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.token: int | None = None
        """The registration's token, once it landed."""
        self.announced = False
        """``on_client_connected`` was called for it (its first registration landed)."""
        self.attempted = False
        """A register was sent and did not answer (it failed, or was cancelled):
        it may have landed, under a token never learned."""
        self.changed = 1
        """Bumped on each change of the descriptor (rooms)."""
        self.written = 0
        """The value of :attr:`changed` the registry holds."""
        self.fields: dict[str, Any] | None = None
        """``describe``'s answer, once it came (no write before)."""


class _Slot:
    """One client id's local connections: the current one, and superseded or
    closed ones whose registrations are still to be removed."""

    __slots__ = ("busy", "current", "stale")

    def __init__(self) -> None:
        self.current: _Entry | None = None
        self.stale: list[_Entry] = []
        self.busy = False


class ClusterLink:
    """What :func:`open_cluster_link` runs (see the module). Applications use the
    server's methods and :class:`ClusterView`."""

    def __init__(
        self,
        service: ClientService[Descriptor],
        hub: ConnectionHub,
        registry: LocalRegistry,
        *,
        describe: Callable[[Connection], Any] | None,
        reporter: PresenceReporter,
        route_id: int | None = None,
        presence_fields: frozenset[str] = frozenset(),
    ) -> None:
        backend = service.client_registry.backend
        if not isinstance(backend, ChangeFeed) or not isinstance(backend, LocalLookup):
            raise InvalidArgumentError(
                "the mesh's registry backend must keep a local replica with a change feed "
                f"(the KV and memory backends do): {backend!r}"
            )
        self.service = service
        self.node = service.node
        self.node_id = service.instance_id
        self.route_id = self.node_id if route_id is None else route_id
        """The node id this server's connection ids name: the mesh's, unless a
        server on a private mesh was given its own."""
        self._hub = hub
        self._registry = registry
        self._describe = describe
        self.reporter = reporter
        self._nursery: trio.Nursery | None = None
        """Where ``describe`` calls run (the link's, once it runs)."""
        self._reported: _KVReportedUsers | None = None
        self._feed: ChangeFeed = backend
        self.prefix = mesh_names(self.node.key, SOCKETS_NAMESPACE)[1]
        self.index = ClusterIndex()
        self.undecodable = 0
        """Registry records or routed messages that did not decode (logged)."""
        self.received = 0
        """Routed messages this node received (its own echoes included)."""
        self._slots: dict[str, _Slot] = {}
        self._queue: dict[str, None] = {}
        self._queue_ready = trio.Event()
        self._local_users: dict[str, dict[str, Connection]] = {}
        self._subscriptions: dict[str, Subscription] = {}
        self._wanted: dict[str, tuple[InterestKind, str]] = {}
        """Subject -> what it routes, for every interest subject the node listens
        to or is about to."""
        self._dirty: dict[str, tuple[InterestKind, str]] = {}
        self._dirty_ready = trio.Event()
        self._inbox: MessageBuffer[Message] = MessageBuffer(
            INBOX_LIMIT, Overflow.DROP_OLDEST, "cluster inbox"
        )
        self.conn_subject = self.node_subject(self.route_id)
        self.watches: WatchBook[Connection] = WatchBook(presence_fields)
        """The rooms this node's connections watch the presence of."""

    # --- Names -------------------------------------------------------------------

    def node_subject(self, node_id: int) -> str:
        return f"{self.prefix}.conn.{node_id}"

    @property
    def dropped(self) -> int:
        """Routed messages this node dropped because it could not keep up."""
        return self._inbox.dropped

    # --- The registry's change feed ------------------------------------------------

    def _on_change(self, client_id: str, record: ClientRecord | None) -> None:
        before = self.index.get(client_id)
        self._index_change(client_id, record)
        after = self.index.get(client_id)
        self.reporter.registration(client_id, after)
        if self.watches.any_watched:
            self._tell_watchers(client_id, before, after)

    def _index_change(self, client_id: str, record: ClientRecord | None) -> None:
        if record is None:
            self.index.remove(client_id)
            return
        try:
            descriptor = _descriptor_decoder.decode(record.metadata)
        except msgspec.MsgspecError as exc:
            self.undecodable += 1
            logger.warning("cluster: the registration of %r does not decode: %s", client_id, exc)
            self.index.remove(client_id)
            return
        self.index.put(described_connection(client_id, record.node_id, descriptor))
        self._check_superseded(client_id)

    def _check_superseded(self, client_id: str) -> None:
        """Act on the client's registration as the replica has it now, for the
        client's local connection, once that connection holds a registration.

        A registration of a newer connection of the client (see :func:`_is_newer`),
        here or on another node, supersedes this one: it is closed with 4502. One
        of an older connection that overwrote this one (its write landed late) is
        overwritten in turn. A removed registration changes nothing here
        (re-assertion writes it back)."""
        slot = self._slots.get(client_id)
        entry = None if slot is None else slot.current
        if entry is None or entry.token is None:
            return
        seen = self.index.get(client_id)
        if seen is None or seen.connection_id == entry.conn.id:
            return
        conn = entry.conn
        if _is_newer(
            (seen.connection_id, seen.previous_connection_id, seen.connected_at),
            (conn.id, conn.previous_connection_id, conn.connected_at),
        ):
            logger.info(
                "cluster: client %r connected again on node %d; closing connection %s",
                client_id,
                seen.node_id,
                entry.conn.id,
            )
            self._hub.supersede(entry.conn)
            return
        logger.info(
            "cluster: an older connection of client %r (%s, node %d) was registered over "
            "connection %s; registering it again",
            client_id,
            seen.connection_id,
            seen.node_id,
            entry.conn.id,
        )
        entry.token = None
        self._queue_write(client_id)

    # --- The local registry's observer ------------------------------------------------

    def attached(self, conn: Connection) -> None:
        slot = self._slots.get(conn.client_id)
        if slot is None:
            slot = self._slots[conn.client_id] = _Slot()
        elif slot.current is not None:
            old = slot.current.conn
            if _is_newer(
                (old.id, old.previous_connection_id, old.connected_at),
                (conn.id, conn.previous_connection_id, conn.connected_at),
            ):
                logger.info(
                    "cluster: client %r has a newer connection here (%s); closing %s",
                    conn.client_id,
                    old.id,
                    conn.id,
                )
                self._hub.supersede(conn)  # detaches it at once
                return
            logger.info(
                "cluster: client %r connected again here; closing connection %s",
                conn.client_id,
                old.id,
            )
            self._hub.supersede(old)  # detaches it: it goes stale
        entry = slot.current = _Entry(conn)
        if self._describe is None:
            entry.fields = {}
            self._queue_write(conn.client_id)
        elif self._nursery is not None:
            self._nursery.start_soon(self._describe_entry, entry)
        if conn.user_id is not None:
            users = self._local_users.setdefault(conn.user_id, {})
            users[conn.id] = conn
            if len(users) == 1:
                self._interest_changed(InterestKind.USER, conn.user_id)
        for room in conn.rooms:
            if len(self._registry.rooms.get(room, ())) == 1:
                self._interest_changed(InterestKind.ROOM, room)
        for topic in conn.topics:
            if len(self._registry.topics.get(topic, ())) == 1:
                self._interest_changed(InterestKind.TOPIC, topic)

    def detached(self, conn: Connection) -> None:
        slot = self._slots.get(conn.client_id)
        if slot is not None and slot.current is not None and slot.current.conn is conn:
            if slot.current.announced:
                self.reporter.client_closed(conn)
            slot.stale.append(slot.current)
            slot.current = None
            self._queue_write(conn.client_id)
        if conn.user_id is not None:
            users = self._local_users.get(conn.user_id)
            if users is not None and users.pop(conn.id, None) is not None and not users:
                del self._local_users[conn.user_id]
                self._interest_changed(InterestKind.USER, conn.user_id)
        for room in conn.rooms:
            if room not in self._registry.rooms:
                self._interest_changed(InterestKind.ROOM, room)
        for topic in conn.topics:
            if topic not in self._registry.topics:
                self._interest_changed(InterestKind.TOPIC, topic)

    def joined(self, conn: Connection, room: str) -> None:
        self._descriptor_changed(conn)
        if len(self._registry.rooms.get(room, ())) == 1:
            self._interest_changed(InterestKind.ROOM, room)

    def left(self, conn: Connection, room: str) -> None:
        self._descriptor_changed(conn)
        if room not in self._registry.rooms:
            self._interest_changed(InterestKind.ROOM, room)

    def subscribed(self, conn: Connection, topic: str) -> None:
        if len(self._registry.topics.get(topic, ())) == 1:
            self._interest_changed(InterestKind.TOPIC, topic)

    def unsubscribed(self, conn: Connection, topic: str) -> None:
        if topic not in self._registry.topics:
            self._interest_changed(InterestKind.TOPIC, topic)

    def update_fields(self, client_id: str, fields: Mapping[str, Any]) -> bool:
        """Replace the ``describe`` fields of the client's connection on this node
        in its registration (written in the background); False if this node has
        no open connection of that client."""
        if not isinstance(fields, Mapping):
            raise InvalidArgumentError(f"fields must be a mapping: {fields!r}")
        copied = {str(key): value for key, value in fields.items()}
        try:
            _encoder.encode(copied)
        except (TypeError, ValueError, OverflowError) as exc:
            raise PayloadError(f"cannot encode the fields: {exc}") from exc
        slot = self._slots.get(client_id)
        if slot is None or slot.current is None:
            return False
        entry = slot.current
        entry.fields = copied
        entry.changed += 1
        self._queue_write(client_id)
        return True

    def _descriptor_changed(self, conn: Connection) -> None:
        slot = self._slots.get(conn.client_id)
        if slot is not None and slot.current is not None and slot.current.conn is conn:
            slot.current.changed += 1
            self._queue_write(conn.client_id)

    # --- Presence writes --------------------------------------------------------------

    def _queue_write(self, client_id: str) -> None:
        slot = self._slots.get(client_id)
        if slot is not None and not slot.busy:
            self._queue[client_id] = None
            self._queue_ready.set()

    async def _write_presence(self) -> None:
        """One presence worker: takes client ids in turn, one at a time each."""
        while True:
            while not self._queue:
                self._queue_ready = trio.Event()
                await self._queue_ready.wait()
            client_id = next(iter(self._queue))
            del self._queue[client_id]
            slot = self._slots.get(client_id)
            if slot is None:
                continue
            slot.busy = True
            try:
                await self._sync(client_id, slot)
            except (TransportError, MeshlineError) as exc:
                logger.warning(
                    "cluster: presence write for client %r failed (%s); retrying in %g s",
                    client_id,
                    exc,
                    _RETRY_DELAY,
                )
                await trio.sleep(_RETRY_DELAY)
            finally:
                slot.busy = False
            if self._slots.get(client_id) is slot:
                current = slot.current
                if current is None and not slot.stale:
                    del self._slots[client_id]
                elif current is not None and current.fields is None:
                    pass  # being described: queued again once it is
                elif slot.stale or (current is not None and _behind(current)):
                    self._queue_write(client_id)

    async def _sync(self, client_id: str, slot: _Slot) -> None:
        """Bring the registry in line with the slot.

        In order: registrations of closed connections whose write may have landed
        under a token never learned (a failed or cancelled register) are removed
        first; then the current connection's registration is written (it replaces
        any older one of this node at once, so the client never looks gone); then
        the closed connections' known registrations are removed (a no-op once
        replaced, a real removal when the client is gone)."""
        service = self.service
        for stale in slot.stale:
            if stale.token is None and stale.attempted:
                await service.unregister_client(client_id)  # this node's, whatever token
                stale.attempted = False
        entry = slot.current
        if entry is not None and entry.fields is None:
            return  # being described: its registration comes first (then the rest)
        while entry is not None and _behind(entry) and slot.current is entry:
            await self._write(client_id, slot, entry)
        while slot.stale:
            stale = slot.stale[0]
            if stale.token is not None:
                await service.unregister_client(client_id, token=stale.token)
            slot.stale.pop(0)

    async def _write(self, client_id: str, slot: _Slot, entry: _Entry) -> None:
        """One registry write for the slot's current connection."""
        service = self.service
        changed = entry.changed
        descriptor = self._descriptor(entry)
        if entry.token is None:
            first = entry.written == 0
            entry.attempted = True
            try:
                registration = await service.register_client(client_id, descriptor)
            except PayloadError as exc:
                logger.error(
                    "cluster: the registration of connection %s cannot be written (%s); "
                    "registering it without its rooms and fields",
                    entry.conn.id,
                    exc,
                )
                descriptor = _minimal(descriptor)
                registration = await service.register_client(client_id, descriptor)
            entry.token = registration.token
            entry.attempted = False
            entry.written = changed
            if slot.current is not entry:
                return  # closed meanwhile: the stale pass removes it
            if first:
                entry.announced = True
                self.reporter.client_connected(entry.conn)
            self._check_superseded(client_id)
            return
        try:
            kept = await service.update_client_metadata(client_id, descriptor, token=entry.token)
        except PayloadError as exc:
            logger.error(
                "cluster: the registration of connection %s cannot be updated (%s); "
                "it keeps its last written rooms and fields",
                entry.conn.id,
                exc,
            )
            entry.written = changed
            return
        entry.written = changed
        if kept or slot.current is not entry:
            return
        seen = self.index.get(client_id)
        if seen is not None and seen.connection_id != entry.conn.id:
            self._check_superseded(client_id)  # a newer connection: closed; else written again
            return
        logger.warning(
            "cluster: the registration of connection %s was gone; writing it again",
            entry.conn.id,
        )
        entry.token = None

    def _descriptor(self, entry: _Entry) -> Descriptor:
        conn = entry.conn
        assert entry.fields is not None  # described before any write
        return Descriptor(
            connection_id=conn.id,
            user_id=conn.user_id,
            role=conn.role,
            connected_at=conn.connected_at,
            rooms=tuple(conn.rooms),
            fields=entry.fields,
            previous=conn.previous_connection_id,
        )

    async def _describe_entry(self, entry: _Entry) -> None:
        """Ask ``describe`` in a task of its own (the presence workers never wait
        on it), then queue the registration."""
        fields = await self._described(entry.conn)
        if entry.fields is None:  # update_fields may have set them meanwhile
            entry.fields = fields
        self._queue_write(entry.conn.client_id)

    async def _described(self, conn: Connection) -> dict[str, Any]:
        describe = self._describe
        if describe is None:
            return {}
        try:
            fields = describe(conn)
            if inspect.isawaitable(fields):
                with trio.move_on_after(DESCRIBE_TIMEOUT) as scope:
                    fields = await fields
                if scope.cancelled_caught:
                    logger.warning(
                        "cluster: describe took over %g s for connection %s; "
                        "registered without fields",
                        DESCRIBE_TIMEOUT,
                        conn.id,
                    )
                    return {}
            if not isinstance(fields, Mapping):
                raise TypeError(f"describe returned {type(fields).__name__}, not a mapping")
            fields = {str(key): value for key, value in fields.items()}
            _encoder.encode(fields)
        except Exception:
            logger.exception(
                "cluster: describe failed for connection %s; registered without fields", conn.id
            )
            return {}
        return fields

    # --- Membership -----------------------------------------------------------------------

    def on_membership(self, event: MembershipEvent) -> None:
        if event.node_id is None:
            return
        if self.watches.any_watched:
            rooms = {room for conn in self.index.of_node(event.node_id) for room in conn.rooms}
            for room in sorted(filter(self.watches.is_watched, rooms)):
                self._send_diff(self.watches.resync(room, self._room_members(room)))
        if event.kind is MembershipEventKind.DOWN:
            self.reporter.node_down(event.node_id)
        elif event.kind is MembershipEventKind.UP:
            for conn in self.index.of_node(event.node_id):
                self.reporter.registration(conn.client_id, conn)

    async def _lead(self) -> None:
        if self._reported is None:
            bucket = mesh_names(self.node.key, USERS_NAMESPACE)[0]
            self._reported = _KVReportedUsers(await self.node.transport.key_value(bucket))
        await self.reporter.lead(self._reported)

    def _still_here(self, conn: Connection) -> bool:
        """Whether the client of ``conn`` is connected again (another connection
        of its client id is registered on a live node)."""
        current = self.index.get(conn.client_id)
        return (
            current is not None
            and current.connection_id != conn.id
            and self.node.is_alive(current.node_id)
        )

    # --- Room presence for watching clients -----------------------------------------------

    def presence(self, room: str) -> tuple[int, tuple[PresenceMember, ...]]:
        rev, members, catch_up = self.watches.state(room, self._room_members(room))
        self._send_diff(catch_up)
        return rev, members

    def add_watcher(self, room: str, conn: Connection) -> None:
        self.watches.add(room, conn, self._room_members(room))

    def remove_watcher(self, room: str, conn: Connection) -> None:
        self.watches.remove(room, conn)

    def _room_members(self, room: str) -> list[ClusterConnection]:
        return self.index.room(room, self.node.is_alive)

    def _tell_watchers(
        self, client_id: str, before: ClusterConnection | None, after: ClusterConnection | None
    ) -> None:
        rooms: set[str] = set()
        if before is not None:
            rooms.update(before.rooms)
        if after is not None:
            rooms.update(after.rooms)
        visible = after is not None and self.node.is_alive(after.node_id)
        for room in rooms:
            if self.watches.is_watched(room):
                member = after if visible and after is not None and room in after.rooms else None
                self._send_diff(self.watches.update(room, client_id, member))

    def _send_diff(self, diff: PresenceDiffFrame | None) -> None:
        if diff is None:
            return
        try:
            fan_out_presence(self.watches.watchers(diff.room), diff)
        except FrameEncodeError as exc:
            logger.error(
                "cluster: the presence diff of room %r does not encode: %s", diff.room, exc
            )

    # --- Interest subscriptions ---------------------------------------------------------

    def _interest_changed(self, kind: InterestKind, name: str) -> None:
        try:
            subject = interest_subject(self.prefix, kind, name)
        except InvalidArgumentError:  # checked on join; cannot happen
            logger.exception("cluster: no subject for %s %r", kind.value, name)
            return
        self._dirty[subject] = (kind, name)
        self._dirty_ready.set()

    def is_listening(self, kind: InterestKind, name: str) -> bool:
        return interest_subject(self.prefix, kind, name) in self._subscriptions

    def _is_wanted(self, kind: InterestKind, name: str) -> bool:
        if kind is InterestKind.USER:
            return name in self._local_users
        if kind is InterestKind.ROOM:
            return name in self._registry.rooms
        return name in self._registry.topics

    async def _keep_subscriptions(self) -> None:
        """Subscribe to the subjects with local members, and only those."""
        transport = self.node.transport
        while True:
            while not self._dirty:
                self._dirty_ready = trio.Event()
                await self._dirty_ready.wait()
            subject, (kind, name) = next(iter(self._dirty.items()))
            del self._dirty[subject]
            try:
                if self._is_wanted(kind, name):
                    self._wanted[subject] = (kind, name)
                    if subject not in self._subscriptions:
                        self._subscriptions[subject] = await transport.open_subscription(
                            subject, into=self._inbox
                        )
                else:
                    self._wanted.pop(subject, None)
                    subscription = self._subscriptions.pop(subject, None)
                    if subscription is not None:
                        await subscription.aclose()
            except TransportError as exc:
                logger.warning(
                    "cluster: subscribing to %s %r failed (%s); retrying in %g s",
                    kind.value,
                    name,
                    exc,
                    _RETRY_DELAY,
                )
                self._dirty[subject] = (kind, name)
                await trio.sleep(_RETRY_DELAY)

    async def _read_inbox(self) -> None:
        while True:
            message = await self._inbox.receive()
            self.received += 1
            try:
                routed = _decoder.decode(message.data)
            except msgspec.MsgspecError as exc:
                self.undecodable += 1
                logger.warning("cluster: a message on %s does not decode: %s", message.subject, exc)
                continue
            if routed.origin == self.node_id and message.subject != self.conn_subject:
                continue  # delivered to the local members when it was sent
            try:
                self._deliver(message.subject, routed)
            except Exception:
                logger.exception("cluster: delivering a message on %s failed", message.subject)

    def _deliver(self, subject: str, routed: _Emit | _Close) -> None:
        if subject == self.conn_subject:
            conn = self._registry.connections.get(routed.target)
            targets: list[Connection] = [] if conn is None else [conn]
            topic = None
        else:
            route = self._wanted.get(subject)
            if route is None:
                return  # unsubscribed meanwhile
            targets, topic = self._members(*route)
        if isinstance(routed, _Close):
            for conn in targets:
                conn.close_nowait(routed.code, routed.reason)
            return
        skip = routed.skip
        if skip is not None:
            targets = [conn for conn in targets if conn.id != skip]
        if targets:
            data = msgspec.msgpack.decode(routed.data)
            fan_out(targets, routed.event, data, key=routed.coalesce, topic=topic)

    def _members(self, kind: InterestKind, name: str) -> tuple[list[Connection], str | None]:
        if kind is InterestKind.USER:
            return list(self._local_users.get(name, {}).values()), None
        if kind is InterestKind.ROOM:
            return list(self._registry.rooms.get(name, {}).values()), None
        return list(self._registry.topics.get(name, {}).values()), name

    # --- Sending ----------------------------------------------------------------------

    async def send(
        self,
        kind: InterestKind | None,
        name: str,
        event: str,
        data: Any,
        *,
        coalesce: str | None = None,
        skip: str | None = None,
    ) -> None:
        """Emit to the local members of ``name``, then publish for the others;
        ``kind`` None: ``name`` is a connection id."""
        self._hub.check_event(event)
        if coalesce is not None:
            check_name(coalesce, "coalescing key")
        raw = _encode_data(data)
        if kind is None:
            node_id = node_of_connection(name)
            if node_id == self.route_id:
                self._deliver(self.conn_subject, _Emit(self.node_id, name, event, raw, coalesce))
                return
            routed: _Emit | _Close = _Emit(self.node_id, name, event, raw, coalesce)
            await self._publish(self.node_subject(node_id), routed)
            return
        subject = interest_subject(self.prefix, kind, name)
        targets, topic = self._members(kind, name)
        if skip is not None:
            targets = [conn for conn in targets if conn.id != skip]
        if targets:
            fan_out(targets, event, data, key=coalesce, topic=topic)
        await self._publish(subject, _Emit(self.node_id, "", event, raw, coalesce, skip))

    async def close(
        self, kind: InterestKind | None, name: str, code: int, reason: str | None
    ) -> None:
        """Close the connection ``name`` (``kind`` None), or every connection of
        the user ``name``, on whichever nodes hold them."""
        check_close_code(code)
        if kind is None:
            node_id = node_of_connection(name)
            routed = _Close(self.node_id, name, code, reason)
            if node_id == self.route_id:
                self._deliver(self.conn_subject, routed)
            else:
                await self._publish(self.node_subject(node_id), routed)
            return
        subject = interest_subject(self.prefix, kind, name)
        for conn in self._members(kind, name)[0]:
            conn.close_nowait(code, reason)
        await self._publish(subject, _Close(self.node_id, "", code, reason))

    async def request(self, connection_id: str, name: str, data: Any, timeout: float | None) -> Any:
        """Ask the connection's client ``name`` on whichever node holds it."""
        output = self._hub.request_output(name)
        node_id = node_of_connection(connection_id)
        if node_id == self.route_id:
            conn = self._registry.connections.get(connection_id)
            if conn is None:
                raise ConnectionNotFoundError(connection_id)
            return await conn.request(name, data, timeout=timeout)
        if timeout is None:
            timeout = self._hub.settings.call_timeout
        elif isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise InvalidArgumentError(f"timeout must be a positive number of seconds: {timeout!r}")
        _encode_data(data)
        if not self.node.is_alive(node_id):
            raise ConnectionNotFoundError(connection_id)
        unlimited = math.isinf(timeout)
        wire_timeout = None if unlimited else float(timeout)
        try:
            reply = await self.node.request(
                node_id,
                SOCKET_REQUEST,
                (connection_id, name, wire_timeout, data),
                timeout=NO_LIMIT if unlimited else timeout + REQUEST_MARGIN,
            )
        except (NodeNotAliveError, NoHandlerError):
            raise ConnectionNotFoundError(connection_id) from None
        except MeshRequestTimeoutError:
            raise SocketTimeoutError(
                f"no answer to request {name!r} from node {node_id} within {timeout:g} s"
            ) from None
        except RemoteHandlerError as exc:
            raise CallFailedError(ErrorCode.INTERNAL, exc.error_message) from None
        try:
            answer = msgspec.convert(reply, _Answer)
        except msgspec.ValidationError as exc:
            raise CallFailedError(
                ErrorCode.INTERNAL, f"node {node_id} answered oddly: {exc}"
            ) from None
        if answer.kind == "ok":
            if output is Any:
                return answer.value
            try:
                return msgspec.convert(answer.value, output, strict=False)
            except msgspec.ValidationError as exc:
                raise CallFailedError(
                    ErrorCode.BAD_INPUT, f"the reply to {name!r} did not validate: {exc}"
                ) from None
        if answer.kind == "missing":
            raise ConnectionNotFoundError(connection_id)
        if answer.kind == "closed":
            raise SocketClosedError(answer.message or "the connection closed")
        if answer.kind == "timeout":
            raise SocketTimeoutError(answer.message or "no answer in time")
        raise CallFailedError(
            answer.code, answer.message, answer.details, application=answer.application
        )

    async def _serve_request(self, request: Any, sender: int) -> _Answer:
        try:
            connection_id, name, timeout, data = request
        except (TypeError, ValueError):
            raise PayloadError(f"malformed socket request from node {sender}") from None
        conn = self._registry.connections.get(connection_id)
        if conn is None:
            return _Answer("missing")
        try:
            value = await conn.request(name, data, timeout=math.inf if timeout is None else timeout)
        except SocketTimeoutError as exc:
            return _Answer("timeout", message=exc.message)
        except SocketClosedError as exc:
            return _Answer("closed", message=exc.message)
        except CallFailedError as exc:
            return _Answer(
                "error",
                code=exc.code,
                message=exc.message,
                details=exc.details,
                application=exc.application,
            )
        return _Answer("ok", value)

    async def _publish(self, subject: str, routed: _Emit | _Close) -> None:
        try:
            payload = _encoder.encode(routed)
        except (TypeError, ValueError, OverflowError) as exc:
            raise PayloadError(f"cannot encode the routed message: {exc}") from exc
        await self.node.transport.publish(subject, payload)

    # --- Running ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on this node's connection subject, then keep presence and
        subscriptions in line until cancelled."""
        subscription = await self.node.transport.open_subscription(
            self.conn_subject, into=self._inbox
        )
        self._subscriptions[self.conn_subject] = subscription
        self._hub.presence = self
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._read_inbox)
                nursery.start_soon(self._keep_subscriptions)
                nursery.start_soon(self.reporter.keep_time, self._still_here)
                nursery.start_soon(self.reporter.report_clients)
                for _ in range(PRESENCE_WORKERS):
                    nursery.start_soon(self._write_presence)
                task_status.started()
        finally:
            self._hub.presence = None
            with trio.CancelScope(shield=True):
                for sub in list(self._subscriptions.values()):
                    await sub.aclose()
                self._subscriptions.clear()


def _nothing() -> None:
    """Stands in for a removal function when there is nothing to remove."""


def _minimal(descriptor: Descriptor) -> Descriptor:
    return Descriptor(
        connection_id=descriptor.connection_id,
        user_id=descriptor.user_id,
        role=descriptor.role,
        connected_at=descriptor.connected_at,
        previous=descriptor.previous,
    )


_Order = tuple[str, str, float]
"""(connection id, the id the client named as its previous one, accept time)."""


def _is_newer(first: _Order, second: _Order) -> bool:
    """Whether ``first`` is a newer connection of a client than ``second``.

    The client's own word comes first: a connection that names the other as the
    one it had before is the newer (meshline's client always says; this needs no
    clock). Otherwise the later accept time wins, by each node's wall clock (ids
    break a tie), which nodes whose clocks disagree by more than a reconnect can
    get wrong."""
    first_id, first_previous, first_at = first
    second_id, second_previous, second_at = second
    if first_previous == second_id:
        return True
    if second_previous == first_id:
        return False
    return (first_at, first_id) > (second_at, second_id)


def _behind(entry: _Entry) -> bool:
    """Whether the entry has a write to make (once described)."""
    return entry.fields is not None and (entry.token is None or entry.written < entry.changed)


def _cluster_connection(client: RegisteredClient[Any]) -> ClusterConnection | None:
    descriptor = client.metadata
    if not isinstance(descriptor, Descriptor):
        return None
    return described_connection(client.client_id, client.node_id, descriptor)


class ClusterView:
    """The cluster's connections, read from this node's replica of the presence
    registry (``server.cluster``): no round trip, and only live nodes count.

    The replica follows the registry within milliseconds; a connection that just
    opened on another node may take that long to appear.
    """

    __slots__ = ("_link",)

    def __init__(self, link: ClusterLink) -> None:
        self._link = link

    def _alive(self, node_id: int) -> bool:
        return self._link.node.is_alive(node_id)

    def count(self) -> int:
        """How many connections the live nodes hold."""
        return self._link.index.count(self._alive)

    def connections(self) -> list[ClusterConnection]:
        """Every connection of a live node."""
        return self._link.index.connections(self._alive)

    def by_user(self, user_id: str) -> list[ClusterConnection]:
        """The user's connections, on every live node. :raises InvalidArgumentError: a bad id."""
        return self._link.index.by_user(check_name(user_id, "user id"), self._alive)

    def is_online(self, user_id: str) -> bool:
        """Whether the user has a connection on a live node."""
        return self._link.index.is_online(check_name(user_id, "user id"), self._alive)

    def watched(self) -> frozenset[str]:
        """The rooms whose presence this node's clients watch (``client.watch``)."""
        return self._link.watches.rooms

    def room(self, name: str) -> list[ClusterConnection]:
        """The room's members, on every live node. :raises InvalidArgumentError: a bad name."""
        return self._link.index.room(check_name(name, "room name"), self._alive)

    def client(self, client_id: str) -> ClusterConnection | None:
        """The client's connection, if a live node holds it."""
        found = self._link.index.get(check_name(client_id, "client id"))
        return found if found is not None and self._alive(found.node_id) else None

    def topology(self) -> dict[int, NodeSummary]:
        """Per node (the live ones, and any still holding registrations): its
        connections, its rooms, and whether it is alive."""
        return self._link.index.topology(self._link.node.alive_nodes(), self._alive)

    def in_grace(self, user_id: str) -> bool:
        """Whether the user has no connection left anywhere but is still within
        the offline grace period (not reported offline yet)."""
        return self._link.reporter.users.in_grace(check_name(user_id, "user id"))

    @property
    def returns(self) -> int:
        """Connections of this node whose client connected again, anywhere, within
        the offline grace period (so no departure was reported for them)."""
        return self._link.reporter.returns

    def nodes(self) -> frozenset[int]:
        """The live nodes, as this node's membership view has them."""
        return self._link.node.alive_nodes()

    def listening(self, kind: str, name: str) -> bool:
        """Whether this node listens to the subject of the user, room or topic
        ``name`` (``kind``: ``"user"``, ``"room"`` or ``"topic"``): it does while
        it holds a local member, once the subscription is in place.

        :raises InvalidArgumentError: an unknown kind, or a bad name.
        """
        try:
            interest = InterestKind(kind)
        except ValueError:
            raise InvalidArgumentError(f"kind must be user, room or topic: {kind!r}") from None
        return self._link.is_listening(interest, check_name(name, f"{kind} name"))

    @property
    def received(self) -> int:
        """How many routed messages (emits and closes sent by any node) this node
        received: a node with no member of a room receives none of its traffic."""
        return self._link.received

    @property
    def dropped(self) -> int:
        """Routed messages this node dropped because it could not keep up (logged)."""
        return self._link.dropped

    def __repr__(self) -> str:
        return f"<ClusterView node={self._link.node_id} connections={self.count()}>"


class ConnectionTarget:
    """One connection, on whichever node holds it (``server.to_conn(id)``).

    The connection id names its node, so delivery goes straight to that node's
    subject. At most once: a connection that closed meanwhile, or a node that is
    gone, loses the event silently.
    """

    __slots__ = ("_link", "connection_id")

    def __init__(self, link: ClusterLink, connection_id: str) -> None:
        node_of_connection(connection_id)
        self._link = link
        self.connection_id = connection_id

    async def emit(self, event: str, data: Any = None, *, coalesce: str | None = None) -> None:
        """Queue the event for the connection.

        Waits only while the transport's outgoing buffer is full. Cancellation
        before it returns: not sent.

        :raises InvalidArgumentError: an undeclared event name, or a bad key.
        :raises FrameEncodeError: ``data`` cannot be encoded.
        :raises TransportError: the transport is closed.
        """
        await self._link.send(None, self.connection_id, event, data, coalesce=coalesce)

    async def close(self, code: int = CloseCode.KICKED, reason: str | None = None) -> None:
        """Close the connection with ``code`` (4501 kicked by default: terminal).
        Returns once the order is sent, not once the connection closed."""
        await self._link.close(None, self.connection_id, code, reason)

    async def request(self, name: str, data: Any = None, *, timeout: float | None = None) -> Any:
        """Send the server-to-client request ``name`` to the connection's client, on
        whichever node holds it; return its reply, decoded into the declared
        output type.

        ``timeout`` as for :meth:`Connection.request <meshline.Connection.request>`
        (None: the server's ``call_timeout``).

        Cancellation: the request is cancelled on the owning node, and the client
        is sent a cancel.

        :raises ConnectionNotFoundError: no node holds the connection (at once: its
            node is not alive, or answers that it does not have it).
        :raises SocketClosedError: the connection closed mid-request (at once).
        :raises SocketTimeoutError: no answer within ``timeout``.
        :raises CallFailedError: the client answered with an error (its code and
            message), or a reply that does not fit the declared output type.
        :raises InvalidArgumentError: ``name`` is not declared, or a bad timeout.
        :raises FrameEncodeError: ``data`` cannot be encoded.
        """
        return await self._link.request(self.connection_id, name, data, timeout)

    def __repr__(self) -> str:
        return f"<ConnectionTarget {self.connection_id}>"


class _NamedTarget:
    __slots__ = ("_link", "name")
    _kind: InterestKind

    def __init__(self, link: ClusterLink, name: str) -> None:
        self._link = link
        self.name = check_name(name, f"{self._kind.value} name")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class _EmittingTarget(_NamedTarget):
    __slots__ = ()

    async def emit(
        self,
        event: str,
        data: Any = None,
        *,
        coalesce: str | None = None,
        skip: str | None = None,
    ) -> None:
        """Queue the event for every member (but ``skip``, a connection id): the
        members on this node at once, the others through the nodes that hold
        them, and no other node. See :meth:`ConnectionTarget.emit` for what it
        raises."""
        await self._link.send(self._kind, self.name, event, data, coalesce=coalesce, skip=skip)


class UserTarget(_EmittingTarget):
    """Every connection of one user, on every node (``server.to_user(user_id)``)."""

    __slots__ = ()
    _kind = InterestKind.USER

    async def disconnect(self, code: int = CloseCode.KICKED, reason: str | None = None) -> None:
        """Close every connection of the user with ``code`` (4501 kicked by
        default: terminal). Returns once the order is sent."""
        await self._link.close(self._kind, self.name, code, reason)


class RoomTarget(_EmittingTarget):
    """Every member of one room, on every node (``server.to_room(name)``)."""

    __slots__ = ()
    _kind = InterestKind.ROOM


class TopicTarget(_NamedTarget):
    """Every subscriber of one topic, on every node (``server.to_topic(name)``)."""

    __slots__ = ()
    _kind = InterestKind.TOPIC

    async def publish(self, event: str, data: Any = None, *, coalesce: str | None = None) -> None:
        """Queue the event, marked with the topic, for every subscriber. Only the
        nodes with subscribers receive it. See :meth:`ConnectionTarget.emit`."""
        await self._link.send(self._kind, self.name, event, data, coalesce=coalesce)


ClusterOrphanHandler = Callable[[int, list[ClusterConnection]], Awaitable[None] | None]


@asynccontextmanager
async def open_cluster_link(
    mesh: MeshOptions,
    hub: ConnectionHub,
    registry: LocalRegistry,
    *,
    describe: Callable[[Connection], Any] | None = None,
    on_orphaned: ClusterOrphanHandler | None = None,
    on_restored: ClusterOrphanHandler | None = None,
    on_user_online: UserHook | None = None,
    on_user_offline: UserHook | None = None,
    on_client_connected: ClientConnectedHook | None = None,
    on_client_disconnected: ClientDisconnectedHook | None = None,
    offline_grace: float = 0.0,
    route_id: int | None = None,
    presence_fields: frozenset[str] = frozenset(),
) -> AsyncIterator[ClusterLink]:
    """Join the cluster ``mesh`` names, for the block (see the module).

    The server's connections must not open before this yields (its node id names
    them). ``presence_fields`` names the described fields that clients watching
    a room's presence see. ``route_id`` is the node id the server's connection ids name when it
    is not the mesh's (a server on a private mesh given its own ``node_id``).
    Leaving the block removes this node's registrations and leaves the mesh.
    """
    link: ClusterLink | None = None

    async def client_invoke(client_id: str, name: str, data: Any, timeout: float) -> Any:
        assert link is not None
        slot = link._slots.get(client_id)
        if slot is None or slot.current is None:
            raise LookupError(f"client {client_id!r} is not connected here")
        return await slot.current.conn.request(name, data, timeout=timeout)

    def passed_on(
        hook: ClusterOrphanHandler | None,
    ) -> Callable[[int, list[RegisteredClient[Any]]], Awaitable[None]] | None:
        if hook is None:
            return None

        async def call(node_id: int, clients: list[RegisteredClient[Any]]) -> None:
            assert hook is not None
            found = [conn for conn in map(_cluster_connection, clients) if conn is not None]
            if not found:  # no record was a connection's
                return
            result = hook(node_id, found)
            if inspect.isawaitable(result):
                await result

        return call

    options: NodeOptions = dict(mesh.node)  # type: ignore[assignment]
    async with open_client_service(
        mesh.transport,
        mesh.key,
        client_invoke=client_invoke,
        metadata_type=Descriptor,
        backend=mesh.backend,
        on_orphaned=passed_on(on_orphaned),
        on_restored=passed_on(on_restored),
        reassert_interval=mesh.reassert_interval,
        **options,
    ) as service:
        node = service.node
        reporter = PresenceReporter(
            grace=offline_grace,
            alive=node.is_alive,
            on_user_online=on_user_online,
            on_user_offline=on_user_offline,
            on_client_connected=on_client_connected,
            on_client_disconnected=on_client_disconnected,
        )
        link = ClusterLink(
            service,
            hub,
            registry,
            describe=describe,
            reporter=reporter,
            route_id=route_id,
            presence_fields=presence_fields,
        )
        node.register_handler(SOCKET_REQUEST, link._serve_request)
        stop_feed = link._feed.add_change_listener(link._on_change)
        for record in await service.client_registry.backend.list_clients():
            link._index_change(record.client_id, record)
        reporter.load(link.index.connections(node.is_alive))
        stop_membership = node.add_membership_handler(link.on_membership)
        reports_users = on_user_online is not None or on_user_offline is not None
        stop_leading = node.add_leader_duty(link._lead) if reports_users else _nothing
        registry.observer = link
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(link.run)
                try:
                    yield link
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            registry.observer = None
            stop_leading()
            stop_membership()
            stop_feed()
