"""The leader lease as a sans-IO state machine: driven by hand, and in a simulation
of several nodes sharing one leader key whose writes are slow, fail, land without
an answer, or outlive the lease they were meant to refresh.

No I/O and no Trio here: time is a number the test passes in.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshline._mesh._lease import Lease, LeaseAction, LeaseEvent, LeaseStep

TTL = 4.0
INTERVAL = 1.0
VALIDITY = TTL * 0.9


def lone_leader(revision: int = 5) -> Lease:
    lease = Lease(1, TTL, INTERVAL)
    assert lease.next_step(0.0) == LeaseStep(LeaseAction.CREATE)
    assert lease.won(revision, sent_at=0.0, now=0.2) is LeaseEvent.TERM_STARTED
    return lease


def test_a_lone_node_creates_the_lease_and_refreshes_it_every_interval() -> None:
    lease = lone_leader()
    assert lease.in_term and lease.is_leader(0.2)
    assert (lease.valid_until, lease.revision, lease.terms) == (VALIDITY, 5, 1)
    assert lease.next_step(0.5) == LeaseStep(LeaseAction.WAIT, 1.2)
    assert lease.next_step(1.2) == LeaseStep(LeaseAction.REFRESH, VALIDITY, 5)
    assert lease.next_step(1.3) == LeaseStep(LeaseAction.WAIT, 2.2)
    assert lease.won(6, sent_at=1.2, now=1.4) is None
    assert (lease.valid_until, lease.revision) == (1.2 + VALIDITY, 6)
    assert lease.next_step(2.2) == LeaseStep(LeaseAction.REFRESH, 1.2 + VALIDITY, 6)


def test_failed_refreshes_end_the_term_when_the_lease_could_pass_on() -> None:
    lease = lone_leader()
    for now in (1.2, 2.2, 3.2):
        assert lease.next_step(now).action is LeaseAction.REFRESH
        lease.failed(now + 0.1)
        assert lease.in_term
    assert lease.next_step(3.3) == LeaseStep(LeaseAction.WAIT, VALIDITY)
    assert lease.is_leader(VALIDITY - 0.001)
    assert not lease.is_leader(VALIDITY)
    assert lease.expire(VALIDITY) is LeaseEvent.LAPSED
    assert not lease.in_term and lease.revision is None
    assert lease.expire(VALIDITY + 1) is None


def test_validity_counts_from_when_the_write_was_sent_not_answered() -> None:
    lease = Lease(1, TTL, INTERVAL)
    assert lease.won(5, sent_at=0.0, now=3.0) is LeaseEvent.TERM_STARTED
    assert lease.valid_until == VALIDITY
    late = Lease(1, TTL, INTERVAL)
    assert late.won(5, sent_at=0.0, now=VALIDITY) is None
    assert not late.in_term
    assert lease.won(6, sent_at=0.5, now=0.5 + VALIDITY) is LeaseEvent.LAPSED
    assert not lease.in_term


def test_a_refused_refresh_loses_the_lease_and_the_next_bid_follows_the_view() -> None:
    lease = lone_leader()
    assert lease.next_step(1.2).action is LeaseAction.REFRESH
    assert lease.lost(1.3) is LeaseEvent.LOST
    assert not lease.is_leader(1.3) and lease.revision is None
    lease.observe(2, 9, TTL, at=1.3)
    assert lease.next_step(1.4) == LeaseStep(LeaseAction.WAIT, 1.3 + TTL)


def test_a_follower_takes_over_once_the_holder_stopped_refreshing() -> None:
    lease = Lease(1, TTL, INTERVAL)
    lease.observe(2, 7, TTL, at=10.0)
    assert lease.next_step(11.0) == LeaseStep(LeaseAction.WAIT, 14.0)
    lease.observe(2, 8, TTL, at=12.0)
    assert lease.next_step(14.0) == LeaseStep(LeaseAction.WAIT, 16.0)
    assert lease.next_step(16.0) == LeaseStep(LeaseAction.TAKE, revision=8)
    lease.observe(None, 0, 0, at=15.0)
    assert lease.next_step(15.0) == LeaseStep(LeaseAction.CREATE)


def test_a_node_the_view_shows_holding_the_lease_takes_it_back_at_once() -> None:
    lease = Lease(1, TTL, INTERVAL)
    lease.observe(1, 4, TTL, at=0.0)
    assert lease.next_step(0.0) == LeaseStep(LeaseAction.TAKE, revision=4)


def test_a_lost_or_failed_bid_waits_an_interval_unless_the_key_changes() -> None:
    lease = Lease(1, TTL, INTERVAL)
    assert lease.lost(1.0) is None
    assert lease.next_step(1.5) == LeaseStep(LeaseAction.WAIT, 2.0)
    assert lease.next_step(2.0) == LeaseStep(LeaseAction.CREATE)
    lease.failed(3.0)
    assert lease.next_step(3.0) == LeaseStep(LeaseAction.WAIT, 4.0)
    lease.observe(None, 0, 0, at=3.5)
    assert lease.next_step(3.5) == LeaseStep(LeaseAction.CREATE)


def test_closing_ends_the_term_and_keeps_the_revision_to_release() -> None:
    lease = lone_leader(revision=11)
    assert lease.close() is LeaseEvent.CLOSED
    assert not lease.is_leader(0.3) and lease.revision == 11
    assert lease.close() is None


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        Lease(1, TTL, INTERVAL, safety=1.0)
    with pytest.raises(ValueError):
        Lease(1, TTL, 0)


# ---------------------------------------------------------------------- simulation

DELAYS = st.sampled_from([0.0, 0.05, 0.3, 1.0, 2.5, 6.0])
"""How long a write takes to land, an answer to come back, or the watch to deliver."""

OUTCOMES = st.sampled_from(["answered", "answer lost", "never landed"])
INTERVALS = st.sampled_from([INTERVAL, 0.25, 2.0, 3.5])
"""Refresh intervals: anything below the TTL, as ``open_node`` allows."""
CLOSE_TIMES = st.sampled_from([None, 3.0, 12.0, 25.0])
"""When a node leaves (None: it stays)."""
NODES = 3
END = 40.0
MAX_EVENTS = 400


@attrs.define
class Key:
    """The leader key as the server keeps it: compare-and-set, and a TTL that runs
    from when the last write landed."""

    holder: int | None = None
    revision: int = 0
    expires_at: float = math.inf
    last_revision: int = 0

    def write(self, node_id: int, now: float) -> int:
        self.last_revision += 1
        self.holder, self.revision, self.expires_at = node_id, self.last_revision, now + TTL
        return self.revision

    def vacate(self) -> None:
        self.holder, self.revision, self.expires_at = None, 0, math.inf


@attrs.define
class Write:
    node_id: int
    step: LeaseStep
    sent_at: float
    outcome: str
    result: int | None = None
    """The revision written; None if the server refused the write."""
    abandoned: bool = False


@attrs.define
class SimNode:
    lease: Lease
    write: Write | None = None
    wake_token: int = 0
    closed: bool = False
    observed_until: float = 0.0


class Simulation:
    """Nodes driving :class:`Lease` against one shared key, every delay and failure
    drawn by hypothesis; records each node's terms as the machine reports them."""

    def __init__(self, draw: Callable[[st.SearchStrategy[Any]], Any]) -> None:
        self.draw = draw
        self.key = Key()
        interval = draw(INTERVALS)
        self.nodes = {i: SimNode(Lease(i, TTL, interval)) for i in range(1, NODES + 1)}
        self.events: list[tuple[float, int, str, Any]] = []
        self.order = itertools.count()
        self.terms: list[list[float]] = []
        self.open_terms: dict[int, list[float]] = {}
        self.now = 0.0

    def at(self, when: float, kind: str, payload: Any) -> None:
        heapq.heappush(self.events, (when, next(self.order), kind, payload))

    def run(self) -> None:
        for node_id in self.nodes:
            self.at(self.draw(DELAYS), "act", (node_id, 0))
            close_at = self.draw(CLOSE_TIMES)
            if close_at is not None:
                self.at(close_at, "close", node_id)
        for _ in range(MAX_EVENTS):
            if not self.events:
                break
            when, _, kind, payload = heapq.heappop(self.events)
            if when > END:
                break
            self.now = when
            self.expire_key()
            getattr(self, f"on_{kind.replace(' ', '_')}")(payload)
            leaders = [i for i, node in self.nodes.items() if node.lease.is_leader(self.now)]
            assert len(leaders) <= 1, (self.now, leaders, self.terms)
            for node_id in self.open_terms:
                lease = self.nodes[node_id].lease
                # A term ends by the time its lease may pass on, not at the next wake-up.
                assert self.now <= lease.valid_until, (self.now, node_id, lease.valid_until)
        for start in self.open_terms.values():
            self.terms.append([start[0], self.now])

    # ---------------------------------------------------------------- the lease's outputs

    def record(self, node_id: int, event: LeaseEvent | None) -> None:
        if event is LeaseEvent.TERM_STARTED:
            self.open_terms[node_id] = [self.now]
        elif event is not None:
            self.terms.append([self.open_terms.pop(node_id)[0], self.now])

    def act(self, node_id: int) -> None:
        """What the shell does whenever it wakes: expire, then take the next step."""
        node = self.nodes[node_id]
        if node.closed or node.write is not None:
            return
        self.record(node_id, node.lease.expire(self.now))
        step = node.lease.next_step(self.now)
        node.wake_token += 1
        if step.action is LeaseAction.WAIT:
            if step.at < math.inf:
                self.at(step.at, "act", (node_id, node.wake_token))
            return
        write = node.write = Write(node_id, step, self.now, self.draw(OUTCOMES))
        lands_at = self.now + self.draw(DELAYS)
        if write.outcome != "never landed":
            self.at(lands_at, "land", write)
        self.at(lands_at + self.draw(DELAYS), "answer", write)
        if step.at < math.inf:
            self.at(step.at, "give up", write)

    # ---------------------------------------------------------------- events

    def on_act(self, payload: tuple[int, int]) -> None:
        node_id, token = payload
        if token == self.nodes[node_id].wake_token:
            self.act(node_id)

    def on_land(self, write: Write) -> None:
        """The server applies a write (also one its sender gave up on)."""
        key, step = self.key, write.step
        if step.action is LeaseAction.CREATE:
            ok = key.holder is None
        elif step.action is LeaseAction.TAKE:
            ok = key.holder is None or key.revision == step.revision
        else:
            ok = key.holder is not None and key.revision == step.revision
        if ok:
            write.result = key.write(write.node_id, self.now)
            self.tell_watchers()

    def on_answer(self, write: Write) -> None:
        node = self.nodes[write.node_id]
        if write.abandoned or node.closed or node.write is not write:
            return
        node.write = None
        if write.outcome != "answered":
            node.lease.failed(self.now)
        elif write.result is None:
            self.record(write.node_id, node.lease.lost(self.now))
        else:
            self.record(write.node_id, node.lease.won(write.result, write.sent_at, self.now))
        self.act(write.node_id)

    def on_give_up(self, write: Write) -> None:
        node = self.nodes[write.node_id]
        if node.write is write:
            write.abandoned = True
            node.write = None
            self.act(write.node_id)

    def on_observe(self, payload: tuple[int, int | None, int]) -> None:
        node_id, holder, revision = payload
        node = self.nodes[node_id]
        if not node.closed:
            node.lease.observe(holder, revision, TTL, self.now)
            self.act(node_id)

    def on_close(self, node_id: int) -> None:
        node = self.nodes[node_id]
        self.record(node_id, node.lease.close())
        node.closed = True
        if node.lease.revision is not None:
            self.at(self.now + self.draw(DELAYS), "release", node.lease.revision)

    def on_release(self, revision: int) -> None:
        if self.key.holder is not None and self.key.revision == revision:
            self.key.vacate()
            self.tell_watchers()

    # ---------------------------------------------------------------- the server

    def expire_key(self) -> None:
        if self.key.holder is not None and self.now >= self.key.expires_at:
            self.key.vacate()
            self.tell_watchers()

    def tell_watchers(self) -> None:
        """Every node's watch delivers the key's new state, in order, late."""
        for node_id, node in self.nodes.items():
            node.observed_until = max(node.observed_until, self.now + self.draw(DELAYS))
            self.at(node.observed_until, "observe", (node_id, self.key.holder, self.key.revision))


@given(data=st.data())
def test_terms_never_overlap_whatever_writes_do(data: st.DataObject) -> None:
    simulation = Simulation(data.draw)
    simulation.run()
    terms = sorted(simulation.terms)
    for (_, end), (start, _) in itertools.pairwise(terms):
        assert end <= start, terms


def test_the_simulation_elects_a_leader_when_writes_behave() -> None:
    """The property above holds for a lease that never leads, too: check that the
    simulated nodes do lead, and that another takes over once the leader leaves."""
    closing = iter([3.0, None, None])

    def calm(strategy: st.SearchStrategy[Any]) -> Any:
        if strategy is CLOSE_TIMES:
            return next(closing)
        if strategy is INTERVALS:
            return INTERVAL
        return "answered" if strategy is OUTCOMES else 0.05

    simulation = Simulation(calm)
    simulation.run()
    terms = sorted(simulation.terms)
    # Written at 0.05, landed at 0.1, answered at 0.15; the leader leaves at 3.0, its
    # release lands at 3.05 and is seen at 3.1; a new bid lands at 3.15, answered at 3.2.
    assert terms == [[pytest.approx(0.15), 3.0], [pytest.approx(3.2), simulation.now]]
