"""Ownership races: hypothesis state machines racing several nodes over few clients.

Each machine drives three nodes' handles on one registry (memory backend, or the KV
backend on a real nats-server) and checks every answer against a model. Steps are
single operations, node deaths with cleanup, and bursts of concurrent operations
whose answers must fit some order of those operations (checked per client, which is
what the ownership rules promise). After every step the replicas must settle to the
model.

The machine runs in a worker thread; the Trio loop that owns the connections runs
in the main thread, and steps reach it through ``trio.from_thread``.

Run with ``HYPOTHESIS_PROFILE=thorough`` for 2,000 examples per backend.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import meshline
from meshline.testing import NatsServer

NODES = (1, 2, 3)
CLIENTS = ("a", "b.c *>", "ü\n" + "x" * 300)
"""Few clients, so nodes collide often; hostile ids, one past the reversible length."""

Model = dict[str, tuple[int, bytes]]
Op = tuple[str, int, str, bytes]
"""(kind, node, client, metadata); kind is register, unregister, update or cleanup.
For cleanup, ``node`` is the dead node being cleaned up."""

metadata = st.binary(max_size=8)
ops = st.tuples(
    st.sampled_from(["register", "unregister", "update"]),
    st.sampled_from(NODES),
    st.sampled_from(CLIENTS),
    metadata,
)


def apply(model: Model, op: Op) -> object:
    """What the ownership rules say ``op`` returns, applied to ``model`` in place."""
    kind, node, client, meta = op
    owner = model.get(client)
    if kind == "register":
        model[client] = (node, meta)
        return owner[0] if owner is not None and owner[0] != node else None
    if kind == "cleanup":
        if owner is not None and owner[0] == node:
            del model[client]
            return True
        return False
    if owner is None or owner[0] != node:
        return False
    if kind == "unregister":
        del model[client]
    else:
        model[client] = (node, meta)
    return True


def fitting_outcomes(before: Model, client: str, history: list[tuple[Op, object]]) -> list[Model]:
    """The states of ``client`` reachable by some order of ``history`` that explains
    every observed result; empty if no order does."""
    outcomes = []
    for order in itertools.permutations(history):
        state = {client: before[client]} if client in before else {}
        if all(apply(state, op) == result for op, result in order):
            outcomes.append(state)
    return outcomes


OpenStore = Callable[[AsyncExitStack], Awaitable[dict[int, meshline.RegistryBackend]]]


class Portal:
    """Runs coroutines on the Trio loop of the main thread, from the machine's thread."""

    def __init__(self, token: trio.lowlevel.TrioToken, nursery: trio.Nursery) -> None:
        self.token = token
        self.nursery = nursery

    def run(self, function: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return trio.from_thread.run(function, *args, trio_token=self.token)

    def hold(
        self, open_store: OpenStore
    ) -> tuple[dict[int, meshline.RegistryBackend], Callable[[], None]]:
        """Open a store in a task of its own (its context managers need one task);
        return it and a function that closes it."""
        release, finished = trio.Event(), trio.Event()

        async def holder(task_status: trio.TaskStatus[dict[int, meshline.RegistryBackend]]) -> None:
            try:
                async with AsyncExitStack() as stack:
                    task_status.started(await open_store(stack))
                    await release.wait()
            finally:
                finished.set()

        async def close() -> None:
            release.set()
            await finished.wait()

        backends = self.run(self.nursery.start, holder)
        return backends, lambda: self.run(close)


class OwnershipRaces(RuleBasedStateMachine):
    portal: Portal
    open_store: OpenStore

    def __init__(self) -> None:
        super().__init__()
        self.model: Model = {}
        self.alive = set(NODES)
        self.dead_unclean: set[int] = set()
        self.backends: dict[int, meshline.RegistryBackend] = {}
        self.close: Callable[[], None] | None = None
        self.tokens = itertools.count(1)

    @initialize()
    def open(self) -> None:
        self.backends, self.close = self.portal.hold(type(self).open_store)

    def teardown(self) -> None:
        if self.close is not None:
            self.close()

    def run(self, op: Op) -> object:
        kind, node, client, meta = op
        backend = self.backends[node]
        if kind == "register":
            return self.portal.run(backend.register, client, node, meta)
        if kind == "unregister":
            return self.portal.run(backend.unregister, client, node)
        return self.portal.run(backend.update_metadata, client, node, meta)

    @rule(op=ops)
    def single_operation(self, op: Op) -> None:
        if op[1] not in self.alive:
            return  # the dead do nothing
        expected = apply(self.model, op)
        assert self.run(op) == expected, op

    @rule(burst=st.lists(ops, min_size=2, max_size=4))
    def concurrent_burst(self, burst: list[Op]) -> None:
        burst = [op for op in burst if op[1] in self.alive]
        leader = min(self.alive)
        if self.dead_unclean:
            burst.append(("cleanup", min(self.dead_unclean), "", b""))
        results: list[object] = [None] * len(burst)

        async def race() -> None:
            async def one(index: int, op: Op) -> None:
                kind, node, client, meta = op
                if kind == "cleanup":
                    removed = await self.backends[leader].cleanup_node(node)
                    results[index] = {record.client_id for record in removed}
                    return
                backend = self.backends[node]
                if kind == "register":
                    results[index] = await backend.register(client, node, meta)
                elif kind == "unregister":
                    results[index] = await backend.unregister(client, node)
                else:
                    results[index] = await backend.update_metadata(client, node, meta)

            async with trio.open_nursery() as nursery:
                for index, op in enumerate(burst):
                    nursery.start_soon(one, index, op)

        self.portal.run(race)
        if any(op[0] == "cleanup" for op in burst):
            self.dead_unclean.discard(min(self.dead_unclean))
        candidates: dict[str, list[Model]] = {}
        for client in CLIENTS:
            history: list[tuple[Op, object]] = []
            for op, result in zip(burst, results, strict=True):
                if op[0] == "cleanup":
                    history.append(((*op[:2], client, b""), client in result))  # type: ignore[operator]
                elif op[2] == client:
                    history.append((op, result))
            outcomes = fitting_outcomes(self.model, client, history)
            assert outcomes, f"no order explains {history} from {self.model.get(client)}"
            candidates[client] = outcomes
        actual = self.settle(
            lambda state: all(
                ({client: state[client]} if client in state else {}) in candidates[client]
                for client in CLIENTS
            )
        )
        self.model = actual

    @rule(node=st.sampled_from(NODES), client=st.sampled_from(CLIENTS), meta=metadata)
    def reconnect_on_the_same_node(self, node: int, client: str, meta: bytes) -> None:
        """A client reconnects to the node it is on: the old connection's late
        unregister and update, made with its own token, must change nothing."""
        if node not in self.alive:
            return
        backend = self.backends[node]
        old, new = next(self.tokens), next(self.tokens)
        self.portal.run(partial(backend.register, client, node, b"old", token=old))
        self.portal.run(partial(backend.register, client, node, meta, token=new))
        assert self.portal.run(partial(backend.unregister, client, node, token=old)) is False
        late = partial(backend.update_metadata, client, node, b"late", token=old)
        assert self.portal.run(late) is False
        self.model[client] = (node, meta)
        self.settle(lambda state: state == self.model)
        # Back to a plain registration, which the other rules' operations assume.
        assert self.portal.run(partial(backend.unregister, client, node, token=new)) is True
        self.portal.run(backend.register, client, node, meta)

    @rule(node=st.sampled_from(NODES), client=st.sampled_from(CLIENTS), meta=metadata)
    def reassert(self, node: int, client: str, meta: bytes) -> None:
        """A node re-asserts a registration it believes it holds (token 0, as the
        plain registrations here have): written back if absent, refreshed if its
        own, left alone if another node holds it."""
        if node not in self.alive:
            return
        backend = self.backends[node]
        outcome = self.portal.run(
            partial(backend.reassert, client, node, meta, token=0, incarnation=2)
        )
        owner = self.model.get(client)
        if owner is None:
            assert outcome is meshline.ReassertOutcome.RESTORED
            self.model[client] = (node, meta)
        elif owner[0] == node:
            assert outcome is meshline.ReassertOutcome.KEPT
            self.model[client] = (node, meta)
        else:
            assert outcome is meshline.ReassertOutcome.GONE

    @precondition(lambda self: len(self.alive) > 1)
    @rule(node=st.sampled_from(NODES))
    def node_dies(self, node: int) -> None:
        if node in self.alive:
            self.alive.discard(node)
            self.dead_unclean.add(node)

    @precondition(lambda self: bool(self.dead_unclean))
    @rule()
    def leader_cleans_up(self) -> None:
        dead = min(self.dead_unclean)
        leader = min(self.alive)
        self.settle(lambda state: state == self.model)
        removed = self.portal.run(self.backends[leader].cleanup_node, dead)
        expected = {client for client, (owner, _) in self.model.items() if owner == dead}
        assert {record.client_id for record in removed} == expected
        for record in removed:
            assert record.metadata == self.model.pop(record.client_id)[1]
        self.dead_unclean.discard(dead)

    def settle(self, accept: Callable[[Model], bool]) -> Model:
        """Wait until every alive node's listing is one state that ``accept`` takes."""

        async def listings() -> list[Model]:
            states = []
            for node in sorted(self.alive):
                records = await self.backends[node].list_clients()
                states.append({r.client_id: (r.node_id, r.metadata) for r in records})
            return states

        async def wait() -> Model:
            with trio.fail_after(10):
                while True:
                    states = await listings()
                    if all(state == states[0] for state in states) and accept(states[0]):
                        return states[0]
                    await trio.sleep(0.002)

        result: Model = self.portal.run(wait)
        return result

    @invariant()
    def listings_settle_to_the_model(self) -> None:
        if self.backends:
            self.settle(lambda state: state == self.model)


def run_machine(open_store: OpenStore, examples: int) -> None:
    """Run the machine in a thread while this Trio loop serves its steps."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            portal = Portal(trio.lowlevel.current_trio_token(), nursery)
            attributes = {"portal": portal, "open_store": staticmethod(open_store)}
            machine = type("Races", (OwnershipRaces,), attributes)
            options = settings(max_examples=examples, stateful_step_count=20, deadline=None)
            await trio.to_thread.run_sync(
                lambda: run_state_machine_as_test(machine, settings=options)
            )
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.fixture
def examples() -> int:
    return int(settings().max_examples)


def test_races_on_the_memory_backend(examples: int) -> None:
    async def open_store(stack: AsyncExitStack) -> dict[int, meshline.RegistryBackend]:
        backend = meshline.MemoryRegistryBackend()
        return dict.fromkeys(NODES, backend)

    run_machine(open_store, examples)


def test_races_on_the_kv_backend_over_nats(nats_server: NatsServer, examples: int) -> None:
    keys = itertools.count()

    async def open_store(stack: AsyncExitStack) -> dict[int, meshline.RegistryBackend]:
        """Each example gets a fresh bucket; each node a connection of its own."""
        key = f"races-{next(keys)}"
        backends: dict[int, meshline.RegistryBackend] = {}
        for node in NODES:
            transport = await stack.enter_async_context(
                meshline.open_nats_transport(nats_server.url)
            )
            backends[node] = await stack.enter_async_context(
                meshline.open_kv_registry_backend(transport, key)
            )
        return backends

    run_machine(open_store, examples)


def test_races_on_the_sqlite_backend(tmp_path: Path, examples: int) -> None:
    databases = itertools.count()

    async def open_store(stack: AsyncExitStack) -> dict[int, meshline.RegistryBackend]:
        """A fresh database file per example; each node its own connection."""
        path = tmp_path / f"races-{next(databases)}.sqlite"
        backends = {node: meshline.SQLiteRegistryBackend(path) for node in NODES}
        for backend in backends.values():
            stack.callback(backend.close)
        return dict(backends)

    run_machine(open_store, examples)
