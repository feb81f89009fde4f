"""Which users are online across the cluster, with an offline grace period: a sans-IO
state machine (:class:`UserPresence`), driven by the cluster layer's reporter.

A user is online while at least one of their connections exists anywhere in the
cluster (one user, many devices, as Phoenix Presence keeps many metas per key). The
machine is told when connections appear and go (from the presence registry's
replica, whichever node they are on) and what time it is; it answers with the
transitions to report: :class:`UserOnline` when a user's first connection appears,
:class:`UserOffline` once their last one is gone.

The grace period: when a user's last connection goes, the user stays online for
``grace`` seconds. A connection of theirs that appears meanwhile, on any node,
cancels the offline report: a user who drops and reconnects within the grace period
(to the same node or another) is never reported offline, and no online report is
made for the return either. With ``grace`` 0, the user goes offline at once.

The machine does no I/O and reads no clock: its driver calls :meth:`expire` at
:meth:`next_deadline` (or later) and reports what it returns.

Starting from a snapshot (:meth:`load`) reports nothing for the users it finds
online: they were online before this machine began watching.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable

import attrs

from .._errors import InvalidArgumentError

__all__ = ["UserOffline", "UserOnline", "UserPresence", "UserTransition"]


@attrs.frozen
class UserOnline:
    """``user_id`` has a connection again, after being offline (or never seen)."""

    user_id: str


@attrs.frozen
class UserOffline:
    """``user_id`` has had no connection anywhere for the grace period."""

    user_id: str


UserTransition = UserOnline | UserOffline


class UserPresence:
    """Online users across the cluster, and the transitions to report (see the module).

    :param grace: seconds a user with no connection left stays online (0: none).
    :raises InvalidArgumentError: a negative or non-finite ``grace``.
    """

    def __init__(self, *, grace: float = 0.0) -> None:
        if isinstance(grace, bool) or not isinstance(grace, int | float):
            raise InvalidArgumentError(f"grace must be a number of seconds: {grace!r}")
        if not 0 <= grace < math.inf:
            raise InvalidArgumentError(f"grace must be finite and >= 0: {grace!r}")
        self.grace = float(grace)
        self._connections: dict[str, set[str]] = {}
        """Each online user's connections (a user in grace has an empty set)."""
        self._leaving: dict[str, float] = {}
        """Users in their grace period, and when it ends."""
        self._deadlines: list[tuple[float, str]] = []
        """(end of grace, user): a heap; entries no longer in :attr:`_leaving` with
        that deadline are stale and skipped."""

    # --- Introspection -----------------------------------------------------------

    @property
    def online(self) -> frozenset[str]:
        """Users reported online and not (yet) reported offline, grace included."""
        return frozenset(self._connections)

    def is_online(self, user_id: str) -> bool:
        return user_id in self._connections

    def connections_of(self, user_id: str) -> frozenset[str]:
        """The user's connections (empty for a user offline or in grace)."""
        return frozenset(self._connections.get(user_id, ()))

    def in_grace(self, user_id: str) -> bool:
        """Whether the user has no connection left but is not reported offline yet."""
        return user_id in self._leaving

    def next_deadline(self) -> float:
        """When the next grace period ends (``inf``: none pending)."""
        deadlines = self._deadlines
        while deadlines and self._leaving.get(deadlines[0][1]) != deadlines[0][0]:
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else math.inf

    # --- Inputs --------------------------------------------------------------------

    def load(self, connections: Iterable[tuple[str, str]]) -> None:
        """Start from a snapshot of ``(user_id, connection_id)`` pairs, reporting
        nothing (see the module). Forgets what the machine knew before, grace
        periods included."""
        self._connections = {}
        self._leaving = {}
        self._deadlines = []
        for user_id, connection_id in connections:
            self._connections.setdefault(user_id, set()).add(connection_id)

    def connected(self, user_id: str, connection_id: str, now: float) -> list[UserTransition]:
        """A connection of ``user_id`` appeared (on any node) at ``now``; the
        transitions to report. A connection already known changes nothing. A user
        whose grace period ended by ``now`` (the driver had not expired it yet)
        goes offline first, then online again: the return came too late."""
        transitions: list[UserTransition] = []
        leaving = self._leaving.get(user_id)
        if leaving is not None and leaving <= now:
            del self._leaving[user_id]
            del self._connections[user_id]
            transitions.append(UserOffline(user_id))
        current = self._connections.get(user_id)
        if current is None:
            self._connections[user_id] = {connection_id}
            transitions.append(UserOnline(user_id))
            return transitions
        current.add(connection_id)
        self._leaving.pop(user_id, None)  # back within the grace period: no report
        return []

    def disconnected(self, user_id: str, connection_id: str, now: float) -> list[UserTransition]:
        """A connection of ``user_id`` is gone (closed, superseded, or its node
        died); the transitions to report. An unknown connection changes nothing."""
        current = self._connections.get(user_id)
        if current is None or connection_id not in current:
            return []
        current.discard(connection_id)
        if current:
            return []
        if self.grace == 0:
            del self._connections[user_id]
            return [UserOffline(user_id)]
        deadline = now + self.grace
        self._leaving[user_id] = deadline
        heapq.heappush(self._deadlines, (deadline, user_id))
        return []

    def expire(self, now: float) -> list[UserTransition]:
        """The grace periods over at ``now``: those users go offline."""
        transitions: list[UserTransition] = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            deadline, user_id = heapq.heappop(deadlines)
            if self._leaving.get(user_id) != deadline:
                continue  # the user came back (or left again later)
            del self._leaving[user_id]
            del self._connections[user_id]
            transitions.append(UserOffline(user_id))
        return transitions
