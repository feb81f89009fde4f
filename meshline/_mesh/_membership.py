"""The membership view: who is alive, and who holds the leader lease (sans-IO).

The view is fed the entries of a KV watch and the current time, and answers with
the events those changes imply. It does no I/O and reads no clock, so tests drive it
directly.

A node counts as alive from the moment its liveness key is seen until either

* the key is deleted (a graceful leave, believed at once), or
* no refresh of the key has been seen for the node's own TTL (its *deadline*).

Detection time is thus independent of how late the server reports an expiry, and
an expiry the server reports (``PURGE``), or a key missing from a reloaded snapshot,
kills nobody by itself: a server that just took over a stream, or a snapshot read
from a server still catching up, can be wrong about a node whose refreshes are on
their way. Such a node is dead at its deadline like any other. A node declared dead
that refreshes again (it was paused, or the network was) comes back up.

A silent peer is declared dead only once this node's own heartbeat has come back
through the watch after the peer's deadline: that proves writes were landing and the
watch was current when the peer should have refreshed. Until then the view asks for
a confirming heartbeat (:meth:`MembershipView.awaiting_confirmation`). A heartbeat of
this node's that comes back late (more than two intervals after the one before)
means writes were held up, maybe everyone's, so every node gets a whole TTL.

A view that may be stale declares nobody dead. It is stale while the transport is
disconnected, and when this node's own heartbeat has not come back through the
watch within its TTL (the watch is silent, or writes do not land). After a
reconnect, and when it stops being stale, it also *holds* for a TTL: every node gets
that long to refresh or re-assert before anyone is declared dead.
"""

from __future__ import annotations

import enum
import math

import attrs
import msgspec

from .._transport._seam import KVEntry, KVOperation
from ._wire import LeaderRecord, NodeRecord

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
    incarnation: int | None = None
    """For ``UP``, ``DOWN`` and ``REASSERTED``: the node's incarnation as last seen.
    A node's incarnation grows each time it re-asserts itself after others may have
    declared it dead; cleanup after a ``DOWN`` touches only that incarnation's state."""


@attrs.define
class _Liveness:
    revision: int
    deadline: float
    incarnation: int


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
        self._incarnations: dict[int, int] = {}
        """The last incarnation seen per node, dead ones included."""
        self.own_id: int | None = None
        """This node's id: its own refreshes prove the watch is current."""
        self.own_interval = math.inf
        """Seconds between this node's heartbeats: one that comes back more than two
        intervals after the one before was held up."""
        self._own_seen_at = -math.inf
        self._own_ttl = math.inf
        self.held_up_heartbeats = 0
        """How many of this node's own heartbeats came back late (more than two
        intervals after the one before) or after a stale spell: each made the view
        hold for a TTL. The I/O around the view logs each one."""
        self.held_up_gap = 0.0
        """Seconds between the last held-up heartbeat and the one before it."""
        self._disconnected = False
        self._hold_until = -math.inf
        self.leader_id: int | None = None
        self.leader_revision = 0
        self.leader_seen_at = -math.inf
        self.leader_ttl = 0

    @property
    def alive(self) -> frozenset[int]:
        return frozenset(self._alive)

    def is_alive(self, node_id: int) -> bool:
        return node_id in self._alive

    def incarnation_of(self, node_id: int) -> int | None:
        """The incarnation last seen from ``node_id`` (alive or dead), if any."""
        return self._incarnations.get(node_id)

    # ------------------------------------------------------------------ staleness

    def disconnected(self) -> None:
        """The transport lost its connection: the view is stale until reconnected."""
        self._disconnected = True

    def reconnected(self, now: float, grace: float) -> None:
        """The transport is back: judge nobody for ``grace`` seconds from ``now``."""
        self._disconnected = False
        self.hold(now + grace)

    def hold(self, until: float) -> None:
        """Declare nobody dead before ``until``."""
        self._hold_until = max(self._hold_until, until)

    def is_stale(self, now: float) -> bool:
        """Whether this view may be out of date: disconnected, or this node's own
        refreshes have not come back through the watch within its TTL."""
        return self._disconnected or (
            self.own_id is not None and now >= self._own_seen_at + self._own_ttl
        )

    def own_silent_at(self) -> float:
        """When the watch will have been silent about this node's own heartbeats for
        a whole TTL (``inf`` before the first one was seen)."""
        if self.own_id is None:
            return math.inf
        return self._own_seen_at + self._own_ttl

    def watch_is_silent(self, now: float) -> bool:
        """Whether the watch, though connected, has not shown this node's own
        heartbeat for a whole TTL: the watch may be broken (nats-py's ordered
        consumer stays silent for a while after its stream moved to another server),
        or this node's writes are not landing."""
        return not self._disconnected and now >= self.own_silent_at()

    def is_trustworthy(self, now: float) -> bool:
        """Whether the view may declare nodes dead now: not stale, and not holding."""
        return now >= self._hold_until and not self.is_stale(now)

    def _confirmed(self, deadline: float) -> bool:
        """Whether a peer silent past ``deadline`` may be declared dead: this
        node's own heartbeat came back at or after it (or there is no own node)."""
        return self.own_id is None or self._own_seen_at >= deadline

    def awaiting_confirmation(self, now: float) -> bool:
        """Whether a peer is past its deadline and would be declared dead once this
        node's own heartbeat comes back after that deadline: beat now to confirm."""
        if not self.is_trustworthy(now):
            return False
        return any(
            liveness.deadline <= now and not self._confirmed(liveness.deadline)
            for liveness in self._alive.values()
        )

    def next_deadline(self, now: float) -> float:
        """When :meth:`expire` next has something to do (``inf`` if never, or not
        before the view changes)."""
        if self._disconnected:
            return math.inf
        earliest = min(
            (
                liveness.deadline
                for liveness in self._alive.values()
                if liveness.deadline > now or self._confirmed(liveness.deadline)
            ),
            default=math.inf,
        )
        if self.own_id is not None:
            own_stale_at = self._own_seen_at + self._own_ttl
            if own_stale_at <= now:
                return math.inf  # stale until the own heartbeat comes back: a change
            earliest = min(earliest, max(own_stale_at, self._hold_until))
        return max(earliest, self._hold_until)

    # ------------------------------------------------------------------ feeding

    def load(self, snapshot: list[KVEntry], now: float) -> list[MembershipEvent]:
        """Replace the view with a watch snapshot; return the differences as events.

        A node missing from the snapshot stays in the view until its deadline has
        passed and been confirmed, as if it had stopped refreshing: a snapshot can be
        short (read from a server that is still catching up).
        """
        events: list[MembershipEvent] = []
        present: dict[int, KVEntry] = {}
        leader_entry: KVEntry | None = None
        for entry in snapshot:
            if entry.key == LEADER_KEY:
                leader_entry = entry
            elif (node_id := _parse_node_id(entry.key)) is not None:
                present[node_id] = entry
        for node_id in sorted(present):
            events.extend(self._node_written(node_id, present[node_id], now))
        self._declared_dead = {
            node_id: revision
            for node_id, revision in self._declared_dead.items()
            if node_id in present
        }
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
        if not removed:
            return self._node_written(node_id, entry, now)
        self._declared_dead.pop(node_id, None)
        if node_id not in self._alive or entry.operation is KVOperation.PURGE:
            # An expiry the server reports is left to the deadline: a server that
            # just took over a stream may expire keys whose refreshes are still
            # on their way.
            return []
        return [self._declare_dead(node_id, None)]

    def expire(self, now: float) -> list[MembershipEvent]:
        """Declare dead every node whose refresh deadline has passed, confirmed by
        this node's own heartbeat since, if the view is trustworthy; otherwise
        nothing."""
        if not self.is_trustworthy(now):
            return []
        return [
            self._declare_dead(node_id, liveness.revision)
            for node_id, liveness in sorted(self._alive.items())
            if liveness.deadline <= now and self._confirmed(liveness.deadline)
        ]

    def _declare_dead(self, node_id: int, stale_revision: int | None) -> MembershipEvent:
        del self._alive[node_id]
        if stale_revision is not None:
            self._declared_dead[node_id] = stale_revision
        return MembershipEvent(MembershipEventKind.DOWN, node_id, self._incarnations.get(node_id))

    def _node_written(self, node_id: int, entry: KVEntry, now: float) -> list[MembershipEvent]:
        try:
            record = _node_record.decode(entry.value)
        except msgspec.MsgspecError:
            return []
        if node_id == self.own_id:
            held_up = self.is_stale(now) or now - self._own_seen_at > 2 * self.own_interval
            if held_up and self._own_seen_at > -math.inf:
                # Back from a stale spell, or late: whatever held up this node's
                # writes (a JetStream leader election, a stalled server) may have
                # held up everyone's, so every node gets a whole TTL to show up.
                self.hold(now + record.ttl)
                self.held_up_heartbeats += 1
                self.held_up_gap = now - self._own_seen_at
            self._own_seen_at = now
            self._own_ttl = record.ttl
        if self._declared_dead.get(node_id) == entry.revision:
            return []  # the same write that already went stale; still dead
        self._declared_dead.pop(node_id, None)
        self._incarnations[node_id] = max(self._incarnations.get(node_id, 0), record.incarnation)
        was_alive = node_id in self._alive
        self._alive[node_id] = _Liveness(entry.revision, now + record.ttl, record.incarnation)
        if was_alive:
            return []
        return [MembershipEvent(MembershipEventKind.UP, node_id, record.incarnation)]

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
