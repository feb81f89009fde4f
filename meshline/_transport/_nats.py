"""The NATS transport: nats-py on asyncio, driven from Trio through trio-asyncio.

Crossing from Trio into asyncio costs 100-150 us, so the per-message paths never
cross. They rely on both event loops running on one thread:

* **Publish** appends the encoded ``PUB`` command to nats-py's outgoing buffer and,
  if its flusher task is idle, wakes it. The flusher (an asyncio task) is the pump:
  it writes every command queued since it last ran in one ``writelines`` call.
* **Subscriptions** swap nats-py's per-subscription asyncio queue for a shim whose
  ``put_nowait`` pushes straight into a bounded Trio buffer, so the parser task
  hands each message to Trio with no asyncio task switch at all.
* **Requests** share one wildcard inbox subscription per connection. Its shim
  resolves a token map on the Trio side; the timeout is a Trio cancel scope.

Control-plane calls (connect, subscribe, unsubscribe, every KV operation) cross
once per call. Everything nats-py raises is mapped onto meshline's errors here.

The fast paths touch these nats-py internals: ``Client._pending``,
``_pending_data_size``, ``_flush_queue``, ``_flush_pending``, ``_max_payload``,
``_max_pending_size``, ``_process_msg``, ``_subs`` and ``_send_ping`` (a flush
that is safe to cancel); ``Subscription._pending_queue``
``_pending_size``, ``_received`` and ``_jsi``; the ordered consumer's state
(``JetStreamContext._JSI._dseq``, ``_sseq``, ``_active``, ``track_sequences``) and
``PushSubscription._sub`` / ``_pending_queue``, for KV watches; and the command builders
``nats.protocol.command.pub_cmd`` / ``hpub_cmd``. nats-py is pinned to 2.16.x for
that reason. :func:`_check_nats_internals` fails loudly if one is missing, and a
self-test at connect proves that a publish and a request make the round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import msgspec
import nats
import nats.aio.subscription
import nats.errors
import nats.js.client
import nats.js.errors
import trio
from nats.js import api as js_api
from nats.protocol import command as nats_command
from nats.protocol import parser as nats_parser

from .._errors import (
    InvalidArgumentError,
    KeyExistsError,
    MeshlineError,
    NoRespondersError,
    PayloadTooLargeError,
    RequestAbandonedError,
    RequestTimeoutError,
    RevisionMismatchError,
    TransportClosedError,
    TransportError,
)
from .._util import single_exceptions
from ._buffer import DEFAULT_BUFFER, MessageBuffer, Overflow
from ._names import validate_bucket, validate_key, validate_subject
from ._seam import (
    ConnectionEvent,
    ConnectionEventKind,
    KeyValue,
    KVEntry,
    KVOperation,
    KVStorage,
    KVWatch,
    Message,
    Subscription,
    Transport,
    check_data,
    check_replicas,
    check_storage,
    check_timeout,
    check_ttl,
)
from ._timer import DeadlineTimer

__all__ = ["NatsTransport", "open_nats_transport"]

logger = logging.getLogger("meshline.transport")


def _trio_asyncio() -> Any:
    """trio-asyncio, imported on first use.

    Importing trio-asyncio patches asyncio for the whole process (its event loop
    policy, ``new_event_loop``, ``get_running_loop``...), so that a later
    ``asyncio.run()`` runs on trio-asyncio's loop. meshline imports it only once a
    NATS transport is opened, and leaves asyncio alone in a process that never
    opens one (the memory transport needs no asyncio at all).
    """
    import trio_asyncio

    return trio_asyncio


T = TypeVar("T")

OUTGOING_HIGH_WATER = 4 * 1024 * 1024
"""Bytes queued for the socket beyond which ``publish`` waits for a flush."""

PUBLISH_FAIRNESS_INTERVAL = 128
"""``publish`` yields to the scheduler at least once per this many calls."""

LIMIT_MARKER_TTL = 60
"""Seconds that the server-placed marker for an expired key lives (JetStream)."""

AUTO_REPLICAS = 3
"""Replicas of a new KV bucket when none were asked for, where JetStream can place
them: a cluster of at least 3 JetStream servers. Elsewhere a bucket gets 1."""

BUCKET_OPEN_TIMEOUT = 30.0
"""Seconds that opening a KV bucket may take: a few JetStream API calls, and in a
cluster the placement of a new stream's replicas."""

_STREAM_NOT_FOUND = 10059
_STREAM_NAME_IN_USE = 10058
_NO_ROOM_FOR_REPLICAS = (10005, 10023, 10074)
"""JetStream cannot place that many replicas: no suitable peers, insufficient
resources, or a server without clustering ("replicas > 1 not supported")."""

_WRONG_LAST_SEQUENCE = (10071, 10164)

JS_TIMEOUT = 5.0
"""Seconds to wait for a JetStream publish ack (as nats-py's default)."""

SELF_TEST_TIMEOUT = 5.0
"""Seconds the connect self-test waits for its publish and its request."""

CLOSE_TIMEOUT = 5.0
"""Seconds that closing the connection, a subscription or a watch may take."""


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _PubAck(msgspec.Struct):
    seq: int | None = None
    error: _ApiError | None = None


_pub_ack_decoder = msgspec.json.Decoder(_PubAck)


class _JetStreamError(TransportError):
    """The server refused a JetStream write; ``err_code`` says why."""

    def __init__(self, err_code: int, description: str) -> None:
        super().__init__(f"JetStream refused the write: {description} (error {err_code})")
        self.err_code = err_code


_CONNECTION_TROUBLE = (
    nats.errors.UnexpectedEOF,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionClosedError,
    nats.errors.TimeoutError,
    OSError,
    TimeoutError,
)
"""Errors nats-py reports through ``error_cb`` when the connection itself broke."""

_KV_OPERATION = "KV-Operation"
_MARKER_REASON = "Nats-Marker-Reason"
_EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"


_CLIENT_INTERNALS = (
    "_pending",
    "_pending_data_size",
    "_flush_queue",
    "_flush_pending",
    "_max_payload",
    "_max_pending_size",
    "_process_msg",
    "_subs",
    "_ps",
    "_send_ping",
)
_SUBSCRIPTION_INTERNALS = ("_pending_queue", "_pending_size", "_received", "_jsi")
_ORDERED_CONSUMER_INTERNALS = ("_dseq", "_sseq", "_active", "track_sequences")
_PUSH_SUBSCRIPTION_INTERNALS = ("_sub", "_pending_queue")
_PARSER_INTERNALS = ("buf", "state", "parse")
_PARSER_CONSTANTS = ("AWAITING_CONTROL_LINE", "MAX_CONTROL_LINE_SIZE")
_AWAITING_CONTROL_LINE = getattr(nats_parser, "AWAITING_CONTROL_LINE", 1)
"""nats-py's parser state between protocol lines."""
_MAX_CONTROL_LINE = getattr(nats_parser, "MAX_CONTROL_LINE_SIZE", 4096)
_COMMAND_HELPERS = ("pub_cmd", "hpub_cmd")


def _missing(thing: Any, names: tuple[str, ...], where: str) -> list[str]:
    return [f"{where}.{name}" for name in names if not hasattr(thing, name)]


def _check_nats_internals(client: Any) -> None:
    """Fail loudly if nats-py lacks an internal that meshline touches.

    ``client`` is a connected nats-py client. Subscriptions and the ordered
    consumer's state keep their internals in instance attributes, so a probe
    instance of each is built (no constructor has side effects) and checked too.

    :raises TransportError: naming every missing internal.
    """
    missing = _missing(client, _CLIENT_INTERNALS, "Client")
    missing += _missing(nats_command, _COMMAND_HELPERS, "nats.protocol.command")
    missing += _missing(nats_parser, _PARSER_CONSTANTS, "nats.protocol.parser")
    if hasattr(client, "_ps"):
        missing += _missing(client._ps, _PARSER_INTERNALS, "Parser")
    context: Any = nats.js.client.JetStreamContext
    try:
        subscription: Any = nats.aio.subscription.Subscription(client)
    except Exception as exc:
        missing.append(f"Subscription construction ({type(exc).__name__}: {exc})")
    else:
        missing += _missing(subscription, _SUBSCRIPTION_INTERNALS, "Subscription")
        try:
            push: Any = context.PushSubscription(None, subscription, "", "")
            ordered: Any = context._JSI(None, client, "", True, push, subscription, None)
        except Exception as exc:
            missing.append(f"ordered consumer construction ({type(exc).__name__}: {exc})")
        else:
            missing += _missing(
                push, _PUSH_SUBSCRIPTION_INTERNALS, "JetStreamContext.PushSubscription"
            )
            missing += _missing(ordered, _ORDERED_CONSUMER_INTERNALS, "JetStreamContext._JSI")
    if missing:
        raise TransportError(
            f"this nats-py version lacks internals meshline relies on: {', '.join(missing)}"
        )


@contextlib.contextmanager
def _mapped_errors(what: str) -> Iterator[None]:
    """Translate nats-py and asyncio failures into meshline errors."""
    try:
        yield
    except MeshlineError:
        raise
    except nats.errors.ConnectionClosedError as exc:
        raise TransportClosedError(f"{what}: the NATS connection is closed") from exc
    except nats.errors.MaxPayloadError as exc:
        raise PayloadTooLargeError(f"{what}: payload exceeds the server's max_payload") from exc
    except nats.js.errors.ServiceUnavailableError as exc:
        raise TransportError(f"{what}: JetStream is unavailable") from exc
    except nats.errors.NoRespondersError as exc:
        raise TransportError(f"{what}: JetStream is not enabled on the server") from exc
    except (TimeoutError, nats.errors.TimeoutError, trio.TooSlowError) as exc:
        raise TransportError(f"{what}: the NATS server did not answer in time") from exc
    except nats.errors.Error as exc:
        raise TransportError(f"{what}: {exc}") from exc
    except OSError as exc:
        raise TransportError(f"{what}: {exc}") from exc


class _QueueShim:
    """The parts of ``asyncio.Queue`` that nats-py calls on a subscription's queue.

    A shim never holds messages (it hands each one on at once), so it is always
    empty and joining it never waits.
    """

    __slots__ = ()

    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    def task_done(self) -> None:
        pass

    async def join(self) -> None:
        pass


class _BufferShim(_QueueShim):
    """Stands in for a nats-py subscription's asyncio queue; feeds a Trio buffer."""

    __slots__ = ("_buffer", "_subscription")

    def __init__(self, nats_subscription: Any, buffer: MessageBuffer[Message]) -> None:
        self._subscription = nats_subscription
        self._buffer = buffer

    def put_nowait(self, msg: Any) -> None:
        self._subscription._pending_size -= len(msg.data)
        self._buffer.push(Message(msg.subject, msg.data, msg.reply or None))

    def deliver(self, subject: bytes, reply: bytes, data: bytes) -> None:
        self._buffer.push(Message(subject.decode(), data, reply.decode() or None))


class _ReplyWaiter:
    """One pending request: the parked task, and what woke it."""

    __slots__ = ("abandoned", "done", "no_responders", "reply", "subject", "task", "timed_out")

    def __init__(self, task: trio.lowlevel.Task, subject: str) -> None:
        self.task = task
        self.subject = subject
        self.abandoned = False
        self.done = False
        self.reply: Message | None = None
        self.no_responders = False
        self.timed_out = False

    def expire(self) -> None:
        if not self.done:
            self.timed_out = True
            self.wake()

    def wake(self) -> None:
        if not self.done:
            self.done = True
            trio.lowlevel.reschedule(self.task)

    def abort(self, _: object) -> trio.lowlevel.Abort:
        self.done = True
        return trio.lowlevel.Abort.SUCCEEDED


class _InboxShim(_QueueShim):
    """Stands in for the request inbox's asyncio queue; resolves waiting requests."""

    __slots__ = ("_prefix_length", "_subscription", "_waiters")

    def __init__(self, nats_subscription: Any, prefix: str, waiters: dict[str, _ReplyWaiter]):
        self._subscription = nats_subscription
        self._prefix_length = len(prefix)
        self._waiters = waiters

    def put_nowait(self, msg: Any) -> None:
        self._subscription._pending_size -= len(msg.data)
        waiter = self._waiters.get(msg.subject[self._prefix_length :])
        if waiter is None or waiter.done:
            return
        headers = msg.headers
        if headers and headers.get("Status") == "503" and not msg.data:
            waiter.no_responders = True
        else:
            waiter.reply = Message(msg.subject, msg.data, msg.reply or None)
        waiter.wake()

    def deliver(self, subject: bytes, reply: bytes, data: bytes) -> None:
        waiter = self._waiters.get(subject[self._prefix_length :].decode())
        if waiter is None or waiter.done:
            return
        waiter.reply = Message(subject.decode(), data, reply.decode() or None)
        waiter.wake()


def _install_fast_dispatch(nc: Any) -> None:
    """Route messages for meshline's shims around nats-py's ``Msg`` building.

    nats-py's parser matches two regular expressions per message and awaits
    ``client._process_msg`` for every one. meshline's replacement for the parser's
    ``parse`` reads ``MSG`` and ``HMSG`` lines with plain byte operations and hands
    each complete message to :func:`dispatch`, synchronously: for our own
    subscriptions, a plain message needs none of nats-py's work (headers, JetStream
    flow control, a ``Msg`` dataclass), so it goes straight to the shim, and a KV
    watch's data messages go to its :class:`_WatchFeed`, which keeps the ordered
    consumer's books itself. Everything else (messages with headers such as "no
    responders", a watch's heartbeats, flow control and gaps, other subscriptions)
    takes nats-py's ``_process_msg``; other protocol lines (``PING``, ``INFO``,
    ``-ERR``...) and anything the fast reader does not recognise go to nats-py's own
    parser, which then reads on from there.
    """
    original = nc._process_msg
    subscriptions = nc._subs
    stats = nc.stats
    parser = nc._ps
    original_parse = parser.parse

    def dispatch(sid: int, subject: bytes, reply: bytes, data: bytes, headers: Any) -> bool:
        """Deliver a message to a meshline shim; False leaves it to nats-py."""
        subscription = subscriptions.get(sid)
        if subscription is None:
            return False
        sink = subscription._pending_queue
        kind = type(sink)
        if not headers and (kind is _BufferShim or kind is _InboxShim):
            sink.deliver(subject, reply, data)
        elif not (kind is _WatchFeed and sink.take(subscription, subject, reply, data, headers)):
            return False
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        return True

    async def process_msg(
        sid: int, subject: bytes, reply: bytes, data: bytes, headers: Any
    ) -> None:
        if not dispatch(sid, subject, reply, data, headers):
            await original(sid, subject, reply, data, headers)

    async def parse(data: bytes = b"") -> None:
        buffer = parser.buf  # replaced by the parser's reset() on reconnect
        buffer.extend(data)
        taken = 0
        """Bytes at the start of ``buffer`` read already (removed once, at the end)."""
        complete = b""
        """A copy of ``buffer`` once a complete message is in it, to slice from."""
        try:
            while (
                taken < len(buffer)
                and parser.state == _AWAITING_CONTROL_LINE
                and parser.buf is buffer
            ):
                if buffer.startswith(b"HMSG ", taken):
                    with_headers = True
                elif buffer.startswith(b"MSG ", taken):
                    with_headers = False
                else:
                    break  # another protocol line: nats-py's parser reads it
                line_end = buffer.find(b"\r\n", taken, taken + _MAX_CONTROL_LINE)
                if line_end < 0:
                    if len(buffer) - taken < _MAX_CONTROL_LINE:
                        return  # the line is not complete yet
                    break
                fields = buffer[taken:line_end].split()
                try:
                    size = int(fields[-1])
                    header_size = int(fields[-2]) if with_headers else 0
                    sid = int(fields[2])
                except (ValueError, IndexError):
                    break  # nats-py's parser raises its protocol error
                count = len(fields) - with_headers
                if count == 5:
                    reply = bytes(fields[3])
                elif count == 4:
                    reply = b""
                else:
                    break
                start = line_end + 2
                end = start + size
                if len(buffer) < end + 2:
                    return  # the payload is not complete yet
                if len(complete) < end:
                    complete = bytes(buffer)
                if with_headers:
                    middle = start + header_size
                    headers: bytes | None = complete[start:middle]
                    payload = complete[middle:end]
                else:
                    headers = None
                    payload = complete[start:end]
                taken = end + 2
                subject = bytes(fields[1])
                if not dispatch(sid, subject, reply, payload, headers):
                    await original(sid, subject, reply, payload, headers)
        finally:
            del buffer[:taken]
        if parser.buf:
            await original_parse()

    nc._process_msg = process_msg
    parser.parse = parse


class _NatsSubscription(Subscription):
    def __init__(
        self,
        subject: str,
        buffer: MessageBuffer[Message],
        transport: NatsTransport,
        nats_subscription: Any,
        *,
        owns_buffer: bool = True,
    ) -> None:
        super().__init__(subject, buffer, owns_buffer=owns_buffer)
        self._transport = transport
        self._nats_subscription = nats_subscription

    async def _unsubscribe(self) -> None:
        self._transport._subscriptions.discard(self)
        if self._transport._nc.is_closed:
            return
        try:
            await self._transport._aio(
                "unsubscribe", self._nats_subscription.unsubscribe, timeout=CLOSE_TIMEOUT
            )
        except TransportError as exc:
            logger.warning("unsubscribing from %r failed: %s", self.subject, exc)


async def _round_trip(nc: Any) -> None:
    """asyncio side: ``nc.flush()`` (a PING, then wait for its PONG), safe to cancel.

    nats-py's ``flush`` leaves the PONG's future in ``Client._pongs`` when it is
    cancelled or times out; the late PONG then fails on the cancelled future and
    ends nats-py's read loop, leaving a connection that says it is connected and
    receives nothing. The wait here is shielded: cancelling it leaves the future
    pending, for the late PONG to complete harmlessly.
    """
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    await nc._send_ping(future)
    await asyncio.shield(future)


async def _confirm_subscriptions(nc: Any) -> None:
    """asyncio side: return once the server has processed every SUB sent so far.

    nats-py queues SUB in its outgoing buffer, but writes the PING of a flush
    straight to the socket, so a PONG alone can come back before the SUB was even
    sent. First wait until the flusher has written the buffer, then PING.
    """
    await nc._flush_pending(force_flush=True)
    await _round_trip(nc)


class NatsTransport(Transport):
    """A :class:`~meshline.Transport` over one NATS connection.

    Get one from :func:`open_nats_transport`. It reconnects on its own: while the
    connection is down, publishes are buffered (up to nats-py's reconnect buffer)
    and subscriptions resume once it is back.
    """

    def __init__(
        self,
        nc: Any,
        loop: asyncio.AbstractEventLoop,
        *,
        kv_replicas: int | None = None,
        kv_storage: KVStorage = "file",
    ) -> None:
        _check_nats_internals(nc)
        _install_fast_dispatch(nc)
        self._nc = nc
        self._loop = loop
        self._closed = False
        self._tokens = itertools.count()
        self._waiters: dict[str, _ReplyWaiter] = {}
        self._subscriptions: set[_NatsSubscription] = set()
        self._inbox_prefix = ""
        self._js: Any = nc.jetstream()
        self._timer = DeadlineTimer()
        self._since_yield = 0
        self._kv_replicas = check_replicas(kv_replicas)
        self._kv_storage: KVStorage = check_storage(kv_storage) or "file"

    @property
    def connected(self) -> bool:
        """True while the NATS connection is up (False while reconnecting)."""
        return bool(self._nc.is_connected)

    async def _aio(
        self, what: str, function: Callable[..., Awaitable[T]], *args: Any, timeout: float = 10.0
    ) -> T:
        """Run one asyncio coroutine function (one bridge crossing), errors mapped."""
        with _mapped_errors(what):
            with trio.fail_after(timeout):
                adapted = _trio_asyncio().aio_as_trio(function, loop=self._loop)
                return await adapted(*args)  # type: ignore[no-any-return]

    async def _start(self) -> None:
        self._inbox_prefix = self._nc.new_inbox() + "."

        async def subscribe_inbox() -> None:
            inbox = await self._nc.subscribe(self._inbox_prefix + "*")
            inbox._pending_queue = _InboxShim(inbox, self._inbox_prefix, self._waiters)
            await _confirm_subscriptions(self._nc)

        await self._aio("subscribe", subscribe_inbox)
        await self._self_test()

    async def _self_test(self) -> None:
        """Prove the fast paths work with this nats-py: a publish, a publish with
        headers (nats-py's own delivery path) and a request, each through meshline's
        own path, to a private subject. A few milliseconds.

        :raises TransportError: one did not arrive within :data:`SELF_TEST_TIMEOUT`.
        """
        subject = self._inbox_prefix.rstrip(".") + "-selftest"
        try:
            async with self.subscribe(subject) as subscription:
                with trio.fail_after(SELF_TEST_TIMEOUT):
                    await self.publish(subject, b"publish")
                    published = await subscription.receive()
                    self._enqueue(subject, "", b"headers", b"NATS/1.0\r\nMeshline: 1\r\n\r\n")
                    with_headers = await subscription.receive()
                    async with trio.open_nursery() as nursery:

                        async def answer() -> None:
                            message = await subscription.receive()
                            if message.reply is not None:
                                await self.publish(message.reply, b"reply")

                        nursery.start_soon(answer)
                        reply = await self._request(subject, b"request", SELF_TEST_TIMEOUT)
        except (trio.TooSlowError, RequestTimeoutError, NoRespondersError) as exc:
            raise TransportError(
                "meshline's nats-py fast paths do not work with this nats-py version: "
                f"the connect self-test failed ({type(exc).__name__})"
            ) from exc
        if (published.data, with_headers.data, reply.data) != (b"publish", b"headers", b"reply"):
            raise TransportError(
                "meshline's nats-py fast paths do not work with this nats-py version: "
                "the connect self-test got the wrong data back"
            )

    def _check_open(self) -> None:
        if self._closed or self._nc.is_closed:
            raise TransportClosedError("the NATS transport is closed")

    def _enqueue(self, subject: str, reply: str, data: bytes, headers: bytes = b"") -> None:
        """Queue one PUB (or HPUB) command for nats-py's flusher, without the bridge.

        The size checked is what the server checks: headers plus data.
        """
        nc = self._nc
        self._check_open()
        size = len(data) + len(headers)
        if size > nc._max_payload:
            raise PayloadTooLargeError(
                f"message of {size} bytes exceeds the server's max_payload of {nc._max_payload}"
            )
        if headers:
            command = nats_command.hpub_cmd(subject, reply, headers, data)
        else:
            command = nats_command.pub_cmd(subject, reply, data)
        if not nc.is_connected and nc._pending_data_size + len(command) > nc._max_pending_size:
            raise TransportError("NATS is reconnecting and the outgoing buffer is full")
        nc._pending.append(command)
        nc._pending_data_size += len(command)
        flush_queue = nc._flush_queue
        if nc.is_connected and flush_queue is not None and flush_queue.empty():
            flush_queue.put_nowait(self._loop.create_future())

    async def publish(self, subject: str, data: bytes, *, reply: str | None = None) -> None:
        validate_subject(subject)
        if reply is not None:
            validate_subject(reply)
        if type(data) is not bytes:
            data = check_data(data)
        await trio.lowlevel.checkpoint_if_cancelled()
        self._enqueue(subject, reply or "", data)
        if self._nc._pending_data_size > OUTGOING_HIGH_WATER and self._nc.is_connected:
            await self._aio("flush", _round_trip, self._nc)
            return
        self._since_yield += 1
        if self._since_yield >= PUBLISH_FAIRNESS_INTERVAL:
            # Let the flusher and readers run: a publishing loop must not starve them.
            self._since_yield = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def open_subscription(
        self,
        subject: str,
        *,
        queue: str | None = None,
        limit: int = DEFAULT_BUFFER,
        overflow: Overflow = Overflow.DROP_NEWEST,
        into: MessageBuffer[Message] | None = None,
    ) -> Subscription:
        validate_subject(subject, wildcards=True)
        if queue is not None:
            validate_subject(queue)
        self._check_open()
        buffer: MessageBuffer[Message] = (
            MessageBuffer(limit, overflow, subject) if into is None else into
        )

        async def subscribe() -> Any:
            nats_subscription = await self._nc.subscribe(subject, queue=queue or "")
            nats_subscription._pending_queue = _BufferShim(nats_subscription, buffer)
            await _confirm_subscriptions(self._nc)
            return nats_subscription

        nats_subscription = await self._aio("subscribe", subscribe)
        subscription = _NatsSubscription(
            subject, buffer, self, nats_subscription, owns_buffer=into is None
        )
        self._subscriptions.add(subscription)
        return subscription

    async def request(self, subject: str, data: bytes, *, timeout: float) -> Message:
        validate_subject(subject)
        timeout = check_timeout(timeout)
        data = check_data(data)
        return await self._request(subject, data, timeout)

    async def _request_trusted(self, subject: str, data: bytes, timeout: float) -> Message:
        return await self._request(subject, data, timeout)

    async def _publish_trusted(self, subject: str, data: bytes) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._enqueue(subject, "", data)
        if self._nc._pending_data_size > OUTGOING_HIGH_WATER and self._nc.is_connected:
            await self._aio("flush", _round_trip, self._nc)

    async def _request(
        self, subject: str, data: bytes, timeout: float, headers: bytes = b""
    ) -> Message:
        await trio.lowlevel.checkpoint_if_cancelled()
        token = str(next(self._tokens))
        waiter = _ReplyWaiter(trio.lowlevel.current_task(), subject)
        self._enqueue(subject, self._inbox_prefix + token, data, headers)
        self._waiters[token] = waiter
        deadline = self._timer.add(timeout, waiter.expire)
        try:
            await trio.lowlevel.wait_task_rescheduled(waiter.abort)
        finally:
            del self._waiters[token]
            self._timer.remove(deadline)
        if waiter.reply is not None:
            return waiter.reply
        if waiter.no_responders:
            raise NoRespondersError(subject)
        if waiter.abandoned:
            raise RequestAbandonedError(subject)
        if self._closed:
            raise TransportClosedError("the transport closed during the request")
        raise RequestTimeoutError(subject, timeout)

    async def _js_publish(self, subject: str, data: bytes, headers: dict[str, str]) -> int:
        """Publish to a JetStream stream and return the sequence from its ack.

        Done on the Trio side, like ``request``: one HPUB and one reply, no bridge.

        :raises _JetStreamError: the server refused the write (its error code kept).
        """
        encoded = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        reply = await self._request(
            subject, data, JS_TIMEOUT, f"NATS/1.0\r\n{encoded}\r\n".encode()
        )
        try:
            ack = _pub_ack_decoder.decode(reply.data)
        except msgspec.MsgspecError as exc:
            raise TransportError(f"malformed JetStream ack: {reply.data[:200]!r}") from exc
        if ack.error is not None:
            raise _JetStreamError(ack.error.err_code, ack.error.description)
        if ack.seq is None:
            raise TransportError(f"JetStream ack without a sequence: {reply.data[:200]!r}")
        return ack.seq

    def abandon_requests(self, subject: str) -> int:
        abandoned = 0
        for waiter in list(self._waiters.values()):
            if waiter.subject == subject and not waiter.done:
                waiter.abandoned = True
                waiter.wake()
                abandoned += 1
        return abandoned

    @property
    def pending_requests(self) -> int:
        return len(self._waiters)

    async def key_value(
        self, bucket: str, *, replicas: int | None = None, storage: KVStorage | None = None
    ) -> KeyValue:
        """Open the KV bucket ``bucket`` (the JetStream stream ``KV_<bucket>``),
        creating it if needed.

        ``replicas`` and ``storage`` default to the transport's ``kv_replicas`` and
        ``kv_storage`` (see :func:`open_nats_transport`). With ``replicas`` None, a
        new bucket gets :data:`AUTO_REPLICAS` replicas, or 1 where JetStream cannot
        place that many (a single server, a cluster of fewer servers).

        An existing bucket is opened as it is, except that one with fewer replicas
        than asked for is raised to that many (JetStream changes a stream's
        replication in place); if the server refuses, the bucket is used as it is,
        with a warning when ``replicas`` was given. Replication is never lowered.
        Storage cannot change in place: a bucket kept in the other storage is used
        with a warning.

        :raises InvalidArgumentError: a bad bucket name, ``replicas`` or ``storage``.
        :raises TransportError: the server cannot create the bucket (for example
            ``replicas`` more than the cluster can place), or did not answer.
        """
        validate_bucket(bucket)
        replicas = check_replicas(replicas)
        storage = check_storage(storage)
        self._check_open()
        if replicas is None:
            replicas = self._kv_replicas
        direct = await self._aio(
            "open KV bucket",
            self._open_bucket,
            bucket,
            replicas,
            storage or self._kv_storage,
            timeout=BUCKET_OPEN_TIMEOUT,
        )
        return _NatsKeyValue(self, bucket, direct)

    async def _jetstream_api(self, subject: str, payload: bytes = b"") -> dict[str, Any]:
        """asyncio side: one JetStream API request (``$JS.API.<subject>``), its answer.

        :raises _JetStreamError: the answer is an error (its code kept).
        """
        msg = await self._nc.request(f"$JS.API.{subject}", payload, timeout=JS_TIMEOUT)
        try:
            answer = msgspec.json.decode(msg.data)
        except msgspec.MsgspecError as exc:
            raise TransportError(f"malformed JetStream answer: {msg.data[:200]!r}") from exc
        if not isinstance(answer, dict):
            raise TransportError(f"malformed JetStream answer: {msg.data[:200]!r}")
        error = answer.get("error")
        if isinstance(error, dict):
            raise _JetStreamError(int(error.get("err_code", 0)), str(error.get("description")))
        return answer

    async def _stream_config(self, stream: str) -> dict[str, Any] | None:
        """asyncio side: the configuration of ``stream`` as the server sent it, or
        None if there is no such stream."""
        try:
            info = await self._jetstream_api(f"STREAM.INFO.{stream}")
        except _JetStreamError as exc:
            if exc.err_code == _STREAM_NOT_FOUND:
                return None
            raise TransportError(
                f"reading the configuration of {stream} failed (error {exc.err_code})"
            ) from exc
        config = info.get("config")
        if not isinstance(config, dict):
            raise TransportError(f"JetStream stream info without a configuration for {stream}")
        return config

    async def _open_bucket(self, bucket: str, replicas: int | None, storage: KVStorage) -> bool:
        """asyncio side: open or create ``bucket``, with the settings that
        :meth:`key_value` describes; returns whether it allows direct gets."""
        stream = f"KV_{bucket}"
        config = await self._stream_config(stream)
        if config is None:
            config = await self._create_bucket(bucket, replicas, storage)
        if config is None:
            raise TransportError(f"KV bucket {bucket!r} vanished right after it was created")
        await self._reconcile_bucket(bucket, config, replicas, storage)
        return bool(config.get("allow_direct"))

    async def _create_bucket(
        self, bucket: str, replicas: int | None, storage: KVStorage
    ) -> dict[str, Any] | None:
        """asyncio side: create ``bucket``; its configuration once it exists (also
        when another client created it first, with whatever settings it chose)."""
        count = AUTO_REPLICAS if replicas is None else replicas
        while True:
            try:
                await self._js.create_key_value(
                    js_api.KeyValueConfig(
                        bucket=bucket,
                        history=1,
                        limit_marker_ttl=LIMIT_MARKER_TTL,
                        replicas=count,
                        storage=js_api.StorageType(storage),
                    )
                )
            except nats.js.errors.APIError as exc:
                if exc.err_code == _STREAM_NAME_IN_USE:
                    break  # created meanwhile, with other settings
                if exc.err_code in _NO_ROOM_FOR_REPLICAS and count > 1:
                    if replicas is None:
                        logger.info(
                            "KV bucket %r: JetStream cannot place %d replicas (%s); "
                            "creating it with 1",
                            bucket,
                            count,
                            exc.description,
                        )
                        count = 1
                        continue
                    raise TransportError(
                        f"KV bucket {bucket!r}: JetStream cannot place {count} replicas: "
                        f"{exc.description} (error {exc.err_code})"
                    ) from exc
                raise
            logger.info("created KV bucket %r: %d replica(s), %s storage", bucket, count, storage)
            break
        return await self._stream_config(f"KV_{bucket}")

    async def _reconcile_bucket(
        self, bucket: str, config: dict[str, Any], replicas: int | None, storage: KVStorage
    ) -> None:
        """asyncio side: bring an existing bucket's replication up to ``replicas``
        (:data:`AUTO_REPLICAS` if None, where the cluster can place them); warn
        about settings that cannot change. Failures are logged: the bucket is used."""
        have_storage = config.get("storage", "file")
        if have_storage != storage:
            logger.warning(
                "KV bucket %r keeps its %s storage (%s was asked for): JetStream cannot "
                "change a stream's storage; recreate the bucket to change it",
                bucket,
                have_storage,
                storage,
            )
        have = int(config.get("num_replicas") or 1)
        wanted = AUTO_REPLICAS if replicas is None else replicas
        if have >= wanted:
            if replicas is not None and have > replicas:
                logger.debug(
                    "KV bucket %r keeps its %d replicas (%d asked for): meshline never "
                    "lowers a bucket's replication",
                    bucket,
                    have,
                    replicas,
                )
            return
        raised = {**config, "num_replicas": wanted}
        try:
            await self._jetstream_api(f"STREAM.UPDATE.KV_{bucket}", msgspec.json.encode(raised))
        except _JetStreamError as exc:
            quiet = replicas is None and exc.err_code in _NO_ROOM_FOR_REPLICAS
            logger.log(
                logging.DEBUG if quiet else logging.WARNING,
                "KV bucket %r keeps %d replica(s), not %d: %s",
                bucket,
                have,
                wanted,
                exc,
            )
            return
        logger.info("KV bucket %r: replicas raised from %d to %d", bucket, have, wanted)

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        for subscription in list(self._subscriptions):
            subscription._buffer.close()
        for waiter in self._waiters.values():
            waiter.wake()
        with trio.CancelScope(shield=True):
            try:
                await self._aio("close", self._nc.close, timeout=CLOSE_TIMEOUT)
            except TransportError as exc:
                logger.warning("closing the NATS connection failed: %s", exc)


class _ConnectionCallbacks:
    """nats-py's ``error_cb``, ``disconnected_cb``, ``reconnected_cb`` and ``closed_cb``.

    nats-py runs them on the asyncio loop, which shares its thread with Trio, so they
    tell the transport's (Trio-side) listeners directly. Each then awaits the
    callback of the same name that the user passed, if any; one that raises is
    logged, so it cannot break nats-py's reader.
    """

    NAMES = ("error_cb", "disconnected_cb", "reconnected_cb", "closed_cb")

    def __init__(self, user: dict[str, Any]) -> None:
        for name, callback in user.items():
            if callback is not None and not inspect.iscoroutinefunction(callback):
                raise InvalidArgumentError(f"{name} must be an async function, got {callback!r}")
        self._user = user
        self.transport: NatsTransport | None = None
        """Set once the connection is up; events before that are only logged."""

    def options(self) -> dict[str, Callable[..., Awaitable[None]]]:
        return {
            "error_cb": self.error,
            "disconnected_cb": self.disconnected,
            "reconnected_cb": self.reconnected,
            "closed_cb": self.closed,
        }

    def _live(self) -> NatsTransport | None:
        """The transport, unless it is closing itself (then its events are expected)."""
        transport = self.transport
        return None if transport is None or transport._closed else transport

    async def _chain(self, name: str, *args: Any) -> None:
        callback = self._user.get(name)
        if callback is None:
            return
        try:
            await callback(*args)
        except Exception:
            logger.exception("the %s passed to open_nats_transport failed", name)

    async def error(self, exc: Exception) -> None:
        transport = self._live()
        if isinstance(exc, _CONNECTION_TROUBLE):
            # The connection itself broke (DISCONNECTED follows), or a reconnect
            # attempt failed: worth a line, not an event.
            quiet = transport is not None and transport._nc.is_reconnecting
            logger.log(
                logging.DEBUG if quiet else logging.WARNING,
                "NATS connection error: %s: %s",
                type(exc).__name__,
                exc,
            )
        else:
            if isinstance(exc, nats.errors.SlowConsumerError):
                kind = ConnectionEventKind.SLOW_CONSUMER
            else:
                kind = ConnectionEventKind.SERVER_ERROR
            event = ConnectionEvent(kind, str(exc) or type(exc).__name__)
            if transport is None:
                logger.warning("connection event: %s (%s)", kind.value, event.detail)
            else:
                transport._emit_connection_event(event)
        await self._chain("error_cb", exc)

    async def disconnected(self) -> None:
        transport = self._live()
        if transport is not None:
            closed = bool(transport._nc.is_closed)
            detail = "the connection is closed" if closed else "reconnecting"
            transport._emit_connection_event(
                ConnectionEvent(ConnectionEventKind.DISCONNECTED, detail)
            )
        await self._chain("disconnected_cb")

    async def reconnected(self) -> None:
        transport = self._live()
        if transport is not None:
            url = transport._nc.connected_url
            where = "" if url is None else f"{url.scheme}://{url.hostname}:{url.port}"
            transport._emit_connection_event(
                ConnectionEvent(ConnectionEventKind.RECONNECTED, where)
            )
        await self._chain("reconnected_cb")

    async def closed(self) -> None:
        transport = self._live()
        if transport is not None:
            error = transport._nc.last_error
            detail = "the connection is closed for good" + (
                f": {error}" if error is not None else ""
            )
            logger.error("connection event: server_error (%s)", detail)
            transport._emit_connection_event(
                ConnectionEvent(ConnectionEventKind.SERVER_ERROR, detail), log=False
            )
        await self._chain("closed_cb")


@asynccontextmanager
async def open_nats_transport(
    servers: str | list[str] = "nats://127.0.0.1:4222",
    *,
    name: str | None = None,
    connect_timeout: float = 5.0,
    reconnect_wait: float = 0.25,
    kv_replicas: int | None = None,
    kv_storage: KVStorage = "file",
    **nats_options: Any,
) -> AsyncIterator[NatsTransport]:
    """Connect to NATS and yield a transport; close it on exit.

    ``servers`` is one URL or a list (a cluster). The connection retries forever
    after it was once established, waiting ``reconnect_wait`` seconds between
    attempts on one server. When the server it is connected to goes away, it moves
    on to the next server of the list (and of the servers the cluster announced),
    so it fails over to a surviving server of a cluster; list several servers, so
    that even the first connect survives one being down. By default the list is
    shuffled (nats-py's ``dont_randomize=False``), spreading clients over the
    servers. Extra keyword arguments go to :func:`nats.connect` unchanged, except
    ``error_cb``, ``disconnected_cb``, ``reconnected_cb`` and ``closed_cb`` (async
    functions): meshline keeps its own and calls these after them.

    Changes of the connection are logged (logger ``meshline.transport``) and told
    to the transport's connection listeners: ``DISCONNECTED`` when it drops,
    ``RECONNECTED`` when it is back, ``SLOW_CONSUMER`` when nats-py drops messages
    for a subscription that fell behind, and ``SERVER_ERROR`` for an error the
    server reported (a permissions violation, a failed authorization while
    reconnecting) and when nats-py closed the connection for good (after an
    ``-ERR`` such as revoked credentials; the transport is then useless and
    :attr:`~NatsTransport.connected` stays False).

    ``kv_replicas`` and ``kv_storage`` are the defaults for the KV buckets this
    transport creates (see :meth:`NatsTransport.key_value`): replicas 1 to 5, or
    None for 3 where the cluster has at least 3 JetStream servers, else 1; storage
    ``"file"`` or ``"memory"``. They are checked before connecting
    (:class:`~meshline.InvalidArgumentError`).

    This opens a trio-asyncio loop for the connection's lifetime; trio-asyncio is
    imported here, not when meshline is (it patches asyncio for the whole process).
    The first connect
    must succeed within ``connect_timeout``, else :class:`~meshline.TransportError`.
    Leaving the block (even by cancellation) closes the connection, shielded, within
    5 seconds.
    """

    kv_replicas = check_replicas(kv_replicas)
    kv_storage = check_storage(kv_storage) or "file"
    server_list = [servers] if isinstance(servers, str) else list(servers)
    if not server_list:
        raise InvalidArgumentError("servers must name at least one NATS server")
    callbacks = _ConnectionCallbacks(
        {name: nats_options.pop(name, None) for name in _ConnectionCallbacks.NAMES}
    )
    options: dict[str, Any] = {
        "servers": server_list,
        "name": name,
        "connect_timeout": connect_timeout,
        "reconnect_time_wait": reconnect_wait,
        "max_reconnect_attempts": -1,
        "allow_reconnect": True,
        **callbacks.options(),
    }
    options.update(nats_options)
    trio_asyncio = _trio_asyncio()
    with single_exceptions():
        async with trio_asyncio.open_loop() as loop:
            with _mapped_errors("connect"), trio.fail_after(connect_timeout * 2 + 1):
                nc = await trio_asyncio.aio_as_trio(nats.connect)(**options)
            transport = NatsTransport(nc, loop, kv_replicas=kv_replicas, kv_storage=kv_storage)
            callbacks.transport = transport
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(transport._timer.run)
                    await transport._start()
                    yield transport
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await transport.aclose()


PURGE_MARKER_TTL = 60
"""Seconds a purge marker lives (``Nats-TTL``) before the server removes it, so a
purged key leaves nothing behind in the stream. Watchers see the marker as it is
written; one that fell further behind than this would miss it (a replica reloads
its snapshot after a reconnect, which settles that)."""

SNAPSHOT_STALL_TIMEOUT = 30.0
"""Seconds a watch's snapshot may go without a single new entry before opening the
watch fails. A large snapshot may take as long as it needs while entries flow. (With
10 s, one fresh open of a bucket of a million clients, right after a million more
had left, failed once in a benchmark run, while the server was expiring their
removal markers.)"""

WATCH_INACTIVE_THRESHOLD = 300.0
"""Seconds after which the server drops a watch's consumer that lost its subscriber."""

_ACK_PREFIX = b"$JS.ACK."
_V1_ACK_TOKENS = 9
"""``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>``"""
_V2_ACK_TOKENS = 11
"""The same with a domain and an account hash after ``ACK``, and maybe a token after."""

_OPERATIONS = {"DEL": KVOperation.DELETE, "PURGE": KVOperation.PURGE}
_MARKER_REASONS = {
    "MaxAge": KVOperation.PURGE,
    "Purge": KVOperation.PURGE,
    "Remove": KVOperation.DELETE,
}


def _operation_of(operation: str | None, reason: str | None) -> KVOperation | None:
    """What a stream message means for its key, from its ``KV-Operation`` and
    ``Nats-Marker-Reason`` headers; None for a marker of a reason not known yet
    (left out, as nats-py does)."""
    if operation is not None:
        return _OPERATIONS.get(operation, KVOperation.PUT)
    if reason is not None:
        return _MARKER_REASONS.get(reason)
    return KVOperation.PUT


def _raw_header(headers: bytes, name: bytes) -> str | None:
    """The value of header ``name`` in a raw ``NATS/1.0`` header block, if present."""
    start = headers.find(b"\r\n" + name + b":")
    if start < 0:
        return None
    start += len(name) + 3
    end = headers.find(b"\r\n", start)
    return headers[start : end if end >= 0 else len(headers)].strip().decode()


_RAW_KV_OPERATION = _KV_OPERATION.encode()
_RAW_MARKER_REASON = _MARKER_REASON.encode()


_RAW_PURGE = b"\r\nKV-Operation: PURGE\r\n"
_RAW_DELETE = b"\r\nKV-Operation: DEL\r\n"


def _raw_operation(headers: bytes) -> KVOperation | None:
    if not headers or (_RAW_KV_OPERATION not in headers and _RAW_MARKER_REASON not in headers):
        return KVOperation.PUT  # a value (its headers are a write's own, such as CAS)
    if _RAW_PURGE in headers:
        return KVOperation.PURGE  # the common markers, as clients write them
    if _RAW_DELETE in headers:
        return KVOperation.DELETE
    return _operation_of(
        _raw_header(headers, _RAW_KV_OPERATION), _raw_header(headers, _RAW_MARKER_REASON)
    )


class _WatchFeed(_QueueShim):
    """Stands in for a KV watch subscription's asyncio queue.

    The watch is a JetStream ordered consumer (last value per key, then every new
    write). Each of its messages becomes a :class:`KVEntry`: until the consumer has
    caught up (a message with nothing pending after it), entries go into
    :attr:`snapshot`, one per key, deletions removing the key (or, with
    ``on_snapshot``, each to that function as it comes); after that, into the Trio
    buffer. Both steps are linear in the number of messages.

    Messages arrive two ways. Data messages in the expected order come from the
    fast dispatch through :meth:`take`, which keeps the ordered consumer's books as
    nats-py would (sequences, activity, flow control bookkeeping) without building
    a ``Msg`` or parsing headers. Anything else (heartbeats, flow control, a gap
    that makes nats-py reset the consumer, other reply formats) takes nats-py's
    path, and what it lets through arrives in :meth:`put_nowait`.
    """

    __slots__ = (
        "_consumer",
        "_on_snapshot",
        "_prefix_length",
        "_subscription",
        "absent_through",
        "buffer",
        "failure",
        "last_revision",
        "loaded",
        "loading",
        "received",
        "snapshot",
    )

    def __init__(
        self,
        prefix: str,
        buffer: MessageBuffer[KVEntry],
        on_snapshot: Callable[[KVEntry], None] | None = None,
    ) -> None:
        self._prefix_length = len(prefix)
        self._subscription: Any = None
        self._on_snapshot = on_snapshot
        self.buffer = buffer
        self.snapshot: dict[str, KVEntry] = {}
        self.loading = True
        self.loaded = trio.Event()
        self.received = 0
        """Messages received so far, to tell a slow snapshot from a stalled one."""
        self.last_revision = 0
        """The newest revision the snapshot spoke of."""
        self.failure: Exception | None = None
        """What ``on_snapshot`` raised, if it did (the snapshot then ends)."""
        self.absent_through = 0
        """Removal markers up to this stream sequence are left out of the snapshot:
        when the stream ended there as the watch began, each such marker is the
        first word of its key (the consumer starts with the last message per key),
        so it only says the key is absent. Back to 0 as soon as nats-py takes a
        message itself or the ordered consumer is replaced (a reset delivers every
        message from a sequence on, so older markers may follow their key's
        values)."""
        self._consumer = b""
        """The name of the consumer delivering, from the first data message."""

    def attach(self, subscription: Any) -> None:
        """asyncio side: take the place of ``subscription``'s queue, taking over any
        message that reached the queue already."""
        early = subscription._pending_queue
        self._subscription = subscription
        subscription._pending_queue = self
        while not early.empty():
            self.put_nowait(early.get_nowait())

    def finish_snapshot(self) -> None:
        """The snapshot is complete: later entries are live changes."""
        if self.loading:
            self.loading = False
            self.loaded.set()

    def take(
        self, subscription: Any, subject: bytes, reply: bytes, data: bytes, headers: Any
    ) -> bool:
        """Handle a message from the fast dispatch; False leaves it to nats-py."""
        if headers and not headers.startswith(b"NATS/1.0\r\n"):
            return False  # a status message: idle heartbeat, flow control
        jsi = subscription._jsi
        if jsi is None or not reply.startswith(_ACK_PREFIX):
            return False
        tokens = reply.split(b".")
        if len(tokens) != _V1_ACK_TOKENS:
            return False
        consumer_sequence = int(tokens[6])
        if consumer_sequence != jsi._dseq:
            self.absent_through = 0
            return False  # a gap: nats-py resets the ordered consumer
        if tokens[3] != self._consumer:
            if self._consumer:
                self.absent_through = 0
            self._consumer = tokens[3]
        sequence = int(tokens[5])
        jsi._active = True
        jsi._dseq = consumer_sequence + 1
        jsi._sseq = sequence
        subscription._received += 1
        jsi.track_sequences(reply.decode())
        key = subject[self._prefix_length :].decode()
        self._add(key, data, sequence, _raw_operation(headers), int(tokens[8]))
        return True

    def put_nowait(self, msg: Any) -> None:
        """A message nats-py delivered after its own processing."""
        self.absent_through = 0
        self._subscription._pending_size -= len(msg.data)
        tokens = (msg.reply or "").split(".")
        if len(tokens) == _V1_ACK_TOKENS:
            sequence, pending = int(tokens[5]), int(tokens[8])
        elif len(tokens) >= _V2_ACK_TOKENS:
            sequence, pending = int(tokens[7]), int(tokens[10])
        else:
            logger.warning("KV watch: a message without JetStream metadata on %r", msg.subject)
            return
        headers = msg.headers or {}
        operation = _operation_of(headers.get(_KV_OPERATION), headers.get(_MARKER_REASON))
        key = msg.subject[self._prefix_length :]
        self._add(key, msg.data or b"", sequence, operation, pending)

    def _add(
        self, key: str, value: bytes, sequence: int, operation: KVOperation | None, pending: int
    ) -> None:
        self.received += 1
        if not self.loading:
            if operation is not None:
                self.buffer.push(KVEntry(key, value, sequence, operation))
            return
        self.last_revision = sequence
        if operation is None or (
            operation is not KVOperation.PUT and sequence <= self.absent_through
        ):
            pass
        elif self._on_snapshot is not None:
            try:
                self._on_snapshot(KVEntry(key, value, sequence, operation))
            except Exception as exc:
                self.failure = exc
                self.finish_snapshot()
                return
        else:
            snapshot = self.snapshot
            # Removed first, so the snapshot stays in revision order.
            snapshot.pop(key, None)
            if operation is KVOperation.PUT:
                snapshot[key] = KVEntry(key, value, sequence)
        if pending == 0:
            self.finish_snapshot()


def _entry_from_raw(key: str, msg: Any) -> KVEntry | None:
    """Classify a raw stream message for ``key``: a live value, or None if absent."""
    headers = msg.headers or {}
    if headers.get(_KV_OPERATION) in ("DEL", "PURGE") or _MARKER_REASON in headers:
        return None
    return KVEntry(key, msg.data or b"", msg.seq)


class _NatsKeyValue(KeyValue):
    def __init__(self, transport: NatsTransport, bucket: str, direct: bool) -> None:
        self.bucket = bucket
        self._transport = transport
        self._js = transport._js
        self._stream = f"KV_{bucket}"
        self._prefix = f"$KV.{bucket}."
        self._direct = direct

    async def _raw_latest(self, key: str) -> Any | None:
        """asyncio side: the latest stream message for ``key``, markers included."""
        try:
            return await self._js.get_msg(
                self._stream, subject=self._prefix + key, direct=self._direct
            )
        except nats.js.errors.NotFoundError:
            return None

    async def _publish(
        self, key: str, value: bytes, headers: dict[str, str], ttl: int | None
    ) -> int:
        """One JetStream publish from the Trio side; returns the new revision."""
        if ttl is not None:
            headers = {**headers, "Nats-TTL": str(ttl)}
        return await self._transport._js_publish(self._prefix + key, value, headers)

    async def get(self, key: str) -> KVEntry | None:
        validate_key(key)
        self._transport._check_open()
        msg = await self._transport._aio("KV get", self._raw_latest, key)
        return None if msg is None else _entry_from_raw(key, msg)

    async def put(self, key: str, value: bytes, *, ttl: int | None = None) -> int:
        validate_key(key)
        value, ttl = check_data(value), check_ttl(ttl)
        self._transport._check_open()
        return await self._publish(key, value, {}, ttl)

    async def create(self, key: str, value: bytes, *, ttl: int | None = None) -> int:
        validate_key(key)
        value, ttl = check_data(value), check_ttl(ttl)
        self._transport._check_open()
        expected = 0
        for _ in range(3):
            headers = {_EXPECTED_LAST_SUBJECT_SEQUENCE: str(expected)}
            try:
                return await self._publish(key, value, headers, ttl)
            except _JetStreamError as exc:
                if exc.err_code not in _WRONG_LAST_SEQUENCE:
                    raise
            latest = await self._transport._aio("KV get", self._raw_latest, key)
            if latest is not None and _entry_from_raw(key, latest) is not None:
                break
            # Deleted, purged or expired (a marker): create on top of it.
            expected = 0 if latest is None else int(latest.seq)
        raise KeyExistsError(key)

    async def update(self, key: str, value: bytes, *, revision: int, ttl: int | None = None) -> int:
        validate_key(key)
        value, ttl = check_data(value), check_ttl(ttl)
        self._transport._check_open()
        headers = {_EXPECTED_LAST_SUBJECT_SEQUENCE: str(revision)}
        try:
            return await self._publish(key, value, headers, ttl)
        except _JetStreamError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                raise RevisionMismatchError(key, revision) from None
            raise

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        validate_key(key)
        self._transport._check_open()
        headers = {_KV_OPERATION: "DEL"}
        if revision is not None:
            headers[_EXPECTED_LAST_SUBJECT_SEQUENCE] = str(revision)
        try:
            await self._publish(key, b"", headers, None)
        except _JetStreamError as exc:
            if revision is not None and exc.err_code in _WRONG_LAST_SEQUENCE:
                raise RevisionMismatchError(key, revision) from None
            raise

    async def purge(self, key: str, *, revision: int | None = None) -> None:
        """Purge ``key`` with a marker that expires after :data:`PURGE_MARKER_TTL`.

        On a bucket created without per-message TTLs (by another client), the
        server ignores the TTL and the marker stays, as a delete marker would.
        """
        validate_key(key)
        self._transport._check_open()
        headers = {_KV_OPERATION: "PURGE", "Nats-Rollup": "sub"}
        if revision is not None:
            headers[_EXPECTED_LAST_SUBJECT_SEQUENCE] = str(revision)
        try:
            await self._publish(key, b"", headers, PURGE_MARKER_TTL)
        except _JetStreamError as exc:
            if revision is not None and exc.err_code in _WRONG_LAST_SEQUENCE:
                raise RevisionMismatchError(key, revision) from None
            raise

    async def keys(self) -> list[str]:
        async with self.watch() as watch:
            return sorted(entry.key for entry in watch.snapshot)

    def watch(
        self,
        pattern: str = ">",
        *,
        on_snapshot: Callable[[KVEntry], None] | None = None,
        removals: bool = True,
    ) -> AbstractAsyncContextManager[KVWatch]:
        validate_key(pattern, pattern=True)
        return self._watch(pattern, on_snapshot, removals)

    @asynccontextmanager
    async def _watch(
        self, pattern: str, on_snapshot: Callable[[KVEntry], None] | None, removals: bool
    ) -> AsyncIterator[KVWatch]:
        self._transport._check_open()
        buffer: MessageBuffer[KVEntry] = MessageBuffer(DEFAULT_BUFFER, Overflow.ERROR, pattern)
        feed = _WatchFeed(self._prefix, buffer, on_snapshot)
        subscription = await self._transport._aio(
            "KV watch", self._subscribe, pattern, feed, removals
        )
        try:
            await self._wait_for_snapshot(feed, pattern)
            if feed.failure is not None:
                raise feed.failure
            # Held by the watch alone, so taking it from the watch frees it.
            watch = KVWatch(list(feed.snapshot.values()), buffer, last_revision=feed.last_revision)
            feed.snapshot = {}
            yield watch
        finally:
            buffer.close()
            with trio.CancelScope(shield=True):
                await self._stop_watcher(subscription, pattern)

    async def _subscribe(self, pattern: str, feed: _WatchFeed, removals: bool) -> Any:
        """asyncio side: start the watch's ordered consumer, feeding ``feed``."""
        if not removals:
            stream = await self._js.stream_info(self._stream)
            feed.absent_through = stream.state.last_seq
        subscription = await self._js.subscribe(
            self._prefix + pattern,
            stream=self._stream,
            ordered_consumer=True,
            deliver_policy=js_api.DeliverPolicy.LAST_PER_SUBJECT,
            inactive_threshold=WATCH_INACTIVE_THRESHOLD,
        )
        try:
            feed.attach(subscription._sub)
            # nats-py's flow control check reads the queue through this copy.
            subscription._pending_queue = feed
            info = await subscription.consumer_info()
        except BaseException:
            await subscription.unsubscribe()
            raise
        delivered = info.delivered.consumer_seq if info.delivered is not None else 0
        if info.num_pending == 0 and not delivered and subscription._sub._received == 0:
            # Nothing to load. (Messages the server delivered but this side has not
            # read yet are no longer pending: the last of them ends the snapshot.)
            feed.finish_snapshot()
        return subscription

    async def _wait_for_snapshot(self, feed: _WatchFeed, pattern: str) -> None:
        """Wait until the snapshot is complete, however long it takes while entries
        keep arriving.

        :raises TransportError: no entry arrived for :data:`SNAPSHOT_STALL_TIMEOUT`.
        """
        seen = feed.received
        while not feed.loaded.is_set():
            with trio.move_on_after(SNAPSHOT_STALL_TIMEOUT):
                await feed.loaded.wait()
            if feed.loaded.is_set():
                return
            if feed.received == seen:
                logger.warning(
                    "the KV watch on %r got no entry for %g s while loading (%d so far)",
                    pattern,
                    SNAPSHOT_STALL_TIMEOUT,
                    seen,
                )
                raise TransportError(
                    f"KV watch on {pattern!r}: its snapshot stalled "
                    f"(no entry for {SNAPSHOT_STALL_TIMEOUT:g} s)"
                )
            seen = feed.received

    async def _stop_watcher(self, subscription: Any, pattern: str) -> None:
        """Withdraw a watch's consumer at the server; a failure is logged."""
        if self._transport._nc.is_closed:
            return
        try:
            await self._transport._aio(
                "KV unwatch", subscription.unsubscribe, timeout=CLOSE_TIMEOUT
            )
        except TransportError as exc:
            logger.warning("stopping the KV watch on %r failed: %s", pattern, exc)
