"""A client registry wired to a mesh node: dead-node cleanup, re-assertion, live views.

:func:`open_client_registry` adds what a registry needs to stay true in a cluster
where nodes crash and writes can be lost:

- The leader removes the registrations of dead nodes, and hands the orphaned clients
  to a hook.
- Every node re-asserts its own registrations now and then, and at once after its
  own liveness lapsed (when the leader may have cleaned up after it).
- Queries leave out the clients of nodes that are not alive, even before the
  cleanup has run.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Generic

import trio

from ._errors import InvalidArgumentError, TransportError
from ._membership import MembershipEvent, MembershipEventKind
from ._node import Node
from ._registry import ClientRegistry, MetadataT, RegisteredClient, RegistryBackend
from ._registry_kv import open_kv_registry_backend
from ._transport import check_timeout
from ._util import single_exceptions

__all__ = ["NodeClientRegistry", "OrphanHandler", "open_client_registry"]

logger = logging.getLogger("meshline.registry")

OrphanHandler = Callable[[int, list[RegisteredClient[Any]]], Awaitable[None] | None]
"""Called on the leader as ``handler(dead_node_id, orphaned_clients)``."""


class NodeClientRegistry(ClientRegistry[MetadataT], Generic[MetadataT]):
    """A :class:`ClientRegistry` bound to a live :class:`Node`.

    Reads leave out clients whose node is not alive in the node's membership view.
    Writes also keep a local list of this node's own registrations, which the
    re-assertion task writes again if they went missing.
    """

    def __init__(self, node: Node, backend: RegistryBackend, *, metadata_type: Any) -> None:
        super().__init__(node.id, backend, metadata_type=metadata_type)
        self.node = node
        self._own: dict[str, bytes] = {}

    async def _register_encoded(self, client_id: str, encoded: bytes) -> int | None:
        superseded = await super()._register_encoded(client_id, encoded)
        self._own[client_id] = encoded
        return superseded

    async def unregister(self, client_id: str) -> bool:
        self._own.pop(client_id, None)
        return await super().unregister(client_id)

    async def _update_encoded(self, client_id: str, encoded: bytes) -> bool:
        updated = await super()._update_encoded(client_id, encoded)
        if updated:
            self._own[client_id] = encoded
        else:
            self._own.pop(client_id, None)
        return updated

    async def get_client(self, client_id: str) -> RegisteredClient[MetadataT] | None:
        client = await super().get_client(client_id)
        if client is None or not self.node.is_alive(client.node_id):
            return None
        return client

    async def list_clients(self) -> list[RegisteredClient[MetadataT]]:
        alive = self.node.alive_nodes()
        return [client for client in await super().list_clients() if client.node_id in alive]

    async def list_clients_for_node(
        self, node_id: int | None = None
    ) -> list[RegisteredClient[MetadataT]]:
        node = self.node.id if node_id is None else node_id
        if not self.node.is_alive(node):
            return []
        return await super().list_clients_for_node(node)

    async def count_clients_for_node(self, node_id: int | None = None) -> int:
        node = self.node.id if node_id is None else node_id
        if not self.node.is_alive(node):
            return 0
        return await super().count_clients_for_node(node)

    async def count_clients(self) -> int:
        """How many clients are registered on the alive nodes."""
        total = 0
        for node_id in self.node.alive_nodes():
            total += await self.backend.count_clients_for_node(node_id)
        return total

    async def reassert(self) -> int:
        """Write again each own registration that went missing; return how many.

        A registration that now belongs to another node is dropped from this node's
        list instead: the client moved, and this node must not take it back.
        """
        restored = 0
        for client_id, metadata in list(self._own.items()):
            record = await self.backend.get_client(client_id)
            if record is None:
                if await self.backend.restore(client_id, self.node_id, metadata):
                    restored += 1
                    continue
                record = await self.backend.get_client(client_id)
            if record is not None and record.node_id != self.node_id:
                self._own.pop(client_id, None)
        return restored


@asynccontextmanager
async def open_client_registry(
    node: Node,
    *,
    backend: RegistryBackend | None = None,
    metadata_type: Any = dict,
    on_orphaned: OrphanHandler | None = None,
    reassert_interval: float = 10.0,
) -> AsyncIterator[NodeClientRegistry[Any]]:
    """A client registry for ``node``, with cleanup and re-assertion, for the block.

    :param backend: where registrations live; by default the KV backend on the node's
        transport, in a bucket of the node's mesh.
    :param metadata_type: what metadata decodes into (see :class:`ClientRegistry`).
    :param on_orphaned: called on the leader with ``(dead_node_id, clients)`` after
        it removed the registrations a dead node still owned.
    :param reassert_interval: seconds between re-assertions of this node's own
        registrations.

    On exit, this node's own registrations are removed (ownership-safe), shielded.
    """
    check_timeout(reassert_interval)
    if backend is None:
        async with open_kv_registry_backend(
            node._transport, node.key, _namespace=node._namespace
        ) as kv_backend:
            async with open_client_registry(
                node,
                backend=kv_backend,
                metadata_type=metadata_type,
                on_orphaned=on_orphaned,
                reassert_interval=reassert_interval,
            ) as kv_registry:
                yield kv_registry
        return
    if not isinstance(backend, RegistryBackend):
        raise InvalidArgumentError(f"{backend!r} does not implement RegistryBackend")
    registry: NodeClientRegistry[Any] = NodeClientRegistry(
        node, backend, metadata_type=metadata_type
    )

    async def report(node_id: int, clients: list[RegisteredClient[Any]]) -> None:
        if on_orphaned is None or not clients:
            return
        try:
            result = on_orphaned(node_id, clients)
            if result is not None:
                await result
        except Exception:
            logger.exception("on_orphaned hook failed for node %d", node_id)

    async def clean_up(node_id: int) -> None:
        try:
            orphans = await ClientRegistry.cleanup_node(registry, node_id)
        except TransportError as exc:
            logger.warning("cleanup of node %d failed (%s)", node_id, exc)
            return
        await report(node_id, orphans)

    async def leader_duty() -> None:
        async with node.membership_events() as events:
            owners = {client.node_id for client in await ClientRegistry.list_clients(registry)}
            for owner in sorted(owners - node.alive_nodes()):
                await clean_up(owner)
            async for event in events:
                if event.kind is MembershipEventKind.DOWN and event.node_id is not None:
                    await clean_up(event.node_id)

    wake_up = [trio.Event()]

    def on_event(event: MembershipEvent) -> None:
        if event.kind is MembershipEventKind.REASSERTED:
            wake_up[0].set()

    async def keep_asserting() -> None:
        while True:
            woken = wake_up[0]
            with trio.move_on_after(reassert_interval):
                await woken.wait()
            if woken.is_set():
                wake_up[0] = trio.Event()
            try:
                restored = await registry.reassert()
            except TransportError as exc:
                logger.warning("re-asserting registrations failed (%s)", exc)
                continue
            if restored:
                logger.info("node %d re-asserted %d registrations", node.id, restored)

    with single_exceptions():
        async with trio.open_nursery() as nursery:
            remove_handler = node.add_membership_handler(on_event)
            remove_duty = node.add_leader_duty(leader_duty)
            nursery.start_soon(keep_asserting)
            try:
                yield registry
            finally:
                remove_duty()
                remove_handler()
                nursery.cancel_scope.cancel()
                with trio.move_on_after(2.0, shield=True):
                    for client_id in list(registry._own):
                        try:
                            await registry.unregister(client_id)
                        except TransportError:
                            break
