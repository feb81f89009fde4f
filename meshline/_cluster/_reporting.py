"""The cluster layer's hooks: which users came online or went offline anywhere in the
cluster (reported once, by the leader), and which clients connected to or truly left
this node.

:class:`PresenceReporter` is fed by the cluster link with every registration as the
replica sees it, and with the live nodes; it decides what counts as a live connection
(a registration on a live node), drives a :class:`~meshline._cluster._users.UserPresence`
with it, and runs the hooks.

User hooks
    Every node keeps the same user presence from its replica; only the leader
    reports it, in order, one hook at a time. The leader records what it
    reported in a :class:`ReportedUsers` store shared by the cluster (a KV
    bucket): a new leader loads it and reports the difference between it and
    the truth, so nothing the old leader missed (it died first, or there was no
    leader when it happened) is lost. A state may be reported twice (the old
    leader died between its hook and its record), never lost: the hooks end in
    the truth.

Client hooks
    ``on_client_connected(conn)`` runs on the node the client connected to, once
    its registration landed. ``on_client_disconnected(conn, reason)`` runs on the
    node its connection ended on, ``grace`` seconds after the end, unless the
    connection was superseded or the client id is connected again by then
    (anywhere in the cluster): only a client that truly left is reported.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import trio

from .._errors import MeshlineError, TransportError
from .._sockets._connection import DisconnectReason
from .._util import call_hook
from ._index import ClusterConnection
from ._users import UserOffline, UserOnline, UserPresence, UserTransition

if TYPE_CHECKING:
    from .._sockets._connection import Connection

__all__ = [
    "ClientConnectedHook",
    "ClientDisconnectedHook",
    "PresenceReporter",
    "ReportedUsers",
    "UserHook",
]

logger = logging.getLogger("meshline.cluster")

UserHook = Callable[[str], Awaitable[None] | None]
ClientConnectedHook = Callable[["Connection"], Awaitable[None] | None]
ClientDisconnectedHook = Callable[["Connection", DisconnectReason], Awaitable[None] | None]


class ReportedUsers(Protocol):
    """Where the leader records the users it reported online (shared by the
    cluster, so that the next leader can pick up where it stopped)."""

    async def load(self) -> set[str]:
        """The users last reported online."""
        ...

    async def record(self, user_id: str, online: bool) -> None:
        """Record that ``user_id`` was reported online (or offline)."""
        ...


class PresenceReporter:
    """Live connections, user transitions and the hooks (see the module)."""

    def __init__(
        self,
        *,
        grace: float,
        alive: Callable[[int], bool],
        on_user_online: UserHook | None = None,
        on_user_offline: UserHook | None = None,
        on_client_connected: ClientConnectedHook | None = None,
        on_client_disconnected: ClientDisconnectedHook | None = None,
    ) -> None:
        self.users = UserPresence(grace=grace)
        self.grace = self.users.grace
        self._alive = alive
        self._on_user_online = on_user_online
        self._on_user_offline = on_user_offline
        self._on_client_connected = on_client_connected
        self._on_client_disconnected = on_client_disconnected
        self._live: dict[str, ClusterConnection] = {}
        """Client id -> its registration, while it counts as live."""
        self._leading: ReportedUsers | None = None
        """Where reports are recorded, while this node leads."""
        self._user_reports: deque[UserTransition] = deque()
        self._local_reports: deque[tuple[str, tuple[Any, ...]]] = deque()
        self._reports_ready = trio.Event()
        self._clients_ready = trio.Event()
        self._departures: list[tuple[float, int, Connection]] = []
        self._order = itertools.count()
        self._wake = trio.Event()
        self._leaving: dict[str, Connection] = {}
        """Client id -> its ended connection whose departure is pending (the
        latest); a registration of another connection of the client cancels it."""
        self.returns = 0
        """Connections of this node whose client was connected again, anywhere,
        within the grace period: no departure was reported for them."""

    # --- Inputs --------------------------------------------------------------------

    def load(self, connections: list[ClusterConnection]) -> None:
        """Start from the replica's registrations, reporting nothing."""
        self._live = {conn.client_id: conn for conn in connections if self._alive(conn.node_id)}
        self.users.load(
            (conn.user_id, conn.connection_id)
            for conn in self._live.values()
            if conn.user_id is not None
        )

    def registration(self, client_id: str, conn: ClusterConnection | None) -> None:
        """The client's registration is ``conn`` now (None: gone)."""
        leaving = self._leaving.get(client_id)
        if leaving is not None and conn is not None and conn.connection_id != leaving.id:
            del self._leaving[client_id]  # back, here or elsewhere: no departure
            self.returns += 1
        should = conn if conn is not None and self._alive(conn.node_id) else None
        have = self._live.get(client_id)
        if have is should or (
            have is not None
            and should is not None
            and have.connection_id == should.connection_id
            and have.user_id == should.user_id
        ):
            if should is not None:
                self._live[client_id] = should
            return
        now = trio.current_time()
        # The new connection first: a client that moved never leaves its user
        # without a connection, even for an instant.
        if should is not None:
            self._live[client_id] = should
            if should.user_id is not None:
                self._transitions(self.users.connected(should.user_id, should.connection_id, now))
        else:
            del self._live[client_id]
        if have is not None and have.user_id is not None:
            self._transitions(self.users.disconnected(have.user_id, have.connection_id, now))

    def node_down(self, node_id: int) -> None:
        """``node_id`` was declared dead: its connections are not live any more."""
        for client_id, conn in list(self._live.items()):
            if conn.node_id == node_id:
                self.registration(client_id, conn)  # re-checked against ``alive``

    def client_connected(self, conn: Connection) -> None:
        """A connection's first registration landed on this node."""
        if self._on_client_connected is not None:
            self._local_reports.append(("on_client_connected", (conn,)))
            self._clients_ready.set()

    def client_closed(self, conn: Connection) -> None:
        """A connection of this node, announced with ``on_client_connected``, ended
        (its reason may be set a moment later). It is reported as a departure at
        the end of the grace period, unless the client connects again meanwhile:
        then the newer connection's end is the one that may be reported."""
        if self._on_client_disconnected is None:
            return
        deadline = trio.current_time() + self.grace
        self._leaving[conn.client_id] = conn
        heapq.heappush(self._departures, (deadline, next(self._order), conn))
        self._wake.set()

    def _transitions(self, transitions: list[UserTransition]) -> None:
        if transitions and self._leading is not None:
            self._user_reports.extend(transitions)
            self._reports_ready.set()
        if transitions or self.users.next_deadline() < math.inf:
            self._wake.set()

    # --- Tasks -------------------------------------------------------------------------

    async def keep_time(self, still_here: Callable[[Connection], bool]) -> None:
        """End grace periods, and decide the departures once theirs is over.

        ``still_here(conn)`` says whether the client of ``conn`` is connected again
        (a newer registration of its client id on a live node).
        """
        while True:
            now = trio.current_time()
            self._transitions(self.users.expire(now))
            departures = self._departures
            while departures and departures[0][0] <= now:
                _, _, conn = heapq.heappop(departures)
                if self._leaving.get(conn.client_id) is not conn:
                    continue  # the client came back (or left again later)
                del self._leaving[conn.client_id]
                if conn.disconnect_reason is DisconnectReason.SUPERSEDED:
                    continue
                if still_here(conn):
                    self.returns += 1
                    continue
                self._local_reports.append(
                    (
                        "on_client_disconnected",
                        (conn, conn.disconnect_reason or DisconnectReason.SERVER_EXIT),
                    )
                )
                self._clients_ready.set()
            deadline = min(self.users.next_deadline(), departures[0][0] if departures else math.inf)
            self._wake = trio.Event()
            with trio.move_on_at(deadline):
                await self._wake.wait()

    async def lead(self, reported: ReportedUsers) -> None:
        """The leader's duty: report what differs between ``reported`` and the
        truth, then every transition as it happens, one hook at a time, recording
        each in ``reported`` once its hook returned.

        It runs in the leadership's scope: when the lead is lost, the hook running
        is cancelled and nothing more is reported or recorded here (the next leader
        reports from the record, so a report cut short is made again).

        :raises TransportError: ``reported`` could not be loaded (the duty is
            started again after a heartbeat interval).
        """
        before = await reported.load()
        online = self.users.online
        self._user_reports.extend(UserOnline(user) for user in sorted(online - before))
        self._user_reports.extend(UserOffline(user) for user in sorted(before - online))
        self._leading = reported
        try:
            await self._report_users(reported)
        finally:
            self._leading = None
            self._user_reports.clear()

    async def report_clients(self) -> None:
        """Run the client hooks, one at a time, in order (a task of their own, so
        a slow client hook never holds up the user hooks)."""
        while True:
            while not self._local_reports:
                self._clients_ready = trio.Event()
                await self._clients_ready.wait()
            name, args = self._local_reports.popleft()
            hook: Callable[..., Any] | None = (
                self._on_client_connected
                if name == "on_client_connected"
                else self._on_client_disconnected
            )
            if hook is not None:
                await call_hook(hook, name, *args, logger=logger)

    async def _report_users(self, reported: ReportedUsers) -> None:
        while True:
            while not self._user_reports:
                self._reports_ready = trio.Event()
                await self._reports_ready.wait()
            transition = self._user_reports.popleft()
            online = isinstance(transition, UserOnline)
            hook = self._on_user_online if online else self._on_user_offline
            if hook is not None:
                name = "on_user_online" if online else "on_user_offline"
                await call_hook(hook, name, transition.user_id, logger=logger)
            try:
                await reported.record(transition.user_id, online)
            except (MeshlineError, TransportError) as exc:
                logger.warning(
                    "cluster: could not record that user %r was reported %s (%s); "
                    "the next leader may report it again",
                    transition.user_id,
                    "online" if online else "offline",
                    exc,
                )
