"""Turning user-supplied strings into safe NATS subject tokens and KV key segments.

Client ids, user ids, room names and message types can hold anything: dots, ``*``,
``>``, spaces, newlines, any unicode. None of that may reach a subject or a key as it
is. :func:`encode_token` maps any such string onto ``[A-Za-z0-9_-]`` characters, which
are valid in both places, and keeps the result short:

* a string of at most :data:`SHORT_TOKEN_BYTES` UTF-8 bytes becomes ``"b"`` followed by
  its unpadded base64url encoding, which :func:`decode_token` reverses;
* a longer one becomes ``"h"`` followed by the base64url SHA-256 of its bytes (43
  characters). That is one-way, so any layer that needs the original string stores it
  in the value, not only in the key.

The two forms cannot collide, because they start with different letters.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

from .._errors import InvalidNameError

__all__ = [
    "MAX_NAME_BYTES",
    "SHORT_TOKEN_BYTES",
    "check_name",
    "decode_token",
    "encode_bounded_token",
    "encode_token",
    "validate_bucket",
    "validate_key",
    "validate_subject",
]

MAX_NAME_BYTES = 64 * 1024
"""The longest user-supplied string accepted, in UTF-8 bytes."""

SHORT_TOKEN_BYTES = 180
"""Strings up to this many UTF-8 bytes get a reversible token; longer ones are hashed."""

MAX_SUBJECT_LENGTH = 2048
"""Subjects travel in NATS control lines, which the server caps at 4 KiB by default."""

_SUBJECT_TOKEN = re.compile(r"[!-~]+")  # printable ASCII, no space
_PLAIN_TOKEN = r"[!-)+,\-/-=?-~]+"  # printable ASCII without space, ".", "*" and ">"
_PLAIN_SUBJECT = re.compile(rf"{_PLAIN_TOKEN}(?:\.{_PLAIN_TOKEN})*")
_KEY = re.compile(r"[-/_=.A-Za-z0-9]+")
_KEY_PATTERN_TOKEN = re.compile(r"[-/_=A-Za-z0-9]+|\*|>")
_SHORT_TOKEN = re.compile(r"b[A-Za-z0-9_-]+")
_BUCKET = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _utf8(value: object, what: str, max_bytes: int = MAX_NAME_BYTES) -> bytes:
    if not isinstance(value, str):
        raise InvalidNameError(f"{what} must be a str, not {type(value).__name__}")
    if not value:
        raise InvalidNameError(f"{what} must not be empty")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidNameError(f"{what} is not valid unicode text ({exc.reason})") from None
    if len(raw) > max_bytes:
        raise InvalidNameError(f"{what} is {len(raw)} bytes long; the limit is {max_bytes}")
    return raw


def encode_token(value: str, what: str = "name") -> str:
    """Encode any non-empty string as one safe subject token / KV key segment.

    The result only holds ``[A-Za-z0-9_-]`` and is at most 241 characters long.
    Equal inputs give equal tokens and different inputs give different tokens.

    :raises InvalidNameError: ``value`` is not a ``str``, is empty, holds lone
        surrogates, or is longer than :data:`MAX_NAME_BYTES` in UTF-8. ``what`` names
        the value in the message, e.g. ``"client id"``.
    """
    raw = _utf8(value, what)
    if len(raw) <= SHORT_TOKEN_BYTES:
        return "b" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
    return _hashed_token(raw)


def _hashed_token(raw: bytes) -> str:
    digest = hashlib.sha256(raw).digest()
    return "h" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def check_name(value: str, what: str = "name", max_bytes: int = MAX_NAME_BYTES) -> str:
    """Check that a user-supplied name is a non-empty, encodable ``str``; return it.

    The same rules as :func:`encode_token`, for names that travel inside payloads
    rather than in subjects or keys (request and broadcast types, for instance).
    ``max_bytes`` lowers the length limit (in UTF-8 bytes) where a layer needs to.
    """
    _utf8(value, what, max_bytes)
    return value


def encode_bounded_token(value: str, max_length: int, what: str = "name") -> str:
    """Like :func:`encode_token`, but hash whenever the reversible form is too long.

    For places with a tight length limit, such as KV bucket names (64 characters).
    The hashed form is 44 characters, so ``max_length`` must be at least that.
    """
    token = encode_token(value, what)
    if len(token) <= max_length:
        return token
    return _hashed_token(value.encode("utf-8"))


def decode_token(token: str) -> str:
    """Reverse :func:`encode_token` for the short (``"b"``) form.

    :raises InvalidNameError: ``token`` is not a short-form token. Hashed tokens
        cannot be reversed; store the original string alongside them.
    """
    if not isinstance(token, str) or not _SHORT_TOKEN.fullmatch(token):
        raise InvalidNameError(f"{token!r} is not a reversible meshline token")
    body = token[1:]
    try:
        value = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidNameError(f"{token!r} is not a valid meshline token") from None
    if not value or encode_token(value) != token:
        raise InvalidNameError(f"{token!r} is not a canonical meshline token")
    return value


def validate_subject(subject: str, *, wildcards: bool = False) -> str:
    """Check that ``subject`` is a well-formed NATS subject, and return it.

    Tokens are separated by ``.``, must be non-empty, and hold printable ASCII
    without spaces. With ``wildcards=True``, a token may be ``*``, and the last token
    may be ``>``; otherwise neither may appear at all.

    :raises InvalidNameError: the subject is malformed.
    """
    if (
        isinstance(subject, str)
        and len(subject) <= MAX_SUBJECT_LENGTH
        and _PLAIN_SUBJECT.fullmatch(subject)
    ):
        return subject  # the common case: no wildcards, one regex call
    if not isinstance(subject, str) or not subject:
        raise InvalidNameError(f"subject must be a non-empty str, got {subject!r}")
    if len(subject) > MAX_SUBJECT_LENGTH:
        raise InvalidNameError(f"subject is longer than {MAX_SUBJECT_LENGTH} characters")
    tokens = subject.split(".")
    last = len(tokens) - 1
    for index, token in enumerate(tokens):
        if not _SUBJECT_TOKEN.fullmatch(token):
            raise InvalidNameError(f"subject {subject!r} has an empty or invalid token")
        if token == "*" or (token == ">" and index == last):
            if not wildcards:
                raise InvalidNameError(f"subject {subject!r} has a wildcard; publish needs none")
            continue
        if "*" in token or ">" in token:
            raise InvalidNameError(f"subject {subject!r} misuses a wildcard character")
    return subject


def validate_key(key: str, *, pattern: bool = False) -> str:
    """Check that ``key`` is a valid KV key (or, with ``pattern=True``, a watch pattern).

    Keys hold only ``[-/_=.A-Za-z0-9]``, with no empty ``.``-separated token. Patterns
    may also use ``*`` for one token and a final ``>`` for the rest.

    :raises InvalidNameError: the key is malformed.
    """
    if not isinstance(key, str) or not key:
        raise InvalidNameError(f"KV key must be a non-empty str, got {key!r}")
    if len(key) > MAX_SUBJECT_LENGTH:
        raise InvalidNameError(f"KV key is longer than {MAX_SUBJECT_LENGTH} characters")
    if not pattern:
        if not _KEY.fullmatch(key) or "" in key.split("."):
            raise InvalidNameError(f"invalid KV key {key!r}")
        return key
    tokens = key.split(".")
    for index, token in enumerate(tokens):
        if not _KEY_PATTERN_TOKEN.fullmatch(token) or (token == ">" and index != len(tokens) - 1):
            raise InvalidNameError(f"invalid KV key pattern {key!r}")
    return key


def validate_bucket(name: str) -> str:
    """Check that ``name`` is a valid KV bucket name (``[A-Za-z0-9_-]``, 1 to 64 long).

    :raises InvalidNameError: the name is malformed.
    """
    if not isinstance(name, str) or not _BUCKET.fullmatch(name):
        raise InvalidNameError(f"invalid KV bucket name {name!r}")
    return name
