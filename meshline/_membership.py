"""The membership view: who is alive, and who holds the leader lease (sans-IO).

The view is fed the entries of a KV watch and the current time, and answers with
the events those changes imply. It does no I/O and reads no clock, so tests drive it
directly.

A node counts as alive from the moment its liveness key is seen until either

* the key is deleted, purged or expires (the server reports it), or
* no refresh of the key has been seen for the node's own TTL.

The second rule makes detection time independent of how late the server reports an
expiry: a node that stops refreshing is declared dead ``ttl`` seconds after the last
refresh this view saw, at the latest. A node declared dead that refreshes again (it
was paused, or the network was) comes back up.
"""

from __future__ import annotations

import enum
import math

import attrs
import msgspec

from ._node_wire import LeaderRecord, NodeRecord
from ._transport import KVEntry, KVOperation

__all__ = [
    "LEADER_KEY",
    "NODE_KEY_PREFIX",
    "MembershipEvent",
    "MembershipEventKind",
    "MembershipView",
    "node_key",
]

NODE_KEY_PREFIX = "nodes."
LEADER_KEY = "leader"


def node_key(node_id: int) -> str:
    return f"{NODE_KEY_PREFIX}{node_id}"


class MembershipEventKind(enum.StrEnum):
    """What a :class:`MembershipEvent` reports."""

    UP = "up"
    """A node joined, or came back after being declared dead."""

    DOWN = "down"
    """A node left, or was declared dead."""

    LEADER = "leader"
    """The leader lease changed hands. ``node_id`` is the new holder, or None while
    the lease is vacant."""

    REASSERTED = "reasserted"
    """This node found its own liveness key gone (it expired during a pause, or
    another node removed it) and wrote it again. Other nodes may have declared it
    dead and cleaned up after it in between."""


@attrs.frozen
class MembershipEvent:
    """One change in a node's view of the mesh."""

    kind: MembershipEventKind
    node_id: int | None


@attrs.define
class _Liveness:
    revision: int
    deadline: float


_node_record = msgspec.msgpack.Decoder(NodeRecord)
_leader_record = msgspec.msgpack.Decoder(LeaderRecord)


def _parse_node_id(key: str) -> int | None:
    if not key.startswith(NODE_KEY_PREFIX):
        return None
    digits = key[len(NODE_KEY_PREFIX) :]
    return int(digits) if digits.isdigit() else None


class MembershipView:
    """Alive nodes and the leader lease, as seen through one KV watch."""

    def __init__(self) -> None:
        self._alive: dict[int, _Liveness] = {}
        self._declared_dead: dict[int, int] = {}
        """Nodes whose refreshes stopped, with the last revision seen from them."""
        self.leader_id: int | None = None
        self.leader_revision = 0
        self.leader_seen_at = -math.inf
        self.leader_ttl = 0

    @property
    def alive(self) -> frozenset[int]:
        return frozenset(self._alive)

    def is_alive(self, node_id: int) -> bool:
        return node_id in self._alive

    def next_deadline(self) -> float:
        """When :meth:`expire` next has something to do (``inf`` if never)."""
        return min((liveness.deadline for liveness in self._alive.values()), default=math.inf)

    def load(self, snapshot: list[KVEntry], now: float) -> list[MembershipEvent]:
        """Replace the view with a watch snapshot; return the differences as events."""
        events: list[MembershipEvent] = []
        present: dict[int, KVEntry] = {}
        leader_entry: KVEntry | None = None
        for entry in snapshot:
            if entry.key == LEADER_KEY:
                leader_entry = entry
            elif (node_id := _parse_node_id(entry.key)) is not None:
                present[node_id] = entry
        for node_id in sorted(set(self._alive) - set(present)):
            del self._alive[node_id]
            events.append(MembershipEvent(MembershipEventKind.DOWN, node_id))
        self._declared_dead = {
            node_id: revision
            for node_id, revision in self._declared_dead.items()
            if node_id in present
        }
        for node_id in sorted(present):
            events.extend(self._node_written(node_id, present[node_id], now))
        if leader_entry is None:
            events.extend(self._leader_vacated())
        else:
            events.extend(self._leader_written(leader_entry, now))
        return events

    def apply(self, entry: KVEntry, now: float) -> list[MembershipEvent]:
        """Apply one change from the watch; return the events it implies."""
        removed = entry.operation is not KVOperation.PUT
        if entry.key == LEADER_KEY:
            return self._leader_vacated() if removed else self._leader_written(entry, now)
        node_id = _parse_node_id(entry.key)
        if node_id is None:
            return []
        if removed:
            self._declared_dead.pop(node_id, None)
            if self._alive.pop(node_id, None) is None:
                return []
            return [MembershipEvent(MembershipEventKind.DOWN, node_id)]
        return self._node_written(node_id, entry, now)

    def expire(self, now: float) -> list[MembershipEvent]:
        """Declare dead every node whose refresh deadline has passed."""
        events = []
        for node_id, liveness in sorted(self._alive.items()):
            if liveness.deadline <= now:
                del self._alive[node_id]
                self._declared_dead[node_id] = liveness.revision
                events.append(MembershipEvent(MembershipEventKind.DOWN, node_id))
        return events

    def _node_written(self, node_id: int, entry: KVEntry, now: float) -> list[MembershipEvent]:
        try:
            ttl = _node_record.decode(entry.value).ttl
        except msgspec.MsgspecError:
            return []
        if self._declared_dead.get(node_id) == entry.revision:
            return []  # the same write that already went stale; still dead
        self._declared_dead.pop(node_id, None)
        was_alive = node_id in self._alive
        self._alive[node_id] = _Liveness(entry.revision, now + ttl)
        return [] if was_alive else [MembershipEvent(MembershipEventKind.UP, node_id)]

    def _leader_written(self, entry: KVEntry, now: float) -> list[MembershipEvent]:
        try:
            record = _leader_record.decode(entry.value)
        except msgspec.MsgspecError:
            return []
        changed = record.node_id != self.leader_id
        self.leader_id = record.node_id
        self.leader_revision = entry.revision
        self.leader_seen_at = now
        self.leader_ttl = record.ttl
        return [MembershipEvent(MembershipEventKind.LEADER, record.node_id)] if changed else []

    def _leader_vacated(self) -> list[MembershipEvent]:
        was_held = self.leader_id is not None
        self.leader_id = None
        self.leader_revision = 0
        self.leader_seen_at = -math.inf
        self.leader_ttl = 0
        return [MembershipEvent(MembershipEventKind.LEADER, None)] if was_held else []
