"""Nodes in separate processes on a real nats-server: crashes, failover, restarts."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

import meshline
from meshline.testing import NatsServer

from .node_helpers import POLL, wait_until

DETECTION_TARGET = 3.0
"""Seconds within which the issue requires every node to see a crashed node dead."""

SCRIPT = Path(__file__).with_name("node_process.py")


@asynccontextmanager
async def node_process(url: str, key: str) -> AsyncIterator[tuple[trio.Process, int]]:
    """Start a node in a child process; yield the process and its node id."""
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, str(SCRIPT), url, key],
                stdout=subprocess.PIPE,
                check=False,
            )
        )
        assert process.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(1)
                assert chunk, "the node process exited before joining"
                line += chunk
        try:
            yield process, int(json.loads(line)["id"])
        finally:
            process.kill()
            nursery.cancel_scope.cancel()


async def test_sigkilled_node_is_seen_dead_and_the_lease_moves(
    nats_server: NatsServer, unique: Callable[[str], str]
) -> None:
    key = unique("sigkill")
    async with (
        meshline.open_nats_transport(nats_server.url) as transport,
        node_process(nats_server.url, key) as (first, first_id),
        node_process(nats_server.url, key) as (_, second_id),
        meshline.open_node(transport, key, can_lead=False) as observer,
    ):
        assert observer.leader_id == first_id
        with trio.fail_after(10):
            await wait_until(lambda: observer.alive_nodes() == {first_id, second_id, observer.id})
        assert await observer.request(first_id, "pid", None) == first.pid
        first.kill()
        killed_at = trio.current_time()
        with trio.fail_after(10):
            await wait_until(lambda: not observer.is_alive(first_id))
        seen_dead_after = trio.current_time() - killed_at
        with trio.fail_after(10):
            await wait_until(lambda: observer.leader_id == second_id)
        new_leader_after = trio.current_time() - killed_at
        assert seen_dead_after <= DETECTION_TARGET + POLL
        assert new_leader_after <= DETECTION_TARGET + POLL
        with pytest.raises(meshline.NodeNotAliveError):
            await observer.request(first_id, "pid", None)


async def test_cancellation_crosses_processes(
    nats_server: NatsServer, unique: Callable[[str], str]
) -> None:
    key = unique("xcancel")
    async with (
        meshline.open_nats_transport(nats_server.url) as transport,
        node_process(nats_server.url, key) as (_, worker_id),
        meshline.open_node(transport, key) as caller,
    ):
        cancelled_for: list[int] = []
        caller.register_broadcast_handler(
            "stall-cancelled", lambda data, sender: cancelled_for.append(data)
        )
        with trio.fail_after(10):
            await wait_until(lambda: caller.is_alive(worker_id))
        with trio.move_on_after(0.5):
            await caller.request(worker_id, "stall", None, timeout=60)
        with trio.fail_after(10):
            await wait_until(lambda: cancelled_for == [caller.id])


async def test_nodes_recover_after_the_server_restarts(
    private_nats_server: NatsServer, unique: Callable[[str], str]
) -> None:
    server = private_nats_server
    key = unique("restart")
    async with (
        meshline.open_nats_transport(server.url) as left_transport,
        meshline.open_nats_transport(server.url) as right_transport,
        meshline.open_node(left_transport, key) as left,
        meshline.open_node(right_transport, key) as right,
    ):
        right.register_handler("ping", lambda data, sender: _answer("pong"))
        with trio.fail_after(10):
            await wait_until(lambda: left.alive_nodes() == {left.id, right.id})
        server.kill()
        await trio.sleep(3)  # longer than the TTL: both liveness keys lapse
        await trio.to_thread.run_sync(server.start)
        with trio.fail_after(30):
            await wait_until(
                lambda: left.alive_nodes() == right.alive_nodes() == {left.id, right.id}
            )
            await wait_until(lambda: left.is_leader != right.is_leader)
            while True:
                try:
                    assert await left.request(right.id, "ping", None, timeout=1) == "pong"
                    break
                except (meshline.MeshError, meshline.TransportError):
                    await trio.sleep(0.1)
        kv = await left_transport.key_value(meshline._node.mesh_names(key)[0])
        assert {f"nodes.{left.id}", f"nodes.{right.id}"} <= set(await kv.keys())


async def _answer(value: str) -> str:
    return value
