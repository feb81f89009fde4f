"""Interest routing's subjects (``meshline._cluster._interest``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshline._cluster._interest import InterestKind, interest_subject
from meshline._errors import InvalidNameError
from meshline._transport._names import validate_subject


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
def test_a_name_no_subject_can_hold_is_refused(name: str) -> None:
    with pytest.raises(InvalidNameError):
        interest_subject("ml.bX", InterestKind.ROOM, name)
