"""The leader lease: a sans-IO state machine (:class:`Lease`), and the task that drives
it with KV writes (:class:`LeaseKeeper`).

The lease is the ``leader`` key of the mesh's bucket. A node takes it with a
create-if-absent (while it is vacant) or a compare-and-set (once its holder stopped
refreshing it), and keeps it by refreshing it every heartbeat, each write carrying the
node's TTL.

Why two leaders never overlap: a write that landed keeps the key at least ``ttl``
seconds after it landed, and it landed after it was sent. So a node judges its lease
valid until ``sent_at + ttl * safety`` (``safety`` < 1), where ``sent_at`` is when its
last write that landed was sent, and ends its term then unless a refresh landed in
the meantime. No other node can take the key over before that, however writes fail,
hang or lose their answers. Clocks need only run at the same rate, never agree.

:class:`Lease` does no I/O and reads no clock: it is told what the membership view
saw of the key and what came of each write, with the time, and answers what to do
next and whether this node leads. Tests drive it directly.
"""

from __future__ import annotations

import enum
import logging
import math

import attrs
import trio

from .._errors import (
    KVConflictError,
    RevisionMismatchError,
    TransportClosedError,
    TransportError,
)
from .._transport._seam import KeyValue
from ._duties import Duties
from ._membership import LEADER_KEY, MembershipView
from ._wire import LeaderRecord, encode

__all__ = ["LEASE_SAFETY", "Lease", "LeaseAction", "LeaseEvent", "LeaseKeeper", "LeaseStep"]

logger = logging.getLogger("meshline.node")

LEASE_SAFETY = 0.9
"""A leader stops acting as one after this fraction of its TTL without a refresh,
before any other node may take the lease over."""


class LeaseAction(enum.Enum):
    """What :meth:`Lease.next_step` asks for."""

    WAIT = "wait"
    """Nothing to do before :attr:`LeaseStep.at`. Out of a term, an observation of
    the key (:meth:`Lease.observe`) may change that sooner."""
    CREATE = "create"
    """Bid for a vacant lease: create the key if it is absent."""
    TAKE = "take"
    """Bid for a lapsed lease (or this node's own, from an earlier term): write the
    key if its revision is still :attr:`LeaseStep.revision`; create it if it has
    gone meanwhile."""
    REFRESH = "refresh"
    """Refresh the lease this node holds: write the key if its revision is still
    :attr:`LeaseStep.revision`. Give up at :attr:`LeaseStep.at`, when it lapses."""


@attrs.frozen
class LeaseStep:
    """One step for the I/O shell to take."""

    action: LeaseAction
    at: float = math.inf
    """``WAIT``: when to ask again. ``REFRESH``: when to give the write up."""
    revision: int = 0
    """``TAKE`` and ``REFRESH``: the revision to compare against."""


class LeaseEvent(enum.StrEnum):
    """A change of this node's leadership term."""

    TERM_STARTED = "term_started"
    """A bid landed: this node leads from now on."""
    LOST = "lost"
    """The term ended: a write found the key taken over or changed."""
    LAPSED = "lapsed"
    """The term ended: no refresh landed in time, so another node may take over."""
    CLOSED = "closed"
    """The term ended: the node is leaving."""


class Lease:
    """One node's side of the leader lease, as a state machine.

    Inputs, each with the time it happened: :meth:`observe` (the view saw the key
    written or vacated), :meth:`won` (a bid or refresh landed), :meth:`lost` (one was
    refused), :meth:`failed` (one failed without an answer: it may have landed or
    not), :meth:`expire` (time passed) and :meth:`close`. Outputs: :meth:`next_step`,
    :meth:`is_leader`, :attr:`in_term`, and the :class:`LeaseEvent` that inputs return
    when the term starts or ends.
    """

    def __init__(
        self, own_id: int, ttl: float, refresh_interval: float, *, safety: float = LEASE_SAFETY
    ) -> None:
        if not 0 < safety < 1:
            raise ValueError(f"safety must be between 0 and 1, got {safety!r}")
        if not 0 < refresh_interval < math.inf:
            raise ValueError(f"refresh_interval must be positive, got {refresh_interval!r}")
        self.own_id = own_id
        """This node's id: a lease the view shows it holding is its own."""
        self._validity = ttl * safety
        self._interval = refresh_interval
        self.holder: int | None = None
        """The holder as last observed, or None while the lease is vacant."""
        self._holder_revision = 0
        self._holder_lapses_at = -math.inf
        self.in_term = False
        """Whether a term is running: from the bid that landed until the lease is
        lost, lapses or the node closes."""
        self.terms = 0
        """How many terms have started."""
        self.valid_until = -math.inf
        """When the current term lapses unless a refresh lands first."""
        self.revision: int | None = None
        """The revision of this node's last lease write that landed, while releasing
        the lease may be right: set by a landed write, kept when the node closes,
        cleared when the lease is lost or lapses."""
        self._next_refresh = math.inf
        self._retry_at = -math.inf

    def is_leader(self, now: float) -> bool:
        """Whether this node leads at ``now``: in a term that has not lapsed."""
        return self.in_term and now < self.valid_until

    # ------------------------------------------------------------------ inputs

    def observe(self, holder: int | None, revision: int, holder_ttl: float, at: float) -> None:
        """The view saw the key written by ``holder`` as ``revision`` at ``at`` (or
        vacated, with ``holder`` None). Another holder's lease may be taken over
        ``holder_ttl`` seconds after ``at`` unless it is observed again first.

        A bid that waits for a retry goes ahead at once: the lease changed.
        """
        self.holder = holder
        if holder is None:
            self._holder_revision = 0
            self._holder_lapses_at = -math.inf
        else:
            self._holder_revision = revision
            self._holder_lapses_at = at + holder_ttl
        self._retry_at = -math.inf

    def won(self, revision: int, sent_at: float, now: float) -> LeaseEvent | None:
        """A bid or a refresh sent at ``sent_at`` landed as ``revision``; its answer
        came at ``now``. Returns ``TERM_STARTED`` when it starts a term.

        An answer so late that the lease it bought has lapsed already starts no
        term (and ends a running one, as :meth:`expire` would).
        """
        valid_until = sent_at + self._validity
        if now >= valid_until:
            return self._end(LeaseEvent.LAPSED) if self.in_term else None
        self.revision = revision
        self.valid_until = max(self.valid_until, valid_until) if self.in_term else valid_until
        if self.in_term:
            return None
        self.in_term = True
        self.terms += 1
        self._next_refresh = now + self._interval
        return LeaseEvent.TERM_STARTED

    def lost(self, now: float) -> LeaseEvent | None:
        """A write was refused: the key exists (create) or moved on (take, refresh).
        Ends the term (``LOST``); out of a term, the next bid waits one refresh
        interval, or until the key is observed again."""
        if self.in_term:
            return self._end(LeaseEvent.LOST)
        self._retry_at = now + self._interval
        return None

    def failed(self, now: float) -> None:
        """A write failed without an answer (it may have landed or not). In a term
        nothing changes: the next refresh is due as planned, and the term lapses at
        :attr:`valid_until` unless one lands. Out of a term, the next bid waits as
        after :meth:`lost`."""
        if not self.in_term:
            self._retry_at = now + self._interval

    def expire(self, now: float) -> LeaseEvent | None:
        """End the term if it has lapsed at ``now`` (``LAPSED``)."""
        if self.in_term and now >= self.valid_until:
            return self._end(LeaseEvent.LAPSED)
        return None

    def close(self) -> LeaseEvent | None:
        """The node is leaving: end the term (``CLOSED``). :attr:`revision` is kept,
        so the lease can be released."""
        if not self.in_term:
            return None
        revision = self.revision
        self._end(LeaseEvent.CLOSED)
        self.revision = revision
        return LeaseEvent.CLOSED

    def _end(self, event: LeaseEvent) -> LeaseEvent:
        self.in_term = False
        self.valid_until = -math.inf
        self.revision = None
        self._next_refresh = math.inf
        return event

    # ------------------------------------------------------------------ outputs

    def next_step(self, now: float) -> LeaseStep:
        """What to do at ``now``. Call :meth:`expire` first to hear of a lapse.

        In a term: ``REFRESH`` once per refresh interval (returning it schedules the
        next one), else ``WAIT`` until the next refresh or the lapse, whichever is
        first. Out of a term: ``CREATE`` while the lease is vacant, ``TAKE`` when the
        view shows this node holding it or the holder's lease has lapsed, else
        ``WAIT`` for the lapse (or for a retry after a failed bid).
        """
        self.expire(now)
        if self.in_term:
            if now >= self._next_refresh:
                self._next_refresh = now + self._interval
                return LeaseStep(LeaseAction.REFRESH, self.valid_until, self.revision or 0)
            return LeaseStep(LeaseAction.WAIT, min(self._next_refresh, self.valid_until))
        if now < self._retry_at:
            return LeaseStep(LeaseAction.WAIT, self._retry_at)
        if self.holder is None:
            return LeaseStep(LeaseAction.CREATE)
        if self.holder == self.own_id or now >= self._holder_lapses_at:
            return LeaseStep(LeaseAction.TAKE, revision=self._holder_revision)
        return LeaseStep(LeaseAction.WAIT, self._holder_lapses_at)


class LeaseKeeper:
    """Campaigns for the lease and holds it, driving a :class:`Lease` with KV writes,
    and runs the leader duties for each term.

    Failures never end it but a closed transport: a failed write is logged, and the
    lease state machine decides what follows.
    """

    def __init__(
        self, view: MembershipView, duties: Duties, *, ttl: int, refresh_interval: float
    ) -> None:
        self.node_id = 0
        self._view = view
        self._duties = duties
        self._ttl = ttl
        self.lease = Lease(0, ttl, refresh_interval)
        self._changed = trio.Event()
        self._kv: KeyValue | None = None
        self._task_status: trio.TaskStatus[None] | None = None

    def is_leader(self) -> bool:
        """Whether this node leads right now (see :meth:`Lease.is_leader`)."""
        return self.lease.is_leader(trio.current_time())

    def leader_entry_seen(self) -> None:
        """The membership view saw the ``leader`` key change (or reloaded): tell the
        lease, and wake a campaign that waits for a change."""
        view = self._view
        self.lease.observe(
            view.leader_id, view.leader_revision, view.leader_ttl, view.leader_seen_at
        )
        self._changed.set()
        self._changed = trio.Event()

    async def run(self, kv: KeyValue, task_status: trio.TaskStatus[None]) -> None:
        """Campaign and lead, term after term, until cancelled.

        Reports started once another node is seen leading, or once the first bid
        was answered; so a lone node leads when this returns.

        :raises TransportClosedError: the transport closed.
        """
        self._kv = kv
        self._task_status = task_status
        self.lease.own_id = self.node_id
        self.leader_entry_seen()
        try:
            while True:
                await self._steps_until(in_term=True)
                async with self._duties.term():
                    await self._steps_until(in_term=False)
        finally:
            self.lease.close()

    def _started(self) -> None:
        if self._task_status is not None:
            self._task_status.started()
            self._task_status = None

    async def _steps_until(self, *, in_term: bool) -> None:
        lease = self.lease
        while lease.in_term is not in_term:
            now = trio.current_time()
            if lease.expire(now) is LeaseEvent.LAPSED:
                logger.warning(
                    "node %d: leader lease lapsed before it could be refreshed", self.node_id
                )
                continue
            step = lease.next_step(now)
            if step.action is not LeaseAction.WAIT:
                await self._write(step)
                if step.action is not LeaseAction.REFRESH:
                    self._started()
                continue
            self._started()
            if lease.in_term:
                await trio.sleep_until(step.at)
            else:
                changed = self._changed
                with trio.move_on_at(step.at):
                    await changed.wait()

    async def _write(self, step: LeaseStep) -> None:
        """Make the write ``step`` asks for, and tell the lease what came of it."""
        assert self._kv is not None
        kv, lease = self._kv, self.lease
        record = encode(LeaderRecord(self.node_id, self._ttl))
        refresh = step.action is LeaseAction.REFRESH
        revision: int | None = None
        sent_at = trio.current_time()
        with trio.move_on_at(step.at):
            try:
                if step.action is LeaseAction.CREATE:
                    revision = await kv.create(LEADER_KEY, record, ttl=self._ttl)
                else:
                    try:
                        revision = await kv.update(
                            LEADER_KEY, record, revision=step.revision, ttl=self._ttl
                        )
                    except RevisionMismatchError:
                        if refresh or await kv.get(LEADER_KEY) is not None:
                            raise
                        sent_at = trio.current_time()
                        revision = await kv.create(LEADER_KEY, record, ttl=self._ttl)
            except KVConflictError:
                if lease.lost(trio.current_time()) is LeaseEvent.LOST:
                    logger.warning("node %d: lost the leader lease", self.node_id)
                return
            except TransportClosedError:
                raise
            except TransportError as exc:
                what = "lease refresh" if refresh else "leader campaign"
                logger.warning("node %d: %s failed (%s)", self.node_id, what, exc)
                lease.failed(trio.current_time())
                return
        if revision is not None:
            lease.won(revision, sent_at, trio.current_time())
        # else: the refresh outlived the lease; the next expire() ends the term.

    async def release(self) -> None:
        """Delete the lease if this node's last write still holds it. A conflict
        (it moved on) or a transport error (the TTL will remove it) is ignored."""
        revision = self.lease.revision
        if self._kv is None or revision is None:
            return
        try:
            await self._kv.delete(LEADER_KEY, revision=revision)
        except (KVConflictError, TransportError) as exc:
            logger.debug("node %d: lease not released (%s)", self.node_id, exc)
