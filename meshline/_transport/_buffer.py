"""A bounded, synchronous-to-push buffer that one or more Trio tasks drain.

Transports push into it from code that must not block (a nats-py parser callback, or
another task's ``publish`` on the memory transport), so pushing never waits: when the
buffer is full, the :class:`Overflow` policy decides what gives.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Generic, TypeVar

import trio

from .._errors import SubscriptionOverflowError

__all__ = ["DEFAULT_BUFFER", "MessageBuffer", "Overflow"]

T = TypeVar("T")

DEFAULT_BUFFER = 10_000
"""Default number of messages a subscription holds before its overflow policy applies."""

_FAIRNESS_INTERVAL = 64
"""``receive`` yields to the scheduler at least once per this many buffered reads."""


class Overflow(enum.StrEnum):
    """What a subscription does when a message arrives and its buffer is full.

    NATS core delivery is at-most-once: a consumer that cannot keep up loses messages
    somewhere. These policies say where, and make it visible.
    """

    DROP_NEWEST = "drop_newest"
    """Discard the arriving message and count it in ``dropped``. The default."""

    DROP_OLDEST = "drop_oldest"
    """Discard the oldest buffered message to make room, and count it in ``dropped``."""

    ERROR = "error"
    """Stop delivering: the consumer gets :class:`~meshline.SubscriptionOverflowError`
    once it has read everything buffered before the overflow."""


class MessageBuffer(Generic[T]):
    """Bounded FIFO with a non-blocking :meth:`push` and an awaitable :meth:`receive`."""

    __slots__ = (
        "_closed",
        "_error",
        "_items",
        "_limit",
        "_lot",
        "_overflow",
        "_since_yield",
        "_subject",
        "dropped",
    )

    def __init__(self, limit: int, overflow: Overflow, subject: str) -> None:
        if limit < 1:
            raise ValueError("buffer limit must be at least 1")
        self._items: deque[T] = deque()
        self._limit = limit
        self._overflow = Overflow(overflow)
        self._subject = subject
        self._lot = trio.lowlevel.ParkingLot()
        self._closed = False
        self._error: BaseException | None = None
        self._since_yield = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def push(self, item: T) -> bool:
        """Add ``item`` without blocking. Return False if it (or an older one) was dropped."""
        if self._closed:
            return False
        items = self._items
        if len(items) >= self._limit:
            if self._overflow is Overflow.DROP_NEWEST:
                self.dropped += 1
                return False
            if self._overflow is Overflow.DROP_OLDEST:
                items.popleft()
                items.append(item)
                self.dropped += 1
                return False
            self.close(SubscriptionOverflowError(self._subject, self._limit))
            return False
        items.append(item)
        if self._lot:
            self._lot.unpark()
        return True

    def close(self, error: BaseException | None = None) -> None:
        """Stop accepting items. Readers drain what is left, then see the end (or ``error``)."""
        if self._closed:
            return
        self._closed = True
        self._error = error
        self._lot.unpark_all()

    async def receive(self) -> T:
        """Wait for and return the next item.

        :raises StopAsyncIteration: the buffer was closed and is now empty.
        :raises SubscriptionOverflowError: the buffer overflowed under ``Overflow.ERROR``.
        :raises trio.Cancelled: as usual; nothing is lost, because the item is only
            taken off the buffer after the last checkpoint.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._since_yield += 1
        if self._since_yield >= _FAIRNESS_INTERVAL:
            self._since_yield = 0
            await trio.lowlevel.cancel_shielded_checkpoint()
        items = self._items
        while not items:
            if self._closed:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            await self._lot.park()
            self._since_yield = 0
            # Several tasks may receive from one buffer, so look again after waking:
            # another may have taken the item this task was woken for.
        return items.popleft()
