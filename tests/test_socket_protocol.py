"""The socket protocol's sans-IO core: frames, codecs, the state machine, close codes.

Two machines (client and server) talk to each other through the bytes or text they
produce, on both encodings; no sockets, no clock (every ``now`` is explicit).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from meshline._sockets._codes import (
    RECONNECT_BAND,
    TERMINAL_BAND,
    CloseCode,
    ErrorCode,
    close_reason,
    should_reconnect,
)
from meshline._sockets._frames import (
    JSON,
    JSON_SUBPROTOCOL,
    MAX_ID,
    MSGPACK,
    MSGPACK_SUBPROTOCOL,
    PROTOCOL_VERSION,
    CallFrame,
    CancelFrame,
    Codec,
    ErrorFrame,
    EventFrame,
    Frame,
    FrameEncodeError,
    FrameTooLargeError,
    HelloFrame,
    LocalProtocolError,
    MalformedFrameError,
    PayloadDecodeError,
    PeerLimitExceededError,
    PingFrame,
    PongFrame,
    PresenceDiffFrame,
    PresenceMember,
    PresenceStateFrame,
    ProtocolClosedError,
    RemoteProtocolError,
    ReplyErrorFrame,
    ReplyFrame,
    RequestFrame,
    ResultFrame,
    Side,
    SubscribeFrame,
    UnsubscribeFrame,
    UnwatchFrame,
    WatchFrame,
    WelcomeFrame,
    codec_for_subprotocol,
    select_codec,
)
from meshline._sockets._protocol import (
    ProtocolState,
    SocketProtocol,
    Subscribed,
    SubscribeRefused,
)

DOCS = Path(__file__).parent.parent / "docs" / "protocol.rst"


@pytest.fixture(params=[MSGPACK, JSON], ids=["msgpack", "json"])
def codec(request: pytest.FixtureRequest) -> Codec:
    result: Codec = request.param
    return result


def open_pair(
    codec: Codec,
    *,
    now: float = 0.0,
    client_limit: int = 0,
    server_limit: int = 0,
    heartbeat_interval: float = 25.0,
    heartbeat_max_missed: int = 2,
) -> tuple[SocketProtocol, SocketProtocol]:
    """A client and a server machine after a full handshake at ``now``."""
    client = SocketProtocol(Side.CLIENT, codec, max_message_size=client_limit)
    server = SocketProtocol(Side.SERVER, codec, max_message_size=server_limit)
    hello = server.receive(client.hello("client-1"), now)
    assert isinstance(hello, HelloFrame)
    welcome = client.receive(
        server.welcome(
            "conn-1",
            7,
            now=now,
            heartbeat_interval=heartbeat_interval,
            heartbeat_max_missed=heartbeat_max_missed,
        ),
        now,
    )
    assert isinstance(welcome, WelcomeFrame)
    return client, server


def reject(machine: SocketProtocol, message: bytes | str, code: int = 1002) -> RemoteProtocolError:
    """Feed ``message``; check it is refused as a protocol violation with ``code``."""
    with pytest.raises(RemoteProtocolError) as caught:
        machine.receive(message, 1.0)
    assert caught.value.close_code == code
    assert machine.state is ProtocolState.CLOSED
    assert machine.close_code == code
    assert not machine.closed_by_peer
    assert len(caught.value.reason.encode()) <= 123
    return caught.value


# --- Handshake ----------------------------------------------------------------------


def test_the_handshake_opens_both_sides_and_carries_identity_and_limits(codec: Codec) -> None:
    client = SocketProtocol("client", codec, max_message_size=4096)
    server = SocketProtocol("server", codec, max_message_size=1 << 20)
    assert client.state is server.state is ProtocolState.START

    hello = server.receive(
        client.hello(
            "client-1",
            client_name="pyclient",
            client_version="1.2",
            previous_connection_id="conn-0",
        ),
        10.0,
    )
    assert hello == HelloFrame(
        version=PROTOCOL_VERSION,
        client_id="client-1",
        client_name="pyclient",
        client_version="1.2",
        previous_connection_id="conn-0",
        max_message_size=4096,
    )
    assert {client.state, server.state} == {ProtocolState.HELLO}
    assert server.peer_max_message_size == 4096

    welcome = client.receive(
        server.welcome(
            "conn-1",
            7,
            now=10.0,
            heartbeat_interval=5.0,
            heartbeat_max_missed=3,
            max_buffered_bytes=8 << 20,
            call_timeout=30.0,
        ),
        10.5,
    )
    assert welcome == WelcomeFrame(
        connection_id="conn-1",
        node_id=7,
        client_id="client-1",
        version=PROTOCOL_VERSION,
        heartbeat_interval=5.0,
        heartbeat_max_missed=3,
        max_message_size=1 << 20,
        max_buffered_bytes=8 << 20,
        call_timeout=30.0,
    )
    assert client.is_open and server.is_open
    assert client.peer_max_message_size == 1 << 20
    assert client.welcome_frame == welcome and server.hello_frame == hello
    assert (client.heartbeat_interval, client.heartbeat_max_missed) == (5.0, 3)
    assert server.sends_pings and not client.sends_pings


def test_the_server_may_record_another_client_id(codec: Codec) -> None:
    client = SocketProtocol("client", codec)
    server = SocketProtocol("server", codec)
    server.receive(client.hello(""), 0.0)
    welcome = client.receive(server.welcome("c", 1, now=0.0, client_id="assigned"), 0.0)
    assert isinstance(welcome, WelcomeFrame) and welcome.client_id == "assigned"


def test_a_newer_client_revision_is_answered_with_the_servers(codec: Codec) -> None:
    client = SocketProtocol("client", codec)
    server = SocketProtocol("server", codec)
    server.receive(client.hello("c", version=5), 0.0)
    welcome = client.receive(server.welcome("c", 1, now=0.0), 0.0)
    assert isinstance(welcome, WelcomeFrame) and welcome.version == PROTOCOL_VERSION


def test_a_welcome_above_the_hellos_revision_is_refused(codec: Codec) -> None:
    client = SocketProtocol("client", codec)
    client.hello("c")
    reject(client, codec.encode(WelcomeFrame("c", 1, version=PROTOCOL_VERSION + 1)), 4505)


def test_anything_before_hello_is_a_violation_on_the_server(codec: Codec) -> None:
    server = SocketProtocol("server", codec)
    error = reject(server, codec.encode(CallFrame(1, "x")))
    assert "hello" in str(error)


def test_a_second_hello_is_a_violation(codec: Codec) -> None:
    _client, server = open_pair(codec)
    reject(server, codec.encode(HelloFrame()))


def test_a_frame_before_the_welcome_was_sent_is_a_violation(codec: Codec) -> None:
    server = SocketProtocol("server", codec)
    server.receive(codec.encode(HelloFrame()), 0.0)
    error = reject(server, codec.encode(PingFrame(1)))
    assert "welcome" in str(error)


def test_the_client_accepts_nothing_before_its_hello_and_only_a_welcome_after(
    codec: Codec,
) -> None:
    client = SocketProtocol("client", codec)
    reject(client, codec.encode(PingFrame(1)))
    client = SocketProtocol("client", codec)
    client.hello("c")
    reject(client, codec.encode(ResultFrame(1)))
    client, _ = open_pair(codec)
    reject(client, codec.encode(WelcomeFrame("c", 1)))


def test_handshake_sends_are_for_their_side_and_state(codec: Codec) -> None:
    client = SocketProtocol("client", codec)
    server = SocketProtocol("server", codec)
    with pytest.raises(LocalProtocolError, match="server cannot send hello"):
        server.hello("x")
    with pytest.raises(LocalProtocolError, match="client cannot send welcome"):
        client.welcome("c", 1, now=0.0)
    with pytest.raises(LocalProtocolError, match="in state start"):
        server.welcome("c", 1, now=0.0)
    with pytest.raises(LocalProtocolError, match="before the handshake"):
        client.emit("e")
    client.hello("x")
    with pytest.raises(LocalProtocolError):
        client.hello("x")
    with pytest.raises(LocalProtocolError):
        client.call("c")
    # Nothing changed: the handshake still completes.
    assert client.hello_frame is not None
    server.receive(codec.encode(client.hello_frame), 0.0)
    client.receive(server.welcome("c", 1, now=0.0), 0.0)
    assert client.is_open and server.is_open


def test_welcome_numbers_out_of_range_are_refused_before_anything_is_sent(codec: Codec) -> None:
    server = SocketProtocol("server", codec)
    server.receive(codec.encode(HelloFrame()), 0.0)
    bad: list[dict[str, Any]] = [
        {"heartbeat_interval": -1.0},
        {"heartbeat_interval": float("inf")},
        {"heartbeat_interval": float("nan")},
        {"heartbeat_max_missed": 0},
        {"call_timeout": -0.5},
        {"max_buffered_bytes": -1},
        {"max_buffered_bytes": MAX_ID + 1},
    ]
    for options in bad:
        with pytest.raises(LocalProtocolError):
            server.welcome("c", 1, now=0.0, **options)
    with pytest.raises(LocalProtocolError):
        server.welcome("c", -1, now=0.0)
    assert server.state is ProtocolState.HELLO
    server.welcome("c", 1, now=0.0)
    assert server.is_open


# --- Calls, events, requests --------------------------------------------------------


class Point(msgspec.Struct):
    x: int
    y: int


def test_a_call_and_its_result_round_trip_with_typed_payloads(codec: Codec) -> None:
    client, server = open_pair(codec)
    call_id, message = client.call("geo.move", Point(1, 2))
    assert isinstance(message, bytes if codec is MSGPACK else str)
    call = server.receive(message, 1.0)
    assert isinstance(call, CallFrame) and (call.id, call.name) == (call_id, "geo.move")
    assert isinstance(call.data, msgspec.Raw)
    assert codec.decode_data(call.data, Point) == Point(1, 2)
    assert server.pending_calls == {call_id} and client.pending_calls == {call_id}

    result = client.receive(server.result(call_id, {"moved": True}), 1.0)
    assert isinstance(result, ResultFrame) and result.id == call_id
    assert codec.decode_data(result.data, dict[str, bool]) == {"moved": True}
    assert server.pending_calls == client.pending_calls == frozenset()


def test_a_call_without_data_decodes_as_null(codec: Codec) -> None:
    client, server = open_pair(codec)
    _, message = client.call("ping")
    call = server.receive(message, 1.0)
    assert isinstance(call, CallFrame) and call.data is None
    assert codec.decode_data(call.data, type(None)) is None
    assert codec.decode_data(call.data, Any) is None


def test_an_error_answer_carries_its_code_message_and_details(codec: Codec) -> None:
    client, server = open_pair(codec)
    call_id, message = client.call("geo.move", {"x": "one"})
    call = server.receive(message, 1.0)
    assert isinstance(call, CallFrame)
    with pytest.raises(PayloadDecodeError, match=r"\$\.x"):
        codec.decode_data(call.data, Point)
    # A bad payload is not a protocol error: the connection goes on.
    assert server.is_open
    error = client.receive(
        server.error(call_id, ErrorCode.BAD_INPUT, "x must be an int", {"path": "$.x"}), 1.0
    )
    assert isinstance(error, ErrorFrame)
    assert (error.id, error.code, error.message) == (call_id, "bad_input", "x must be an int")
    assert codec.decode_data(error.details, dict[str, str]) == {"path": "$.x"}
    assert not client.pending_calls


def test_an_unknown_call_is_answered_not_closed(codec: Codec) -> None:
    client, server = open_pair(codec)
    call_id, message = client.call("no.such.call")
    server.receive(message, 1.0)
    answer = client.receive(server.error(call_id, ErrorCode.UNKNOWN_CALL), 1.0)
    assert isinstance(answer, ErrorFrame) and answer.code == "unknown_call"
    call_id, message = client.call("next")
    assert isinstance(server.receive(message, 1.0), CallFrame)


def test_events_flow_both_ways_with_their_keys(codec: Codec) -> None:
    client, server = open_pair(codec)
    event = server.receive(client.emit("typing", {"on": True}), 1.0)
    assert isinstance(event, EventFrame) and event.name == "typing" and event.key is None
    event = client.receive(server.emit("cursor", [3, 4], key="cursor:u1"), 1.0)
    assert isinstance(event, EventFrame)
    assert (event.name, event.key, event.topic) == ("cursor", "cursor:u1", None)
    assert codec.decode_data(event.data, list[int]) == [3, 4]


def test_a_server_request_and_its_reply_round_trip(codec: Codec) -> None:
    client, server = open_pair(codec)
    request_id, message = server.request("confirm", {"q": "ready?"}, timeout=5.0)
    request = client.receive(message, 1.0)
    assert isinstance(request, RequestFrame)
    assert (request.id, request.name, request.timeout) == (request_id, "confirm", 5.0)
    assert client.pending_requests == {request_id}
    reply = server.receive(client.reply(request_id, {"ok": True}), 1.0)
    assert isinstance(reply, ReplyFrame) and reply.id == request_id
    assert codec.decode_data(reply.data, dict[str, bool]) == {"ok": True}
    assert not server.pending_requests and not client.pending_requests

    request_id, message = server.request("confirm")
    client.receive(message, 1.0)
    failure = server.receive(client.reply_error(request_id, ErrorCode.UNKNOWN_REQUEST, "no"), 1.0)
    assert isinstance(failure, ReplyErrorFrame)
    assert (failure.code, failure.message) == ("unknown_request", "no")


def test_call_ids_and_request_ids_are_separate_increasing_spaces(codec: Codec) -> None:
    client, server = open_pair(codec)
    assert [client.call("a")[0], client.call("b")[0], client.subscribe("t")[0]] == [1, 2, 3]
    assert [server.request("r")[0], server.request("r")[0]] == [1, 2]


# --- Cancellation, late and duplicate ids -------------------------------------------


def test_a_late_result_after_a_cancel_is_ignored_and_counted(codec: Codec) -> None:
    client, server = open_pair(codec)
    call_id, message = client.call("slow")
    server.receive(message, 1.0)
    cancel_message = client.cancel_call(call_id)
    assert cancel_message is not None
    assert not client.pending_calls
    cancel = server.receive(cancel_message, 2.0)
    assert cancel == CancelFrame(call_id, "call")
    # The server still answers exactly once; the client ignores it.
    assert call_id in server.pending_calls
    late = server.error(call_id, ErrorCode.CANCELLED)
    assert client.receive(late, 3.0) is None
    assert client.counters.late_answers == 1
    # Nothing else was disturbed.
    next_id, message = client.call("fast")
    server.receive(message, 3.0)
    assert isinstance(client.receive(server.result(next_id, 1), 3.0), ResultFrame)


def test_a_result_that_races_the_cancel_is_ignored_and_the_cancel_too(codec: Codec) -> None:
    client, server = open_pair(codec)
    call_id, message = client.call("slow")
    server.receive(message, 1.0)
    result = server.result(call_id, "done")  # on the wire
    cancel = client.cancel_call(call_id)  # crossing it
    assert cancel is not None
    assert client.receive(result, 2.0) is None
    assert server.receive(cancel, 2.0) is None
    assert client.counters.late_answers == 1 and server.counters.late_cancels == 1
    assert server.is_open and client.is_open


def test_cancelling_an_answered_call_sends_nothing(codec: Codec) -> None:
    client, server = open_pair(codec)
    call_id, message = client.call("x")
    server.receive(message, 1.0)
    client.receive(server.result(call_id), 1.0)
    assert client.cancel_call(call_id) is None
    assert client.cancel_call(999) is None


def test_a_late_reply_after_the_server_cancelled_is_ignored(codec: Codec) -> None:
    client, server = open_pair(codec)
    request_id, message = server.request("confirm", timeout=1.0)
    client.receive(message, 1.0)
    cancel_message = server.cancel_request(request_id)
    assert cancel_message is not None
    assert server.cancel_request(request_id) is None
    cancel = client.receive(cancel_message, 2.0)
    assert cancel == CancelFrame(request_id, "request")
    # The client still answers once; the server ignores it.
    assert request_id in client.pending_requests
    assert server.receive(client.reply_error(request_id, ErrorCode.CANCELLED), 2.0) is None
    assert server.counters.late_answers == 1
    assert client.receive(codec.encode(CancelFrame(request_id, "request")), 2.0) is None
    assert client.counters.late_cancels == 1


def test_a_duplicate_call_id_in_progress_is_a_violation(codec: Codec) -> None:
    for first, second in (
        (CallFrame(1, "a"), CallFrame(1, "b")),
        (CallFrame(1, "a"), SubscribeFrame(1, "t")),
        (SubscribeFrame(1, "t"), CallFrame(1, "a")),
        (SubscribeFrame(1, "t"), SubscribeFrame(1, "t")),
    ):
        _client, server = open_pair(codec)
        server.receive(codec.encode(first), 1.0)
        error = reject(server, codec.encode(second))
        assert "already in progress" in str(error)


def test_a_call_id_may_come_again_once_answered(codec: Codec) -> None:
    """Reuse is discouraged (the client machine never does it) but not detectable."""
    _client, server = open_pair(codec)
    server.receive(codec.encode(CallFrame(1, "a")), 1.0)
    server.result(1)
    assert isinstance(server.receive(codec.encode(CallFrame(1, "a")), 1.0), CallFrame)


def test_a_duplicate_request_id_awaiting_a_reply_is_a_violation(codec: Codec) -> None:
    client, _server = open_pair(codec)
    client.receive(codec.encode(RequestFrame(1, "r")), 1.0)
    reject(client, codec.encode(RequestFrame(1, "r")))


def test_an_answer_to_an_id_never_issued_is_a_violation(codec: Codec) -> None:
    client, server = open_pair(codec)
    client.call("a")
    error = reject(client, codec.encode(ResultFrame(2)))
    assert "never sent" in str(error)
    client, server = open_pair(codec)
    reject(client, codec.encode(ErrorFrame(0, "x")))
    client, server = open_pair(codec)
    server.request("r")
    reject(server, codec.encode(ReplyFrame(2)))
    client, server = open_pair(codec)
    reject(server, codec.encode(ReplyErrorFrame(7, "x")))


def test_a_cancel_must_name_the_senders_own_id_space(codec: Codec) -> None:
    client, server = open_pair(codec)
    reject(server, codec.encode(CancelFrame(1, "request")))
    reject(client, codec.encode(CancelFrame(1, "call")))


def test_answers_are_refused_locally_for_ids_not_pending(codec: Codec) -> None:
    client, server = open_pair(codec)
    with pytest.raises(LocalProtocolError, match="not pending"):
        server.result(1)
    with pytest.raises(LocalProtocolError, match="not pending"):
        server.error(1, "x")
    with pytest.raises(LocalProtocolError, match="not pending"):
        client.reply(1)
    with pytest.raises(LocalProtocolError, match="not pending"):
        client.reply_error(1, "x")
    call_id, message = client.call("a")
    server.receive(message, 1.0)
    server.result(call_id)
    with pytest.raises(LocalProtocolError, match="not pending"):
        server.result(call_id)
    assert server.is_open and client.is_open


def test_each_side_sends_only_its_own_kinds(codec: Codec) -> None:
    client, server = open_pair(codec)
    for attempt in (
        lambda: server.call("x"),
        lambda: server.subscribe("t"),
        lambda: server.unsubscribe("t"),
        lambda: server.cancel_call(1),
        lambda: server.reply(1),
        lambda: server.reply_error(1, "x"),
        lambda: client.result(1),
        lambda: client.error(1, "x"),
        lambda: client.request("r"),
        lambda: client.cancel_request(1),
        lambda: client.accept_subscribe(1),
        lambda: client.end_subscription("t"),
        lambda: client.emit("e", topic="t"),
    ):
        with pytest.raises(LocalProtocolError):
            attempt()
    assert client.is_open and server.is_open
    assert not client.pending_calls and not server.pending_requests


def test_a_request_timeout_must_be_finite_and_not_negative(codec: Codec) -> None:
    _, server = open_pair(codec)
    for timeout in (-1.0, float("inf"), float("nan")):
        with pytest.raises(LocalProtocolError, match="timeout"):
            server.request("r", timeout=timeout)
    assert server.request("r", timeout=0.0)[0] == 1


# --- Subscriptions ------------------------------------------------------------------


def subscribe(client: SocketProtocol, server: SocketProtocol, topic: str) -> int:
    call_id, message = client.subscribe(topic)
    frame = server.receive(message, 1.0)
    assert frame == SubscribeFrame(call_id, topic)
    answer = server.accept_subscribe(call_id)
    assert answer.subscribed
    assert client.receive(answer.message, 1.0) == Subscribed(call_id, topic)
    return call_id


def test_a_subscription_is_acknowledged_and_receives_topic_events(codec: Codec) -> None:
    client, server = open_pair(codec)
    subscribe(client, server, "prices.eur")
    assert client.subscriptions == server.subscriptions == {"prices.eur"}
    event = client.receive(server.emit("tick", 1.5, topic="prices.eur"), 2.0)
    assert isinstance(event, EventFrame) and event.topic == "prices.eur"


def test_a_refused_subscription_reports_the_refusal(codec: Codec) -> None:
    client, server = open_pair(codec)
    call_id, message = client.subscribe("secret")
    server.receive(message, 1.0)
    refused = client.receive(server.error(call_id, ErrorCode.FORBIDDEN, "no"), 1.0)
    assert refused == SubscribeRefused(call_id, "secret", "forbidden", "no", None)
    assert not client.subscriptions and not server.subscriptions
    with pytest.raises(LocalProtocolError, match="not subscribed"):
        server.emit("tick", topic="secret")


def test_unsubscribing_leaves_the_topic_on_both_sides(codec: Codec) -> None:
    client, server = open_pair(codec)
    subscribe(client, server, "t")
    in_flight = server.emit("tick", topic="t")
    unsubscribe = server.receive(client.unsubscribe("t"), 2.0)
    assert unsubscribe == UnsubscribeFrame("t")
    assert not client.subscriptions and not server.subscriptions
    # An event already on the way when the client left is dropped and counted.
    assert client.receive(in_flight, 2.0) is None
    assert client.counters.unsubscribed_events == 1
    # Unsubscribing again is harmless: the server ignores and counts it.
    assert server.receive(client.unsubscribe("t"), 2.0) is None
    assert server.counters.unknown_unsubscribes == 1


def test_unsubscribing_withdraws_a_subscription_not_yet_answered(codec: Codec) -> None:
    client, server = open_pair(codec)
    call_id, message = client.subscribe("t")
    server.receive(message, 1.0)  # the server starts authorizing...
    assert server.receive(client.unsubscribe("t"), 1.0) == UnsubscribeFrame("t")
    answer = server.accept_subscribe(call_id)  # ...and accepts too late
    assert not answer.subscribed and not server.subscriptions
    assert client.receive(answer.message, 1.0) is None  # forgotten by the client
    assert not client.subscriptions
    # Had the answer crossed the unsubscribe, the unsubscribe would have removed it.
    call_id, message = client.subscribe("u")
    server.receive(message, 1.0)
    answer = server.accept_subscribe(call_id)
    unsubscribe = client.unsubscribe("u")
    assert client.receive(answer.message, 1.0) is None
    server.receive(unsubscribe, 1.0)
    assert not client.subscriptions and not server.subscriptions


def test_a_cancelled_subscribe_is_withdrawn_on_the_server(codec: Codec) -> None:
    _client, server = open_pair(codec)
    server.receive(codec.encode(SubscribeFrame(1, "t")), 1.0)
    assert server.receive(codec.encode(CancelFrame(1, "call")), 1.0) == CancelFrame(1, "call")
    answer = server.accept_subscribe(1)
    assert not answer.subscribed
    frame = codec.decode(answer.message)
    assert isinstance(frame, ErrorFrame) and frame.code == ErrorCode.CANCELLED


def test_a_pending_subscribe_is_withdrawn_by_unsubscribe_not_cancel(codec: Codec) -> None:
    client, _server = open_pair(codec)
    call_id, _ = client.subscribe("t")
    with pytest.raises(LocalProtocolError, match="unsubscribe"):
        client.cancel_call(call_id)
    assert call_id in client.pending_calls


def test_the_server_can_end_a_subscription(codec: Codec) -> None:
    client, server = open_pair(codec)
    subscribe(client, server, "t")
    ended = client.receive(server.end_subscription("t"), 2.0)
    assert ended == UnsubscribeFrame("t")
    assert not client.subscriptions and not server.subscriptions
    with pytest.raises(LocalProtocolError, match="not subscribed"):
        server.end_subscription("t")
    assert client.receive(codec.encode(UnsubscribeFrame("t")), 2.0) is None
    assert client.receive(codec.encode(EventFrame("x", topic="t")), 2.0) is None
    assert client.counters.unknown_unsubscribes == 1
    assert client.counters.unsubscribed_events == 1


def test_subscribe_answers_go_through_accept_subscribe(codec: Codec) -> None:
    client, server = open_pair(codec)
    call_id, message = client.subscribe("t")
    server.receive(message, 1.0)
    with pytest.raises(LocalProtocolError, match="accept_subscribe"):
        server.result(call_id)
    plain_id, message = client.call("c")
    server.receive(message, 1.0)
    with pytest.raises(LocalProtocolError, match="not a pending subscribe"):
        server.accept_subscribe(plain_id)
    assert server.accept_subscribe(call_id).subscribed


# --- Heartbeat ----------------------------------------------------------------------


def test_the_server_pings_every_interval_and_reaps_after_max_missed(codec: Codec) -> None:
    client, server = open_pair(codec, now=100.0, heartbeat_interval=10.0, heartbeat_max_missed=2)
    assert server.next_deadline() == 110.0
    assert not server.heartbeat_due(109.9)
    assert server.heartbeat_due(110.0)
    ping_message = server.ping(110.0)
    assert not server.heartbeat_due(110.0)
    assert server.next_deadline() == 120.0

    ping = client.receive(ping_message, 110.5)
    assert isinstance(ping, PingFrame)
    pong = server.receive(client.pong(ping.seq), 111.0)
    assert pong == PongFrame(ping.seq)
    assert server.last_ping_at == 110.0 and server.last_pong_at == 111.0
    assert server.round_trip_time == 1.0

    # Silent from 111 on: dead once (max_missed + 1) intervals have passed.
    for now in (120.0, 130.0):
        assert server.heartbeat_due(now)
        server.ping(now)
        assert not server.is_dead(now)
    assert server.next_deadline() == 140.0
    assert not server.is_dead(140.9)
    assert server.is_dead(141.0)


def test_any_frame_counts_as_life(codec: Codec) -> None:
    client, server = open_pair(codec, now=0.0, heartbeat_interval=10.0, heartbeat_max_missed=2)
    assert server.is_dead(30.0)
    server.receive(client.emit("still here"), 25.0)
    assert not server.is_dead(30.0) and server.is_dead(55.0)
    # Even a frame the machine ignores.
    server.receive(codec.encode(CancelFrame(99, "call")), 50.0)
    assert server.counters.late_cancels == 1
    assert not server.is_dead(55.0)


def test_the_client_declares_a_silent_server_dead(codec: Codec) -> None:
    client, server = open_pair(codec, now=0.0, heartbeat_interval=10.0, heartbeat_max_missed=2)
    assert not client.heartbeat_due(1000.0)  # the client only answers
    assert client.next_deadline() == 30.0
    client.receive(server.ping(10.0), 10.2)
    assert client.next_deadline() == pytest.approx(40.2)
    assert not client.is_dead(40.1) and client.is_dead(40.2)


def test_a_heartbeat_interval_of_zero_turns_it_off(codec: Codec) -> None:
    client, server = open_pair(codec, heartbeat_interval=0.0)
    for machine in (client, server):
        assert machine.next_deadline() == float("inf")
        assert not machine.heartbeat_due(1e9) and not machine.is_dead(1e9)


def test_the_heartbeat_can_be_reconfigured(codec: Codec) -> None:
    client, _ = open_pair(codec, heartbeat_interval=0.0)
    client.configure_heartbeat(2.0, 1, sends_pings=True, now=50.0)
    assert client.next_deadline() == 52.0 and client.heartbeat_due(52.0)
    assert client.is_dead(54.0) and not client.is_dead(53.9)
    with pytest.raises(ValueError):
        client.configure_heartbeat(-1.0, 1, sends_pings=True, now=0.0)
    with pytest.raises(ValueError):
        client.configure_heartbeat(1.0, 0, sends_pings=True, now=0.0)


def test_no_deadlines_before_the_handshake_or_after_close(codec: Codec) -> None:
    server = SocketProtocol("server", codec)
    assert server.next_deadline() == float("inf") and not server.is_dead(1e9)
    _client, server = open_pair(codec)
    server.close(CloseCode.GOING_AWAY)
    assert server.next_deadline() == float("inf")
    assert not server.heartbeat_due(1e9) and not server.is_dead(1e9)


# --- Closing ------------------------------------------------------------------------


def test_after_close_sending_raises_and_receiving_is_ignored(codec: Codec) -> None:
    client, server = open_pair(codec)
    call_id, message = client.call("x")
    server.receive(message, 1.0)
    request_id, _ = server.request("r")
    server.close(CloseCode.KICKED)
    assert server.state is ProtocolState.CLOSED
    assert (server.close_code, server.close_reason) == (4501, "kicked")
    assert not server.closed_by_peer
    assert not server.pending_calls and not server.pending_requests
    for attempt in (
        lambda: server.result(call_id),
        lambda: server.emit("e"),
        lambda: server.ping(2.0),
        lambda: server.request("r"),
        lambda: server.cancel_request(request_id),
    ):
        with pytest.raises(ProtocolClosedError):
            attempt()
    assert server.receive(client.emit("late"), 2.0) is None
    assert server.counters.after_close == 1
    server.close(CloseCode.NORMAL, "again")  # closing again changes nothing
    assert server.close_code == 4501


def test_the_peer_closing_is_recorded(codec: Codec) -> None:
    client, server = open_pair(codec)
    client.peer_closed(CloseCode.SUPERSEDED, "newer connection")
    assert client.closed_by_peer and client.close_code == 4502
    assert client.close_reason == "newer connection"
    _, server = open_pair(codec)
    server.peer_closed(None)
    assert server.close_code == CloseCode.ABNORMAL
    client.close(CloseCode.NORMAL)  # already closed by the peer: kept
    assert client.close_code == 4502


def test_a_violation_closes_the_machine_with_its_code(codec: Codec) -> None:
    client, server = open_pair(codec)
    call_id, message = client.call("x")
    server.receive(message, 1.0)
    error = reject(server, codec.encode(HelloFrame()))
    assert server.close_reason == error.reason
    with pytest.raises(ProtocolClosedError):
        server.result(call_id)


# --- Bad input ----------------------------------------------------------------------


def malformed_messages(codec: Codec) -> list[tuple[str, bytes | str]]:
    def encode(value: Any) -> bytes | str:
        if codec is MSGPACK:
            return msgspec.msgpack.encode(value)
        return msgspec.json.encode(value).decode()

    valid = codec.encode(CallFrame(1, "call", {"a": 1}))
    deep: bytes | str
    if codec is MSGPACK:
        deep = b"\x83\xa1t\xa5event\xa4name\xa1x\xa4data" + b"\x91" * 5000 + b"\xc0"
    else:
        deep = '{"t":"event","name":"x","data":' + "[" * 5000 + "]" * 5000 + "}"
    return [
        ("garbage", b"\xc1\xff\x00" if codec is MSGPACK else "{{]]not json"),
        ("truncated", valid[: len(valid) // 2]),
        ("empty", b"" if codec is MSGPACK else ""),
        ("not a map", encode([1, 2, 3])),
        ("a string", encode("call")),
        ("no tag", encode({"id": 1, "name": "x"})),
        ("unknown tag", encode({"t": "teleport", "id": 1})),
        ("tag of the wrong type", encode({"t": 5, "id": 1})),
        ("missing field", encode({"t": "call", "name": "x"})),
        ("wrong type", encode({"t": "call", "id": "1", "name": "x"})),
        ("negative id", encode({"t": "call", "id": -1, "name": "x"})),
        ("id beyond 2**53", encode({"t": "call", "id": 2**53, "name": "x"})),
        ("float id", encode({"t": "call", "id": 1.5, "name": "x"})),
        ("name of the wrong type", encode({"t": "call", "id": 1, "name": ["x"]})),
        ("bad id space", encode({"t": "cancel", "id": 1, "of": "everything"})),
        ("frame from the wrong side", codec.encode(ResultFrame(1))),
        ("nesting too deep", deep),
    ]


def test_every_kind_of_malformed_frame_closes_with_1002(codec: Codec) -> None:
    for label, message in malformed_messages(codec):
        _, server = open_pair(codec)
        with pytest.raises(MalformedFrameError) as caught:
            server.receive(message, 1.0)
        assert caught.value.close_code == 1002, label
        assert server.state is ProtocolState.CLOSED, label
        assert server.close_code == 1002, label


def test_the_wrong_message_type_for_the_codec_closes_with_1003(codec: Codec) -> None:
    _, server = open_pair(codec)
    valid = codec.encode(PingFrame(1))
    other = valid.encode() if isinstance(valid, str) else valid.decode("latin-1")
    error = reject(server, other, 1003)
    assert isinstance(error, MalformedFrameError)
    assert ("text" if codec is MSGPACK else "binary") in str(error)


def test_a_frame_from_the_wrong_side_is_named_as_such(codec: Codec) -> None:
    _, server = open_pair(codec)
    error = reject(server, codec.encode(WelcomeFrame("c", 1)))
    assert "client may not send 'welcome'" in str(error)


def test_a_message_over_the_size_limit_closes_with_1009(codec: Codec) -> None:
    client, server = open_pair(codec, server_limit=200)
    _, fits = client.call("x", "a" * 100)
    assert isinstance(server.receive(fits, 1.0), CallFrame)
    too_big = codec.encode(CallFrame(2, "x", "a" * 300))
    error = reject(server, too_big, 1009)
    assert isinstance(error, FrameTooLargeError)
    assert (error.size, error.limit) == (len(too_big), 200)


def test_a_frame_over_the_peers_limit_is_refused_before_sending(codec: Codec) -> None:
    client, server = open_pair(codec, client_limit=200, server_limit=200)
    call_id, message = client.call("x")
    server.receive(message, 1.0)
    with pytest.raises(PeerLimitExceededError) as caught:
        server.result(call_id, "a" * 300)
    assert caught.value.limit == 200
    assert call_id in server.pending_calls  # still owed: answer with an error
    answer = client.receive(server.error(call_id, ErrorCode.TOO_LARGE), 1.0)
    assert isinstance(answer, ErrorFrame) and answer.code == "too_large"
    with pytest.raises(PeerLimitExceededError):
        client.call("x", "a" * 300)
    assert client.call("y")[0] == 2  # the refused call took no id


def test_unencodable_data_is_refused_and_changes_nothing(codec: Codec) -> None:
    client, server = open_pair(codec)
    with pytest.raises(FrameEncodeError):
        client.call("x", object())
    with pytest.raises(FrameEncodeError):
        client.call("bad\ud800name")
    assert not client.pending_calls
    call_id, message = client.call("x")
    assert call_id == 1
    server.receive(message, 1.0)
    with pytest.raises(FrameEncodeError):
        server.result(call_id, {1j})
    assert call_id in server.pending_calls
    with pytest.raises(FrameEncodeError):
        codec.encode_data(object())


def test_a_payload_decoding_into_an_unsupported_type_is_a_payload_error(codec: Codec) -> None:
    class Opaque:
        pass

    with pytest.raises(PayloadDecodeError):
        codec.decode_data(codec.encode_data(1), Opaque)


def test_a_non_fatal_bad_frame_leaves_the_machine_working(codec: Codec) -> None:
    client, server = open_pair(codec)
    for ignored in (
        codec.encode(CancelFrame(5, "call")),
        codec.encode(UnsubscribeFrame("never")),
        codec.encode(EventFrame("x", key="k")),
    ):
        server.receive(ignored, 1.0)
    call_id, message = client.call("after")
    assert isinstance(server.receive(message, 1.0), CallFrame)
    assert isinstance(client.receive(server.result(call_id), 1.0), ResultFrame)


# --- Names with any content ---------------------------------------------------------

NAMES = [
    "a.b.c",
    "*",
    ">",
    "a.*.>",
    "with spaces  and\ttabs",
    "line\nbreak\r\n",
    'quote " and \\ backslash',
    "ünïcødé ✓ 🎉 名前",
    "\x00\x01 control",
    "$SYS.reserved",
    "",
    "x" * 1024,
    "é" * 1024,
    "🎉" * 256,
]


@pytest.mark.parametrize("name", NAMES, ids=range(len(NAMES)))
def test_user_strings_survive_the_round_trip(codec: Codec, name: str) -> None:
    client = SocketProtocol("client", codec)
    server = SocketProtocol("server", codec)
    hello = server.receive(
        client.hello(name, client_name=name, client_version=name, previous_connection_id=name),
        0.0,
    )
    assert isinstance(hello, HelloFrame)
    assert hello.client_id == hello.client_name == hello.previous_connection_id == name
    welcome = client.receive(server.welcome(name, 1, now=0.0), 0.0)
    assert isinstance(welcome, WelcomeFrame) and welcome.connection_id == welcome.client_id == name

    call_id, message = client.call(name, name)
    call = server.receive(message, 1.0)
    assert isinstance(call, CallFrame) and call.name == name
    assert codec.decode_data(call.data, str) == name
    error = client.receive(server.error(call_id, name, name, {name: name}), 1.0)
    assert isinstance(error, ErrorFrame) and error.code == error.message == name
    assert codec.decode_data(error.details, dict[str, str]) == {name: name}

    event = server.receive(client.emit(name, key=name), 1.0)
    assert isinstance(event, EventFrame) and event.name == event.key == name
    subscribe(client, server, name)
    event = client.receive(server.emit(name, topic=name, key=name), 1.0)
    assert isinstance(event, EventFrame) and event.name == event.topic == event.key == name
    assert server.receive(client.unsubscribe(name), 1.0) == UnsubscribeFrame(name)

    request_id, message = server.request(name, name)
    request = client.receive(message, 1.0)
    assert isinstance(request, RequestFrame) and request.name == name
    failure = server.receive(client.reply_error(request_id, name, name), 1.0)
    assert isinstance(failure, ReplyErrorFrame) and failure.code == failure.message == name


# --- Codecs -------------------------------------------------------------------------

EVERY_FRAME: list[Frame] = [
    HelloFrame(
        version=MAX_ID,
        client_id="c",
        client_name="n",
        client_version="v",
        previous_connection_id="p",
        max_message_size=MAX_ID,
    ),
    WelcomeFrame(
        connection_id="c",
        node_id=MAX_ID,
        client_id="c",
        version=1,
        heartbeat_interval=25.5,
        heartbeat_max_missed=3,
        max_message_size=MAX_ID,
        max_buffered_bytes=MAX_ID,
        call_timeout=1e9,
    ),
    CallFrame(MAX_ID, "n", {"k": [1, 2.5, None, True, "s"]}),
    ResultFrame(MAX_ID, -MAX_ID),
    ErrorFrame(MAX_ID, "c", "m", {"d": 1}),
    EventFrame("n", "d", key="k", topic="t"),
    RequestFrame(MAX_ID, "n", {"d": 1}, 0.0),
    ReplyFrame(MAX_ID, [1]),
    ReplyErrorFrame(MAX_ID, "c", "m", "d"),
    CancelFrame(MAX_ID, "call"),
    CancelFrame(0, "request"),
    SubscribeFrame(MAX_ID, "t"),
    UnsubscribeFrame("t"),
    WatchFrame(MAX_ID, "r"),
    UnwatchFrame("r"),
    PresenceStateFrame(
        "r",
        MAX_ID,
        (PresenceMember("c", "k", MAX_ID, 1e12, "u", {"f": [1, "x"]}), PresenceMember("d", "l", 0)),
    ),
    PresenceDiffFrame("r", 1, (PresenceMember("c", "k", 1, 0.0, None),), ("d",)),
    PingFrame(MAX_ID),
    PongFrame(0),
]


def _payloads_decoded(frame: Frame, codec: Codec) -> dict[str, Any]:
    fields = msgspec.structs.asdict(frame)
    for name in ("data", "details"):
        if isinstance(fields.get(name), msgspec.Raw):
            fields[name] = codec.decode_data(fields[name], Any)
    return fields


def test_every_frame_kind_round_trips_at_the_edges_of_its_ranges(codec: Codec) -> None:
    for frame in EVERY_FRAME:
        decoded = codec.decode(codec.encode(frame))
        assert type(decoded) is type(frame)
        assert _payloads_decoded(decoded, codec) == msgspec.structs.asdict(frame)


def test_json_frames_are_plain_objects_with_a_t_and_exact_numbers() -> None:
    for frame in EVERY_FRAME:
        message = JSON.encode(frame)
        assert isinstance(message, str)
        value = json.loads(message)
        assert isinstance(value, dict)
        assert value["t"] == type(frame).__struct_config__.tag
        for field, content in value.items():
            if isinstance(content, int) and not isinstance(content, bool):
                assert abs(content) <= MAX_ID, field
                assert float(content) == content, field  # exact as a double


def test_fields_at_their_defaults_are_left_out_and_unknown_fields_ignored() -> None:
    assert json.loads(JSON.encode(CallFrame(1, "x"))) == {"t": "call", "id": 1, "name": "x"}
    later = '{"t":"call","id":1,"name":"x","priority":"high","data":2}'
    frame = JSON.decode(later)
    assert isinstance(frame, CallFrame) and JSON.decode_data(frame.data, int) == 2


def test_messages_are_binary_for_msgpack_and_text_for_json() -> None:
    assert MSGPACK.binary and isinstance(MSGPACK.encode(PingFrame(1)), bytes)
    assert not JSON.binary and isinstance(JSON.encode(PingFrame(1)), str)
    assert MSGPACK.subprotocol == MSGPACK_SUBPROTOCOL == "meshline.v1.msgpack"
    assert JSON.subprotocol == JSON_SUBPROTOCOL == "meshline.v1.json"


def test_a_raw_payload_is_spliced_in_unchanged(codec: Codec) -> None:
    raw = codec.encode_data({"shared": [1, 2, 3]})
    frame = codec.decode(codec.encode(EventFrame("e", raw)))
    assert isinstance(frame, EventFrame)
    assert bytes(frame.data) == bytes(raw)


def test_the_server_picks_the_first_offered_subprotocol_it_speaks() -> None:
    assert select_codec(["meshline.v1.json", "meshline.v1.msgpack"]) is JSON
    assert select_codec(["chat", "meshline.v1.msgpack", "meshline.v1.json"]) is MSGPACK
    assert select_codec(["meshline.v2.msgpack", "chat"]) is None
    assert select_codec([]) is None
    assert select_codec(["meshline.v1.json"], supported=["meshline.v1.msgpack"]) is None


def test_the_client_maps_the_accepted_subprotocol_to_its_codec() -> None:
    assert codec_for_subprotocol("meshline.v1.msgpack") is MSGPACK
    assert codec_for_subprotocol("meshline.v1.json") is JSON
    for accepted in (None, "", "meshline.v2.json"):
        with pytest.raises(RemoteProtocolError) as caught:
            codec_for_subprotocol(accepted)
        assert caught.value.close_code == CloseCode.UNSUPPORTED_PROTOCOL


def test_decoding_may_be_limited_to_one_senders_kinds(codec: Codec) -> None:
    welcome = codec.encode(WelcomeFrame("c", 1))
    assert isinstance(codec.decode(welcome), WelcomeFrame)
    assert isinstance(codec.decode(welcome, sender=Side.SERVER), WelcomeFrame)
    with pytest.raises(MalformedFrameError, match="client may not send"):
        codec.decode(welcome, sender=Side.CLIENT)


def test_a_reason_is_cut_to_fit_a_close_frame() -> None:
    error = RemoteProtocolError("é" * 200)
    assert len(error.reason.encode()) <= 123 and error.reason.endswith("...")
    assert str(error) == "é" * 200
    assert RemoteProtocolError("short").reason == "short"


# --- Close codes --------------------------------------------------------------------


def test_meshline_close_codes_tell_their_band_by_number() -> None:
    own = [code for code in CloseCode if code >= 4000]
    assert own
    for code in own:
        assert (code in RECONNECT_BAND) == should_reconnect(code), code
        assert (code in TERMINAL_BAND) != should_reconnect(code), code
    assert should_reconnect(4321) and not should_reconnect(4999)


def test_close_codes_sort_into_the_documented_bands() -> None:
    reconnect = {1000, 1001, 1005, 1006, 1011, 1012, 1013, 1014, 4000, 4001, 4002, None}
    terminal = {1002, 1003, 1007, 1008, 1009, 1010, 1015, 4500, 4501, 4502, 4503, 4504, 4505}
    for code in reconnect:
        assert should_reconnect(code), code
    for code in terminal:
        assert not should_reconnect(code), code
    # Unknown codes reconnect (with backoff): only a known terminal code stops a client.
    assert should_reconnect(3000) and should_reconnect(1016) and should_reconnect(5000)


def test_every_close_code_has_a_reason() -> None:
    for code in CloseCode:
        assert close_reason(code) and not close_reason(code).startswith("code ")
    assert close_reason(3999) == "code 3999"


def test_error_codes_are_distinct_snake_case_strings() -> None:
    values = [code.value for code in ErrorCode]
    assert len(values) == len(set(values))
    assert all(re.fullmatch(r"[a-z_]+", value) for value in values)
    assert ErrorCode.BAD_INPUT.value == "bad_input"


# --- The protocol page documents the wire as built ----------------------------------


def _table_rows(text: str, first_column: str) -> dict[str, str]:
    """The rows of the reST list-table whose header starts with ``first_column``,
    keyed by their first cell's literal."""
    lines = text[text.index(f"   * - {first_column}") :].splitlines()
    table = []
    for line in lines:
        if line and not line.startswith("   "):
            break
        table.append(line)
    rows = "\n".join(table).split("\n   * - ")
    found = {}
    for row in rows[1:]:
        match = re.match(r"``([^`]+)``", row)
        if match:
            found[match.group(1)] = row
    return found


def test_the_protocol_page_lists_every_frame_and_field() -> None:
    text = DOCS.read_text()
    rows = _table_rows(text, "``t``")
    frames = {type(frame) for frame in EVERY_FRAME}
    for frame_type in frames:
        tag = frame_type.__struct_config__.tag
        assert tag in rows, tag
        for field in frame_type.__struct_fields__:
            assert f"``{field}``" in rows[tag], (tag, field)
    assert set(rows) == {frame_type.__struct_config__.tag for frame_type in frames}


def test_the_protocol_page_lists_every_close_and_error_code() -> None:
    text = DOCS.read_text()
    for code in CloseCode:
        assert re.search(rf"\b{int(code)}\b", text), code
    for error_code in ErrorCode:
        assert f"``{error_code.value}``" in text, error_code
