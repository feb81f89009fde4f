"""The client service on the memory transport (MockClock) and on real NATS."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio

import meshline
from meshline.testing import HOSTILE_CLIENT_IDS, FaultyTransport

from .node_helpers import OpenTransport, wait_until


@attrs.define
class Member:
    """One service node in a task of its own, with its deliveries recorded."""

    service: meshline.ClientService[Any]
    faults: FaultyTransport
    scope: trio.CancelScope
    done: trio.Event
    delivered: list[tuple[str, str, Any]] = attrs.Factory(list)
    cancelled: list[str] = attrs.Factory(list)

    @property
    def id(self) -> int:
        return self.service.instance_id

    async def crash(self) -> None:
        """Vanish like a killed process: cut the connection, so nothing is cleaned up."""
        self.faults.cut()
        await self.stop()

    async def stop(self) -> None:
        self.scope.cancel()
        await self.done.wait()


class Cluster:
    def __init__(self, nursery: trio.Nursery, open_transport: OpenTransport, key: str) -> None:
        self.nursery, self.open_transport, self.key = nursery, open_transport, key

    async def start(self, **options: Any) -> Member:
        done = trio.Event()
        member_box: list[Member] = []

        async def client_invoke(client_id: str, kind: str, data: Any, timeout: float) -> Any:
            member = member_box[0]
            if kind == "fail":
                raise LookupError(f"no such thing as {data!r}")
            if kind == "stall":
                try:
                    await trio.sleep_forever()
                finally:
                    member.cancelled.append(client_id)
            member.delivered.append((client_id, kind, data))
            return {"node": member.id, "client": client_id, "echo": data}

        async def run(task_status: trio.TaskStatus[Member]) -> None:
            try:
                with trio.CancelScope() as scope:
                    async with self.open_transport() as inner:
                        transport = FaultyTransport(inner)
                        async with meshline.open_client_service(
                            transport, self.key, client_invoke=client_invoke, **options
                        ) as service:
                            member_box.append(Member(service, transport, scope, done))
                            task_status.started(member_box[0])
                            await trio.sleep_forever()
            finally:
                done.set()

        member: Member = await self.nursery.start(run)
        return member

    async def converged(self, *members: Member) -> None:
        ids = {member.id for member in members}
        with trio.fail_after(10):
            for member in members:
                await wait_until(lambda m=member: ids <= m.service.node.alive_nodes())  # type: ignore[misc]


@asynccontextmanager
async def open_cluster(open_transport: OpenTransport, key: str) -> AsyncIterator[Cluster]:
    async with trio.open_nursery() as nursery:
        yield Cluster(nursery, open_transport, key)
        nursery.cancel_scope.cancel()


async def visible(member: Member, client_id: str, node_id: int) -> None:
    """Wait until ``member``'s registry shows ``client_id`` on ``node_id``."""
    registry = member.service.client_registry
    with trio.fail_after(10):
        while True:
            record = await meshline.ClientRegistry.get_client(registry, client_id)
            if record is not None and record.node_id == node_id:
                return
            await trio.sleep(0.01)


async def test_invoke_reaches_clients_locally_and_across_nodes(
    open_transport: OpenTransport, unique: Callable[[str], str]
) -> None:
    async with open_cluster(open_transport, unique("svc")) as cluster:
        one, two = await cluster.start(), await cluster.start()
        await cluster.converged(one, two)
        for client_id in HOSTILE_CLIENT_IDS:
            await two.service.register_client(client_id, {"user": client_id})
        await one.service.register_client("local", {})
        for client_id in HOSTILE_CLIENT_IDS:
            await visible(one, client_id, two.id)
            answer = await one.service.invoke(client_id, "notify", {"text": client_id})
            assert answer == {"node": two.id, "client": client_id, "echo": {"text": client_id}}
        assert await one.service.invoke("local", "notify", [1, 2]) == {
            "node": one.id,
            "client": "local",
            "echo": [1, 2],
        }
        assert one.delivered == [("local", "notify", [1, 2])]
        assert len(two.delivered) == len(HOSTILE_CLIENT_IDS)


async def test_service_mesh_is_apart_from_a_plain_node_of_the_same_key(
    open_transport: OpenTransport, unique: Callable[[str], str]
) -> None:
    key = unique("shared-key")
    async with (
        open_cluster(open_transport, key) as cluster,
        open_transport() as transport,
        meshline.open_node(transport, key) as plain,
    ):
        member = await cluster.start()
        assert plain.alive_nodes() == {plain.id}
        assert member.service.node.alive_nodes() == {member.id}
        assert plain.id == member.id == 1


async def test_every_error_class(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    async with open_cluster(open_transport, unique("errors")) as cluster:
        caller, owner = await cluster.start(), await cluster.start()
        await cluster.converged(caller, owner)
        await owner.service.register_client("c", {})
        await visible(caller, "c", owner.id)
        with pytest.raises(meshline.ClientNotFoundError) as not_found:
            await caller.service.invoke("nobody", "x", None)
        assert not_found.value.client_id == "nobody"
        with pytest.raises(meshline.ClientInvocationError) as failed:
            await caller.service.invoke("c", "fail", "gizmo")
        assert failed.value.error_type == "LookupError"
        assert "gizmo" in failed.value.error_message
        assert failed.value.node_id == owner.id
        with pytest.raises(meshline.MeshRequestTimeoutError):
            await caller.service.invoke("c", "stall", None, timeout=0.5)
        with trio.fail_after(5):
            await wait_until(lambda: owner.cancelled == ["c"])
        # The registry names the owner, but the owner never had this client.
        await caller.service.client_registry.backend.register("ghost", owner.id, b"\x80")
        await visible(caller, "ghost", owner.id)
        began = trio.current_time()
        with pytest.raises(meshline.ClientDisconnectedError) as gone:
            await caller.service.invoke("ghost", "x", None, timeout=30)
        assert gone.value.node_id == owner.id
        assert trio.current_time() - began < 30


async def test_clients_of_a_dead_node_fail_fast(
    open_transport: OpenTransport,
    unique: Callable[[str], str],
    clock: object,
    transport_kind: str,
) -> None:
    async with open_cluster(open_transport, unique("dead")) as cluster:
        caller = await cluster.start(can_lead=False)
        doomed = await cluster.start(can_lead=False)
        await cluster.converged(caller, doomed)
        await doomed.service.register_client("c", {})
        await visible(caller, "c", doomed.id)
        await doomed.crash()
        with trio.fail_after(10):
            await wait_until(lambda: not caller.service.node.is_alive(doomed.id))
        began = trio.current_time()
        with pytest.raises(meshline.ClientDisconnectedError):
            await caller.service.invoke("c", "x", None, timeout=30)
        if transport_kind == "memory":
            assert trio.current_time() == began


async def test_caller_cancellation_cancels_the_delivery(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    async with open_cluster(open_transport, unique("cancel")) as cluster:
        caller, owner = await cluster.start(), await cluster.start()
        await cluster.converged(caller, owner)
        await owner.service.register_client("c", {})
        await visible(caller, "c", owner.id)
        with trio.move_on_after(1):
            await caller.service.invoke("c", "stall", None, timeout=60)
        with trio.fail_after(5):
            await wait_until(lambda: owner.cancelled == ["c"])
        assert caller.service.node.transport.pending_requests == 0
        assert owner.service.node.handlers_running == 0


class StaleOnce:
    """A backend view that answers one lookup from before a move, as a lagging
    replica would; everything else goes to the real backend.

    The service reads through ``lookup`` when a backend has one (a local replica),
    so the stale answer is given there as well as by ``get_client``.
    """

    def __init__(self, backend: meshline.MemoryRegistryBackend, stale: meshline.ClientRecord):
        self._backend = backend
        self._stale: meshline.ClientRecord | None = stale
        self.stale_answers = 0

    def lookup(self, client_id: str) -> meshline.ClientRecord | None:
        if self._stale is not None and self._stale.client_id == client_id:
            stale, self._stale = self._stale, None
            self.stale_answers += 1
            return stale
        return self._backend.lookup(client_id)

    async def get_client(self, client_id: str) -> meshline.ClientRecord | None:
        await trio.lowlevel.checkpoint()
        return self.lookup(client_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


async def test_a_client_that_moved_mid_flight_is_rerouted_once(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    shared = meshline.MemoryRegistryBackend()
    stale = meshline.ClientRecord("c", 0, 0, b"\x80")
    view = StaleOnce(shared, stale)
    async with open_cluster(open_transport, unique("moved")) as cluster:
        caller = await cluster.start(backend=view)
        left = await cluster.start(backend=shared)
        arrived = await cluster.start(backend=shared)
        await cluster.converged(caller, left, arrived)
        await left.service.register_client("c", {})
        await arrived.service.register_client("c", {})  # the client moved
        view._stale = meshline.ClientRecord("c", left.id, 0, b"\x80")
        answer = await caller.service.invoke("c", "notify", "hello")
        assert view.stale_answers == 1
        assert answer["node"] == arrived.id
        assert left.delivered == []
        # If the registry still names the node that said no, the error stands.
        view._stale = meshline.ClientRecord("ghost", left.id, 0, b"\x80")
        await shared.register("ghost", left.id, b"\x80")
        with pytest.raises(meshline.ClientDisconnectedError):
            await caller.service.invoke("ghost", "notify", "hello")


class CountingReads:
    """A backend that counts the service's reads of one client. Without ``local`` it
    hides ``lookup``, as a backend without a local replica would."""

    def __init__(self, backend: meshline.MemoryRegistryBackend, *, local: bool) -> None:
        self._backend = backend
        self._local = local
        self.lookups = 0
        self.gets = 0

    async def get_client(self, client_id: str) -> meshline.ClientRecord | None:
        self.gets += 1
        return await self._backend.get_client(client_id)

    def __getattr__(self, name: str) -> Any:
        if name != "lookup":
            return getattr(self._backend, name)
        if not self._local:
            raise AttributeError(name)

        def lookup(client_id: str) -> meshline.ClientRecord | None:
            self.lookups += 1
            return self._backend.lookup(client_id)

        return lookup


async def test_invoke_reads_a_local_replica_where_the_backend_has_one(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    shared = meshline.MemoryRegistryBackend()
    async with open_cluster(open_transport, unique("lookup")) as cluster:
        owner = await cluster.start(backend=shared)
        await owner.service.register_client("c", {})
        for local in (True, False):
            reads = CountingReads(shared, local=local)
            caller = await cluster.start(backend=reads)
            await cluster.converged(caller, owner)
            reads.gets = 0
            assert (await caller.service.invoke("c", "notify", None))["node"] == owner.id
            assert (reads.lookups, reads.gets) == ((1, 0) if local else (0, 1))
            await caller.stop()


async def test_broadcast_and_exit_cleanup(
    open_transport: OpenTransport, unique: Callable[[str], str]
) -> None:
    async with open_cluster(open_transport, unique("bcast")) as cluster:
        one, two = await cluster.start(), await cluster.start()
        await cluster.converged(one, two)
        heard: list[tuple[int, Any, int]] = []
        for member in (one, two):
            member.service.register_broadcast_handler(
                "config", lambda data, sender, m=member: heard.append((m.id, data, sender))
            )
        await one.service.broadcast("config", ["flag-x"])
        with trio.fail_after(5):
            await wait_until(lambda: len(heard) == 2)
        assert sorted(heard) == [(one.id, ["flag-x"], one.id), (two.id, ["flag-x"], one.id)]
        await two.service.register_client("leaves-with-two", {})
        await visible(one, "leaves-with-two", two.id)
        await two.stop()
        registry = one.service.client_registry
        with trio.fail_after(10):
            while await meshline.ClientRegistry.get_client(registry, "leaves-with-two"):
                await trio.sleep(0.01)


async def test_bad_invoke_arguments_are_refused(
    open_transport: OpenTransport, unique: Callable[[str], str]
) -> None:
    async with open_cluster(open_transport, unique("bad")) as cluster:
        member = await cluster.start()
        await member.service.register_client("c", {})
        for client_id in ["", "x" * 1025, None]:
            with pytest.raises(meshline.InvalidArgumentError):
                await member.service.invoke(client_id, "x", None)  # type: ignore[arg-type]
        for timeout in [0, -1, float("inf"), "soon"]:
            with pytest.raises(meshline.InvalidArgumentError):
                await member.service.invoke("c", "x", None, timeout=timeout)  # type: ignore[arg-type]
        with pytest.raises(meshline.InvalidNameError):
            await member.service.invoke("c", "", None)
        with pytest.raises(meshline.PayloadError):
            await member.service.invoke("c", "x", object())
        assert member.delivered == []
