"""The KV registry backend: registrations in a KV bucket, ownership by compare-and-set.

One key per client, ``c.<token>`` (see :func:`meshline.encode_token`; the value
keeps the client id itself, since long ids are hashed). Every write is conditional on
the revision it read, so two nodes racing for one client cannot both win, and a
node that lost a client cannot remove or edit the newer registration.

Each backend keeps a replica of the whole bucket, fed by a watch, so reads are
local dictionary lookups. Its own writes are applied to the replica as soon as the
server confirms them, so a node always reads its own writes; other nodes' writes
appear when the watch delivers them (usually within a millisecond or two).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
import trio

from .._errors import (
    KeyExistsError,
    PayloadError,
    RevisionMismatchError,
    TransportClosedError,
    TransportError,
)
from .._transport._names import encode_bounded_token, encode_token
from .._transport._seam import KeyValue, KVEntry, KVOperation, Transport
from .._util import single_exceptions
from ._core import ClientRecord, ReassertOutcome, fenced, now_ms, owned

__all__ = ["KVRegistryBackend", "open_kv_registry_backend", "registry_bucket"]

logger = logging.getLogger("meshline.registry")

_PREFIX = "c."

_WATCH_RETRY = 0.5
"""Seconds before a failed replica watch is reopened."""


class _Stored(msgspec.Struct, array_like=True, frozen=True):
    client_id: str
    node_id: int
    connected_at: int
    metadata: bytes
    token: int = 0
    incarnation: int = 0


_decoder = msgspec.msgpack.Decoder(_Stored)
_encode = msgspec.msgpack.Encoder().encode


def registry_bucket(key: str, namespace: str = "") -> str:
    """The KV bucket holding the registrations of the mesh called ``key``.

    ``namespace`` separates layers, as in :func:`meshline._mesh._node.mesh_names`.
    """
    if namespace:
        return f"mlc-{namespace}-" + encode_bounded_token(key, 59 - len(namespace), "mesh key")
    return "mlc-" + encode_bounded_token(key, 60, "mesh key")


def _key(client_id: str) -> str:
    return _PREFIX + encode_token(client_id, "client id")


def _stored(record: ClientRecord) -> bytes:
    """The value stored for ``record``."""
    return _encode(
        _Stored(
            record.client_id,
            record.node_id,
            record.connected_at,
            record.metadata,
            record.token,
            record.incarnation,
        )
    )


def _record(stored: _Stored) -> ClientRecord:
    return ClientRecord(
        stored.client_id,
        stored.node_id,
        stored.connected_at,
        stored.metadata,
        stored.token,
        stored.incarnation,
    )


class KVRegistryBackend:
    """A :class:`~meshline.RegistryBackend` on a KV bucket, with a local replica.

    Open it with :func:`open_kv_registry_backend`. Reads (``get_client`` and the
    listings) never touch the network. Writes take one round trip when the replica
    is current, and retry with a fresh read when a compare-and-set loses.
    """

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._records: dict[str, tuple[int, ClientRecord]] = {}
        """Replica: key -> (revision, record)."""
        self._known: dict[str, int] = {}
        """Highest revision known per key, deletions included, to refuse stale news."""
        self._by_node: dict[int, set[str]] = {}
        self._by_client: dict[str, ClientRecord] = {}
        self._watch_revision = 0
        self._loads = 0
        """How many snapshots were loaded, to tell writes that straddle a reload."""
        self._watch_scope: trio.CancelScope | None = None
        self.watch_failures = 0
        """How many times the replica's watch failed and was reopened."""

    # ------------------------------------------------------------------ replica

    def _set(self, key: str, revision: int, record: ClientRecord | None) -> None:
        old = self._records.pop(key, None)
        if old is not None:
            self._by_client.pop(old[1].client_id, None)
            keys = self._by_node.get(old[1].node_id)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_node[old[1].node_id]
        if record is not None:
            self._records[key] = (revision, record)
            self._by_client[record.client_id] = record
            self._by_node.setdefault(record.node_id, set()).add(key)

    def _apply_local(self, key: str, revision: int, record: ClientRecord | None) -> None:
        """Apply a write this backend just made, unless newer news already arrived."""
        if revision <= self._watch_revision or revision <= self._known.get(key, 0):
            return
        self._known[key] = revision
        self._set(key, revision, record)

    async def _landed(
        self, key: str, revision: int, record: ClientRecord | None, loads: int
    ) -> None:
        """Apply a write that landed at ``revision``, sent when :attr:`_loads` was
        ``loads``.

        If a snapshot was loaded meanwhile, the write's own answer may be older than
        what that snapshot left out (a deletion, say) and must not be applied: the
        key is read from the server again instead.
        """
        if loads == self._loads:
            self._apply_local(key, revision, record)
        else:
            await self._recheck(key)

    async def _recheck(self, key: str) -> None:
        """Bring the replica's copy of ``key`` in line with the server.

        Best effort: the write that calls it has landed already, so a failure to
        read is logged and left to the watch.
        """
        before = self._records.get(key)
        loads = self._loads
        try:
            entry = await self._kv.get(key)
        except TransportError as exc:
            logger.info("registry replica could not re-read %r (%s)", key, exc)
            return
        if loads != self._loads:
            return
        record = None if entry is None else self._decode(key, entry.value)
        if record is not None and entry is not None:
            self._apply_local(key, entry.revision, record)
        elif before is not None:
            self._forget_local(key, before[0])

    def _decode(self, key: str, value: bytes) -> ClientRecord | None:
        """The registration stored as ``value``; None, logged, if it is not one."""
        try:
            return _record(_decoder.decode(value))
        except msgspec.MsgspecError as exc:
            logger.warning(
                "registry key %r holds something that is not a registration (%s); "
                "the replica leaves it out",
                key,
                exc,
            )
            return None

    def _forget_local(self, key: str, deleted_revision: int) -> None:
        """Apply a deletion this backend made of the record at ``deleted_revision``."""
        current = self._records.get(key)
        if current is not None and current[0] == deleted_revision:
            self._known[key] = max(self._known.get(key, 0), deleted_revision)
            self._set(key, deleted_revision, None)

    def _apply_watched(self, entry: KVEntry) -> None:
        self._watch_revision = max(self._watch_revision, entry.revision)
        key = entry.key
        if entry.revision <= self._known.get(key, 0):
            return
        if entry.operation is not KVOperation.PUT:
            self._known.pop(key, None)  # the watch is ordered: nothing older comes now
            self._set(key, entry.revision, None)
            return
        self._known[key] = entry.revision
        self._set(key, entry.revision, self._decode(key, entry.value))

    def load(self, snapshot: list[KVEntry]) -> list[str]:
        """Merge a watch snapshot into the replica; return the keys the replica
        holds that the snapshot lacks, for the caller to check with the server.

        A snapshot taken right after a server restart can be short while JetStream
        recovers its stream, so absence from it alone removes nothing.
        """
        self._loads += 1
        newest = max((entry.revision for entry in snapshot), default=0)
        if snapshot and newest < self._watch_revision:
            # Every revision is older than what was seen before: the stream was
            # recreated (its data lost), so nothing known about it holds any more.
            self._records.clear()
            self._known.clear()
            self._by_node.clear()
            self._by_client.clear()
            self._watch_revision = 0
        present = set()
        for entry in snapshot:
            present.add(entry.key)
            self._apply_watched(entry)
        return [key for key in self._records if key not in present]

    async def _confirm_absent(self, keys: list[str]) -> None:
        """Drop from the replica each of ``keys`` that the server no longer holds."""
        for key in keys:
            current = self._records.get(key)
            if current is not None and await self._kv.get(key) is None:
                # Only the copy that was checked: the watch may have brought a newer
                # one while the server answered.
                self._forget_local(key, current[0])

    def request_reload(self) -> None:
        """Drop the current watch and load the replica again from a fresh one.

        Call it when the transport reconnects: a watch opened before an outage may
        stay silent afterwards.
        """
        if self._watch_scope is not None:
            self._watch_scope.cancel()

    async def follow(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the replica current until cancelled.

        A watch that fails, overflows or ends is logged, counted in
        :attr:`watch_failures` and reopened after a short pause; its snapshot is
        merged into the replica, and keys the snapshot lacks are checked with the
        server (see :meth:`load`).
        Only a closed transport ends this task (or a failure before the first load,
        which is raised to the caller of ``start``).
        """
        started = False
        while True:
            with trio.CancelScope() as scope:
                self._watch_scope = scope
                try:
                    async with self._kv.watch(_PREFIX + ">") as watch:
                        missing = self.load(watch.snapshot)
                        if not started:
                            started = True
                            task_status.started()
                        if missing:
                            await self._confirm_absent(missing)
                        async for entry in watch:
                            self._apply_watched(entry)
                    raise TransportError("the watch ended")
                except TransportClosedError:
                    raise
                except Exception as exc:
                    if not started:
                        raise
                    self.watch_failures += 1
                    logger.warning(
                        "registry replica watch failed (%s: %s); reopening",
                        type(exc).__name__,
                        exc,
                    )
                    await trio.sleep(_WATCH_RETRY)
            self._watch_scope = None
            if scope.cancelled_caught:
                logger.info("registry replica reloading after a reconnect")

    # ------------------------------------------------------------------ RegistryBackend

    async def _read(self, key: str) -> tuple[int, ClientRecord] | None:
        """The authoritative current registration, read from the server.

        The replica takes the answer too, unless a snapshot was loaded meanwhile.

        :raises PayloadError: the key holds something that is not a registration.
        """
        loads = self._loads
        entry = await self._kv.get(key)
        if entry is None:
            return None
        try:
            record = _record(_decoder.decode(entry.value))
        except msgspec.MsgspecError as exc:
            raise PayloadError(f"registry key {key!r} holds something else: {exc}") from None
        if loads == self._loads:
            self._apply_local(key, entry.revision, record)
        return entry.revision, record

    async def register(
        self,
        client_id: str,
        node_id: int,
        metadata: bytes,
        *,
        token: int = 0,
        incarnation: int = 0,
    ) -> int | None:
        key = _key(client_id)
        record = ClientRecord(client_id, node_id, now_ms(), metadata, token, incarnation)
        value = _stored(record)
        current = self._records.get(key)
        while True:
            loads = self._loads
            try:
                if current is None:
                    revision = await self._kv.create(key, value)
                    await self._landed(key, revision, record, loads)
                    return None
                revision = await self._kv.update(key, value, revision=current[0])
            except (KeyExistsError, RevisionMismatchError):
                current = await self._read(key)
                continue
            await self._landed(key, revision, record, loads)
            previous = current[1].node_id
            return None if previous == node_id else previous

    async def reassert(
        self, client_id: str, node_id: int, metadata: bytes, *, token: int, incarnation: int
    ) -> ReassertOutcome:
        key = _key(client_id)
        current = self._records.get(key)
        if (
            current is None
            or not owned(current[1], node_id, token)
            or (current[1].incarnation == incarnation)
        ):
            # Nothing to write according to the replica, which may be stale or have
            # lost a record the server lost: ask the server. Otherwise the write
            # below is itself the check, a compare-and-set against the server.
            current = await self._read(key)
        while True:
            loads = self._loads
            try:
                if current is None:
                    record = ClientRecord(
                        client_id, node_id, now_ms(), metadata, token, incarnation
                    )
                    revision = await self._kv.create(key, _stored(record))
                    await self._landed(key, revision, record, loads)
                    return ReassertOutcome.RESTORED
                stored_revision, stored = current
                if not owned(stored, node_id, token):
                    return ReassertOutcome.GONE
                if stored.incarnation == incarnation and stored.metadata == metadata:
                    return ReassertOutcome.KEPT
                record = ClientRecord(
                    client_id, node_id, stored.connected_at, metadata, token, incarnation
                )
                revision = await self._kv.update(key, _stored(record), revision=stored_revision)
                await self._landed(key, revision, record, loads)
                return ReassertOutcome.KEPT
            except (KeyExistsError, RevisionMismatchError):
                current = await self._read(key)

    async def _owned(
        self, key: str, node_id: int, token: int | None
    ) -> tuple[int, ClientRecord] | None:
        """The registration if ``node_id`` owns it (under ``token``, if given),
        confirmed with the server when the replica does not show it so."""
        current = self._records.get(key)
        if current is None or not owned(current[1], node_id, token):
            current = await self._read(key)
        if current is None or not owned(current[1], node_id, token):
            return None
        return current

    async def unregister(self, client_id: str, node_id: int, *, token: int | None = None) -> bool:
        key = _key(client_id)
        current = await self._owned(key, node_id, token)
        while current is not None:
            try:
                await self._kv.delete(key, revision=current[0])
            except RevisionMismatchError:
                current = await self._read(key)
                if current is None or not owned(current[1], node_id, token):
                    return False
                continue
            self._forget_local(key, current[0])
            return True
        return False

    async def update_metadata(
        self, client_id: str, node_id: int, metadata: bytes, *, token: int | None = None
    ) -> bool:
        key = _key(client_id)
        current = await self._owned(key, node_id, token)
        while current is not None:
            revision, old = current
            record = ClientRecord(
                client_id, node_id, old.connected_at, metadata, old.token, old.incarnation
            )
            loads = self._loads
            try:
                new_revision = await self._kv.update(key, _stored(record), revision=revision)
            except RevisionMismatchError:
                current = await self._read(key)
                if current is None or not owned(current[1], node_id, token):
                    return False
                continue
            await self._landed(key, new_revision, record, loads)
            return True
        return False

    async def get_client(self, client_id: str) -> ClientRecord | None:
        await trio.lowlevel.checkpoint()
        return self._by_client.get(client_id)

    def lookup(self, client_id: str) -> ClientRecord | None:
        """``get_client`` without the checkpoint: a dictionary lookup in the replica."""
        return self._by_client.get(client_id)

    async def list_clients(self) -> list[ClientRecord]:
        await trio.lowlevel.checkpoint()
        return [record for _, record in self._records.values()]

    async def list_clients_for_node(self, node_id: int) -> list[ClientRecord]:
        await trio.lowlevel.checkpoint()
        return [self._records[key][1] for key in self._by_node.get(node_id, ())]

    async def count_clients_for_node(self, node_id: int) -> int:
        await trio.lowlevel.checkpoint()
        return len(self._by_node.get(node_id, ()))

    async def cleanup_client(
        self, client_id: str, node_id: int, *, incarnation: int | None = None
    ) -> ClientRecord | None:
        key = _key(client_id)
        current = self._records.get(key)
        if current is None or not fenced(current[1], node_id, incarnation):
            current = await self._read(key)
        while current is not None and fenced(current[1], node_id, incarnation):
            try:
                await self._kv.delete(key, revision=current[0])
            except RevisionMismatchError:
                current = await self._read(key)
                continue
            self._forget_local(key, current[0])
            return current[1]
        return None

    async def cleanup_node(
        self, node_id: int, *, incarnation: int | None = None
    ) -> list[ClientRecord]:
        removed = []
        for key in list(self._by_node.get(node_id, ())):
            current = self._records.get(key)
            if current is None or not fenced(current[1], node_id, incarnation):
                continue
            record = await self.cleanup_client(
                current[1].client_id, node_id, incarnation=incarnation
            )
            if record is not None:
                removed.append(record)
        return removed


@asynccontextmanager
async def open_kv_registry_backend(
    transport: Transport, key: str, *, _namespace: str = ""
) -> AsyncIterator[KVRegistryBackend]:
    """Open the KV registry backend of the mesh called ``key``, for the block.

    On entry the bucket is opened (created if needed) and the replica is loaded, so
    reads are complete at once. A task in the block's nursery keeps the replica
    current; leaving the block stops it.
    """
    kv = await transport.key_value(registry_bucket(key, _namespace))
    backend = KVRegistryBackend(kv)
    with single_exceptions():
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.follow)
            try:
                yield backend
            finally:
                nursery.cancel_scope.cancel()
