"""The sans-IO membership view: fed entries and times, it answers with events.

These pin down the failure-model rules: a view that may be stale declares nobody
dead, a reconnect buys every node a grace period, keys that vanish while the view
cannot judge only make their nodes suspects, and DOWN events name the incarnation
that died.
"""

from __future__ import annotations

import math

import msgspec
import pytest

from meshline import KVEntry, KVOperation, MembershipEvent, MembershipEventKind
from meshline._mesh._membership import MembershipView, node_key
from meshline._mesh._wire import NodeRecord

TTL = 2
OWN = 1


def write(node_id: int, revision: int, incarnation: int = 1) -> KVEntry:
    record = NodeRecord(node_id, TTL, 0, incarnation)
    return KVEntry(node_key(node_id), msgspec.msgpack.encode(record), revision)


def gone(node_id: int, revision: int, operation: KVOperation) -> KVEntry:
    return KVEntry(node_key(node_id), b"", revision, operation)


def down(node_id: int, incarnation: int = 1) -> MembershipEvent:
    return MembershipEvent(MembershipEventKind.DOWN, node_id, incarnation)


def view_with_two_nodes(now: float = 0.0) -> MembershipView:
    view = MembershipView()
    view.own_id = OWN
    events = view.load([write(OWN, 1), write(2, 2)], now)
    assert {event.node_id for event in events if event.kind is MembershipEventKind.UP} == {1, 2}
    return view


def test_a_silent_peer_is_declared_dead_at_its_deadline_with_its_incarnation() -> None:
    view = view_with_two_nodes()
    view.apply(write(2, 4, incarnation=3), 0.5)
    view.apply(write(OWN, 5), 1.5)
    assert view.next_deadline(1.6) == 2.5
    assert view.expire(2.4) == []
    view.apply(write(OWN, 6), 2.5)
    assert view.expire(2.5) == [down(2, 3)]
    assert view.alive == {OWN}


def test_a_death_waits_for_our_own_heartbeat_to_come_back_after_the_deadline() -> None:
    view = view_with_two_nodes()
    view.own_interval = TTL / 4
    view.apply(write(2, 3), 0.5)
    for revision, beat in enumerate((0.5, 1.0, 1.5, 2.0), start=10):
        view.apply(write(OWN, revision), beat)
    # The peer's deadline passes while our own last heartbeat is older than it: the
    # view cannot tell a dead peer from writes that stopped landing, so it asks for
    # a heartbeat of its own to confirm, and does not spin meanwhile.
    assert view.expire(2.5) == []
    assert view.awaiting_confirmation(2.5)
    assert view.next_deadline(2.5) > 2.5
    view.apply(write(OWN, 20), 2.51)
    assert not view.awaiting_confirmation(2.51)
    assert view.expire(2.51) == [down(2)]


def test_a_late_heartbeat_of_our_own_gives_every_peer_a_ttl() -> None:
    """Writes stall (a JetStream election) for less than a TTL: our own heartbeat
    lands late and first, the peer's a moment later. The peer stays alive."""
    view = view_with_two_nodes()
    view.own_interval = TTL / 4
    view.apply(write(2, 3), 0.5)
    for revision, beat in enumerate((0.5, 1.0, 1.5), start=10):
        view.apply(write(OWN, revision), beat)
    assert view.expire(2.5) == []  # the peer's deadline: unconfirmed
    view.apply(write(OWN, 20), 3.2)  # 1.7 s after the one before: held up
    assert (view.held_up_heartbeats, view.held_up_gap) == (1, pytest.approx(1.7))
    assert view.expire(3.2) == []
    assert view.awaiting_confirmation(3.2) is False
    view.apply(write(2, 21), 3.21)
    view.apply(write(OWN, 22), 3.7)
    assert view.expire(5.3) == []
    assert view.alive == {OWN, 2}


def test_a_view_whose_own_heartbeat_stopped_coming_back_declares_nobody_dead() -> None:
    view = view_with_two_nodes()
    # Own refreshes stop arriving (a silent watch): past the own TTL the view is stale.
    assert view.is_stale(2.0)
    assert view.expire(10.0) == []
    assert view.alive == {OWN, 2}
    assert view.next_deadline(10.0) == math.inf
    # The own heartbeat comes back through the watch. The peer's writes may have
    # been held up just like ours (a JetStream leader election stalls every write),
    # so it gets a whole TTL to show up; silent all along, it is dead after that.
    view.apply(write(OWN, 5), 10.0)
    assert not view.is_stale(10.0)
    assert view.expire(10.0) == []
    assert view.next_deadline(10.0) == 10.0 + TTL
    view.apply(write(OWN, 6), 11.0)
    assert view.expire(11.9) == []
    assert view.expire(12.0) == [down(2)]


def test_a_peer_whose_writes_were_held_up_with_ours_stays_alive() -> None:
    view = view_with_two_nodes()
    view.apply(write(OWN, 3), 1.0)
    assert view.expire(8.0) == []  # nothing comes back: stale
    # Writes land again: ours first, the peer's a moment later.
    view.apply(write(OWN, 4), 8.0)
    assert view.expire(8.5) == []
    view.apply(write(2, 5), 9.0)
    assert view.expire(10.5) == []
    assert view.alive == {OWN, 2}


def test_a_disconnected_view_declares_nobody_dead_and_holds_after_reconnecting() -> None:
    view = view_with_two_nodes()
    view.disconnected()
    view.apply(write(OWN, 3), 1.0)
    assert view.expire(5.0) == []
    assert view.next_deadline(5.0) == math.inf
    view.reconnected(5.0, grace=TTL)
    view.apply(write(OWN, 4), 5.0)
    assert not view.is_trustworthy(6.9)
    assert view.expire(6.9) == []
    # The peer refreshes during the grace period: it survives the outage.
    view.apply(write(2, 6), 6.0)
    view.apply(write(OWN, 7), 6.5)
    assert view.expire(7.0) == []
    assert view.alive == {OWN, 2}


def test_a_peer_that_does_not_refresh_within_the_grace_period_is_dead_after_it() -> None:
    view = view_with_two_nodes()
    view.disconnected()
    view.reconnected(3.0, grace=TTL)
    # The hold lasts a whole TTL from the reconnect, or from the first own heartbeat
    # seen after it, whichever ends later.
    view.apply(write(OWN, 3), 4.0)
    assert view.next_deadline(4.0) == 6.0
    assert view.expire(5.99) == []
    view.apply(write(OWN, 4), 5.5)
    assert view.expire(6.0) == [down(2)]


def test_keys_missing_from_a_reloaded_snapshot_only_make_suspects_during_a_hold() -> None:
    view = view_with_two_nodes()
    view.reconnected(1.0, grace=TTL)
    # After a long outage the server expired every liveness key: the new snapshot
    # holds only this node's re-asserted key.
    events = view.load([write(OWN, 7, incarnation=2)], 1.0)
    assert events == []
    assert view.alive == {OWN, 2}
    # The peer re-asserts under a new incarnation: no longer a suspect.
    assert view.apply(write(2, 8, incarnation=2), 1.5) == []
    view.apply(write(OWN, 9, incarnation=2), 2.9)
    assert view.expire(3.0) == []
    assert view.alive == {OWN, 2}


def test_a_suspect_that_never_comes_back_is_dead_when_the_hold_ends() -> None:
    view = view_with_two_nodes()
    view.reconnected(1.0, grace=TTL)
    view.apply(write(OWN, 3), 1.0)
    assert view.apply(gone(2, 4, KVOperation.PURGE), 1.2) == []
    view.apply(write(OWN, 5), 2.9)
    assert view.expire(2.99) == []
    assert view.expire(3.0) == [down(2)]


def test_an_expiry_the_server_reports_waits_for_the_deadline() -> None:
    """A server that just took over a stream may expire a key whose refresh is on
    its way: the expiry alone kills nobody, the deadline does."""
    view = view_with_two_nodes()
    view.apply(write(OWN, 3), 1.0)
    assert view.apply(gone(2, 4, KVOperation.PURGE), 1.0) == []
    assert view.expire(1.9) == []
    view.apply(write(OWN, 5), 2.0)
    assert view.expire(2.0) == [down(2)]


def test_an_expired_peer_whose_refresh_lands_after_the_expiry_stays_alive() -> None:
    view = view_with_two_nodes()
    view.apply(write(OWN, 3), 1.0)
    view.apply(gone(2, 4, KVOperation.PURGE), 1.0)
    view.apply(write(2, 5), 1.1)
    view.apply(write(OWN, 6), 2.0)
    assert view.expire(2.5) == []
    assert view.alive == {OWN, 2}


def test_a_short_snapshot_kills_nobody_before_the_deadline() -> None:
    view = view_with_two_nodes()
    view.apply(write(OWN, 3), 0.5)
    view.apply(write(2, 4), 0.5)
    # A reopened watch reads from a server still catching up: the peer's key is
    # missing, though the peer is fine and refreshes a moment later.
    assert view.load([write(OWN, 5)], 1.0) == []
    assert view.alive == {OWN, 2}
    view.apply(write(2, 6), 1.2)
    view.apply(write(OWN, 7), 1.5)
    assert view.expire(2.6) == []
    assert view.alive == {OWN, 2}


def test_a_graceful_leave_is_believed_even_during_a_hold() -> None:
    view = view_with_two_nodes()
    view.disconnected()
    assert view.apply(gone(2, 3, KVOperation.DELETE), 0.5) == [down(2)]
    assert view.alive == {OWN}


def test_a_node_declared_dead_comes_back_up_with_its_new_incarnation() -> None:
    view = view_with_two_nodes()
    view.apply(write(OWN, 3), 1.0)
    view.apply(write(OWN, 4), 2.0)
    assert view.expire(2.0) == [down(2)]
    assert view.apply(write(2, 2), 2.1) == []  # the stale write again: still dead
    assert view.apply(write(2, 6, incarnation=2), 2.2) == [
        MembershipEvent(MembershipEventKind.UP, 2, 2)
    ]
    assert view.incarnation_of(2) == 2
