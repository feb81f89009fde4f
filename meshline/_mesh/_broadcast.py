"""Typed broadcast: every node of a mesh hears what one sends on ``<prefix>.b``."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from .._errors import PayloadError
from .._transport._seam import Subscription, Transport, message_receiver, trusted_publisher
from ._declarations import BroadcastType, Handler, call_handler, resolve_name
from ._wire import BroadcastFrame, decode_payload, encode_broadcast

__all__ = ["BroadcastHandler", "Broadcasts"]

logger = logging.getLogger("meshline.node")

BroadcastHandler = Callable[[Any, int], Awaitable[None] | None]

_broadcast_decoder = msgspec.msgpack.Decoder(BroadcastFrame)


class Broadcasts:
    """This node's broadcast handlers; sends broadcasts and serves the arriving ones."""

    def __init__(self, transport: Transport, subject: str) -> None:
        self.node_id = 0
        self.subject = subject
        """The mesh's broadcast subject."""
        self.unhandled = 0
        """Broadcasts that arrived for a type with no handler here."""
        self._publish = trusted_publisher(transport)
        self._handlers: dict[str, list[Handler]] = {}

    def register(
        self, kind: str | BroadcastType[Any], handler: BroadcastHandler
    ) -> Callable[[], None]:
        """Call ``handler`` for every broadcast of ``kind``; see
        ``Node.register_broadcast_handler``."""
        name = resolve_name(kind)
        data_type = kind.data if isinstance(kind, BroadcastType) else Any
        entry = Handler(handler, data_type)
        self._handlers.setdefault(name, []).append(entry)

        def unregister() -> None:
            handlers = self._handlers.get(name, [])
            if entry in handlers:
                handlers.remove(entry)

        return unregister

    async def send(self, kind: str | BroadcastType[Any], data: Any, skip_self: bool) -> None:
        """Broadcast ``data`` as ``kind``; see ``Node.broadcast``.

        :raises PayloadError: ``data`` cannot be encoded.
        """
        name = resolve_name(kind)
        try:
            frame = encode_broadcast(self.node_id, name, bool(skip_self), data)
        except (TypeError, ValueError, OverflowError) as exc:
            raise PayloadError(f"cannot encode data for broadcast {name!r}: {exc}") from exc
        await self._publish(self.subject, frame)

    async def serve(self, broadcasts: Subscription) -> None:
        """Hand each arriving broadcast to its handlers, one at a time, until the
        subscription closes. A malformed frame is dropped and a failing handler
        logged; neither stops later deliveries."""
        receive = message_receiver(broadcasts)
        while True:
            try:
                message = await receive()
            except StopAsyncIteration:
                return
            try:
                frame = _broadcast_decoder.decode(message.data)
            except msgspec.MsgspecError:
                logger.warning("node %d: dropped a malformed broadcast", self.node_id)
                continue
            if frame.skip_sender and frame.sender == self.node_id:
                continue
            handlers = self._handlers.get(frame.kind)
            if not handlers:
                self.unhandled += 1
                continue
            for handler in list(handlers):
                try:
                    data = decode_payload(frame.data, handler.data_type)
                    if handler.is_async:
                        await handler.function(data, frame.sender)
                    else:
                        await call_handler(handler.function, data, frame.sender)
                except Exception:
                    logger.exception(
                        "node %d: broadcast handler for %r failed", self.node_id, frame.kind
                    )
