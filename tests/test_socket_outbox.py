"""The outgoing queue as a plain data structure: byte counting and the three policies."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from meshline import InvalidArgumentError
from meshline._sockets._outbox import Outbox, OverflowPolicy, PutOutcome, message_size


def drain(outbox: Outbox) -> list[Any]:
    taken = []
    while (message := outbox.take()) is not None:
        taken.append(message)
    return taken


def test_message_size_counts_utf8_bytes() -> None:
    assert message_size(b"abc") == 3
    assert message_size("abc") == 3
    assert message_size("é") == 2
    assert message_size("☃") == 3
    assert message_size("") == 0


def test_messages_come_out_in_order_and_bytes_are_counted() -> None:
    outbox = Outbox(100)
    assert outbox.take() is None
    assert outbox.put(b"one") is PutOutcome.QUEUED
    assert outbox.put("twö") is PutOutcome.QUEUED
    assert outbox.buffered_bytes == 3 + 4
    assert len(outbox) == 2
    assert list(outbox) == [b"one", "twö"]
    assert outbox.take() == b"one"
    assert outbox.buffered_bytes == 4
    assert drain(outbox) == ["twö"]
    assert outbox.buffered_bytes == 0
    assert not outbox


def test_close_policy_overflows_at_the_limit_for_good() -> None:
    outbox = Outbox(10, "close")
    assert outbox.put(b"x" * 10) is PutOutcome.QUEUED  # exactly at the limit is fine
    assert outbox.put(b"y") is PutOutcome.OVERFLOW
    assert outbox.overflowed
    assert outbox.take() == b"x" * 10
    # Once overflowed, nothing more is queued, even with room again.
    assert outbox.put(b"z") is PutOutcome.OVERFLOW
    assert outbox.put(b"z", control=True) is PutOutcome.OVERFLOW
    assert outbox.take() is None


def test_drop_policy_drops_and_counts_but_keeps_control_messages() -> None:
    outbox = Outbox(10, OverflowPolicy.DROP)
    assert outbox.put(b"a" * 8) is PutOutcome.QUEUED
    assert outbox.put(b"b" * 5) is PutOutcome.DROPPED
    assert outbox.put(b"c" * 5, key="k") is PutOutcome.DROPPED  # keys mean nothing here
    assert outbox.dropped == 2
    assert outbox.put(b"r" * 8, control=True) is PutOutcome.QUEUED  # past the limit
    assert outbox.buffered_bytes == 16
    assert outbox.put(b"s" * 5, control=True) is PutOutcome.OVERFLOW  # past twice the limit
    assert drain(outbox) == [b"a" * 8, b"r" * 8]


def test_latest_policy_replaces_in_place_and_drops_others_past_the_limit() -> None:
    outbox = Outbox(20, "latest")
    assert outbox.put(b"cursor=1", key="cursor") is PutOutcome.QUEUED
    assert outbox.put(b"chat", key=None) is PutOutcome.QUEUED
    # Under the limit too: only the newest value of a key waits, in the first one's place.
    assert outbox.put(b"cursor=22", key="cursor") is PutOutcome.REPLACED
    assert outbox.buffered_bytes == 9 + 4
    assert outbox.put(b"other=1", key="other") is PutOutcome.QUEUED
    assert outbox.buffered_bytes == 20
    assert outbox.put(b"other=2", key="other") is PutOutcome.REPLACED
    assert outbox.put(b"x", key=None) is PutOutcome.DROPPED
    assert outbox.put(b"new=1", key="new") is PutOutcome.DROPPED
    assert (outbox.dropped, outbox.replaced) == (2, 2)
    assert drain(outbox) == [b"cursor=22", b"chat", b"other=2"]
    # A key taken by the writer starts afresh.
    assert outbox.put(b"cursor=3", key="cursor") is PutOutcome.QUEUED
    assert drain(outbox) == [b"cursor=3"]


def test_a_bigger_replacement_stops_at_twice_the_limit() -> None:
    outbox = Outbox(10, "latest")
    assert outbox.put(b"k=1", key="k") is PutOutcome.QUEUED
    assert outbox.put(b"k=" + b"x" * 15, key="k") is PutOutcome.REPLACED  # 17: past the limit
    assert outbox.put(b"k=" + b"x" * 19, key="k") is PutOutcome.OVERFLOW  # 21: past 20
    assert outbox.overflowed


def test_control_messages_are_never_coalesced() -> None:
    outbox = Outbox(100, "latest")
    outbox.put(b"a", key="k")
    assert outbox.put(b"b", key="k", control=True) is PutOutcome.QUEUED
    assert drain(outbox) == [b"a", b"b"]


def test_clear_forgets_everything() -> None:
    outbox = Outbox(100, "latest")
    outbox.put(b"a", key="k")
    outbox.put(b"b")
    assert outbox.clear() == 2
    assert (outbox.buffered_bytes, len(outbox)) == (0, 0)
    assert outbox.put(b"c", key="k") is PutOutcome.QUEUED


@pytest.mark.parametrize(
    ("limit", "policy"), [(0, "close"), (-1, "drop"), (1.5, "drop"), (10, "x")]
)
def test_bad_options_are_refused(limit: Any, policy: str) -> None:
    with pytest.raises(InvalidArgumentError):
        Outbox(limit, policy)


# --- A model-based check of every policy --------------------------------------------------

KEYS = st.sampled_from([None, "a", "b", "c"])


class OutboxModel(RuleBasedStateMachine):
    """The outbox against a plain list of (message, key), for every policy."""

    def __init__(self) -> None:
        super().__init__()
        self.outbox: Outbox | None = None
        self.model: list[list[Any]] = []  # [message, key]
        self.overflowed = False
        self.dropped = 0
        self.counter = 0

    @rule(limit=st.integers(1, 60), policy=st.sampled_from(list(OverflowPolicy)))
    def start(self, limit: int, policy: OverflowPolicy) -> None:
        if self.outbox is None:
            self.outbox = Outbox(limit, policy)

    @rule(size=st.integers(0, 25), key=KEYS, control=st.booleans(), text=st.booleans())
    def put(self, size: int, key: str | None, control: bool, text: bool) -> None:
        outbox = self.outbox
        if outbox is None:
            return
        self.counter += 1
        body = f"{self.counter:04d}" + "é" * size
        message: Any = body if text else body.encode()
        outcome = outbox.put(message, key=key, control=control)
        expected = self.expected(message, key, control, outbox)
        assert outcome is expected
        if expected is PutOutcome.QUEUED:
            coalescing = key if outbox.policy is OverflowPolicy.LATEST and not control else None
            self.model.append([message, coalescing])
        elif expected is PutOutcome.REPLACED:
            waiting = next(entry for entry in self.model if entry[1] == key)
            waiting[0] = message
        elif expected is PutOutcome.DROPPED:
            self.dropped += 1
        else:
            self.overflowed = True

    def expected(self, message: Any, key: str | None, control: bool, outbox: Outbox) -> PutOutcome:
        if self.overflowed:
            return PutOutcome.OVERFLOW
        latest = outbox.policy is OverflowPolicy.LATEST
        if latest and key is not None and not control:
            waiting = next((entry for entry in self.model if entry[1] == key), None)
            if waiting is not None:
                total = self.size() - message_size(waiting[0]) + message_size(message)
                if total > 2 * outbox.max_buffered_bytes:
                    return PutOutcome.OVERFLOW
                return PutOutcome.REPLACED
        total = self.size() + message_size(message)
        if total <= outbox.max_buffered_bytes:
            return PutOutcome.QUEUED
        if outbox.policy is OverflowPolicy.CLOSE:
            return PutOutcome.OVERFLOW
        if control:
            return (
                PutOutcome.QUEUED if total <= 2 * outbox.max_buffered_bytes else PutOutcome.OVERFLOW
            )
        return PutOutcome.DROPPED

    def size(self) -> int:
        return sum(message_size(message) for message, _ in self.model)

    @rule()
    def take(self) -> None:
        if self.outbox is None:
            return
        taken = self.outbox.take()
        if not self.model:
            assert taken is None
        else:
            assert taken == self.model.pop(0)[0]

    @invariant()
    def counts_match(self) -> None:
        if self.outbox is None:
            return
        assert self.outbox.buffered_bytes == self.size()
        assert len(self.outbox) == len(self.model)
        assert list(self.outbox) == [message for message, _ in self.model]
        assert self.outbox.dropped == self.dropped
        assert self.outbox.overflowed == self.overflowed
        # Never past twice the limit.
        assert self.outbox.buffered_bytes <= 2 * self.outbox.max_buffered_bytes


TestOutboxModel = OutboxModel.TestCase
