"""Many deadlines, one task: heartbeats and call timeouts without a cancel scope each.

A trio deadline on a cancel scope costs a good part of a call's overhead (every
scope with a deadline registers with the run loop, through a generator-based
context manager, on entering and on leaving), and a task per connection costs
every idle connection memory. :class:`Timers` keeps any number of deadlines in a
heap that one task watches: at each deadline it calls the callback registered
with it, which may ask to be called again later.

A deadline that is no longer wanted (a call that finished) is withdrawn with
:meth:`Timers.withdraw`: its entry stays in the heap, emptied, until the heap is
rebuilt without the withdrawn entries, which happens whenever they are more than
half of it. So the heap holds at most about twice the deadlines still wanted.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections.abc import Callable

import trio

__all__ = ["Timer", "Timers"]

logger = logging.getLogger("meshline.sockets")

Callback = Callable[[float], float | None]
"""Called with the current time at its deadline; returns the next deadline for the
same callback, or None to be forgotten."""


class Timer:
    """One deadline in :class:`Timers`: when, and what to call (None once it ran
    or was withdrawn)."""

    __slots__ = ("callback", "deadline", "order")

    def __init__(self, deadline: float, order: int, callback: Callback) -> None:
        self.deadline = deadline
        self.order = order
        self.callback: Callback | None = callback

    def __lt__(self, other: Timer) -> bool:
        deadline, other_deadline = self.deadline, other.deadline
        return deadline < other_deadline or (
            deadline == other_deadline and self.order < other.order
        )


class Timers:
    """Deadlines watched by one task (:meth:`run`); see the module."""

    def __init__(self) -> None:
        self._heap: list[Timer] = []
        self._order = itertools.count()
        self._withdrawn = 0
        self._sleep: trio.CancelScope | None = None

    def __len__(self) -> int:
        """How many deadlines are still wanted."""
        return len(self._heap) - self._withdrawn

    def add(self, deadline: float, callback: Callback) -> Timer:
        """Call ``callback(now)`` once ``deadline`` (``trio.current_time()`` clock)
        has passed; returns the entry, for :meth:`withdraw`."""
        timer = Timer(deadline, next(self._order), callback)
        heapq.heappush(self._heap, timer)
        sleep = self._sleep
        if sleep is not None and deadline < sleep.deadline:
            sleep.deadline = deadline
        return timer

    def withdraw(self, timer: Timer) -> None:
        """Forget ``timer`` (nothing if it already ran or was withdrawn)."""
        if timer.callback is None:
            return
        timer.callback = None
        self._withdrawn += 1
        heap = self._heap
        if self._withdrawn > 16 and 2 * self._withdrawn > len(heap):
            heap[:] = [entry for entry in heap if entry.callback is not None]
            heapq.heapify(heap)
            self._withdrawn = 0

    async def run(self) -> None:
        """Call each callback at its deadline, until cancelled. A callback that
        raises is logged and forgotten.

        Cancellation: stops; nothing is called any more.
        """
        heap = self._heap
        try:
            while True:
                with trio.CancelScope(deadline=heap[0].deadline if heap else math.inf) as sleep:
                    self._sleep = sleep
                    await trio.sleep_forever()
                self._sleep = None
                self._fire(trio.current_time())
        finally:
            self._sleep = None

    def _fire(self, now: float) -> None:
        """Call every callback due at ``now``. One that asks again is filed anew
        (the same :class:`Timer`, so its handle stays good) after the others ran,
        so a deadline that is already due again waits for the next round."""
        heap = self._heap
        again_later: list[Timer] = []
        while heap and heap[0].deadline <= now:
            timer = heapq.heappop(heap)
            callback = timer.callback
            if callback is None:
                self._withdrawn -= 1
                continue
            timer.callback = None  # ran: withdrawing it now does nothing
            try:
                again = callback(now)
            except Exception:
                logger.exception("a socket timer's callback failed")
                continue
            if again is not None and again < math.inf:
                timer.deadline = again
                timer.callback = callback
                again_later.append(timer)
        for timer in again_later:
            timer.order = next(self._order)
            heapq.heappush(heap, timer)
