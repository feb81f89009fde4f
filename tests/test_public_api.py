"""Locks the public API: adding or removing a name must be a deliberate change."""

from __future__ import annotations

import meshline
import meshline.testing

EXPECTED = {
    "Admission",
    "ClusterConnection",
    "ClusterView",
    "ConnectionNotFoundError",
    "ConnectionTarget",
    "MeshOptions",
    "NodeSummary",
    "PresenceChange",
    "RoomMember",
    "RoomPresence",
    "RoomTarget",
    "TopicTarget",
    "UserTarget",
    "BackpressureOptions",
    "CallFailedError",
    "ClientState",
    "CloseCode",
    "Connection",
    "ConnectionRejectedError",
    "DisconnectReason",
    "FrameEncodeError",
    "FrameTooLargeError",
    "HeartbeatOptions",
    "JSON_SUBPROTOCOL",
    "LocalProtocolError",
    "LocalView",
    "MSGPACK_SUBPROTOCOL",
    "MalformedFrameError",
    "OverflowPolicy",
    "PayloadDecodeError",
    "PeerLimitExceededError",
    "ProtocolClosedError",
    "ProtocolError",
    "ReconnectOptions",
    "Rejection",
    "RemoteProtocolError",
    "Role",
    "Room",
    "ShutdownOptions",
    "SocketBufferFullError",
    "SocketClient",
    "SocketClosedError",
    "SocketConnectError",
    "SocketConnectTimeoutError",
    "SocketError",
    "SocketErrorCode",
    "SocketRequest",
    "SocketServer",
    "SocketTimeoutError",
    "StateChange",
    "Topic",
    "node_of_connection",
    "open_socket_client",
    "open_socket_server",
    "serve_sockets",
    "should_reconnect",
    "BroadcastType",
    "ClientDisconnectedError",
    "ClientError",
    "ClientInvocationError",
    "ClientNotFoundError",
    "ClientService",
    "open_client_service",
    "ClientRecord",
    "ClientRegistry",
    "KVRegistryBackend",
    "MemoryRegistryBackend",
    "NodeClientRegistry",
    "ReassertOutcome",
    "RegisteredClient",
    "Registration",
    "ConnectionEvent",
    "ConnectionEventKind",
    "RegistryBackend",
    "SQLiteRegistryBackend",
    "open_client_registry",
    "open_kv_registry_backend",
    "DEFAULT_BUFFER",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_TTL",
    "MembershipEvent",
    "MembershipEventKind",
    "MembershipEvents",
    "MeshError",
    "MeshRequestTimeoutError",
    "NoHandlerError",
    "Node",
    "NodeClosedError",
    "NodeNotAliveError",
    "PayloadError",
    "RemoteHandlerError",
    "RequestAbandonedError",
    "RequestType",
    "open_node",
    "InvalidArgumentError",
    "InvalidNameError",
    "KVConflictError",
    "KVEntry",
    "KVOperation",
    "KVWatch",
    "KeyExistsError",
    "KeyValue",
    "MemoryHub",
    "MemoryTransport",
    "MeshlineError",
    "Message",
    "NatsTransport",
    "NoRespondersError",
    "Overflow",
    "PayloadTooLargeError",
    "RequestTimeoutError",
    "RevisionMismatchError",
    "Subscription",
    "SubscriptionOverflowError",
    "Transport",
    "TransportClosedError",
    "TransportError",
    "decode_token",
    "encode_token",
    "open_memory_transport",
    "open_nats_transport",
    "testing",
    "validate_bucket",
    "validate_key",
    "validate_subject",
}


def public(module: object) -> set[str]:
    return {name for name in dir(module) if not name.startswith("_")}


def test_public_api_is_locked() -> None:
    assert public(meshline) == EXPECTED


def test_testing_api_is_locked() -> None:
    assert public(meshline.testing) == {
        "HOSTILE_CLIENT_IDS",
        "RegistryBackendSuite",
        "FaultyTransport",
        "NatsServer",
        "NatsServerError",
        "find_nats_server",
        "free_port",
        "restart_server",
        "nats_cluster",
        "MEMORY_URL",
        "MemoryStreamOpener",
        "open_memory_client",
        "open_test_client",
        "open_test_socket_server",
    }


def test_every_error_is_a_meshline_error() -> None:
    for name in EXPECTED:
        value = getattr(meshline, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, meshline.MeshlineError)


def test_public_classes_are_documented() -> None:
    for name in EXPECTED - {"testing", "DEFAULT_BUFFER"}:
        assert getattr(meshline, name).__doc__, name
