"""Node requests: the server that answers them (a pool of workers), and the client
side that sends them.

Subject ``<prefix>.n.<id>`` carries requests, and cancellations of requests, to node
``<id>``. A request frame names its sender, its id and the effective timeout of its
requester, so the handler is cancelled when the requester gives up, and, failing
the cancellation message, once that timeout has passed.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from .._errors import (
    InvalidArgumentError,
    MeshRequestTimeoutError,
    NodeNotAliveError,
    NoHandlerError,
    NoRespondersError,
    PayloadError,
    PayloadTooLargeError,
    RemoteHandlerError,
    RequestAbandonedError,
    RequestTimeoutError,
    TransportClosedError,
    TransportError,
)
from .._transport._seam import (
    Message,
    Subscription,
    Transport,
    check_timeout,
    message_receiver,
    trusted_publisher,
    trusted_requester,
)
from ._declarations import Handler, RequestType, qualified_name, resolve_name
from ._wire import (
    CancelFrame,
    ErrorReply,
    FailureKind,
    NodeFrame,
    OkReply,
    Reply,
    decode_payload,
    encode,
    encode_ok_reply,
    encode_payload,
    encode_request,
)

__all__ = ["RequestClient", "RequestHandler", "RequestServer"]

logger = logging.getLogger("meshline.node")

RequestHandler = Callable[[Any, int], Awaitable[Any]]

SWEEP_INTERVAL = 0.25
"""Seconds between checks for request handlers that outlived their timeout."""

_frame_decoder = msgspec.msgpack.Decoder(NodeFrame)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_generic_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder()

_NO_HANDLER_REPLY = encode(ErrorReply(FailureKind.NO_HANDLER, "", ""))


class _Worker:
    """A request worker: the cancel scope it runs handlers in, and what it runs now."""

    __slots__ = ("expires_after_sweep", "request", "scope")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.request: tuple[int, int] | None = None
        self.expires_after_sweep = 0

    def cancel(self) -> None:
        """Cancel the handler running now (a no-op between requests)."""
        if self.request is not None:
            self.scope.cancel()


class RequestServer:
    """Answers the requests addressed to this node, with a pool of workers.

    Nothing here ends the node: a malformed frame is dropped and logged, a handler
    that raises is answered with an error reply, and an answer that cannot be sent
    is logged and counted in :attr:`reply_failures`.
    """

    def __init__(self, transport: Transport, *, max_concurrent_handlers: int) -> None:
        self.node_id = 0
        self.handlers: dict[str, Handler] = {}
        """The handlers by request type name."""
        self.reply_failures = 0
        """Answers this node could not send (too large, or the transport failed)."""
        self._publish = trusted_publisher(transport)
        self._max_handlers = max_concurrent_handlers
        self._running: dict[tuple[int, int], _Worker] = {}
        self._workers = 0
        self._idle_workers = 0
        self._sweeps = 0
        self._handlers_arrived = trio.Event()
        """Set when a handler starts: the sweeper sleeps while none runs (an idle
        node, on a ``MockClock`` jumping hours ahead, must not wake 4 times a second)."""
        self._nursery: trio.Nursery | None = None

    @property
    def running(self) -> int:
        """How many handlers are running right now."""
        return len(self._running)

    def register(
        self, kind: str | RequestType[Any, Any], handler: RequestHandler
    ) -> Callable[[], None]:
        """Answer requests of type ``kind`` with ``handler``; see ``Node.register_handler``."""
        name = resolve_name(kind)
        if name in self.handlers:
            raise InvalidArgumentError(f"a handler for request type {name!r} is already registered")
        data_type = kind.request if isinstance(kind, RequestType) else Any
        entry = Handler(handler, data_type)
        self.handlers[name] = entry

        def unregister() -> None:
            if self.handlers.get(name) is entry:
                del self.handlers[name]

        return unregister

    def start(self, nursery: trio.Nursery, inbox: Subscription) -> None:
        """Serve ``inbox`` from tasks in ``nursery``: the first worker, and the sweep."""
        self._nursery = nursery
        nursery.start_soon(self._sweep_handlers)
        nursery.start_soon(self._serve, message_receiver(inbox))

    async def _serve(self, receive: Callable[[], Awaitable[Message]]) -> None:
        """One worker of the pool that answers requests.

        Workers take frames from the inbox one at a time. The pool grows by one
        whenever a worker takes a frame and no other worker is left idle, up to
        ``max_concurrent_handlers``, so a blocking handler never holds up the rest.
        Workers stay until the node closes.

        Each worker runs handlers inside a cancel scope of its own, reused from one
        request to the next. A remote cancellation or a handler timeout cancels that
        scope, and the worker carries on under a fresh one. Reusing scopes instead of
        opening one (and a task) per request is what makes a request cheap.
        """
        assert self._nursery is not None
        worker = _Worker()
        self._workers += 1
        self._idle_workers += 1
        try:
            while True:
                with trio.CancelScope() as scope:
                    worker.scope = scope
                    while True:
                        message = await receive()
                        self._idle_workers -= 1
                        try:
                            if not self._idle_workers and self._workers < self._max_handlers:
                                self._nursery.start_soon(self._serve, receive)
                            await self._handle_frame(worker, message)
                        finally:
                            self._idle_workers += 1
        except StopAsyncIteration:
            return
        finally:
            self._workers -= 1
            self._idle_workers -= 1

    async def _handle_frame(self, worker: _Worker, message: Message) -> None:
        try:
            frame = _frame_decoder.decode(message.data)
        except msgspec.MsgspecError:
            logger.warning("node %d: dropped a malformed frame", self.node_id)
            return
        if isinstance(frame, CancelFrame):
            running = self._running.get((frame.sender, frame.request_id))
            if running is not None:
                running.cancel()
            return
        reply_to = message.reply
        if reply_to is None:
            return
        handler = self.handlers.get(frame.kind)
        if handler is None:
            await self._send_reply(reply_to, _NO_HANDLER_REPLY, frame.kind)
            return
        key = (frame.sender, frame.request_id)
        worker.request = key
        worker.expires_after_sweep = self._sweeps + int(frame.timeout / SWEEP_INTERVAL) + 1
        self._running[key] = worker
        self._handlers_arrived.set()
        try:
            try:
                data = decode_payload(frame.data, handler.data_type)
            except msgspec.MsgspecError as exc:
                reply = encode(ErrorReply(FailureKind.BAD_PAYLOAD, qualified_name(exc), str(exc)))
            else:
                try:
                    reply = encode_ok_reply(await handler.function(data, frame.sender))
                except Exception as exc:
                    failure = ErrorReply(FailureKind.HANDLER_RAISED, qualified_name(exc), str(exc))
                    reply = encode(failure)
        finally:
            worker.request = None
            del self._running[key]
        await self._send_reply(reply_to, reply, frame.kind)

    async def _send_reply(self, reply_to: str, reply: bytes, kind: str) -> None:
        """Send an answer; if it cannot go, tell the requester why instead.

        A failure here must never end the node: it is logged and counted.
        """
        try:
            await self._publish(reply_to, reply)
            return
        except TransportClosedError:
            logger.debug("node %d: transport closed before answering %r", self.node_id, kind)
            return
        except PayloadTooLargeError as exc:
            failure = ErrorReply(FailureKind.REPLY_TOO_LARGE, qualified_name(exc), str(exc))
        except TransportError as exc:
            failure = ErrorReply(FailureKind.REPLY_FAILED, qualified_name(exc), str(exc))
        self.reply_failures += 1
        logger.warning("node %d: could not send the answer to %r (%s)", self.node_id, kind, failure)
        try:
            await self._publish(reply_to, encode(failure))
        except TransportError as exc:
            logger.warning("node %d: could not report the failed answer (%s)", self.node_id, exc)

    async def _sweep_handlers(self) -> None:
        """Cancel handlers that outlived the timeout their requester gave them.

        The requester cancels its handler itself when it gives up; this is the safety
        net for when that message never comes (the requester crashed, say). Sweeping
        a few times a second costs less than a timer per request, and a handler
        overstays its timeout by at most two sweep intervals.
        """
        while True:
            if not self._running:
                self._handlers_arrived = trio.Event()
                await self._handlers_arrived.wait()
            await trio.sleep(SWEEP_INTERVAL)
            self._sweeps += 1
            for worker in list(self._running.values()):
                if worker.expires_after_sweep <= self._sweeps:
                    worker.cancel()


class RequestClient:
    """Sends this node's requests: to other nodes over the transport, to itself by
    calling the handler directly."""

    def __init__(
        self,
        transport: Transport,
        prefix: str,
        server: RequestServer,
        is_alive: Callable[[int], bool],
    ) -> None:
        self.node_id = 0
        self._transport = transport
        self._request = trusted_requester(transport)
        self._prefix = prefix
        self._server = server
        self._is_alive = is_alive
        self._request_ids = itertools.count(1)
        self._subjects: dict[int, str] = {}

    def subject(self, node_id: int) -> str:
        """The subject of node ``node_id``'s requests."""
        subject = self._subjects.get(node_id)
        if subject is None:
            subject = self._subjects[node_id] = f"{self._prefix}.n.{node_id}"
        return subject

    def abandon(self, node_id: int) -> None:
        """Make every pending request to ``node_id`` fail at once (it is gone)."""
        self._transport.abandon_requests(self.subject(node_id))

    async def request(
        self, node_id: int, name: str, data: Any, response_type: Any, timeout: float
    ) -> Any:
        """Run the handler for ``name`` on ``node_id``; see ``Node.request``."""
        if node_id == self.node_id:
            return await self._request_self(name, data, response_type, timeout)
        if not self._is_alive(node_id):
            raise NodeNotAliveError(node_id)
        check_timeout(timeout)
        handler_timeout = timeout
        deadline = trio.current_effective_deadline()
        if deadline != math.inf:
            handler_timeout = max(min(timeout, deadline - trio.current_time()), 0.001)
        request_id = next(self._request_ids)
        try:
            frame = encode_request(request_id, self.node_id, name, handler_timeout, data)
        except (TypeError, ValueError, OverflowError) as exc:
            raise PayloadError(f"cannot encode data for {name!r}: {exc}") from exc
        subject = self.subject(node_id)
        try:
            reply = await self._request(subject, frame, timeout)
        except RequestTimeoutError:
            await self._send_cancel(subject, request_id)
            raise MeshRequestTimeoutError(node_id, name, timeout) from None
        except (NoRespondersError, RequestAbandonedError):
            await self._send_cancel(subject, request_id)
            raise NodeNotAliveError(node_id) from None
        except trio.Cancelled:
            await self._send_cancel(subject, request_id)
            raise
        return self._read_reply(node_id, name, reply, response_type)

    async def _send_cancel(self, subject: str, request_id: int) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self._transport.publish(
                    subject, encode(CancelFrame(request_id, self.node_id))
                )
            except TransportError:
                logger.debug("could not send cancellation of request %d", request_id)

    def _read_reply(self, node_id: int, name: str, reply: Message, response_type: Any) -> Any:
        if response_type is Any:  # the common untyped case: decode in one pass
            try:
                decoded = _generic_decoder.decode(reply.data)
            except msgspec.MsgspecError:
                decoded = None
            if decoded.__class__ is list and len(decoded) == 2 and decoded[0] == 0:
                return decoded[1]
        try:
            answer = _reply_decoder.decode(reply.data)
        except msgspec.MsgspecError as exc:
            raise PayloadError(f"malformed reply from node {node_id}: {exc}") from None
        if isinstance(answer, OkReply):
            try:
                return decode_payload(answer.data, response_type)
            except msgspec.MsgspecError as exc:
                raise PayloadError(f"answer to {name!r} from node {node_id}: {exc}") from None
        if answer.kind is FailureKind.NO_HANDLER:
            raise NoHandlerError(node_id, name)
        if answer.kind is FailureKind.BAD_PAYLOAD:
            raise PayloadError(f"node {node_id} could not decode {name!r}: {answer.message}")
        if answer.kind is FailureKind.REPLY_TOO_LARGE:
            raise PayloadTooLargeError(
                f"the answer of node {node_id} to {name!r}: {answer.message}"
            )
        raise RemoteHandlerError(node_id, name, answer.error_type, answer.message)

    async def _request_self(self, name: str, data: Any, response_type: Any, timeout: float) -> Any:
        check_timeout(timeout)
        try:
            payload = encode_payload(data)
        except (TypeError, ValueError, OverflowError) as exc:
            raise PayloadError(f"cannot encode data for {name!r}: {exc}") from exc
        handler = self._server.handlers.get(name)
        if handler is None:
            raise NoHandlerError(self.node_id, name)
        try:
            data = decode_payload(payload, handler.data_type)
        except msgspec.MsgspecError as exc:
            raise PayloadError(f"node {self.node_id} could not decode {name!r}: {exc}") from None
        with trio.move_on_after(timeout) as scope:
            try:
                result = await handler.function(data, self.node_id)
            except Exception as exc:
                raise RemoteHandlerError(self.node_id, name, qualified_name(exc), str(exc)) from exc
        if scope.cancelled_caught:
            raise MeshRequestTimeoutError(self.node_id, name, timeout)
        try:
            return decode_payload(encode_payload(result), response_type)
        except (TypeError, ValueError, OverflowError) as exc:
            raise RemoteHandlerError(self.node_id, name, qualified_name(exc), str(exc)) from exc
