"""The in-process registry backend: one dict, shared by every registry that uses it."""

from __future__ import annotations

import trio

from ._registry import ClientRecord, now_ms

__all__ = ["MemoryRegistryBackend"]


class MemoryRegistryBackend:
    """Registrations in a dict, for one process: share one instance between nodes.

    Every operation is atomic (it does not yield between reading and writing) and
    checkpoints once, like a real backend's round trip would.
    """

    def __init__(self) -> None:
        self._records: dict[str, ClientRecord] = {}

    async def register(self, client_id: str, node_id: int, metadata: bytes) -> int | None:
        await trio.lowlevel.checkpoint()
        previous = self._records.get(client_id)
        self._records[client_id] = ClientRecord(client_id, node_id, now_ms(), metadata)
        if previous is None or previous.node_id == node_id:
            return None
        return previous.node_id

    async def restore(self, client_id: str, node_id: int, metadata: bytes) -> bool:
        await trio.lowlevel.checkpoint()
        if client_id in self._records:
            return False
        self._records[client_id] = ClientRecord(client_id, node_id, now_ms(), metadata)
        return True

    async def unregister(self, client_id: str, node_id: int) -> bool:
        await trio.lowlevel.checkpoint()
        record = self._records.get(client_id)
        if record is None or record.node_id != node_id:
            return False
        del self._records[client_id]
        return True

    async def update_metadata(self, client_id: str, node_id: int, metadata: bytes) -> bool:
        await trio.lowlevel.checkpoint()
        record = self._records.get(client_id)
        if record is None or record.node_id != node_id:
            return False
        self._records[client_id] = ClientRecord(client_id, node_id, record.connected_at, metadata)
        return True

    async def get_client(self, client_id: str) -> ClientRecord | None:
        await trio.lowlevel.checkpoint()
        return self._records.get(client_id)

    def lookup(self, client_id: str) -> ClientRecord | None:
        """``get_client`` without the checkpoint."""
        return self._records.get(client_id)

    async def list_clients(self) -> list[ClientRecord]:
        await trio.lowlevel.checkpoint()
        return list(self._records.values())

    async def list_clients_for_node(self, node_id: int) -> list[ClientRecord]:
        await trio.lowlevel.checkpoint()
        return [record for record in self._records.values() if record.node_id == node_id]

    async def count_clients_for_node(self, node_id: int) -> int:
        await trio.lowlevel.checkpoint()
        return sum(1 for record in self._records.values() if record.node_id == node_id)

    async def cleanup_node(self, node_id: int) -> list[ClientRecord]:
        await trio.lowlevel.checkpoint()
        removed = [record for record in self._records.values() if record.node_id == node_id]
        for record in removed:
            del self._records[record.client_id]
        return removed
