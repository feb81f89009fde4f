"""The cluster layer's sans-IO decisions: which connection of a client is newer, and
what the leader reports when leadership moves mid-hook."""

from __future__ import annotations

import trio
import trio.testing

from meshline._cluster._index import ClusterConnection
from meshline._cluster._link import _is_newer
from meshline._cluster._reporting import PresenceReporter


def test_the_clients_own_word_decides_which_connection_is_newer() -> None:
    # b named a as its previous connection: b is newer, whatever the clocks say
    # (b's node runs 10 s behind).
    a, b = ("1.x.1", "", 100.0), ("2.y.1", "1.x.1", 90.0)
    assert _is_newer(b, a)
    assert not _is_newer(a, b)
    # Without a word from the client, the later accept time wins; ids break ties.
    c, d = ("1.x.2", "", 100.0), ("2.y.2", "", 101.0)
    assert _is_newer(d, c) and not _is_newer(c, d)
    e, f = ("1.x.3", "", 5.0), ("2.y.3", "", 5.0)
    assert _is_newer(f, e) != _is_newer(e, f)


class Store:
    def __init__(self) -> None:
        self.users: set[str] = set()

    async def load(self) -> set[str]:
        await trio.lowlevel.checkpoint()
        return set(self.users)

    async def record(self, user_id: str, online: bool) -> None:
        await trio.lowlevel.checkpoint()
        (self.users.add if online else self.users.discard)(user_id)


def test_a_leader_losing_the_lead_mid_hook_leaves_the_truth_to_the_next() -> None:
    said: list[str] = []

    def reporter(name: str) -> PresenceReporter:
        async def online(user: str) -> None:
            await trio.sleep(5)  # a slow hook
            said.append(f"{name}: online {user}")

        def offline(user: str) -> None:
            said.append(f"{name}: offline {user}")

        return PresenceReporter(
            grace=0, alive=lambda node: True, on_user_online=online, on_user_offline=offline
        )

    async def main() -> None:
        store = Store()
        a, b = reporter("a"), reporter("b")
        phone = ClusterConnection("1.x.1", "phone", 1, "ada", "member", 0.0)
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as term:
                term.start_soon(a.lead, store)
                await trio.sleep(0.1)
                for each in (a, b):
                    each.registration("phone", phone)  # ada online: a's slow hook starts
                await trio.sleep(1)
                for each in (a, b):
                    each.registration("phone", None)  # ada offline, queued on a
                term.cancel_scope.cancel()  # a loses the lead mid-hook
            nursery.start_soon(b.lead, store)
            await trio.sleep(20)
            # ada came back while b leads: b reports it, and records it.
            b.registration("phone", phone)
            await trio.sleep(20)
            nursery.cancel_scope.cancel()
        assert said == ["b: online ada"]
        assert store.users == {"ada"}

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
