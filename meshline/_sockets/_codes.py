"""Close codes and error codes of meshline's socket protocol.

Close codes
    :class:`CloseCode` names the WebSocket close codes meshline sends or acts on.
    They fall in two bands, and a client obeys the band of the code it was closed
    with (:func:`should_reconnect`):

    * the **reconnect band**: the connection ended for a reason that passes (a node
      going away, a restart, a slow reader, an internal error, missed heartbeats).
      The client reconnects, with backoff and jitter;
    * the **terminal band**: the server does not want this client back as it is
      (kicked, superseded by a newer connection of the same client, forbidden, a
      protocol violation, a message too big). The client stops for good and tells
      the application, which alone may decide to connect again (with new
      credentials, say).

    meshline's own codes live in the range the WebSocket standard leaves to
    applications, 4000-4999, arranged so that the number tells the band:
    4000-4499 reconnect, 4500-4999 terminal. The standard codes (1000-1015) are
    sorted into the bands by :func:`should_reconnect` too.

Error codes
    :class:`SocketErrorCode` names the ``code`` strings that meshline itself puts in
    ``error`` and ``reply_error`` frames (and in the typed errors the client
    raises). An application error (a handler raising ``SocketError(code,
    message)``) carries whatever code the application chose: codes are plain
    strings on the wire, and these are only the ones meshline reserves for its own
    use.

This module has no dependencies, so every other module of the socket layer, and
clients, can use it.
"""

from __future__ import annotations

import enum

__all__ = [
    "RECONNECT_BAND",
    "TERMINAL_BAND",
    "CloseCode",
    "ErrorCode",
    "SocketErrorCode",
    "close_reason",
    "should_reconnect",
]

RECONNECT_BAND = range(4000, 4500)
"""meshline's own close codes after which a client reconnects."""

TERMINAL_BAND = range(4500, 5000)
"""meshline's own close codes after which a client stops for good."""


class CloseCode(enum.IntEnum):
    """WebSocket close codes: the standard ones meshline uses, and its own.

    Each member's band is given by :func:`should_reconnect`; its usual close
    reason by :func:`close_reason`.
    """

    # Standard codes (RFC 6455, section 7.4.1, and the IANA registry).
    NORMAL = 1000
    """Normal closure. A meshline server never closes with it; a client closes
    with it when the application closes the client. Seen by a client that did not
    ask to close, it comes from something in between (a proxy ending an idle
    connection): reconnect band."""
    GOING_AWAY = 1001
    """The server is shutting down (or a browser tab is leaving): reconnect band.
    Graceful shutdown closes its connections with it, in batches."""
    PROTOCOL_ERROR = 1002
    """The peer broke the protocol: a malformed frame, a frame out of order, a
    duplicate or invented id. Terminal: the same client would do it again."""
    UNSUPPORTED_DATA = 1003
    """A text message on the msgpack subprotocol, or a binary one on the JSON
    subprotocol. Terminal."""
    NO_STATUS = 1005
    """Reported locally when a close frame carried no code; never sent. Reconnect band."""
    ABNORMAL = 1006
    """Reported locally when the connection dropped without a close frame; never
    sent. Reconnect band."""
    INVALID_PAYLOAD = 1007
    """A text message that is not valid UTF-8. Terminal."""
    POLICY_VIOLATION = 1008
    """A generic refusal by policy. Terminal."""
    MESSAGE_TOO_BIG = 1009
    """A message over the receiver's ``max_message_size``. Terminal."""
    INTERNAL_ERROR = 1011
    """The server hit an unexpected condition. Reconnect band."""
    SERVICE_RESTART = 1012
    """The server is restarting. Reconnect band."""
    TRY_AGAIN_LATER = 1013
    """The client could not keep up: its outgoing queue on the server passed
    ``max_buffered_bytes`` (backpressure ``close``). Reconnect band."""

    # meshline's reconnect band: 4000-4499.
    RECONNECT = 4000
    """Reconnect, with no more specific reason."""
    HEARTBEAT_MISSED = 4001
    """The peer missed too many heartbeats and was declared dead (the server
    reaps a silent client with it; a client records it when it gives up on a
    silent server)."""
    HANDSHAKE_TIMEOUT = 4002
    """The client sent no ``hello`` within the server's handshake timeout."""

    # meshline's terminal band: 4500-4999.
    TERMINAL = 4500
    """Do not reconnect, with no more specific reason."""
    KICKED = 4501
    """The server (the application) closed this connection on purpose."""
    SUPERSEDED = 4502
    """A newer connection of the same client id replaced this one."""
    FORBIDDEN = 4503
    """The client may no longer be connected (its rights were withdrawn)."""
    UNAUTHORIZED = 4504
    """The client's credentials are no longer valid (expired or revoked). The
    application may connect again with new ones."""
    UNSUPPORTED_PROTOCOL = 4505
    """The server speaks none of the offered subprotocols, or not the protocol
    version the ``hello`` asked for."""


_TERMINAL_STANDARD_CODES = frozenset(
    {
        CloseCode.PROTOCOL_ERROR,
        CloseCode.UNSUPPORTED_DATA,
        CloseCode.INVALID_PAYLOAD,
        CloseCode.POLICY_VIOLATION,
        CloseCode.MESSAGE_TOO_BIG,
        1010,  # mandatory extension: sent by clients, and would fail again
        1015,  # TLS handshake failure: reported locally, would fail again
    }
)


def should_reconnect(code: int | None) -> bool:
    """Whether a client closed with ``code`` should reconnect (with backoff).

    * 4000-4499 (meshline's reconnect band): yes; 4500-4999 (terminal band): no.
    * The standard codes that mean "this client is wrong and would be again"
      (1002 protocol error, 1003 unsupported data, 1007 invalid payload, 1008
      policy violation, 1009 message too big, 1010, 1015): no.
    * Every other code, ``None`` (no code: the connection dropped) and codes
      outside any known range: yes. 1000 is in the reconnect band because a
      meshline server never sends it (see :attr:`CloseCode.NORMAL`).

    A client that closed the connection itself does not reconnect, whatever the
    code: this function is about closes the client did not ask for.
    """
    if code is None:
        return True
    if code in TERMINAL_BAND:
        return False
    if code in RECONNECT_BAND:
        return True
    return code not in _TERMINAL_STANDARD_CODES


_REASONS = {
    CloseCode.NORMAL: "closed",
    CloseCode.GOING_AWAY: "server going away",
    CloseCode.PROTOCOL_ERROR: "protocol violation",
    CloseCode.UNSUPPORTED_DATA: "wrong message type for the subprotocol",
    CloseCode.NO_STATUS: "no status code",
    CloseCode.ABNORMAL: "connection lost",
    CloseCode.INVALID_PAYLOAD: "invalid UTF-8",
    CloseCode.POLICY_VIOLATION: "policy violation",
    CloseCode.MESSAGE_TOO_BIG: "message too big",
    CloseCode.INTERNAL_ERROR: "internal server error",
    CloseCode.SERVICE_RESTART: "server restarting",
    CloseCode.TRY_AGAIN_LATER: "slow consumer: too many bytes buffered",
    CloseCode.RECONNECT: "reconnect",
    CloseCode.HEARTBEAT_MISSED: "heartbeat missed",
    CloseCode.HANDSHAKE_TIMEOUT: "no hello in time",
    CloseCode.TERMINAL: "closed for good",
    CloseCode.KICKED: "kicked",
    CloseCode.SUPERSEDED: "superseded by a newer connection",
    CloseCode.FORBIDDEN: "forbidden",
    CloseCode.UNAUTHORIZED: "unauthorized",
    CloseCode.UNSUPPORTED_PROTOCOL: "unsupported protocol",
}


def close_reason(code: int) -> str:
    """A short, human-readable reason for ``code``, for the WebSocket close frame.

    Codes meshline does not know get ``"code <n>"``.
    """
    try:
        return _REASONS[CloseCode(code)]
    except ValueError:
        return f"code {code}"


class SocketErrorCode(enum.StrEnum):
    """The ``code`` strings meshline itself uses in ``error`` and ``reply_error`` frames.

    Applications use any other string for their own errors; a client tells
    meshline's codes from the application's by this list.
    """

    BAD_INPUT = "bad_input"
    """The call's (or request's) ``data`` did not validate against the declared
    input type. ``details`` may say where."""
    UNKNOWN_CALL = "unknown_call"
    """No call of that name is declared for any role."""
    FORBIDDEN = "forbidden"
    """The call exists, but the connection's role may not make it; or a topic's
    ``authorize_topic`` hook refused a subscription."""
    APPLICATION_ERROR = "application_error"
    """The code of an application error raised without a code of its own."""
    INTERNAL = "internal"
    """The handler raised an unexpected exception (logged on the server; no
    traceback is sent), or its answer could not be encoded."""
    TIMEOUT = "timeout"
    """The handler did not finish within its timeout."""
    CANCELLED = "cancelled"
    """The answer to a call or request that the other side cancelled (or, for a
    subscription, withdrew by unsubscribing before it was answered)."""
    DISCONNECTED = "disconnected"
    """The connection dropped before the answer came (reported locally; the
    cluster layer sends it between nodes)."""
    CONNECTION_NOT_FOUND = "connection_not_found"
    """No live connection has the target connection id (server-to-client
    requests addressed across the cluster)."""
    UNKNOWN_REQUEST = "unknown_request"
    """The client implements no server-to-client request of that name."""
    TOO_LARGE = "too_large"
    """The answer is larger than the receiver's ``max_message_size``."""
    SHUTTING_DOWN = "shutting_down"
    """The server is closing and no longer starts handlers."""
    TOO_MANY_CALLS = "too_many_calls"
    """The connection already has as many calls in progress as the server allows."""


ErrorCode = SocketErrorCode
"""The name the socket modules use for :class:`SocketErrorCode`."""
