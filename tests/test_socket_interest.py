"""Interest routing's reference counts (``meshline._cluster._interest``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshline._cluster._interest import InterestKind, Interests, interest_subject
from meshline._errors import InvalidNameError
from meshline._transport._names import validate_subject

ROOM, USER = InterestKind.ROOM, InterestKind.USER


def test_listening_starts_with_the_first_member_and_ends_with_the_last() -> None:
    interests = Interests()
    assert interests.add(ROOM, "lobby", "n1.1")
    assert not interests.add(ROOM, "lobby", "n1.2")
    assert not interests.add(ROOM, "lobby", "n1.2")  # counted once
    assert interests.add(USER, "lobby", "n1.1")  # a user of the same name: apart
    assert interests.listening(ROOM) == {"lobby"}
    assert not interests.remove(ROOM, "lobby", "n1.1")
    assert not interests.remove(ROOM, "lobby", "n9.9")  # unknown: nothing
    assert interests.remove(ROOM, "lobby", "n1.2")
    assert interests.listening(ROOM) == frozenset()
    assert not interests.remove(ROOM, "lobby", "n1.2")
    assert interests.listening(USER) == {"lobby"}


@given(st.lists(st.tuples(st.booleans(), st.sampled_from("abc"), st.sampled_from("xyz"))))
def test_listening_is_exactly_the_names_with_members(ops: list[tuple[bool, str, str]]) -> None:
    interests = Interests()
    model: dict[str, set[str]] = {}
    for adding, name, member in ops:
        before = bool(model.get(name))
        if adding:
            changed = interests.add(ROOM, name, member)
            model.setdefault(name, set()).add(member)
        else:
            changed = interests.remove(ROOM, name, member)
            model.get(name, set()).discard(member)
        assert changed == (before != bool(model.get(name)))
    assert interests.listening(ROOM) == {name for name, members in model.items() if members}


@given(st.text(min_size=1, max_size=1024))
def test_a_subject_holds_any_name_as_one_valid_token(name: str) -> None:
    try:
        subject = interest_subject("ml.bX", InterestKind.TOPIC, name)
    except InvalidNameError:  # lone surrogates: not encodable as UTF-8
        return
    assert validate_subject(subject) == subject
    assert subject.startswith("ml.bX.topic.") and subject.count(".") == 3
    assert interest_subject("ml.bX", InterestKind.TOPIC, name + "!") != subject


def test_an_empty_name_is_refused() -> None:
    with pytest.raises(InvalidNameError):
        interest_subject("ml.bX", InterestKind.ROOM, "")


@pytest.mark.parametrize("name", ["", "\ud800", "x" * (64 * 1024 + 1)])
def test_a_name_no_subject_can_hold_is_refused_and_not_counted(name: str) -> None:
    interests = Interests()
    with pytest.raises(InvalidNameError):
        interests.add(ROOM, name, "n1.1")
    assert interests.listening(ROOM) == frozenset()
