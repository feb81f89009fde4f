"""Liveness: the heartbeat that keeps this node's liveness key alive, and the watch
and expiry timer that keep the membership view current and tell its events.

Each node keeps ``nodes.<id>`` in the mesh's bucket, written with its TTL and
refreshed every heartbeat; its value records the TTL and the node's incarnation, so
observers know its deadline. The :class:`~meshline._mesh._membership.MembershipView`
(sans-IO) decides who is alive from the watched entries and the time; the classes
here do the I/O around it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Self

import trio

from .._errors import KVConflictError, RevisionMismatchError, TransportClosedError, TransportError
from .._transport._buffer import MessageBuffer, Overflow
from .._transport._seam import ConnectionEvent, ConnectionEventKind, KeyValue
from ._declarations import call_handler
from ._membership import (
    LEADER_KEY,
    MembershipEvent,
    MembershipEventKind,
    MembershipView,
    node_key,
)
from ._wire import NodeRecord, encode

__all__ = [
    "REASSERT_AFTER",
    "Heartbeat",
    "Membership",
    "MembershipEvents",
    "MembershipHandler",
]

logger = logging.getLogger("meshline.node")

MembershipHandler = Callable[[MembershipEvent], Awaitable[None] | None]

REASSERT_AFTER = 0.9
"""A node whose heartbeats stopped landing for this fraction of its TTL assumes it
may have been declared dead, and re-asserts itself under a new incarnation."""

_WATCH_RETRY = 0.5
"""Seconds between attempts to reopen a failed membership watch, at most."""


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


class Heartbeat:
    """This node's liveness key: written on joining, refreshed every interval,
    re-asserted under a new incarnation after a gap, deleted on leaving."""

    def __init__(
        self,
        *,
        ttl: int,
        interval: float,
        publish: Callable[[list[MembershipEvent]], None],
    ) -> None:
        self.node_id = 0
        self.incarnation = 1
        """Grows by one each time the key is re-asserted after a gap."""
        self._ttl = ttl
        self._interval = interval
        self._publish = publish
        self._started_at_ms = int(time.time() * 1000)
        self._revision = 0
        self._beat_now = trio.Event()
        self._kv: KeyValue | None = None

    def _record(self, incarnation: int | None = None) -> bytes:
        incarnation = self.incarnation if incarnation is None else incarnation
        return encode(NodeRecord(self.node_id, self._ttl, self._started_at_ms, incarnation))

    async def join(self, kv: KeyValue) -> None:
        """Write the liveness key for the first time.

        :raises TransportError: it could not be written.
        """
        self._kv = kv
        self._revision = await kv.put(node_key(self.node_id), self._record(), ttl=self._ttl)

    def beat_now(self) -> None:
        """Refresh at once instead of at the next interval (after a reconnect)."""
        self._beat_now.set()

    async def run(self) -> None:
        """Refresh the liveness key every interval, and at once when asked to.

        No failure ends this task but a closed transport: a failed refresh is
        logged and retried on the next beat. When no refresh has landed for most of
        the TTL (a stall, or an outage), others may have declared this node dead, so
        the next one re-asserts it under a new incarnation.
        """
        assert self._kv is not None
        kv = self._kv
        key = node_key(self.node_id)
        last_landed = trio.current_time()
        while True:
            beat_now = self._beat_now
            with trio.move_on_after(self._interval):
                await beat_now.wait()
            if beat_now.is_set():
                self._beat_now = trio.Event()
            sent_at = trio.current_time()
            gap = sent_at - last_landed
            try:
                with trio.fail_after(self._ttl):
                    if gap >= self._ttl * REASSERT_AFTER:
                        await self._reassert(f"no heartbeat landed for {gap:.2f} s")
                    else:
                        try:
                            self._revision = await kv.update(
                                key, self._record(), revision=self._revision, ttl=self._ttl
                            )
                        except RevisionMismatchError:
                            await self._reassert("the liveness key was gone")
                last_landed = sent_at
            except TransportClosedError:
                raise
            except (TransportError, trio.TooSlowError) as exc:
                logger.warning(
                    "node %d: heartbeat failed (%s: %s); retrying",
                    self.node_id,
                    type(exc).__name__,
                    exc,
                )

    async def _reassert(self, why: str) -> None:
        """Write the liveness key again under a new incarnation; emit REASSERTED.

        The incarnation moves on only once the write landed.
        """
        assert self._kv is not None
        incarnation = self.incarnation + 1
        logger.warning(
            "node %d: %s; re-asserting as incarnation %d", self.node_id, why, incarnation
        )
        self._revision = await self._kv.put(
            node_key(self.node_id), self._record(incarnation), ttl=self._ttl
        )
        self.incarnation = incarnation
        self._publish(
            [MembershipEvent(MembershipEventKind.REASSERTED, self.node_id, self.incarnation)]
        )

    async def withdraw(self) -> None:
        """Delete the liveness key, so others see this node leave at once.

        A conflict (the key moved on) or a transport error leaves it to the TTL.
        """
        if self._kv is None:
            return
        with suppress(KVConflictError, TransportError):
            await self._kv.delete(node_key(self.node_id), revision=self._revision)


class Membership:
    """The membership view, kept current by a KV watch and an expiry timer, and the
    delivery of its events to handlers and iterators.

    ``on_down(node_id)`` is called (synchronously) before a ``DOWN`` event is
    delivered anywhere; ``on_leader_entry()`` whenever the watch saw the leader key
    change, or reloaded; ``confirm()`` when a peer's death waits for this node's own
    heartbeat to come back (it should beat at once). ``connected()`` is the
    transport's connection state right now: a view is never trusted while it is
    False, even before the ``DISCONNECTED`` event has reached the view.
    """

    def __init__(
        self,
        *,
        ttl: int,
        heartbeat_interval: float,
        on_down: Callable[[int], None],
        on_leader_entry: Callable[[], None],
        confirm: Callable[[], None],
        connected: Callable[[], bool],
    ) -> None:
        self.node_id = 0
        self.view = MembershipView()
        self.view.own_interval = heartbeat_interval
        self._confirm = confirm
        self._connected = connected
        self._ttl = ttl
        self._heartbeat_interval = heartbeat_interval
        self._on_down = on_down
        self._on_leader_entry = on_leader_entry
        self._changed = trio.Event()
        self._handlers: list[MembershipHandler] = []
        self._queue: MessageBuffer[MembershipEvent] = MessageBuffer(
            10_000, Overflow.DROP_OLDEST, "membership handlers"
        )
        self._buffers: set[MessageBuffer[MembershipEvent]] = set()
        self._watch_scope: trio.CancelScope | None = None
        self.watch_failures = 0
        """How many times the watch failed and had to be reopened."""
        self.silent_watch_reopens = 0
        """How many times the watch was reopened because it had gone silent."""

    # ------------------------------------------------------------------ queries

    def is_trustworthy(self) -> bool:
        return self._connected() and self.view.is_trustworthy(trio.current_time())

    async def wait_for_trustworthy(self) -> None:
        """Return once the view is trustworthy. Cancellable."""
        while not self.is_trustworthy():
            changed = self._changed
            with trio.move_on_after(self._heartbeat_interval):
                await changed.wait()

    # ------------------------------------------------------------------ events out

    def add_handler(self, handler: MembershipHandler) -> Callable[[], None]:
        """Call ``handler(event)`` for every event, in order, in the handler task."""
        self._handlers.append(handler)

        def remove() -> None:
            if handler in self._handlers:
                self._handlers.remove(handler)

        return remove

    @asynccontextmanager
    async def events(self, limit: int) -> AsyncIterator[MembershipEvents]:
        """Iterate events from now on, for the block (see ``Node.membership_events``)."""
        buffer: MessageBuffer[MembershipEvent] = MessageBuffer(
            limit, Overflow.ERROR, "membership events"
        )
        self._buffers.add(buffer)
        try:
            yield MembershipEvents(buffer)
        finally:
            self._buffers.discard(buffer)
            buffer.close()

    def publish(self, events: list[MembershipEvent]) -> None:
        """Deliver ``events`` to every iterator and to the handler task."""
        for event in events:
            if event.kind is MembershipEventKind.DOWN and event.node_id is not None:
                self._on_down(event.node_id)
            for buffer in self._buffers:
                buffer.push(event)
            if self._handlers:
                self._queue.push(event)

    def close(self) -> None:
        """End every iterator and the handler task (once they drained)."""
        for buffer in self._buffers:
            buffer.close()
        self._queue.close()

    async def run_handlers(self) -> None:
        """Call the handlers for each queued event, one at a time; log failures."""
        while True:
            try:
                event = await self._queue.receive()
            except StopAsyncIteration:
                return
            for handler in list(self._handlers):
                try:
                    await call_handler(handler, event)
                except Exception:
                    logger.exception("membership handler %r failed", handler)

    # ------------------------------------------------------------------ feeding

    def _observe(self, events: list[MembershipEvent]) -> None:
        self._changed.set()
        self._changed = trio.Event()
        self.publish(events)

    def connection_event(self, event: ConnectionEvent) -> None:
        """React to the transport losing or regaining its connection.

        While disconnected the view is stale and declares nobody dead. On reconnect,
        the watch is reopened (a watch from before may stay silent), and the view
        holds for ``ttl`` so every node can re-assert.
        """
        if event.kind is ConnectionEventKind.DISCONNECTED:
            logger.warning("node %d: connection lost; the view is stale", self.node_id)
            self.view.disconnected()
        elif event.kind is ConnectionEventKind.RECONNECTED:
            logger.info(
                "node %d: reconnected; reopening the watch, holding %d s", self.node_id, self._ttl
            )
            self.view.reconnected(trio.current_time(), self._ttl)
            if self._watch_scope is not None:
                self._watch_scope.cancel()
        else:
            return
        self._observe([])

    def _log_held_up(self) -> None:
        """The view just saw this node's own heartbeat come back late, and holds."""
        logger.warning(
            "node %d: its own heartbeat came back %.2f s after the one before; the view "
            "holds for %d s (it declares nobody dead, and cleanups pause)",
            self.node_id,
            self.view.held_up_gap,
            self._ttl,
        )

    async def follow(self, kv: KeyValue, task_status: trio.TaskStatus[None]) -> None:
        """Feed the view from a KV watch; reopen it after any failure or reconnect.

        Reports started once the first snapshot is loaded (a failure before that is
        raised). Later, a failed watch is logged, counted in :attr:`watch_failures`
        and reopened; only a closed transport ends this task. Each fresh snapshot
        replaces the view.
        """
        view = self.view
        started = False
        while True:
            with trio.CancelScope() as scope:
                self._watch_scope = scope
                try:
                    async with kv.watch() as watch:
                        held_up = view.held_up_heartbeats
                        self._observe(view.load(watch.snapshot, trio.current_time()))
                        if view.held_up_heartbeats != held_up:
                            self._log_held_up()
                        self._on_leader_entry()
                        if not started:
                            started = True
                            task_status.started()
                        async for entry in watch:
                            held_up = view.held_up_heartbeats
                            self._observe(view.apply(entry, trio.current_time()))
                            if view.held_up_heartbeats != held_up:
                                self._log_held_up()
                            if entry.key == LEADER_KEY:
                                self._on_leader_entry()
                    raise TransportError("the watch ended")
                except TransportClosedError:
                    raise
                except Exception as exc:
                    if not started:
                        raise
                    self.watch_failures += 1
                    logger.warning(
                        "node %d: membership watch failed (%s: %s); reopening",
                        self.node_id,
                        type(exc).__name__,
                        exc,
                    )
                    await trio.sleep(_WATCH_RETRY)
            self._watch_scope = None

    async def reopen_silent_watch(self) -> None:
        """Reopen the watch whenever it has not shown this node's own heartbeat for
        a whole TTL while connected, then give the new one a TTL to show it.

        A JetStream stream whose leader moved (a server of a cluster died) leaves
        nats-py's watch silent until its idle-heartbeat check resets it, 10 to 20
        seconds later, without any connection event. If the heartbeats are not
        landing at all, the reopened watch changes nothing and costs one snapshot
        per TTL.
        """
        view = self.view
        while True:
            changed = self._changed
            now = trio.current_time()
            if not view.watch_is_silent(now) or self._watch_scope is None:
                deadline = view.own_silent_at()
                # Past it but not silent (disconnected): wait for a change instead.
                with trio.move_on_at(deadline if deadline > now else math.inf):
                    await changed.wait()
                continue
            self.silent_watch_reopens += 1
            logger.warning(
                "node %d: the membership watch has not shown this node's heartbeat for "
                "%d s; reopening it",
                self.node_id,
                self._ttl,
            )
            self._watch_scope.cancel()
            await trio.sleep(self._ttl)

    async def expire(self) -> None:
        """Declare nodes dead as their deadlines pass, waking whenever the view
        changes; ask for a confirming heartbeat when a death waits for one."""
        view = self.view
        while True:
            changed = self._changed
            if self._connected():
                wake_at = view.next_deadline(trio.current_time())
            else:  # the DISCONNECTED event is on its way, or the reconnect
                wake_at = trio.current_time() + self._heartbeat_interval
            with trio.move_on_at(wake_at):
                await changed.wait()
            if not self._connected():
                continue
            now = trio.current_time()
            self.publish(view.expire(now))
            if view.awaiting_confirmation(now):
                self._confirm()
