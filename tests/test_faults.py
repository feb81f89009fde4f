"""meshline.testing's fault injection: FaultyTransport on both transports, and a real
nats-server stopped, killed and paused under live connections.

Memory runs on ``MockClock(autojump_threshold=0)`` (the ``clock`` fixture), NATS on
the real clock. Waits are conditions polled under ``trio.fail_after``; the only
fixed waits prove that something does *not* happen.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import pytest
import trio

import meshline
from meshline import ConnectionEvent, ConnectionEventKind, KVOperation
from meshline.testing import FaultyTransport, NatsServer, restart_server

from .conftest import OpenTransport
from .node_helpers import wait_until

Unique = Callable[[str], str]
Pair = tuple[FaultyTransport, meshline.Transport]

ABSENCE = 0.3
"""Seconds to wait for something that must not happen."""


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        await wait_until(predicate)


async def both_ends(pair: Pair, bucket: str) -> tuple[meshline.KeyValue, meshline.KeyValue]:
    """``bucket`` opened through the healthy transport (to write) and through the
    faulty one (to watch)."""
    faulty, other = pair
    return await other.key_value(bucket), await faulty.key_value(bucket)


@pytest.fixture
async def pair(open_transport: OpenTransport) -> AsyncIterator[Pair]:
    """A faulty transport, and a healthy one on the same hub or server to watch it."""
    async with open_transport() as inner, open_transport() as other:
        yield FaultyTransport(inner), other


async def serve_echo(
    transport: meshline.Transport,
    subject: str,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with transport.subscribe(subject) as subscription:
        task_status.started()
        async for message in subscription:
            if message.reply is not None:
                await transport.publish(message.reply, message.data)


async def assert_nothing_from(watch: meshline.KVWatch) -> None:
    with trio.move_on_after(ABSENCE):
        entry = await watch.__anext__()
        pytest.fail(f"the watch delivered {entry}")


# ---------------------------------------------------------------- KV write faults


async def test_failing_writes_raise_and_reads_still_work(
    pair: Pair, unique: Unique, clock: object
) -> None:
    faulty, other = pair
    bucket = unique("failw")
    kv = await faulty.key_value(bucket)
    revision = await kv.put("k", b"before")
    faulty.fail_kv_writes()
    writes = [
        kv.put("k", b"x"),
        kv.create("new", b"x"),
        kv.update("k", b"x", revision=revision),
        kv.delete("k"),
        kv.purge("k"),
    ]
    for write in writes:
        with pytest.raises(meshline.TransportError, match="injected"):
            await write
    assert faulty.kv_writes_failed == 5
    entry = await kv.get("k")
    assert entry is not None and entry.value == b"before"
    assert await kv.keys() == ["k"]
    assert await (await other.key_value(bucket)).keys() == ["k"]

    faulty.heal_kv_writes()
    await kv.update("k", b"after", revision=revision)
    entry = await (await other.key_value(bucket)).get("k")
    assert entry is not None and entry.value == b"after"


async def test_failing_only_some_write_operations(
    pair: Pair, unique: Unique, clock: object
) -> None:
    faulty, _ = pair
    kv = await faulty.key_value(unique("failsome"))
    revision = await kv.put("k", b"v")
    with faulty.failing_kv_writes(operations=["put"]):
        with pytest.raises(meshline.TransportError):
            await kv.put("k", b"refused")
        revision = await kv.update("k", b"updated", revision=revision)
    await kv.put("k", b"healed")
    assert faulty.kv_writes_failed == 1
    with pytest.raises(meshline.InvalidArgumentError):
        faulty.fail_kv_writes(operations=["get"])
    with pytest.raises(meshline.InvalidArgumentError):
        faulty.fail_kv_writes(operations="put")


async def test_slowly_failing_writes_take_their_time_and_can_be_cancelled(
    pair: Pair, unique: Unique, clock: object
) -> None:
    faulty, _ = pair
    kv = await faulty.key_value(unique("failslow"))
    faulty.fail_kv_writes(after=0.4)
    with trio.move_on_after(0.2) as scope:
        await kv.put("k", b"v")
    assert scope.cancelled_caught
    assert faulty.kv_writes_failed == 0
    start = trio.current_time()
    with pytest.raises(meshline.TransportError):
        await kv.put("k", b"v")
    assert trio.current_time() - start >= 0.4
    assert faulty.kv_writes_failed == 1
    assert await kv.get("k") is None


async def test_hanging_writes_wait_until_healed(pair: Pair, unique: Unique, clock: object) -> None:
    faulty, other = pair
    bucket = unique("hang")
    kv = await faulty.key_value(bucket)
    observer = await other.key_value(bucket)
    faulty.hang_kv_writes()
    done = trio.Event()

    async def write() -> None:
        await kv.put("k", b"late")
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        await eventually(lambda: faulty.kv_writes_hung == 1)
        assert await kv.get("k") is None
        assert not done.is_set()

        with trio.move_on_after(0.1) as scope:
            await kv.put("cancelled", b"never")
        assert scope.cancelled_caught

        faulty.heal_kv_writes()
        with trio.fail_after(10):
            await done.wait()
    entry = await observer.get("k")
    assert entry is not None and entry.value == b"late"
    assert await observer.get("cancelled") is None
    assert faulty.kv_writes_hung == 2


async def test_a_hanging_write_fails_when_the_connection_is_cut(
    pair: Pair, unique: Unique, clock: object
) -> None:
    faulty, _ = pair
    kv = await faulty.key_value(unique("hangcut"))
    failures: list[Exception] = []

    async def write() -> None:
        try:
            await kv.put("k", b"v")
        except meshline.TransportError as exc:
            failures.append(exc)

    with faulty.hanging_kv_writes():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            await eventually(lambda: faulty.kv_writes_hung == 1)
            faulty.cut()
    assert [str(exc) for exc in failures] == ["connection cut (injected)"]
    faulty.restore()
    assert await kv.get("k") is None


# ---------------------------------------------------------------- stall


async def test_a_stall_holds_kv_publish_and_request_until_resumed(
    pair: Pair, unique: Unique, clock: object
) -> None:
    faulty, other = pair
    subject = unique("stall")
    kv = await faulty.key_value(unique("stallkv"))
    await kv.put("k", b"v")
    results: list[object] = []

    async def get() -> None:
        results.append(await kv.get("k"))

    async def publish_then_request() -> None:
        await faulty.publish(subject, b"published")
        results.append(await faulty.request(f"{subject}.echo", b"echo", timeout=10))

    async with (
        other.subscribe(subject) as subscription,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(serve_echo, other, f"{subject}.echo")
        with faulty.stalled():
            nursery.start_soon(get)
            nursery.start_soon(publish_then_request)
            await eventually(lambda: faulty.operations_stalled == 2)
            with trio.move_on_after(ABSENCE):
                await subscription.receive()
                pytest.fail("a stalled transport published")
            assert results == []

            with trio.move_on_after(0.1) as scope:
                await faulty.request(f"{subject}.echo", b"cancelled", timeout=10)
            assert scope.cancelled_caught
            assert faulty.pending_requests == 0
        await eventually(lambda: len(results) == 2)
        assert (await subscription.receive()).data == b"published"
        nursery.cancel_scope.cancel()
    entries = [result for result in results if isinstance(result, meshline.KVEntry)]
    replies = [result for result in results if isinstance(result, meshline.Message)]
    assert [entry.value for entry in entries] == [b"v"]
    assert [reply.data for reply in replies] == [b"echo"]


async def test_a_stall_holds_watch_deliveries_and_loses_none(
    pair: Pair, unique: Unique, clock: object
) -> None:
    faulty, _ = pair
    writer, kv = await both_ends(pair, unique("stallwatch"))
    async with kv.watch() as watch:
        await writer.put("a", b"1")
        assert (await watch.__anext__()).key == "a"

        async def wait_for_an_entry() -> None:
            await watch.__anext__()
            pytest.fail("a stalled watch delivered")

        # A reader already waiting when the stall begins takes the next entry off the
        # inner watch, then is held back; cancelled there, it must not lose the entry.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_an_entry)
            for _ in range(5):
                await trio.lowlevel.checkpoint()
            faulty.stall()
            await writer.put("b", b"2")
            await eventually(lambda: faulty.operations_stalled == 1)
            nursery.cancel_scope.cancel()
        await writer.delete("a")
        await assert_nothing_from(watch)
        faulty.resume()
        with trio.fail_after(10):
            entries = [await watch.__anext__(), await watch.__anext__()]
    assert [(entry.key, entry.operation) for entry in entries] == [
        ("b", KVOperation.PUT),
        ("a", KVOperation.DELETE),
    ]


# ---------------------------------------------------------------- cut


async def test_a_cut_refuses_operations_and_tells_listeners(
    pair: Pair, unique: Unique, clock: object
) -> None:
    faulty, other = pair
    subject = unique("cut")
    kv = await faulty.key_value(unique("cutkv"))
    heard: list[ConnectionEvent] = []
    faulty.add_connection_listener(heard.append)
    assert faulty.connected

    faulty.cut()
    faulty.cut()
    assert [event.kind for event in heard] == [ConnectionEventKind.DISCONNECTED]
    assert not faulty.connected
    async with other.subscribe(subject) as subscription, trio.open_nursery() as nursery:
        await nursery.start(serve_echo, other, f"{subject}.echo")
        attempts = [
            kv.get("k"),
            kv.put("k", b"v"),
            kv.keys(),
            faulty.publish(subject, b"x"),
            faulty.request(f"{subject}.echo", b"x", timeout=5),
            faulty.open_subscription(subject),
            faulty.key_value("other"),
        ]
        for attempt in attempts:
            with pytest.raises(meshline.TransportError, match=r"connection cut \(injected\)"):
                await attempt
        with pytest.raises(meshline.TransportError):
            async with kv.watch():
                pass
        assert faulty.operations_refused == 8
        assert subscription.pending == 0

        faulty.restore()
        faulty.restore()
        assert [event.kind for event in heard] == [
            ConnectionEventKind.DISCONNECTED,
            ConnectionEventKind.RECONNECTED,
        ]
        assert faulty.connected
        await kv.put("k", b"v")
        reply = await faulty.request(f"{subject}.echo", b"back", timeout=10)
        assert reply.data == b"back"
        nursery.cancel_scope.cancel()


async def test_a_cut_silences_open_watches_for_good(
    pair: Pair, unique: Unique, clock: object
) -> None:
    faulty, _ = pair
    writer, kv = await both_ends(pair, unique("cutwatch"))
    async with kv.watch() as before:
        await writer.put("a", b"1")
        assert (await before.__anext__()).key == "a"
        with faulty.cut_off():
            await writer.put("b", b"2")
        async with kv.watch() as after:
            assert sorted(entry.key for entry in after.snapshot) == ["a", "b"]
            await writer.put("c", b"3")
            with trio.fail_after(10):
                assert (await after.__anext__()).key == "c"
            await assert_nothing_from(before)


async def test_connection_events_of_the_inner_transport_reach_listeners(
    pair: Pair, clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    faulty, _ = pair
    outer = FaultyTransport(faulty)
    heard: list[ConnectionEventKind] = []
    also: list[ConnectionEventKind] = []

    def broken(event: ConnectionEvent) -> None:
        raise RuntimeError("listener bug")

    outer.add_connection_listener(lambda event: heard.append(event.kind))
    remove = outer.add_connection_listener(broken)
    outer.add_connection_listener(lambda event: also.append(event.kind))
    with caplog.at_level(logging.WARNING, logger="meshline.transport"):
        faulty.cut()
    assert not outer.connected
    assert heard == also == [ConnectionEventKind.DISCONNECTED]
    assert "listener bug" in caplog.text
    assert "connection cut (injected)" in caplog.text

    remove()
    faulty.restore()
    assert heard == also == [ConnectionEventKind.DISCONNECTED, ConnectionEventKind.RECONNECTED]
    assert outer.connected

    # While the wrapper itself is cut, the inner transport's events are not passed on.
    with outer.cut_off():
        faulty.cut()
        faulty.restore()
    assert heard[2:] == [ConnectionEventKind.DISCONNECTED, ConnectionEventKind.RECONNECTED]

    await outer.aclose()
    faulty.cut()
    assert len(heard) == 4
    faulty.restore()


async def test_closing_the_wrapper_leaves_the_inner_transport_open(
    pair: Pair, unique: Unique, clock: object
) -> None:
    faulty, _ = pair
    await faulty.aclose()
    assert faulty.inner.connected
    kv = await faulty.inner.key_value(unique("left"))
    await kv.put("k", b"v")


# ---------------------------------------------------------------- a real server


@pytest.mark.parametrize("kill", [False, True])
async def test_a_real_restart_reaches_a_wrapped_transport(
    private_nats_server: NatsServer, kill: bool
) -> None:
    async with meshline.open_nats_transport(private_nats_server.url) as inner:
        faulty = FaultyTransport(inner)
        heard: list[ConnectionEventKind] = []
        faulty.add_connection_listener(lambda event: heard.append(event.kind))
        kv = await faulty.key_value("restart")
        await restart_server(private_nats_server, 0.1, kill=kill)
        await eventually(lambda: ConnectionEventKind.RECONNECTED in heard, timeout=20)
        assert heard == [ConnectionEventKind.DISCONNECTED, ConnectionEventKind.RECONNECTED]
        assert faulty.connected
        with trio.fail_after(20):
            while True:
                try:
                    await kv.put("k", b"after")
                    break
                except meshline.TransportError:
                    await trio.sleep(0.05)
        async with kv.watch() as watch:
            assert [entry.value for entry in watch.snapshot] == [b"after"]


async def test_connected_is_false_while_the_server_is_down(
    private_nats_server: NatsServer,
) -> None:
    async with meshline.open_nats_transport(private_nats_server.url) as transport:
        seen: list[tuple[ConnectionEventKind, bool]] = []
        transport.add_connection_listener(
            lambda event: seen.append((event.kind, transport.connected))
        )
        await restart_server(private_nats_server, 0.2)
        await eventually(lambda: len(seen) == 2, timeout=20)
        assert seen == [
            (ConnectionEventKind.DISCONNECTED, False),
            (ConnectionEventKind.RECONNECTED, True),
        ]


async def test_a_paused_server_times_requests_out_and_carries_on(
    private_nats_server: NatsServer,
) -> None:
    server = private_nats_server
    async with (
        meshline.open_nats_transport(server.url) as responder,
        meshline.open_nats_transport(server.url) as client,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(serve_echo, responder, "paused.echo")
        assert (await client.request("paused.echo", b"1", timeout=10)).data == b"1"
        server.pause()
        try:
            with pytest.raises(meshline.RequestTimeoutError):
                await client.request("paused.echo", b"2", timeout=0.3)
            assert client.connected
        finally:
            server.resume()
        assert (await client.request("paused.echo", b"3", timeout=10)).data == b"3"
        nursery.cancel_scope.cancel()


async def test_restart_server_rejects_a_negative_downtime(nats_server: NatsServer) -> None:
    with pytest.raises(meshline.InvalidArgumentError):
        await restart_server(nats_server, -1)
    assert nats_server.running
