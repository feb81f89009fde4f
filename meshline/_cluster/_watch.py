"""Room presence for watching clients: a sans-IO book of the rooms this node's
connections watch, what each was last told, and the diffs to send next.

The cluster layer tells the book what the index says about a room's members
(one client's registration changed: :meth:`WatchBook.update`; a node came or
went: :meth:`WatchBook.resync`); the book answers with the diff to fan out to
the room's local watchers, or None when the watchers saw nothing change. The
book numbers a room's diffs from the revision of the state its first watcher
was sent, one by one, so a client can tell a missed diff, and a diff that came
before its state, from the rest (see :mod:`meshline._sockets._presence`). A
room watched anew starts at the highest revision the book has issued, never
below: a diff of an earlier watch of it, still on its way to a client that
unwatched and watched again, is then older than the new state, and dropped.

A room is watched from its first watcher to its last: the book keeps nothing
for rooms nobody on this node watches, and the index changes of those cost a
dictionary lookup.

Cancellation: there is nothing to cancel; every method returns at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

from .._sockets._frames import PresenceDiffFrame, PresenceMember
from ._index import ClusterConnection

__all__ = ["WatchBook", "presence_member"]

W = TypeVar("W")
"""A watcher (the server's connection)."""


def presence_member(conn: ClusterConnection, fields: frozenset[str]) -> PresenceMember:
    """How watchers see ``conn``: its ids, user and accept time, and those of its
    described fields named in ``fields``."""
    shown = {name: value for name, value in conn.fields.items() if name in fields} if fields else {}
    return PresenceMember(
        connection_id=conn.connection_id,
        client_id=conn.client_id,
        node_id=conn.node_id,
        connected_at=max(0.0, conn.connected_at),
        user_id=conn.user_id,
        fields=shown,
    )


class _Watched(Generic[W]):
    __slots__ = ("members", "rev", "watchers")

    def __init__(self, members: dict[str, PresenceMember], rev: int) -> None:
        self.members = members
        """What the watchers were told: client id -> member."""
        self.rev = rev
        self.watchers: dict[W, None] = {}


class WatchBook(Generic[W]):
    """The rooms watched on this node (see the module). ``fields`` names the
    described fields watchers may see."""

    def __init__(self, fields: frozenset[str] = frozenset()) -> None:
        self.fields = fields
        self._rooms: dict[str, _Watched[W]] = {}
        self._issued = 0
        """The highest revision a diff of any room was given here."""

    def is_watched(self, room: str) -> bool:
        return room in self._rooms

    @property
    def any_watched(self) -> bool:
        """Whether any room has a watcher here (at no cost, unlike :attr:`rooms`)."""
        return bool(self._rooms)

    @property
    def rooms(self) -> frozenset[str]:
        """The rooms with at least one watcher here."""
        return frozenset(self._rooms)

    def watchers(self, room: str) -> list[W]:
        watched = self._rooms.get(room)
        return [] if watched is None else list(watched.watchers)

    def state(
        self, room: str, members: Iterable[ClusterConnection]
    ) -> tuple[int, tuple[PresenceMember, ...], PresenceDiffFrame | None]:
        """The room's revision and members as a new watcher should be told,
        given its ``members`` now; and, for a room already watched whose
        watchers were told something else (a change the book missed), the diff
        that brings them in line first."""
        watched = self._rooms.get(room)
        if watched is None:
            now = self._members(members)
            return self._issued, tuple(now.values()), None
        catch_up = self.resync(room, members)
        return watched.rev, tuple(watched.members.values()), catch_up

    def add(self, room: str, watcher: W, members: Iterable[ClusterConnection]) -> None:
        """``watcher`` was sent the state :meth:`state` gave (with nothing in
        between): send it the room's diffs from now on."""
        watched = self._rooms.get(room)
        if watched is None:
            watched = self._rooms[room] = _Watched(self._members(members), self._issued)
        watched.watchers[watcher] = None

    def remove(self, room: str, watcher: W) -> None:
        """``watcher`` no longer watches ``room`` (nothing if it did not)."""
        watched = self._rooms.get(room)
        if watched is None:
            return
        watched.watchers.pop(watcher, None)
        if not watched.watchers:
            del self._rooms[room]

    def update(
        self, room: str, client_id: str, conn: ClusterConnection | None
    ) -> PresenceDiffFrame | None:
        """The client's registration changed: it is now ``conn`` if that is a
        visible member of ``room`` (in the room, on a live node), else None.
        Returns the diff for the room's watchers (None: not watched, or nothing
        they would see changed)."""
        watched = self._rooms.get(room)
        if watched is None:
            return None
        before = watched.members.get(client_id)
        after = None if conn is None else presence_member(conn, self.fields)
        if before == after:
            return None
        leaves: tuple[str, ...] = ()
        if before is not None and (after is None or after.connection_id != before.connection_id):
            leaves = (before.connection_id,)
        if after is None:
            del watched.members[client_id]
            joins: tuple[PresenceMember, ...] = ()
        else:
            watched.members[client_id] = after
            joins = (after,)
        return self._diff(room, watched, joins, leaves)

    def resync(self, room: str, members: Iterable[ClusterConnection]) -> PresenceDiffFrame | None:
        """The room's visible ``members`` now, when more than one client may have
        changed (a node came or went). Returns the diff, as :meth:`update`."""
        watched = self._rooms.get(room)
        if watched is None:
            return None
        now = self._members(members)
        before = watched.members
        leaves = tuple(
            member.connection_id
            for client_id, member in before.items()
            if now.get(client_id, _NOBODY).connection_id != member.connection_id
        )
        joins = tuple(
            member for client_id, member in now.items() if before.get(client_id) != member
        )
        if not leaves and not joins:
            return None
        watched.members = now
        return self._diff(room, watched, joins, leaves)

    def _diff(
        self,
        room: str,
        watched: _Watched[W],
        joins: tuple[PresenceMember, ...],
        leaves: tuple[str, ...],
    ) -> PresenceDiffFrame:
        """The room's next diff, numbered."""
        watched.rev += 1
        self._issued = max(self._issued, watched.rev)
        return PresenceDiffFrame(room, watched.rev, joins, leaves)

    def _members(self, members: Iterable[ClusterConnection]) -> dict[str, PresenceMember]:
        return {conn.client_id: presence_member(conn, self.fields) for conn in members}


_NOBODY = PresenceMember(connection_id="", client_id="", node_id=0)
