"""The client registry wired to mesh nodes: cleanup by the leader, re-assertion,
and queries that leave out dead nodes. On memory (MockClock) and on NATS."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

import meshline

from .node_helpers import OpenTransport, RunningNode, open_mesh, wait_until


def registry_of(running: RunningNode) -> meshline.NodeClientRegistry[Any]:
    assert running.registry is not None
    return running.registry


async def test_leader_cleans_up_a_crashed_node_and_reports_its_orphans(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    orphaned: list[tuple[int, set[str]]] = []

    def on_orphaned(node_id: int, clients: list[meshline.RegisteredClient[Any]]) -> None:
        orphaned.append((node_id, {client.client_id for client in clients}))

    async with open_mesh(open_transport, unique("orphans")) as mesh:
        options = {"on_orphaned": on_orphaned}
        leader = await mesh.start(registry=options)
        doomed = await mesh.start(registry=options, can_lead=False)
        survivor = await mesh.start(registry=options, can_lead=False)
        assert leader.node.is_leader
        await registry_of(doomed).register("stays.dead *", {"n": 1})
        await registry_of(doomed).register("moves", {"n": 2})
        moved = await registry_of(survivor).register("moves", {"n": 3})
        assert moved.superseded == doomed.id
        await doomed.crash()
        with trio.fail_after(20):
            await wait_until(lambda: bool(orphaned))
        assert orphaned == [(doomed.id, {"stays.dead *"})]
        assert await registry_of(leader).get_client("stays.dead *") is None
        with trio.fail_after(10):
            while (moved := await registry_of(leader).get_client("moves")) is None:
                await trio.sleep(0.01)
        assert moved.node_id == survivor.id and moved.metadata == {"n": 3}


async def test_queries_skip_dead_nodes_before_any_cleanup(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    async with open_mesh(open_transport, unique("skip")) as mesh:
        watcher = await mesh.start(registry={}, can_lead=False)
        doomed = await mesh.start(registry={}, can_lead=False)
        await registry_of(doomed).register("ghost", {})
        with trio.fail_after(10):
            while await registry_of(watcher).get_client("ghost") is None:
                await trio.sleep(0.01)
        await doomed.crash()
        with trio.fail_after(10):
            await wait_until(lambda: not watcher.node.is_alive(doomed.id))
        registry = registry_of(watcher)
        assert await registry.get_client("ghost") is None
        assert await registry.list_clients() == []
        assert await registry.list_clients_for_node(doomed.id) == []
        raw = await meshline.ClientRegistry.get_client(registry, "ghost")
        assert raw is not None, "nobody leads, so the record itself is still there"


async def test_lost_registrations_are_reasserted_but_moved_ones_are_not_taken_back(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    async with open_mesh(open_transport, unique("reassert")) as mesh:
        options = {"reassert_interval": 0.5}
        first = await mesh.start(registry=options)
        second = await mesh.start(registry=options)
        mine = registry_of(first)
        await mine.register("lost", {"v": 1})
        await mine.register("moved", {"v": 2})
        await registry_of(second).register("moved", {"v": 3})
        await mine.backend.cleanup_node(first.id)  # as if JetStream lost the writes
        with trio.fail_after(10):
            while (restored := await mine.get_client("lost")) is None:
                await trio.sleep(0.05)
        assert restored.node_id == first.id and restored.metadata == {"v": 1}
        await trio.sleep(1.5)
        moved = await mine.get_client("moved")
        assert moved is not None and moved.node_id == second.id


async def test_leaving_removes_own_registrations_only(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    async with open_mesh(open_transport, unique("leave")) as mesh:
        staying = await mesh.start(registry={})
        leaving = await mesh.start(registry={})
        await registry_of(leaving).register("mine", {})
        await registry_of(leaving).register("taken", {})
        await registry_of(staying).register("taken", {})
        await leaving.stop()
        registry = registry_of(staying)
        with trio.fail_after(10):
            while await meshline.ClientRegistry.get_client(registry, "mine") is not None:
                await trio.sleep(0.01)
        taken = await registry.get_client("taken")
        assert taken is not None and taken.node_id == staying.id
