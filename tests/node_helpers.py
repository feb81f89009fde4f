"""Helpers for node tests: nodes that run in background tasks and can be crashed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import attrs
import trio

import meshline
from meshline.testing import FaultyTransport

OpenTransport = Callable[[], AbstractAsyncContextManager[meshline.Transport]]


@attrs.define
class RunningNode:
    """A node living in a task of its own, which a test can stop, crash or fault.

    Its transport is wrapped in a :class:`meshline.testing.FaultyTransport`, so a
    test can stall it, cut it or fail its writes.
    """

    node: meshline.Node
    transport: meshline.Transport
    faults: FaultyTransport
    scope: trio.CancelScope
    done: trio.Event
    registry: meshline.NodeClientRegistry[Any] | None = None

    @property
    def id(self) -> int:
        return self.node.id

    async def stop(self) -> None:
        """Leave the mesh gracefully."""
        self.scope.cancel()
        await self.done.wait()

    async def crash(self) -> None:
        """Vanish like a killed process: the connection is cut first, so the exit's
        cleanup writes fail and the KV state is left behind."""
        self.faults.cut()
        await self.stop()


class Mesh:
    """Starts nodes of one mesh key, each in a task with a transport of its own."""

    def __init__(self, nursery: trio.Nursery, open_transport: OpenTransport, key: str) -> None:
        self._nursery = nursery
        self._open_transport = open_transport
        self.key = key

    async def start(self, *, registry: dict[str, Any] | None = None, **options: Any) -> RunningNode:
        """Start a node; with ``registry``, also a client registry with those options."""
        done = trio.Event()

        async def run(task_status: trio.TaskStatus[RunningNode]) -> None:
            try:
                with trio.CancelScope() as scope:
                    async with self._open_transport() as inner:
                        transport = FaultyTransport(inner)
                        async with meshline.open_node(transport, self.key, **options) as node:
                            running = RunningNode(node, transport, transport, scope, done)
                            if registry is None:
                                task_status.started(running)
                                await trio.sleep_forever()
                            async with meshline.open_client_registry(node, **registry) as opened:
                                running.registry = opened
                                task_status.started(running)
                                await trio.sleep_forever()
            finally:
                done.set()

        running: RunningNode = await self._nursery.start(run)
        return running


@asynccontextmanager
async def open_mesh(open_transport: OpenTransport, key: str) -> AsyncIterator[Mesh]:
    async with trio.open_nursery() as nursery:
        yield Mesh(nursery, open_transport, key)
        nursery.cancel_scope.cancel()


POLL = 0.01
"""How often :func:`wait_until` polls: the slack in time bounds measured through it."""


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` until it holds; the caller bounds the wait with a cancel scope."""
    while not predicate():
        await trio.sleep(POLL)
