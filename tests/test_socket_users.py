"""The user presence machine (``meshline._cluster._users``): online and offline
transitions across many connections per user, and the offline grace period."""

from __future__ import annotations

import math

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from meshline import InvalidArgumentError
from meshline._cluster._users import UserOffline, UserOnline, UserPresence, UserTransition


def test_first_connection_anywhere_is_online_and_the_last_gone_is_offline() -> None:
    users = UserPresence()
    assert users.connected("ann", "n1.a", 0.0) == [UserOnline("ann")]
    assert users.connected("ann", "n2.b", 0.0) == []  # a second device, on another node
    assert users.disconnected("ann", "n1.a", 1.0) == []
    assert users.is_online("ann") and users.connections_of("ann") == {"n2.b"}
    assert users.disconnected("ann", "n2.b", 2.0) == [UserOffline("ann")]
    assert not users.is_online("ann") and users.online == frozenset()


def test_unknown_or_repeated_events_change_nothing() -> None:
    users = UserPresence()
    assert users.disconnected("ann", "n1.a", 0.0) == []
    assert users.connected("ann", "n1.a", 0.0) == [UserOnline("ann")]
    assert users.connected("ann", "n1.a", 0.0) == []
    assert users.disconnected("ann", "n9.z", 0.0) == []
    assert users.disconnected("ann", "n1.a", 0.0) == [UserOffline("ann")]
    assert users.disconnected("ann", "n1.a", 0.0) == []


def test_a_return_within_the_grace_period_is_never_reported() -> None:
    users = UserPresence(grace=5)
    users.connected("ann", "n1.a", 0.0)
    assert users.disconnected("ann", "n1.a", 10.0) == []
    assert users.is_online("ann") and users.in_grace("ann")
    assert users.next_deadline() == 15.0
    assert users.expire(14.9) == []
    assert users.connected("ann", "n2.b", 14.9) == []  # back, on another node
    assert not users.in_grace("ann")
    assert users.next_deadline() == math.inf
    assert users.expire(100.0) == []
    assert users.is_online("ann")


def test_the_grace_period_ends_in_an_offline_report_at_its_deadline() -> None:
    users = UserPresence(grace=5)
    users.connected("ann", "n1.a", 0.0)
    users.connected("bob", "n1.b", 0.0)
    users.disconnected("ann", "n1.a", 10.0)
    users.disconnected("bob", "n1.b", 11.0)
    assert users.expire(15.0) == [UserOffline("ann")]
    assert users.online == {"bob"}
    assert users.expire(20.0) == [UserOffline("bob")]
    assert users.connected("ann", "n1.c", 21.0) == [UserOnline("ann")]


def test_a_return_after_the_grace_period_not_yet_expired_is_offline_then_online() -> None:
    users = UserPresence(grace=5)
    users.connected("ann", "n1.a", 0.0)
    users.disconnected("ann", "n1.a", 10.0)
    assert users.connected("ann", "n1.b", 15.0) == [UserOffline("ann"), UserOnline("ann")]
    assert users.expire(15.0) == []
    assert users.connections_of("ann") == {"n1.b"}


def test_leaving_again_after_a_return_starts_a_new_grace_period() -> None:
    users = UserPresence(grace=5)
    users.connected("ann", "n1.a", 0.0)
    users.disconnected("ann", "n1.a", 0.0)
    users.connected("ann", "n1.b", 1.0)
    users.disconnected("ann", "n1.b", 3.0)
    assert users.expire(5.0) == []  # the first grace period's end is stale
    assert users.next_deadline() == 8.0
    assert users.expire(8.0) == [UserOffline("ann")]


def test_a_snapshot_reports_nothing_for_those_already_online() -> None:
    users = UserPresence(grace=5)
    users.connected("old", "n1.x", 0.0)
    users.disconnected("old", "n1.x", 0.0)
    users.load([("ann", "n1.a"), ("ann", "n2.b"), ("bob", "n1.c")])
    assert users.online == {"ann", "bob"}
    assert users.next_deadline() == math.inf  # the grace period before it is gone
    assert users.connected("ann", "n3.d", 1.0) == []
    assert users.disconnected("bob", "n1.c", 1.0) == []
    assert users.expire(6.0) == [UserOffline("bob")]


@pytest.mark.parametrize("grace", [-1, math.inf, math.nan, "5", True])
def test_a_bad_grace_period_is_refused(grace: object) -> None:
    with pytest.raises(InvalidArgumentError):
        UserPresence(grace=grace)  # type: ignore[arg-type]


USERS = st.sampled_from(["ann", "a.b*> é\n"])
CONNECTIONS = st.sampled_from(["n1.1", "n2.1", "n3.1"])


class UserPresenceMachine(RuleBasedStateMachine):
    """Connections come and go on any node, time passes; checked against a model
    that only remembers each user's connections and when their last one went."""

    def __init__(self) -> None:
        super().__init__()
        self.grace = 3.0
        self.users = UserPresence(grace=self.grace)
        self.now = 0.0
        self.connections: dict[str, set[str]] = {}
        self.gone_at: dict[str, float] = {}
        """When each user with no connection left lost their last one."""
        self.reported: dict[str, list[UserTransition]] = {}

    def _report(self, transitions: list[UserTransition]) -> None:
        for transition in transitions:
            self.reported.setdefault(transition.user_id, []).append(transition)

    @rule(user=USERS, connection=CONNECTIONS)
    def connect(self, user: str, connection: str) -> None:
        self._report(self.users.connected(user, connection, self.now))
        self.connections.setdefault(user, set()).add(connection)
        self.gone_at.pop(user, None)

    @rule(user=USERS, connection=CONNECTIONS)
    def disconnect(self, user: str, connection: str) -> None:
        self._report(self.users.disconnected(user, connection, self.now))
        current = self.connections.get(user, set())
        if connection in current:
            current.discard(connection)
            if not current:
                self.gone_at[user] = self.now

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.5, 7.0]))
    def wait(self, seconds: float) -> None:
        self.now += seconds
        self._report(self.users.expire(self.now))

    def model_online(self, user: str) -> bool:
        if self.connections.get(user):
            return True
        gone = self.gone_at.get(user)
        return gone is not None and self.now < gone + self.grace

    @invariant()
    def online_is_the_model(self) -> None:
        assert self.users.expire(self.now) == []  # every due deadline was expired
        expected = {user for user in self.connections if self.model_online(user)}
        assert self.users.online == expected

    @invariant()
    def reports_alternate_and_end_in_the_truth(self) -> None:
        for user, reports in self.reported.items():
            kinds = [type(report) for report in reports]
            assert kinds[::2] == [UserOnline] * len(kinds[::2])
            assert kinds[1::2] == [UserOffline] * len(kinds[1::2])
            assert (kinds[-1] is UserOnline) == self.users.is_online(user)


TestUserPresenceMachine = UserPresenceMachine.TestCase
