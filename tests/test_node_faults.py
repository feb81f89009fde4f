"""Mesh nodes under faults, injected with meshline.testing.FaultyTransport.

On memory (MockClock, so the bounds are exact and the runs fast) and on NATS.
Each test pins a rule of the failure model: no error kills a node, a disconnected
view declares nobody dead, a reconnect reopens the watch, lease terms never
overlap, and a caller's effective deadline reaches the remote handler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio

import meshline
from meshline.testing import NatsServer

from .node_helpers import OpenTransport, open_mesh, wait_until

TTL = 1


async def test_a_cut_node_declares_nobody_dead_and_reopens_its_watch(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    async with open_mesh(open_transport, unique("cut")) as mesh:
        cut = await mesh.start(ttl=TTL)
        other = await mesh.start(ttl=TTL)
        downs_seen_by_cut: list[int | None] = []

        def record(event: meshline.MembershipEvent) -> None:
            if event.kind is meshline.MembershipEventKind.DOWN:
                downs_seen_by_cut.append(event.node_id)

        cut.node.add_membership_handler(record)
        cut.faults.cut()
        # The others see the cut node die (it cannot refresh), as they should.
        with trio.fail_after(10):
            await wait_until(lambda: not other.node.is_alive(cut.id))
        await trio.sleep(3 * TTL)
        assert downs_seen_by_cut == []
        assert cut.node.alive_nodes() == {cut.id, other.id}
        cut.faults.restore()
        # It re-asserts, and its reopened watch sees a node that joined after the cut
        # (the old watch stays silent forever).
        with trio.fail_after(10):
            await wait_until(lambda: other.node.is_alive(cut.id))
        late = await mesh.start(ttl=TTL)
        with trio.fail_after(10):
            await wait_until(lambda: cut.node.is_alive(late.id))
        assert cut.node.incarnation > 1
        assert downs_seen_by_cut == []


async def test_failing_writes_never_end_a_node(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    async with open_mesh(open_transport, unique("failing")) as mesh:
        node = await mesh.start(ttl=TTL)
        other = await mesh.start(ttl=TTL)
        node.faults.fail_kv_writes()
        with trio.fail_after(10):
            await wait_until(lambda: not other.node.is_alive(node.id))
        await trio.sleep(2 * TTL)
        assert not node.done.is_set()
        node.faults.heal_kv_writes()
        with trio.fail_after(10):
            await wait_until(lambda: other.node.is_alive(node.id))

        async def echo(data: Any, sender: int) -> Any:
            return data

        node.node.register_handler("echo", echo)
        assert await other.node.request(node.id, "echo", 7) == 7


async def test_a_failed_reassertion_of_the_liveness_key_is_retried(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    """The key is gone, so the refresh loses its compare-and-set, and the put that
    re-asserts it fails too: the node must log it and try again next beat."""
    async with open_mesh(open_transport, unique("reassert")) as mesh:
        node = await mesh.start(ttl=TTL)
        other = await mesh.start(ttl=TTL)
        node.faults.fail_kv_writes(operations=["put"])
        kv = await other.transport.key_value(meshline._mesh._node.mesh_names(mesh.key)[0])
        await kv.delete(f"nodes.{node.id}")
        with trio.fail_after(10):
            await wait_until(lambda: node.faults.kv_writes_failed >= 2)
        assert not node.done.is_set()
        node.faults.heal_kv_writes()
        with trio.fail_after(10):
            await wait_until(lambda: other.node.is_alive(node.id))
        assert node.node.incarnation > 1


@pytest.mark.parametrize("fails_after", [0.0, 0.03, 0.07, 0.12])
async def test_lease_terms_never_overlap_when_refreshes_fail(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object, fails_after: float
) -> None:
    """Refreshes that fail (at once, or after a while, as against a struggling
    server) must end the term before the lease can pass to another node, whatever
    the phase of the failures against the lease's deadline."""
    terms: list[tuple[int, float, float]] = []

    def duty_for(node_id: int) -> Callable[[], Any]:
        async def duty() -> None:
            began = trio.current_time()
            try:
                await trio.sleep_forever()
            finally:
                terms.append((node_id, began, trio.current_time()))

        return duty

    async with open_mesh(open_transport, unique("lease")) as mesh:
        leader = await mesh.start(ttl=TTL)
        follower = await mesh.start(ttl=TTL)
        assert leader.node.is_leader
        leader.node.add_leader_duty(duty_for(leader.id))
        follower.node.add_leader_duty(duty_for(follower.id))
        leader.faults.fail_kv_writes(after=fails_after)
        overlap: list[float] = []

        async def watch_for_two_leaders() -> None:
            while True:
                if leader.node.is_leader and follower.node.is_leader:
                    overlap.append(trio.current_time())
                await trio.sleep(0.005)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_for_two_leaders)
            with trio.fail_after(10):
                await wait_until(lambda: follower.node.is_leader)
            await trio.sleep(TTL)
            nursery.cancel_scope.cancel()
    assert overlap == []
    assert {node_id for node_id, _, _ in terms} == {leader.id, follower.id}
    for node_a, began_a, ended_a in terms:
        for node_b, began_b, ended_b in terms:
            if node_a != node_b:
                assert ended_a <= began_b or ended_b <= began_a, terms


async def test_removing_a_duty_cancels_it_and_a_failing_duty_restarts(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    async with open_mesh(open_transport, unique("duties")) as mesh:
        running = await mesh.start(ttl=TTL)
        cancelled = trio.Event()
        attempts: list[float] = []

        async def long_duty() -> None:
            try:
                await trio.sleep_forever()
            finally:
                cancelled.set()

        async def flaky_duty() -> None:
            attempts.append(trio.current_time())
            if len(attempts) < 3:
                raise RuntimeError("flaky")
            await trio.sleep_forever()

        remove = running.node.add_leader_duty(long_duty)
        running.node.add_leader_duty(flaky_duty)
        await trio.sleep(0.1)
        remove()
        with trio.fail_after(5):
            await cancelled.wait()
        with trio.fail_after(10):
            await wait_until(lambda: len(attempts) >= 3)


async def test_the_callers_effective_deadline_reaches_the_handler(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    """The cancellation message is lost (the caller's connection is cut), so only the
    deadline carried by the request can stop the handler: the enclosing scope's
    2 s, not the 60 s request timeout."""
    async with open_mesh(open_transport, unique("deadline")) as mesh:
        target = await mesh.start(ttl=5)
        caller = await mesh.start(ttl=5)
        stopped: list[float] = []
        started = trio.Event()

        async def stall(data: Any, sender: int) -> None:
            started.set()
            try:
                await trio.sleep_forever()
            finally:
                stopped.append(trio.current_time())

        target.node.register_handler("stall", stall)
        began = trio.current_time()
        with trio.move_on_after(2):
            async with trio.open_nursery() as nursery:

                async def cut_once_started() -> None:
                    await started.wait()
                    caller.faults.cut()

                nursery.start_soon(cut_once_started)
                await caller.node.request(target.id, "stall", None, timeout=60)
        with trio.fail_after(30):
            await wait_until(lambda: bool(stopped))
        assert stopped[0] - began < 10


@pytest.mark.parametrize("transport_kind", ["nats"])
async def test_an_answer_too_large_to_send_is_a_typed_error_and_the_node_survives(
    open_transport: OpenTransport, unique: Callable[[str], str], transport_kind: str
) -> None:
    async with open_mesh(open_transport, unique("large")) as mesh:
        responder = await mesh.start()
        caller = await mesh.start()

        async def huge(data: Any, sender: int) -> bytes:
            return b"x" * (2 * 1024 * 1024)

        async def small(data: Any, sender: int) -> str:
            return "fine"

        responder.node.register_handler("huge", huge)
        responder.node.register_handler("small", small)
        with pytest.raises(meshline.PayloadTooLargeError):
            await caller.node.request(responder.id, "huge", None, timeout=10)
        assert await caller.node.request(responder.id, "small", None, timeout=10) == "fine"
        assert responder.node.reply_failures == 1
        assert not responder.done.is_set()


async def test_a_view_is_not_trusted_while_the_server_is_down(
    private_nats_server: NatsServer,
) -> None:
    async with (
        meshline.open_nats_transport(private_nats_server.url) as transport,
        meshline.open_node(transport, "outage", ttl=TTL) as node,
    ):
        assert node.view_is_trustworthy
        await trio.to_thread.run_sync(private_nats_server.kill)
        with trio.fail_after(10):
            await wait_until(lambda: not transport.connected)
        assert not node.view_is_trustworthy
        await trio.sleep(2 * TTL)
        assert node.alive_nodes() == {node.id}
        await trio.to_thread.run_sync(private_nats_server.start)
        with trio.fail_after(20):
            await wait_until(lambda: node.view_is_trustworthy)
        assert node.alive_nodes() == {node.id}


async def test_a_watch_gone_silent_without_a_connection_event_is_reopened(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    """The watch stops delivering while the connection stays up (a stream leader
    moved): the node notices its own heartbeats no longer come back, reopens the
    watch, and declares nobody dead meanwhile."""
    async with open_mesh(open_transport, unique("silent")) as mesh:
        silenced = await mesh.start(ttl=TTL)
        other = await mesh.start(ttl=TTL)
        downs: list[int | None] = []

        def record(event: meshline.MembershipEvent) -> None:
            if event.kind is meshline.MembershipEventKind.DOWN:
                downs.append(event.node_id)

        silenced.node.add_membership_handler(record)
        silenced.faults.silence_watches()
        late = await mesh.start(ttl=TTL)
        with trio.fail_after(10 * TTL):
            await wait_until(lambda: silenced.node.is_alive(late.id))
        await trio.sleep(2 * TTL)
        assert silenced.node.alive_nodes() == {silenced.id, other.id, late.id}
        assert downs == []
