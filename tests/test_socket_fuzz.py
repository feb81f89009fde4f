"""Fuzzing the socket protocol's decoder and state machine with hypothesis.

Random bytes and text, random msgpack/JSON values, frame-like maps and mutated valid
frames (bytes flipped, inserted or deleted, truncated, tags and field types changed,
fields dropped) go into both codecs and into both sides' machines. The only
exceptions allowed out are the documented protocol errors, each closing the machine
with its close code; and after a frame that was not fatal, the machine still works.

300 examples per test in the default "ci" profile, 10,000 with
HYPOTHESIS_PROFILE=thorough.
"""

from __future__ import annotations

from typing import Any, AnyStr

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshline._sockets._frames import (
    JSON,
    MAX_ID,
    MSGPACK,
    CallFrame,
    CancelFrame,
    Codec,
    ErrorFrame,
    EventFrame,
    Frame,
    HelloFrame,
    MalformedFrameError,
    Message,
    PingFrame,
    PongFrame,
    PresenceDiffFrame,
    PresenceMember,
    PresenceStateFrame,
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
)
from meshline._sockets._protocol import (
    Event,
    ProtocolState,
    SocketProtocol,
    Subscribed,
    SubscribeRefused,
    Watching,
    WatchRefused,
)

FUZZ_EXAMPLES = (
    10_000 if settings().max_examples >= settings.get_profile("thorough").max_examples else 300
)
"""A few hundred in CI, 10,000 under the thorough profile."""

pytestmark = pytest.mark.timeout(120 if FUZZ_EXAMPLES < 10_000 else 1800)
"""10,000 examples of a machine test take a few minutes on 2 cores."""

fuzz = settings(
    max_examples=FUZZ_EXAMPLES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CLOSE_CODES_FOR_VIOLATIONS = {1002, 1003, 1009, 4505}
LIMIT = 4096
"""The machines' max_message_size, small enough for the fuzz to cross it."""

# --- Strategies ---------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-MAX_ID, MAX_ID)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)
"""Payloads that both encodings carry exactly."""

wild_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
wild_values = st.recursive(
    wild_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=6) | st.integers(-5, 5), inner, max_size=4)
    ),
    max_leaves=10,
)
"""Any msgpack value, with wrong types, out-of-range numbers and non-string keys."""

ids = st.integers(0, 3) | st.integers(0, MAX_ID)
"""Mostly small ids, so that they collide with the ids the machines have in play."""
names = st.sampled_from(["t", "call", "x.y", "*", ">"]) | st.text(max_size=16)
seconds = st.floats(0.0, 1e9)
optional_names = st.none() | names
rooms = st.sampled_from(["r", "other"]) | names
"""Mostly the room the machines watch ("r") or one they do not."""
members = st.builds(
    PresenceMember,
    connection_id=names,
    client_id=names,
    node_id=ids,
    connected_at=st.floats(0.0, 1e12),
    user_id=optional_names,
    fields=st.dictionaries(st.text(max_size=6), json_values, max_size=3),
)

client_frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(
        HelloFrame,
        version=st.integers(1, 3),
        client_id=names,
        client_name=names,
        client_version=names,
        previous_connection_id=names,
        max_message_size=st.integers(0, MAX_ID),
    ),
    st.builds(CallFrame, id=ids, name=names, data=json_values),
    st.builds(EventFrame, name=names, data=json_values, key=optional_names),
    st.builds(ReplyFrame, id=ids, data=json_values),
    st.builds(ReplyErrorFrame, id=ids, code=names, message=names, details=json_values),
    st.builds(CancelFrame, id=ids, of=st.sampled_from(["call", "request"])),
    st.builds(SubscribeFrame, id=ids, topic=names),
    st.builds(UnsubscribeFrame, topic=names),
    st.builds(WatchFrame, id=ids, room=names),
    st.builds(UnwatchFrame, room=names),
    st.builds(PingFrame, seq=ids),
    st.builds(PongFrame, seq=ids),
)
"""Well-formed frames of the kinds a client sends (some out of place, by their ids)."""

server_frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(
        WelcomeFrame,
        connection_id=names,
        node_id=ids,
        client_id=names,
        version=st.integers(1, 3),
        heartbeat_interval=seconds,
        heartbeat_max_missed=st.integers(1, 10),
        max_message_size=st.integers(0, MAX_ID),
        max_buffered_bytes=st.integers(0, MAX_ID),
        call_timeout=st.none() | seconds,
    ),
    st.builds(ResultFrame, id=ids, data=json_values),
    st.builds(ErrorFrame, id=ids, code=names, message=names, details=json_values),
    st.builds(EventFrame, name=names, data=json_values, key=optional_names, topic=optional_names),
    st.builds(RequestFrame, id=ids, name=names, data=json_values, timeout=st.none() | seconds),
    st.builds(CancelFrame, id=ids, of=st.sampled_from(["call", "request"])),
    st.builds(UnsubscribeFrame, topic=names),
    st.builds(PresenceStateFrame, room=rooms, rev=ids, members=st.tuples() | st.tuples(members)),
    st.builds(
        PresenceDiffFrame,
        room=rooms,
        rev=ids,
        joins=st.tuples() | st.tuples(members),
        leaves=st.tuples() | st.tuples(names),
    ),
    st.builds(PingFrame, seq=ids),
    st.builds(PongFrame, seq=ids),
)
"""Well-formed frames of the kinds a server sends."""

any_frames = client_frames | server_frames

TAGS = [
    "hello",
    "welcome",
    "call",
    "result",
    "error",
    "event",
    "request",
    "reply",
    "reply_error",
    "cancel",
    "subscribe",
    "unsubscribe",
    "watch",
    "unwatch",
    "presence_state",
    "presence_diff",
    "ping",
    "pong",
]
FIELDS = sorted(
    {
        name
        for frame_type in (
            HelloFrame,
            WelcomeFrame,
            CallFrame,
            ResultFrame,
            ErrorFrame,
            EventFrame,
            RequestFrame,
            ReplyFrame,
            ReplyErrorFrame,
            CancelFrame,
            SubscribeFrame,
            UnsubscribeFrame,
            WatchFrame,
            UnwatchFrame,
            PresenceStateFrame,
            PresenceDiffFrame,
            PingFrame,
            PongFrame,
        )
        for name in frame_type.__struct_fields__
    }
)

frame_like_maps = st.fixed_dictionaries(
    {"t": st.sampled_from(TAGS) | wild_scalars},
    optional={name: wild_values | ids | names for name in FIELDS},
)
"""Maps that look like frames: a real or bogus tag, real field names, any values."""


def encode_value(codec: Codec, value: Any) -> Message | None:
    """``value`` as a message of ``codec``'s kind, or None if it cannot carry it."""
    try:
        if codec is MSGPACK:
            return msgspec.msgpack.encode(value)
        return msgspec.json.encode(value).decode()
    except (TypeError, ValueError, OverflowError):
        return None


@st.composite
def mutated_frames(draw: st.DrawFn, codec: Codec) -> Message:
    """A valid frame, changed: in structure (tag, a field's type, a field dropped),
    then in its bytes or characters (flipped, inserted, deleted, truncated)."""
    frame = draw(any_frames)
    as_map: dict[str, Any] = msgspec.to_builtins(frame)
    for change in draw(st.lists(st.sampled_from(["retag", "retype", "drop"]), max_size=2)):
        if change == "retag":
            as_map["t"] = draw(st.sampled_from(TAGS) | wild_scalars)
        elif change == "retype":
            as_map[draw(st.sampled_from(sorted(as_map)))] = draw(wild_values)
        elif len(as_map) > 1:
            del as_map[draw(st.sampled_from(sorted(as_map)))]
    message = encode_value(codec, as_map)
    if message is None:
        message = codec.encode(frame)
    for change in draw(
        st.lists(st.sampled_from(["flip", "insert", "delete", "truncate"]), max_size=3)
    ):
        if not message:
            break
        at = draw(st.integers(0, len(message) - 1))
        cut = at + draw(st.integers(1, 4))
        if isinstance(message, bytes):
            message = _splice(message, draw(st.binary(min_size=1, max_size=3)), change, at, cut)
        else:
            message = _splice(message, draw(st.text(min_size=1, max_size=3)), change, at, cut)
    return message


def _splice(message: AnyStr, piece: AnyStr, change: str, at: int, cut: int) -> AnyStr:
    if change == "flip":
        return message[:at] + piece + message[at + len(piece) :]
    if change == "insert":
        return message[:at] + piece + message[at:]
    if change == "delete":
        return message[:at] + message[cut:]
    return message[:at]


def garbage(codec: Codec) -> st.SearchStrategy[Message]:
    """Every kind of bad (or accidentally good) message for ``codec``, including
    messages of the wrong type and messages over the size limit."""
    other_type: st.SearchStrategy[Message] = (
        st.text(max_size=40) if codec is MSGPACK else st.binary(max_size=40)
    )
    own_type: st.SearchStrategy[Message] = (
        st.binary(max_size=200) if codec is MSGPACK else st.text(max_size=200)
    )
    encoded_values = st.builds(lambda value: encode_value(codec, value), wild_values).filter(
        lambda message: message is not None
    )
    encoded_maps = st.builds(lambda value: encode_value(codec, value), frame_like_maps).filter(
        lambda message: message is not None
    )
    oversized = st.integers(LIMIT, 2 * LIMIT).map(
        lambda size: codec.encode(EventFrame("big", "a" * size))
    )
    return st.one_of(
        own_type,
        other_type,
        encoded_values,
        encoded_maps,
        mutated_frames(codec),
        oversized,
    )


codecs = st.sampled_from([MSGPACK, JSON])

GARBAGE = {codec: garbage(codec) for codec in (MSGPACK, JSON)}
FROM_CLIENT = {codec: client_frames.map(codec.encode) for codec in (MSGPACK, JSON)}
FROM_SERVER = {codec: server_frames.map(codec.encode) for codec in (MSGPACK, JSON)}

# --- Checks -------------------------------------------------------------------------


def decode_or_documented_error(codec: Codec, message: Message) -> None:
    for sender in (None, Side.CLIENT, Side.SERVER):
        try:
            codec.decode(message, max_size=LIMIT, sender=sender)
        except RemoteProtocolError as exc:
            assert exc.close_code in CLOSE_CODES_FOR_VIOLATIONS
            assert len(exc.reason.encode()) <= 123


def feed(
    machine: SocketProtocol, message: Message, now: float = 5.0, *, handshake: bool = False
) -> tuple[bool, Event | None]:
    """Feed ``message``; say whether the machine is still open, and what it reported.

    Only a protocol error may come out, and then the machine must be closed with the
    error's code. Outside the ``handshake``, a message that is not fatal leaves the
    state as it was.
    """
    state = machine.state
    try:
        event = machine.receive(message, now)
    except RemoteProtocolError as exc:
        assert exc.close_code in CLOSE_CODES_FOR_VIOLATIONS
        assert len(exc.reason.encode()) <= 123
        assert machine.state is ProtocolState.CLOSED
        assert machine.close_code == exc.close_code and not machine.closed_by_peer
        return False, None
    if handshake:
        assert machine.state in (ProtocolState.START, ProtocolState.HELLO, ProtocolState.OPEN)
    else:
        assert machine.state is state
    assert machine.last_received_at == now
    return True, event


class Expected:
    """What a machine's tables must hold, given the events it reported: an event
    changes exactly what it says, and a frame it ignored changes nothing."""

    def __init__(self, machine: SocketProtocol) -> None:
        self.calls = set(machine.pending_calls)
        self.requests = set(machine.pending_requests)
        self.topics = set(machine.subscriptions)
        self.watches = set(machine.watches)

    def apply(self, side: Side, event: Event | None) -> None:
        if side is Side.SERVER:
            if isinstance(event, CallFrame | SubscribeFrame | WatchFrame):
                assert event.id not in self.calls
                self.calls.add(event.id)
            elif isinstance(event, ReplyFrame | ReplyErrorFrame):
                self.requests.remove(event.id)
            elif isinstance(event, UnsubscribeFrame):
                self.topics.discard(event.topic)
            elif isinstance(event, UnwatchFrame):
                self.watches.discard(event.room)
            return
        if isinstance(event, ResultFrame | ErrorFrame | SubscribeRefused | WatchRefused):
            self.calls.remove(event.id)
        elif isinstance(event, Watching):
            self.calls.remove(event.id)
            self.watches.add(event.room)
        elif isinstance(event, PresenceStateFrame | PresenceDiffFrame):
            assert event.room in self.watches or self.calls
        elif isinstance(event, Subscribed):
            self.calls.remove(event.id)
            self.topics.add(event.topic)
        elif isinstance(event, RequestFrame):
            assert event.id not in self.requests
            self.requests.add(event.id)
        elif isinstance(event, UnsubscribeFrame):
            self.topics.remove(event.topic)
        elif isinstance(event, EventFrame) and event.topic is not None:
            assert event.topic in self.topics

    def check(self, machine: SocketProtocol) -> None:
        assert machine.pending_calls == self.calls
        assert machine.pending_requests == self.requests
        assert machine.subscriptions == self.topics
        assert machine.watches == self.watches


def open_pair(codec: Codec) -> tuple[SocketProtocol, SocketProtocol]:
    """Two open machines with one of everything in flight: the client's call 1 is
    pending, the topic "t" subscribed, the room "r" watched, and the server's
    request 1 pending."""
    client = SocketProtocol(Side.CLIENT, codec, max_message_size=LIMIT)
    server = SocketProtocol(Side.SERVER, codec, max_message_size=LIMIT)
    server.receive(client.hello("c"), 0.0)
    client.receive(server.welcome("conn", 1, now=0.0), 0.0)
    sub_id, message = client.subscribe("t")
    server.receive(message, 0.0)
    client.receive(server.accept_subscribe(sub_id).message, 0.0)
    watch_id, message = client.watch("r")
    server.receive(message, 0.0)
    for message in server.accept_watch(watch_id, 1, ()).messages:
        client.receive(message, 0.0)
    _, message = client.call("pending")
    server.receive(message, 0.0)
    _, message = server.request("pending")
    client.receive(message, 0.0)
    return client, server


def server_still_works(codec: Codec, server: SocketProtocol) -> None:
    call_id = next(i for i in range(1, 100) if i not in server.pending_calls)
    call = server.receive(codec.encode(CallFrame(call_id, "after", [1])), 6.0)
    assert isinstance(call, CallFrame) and codec.decode_data(call.data, list[int]) == [1]
    assert isinstance(codec.decode(server.result(call_id, 2)), ResultFrame)
    assert isinstance(server.receive(codec.encode(PingFrame(9)), 6.0), PingFrame)
    assert isinstance(codec.decode(server.pong(9)), PongFrame)
    request_id, message = server.request("again")
    assert isinstance(codec.decode(message), RequestFrame)
    reply = server.receive(codec.encode(ReplyFrame(request_id, 3)), 6.0)
    assert isinstance(reply, ReplyFrame) and reply.id == request_id
    assert not server.is_dead(6.0)


def client_still_works(codec: Codec, client: SocketProtocol) -> None:
    call_id, message = client.call("after", [1])
    assert isinstance(codec.decode(message), CallFrame)
    result = client.receive(codec.encode(ResultFrame(call_id, 2)), 6.0)
    assert isinstance(result, ResultFrame) and codec.decode_data(result.data, int) == 2
    assert isinstance(client.receive(codec.encode(PingFrame(9)), 6.0), PingFrame)
    assert isinstance(codec.decode(client.pong(9)), PongFrame)
    event = client.receive(codec.encode(EventFrame("e", 1)), 6.0)
    assert isinstance(event, EventFrame)


# --- The decoder --------------------------------------------------------------------


@fuzz
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_msgpack_decoder(message: bytes) -> None:
    decode_or_documented_error(MSGPACK, message)


@fuzz
@given(st.text(max_size=300))
def test_random_text_never_crashes_the_json_decoder(message: str) -> None:
    decode_or_documented_error(JSON, message)


@fuzz
@given(codecs, st.data())
def test_any_message_gets_a_frame_or_a_documented_error(codec: Codec, data: st.DataObject) -> None:
    decode_or_documented_error(codec, data.draw(GARBAGE[codec]))


@fuzz
@given(codecs, any_frames)
def test_every_well_formed_frame_round_trips(codec: Codec, frame: Frame) -> None:
    decoded = codec.decode(codec.encode(frame))
    assert type(decoded) is type(frame)
    fields = msgspec.structs.asdict(decoded)
    for name in ("data", "details"):
        if name in fields:
            fields[name] = codec.decode_data(fields[name], Any)
    assert fields == msgspec.structs.asdict(frame)


@fuzz
@given(codecs, any_frames)
def test_frames_decode_only_from_their_own_side(codec: Codec, frame: Frame) -> None:
    message = codec.encode(frame)
    for sender in (Side.CLIENT, Side.SERVER):
        if sender in type(frame).senders:
            assert type(codec.decode(message, sender=sender)) is type(frame)
        else:
            with pytest.raises(MalformedFrameError, match=f"{sender.value} may not send"):
                codec.decode(message, sender=sender)


# --- The machine --------------------------------------------------------------------


@fuzz
@given(codecs, st.data())
def test_a_server_survives_any_message_or_closes_with_a_code(
    codec: Codec, data: st.DataObject
) -> None:
    _, server = open_pair(codec)
    if feed(server, data.draw(GARBAGE[codec] | FROM_CLIENT[codec]))[0]:
        server_still_works(codec, server)


@fuzz
@given(codecs, st.data())
def test_a_client_survives_any_message_or_closes_with_a_code(
    codec: Codec, data: st.DataObject
) -> None:
    client, _ = open_pair(codec)
    if feed(client, data.draw(GARBAGE[codec] | FROM_SERVER[codec]))[0]:
        client_still_works(codec, client)


@fuzz
@given(codecs, st.sampled_from([Side.CLIENT, Side.SERVER]), st.data())
def test_a_sequence_of_frames_changes_only_what_its_events_say(
    codec: Codec, side: Side, data: st.DataObject
) -> None:
    """Well-formed frames with colliding ids, in any order, with some garbage: each is
    handled or closes the machine; while open, the machine's pending ids and topics
    are exactly what the events it reported imply, and at the end it still works."""
    client, server = open_pair(codec)
    machine = server if side is Side.SERVER else client
    expected = Expected(machine)
    frames = FROM_CLIENT[codec] if side is Side.SERVER else FROM_SERVER[codec]
    for message in data.draw(st.lists(frames | GARBAGE[codec], min_size=1, max_size=8)):
        still_open, event = feed(machine, message)
        if not still_open:
            return
        expected.apply(side, event)
        expected.check(machine)
    if side is Side.SERVER:
        server_still_works(codec, server)
    else:
        client_still_works(codec, client)


@fuzz
@given(codecs, st.data(), st.sampled_from([Side.CLIENT, Side.SERVER]))
def test_a_machine_in_the_handshake_survives_any_message(
    codec: Codec, data: st.DataObject, side: Side
) -> None:
    machine = SocketProtocol(side, codec, max_message_size=LIMIT)
    if side is Side.CLIENT and data.draw(st.booleans()):
        machine.hello("c")
    frames = FROM_CLIENT[codec] if side is Side.SERVER else FROM_SERVER[codec]
    feed(machine, data.draw(GARBAGE[codec] | frames), handshake=True)
