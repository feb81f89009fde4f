"""meshline's exception family.

Every error meshline raises on purpose derives from :class:`MeshlineError`. Errors
from nats-py never escape the transport seam: they are mapped onto these classes.
"""

from __future__ import annotations

__all__ = [
    "InvalidArgumentError",
    "InvalidNameError",
    "KVConflictError",
    "KeyExistsError",
    "MeshlineError",
    "NoRespondersError",
    "PayloadTooLargeError",
    "RequestTimeoutError",
    "RevisionMismatchError",
    "SubscriptionOverflowError",
    "TransportClosedError",
    "TransportError",
]


class MeshlineError(Exception):
    """Base class of every error that meshline raises deliberately."""


class InvalidArgumentError(MeshlineError, ValueError):
    """An argument is out of range or of the wrong kind (a TTL of 0.5 s, say).

    Raised before anything is sent, so no state is touched.
    """


class InvalidNameError(InvalidArgumentError):
    """A subject, key, bucket name or user-supplied id is not acceptable.

    Raised before anything is sent, so no state is touched.
    """


class TransportError(MeshlineError):
    """The messaging layer failed: connection trouble, or a server-side error."""


class TransportClosedError(TransportError):
    """The transport was used after it was closed, or while it is closing."""


class PayloadTooLargeError(TransportError, ValueError):
    """A message is bigger than the server accepts (NATS ``max_payload``)."""


class NoRespondersError(TransportError):
    """A request was sent to a subject that nobody is subscribed to.

    Raised as soon as the server says so, without waiting for the timeout.
    """

    def __init__(self, subject: str) -> None:
        super().__init__(f"no responders on subject {subject!r}")
        self.subject = subject


class RequestTimeoutError(TransportError, TimeoutError):
    """A request got no reply within its timeout."""

    def __init__(self, subject: str, timeout: float) -> None:
        super().__init__(f"no reply on subject {subject!r} within {timeout:g} s")
        self.subject = subject
        self.timeout = timeout


class RequestAbandonedError(TransportError):
    """A pending request was given up on purpose by :meth:`Transport.abandon_requests`.

    Higher layers use it to fail requests fast, for instance when the node they
    were sent to is declared dead.
    """

    def __init__(self, subject: str) -> None:
        super().__init__(f"request on subject {subject!r} was abandoned")
        self.subject = subject


class SubscriptionOverflowError(MeshlineError):
    """A subscription with ``overflow="error"`` received more than it could buffer.

    The consumer sees this after it has read every message that was buffered before
    the overflow; the subscription is closed from then on.
    """

    def __init__(self, subject: str, limit: int) -> None:
        super().__init__(f"subscription on {subject!r} overflowed its buffer of {limit}")
        self.subject = subject
        self.limit = limit


class KVConflictError(MeshlineError):
    """A conditional KV write lost: the key was not in the state the caller expected."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


class KeyExistsError(KVConflictError):
    """``create`` found the key already present (and not expired or deleted)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"key {key!r} already exists", key)


class RevisionMismatchError(KVConflictError):
    """``update`` or ``delete`` expected a revision that is no longer the latest."""

    def __init__(self, key: str, expected: int) -> None:
        super().__init__(f"key {key!r} is no longer at revision {expected}", key)
        self.expected = expected


class MeshError(MeshlineError):
    """A mesh node operation failed: base of the node-level errors."""


class NodeClosedError(MeshError):
    """The node was used after its ``open_node`` block ended, or while it is ending."""


class NodeNotAliveError(MeshError):
    """The target node is not in this node's view of the alive nodes.

    Raised at once when the target is already unknown or dead, and as soon as the
    view declares it dead while a request to it is pending. The request may or may
    not have run on the target.
    """

    def __init__(self, node_id: int) -> None:
        super().__init__(f"node {node_id} is not alive")
        self.node_id = node_id


class NoHandlerError(MeshError):
    """The target node has no handler registered for the request type."""

    def __init__(self, node_id: int, request_type: str) -> None:
        super().__init__(f"node {node_id} has no handler for request type {request_type!r}")
        self.node_id = node_id
        self.request_type = request_type


class RemoteHandlerError(MeshError):
    """The handler on the target node raised.

    ``error_type`` is the qualified class name of the remote exception and
    ``error_message`` its ``str()``. For a request to the node itself, the original
    exception is also chained as ``__cause__``.
    """

    def __init__(
        self, node_id: int, request_type: str, error_type: str, error_message: str
    ) -> None:
        super().__init__(
            f"handler for {request_type!r} on node {node_id} raised {error_type}: {error_message}"
        )
        self.node_id = node_id
        self.request_type = request_type
        self.error_type = error_type
        self.error_message = error_message


class MeshRequestTimeoutError(MeshError, TimeoutError):
    """A node request got no answer within its timeout.

    The handler on the target, if it started, is cancelled too.
    """

    def __init__(self, node_id: int, request_type: str, timeout: float) -> None:
        super().__init__(f"node {node_id} did not answer {request_type!r} within {timeout:g} s")
        self.node_id = node_id
        self.request_type = request_type
        self.timeout = timeout


class PayloadError(MeshError, ValueError):
    """A payload could not be encoded, or did not decode into the declared type.

    Raised by the sender when its own data cannot be encoded, and by the requester
    when the target could not decode the request or the reply does not match the
    declared response type.
    """


class ClientError(MeshError):
    """Reaching a client failed: base of the client service's errors."""

    def __init__(self, message: str, client_id: str) -> None:
        super().__init__(message)
        self.client_id = client_id


class ClientNotFoundError(ClientError):
    """The client is not in the registry."""

    def __init__(self, client_id: str) -> None:
        super().__init__(f"client {client_id!r} is not registered", client_id)


class ClientDisconnectedError(ClientError):
    """The registry named a node for the client, but the client is not there.

    Either that node no longer has the client, or the node is dead. Raised without
    waiting for the timeout.
    """

    def __init__(self, client_id: str, node_id: int) -> None:
        super().__init__(f"client {client_id!r} is not connected to node {node_id}", client_id)
        self.node_id = node_id


class ClientInvocationError(ClientError):
    """Delivering to the client failed on the node that holds it.

    ``error_type`` is the qualified class name of the exception that
    ``client_invoke`` raised there, and ``error_message`` its ``str()``.
    """

    def __init__(self, client_id: str, node_id: int, error_type: str, error_message: str) -> None:
        message = f"invoking client {client_id!r} on node {node_id} failed"
        super().__init__(f"{message}: {error_type}: {error_message}", client_id)
        self.node_id = node_id
        self.error_type = error_type
        self.error_message = error_message
