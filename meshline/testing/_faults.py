"""Fault injection: a transport wrapper that fails, hangs, stalls and cuts on demand,
and helpers that stop, pause and restart a real nats-server.

:class:`FaultyTransport` wraps any :class:`~meshline.Transport` (memory or NATS), so
the same fault can be injected into one node of a test cluster whichever transport
it runs on, without touching the node's internals. meshline's own tests use it, and
applications can use it in theirs.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio

from .._errors import InvalidArgumentError, TransportError
from .._transport._buffer import DEFAULT_BUFFER, MessageBuffer, Overflow
from .._transport._seam import (
    ConnectionEvent,
    ConnectionEventKind,
    KeyValue,
    KVEntry,
    KVStorage,
    KVWatch,
    Message,
    Subscription,
    Transport,
)
from ._server import NatsServer

__all__ = ["KV_WRITES", "FaultyTransport", "restart_server"]

KV_WRITES = ("put", "create", "update", "delete", "purge")
"""The KV operations that write."""

CUT_MESSAGE = "connection cut (injected)"
WRITE_FAILED_MESSAGE = "KV write failed (injected)"


class _WriteFault(enum.Enum):
    NONE = "none"
    FAIL = "fail"
    HANG = "hang"


def _check_operations(operations: Collection[str]) -> frozenset[str]:
    if isinstance(operations, str):
        raise InvalidArgumentError("operations is a collection of names, not one string")
    unknown = set(operations) - set(KV_WRITES)
    if unknown:
        raise InvalidArgumentError(f"not KV write operations: {sorted(unknown)}")
    return frozenset(operations)


class FaultyTransport(Transport):
    """A transport that forwards to ``inner`` until told to misbehave.

    Faults apply to everything done through this wrapper; ``inner`` itself is left
    alone, and is not closed by :meth:`aclose` (whoever opened it closes it).
    Subscriptions are the inner transport's own: messages keep arriving whatever
    the fault, as they would into the socket buffer of a stalled or cut-off process.

    Connection listeners hear the inner transport's events (except while the
    connection is :meth:`cut`) and the injected ones.

    The fault methods are plain functions, callable from any Trio task (and from a
    connection listener); each takes effect at once, also for operations already
    waiting in the wrapper. Operations already handed to the inner transport are
    not affected. The ``with`` forms (:meth:`failing_kv_writes`,
    :meth:`hanging_kv_writes`, :meth:`stalled`, :meth:`cut_off`) undo the fault when
    the block exits, however it exits.
    """

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        """The wrapped transport."""
        self._write_fault = _WriteFault.NONE
        self._fail_after = 0.0
        self._faulty_writes: frozenset[str] = frozenset(KV_WRITES)
        self._stalled = False
        self._cut = False
        self._watch_generation = 0
        self._changed = trio.Event()
        self.kv_writes_failed = 0
        """KV writes that raised because of :meth:`fail_kv_writes`."""
        self.kv_writes_hung = 0
        """KV writes that had to wait because of :meth:`hang_kv_writes`."""
        self.operations_stalled = 0
        """Operations and watch deliveries that had to wait because of :meth:`stall`."""
        self.operations_refused = 0
        """Operations that raised because of :meth:`cut`."""
        self._remove_listener = inner.add_connection_listener(self._forward)

    def _forward(self, event: ConnectionEvent) -> None:
        if not self._cut:
            self._emit_connection_event(event, log=False)

    def _notify(self) -> None:
        """Wake every operation waiting in the wrapper, to look at the faults again."""
        self._changed.set()
        self._changed = trio.Event()

    # ------------------------------------------------------------------ faults

    def fail_kv_writes(
        self, *, after: float = 0.0, operations: Collection[str] = KV_WRITES
    ) -> None:
        """Make KV writes raise :class:`~meshline.TransportError`, until
        :meth:`heal_kv_writes`. Reads (``get``, ``keys``, watches) still work.

        ``after`` is how long each write takes to fail, in seconds (at once by
        default), as a write to a struggling server would; cancelled during that
        time, the write raises :class:`trio.Cancelled` and was not made.
        ``operations`` limits the fault to some of ``put``, ``create``, ``update``,
        ``delete`` and ``purge``. Writes hanging because of :meth:`hang_kv_writes`
        fail now.
        """
        if not 0 <= after < float("inf"):
            raise InvalidArgumentError(f"after must be a finite number >= 0, got {after!r}")
        self._faulty_writes = _check_operations(operations)
        self._write_fault = _WriteFault.FAIL
        self._fail_after = after
        self._notify()

    def hang_kv_writes(self, *, operations: Collection[str] = KV_WRITES) -> None:
        """Make KV writes wait until :meth:`heal_kv_writes`, as writes to a server
        that stopped answering would. Reads still work.

        A hanging write that is cancelled raises :class:`trio.Cancelled` and was
        not made. ``operations`` limits the fault as for :meth:`fail_kv_writes`.
        """
        self._faulty_writes = _check_operations(operations)
        self._write_fault = _WriteFault.HANG
        self._notify()

    def heal_kv_writes(self) -> None:
        """End :meth:`fail_kv_writes` or :meth:`hang_kv_writes`: hanging writes go
        ahead now, in the order they started waiting."""
        self._write_fault = _WriteFault.NONE
        self._notify()

    def stall(self) -> None:
        """Freeze everything done through this transport, as a stalled process would
        look from outside: KV operations, watch deliveries, publishes, requests and
        new subscriptions wait until :meth:`resume`.

        Nothing is lost: entries that arrive for a watch meanwhile are delivered
        after :meth:`resume`, also when the waiting task was cancelled in between.
        A waiting operation that is cancelled raises :class:`trio.Cancelled` and was
        not performed.
        """
        self._stalled = True
        self._notify()

    def resume(self) -> None:
        """End a :meth:`stall`: everything waiting goes ahead."""
        self._stalled = False
        self._notify()

    def cut(self) -> None:
        """Lose the connection: listeners hear ``DISCONNECTED``, :attr:`connected`
        is False, and KV operations, publishes, requests and new subscriptions raise
        :class:`~meshline.TransportError` (``"connection cut (injected)"``) at once,
        also hanging KV writes. (While also stalled, they wait for :meth:`resume`
        first: a stalled process notices nothing.)

        Every KV watch open now goes silent for good, even after :meth:`restore`,
        as nats-py's watches stay silent for 10-20 s after a real reconnect: whoever
        relies on watches must reopen them on ``RECONNECTED``. Does nothing if the
        connection is already cut.
        """
        if self._cut:
            return
        self._cut = True
        self.silence_watches()
        self._emit_connection_event(ConnectionEvent(ConnectionEventKind.DISCONNECTED, CUT_MESSAGE))

    def silence_watches(self) -> None:
        """Make every KV watch open now go silent for good, with no connection event
        and nothing else affected: what a NATS KV watch does for 10-20 s when the
        stream's leader moves to another server of a cluster. Newly opened watches
        work."""
        self._watch_generation += 1
        self._notify()

    def restore(self) -> None:
        """End a :meth:`cut`: listeners hear ``RECONNECTED``, and new operations and
        newly opened watches work again. Does nothing if the connection is not cut."""
        if not self._cut:
            return
        self._cut = False
        self._notify()
        self._emit_connection_event(
            ConnectionEvent(ConnectionEventKind.RECONNECTED, "connection restored (injected)")
        )

    @contextlib.contextmanager
    def failing_kv_writes(
        self, *, after: float = 0.0, operations: Collection[str] = KV_WRITES
    ) -> Iterator[None]:
        """:meth:`fail_kv_writes` for the duration of the block, then
        :meth:`heal_kv_writes`."""
        self.fail_kv_writes(after=after, operations=operations)
        try:
            yield
        finally:
            self.heal_kv_writes()

    @contextlib.contextmanager
    def hanging_kv_writes(self, *, operations: Collection[str] = KV_WRITES) -> Iterator[None]:
        """:meth:`hang_kv_writes` for the duration of the block, then
        :meth:`heal_kv_writes`."""
        self.hang_kv_writes(operations=operations)
        try:
            yield
        finally:
            self.heal_kv_writes()

    @contextlib.contextmanager
    def stalled(self) -> Iterator[None]:
        """:meth:`stall` for the duration of the block, then :meth:`resume`."""
        self.stall()
        try:
            yield
        finally:
            self.resume()

    @contextlib.contextmanager
    def cut_off(self) -> Iterator[None]:
        """:meth:`cut` for the duration of the block, then :meth:`restore`."""
        self.cut()
        try:
            yield
        finally:
            self.restore()

    # ------------------------------------------------------------------ gates

    async def _gate(self, write: str | None = None) -> None:
        """Wait out a stall (and a hang, for a write), then refuse if the connection
        is cut or the write is failing. Each wait looks at the faults again."""
        stalled = hung = False
        while True:
            changed = self._changed
            if self._stalled:
                if not stalled:
                    stalled = True
                    self.operations_stalled += 1
                await changed.wait()
                continue
            if self._cut:
                self.operations_refused += 1
                raise TransportError(CUT_MESSAGE)
            if write is not None and write in self._faulty_writes:
                if self._write_fault is _WriteFault.FAIL:
                    if self._fail_after:
                        await trio.sleep(self._fail_after)
                    self.kv_writes_failed += 1
                    raise TransportError(WRITE_FAILED_MESSAGE)
                if self._write_fault is _WriteFault.HANG:
                    if not hung:
                        hung = True
                        self.kv_writes_hung += 1
                    await changed.wait()
                    continue
            return

    async def _deliverable(self, generation: int) -> None:
        """Wait out a stall; never return again for a watch opened before a cut."""
        stalled = False
        while self._stalled:
            if not stalled:
                stalled = True
                self.operations_stalled += 1
            await self._changed.wait()
        if generation != self._watch_generation:
            await trio.sleep_forever()

    # ------------------------------------------------------------------ Transport

    @property
    def connected(self) -> bool:
        """False while :meth:`cut`, else whether the inner transport is connected."""
        return not self._cut and self.inner.connected

    async def publish(self, subject: str, data: bytes, *, reply: str | None = None) -> None:
        """The inner :meth:`~meshline.Transport.publish`, after the fault gate
        (waits while stalled, raises while cut)."""
        await self._gate()
        await self.inner.publish(subject, data, reply=reply)

    async def _publish_trusted(self, subject: str, data: bytes) -> None:
        await self._gate()
        await self.inner._publish_trusted(subject, data)

    async def open_subscription(
        self,
        subject: str,
        *,
        queue: str | None = None,
        limit: int = DEFAULT_BUFFER,
        overflow: Overflow = Overflow.DROP_NEWEST,
        into: MessageBuffer[Message] | None = None,
    ) -> Subscription:
        """The inner transport's subscription, opened after the fault gate (waits
        while stalled, raises while cut). Its messages are not subject to faults."""
        await self._gate()
        return await self.inner.open_subscription(
            subject, queue=queue, limit=limit, overflow=overflow, into=into
        )

    async def request(self, subject: str, data: bytes, *, timeout: float) -> Message:
        """The inner :meth:`~meshline.Transport.request`, after the fault gate
        (waits while stalled, raises while cut). ``timeout`` starts after the gate."""
        await self._gate()
        return await self.inner.request(subject, data, timeout=timeout)

    async def _request_trusted(self, subject: str, data: bytes, timeout: float) -> Message:
        await self._gate()
        return await self.inner._request_trusted(subject, data, timeout)

    def abandon_requests(self, subject: str) -> int:
        """The inner :meth:`~meshline.Transport.abandon_requests`."""
        return self.inner.abandon_requests(subject)

    @property
    def pending_requests(self) -> int:
        """The inner transport's pending requests (none wait in the gate)."""
        return self.inner.pending_requests

    async def key_value(
        self, bucket: str, *, replicas: int | None = None, storage: KVStorage | None = None
    ) -> KeyValue:
        """The inner bucket, wrapped so that its operations and watches pass the
        fault gate. Opening it waits while stalled and raises while cut."""
        await self._gate()
        inner = await self.inner.key_value(bucket, replicas=replicas, storage=storage)
        return _FaultyKeyValue(inner, self)

    async def aclose(self) -> None:
        """Stop forwarding the inner transport's connection events. The inner
        transport stays open, and the faults stay as they are."""
        self._remove_listener()
        await trio.lowlevel.checkpoint()


class _FaultyKeyValue(KeyValue):
    """A bucket whose every operation passes its :class:`FaultyTransport`'s gate."""

    def __init__(self, inner: KeyValue, faults: FaultyTransport) -> None:
        self.bucket = inner.bucket
        self._inner = inner
        self._faults = faults

    async def get(self, key: str) -> KVEntry | None:
        await self._faults._gate()
        return await self._inner.get(key)

    async def put(self, key: str, value: bytes, *, ttl: int | None = None) -> int:
        await self._faults._gate("put")
        return await self._inner.put(key, value, ttl=ttl)

    async def create(self, key: str, value: bytes, *, ttl: int | None = None) -> int:
        await self._faults._gate("create")
        return await self._inner.create(key, value, ttl=ttl)

    async def update(self, key: str, value: bytes, *, revision: int, ttl: int | None = None) -> int:
        await self._faults._gate("update")
        return await self._inner.update(key, value, revision=revision, ttl=ttl)

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        await self._faults._gate("delete")
        await self._inner.delete(key, revision=revision)

    async def purge(self, key: str, *, revision: int | None = None) -> None:
        await self._faults._gate("purge")
        await self._inner.purge(key, revision=revision)

    async def keys(self) -> list[str]:
        await self._faults._gate()
        return await self._inner.keys()

    def watch(
        self,
        pattern: str = ">",
        *,
        on_snapshot: Callable[[KVEntry], None] | None = None,
        removals: bool = True,
    ) -> AbstractAsyncContextManager[KVWatch]:
        return self._watch(pattern, on_snapshot, removals)

    @asynccontextmanager
    async def _watch(
        self, pattern: str, on_snapshot: Callable[[KVEntry], None] | None, removals: bool
    ) -> AsyncIterator[KVWatch]:
        await self._faults._gate()
        async with self._inner.watch(pattern, on_snapshot=on_snapshot, removals=removals) as inner:
            yield _FaultyWatch(inner, self._faults)


class _FaultyWatch(KVWatch):
    """Delivers the inner watch's entries, held back while stalled, and never again
    once the connection was cut after it opened."""

    def __init__(self, inner: KVWatch, faults: FaultyTransport) -> None:
        super().__init__(inner.snapshot)
        self._inner = inner
        self._faults = faults
        self._generation = faults._watch_generation
        self._held: KVEntry | None = None

    def take_snapshot(self) -> list[KVEntry]:
        self._inner.take_snapshot()
        return super().take_snapshot()

    async def _next_raw(self) -> KVEntry:
        if self._held is None:
            await self._faults._deliverable(self._generation)
            self._held = await self._inner.__anext__()
        await self._faults._deliverable(self._generation)
        entry, self._held = self._held, None
        return entry


async def restart_server(server: NatsServer, downtime: float, *, kill: bool = False) -> None:
    """Stop ``server`` (gracefully with SIGTERM, or with SIGKILL as a crash when
    ``kill``), wait ``downtime`` seconds, and start it again on the same ports and
    store. Stopping and starting run in worker threads, so the Trio loop (and every
    NATS connection on it) keeps running throughout.

    Returns once the server answers health checks. Cancelled while the server is
    down, it leaves the server down; a stop or start already under way completes
    first.
    """
    if not 0 <= downtime < float("inf"):
        raise InvalidArgumentError(f"downtime must be a finite number >= 0, got {downtime!r}")
    await trio.to_thread.run_sync(server.kill if kill else server.stop)
    await trio.sleep(downtime)
    await trio.to_thread.run_sync(server.start)
