"""The client service: one object that tracks an application's clients and reaches
any of them, on whichever node of the cluster holds it.

``invoke`` looks the client up in the registry (a local read), then calls the
application's ``client_invoke`` on the owning node: directly when that is this node,
otherwise through a node request, so timeouts, cancellation and typed errors all
carry over from the node layer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Generic, Unpack, overload

import msgspec
import trio

from .._errors import (
    ClientDisconnectedError,
    ClientInvocationError,
    ClientNotFoundError,
    MeshRequestTimeoutError,
    NodeNotAliveError,
    NoHandlerError,
    PayloadError,
    RemoteHandlerError,
)
from .._mesh._declarations import BroadcastType, qualified_name, resolve_name
from .._mesh._node import DEFAULT_REQUEST_TIMEOUT, Node, NodeOptions, open_node_in_namespace
from .._mesh._wire import decode_payload, encode_payload
from .._registry._core import (
    ClientRecord,
    LocalLookup,
    MetadataT,
    Registration,
    RegistryBackend,
    check_client_id,
)
from .._registry._presence import (
    NodeClientRegistry,
    OrphanHandler,
    RestoredHandler,
    open_client_registry,
)
from .._transport._seam import Transport, check_timeout

__all__ = ["ClientInvoke", "ClientService", "open_client_service"]

ClientInvoke = Callable[[str, str, Any, float], Awaitable[Any]]
"""``client_invoke(client_id, type, data, timeout)``: deliver to a local client."""

SERVICE_NAMESPACE = "svc"


_INVOKE = "meshline.client-invoke"
"""The node request type that carries invokes. Its data is ``[client_id, type,
timeout, data]``; its answer ``[True, result]``, or ``[False]`` when the node does
not have the client. Plain msgpack arrays: one encoding pass each way."""


def _encode(data: Any, what: str) -> msgspec.Raw:
    try:
        return encode_payload(data)
    except (TypeError, ValueError, OverflowError) as exc:
        raise PayloadError(f"cannot encode {what}: {exc}") from exc


class ClientService(Generic[MetadataT]):
    """Tracks this node's clients and invokes any client in the cluster.

    Create it with :func:`open_client_service`.
    """

    def __init__(
        self, node: Node, registry: NodeClientRegistry[MetadataT], client_invoke: ClientInvoke
    ) -> None:
        self._node = node
        self._registry = registry
        self._client_invoke = client_invoke
        backend = registry.backend
        self._local_lookup: Callable[[str], ClientRecord | None] | None = (
            backend.lookup if isinstance(backend, LocalLookup) else None
        )

    @property
    def instance_id(self) -> int:
        """This node's id in the service's mesh."""
        return self._node.id

    @property
    def node(self) -> Node:
        """The mesh node underneath: membership, leadership, node requests."""
        return self._node

    @property
    def client_registry(self) -> NodeClientRegistry[MetadataT]:
        """The registry of every client in the cluster."""
        return self._registry

    async def register_client(self, client_id: str, metadata: MetadataT) -> Registration:
        """Register a client connected to this node.

        The returned :class:`Registration` names the node the client moved from, if
        any, and carries a token: pass it to :meth:`unregister_client` so that a late
        call for an old connection never removes a newer one.
        """
        return await self._registry.register(client_id, metadata)

    async def unregister_client(self, client_id: str, *, token: int | None = None) -> bool:
        """Unregister a client of this node; False if it has moved to another node,
        or, with ``token``, if a newer registration of it replaced that one."""
        return await self._registry.unregister(client_id, token=token)

    async def update_client_metadata(
        self, client_id: str, metadata: MetadataT, *, token: int | None = None
    ) -> bool:
        """Update a client's metadata; False if it is not registered on this node
        (or, with ``token``, not under that registration)."""
        return await self._registry.update_metadata(client_id, metadata, token=token)

    def register_broadcast_handler(
        self, kind: str | BroadcastType[Any], handler: Callable[[Any, int], Any]
    ) -> Callable[[], None]:
        """See :meth:`Node.register_broadcast_handler`."""
        return self._node.register_broadcast_handler(kind, handler)

    async def broadcast(
        self, kind: str | BroadcastType[Any], data: Any, *, skip_self: bool = False
    ) -> None:
        """See :meth:`Node.broadcast`: every service node of this key hears it."""
        await self._node.broadcast(kind, data, skip_self=skip_self)

    async def invoke(
        self,
        client_id: str,
        kind: str,
        data: Any,
        *,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> Any:
        """Call ``client_invoke(client_id, kind, data, timeout)`` on the client's node.

        A client of this node is called directly, without the network. The data and
        the answer still go through encoding, so they look the same either way.

        If the client moves while the call is in flight, and the node it left
        answers that it no longer has it, the call is routed once more, to the node
        the registry names now, within what is left of ``timeout``.

        Cancelling the caller cancels the delivery on the owning node.

        :raises ClientNotFoundError: the client is not registered.
        :raises ClientDisconnectedError: the registered node does not have the client
            (any more), or is dead. Raised at once, without waiting out the timeout.
        :raises ClientInvocationError: ``client_invoke`` raised on the owning node.
        :raises MeshRequestTimeoutError: no answer within ``timeout`` seconds.
        :raises PayloadError: ``data`` or the answer cannot be encoded.
        """
        check_client_id(client_id)
        name = resolve_name(kind)
        check_timeout(timeout)
        started = trio.current_time()
        lookup = self._local_lookup
        record = lookup(client_id) if lookup is not None else await self._lookup(client_id)
        if record is None:
            raise ClientNotFoundError(client_id)
        try:
            return await self._invoke_on(record.node_id, client_id, name, data, timeout)
        except ClientDisconnectedError as first_failure:
            moved = await self._lookup(client_id)
            remaining = timeout - (trio.current_time() - started)
            if moved is None or moved.node_id == record.node_id or remaining <= 0:
                raise first_failure from None
            return await self._invoke_on(moved.node_id, client_id, name, data, remaining)

    async def _invoke_on(
        self, node_id: int, client_id: str, name: str, data: Any, timeout: float
    ) -> Any:
        if node_id == self._node.id:
            return await self._deliver_here(client_id, name, data, timeout)
        if not self._node.is_alive(node_id):
            raise ClientDisconnectedError(client_id, node_id)
        try:
            reply = await self._node.request(
                node_id, _INVOKE, (client_id, name, timeout, data), timeout=timeout
            )
        except (NodeNotAliveError, NoHandlerError):
            raise ClientDisconnectedError(client_id, node_id) from None
        except RemoteHandlerError as exc:
            raise ClientInvocationError(
                client_id, node_id, exc.error_type, exc.error_message
            ) from None
        if not reply[0]:
            raise ClientDisconnectedError(client_id, node_id)
        return reply[1]

    async def _holds(self, client_id: str) -> bool:
        """Whether this node has the client: registered here, and not moved away."""
        if not self._registry.holds(client_id):
            return False
        record = await self._lookup(client_id)
        return record is not None and record.node_id == self._node.id

    async def _lookup(self, client_id: str) -> ClientRecord | None:
        """The client's registration; a plain dictionary lookup when the backend
        keeps a local replica (:class:`LocalLookup`), else the backend's ``get_client``."""
        if self._local_lookup is not None:
            return self._local_lookup(client_id)
        return await self._registry.backend.get_client(client_id)

    async def _deliver_here(self, client_id: str, name: str, data: Any, timeout: float) -> Any:
        if not await self._holds(client_id):
            raise ClientDisconnectedError(client_id, self._node.id)
        decoded = decode_payload(_encode(data, "invoke data"), Any)
        with trio.move_on_after(timeout) as scope:
            try:
                result = await self._client_invoke(client_id, name, decoded, timeout)
            except Exception as exc:
                raise ClientInvocationError(
                    client_id, self._node.id, qualified_name(exc), str(exc)
                ) from exc
        if scope.cancelled_caught:
            raise MeshRequestTimeoutError(self._node.id, name, timeout)
        return decode_payload(_encode(result, "the answer"), Any)

    async def _serve_invoke(self, request: Any, sender: int) -> tuple[bool, Any]:
        try:
            client_id, name, timeout, data = request
        except (TypeError, ValueError):
            raise PayloadError(f"malformed invoke from node {sender}") from None
        if not await self._holds(client_id):
            return (False, None)
        return (True, await self._client_invoke(client_id, name, data, timeout))


@overload
def open_client_service(
    transport: Transport,
    key: str,
    *,
    client_invoke: ClientInvoke,
    metadata_type: type[MetadataT],
    backend: RegistryBackend | None = None,
    on_orphaned: OrphanHandler | None = None,
    on_restored: RestoredHandler | None = None,
    reassert_interval: float = 10.0,
    **node_options: Unpack[NodeOptions],
) -> AbstractAsyncContextManager[ClientService[MetadataT]]: ...


@overload
def open_client_service(
    transport: Transport,
    key: str,
    *,
    client_invoke: ClientInvoke,
    backend: RegistryBackend | None = None,
    on_orphaned: OrphanHandler | None = None,
    on_restored: RestoredHandler | None = None,
    reassert_interval: float = 10.0,
    **node_options: Unpack[NodeOptions],
) -> AbstractAsyncContextManager[ClientService[dict[Any, Any]]]: ...


@overload
def open_client_service(
    transport: Transport,
    key: str,
    *,
    client_invoke: ClientInvoke,
    metadata_type: Any,
    backend: RegistryBackend | None = None,
    on_orphaned: OrphanHandler | None = None,
    on_restored: RestoredHandler | None = None,
    reassert_interval: float = 10.0,
    **node_options: Unpack[NodeOptions],
) -> AbstractAsyncContextManager[ClientService[Any]]: ...


@asynccontextmanager
async def open_client_service(
    transport: Transport,
    key: str,
    *,
    client_invoke: ClientInvoke,
    metadata_type: Any = dict,
    backend: RegistryBackend | None = None,
    on_orphaned: OrphanHandler | None = None,
    on_restored: RestoredHandler | None = None,
    reassert_interval: float = 10.0,
    **node_options: Unpack[NodeOptions],
) -> AsyncIterator[ClientService[Any]]:
    """Join the client service called ``key`` as a new node, for the block.

    The service runs its own mesh node; its names are kept apart from a plain node
    opened with the same ``key``. ``client_invoke(client_id, type, data, timeout)``
    is called (in a task of this node) whenever any node invokes a client registered
    here; what it returns goes back to the caller.

    ``metadata_type``, ``backend``, ``on_orphaned``, ``on_restored`` and
    ``reassert_interval`` go to :func:`open_client_registry`; other keyword arguments
    to :func:`open_node`. The service is typed after ``metadata_type``
    (``ClientService[Session]`` for ``metadata_type=Session``; ``dict`` by default).

    Leaving the block unregisters this node's clients (ownership-safe), then leaves
    the mesh.
    """
    async with (
        open_node_in_namespace(transport, key, SERVICE_NAMESPACE, **node_options) as node,
        open_client_registry(
            node,
            backend=backend,
            metadata_type=metadata_type,
            on_orphaned=on_orphaned,
            on_restored=on_restored,
            reassert_interval=reassert_interval,
        ) as registry,
    ):
        service = ClientService(node, registry, client_invoke)
        node.register_handler(_INVOKE, service._serve_invoke)
        yield service
