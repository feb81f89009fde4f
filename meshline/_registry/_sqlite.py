"""A registry backend on SQLite: proof that the backend seam takes any store.

Every operation is one SQL transaction run in a worker thread (``trio.to_thread``),
and each ownership rule is a single conditional statement, so the database enforces
it atomically: ``DELETE ... WHERE client_id = ? AND node_id = ?``, not a read and
then a write. Nodes in several processes can share one database file.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

from ._core import ClientRecord, ReassertOutcome, now_ms

__all__ = ["SQLiteRegistryBackend"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meshline_clients (
    client_id TEXT PRIMARY KEY,
    node_id INTEGER NOT NULL,
    connected_at INTEGER NOT NULL,
    metadata BLOB NOT NULL,
    token INTEGER NOT NULL DEFAULT 0,
    incarnation INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS meshline_clients_by_node ON meshline_clients (node_id);
"""
_COLUMNS = "client_id, node_id, connected_at, metadata, token, incarnation"
_OWNED = "client_id = ? AND node_id = ? AND (? IS NULL OR token = ?)"
_FENCED = "node_id = ? AND (? IS NULL OR incarnation <= ?)"


def _record(row: tuple[str, int, int, bytes, int, int]) -> ClientRecord:
    return ClientRecord(row[0], row[1], row[2], bytes(row[3]), row[4], row[5])


class SQLiteRegistryBackend:
    """Registrations in an SQLite database file (created if needed).

    Give each node its own instance; instances on the same file see each other's
    writes at once. Cancellation of a caller does not interrupt a statement that
    already started in its thread; the statement completes or rolls back whole.
    """

    def __init__(self, path: str | Path) -> None:
        self._connection = sqlite3.connect(
            str(path), timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._lock = threading.Lock()
        self._connection.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._connection.close()

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def transaction() -> T:
            with self._lock:
                connection = self._connection
                connection.execute("BEGIN IMMEDIATE")
                try:
                    result = work(connection)
                except BaseException:
                    connection.execute("ROLLBACK")
                    raise
                connection.execute("COMMIT")
                return result

        return await trio.to_thread.run_sync(transaction)

    async def register(
        self,
        client_id: str,
        node_id: int,
        metadata: bytes,
        *,
        token: int = 0,
        incarnation: int = 0,
    ) -> int | None:
        def work(db: sqlite3.Connection) -> int | None:
            row = db.execute(
                "SELECT node_id FROM meshline_clients WHERE client_id = ?", (client_id,)
            ).fetchone()
            db.execute(
                f"INSERT OR REPLACE INTO meshline_clients ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                (client_id, node_id, now_ms(), metadata, token, incarnation),
            )
            return None if row is None or row[0] == node_id else int(row[0])

        return await self._run(work)

    async def reassert(
        self, client_id: str, node_id: int, metadata: bytes, *, token: int, incarnation: int
    ) -> ReassertOutcome:
        def work(db: sqlite3.Connection) -> ReassertOutcome:
            cursor = db.execute(
                f"INSERT OR IGNORE INTO meshline_clients ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                (client_id, node_id, now_ms(), metadata, token, incarnation),
            )
            if cursor.rowcount == 1:
                return ReassertOutcome.RESTORED
            cursor = db.execute(
                "UPDATE meshline_clients SET metadata = ?, incarnation = ? "
                "WHERE client_id = ? AND node_id = ? AND token = ?",
                (metadata, incarnation, client_id, node_id, token),
            )
            return ReassertOutcome.KEPT if cursor.rowcount == 1 else ReassertOutcome.GONE

        return await self._run(work)

    async def unregister(self, client_id: str, node_id: int, *, token: int | None = None) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                f"DELETE FROM meshline_clients WHERE {_OWNED}", (client_id, node_id, token, token)
            )
            return cursor.rowcount == 1

        return await self._run(work)

    async def update_metadata(
        self, client_id: str, node_id: int, metadata: bytes, *, token: int | None = None
    ) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                f"UPDATE meshline_clients SET metadata = ? WHERE {_OWNED}",
                (metadata, client_id, node_id, token, token),
            )
            return cursor.rowcount == 1

        return await self._run(work)

    async def get_client(self, client_id: str) -> ClientRecord | None:
        def work(db: sqlite3.Connection) -> ClientRecord | None:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM meshline_clients WHERE client_id = ?", (client_id,)
            ).fetchone()
            return None if row is None else _record(row)

        return await self._run(work)

    async def list_clients(self) -> list[ClientRecord]:
        def work(db: sqlite3.Connection) -> list[ClientRecord]:
            rows = db.execute(f"SELECT {_COLUMNS} FROM meshline_clients").fetchall()
            return [_record(row) for row in rows]

        return await self._run(work)

    async def list_clients_for_node(self, node_id: int) -> list[ClientRecord]:
        def work(db: sqlite3.Connection) -> list[ClientRecord]:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM meshline_clients WHERE node_id = ?", (node_id,)
            ).fetchall()
            return [_record(row) for row in rows]

        return await self._run(work)

    async def count_clients_for_node(self, node_id: int) -> int:
        def work(db: sqlite3.Connection) -> int:
            row = db.execute(
                "SELECT COUNT(*) FROM meshline_clients WHERE node_id = ?", (node_id,)
            ).fetchone()
            return int(row[0])

        return await self._run(work)

    async def node_ids(self) -> set[int]:
        def work(db: sqlite3.Connection) -> set[int]:
            rows = db.execute("SELECT DISTINCT node_id FROM meshline_clients").fetchall()
            return {int(row[0]) for row in rows}

        return await self._run(work)

    async def cleanup_client(
        self, client_id: str, node_id: int, *, incarnation: int | None = None
    ) -> ClientRecord | None:
        def work(db: sqlite3.Connection) -> ClientRecord | None:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM meshline_clients WHERE client_id = ? AND {_FENCED}",
                (client_id, node_id, incarnation, incarnation),
            ).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM meshline_clients WHERE client_id = ?", (client_id,))
            return _record(row)

        return await self._run(work)

    async def cleanup_node(
        self, node_id: int, *, incarnation: int | None = None
    ) -> list[ClientRecord]:
        def work(db: sqlite3.Connection) -> list[ClientRecord]:
            arguments = (node_id, incarnation, incarnation)
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM meshline_clients WHERE {_FENCED}", arguments
            ).fetchall()
            db.execute(f"DELETE FROM meshline_clients WHERE {_FENCED}", arguments)
            return [_record(row) for row in rows]

        return await self._run(work)
