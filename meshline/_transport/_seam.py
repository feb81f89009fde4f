"""The transport seam: the only interface the rest of meshline uses for messaging.

Two implementations exist: :mod:`meshline._transport._memory` (in-process) and
:mod:`meshline._transport._nats` (NATS through nats-py). Both pass the same conformance suite.
"""

from __future__ import annotations

import abc
import enum
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Literal, Self

import attrs
import trio

from .._errors import InvalidArgumentError
from ._buffer import DEFAULT_BUFFER, MessageBuffer, Overflow

__all__ = [
    "ConnectionEvent",
    "ConnectionEventKind",
    "KVEntry",
    "KVOperation",
    "KVWatch",
    "KeyValue",
    "Message",
    "Subscription",
    "Transport",
]


logger = logging.getLogger("meshline.transport")


class ConnectionEventKind(enum.StrEnum):
    """What a :class:`ConnectionEvent` reports."""

    DISCONNECTED = "disconnected"
    """The connection to the server was lost; the transport is trying to reconnect."""
    RECONNECTED = "reconnected"
    """The connection is back. Watches opened before it may be silent: reopen them."""
    SLOW_CONSUMER = "slow_consumer"
    """The server or the client dropped messages for a consumer that fell behind."""
    SERVER_ERROR = "server_error"
    """The server reported an error (authorization, permissions, a protocol error)."""


@attrs.frozen(slots=True)
class ConnectionEvent:
    """A change in a transport's connection, told to its connection listeners."""

    kind: ConnectionEventKind
    detail: str = ""


ConnectionListener = Callable[[ConnectionEvent], None]


def _detail(event: ConnectionEvent) -> str:
    return f" ({event.detail})" if event.detail else ""


@attrs.frozen(slots=True)
class Message:
    """One message received on a subscription, or the reply to a request."""

    subject: str
    data: bytes
    reply: str | None = None
    """The subject to answer on, if the sender expects a reply."""


class KVOperation(enum.StrEnum):
    """What a :class:`KVEntry` records."""

    PUT = "put"
    DELETE = "delete"
    PURGE = "purge"
    """The key was purged, or its TTL ran out."""


@attrs.frozen(slots=True)
class KVEntry:
    """One revision of one key in a KV bucket."""

    key: str
    value: bytes
    revision: int
    """The bucket-wide sequence number of this write. It only grows."""
    operation: KVOperation = KVOperation.PUT


class Subscription:
    """Messages arriving on a subject, buffered up to a limit.

    Iterate it with ``async for``. Iteration ends when the subscription or its
    transport is closed. Cancelling a task that waits in ``async for`` loses nothing.
    """

    def __init__(
        self, subject: str, buffer: MessageBuffer[Message], *, owns_buffer: bool = True
    ) -> None:
        self.subject = subject
        self._buffer = buffer
        self._owns_buffer = owns_buffer
        self._withdrawn = False

    @property
    def dropped(self) -> int:
        """How many messages the overflow policy has discarded so far."""
        return self._buffer.dropped

    @property
    def pending(self) -> int:
        """How many messages are buffered and not yet read."""
        return len(self._buffer)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        return await self._buffer.receive()

    async def receive(self) -> Message:
        """Return the next message.

        :raises trio.EndOfChannel: the subscription is closed and drained.
        :raises SubscriptionOverflowError: the buffer overflowed under ``Overflow.ERROR``.
        """
        try:
            return await self._buffer.receive()
        except StopAsyncIteration:
            raise trio.EndOfChannel from None

    async def aclose(self) -> None:
        """Stop receiving. Messages already buffered stay readable. Idempotent.

        This is shielded from cancellation, so interest is always withdrawn, also
        from a subscription whose buffer overflowed under ``Overflow.ERROR``.
        """
        if self._owns_buffer:
            self._buffer.close()
        if self._withdrawn:
            await trio.lowlevel.checkpoint()
            return
        self._withdrawn = True
        with trio.CancelScope(shield=True):
            await self._unsubscribe()

    async def _unsubscribe(self) -> None:
        """Withdraw interest at the transport. Overridden per transport."""


class KVWatch:
    """A watch on a KV bucket: a snapshot, then live changes.

    :attr:`snapshot` holds the current value of every matching key (deleted and
    expired keys left out) as of the moment the watch started. Iterating the watch
    then yields every later change in revision order, including ``DELETE`` and
    ``PURGE`` entries (an expired TTL shows up as ``PURGE``). An entry is never
    yielded twice, even if the server delivers it twice. Cancelling a task that
    waits for the next entry loses nothing.

    Transports feed a watch through a :class:`MessageBuffer`. A watch built on
    another watch (a wrapper) passes no buffer and overrides :meth:`_next_raw`.
    """

    def __init__(
        self,
        snapshot: list[KVEntry],
        buffer: MessageBuffer[KVEntry] | None = None,
        *,
        last_revision: int = 0,
    ):
        self.snapshot = snapshot
        self._buffer = buffer
        self._last_revision = max(
            last_revision, max((entry.revision for entry in snapshot), default=0)
        )
        """Entries up to this revision are not yielded: the snapshot had them (pass
        ``last_revision`` when the snapshot was handed over entry by entry)."""

    def take_snapshot(self) -> list[KVEntry]:
        """Return :attr:`snapshot` and let go of it (it is empty afterwards).

        A watch lives as long as its consumer follows it; taking the snapshot lets
        a large one be freed once it was loaded. A wrapper around another watch
        should override this to take the inner watch's snapshot too.
        """
        snapshot, self.snapshot = self.snapshot, []
        return snapshot

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> KVEntry:
        while True:
            entry = await self._next_raw()
            if entry.revision > self._last_revision:
                self._last_revision = entry.revision
                return entry

    async def _next_raw(self) -> KVEntry:
        """Wait for the next entry as delivered, duplicates included.

        Must lose nothing when cancelled. Ends iteration with ``StopAsyncIteration``.
        """
        if self._buffer is None:
            raise NotImplementedError("a KVWatch without a buffer must override _next_raw")
        return await self._buffer.receive()


def check_ttl(ttl: int | None) -> int | None:
    """Validate a per-key TTL: whole seconds, at least 1, or None for no TTL."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
        raise InvalidArgumentError(f"a KV TTL is a whole number of seconds >= 1, got {ttl!r}")
    return ttl


def check_timeout(timeout: float) -> float:
    """Validate a request timeout in seconds: positive and finite."""
    if not (isinstance(timeout, int | float) and 0 < timeout < math.inf):
        raise InvalidArgumentError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def check_data(data: bytes) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidArgumentError(f"message data must be bytes, not {type(data).__name__}")
    return bytes(data)


KVStorage = Literal["file", "memory"]
"""Where a KV bucket's server keeps its data: on disk, or in memory only."""

MAX_REPLICAS = 5
"""The most replicas a JetStream stream (so a KV bucket) can have."""


def check_replicas(replicas: int | None) -> int | None:
    """Validate a KV bucket's replica count: 1 to :data:`MAX_REPLICAS`, or None
    (automatic)."""
    if replicas is None:
        return None
    if isinstance(replicas, bool) or not isinstance(replicas, int):
        raise InvalidArgumentError(f"replicas must be an int, got {replicas!r}")
    if not 1 <= replicas <= MAX_REPLICAS:
        raise InvalidArgumentError(f"replicas must be between 1 and {MAX_REPLICAS}, got {replicas}")
    return replicas


def check_storage(storage: KVStorage | None) -> KVStorage | None:
    """Validate a KV bucket's storage: ``"file"``, ``"memory"`` or None (the default)."""
    if storage is None or storage == "file" or storage == "memory":
        return storage
    raise InvalidArgumentError(f'storage must be "file" or "memory", got {storage!r}')


class KeyValue(abc.ABC):
    """A KV bucket: revisioned keys with compare-and-set and optional per-key TTL.

    Keys must satisfy :func:`meshline.validate_key`; encode user-supplied strings
    with :func:`meshline.encode_token` first. A TTL is whole seconds, at least 1.

    On cancellation a write may or may not have reached the server; read the key to
    find out. No local state is left half-changed either way.
    """

    bucket: str

    @abc.abstractmethod
    async def get(self, key: str) -> KVEntry | None:
        """Return the current entry for ``key``, or None if it is absent.

        A deleted, purged or expired key is absent.
        """

    @abc.abstractmethod
    async def put(self, key: str, value: bytes, *, ttl: int | None = None) -> int:
        """Write ``value`` unconditionally and return the new revision."""

    @abc.abstractmethod
    async def create(self, key: str, value: bytes, *, ttl: int | None = None) -> int:
        """Write ``value`` only if ``key`` is absent, and return the new revision.

        A key that was deleted, purged or expired counts as absent, and can be
        created again at once.

        :raises KeyExistsError: the key holds a value.
        """

    @abc.abstractmethod
    async def update(self, key: str, value: bytes, *, revision: int, ttl: int | None = None) -> int:
        """Write ``value`` only if the key's latest revision is ``revision``.

        Returns the new revision. Passing ``ttl`` (re)starts the key's TTL; without it
        the new revision has no TTL.

        :raises RevisionMismatchError: the key has moved on (or expired).
        """

    @abc.abstractmethod
    async def delete(self, key: str, *, revision: int | None = None) -> None:
        """Delete ``key``, only if its latest revision is ``revision`` when one is given.

        Deleting an absent key without ``revision`` is not an error.

        :raises RevisionMismatchError: ``revision`` was given and is not the latest.
        """

    @abc.abstractmethod
    async def purge(self, key: str, *, revision: int | None = None) -> None:
        """Remove ``key`` and its history, only if its latest revision is ``revision``
        when one is given.

        Watchers see a ``PURGE`` entry. The purge marker itself does not accumulate:
        it expires after a while (a minute), after which the key leaves no trace, so
        a bucket with heavy churn stays as small as its live keys. Purging an absent
        key without ``revision`` is not an error.

        :raises RevisionMismatchError: ``revision`` was given and is not the latest.
        """

    @abc.abstractmethod
    async def keys(self) -> list[str]:
        """Return every key that currently holds a value, sorted."""

    @abc.abstractmethod
    def watch(
        self,
        pattern: str = ">",
        *,
        on_snapshot: Callable[[KVEntry], None] | None = None,
        removals: bool = True,
    ) -> AbstractAsyncContextManager[KVWatch]:
        """Watch keys matching ``pattern`` (``*`` = one token, final ``>`` = the rest).

        Use as ``async with kv.watch() as w:``; the snapshot is loaded on entry.

        With ``on_snapshot``, the snapshot is handed over instead of collected: each
        entry that makes it up is passed to ``on_snapshot`` as it arrives, in
        revision order, and :attr:`KVWatch.snapshot` stays empty, so a large bucket
        loads without a second copy of it in memory. The entries may include
        ``DELETE`` and ``PURGE`` entries, for keys that are absent or were removed
        while the snapshot loaded. ``on_snapshot`` is a plain function called on the
        Trio side; it must not block. If it raises, opening the watch fails with
        its exception.

        ``removals=False`` leaves out the ``DELETE`` and ``PURGE`` entries of keys
        that were already absent when the watch began (a key removed while the
        snapshot loads still gets its removal, as do live changes after it): a
        consumer that starts empty has nothing to remove, and a bucket that saw
        heavy churn holds as many removal markers as values for a while.
        """


class Transport(abc.ABC):
    """Publish/subscribe, request/reply and KV buckets, on one connection.

    Subjects must satisfy :func:`meshline.validate_subject`. Build them from fixed
    parts and :func:`meshline.encode_token` tokens, never from raw user strings.
    """

    @property
    def connected(self) -> bool:
        """Whether the transport is connected right now.

        False while a NATS connection is down and reconnecting, after it was closed
        for good, and after :meth:`aclose`.
        """
        return True

    def _listeners(self) -> list[ConnectionListener]:
        """This transport's listener list, created on first use (subclasses need not
        call an ``__init__`` of this class)."""
        listeners: list[ConnectionListener] = self.__dict__.setdefault("_connection_listeners", [])
        return listeners

    def add_connection_listener(self, listener: ConnectionListener) -> Callable[[], None]:
        """Call ``listener(event)`` on every :class:`ConnectionEvent`, on the Trio side.

        Listeners are plain (not async) functions, called in the order they were
        added, from whichever code noticed the change; they must not block. One that
        raises is logged and does not stop the others. Returns a function that
        removes the listener; calling it again does nothing.
        """
        listeners = self._listeners()
        listeners.append(listener)

        def remove() -> None:
            if listener in listeners:
                listeners.remove(listener)

        return remove

    def _emit_connection_event(self, event: ConnectionEvent, *, log: bool = True) -> None:
        """Log ``event`` (unless ``log`` is False: whoever passes it on logged it
        already), then call every listener with it."""
        if log:
            reconnected = event.kind is ConnectionEventKind.RECONNECTED
            level = logging.INFO if reconnected else logging.WARNING
            logger.log(level, "connection event: %s%s", event.kind.value, _detail(event))
        for listener in list(self._listeners()):
            try:
                listener(event)
            except Exception:
                logger.exception("connection listener %r failed on %s", listener, event.kind.value)

    @abc.abstractmethod
    async def publish(self, subject: str, data: bytes, *, reply: str | None = None) -> None:
        """Send ``data`` to every subscriber of ``subject``. At most once, no ack.

        This only queues the message for sending; it waits only when the outgoing
        buffer is full. Cancellation before it returns means the message was not sent.
        """

    @asynccontextmanager
    async def subscribe(
        self,
        subject: str,
        *,
        queue: str | None = None,
        limit: int = DEFAULT_BUFFER,
        overflow: Overflow = Overflow.DROP_NEWEST,
    ) -> AsyncIterator[Subscription]:
        """Subscribe to ``subject`` (wildcards allowed) for the duration of the block.

        With ``queue``, each message goes to one member of that queue group.
        ``limit`` bounds the buffer and ``overflow`` says what happens beyond it.
        Leaving the block unsubscribes, even when cancelled.
        """
        subscription = await self.open_subscription(
            subject, queue=queue, limit=limit, overflow=overflow
        )
        try:
            yield subscription
        finally:
            await subscription.aclose()

    @abc.abstractmethod
    async def open_subscription(
        self,
        subject: str,
        *,
        queue: str | None = None,
        limit: int = DEFAULT_BUFFER,
        overflow: Overflow = Overflow.DROP_NEWEST,
        into: MessageBuffer[Message] | None = None,
    ) -> Subscription:
        """Like :meth:`subscribe`, for subscriptions that outlive one block.

        The caller must ``await subscription.aclose()``; closing the transport also
        closes it. Once this returns, the subscription is active at the server.

        ``into`` delivers into a buffer shared with other subscriptions (one task
        reads many subjects; the messages' subjects tell them apart): ``limit``
        and ``overflow`` are then the buffer's own, and closing the subscription
        leaves the buffer open.
        """

    @abc.abstractmethod
    async def request(self, subject: str, data: bytes, *, timeout: float) -> Message:
        """Send ``data`` to one subscriber of ``subject`` and wait for its reply.

        Cancelling the caller (any enclosing Trio cancel scope) abandons the request
        at once. Whether the request times out, is cancelled, or gets its reply, its
        pending entry is removed before this returns or raises. A reply that arrives
        later is discarded.

        :raises NoRespondersError: nobody subscribes to ``subject``; raised at once.
        :raises RequestTimeoutError: no reply within ``timeout`` seconds.
        :raises RequestAbandonedError: :meth:`abandon_requests` gave up on it.
        """

    async def _request_trusted(self, subject: str, data: bytes, timeout: float) -> Message:
        """:meth:`request` for a subject, data and timeout that meshline built and
        checked itself; transports may skip validating them again."""
        return await self.request(subject, data, timeout=timeout)

    async def _publish_trusted(self, subject: str, data: bytes) -> None:
        """:meth:`publish` for a subject and data that meshline built or received
        (a reply subject); transports may skip validating them again."""
        await self.publish(subject, data)

    @abc.abstractmethod
    def abandon_requests(self, subject: str) -> int:
        """Make every pending request sent to ``subject`` raise at once.

        Each one raises :class:`RequestAbandonedError`; replies that arrive later are
        discarded. Returns how many were abandoned. Use it when it is known that no
        reply can come, such as when the responder is known to be gone.
        """

    @property
    @abc.abstractmethod
    def pending_requests(self) -> int:
        """How many requests are waiting for a reply right now."""

    @abc.abstractmethod
    async def key_value(
        self, bucket: str, *, replicas: int | None = None, storage: KVStorage | None = None
    ) -> KeyValue:
        """Open the KV bucket ``bucket``, creating it if needed (per-key TTL enabled).

        ``replicas`` (1 to 5) and ``storage`` (``"file"`` or ``"memory"``) apply when
        the bucket is created; None takes the transport's defaults (for NATS, the
        ``kv_replicas`` and ``kv_storage`` of :func:`~meshline.open_nats_transport`).
        How an existing bucket with other settings is treated is up to the transport.

        :raises InvalidArgumentError: a bad bucket name, ``replicas`` or ``storage``.
        :raises TransportError: the server cannot create or open the bucket.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close the transport: subscriptions end, pending requests fail. Idempotent."""


# ---------------------------------------------------------------- meshline's own paths
#
# The node layer sends on subjects it built and checked once, answers on reply subjects
# it received, and reads its own subscriptions in tight loops. These functions hand it
# the seam's fast paths without another module reaching into the seam's private
# attributes. They are meshline-internal and not exported: they skip the checks that
# guard the public methods. Transports speed them up by overriding
# ``Transport._publish_trusted`` and ``Transport._request_trusted``.


def message_receiver(subscription: Subscription) -> Callable[[], Awaitable[Message]]:
    """The function that takes the next message off ``subscription``: one call less
    per message than ``async for``, for a loop that reads a subscription it owns.

    The function raises ``StopAsyncIteration`` once the subscription is closed and
    drained, :class:`~meshline.SubscriptionOverflowError` as :meth:`Subscription.receive`
    does, and loses nothing when cancelled. Several tasks may share it.
    """
    return subscription._buffer.receive


def trusted_publisher(transport: Transport) -> Callable[[str, bytes], Awaitable[None]]:
    """``publish(subject, data)`` for subjects meshline built and checked itself, or
    reply subjects it received: the transport may skip validating them again."""
    return transport._publish_trusted


def trusted_requester(transport: Transport) -> Callable[[str, bytes, float], Awaitable[Message]]:
    """``request(subject, data, timeout)`` for a subject, data and timeout meshline
    built and checked itself; raises as :meth:`Transport.request` does."""
    return transport._request_trusted
