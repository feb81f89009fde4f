"""Registry backends against the shared conformance suite, and the typed registry."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path

import attrs
import msgspec
import pytest
import trio
import trio.testing

import meshline
from meshline._registry._kv import _key
from meshline._transport._buffer import MessageBuffer, Overflow
from meshline._transport._seam import KeyValue, KVEntry, KVWatch
from meshline.testing import HOSTILE_CLIENT_IDS, RegistryBackendSuite

from .conftest import OpenTransport


class TestMemoryBackend(RegistryBackendSuite):
    @asynccontextmanager
    async def open_backends(self, count: int) -> AsyncIterator[list[meshline.RegistryBackend]]:
        backend = meshline.MemoryRegistryBackend()
        yield [backend] * count


class TestSQLiteBackend(RegistryBackendSuite):
    """Each node's handle is a connection of its own to one database file."""

    @pytest.fixture(autouse=True)
    def _database(self, tmp_path: Path, unique: Callable[[str], str]) -> None:
        self.path = tmp_path / f"{unique('registry')}.sqlite"

    @asynccontextmanager
    async def open_backends(self, count: int) -> AsyncIterator[list[meshline.RegistryBackend]]:
        backends = [meshline.SQLiteRegistryBackend(self.path) for _ in range(count)]
        try:
            yield list(backends)
        finally:
            for backend in backends:
                backend.close()


class TestKVBackend(RegistryBackendSuite):
    """The KV backend, each node on a transport of its own, over memory and NATS."""

    @pytest.fixture(autouse=True)
    def _transports(self, open_transport: OpenTransport, unique: Callable[[str], str]) -> None:
        self.open_transport = open_transport
        self.key = unique("registry")

    @asynccontextmanager
    async def open_backends(self, count: int) -> AsyncIterator[list[meshline.RegistryBackend]]:
        async with AsyncExitStack() as stack:
            backends: list[meshline.RegistryBackend] = []
            for _ in range(count):
                transport = await stack.enter_async_context(self.open_transport())
                backend = meshline.open_kv_registry_backend(transport, self.key)
                backends.append(await stack.enter_async_context(backend))
            yield backends


@attrs.frozen
class UserMeta:
    user_id: str
    roles: list[str]


class StructMeta(msgspec.Struct):
    user_id: str
    score: float


@pytest.mark.parametrize(
    ("metadata_type", "metadata"),
    [
        (UserMeta, UserMeta("u.1 *>", ["admin"])),
        (StructMeta, StructMeta("ü", 1.5)),
        (dict, {"user": "x", "nested": {"a": [1, 2]}}),
    ],
)
async def test_typed_metadata_round_trips(metadata_type: type, metadata: object) -> None:
    registry: meshline.ClientRegistry[object] = meshline.ClientRegistry(
        7, meshline.MemoryRegistryBackend(), metadata_type=metadata_type
    )
    registration = await registry.register("client", metadata)
    assert registration.superseded is None and registration.node_id == 7
    client = await registry.get_client("client")
    assert client == meshline.RegisteredClient(
        "client", 7, client.connected_at, metadata, registration.token
    )
    assert await registry.list_clients_for_node() == [client]


async def test_bad_input_is_refused_and_leaves_state_alone() -> None:
    registry: meshline.ClientRegistry[dict[str, object]] = meshline.ClientRegistry(
        1, meshline.MemoryRegistryBackend()
    )
    await registry.register("kept", {"v": 1})
    for bad in ["", "x" * 1025, "\ud800", None]:
        with pytest.raises(meshline.InvalidArgumentError):
            await registry.register(bad, {})  # type: ignore[arg-type]
    with pytest.raises(meshline.PayloadError):
        await registry.register("kept", {"v": object()})
    kept = await registry.get_client("kept")
    assert kept is not None and kept.metadata == {"v": 1}
    assert [c.client_id for c in await registry.list_clients()] == ["kept"]


async def test_stored_metadata_of_the_wrong_shape_is_a_clear_error() -> None:
    backend = meshline.MemoryRegistryBackend()
    await meshline.ClientRegistry(1, backend).register("c", {"not": "a user"})
    typed: meshline.ClientRegistry[UserMeta] = meshline.ClientRegistry(
        1, backend, metadata_type=UserMeta
    )
    with pytest.raises(meshline.PayloadError):
        await typed.get_client("c")
    assert await backend.get_client("c") is not None


async def test_lenient_decoding_keeps_metadata_that_does_not_decode() -> None:
    backend = meshline.MemoryRegistryBackend()
    await backend.register("broken", 1, b"\xc1 not msgpack", token=4, incarnation=2)
    registry: meshline.ClientRegistry[UserMeta] = meshline.ClientRegistry(
        1, backend, metadata_type=UserMeta
    )
    record = await backend.get_client("broken")
    assert record is not None
    with pytest.raises(meshline.PayloadError):
        registry.decode_client(record)
    client = registry.decode_client(record, lenient=True)
    assert client == meshline.RegisteredClient(
        "broken", 1, record.connected_at, b"\xc1 not msgpack", 4, 2
    )


async def test_each_registration_gets_its_own_token() -> None:
    registry: meshline.ClientRegistry[dict[str, int]] = meshline.ClientRegistry(
        1, meshline.MemoryRegistryBackend()
    )
    tokens = {(await registry.register("c", {"n": n})).token for n in range(20)}
    assert len(tokens) == 20 and 0 not in tokens


async def test_a_reloaded_replica_keeps_what_a_short_snapshot_lacks_until_the_server_says() -> None:
    """Right after a server restart a watch snapshot can be short while JetStream
    recovers; the replica must not drop registrations only because of that."""
    async with meshline.open_memory_transport() as transport:
        async with meshline.open_kv_registry_backend(transport, "short") as backend:
            await backend.register("kept", 1, b"")
            await backend.register("deleted meanwhile", 1, b"")
            kv = await transport.key_value(meshline._registry._kv.registry_bucket("short"))
            async with kv.watch() as watch:
                full = watch.snapshot
            assert [entry.key for entry in full] == [_key("kept"), _key("deleted meanwhile")]
            short = [entry for entry in full if entry.key != full[0].key]
            missing = await backend.load(short)
            assert missing == ["kept"]
            assert {record.client_id for record in await backend.list_clients()} == {
                "kept",
                "deleted meanwhile",
            }
            await kv.delete(full[1].key)
            backend.request_reload()
            with trio.fail_after(10):
                while len(await backend.list_clients()) != 1:
                    await trio.sleep(0.01)


class BoundRegistry(meshline.ClientRegistry[dict[str, int]]):
    """A registry whose node is at incarnation 7, as a node-bound subclass would be."""

    @property
    def incarnation(self) -> int:
        return 7


async def test_the_registry_records_its_token_and_incarnation_and_honours_tokens() -> None:
    backend = meshline.MemoryRegistryBackend()
    registry = BoundRegistry(1, backend)
    first = await registry.register("c", {"n": 1})
    record = await backend.get_client("c")
    assert record is not None and (record.token, record.incarnation) == (first.token, 7)
    second = await registry.register("c", {"n": 2})
    assert second.token != first.token and second.superseded is None
    assert await registry.update_metadata("c", {"late": 1}, token=first.token) is False
    assert await registry.unregister("c", token=first.token) is False
    assert await registry.update_metadata("c", {"n": 3}, token=second.token) is True
    client = await registry.get_client("c")
    assert client is not None and (client.metadata, client.token) == ({"n": 3}, second.token)
    assert await registry.cleanup_node(incarnation=6) == []
    removed = await registry.cleanup_node(incarnation=7)
    assert [(c.client_id, c.token, c.incarnation) for c in removed] == [("c", second.token, 7)]
    elsewhere = await meshline.ClientRegistry(2, backend).register("d", {})
    moved = await registry.register("d", {})
    assert (elsewhere.superseded, moved.superseded) == (None, 2)


class ScriptedKV(KeyValue):
    """A bucket that forwards to ``inner``, with faults a test sets by hand.

    - :attr:`refuse_watch`: raised when a watch is opened.
    - :attr:`break_watch`: raised by the open watch instead of its next entry (which
      is lost, as entries are when a watch overflows), once.
    - :meth:`silence`: watches open now deliver nothing more, as after a reconnect.
    - :attr:`hold_answers`: writes land on the server, then wait for this event
      before answering, so a test can act between a write and its answer.
    """

    def __init__(self, inner: KeyValue) -> None:
        self.bucket = inner.bucket
        self.inner = inner
        self.refuse_watch: Exception | None = None
        self.break_watch: BaseException | None = None
        self.hold_answers: trio.Event | None = None
        self.write_landed = trio.Event()
        self.watches_opened = 0
        self.silenced = 0
        self.watches: list[ScriptedWatch] = []

    def silence(self) -> None:
        self.silenced = self.watches_opened

    async def _answer(self) -> None:
        if self.hold_answers is not None:
            self.write_landed.set()
            await self.hold_answers.wait()

    async def get(self, key: str) -> KVEntry | None:
        return await self.inner.get(key)

    async def put(self, key: str, value: bytes, *, ttl: int | None = None) -> int:
        revision = await self.inner.put(key, value, ttl=ttl)
        await self._answer()
        return revision

    async def create(self, key: str, value: bytes, *, ttl: int | None = None) -> int:
        revision = await self.inner.create(key, value, ttl=ttl)
        await self._answer()
        return revision

    async def update(self, key: str, value: bytes, *, revision: int, ttl: int | None = None) -> int:
        new_revision = await self.inner.update(key, value, revision=revision, ttl=ttl)
        await self._answer()
        return new_revision

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        await self.inner.delete(key, revision=revision)
        await self._answer()

    async def purge(self, key: str, *, revision: int | None = None) -> None:
        await self.inner.purge(key, revision=revision)
        await self._answer()

    async def keys(self) -> list[str]:
        return await self.inner.keys()

    def watch(
        self,
        pattern: str = ">",
        *,
        on_snapshot: Callable[[KVEntry], None] | None = None,
        removals: bool = True,
    ) -> AbstractAsyncContextManager[KVWatch]:
        return self._watch(pattern, on_snapshot, removals)

    @asynccontextmanager
    async def _watch(
        self, pattern: str, on_snapshot: Callable[[KVEntry], None] | None, removals: bool
    ) -> AsyncIterator[KVWatch]:
        if self.refuse_watch is not None:
            raise self.refuse_watch
        async with self.inner.watch(pattern, on_snapshot=on_snapshot, removals=removals) as inner:
            self.watches_opened += 1
            watch = ScriptedWatch(inner, self, self.watches_opened)
            self.watches.append(watch)
            yield watch


class ScriptedWatch(KVWatch):
    def __init__(self, inner: KVWatch, kv: ScriptedKV, number: int) -> None:
        super().__init__(inner.snapshot, MessageBuffer(1, Overflow.ERROR, "scripted watch"))
        self._inner = inner
        self._kv = kv
        self._number = number

    def take_snapshot(self) -> list[KVEntry]:
        self._inner.take_snapshot()
        return super().take_snapshot()

    @property
    def inner_snapshot(self) -> list[KVEntry]:
        return self._inner.snapshot

    async def _next_raw(self) -> KVEntry:
        while True:
            entry = await self._inner.__anext__()
            failure, self._kv.break_watch = self._kv.break_watch, None
            if failure is not None:
                raise failure
            if self._number > self._kv.silenced:
                return entry


Scripted = tuple[ScriptedKV, meshline.KVRegistryBackend, meshline.KVRegistryBackend]


@asynccontextmanager
async def scripted_backends() -> AsyncIterator[Scripted]:
    """A following backend on a :class:`ScriptedKV`, and a second node's handle on
    the same bucket (without a replica of its own: it only writes)."""
    async with meshline.open_memory_transport() as transport:
        inner = await transport.key_value("scripted")
        kv = ScriptedKV(inner)
        backend = meshline.KVRegistryBackend(kv)
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.follow)
            yield kv, backend, meshline.KVRegistryBackend(inner)
            nursery.cancel_scope.cancel()


async def eventually(check: Callable[[], bool | Awaitable[bool]]) -> None:
    with trio.fail_after(10):
        while True:
            result = check()
            if result if isinstance(result, bool) else await result:
                return
            await trio.sleep(0.01)


@pytest.mark.parametrize(
    "failure",
    [
        meshline.SubscriptionOverflowError("c.>", 10_000),
        meshline.TransportError("connection lost"),
        RuntimeError("a bug in the transport"),
        StopAsyncIteration(),
    ],
    ids=["overflow", "transport-error", "unexpected-error", "watch-ended"],
)
async def test_a_failing_replica_watch_is_logged_counted_and_reopened(
    failure: BaseException,
    caplog: pytest.LogCaptureFixture,
    autojump_clock: trio.abc.Clock,
) -> None:
    caplog.set_level(logging.WARNING, logger="meshline.registry")
    async with scripted_backends() as (kv, backend, other):
        await other.register("stays", 2, b"")
        await other.register("goes", 2, b"")
        await eventually(lambda: backend.lookup("goes") is not None)
        kv.break_watch = failure
        # The failure eats this deletion's entry; only a reopened watch can tell.
        assert await other.unregister("goes", 2)
        await other.register("arrives", 2, b"")
        await eventually(lambda: backend.lookup("arrives") is not None)
        assert backend.lookup("goes") is None
        assert {record.client_id for record in await backend.list_clients()} == {
            "stays",
            "arrives",
        }
        assert (backend.watch_failures, kv.watches_opened) == (1, 2)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "watch failed" in warnings[0].getMessage()


async def test_a_closed_transport_ends_the_replica_task() -> None:
    async with meshline.open_memory_transport() as transport:
        kv = ScriptedKV(await transport.key_value("closing"))
        backend = meshline.KVRegistryBackend(kv)
        writer = meshline.KVRegistryBackend(kv.inner)

        async def close_it() -> None:
            await eventually(lambda: kv.watches_opened == 1)
            kv.break_watch = meshline.TransportClosedError("closed")
            await writer.register("c", 1, b"")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(close_it)
            with pytest.raises(meshline.TransportClosedError):
                await backend.follow()
        assert backend.watch_failures == 0


async def test_a_watch_that_cannot_open_at_first_is_raised_to_the_starter() -> None:
    async with meshline.open_memory_transport() as transport:
        kv = ScriptedKV(await transport.key_value("never"))
        kv.refuse_watch = meshline.TransportError("no stream")
        backend = meshline.KVRegistryBackend(kv)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                with pytest.raises(meshline.TransportError, match="no stream"):
                    await nursery.start(backend.follow)


async def test_request_reload_revives_a_watch_silenced_by_a_reconnect(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with scripted_backends() as (kv, backend, other):
        kv.silence()
        await other.register("during the outage", 2, b"")
        await trio.sleep(5)
        assert backend.lookup("during the outage") is None
        backend.request_reload()
        await eventually(lambda: backend.lookup("during the outage") is not None)
        await other.register("after", 2, b"")
        await eventually(lambda: backend.lookup("after") is not None)
        assert (backend.watch_failures, kv.watches_opened) == (0, 2)


async def test_a_write_answered_after_a_reload_does_not_bring_back_a_removed_record() -> None:
    """The answer to a write sent before a reload may be older than a deletion the
    new snapshot left out; applying it would show a client the server no longer has."""
    async with scripted_backends() as (kv, backend, leader):
        kv.silence()
        kv.hold_answers = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.register, "c", 1, b"")
            with trio.fail_after(5):
                await kv.write_landed.wait()
            assert await leader.cleanup_client("c", 1) is not None
            backend.request_reload()
            await eventually(lambda: kv.watches_opened == 2)
            await trio.testing.wait_all_tasks_blocked()
            kv.hold_answers.set()
        assert await kv.get(_key("c")) is None
        assert backend.lookup("c") is None


async def test_a_watched_value_that_is_not_a_registration_is_logged_and_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="meshline.registry")
    async with scripted_backends() as (kv, backend, _):
        await backend.register("c", 1, b"")
        await kv.inner.put(_key("c"), b"\xc1 not a registration")
        await eventually(lambda: backend.lookup("c") is None)
        assert await backend.list_clients() == []
        assert "not a registration" in caplog.text
        assert backend.watch_failures == 0


@asynccontextmanager
async def frozen_replica() -> AsyncIterator[tuple[meshline.KVRegistryBackend, KeyValue]]:
    """A backend whose replica never follows the bucket (it holds its own writes
    only), so every decision it must make against the server is seen to be."""
    async with meshline.open_memory_transport() as transport:
        kv = await transport.key_value("frozen")
        yield meshline.KVRegistryBackend(kv), kv


@pytest.mark.parametrize("incarnation", [1, 2])
async def test_kv_reassert_decides_on_the_server_not_the_replica(incarnation: int) -> None:
    async with frozen_replica() as (owner, kv):
        leader = meshline.KVRegistryBackend(kv)
        for client_id in HOSTILE_CLIENT_IDS:
            await owner.register(client_id, 1, b"m", token=5, incarnation=1)
            assert await leader.cleanup_client(client_id, 1, incarnation=1) is not None
            assert owner.lookup(client_id) is not None  # the stale copy
            outcome = await owner.reassert(client_id, 1, b"m", token=5, incarnation=incarnation)
            assert outcome is meshline.ReassertOutcome.RESTORED
            stored = await leader.reassert(client_id, 1, b"m", token=5, incarnation=incarnation)
            assert stored is meshline.ReassertOutcome.KEPT
            # Taken over on the server, still the owner's in its replica: gone.
            await leader.register(client_id, 2, b"elsewhere")
            outcome = await owner.reassert(client_id, 1, b"m", token=5, incarnation=incarnation)
            assert outcome is meshline.ReassertOutcome.GONE
            record = await leader.get_client(client_id)
            assert record is not None and record.node_id == 2


async def test_kv_writes_confirm_with_the_server_when_the_replica_says_no() -> None:
    async with frozen_replica() as (stale, kv):
        writer = meshline.KVRegistryBackend(kv)
        # The replica saw node 2 (or an old token, or a newer incarnation); the
        # server holds node 1's registration, which the stale handle must act on.
        await stale.register("moved", 2, b"")
        await writer.register("moved", 1, b"", incarnation=1)
        removed = await stale.cleanup_client("moved", 1, incarnation=1)
        assert removed is not None and removed.node_id == 1
        await stale.register("reincarnated", 1, b"", incarnation=3)
        await writer.register("reincarnated", 1, b"", incarnation=1)
        assert await stale.cleanup_client("reincarnated", 1, incarnation=1) is not None
        await stale.register("reconnected", 1, b"", token=1)
        await writer.register("reconnected", 1, b"", token=2)
        assert await stale.update_metadata("reconnected", 1, b"edited", token=2) is True
        assert await stale.unregister("reconnected", 1, token=2) is True
        for client_id in ("moved", "reincarnated", "reconnected"):
            assert await kv.get(_key(client_id)) is None


async def test_a_replica_reloads_from_scratch_when_the_stream_was_recreated(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A bucket lost and created again starts its revisions over: its snapshot,
    loaded entry by entry, must replace what the replica knew, not lose to it."""
    async with scripted_backends() as (kv, backend, other):
        for index in range(10):
            await other.register(f"before {index}", 2, b"")
        await eventually(lambda: backend.lookup("before 9") is not None)
        async with meshline.open_memory_transport() as transport:
            recreated = await transport.key_value("recreated")
            # The same client, at a revision lower than the one the replica knew.
            await meshline.KVRegistryBackend(recreated).register("before 9", 3, b"new")
            kv.inner = recreated
            backend.request_reload()
            await eventually(lambda: len(kv.watches) >= 2)
            await eventually(lambda: backend.lookup("before 0") is None)
            record = backend.lookup("before 9")
            assert record is not None and (record.node_id, record.metadata) == (3, b"new")
            assert await backend.list_clients() == [record]
            assert await backend.node_ids() == {3}
            assert backend.watch_failures == 0


async def test_a_replica_whose_watch_went_silent_reloads(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    """The watch stops delivering with no connection event (a NATS stream's leader
    moved): the replica notices that its own write does not come back, and reloads,
    so it sees what other nodes registered meanwhile."""
    from meshline.testing import FaultyTransport

    key = unique("silent")
    async with open_transport() as inner, open_transport() as other_transport:
        faults = FaultyTransport(inner)
        async with (
            meshline.open_kv_registry_backend(faults, key) as silenced,
            meshline.open_kv_registry_backend(other_transport, key) as other,
        ):
            faults.silence_watches()
            await silenced.register("mine", 1, b"m")
            await other.register("theirs", 2, b"m")
            with trio.fail_after(30):
                while await silenced.get_client("theirs") is None:
                    await trio.sleep(0.05)
            assert isinstance(silenced, meshline.KVRegistryBackend)
            assert silenced.silent_watch_reloads >= 1
