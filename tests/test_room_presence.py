"""Room presence for clients (``client.watch(room)``): a state, then diffs, across
the cluster; who may watch; what watchers see; reconnects; the client keeping
diffs that arrive before the state.

The cluster tests run on the memory transport (on MockClock) and on real NATS,
with clients over memory streams; one test runs over real WebSockets on loopback.
The books (the server's :class:`WatchBook`, the client's :class:`PresenceBook`)
are plain state machines, driven here by hypothesis against each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio_websocket
from hypothesis import given, settings
from hypothesis import strategies as st

import meshline
from meshline import CallFailedError, PresenceChange, RoomPresence
from meshline._cluster._index import ClusterConnection
from meshline._cluster._watch import WatchBook
from meshline._sockets._frames import (
    JSON,
    MSGPACK,
    PresenceDiffFrame,
    PresenceStateFrame,
    UnwatchFrame,
    WelcomeFrame,
)
from meshline._sockets._presence import Applied, PresenceBook
from meshline._sockets._protocol import SocketProtocol, Watching
from meshline.testing import HOSTILE_CLIENT_IDS, open_memory_client

from .node_helpers import OpenTransport, wait_until
from .test_cluster_sockets import ROLE, by_query, client_of, cluster_of, settled


def joins_hall(conn: meshline.Connection) -> None:
    conn.join("hall")


def described(conn: meshline.Connection) -> dict[str, Any]:
    return {"device": f"device-of-{conn.user_id}", "secret": "not for watchers"}


async def until(presence: RoomPresence, predicate: Callable[[RoomPresence], bool]) -> None:
    with trio.fail_after(30):
        await presence.wait_until(predicate)


def users_are(*users: str) -> Callable[[RoomPresence], bool]:
    return lambda presence: presence.user_ids() == frozenset(users)


# --- Across the cluster -----------------------------------------------------------------


async def test_a_watcher_follows_a_room_across_nodes_and_through_a_node_death(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    async with cluster_of(
        open_transport,
        unique,
        2,
        on_connect=joins_hall,
        describe=described,
        presence_fields={"device"},
    ) as (a, b):
        changes: list[PresenceChange] = []
        async with client_of(a, user="watcher") as watcher:
            async with client_of(b, user="bob") as bob:
                presence = await watcher.watch("hall", on_change=changes.append)
                await until(presence, users_are("watcher", "bob"))
                assert presence.synced and "hall" in watcher.watched_rooms
                [seen] = presence.of_user("bob")
                assert seen.connection_id == bob.connection_id
                assert seen.client_id == bob.client_id
                assert seen.node_id == b.id
                assert dict(seen.fields) == {"device": "device-of-bob"}
                bob_id = bob.connection_id
            await until(presence, users_are("watcher"))
            assert any(
                member.connection_id == bob_id for change in changes for member in change.left
            )

            async with client_of(b, user="carol"):
                await until(presence, users_are("watcher", "carol"))
                b.faults.cut()
                await until(presence, users_are("watcher"))
                b.scope.cancel()
        assert all(change.room == "hall" for change in changes)


async def test_a_user_with_two_devices_is_two_members(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    async with cluster_of(open_transport, unique, 2, on_connect=joins_hall) as (a, b):
        async with client_of(a, user="ada") as phone, client_of(b, user="ada") as laptop:
            presence = await phone.watch("hall")
            await until(presence, lambda presence: len(presence.of_user("ada")) == 2)
            assert {member.connection_id for member in presence.members.values()} == {
                phone.connection_id,
                laptop.connection_id,
            }
            assert presence.user_ids() == {"ada"}


async def test_joins_and_leaves_of_the_room_itself_are_diffs(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    async with cluster_of(open_transport, unique, 2, on_connect=joins_hall) as (a, b):
        async with client_of(a, user="watcher") as watcher, client_of(b, user="dan") as dan:
            presence = await watcher.watch("hall")
            await until(presence, users_are("watcher", "dan"))
            conn = b.server.connection(dan.connection_id)
            assert conn is not None
            revision = presence.revision
            conn.leave("hall")
            await until(presence, users_are("watcher"))
            conn.join("hall")
            await until(presence, users_are("watcher", "dan"))
            assert presence.revision == revision + 2


# --- Who may watch, and what comes back -------------------------------------------------


@pytest.mark.parametrize("transport_kind", ["memory"], indirect=True)
async def test_by_default_a_client_may_watch_only_the_rooms_it_is_in(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    async with cluster_of(open_transport, unique, 1, on_connect=joins_hall) as (a,):
        async with client_of(a, user="eve") as eve:
            with pytest.raises(CallFailedError) as refused:
                await eve.watch("vault")
            assert refused.value.code == "forbidden"
            assert "vault" not in eve.watched_rooms
            with pytest.raises(CallFailedError) as bad:
                await eve.watch("")
            assert bad.value.code == "bad_input"
            presence = await eve.watch("hall")
            assert await eve.watch("hall") is presence


@pytest.mark.parametrize("transport_kind", ["memory"], indirect=True)
async def test_the_authorize_presence_hook_decides(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    asked: list[tuple[str, str]] = []

    async def authorize_presence(conn: meshline.Connection, room: str) -> bool:
        asked.append((conn.user_id or "", room))
        await trio.sleep(0.1)
        if room == "broken":
            raise RuntimeError("the hook failed")
        return room.startswith("public")

    async with cluster_of(
        open_transport, unique, 1, on_connect=joins_hall, authorize_presence=authorize_presence
    ) as (a,):
        async with client_of(a, user="fay") as fay:
            presence = await fay.watch("public-square")
            assert presence.members == {}
            with pytest.raises(CallFailedError) as refused:
                await fay.watch("hall")
            assert refused.value.code == "forbidden"
            with pytest.raises(CallFailedError) as failed:
                await fay.watch("broken")
            assert failed.value.code == "internal"
            assert asked == [("fay", "public-square"), ("fay", "hall"), ("fay", "broken")]


@pytest.mark.parametrize("transport_kind", ["memory"], indirect=True)
async def test_two_tasks_watching_one_room_share_its_presence_once_the_state_is_in(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    async with cluster_of(open_transport, unique, 1, on_connect=joins_hall) as (a,):
        async with client_of(a, user="pat") as pat:
            got: list[RoomPresence] = []

            async def watch() -> None:
                got.append(await pat.watch("hall"))
                assert got[-1].synced

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                nursery.start_soon(watch)
            assert len(got) == 2 and got[0] is got[1]


@pytest.mark.parametrize("transport_kind", ["memory"], indirect=True)
async def test_hostile_room_names_are_watched_like_any_other(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    names = [name for name in HOSTILE_CLIENT_IDS if name][:6]

    def joins_all(conn: meshline.Connection) -> None:
        for name in names:
            conn.join(name)

    async with cluster_of(open_transport, unique, 2, on_connect=joins_all) as (a, b):
        async with client_of(a, user="gil") as gil, client_of(b, user="hal"):
            for name in names:
                presence = await gil.watch(name)
                await until(presence, users_are("gil", "hal"))
                assert presence.room == name


@pytest.mark.parametrize("transport_kind", ["memory"], indirect=True)
async def test_unwatch_ends_the_presence_and_the_server_forgets_the_watcher(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    async with cluster_of(open_transport, unique, 1, on_connect=joins_hall) as (a,):
        async with client_of(a, user="ivy") as ivy:
            presence = await ivy.watch("hall")
            await until(presence, users_are("ivy"))
            await settled([a], lambda server: bool(server.cluster.watched()))
            ivy.unwatch("hall")
            assert not presence.watching and "hall" not in ivy.watched_rooms
            with pytest.raises(trio.ClosedResourceError):
                await presence.wait_until(lambda presence: False)
            await settled([a], lambda server: not server.cluster.watched())
            revision = presence.revision
            async with client_of(a, user="joe"):
                await settled([a], lambda server: len(server.cluster.room("hall")) == 2)
            assert presence.revision == revision and presence.user_ids() == {"ivy"}


@pytest.mark.parametrize("transport_kind", ["memory"], indirect=True)
async def test_a_client_watches_again_after_a_reconnect(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    async with cluster_of(open_transport, unique, 1, on_connect=joins_hall) as (a,):
        reconnect = meshline.ReconnectOptions(base=0.05, cap=0.2)
        async with open_memory_client(
            a.server, client_id="kim", query={"user": "kim"}, reconnect=reconnect
        ) as kim:
            presence = await kim.watch("hall")
            await until(presence, users_are("kim"))
            first = kim.connection_id
            conn = a.server.connection(first or "")
            assert conn is not None
            await conn.close(meshline.CloseCode.TRY_AGAIN_LATER)
            async with client_of(a, user="lou"):
                await until(
                    presence,
                    lambda presence: (
                        presence.synced
                        and kim.connection_id != first
                        and presence.user_ids() == {"kim", "lou"}
                    ),
                )
                assert first not in presence.members
                assert kim.connection_id in presence.members


# --- Over real WebSockets ---------------------------------------------------------------


async def test_a_client_closed_for_good_ends_its_presences(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    """A presence whose client closed for good stops watching, and its waiters wake
    with ``ClosedResourceError`` (they used to wait forever, ``synced`` still
    True)."""
    async with cluster_of(open_transport, unique, 1, on_connect=joins_hall) as (a,):
        async with client_of(a, user="w") as w:
            presence = await w.watch("hall")
            await until(presence, users_are("w"))
            waiter_saw: list[type[BaseException]] = []

            async def wait_for_nobody() -> None:
                try:
                    await presence.wait_until(lambda presence: "nobody" in presence.user_ids())
                except trio.ClosedResourceError as exc:
                    waiter_saw.append(type(exc))

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(wait_for_nobody)
                    conn = a.server.connection(w.connection_id)
                    assert conn is not None
                    await conn.close(meshline.CloseCode.RECONNECT)
                    await wait_until(lambda: w.state.is_final)  # reconnect=None
            assert waiter_saw == [trio.ClosedResourceError]
            assert not presence.watching and not presence.synced
            assert w.watched_rooms == frozenset()


async def test_a_permission_revoked_while_the_hook_decides_is_not_granted(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    """The hook looked the permission up (allowed) and has not answered yet; the
    application revokes it with ``conn.unwatch``: the watch is refused (the hook's
    answer used to be taken, and the client watched on)."""
    looked_up, answer = trio.Event(), trio.Event()

    async def authorize(conn: meshline.Connection, room: str) -> bool:
        allowed = True  # as the application's store said a moment ago
        looked_up.set()
        await answer.wait()
        return allowed

    async with cluster_of(
        open_transport, unique, 1, on_connect=joins_hall, authorize_presence=authorize
    ) as (a,):
        async with client_of(a, user="w") as w:
            outcome: list[RoomPresence | CallFailedError] = []

            async def watch() -> None:
                try:
                    outcome.append(await w.watch("hall"))
                except CallFailedError as exc:
                    outcome.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                with trio.fail_after(30):
                    await looked_up.wait()
                conn = a.server.connection(w.connection_id)
                assert conn is not None
                assert not conn.unwatch("hall")  # not watching yet: nothing to end
                answer.set()
            [refused] = outcome
            assert isinstance(refused, CallFailedError) and refused.code == "forbidden"
            assert "hall" not in a.server.cluster.watched()
            again = await w.watch("hall")  # asked afresh: the hook allows it
            assert again.watching


def big_bio(conn: meshline.Connection) -> dict[str, Any]:
    return {"bio": "x" * (8000 if conn.user_id == "big" else 10)}


async def test_a_change_too_big_for_a_watcher_ends_its_watch(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    """A diff bigger than the watcher's message limit is not sent, and the watch
    ends (``too_large``) on both sides: the client is told, rather than left with
    a view that lacks the change (the diff used to be skipped silently, and a
    refused watch again left the server sending diffs)."""
    async with cluster_of(
        open_transport, unique, 1, on_connect=joins_hall, describe=big_bio, presence_fields={"bio"}
    ) as (a,):
        async with client_of(a, user="w", max_message_size=4096) as w:
            presence = await w.watch("hall")
            await until(presence, users_are("w"))
            async with client_of(a, user="big"):
                with trio.fail_after(30):
                    await wait_until(lambda: not presence.watching)
                assert presence.end_code == "too_large"
                assert w.watched_rooms == frozenset()
                with trio.fail_after(30):
                    await wait_until(lambda: "hall" not in a.server.cluster.watched())


async def test_under_the_default_rule_leaving_the_room_ends_the_watch(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    """By default a client may watch the rooms it is in: taken out of the room, its
    watch ends (``forbidden``), and it sees nothing more of the room (it used to
    go on seeing who joined)."""
    async with cluster_of(open_transport, unique, 1, on_connect=joins_hall) as (a,):
        async with client_of(a, user="w") as w:
            presence = await w.watch("hall")
            await until(presence, users_are("w"))
            conn = a.server.connection(w.connection_id)
            assert conn is not None
            conn.leave("hall")
            with trio.fail_after(30):
                await wait_until(lambda: not presence.watching)
            assert presence.end_code == "forbidden"
            async with client_of(a, user="y"):
                await settled([a], lambda server: len(server.cluster.room("hall")) == 1)
                with trio.fail_after(30):
                    await wait_until(lambda: "hall" not in a.server.cluster.watched())
            assert presence.user_ids() == {"w"}  # as it was when the watch ended
            with pytest.raises(CallFailedError) as refused:
                await w.watch("hall")
            assert refused.value.code == "forbidden"


async def test_the_server_ends_a_watch_with_connection_unwatch(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: object
) -> None:
    async with cluster_of(
        open_transport, unique, 1, on_connect=joins_hall, authorize_presence=lambda c, r: True
    ) as (a,):
        async with client_of(a, user="w") as w:
            presence = await w.watch("hall")
            conn = a.server.connection(w.connection_id)
            assert conn is not None
            conn.leave("hall")  # a hook decides here: leaving ends nothing
            assert conn.unwatch("hall")
            assert not conn.unwatch("hall")  # no longer watching
            with trio.fail_after(30):
                await wait_until(lambda: not presence.watching)
            assert presence.end_code == "forbidden"
            assert "hall" not in a.server.cluster.watched()
            again = await w.watch("hall")  # the hook still allows it
            assert again.watching and again.end_code is None


async def test_room_presence_over_real_websockets() -> None:
    async with meshline.open_socket_server(
        roles=[ROLE], authenticate=by_query, on_connect=joins_hall
    ) as server:
        url = f"ws://127.0.0.1:{server.port}/"
        async with (
            meshline.open_socket_client(
                url, client_id="mo", query={"user": "mo"}, reconnect=None
            ) as mo,
            meshline.open_socket_client(
                url, client_id="ned", query={"user": "ned"}, reconnect=None, encoding="json"
            ) as ned,
        ):
            from_msgpack = await mo.watch("hall")
            from_json = await ned.watch("hall")
            for presence in (from_msgpack, from_json):
                await until(presence, users_are("mo", "ned"))
        with trio.fail_after(30):
            await wait_until(lambda: server.cluster.count() == 0)


# --- The protocol machine ---------------------------------------------------------------


def open_machines(
    version: int = meshline._sockets._frames.PROTOCOL_VERSION,
) -> tuple[SocketProtocol, SocketProtocol]:
    client = SocketProtocol("client", MSGPACK)
    server = SocketProtocol("server", MSGPACK)
    server.receive(client.hello("c"), 0.0)
    if version == meshline._sockets._frames.PROTOCOL_VERSION:
        client.receive(server.welcome("conn", 1, now=0.0), 0.0)
    else:
        client.receive(MSGPACK.encode(WelcomeFrame("conn", 1, version=version)), 0.0)
    return client, server


def test_a_client_does_not_watch_on_a_revision_1_server() -> None:
    client, _ = open_machines(version=1)
    with pytest.raises(meshline.LocalProtocolError, match="revision 1"):
        client.watch("hall")
    with pytest.raises(meshline.LocalProtocolError, match="revision 1"):
        client.unwatch("hall")


async def test_a_watch_refused_by_a_revision_1_server_sends_it_nothing() -> None:
    """Against a server speaking revision 1 (a scripted one, over a real WebSocket),
    ``watch`` fails, and sends no frame the server does not know: not the watch,
    and not the unwatch that withdraws it (that one used to be sent, and a
    revision-1 server closes the connection on a frame kind it does not know)."""
    received: list[object] = []
    closed = trio.Event()

    async def revision_1_server(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept(subprotocol=MSGPACK.subprotocol)
        try:
            received.append(MSGPACK.decode(await ws.get_message()))  # the hello
            await ws.send_message(MSGPACK.encode(WelcomeFrame("c.1", 1, version=1)))
            while True:
                received.append(MSGPACK.decode(await ws.get_message()))
        except trio_websocket.ConnectionClosed:
            closed.set()

    async with trio.open_nursery() as nursery:
        listener = await nursery.start(
            trio_websocket.serve_websocket, revision_1_server, "127.0.0.1", 0, None
        )
        url = f"ws://127.0.0.1:{listener.port}/"
        async with meshline.open_socket_client(url, client_id="c", reconnect=None) as client:
            with pytest.raises(CallFailedError, match="revision 1"):
                await client.watch("hall")
            assert client.state is meshline.ClientState.CONNECTED
        with trio.fail_after(10):
            await closed.wait()
        nursery.cancel_scope.cancel()
    kinds = [type(frame).__name__ for frame in received]
    assert kinds[0] == "HelloFrame"
    assert not {"WatchFrame", "UnwatchFrame"} & set(kinds), kinds


def test_a_server_ends_a_watch_and_the_client_forgets_the_room() -> None:
    client, server = open_machines()
    watch_id, message = client.watch("hall")
    server.receive(message, 0.0)
    for answer in server.accept_watch(watch_id, 0, ()).messages:
        client.receive(answer, 0.0)
    assert client.is_watching("hall")
    with pytest.raises(meshline.LocalProtocolError):
        server.end_watch("elsewhere", "forbidden")  # not watched
    ended = client.receive(server.end_watch("hall", "too_large"), 0.0)
    assert ended == UnwatchFrame("hall", "too_large")
    assert not client.is_watching("hall") and not server.is_watching("hall")
    assert client.receive(MSGPACK.encode(PresenceDiffFrame("hall", 1)), 0.0) is None
    assert client.receive(MSGPACK.encode(UnwatchFrame("hall", "forbidden")), 0.0) is None
    assert client.counters.unwatched_presence == 2


def test_a_watch_withdrawn_before_its_answer_is_answered_cancelled() -> None:
    client, server = open_machines()
    watch_id, message = client.watch("hall")
    server.receive(message, 0.0)
    assert server.receive(client.unwatch("hall"), 0.0) is not None
    answer = server.accept_watch(watch_id, 0, ())
    assert not answer.watching and "hall" not in server.watches
    [error] = answer.messages
    assert client.receive(error, 0.0) is None  # the client forgot the watch
    assert client.counters.late_answers == 1


def test_presence_of_a_room_not_watched_is_ignored_and_counted() -> None:
    client, server = open_machines()
    assert client.receive(MSGPACK.encode(PresenceDiffFrame("elsewhere", 1)), 0.0) is None
    assert client.counters.unwatched_presence == 1
    watch_id, message = client.watch("hall")
    server.receive(message, 0.0)
    early = client.receive(MSGPACK.encode(PresenceDiffFrame("hall", 1)), 0.0)
    assert isinstance(early, PresenceDiffFrame)  # a pending watch takes early diffs
    result, state = server.accept_watch(watch_id, 0, ()).messages
    assert isinstance(client.receive(result, 0.0), Watching)
    assert isinstance(client.receive(state, 0.0), PresenceStateFrame)
    assert client.watches == server.watches == {"hall"}


# --- The books, against each other -----------------------------------------------------


CLIENTS = ["c1", "c2", "c3", "c4"]

operations = st.lists(
    st.one_of(
        st.tuples(st.just("join"), st.sampled_from(CLIENTS), st.integers(1, 3)),
        st.tuples(st.just("leave"), st.sampled_from(CLIENTS), st.just(0)),
        st.tuples(st.just("describe"), st.sampled_from(CLIENTS), st.integers(0, 2)),
        st.tuples(st.just("node"), st.integers(1, 3), st.booleans()),
    ),
    max_size=25,
)


class Room:
    """A model of one room's registrations and node liveness, driving a WatchBook."""

    def __init__(self) -> None:
        self.book: WatchBook[str] = WatchBook(frozenset({"mood"}))
        self.registered: dict[str, ClusterConnection] = {}
        self.dead: set[int] = set()
        self.generation = 0

    def visible(self) -> list[ClusterConnection]:
        return [conn for conn in self.registered.values() if conn.node_id not in self.dead]

    def apply(self, operation: tuple[str, Any, Any]) -> PresenceDiffFrame | None:
        kind, who, value = operation
        self.generation += 1
        if kind == "node":
            if value:
                self.dead.discard(who)
            else:
                self.dead.add(who)
            return self.book.resync("r", self.visible())
        if kind == "leave":
            self.registered.pop(who, None)
            return self.book.update("r", who, None)
        old = self.registered.get(who)
        if kind == "describe":
            if old is None:
                return None
            conn = ClusterConnection(
                old.connection_id,
                who,
                old.node_id,
                None,
                "m",
                1.0,
                frozenset({"r"}),
                {"mood": value, "hidden": self.generation},
            )
        else:
            conn = ClusterConnection(
                f"{who}.{self.generation}", who, value, who, "m", 1.0, frozenset({"r"})
            )
        self.registered[who] = conn
        visible = conn if conn.node_id not in self.dead else None
        return self.book.update("r", who, visible)


@settings(max_examples=200, deadline=None)
@given(
    before=operations,
    after=operations,
    early=st.integers(0, 30),
    codec=st.sampled_from([MSGPACK, JSON]),
    rewatch=st.booleans(),
)
def test_a_client_that_gets_the_state_late_ends_where_the_server_is(
    before: list[tuple[str, Any, Any]],
    after: list[tuple[str, Any, Any]],
    early: int,
    codec: meshline._sockets._frames.Codec,
    rewatch: bool,
) -> None:
    """Whatever diffs cross the state (older ones, newer ones, before or after it),
    the client's members end as the server's, and every diff it applied changed
    something.

    ``rewatch``: the older diffs were sent to an earlier watch of the same client,
    which unwatched the room (the node's last watcher: the book forgot the room)
    and watched it again; they are still on the way when the new watch starts.
    (A room watched again used to start over at revision 0, and the client took
    the earlier watch's diffs for newer ones.)"""
    room = Room()
    room.book.add("r", "old watcher", [])
    stream: list[PresenceDiffFrame | PresenceStateFrame] = []
    for operation in before:
        diff = room.apply(operation)
        if diff is not None:
            stream.append(diff)
    if rewatch:
        room.book.remove("r", "old watcher")
        assert not room.book.is_watched("r")
    rev, members, catch_up = room.book.state("r", room.visible())
    assert catch_up is None
    if rewatch:
        room.book.add("r", "new watcher", room.visible())
    state = PresenceStateFrame("r", rev, members)
    newer: list[PresenceDiffFrame] = []
    for operation in after:
        diff = room.apply(operation)
        if diff is not None:
            newer.append(diff)
    stream.extend(newer)
    stream.insert(min(early, len(stream)), state)

    client = PresenceBook("r")
    heard: dict[str, Any] = {}
    """The members an application keeps from the changes alone."""
    for frame in stream:
        decoded = codec.decode(codec.encode(frame))
        if isinstance(decoded, PresenceStateFrame):
            change: PresenceChange | Applied | None = client.state(decoded)
        else:
            assert isinstance(decoded, PresenceDiffFrame)
            change = client.diff(decoded)
            assert change is not Applied.GAP
        if isinstance(change, PresenceChange):
            assert change.joined or change.left
            for member in change.left:
                del heard[member.connection_id]
            for member in change.joined:
                heard[member.connection_id] = member
    assert client.synced
    assert heard == client.members
    assert {member.connection_id for member in client.members.values()} == {
        conn.connection_id for conn in room.visible()
    }
    for conn in room.visible():
        member = client.members[conn.connection_id]
        assert member.client_id == conn.client_id
        assert dict(member.fields) == {k: v for k, v in conn.fields.items() if k == "mood"}


def test_held_diffs_that_skip_a_revision_after_the_state_ask_for_a_new_state() -> None:
    book = PresenceBook("r")
    assert book.diff(PresenceDiffFrame("r", 6)) is Applied.HELD
    assert book.diff(PresenceDiffFrame("r", 8)) is Applied.HELD
    assert book.state(PresenceStateFrame("r", 5)) is Applied.GAP
    assert not book.synced


def test_a_lost_diff_is_a_gap_and_the_book_waits_for_a_new_state() -> None:
    book = PresenceBook("r")
    book.state(PresenceStateFrame("r", 4))
    assert book.diff(PresenceDiffFrame("r", 4)) is Applied.STALE
    assert book.diff(PresenceDiffFrame("r", 6)) is Applied.GAP
    assert not book.synced
    assert book.diff(PresenceDiffFrame("r", 7)) is Applied.HELD
