"""The client registry: which client is connected to which node, ownership-safe.

A *registration* says "client X is connected to node N, since T, with metadata M".
Every write names the node making it, and the backend refuses writes from a node
that no longer owns the registration. That is what keeps a stale node (one that
lost a client to another node, or was declared dead) from clobbering newer truth.

The rules, which every backend implements and :mod:`meshline.testing` checks:

- ``register`` always wins: it replaces any registration atomically, and reports
  which other node held the client before, if any. Each registration carries a
  token, chosen by the registering side, and the registering node's incarnation.
- ``unregister`` and ``update_metadata`` act only if the caller's node owns the
  registration at that moment (and, given a token, only if it is that
  registration); otherwise they change nothing and return False.
- ``reassert`` writes a node's own registration back where nothing is registered,
  refreshes it where the same node and token hold it, and gives up otherwise. It
  decides on the store's current state, never on a possibly stale copy.
- ``cleanup_node`` and ``cleanup_client`` remove exactly the registrations the dead
  node still owns, written by the given incarnation or an older one.
"""

from __future__ import annotations

import enum
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import attrs
import cattrs
import msgspec
import trio

from .._errors import PayloadError
from .._transport._names import check_name

__all__ = [
    "MAX_CLIENT_ID_BYTES",
    "ClientRecord",
    "ChangeFeed",
    "ChangeListener",
    "ChangeListeners",
    "ClientRegistry",
    "LocalLookup",
    "ReassertOutcome",
    "Reloadable",
    "RegisteredClient",
    "Registration",
    "RegistryBackend",
    "check_client_id",
    "now_ms",
]

MetadataT = TypeVar("MetadataT")

logger = logging.getLogger("meshline.registry")

MAX_CLIENT_ID_BYTES = 1024
"""The longest client id accepted, in UTF-8 bytes."""

DECODE_BATCH = 1_000
"""Listings decode this many clients' metadata between two checkpoints."""


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
    token: int = 0
    """Names this registration among the registrations of the same client."""
    incarnation: int = 0
    """The owner node's incarnation when it last wrote the record."""


@attrs.frozen
class RegisteredClient(Generic[MetadataT]):
    """A client's registration: where it is connected, since when, with what metadata."""

    client_id: str
    node_id: int
    connected_at: int
    """When the client registered on ``node_id``, in epoch milliseconds."""
    metadata: MetadataT
    token: int = 0
    """Names this registration; see :class:`Registration`."""
    incarnation: int = 0
    """The owner node's incarnation when it last wrote the registration."""


@attrs.frozen
class Registration:
    """What :meth:`ClientRegistry.register` did.

    Pass :attr:`token` to ``unregister`` and ``update_metadata`` so that a late call
    made for an older connection of the same client never touches this registration.
    """

    client_id: str
    node_id: int
    token: int
    superseded: int | None
    """The other node that held the client before, if any."""


class ReassertOutcome(enum.StrEnum):
    """What :meth:`RegistryBackend.reassert` found and did."""

    RESTORED = "restored"
    """Nothing was registered: the registration was written again."""
    KEPT = "kept"
    """The same node and token hold it; its incarnation is now up to date."""
    GONE = "gone"
    """Another node, or a newer registration, holds the client: forget it."""


def new_token() -> int:
    """A fresh registration token: random, never 0 (0 is "no token recorded")."""
    return secrets.randbits(62) + 1


def owned(record: ClientRecord | None, node_id: int, token: int | None) -> bool:
    """Whether ``record`` belongs to ``node_id`` (and to registration ``token``)."""
    return (
        record is not None
        and record.node_id == node_id
        and (token is None or record.token == token)
    )


def fenced(record: ClientRecord | None, node_id: int, incarnation: int | None) -> bool:
    """Whether a cleanup of ``node_id`` up to ``incarnation`` may remove ``record``."""
    return (
        record is not None
        and record.node_id == node_id
        and (incarnation is None or record.incarnation <= incarnation)
    )


@runtime_checkable
class RegistryBackend(Protocol):
    """Where registrations live. Implement this to store them somewhere else.

    Every method may be called concurrently from many tasks and many nodes, and must
    follow the ownership rules of :mod:`meshline._registry._core` atomically. Metadata is
    opaque bytes. Run ``meshline.testing.RegistryBackendSuite`` against your backend.
    """

    async def register(
        self,
        client_id: str,
        node_id: int,
        metadata: bytes,
        *,
        token: int = 0,
        incarnation: int = 0,
    ) -> int | None:
        """Record ``client_id`` on ``node_id``, replacing any registration.

        Returns the node that held it before if that is another node, else None.
        """
        ...

    async def reassert(
        self, client_id: str, node_id: int, metadata: bytes, *, token: int, incarnation: int
    ) -> ReassertOutcome:
        """Write a node's own registration back, or confirm it, from the store's
        current state (never a cached copy).

        Absent: write it (``RESTORED``). Held by ``node_id`` under ``token``: bring
        its metadata and incarnation up to date (``KEPT``). Held by anyone else, or by
        another registration of ``node_id``: change nothing (``GONE``).
        """
        ...

    async def unregister(self, client_id: str, node_id: int, *, token: int | None = None) -> bool:
        """Remove the registration if ``node_id`` owns it (and it carries ``token``,
        if given); return whether it did."""
        ...

    async def update_metadata(
        self, client_id: str, node_id: int, metadata: bytes, *, token: int | None = None
    ) -> bool:
        """Replace the metadata under the same condition as :meth:`unregister`; keep
        ``connected_at``, the token and the incarnation."""
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

    async def cleanup_client(
        self, client_id: str, node_id: int, *, incarnation: int | None = None
    ) -> ClientRecord | None:
        """Remove the registration if ``node_id`` owns it and wrote it as
        ``incarnation`` or older (any, if None); return what was removed."""
        ...

    async def cleanup_node(
        self, node_id: int, *, incarnation: int | None = None
    ) -> list[ClientRecord]:
        """Remove what ``node_id`` still owns under the condition of
        :meth:`cleanup_client`; return what was removed."""
        ...

    async def count_clients_for_node(self, node_id: int) -> int:
        """How many registrations ``node_id`` owns."""
        ...

    async def node_ids(self) -> set[int]:
        """The nodes that own at least one registration (from an index where the
        store has one: it should not cost a listing of every registration)."""
        ...


@runtime_checkable
class LocalLookup(Protocol):
    """A backend that keeps a local replica of the registrations, and can answer for
    one client without I/O.

    The client service routes invokes through :meth:`lookup` when the backend
    implements it, and through ``get_client`` otherwise.
    """

    def lookup(self, client_id: str) -> ClientRecord | None:
        """The registration of ``client_id`` in the replica, or None: ``get_client``
        without the checkpoint. The replica may lag the store a little."""
        ...


ChangeListener = Callable[[str, ClientRecord | None], None]
"""Called as ``listener(client_id, record)`` when a backend's view of a client
changes: ``record`` is its registration now, or None once it is gone."""


@runtime_checkable
class ChangeFeed(Protocol):
    """A backend that tells listeners, synchronously, of every change to its local
    view of the registrations (its replica, for a backend that keeps one).

    The changes of one client arrive in the store's order: once a write of this
    node's has returned, what the listener hears of that client afterwards is
    newer than the write. The cluster socket layer builds its indexes from it.
    """

    def add_change_listener(self, listener: ChangeListener) -> Callable[[], None]:
        """Call ``listener`` on every change from now on; returns a function that
        stops it. A listener that raises is logged and kept."""
        ...


class ChangeListeners:
    """The listeners of a :class:`ChangeFeed`, for backends to keep."""

    __slots__ = ("_listeners",)

    def __init__(self) -> None:
        self._listeners: list[ChangeListener] = []

    def __bool__(self) -> bool:
        return bool(self._listeners)

    def add(self, listener: ChangeListener) -> Callable[[], None]:
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    def notify(self, client_id: str, record: ClientRecord | None) -> None:
        for listener in list(self._listeners):
            try:
                listener(client_id, record)
            except Exception:
                logger.exception("registry change listener %r failed", listener)


@runtime_checkable
class Reloadable(Protocol):
    """A backend that follows the store through a watch, which it can reload."""

    def request_reload(self) -> None:
        """Drop the current watch and load again from a fresh one. Called when the
        transport reconnects, since a watch opened before an outage may stay silent."""
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

    @property
    def incarnation(self) -> int:
        """The incarnation recorded with this registry's writes (0 when unbound)."""
        return 0

    def decode_client(
        self, record: ClientRecord, *, lenient: bool = False
    ) -> RegisteredClient[Any]:
        """Turn a stored record into a :class:`RegisteredClient`.

        :raises PayloadError: the metadata does not decode as ``metadata_type``;
            with ``lenient``, the raw bytes are returned as the metadata instead.
        """
        try:
            metadata: Any = self._codec.decode(record.metadata)
        except PayloadError:
            if not lenient:
                raise
            metadata = record.metadata
        return RegisteredClient(
            record.client_id,
            record.node_id,
            record.connected_at,
            metadata,
            record.token,
            record.incarnation,
        )

    def _client(self, record: ClientRecord) -> RegisteredClient[MetadataT]:
        return self.decode_client(record)

    async def _clients(self, records: list[ClientRecord]) -> list[RegisteredClient[MetadataT]]:
        """Decode ``records``, checkpointing every :data:`DECODE_BATCH` of them so a
        long listing does not hold up other tasks."""
        clients = []
        for index, record in enumerate(records, start=1):
            clients.append(self._client(record))
            if index % DECODE_BATCH == 0:
                await trio.lowlevel.checkpoint()
        return clients

    async def register(self, client_id: str, metadata: MetadataT) -> Registration:
        """Register ``client_id`` on this node, as a new registration.

        The backend records ``connected_at``. A registration on another node is
        replaced atomically, and the result names that node. The result's token
        names this registration: pass it to :meth:`unregister` and
        :meth:`update_metadata`.

        On cancellation the write may or may not have landed, never half.

        :raises InvalidArgumentError: a bad client id.
        :raises PayloadError: metadata that cannot be encoded.
        """
        check_client_id(client_id)
        encoded = self._codec.encode(metadata)
        token = new_token()
        superseded = await self._register_encoded(client_id, encoded, token)
        return Registration(client_id, self.node_id, token, superseded)

    async def _register_encoded(self, client_id: str, encoded: bytes, token: int) -> int | None:
        return await self.backend.register(
            client_id, self.node_id, encoded, token=token, incarnation=self.incarnation
        )

    async def unregister(self, client_id: str, *, token: int | None = None) -> bool:
        """Remove the registration, only if this node owns it (and, with ``token``,
        only if it is that registration); return whether it did.

        On cancellation the removal may or may not have landed.
        """
        check_client_id(client_id)
        return await self.backend.unregister(client_id, self.node_id, token=token)

    async def update_metadata(
        self, client_id: str, metadata: MetadataT, *, token: int | None = None
    ) -> bool:
        """Replace the metadata, only if this node owns the registration (and, with
        ``token``, only if it is that registration).

        ``connected_at`` is kept. Returns False if the client is not registered here.
        On cancellation the write may or may not have landed, never half.
        """
        check_client_id(client_id)
        return await self._update_encoded(client_id, self._codec.encode(metadata), token)

    async def _update_encoded(self, client_id: str, encoded: bytes, token: int | None) -> bool:
        return await self.backend.update_metadata(client_id, self.node_id, encoded, token=token)

    async def get_client(self, client_id: str) -> RegisteredClient[MetadataT] | None:
        """The registration of ``client_id`` on any node, or None."""
        check_client_id(client_id)
        record = await self.backend.get_client(client_id)
        return None if record is None else self._client(record)

    async def list_clients(self) -> list[RegisteredClient[MetadataT]]:
        """Every registration on every node."""
        return await self._clients(await self.backend.list_clients())

    async def list_clients_for_node(
        self, node_id: int | None = None
    ) -> list[RegisteredClient[MetadataT]]:
        """The registrations of ``node_id`` (this node by default)."""
        node = self.node_id if node_id is None else node_id
        return await self._clients(await self.backend.list_clients_for_node(node))

    async def count_clients_for_node(self, node_id: int | None = None) -> int:
        """How many registrations ``node_id`` (this node by default) owns."""
        node = self.node_id if node_id is None else node_id
        return await self.backend.count_clients_for_node(node)

    async def cleanup_node(
        self, node_id: int | None = None, *, incarnation: int | None = None
    ) -> list[RegisteredClient[MetadataT]]:
        """Remove what ``node_id`` (this node by default) still owns, written by
        ``incarnation`` or older (any, if None); return it.

        Clients that re-registered on another node are left alone.
        """
        node = self.node_id if node_id is None else node_id
        return await self._clients(await self.backend.cleanup_node(node, incarnation=incarnation))
