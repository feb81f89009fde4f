"""Presence under faults: a hypothesis state machine races nodes, connections and faults
against a model of what the registry and the application's hooks must end up saying.

The cluster has three node slots, each running a node and its client registry (KV
backend) over a transport wrapped in :class:`meshline.testing.FaultyTransport`, and
three clients with hostile ids. The actions:

- ``register`` a client that is not registered (or whose node crashed) on a node;
- ``move`` a client to another node, after which the old connection's late
  ``unregister`` (with its token) must change nothing;
- ``reconnect_on_the_same_node``: register again on the same node (a new token), then
  the old connection's late ``unregister`` and ``update_metadata`` must change nothing;
- ``unregister`` a client from its node (a stranger node's unregister first must fail);
- ``crash`` a node (its hooks go quiet, its connection is cut, its task cancelled, so its
  state stays behind like a killed process's), and ``start_a_replacement`` later;
- ``stall_past_ttl``: stall a node until every other node sees it dead, maybe move one
  of its clients elsewhere meanwhile, maybe wait for its clients to be orphaned, resume;
- ``restart_the_server`` for 0.5 s, or rarely 5 s (on memory: cut every node's
  connection for that long);
- ``settle``: check the invariants below mid-run (teardown checks them at the end too).

Steps run back to back, without waiting for the cluster in between, so a crash races
the next registration, a resumed node's re-assertion races the next unregister, and so
on. The invariants hold once the system settles, which the check waits for (polling,
with a deadline): every running node's view shows exactly the running nodes alive, and

- every client a running node holds is registered, with that registration's token, in
  every running node's view (``list_clients``) and replica, and ``holds()`` agrees;
- every registration whose node crashed and that did not reconnect elsewhere was
  reported orphaned exactly once more than it was reported restored (once, unless a
  stall made it flap before); a registration that is still live is balanced; only a
  registration whose node crashed or stalled past ``ttl`` is ever reported orphaned
  (a NATS restart, a move or a reconnect never costs a live client), and hooks name
  the right node (this part is checked after every step, not only when settled);
- the online set the application keeps from the hooks equals the registry.

The online set is kept the way an application that tells connections apart must keep
it, by registration token: add on ``register``, remove on a successful ``unregister``,
remove on ``on_orphaned`` if that registration is the one it has, add on
``on_restored`` if that registration is the latest it made. (Hooks run in a task of
their own, so a report about an older registration can arrive after a newer one.)

The machine runs in a worker thread; the Trio loop owning the nodes runs in the main
thread and steps reach it through ``trio.from_thread``. On memory the loop runs on
``MockClock``: virtual time moves (autojumping) only while a step runs, and stands
still while hypothesis picks the next one. Over NATS the server is this test's own,
restarted on the same port and store.

50 examples per machine; ``HYPOTHESIS_PROFILE=thorough`` runs 500.
"""

from __future__ import annotations

import collections
import itertools
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings
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
from meshline.testing import FaultyTransport, NatsServer, restart_server

TTL = 1
REASSERT_INTERVAL = 1.0
SLOTS = (0, 1, 2)
CLIENTS = ("a", "b.c *>", "ü\n" + "x" * 300)
"""Few clients, so operations collide; hostile ids, one past the reversible length."""
SHORT_RESTART, LONG_RESTART = 0.5, 5.0
POLL = 0.05

THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
EXAMPLES = 500 if THOROUGH else 50
SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=7,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

OpenTransport = Callable[[], AbstractAsyncContextManager[meshline.Transport]]
Restart = Callable[[float, list[FaultyTransport]], Awaitable[None]]


def short(client_id: str) -> str:
    return repr(client_id if len(client_id) <= 10 else client_id[:6] + "…")


# ---------------------------------------------------------------------- the Trio side


@attrs.define(eq=False)
class RunningNode:
    """A node and its registry, living in a task of their own."""

    slot: int
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    done: trio.Event = attrs.Factory(trio.Event)
    faults: FaultyTransport = attrs.field(init=False)
    node: meshline.Node = attrs.field(init=False)
    registry: meshline.NodeClientRegistry[Any] = attrs.field(init=False)
    crashed: bool = False
    """Set before the crash: from then on its hooks are not heard (a killed process's
    hooks never run)."""
    stalled_incarnation: int | None = None
    """Its incarnation when it was last stalled past ``ttl``."""
    error: BaseException | None = None
    """What ended its block, if anything but its own cancellation did."""

    @property
    def id(self) -> int:
        return self.node.id

    def recovering(self) -> bool:
        """Stalled past ``ttl`` and not re-asserted since: what it registers now still
        carries the incarnation the leader may be cleaning up after."""
        return (
            self.stalled_incarnation is not None
            and self.node.incarnation <= self.stalled_incarnation
        )


class App:
    """What the application hears from the hooks and keeps, per registration token."""

    def __init__(self) -> None:
        self.online: dict[str, int] = {}
        """client -> token of the registration the application believes is online."""
        self.latest: dict[str, int] = {}
        """client -> token of the latest registration it made and did not end."""
        self.orphaned: collections.Counter[int] = collections.Counter()
        self.restored: collections.Counter[int] = collections.Counter()
        self.reports: list[tuple[str, int, str, int]] = []
        """(hook, node id, client id, token) as heard."""

    def registered(self, registration: meshline.Registration) -> None:
        self.latest[registration.client_id] = registration.token
        self.online[registration.client_id] = registration.token

    def unregistered(self, client_id: str, token: int, removed: bool) -> None:
        if self.latest.get(client_id) == token:
            del self.latest[client_id]
        if removed and self.online.get(client_id) == token:
            del self.online[client_id]

    def hooks(self, running: RunningNode) -> dict[str, Any]:
        def on_orphaned(node_id: int, clients: list[meshline.RegisteredClient[Any]]) -> None:
            if running.crashed:
                return
            for client in clients:
                self.reports.append(("on_orphaned", node_id, client.client_id, client.token))
                self.orphaned[client.token] += 1
                if self.online.get(client.client_id) == client.token:
                    del self.online[client.client_id]

        def on_restored(node_id: int, clients: list[meshline.RegisteredClient[Any]]) -> None:
            if running.crashed:
                return
            for client in clients:
                self.reports.append(("on_restored", node_id, client.client_id, client.token))
                self.restored[client.token] += 1
                if self.latest.get(client.client_id) == client.token:
                    self.online[client.client_id] = client.token

        return {"on_orphaned": on_orphaned, "on_restored": on_restored}


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll until ``predicate`` holds; the caller bounds the wait."""
    while not predicate():
        await trio.sleep(POLL)


class Cluster:
    """Runs the machine's steps on the Trio loop of the main thread, and nodes in tasks
    of that loop."""

    def __init__(
        self,
        token: trio.lowlevel.TrioToken,
        nursery: trio.Nursery,
        open_transport: OpenTransport,
        restart: Restart,
        recover: Callable[[], Awaitable[None]],
        clock: trio.testing.MockClock | None,
        deadline: float,
    ) -> None:
        self.token = token
        self.nursery = nursery
        self.open_transport = open_transport
        self.restart = restart
        self.recover = recover
        self.clock = clock
        self.deadline = deadline
        """Seconds a wait for the cluster may take before the step fails."""

    def run(self, function: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return trio.from_thread.run(self._step, function, args, trio_token=self.token)

    async def _step(self, function: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> Any:
        if self.clock is not None:
            self.clock.autojump_threshold = 0
        try:
            return await function(*args)
        finally:
            if self.clock is not None:
                self.clock.autojump_threshold = math.inf

    async def start_node(self, slot: int, key: str, app: App) -> RunningNode:
        running = RunningNode(slot)

        async def run(task_status: trio.TaskStatus[RunningNode]) -> None:
            started = False
            try:
                with running.scope:
                    async with self.open_transport() as inner:
                        running.faults = FaultyTransport(inner)
                        async with meshline.open_node(running.faults, key, ttl=TTL) as node:
                            running.node = node
                            async with meshline.open_client_registry(
                                node, reassert_interval=REASSERT_INTERVAL, **app.hooks(running)
                            ) as registry:
                                running.registry = registry
                                started = True
                                task_status.started(running)
                                await trio.sleep_forever()
            except Exception as exc:
                if not started:
                    raise
                running.error = exc
            finally:
                running.done.set()

        result: RunningNode = await self.nursery.start(run)
        return result


# ---------------------------------------------------------------------- the model


@attrs.define(eq=False)
class Reg:
    """One registration, as the model knows it."""

    client_id: str
    slot: int
    node_id: int
    token: int
    status: str = "live"
    """``live``; ``crashed`` (its node crashed, and it is still the client's latest);
    ``ended`` (unregistered, or replaced by a newer registration)."""
    may_orphan: bool = False
    """Its node crashed or stalled past ``ttl`` while it was registered (or it was made
    while its node was recovering from a stall): an orphan report is no lie."""


class PresenceMachine(RuleBasedStateMachine):
    cluster: Cluster
    keys = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.app = App()
        self.slots: dict[int, RunningNode | None] = dict.fromkeys(SLOTS)
        self.nodes: list[RunningNode] = []
        self.regs: dict[int, Reg] = {}
        self.current: dict[str, Reg] = {}
        """client -> its latest registration, unless unregistered."""
        self.key = ""
        self.busy = False
        """True while a step runs; still True in teardown if the step failed."""

    # ------------------------------------------------------------------ helpers

    def run(self, function: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run ``function`` on the Trio loop. Every assertion lives in there, so a
        failure leaves :attr:`busy` set."""
        self.busy = True
        result = self.cluster.run(function, *args)
        self.busy = False
        return result

    def running(self) -> list[int]:
        return [slot for slot, node in self.slots.items() if node is not None]

    def empty(self) -> list[int]:
        return [slot for slot, node in self.slots.items() if node is None]

    def live(self, slot: int | None = None) -> list[Reg]:
        return [
            reg
            for reg in self.current.values()
            if reg.status == "live" and (slot is None or reg.slot == slot)
        ]

    def live_clients(self) -> list[str]:
        return sorted(reg.client_id for reg in self.live())

    def free_clients(self) -> list[str]:
        """Clients with no live registration: never registered, unregistered, or
        left behind by a crashed node."""
        live = set(self.live_clients())
        return [client for client in CLIENTS if client not in live]

    def node(self, slot: int) -> RunningNode:
        running = self.slots[slot]
        assert running is not None, f"slot {slot} runs no node"
        return running

    def record(self, registration: meshline.Registration, slot: int) -> None:
        """The model after a successful register (call on the Trio side)."""
        client_id = registration.client_id
        previous = self.current.get(client_id)
        if previous is not None:
            previous.status = "ended"
        running = self.node(slot)
        assert registration.node_id == running.id
        assert registration.token not in self.regs, "a registration token came back twice"
        reg = Reg(
            client_id,
            slot,
            running.id,
            registration.token,
            may_orphan=running.recovering(),
        )
        self.current[client_id] = reg
        self.regs[reg.token] = reg
        self.app.registered(registration)

    async def late_unregister(self, running: RunningNode, old: Reg, harm: str) -> None:
        """The late ``unregister`` of ``old``'s connection, on ``running``, after a
        newer registration replaced it: it must change nothing."""
        late = await running.registry.unregister(old.client_id, token=old.token)
        assert not late, f"a late unregister of {short(old.client_id)} {harm}"
        self.app.unregistered(old.client_id, old.token, late)

    async def start(self, slot: int) -> None:
        self.slots[slot] = await self.cluster.start_node(slot, self.key, self.app)
        self.nodes.append(self.node(slot))

    # ------------------------------------------------------------------ rules

    @initialize(placement=st.tuples(*[st.sampled_from([*SLOTS, None]) for _ in CLIENTS]))
    def start_nodes(self, placement: tuple[int | None, ...]) -> None:
        """Start a node in each slot, and register the clients where ``placement``
        says (None: not registered)."""
        self.key = f"presence-{next(self.keys)}"

        async def start_all() -> None:
            for slot in SLOTS:
                await self.start(slot)
            for client_id, slot in zip(CLIENTS, placement, strict=True):
                if slot is not None:
                    self.record(await self.node(slot).registry.register(client_id, {}), slot)

        self.run(start_all)

    @precondition(lambda self: bool(self.running() and self.free_clients()))
    @rule(data=st.data())
    def register(self, data: st.DataObject) -> None:
        client_id = data.draw(st.sampled_from(self.free_clients()), label="client")
        slot = data.draw(st.sampled_from(self.running()), label="slot")

        async def step() -> None:
            previous = self.current.get(client_id)
            registration = await self.node(slot).registry.register(client_id, {"slot": slot})
            # A crashed node's record may or may not have been cleaned up yet.
            allowed = {None} if previous is None else {None, previous.node_id}
            assert registration.superseded in allowed, (registration, previous)
            self.record(registration, slot)

        self.run(step)

    @precondition(lambda self: len(self.running()) >= 2 and bool(self.live()))
    @rule(data=st.data())
    def move(self, data: st.DataObject) -> None:
        client_id = data.draw(st.sampled_from(self.live_clients()), label="client")
        old = self.current[client_id]
        target = data.draw(
            st.sampled_from([slot for slot in self.running() if slot != old.slot]), label="to"
        )

        async def step() -> None:
            registration = await self.node(target).registry.register(client_id, {"moved": True})
            allowed = {old.node_id, None} if old.may_orphan else {old.node_id}
            assert registration.superseded in allowed, (registration, old)
            self.record(registration, target)
            await self.late_unregister(self.node(old.slot), old, "removed the moved client")

        self.run(step)

    @precondition(lambda self: bool(self.live()))
    @rule(data=st.data())
    def reconnect_on_the_same_node(self, data: st.DataObject) -> None:
        client_id = data.draw(st.sampled_from(self.live_clients()), label="client")

        async def step() -> None:
            old = self.current[client_id]
            registry = self.node(old.slot).registry
            registration = await registry.register(client_id, {"connection": "new"})
            assert registration.token != old.token
            assert registration.superseded is None, registration
            self.record(registration, old.slot)
            await self.late_unregister(self.node(old.slot), old, "removed the new one")
            stale = await registry.update_metadata(
                client_id, {"connection": "old"}, token=old.token
            )
            assert not stale, "the old connection's late update touched the new one"

        self.run(step)

    @precondition(lambda self: bool(self.live()))
    @rule(data=st.data())
    def unregister(self, data: st.DataObject) -> None:
        client_id = data.draw(st.sampled_from(self.live_clients()), label="client")

        async def step() -> None:
            reg = self.current[client_id]
            for slot in self.running():
                if slot != reg.slot:
                    stranger = self.node(slot).registry
                    assert not await stranger.unregister(client_id), "a stranger unregistered it"
            removed = await self.node(reg.slot).registry.unregister(client_id, token=reg.token)
            # Only a cleanup racing with it (after a stall) may have removed it first.
            assert removed or reg.may_orphan, f"unregister of {short(client_id)} found nothing"
            reg.status = "ended"
            del self.current[client_id]
            self.app.unregistered(client_id, reg.token, removed)

        self.run(step)

    @precondition(lambda self: len(self.running()) >= 2)
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(self.running()), label="slot")

        async def step() -> None:
            running = self.node(slot)
            running.crashed = True
            running.faults.cut()
            running.scope.cancel()
            with trio.fail_after(self.cluster.deadline):
                await running.done.wait()
            self.slots[slot] = None
            for reg in self.live(slot):
                reg.status = "crashed"
                reg.may_orphan = True

        self.run(step)

    @precondition(lambda self: bool(self.empty()))
    @rule(data=st.data())
    def start_a_replacement(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(self.empty()), label="slot")
        self.run(self.start, slot)

    @precondition(lambda self: len(self.running()) >= 2)
    @rule(data=st.data(), wait_for_orphans=st.booleans())
    def stall_past_ttl(self, data: st.DataObject, wait_for_orphans: bool) -> None:
        slot = data.draw(st.sampled_from(self.running()), label="slot")
        held = sorted(reg.client_id for reg in self.live(slot))
        others = [other for other in self.running() if other != slot]
        move = None
        if held:
            move = data.draw(
                st.none() | st.tuples(st.sampled_from(held), st.sampled_from(others)),
                label="move meanwhile (client, to)",
            )

        async def step() -> None:
            stalled = self.node(slot)
            stalled.stalled_incarnation = stalled.node.incarnation
            for reg in self.live(slot):
                reg.may_orphan = True
            stalled.faults.stall()
            with trio.fail_after(self.cluster.deadline):
                await wait_until(
                    lambda: not any(self.node(o).node.is_alive(stalled.id) for o in others)
                )
            old = None
            if move is not None:
                client_id, target = move
                old = self.current[client_id]
                registration = await self.node(target).registry.register(client_id, {})
                assert registration.superseded in {stalled.id, None}, registration
                self.record(registration, target)
            if wait_for_orphans:
                tokens = [reg.token for reg in self.live(slot)]
                with trio.fail_after(self.cluster.deadline):
                    await wait_until(
                        lambda: all(
                            self.app.orphaned[token] > self.app.restored[token] for token in tokens
                        )
                    )
            stalled.faults.resume()
            if old is not None:
                await self.late_unregister(stalled, old, "removed the moved client")

        self.run(step)

    @rule(downtime=st.integers(0, 9).map(lambda n: LONG_RESTART if n == 9 else SHORT_RESTART))
    def restart_the_server(self, downtime: float) -> None:
        async def step() -> None:
            transports = [self.node(slot).faults for slot in self.running()]
            with trio.fail_after(downtime + self.cluster.deadline):
                await self.cluster.restart(downtime, transports)

        self.run(step)

    @rule()
    def settle(self) -> None:
        self.run(self.wait_until_settled)

    @invariant()
    def nothing_false_was_said(self) -> None:
        async def check() -> None:
            problems = self.lasting_problems()
            assert not problems, "\n".join(problems)

        self.run(check)

    def teardown(self) -> None:
        try:
            if not self.busy and self.nodes:
                self.run(self.wait_until_settled)
        finally:
            self.cluster.run(self.stop_all)

    async def stop_all(self) -> None:
        await self.cluster.recover()
        for running in self.nodes:
            if not running.done.is_set():
                running.faults.resume()
                running.faults.restore()
                running.scope.cancel()
        with trio.fail_after(30):
            for running in self.nodes:
                await running.done.wait()

    # ------------------------------------------------------------------ invariants

    def lasting_problems(self) -> list[str]:
        """What no amount of settling can undo: a node ended by an error, a false
        orphan report, a hook naming the wrong node or an unknown registration."""
        problems = [
            f"node {running.id} (slot {running.slot}) ended with {running.error!r}"
            for running in self.nodes
            if running.error is not None
        ]
        for hook, node_id, client_id, token in self.app.reports:
            reg = self.regs.get(token)
            if reg is None:
                problems.append(f"{hook}({node_id}) of {short(client_id)}: unknown token")
            elif (reg.client_id, reg.node_id) != (client_id, node_id):
                problems.append(f"{hook}({node_id}) of {short(client_id)}: it is {reg}")
        for token, count in self.app.orphaned.items():
            reg = self.regs.get(token)
            if reg is not None and not reg.may_orphan:
                problems.append(
                    f"false orphan report ({count}x) of {short(reg.client_id)} on node "
                    f"{reg.node_id}: that node never crashed or stalled while it held it"
                )
        return problems

    async def settled_problems(self) -> list[str]:
        """What is still wrong; empty once the cluster settled to the model."""
        problems = self.lasting_problems()
        running = {slot: self.node(slot) for slot in self.running()}
        ids = {node.id for node in running.values()}
        for node in running.values():
            alive = node.node.alive_nodes()
            if alive != ids:
                problems.append(
                    f"node {node.id} sees {sorted(alive)} alive; running: {sorted(ids)}"
                )
        if problems:
            return problems
        expected = {reg.client_id: (reg.node_id, reg.token) for reg in self.live()}

        def show(state: dict[str, tuple[int, int]]) -> str:
            return str({short(client): owner for client, owner in sorted(state.items())})

        for slot, node in running.items():
            listed = {
                client.client_id: (client.node_id, client.token)
                for client in await node.registry.list_clients()
            }
            if listed != expected:
                problems.append(f"node {node.id} lists {show(listed)}; expected {show(expected)}")
            stored = {
                record.client_id: (record.node_id, record.token)
                for record in await node.registry.backend.list_clients()
            }
            if stored != expected:
                problems.append(f"node {node.id} stores {show(stored)}; expected {show(expected)}")
            held = {client for client in CLIENTS if node.registry.holds(client)}
            mine = {reg.client_id for reg in self.live(slot)}
            if held != mine:
                problems.append(
                    f"node {node.id} holds {sorted(map(short, held))}; "
                    f"it registered {sorted(map(short, mine))}"
                )
        online = {client: token for client, (_, token) in expected.items()}
        if self.app.online != online:
            problems.append(
                f"the hooks' online set is {sorted(map(short, self.app.online))}; "
                f"registered: {sorted(map(short, online))}"
            )
        for token, reg in self.regs.items():
            orphaned, restored = self.app.orphaned[token], self.app.restored[token]
            owed = {"live": {0}, "crashed": {1}, "ended": {0, 1}}[reg.status]
            if orphaned - restored not in owed or restored > orphaned:
                problems.append(
                    f"{reg.status} registration of {short(reg.client_id)} on node "
                    f"{reg.node_id}: reported orphaned {orphaned}x, restored {restored}x"
                )
        return problems

    async def wait_until_settled(self) -> None:
        problems: list[str] = []
        with trio.move_on_after(self.cluster.deadline):
            while True:
                problems = await self.settled_problems()
                if not problems:
                    return
                await trio.sleep(POLL)
        raise AssertionError(
            f"not settled after {self.cluster.deadline} s:\n" + "\n".join(problems)
        )


# ---------------------------------------------------------------------- running it


def run_machine(
    open_transport: OpenTransport,
    restart: Restart,
    recover: Callable[[], Awaitable[None]],
    *,
    clock: trio.testing.MockClock | None,
    deadline: float,
) -> None:
    """Run the machine in a thread while this Trio loop serves its steps."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            cluster = Cluster(
                trio.lowlevel.current_trio_token(),
                nursery,
                open_transport,
                restart,
                recover,
                clock,
                deadline,
            )
            machine = type("Presence", (PresenceMachine,), {"cluster": cluster})
            await trio.to_thread.run_sync(
                lambda: run_state_machine_as_test(machine, settings=SETTINGS)
            )
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)


async def nothing_to_recover() -> None:
    await trio.lowlevel.checkpoint()


def test_presence_under_faults_on_memory() -> None:
    hub = meshline.MemoryHub()

    async def cut_everyone(downtime: float, transports: list[FaultyTransport]) -> None:
        for transport in transports:
            transport.cut()
        await trio.sleep(downtime)
        for transport in transports:
            transport.restore()

    run_machine(
        lambda: meshline.open_memory_transport(hub),
        cut_everyone,
        nothing_to_recover,
        clock=trio.testing.MockClock(autojump_threshold=math.inf),
        deadline=60.0,
    )


@pytest.mark.slow
@pytest.mark.timeout(60 + 20 * EXAMPLES)
def test_presence_under_faults_over_nats(private_nats_server: NatsServer) -> None:
    server = private_nats_server

    @asynccontextmanager
    async def open_transport() -> AsyncIterator[meshline.Transport]:
        async with meshline.open_nats_transport(server.url) as transport:
            yield transport

    async def restart(downtime: float, transports: list[FaultyTransport]) -> None:
        await restart_server(server, downtime)
        await wait_until(lambda: all(transport.connected for transport in transports))

    async def recover() -> None:
        if not server.running:
            await trio.to_thread.run_sync(server.start)

    run_machine(open_transport, restart, recover, clock=None, deadline=20.0)
