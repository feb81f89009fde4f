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
is loaded from the watch's snapshot entry by entry, without a copy of the snapshot,
and keeps per client only its stored value (decoded when read), its revision and
its node, with an index by node.
"""

from __future__ import annotations

import binascii
import logging
import math
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
from .._transport._names import SHORT_TOKEN_BYTES, encode_bounded_token, encode_token
from .._transport._seam import KeyValue, KVEntry, KVOperation, KVWatch, Transport
from .._util import single_exceptions
from ._core import (
    DECODE_BATCH,
    ChangeListener,
    ChangeListeners,
    ClientRecord,
    ReassertOutcome,
    fenced,
    now_ms,
    owned,
)

__all__ = [
    "KVRegistryBackend",
    "open_kv_registry_backend",
    "open_kv_registry_backend_in_namespace",
    "registry_bucket",
]

logger = logging.getLogger("meshline.registry")

_PREFIX = "c."
_SHORT_PREFIX = _PREFIX + "b"

_WATCH_RETRY = 0.5

SILENT_WATCH_AFTER = 3.0
"""Seconds a write of this backend may take to come back through its watch before
the watch is taken for silent and reloaded."""
"""Seconds before a failed replica watch is reopened."""

WRITES_IN_FLIGHT = 64
"""Server round trips :meth:`KVRegistryBackend.cleanup_node` (and the check of
records a reloaded snapshot lacks) keeps in flight at once."""

_LOAD_BATCH = 2_000
"""Entries of a snapshot given as a list (:meth:`KVRegistryBackend.load`) loaded
between two checkpoints, so a large load does not hold up the node's other tasks."""

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


_URL_SAFE = bytes.maketrans(b"+/", b"-_")
_FROM_URL_SAFE = bytes.maketrans(b"-_", b"+/")


def _is_key_of(key: str, client_id: str) -> bool:
    """Whether ``key`` is :func:`_key` of ``client_id``: checked for every value
    that comes in, so the common case (a short id) skips the name checks."""
    try:
        raw = client_id.encode("utf-8")
    except UnicodeEncodeError:
        return False
    if 0 < len(raw) <= SHORT_TOKEN_BYTES:
        token = binascii.b2a_base64(raw, newline=False).rstrip(b"=").translate(_URL_SAFE)
        return key == _SHORT_PREFIX + token.decode("ascii")
    try:
        return key == _key(client_id)
    except InvalidNameError:
        return False


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


def _verified(key: str, value: bytes) -> _Stored:
    """The registration stored as ``value`` under ``key``.

    :raises PayloadError: ``value`` is not a registration, or one of another key.
    """
    try:
        stored = _decoder.decode(value)
    except msgspec.MsgspecError as exc:
        raise PayloadError(f"registry key {key!r} holds something else: {exc}") from None
    if not _is_key_of(key, stored.client_id):
        raise PayloadError(f"registry key {key!r} holds the registration of another key")
    return stored


def _record(stored: _Stored) -> ClientRecord:
    return ClientRecord(
        stored.client_id,
        stored.node_id,
        stored.connected_at,
        stored.metadata,
        stored.token,
        stored.incarnation,
    )


_Held = tuple[int, int, bytes]
"""A replica entry: (revision, node id, the stored value, checked when it came in)."""


def _held_record(held: _Held) -> ClientRecord:
    return _record(_decoder.decode(held[2]))


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


class _StaleReplica(Exception):
    """The bucket's stream was recreated: what the replica knew no longer holds."""


class KVRegistryBackend:
    """A :class:`~meshline.RegistryBackend` on a KV bucket, with a local replica.

    Open it with :func:`open_kv_registry_backend`. Reads (``get_client`` and the
    listings) never touch the network. Writes take one round trip when the replica
    is current, and retry with a fresh read when a compare-and-set loses.
    """

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._records: dict[str, _Held] = {}
        """Replica: client id -> (revision, node id, stored value)."""
        self._gone: dict[str, int] = {}
        """Client id -> revision of a removal the watch may not have passed yet, to
        refuse stale news of a client the replica no longer holds."""
        self._by_node: dict[int, dict[str, None]] = {}
        """Node id -> its client ids (a dict: smaller than a set)."""
        self._node_ids: dict[int, int] = {}
        """One int object per node id, shared by all its entries."""
        self._hashed: dict[str, str] = {}
        """Key -> client id, for the long ids whose key is a hash (a deletion names
        only the key)."""
        self._watch_revision = 0
        self._loads = 0
        """How many snapshots were loaded, to tell writes that straddle a reload."""
        self._present: set[str] | None = None
        """While a snapshot loads: the client ids it spoke of (and own writes)."""
        self._revision_before_load = 0
        self._newest_loaded = 0
        self._watch_scope: trio.CancelScope | None = None
        self.watch_failures = 0
        """How many times the replica's watch failed and was reopened."""
        self.silent_watch_reloads = 0
        """How many times the watch was reloaded because this backend's own writes
        stopped coming back through it."""
        self._awaited_revision = 0
        self._awaited_since = math.inf
        self._listeners = ChangeListeners()

    def add_change_listener(self, listener: ChangeListener) -> Callable[[], None]:
        """Every change to the replica, as the watch or this backend's own writes
        bring it (the backend is a ``ChangeFeed``)."""
        return self._listeners.add(listener)

    # ------------------------------------------------------------------ replica

    def _known(self, client_id: str) -> int:
        """The highest revision known for ``client_id``, a removal's included."""
        held = self._records.get(client_id)
        return held[0] if held is not None else self._gone.get(client_id, 0)

    def _current(self, client_id: str) -> tuple[int, ClientRecord] | None:
        held = self._records.get(client_id)
        return None if held is None else (held[0], _held_record(held))

    def _put(self, client_id: str, revision: int, node_id: int, value: bytes) -> None:
        node_id = self._node_ids.setdefault(node_id, node_id)
        old = self._records.get(client_id)
        held = self._records[client_id] = (revision, node_id, value)
        if old is None or old[1] != node_id:
            if old is not None:
                self._unindex(client_id, old[1])
            self._by_node.setdefault(node_id, {})[client_id] = None
        if self._listeners:
            self._listeners.notify(client_id, _held_record(held))

    def _drop(self, client_id: str) -> None:
        old = self._records.pop(client_id, None)
        if old is not None:
            self._unindex(client_id, old[1])
            if self._listeners:
                self._listeners.notify(client_id, None)

    def _unindex(self, client_id: str, node_id: int) -> None:
        clients = self._by_node.get(node_id)
        if clients is not None:
            clients.pop(client_id, None)
            if not clients:
                del self._by_node[node_id]
                del self._node_ids[node_id]

    def _client_of(self, key: str) -> str | None:
        """The client id ``key`` names, if the replica holds or just removed it."""
        if _is_hashed(key):
            return self._hashed.get(key)
        if not key.startswith(_SHORT_PREFIX):
            return None
        try:
            raw = key[len(_SHORT_PREFIX) :].encode("ascii").translate(_FROM_URL_SAFE)
            # Lenient: a malformed key decodes to something the check below refuses.
            client_id = binascii.a2b_base64(raw + b"==").decode("utf-8")
        except (binascii.Error, UnicodeError):
            return None
        if client_id not in self._records and client_id not in self._gone:
            return None  # nothing to forget (the common case for old markers)
        return client_id if _is_key_of(key, client_id) else None

    def _apply_local(self, key: str, revision: int, stored: _Stored, value: bytes) -> None:
        """Apply a write this backend just made, unless newer news already arrived."""
        client_id = stored.client_id
        if self._present is not None:
            self._present.add(client_id)
        if revision > self._watch_revision:
            self._await_revision(revision)
        if revision <= self._watch_revision or revision <= self._known(client_id):
            return
        self._gone.pop(client_id, None)
        if _is_hashed(key):
            self._hashed[key] = client_id
        self._put(client_id, revision, stored.node_id, value)

    async def _landed(
        self, key: str, revision: int, record: ClientRecord, value: bytes, loads: int
    ) -> None:
        """Apply a write of ``value`` that landed at ``revision``, sent when
        :attr:`_loads` was ``loads``.

        If a snapshot was loaded meanwhile, the write's own answer may be older than
        what that snapshot left out (a deletion, say) and must not be applied: the
        key is read from the server again instead.
        """
        if loads == self._loads:
            self._apply_local(key, revision, _decoder.decode(value), value)
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
        stored = None if entry is None else self._decode(key, entry.value)
        if stored is not None and entry is not None:
            self._apply_local(key, entry.revision, stored, entry.value)
        elif before is not None:
            self._forget_local(client_id, before[0])

    def _decode(self, key: str, value: bytes) -> _Stored | None:
        """The registration stored as ``value``; None, logged, if it is not one."""
        try:
            return _verified(key, value)
        except PayloadError as exc:
            logger.warning("%s; the replica leaves it out (not a registration)", exc)
            return None

    def _forget_local(self, client_id: str, deleted_revision: int) -> None:
        """Apply a removal this backend made of the record at ``deleted_revision``."""
        current = self._records.get(client_id)
        if current is not None and current[0] == deleted_revision:
            self._gone[client_id] = deleted_revision
            self._drop(client_id)

    def _await_revision(self, revision: int) -> None:
        """Expect the watch to bring ``revision`` (a write of this backend) soon."""
        if self._awaited_revision <= self._watch_revision:
            self._awaited_since = trio.current_time()
        self._awaited_revision = max(self._awaited_revision, revision)

    async def _reload_silent_watch(self) -> None:
        """Reload the replica when its own writes stop coming back through the
        watch for :data:`SILENT_WATCH_AFTER` seconds while the watch is open.

        In a NATS cluster, a watch whose stream's leader moved to another server
        stays silent for 10 to 20 seconds, with no connection event.
        """
        while True:
            await trio.sleep(SILENT_WATCH_AFTER / 3)
            waiting = self._awaited_revision > self._watch_revision
            if not waiting or self._watch_scope is None:
                continue
            if trio.current_time() - self._awaited_since < SILENT_WATCH_AFTER:
                continue
            self.silent_watch_reloads += 1
            logger.warning(
                "registry replica: its own write (revision %d) has not come back through "
                "the watch for %.0f s; reloading",
                self._awaited_revision,
                SILENT_WATCH_AFTER,
            )
            self._awaited_revision = 0
            self.request_reload()

    def _apply_watched(self, entry: KVEntry) -> None:
        if entry.revision > self._watch_revision:
            self._watch_revision = entry.revision
        key = entry.key
        if entry.operation is KVOperation.PUT:
            stored = self._decode(key, entry.value)
            if stored is not None:
                client_id = stored.client_id
                if self._present is not None:
                    self._present.add(client_id)
                if entry.revision <= self._known(client_id):
                    return
                self._gone.pop(client_id, None)
                if _is_hashed(key):
                    self._hashed[key] = client_id
                self._put(client_id, entry.revision, stored.node_id, entry.value)
                return
        gone = self._client_of(key)
        if gone is None or entry.revision <= self._known(gone):
            return
        if entry.operation is KVOperation.PUT:
            # Replaced by something that is not a registration: refuse older news.
            self._gone[gone] = entry.revision
        else:
            self._gone.pop(gone, None)  # the watch is ordered: nothing older comes
        self._hashed.pop(key, None)
        self._drop(gone)

    def _load_entry(self, entry: KVEntry) -> None:
        """One entry of a snapshot being loaded (the watch's ``on_snapshot``)."""
        if entry.revision > self._newest_loaded:
            self._newest_loaded = entry.revision
        self._apply_watched(entry)

    def _begin_load(self) -> None:
        self._loads += 1
        self._present = set()
        self._revision_before_load = self._watch_revision
        self._newest_loaded = 0

    def _clear(self) -> None:
        gone = list(self._records) if self._listeners else []
        self._records.clear()
        self._gone.clear()
        self._by_node.clear()
        self._node_ids.clear()
        self._hashed.clear()
        self._watch_revision = 0
        for client_id in gone:
            self._listeners.notify(client_id, None)

    def _end_load(self) -> list[str]:
        """Finish a load; return the client ids the replica holds that the snapshot
        lacks.

        :raises _StaleReplica: every revision in the snapshot was older than what
            was seen before: the stream was recreated (its data lost), so the
            replica was cleared, to be loaded again.
        """
        present = self._present if self._present is not None else set()
        self._present = None
        if 0 < self._newest_loaded < self._revision_before_load:
            self._clear()
            raise _StaleReplica("the registry's stream was recreated")
        # What the watch has passed cannot come again: no need to remember removals.
        watched = self._watch_revision
        self._gone = {client: gone for client, gone in self._gone.items() if gone > watched}
        records = self._records
        self._hashed = {key: client for key, client in self._hashed.items() if client in records}
        return [client_id for client_id in records if client_id not in present]

    async def load(self, snapshot: list[KVEntry]) -> list[str]:
        """Merge a watch snapshot given as a list into the replica; return the
        client ids the replica holds that the snapshot lacks, for the caller to
        check with the server.

        A snapshot taken right after a server restart can be short while JetStream
        recovers its stream, so absence from it alone removes nothing. The load
        checkpoints every few thousand entries. Cancelled, it leaves a partly merged
        replica that the next load completes.
        """
        newest = max((entry.revision for entry in snapshot), default=0)
        if newest and newest < self._watch_revision:
            self._clear()  # the stream was recreated
        self._begin_load()
        try:
            for index, entry in enumerate(snapshot, start=1):
                self._load_entry(entry)
                if index % _LOAD_BATCH == 0:
                    await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()
        finally:
            missing = self._end_load()
        return missing

    @asynccontextmanager
    async def _loaded_watch(self) -> AsyncIterator[tuple[KVWatch, list[str]]]:
        """Open a watch, loading its snapshot into the replica entry by entry as it
        arrives; yield it with the client ids the snapshot lacked."""
        empty = not (self._records or self._gone or self._hashed)
        self._begin_load()
        try:
            async with self._kv.watch(
                _PREFIX + ">", on_snapshot=self._load_entry, removals=not empty
            ) as watch:
                for entry in watch.take_snapshot():  # empty unless the bucket collected one
                    self._load_entry(entry)
                missing = self._end_load()
                yield watch, missing
        finally:
            if self._present is not None:
                self._present = None  # the load did not finish

    async def _confirm_absent(self, client_ids: list[str]) -> None:
        """Drop from the replica each client the server no longer holds."""

        async def check(client_id: str) -> None:
            current = self._records.get(client_id)
            if current is not None and await self._kv.get(_key(client_id)) is None:
                # Only the copy that was checked: the watch may have brought a newer
                # one while the server answered.
                self._forget_local(client_id, current[0])

        await _for_each(client_ids, check)

    def request_reload(self) -> None:
        """Drop the current watch and load the replica again from a fresh one.

        Call it when the transport reconnects: a watch opened before an outage may
        stay silent afterwards.
        """
        if self._watch_scope is not None:
            self._watch_scope.cancel()

    async def follow(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the replica current until cancelled.

        Each watch's snapshot is merged into the replica as it arrives, without a
        copy of it; clients the snapshot lacks are checked with the server (a
        snapshot right after a server restart can be short). A watch that fails,
        overflows or ends is logged, counted in :attr:`watch_failures` and
        reopened after a short pause.
        Only a closed transport ends this task (or a failure before the first load,
        which is raised to the caller of ``start``).
        """
        with single_exceptions():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reload_silent_watch)
                await self._follow(task_status)
                nursery.cancel_scope.cancel()

    async def _follow(self, task_status: trio.TaskStatus[None]) -> None:
        started = False
        while True:
            with trio.CancelScope() as scope:
                self._watch_scope = scope
                try:
                    async with self._loaded_watch() as (watch, missing):
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
                except _StaleReplica:
                    logger.warning("registry replica: the stream was recreated; reloading")
                    continue
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
        stored = _verified(key, entry.value)
        if loads == self._loads:
            self._apply_local(key, entry.revision, stored, entry.value)
        return entry.revision, _record(stored)

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
        current = self._current(client_id)
        while True:
            loads = self._loads
            try:
                if current is None:
                    revision = await self._kv.create(key, value)
                    await self._landed(key, revision, record, value, loads)
                    return None
                revision = await self._kv.update(key, value, revision=current[0])
            except (KeyExistsError, RevisionMismatchError):
                current = await self._read(key)
                continue
            await self._landed(key, revision, record, value, loads)
            previous = current[1].node_id
            return None if previous == node_id else previous

    async def reassert(
        self, client_id: str, node_id: int, metadata: bytes, *, token: int, incarnation: int
    ) -> ReassertOutcome:
        key = _key(client_id)
        current = self._current(client_id)
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
                    value = _stored(record)
                    revision = await self._kv.create(key, value)
                    await self._landed(key, revision, record, value, loads)
                    return ReassertOutcome.RESTORED
                stored_revision, stored = current
                if not owned(stored, node_id, token):
                    return ReassertOutcome.GONE
                if stored.incarnation == incarnation and stored.metadata == metadata:
                    return ReassertOutcome.KEPT
                record = ClientRecord(
                    client_id, node_id, stored.connected_at, metadata, token, incarnation
                )
                value = _stored(record)
                revision = await self._kv.update(key, value, revision=stored_revision)
                await self._landed(key, revision, record, value, loads)
                return ReassertOutcome.KEPT
            except (KeyExistsError, RevisionMismatchError):
                current = await self._read(key)

    async def _owned(
        self, client_id: str, key: str, node_id: int, token: int | None
    ) -> tuple[int, ClientRecord] | None:
        """The registration if ``node_id`` owns it (under ``token``, if given),
        confirmed with the server when the replica does not show it so."""
        current = self._current(client_id)
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
            value = _stored(record)
            loads = self._loads
            try:
                new_revision = await self._kv.update(key, value, revision=revision)
            except RevisionMismatchError:
                current = await self._read(key)
                if current is None or not owned(current[1], node_id, token):
                    return False
                continue
            await self._landed(key, new_revision, record, value, loads)
            return True
        return False

    async def get_client(self, client_id: str) -> ClientRecord | None:
        await trio.lowlevel.checkpoint()
        return self.lookup(client_id)

    def lookup(self, client_id: str) -> ClientRecord | None:
        """``get_client`` without the checkpoint: a lookup in the replica."""
        held = self._records.get(client_id)
        return None if held is None else _held_record(held)

    async def _records_of(self, held: list[_Held]) -> list[ClientRecord]:
        """Decode ``held``, checkpointing every :data:`DECODE_BATCH` entries."""
        await trio.lowlevel.checkpoint()
        records = []
        for index, entry in enumerate(held, start=1):
            records.append(_held_record(entry))
            if index % DECODE_BATCH == 0:
                await trio.lowlevel.checkpoint()
        return records

    async def list_clients(self) -> list[ClientRecord]:
        return await self._records_of(list(self._records.values()))

    async def list_clients_for_node(self, node_id: int) -> list[ClientRecord]:
        records = self._records
        return await self._records_of(
            [records[client] for client in self._by_node.get(node_id, ())]
        )

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
        current = self._current(client_id)
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
        targets = [
            record.client_id
            for record in await self.list_clients_for_node(node_id)
            if fenced(record, node_id, incarnation)
        ]

        async def clean(client_id: str) -> None:
            record = await self.cleanup_client(client_id, node_id, incarnation=incarnation)
            if record is not None:
                removed.append(record)

        await _for_each(targets, clean)
        return removed


@asynccontextmanager
async def open_kv_registry_backend(
    transport: Transport, key: str
) -> AsyncIterator[KVRegistryBackend]:
    """Open the KV registry backend of the mesh called ``key``, for the block.

    On entry the bucket is opened (created if needed) and the replica is loaded, so
    reads are complete at once. A task in the block's nursery keeps the replica
    current; leaving the block stops it.
    """
    async with open_kv_registry_backend_in_namespace(transport, key, "") as backend:
        yield backend


@asynccontextmanager
async def open_kv_registry_backend_in_namespace(
    transport: Transport, key: str, namespace: str
) -> AsyncIterator[KVRegistryBackend]:
    """:func:`open_kv_registry_backend` for a layer built on nodes, in the bucket of
    its ``namespace`` (see :func:`registry_bucket`). Internal to meshline."""
    kv = await transport.key_value(registry_bucket(key, namespace))
    backend = KVRegistryBackend(kv)
    with single_exceptions():
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.follow)
            try:
                yield backend
            finally:
                nursery.cancel_scope.cancel()
