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
