"""Fault injection: a transport wrapper that fails, hangs, stalls and cuts on demand,
and helpers that stop, pause and restart a real nats-server.

:class:`FaultyTransport` wraps any :class:`~meshline.Transport` (memory or NATS), so
the same fault can be injected into one node of a test cluster whichever transport
it runs on, without touching the node's internals. meshline's own tests use it, and
applications can use it in theirs.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Collection
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio

from ._buffer import DEFAULT_BUFFER, MessageBuffer, Overflow
from ._errors import InvalidArgumentError, TransportError
from ._server import NatsServer
from ._transport import (
    ConnectionEvent,
    ConnectionEventKind,
    KeyValue,
    KVEntry,
    KVWatch,
    Message,
    Subscription,
    Transport,
)

__all__ = ["KV_WRITES", "FaultyTransport", "restart_server"]

KV_WRITES = ("put", "create", "update", "delete", "purge")
"""The KV operations that write."""


class _WriteFault(enum.Enum):
    NONE = "none"
    FAIL = "fail"
    HANG = "hang"


class FaultyTransport(Transport):
    """A transport that forwards to ``inner`` until told to misbehave.

    Faults apply to everything done through this wrapper; ``inner`` itself is left
    alone, and is not closed by :meth:`aclose` (whoever opened it closes it).
    Subscriptions are the inner transport's own: messages keep arriving whatever
    the fault, as they would at a stalled or cut-off process whose socket buffer
    fills.

    The fault methods are plain functions, callable from any Trio task.
    """

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self._write_fault = _WriteFault.NONE
        self._fail_after = 0.0
        self._failing: frozenset[str] = frozenset(KV_WRITES)
        self._writes_healed = trio.Event()
        self._writes_healed.set()
        self._running = trio.Event()
        self._running.set()
        self._cut = False
        self._cut_generation = 0
        self.kv_writes_failed = 0
        """KV writes that raised because of :meth:`fail_kv_writes`."""
        self.operations_refused = 0
        """Operations that raised because of :meth:`cut`."""
        self._remove_listener = inner.add_connection_listener(self._emit_connection_event)

    # ------------------------------------------------------------------ faults

    def fail_kv_writes(
        self, *, after: float = 0.0, operations: Collection[str] = KV_WRITES
    ) -> None:
        """Make KV writes raise :class:`~meshline.TransportError`, until
        :meth:`heal_kv_writes`.

        ``after`` is how long each write takes to fail, in seconds (at once by
        default), as a write to a struggling server would. ``operations`` limits the
        fault to some of ``put``, ``create``, ``update``, ``delete`` and ``purge``.
        """
        unknown = set(operations) - set(KV_WRITES)
        if unknown:
            raise InvalidArgumentError(f"not KV write operations: {sorted(unknown)}")
        self._write_fault = _WriteFault.FAIL
        self._fail_after = after
        self._failing = frozenset(operations)

    def hang_kv_writes(self) -> None:
        """Make every KV write wait until :meth:`heal_kv_writes` (or until the caller
        is cancelled, in which case the write was not sent)."""
        self._write_fault = _WriteFault.HANG
        if self._writes_healed.is_set():
            self._writes_healed = trio.Event()

    def heal_kv_writes(self) -> None:
        """Let KV writes through again; hanging ones go ahead."""
        self._write_fault = _WriteFault.NONE
        self._writes_healed.set()

    def stall(self) -> None:
        """Freeze everything done through this transport, as a stalled process would
        look from outside: KV operations, watch deliveries, publishes and requests
        wait until :meth:`resume`. Nothing is lost; cancellation still works."""
        if self._running.is_set():
            self._running = trio.Event()

    def resume(self) -> None:
        """End a :meth:`stall`: everything waiting goes ahead, in order."""
        self._running.set()

    def cut(self) -> None:
        """Lose the connection: listeners hear ``DISCONNECTED``, :attr:`connected` is
        False, and KV operations, publishes and requests raise
        :class:`~meshline.TransportError` at once.

        Every KV watch open now goes silent for good, as nats-py's watches do after
        a real reconnect: whoever relies on watches must reopen them on
        ``RECONNECTED``.
        """
        if self._cut:
            return
        self._cut = True
        self._cut_generation += 1
        self._emit_connection_event(
            ConnectionEvent(ConnectionEventKind.DISCONNECTED, "connection cut (injected)")
        )

    def restore(self) -> None:
        """End a :meth:`cut`: listeners hear ``RECONNECTED``; new operations and newly
        opened watches work again."""
        if not self._cut:
            return
        self._cut = False
        self._emit_connection_event(
            ConnectionEvent(ConnectionEventKind.RECONNECTED, "connection restored (injected)")
        )

    # ------------------------------------------------------------------ gates

    async def _gate(self) -> None:
        """Wait out a stall, then refuse if the connection is cut."""
        await self._running.wait()
        if self._cut:
            self.operations_refused += 1
            raise TransportError("connection cut (injected)")

    async def _write_gate(self, operation: str) -> None:
        await self._gate()
        if self._write_fault is _WriteFault.FAIL and operation in self._failing:
            if self._fail_after:
                await trio.sleep(self._fail_after)
            self.kv_writes_failed += 1
            raise TransportError("KV write failed (injected)")
        if self._write_fault is _WriteFault.HANG:
            await self._writes_healed.wait()
            await self._gate()

    # ------------------------------------------------------------------ Transport

    @property
    def connected(self) -> bool:
        return not self._cut and self.inner.connected

    async def publish(self, subject: str, data: bytes, *, reply: str | None = None) -> None:
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
    ) -> Subscription:
        await self._gate()
        return await self.inner.open_subscription(
            subject, queue=queue, limit=limit, overflow=overflow
        )

    async def request(self, subject: str, data: bytes, *, timeout: float) -> Message:
        await self._gate()
        return await self.inner.request(subject, data, timeout=timeout)

    async def _request_trusted(self, subject: str, data: bytes, timeout: float) -> Message:
        await self._gate()
        return await self.inner._request_trusted(subject, data, timeout)

    def abandon_requests(self, subject: str) -> int:
        return self.inner.abandon_requests(subject)

    @property
    def pending_requests(self) -> int:
        return self.inner.pending_requests

    async def key_value(self, bucket: str) -> KeyValue:
        await self._gate()
        return _FaultyKeyValue(await self.inner.key_value(bucket), self)

    async def aclose(self) -> None:
        """Stop forwarding connection events. The inner transport stays open."""
        self._remove_listener()
        await trio.lowlevel.checkpoint()


class _FaultyKeyValue(KeyValue):
    def __init__(self, inner: KeyValue, faults: FaultyTransport) -> None:
        self.bucket = inner.bucket
        self._inner = inner
        self._faults = faults

    async def get(self, key: str) -> KVEntry | None:
        await self._faults._gate()
        return await self._inner.get(key)

    async def put(self, key: str, value: bytes, *, ttl: int | None = None) -> int:
        await self._faults._write_gate("put")
        return await self._inner.put(key, value, ttl=ttl)

    async def create(self, key: str, value: bytes, *, ttl: int | None = None) -> int:
        await self._faults._write_gate("create")
        return await self._inner.create(key, value, ttl=ttl)

    async def update(self, key: str, value: bytes, *, revision: int, ttl: int | None = None) -> int:
        await self._faults._write_gate("update")
        return await self._inner.update(key, value, revision=revision, ttl=ttl)

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        await self._faults._write_gate("delete")
        await self._inner.delete(key, revision=revision)

    async def purge(self, key: str) -> None:
        await self._faults._write_gate("purge")
        await self._inner.purge(key)

    async def keys(self) -> list[str]:
        await self._faults._gate()
        return await self._inner.keys()

    def watch(self, pattern: str = ">") -> AbstractAsyncContextManager[KVWatch]:
        return self._watch(pattern)

    @asynccontextmanager
    async def _watch(self, pattern: str) -> AsyncIterator[KVWatch]:
        await self._faults._gate()
        async with self._inner.watch(pattern) as inner:
            yield _FaultyWatch(inner, self._faults)


class _FaultyWatch(KVWatch):
    """Delivers the inner watch's entries, held back while stalled, and never again
    once the connection was cut after it opened."""

    def __init__(self, inner: KVWatch, faults: FaultyTransport) -> None:
        super().__init__(inner.snapshot, MessageBuffer(1, Overflow.ERROR, "faulty watch"))
        self._inner = inner
        self._faults = faults
        self._generation = faults._cut_generation

    async def _silent_if_cut(self) -> None:
        await self._faults._running.wait()
        if self._faults._cut_generation != self._generation:
            await trio.sleep_forever()

    async def _next_raw(self) -> KVEntry:
        await self._silent_if_cut()
        entry = await self._inner.__anext__()
        await self._silent_if_cut()
        return entry


async def restart_server(server: NatsServer, downtime: float, *, kill: bool = False) -> None:
    """Stop ``server`` (SIGTERM, or SIGKILL with ``kill``), wait ``downtime`` seconds,
    and start it again on the same ports and store, without blocking the Trio loop.

    Returns once the server answers health checks. If cancelled while it is down,
    the server stays down.
    """
    await trio.to_thread.run_sync(server.kill if kill else server.stop)
    await trio.sleep(downtime)
    await trio.to_thread.run_sync(server.start)
