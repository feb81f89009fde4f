"""Presence under faults, with nodes in processes of their own on a real nats-server.

Three client-service nodes (``fault_service_process.py``), 1,000 clients each, run
against a server of the test's own. ``fault_cluster.py`` polls their views from the
outside and collects their ``on_orphaned`` / ``on_restored`` calls. Each test
injects one fault (a server restart, a SIGSTOP, a SIGKILL), waits until every view
has been whole and trustworthy for ``ttl + 1`` s in a row (the leader's cleanup
may only start ``ttl`` after a reconnect, so a false report would come inside that
window), then checks what the nodes said. Nothing here asserts on timing:
``benchmarks/faults.py`` measures it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from meshline.testing import NatsServer

from .fault_cluster import (
    FaultCluster,
    kill_scenario,
    open_fault_cluster,
    restart_scenario,
    stall_scenario,
)

TTL = 2
CLIENTS = 1000


@pytest.fixture
async def cluster(
    private_nats_server: NatsServer, unique: Callable[[str], str], tmp_path: Path
) -> AsyncIterator[FaultCluster]:
    """Three node processes with 1,000 clients each, whole and with a leader."""
    async with open_fault_cluster(
        private_nats_server, unique("faults"), log_dir=tmp_path, clients=CLIENTS, ttl=TTL
    ) as opened:
        yield opened


def _explain(cluster: FaultCluster, result: object) -> str:
    return f"{result}\nhook reports: {len(cluster.reports)}\n{cluster.logs()}"


async def _check_restart(cluster: FaultCluster, downtime: float) -> None:
    result = await restart_scenario(cluster, downtime)
    why = _explain(cluster, result)
    assert result.crashed == 0, why
    assert result.false_orphans == 0, why
    assert result.lost == 0, why
    assert result.settled, why
    assert cluster.online_from_hooks() == set(cluster.held_clients()), why


async def test_half_second_server_restart_costs_no_client(cluster: FaultCluster) -> None:
    """After 0.5 s without a server: no false orphan report, no registration lost,
    every view shows all 3 nodes and all 3,000 clients."""
    await _check_restart(cluster, 0.5)


@pytest.mark.slow
async def test_five_second_server_restart_costs_no_client(cluster: FaultCluster) -> None:
    """The same after 5 s without a server: every liveness key has expired (ttl is
    2 s), so every node must re-assert before anyone cleans up."""
    await _check_restart(cluster, 5.0)


async def test_stalled_node_comes_back_whole(cluster: FaultCluster) -> None:
    """A node SIGSTOPped for 1.5 x ttl, then SIGCONTed: all its clients end up
    registered and visible in every view, and every client reported orphaned
    meanwhile was reported restored afterwards, so the online set kept from the
    hooks equals the registry."""
    result = await stall_scenario(cluster, 1.5 * TTL)
    why = _explain(cluster, result)
    assert result.crashed == 0, why
    assert result.lost == 0, why
    assert result.settled, why
    assert result.false_orphans == 0, why
    assert result.unrestored == 0, why
    assert result.hooks_mismatch == 0, why


async def test_sigkilled_node_is_reported_orphaned_exactly_once(cluster: FaultCluster) -> None:
    """A SIGKILLed node that did not lead: the leader reports each of its 1,000
    clients orphaned exactly once, and nobody else's."""
    result = await kill_scenario(cluster, victim_role="follower")
    why = _explain(cluster, result)
    assert result.crashed == 0, why
    assert result.reported_once == CLIENTS, why
    assert result.duplicates == 0, why
    assert result.reported_by_leader, why
    assert result.false_orphans == 0, why
    assert result.lost == 0, why
    assert result.settled, why


@pytest.mark.slow
async def test_sigkilled_leader_is_reported_orphaned_exactly_once(cluster: FaultCluster) -> None:
    """The leader SIGKILLed: the node that takes the lease over reports each of the
    dead leader's clients orphaned exactly once."""
    result = await kill_scenario(cluster, victim_role="leader")
    why = _explain(cluster, result)
    assert result.crashed == 0, why
    assert result.victim_was_leader, why
    assert result.reported_once == CLIENTS, why
    assert result.duplicates == 0, why
    assert result.reported_by_leader, why
    assert result.false_orphans == 0, why
    assert result.lost == 0, why
    assert result.settled, why
