"""Mesh node behaviour, on the memory transport (MockClock) and on real NATS.

Tests that take ``clock`` run instantly on memory, where the Trio clock is mocked,
and in real time on NATS. Time bounds asserted on memory are exact consequences of
the protocol, not speed measurements.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import msgspec
import pytest
import trio

import meshline
from meshline import MembershipEvent, MembershipEventKind

from .node_helpers import POLL, OpenTransport, open_mesh, wait_until

HOSTILE = ["a.b", "*", ">", "with space", "line\nbreak", "ünï©ødé ☃", "x" * 1024, "$SYS.>"]


class Add(msgspec.Struct):
    a: int
    b: int


ADD = meshline.RequestType("add", Add, int)
NEWS = meshline.BroadcastType("news", list[str])


async def test_ids_are_unique_and_views_converge(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    async with open_mesh(open_transport, unique("converge")) as mesh:
        nodes = [await mesh.start() for _ in range(3)]
        ids = {running.id for running in nodes}
        assert len(ids) == 3
        with trio.fail_after(5):
            for running in nodes:
                await wait_until(lambda r=running: r.node.alive_nodes() == ids)  # type: ignore[misc]
        leaders = {running.node.leader_id for running in nodes}
        assert len(leaders) == 1
        assert sum(running.node.is_leader for running in nodes) == 1


async def test_concurrent_joins_get_distinct_ids(
    open_transport: OpenTransport, unique: Callable[[str], str]
) -> None:
    async with open_mesh(open_transport, unique("concurrent")) as mesh:
        started: list[int] = []

        async def join() -> None:
            started.append((await mesh.start()).id)

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(join)
        assert sorted(started) == sorted(set(started))
        assert len(started) == 6


async def test_ids_are_never_reused_even_after_a_crash(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    async with open_mesh(open_transport, unique("reuse")) as mesh:
        first = await mesh.start()
        second = await mesh.start()
        await second.crash()
        await first.stop()
        async with open_transport() as transport:
            kv = await transport.key_value(meshline._mesh._node.mesh_names(mesh.key)[0])
            with trio.fail_after(20):  # until every liveness key and the lease expired
                while any(key.startswith("nodes.") or key == "leader" for key in await kv.keys()):
                    await trio.sleep(0.05)
        third = await mesh.start()
        assert third.id > second.id > first.id
        assert third.node.alive_nodes() == {third.id}
        assert third.node.is_leader


async def test_graceful_exit_is_seen_at_once(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    async with open_mesh(open_transport, unique("graceful")) as mesh:
        watcher = await mesh.start(ttl=30)
        leaving = await mesh.start(ttl=30)
        with trio.fail_after(10):
            await wait_until(lambda: watcher.node.is_alive(leaving.id))
            async with watcher.node.membership_events() as events:
                await leaving.stop()
                event = await events.receive()
        assert event == MembershipEvent(MembershipEventKind.DOWN, leaving.id, 1)
        assert watcher.node.alive_nodes() == {watcher.id}


async def test_crashed_node_is_declared_dead_within_its_ttl(
    open_transport: OpenTransport,
    unique: Callable[[str], str],
    clock: object,
    transport_kind: str,
) -> None:
    async with open_mesh(open_transport, unique("crash")) as mesh:
        watcher = await mesh.start(ttl=2)
        doomed = await mesh.start(ttl=2)
        with trio.fail_after(10):
            await wait_until(lambda: watcher.node.is_alive(doomed.id))
            async with watcher.node.membership_events() as events:
                await doomed.crash()
                crashed_at = trio.current_time()
                event = await events.receive()
        seen_after = trio.current_time() - crashed_at
        assert event == MembershipEvent(MembershipEventKind.DOWN, doomed.id, 1)
        if transport_kind == "memory":  # exact on the mocked clock: at most one TTL
            assert seen_after <= 2 + POLL


async def test_leader_exit_hands_over_and_duties_follow(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    async with open_mesh(open_transport, unique("handover")) as mesh:
        first = await mesh.start()
        second = await mesh.start()
        assert first.node.is_leader and not second.node.is_leader
        terms: list[int] = []

        def duty_for(running_id: int) -> Callable[[], object]:
            async def duty() -> None:
                terms.append(running_id)
                await trio.sleep_forever()

            return duty

        first.node.add_leader_duty(duty_for(first.id))
        second.node.add_leader_duty(duty_for(second.id))
        with trio.fail_after(10):
            await wait_until(lambda: terms == [first.id])
            await first.stop()
            await wait_until(lambda: second.node.is_leader)
            await wait_until(lambda: terms == [first.id, second.id])
            await wait_until(lambda: second.node.leader_id == second.id)


async def test_at_most_one_leader_through_crashes(
    open_transport: OpenTransport,
    unique: Callable[[str], str],
    clock: object,
    transport_kind: str,
) -> None:
    """Record every leadership term; terms must never overlap in time."""
    intervals: list[tuple[float, float, int]] = []

    def recorder(node_id: int) -> Callable[[], object]:
        async def duty() -> None:
            began = trio.current_time()
            try:
                await trio.sleep_forever()
            finally:
                intervals.append((began, trio.current_time(), node_id))

        return duty

    async with open_mesh(open_transport, unique("terms")) as mesh:
        nodes = [await mesh.start(ttl=1) for _ in range(3)]
        for running in nodes:
            running.node.add_leader_duty(recorder(running.id))
        for _ in range(2):
            leader = next(r for r in nodes if r.node.is_leader)
            nodes.remove(leader)
            crashed_at = trio.current_time()
            await leader.crash()
            with trio.fail_after(10):
                await wait_until(lambda: any(r.node.is_leader for r in nodes))
            if transport_kind == "memory":  # takeover within one TTL (+ one poll)
                assert trio.current_time() - crashed_at <= 1 + POLL
            replacement = await mesh.start(ttl=1)
            replacement.node.add_leader_duty(recorder(replacement.id))
            nodes.append(replacement)
        for running in nodes:
            await running.stop()
    intervals.sort()
    assert len(intervals) >= 3
    for (_, end, _), (begin, _, _) in itertools.pairwise(intervals):
        assert end <= begin


async def test_node_reasserts_a_vanished_liveness_key(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    async with open_mesh(open_transport, unique("reassert")) as mesh:
        running = await mesh.start()
        kv = await running.transport.key_value(meshline._mesh._node.mesh_names(mesh.key)[0])
        async with running.node.membership_events() as events:
            await kv.delete(f"nodes.{running.id}")
            with trio.fail_after(10):
                async for event in events:
                    if event.kind is MembershipEventKind.REASSERTED:
                        break
        assert event.node_id == running.id
        assert await kv.get(f"nodes.{running.id}") is not None
        with trio.fail_after(10):
            await wait_until(lambda: running.node.is_alive(running.id))


async def test_typed_request_and_reply(
    open_transport: OpenTransport, unique: Callable[[str], str]
) -> None:
    async with open_mesh(open_transport, unique("typed")) as mesh:
        caller, target = await mesh.start(), await mesh.start()
        senders: list[int] = []

        async def add(data: Add, sender: int) -> int:
            senders.append(sender)
            return data.a + data.b

        target.node.register_handler(ADD, add)
        target.node.register_handler("echo", lambda data, sender: _echo(data))
        assert await caller.node.request(target.id, ADD, Add(2, 3)) == 5
        for name in HOSTILE:
            assert await caller.node.request(target.id, "echo", {name: [name]}) == {name: [name]}
        assert senders == [caller.id]


async def _echo(data: object) -> object:
    return data


async def test_request_errors_are_typed(
    open_transport: OpenTransport, unique: Callable[[str], str]
) -> None:
    async with open_mesh(open_transport, unique("errors")) as mesh:
        caller, target = await mesh.start(), await mesh.start()

        async def fail(data: object, sender: int) -> None:
            raise KeyError("missing thing")

        target.node.register_handler("fail", fail)
        target.node.register_handler(ADD, lambda data, sender: _echo(data.a))  # type: ignore[arg-type,return-value]
        with pytest.raises(meshline.NoHandlerError) as no_handler:
            await caller.node.request(target.id, "absent", None)
        assert no_handler.value.request_type == "absent"
        with pytest.raises(meshline.RemoteHandlerError) as raised:
            await caller.node.request(target.id, "fail", None)
        assert raised.value.error_type == "KeyError"
        assert "missing thing" in raised.value.error_message
        with pytest.raises(meshline.PayloadError):
            await caller.node.request(target.id, "add", {"a": "not a number"})
        with pytest.raises(meshline.PayloadError):
            await caller.node.request(target.id, "echo", object())
        with pytest.raises(meshline.NodeNotAliveError) as not_alive:
            await caller.node.request(9_999, "echo", None)
        assert not_alive.value.node_id == 9_999
        with pytest.raises(meshline.InvalidNameError):
            await caller.node.request(target.id, "", None)
        with pytest.raises(meshline.InvalidArgumentError):
            target.node.register_handler("fail", fail)
        assert caller.transport.pending_requests == 0


class Stall:
    """A request handler that blocks until cancelled, and reports both moments."""

    def __init__(self) -> None:
        self.entered = trio.Event()
        self.cancelled = trio.Event()

    async def __call__(self, data: object, sender: int) -> None:
        self.entered.set()
        try:
            await trio.sleep_forever()
        finally:
            self.cancelled.set()


async def test_timeout_cancels_the_remote_handler(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    async with open_mesh(open_transport, unique("timeout")) as mesh:
        caller, target = await mesh.start(), await mesh.start()
        stall = Stall()
        target.node.register_handler("stall", stall)
        with pytest.raises(meshline.MeshRequestTimeoutError) as timed_out:
            await caller.node.request(target.id, "stall", None, timeout=0.5)
        assert isinstance(timed_out.value, TimeoutError)
        with trio.fail_after(5):
            await stall.cancelled.wait()
        assert caller.transport.pending_requests == 0
        assert target.node.handlers_running == 0


async def test_caller_cancellation_cancels_the_remote_handler(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    async with open_mesh(open_transport, unique("cancel")) as mesh:
        caller, target = await mesh.start(), await mesh.start()
        stall = Stall()
        target.node.register_handler("stall", stall)
        async with trio.open_nursery() as nursery:

            async def call() -> None:
                await caller.node.request(target.id, "stall", None, timeout=60)

            nursery.start_soon(call)
            with trio.fail_after(5):
                await stall.entered.wait()
            nursery.cancel_scope.cancel()
        with trio.fail_after(5):
            await stall.cancelled.wait()
        assert caller.transport.pending_requests == 0
        with trio.fail_after(5):
            await wait_until(lambda: target.node.handlers_running == 0)


async def test_request_fails_fast_when_the_target_dies_midway(
    open_transport: OpenTransport,
    unique: Callable[[str], str],
    clock: object,
    transport_kind: str,
) -> None:
    async with open_mesh(open_transport, unique("dies")) as mesh:
        caller, target = await mesh.start(ttl=1), await mesh.start(ttl=1)
        stall = Stall()
        target.node.register_handler("stall", stall)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(target_crash_after, stall.entered, target)
            began = trio.current_time()
            with pytest.raises(meshline.NodeNotAliveError):
                await caller.node.request(target.id, "stall", None, timeout=60)
        if transport_kind == "memory":
            assert trio.current_time() - began <= 1 + POLL
        assert caller.transport.pending_requests == 0


async def target_crash_after(entered: trio.Event, target: object) -> None:
    await entered.wait()
    await target.crash()  # type: ignore[attr-defined]


async def test_request_to_self_skips_the_network(
    open_transport: OpenTransport, unique: Callable[[str], str]
) -> None:
    async with open_mesh(open_transport, unique("self")) as mesh:
        running = await mesh.start()
        seen: list[tuple[object, int, int]] = []

        async def add(data: Add, sender: int) -> int:
            seen.append((data, sender, running.transport.pending_requests))
            return data.a + data.b

        running.node.register_handler(ADD, add)
        assert await running.node.request(running.id, ADD, Add(1, 1)) == 2
        assert seen == [(Add(1, 1), running.id, 0)]

        async def fail(data: object, sender: int) -> None:
            raise RuntimeError("local boom")

        running.node.register_handler("fail", fail)
        with pytest.raises(meshline.RemoteHandlerError) as raised:
            await running.node.request(running.id, "fail", None)
        assert isinstance(raised.value.__cause__, RuntimeError)
        with pytest.raises(meshline.NoHandlerError):
            await running.node.request(running.id, "absent", None)


async def test_broadcast_reaches_every_node_with_its_sender(
    open_transport: OpenTransport, unique: Callable[[str], str]
) -> None:
    async with open_mesh(open_transport, unique("bcast")) as mesh:
        nodes = [await mesh.start() for _ in range(3)]
        received: dict[int, list[tuple[object, int]]] = {r.id: [] for r in nodes}
        for running in nodes:

            def handler(data: list[str], sender: int, into: int = running.id) -> None:
                received[into].append((data, sender))

            running.node.register_broadcast_handler(NEWS, handler)

        async def broken(data: object, sender: int) -> None:
            raise ValueError("handler bug")

        nodes[0].node.register_broadcast_handler(NEWS, broken)
        sender = nodes[1]
        await sender.node.broadcast(NEWS, HOSTILE)
        await sender.node.broadcast(NEWS, ["not to self"], skip_self=True)
        await sender.node.broadcast("unheard", 1)
        with trio.fail_after(5):
            expected = {r.id: 1 if r is sender else 2 for r in nodes}
            await wait_until(lambda: {k: len(v) for k, v in received.items()} == expected)
        for node_id, messages in received.items():
            assert messages[0] == (HOSTILE, sender.id)
            if node_id != sender.id:
                assert messages[1] == (["not to self"], sender.id)
        with trio.fail_after(5):
            await wait_until(lambda: all(r.node.unhandled_broadcasts == 1 for r in nodes))


async def test_membership_handlers_and_events(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    async with open_mesh(open_transport, unique("handlers")) as mesh:
        watcher = await mesh.start()
        seen: list[MembershipEvent] = []
        watcher.node.add_membership_handler(seen.append)
        other = await mesh.start()
        with trio.fail_after(5):
            await wait_until(lambda: MembershipEvent(MembershipEventKind.UP, other.id, 1) in seen)
        await watcher.stop()
        await other.stop()
        with pytest.raises(meshline.NodeClosedError):
            await watcher.node.request(other.id, "x", None)
        with pytest.raises(meshline.NodeClosedError):
            await watcher.node.broadcast("x", None)


@pytest.mark.parametrize("key", HOSTILE)
async def test_any_mesh_key_works_and_meshes_are_isolated(
    open_transport: OpenTransport, unique: Callable[[str], str], key: str
) -> None:
    key = key + unique("")
    async with (
        open_mesh(open_transport, key) as mesh,
        open_mesh(open_transport, key + "x") as other,
    ):
        one, two = await mesh.start(), await mesh.start()
        stranger = await other.start()
        assert stranger.id == 1
        with trio.fail_after(5):
            await wait_until(lambda: one.node.alive_nodes() == {one.id, two.id})
        assert stranger.node.alive_nodes() == {stranger.id}


async def test_bad_options_are_rejected(open_transport: OpenTransport) -> None:
    async with open_transport() as transport:
        for options in ({"ttl": 0}, {"ttl": 1.5}, {"ttl": 2, "heartbeat_interval": 2}):
            with pytest.raises(meshline.InvalidArgumentError):
                async with meshline.open_node(transport, "opts", **options):  # type: ignore[arg-type]
                    pass
        with pytest.raises(meshline.InvalidNameError):
            async with meshline.open_node(transport, ""):
                pass


async def test_user_exception_escapes_unwrapped(
    open_transport: OpenTransport, unique: Callable[[str], str]
) -> None:
    key = unique("raise")
    async with open_transport() as transport:
        with pytest.raises(LookupError):
            async with meshline.open_node(transport, key):
                raise LookupError("from the body")
        kv = await transport.key_value(meshline._mesh._node.mesh_names(key)[0])
        assert [k for k in await kv.keys() if k != "ids"] == []


async def test_handler_outliving_its_timeout_is_cancelled_without_a_cancel_message(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    """A requester that vanishes sends no cancellation; the handler's own deadline ends it."""
    async with open_mesh(open_transport, unique("orphan")) as mesh:
        target = await mesh.start()
        stall = Stall()
        target.node.register_handler("stall", stall)
        frame = meshline._mesh._wire.encode_request(1, 12_345, "stall", 1.0, None)
        subject = meshline._mesh._node.mesh_names(mesh.key)[1] + f".n.{target.id}"
        with pytest.raises(meshline.RequestTimeoutError):
            await target.transport.request(subject, frame, timeout=0.5)
        assert not stall.cancelled.is_set()
        with trio.fail_after(10):
            await stall.cancelled.wait()
        assert target.node.handlers_running == 0
