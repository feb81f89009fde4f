"""Messages straight from trio-websocket's reader task, and a cheap wake-up signal.

trio-websocket's reader task reads the stream, and hands each complete message
to a memory channel that :meth:`~trio_websocket.WebSocketConnection.get_message`
reads. A connection that reads it with a task of its own pays a task switch per
message and a task per connection (in memory, for every idle connection), and
the channel holds one message: while nobody reads it, trio-websocket stops
reading the stream, so it stops answering WebSocket pings too.

:func:`deliver_directly` takes that channel's place with a :class:`DirectInbound`:
trio-websocket then hands each message to a plain function, in its own reader
task, and tells it when the WebSocket closed (on the ways out where it does not,
:class:`ReaderEnd` says the reader ended). The function must return at once
and never raise (it feeds the sans-IO protocol machine, and starts tasks for
whatever must wait), so trio-websocket never stops reading on meshline's account.

This touches two attributes trio-websocket keeps private (``_send_channel`` and
``_recv_channel``, the two ends of the channel; checked with
:func:`direct_delivery_supported`). When they are not what this module expects
(another trio-websocket version), :func:`deliver_directly` changes nothing and
returns False, and the caller reads with ``get_message`` as before;
``tests/test_socket_inbound.py`` fails if the installed version takes that
slower path.

Cancellation: nothing here waits; :meth:`Signal.wait` is a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
import trio.lowlevel
from trio_websocket import WebSocketConnection

from ._frames import Message

__all__ = [
    "DirectInbound",
    "Latch",
    "ReaderEnd",
    "Signal",
    "deliver_directly",
    "direct_delivery_supported",
]


class DirectInbound:
    """Stands in for both ends of trio-websocket's message channel.

    trio-websocket calls :meth:`send` for each complete message (from its reader
    task) and :meth:`aclose` when the WebSocket closed, whichever way (the peer's
    close, a dropped stream, its own 1009 for an oversized message, or a local
    close). ``on_message`` and ``on_closed`` run synchronously there;
    ``on_closed`` runs once, and no message is delivered after it.
    """

    __slots__ = ("_closed", "_on_closed", "_on_message")

    def __init__(
        self, on_message: Callable[[Message], None], on_closed: Callable[[], None]
    ) -> None:
        self._on_message = on_message
        self._on_closed = on_closed
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether trio-websocket said the WebSocket closed."""
        return self._closed

    def send_nowait(self, message: Message) -> None:
        if not self._closed:
            self._on_message(message)

    async def send(self, message: Message) -> None:
        self.send_nowait(message)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._on_closed()

    async def aclose(self) -> None:
        self.close()

    def receive_nowait(self) -> Message:
        raise trio.EndOfChannel

    async def receive(self) -> Message:
        """Nobody reads this channel: messages went to ``on_message``."""
        raise trio.EndOfChannel

    async def __aenter__(self) -> DirectInbound:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


def direct_delivery_supported(ws: Any) -> bool:
    """Whether ``ws`` keeps its message channel where :func:`deliver_directly` looks."""
    return isinstance(getattr(ws, "_send_channel", None), trio.MemorySendChannel) and isinstance(
        getattr(ws, "_recv_channel", None), trio.MemoryReceiveChannel
    )


class ReaderEnd:
    """Waits for trio-websocket's reader task to end.

    Not every way out of that task tells :class:`DirectInbound` (a peer's close
    whose answer cannot be written leaves without closing the channel it
    replaced): the reader task closes, on its way out, the original channel it
    entered when it started, and nobody sends on that channel any more, so
    waiting on its receiving end waits for the reader's end.
    """

    __slots__ = ("_receiver",)

    def __init__(self, receiver: trio.MemoryReceiveChannel[Message]) -> None:
        self._receiver = receiver

    async def wait(self) -> None:
        """Return once trio-websocket's reader task has ended.

        Cancellation: only the wait is cancelled.
        """
        try:
            while True:
                await self._receiver.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return


def deliver_directly(
    ws: WebSocketConnection,
    on_message: Callable[[Message], None],
    on_closed: Callable[[], None],
) -> ReaderEnd | None:
    """From now on, hand ``ws``'s messages to ``on_message`` in trio-websocket's
    reader task, and call ``on_closed`` when it says the WebSocket closed (see the
    module).

    Messages already waiting in the channel are handed over first, in order (so
    nothing is lost or reordered by the switch); if the WebSocket had closed
    meanwhile, ``on_closed`` follows them. Returns a :class:`ReaderEnd`: the caller
    waits on it and treats the reader's end as a close too (``on_closed`` is not
    called on every way out). Returns None, changing nothing, when
    trio-websocket's internals are not as expected: then read with
    ``get_message``.
    """
    if not direct_delivery_supported(ws):
        return None
    receiver: trio.MemoryReceiveChannel[Message] = ws._recv_channel
    waiting: list[Message] = []
    ended = False
    while True:
        try:
            waiting.append(receiver.receive_nowait())
        except trio.WouldBlock:
            break
        except (trio.EndOfChannel, trio.ClosedResourceError):
            ended = True
            break
    inbound = DirectInbound(on_message, on_closed)
    ws._send_channel = inbound  # type: ignore[assignment]
    ws._recv_channel = inbound  # type: ignore[assignment]
    for message in waiting:
        inbound.send_nowait(message)
    if ended:
        inbound.close()
    return ReaderEnd(receiver)


class Signal:
    """Wakes one waiting task; remembers a wake-up that came while nobody waited.

    What a writer task parks on: unlike a fresh :class:`trio.Event` per wait, it
    allocates nothing per wake-up (every idle connection has one, and a room
    emit wakes a thousand).
    """

    __slots__ = ("_abort", "_pending", "_task")

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None
        self._pending = False
        self._abort = self._aborted

    def set(self) -> None:
        """Wake the waiting task, or the next one to wait."""
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)
        else:
            self._pending = True

    async def wait(self) -> None:
        """Return once :meth:`set` was called (since the last wait returned).

        Cancellation: a checkpoint; a cancelled wait leaves no wake-up consumed.
        """
        if self._pending:
            await trio.lowlevel.checkpoint()
            self._pending = False
            return
        if self._task is not None:
            raise RuntimeError("another task is already waiting on this signal")
        self._task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _aborted(self, raise_cancel: Any) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED


class Latch:
    """Set once, for good; at most one task waits for it at a time.

    What a pending call waits on: a :class:`trio.Event` costs a set of waiters,
    and a closure per wait, for every call.
    """

    __slots__ = ("_set", "_task")

    def __init__(self) -> None:
        self._set = False
        self._task: trio.lowlevel.Task | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        """Set it, and wake the task waiting (if any)."""
        if self._set:
            return
        self._set = True
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)

    async def wait(self) -> None:
        """Return once it is set.

        Cancellation: a checkpoint; a cancelled wait leaves it as it was.
        """
        if self._set:
            await trio.lowlevel.checkpoint()
            return
        if self._task is not None:
            raise RuntimeError("another task is already waiting on this latch")
        self._task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._aborted)

    def _aborted(self, raise_cancel: Any) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED
