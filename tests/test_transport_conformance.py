"""One behaviour suite, run against the memory transport and against real NATS."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

import meshline
from meshline import KVOperation, Overflow

from .conftest import OpenTransport
from .node_helpers import wait_until

Unique = Callable[[str], str]


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds; NATS delivers asynchronously."""
    with trio.fail_after(timeout):
        await wait_until(predicate)


async def test_publish_reaches_matching_subscriptions_only(
    transport: meshline.Transport, unique: Unique
) -> None:
    root = unique("pub")
    async with (
        transport.subscribe(f"{root}.a") as exact,
        transport.subscribe(f"{root}.*") as star,
        transport.subscribe(f"{root}.>") as tail,
        transport.subscribe(f"{root}.b") as other,
    ):
        await transport.publish(f"{root}.a", b"one")
        await transport.publish(f"{root}.a.deep", b"two")
        assert (await exact.receive()).data == b"one"
        assert (await star.receive()).data == b"one"
        received = [(await tail.receive()).data, (await tail.receive()).data]
        assert received == [b"one", b"two"]
        with trio.move_on_after(0.2):
            await other.receive()
            pytest.fail("a non-matching subscription received a message")
        assert other.pending == 0


async def test_two_transports_reach_each_other(
    open_transport: OpenTransport, unique: Unique
) -> None:
    subject = unique("cross")
    async with open_transport() as left, open_transport() as right:
        async with right.subscribe(subject) as subscription:
            await left.publish(subject, b"hello", reply="some.reply")
            message = await subscription.receive()
    assert message == meshline.Message(subject, b"hello", "some.reply")


async def test_queue_group_delivers_each_message_once(
    transport: meshline.Transport, unique: Unique
) -> None:
    subject = unique("queue")
    async with (
        transport.subscribe(subject, queue="workers") as first,
        transport.subscribe(subject, queue="workers") as second,
    ):
        for index in range(20):
            await transport.publish(subject, str(index).encode())
        await eventually(lambda: first.pending + second.pending == 20)
        seen: list[bytes] = []
        while first.pending:
            seen.append((await first.receive()).data)
        while second.pending:
            seen.append((await second.receive()).data)
        assert sorted(seen) == sorted(str(index).encode() for index in range(20))


async def test_closed_subscription_ends_iteration_and_stops_delivery(
    transport: meshline.Transport, unique: Unique
) -> None:
    subject = unique("close")
    subscription = await transport.open_subscription(subject)
    await transport.publish(subject, b"kept")
    await eventually(lambda: subscription.pending == 1)
    await subscription.aclose()
    await transport.publish(subject, b"after close")
    received = [message.data async for message in subscription]
    assert received == [b"kept"]
    with pytest.raises(trio.EndOfChannel):
        await subscription.receive()


@pytest.mark.parametrize(
    ("overflow", "expected"),
    [(Overflow.DROP_NEWEST, [b"0", b"1", b"2"]), (Overflow.DROP_OLDEST, [b"7", b"8", b"9"])],
)
async def test_overflow_drop_policies(
    transport: meshline.Transport, unique: Unique, overflow: Overflow, expected: list[bytes]
) -> None:
    subject = unique("overflow")
    async with transport.subscribe(subject, limit=3, overflow=overflow) as subscription:
        for index in range(10):
            await transport.publish(subject, str(index).encode())
        await eventually(lambda: subscription.dropped == 7)
        assert [(await subscription.receive()).data for _ in range(3)] == expected
        assert subscription.pending == 0


async def test_overflow_error_policy_raises_after_draining(
    transport: meshline.Transport, unique: Unique
) -> None:
    subject = unique("overflow")
    async with transport.subscribe(subject, limit=2, overflow=Overflow.ERROR) as subscription:
        for index in range(3):
            await transport.publish(subject, str(index).encode())
        await eventually(lambda: subscription.pending == 2)
        assert (await subscription.receive()).data == b"0"
        assert (await subscription.receive()).data == b"1"
        with pytest.raises(meshline.SubscriptionOverflowError):
            await subscription.receive()


async def test_closing_an_overflowed_subscription_withdraws_interest(
    transport: meshline.Transport, unique: Unique
) -> None:
    subject = unique("overflowed")
    subscription = await transport.open_subscription(subject, limit=1, overflow=Overflow.ERROR)
    for index in range(3):
        await transport.publish(subject, str(index).encode())
    await transport.publish(subject, b"more")
    assert (await subscription.receive()).data == b"0"
    with pytest.raises(meshline.SubscriptionOverflowError):
        await subscription.receive()
    await subscription.aclose()
    # Nobody listens any more: the server (or hub) says so at once.
    with trio.fail_after(10):
        while True:
            try:
                await transport.request(subject, b"anyone?", timeout=5)
            except meshline.NoRespondersError:
                break
            await trio.sleep(0.05)


async def test_connection_listeners_are_added_and_removed(
    transport: meshline.Transport,
) -> None:
    heard: list[meshline.ConnectionEvent] = []
    remove = transport.add_connection_listener(heard.append)
    assert transport.connected
    remove()
    remove()
    assert heard == []


async def serve_upper(
    transport: meshline.Transport,
    subject: str,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with transport.subscribe(subject) as subscription:
        task_status.started()
        async for message in subscription:
            assert message.reply is not None
            await transport.publish(message.reply, message.data.upper())


async def test_request_gets_the_reply(open_transport: OpenTransport, unique: Unique) -> None:
    subject = unique("svc")
    async with open_transport() as server, open_transport() as client:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_upper, server, subject)
            replies = []

            async def ask(text: bytes) -> None:
                replies.append((await client.request(subject, text, timeout=10)).data)

            async with trio.open_nursery() as askers:
                for index in range(50):
                    askers.start_soon(ask, f"m{index}".encode())
            nursery.cancel_scope.cancel()
    assert sorted(replies) == sorted(f"M{index}".encode() for index in range(50))
    assert client.pending_requests == 0


async def test_request_without_responders_fails_fast(
    transport: meshline.Transport, unique: Unique
) -> None:
    # With a 60 s timeout, only an immediate "no responders" lets this test finish
    # as NoRespondersError rather than RequestTimeoutError.
    with pytest.raises(meshline.NoRespondersError) as caught:
        await transport.request(unique("nobody"), b"?", timeout=60)
    assert caught.value.subject.startswith("nobody")
    assert transport.pending_requests == 0


async def test_request_timeout_leaves_nothing_pending(
    transport: meshline.Transport, unique: Unique, clock: trio.abc.Clock | None
) -> None:
    subject = unique("silent")
    async with transport.subscribe(subject) as silent:
        with pytest.raises(meshline.RequestTimeoutError) as caught:
            await transport.request(subject, b"?", timeout=0.3)
        assert caught.value.timeout == 0.3
        assert transport.pending_requests == 0
        # The late reply is discarded, and the transport keeps working.
        late = await silent.receive()
        assert late.reply is not None
        await transport.publish(late.reply, b"too late")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_upper, transport, subject + "x")
        reply = await transport.request(subject + "x", b"ok", timeout=10)
        nursery.cancel_scope.cancel()
    assert reply.data == b"OK"


async def test_cancelled_request_leaves_nothing_pending(
    transport: meshline.Transport, unique: Unique, clock: trio.abc.Clock | None
) -> None:
    subject = unique("slow")
    async with transport.subscribe(subject) as silent:
        with trio.move_on_after(0.2) as scope:
            await transport.request(subject, b"?", timeout=60)
        assert scope.cancelled_caught
        assert transport.pending_requests == 0
        assert (await silent.receive()).data == b"?"


async def test_bad_subjects_and_arguments_are_rejected(transport: meshline.Transport) -> None:
    for subject in ["", "a..b", "a.", "a b", "a\n", "a.*", "a.>", "é"]:
        with pytest.raises(meshline.InvalidNameError):
            await transport.publish(subject, b"x")
    for pattern in ["a.>.b", "a*", "a..b"]:
        with pytest.raises(meshline.InvalidNameError):
            await transport.open_subscription(pattern)
    with pytest.raises(meshline.InvalidArgumentError):
        await transport.publish("a", "text")  # type: ignore[arg-type]
    for timeout in [0, -1, float("inf"), float("nan")]:
        with pytest.raises(meshline.InvalidArgumentError):
            await transport.request("a", b"x", timeout=timeout)


@pytest.mark.parametrize(
    "hostile",
    ["a.b", "*", ">", "a b", "line\nbreak", "ünïcødé ☃", "$SYS", "x" * 1024, "☃" * 1024],
)
async def test_hostile_ids_survive_as_subject_tokens_and_keys(
    transport: meshline.Transport, unique: Unique, hostile: str
) -> None:
    token = meshline.encode_token(hostile)
    subject = f"{unique('ids')}.{token}"
    async with transport.subscribe(subject) as subscription:
        await transport.publish(subject, hostile.encode())
        assert (await subscription.receive()).data.decode() == hostile
    kv = await transport.key_value(unique("ids"))
    await kv.create(f"clients.{token}", hostile.encode())
    entry = await kv.get(f"clients.{token}")
    assert entry is not None and entry.value.decode() == hostile
    assert await kv.keys() == [f"clients.{token}"]


async def test_closing_the_transport_ends_subscriptions(
    open_transport: OpenTransport, unique: Unique
) -> None:
    async with open_transport() as transport:
        subscription = await transport.open_subscription(unique("end"))
        await transport.aclose()
        assert [message async for message in subscription] == []
        with pytest.raises(meshline.TransportClosedError):
            await transport.publish("a", b"x")


# --- KV --------------------------------------------------------------------------


async def test_kv_create_get_update_delete(transport: meshline.Transport, unique: Unique) -> None:
    kv = await transport.key_value(unique("kv"))
    assert await kv.get("k") is None
    first = await kv.create("k", b"v1")
    with pytest.raises(meshline.KeyExistsError):
        await kv.create("k", b"other")
    assert await kv.get("k") == meshline.KVEntry("k", b"v1", first)
    second = await kv.update("k", b"v2", revision=first)
    assert second > first
    with pytest.raises(meshline.RevisionMismatchError):
        await kv.update("k", b"stale", revision=first)
    with pytest.raises(meshline.RevisionMismatchError):
        await kv.delete("k", revision=first)
    entry = await kv.get("k")
    assert entry is not None and entry.value == b"v2"
    await kv.delete("k", revision=second)
    assert await kv.get("k") is None
    third = await kv.create("k", b"v3")
    assert third > second
    await kv.put("other", b"x")
    assert await kv.keys() == ["k", "other"]
    await kv.purge("k")
    assert await kv.get("k") is None
    assert await kv.keys() == ["other"]
    await kv.delete("never-existed")


async def test_kv_rejects_bad_keys_and_ttls(transport: meshline.Transport, unique: Unique) -> None:
    kv = await transport.key_value(unique("kv"))
    for key in ["", ".a", "a.", "a..b", "a b", "a*", "a\n", "ü"]:
        with pytest.raises(meshline.InvalidNameError):
            await kv.put(key, b"x")
    for ttl in [0, -1, True]:
        with pytest.raises(meshline.InvalidArgumentError):
            await kv.create("k", b"x", ttl=ttl)
    with pytest.raises(meshline.InvalidArgumentError):
        await kv.create("k", b"x", ttl=0.5)  # type: ignore[arg-type]
    with pytest.raises(meshline.InvalidNameError):
        await transport.key_value("bad.bucket")
    assert await kv.keys() == []


async def test_kv_ttl_expiry_is_absence_and_allows_recreate(
    transport: meshline.Transport, unique: Unique, clock: trio.abc.Clock | None
) -> None:
    kv = await transport.key_value(unique("ttl"))
    await kv.create("node.1", b"alive", ttl=1)
    await kv.put("stays", b"here")
    async with kv.watch() as watch:
        assert [entry.key for entry in watch.snapshot] == ["node.1", "stays"]
        with trio.fail_after(15):
            expired = await watch.__anext__()
    assert (expired.key, expired.operation) == ("node.1", KVOperation.PURGE)
    assert await kv.get("node.1") is None
    assert await kv.keys() == ["stays"]
    revision = await kv.create("node.1", b"again", ttl=1)
    entry = await kv.get("node.1")
    assert entry is not None and entry.revision == revision


async def test_kv_update_with_ttl_refreshes_liveness(
    transport: meshline.Transport, unique: Unique, clock: trio.abc.Clock | None
) -> None:
    kv = await transport.key_value(unique("ttl"))
    revision = await kv.create("k", b"0", ttl=2)
    for beat in range(3):
        await trio.sleep(1)
        revision = await kv.update("k", str(beat).encode(), revision=revision, ttl=2)
    entry = await kv.get("k")
    assert entry is not None and entry.value == b"2"


async def test_kv_watch_snapshot_then_ordered_live_changes(
    transport: meshline.Transport, unique: Unique
) -> None:
    kv = await transport.key_value(unique("watch"))
    await kv.put("a.one", b"1")
    await kv.put("a.two", b"2")
    await kv.delete("a.two")
    await kv.put("b.one", b"x")
    async with kv.watch("a.>") as watch:
        assert [(e.key, e.value) for e in watch.snapshot] == [("a.one", b"1")]
        await kv.put("a.three", b"3")
        await kv.put("b.two", b"ignored")
        await kv.delete("a.one")
        await kv.purge("a.three")
        changes = []
        with trio.fail_after(10):
            async for entry in watch:
                changes.append((entry.key, entry.operation))
                if len(changes) == 3:
                    break
    assert changes == [
        ("a.three", KVOperation.PUT),
        ("a.one", KVOperation.DELETE),
        ("a.three", KVOperation.PURGE),
    ]


async def test_kv_concurrent_creates_have_one_winner(
    open_transport: OpenTransport, unique: Unique
) -> None:
    bucket = unique("race")
    winners: list[int] = []
    losers: list[int] = []
    async with open_transport() as first, open_transport() as second:
        stores = [await first.key_value(bucket), await second.key_value(bucket)]

        async def contend(index: int) -> None:
            try:
                await stores[index % 2].create("leader", str(index).encode())
                winners.append(index)
            except meshline.KeyExistsError:
                losers.append(index)

        async with trio.open_nursery() as nursery:
            for index in range(10):
                nursery.start_soon(contend, index)
        entry = await stores[0].get("leader")
    assert len(winners) == 1 and len(losers) == 9
    assert entry is not None and entry.value == str(winners[0]).encode()


async def test_transport_works_from_tasks_that_did_not_open_it(
    open_transport: OpenTransport, unique: Unique
) -> None:
    """A transport opened in one task serves any task, as objects shared by a nursery."""
    root = unique("foreign")

    async def own(task_status: trio.TaskStatus[meshline.Transport]) -> None:
        async with open_transport() as opened:
            task_status.started(opened)
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        transport: meshline.Transport = await nursery.start(own)
        kv = await transport.key_value(root)
        await kv.put("k", b"v")
        async with kv.watch() as watch, transport.subscribe(f"{root}.s") as subscription:
            assert [entry.value for entry in watch.snapshot] == [b"v"]
            await transport.publish(f"{root}.s", b"hello")
            assert (await subscription.receive()).data == b"hello"
        nursery.cancel_scope.cancel()


async def test_a_publishing_loop_does_not_starve_the_reader(
    transport: meshline.Transport, unique: Unique
) -> None:
    subject = unique("flood")
    async with transport.subscribe(subject, limit=500) as subscription:
        received = 0

        async def read() -> None:
            nonlocal received
            async for _ in subscription:
                received += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            for _ in range(5000):
                await transport.publish(subject, b"x")
            await eventually(lambda: received + subscription.dropped == 5000)
            nursery.cancel_scope.cancel()
    # The reader kept up, because publish yields: far fewer than 4,500 were dropped.
    assert subscription.dropped < 4500
