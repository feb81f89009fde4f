"""The registry at scale: churn that leaves nothing behind, snapshots handed over
entry by entry, cleanup in parallel, and the markers both transports keep."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest
import trio

import meshline
from meshline._transport import _memory, _nats
from meshline.testing import NatsServer

from .conftest import OpenTransport
from .node_helpers import open_mesh, wait_until

Unique = Callable[[str], str]

METADATA = msgspec.msgpack.encode({"user_id": "user-1", "role": "admin"})


async def each(count: int, action: Callable[[int], Awaitable[None]], limit: int = 64) -> None:
    """Run ``action(0..count-1)``, ``limit`` at a time."""
    numbers = iter(range(count))

    async def worker() -> None:
        for number in numbers:
            await action(number)

    async with trio.open_nursery() as nursery:
        for _ in range(limit):
            nursery.start_soon(worker)


# --- markers, as both transports keep them ---------------------------------------


@pytest.fixture
def short_purge_markers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Purge markers that live 1 s instead of a minute, on both transports."""
    monkeypatch.setattr(_nats, "PURGE_MARKER_TTL", 1)
    monkeypatch.setattr(_memory, "PURGE_MARKER_SECONDS", 1.0)


async def wait_for_absence(kv: meshline.KeyValue, key: str) -> None:
    """Wait until ``key`` leaves no marker: an update expecting no revision at all
    lands (it writes ``key``)."""
    with trio.fail_after(15):
        while True:
            try:
                await kv.update(key, b"back", revision=0)
            except meshline.RevisionMismatchError:
                await trio.sleep(0.25)
            else:
                return


async def test_delete_markers_stay_and_purge_markers_expire(
    transport: meshline.Transport,
    transport_kind: str,
    unique: Unique,
    clock: object,
    short_purge_markers: None,
) -> None:
    kv = await transport.key_value(unique("markers"))
    deleted = await kv.put("deleted", b"1")
    purged = await kv.put("purged", b"2")
    async with kv.watch() as watch:
        await kv.delete("deleted", revision=deleted)
        with pytest.raises(meshline.RevisionMismatchError):
            await kv.purge("purged", revision=purged - 1)
        await kv.purge("purged", revision=purged)
        changes = []
        with trio.fail_after(10):
            async for entry in watch:
                changes.append((entry.key, entry.operation))
                if len(changes) == 2:
                    break
    assert changes == [
        ("deleted", meshline.KVOperation.DELETE),
        ("purged", meshline.KVOperation.PURGE),
    ]
    # Both keys are absent, and each still has its marker: a write that expects
    # the key never to have been written is refused.
    assert await kv.get("deleted") is None and await kv.get("purged") is None
    for key in ("deleted", "purged"):
        with pytest.raises(meshline.RevisionMismatchError):
            await kv.update(key, b"x", revision=0)
    # The purge marker expires and leaves nothing; the delete marker stays, past
    # the minute after which the memory transport used to drop it (on NATS, past
    # the purge marker's life: a real minute is too long for a test).
    await wait_for_absence(kv, "purged")
    await trio.sleep(61 if transport_kind == "memory" else 2)
    with pytest.raises(meshline.RevisionMismatchError):
        await kv.update("deleted", b"x", revision=0)
    assert await kv.keys() == ["purged"]


async def test_a_watch_hands_its_snapshot_over_entry_by_entry(
    transport: meshline.Transport, unique: Unique, clock: object
) -> None:
    kv = await transport.key_value(unique("handover"))
    for key in ("a.one", "a.two", "a.three", "b.other"):
        await kv.put(key, key.encode())
    await kv.delete("a.two")
    await kv.purge("a.three")
    handed: list[meshline.KVEntry] = []
    async with kv.watch("a.>", on_snapshot=handed.append) as watch:
        assert watch.snapshot == []
        revisions = [entry.revision for entry in handed]
        assert revisions == sorted(revisions)
        # Replayed in order, the entries leave the current values (markers of
        # absent keys may come along).
        current: dict[str, bytes] = {}
        for entry in handed:
            if entry.operation is meshline.KVOperation.PUT:
                current[entry.key] = entry.value
            else:
                current.pop(entry.key, None)
        assert current == {"a.one": b"a.one"}
        # Nothing of the snapshot comes again; later changes do.
        await kv.put("a.one", b"new")
        with trio.fail_after(10):
            entry = await watch.__anext__()
        assert (entry.key, entry.value) == ("a.one", b"new")
        assert entry.revision > max(revisions)

    def refuse(entry: meshline.KVEntry) -> None:
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        async with kv.watch("a.>", on_snapshot=refuse):
            pass  # pragma: no cover


async def test_a_watch_can_leave_out_the_markers_of_absent_keys(
    transport: meshline.Transport, unique: Unique, clock: object
) -> None:
    kv = await transport.key_value(unique("absent"))
    for key in ("a.one", "a.two", "a.three"):
        await kv.put(key, key.encode())
    await kv.delete("a.two")
    await kv.purge("a.three")
    handed: list[meshline.KVEntry] = []
    async with kv.watch("a.>", on_snapshot=handed.append, removals=False) as watch:
        assert [(entry.key, entry.operation) for entry in handed] == [
            ("a.one", meshline.KVOperation.PUT)
        ]
        # Live removals still come.
        await kv.delete("a.one")
        with trio.fail_after(10):
            entry = await watch.__anext__()
        assert (entry.key, entry.operation) == ("a.one", meshline.KVOperation.DELETE)


async def test_a_key_removed_while_the_snapshot_loads_is_removed(
    transport: meshline.Transport, unique: Unique, clock: object
) -> None:
    """Markers are left out only for keys absent when the watch began: a value the
    snapshot handed over and then removed before the snapshot ended must not stay."""
    kv = await transport.key_value(unique("racing"))
    keys = [f"k.{index:05d}" for index in range(20_000)]
    async with trio.open_nursery() as nursery:
        for start in range(16):
            nursery.start_soon(put_all, kv, keys[start::16])
    current: dict[str, bytes] = {}
    first_handed = trio.Event()

    def hand(entry: meshline.KVEntry) -> None:
        if entry.operation is meshline.KVOperation.PUT:
            current[entry.key] = entry.value
        else:
            current.pop(entry.key, None)
        first_handed.set()

    async def remove_early_keys() -> None:
        await first_handed.wait()
        for key in keys[:50]:
            await kv.delete(key)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(remove_early_keys)
        async with kv.watch("k.>", on_snapshot=hand, removals=False) as watch:
            with trio.fail_after(20):
                while any(key in current for key in keys[:50]):
                    entry = await watch.__anext__()
                    if entry.operation is meshline.KVOperation.PUT:
                        current[entry.key] = entry.value
                    else:
                        current.pop(entry.key, None)
    assert sorted(current) == keys[50:]


async def put_all(kv: meshline.KeyValue, keys: list[str]) -> None:
    for key in keys:
        await kv.put(key, b"v")


async def test_a_watch_lets_go_of_its_snapshot(
    transport: meshline.Transport, unique: Unique, clock: object
) -> None:
    kv = await transport.key_value(unique("let-go"))
    await kv.put("k", b"v")
    async with kv.watch() as watch:
        taken = watch.take_snapshot()
        assert [(entry.key, entry.value) for entry in taken] == [("k", b"v")]
        assert watch.snapshot == [] and watch.take_snapshot() == []


# --- churn ----------------------------------------------------------------------


CHURNED = 50_000
LIVE = 20_000


async def test_a_fresh_replica_after_heavy_churn_is_exact(
    open_transport: OpenTransport, unique: Unique, clock: object
) -> None:
    """50k clients come and go, 20k stay: a replica opened afterwards holds exactly
    the ones that stayed. (Loading the markers of the 50k took longer than the
    snapshot's old fixed limit of 30 s.)"""
    key = unique("churn")
    async with open_transport() as transport:
        async with meshline.open_kv_registry_backend(transport, key) as writer:

            async def come_and_go(number: int) -> None:
                client_id = f"client {number}"
                node_id = 1 + number % 3
                await writer.register(client_id, node_id, METADATA, token=number + 1)
                if number >= LIVE:
                    assert await writer.unregister(client_id, node_id, token=number + 1)

            await each(LIVE + CHURNED, come_and_go)
            expected = {record.client_id: record for record in await writer.list_clients()}
    assert set(expected) == {f"client {number}" for number in range(LIVE)}
    async with open_transport() as transport:
        async with meshline.open_kv_registry_backend(transport, key) as fresh:
            records = await fresh.list_clients()
            assert {record.client_id: record for record in records} == expected
            assert len(records) == LIVE
            assert await fresh.node_ids() == {1, 2, 3}
            assert fresh.watch_failures == 0


# --- cleanup --------------------------------------------------------------------


async def test_cleanup_of_a_dead_node_with_10k_clients_is_exact(
    nats_server: NatsServer, unique: Unique
) -> None:
    """On real NATS: every record of the dead incarnation is removed and returned
    exactly once; a newer incarnation's record and other nodes' stay."""
    key = unique("cleanup10k")
    count = 10_000
    async with (
        meshline.open_nats_transport(nats_server.url) as dead_transport,
        meshline.open_nats_transport(nats_server.url) as leader_transport,
        meshline.open_kv_registry_backend(dead_transport, key) as dead,
        meshline.open_kv_registry_backend(leader_transport, key) as leader,
    ):

        async def register(number: int) -> None:
            await dead.register(f"c{number}", 7, METADATA, token=number + 1, incarnation=1)

        await each(count, register)
        await dead.register("reasserted", 7, METADATA, incarnation=2)
        await dead.register("elsewhere", 8, METADATA)
        with trio.fail_after(30):
            while await leader.count_clients_for_node(7) != count + 1:
                await trio.sleep(0.05)
        removed = await leader.cleanup_node(7, incarnation=1)
        removed_ids = [record.client_id for record in removed]
        assert len(removed_ids) == count
        assert set(removed_ids) == {f"c{number}" for number in range(count)}
        assert {record.node_id for record in await leader.list_clients()} == {7, 8}
        assert await leader.count_clients_for_node(7) == 1
        with trio.fail_after(30):
            while await dead.count_clients_for_node(7) != 1:
                await trio.sleep(0.05)
        assert await leader.cleanup_node(7, incarnation=1) == []


async def test_orphan_reports_add_up_to_the_dead_nodes_clients(
    open_transport: OpenTransport, unique: Unique, clock: object
) -> None:
    count = 10_000
    reported: list[str] = []
    reports = 0

    def on_orphaned(node_id: int, clients: list[meshline.RegisteredClient[Any]]) -> None:
        nonlocal reports
        assert node_id == doomed.id
        reports += 1
        reported.extend(client.client_id for client in clients)

    async with open_mesh(open_transport, unique("orphans10k")) as mesh:
        options = {"on_orphaned": on_orphaned}
        leader = await mesh.start(registry=options)
        doomed = await mesh.start(registry=options, can_lead=False)
        survivor = await mesh.start(registry=options, can_lead=False)
        assert leader.registry is not None
        assert doomed.registry is not None and survivor.registry is not None
        registry = doomed.registry

        async def register(number: int) -> None:
            await registry.register(f"client {number}", {"n": number})

        await each(count, register)
        await survivor.registry.register("survivor's", {})
        await doomed.crash()
        # A hang guard, not a timing check. On the 2-core CI machine the reports now
        # come 3 to 5 s after the crash. They used to take 6 to 56 s: the cleanup
        # spawned a task per client, which kept the event loop busy long enough for
        # the leader's own heartbeat to come back late; its view then held for a TTL,
        # every queued removal failed, and the cleanup started over, again and again.
        with trio.fail_after(60):
            await wait_until(lambda: len(reported) >= count)
        assert leader.registry.cleanup_restarts == 0
        assert len(reported) == len(set(reported)) == count
        assert set(reported) == {f"client {number}" for number in range(count)}
        assert reports >= 1
        assert await leader.registry.count_clients_for_node(doomed.id) == 0
        assert [client.client_id for client in await leader.registry.list_clients()] == [
            "survivor's"
        ]


@pytest.mark.slow
async def test_a_fresh_watch_never_misses_a_snapshot_the_server_already_sent(
    nats_server: NatsServer,
) -> None:
    """The server may deliver the whole snapshot before it answers the consumer info
    (then nothing is pending): the snapshot is complete only once those messages
    were read. Before the fix, about 1 open in 100 saw an empty snapshot here."""
    async with meshline.open_nats_transport(nats_server.url) as transport:
        kv = await transport.key_value("fresh")
        for index in range(300):
            await kv.put(f"k.{index}", b"v")
    short = 0
    for _ in range(200):
        async with meshline.open_nats_transport(nats_server.url) as transport:
            kv = await transport.key_value("fresh")
            async with kv.watch() as watch:
                short += len(watch.snapshot) != 300
    assert short == 0
