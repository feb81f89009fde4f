"""Interest routing's names: the subject of a user, a room or a topic.

A node listens on a user's, room's or topic's subject only while it holds a local
member of it (the cluster link keeps its subscriptions in line with its local
members), so NATS delivers a room emit only to the nodes with members in the room:
no node decodes traffic it has no use for, unlike an adapter that floods every
server. :func:`interest_subject` names the subject: names of any content are
encoded into one safe token.
"""

from __future__ import annotations

import enum

from .._transport._names import encode_token

__all__ = ["InterestKind", "interest_subject"]


class InterestKind(enum.StrEnum):
    """What a subject of interest routing is for."""

    USER = "user"
    ROOM = "room"
    TOPIC = "topic"


def interest_subject(prefix: str, kind: InterestKind, name: str) -> str:
    """The subject of the user, room or topic ``name`` under the mesh's ``prefix``.

    :raises InvalidNameError: an empty name, or one over the name size limit.
    """
    return f"{prefix}.{kind.value}.{encode_token(name, f'{kind.value} name')}"
