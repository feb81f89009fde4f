"""The one-pass frame encoders produce exactly the bytes of the struct encoders."""

from __future__ import annotations

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from meshline._mesh._wire import (
    BroadcastFrame,
    NodeFrame,
    OkReply,
    Reply,
    RequestFrame,
    encode,
    encode_broadcast,
    encode_ok_reply,
    encode_payload,
    encode_request,
)

payloads = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)


@given(
    request_id=st.integers(0, 2**63 - 1),
    sender=st.integers(0, 2**31),
    kind=st.text(min_size=1),
    timeout=st.floats(0.001, 1e6),
    data=payloads,
)
def test_request_encoding_matches_the_struct(
    request_id: int, sender: int, kind: str, timeout: float, data: object
) -> None:
    fast = encode_request(request_id, sender, kind, timeout, data)
    slow = encode(RequestFrame(request_id, sender, kind, timeout, encode_payload(data)))
    assert fast == slow
    frame = msgspec.msgpack.decode(fast, type=NodeFrame)
    assert isinstance(frame, RequestFrame)
    assert msgspec.msgpack.decode(frame.data) == data


@given(sender=st.integers(0, 2**31), kind=st.text(min_size=1), skip=st.booleans(), data=payloads)
def test_broadcast_encoding_matches_the_struct(
    sender: int, kind: str, skip: bool, data: object
) -> None:
    fast = encode_broadcast(sender, kind, skip, data)
    assert fast == encode(BroadcastFrame(sender, kind, skip, encode_payload(data)))


@given(data=payloads)
def test_ok_reply_encoding_matches_the_struct(data: object) -> None:
    fast = encode_ok_reply(data)
    assert fast == encode(OkReply(encode_payload(data)))
    assert isinstance(msgspec.msgpack.decode(fast, type=Reply), OkReply)
