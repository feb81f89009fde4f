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


class PartitionableKV:
    """A node's view of the bucket whose writes can be cut off for a while, as a
    network partition (or a long pause) would: they wait until it heals."""

    def __init__(self, kv: meshline.KeyValue) -> None:
        self._kv = kv
        self._healed = trio.Event()
        self._healed.set()

    def partition(self, nursery: trio.Nursery, seconds: float) -> None:
        self._healed = trio.Event()
        healed = self._healed

        async def heal() -> None:
            await trio.sleep(seconds)
            healed.set()

        nursery.start_soon(heal)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._kv, name)
        if name not in ("put", "create", "update", "delete"):
            return attribute

        async def write(*args: Any, **kwargs: Any) -> Any:
            await self._healed.wait()
            return await attribute(*args, **kwargs)

        return write


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
        running: list[RunningNode] = []
        for kind, argument in steps:
            if kind == "start":
                node = await mesh.start(ttl=TTL, can_lead=argument)
                node.node._kv = PartitionableKV(node.node._kv)  # type: ignore[assignment]
                node.node.add_leader_duty(record_terms(node.id))
                seen_ids.append(node.id)
                running.append(node)
            elif kind in ("stop", "crash") and running:
                victim = running.pop(argument % len(running))
                await (victim.stop() if kind == "stop" else victim.crash())
            elif kind == "partition" and running:
                cut_off = running[argument % len(running)].node._kv
                cut_off.partition(healers, 0.5 + argument * 0.25)  # type: ignore[attr-defined]
            elif kind == "wait":
                await trio.sleep(argument)
            assert sum(node.node.is_leader for node in running) <= 1
        await trio.sleep(3.0 + 3 * TTL)  # quiet: partitions healed, lapses noticed
        alive = {node.id for node in running}
        for node in running:
            assert node.node.alive_nodes() == alive
        leaders = {node.node.leader_id for node in running}
        candidates = {node.id for node in running if node.node._can_lead}
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
