"""Cluster sockets under races and faults: a hypothesis state machine drives socket
servers on a mesh, clients, rooms and faults against a model of who is connected.

Three node slots, each a socket server joined to the mesh over a transport wrapped
in :class:`meshline.testing.FaultyTransport`; four client ids of two users (hostile
names). The actions:

- ``connect`` a client that is not connected, to a running node;
- ``disconnect`` a connected client;
- ``reconnect_elsewhere``: the client connects to another node (the old connection is
  superseded), then its old connection goes;
- ``join`` and ``leave`` a room (server side, on the client's node);
- ``crash`` a node (its hooks go quiet, its connection is cut, its task cancelled) and
  ``start_a_node`` in an empty slot later;
- ``stall``: stall a node until the others see it dead, then resume it (its clients
  come back once it re-asserted itself).

Steps run back to back, without waiting for the cluster. Once settled (the check
polls, with a deadline), on every running node: ``cluster.count()``,
``cluster.by_user()`` and ``cluster.room()`` equal the model, and the online set the
application keeps from ``on_user_online``/``on_user_offline`` (heard from any node
that is not crashed) equals the model's users with a connection. Every client
watches every room (``client.watch``) from the moment it connects, and what it
watches equals the model's room too.

The machine runs in a worker thread; the Trio loop (on ``MockClock`` for memory)
serves its steps, as in ``test_presence_machine.py``. 50 examples on memory;
``HYPOTHESIS_PROFILE=thorough`` runs 500. Over NATS (marked slow): 5, or 50.
"""

from __future__ import annotations

import collections
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, ClassVar

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

import meshline
from meshline.testing import FaultyTransport, NatsServer, open_memory_client

TTL = 1
POLL = 0.05
SLOTS = 3
USERS = ("ada.*>", "b ob\n★")
CLIENTS = {"c.1": USERS[0], "c 2": USERS[0], "c*3": USERS[1], "c>4": USERS[1]}
ROOMS = ("lobby ★", "r.>")
THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
ACTIONS = (
    "connect",
    "disconnect",
    "reconnect_elsewhere",
    "join_or_leave",
    "crash",
    "start_a_node",
    "stall",
)

OpenTransport = Callable[[], AbstractAsyncContextManager[meshline.Transport]]
ROLE = meshline.Role("member")


def by_query(request: meshline.SocketRequest) -> meshline.Admission:
    return meshline.Admission("member", user_id=request.query.get("user"))


async def wait_until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await trio.sleep(POLL)


@attrs.define(eq=False)
class RunningNode:
    slot: int
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    done: trio.Event = attrs.Factory(trio.Event)
    faults: FaultyTransport = attrs.field(init=False)
    server: meshline.SocketServer = attrs.field(init=False)
    crashed: bool = False


@attrs.define(eq=False)
class Held:
    """A client connection the machine holds open, in a task of its own."""

    client_id: str
    slot: int
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    done: trio.Event = attrs.Factory(trio.Event)
    client: meshline.SocketClient | None = None
    rooms: set[str] = attrs.Factory(set)
    presences: dict[str, meshline.RoomPresence] = attrs.Factory(dict)
    """The presence of every room, as the client watches it."""


class App:
    """The online set an application keeps from the user hooks."""

    def __init__(self) -> None:
        self.online: set[str] = set()

    def hooks(self, running: RunningNode) -> dict[str, Any]:
        def online(user_id: str) -> None:
            if not running.crashed:
                self.online.add(user_id)

        def offline(user_id: str) -> None:
            if not running.crashed:
                self.online.discard(user_id)

        return {"on_user_online": online, "on_user_offline": offline}


class Cluster:
    def __init__(
        self,
        token: trio.lowlevel.TrioToken,
        nursery: trio.Nursery,
        open_transport: OpenTransport,
        clock: trio.testing.MockClock | None,
        deadline: float,
    ) -> None:
        self.token = token
        self.nursery = nursery
        self.open_transport = open_transport
        self.clock = clock
        self.deadline = deadline

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
            try:
                with running.scope:
                    async with self.open_transport() as inner:
                        running.faults = FaultyTransport(inner)
                        async with meshline.open_socket_server(
                            roles=[ROLE],
                            authenticate=by_query,
                            listen=False,
                            mesh=meshline.MeshOptions(running.faults, key, node={"ttl": TTL}),
                            heartbeat=None,
                            authorize_presence=lambda conn, room: True,
                            **app.hooks(running),
                        ) as server:
                            running.server = server
                            task_status.started(running)
                            await trio.sleep_forever()
            finally:
                running.done.set()

        result: RunningNode = await self.nursery.start(run)
        return result

    async def hold(self, held: Held, server: meshline.SocketServer) -> None:
        async def run(task_status: trio.TaskStatus[None]) -> None:
            try:
                with held.scope:
                    async with open_memory_client(
                        server,
                        client_id=held.client_id,
                        query={"user": CLIENTS[held.client_id]},
                        reconnect=None,
                    ) as client:
                        held.client = client
                        for room in ROOMS:
                            held.presences[room] = await client.watch(room)
                        task_status.started()
                        await trio.sleep_forever()
            finally:
                held.done.set()

        await self.nursery.start(run)


class ClusterMachine(RuleBasedStateMachine):
    cluster: Cluster
    keys = iter(range(10**9))
    steps: ClassVar[collections.Counter[str]] = collections.Counter()
    """How often each action ran, over every example (checked at the end)."""

    def __init__(self) -> None:
        super().__init__()
        self.key = f"machine-{next(self.keys)}"
        self.app = App()
        self.nodes: dict[int, RunningNode] = {}
        self.held: dict[str, Held] = {}
        self.retired: list[Held] = []
        self.stopped: list[RunningNode] = []

    def run(self, function: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return self.cluster.run(function, *args)

    @initialize(count=st.integers(1, SLOTS))
    def start_nodes(self, count: int) -> None:
        async def start() -> None:
            for slot in range(count):
                self.nodes[slot] = await self.cluster.start_node(slot, self.key, self.app)

        self.run(start)

    # --- actions ---------------------------------------------------------------------

    def free_clients(self) -> list[str]:
        return sorted(set(CLIENTS) - set(self.held))

    def connected(self) -> list[str]:
        return sorted(self.held)

    @precondition(lambda self: self.nodes and len(self.held) < len(CLIENTS))
    @rule(data=st.data())
    def connect(self, data: st.DataObject) -> None:
        self.steps["connect"] += 1
        client_id = data.draw(st.sampled_from(self.free_clients()))
        slot = data.draw(st.sampled_from(sorted(self.nodes)))
        held = self.held[client_id] = Held(client_id, slot)
        self.run(self.cluster.hold, held, self.nodes[slot].server)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        self.steps["disconnect"] += 1
        held = self.held.pop(data.draw(st.sampled_from(self.connected())))
        self.retire(held)

    @precondition(lambda self: self.held and len(self.nodes) > 1)
    @rule(data=st.data())
    def reconnect_elsewhere(self, data: st.DataObject) -> None:
        self.steps["reconnect_elsewhere"] += 1
        old = self.held[data.draw(st.sampled_from(self.connected()))]
        slot = data.draw(st.sampled_from(sorted(set(self.nodes) - {old.slot})))
        new = self.held[old.client_id] = Held(old.client_id, slot)
        self.run(self.cluster.hold, new, self.nodes[slot].server)
        self.retire(old)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), room=st.sampled_from(ROOMS), join=st.booleans())
    def join_or_leave(self, data: st.DataObject, room: str, join: bool) -> None:
        self.steps["join_or_leave"] += 1
        held = self.held[data.draw(st.sampled_from(self.connected()))]
        assert held.client is not None
        server = self.nodes[held.slot].server
        conn_id = held.client.connection_id or ""

        async def step() -> None:
            await trio.lowlevel.checkpoint()
            conn = server.connection(conn_id)
            assert conn is not None, "the model's connection is open"
            if join:
                conn.join(room)
                held.rooms.add(room)
            else:
                conn.leave(room)
                held.rooms.discard(room)

        self.run(step)

    @precondition(lambda self: self.nodes)
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        self.steps["crash"] += 1
        slot = data.draw(st.sampled_from(sorted(self.nodes)))
        running = self.nodes.pop(slot)
        self.stopped.append(running)
        lost = [held for held in self.held.values() if held.slot == slot]
        for held in lost:
            del self.held[held.client_id]
            self.retired.append(held)

        async def step() -> None:
            await trio.lowlevel.checkpoint()
            running.crashed = True
            running.faults.cut()
            for held in lost:
                held.scope.cancel()
            running.scope.cancel()
            with trio.fail_after(30):
                await running.done.wait()

        self.run(step)

    @precondition(lambda self: len(self.nodes) < SLOTS)
    @rule(data=st.data())
    def start_a_node(self, data: st.DataObject) -> None:
        self.steps["start_a_node"] += 1
        slot = data.draw(st.sampled_from(sorted(set(range(SLOTS)) - set(self.nodes))))

        async def start() -> None:
            self.nodes[slot] = await self.cluster.start_node(slot, self.key, self.app)

        self.run(start)

    @precondition(lambda self: len(self.nodes) > 1)
    @rule(data=st.data())
    def stall(self, data: st.DataObject) -> None:
        self.steps["stall"] += 1
        slot = data.draw(st.sampled_from(sorted(self.nodes)))
        running = self.nodes[slot]
        others = [node for other, node in self.nodes.items() if other != slot]

        async def stall_past_ttl() -> None:
            running.faults.stall()
            with trio.fail_after(self.cluster.deadline):
                await wait_until(
                    lambda: all(
                        running.server.node_id not in node.server.cluster.nodes() for node in others
                    )
                )
            running.faults.resume()

        self.run(stall_past_ttl)

    def retire(self, held: Held) -> None:
        async def step() -> None:
            await trio.lowlevel.checkpoint()
            held.scope.cancel()

        self.retired.append(held)
        self.run(step)

    # --- checks --------------------------------------------------------------------------

    def problems(self) -> list[str]:
        problems = []
        users: dict[str, set[str]] = {}
        rooms: dict[str, set[str]] = {}
        for held in self.held.values():
            assert held.client is not None
            conn_id = held.client.connection_id or ""
            users.setdefault(CLIENTS[held.client_id], set()).add(conn_id)
            for room in held.rooms:
                rooms.setdefault(room, set()).add(conn_id)
        for slot, running in sorted(self.nodes.items()):
            cluster = running.server.cluster
            if cluster.count() != len(self.held):
                problems.append(f"node {slot}: count {cluster.count()} != {len(self.held)}")
            for user in USERS:
                seen = {conn.connection_id for conn in cluster.by_user(user)}
                if seen != users.get(user, set()):
                    problems.append(f"node {slot}: by_user({user!r}) {seen} != model")
            for room in ROOMS:
                seen = {conn.connection_id for conn in cluster.room(room)}
                if seen != rooms.get(room, set()):
                    problems.append(f"node {slot}: room({room!r}) {seen} != model")
        for held in self.held.values():
            for room, presence in held.presences.items():
                watched = set(presence.members)
                if not presence.synced or watched != rooms.get(room, set()):
                    problems.append(f"{held.client_id!r} watches {room!r}: {watched} != model")
        if self.nodes and self.app.online != set(users):
            problems.append(f"hooks say online {self.app.online} != {set(users)}")
        return problems

    async def settled(self) -> None:
        problems: list[str] = []
        with trio.move_on_after(self.cluster.deadline):
            while True:
                problems = self.problems()
                if not problems:
                    return
                await trio.sleep(POLL)
        raise AssertionError(f"not settled in {self.cluster.deadline} s:\n" + "\n".join(problems))

    @rule()
    def settle(self) -> None:
        self.run(self.settled)

    def teardown(self) -> None:
        try:
            self.run(self.settled)
        finally:
            self.run(self.stop_all)

    async def stop_all(self) -> None:
        for held in [*self.held.values(), *self.retired]:
            held.scope.cancel()
        for running in [*self.nodes.values(), *self.stopped]:
            running.faults.resume()
            running.faults.restore()
            running.scope.cancel()
        with trio.fail_after(30):
            for held in [*self.held.values(), *self.retired]:
                await held.done.wait()
            for running in [*self.nodes.values(), *self.stopped]:
                await running.done.wait()


def run_machine(
    open_transport: OpenTransport,
    *,
    clock: trio.testing.MockClock | None,
    deadline: float,
    examples: int,
) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            cluster = Cluster(
                trio.lowlevel.current_trio_token(), nursery, open_transport, clock, deadline
            )
            machine = type("Sockets", (ClusterMachine,), {"cluster": cluster})
            await trio.to_thread.run_sync(
                lambda: run_state_machine_as_test(
                    machine,
                    settings=settings(
                        max_examples=examples,
                        stateful_step_count=25,
                        deadline=None,
                        suppress_health_check=[HealthCheck.too_slow],
                    ),
                )
            )
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)


def test_cluster_sockets_on_memory() -> None:
    hub = meshline.MemoryHub()
    run_machine(
        lambda: meshline.open_memory_transport(hub),
        clock=trio.testing.MockClock(autojump_threshold=math.inf),
        deadline=60.0,
        examples=500 if THOROUGH else 50,
    )
    steps = ClusterMachine.steps
    assert min(steps[action] for action in ACTIONS) > 0, f"some actions never ran: {steps}"


@pytest.mark.slow
def test_cluster_sockets_over_nats(nats_server: NatsServer) -> None:
    @asynccontextmanager
    async def open_transport() -> AsyncIterator[meshline.Transport]:
        async with meshline.open_nats_transport(nats_server.url) as transport:
            yield transport

    run_machine(open_transport, clock=None, deadline=20.0, examples=50 if THOROUGH else 5)
