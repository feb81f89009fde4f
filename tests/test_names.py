"""Encoding of user-supplied strings into subject tokens and KV keys."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import meshline
from meshline._transport._names import MAX_NAME_BYTES, SHORT_TOKEN_BYTES

# Any text Python can encode as UTF-8 (no lone surrogates), up to 1 KiB of characters.
texts = st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1, max_size=1024)


@given(texts)
def test_tokens_are_valid_in_subjects_and_keys(value: str) -> None:
    token = meshline.encode_token(value)
    assert meshline.validate_subject(f"meshline.app.client.{token}") is not None
    assert meshline.validate_key(f"clients.{token}") is not None
    assert len(token) <= 241


@given(texts)
def test_short_tokens_round_trip(value: str) -> None:
    token = meshline.encode_token(value)
    if len(value.encode()) <= SHORT_TOKEN_BYTES:
        assert meshline.decode_token(token) == value
    else:
        assert token.startswith("h")
        with pytest.raises(meshline.InvalidNameError):
            meshline.decode_token(token)


@given(texts, texts)
def test_different_strings_give_different_tokens(first: str, second: str) -> None:
    assert (meshline.encode_token(first) == meshline.encode_token(second)) == (first == second)


@pytest.mark.parametrize(
    "value", ["a.b", "*", ">", "a b", "\n", "\r\n", "ü", "☃" * 1024, "$JS.API", "\x00"]
)
def test_hostile_examples(value: str) -> None:
    token = meshline.encode_token(value)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty"),
        ("\ud800", "unicode"),
        ("x" * (MAX_NAME_BYTES + 1), "limit"),
        (b"bytes", "str"),
        (None, "str"),
    ],
)
def test_bad_names_get_clear_errors(value: object, message: str) -> None:
    with pytest.raises(meshline.InvalidNameError, match=message):
        meshline.encode_token(value, "client id")  # type: ignore[arg-type]


def test_error_names_what_was_wrong() -> None:
    with pytest.raises(meshline.InvalidNameError, match="client id"):
        meshline.encode_token("", "client id")


@pytest.mark.parametrize("token", ["", "b", "x123", "b!!", "b_w"])
def test_decode_rejects_non_tokens(token: str) -> None:
    with pytest.raises(meshline.InvalidNameError):
        meshline.decode_token(token)


def test_subject_and_key_validation() -> None:
    assert meshline.validate_subject("a.*.c", wildcards=True) == "a.*.c"
    assert meshline.validate_subject("a.>", wildcards=True) == "a.>"
    for bad in ["a.>.b", "a*", "*a", "a..b", " a", "a\t"]:
        with pytest.raises(meshline.InvalidNameError):
            meshline.validate_subject(bad, wildcards=True)
    assert meshline.validate_key("nodes.1") == "nodes.1"
    assert meshline.validate_key("clients.*", pattern=True) == "clients.*"
    for bad in ["nodes.1\n", ".a", "a.", "a..b", "a*", "a>"]:
        with pytest.raises(meshline.InvalidNameError):
            meshline.validate_key(bad)
    for bad_bucket in ["", "a.b", "a b", "x" * 65]:
        with pytest.raises(meshline.InvalidNameError):
            meshline.validate_bucket(bad_bucket)
