"""The client registry on nodes under faults: stalls, cuts, failed and cancelled
writes. On memory (MockClock) and on NATS.

The application's picture is kept the way an application would keep it: an online
set fed only by the hooks (registered, orphaned, restored, unregistered). After
every fault it must equal the registry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
import trio

import meshline

from .node_helpers import Mesh, OpenTransport, RunningNode, open_mesh, wait_until

TTL = 1


class OnlineSet:
    """What an application believes from the hooks alone."""

    def __init__(self) -> None:
        self.online: set[str] = set()
        self.orphaned: list[str] = []
        self.restored: list[str] = []
        self.orphan_reports: list[tuple[int, int]] = []
        """``(node_id, how many clients)`` per ``on_orphaned`` call."""

    def on_orphaned(self, node_id: int, clients: list[meshline.RegisteredClient[Any]]) -> None:
        self.orphan_reports.append((node_id, len(clients)))
        for client in clients:
            self.orphaned.append(client.client_id)
            self.online.discard(client.client_id)

    def on_restored(self, node_id: int, clients: list[meshline.RegisteredClient[Any]]) -> None:
        for client in clients:
            self.restored.append(client.client_id)
            self.online.add(client.client_id)

    def hooks(self) -> dict[str, Any]:
        return {"on_orphaned": self.on_orphaned, "on_restored": self.on_restored}


async def leader_and_doomed(
    mesh: Mesh, app: OnlineSet, clients: set[str]
) -> tuple[RunningNode, RunningNode]:
    """A leader, and a node that cannot lead holding ``clients``, once the
    leader's replica has them all."""
    leader = await mesh.start(ttl=TTL, registry=app.hooks())
    doomed = await mesh.start(ttl=TTL, can_lead=False, registry=app.hooks())
    for client_id in sorted(clients):
        await registry_of(doomed).register(client_id, {})
    with trio.fail_after(20):
        while await registry_of(leader).count_clients_for_node(doomed.id) != len(clients):
            await trio.sleep(0.05)
    return leader, doomed


def registry_of(running: RunningNode) -> meshline.NodeClientRegistry[Any]:
    assert running.registry is not None
    return running.registry


async def visible(running: RunningNode) -> set[str]:
    return {client.client_id for client in await registry_of(running).list_clients()}


async def test_a_stalled_node_keeps_its_clients_and_the_hooks_tell_the_truth(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    app = OnlineSet()
    clients = {f"client {index}.*>" for index in range(40)}
    async with open_mesh(open_transport, unique("stall")) as mesh:
        leader = await mesh.start(ttl=TTL, registry=app.hooks())
        stalled = await mesh.start(ttl=TTL, can_lead=False, registry=app.hooks())
        for client_id in clients:
            await registry_of(stalled).register(client_id, {})
            app.online.add(client_id)
        stalled.faults.stall()
        with trio.fail_after(10):
            await wait_until(lambda: not leader.node.is_alive(stalled.id))
        await trio.sleep(0.5 * TTL)
        stalled.faults.resume()
        with trio.fail_after(20):
            while await visible(leader) != clients or await visible(stalled) != clients:
                await trio.sleep(0.05)
        with trio.fail_after(20):
            await wait_until(lambda: len(app.restored) == len(app.orphaned))
        assert app.online == clients
        assert sorted(app.orphaned) == sorted(app.restored)


async def test_a_dead_node_is_reported_orphaned_in_one_call_with_all_its_clients(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    """One ``on_orphaned`` call per dead node, with every client its cleanup removed
    (it used to be called with whatever removals had landed each time the report
    task ran: 4 calls for 200 clients on NATS)."""
    app = OnlineSet()
    clients = {f"client {index}" for index in range(300)}
    async with open_mesh(open_transport, unique("onecall")) as mesh:
        leader, doomed = await leader_and_doomed(mesh, app, clients)
        await doomed.crash()
        with trio.fail_after(30):
            await wait_until(lambda: bool(app.orphan_reports))
            while await registry_of(leader).count_clients_for_node(doomed.id):
                await trio.sleep(0.05)
        await trio.sleep(TTL)  # room for a second call, if one were coming
        assert app.orphan_reports == [(doomed.id, len(clients))]
        assert sorted(app.orphaned) == sorted(clients)


async def test_a_short_cut_of_the_leader_reports_no_orphans(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    app = OnlineSet()
    async with open_mesh(open_transport, unique("leadercut")) as mesh:
        leader = await mesh.start(ttl=TTL, registry=app.hooks())
        member = await mesh.start(ttl=TTL, can_lead=False, registry=app.hooks())
        await registry_of(member).register("kept", {})
        leader.faults.cut()
        await trio.sleep(3 * TTL)
        leader.faults.restore()
        await trio.sleep(3 * TTL)
        assert app.orphaned == []
        with trio.fail_after(10):
            while await visible(leader) != {"kept"}:
                await trio.sleep(0.05)


async def test_a_late_unregister_from_an_old_connection_keeps_the_new_one(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    async with open_mesh(open_transport, unique("reconnect")) as mesh:
        node = await mesh.start(ttl=TTL, registry={})
        registry = registry_of(node)
        old = await registry.register("sticky", {"connection": 1})
        new = await registry.register("sticky", {"connection": 2})
        assert old.token != new.token
        assert not await registry.unregister("sticky", token=old.token)
        assert not await registry.update_metadata("sticky", {"connection": 1}, token=old.token)
        client = await registry.get_client("sticky")
        assert client is not None and client.metadata == {"connection": 2}
        assert registry.holds("sticky")
        assert await registry.unregister("sticky", token=new.token)
        assert await registry.get_client("sticky") is None


class HangAfterCommit:
    """A backend whose register lands and then hangs, and whose unregister fails
    the first time: a call cancelled after its commit, and a failed removal."""

    def __init__(self, inner: meshline.MemoryRegistryBackend) -> None:
        self.inner = inner
        self.hang_registers = True
        self.fail_unregisters = 1

    async def register(self, *args: Any, **kwargs: Any) -> int | None:
        superseded = await self.inner.register(*args, **kwargs)
        if self.hang_registers:
            await trio.sleep_forever()
        return superseded

    async def unregister(self, *args: Any, **kwargs: Any) -> bool:
        if self.fail_unregisters:
            self.fail_unregisters -= 1
            raise meshline.TransportError("injected")
        return await self.inner.unregister(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_own_registrations_are_tracked_under_cancellation_and_failure(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    inner = meshline.MemoryRegistryBackend()
    backend = HangAfterCommit(inner)
    async with open_mesh(open_transport, unique("tracking")) as mesh:
        node = await mesh.start(ttl=TTL, registry={"backend": backend, "reassert_interval": 1})
        registry = registry_of(node)
        with trio.move_on_after(0.1):
            await registry.register("cancelled after commit", {})
        backend.hang_registers = False
        assert await inner.get_client("cancelled after commit") is not None
        with trio.fail_after(10):
            await wait_until(lambda: registry.holds("cancelled after commit"))
        with contextlib.suppress(meshline.TransportError):
            await registry.unregister("cancelled after commit")
        # The failed removal is retried until it is done.
        with trio.fail_after(10):
            while await inner.get_client("cancelled after commit") is not None:
                await trio.sleep(0.05)
        await registry.register("removed on exit", {})
        await node.stop()
    assert await inner.list_clients() == []


async def test_orphans_are_reported_even_with_broken_metadata_and_failed_deletes(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    inner = meshline.MemoryRegistryBackend()
    app = OnlineSet()
    failing = {"fails once"}

    class FailOnce:
        async def cleanup_client(self, client_id: str, *args: Any, **kwargs: Any) -> Any:
            if client_id in failing:
                failing.discard(client_id)
                raise meshline.TransportError("injected")
            return await inner.cleanup_client(client_id, *args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

    class Crashable:
        """The doomed node's view of the store: a crashed process writes nothing."""

        crashed = False

        async def unregister(self, *args: Any, **kwargs: Any) -> bool:
            if self.crashed:
                raise meshline.TransportError("crashed")
            return await inner.unregister(*args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

    doomed_backend = Crashable()
    async with open_mesh(open_transport, unique("orphans")) as mesh:
        await mesh.start(ttl=TTL, registry={"backend": FailOnce(), **app.hooks()})
        doomed = await mesh.start(
            ttl=TTL, can_lead=False, registry={"backend": doomed_backend, **app.hooks()}
        )
        await registry_of(doomed).register("fails once", {})
        await registry_of(doomed).register("fine", {})
        await inner.register("broken", doomed.id, b"\xc1 not msgpack", incarnation=1)
        doomed_backend.crashed = True
        await doomed.crash()
        with trio.fail_after(20):
            await wait_until(lambda: len(app.orphaned) == 3)
        assert sorted(app.orphaned) == ["broken", "fails once", "fine"]
        assert await inner.list_clients() == []


async def test_a_cleanup_pauses_while_the_view_is_untrustworthy_and_never_starts_over(
    open_transport: OpenTransport,
    unique: Callable[[str], str],
    clock: object,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The leader's view turns untrustworthy in the middle of a cleanup: the cleanup
    waits and goes on where it was. (It used to count every removal still queued as
    failed and start over with a fresh listing; at 10,000 clients, starting over
    held up the leader's own heartbeat, which made its view untrustworthy again,
    and the orphan reports took from 6 to 56 s.)"""
    app = OnlineSet()
    clients = {f"client {index}" for index in range(300)}
    async with open_mesh(open_transport, unique("pause")) as mesh:
        leader, doomed = await leader_and_doomed(mesh, app, clients)
        # The cleanup's removals hang, so it is still under way when the leader's
        # view goes stale (its watches fall silent: its own heartbeats stop coming
        # back). The lease is untouched: its writes still land.
        leader.faults.hang_kv_writes(operations={"purge"})
        await doomed.crash()
        with trio.fail_after(20):
            await wait_until(lambda: leader.faults.kv_writes_hung > 0)
            leader.faults.silence_watches()
            await wait_until(lambda: not leader.node.view_is_trustworthy)
        leader.faults.heal_kv_writes()
        with trio.fail_after(60):
            await wait_until(lambda: len(app.orphaned) == len(clients))
        assert sorted(app.orphaned) == sorted(clients)
        assert leader.node.is_leader
        assert registry_of(leader).cleanup_pauses >= 1
        assert registry_of(leader).cleanup_restarts == 0
        assert "pauses" in caplog.text
        assert "starting over" not in caplog.text


async def test_a_node_that_dies_again_during_its_cleanup_is_cleaned_up_in_full(
    open_transport: OpenTransport,
    unique: Callable[[str], str],
    clock: object,
) -> None:
    """A node is declared dead, comes back (re-asserting its clients under a new
    incarnation) while the leader's cleanup of it is still under way, and dies
    again: the cleanup must go on to the new incarnation's records, not end with
    them left behind as live clients of a dead node."""
    app = OnlineSet()
    clients = {f"client {index}" for index in range(20)}
    async with open_mesh(open_transport, unique("diesagain")) as mesh:
        leader = await mesh.start(ttl=TTL, registry=app.hooks())
        doomed = await mesh.start(ttl=TTL, can_lead=False, registry=app.hooks())
        for client_id in sorted(clients):
            await registry_of(doomed).register(client_id, {})
        stored = registry_of(leader).backend  # what is stored, the dead's records too

        async def incarnations() -> set[int]:
            return {record.incarnation for record in await stored.list_clients_for_node(doomed.id)}

        with trio.fail_after(20):
            while await stored.count_clients_for_node(doomed.id) != len(clients):
                await trio.sleep(0.05)
        first = await incarnations()
        # The cleanup's removals hang, so it is still under way through what follows.
        leader.faults.hang_kv_writes(operations={"purge"})
        doomed.faults.stall()
        with trio.fail_after(20):
            await wait_until(lambda: leader.faults.kv_writes_hung > 0)
        doomed.faults.resume()  # back, under a new incarnation, with its clients
        with trio.fail_after(20):
            while (now := await incarnations()) == first or len(now) != 1:
                await trio.sleep(0.05)
        await doomed.crash()
        with trio.fail_after(20):
            await wait_until(lambda: not leader.node.is_alive(doomed.id))
        leader.faults.heal_kv_writes()
        with trio.fail_after(30):
            await wait_until(lambda: set(app.orphaned) == clients)
        assert await stored.count_clients_for_node(doomed.id) == 0


class GatedCleanups(meshline.MemoryRegistryBackend):
    """A memory backend whose cleanup removals wait: the first one until
    :attr:`first` is set, the others until :attr:`rest` is."""

    def __init__(self) -> None:
        super().__init__()
        self.first = trio.Event()
        self.rest = trio.Event()
        self.waiting = 0
        self._first_taken = False

    async def cleanup_client(
        self, client_id: str, node_id: int, *, incarnation: int | None = None
    ) -> meshline.ClientRecord | None:
        gate = self.rest if self._first_taken else self.first
        self._first_taken = True
        self.waiting += 1
        await gate.wait()
        self.waiting -= 1
        return await super().cleanup_client(client_id, node_id, incarnation=incarnation)


async def test_a_node_back_and_dead_again_while_removals_are_in_flight_is_cleaned_up(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    """The cleanup sees the node alive again and stops taking removals, but one is
    still in flight when the node dies again: the registrations it did not get to
    must still be removed and reported once that one returns."""
    backend = GatedCleanups()
    orphaned: list[str] = []
    async with open_mesh(open_transport, unique("backdead")) as mesh:
        leader = await mesh.start(ttl=TTL)
        doomed = await mesh.start(ttl=TTL, can_lead=False)
        clients = {f"client {index}" for index in range(100)}
        for client_id in sorted(clients):
            await backend.register(client_id, doomed.id, b"\x80", incarnation=1)
        async with meshline.open_client_registry(
            leader.node,
            backend=backend,
            on_orphaned=lambda _, records: orphaned.extend(r.client_id for r in records),
        ):
            doomed.faults.stall()
            with trio.fail_after(20):
                await wait_until(lambda: backend.waiting == 64)  # every worker waits
            doomed.faults.resume()
            with trio.fail_after(20):
                await wait_until(lambda: leader.node.is_alive(doomed.id))
            backend.rest.set()  # the workers go on, see the node alive, and stop
            with trio.fail_after(20):
                await wait_until(lambda: backend.waiting == 1)
            await doomed.crash()
            with trio.fail_after(20):
                await wait_until(lambda: not leader.node.is_alive(doomed.id))
            backend.first.set()
            with trio.fail_after(30):
                await wait_until(lambda: set(orphaned) == clients)
        assert await backend.count_clients_for_node(doomed.id) == 0


async def test_a_closed_registry_stops_its_cleanup_duty(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    inner = meshline.MemoryRegistryBackend()
    reported: list[int] = []
    async with open_mesh(open_transport, unique("closed")) as mesh:
        leader = await mesh.start(ttl=TTL)
        doomed = await mesh.start(ttl=TTL, can_lead=False)
        await inner.register("left behind", doomed.id, b"\x80")
        async with meshline.open_client_registry(
            leader.node, backend=inner, on_orphaned=lambda node_id, _: reported.append(node_id)
        ):
            await trio.sleep(0.1)
        await doomed.crash()
        with trio.fail_after(10):
            await wait_until(lambda: not leader.node.is_alive(doomed.id))
        await trio.sleep(2 * TTL)
        assert reported == []
        assert [record.client_id for record in await inner.list_clients()] == ["left behind"]


async def test_reports_queued_when_the_registry_closes_are_still_delivered(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    """The registry closes while its hook is busy and more reports wait: leaving
    delivers the rest and raises nothing (it once raised EndOfChannel)."""
    backend = meshline.MemoryRegistryBackend()
    reported: list[str] = []
    first_report = trio.Event()

    async def on_orphaned(node_id: int, clients: list[meshline.RegisteredClient[Any]]) -> None:
        reported.extend(client.client_id for client in clients)
        if not first_report.is_set():
            first_report.set()
            await trio.sleep(0.5)

    async with open_mesh(open_transport, unique("closing")) as mesh:
        leader = await mesh.start(ttl=TTL)
        doomed = await mesh.start(ttl=TTL, can_lead=False)
        left_behind = {f"left behind {index}" for index in range(300)}
        for client_id in left_behind:
            await backend.register(client_id, doomed.id, b"\x80")
        async with meshline.open_client_registry(
            leader.node, backend=backend, on_orphaned=on_orphaned
        ):
            await doomed.crash()
            with trio.fail_after(10):
                await first_report.wait()
        assert set(reported) <= left_behind
        assert len(reported) == len(set(reported))


class GatedReassert(meshline.MemoryRegistryBackend):
    """Re-assertion writes wait at a gate (a slow store), so an unregister can
    overtake one in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.waiting = 0

    async def reassert(
        self, client_id: str, node_id: int, metadata: bytes, *, token: int, incarnation: int
    ) -> meshline.ReassertOutcome:
        self.waiting += 1
        await self.gate.wait()
        return await super().reassert(
            client_id, node_id, metadata, token=token, incarnation=incarnation
        )


async def test_an_unregister_overtaking_a_reassertion_in_flight_is_not_undone(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    """Found by the cluster sockets state machine: a cleanup removed a registration,
    the node began writing it back, the client left (its unregister found nothing to
    remove), then the write landed: a client registered for good with nobody there."""
    backend = GatedReassert()
    async with open_mesh(open_transport, unique("overtaken")) as mesh:
        node = await mesh.start()
        async with meshline.open_client_registry(
            node.node, backend=backend, reassert_interval=0.5
        ) as registry:
            registration = await registry.register("leaving", {"v": 1})
            await backend.cleanup_node(node.id)  # as a leader's cleanup would
            with trio.fail_after(20):
                await wait_until(lambda: backend.waiting >= 1)  # a write-back in flight
            assert not await registry.unregister("leaving", token=registration.token)
            backend.gate.set()
            with trio.fail_after(20):
                while backend.lookup("leaving") is not None or registry.holds("leaving"):
                    await trio.sleep(0.05)


class SlowToRemove(meshline.MemoryRegistryBackend):
    """Removing "slow" takes half a second; the others are quick."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = trio.Event()

    async def cleanup_client(
        self, client_id: str, node_id: int, *, incarnation: int | None = None
    ) -> Any:
        if client_id == "slow":
            self.in_flight.set()
            await trio.sleep(0.5)
        return await super().cleanup_client(client_id, node_id, incarnation=incarnation)


async def test_closing_the_registry_during_a_cleanup_reports_what_was_removed(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    """The registry closes while the leader's cleanup of a dead node is under way:
    what was removed is still reported, the removal in flight too (it is given
    ``REMOVAL_GRACE`` to end, rather than cut off with its answer), and the leader
    stays up. (The cleanup's report used to come after the report channel had
    closed: the error took the node down, and nothing was reported.)"""
    backend = SlowToRemove()
    reported: list[str] = []
    async with open_mesh(open_transport, unique("closing")) as mesh:
        leader = await mesh.start(ttl=TTL)
        doomed = await mesh.start(ttl=TTL, can_lead=False)
        await backend.register("quick", doomed.id, b"{}")
        await backend.register("slow", doomed.id, b"{}")
        async with meshline.open_client_registry(
            leader.node,
            backend=backend,
            on_orphaned=lambda node_id, clients: reported.extend(c.client_id for c in clients),
        ):
            await doomed.crash()
            with trio.fail_after(10):
                await backend.in_flight.wait()
                while await backend.get_client("quick") is not None:
                    await trio.sleep(0.01)
        assert sorted(reported) == ["quick", "slow"], reported  # slow ended in its grace
        assert leader.node.is_alive(leader.id)


class RefusesOne(meshline.MemoryRegistryBackend):
    """Removing "stuck" always fails (a store that keeps refusing one key)."""

    async def cleanup_client(
        self, client_id: str, node_id: int, *, incarnation: int | None = None
    ) -> Any:
        if client_id == "stuck":
            await trio.lowlevel.checkpoint()
            raise meshline.TransportError("refused")
        return await super().cleanup_client(client_id, node_id, incarnation=incarnation)


async def test_a_removal_that_keeps_failing_holds_back_no_report(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    """Each cleanup pass reports what it removed when it ends: one removal that
    keeps failing does not hold back the others' report (with one report per
    cleanup, they waited for as long as it failed)."""
    backend = RefusesOne()
    reported: list[str] = []
    async with open_mesh(open_transport, unique("refuses")) as mesh:
        leader = await mesh.start(ttl=TTL)
        doomed = await mesh.start(ttl=TTL, can_lead=False)
        for client_id in ["a", "b", "c", "stuck"]:
            await backend.register(client_id, doomed.id, b"{}")
        async with meshline.open_client_registry(
            leader.node,
            backend=backend,
            on_orphaned=lambda node_id, clients: reported.extend(c.client_id for c in clients),
        ) as registry:
            await doomed.crash()
            with trio.fail_after(30):
                await wait_until(lambda: sorted(reported) == ["a", "b", "c"])
                await wait_until(lambda: registry.cleanup_restarts >= 2)
            assert sorted(reported) == ["a", "b", "c"]  # nothing twice
            assert await backend.count_clients_for_node(doomed.id) == 1


async def test_a_registry_closed_right_after_opening_leaves_no_duty_behind(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    """A registry opened and closed at once on a node that leads: its leader duty
    was scheduled but had not run, so closing cancelled nothing; it ran after the
    registry closed, removed a dead node's client and lost the report. Now a duty
    removed before it runs never starts."""
    backend = meshline.MemoryRegistryBackend()
    reported: list[str] = []
    async with open_mesh(open_transport, unique("stray")) as mesh:
        leader = await mesh.start(ttl=TTL)
        doomed = await mesh.start(ttl=TTL, can_lead=False)
        await backend.register("orphan", doomed.id, b"{}")
        await doomed.crash()
        with trio.fail_after(20):
            await wait_until(lambda: not leader.node.is_alive(doomed.id))
        async with meshline.open_client_registry(
            leader.node,
            backend=backend,
            on_orphaned=lambda node_id, clients: reported.extend(c.client_id for c in clients),
        ):
            pass
        await trio.sleep(3 * TTL)  # time for a stray duty to act, if one were left
        assert await backend.get_client("orphan") is not None or reported == ["orphan"]
        assert reported == []
