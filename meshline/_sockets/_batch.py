"""Writing several WebSocket messages with one write to the socket.

trio-websocket writes each message on its own (``send_message``: frame it with
wsproto, take the stream lock, ``send_all``), so a connection with sixteen
messages waiting costs sixteen system calls and sixteen trips through the
lock, and its client wakes up to read as many times. :func:`send_messages`
frames every message first and writes them together: one ``send_all``, which
the client then reads in one go. The messages and their order are exactly what
``send_message`` one by one would have sent.

It needs three attributes trio-websocket keeps private (its wsproto machine,
its stream and the lock over it) and the two steps ``send_message`` takes on a
closed connection. :data:`BATCHING` says whether the installed trio-websocket
has them (checked once, at import); without them, each message goes through
``send_message`` as before. A test asserts that the installed version batches,
so an upgrade that renames them fails the suite instead of slowing down
silently.

Cancellation: as ``send_message``: a cancelled write may leave part of the
batch on the wire; the connection is then unusable (the caller closes it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.events import BytesMessage, TextMessage

from ._frames import Message

__all__ = ["BATCHING", "send_messages"]

logger = logging.getLogger("meshline.sockets")

_PRIVATE_NEEDS = ("_wsproto", "_stream", "_stream_lock", "_close_reason", "_abort_web_socket")


def _supported() -> bool:
    probe = WebSocketConnection.__init__.__code__.co_names
    members = set(dir(WebSocketConnection)) | set(probe)
    missing = [name for name in _PRIVATE_NEEDS if name not in members]
    if missing:
        logger.warning(
            "this trio-websocket has no %s: socket writes are not batched", ", ".join(missing)
        )
    return not missing


BATCHING = _supported()
"""Whether :func:`send_messages` writes a batch with one ``send_all``."""


async def send_messages(ws: WebSocketConnection, messages: Sequence[Message]) -> None:
    """Send ``messages`` on ``ws``, in order, with one write when :data:`BATCHING`.

    :raises ConnectionClosed: the connection is closed or closing (then none, or
        only part, of the batch was written), as ``send_message`` raises.
    """
    if not BATCHING or len(messages) == 1:
        for message in messages:
            await ws.send_message(message)
        return
    if ws._close_reason:
        raise ConnectionClosed(ws._close_reason)
    machine = ws._wsproto
    data = b"".join(
        [
            machine.send(
                TextMessage(data=message)
                if isinstance(message, str)
                else BytesMessage(data=message)
            )
            for message in messages
        ]
    )
    async with ws._stream_lock:
        try:
            await ws._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await ws._abort_web_socket()
            assert ws._close_reason is not None
            raise ConnectionClosed(ws._close_reason) from None
