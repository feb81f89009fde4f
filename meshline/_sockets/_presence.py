"""Room presence as a client sees it: who is in a watched room, kept from the
server's ``presence_state`` and ``presence_diff`` frames.

:class:`PresenceBook` is the sans-IO core: it takes frames in any order the
protocol allows and says what changed. Revisions make that safe:

- diffs that come before the state they follow (between a watch and its
  answer, or after a reconnect) wait until the state is in; then those
  numbered above the state's revision apply, in order, and the rest are
  already in the state;
- a diff numbered at or below the current revision is already applied (a
  duplicate, or older than a fresh state) and changes nothing;
- a diff that skips a number means something was lost: the book says so, and
  the client watches the room again for a fresh state.

:class:`RoomPresence` is what an application holds: the book's members as
:class:`RoomMember` values, and a way to wait for a condition on them.

Cancellation: :meth:`RoomPresence.wait_until` can be cancelled; nothing else
here waits.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import attrs
import trio

from ._frames import PresenceDiffFrame, PresenceMember, PresenceStateFrame

__all__ = [
    "Applied",
    "PresenceBook",
    "PresenceChange",
    "RoomMember",
    "RoomPresence",
    "presence_changed",
    "presence_ended",
]

logger = logging.getLogger("meshline.sockets")

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@attrs.frozen
class RoomMember:
    """One connection in a watched room.

    ``fields`` holds the fields of the server's ``describe`` hook that the
    server lets watchers see (its ``presence_fields``); ``connected_at`` is when
    the connection was accepted (Unix time).
    """

    connection_id: str
    client_id: str
    node_id: int
    user_id: str | None
    connected_at: float
    fields: Mapping[str, Any] = _EMPTY


@attrs.frozen
class PresenceChange:
    """What one frame (or a fresh state) changed in a watched room.

    ``joined`` holds connections that appeared, and connections whose fields
    changed (their new value); ``left`` those that are gone. A change is never
    empty.
    """

    room: str
    joined: tuple[RoomMember, ...]
    left: tuple[RoomMember, ...]


def _member(wire: PresenceMember) -> RoomMember:
    return RoomMember(
        connection_id=wire.connection_id,
        client_id=wire.client_id,
        node_id=wire.node_id,
        user_id=wire.user_id,
        connected_at=wire.connected_at,
        fields=MappingProxyType(dict(wire.fields)) if wire.fields else _EMPTY,
    )


class Applied(enum.Enum):
    """What :meth:`PresenceBook.diff` did with a diff that changed nothing."""

    HELD = "held"
    """Kept until the state comes."""
    STALE = "stale"
    """Already applied, or older than the state."""
    GAP = "gap"
    """It skips a revision: a diff was lost. Watch the room again."""


class PresenceBook:
    """The members of one watched room, from the server's frames (see the module)."""

    def __init__(self, room: str) -> None:
        self.room = room
        self.members: dict[str, RoomMember] = {}
        """The room's connections, by connection id."""
        self.revision = 0
        """The revision the members are at (0: no state yet)."""
        self.synced = False
        """Whether a state arrived since the last :meth:`reset`."""
        self._held: list[PresenceDiffFrame] = []

    def reset(self) -> None:
        """Wait for a fresh state (after a reconnect: revisions are per
        connection). The members stay as they were until it comes, so the
        state's change says only what differs."""
        self.synced = False
        self.revision = 0
        self._held.clear()

    def state(self, frame: PresenceStateFrame) -> PresenceChange | Applied | None:
        """Take in a ``presence_state``; then the diffs held for it. Returns the
        change from the members before (None: nothing changed), or
        :attr:`Applied.GAP` when the held diffs skip a revision after the state
        (the book then waits for a new state: watch the room again)."""
        before = self.members
        self.members = {wire.connection_id: _member(wire) for wire in frame.members}
        self.revision = frame.rev
        self.synced = True
        held = sorted(self._held, key=lambda diff: diff.rev)
        self._held.clear()
        for diff in held:
            if diff.rev == self.revision + 1:
                self._apply(diff)
            elif diff.rev > self.revision + 1:
                logger.warning(
                    "room presence of %r: a diff skips from revision %d to %d; watching again",
                    self.room,
                    self.revision,
                    diff.rev,
                )
                self.reset()
                return Applied.GAP
        return self._change(before, self.members)

    def diff(self, frame: PresenceDiffFrame) -> PresenceChange | Applied:
        """Take in a ``presence_diff``: the change it made, or why it made none."""
        if not self.synced:
            self._held.append(frame)
            return Applied.HELD
        if frame.rev <= self.revision:
            return Applied.STALE
        if frame.rev != self.revision + 1:
            logger.warning(
                "room presence of %r: a diff skips from revision %d to %d; watching again",
                self.room,
                self.revision,
                frame.rev,
            )
            self.reset()
            return Applied.GAP
        joined, left = self._apply(frame)
        if not joined and not left:
            return Applied.STALE
        return PresenceChange(self.room, joined, left)

    def _apply(
        self, frame: PresenceDiffFrame
    ) -> tuple[tuple[RoomMember, ...], tuple[RoomMember, ...]]:
        """Apply ``frame``; the members it brought in (or changed) and took out.
        Costs the size of the diff, not of the room."""
        members = self.members
        left: dict[str, RoomMember] = {}
        for connection_id in frame.leaves:
            gone = members.pop(connection_id, None)
            if gone is not None:
                left[connection_id] = gone
        joined = []
        for wire in frame.joins:
            member = _member(wire)
            before = left.pop(wire.connection_id, None) or members.get(wire.connection_id)
            members[wire.connection_id] = member
            if member != before:
                joined.append(member)
        self.revision = frame.rev
        return tuple(joined), tuple(left.values())

    def _change(
        self, before: Mapping[str, RoomMember], after: Mapping[str, RoomMember]
    ) -> PresenceChange | None:
        joined = tuple(member for key, member in after.items() if before.get(key) != member)
        left = tuple(member for key, member in before.items() if key not in after)
        if not joined and not left:
            return None
        return PresenceChange(self.room, joined, left)


class RoomPresence:
    """Who is in a room the client watches (:meth:`SocketClient.watch
    <meshline.SocketClient.watch>`), kept up to date by the server.

    Read :attr:`members`, :meth:`user_ids` and :meth:`of_user` at any time;
    they change between one checkpoint of the client's task and the next.
    After a reconnect, the members stay as they were until the new node's
    state comes in (:attr:`synced` is False meanwhile).
    """

    def __init__(self, book: PresenceBook) -> None:
        self._book = book
        self._changed = trio.Event()
        self.watching = True
        """False once the watch ended (the client unwatched or closed for good,
        the server refused the watch again after a reconnect, or ended it):
        nothing changes any more."""
        self.end_code: str | None = None
        """Why the server ended the watch, when it did: ``forbidden`` (the client
        may no longer watch the room) or ``too_large`` (a change did not fit the
        client's message limit); None otherwise."""

    @property
    def room(self) -> str:
        return self._book.room

    @property
    def members(self) -> Mapping[str, RoomMember]:
        """The room's connections, by connection id (a read-only view)."""
        return MappingProxyType(self._book.members)

    @property
    def synced(self) -> bool:
        """Whether the members are the server's current word: False from a lost
        connection until the new node's state comes, and once the client closed
        for good."""
        return self._book.synced

    @property
    def revision(self) -> int:
        return self._book.revision

    def user_ids(self) -> frozenset[str]:
        """The users with at least one connection in the room."""
        return frozenset(
            member.user_id for member in self._book.members.values() if member.user_id is not None
        )

    def of_user(self, user_id: str) -> list[RoomMember]:
        """The user's connections in the room (their devices)."""
        return [member for member in self._book.members.values() if member.user_id == user_id]

    async def wait_until(self, predicate: Callable[[RoomPresence], bool]) -> None:
        """Return once ``predicate(self)`` is true (at once if it already is).

        :raises trio.ClosedResourceError: the watch ended first.

        Cancellation: stops waiting; nothing else happens.
        """
        while not predicate(self):
            if not self.watching:
                raise trio.ClosedResourceError(f"no longer watching {self.room!r}")
            await self._changed.wait()

    def __repr__(self) -> str:
        return (
            f"<RoomPresence {self.room!r} members={len(self._book.members)}"
            f" revision={self._book.revision}{'' if self.synced else ' syncing'}>"
        )


def presence_changed(presence: RoomPresence) -> None:
    """Wake whoever waits on ``presence`` (its book changed)."""
    presence._changed.set()
    presence._changed = trio.Event()


def presence_ended(presence: RoomPresence) -> None:
    """Mark ``presence`` as no longer watched, and wake its waiters."""
    presence.watching = False
    presence_changed(presence)
