"""The simulation of ``benchmarks/scale.py --simulate``, in its own process.

Usage: ``python _scale_simulate.py NODES CLIENTS TTL``; prints one JSON object as its
last line.

``NODES`` nodes share one :class:`meshline.MemoryHub`, each with a memory transport,
a node (``open_node``, ``ttl=TTL``) and a client registry (``open_client_registry``:
the KV backend with a replica of its own, the leader's cleanup duty), and each
registers ``CLIENTS`` clients. Then one node that does not lead crashes: its
connection is cut (:class:`meshline.testing.FaultyTransport`), so nothing it leaves
behind is cleaned up on its way out, as with a killed process.

Time is Trio's ``MockClock(autojump_threshold=0)``: the clock stands still while any
task can run, and jumps to the next deadline when all wait. One process plays every
node on one core, so on the real clock the simulator's own CPU time (every write is
applied by every replica: 100 x 100,000 entries at startup) would delay heartbeats
and read as node deaths, and the figures would measure the simulator. On the mock
clock, the times are what the protocol takes (heartbeats, ttl, lease, cleanup
rounds) with free CPU; the wall-clock seconds each phase cost are printed next to
them. Conditions are polled every :data:`POLL` seconds of virtual time.

Phases (virtual seconds, and wall seconds spent):

* ``startup``: from the first node opening until every node is up, every client is
  registered and every node's view holds every node and every replica every client;
* ``detect``: from the crash until no survivor sees the crashed node alive;
* ``cleanup``: from the crash until the leader reported all the crashed node's
  clients to ``on_orphaned``;
* ``converge``: from the crash until every survivor's view holds exactly the
  survivors and its replica exactly the survivors' clients.

A phase not reached within :data:`PHASE_LIMIT` is reported as null.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

import attrs
import trio
import trio.testing

import meshline
from meshline.testing import FaultyTransport

POLL = 0.01
"""Seconds of virtual time between two checks of a condition."""
PHASE_LIMIT = 60.0
"""Seconds of virtual time a phase may take; one that takes longer is reported as
never reached (null in the output)."""
WRITERS_PER_NODE = 16
METADATA = {"user_id": "user-1", "role": "admin"}
KEY = "simulation"


@attrs.define
class Member:
    node: meshline.Node
    registry: meshline.NodeClientRegistry[Any]
    faults: FaultyTransport
    scope: trio.CancelScope
    done: trio.Event


class Clock:
    """Virtual and wall time since a mark."""

    def __init__(self) -> None:
        self.mark()

    def mark(self) -> None:
        self.virtual = trio.current_time()
        self.wall = time.perf_counter()

    def since(self) -> dict[str, float]:
        return {
            "virtual_s": trio.current_time() - self.virtual,
            "wall_s": time.perf_counter() - self.wall,
        }


class Counter(logging.Handler):
    """Counts log records of WARNING and above by message (numbers and quoted
    names blurred, so that one kind of message is counted once)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = re.sub(r"'[^']*'", "'…'", record.getMessage())
        message = re.sub(r"\d+", "N", message)[:200]
        self.counts[message] = self.counts.get(message, 0) + 1

    def take(self) -> dict[str, int]:
        """The counts so far; counting starts again from zero."""
        counts, self.counts = self.counts, {}
        return counts


async def wait_for(condition: Any) -> None:
    while not await condition():
        await trio.sleep(POLL)


async def simulate(nodes: int, clients: int, ttl: int) -> dict[str, Any]:
    counter = Counter()
    logging.getLogger().addHandler(counter)
    hub = meshline.MemoryHub()
    orphaned: dict[int, int] = {}
    members: list[Member] = []

    def on_orphaned(dead: int, batch: list[meshline.RegisteredClient[Any]]) -> None:
        orphaned[dead] = orphaned.get(dead, 0) + len(batch)

    async def run_member(number: int, task_status: trio.TaskStatus[Member]) -> None:
        done = trio.Event()
        try:
            with trio.CancelScope() as scope:
                async with meshline.open_memory_transport(hub) as inner:
                    faults = FaultyTransport(inner)
                    async with (
                        meshline.open_node(faults, KEY, ttl=ttl) as node,
                        meshline.open_client_registry(node, on_orphaned=on_orphaned) as registry,
                    ):
                        member = Member(node, registry, faults, scope, done)

                        async def register(start: int) -> None:
                            for index in range(start, clients, WRITERS_PER_NODE):
                                await registry.register(f"n{number}-c{index}", METADATA)

                        async with trio.open_nursery() as writers:
                            for start in range(WRITERS_PER_NODE):
                                writers.start_soon(register, start)
                        task_status.started(member)
                        await trio.sleep_forever()
        finally:
            done.set()

    async def agree(survivors: list[Member], dead: int | None) -> bool:
        """Every survivor sees exactly the survivors, and its replica holds exactly
        their clients (none of ``dead``'s)."""
        ids = frozenset(member.node.id for member in survivors)
        for member in survivors:
            if member.node.alive_nodes() != ids:
                return False
            backend = member.registry.backend
            if dead is not None and await backend.count_clients_for_node(dead):
                return False
            for node_id in ids:
                if await backend.count_clients_for_node(node_id) != clients:
                    return False
        return True

    clock = Clock()
    async with trio.open_nursery() as nursery:
        # Start every node at once, as a cluster that boots together would.
        async def start(number: int) -> None:
            members.append(await nursery.start(run_member, number))

        async with trio.open_nursery() as starting:
            for number in range(nodes):
                starting.start_soon(start, number)
        with trio.move_on_after(PHASE_LIMIT):
            await wait_for(lambda: agree(members, None))
        if not await agree(members, None):
            raise RuntimeError(f"the cluster did not settle within {PHASE_LIMIT} s (virtual)")
        startup = clock.since()
        startup_records = counter.take()

        victim = next(member for member in members if not member.node.is_leader)
        leader = next((member.node.id for member in members if member.node.is_leader), None)
        survivors = [member for member in members if member is not victim]
        clock.mark()
        victim.faults.cut()
        victim.scope.cancel()
        await victim.done.wait()
        dead = victim.node.id

        async def detected() -> bool:
            await trio.lowlevel.checkpoint()
            return not any(member.node.is_alive(dead) for member in survivors)

        async def cleaned() -> bool:
            await trio.lowlevel.checkpoint()
            return orphaned.get(dead, 0) >= clients

        marks: dict[str, dict[str, float] | None] = {}

        async def track(name: str, condition: Any) -> None:
            marks[name] = None
            with trio.move_on_after(PHASE_LIMIT):
                await wait_for(condition)
                marks[name] = clock.since()

        async with trio.open_nursery() as trackers:
            trackers.start_soon(track, "detect", detected)
            trackers.start_soon(track, "cleanup", cleaned)
            trackers.start_soon(track, "converge", lambda: agree(survivors, dead))
        false_orphans = sum(count for node_id, count in orphaned.items() if node_id != dead)
        crash_records = counter.take()
        reloads = sum(getattr(member.registry.backend, "watch_failures", 0) for member in members)
        # Leave as crashed nodes do: nothing to measure in a graceful exit of all.
        logging.disable(logging.CRITICAL)
        for member in survivors:
            member.faults.cut()
        nursery.cancel_scope.cancel()
    return {
        "nodes": nodes,
        "clients_per_node": clients,
        "ttl": ttl,
        "clock": "MockClock(autojump_threshold=0)",
        "leader": leader,
        "crashed": dead,
        "startup": startup,
        **marks,
        "orphaned": orphaned.get(dead, 0),
        "false_orphans": false_orphans,
        "replica_reloads": reloads,
        "log_records": {"startup": startup_records, "after the crash": crash_records},
    }


def main() -> None:
    nodes, clients, ttl = (int(value) for value in sys.argv[1:4])
    result = trio.run(
        simulate, nodes, clients, ttl, clock=trio.testing.MockClock(autojump_threshold=0)
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
