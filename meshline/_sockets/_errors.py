"""The errors of the socket layer, shared by the server and the client.

Protocol violations (malformed frames, a peer breaking the rules) are
:class:`~meshline._sockets._frames.ProtocolError` and its subclasses; the errors
here are what applications see: a handler's own refusal, a call or request that
failed, a connection that closed or was refused.
"""

from __future__ import annotations

from typing import Any

from .._errors import MeshlineError
from ._codes import ErrorCode

__all__ = [
    "CallFailedError",
    "ConnectionNotFoundError",
    "ConnectionRejectedError",
    "SocketClosedError",
    "SocketError",
    "SocketTimeoutError",
]


class SocketError(MeshlineError):
    """An error a handler raises on purpose, sent to the peer as ``code`` and
    ``message`` (an application error: nothing is logged beyond debug level).

    ``code`` is the application's own (a short string such as ``"not_found"``);
    ``details`` is optional data the peer receives with it (it must be encodable
    in both the msgpack and the JSON encoding).
    """

    def __init__(self, code: str, message: str = "", details: Any = None) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.details = details


class CallFailedError(MeshlineError):
    """A call (client to server) or a request (server to client) was answered
    with an error.

    ``code`` is one of :class:`~meshline.SocketErrorCode` for errors meshline
    raised (bad input, unknown call, forbidden, internal, timeout, cancelled,
    disconnected...), or the code of the :class:`SocketError` the other side's
    handler raised (then ``code`` is that application code and ``application`` is
    True).
    """

    def __init__(
        self, code: str, message: str = "", details: Any = None, *, application: bool = False
    ) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.details = details
        self.application = application


class SocketTimeoutError(CallFailedError, TimeoutError):
    """A call or request got no answer within its timeout (the other side was
    sent a cancel)."""

    def __init__(self, message: str = "no answer in time") -> None:
        super().__init__(ErrorCode.TIMEOUT, message)


class SocketClosedError(CallFailedError):
    """The connection closed (or was lost) while a call or request was in flight,
    or before it could be sent. ``close_code`` and ``reason`` say how it closed,
    when known (None for a lost connection)."""

    def __init__(
        self,
        message: str = "the connection closed",
        close_code: int | None = None,
        reason: str = "",
    ) -> None:
        super().__init__(ErrorCode.DISCONNECTED, message)
        self.close_code = close_code
        self.reason = reason


class ConnectionNotFoundError(SocketClosedError):
    """No node of the cluster holds the connection (it closed, its node is gone,
    or it never existed): found out at once, not at the request's timeout."""

    def __init__(self, connection_id: str) -> None:
        super().__init__(f"no node holds connection {connection_id!r}")
        self.connection_id = connection_id


class ConnectionRejectedError(MeshlineError):
    """The server refused the WebSocket upgrade with an HTTP status (401 or 403
    from ``authenticate``, 500 when it failed). A client stops reconnecting on a
    401 or 403."""

    def __init__(self, status: int, reason: str = "") -> None:
        super().__init__(
            f"connection rejected with HTTP {status}" + (f": {reason}" if reason else "")
        )
        self.status = status
        self.reason = reason
