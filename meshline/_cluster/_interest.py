"""Interest routing: which users, rooms and topics this node must listen to, as a
sans-IO reference count (:class:`Interests`), groundwork for the cluster socket layer.

A node listens on a user's, room's or topic's subject only while it holds a local
member of it, so NATS delivers a room emit only to the nodes with members in the
room (no node decodes traffic it has no use for, unlike an adapter that floods every
server). :class:`Interests` counts the local members of each and says when the
first one arrives (subscribe now) and when the last one leaves (unsubscribe now);
its driver does the subscribing. :func:`interest_subject` names the subject: names
of any content are encoded into one safe token.
"""

from __future__ import annotations

import enum

from .._transport._names import check_name, encode_token

__all__ = ["InterestKind", "Interests", "interest_subject"]


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


class Interests:
    """Local members of each user, room and topic (see the module).

    A member is counted once however often it is added: a connection that joins a
    room twice is one member, and leaving once removes it.
    """

    def __init__(self) -> None:
        self._members: dict[tuple[InterestKind, str], set[str]] = {}

    def add(self, kind: InterestKind, name: str, member: str) -> bool:
        """Count ``member`` (a connection id) in ``name``; True when it is the first
        local member, so the node must start listening.

        :raises InvalidNameError: a name no subject can hold (nothing is counted).
        """
        check_name(name, f"{kind.value} name")
        members = self._members.get((kind, name))
        if members is None:
            self._members[(kind, name)] = {member}
            return True
        members.add(member)
        return False

    def remove(self, kind: InterestKind, name: str, member: str) -> bool:
        """Stop counting ``member`` in ``name``; True when it was the last local
        member, so the node must stop listening. An unknown member changes nothing."""
        members = self._members.get((kind, name))
        if members is None or member not in members:
            return False
        members.discard(member)
        if members:
            return False
        del self._members[(kind, name)]
        return True

    def members(self, kind: InterestKind, name: str) -> frozenset[str]:
        return frozenset(self._members.get((kind, name), ()))

    def listening(self, kind: InterestKind) -> frozenset[str]:
        """The names of ``kind`` the node must listen to now."""
        return frozenset(name for held, name in self._members if held is kind)
