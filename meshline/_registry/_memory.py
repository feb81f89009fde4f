"""The in-process registry backend: one dict, shared by every registry that uses it."""

from __future__ import annotations

from collections.abc import Callable

import trio

from ._core import (
    ChangeListener,
    ChangeListeners,
    ClientRecord,
    ReassertOutcome,
    fenced,
    now_ms,
    owned,
)

__all__ = ["MemoryRegistryBackend"]


class MemoryRegistryBackend:
    """Registrations in a dict, for one process: share one instance between nodes.

    Every operation is atomic (it does not yield between reading and writing) and
    checkpoints once, like a real backend's round trip would.
    """

    def __init__(self) -> None:
        self._records: dict[str, ClientRecord] = {}
        self._listeners = ChangeListeners()

    def add_change_listener(self, listener: ChangeListener) -> Callable[[], None]:
        """Every change, as it is made (the backend is a ``ChangeFeed``)."""
        return self._listeners.add(listener)

    def _set(self, record: ClientRecord) -> None:
        self._records[record.client_id] = record
        if self._listeners:
            self._listeners.notify(record.client_id, record)

    def _remove(self, client_id: str) -> None:
        del self._records[client_id]
        if self._listeners:
            self._listeners.notify(client_id, None)

    async def register(
        self,
        client_id: str,
        node_id: int,
        metadata: bytes,
        *,
        token: int = 0,
        incarnation: int = 0,
    ) -> int | None:
        await trio.lowlevel.checkpoint()
        previous = self._records.get(client_id)
        self._set(ClientRecord(client_id, node_id, now_ms(), metadata, token, incarnation))
        if previous is None or previous.node_id == node_id:
            return None
        return previous.node_id

    async def reassert(
        self, client_id: str, node_id: int, metadata: bytes, *, token: int, incarnation: int
    ) -> ReassertOutcome:
        await trio.lowlevel.checkpoint()
        record = self._records.get(client_id)
        if record is None:
            self._set(ClientRecord(client_id, node_id, now_ms(), metadata, token, incarnation))
            return ReassertOutcome.RESTORED
        if not owned(record, node_id, token):
            return ReassertOutcome.GONE
        self._set(
            ClientRecord(client_id, node_id, record.connected_at, metadata, token, incarnation)
        )
        return ReassertOutcome.KEPT

    async def unregister(self, client_id: str, node_id: int, *, token: int | None = None) -> bool:
        await trio.lowlevel.checkpoint()
        if not owned(self._records.get(client_id), node_id, token):
            return False
        self._remove(client_id)
        return True

    async def update_metadata(
        self, client_id: str, node_id: int, metadata: bytes, *, token: int | None = None
    ) -> bool:
        await trio.lowlevel.checkpoint()
        record = self._records.get(client_id)
        if record is None or not owned(record, node_id, token):
            return False
        self._set(
            ClientRecord(
                client_id, node_id, record.connected_at, metadata, record.token, record.incarnation
            )
        )
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

    async def node_ids(self) -> set[int]:
        await trio.lowlevel.checkpoint()
        return {record.node_id for record in self._records.values()}

    async def cleanup_client(
        self, client_id: str, node_id: int, *, incarnation: int | None = None
    ) -> ClientRecord | None:
        await trio.lowlevel.checkpoint()
        record = self._records.get(client_id)
        if record is None or not fenced(record, node_id, incarnation):
            return None
        self._remove(client_id)
        return record

    async def cleanup_node(
        self, node_id: int, *, incarnation: int | None = None
    ) -> list[ClientRecord]:
        await trio.lowlevel.checkpoint()
        removed = [
            record for record in self._records.values() if fenced(record, node_id, incarnation)
        ]
        for record in removed:
            self._remove(record.client_id)
        return removed
