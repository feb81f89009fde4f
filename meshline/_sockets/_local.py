"""Rooms and topics on this node, and the synchronous introspection of its connections.

Rooms are the server's: it joins and leaves connections (:meth:`Connection.join
<meshline.Connection.join>`). Topics are the clients': a client subscribes with a
``subscribe`` frame, which the server's ``authorize_topic`` hook may refuse. Both
are plain indexes of the connections on this node, kept by the
:class:`LocalRegistry`; :class:`LocalView`, :class:`Room` and :class:`Topic` are
the read-only (and emitting) faces the application sees.

Emitting to a room or a topic encodes the event once per encoding and queues the
same message to every member's outgoing queue: it never waits on any socket, so a
slow member never holds up the others (its own backpressure policy applies to
it alone).

Everything here is synchronous and runs on the Trio thread; there is nothing to
cancel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from ._connection import fan_out
from ._roles import check_name

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ["LocalRegistry", "LocalView", "RegistryObserver", "Room", "Topic"]


class RegistryObserver(Protocol):
    """Hears every change to a :class:`LocalRegistry`, synchronously, after it is
    made (the cluster layer keeps the presence registry and its subscriptions
    in line with it)."""

    def attached(self, conn: Connection) -> None: ...

    def detached(self, conn: Connection) -> None:
        """``conn`` left every room and topic (they are still on ``conn``)."""

    def joined(self, conn: Connection, room: str) -> None: ...

    def left(self, conn: Connection, room: str) -> None: ...

    def subscribed(self, conn: Connection, topic: str) -> None: ...

    def unsubscribed(self, conn: Connection, topic: str) -> None: ...


class _MembersView(Mapping[str, frozenset[str]]):
    """A live, read-only view of an index: name -> frozenset of connection ids."""

    __slots__ = ("_index",)

    def __init__(self, index: dict[str, dict[str, Connection]]) -> None:
        self._index = index

    def __getitem__(self, name: str) -> frozenset[str]:
        return frozenset(self._index[name])

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._index))

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __repr__(self) -> str:
        return repr({name: sorted(members) for name, members in self._index.items()})


class LocalRegistry:
    """The connections visible on this node, and their rooms and topics.

    The connection machinery keeps it up to date: a connection is attached once
    its ``on_connect`` hook returned, and detached when it ends. Applications use
    :class:`LocalView` instead.

    ``check_event`` validates an event name before a room or topic emit (it raises
    :class:`~meshline.InvalidArgumentError` for a name the server does not declare).
    """

    def __init__(self, check_event: Callable[[str], None]) -> None:
        self.check_event = check_event
        self.connections: dict[str, Connection] = {}
        self.rooms: dict[str, dict[str, Connection]] = {}
        self.topics: dict[str, dict[str, Connection]] = {}
        self.observer: RegistryObserver | None = None

    def attach(self, conn: Connection, rooms: frozenset[str], topics: frozenset[str]) -> None:
        """Make ``conn`` visible, in ``rooms`` and ``topics``."""
        self.connections[conn.id] = conn
        for room in rooms:
            self.rooms.setdefault(room, {})[conn.id] = conn
        for topic in topics:
            self.topics.setdefault(topic, {})[conn.id] = conn
        if self.observer is not None:
            self.observer.attached(conn)

    def detach(self, conn: Connection) -> None:
        """Remove ``conn`` from everything (nothing happens if it was not attached)."""
        if self.connections.pop(conn.id, None) is None:
            return
        for room in conn.rooms:
            self._remove(self.rooms, room, conn)
        for topic in conn.topics:
            self._remove(self.topics, topic, conn)
        if self.observer is not None:
            self.observer.detached(conn)

    def add_to_room(self, room: str, conn: Connection) -> None:
        if conn.id in self.connections:
            self.rooms.setdefault(room, {})[conn.id] = conn
            if self.observer is not None:
                self.observer.joined(conn, room)

    def remove_from_room(self, room: str, conn: Connection) -> None:
        if self._remove(self.rooms, room, conn) and self.observer is not None:
            self.observer.left(conn, room)

    def add_to_topic(self, topic: str, conn: Connection) -> None:
        if conn.id in self.connections:
            self.topics.setdefault(topic, {})[conn.id] = conn
            if self.observer is not None:
                self.observer.subscribed(conn, topic)

    def remove_from_topic(self, topic: str, conn: Connection) -> None:
        if self._remove(self.topics, topic, conn) and self.observer is not None:
            self.observer.unsubscribed(conn, topic)

    @staticmethod
    def _remove(index: dict[str, dict[str, Connection]], name: str, conn: Connection) -> bool:
        members = index.get(name)
        if members is None or members.pop(conn.id, None) is None:
            return False
        if not members:
            del index[name]
        return True


class _Members:
    """What rooms and topics share: a live view of some connections on this node,
    read from the registry at each access."""

    __slots__ = ("_registry", "name")

    def __init__(self, registry: LocalRegistry, name: str) -> None:
        self._registry = registry
        self.name = name

    def _members(self) -> dict[str, Connection]:
        raise NotImplementedError

    @property
    def connections(self) -> tuple[Connection, ...]:
        """The member connections on this node, in the order they joined."""
        return tuple(self._members().values())

    @property
    def ids(self) -> frozenset[str]:
        """The ids of the member connections on this node."""
        return frozenset(self._members())

    @property
    def size(self) -> int:
        """How many member connections there are on this node."""
        return len(self._members())

    def __len__(self) -> int:
        return self.size

    def __contains__(self, conn: object) -> bool:
        """Whether a connection (or a connection id) is a member."""
        conn_id = conn if isinstance(conn, str) else getattr(conn, "id", None)
        return conn_id in self._members()


class Room(_Members):
    """The members of one room on this node, and a way to emit to them all.

    A view: it reads the registry at each access, so keeping one around is fine.
    """

    __slots__ = ()

    def _members(self) -> dict[str, Connection]:
        return self._registry.rooms.get(self.name, {})

    def emit(
        self,
        event: str,
        data: Any = None,
        *,
        skip: Connection | str | None = None,
        coalesce: str | None = None,
    ) -> int:
        """Queue the event ``event`` to every member (but ``skip``, a connection or
        its id); returns how many connections it was queued to.

        Encoded once per encoding; never waits (see the module). ``coalesce`` is
        the coalescing key for backpressure ``latest``. Members closing meanwhile
        are skipped; a member whose backpressure policy refuses the event is
        handled by that policy alone.

        :raises InvalidArgumentError: an event name the server does not declare.
        :raises FrameEncodeError: ``data`` cannot be encoded.
        """
        self._registry.check_event(event)
        skip_id = skip if isinstance(skip, str) or skip is None else skip.id
        members = self._members()
        targets = [conn for conn_id, conn in members.items() if conn_id != skip_id]
        return fan_out(targets, event, data, key=coalesce)

    def __repr__(self) -> str:
        return f"<Room {self.name!r} size={self.size}>"


class Topic(_Members):
    """The subscribers of one topic on this node, and a way to publish to them.

    A view: it reads the registry at each access.
    """

    __slots__ = ()

    def _members(self) -> dict[str, Connection]:
        return self._registry.topics.get(self.name, {})

    def publish(self, event: str, data: Any = None, *, coalesce: str | None = None) -> int:
        """Queue the event ``event`` to every subscriber (marked with this topic);
        returns how many connections it was queued to.

        Never waits. :raises InvalidArgumentError: an undeclared event name.
        :raises FrameEncodeError: ``data`` cannot be encoded.
        """
        self._registry.check_event(event)
        return fan_out(list(self._members().values()), event, data, key=coalesce, topic=self.name)

    def __repr__(self) -> str:
        return f"<Topic {self.name!r} size={self.size}>"


class LocalView:
    """Synchronous introspection of the connections on this node (``server.local``).

    Every attribute is a live read-only view: read it again to see changes.
    A connection appears once its ``on_connect`` hook returned, and disappears
    as soon as it starts closing down.
    """

    __slots__ = ("_registry",)

    def __init__(self, registry: LocalRegistry) -> None:
        self._registry = registry

    @property
    def connections(self) -> Mapping[str, Connection]:
        """Connection id -> :class:`~meshline.Connection`."""
        return MappingProxyType(self._registry.connections)

    @property
    def rooms(self) -> Mapping[str, frozenset[str]]:
        """Room name -> the ids of its members, for every room with a member here."""
        return _MembersView(self._registry.rooms)

    @property
    def topics(self) -> Mapping[str, frozenset[str]]:
        """Topic name -> the ids of its subscribers, for every topic with one here."""
        return _MembersView(self._registry.topics)

    def connection(self, connection_id: str) -> Connection | None:
        """The connection with this id on this node, or None."""
        return self._registry.connections.get(connection_id)

    def room(self, name: str) -> Room:
        """The room ``name`` (empty if nobody is in it).

        :raises InvalidArgumentError: a bad name.
        """
        return Room(self._registry, check_name(name, "room name"))

    def topic(self, name: str) -> Topic:
        """The topic ``name``. :raises InvalidArgumentError: a bad name."""
        return Topic(self._registry, check_name(name, "topic name"))

    def __len__(self) -> int:
        return len(self._registry.connections)

    def __repr__(self) -> str:
        registry = self._registry
        return (
            f"<LocalView connections={len(registry.connections)} rooms={len(registry.rooms)}"
            f" topics={len(registry.topics)}>"
        )
