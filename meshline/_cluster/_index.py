"""The cluster's connections as this node sees them: a sans-IO index of the presence
registry's replica, by client, user, room and node.

The cluster layer feeds it every change the registry's replica makes
(:meth:`ClusterIndex.put` and :meth:`ClusterIndex.remove`); queries answer from it
without a round trip. Rooms and users are indexed, so :meth:`ClusterIndex.room`
and :meth:`ClusterIndex.by_user` cost the size of their answer, not of the
cluster. Every query takes ``alive`` (a node id -> bool predicate): a dead node's
connections leave the answers at once, before the leader's cleanup removes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import attrs
import msgspec

__all__ = [
    "ClusterConnection",
    "ClusterIndex",
    "Descriptor",
    "NodeSummary",
    "described_connection",
]

Alive = Callable[[int], bool]


class Descriptor(msgspec.Struct, array_like=True, frozen=True):
    """A connection's registry metadata on the wire (the record adds the client id,
    the node and the registration time)."""

    connection_id: str
    user_id: str | None
    role: str
    connected_at: float
    rooms: tuple[str, ...] = ()
    fields: dict[str, Any] = {}
    previous: str = ""
    """The connection id the client had before this one, as its hello said."""


_EMPTY: Mapping[str, Any] = MappingProxyType({})


@attrs.frozen
class ClusterConnection:
    """A connection somewhere in the cluster, as the presence registry describes it.

    ``fields`` is what the server's ``describe(conn)`` hook returned when the
    connection opened (empty without the hook). ``connected_at`` is the wall clock
    (``time.time()``) when its WebSocket was accepted.
    """

    connection_id: str
    client_id: str
    node_id: int
    user_id: str | None
    role: str
    connected_at: float
    rooms: frozenset[str] = frozenset()
    fields: Mapping[str, Any] = _EMPTY
    previous_connection_id: str = ""
    """The connection the client had before this one, as it said when it connected
    ("" for a first connection, or a client that does not say)."""


def described_connection(client_id: str, node_id: int, descriptor: Descriptor) -> ClusterConnection:
    """The connection a registration describes: its record's client id and node,
    and its descriptor."""
    return ClusterConnection(
        connection_id=descriptor.connection_id,
        client_id=client_id,
        node_id=node_id,
        user_id=descriptor.user_id,
        role=descriptor.role,
        connected_at=descriptor.connected_at,
        rooms=frozenset(descriptor.rooms),
        fields=descriptor.fields,
        previous_connection_id=descriptor.previous,
    )


@attrs.frozen
class NodeSummary:
    """One node in :meth:`ClusterView.topology <meshline.ClusterView.topology>`."""

    node_id: int
    connections: int
    rooms: frozenset[str]
    """The rooms with at least one member on the node."""
    alive: bool


def _add(index: dict[Any, dict[str, None]], key: Any, client_id: str) -> None:
    index.setdefault(key, {})[client_id] = None


def _discard(index: dict[Any, dict[str, None]], key: Any, client_id: str) -> None:
    members = index.get(key)
    if members is not None:
        members.pop(client_id, None)
        if not members:
            del index[key]


class ClusterIndex:
    """Every registered connection, indexed (see the module)."""

    def __init__(self) -> None:
        self._by_client: dict[str, ClusterConnection] = {}
        self._by_user: dict[str, dict[str, None]] = {}
        self._by_room: dict[str, dict[str, None]] = {}
        self._by_node: dict[int, dict[str, None]] = {}

    def __len__(self) -> int:
        """Every connection indexed, live nodes' or not."""
        return len(self._by_client)

    def put(self, conn: ClusterConnection) -> None:
        """Index ``conn`` as its client's registration, replacing the one before."""
        client_id = conn.client_id
        old = self._by_client.get(client_id)
        if old is not None:
            self._unindex(old)
        self._by_client[client_id] = conn
        if conn.user_id is not None:
            _add(self._by_user, conn.user_id, client_id)
        for room in conn.rooms:
            _add(self._by_room, room, client_id)
        _add(self._by_node, conn.node_id, client_id)

    def remove(self, client_id: str) -> ClusterConnection | None:
        """Forget the client's registration; return it (None if there was none)."""
        old = self._by_client.pop(client_id, None)
        if old is not None:
            self._unindex(old)
        return old

    def _unindex(self, conn: ClusterConnection) -> None:
        client_id = conn.client_id
        if conn.user_id is not None:
            _discard(self._by_user, conn.user_id, client_id)
        for room in conn.rooms:
            _discard(self._by_room, room, client_id)
        _discard(self._by_node, conn.node_id, client_id)

    def get(self, client_id: str) -> ClusterConnection | None:
        """The client's registration, whatever its node's state."""
        return self._by_client.get(client_id)

    def of_node(self, node_id: int) -> list[ClusterConnection]:
        """The node's registrations, whatever its state."""
        return [self._by_client[client_id] for client_id in self._by_node.get(node_id, ())]

    def _live(self, client_ids: Iterable[str], alive: Alive) -> list[ClusterConnection]:
        found = []
        for client_id in client_ids:
            conn = self._by_client[client_id]
            if alive(conn.node_id):
                found.append(conn)
        return found

    def count(self, alive: Alive) -> int:
        return sum(len(clients) for node, clients in self._by_node.items() if alive(node))

    def connections(self, alive: Alive) -> list[ClusterConnection]:
        return [conn for conn in self._by_client.values() if alive(conn.node_id)]

    def by_user(self, user_id: str, alive: Alive) -> list[ClusterConnection]:
        return self._live(self._by_user.get(user_id, ()), alive)

    def is_online(self, user_id: str, alive: Alive) -> bool:
        return any(
            alive(self._by_client[client_id].node_id)
            for client_id in self._by_user.get(user_id, ())
        )

    def room(self, name: str, alive: Alive) -> list[ClusterConnection]:
        return self._live(self._by_room.get(name, ()), alive)

    def topology(self, nodes: Iterable[int], alive: Alive) -> dict[int, NodeSummary]:
        """One summary per node in ``nodes`` and per node holding connections."""
        summaries = {}
        for node in set(nodes) | set(self._by_node):
            clients = self._by_node.get(node, {})
            rooms = frozenset(
                room for client_id in clients for room in self._by_client[client_id].rooms
            )
            summaries[node] = NodeSummary(node, len(clients), rooms, alive(node))
        return dict(sorted(summaries.items()))
