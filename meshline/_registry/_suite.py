"""A conformance suite for registry backends, for anyone who writes one.

Subclass :class:`RegistryBackendSuite` in a pytest module (with pytest-trio in
``trio_mode``) and implement :meth:`~RegistryBackendSuite.open_backends`:

.. code-block:: python

    from contextlib import asynccontextmanager
    from meshline.testing import RegistryBackendSuite

    class TestMyBackend(RegistryBackendSuite):
        @asynccontextmanager
        async def open_backends(self, count):
            store = make_a_fresh_store()
            yield [MyBackend(store) for _ in range(count)]
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

import attrs
import trio

from ._core import ClientRecord, ReassertOutcome, RegistryBackend, now_ms

__all__ = ["HOSTILE_CLIENT_IDS", "RegistryBackendSuite"]

HOSTILE_CLIENT_IDS = [
    "plain",
    "a.b.c",
    "*",
    ">",
    "with space",
    "line\nbreak",
    "tab\tand\rreturn",
    "ünïcødé ☃ 😀",
    "$SYS.>",
    "x" * 1024,
    "é" * 512,
]
"""Client ids that must round-trip exactly: separators, wildcards, 1 KiB, unicode."""


class RegistryBackendSuite(abc.ABC):
    """Checks that a :class:`~meshline.RegistryBackend` follows the ownership rules.

    Every backend in the list :meth:`open_backends` yields is one node's handle on
    the same store. A backend may show other nodes' writes a little later (a
    replica fed by a watch); the suite waits up to :attr:`settle_timeout` for them.
    """

    settle_timeout = 10.0

    @abc.abstractmethod
    def open_backends(self, count: int) -> AbstractAsyncContextManager[list[RegistryBackend]]:
        """Yield ``count`` handles on one fresh, empty store."""

    async def eventually(self, check: Callable[[], Awaitable[bool]]) -> None:
        """Wait until ``await check()`` is true, up to :attr:`settle_timeout`."""
        with trio.fail_after(self.settle_timeout):
            while True:
                if await check():
                    return
                await trio.sleep(0.01)

    async def test_register_new_client_and_read_own_write(self) -> None:
        async with self.open_backends(1) as (backend,):
            before = now_ms()
            assert await backend.register("c1", 1, b"meta") is None
            record = await backend.get_client("c1")
            assert record is not None
            assert (record.client_id, record.node_id, record.metadata) == ("c1", 1, b"meta")
            assert before - 60_000 <= record.connected_at <= now_ms() + 60_000
            assert await backend.get_client("absent") is None

    async def test_register_elsewhere_supersedes_and_reports_the_old_node(self) -> None:
        async with self.open_backends(2) as (one, two):
            assert await one.register("c", 1, b"first") is None
            assert await two.register("c", 2, b"second") == 1
            assert await two.register("c", 2, b"again") is None
            assert await one.register("c", 1, b"back") == 2

            async def settled() -> bool:
                record = await two.get_client("c")
                return record is not None and record.metadata == b"back"

            await self.eventually(settled)

    async def test_reassert_restores_keeps_or_gives_up(self) -> None:
        async with self.open_backends(2) as (one, two):
            for client_id in HOSTILE_CLIENT_IDS:
                await self._reassert_outcomes(one, two, client_id)

    async def _reassert_outcomes(
        self, one: RegistryBackend, two: RegistryBackend, client_id: str
    ) -> None:
        outcome = await one.reassert(client_id, 1, b"first", token=7, incarnation=1)
        assert outcome is ReassertOutcome.RESTORED
        restored = await one.get_client(client_id)
        assert restored is not None
        assert (restored.node_id, restored.token, restored.incarnation) == (1, 7, 1)
        # The same registration again: kept, its incarnation brought up to date, its
        # connection time left alone.
        outcome = await one.reassert(client_id, 1, b"first", token=7, incarnation=2)
        assert outcome is ReassertOutcome.KEPT
        kept = ClientRecord(client_id, 1, restored.connected_at, b"first", 7, 2)

        async def at_incarnation_two() -> bool:
            return await two.get_client(client_id) == kept

        await self.eventually(at_incarnation_two)
        # Another node, or another registration of the same node: gone, untouched.
        outcome = await two.reassert(client_id, 2, b"x", token=8, incarnation=1)
        assert outcome is ReassertOutcome.GONE
        outcome = await one.reassert(client_id, 1, b"x", token=9, incarnation=3)
        assert outcome is ReassertOutcome.GONE
        assert await one.get_client(client_id) == kept
        # A takeover by another node turns the old owner's re-assertion away too.
        assert await two.register(client_id, 2, b"moved", token=8) == 1
        outcome = await one.reassert(client_id, 1, b"first", token=7, incarnation=3)
        assert outcome is ReassertOutcome.GONE
        record = await two.get_client(client_id)
        assert record is not None and (record.node_id, record.metadata) == (2, b"moved")

    async def test_reassert_reads_the_store_not_a_stale_copy(self) -> None:
        async with self.open_backends(2) as (one, two):
            for client_id in HOSTILE_CLIENT_IDS:
                await one.register(client_id, 1, b"m", token=5, incarnation=1)
                # Another handle removes it (a cleanup by the leader, say). The
                # owner's own copy may not know yet, and still shows exactly what
                # this re-assertion writes, but the store has nothing: write it back.
                assert await two.cleanup_client(client_id, 1, incarnation=1) is not None
                outcome = await one.reassert(client_id, 1, b"m", token=5, incarnation=1)
                assert outcome is ReassertOutcome.RESTORED

            async def all_back() -> bool:
                records = await two.list_clients_for_node(1)
                return len(records) == len(HOSTILE_CLIENT_IDS)

            await self.eventually(all_back)

    async def test_a_late_call_from_an_old_registration_changes_nothing(self) -> None:
        """A client reconnects to the same node: the old connection's late calls,
        made with its own token, must not touch the new registration."""
        async with self.open_backends(1) as (backend,):
            for client_id in HOSTILE_CLIENT_IDS:
                await backend.register(client_id, 1, b"old connection", token=1, incarnation=4)
                assert (
                    await backend.register(client_id, 1, b"new one", token=2, incarnation=4) is None
                )
                assert await backend.update_metadata(client_id, 1, b"late", token=1) is False
                assert await backend.unregister(client_id, 1, token=1) is False
                record = await backend.get_client(client_id)
                assert record is not None
                assert (record.token, record.incarnation, record.metadata) == (2, 4, b"new one")
                assert await backend.update_metadata(client_id, 1, b"edited", token=2) is True
                edited = await backend.get_client(client_id)
                assert edited == attrs.evolve(record, metadata=b"edited")
                assert await backend.unregister(client_id, 1, token=2) is True
                assert await backend.get_client(client_id) is None
                assert await backend.unregister(client_id, 1, token=2) is False

    async def test_cleanup_is_fenced_by_incarnation(self) -> None:
        async with self.open_backends(2) as (dead, leader):
            await dead.register("old", 1, b"", incarnation=1)
            await dead.register("reasserted", 1, b"", incarnation=2)
            await dead.register("also old", 1, b"", incarnation=1)

            async def replicated() -> bool:
                return await leader.count_clients_for_node(1) == 3

            await self.eventually(replicated)
            assert await leader.cleanup_client("reasserted", 1, incarnation=1) is None
            removed = await leader.cleanup_client("old", 1, incarnation=1)
            assert removed is not None and removed.client_id == "old"
            assert await leader.cleanup_client("old", 1, incarnation=1) is None
            rest = await leader.cleanup_node(1, incarnation=1)
            assert [record.client_id for record in rest] == ["also old"]
            record = await leader.get_client("reasserted")
            assert record is not None and record.incarnation == 2
            everything = await leader.cleanup_node(1)
            assert [record.client_id for record in everything] == ["reasserted"]

    async def test_only_the_owner_unregisters(self) -> None:
        async with self.open_backends(2) as (one, two):
            await one.register("c", 1, b"m")
            await two.register("c", 2, b"m")
            assert await one.unregister("c", 1) is False
            record = await one.get_client("c")
            assert record is None or record.node_id == 2
            assert await two.unregister("c", 2) is True
            assert await two.get_client("c") is None
            assert await two.unregister("c", 2) is False

    async def test_only_the_owner_updates_and_connected_at_is_kept(self) -> None:
        async with self.open_backends(2) as (one, two):
            assert await one.update_metadata("c", 1, b"x") is False
            await one.register("c", 1, b"old", token=4, incarnation=3)
            original = await one.get_client("c")
            assert original is not None
            assert await two.update_metadata("c", 2, b"stolen") is False
            assert await one.update_metadata("c", 1, b"new") is True
            updated = await one.get_client("c")
            assert updated == ClientRecord("c", 1, original.connected_at, b"new", 4, 3)

    async def test_listings_by_node(self) -> None:
        async with self.open_backends(2) as (one, two):
            for index in range(5):
                await one.register(f"a{index}", 1, b"")
            for index in range(3):
                await two.register(f"b{index}", 2, b"")

            async def settled() -> bool:
                return len(await one.list_clients()) == 8 == len(await two.list_clients())

            await self.eventually(settled)
            mine = {record.client_id for record in await one.list_clients_for_node(1)}
            assert mine == {f"a{index}" for index in range(5)}
            assert len(await one.list_clients_for_node(2)) == 3
            assert await one.list_clients_for_node(99) == []
            assert await one.count_clients_for_node(1) == 5
            assert await one.count_clients_for_node(99) == 0

    async def test_node_ids_name_the_nodes_that_own_registrations(self) -> None:
        async with self.open_backends(2) as (one, two):
            assert await one.node_ids() == set()
            await one.register("a", 1, b"")
            await one.register("b", 1, b"")
            await two.register("c", 2, b"")

            async def owners(expected: set[int]) -> None:
                async def check() -> bool:
                    return await one.node_ids() == await two.node_ids() == expected

                await self.eventually(check)

            await owners({1, 2})
            assert await one.unregister("a", 1) is True
            await owners({1, 2})
            assert await one.unregister("b", 1) is True
            await owners({2})
            assert await one.register("c", 3, b"") == 2
            await owners({3})
            assert [record.client_id for record in await two.cleanup_node(3)] == ["c"]
            await owners(set())

    async def test_cleanup_node_removes_each_record_exactly_once(self) -> None:
        """Many records, some of a newer incarnation, some taken over while the
        cleanup runs: each removed record is returned once, nothing else goes."""
        async with self.open_backends(3) as (dead, survivor, leader):
            old = [f"old {index}" for index in range(300)]
            newer = [f"newer {index}" for index in range(20)]
            for client_id in old:
                await dead.register(client_id, 1, b"", incarnation=1)
            for client_id in newer:
                await dead.register(client_id, 1, b"", incarnation=2)

            async def replicated() -> bool:
                return await leader.count_clients_for_node(1) == len(old) + len(newer)

            await self.eventually(replicated)
            moving = old[::7]
            superseded: dict[str, int | None] = {}
            removed: list[ClientRecord] = []

            async def move(client_id: str) -> None:
                superseded[client_id] = await survivor.register(client_id, 2, b"")

            async def clean_up() -> None:
                removed.extend(await leader.cleanup_node(1, incarnation=1))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(clean_up)
                for client_id in moving:
                    nursery.start_soon(move, client_id)
            removed_ids = [record.client_id for record in removed]
            assert len(removed_ids) == len(set(removed_ids))
            assert set(removed_ids) <= set(old)
            assert set(old) - set(moving) <= set(removed_ids)
            for client_id in moving:
                assert (client_id in removed_ids) == (superseded[client_id] is None)
            assert all(record.incarnation == 1 for record in removed)
            remaining = {record.client_id for record in await leader.list_clients_for_node(1)}
            assert remaining == set(newer)

    async def test_cleanup_removes_only_what_the_node_still_owns(self) -> None:
        async with self.open_backends(3) as (dead, other, leader):
            await dead.register("stays-dead", 1, b"orphan")
            await dead.register("moved", 1, b"was here")
            await other.register("moved", 2, b"now here")
            await other.register("unrelated", 2, b"")

            async def settled() -> bool:
                return len(await leader.list_clients()) == 3

            await self.eventually(settled)
            removed = await leader.cleanup_node(1)
            assert [(r.client_id, r.metadata) for r in removed] == [("stays-dead", b"orphan")]
            assert await leader.get_client("stays-dead") is None
            moved = await leader.get_client("moved")
            assert moved is not None and moved.node_id == 2
            assert await leader.cleanup_node(1) == []

    async def test_any_client_id_round_trips(self) -> None:
        async with self.open_backends(2) as (one, two):
            for client_id in HOSTILE_CLIENT_IDS:
                await one.register(client_id, 1, client_id.encode())

            async def settled() -> bool:
                return len(await two.list_clients()) == len(HOSTILE_CLIENT_IDS)

            await self.eventually(settled)
            for client_id in HOSTILE_CLIENT_IDS:
                record = await two.get_client(client_id)
                assert record is not None
                assert (record.client_id, record.metadata) == (client_id, client_id.encode())
            listed = {record.client_id for record in await two.list_clients()}
            assert listed == set(HOSTILE_CLIENT_IDS)

    async def test_concurrent_registers_form_one_chain(self) -> None:
        """Racing registers linearise: each reports the one before it, one is left."""
        async with self.open_backends(5) as backends:
            for _ in range(5):
                await self._race_registers(backends)

    async def _race_registers(self, backends: list[RegistryBackend]) -> None:
        results: dict[int, int | None] = {}

        async def register(node_id: int, backend: RegistryBackend) -> None:
            results[node_id] = await backend.register("contested", node_id, b"")

        async with trio.open_nursery() as nursery:
            for node_id, backend in enumerate(backends, start=1):
                nursery.start_soon(register, node_id, backend)
        winners = [node_id for node_id in results if node_id not in results.values()]
        assert len(winners) == 1
        reported = [value for value in results.values() if value is not None]
        assert len(reported) == len(set(reported)) == len(backends) - 1
        assert set(reported) <= set(results)

        async def settled() -> bool:
            record = await backends[0].get_client("contested")
            return record is not None and record.node_id == winners[0]

        await self.eventually(settled)
        assert await backends[winners[0] - 1].unregister("contested", winners[0])

    async def test_stale_owner_races_cannot_remove_a_newer_registration(self) -> None:
        async with self.open_backends(2) as (old, new):
            for round_number in range(10):
                await self._race_stale_owner(old, new, f"race{round_number}")

    async def _race_stale_owner(
        self, old: RegistryBackend, new: RegistryBackend, client_id: str
    ) -> None:
        await old.register(client_id, 1, b"old")
        outcome: dict[str, object] = {}

        async def take_over() -> None:
            outcome["superseded"] = await new.register(client_id, 2, b"new")

        async def leave() -> None:
            outcome["unregistered"] = await old.unregister(client_id, 1)

        async def edit() -> None:
            outcome["updated"] = await old.update_metadata(client_id, 1, b"stale")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(take_over)
            nursery.start_soon(leave)
            nursery.start_soon(edit)
        record = await new.get_client(client_id)
        assert record is not None and record.node_id == 2
        assert record.metadata == b"new"
        # The old owner's removal succeeded only if it came first; then nobody was
        # superseded. Otherwise the takeover reports node 1.
        assert (outcome["unregistered"], outcome["superseded"]) in [(True, None), (False, 1)]

    async def test_cleanup_racing_reregistrations_removes_only_the_dead_nodes(self) -> None:
        async with self.open_backends(3) as (dead, survivor, leader):
            clients = [f"client-{index}" for index in range(20)]
            for client_id in clients:
                await dead.register(client_id, 1, b"dead")

            async def settled() -> bool:
                return len(await leader.list_clients_for_node(1)) == len(clients)

            await self.eventually(settled)
            moving = clients[::2]
            superseded: dict[str, int | None] = {}
            removed: list[ClientRecord] = []

            async def move(client_id: str) -> None:
                superseded[client_id] = await survivor.register(client_id, 2, b"alive")

            async def clean_up() -> None:
                removed.extend(await leader.cleanup_node(1))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(clean_up)
                for client_id in moving:
                    nursery.start_soon(move, client_id)
            removed_ids = {record.client_id for record in removed}
            for client_id in moving:
                # Moved before the cleanup reached it: it superseded node 1 and must
                # survive. Moved after: the cleanup removed node 1's registration.
                assert (client_id in removed_ids) == (superseded[client_id] is None)
                record = await survivor.get_client(client_id)
                assert record is not None and record.node_id == 2
            assert set(clients) - set(moving) <= removed_ids

    async def test_cleanup_racing_reassertion_never_loses_the_client(self) -> None:
        """A node declared dead re-asserts under a new incarnation while the leader
        cleans up the old one: whichever lands first, the client ends up registered."""
        async with self.open_backends(2) as (owner, leader):
            for round_number in range(10):
                await self._race_cleanup_and_reassertion(
                    owner,
                    leader,
                    HOSTILE_CLIENT_IDS[round_number],
                    whole_node=round_number % 2 == 1,
                )

    async def _race_cleanup_and_reassertion(
        self, owner: RegistryBackend, leader: RegistryBackend, client_id: str, whole_node: bool
    ) -> None:
        await owner.register(client_id, 1, b"m", token=3, incarnation=1)

        async def replicated() -> bool:
            return await leader.get_client(client_id) is not None

        await self.eventually(replicated)
        outcome: dict[str, object] = {}

        async def clean_up() -> None:
            if whole_node:
                removed = await leader.cleanup_node(1, incarnation=1)
                assert [record.client_id for record in removed] in ([], [client_id])
                outcome["removed"] = removed[0] if removed else None
            else:
                outcome["removed"] = await leader.cleanup_client(client_id, 1, incarnation=1)

        async def reassert() -> None:
            outcome["reasserted"] = await owner.reassert(client_id, 1, b"m", token=3, incarnation=2)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(clean_up)
            nursery.start_soon(reassert)
        expected = ReassertOutcome.KEPT if outcome["removed"] is None else ReassertOutcome.RESTORED
        assert outcome["reasserted"] is expected

        async def whole_again() -> bool:
            record = await leader.get_client(client_id)
            return record is not None and (record.node_id, record.incarnation) == (1, 2)

        await self.eventually(whole_again)
        # Whatever the order was, a late cleanup of the dead incarnation now finds
        # nothing of its own to remove.
        assert await leader.cleanup_client(client_id, 1, incarnation=1) is None
        assert await owner.unregister(client_id, 1, token=3) is True
