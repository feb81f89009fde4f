"""The client registry: which client is connected to which node, ownership-safe.

A *registration* says "client X is connected to node N, since T, with metadata M".
Every write names the node making it, and the backend refuses writes from a node
that no longer owns the registration. That is what keeps a stale node (one that
lost a client to another node, or was declared dead) from clobbering newer truth.

The rules, which every backend implements and :mod:`meshline.testing` checks:

- ``restore`` writes only where no registration exists.

- ``register`` always wins: it replaces any registration atomically, and reports
  which other node held the client before, if any.
- ``unregister`` and ``update_metadata`` act only if the caller's node owns the
  registration at that moment; otherwise they change nothing and return False.
- ``cleanup_node`` removes exactly the registrations the dead node still owns.
"""

from __future__ import annotations

import time
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import attrs
import cattrs
import msgspec

from ._errors import PayloadError
from ._names import check_name

__all__ = [
    "MAX_CLIENT_ID_BYTES",
    "ClientRecord",
    "ClientRegistry",
    "RegisteredClient",
    "RegistryBackend",
    "check_client_id",
    "now_ms",
]

MetadataT = TypeVar("MetadataT")

MAX_CLIENT_ID_BYTES = 1024
"""The longest client id accepted, in UTF-8 bytes."""


def now_ms() -> int:
    """The wall clock in epoch milliseconds, as backends record ``connected_at``."""
    return int(time.time() * 1000)


def check_client_id(client_id: str) -> str:
    """Check that ``client_id`` is a non-empty str of at most 1 KiB; return it.

    :raises InvalidNameError: it is not (an :class:`InvalidArgumentError`).
    """
    return check_name(client_id, "client id", MAX_CLIENT_ID_BYTES)


@attrs.frozen
class ClientRecord:
    """A registration as backends store it: the metadata is already encoded."""

    client_id: str
    node_id: int
    connected_at: int
    """When the client registered, in epoch milliseconds, set by the backend."""
    metadata: bytes


@attrs.frozen
class RegisteredClient(Generic[MetadataT]):
    """A client's registration: where it is connected, since when, with what metadata."""

    client_id: str
    node_id: int
    connected_at: int
    """When the client registered on ``node_id``, in epoch milliseconds."""
    metadata: MetadataT


@runtime_checkable
class RegistryBackend(Protocol):
    """Where registrations live. Implement this to store them somewhere else.

    Every method may be called concurrently from many tasks and many nodes, and must
    follow the ownership rules of :mod:`meshline._registry` atomically. Metadata is
    opaque bytes. Run ``meshline.testing.RegistryBackendSuite`` against your backend.
    """

    async def register(self, client_id: str, node_id: int, metadata: bytes) -> int | None:
        """Record ``client_id`` on ``node_id``, replacing any registration.

        Returns the node that held it before if that is another node, else None.
        """
        ...

    async def restore(self, client_id: str, node_id: int, metadata: bytes) -> bool:
        """Record ``client_id`` on ``node_id`` only if nobody holds it; return whether it did.

        Used to re-assert a registration that was lost, without taking a client
        back from a node it has since moved to.
        """
        ...

    async def unregister(self, client_id: str, node_id: int) -> bool:
        """Remove the registration if ``node_id`` owns it; return whether it did."""
        ...

    async def update_metadata(self, client_id: str, node_id: int, metadata: bytes) -> bool:
        """Replace the metadata if ``node_id`` owns the registration; keep ``connected_at``."""
        ...

    async def get_client(self, client_id: str) -> ClientRecord | None:
        """The registration of ``client_id``, or None."""
        ...

    async def list_clients(self) -> list[ClientRecord]:
        """Every registration."""
        ...

    async def list_clients_for_node(self, node_id: int) -> list[ClientRecord]:
        """The registrations ``node_id`` owns."""
        ...

    async def cleanup_node(self, node_id: int) -> list[ClientRecord]:
        """Remove the registrations ``node_id`` still owns; return what was removed."""
        ...

    async def count_clients_for_node(self, node_id: int) -> int:
        """How many registrations ``node_id`` owns."""
        ...


class _MetadataCodec(Generic[MetadataT]):
    """Metadata to bytes and back: msgspec for Structs and builtins, cattrs for attrs."""

    def __init__(self, metadata_type: Any) -> None:
        self._type = metadata_type
        self._converter = cattrs.Converter()
        self._use_cattrs = attrs.has(metadata_type)
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(
            Any if self._use_cattrs else metadata_type
        )

    def encode(self, metadata: MetadataT) -> bytes:
        try:
            if self._use_cattrs:
                return msgspec.msgpack.encode(self._converter.unstructure(metadata))
            return msgspec.msgpack.encode(metadata)
        except (TypeError, ValueError, OverflowError) as exc:
            raise PayloadError(f"cannot encode client metadata: {exc}") from exc

    def decode(self, raw: bytes) -> MetadataT:
        try:
            value = self._decoder.decode(raw)
            if self._use_cattrs:
                return self._converter.structure(value, self._type)  # type: ignore[no-any-return]
            return value  # type: ignore[no-any-return]
        except (msgspec.MsgspecError, cattrs.BaseValidationError, TypeError, ValueError) as exc:
            raise PayloadError(f"stored client metadata does not decode: {exc}") from exc


class ClientRegistry(Generic[MetadataT]):
    """Ownership-safe client registrations, bound to one node.

    ``metadata_type`` is what metadata decodes into: a ``msgspec.Struct``, an attrs
    class, ``dict`` (the default) or any type msgspec understands. Every method is a
    call into the backend; cancellation may leave a write done or not done, never
    half done.
    """

    def __init__(
        self, node_id: int, backend: RegistryBackend, *, metadata_type: Any = dict
    ) -> None:
        self.node_id = node_id
        self.backend = backend
        self._codec: _MetadataCodec[MetadataT] = _MetadataCodec(metadata_type)

    def _client(self, record: ClientRecord) -> RegisteredClient[MetadataT]:
        return RegisteredClient(
            record.client_id,
            record.node_id,
            record.connected_at,
            self._codec.decode(record.metadata),
        )

    async def register(self, client_id: str, metadata: MetadataT) -> int | None:
        """Register ``client_id`` on this node; return the node it moved from, if any.

        The backend records ``connected_at``. A registration on another node is
        replaced atomically, and that node's id is returned; otherwise None.

        :raises InvalidArgumentError: a bad client id.
        :raises PayloadError: metadata that cannot be encoded.
        """
        check_client_id(client_id)
        return await self._register_encoded(client_id, self._codec.encode(metadata))

    async def _register_encoded(self, client_id: str, encoded: bytes) -> int | None:
        return await self.backend.register(client_id, self.node_id, encoded)

    async def unregister(self, client_id: str) -> bool:
        """Remove the registration, only if this node owns it; return whether it did."""
        check_client_id(client_id)
        return await self.backend.unregister(client_id, self.node_id)

    async def update_metadata(self, client_id: str, metadata: MetadataT) -> bool:
        """Replace the metadata, only if this node owns the registration.

        ``connected_at`` is kept. Returns False if the client is not registered here.
        """
        check_client_id(client_id)
        return await self._update_encoded(client_id, self._codec.encode(metadata))

    async def _update_encoded(self, client_id: str, encoded: bytes) -> bool:
        return await self.backend.update_metadata(client_id, self.node_id, encoded)

    async def get_client(self, client_id: str) -> RegisteredClient[MetadataT] | None:
        """The registration of ``client_id`` on any node, or None."""
        check_client_id(client_id)
        record = await self.backend.get_client(client_id)
        return None if record is None else self._client(record)

    async def list_clients(self) -> list[RegisteredClient[MetadataT]]:
        """Every registration on every node."""
        return [self._client(record) for record in await self.backend.list_clients()]

    async def list_clients_for_node(
        self, node_id: int | None = None
    ) -> list[RegisteredClient[MetadataT]]:
        """The registrations of ``node_id`` (this node by default)."""
        node = self.node_id if node_id is None else node_id
        records = await self.backend.list_clients_for_node(node)
        return [self._client(record) for record in records]

    async def count_clients_for_node(self, node_id: int | None = None) -> int:
        """How many registrations ``node_id`` (this node by default) owns."""
        node = self.node_id if node_id is None else node_id
        return await self.backend.count_clients_for_node(node)

    async def cleanup_node(self, node_id: int | None = None) -> list[RegisteredClient[MetadataT]]:
        """Remove what ``node_id`` (this node by default) still owns; return it.

        Clients that re-registered on another node are left alone.
        """
        node = self.node_id if node_id is None else node_id
        return [self._client(record) for record in await self.backend.cleanup_node(node)]
