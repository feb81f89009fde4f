"""Property: whatever nodes join, leave, crash or wait, the mesh stays consistent.

Nodes can also be cut off from the bucket for a while (a partition, or a long
pause): a leader cut off must stop leading before anyone else may take over.

Each example runs one random scenario on the memory transport under a mocked clock,
so time only moves when every task waits: the timing is exact and the runs fast.
Checked throughout: node ids are never reused, and leadership terms never overlap.
Checked once quiet: every running node sees exactly the running nodes, and all agree
on one leader who knows it leads.
"""

from __future__ import annotations

import itertools
from typing import Any

import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import meshline

from .node_helpers import RunningNode, open_mesh

TTL = 1

operations = st.lists(
    st.one_of(
        st.tuples(st.just("start"), st.booleans()),
        st.tuples(st.sampled_from(["stop", "crash", "partition"]), st.integers(0, 9)),
        st.tuples(st.just("wait"), st.sampled_from([0.1, 0.3, 0.6, 1.0, 2.5])),
    ),
    max_size=14,
)


PARTITIONED_WRITES = ("put", "create", "update", "delete")


class Partitions:
    """Cuts nodes off from the bucket for a while, as a network partition (or a long
    pause) would: their writes wait until it heals. A node cut off again before it
    healed stays cut off until the later partition heals."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._generations: dict[int, int] = {}

    def cut_off(self, node: RunningNode, seconds: float) -> None:
        generation = self._generations[node.id] = self._generations.get(node.id, 0) + 1
        node.faults.hang_kv_writes(operations=PARTITIONED_WRITES)

        async def heal() -> None:
            await trio.sleep(seconds)
            if self._generations[node.id] == generation:
                node.faults.heal_kv_writes()

        self._nursery.start_soon(heal)


async def scenario(steps: list[tuple[str, Any]]) -> None:
    hub = meshline.MemoryHub()
    terms: list[tuple[float, float, int]] = []
    seen_ids: list[int] = []

    def record_terms(node_id: int) -> Any:
        async def duty() -> None:
            began = trio.current_time()
            try:
                await trio.sleep_forever()
            finally:
                terms.append((began, trio.current_time(), node_id))

        return duty

    async with (
        open_mesh(lambda: meshline.open_memory_transport(hub), "props") as mesh,
        trio.open_nursery() as healers,
    ):
        partitions = Partitions(healers)
        running: list[RunningNode] = []
        can_lead: set[int] = set()
        for kind, argument in steps:
            if kind == "start":
                node = await mesh.start(ttl=TTL, can_lead=argument)
                if argument:
                    can_lead.add(node.id)
                node.node.add_leader_duty(record_terms(node.id))
                seen_ids.append(node.id)
                running.append(node)
            elif kind in ("stop", "crash") and running:
                victim = running.pop(argument % len(running))
                await (victim.stop() if kind == "stop" else victim.crash())
            elif kind == "partition" and running:
                partitions.cut_off(running[argument % len(running)], 0.5 + argument * 0.25)
            elif kind == "wait":
                await trio.sleep(argument)
            assert sum(node.node.is_leader for node in running) <= 1
        await trio.sleep(3.0 + 3 * TTL)  # quiet: partitions healed, lapses noticed
        alive = {node.id for node in running}
        for node in running:
            assert node.node.alive_nodes() == alive
        leaders = {node.node.leader_id for node in running}
        candidates = {node.id for node in running} & can_lead
        if candidates:
            assert len(leaders) == 1
            (leader,) = leaders
            assert leader in candidates
            assert [node.id for node in running if node.node.is_leader] == [leader]
        for node in running:
            await node.stop()
    assert seen_ids == sorted(set(seen_ids))
    terms.sort()
    for (_, end, _), (begin, _, _) in itertools.pairwise(terms):
        assert end <= begin, terms


@given(steps=operations)
def test_membership_and_leadership_stay_consistent(steps: list[tuple[str, Any]]) -> None:
    trio.run(scenario, steps, clock=trio.testing.MockClock(autojump_threshold=0))
