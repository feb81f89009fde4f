"""The outgoing queue of one connection: messages waiting for its writer, counted in bytes.

A plain data structure, with no I/O and no clock: the server and the client each
put the messages they mean to send into an :class:`Outbox`, and one writer task
per connection takes them out and writes them to the WebSocket. Putting never
waits, so a slow peer never blocks whoever emits to it (a room emit to a thousand
connections queues a thousand messages and returns).

What counts
    :attr:`Outbox.buffered_bytes` is the size of the messages waiting: ``len()``
    of a binary message, the UTF-8 length of a text one. The message the writer
    has taken and is still writing is no longer counted.

Past the limit
    ``max_buffered_bytes`` bounds the waiting bytes. A message that would take
    the queue past it is handled by the :class:`OverflowPolicy`:

    * ``close``: nothing more is queued and :meth:`Outbox.put` answers
      :attr:`PutOutcome.OVERFLOW`; the connection is then closed with 1013
      (``TRY_AGAIN_LATER``, reconnect band). Every later put answers ``OVERFLOW``
      too: :attr:`Outbox.overflowed` stays set.
    * ``drop``: the message is dropped and counted in :attr:`Outbox.dropped`
      (:attr:`PutOutcome.DROPPED`); the queue is untouched.
    * ``latest``: an event put with a coalescing ``key`` replaces the message of
      the same key still waiting, *in place*: it keeps the queue position of the
      first one, so a key updated without pause still reaches the peer as often
      as the writer gets to it, and never waits behind everything queued since.
      This happens whether or not the queue is past the limit (only the newest
      value per key ever waits), as long as the queue stays under the hard
      ceiling (below). A keyed message with no waiting predecessor, and any
      message without a key, fall back to ``drop`` past the limit.

Control messages
    Messages put with ``control=True`` (answers to calls, requests, pings,
    pongs, the welcome: whatever the peer would wait for) are never dropped or
    coalesced, since dropping an answer would leave the peer's call hanging
    until its timeout. Under ``drop`` and ``latest`` they may take the queue past
    the limit, up to twice the limit; past *that* hard ceiling the outbox
    overflows whatever the policy, so a peer that sends calls and never reads
    the answers cannot grow the queue without bound. Under ``close`` they
    overflow at the limit like anything else. (A ``latest`` replacement by a
    bigger value may take the queue past the limit too, up to the same
    ceiling.) So :attr:`Outbox.buffered_bytes` never exceeds twice
    ``max_buffered_bytes``.

Cancellation: there is nothing to cancel; every method returns at once.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Iterator

from .._errors import InvalidArgumentError
from ._frames import Message

__all__ = ["Outbox", "OverflowPolicy", "PutOutcome", "message_size"]


class OverflowPolicy(enum.StrEnum):
    """What an :class:`Outbox` does with a message that would take it past its limit."""

    CLOSE = "close"
    """Overflow: the connection is closed with 1013 (the default)."""
    DROP = "drop"
    """The message is dropped and counted."""
    LATEST = "latest"
    """Keyed events keep only their newest value; other messages are dropped."""


class PutOutcome(enum.Enum):
    """What :meth:`Outbox.put` did with a message."""

    QUEUED = "queued"
    """The message waits at the end of the queue."""
    REPLACED = "replaced"
    """The message replaced the waiting message of the same key (policy ``latest``)."""
    DROPPED = "dropped"
    """The message was dropped (policy ``drop``, or ``latest`` without a waiting
    predecessor); counted in :attr:`Outbox.dropped`."""
    OVERFLOW = "overflow"
    """Nothing was queued and the connection must close with 1013 (policy
    ``close``, the hard ceiling, or an outbox already overflowed)."""


def message_size(message: Message) -> int:
    """The size of ``message`` on the wire, in bytes (UTF-8 for a text message)."""
    if isinstance(message, bytes):
        return len(message)
    if message.isascii():  # O(1) in CPython: a flag of the string
        return len(message)
    return len(message.encode("utf-8", "surrogatepass"))


class _Entry:
    """A waiting message with a coalescing key, mutable so that ``latest`` can
    replace it in place. Messages without a key wait as they are: nothing is
    allocated per message (a room emit queues one message to every member, and
    whatever a queue holds the garbage collector must scan)."""

    __slots__ = ("key", "message", "size")

    def __init__(self, message: Message, size: int, key: str) -> None:
        self.message = message
        self.size = size
        self.key = key


class Outbox:
    """The byte-counted queue of messages waiting to be written to one connection.

    ``max_buffered_bytes`` (at least 1) bounds the waiting bytes; ``policy`` says
    what happens past it (see the module).

    :raises InvalidArgumentError: ``max_buffered_bytes`` below 1, or an unknown policy.
    """

    __slots__ = (
        "_by_key",
        "_first",
        "_queue",
        "buffered_bytes",
        "dropped",
        "max_buffered_bytes",
        "overflowed",
        "policy",
        "replaced",
    )

    def __init__(
        self, max_buffered_bytes: int, policy: OverflowPolicy | str = OverflowPolicy.CLOSE
    ) -> None:
        if isinstance(max_buffered_bytes, bool) or not isinstance(max_buffered_bytes, int):
            raise InvalidArgumentError(f"max_buffered_bytes must be an int: {max_buffered_bytes!r}")
        if max_buffered_bytes < 1:
            raise InvalidArgumentError(
                f"max_buffered_bytes must be at least 1: {max_buffered_bytes!r}"
            )
        try:
            self.policy = OverflowPolicy(policy)
        except ValueError:
            raise InvalidArgumentError(
                f"policy must be one of {[p.value for p in OverflowPolicy]}: {policy!r}"
            ) from None
        self.max_buffered_bytes = max_buffered_bytes
        self.buffered_bytes = 0
        """Bytes waiting (the message being written is no longer counted)."""
        self.dropped = 0
        """Messages dropped under ``drop`` or ``latest``."""
        self.replaced = 0
        """Keyed messages replaced by a newer value under ``latest``."""
        self.overflowed = False
        """Set for good once a put answered :attr:`PutOutcome.OVERFLOW`."""
        self._first: Message | _Entry | None = None
        """The oldest waiting message; the others wait in :attr:`_queue`. Most
        connections have at most one message waiting (an answer, a ping), and an
        idle one none: the deque (over 600 bytes even empty) is made only when a
        second message waits."""
        self._queue: collections.deque[Message | _Entry] | None = None
        self._by_key: dict[str, _Entry] | None = None

    def __len__(self) -> int:
        """How many messages wait."""
        if self._first is None:
            return 0
        return 1 + (len(self._queue) if self._queue is not None else 0)

    def __bool__(self) -> bool:
        return self._first is not None

    def __iter__(self) -> Iterator[Message]:
        """The waiting messages, oldest first (for tests and introspection)."""
        if self._first is None:
            return iter(())
        entries = [self._first, *(self._queue or ())]
        return (entry.message if isinstance(entry, _Entry) else entry for entry in entries)

    @property
    def hard_limit(self) -> int:
        """The ceiling for control messages under ``drop`` and ``latest``: twice the limit."""
        return 2 * self.max_buffered_bytes

    def put(self, message: Message, *, key: str | None = None, control: bool = False) -> PutOutcome:
        """Queue ``message`` (see the module for what happens past the limit).

        ``key`` is the coalescing key of an event (used by ``latest`` only);
        ``control`` marks a message that must not be dropped.
        """
        if self.overflowed:
            return PutOutcome.OVERFLOW
        size = message_size(message)
        policy = self.policy
        if (
            key is not None
            and not control
            and policy is OverflowPolicy.LATEST
            and self._by_key is not None
            and (waiting := self._by_key.get(key)) is not None
        ):
            if self.buffered_bytes + size - waiting.size > self.hard_limit:
                self.overflowed = True
                return PutOutcome.OVERFLOW
            self.buffered_bytes += size - waiting.size
            waiting.message = message
            waiting.size = size
            self.replaced += 1
            return PutOutcome.REPLACED
        total = self.buffered_bytes + size
        if total > self.max_buffered_bytes:
            if policy is OverflowPolicy.CLOSE or (control and total > self.hard_limit):
                self.overflowed = True
                return PutOutcome.OVERFLOW
            if not control:
                self.dropped += 1
                return PutOutcome.DROPPED
        item: Message | _Entry = message
        if key is not None and policy is OverflowPolicy.LATEST and not control:
            item = _Entry(message, size, key)
            if self._by_key is None:
                self._by_key = {}
            self._by_key[key] = item
        if self._first is None:
            self._first = item
        elif self._queue is None:
            self._queue = collections.deque((item,))
        else:
            self._queue.append(item)
        self.buffered_bytes = total
        return PutOutcome.QUEUED

    def take(self) -> Message | None:
        """The oldest waiting message, removed from the queue (None when empty)."""
        entry = self._first
        if entry is None:
            return None
        queue = self._queue
        self._first = queue.popleft() if queue else None
        if isinstance(entry, _Entry):
            assert self._by_key is not None
            del self._by_key[entry.key]
            self.buffered_bytes -= entry.size
            return entry.message
        self.buffered_bytes -= message_size(entry)
        return entry

    def clear(self) -> int:
        """Forget every waiting message (the connection is closing); returns how many."""
        count = len(self)
        self._first = None
        self._queue = None
        self._by_key = None
        self.buffered_bytes = 0
        return count

    def __repr__(self) -> str:
        return (
            f"<Outbox {len(self)} messages, {self.buffered_bytes}"
            f"/{self.max_buffered_bytes} bytes, {self.policy.value}>"
        )
