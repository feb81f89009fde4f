"""The in-process transport: NATS semantics without a server.

A :class:`MemoryHub` plays the server. Every transport opened on the same hub sees
the same subjects and KV buckets, so several nodes can share one process. Time comes
from the Trio clock, so TTLs run on ``trio.testing.MockClock`` in tests.

KV expiry is evaluated lazily: every operation on a bucket first expires what is
due, and a watcher waits no longer than the bucket's next deadline, so watchers see
``PURGE`` entries exactly when TTLs run out, with no background task.
"""

from __future__ import annotations

import collections
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import attrs
import trio

from .._errors import (
    KeyExistsError,
    NoRespondersError,
    RequestAbandonedError,
    RequestTimeoutError,
    RevisionMismatchError,
    TransportClosedError,
)
from ._buffer import DEFAULT_BUFFER, MessageBuffer, Overflow
from ._names import validate_bucket, validate_key, validate_subject
from ._seam import (
    KeyValue,
    KVEntry,
    KVOperation,
    KVStorage,
    KVWatch,
    Message,
    Subscription,
    Transport,
    check_data,
    check_replicas,
    check_storage,
    check_timeout,
    check_ttl,
)

__all__ = ["MemoryHub", "MemoryTransport", "open_memory_transport"]

PUBLISH_FAIRNESS_INTERVAL = 128
"""``publish`` yields to the scheduler at least once per this many calls."""

ROUTE_CACHE_SIZE = 4096
"""Subjects whose matching subscriptions a hub remembers (least recently used go
first). Every request's reply goes to a subject of its own, so an unbounded cache
would grow by one entry per request."""

LIMIT_MARKER_SECONDS = 60.0
"""How long the marker left by an expired key lives, like NATS's limit markers."""

_SNAPSHOT_BATCH = 2_000
"""Snapshot entries handed to ``on_snapshot`` between two checkpoints."""

PURGE_MARKER_SECONDS = 60.0
"""How long a purge marker lives, like the TTL the NATS transport gives its purges.

Delete markers are kept for good, as NATS keeps them: only a purge (or an expiry)
leaves no trace behind once its marker is gone.
"""


def _matches(pattern: tuple[str, ...], subject: tuple[str, ...]) -> bool:
    for index, token in enumerate(pattern):
        if token == ">":
            return len(subject) > index
        if index >= len(subject) or (token != "*" and token != subject[index]):
            return False
    return len(pattern) == len(subject)


@attrs.define(eq=False)
class _HubSubscription:
    pattern: tuple[str, ...]
    queue: str | None
    deliver: Callable[[Message], object]


class MemoryHub:
    """The shared in-process "server" behind memory transports.

    Create one per simulated cluster and pass it to :func:`open_memory_transport`.
    It holds no tasks and needs no closing.
    """

    def __init__(self) -> None:
        self._subscriptions: list[_HubSubscription] = []
        self._routes: collections.OrderedDict[str, list[list[_HubSubscription]]] = (
            collections.OrderedDict()
        )
        self._queue_turn = itertools.count()
        self._buckets: dict[str, _Bucket] = {}
        self._transport_ids = itertools.count(1)

    def _add(self, subscription: _HubSubscription) -> None:
        self._subscriptions.append(subscription)
        self._routes.clear()

    def _remove(self, subscription: _HubSubscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)
            self._routes.clear()

    def _route(self, subject: str) -> list[list[_HubSubscription]]:
        """Group the subscriptions matching ``subject``: one group per queue, one per plain sub."""
        cache = self._routes
        routes = cache.get(subject)
        if routes is not None:
            cache.move_to_end(subject)
        else:
            tokens = tuple(subject.split("."))
            queues: dict[str, list[_HubSubscription]] = {}
            routes = []
            for sub in self._subscriptions:
                if _matches(sub.pattern, tokens):
                    if sub.queue is None:
                        routes.append([sub])
                    else:
                        queues.setdefault(sub.queue, []).append(sub)
            routes.extend(queues.values())
            cache[subject] = routes
            if len(cache) > ROUTE_CACHE_SIZE:
                cache.popitem(last=False)
        return routes

    def _publish(self, message: Message) -> int:
        routes = self._route(message.subject)
        for group in routes:
            target = group[0] if len(group) == 1 else group[next(self._queue_turn) % len(group)]
            target.deliver(message)
        return len(routes)

    def _bucket(self, name: str) -> _Bucket:
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = _Bucket(name)
        return bucket


class _MemorySubscription(Subscription):
    def __init__(
        self,
        subject: str,
        buffer: MessageBuffer[Message],
        on_close: Callable[[], None],
        *,
        owns_buffer: bool = True,
    ) -> None:
        super().__init__(subject, buffer, owns_buffer=owns_buffer)
        self._on_close = on_close

    async def _unsubscribe(self) -> None:
        self._on_close()


class MemoryTransport(Transport):
    """A :class:`~meshline.Transport` on a :class:`MemoryHub`. Use
    :func:`open_memory_transport` to get one."""

    def __init__(self, hub: MemoryHub) -> None:
        self.hub = hub
        self._closed = False
        self._inbox_prefix = f"_INBOX.mem{next(hub._transport_ids)}."
        self._tokens = itertools.count()
        self._waiters: dict[str, _ReplyWaiter] = {}
        self._subscriptions: set[_MemorySubscription] = set()
        self._since_yield = 0
        self._inbox = _HubSubscription(
            (*tuple(self._inbox_prefix.split(".")[:-1]), "*"), None, self._deliver_reply
        )
        hub._add(self._inbox)

    @property
    def connected(self) -> bool:
        """True while the transport is open: a memory transport never disconnects.

        It emits no connection events of its own; wrap it in
        :class:`meshline.testing.FaultyTransport` to inject them.
        """
        return not self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosedError("the memory transport is closed")

    def _deliver_reply(self, message: Message) -> None:
        waiter = self._waiters.get(message.subject[len(self._inbox_prefix) :])
        if waiter is not None and not waiter.event.is_set():
            waiter.reply = message
            waiter.event.set()

    async def publish(self, subject: str, data: bytes, *, reply: str | None = None) -> None:
        validate_subject(subject)
        if reply is not None:
            validate_subject(reply)
        data = check_data(data)
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        self.hub._publish(Message(subject, data, reply))
        self._since_yield += 1
        if self._since_yield >= PUBLISH_FAIRNESS_INTERVAL:
            # Let subscribers run: a publishing loop must not starve them.
            self._since_yield = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def open_subscription(
        self,
        subject: str,
        *,
        queue: str | None = None,
        limit: int = DEFAULT_BUFFER,
        overflow: Overflow = Overflow.DROP_NEWEST,
        into: MessageBuffer[Message] | None = None,
    ) -> Subscription:
        validate_subject(subject, wildcards=True)
        if queue is not None:
            validate_subject(queue)
        await trio.lowlevel.checkpoint()
        self._check_open()
        buffer: MessageBuffer[Message] = (
            MessageBuffer(limit, overflow, subject) if into is None else into
        )
        hub_sub = _HubSubscription(tuple(subject.split(".")), queue, buffer.push)

        def on_close() -> None:
            self.hub._remove(hub_sub)
            self._subscriptions.discard(subscription)

        subscription = _MemorySubscription(subject, buffer, on_close, owns_buffer=into is None)
        self.hub._add(hub_sub)
        self._subscriptions.add(subscription)
        return subscription

    async def request(self, subject: str, data: bytes, *, timeout: float) -> Message:
        validate_subject(subject)
        timeout = check_timeout(timeout)
        data = check_data(data)
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        token = str(next(self._tokens))
        waiter = _ReplyWaiter(subject)
        self._waiters[token] = waiter
        try:
            if not self.hub._publish(Message(subject, data, self._inbox_prefix + token)):
                raise NoRespondersError(subject)
            with trio.move_on_after(timeout):
                await waiter.event.wait()
            if waiter.reply is None:
                if waiter.abandoned:
                    raise RequestAbandonedError(subject)
                if self._closed:
                    raise TransportClosedError("the transport closed during the request")
                raise RequestTimeoutError(subject, timeout)
            return waiter.reply
        finally:
            del self._waiters[token]

    def abandon_requests(self, subject: str) -> int:
        abandoned = 0
        for waiter in self._waiters.values():
            if waiter.subject == subject and not waiter.event.is_set():
                waiter.abandoned = True
                waiter.event.set()
                abandoned += 1
        return abandoned

    @property
    def pending_requests(self) -> int:
        return len(self._waiters)

    async def key_value(
        self, bucket: str, *, replicas: int | None = None, storage: KVStorage | None = None
    ) -> KeyValue:
        """Open the hub's bucket ``bucket``, creating it if needed.

        The hub is a single in-process "server": ``replicas`` and ``storage`` are
        validated as NATS would take them, then have no effect (there is one copy,
        in memory, whatever they say).
        """
        validate_bucket(bucket)
        check_replicas(replicas)
        check_storage(storage)
        await trio.lowlevel.checkpoint()
        self._check_open()
        return _MemoryKeyValue(self.hub._bucket(bucket), self)

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self.hub._remove(self._inbox)
        for subscription in list(self._subscriptions):
            await subscription.aclose()
        for waiter in self._waiters.values():
            waiter.event.set()
        await trio.lowlevel.checkpoint()


@attrs.define(eq=False)
class _ReplyWaiter:
    subject: str
    event: trio.Event = attrs.Factory(trio.Event)
    reply: Message | None = None
    abandoned: bool = False


@asynccontextmanager
async def open_memory_transport(hub: MemoryHub | None = None) -> AsyncIterator[MemoryTransport]:
    """Open an in-process transport on ``hub`` (a fresh private hub if None).

    Transports on the same hub reach each other. Leaving the block closes the
    transport: its subscriptions end and its pending requests fail with
    :class:`~meshline.TransportClosedError`.
    """
    transport = MemoryTransport(hub if hub is not None else MemoryHub())
    try:
        yield transport
    finally:
        with trio.CancelScope(shield=True):
            await transport.aclose()


@attrs.define(eq=False)
class _Record:
    value: bytes
    revision: int
    operation: KVOperation


class _Bucket:
    """The state of one memory KV bucket: latest record per key, deadlines, watchers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.revision = 0
        self.records: dict[str, _Record] = {}
        self.deadlines: list[tuple[float, int, str]] = []
        self.watchers: list[tuple[tuple[str, ...], MessageBuffer[KVEntry]]] = []

    def expire(self) -> None:
        """Apply every TTL and marker deadline that is due by the Trio clock."""
        deadlines = self.deadlines
        if not deadlines:
            return
        now = trio.current_time()
        while deadlines and deadlines[0][0] <= now:
            _, revision, key = heapq.heappop(deadlines)
            record = self.records.get(key)
            if record is None or record.revision != revision:
                continue
            if record.operation is KVOperation.PUT:
                self.write(key, b"", KVOperation.PURGE, LIMIT_MARKER_SECONDS)
            else:
                del self.records[key]

    def next_deadline(self) -> float:
        return self.deadlines[0][0] if self.deadlines else float("inf")

    def write(self, key: str, value: bytes, operation: KVOperation, ttl: float | None) -> int:
        """Store one revision of ``key``; ``ttl`` seconds later it expires (a value
        leaves a ``PURGE`` marker behind, a marker simply goes)."""
        self.revision += 1
        revision = self.revision
        self.records[key] = _Record(value, revision, operation)
        if ttl is not None:
            heapq.heappush(self.deadlines, (trio.current_time() + ttl, revision, key))
        if self.watchers:
            entry = KVEntry(key, value, revision, operation)
            tokens = tuple(key.split("."))
            for pattern, buffer in self.watchers:
                if _matches(pattern, tokens):
                    buffer.push(entry)
        return revision

    def latest_revision(self, key: str) -> int:
        record = self.records.get(key)
        return 0 if record is None else record.revision

    def live(self, key: str) -> _Record | None:
        record = self.records.get(key)
        if record is None or record.operation is not KVOperation.PUT:
            return None
        return record


class _MemoryWatch(KVWatch):
    def __init__(
        self,
        snapshot: list[KVEntry],
        buffer: MessageBuffer[KVEntry],
        bucket: _Bucket,
        *,
        last_revision: int = 0,
    ) -> None:
        super().__init__(snapshot, buffer, last_revision=last_revision)
        self._entries = buffer
        self._bucket = bucket

    async def _next_raw(self) -> KVEntry:
        while True:
            self._bucket.expire()
            with trio.move_on_at(self._bucket.next_deadline()):
                return await self._entries.receive()


class _MemoryKeyValue(KeyValue):
    def __init__(self, bucket: _Bucket, transport: MemoryTransport) -> None:
        self.bucket = bucket.name
        self._state = bucket
        self._transport = transport

    async def _enter(self, key: str) -> _Bucket:
        validate_key(key)
        await trio.lowlevel.checkpoint()
        self._transport._check_open()
        self._state.expire()
        return self._state

    async def get(self, key: str) -> KVEntry | None:
        state = await self._enter(key)
        record = state.live(key)
        return None if record is None else KVEntry(key, record.value, record.revision)

    async def put(self, key: str, value: bytes, *, ttl: int | None = None) -> int:
        value, ttl = check_data(value), check_ttl(ttl)
        state = await self._enter(key)
        return state.write(key, value, KVOperation.PUT, ttl)

    async def create(self, key: str, value: bytes, *, ttl: int | None = None) -> int:
        value, ttl = check_data(value), check_ttl(ttl)
        state = await self._enter(key)
        if state.live(key) is not None:
            raise KeyExistsError(key)
        return state.write(key, value, KVOperation.PUT, ttl)

    async def update(self, key: str, value: bytes, *, revision: int, ttl: int | None = None) -> int:
        value, ttl = check_data(value), check_ttl(ttl)
        state = await self._enter(key)
        if state.latest_revision(key) != revision:
            raise RevisionMismatchError(key, revision)
        return state.write(key, value, KVOperation.PUT, ttl)

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        state = await self._enter(key)
        if revision is not None and state.latest_revision(key) != revision:
            raise RevisionMismatchError(key, revision)
        state.write(key, b"", KVOperation.DELETE, None)

    async def purge(self, key: str, *, revision: int | None = None) -> None:
        state = await self._enter(key)
        if revision is not None and state.latest_revision(key) != revision:
            raise RevisionMismatchError(key, revision)
        state.write(key, b"", KVOperation.PURGE, PURGE_MARKER_SECONDS)

    async def keys(self) -> list[str]:
        await trio.lowlevel.checkpoint()
        self._transport._check_open()
        self._state.expire()
        return sorted(key for key in self._state.records if self._state.live(key) is not None)

    def watch(
        self,
        pattern: str = ">",
        *,
        on_snapshot: Callable[[KVEntry], None] | None = None,
        removals: bool = True,
    ) -> AbstractAsyncContextManager[KVWatch]:
        validate_key(pattern, pattern=True)
        return self._watch(pattern, on_snapshot)  # the snapshot never holds removals

    @asynccontextmanager
    async def _watch(
        self, pattern: str, on_snapshot: Callable[[KVEntry], None] | None
    ) -> AsyncIterator[KVWatch]:
        await trio.lowlevel.checkpoint()
        self._transport._check_open()
        state = self._state
        state.expire()
        tokens = tuple(pattern.split("."))
        current = sorted(
            (
                (record.revision, key, record.value)
                for key, record in state.records.items()
                if record.operation is KVOperation.PUT and _matches(tokens, tuple(key.split(".")))
            ),
        )
        buffer: MessageBuffer[KVEntry] = MessageBuffer(DEFAULT_BUFFER, Overflow.ERROR, pattern)
        watcher = (tokens, buffer)
        # Watching from here on: writes made while the snapshot is handed over
        # arrive as live changes, newer than anything in it.
        state.watchers.append(watcher)
        try:
            if on_snapshot is None:
                watch = _MemoryWatch(
                    [KVEntry(key, value, revision) for revision, key, value in current],
                    buffer,
                    state,
                )
            else:
                for index, (revision, key, value) in enumerate(current, start=1):
                    on_snapshot(KVEntry(key, value, revision))
                    if index % _SNAPSHOT_BATCH == 0:
                        await trio.lowlevel.checkpoint()
                last = current[-1][0] if current else 0
                watch = _MemoryWatch([], buffer, state, last_revision=last)
            del current  # the watch alone holds the snapshot, so taking it frees it
            yield watch
        finally:
            state.watchers.remove(watcher)
            buffer.close()
