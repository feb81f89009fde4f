"""Helpers for node tests: nodes that run in background tasks and can be crashed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import attrs
import trio

import meshline

OpenTransport = Callable[[], AbstractAsyncContextManager[meshline.Transport]]


def skip_cleanup(
    node: meshline.Node, registry: meshline.NodeClientRegistry[Any] | None = None
) -> None:
    """Make leaving the node's block behave like a crash: a killed process neither
    withdraws from the mesh nor unregisters its clients."""

    async def withdraw_nothing() -> None:
        pass

    node._withdraw = withdraw_nothing  # type: ignore[method-assign]
    if registry is not None:
        registry._own.clear()


@attrs.define
class RunningNode:
    """A node living in a task of its own, which a test can stop or crash."""

    node: meshline.Node
    transport: meshline.Transport
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
        """Vanish like a killed process: stop answering, leave the KV state behind."""
        skip_cleanup(self.node, self.registry)
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
                    async with (
                        self._open_transport() as transport,
                        meshline.open_node(transport, self.key, **options) as node,
                    ):
                        running = RunningNode(node, transport, scope, done)
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
