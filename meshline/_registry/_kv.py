"""The KV registry backend: registrations in a KV bucket, ownership by compare-and-set.

One key per client, ``c.<token>`` (see :func:`meshline.encode_token`; the value
keeps the client id itself, since long ids are hashed). Every write is conditional on
the revision it read, so two nodes racing for one client cannot both win, and a
node that lost a client cannot remove or edit the newer registration.

Each backend keeps a replica of the whole bucket, fed by a watch, so reads are
local dictionary lookups. Its own writes are applied to the replica as soon as the
server confirms them, so a node always reads its own writes; other nodes' writes
appear when the watch delivers them (usually within a millisecond or two).

Churn leaves nothing behind: a registration is removed by a conditional purge, whose
marker expires a minute later, so a bucket holds its live registrations and the last
minute's removals, and a fresh replica loads in time linear in that. The replica
keeps one entry per client (the record and its revision) and an index by node;
it does not keep the snapshot it was loaded from.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TypeVar

import msgspec
import trio

from .._errors import (
    InvalidNameError,
    KeyExistsError,
    PayloadError,
    RevisionMismatchError,
    TransportClosedError,
    TransportError,
)
from .._transport._names import decode_token, encode_bounded_token, encode_token
from .._transport._seam import KeyValue, KVEntry, KVOperation, KVWatch, Transport
from .._util import single_exceptions
from ._core import ClientRecord, ReassertOutcome, fenced, now_ms, owned

__all__ = ["KVRegistryBackend", "open_kv_registry_backend", "registry_bucket"]

logger = logging.getLogger("meshline.registry")

_PREFIX = "c."

_WATCH_RETRY = 0.5
"""Seconds before a failed replica watch is reopened."""

WRITES_IN_FLIGHT = 64
"""Server round trips :meth:`KVRegistryBackend.cleanup_node` (and the check of
records a reloaded snapshot lacks) keeps in flight at once."""

_LOAD_BATCH = 2_000
"""Snapshot entries loaded between two checkpoints, so a large load does not hold
up the node's other tasks (its heartbeat among them)."""

T = TypeVar("T")


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


def _record(key: str, value: bytes) -> ClientRecord:
    """The registration stored as ``value`` under ``key``.

    :raises PayloadError: ``value`` is not a registration, or one of another key.
    """
    try:
        stored = _decoder.decode(value)
    except msgspec.MsgspecError as exc:
        raise PayloadError(f"registry key {key!r} holds something else: {exc}") from None
    try:
        matches = _key(stored.client_id) == key
    except InvalidNameError:
        matches = False
    if not matches:
        raise PayloadError(f"registry key {key!r} holds the registration of another key")
    return ClientRecord(
        stored.client_id,
        stored.node_id,
        stored.connected_at,
        stored.metadata,
        stored.token,
        stored.incarnation,
    )


def _is_hashed(key: str) -> bool:
    """Whether ``key`` holds a one-way (hashed) token, which names no client id."""
    return key.startswith(_PREFIX + "h")


async def _for_each(
    items: Iterable[T], action: Callable[[T], Awaitable[None]], limit: int = WRITES_IN_FLIGHT
) -> None:
    """Run ``action`` on every item, ``limit`` at a time.

    After a failure no new item starts; the ones in flight finish, then the first
    failure is raised (later ones are logged). Cancellation cancels those in flight.
    """
    pending = iter(items)
    failures: list[Exception] = []

    async def worker() -> None:
        for item in pending:
            try:
                await action(item)
            except Exception as exc:
                if failures:
                    logger.warning("registry: another write failed too (%s)", exc)
                failures.append(exc)
                return
            if failures:
                return

    async with trio.open_nursery() as nursery:
        for _ in range(limit):
            nursery.start_soon(worker)
    if failures:
        raise failures[0]


class KVRegistryBackend:
    """A :class:`~meshline.RegistryBackend` on a KV bucket, with a local replica.

    Open it with :func:`open_kv_registry_backend`. Reads (``get_client`` and the
    listings) never touch the network. Writes take one round trip when the replica
    is current, and retry with a fresh read when a compare-and-set loses.
    """

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._records: dict[str, tuple[int, ClientRecord]] = {}
        """Replica: client id -> (revision, record)."""
        self._gone: dict[str, int] = {}
        """Client id -> revision of a removal the watch may not have passed yet, to
        refuse stale news of a client the replica no longer holds."""
        self._by_node: dict[int, set[str]] = {}
        self._hashed: dict[str, str] = {}
        """Key -> client id, for the long ids whose key is a hash (a deletion names
        only the key)."""
        self._watch_revision = 0
        self._loads = 0
        """How many snapshots were loaded, to tell writes that straddle a reload."""
        self._loading = False
        self._present: set[str] | None = None
        """While a snapshot loads: the client ids it (or the live watch) spoke of."""
        self._watch_scope: trio.CancelScope | None = None
        self.watch_failures = 0
        """How many times the replica's watch failed and was reopened."""

    # ------------------------------------------------------------------ replica

    def _known(self, client_id: str) -> int:
        """The highest revision known for ``client_id``, a removal's included."""
        held = self._records.get(client_id)
        return held[0] if held is not None else self._gone.get(client_id, 0)

    def _set(self, client_id: str, revision: int, record: ClientRecord | None) -> None:
        old = self._records.get(client_id)
        if old is not None and (record is None or old[1].node_id != record.node_id):
            clients = self._by_node.get(old[1].node_id)
            if clients is not None:
                clients.discard(client_id)
                if not clients:
                    del self._by_node[old[1].node_id]
        if record is None:
            if old is not None:
                del self._records[client_id]
            return
        self._records[client_id] = (revision, record)
        if old is None or old[1].node_id != record.node_id:
            self._by_node.setdefault(record.node_id, set()).add(client_id)

    def _client_of(self, key: str) -> str | None:
        """The client id ``key`` names, if the replica can tell."""
        if not key.startswith(_PREFIX):
            return None
        if _is_hashed(key):
            return self._hashed.get(key)
        try:
            return decode_token(key[len(_PREFIX) :])
        except InvalidNameError:
            return None

    def _apply_local(self, key: str, revision: int, record: ClientRecord) -> None:
        """Apply a write this backend just made, unless newer news already arrived."""
        client_id = record.client_id
        if self._present is not None:
            self._present.add(client_id)
        if revision <= self._watch_revision or revision <= self._known(client_id):
            return
        self._gone.pop(client_id, None)
        if _is_hashed(key):
            self._hashed[key] = client_id
        self._set(client_id, revision, record)

    async def _landed(self, key: str, revision: int, record: ClientRecord, loads: int) -> None:
        """Apply a write that landed at ``revision``, sent when :attr:`_loads` was
        ``loads``.

        If a snapshot was loaded meanwhile, the write's own answer may be older than
        what that snapshot left out (a deletion, say) and must not be applied: the
        key is read from the server again instead.
        """
        if loads == self._loads:
            self._apply_local(key, revision, record)
        else:
            await self._recheck(key, record.client_id)

    async def _recheck(self, key: str, client_id: str) -> None:
        """Bring the replica's copy of ``client_id`` in line with the server.

        Best effort: the write that calls it has landed already, so a failure to
        read is logged and left to the watch.
        """
        before = self._records.get(client_id)
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
            self._forget_local(client_id, before[0])

    def _decode(self, key: str, value: bytes) -> ClientRecord | None:
        """The registration stored as ``value``; None, logged, if it is not one."""
        try:
            return _record(key, value)
        except PayloadError as exc:
            logger.warning("%s; the replica leaves it out (not a registration)", exc)
            return None

    def _forget_local(self, client_id: str, deleted_revision: int) -> None:
        """Apply a removal this backend made of the record at ``deleted_revision``."""
        current = self._records.get(client_id)
        if current is not None and current[0] == deleted_revision:
            self._gone[client_id] = deleted_revision
            self._set(client_id, deleted_revision, None)

    def _apply_watched(self, entry: KVEntry) -> None:
        if entry.revision > self._watch_revision:
            self._watch_revision = entry.revision
        key = entry.key
        record = None
        if entry.operation is KVOperation.PUT:
            record = self._decode(key, entry.value)
        client_id = record.client_id if record is not None else self._client_of(key)
        if client_id is None:
            return
        if self._present is not None:
            self._present.add(client_id)
        if entry.revision <= self._known(client_id):
            return
        if record is not None:
            self._gone.pop(client_id, None)
            if _is_hashed(key):
                self._hashed[key] = client_id
            self._set(client_id, entry.revision, record)
            return
        # Removed, or replaced by something that is not a registration.
        if self._loading or entry.operation is KVOperation.PUT:
            # Snapshot entries still to load are older: keep refusing them.
            self._gone[client_id] = entry.revision
        else:
            self._gone.pop(client_id, None)  # the watch is ordered: nothing older comes
        self._hashed.pop(key, None)
        self._set(client_id, entry.revision, None)

    def _begin_load(self, snapshot: list[KVEntry]) -> None:
        self._loads += 1
        newest = max((entry.revision for entry in snapshot), default=0)
        if snapshot and newest < self._watch_revision:
            # Every revision is older than what was seen before: the stream was
            # recreated (its data lost), so nothing known about it holds any more.
            self._records.clear()
            self._gone.clear()
            self._by_node.clear()
            self._hashed.clear()
            self._watch_revision = 0
        self._loading = True
        self._present = set()

    def _end_load(self) -> list[str]:
        present = self._present if self._present is not None else set()
        self._loading = False
        self._present = None
        # What the watch has passed cannot come again: no need to remember removals.
        watched = self._watch_revision
        self._gone = {client: gone for client, gone in self._gone.items() if gone > watched}
        records = self._records
        self._hashed = {key: client for key, client in self._hashed.items() if client in records}
        return [client_id for client_id in records if client_id not in present]

    async def load(self, snapshot: list[KVEntry]) -> list[str]:
        """Merge a watch snapshot into the replica; return the client ids the replica
        holds that the snapshot lacks, for the caller to check with the server.

        A snapshot taken right after a server restart can be short while JetStream
        recovers its stream, so absence from it alone removes nothing. The load
        checkpoints every few thousand entries; changes the watch delivers meanwhile
        may be applied concurrently (they are newer than any snapshot entry).
        Cancelled, it leaves a partly merged replica that the next load completes.
        """
        self._begin_load(snapshot)
        try:
            for index, entry in enumerate(snapshot):
                self._apply_watched(entry)
                if index % _LOAD_BATCH == _LOAD_BATCH - 1:
                    await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()
        finally:
            missing = self._end_load()
        return missing

    async def _confirm_absent(self, client_ids: list[str]) -> None:
        """Drop from the replica each client the server no longer holds."""

        async def check(client_id: str) -> None:
            current = self._records.get(client_id)
            if current is not None and await self._kv.get(_key(client_id)) is None:
                # Only the copy that was checked: the watch may have brought a newer
                # one while the server answered.
                self._forget_local(client_id, current[0])

        await _for_each(client_ids, check)

    async def _follow_changes(self, watch: KVWatch) -> None:
        async for entry in watch:
            self._apply_watched(entry)

    def request_reload(self) -> None:
        """Drop the current watch and load the replica again from a fresh one.

        Call it when the transport reconnects: a watch opened before an outage may
        stay silent afterwards.
        """
        if self._watch_scope is not None:
            self._watch_scope.cancel()

    async def follow(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the replica current until cancelled.

        Each watch's snapshot is merged into the replica (see :meth:`load`) while
        the changes after it are applied as they come, and the watch lets go of
        the snapshot once it is loaded. Keys the snapshot lacks are checked with
        the server. A watch that fails, overflows or ends is logged, counted in
        :attr:`watch_failures` and reopened after a short pause.
        Only a closed transport ends this task (or a failure before the first load,
        which is raised to the caller of ``start``).
        """
        started = False
        while True:
            with trio.CancelScope() as scope:
                self._watch_scope = scope
                try:
                    async with self._kv.watch(_PREFIX + ">") as watch:
                        with single_exceptions():
                            async with trio.open_nursery() as nursery:
                                snapshot = watch.take_snapshot()
                                nursery.start_soon(self._follow_changes, watch)
                                missing = await self.load(snapshot)
                                del snapshot
                                if not started:
                                    started = True
                                    task_status.started()
                                if missing:
                                    await self._confirm_absent(missing)
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
        record = _record(key, entry.value)
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
        current = self._records.get(client_id)
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
        current = self._records.get(client_id)
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
        self, client_id: str, key: str, node_id: int, token: int | None
    ) -> tuple[int, ClientRecord] | None:
        """The registration if ``node_id`` owns it (under ``token``, if given),
        confirmed with the server when the replica does not show it so."""
        current = self._records.get(client_id)
        if current is None or not owned(current[1], node_id, token):
            current = await self._read(key)
        if current is None or not owned(current[1], node_id, token):
            return None
        return current

    async def unregister(self, client_id: str, node_id: int, *, token: int | None = None) -> bool:
        key = _key(client_id)
        current = await self._owned(client_id, key, node_id, token)
        while current is not None:
            try:
                await self._kv.purge(key, revision=current[0])
            except RevisionMismatchError:
                current = await self._read(key)
                if current is None or not owned(current[1], node_id, token):
                    return False
                continue
            self._forget_local(client_id, current[0])
            return True
        return False

    async def update_metadata(
        self, client_id: str, node_id: int, metadata: bytes, *, token: int | None = None
    ) -> bool:
        key = _key(client_id)
        current = await self._owned(client_id, key, node_id, token)
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
        return self.lookup(client_id)

    def lookup(self, client_id: str) -> ClientRecord | None:
        """``get_client`` without the checkpoint: a dictionary lookup in the replica."""
        held = self._records.get(client_id)
        return None if held is None else held[1]

    async def list_clients(self) -> list[ClientRecord]:
        await trio.lowlevel.checkpoint()
        return [record for _, record in self._records.values()]

    async def list_clients_for_node(self, node_id: int) -> list[ClientRecord]:
        await trio.lowlevel.checkpoint()
        records = self._records
        return [records[client_id][1] for client_id in self._by_node.get(node_id, ())]

    async def count_clients_for_node(self, node_id: int) -> int:
        await trio.lowlevel.checkpoint()
        return len(self._by_node.get(node_id, ()))

    async def node_ids(self) -> set[int]:
        await trio.lowlevel.checkpoint()
        return set(self._by_node)

    async def cleanup_client(
        self, client_id: str, node_id: int, *, incarnation: int | None = None
    ) -> ClientRecord | None:
        key = _key(client_id)
        current = self._records.get(client_id)
        if current is None or not fenced(current[1], node_id, incarnation):
            current = await self._read(key)
        while current is not None and fenced(current[1], node_id, incarnation):
            try:
                await self._kv.purge(key, revision=current[0])
            except RevisionMismatchError:
                current = await self._read(key)
                continue
            self._forget_local(client_id, current[0])
            return current[1]
        return None

    async def cleanup_node(
        self, node_id: int, *, incarnation: int | None = None
    ) -> list[ClientRecord]:
        """Remove what ``node_id`` still owns (see :meth:`cleanup_client`), with
        :data:`WRITES_IN_FLIGHT` removals in flight at once; return what was removed.

        Each removal is a compare-and-set against the server, so a client that
        registered again meanwhile (or a record of a newer incarnation) stays.

        :raises TransportError: a removal failed; the others in flight finished, and
            a later call removes what is left. (What was removed is then not
            returned.)
        """
        removed: list[ClientRecord] = []
        records = self._records
        targets = [
            client_id
            for client_id in self._by_node.get(node_id, ())
            if fenced(records[client_id][1], node_id, incarnation)
        ]

        async def clean(client_id: str) -> None:
            record = await self.cleanup_client(client_id, node_id, incarnation=incarnation)
            if record is not None:
                removed.append(record)

        await _for_each(targets, clean)
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
