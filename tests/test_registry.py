"""Registry backends against the shared conformance suite, and the typed registry."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import attrs
import msgspec
import pytest
import trio

import meshline
from meshline.testing import RegistryBackendSuite

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
            kv = await transport.key_value(meshline._registry_kv.registry_bucket("short"))
            async with kv.watch() as watch:
                full = watch.snapshot
            short = [entry for entry in full if entry.key != full[0].key]
            missing = backend.load(short)
            assert missing == [full[0].key]
            assert {record.client_id for record in await backend.list_clients()} == {
                "kept",
                "deleted meanwhile",
            }
            await kv.delete(full[1].key)
            backend.request_reload()
            with trio.fail_after(10):
                while len(await backend.list_clients()) != 1:
                    await trio.sleep(0.01)
