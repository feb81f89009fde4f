"""Socket servers joined into a cluster (``open_socket_server(mesh=...)``): presence of
every connection, cluster queries, interest routing, targeted delivery, kicks,
supersession and invoke across nodes. Each test runs on the memory transport (on
MockClock) and on real NATS; the clients reach their server over memory streams."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio

import meshline
from meshline import (
    Admission,
    ClusterConnection,
    DisconnectReason,
    InvalidArgumentError,
    MeshOptions,
    Role,
    SocketRequest,
    SocketServer,
    node_of_connection,
)
from meshline.testing import HOSTILE_CLIENT_IDS, FaultyTransport, open_memory_client

from .node_helpers import OpenTransport, wait_until

ROLE = Role("member")


def by_query(request: SocketRequest) -> Admission:
    user = request.query.get("user")
    return Admission("member", user_id=user)


class Node:
    """One socket server on the mesh, with the connections it saw end."""

    def __init__(self, server: SocketServer, faults: FaultyTransport, scope: trio.CancelScope):
        self.server = server
        self.faults = faults
        self.scope = scope
        self.ended: list[tuple[str, DisconnectReason]] = []

    @property
    def id(self) -> int:
        return self.server.node_id


class Cluster:
    def __init__(self, nursery: trio.Nursery, open_transport: OpenTransport, key: str) -> None:
        self.nursery = nursery
        self.open_transport = open_transport
        self.key = key
        self.nodes: list[Node] = []

    async def start(self, **options: Any) -> Node:
        async def run(task_status: trio.TaskStatus[Node]) -> None:
            ended: list[tuple[str, DisconnectReason]] = []

            def on_disconnect(conn: meshline.Connection, reason: DisconnectReason) -> None:
                ended.append((conn.id, reason))

            with trio.CancelScope() as scope:
                async with self.open_transport() as inner:
                    faults = FaultyTransport(inner)
                    async with meshline.open_socket_server(
                        roles=[ROLE],
                        authenticate=by_query,
                        listen=False,
                        mesh=MeshOptions(faults, self.key, node={"ttl": 2}),
                        on_disconnect=on_disconnect,
                        **options,
                    ) as server:
                        node = Node(server, faults, scope)
                        node.ended = ended
                        self.nodes.append(node)
                        task_status.started(node)
                        await trio.sleep_forever()

        node: Node = await self.nursery.start(run)
        return node


@asynccontextmanager
async def cluster_of(
    open_transport: OpenTransport, unique: Callable[[str], str], count: int, **options: Any
) -> AsyncIterator[list[Node]]:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, open_transport, unique("socks"))
        nodes = [await cluster.start(**options) for _ in range(count)]
        everyone = {node.id for node in nodes}
        for node in nodes:
            await wait_until(lambda node=node: everyone <= node.server.cluster.nodes())
        yield nodes
        nursery.cancel_scope.cancel()


async def settled(nodes: list[Node], predicate: Callable[[SocketServer], bool]) -> None:
    for node in nodes:
        with trio.fail_after(30):
            await wait_until(lambda node=node: predicate(node.server))


@asynccontextmanager
async def client_of(
    node: Node, *, user: str | None = None, client_id: str | None = None, **options: Any
) -> AsyncIterator[meshline.SocketClient]:
    query = {} if user is None else {"user": user}
    async with open_memory_client(
        node.server, client_id=client_id, query=query, reconnect=None, **options
    ) as client:
        yield client


class Inbox:
    """The events one client received, to wait on."""

    def __init__(self, client: meshline.SocketClient, event: str = "note") -> None:
        self.items: list[Any] = []
        client.on(event, self.items.append)

    async def wait_for(self, count: int) -> list[Any]:
        with trio.fail_after(30):
            await wait_until(lambda: len(self.items) >= count)
        return self.items


# --- Presence and queries ---------------------------------------------------------------


async def test_every_node_sees_every_connection_with_its_descriptor(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    def describe(conn: meshline.Connection) -> dict[str, Any]:
        return {"device": "phone", "remote": conn.remote}

    def on_connect(conn: meshline.Connection) -> None:
        conn.join("lobby")

    async with cluster_of(open_transport, unique, 2, describe=describe, on_connect=on_connect) as (
        a,
        b,
    ):
        async with client_of(a, user="ada", client_id="ada-phone") as client:
            await settled([a, b], lambda server: server.cluster.count() == 1)
            [seen] = b.server.cluster.by_user("ada")
            assert isinstance(seen, ClusterConnection)
            assert seen.connection_id == client.connection_id
            assert seen.client_id == "ada-phone"
            assert seen.node_id == a.id
            assert seen.user_id == "ada"
            assert seen.role == "member"
            assert seen.rooms == frozenset({"lobby"})
            assert seen.fields["device"] == "phone"
            assert b.server.cluster.room("lobby") == [seen]
            assert b.server.cluster.is_online("ada")
            assert b.server.cluster.client("ada-phone") == seen
            topology = b.server.cluster.topology()
            assert topology[a.id].connections == 1
            assert topology[a.id].rooms == frozenset({"lobby"})
            assert topology[b.id].connections == 0
            assert all(summary.alive for summary in topology.values())

            conn = a.server.connection(seen.connection_id)
            assert conn is not None
            conn.join("second")
            await settled([b], lambda server: len(server.cluster.room("second")) == 1)
            conn.leave("lobby")
            await settled([b], lambda server: not server.cluster.room("lobby"))
        await settled([a, b], lambda server: server.cluster.count() == 0)
        assert not b.server.cluster.is_online("ada")
        assert b.server.cluster.by_user("ada") == []


async def test_a_users_devices_on_two_nodes(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    async with cluster_of(open_transport, unique, 2) as (a, b):
        async with client_of(a, user="ada") as phone, client_of(b, user="ada") as laptop:
            await settled([a, b], lambda server: len(server.cluster.by_user("ada")) == 2)
            phone_inbox, laptop_inbox = Inbox(phone), Inbox(laptop)
            await a.server.to_user("ada").emit("note", {"n": 1})
            assert await phone_inbox.wait_for(1) == [{"n": 1}]
            assert await laptop_inbox.wait_for(1) == [{"n": 1}]
            await b.server.to_user("ada").emit("note", 2, skip=laptop.connection_id)
            assert await phone_inbox.wait_for(2) == [{"n": 1}, 2]
            assert {c.node_id for c in a.server.cluster.by_user("ada")} == {a.id, b.id}
        await settled([a, b], lambda server: not server.cluster.is_online("ada"))


async def test_a_room_across_nodes_reaches_only_the_nodes_with_members(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    def on_connect(conn: meshline.Connection) -> None:
        conn.join("hall")

    async with cluster_of(open_transport, unique, 3, on_connect=on_connect) as (a, b, c):
        async with client_of(a) as first, client_of(b) as second:
            await settled([a, b, c], lambda server: len(server.cluster.room("hall")) == 2)
            await wait_until(lambda: a.server.cluster.listening("room", "hall"))
            await wait_until(lambda: b.server.cluster.listening("room", "hall"))
            before = c.server.cluster.received
            inboxes = Inbox(first), Inbox(second)
            for n in range(5):
                await c.server.to_room("hall").emit("note", n)
            for inbox in inboxes:
                assert await inbox.wait_for(5) == [0, 1, 2, 3, 4]
            assert not c.server.cluster.listening("room", "hall")
            # The sender received none of its own emits: no members, no interest.
            assert c.server.cluster.received == before
            # b received each emit once; a node with members decodes its own room's
            # traffic only.
            await a.server.to_room("hall").emit("note", "from a", skip=first.connection_id)
            assert (await inboxes[1].wait_for(6))[-1] == "from a"
            assert inboxes[0].items == [0, 1, 2, 3, 4]
        await wait_until(lambda: not a.server.cluster.listening("room", "hall"))


async def test_topics_across_nodes(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    async with cluster_of(open_transport, unique, 2) as (a, b):
        async with client_of(a) as reader:
            got: list[Any] = []
            reader.on("tick", got.append, topic="prices")
            await reader.subscribe("prices")
            await wait_until(lambda: a.server.cluster.listening("topic", "prices"))
            await b.server.to_topic("prices").publish("tick", 42)
            with trio.fail_after(30):
                await wait_until(lambda: got == [42])


# --- Kicks, supersession, invoke ---------------------------------------------------------


async def test_kick_across_nodes_is_terminal(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    async with cluster_of(open_transport, unique, 2) as (a, b):
        async with client_of(a, user="eve") as client:
            assert client.connection_id is not None
            await b.server.to_conn(client.connection_id).close(reason="bye")
            with trio.fail_after(30):
                await wait_until(lambda: client.state is meshline.ClientState.FAILED)
            await settled([a, b], lambda server: not server.cluster.is_online("eve"))
        assert a.ended[-1][1] is DisconnectReason.SERVER_CLOSED


async def test_disconnecting_a_user_closes_every_device(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    async with cluster_of(open_transport, unique, 2) as (a, b):
        async with client_of(a, user="eve") as one, client_of(b, user="eve") as two:
            await settled([a, b], lambda server: len(server.cluster.by_user("eve")) == 2)
            await a.server.to_user("eve").disconnect()
            with trio.fail_after(30):
                await wait_until(
                    lambda: (
                        one.state is meshline.ClientState.FAILED
                        and two.state is meshline.ClientState.FAILED
                    )
                )


async def test_emit_to_a_connection_on_another_node(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    async with cluster_of(open_transport, unique, 2) as (a, b):
        async with client_of(a) as client:
            inbox = Inbox(client)
            assert client.connection_id is not None
            await b.server.to_conn(client.connection_id).emit("note", "hi")
            await a.server.to_conn(client.connection_id).emit("note", "local")
            assert sorted(await inbox.wait_for(2)) == ["hi", "local"]  # two senders: no order


async def test_a_client_connecting_elsewhere_supersedes_its_old_connection(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    async with cluster_of(open_transport, unique, 2) as (a, b):
        async with client_of(a, client_id="roamer") as old:
            await settled([a, b], lambda server: server.cluster.client("roamer") is not None)
            old_id = old.connection_id
            async with client_of(b, client_id="roamer") as new:
                with trio.fail_after(30):
                    await wait_until(lambda: old.state is meshline.ClientState.FAILED)
                assert (old_id, DisconnectReason.SUPERSEDED) in a.ended
                await settled(
                    [a, b],
                    lambda server: (
                        (found := server.cluster.client("roamer")) is not None
                        and found.connection_id == new.connection_id
                    ),
                )
                assert a.server.cluster.count() == 1
                new.implement("whoami", lambda data: f"new:{data}")
                assert await a.server.invoke("roamer", "whoami", 1) == "new:1"


async def test_a_second_connection_on_the_same_node_supersedes_the_first(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    async with cluster_of(open_transport, unique, 1) as (a,):
        async with client_of(a, client_id="twin") as first:
            first_id = first.connection_id
            async with client_of(a, client_id="twin") as second:
                with trio.fail_after(30):
                    await wait_until(lambda: first.state is meshline.ClientState.FAILED)
                assert (first_id, DisconnectReason.SUPERSEDED) in a.ended
                await settled(
                    [a],
                    lambda server: (
                        (found := server.cluster.client("twin")) is not None
                        and found.connection_id == second.connection_id
                    ),
                )
            await settled([a], lambda server: server.cluster.count() == 0)


async def test_invoke_across_nodes(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    async with cluster_of(open_transport, unique, 2) as (a, b):
        async with client_of(a, client_id="callee") as client:
            client.implement("add", lambda data: data[0] + data[1])
            await settled([a, b], lambda server: server.cluster.client("callee") is not None)
            assert await b.server.invoke("callee", "add", [2, 3]) == 5
            assert await a.server.invoke("callee", "add", [1, 1]) == 2
            with pytest.raises(meshline.ClientNotFoundError):
                await b.server.invoke("nobody", "add", [1, 1])


# --- Faults --------------------------------------------------------------------------------


async def test_a_dead_nodes_connections_leave_the_views_and_are_reported_orphaned(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    orphaned: list[tuple[int, int, list[ClusterConnection]]] = []

    def on_orphaned(node_id: int, connections: list[ClusterConnection]) -> None:
        orphaned.append((0, node_id, connections))

    async with cluster_of(open_transport, unique, 2, on_orphaned=on_orphaned) as (a, b):
        async with AsyncExitStack() as stack:
            client = await stack.enter_async_context(client_of(a, user="gone"))
            await settled([b], lambda server: server.cluster.is_online("gone"))
            a.faults.cut()
            with trio.fail_after(30):
                await wait_until(lambda: not b.server.cluster.is_online("gone"))
            assert b.server.cluster.count() == 0
            assert b.server.cluster.topology().get(a.id, None) in (None,) or (
                b.server.cluster.topology()[a.id].alive is False
            )
            with trio.fail_after(30):
                await wait_until(lambda: bool(orphaned))
            [(_, dead, connections)] = orphaned
            assert dead == a.id
            assert [conn.connection_id for conn in connections] == [client.connection_id]
            assert connections[0].user_id == "gone"
            a.scope.cancel()


# --- Names and options ------------------------------------------------------------------


async def test_hostile_names_route_and_index(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    names = [name for name in HOSTILE_CLIENT_IDS if name][:6]

    def on_connect(conn: meshline.Connection) -> None:
        for name in names:
            conn.join(name)

    async with cluster_of(open_transport, unique, 2, on_connect=on_connect) as (a, b):
        for name in names:
            async with client_of(a, user=name, client_id=name) as client:
                inbox = Inbox(client)
                await settled([b], lambda server, name=name: server.cluster.is_online(name))
                await wait_until(lambda name=name: a.server.cluster.listening("user", name))
                await wait_until(lambda name=name: a.server.cluster.listening("room", name))
                await b.server.to_user(name).emit("note", "u")
                await b.server.to_room(name).emit("note", "r")
                assert await inbox.wait_for(2) == ["u", "r"]
                [seen] = b.server.cluster.by_user(name)
                assert seen.client_id == name
                assert seen.rooms == frozenset(names)


async def test_bad_arguments_get_clear_errors(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    async with cluster_of(open_transport, unique, 1) as (a,):
        with pytest.raises(InvalidArgumentError):
            a.server.to_conn("not an id")
        with pytest.raises(InvalidArgumentError):
            a.server.to_room("")
        with pytest.raises(InvalidArgumentError):
            await a.server.to_user("u").emit("")
        with pytest.raises(InvalidArgumentError):
            await a.server.to_conn("1.x.1").close(code=1005)
        with pytest.raises(meshline.FrameEncodeError):
            await a.server.to_room("r").emit("note", object())
    async with open_transport() as transport:
        with pytest.raises(InvalidArgumentError, match="node id"):
            async with meshline.open_socket_server(
                roles=[ROLE], listen=False, mesh=MeshOptions(transport, "k"), node_id=3
            ):
                pass
    with pytest.raises(InvalidArgumentError):
        MeshOptions("not a transport", "k")  # type: ignore[arg-type]


async def test_without_a_mesh_a_server_is_a_cluster_of_one() -> None:
    hooks = Hooks()
    async with meshline.open_socket_server(
        roles=[ROLE], authenticate=by_query, listen=False, **hooks.options()
    ) as server:
        async with open_memory_client(server, client_id="solo", query={"user": "sam"}) as client:
            client.implement("ping", lambda data: "pong")
            inbox = Inbox(client)
            with trio.fail_after(30):
                await wait_until(lambda: server.cluster.is_online("sam"))
            await hooks.until("online", "sam")
            assert server.cluster.count() == 1
            assert node_of_connection(client.connection_id or "") == server.node_id
            await server.to_user("sam").emit("note", 1)
            await server.to_conn(client.connection_id or "").emit("note", 2)
            assert await inbox.wait_for(2) == [1, 2]
            assert await server.to_conn(client.connection_id or "").request("ping") == "pong"
            assert await server.invoke("solo", "ping") == "pong"
        await hooks.until("offline", "sam")


async def test_a_server_alone_keeps_the_node_id_it_was_given() -> None:
    async with meshline.open_socket_server(roles=[ROLE], listen=False, node_id=77) as server:
        assert server.node_id == 77
        async with open_memory_client(server, client_id="solo") as client:
            conn_id = client.connection_id or ""
            assert node_of_connection(conn_id) == 77
            client.implement("ping", lambda data: "pong")
            inbox = Inbox(client)
            await server.to_conn(conn_id).emit("note", "here")
            assert await inbox.wait_for(1) == ["here"]
            assert await server.to_conn(conn_id).request("ping") == "pong"
            with trio.fail_after(30):
                await wait_until(lambda: server.cluster.client("solo") is not None)
            with pytest.raises(meshline.ConnectionNotFoundError):
                await server.to_conn("78.x.1").request("ping")


# --- Requests across nodes --------------------------------------------------------------


async def test_requests_across_nodes(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    cancelled: list[str] = []

    async def slow(data: Any) -> Any:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.append(data)

    def refuse(data: Any) -> Any:
        raise meshline.SocketError("nope", "not today", {"why": data})

    async with cluster_of(open_transport, unique, 2) as (a, b):
        async with client_of(a) as client:
            client.implement("double", lambda data: data * 2)
            client.implement("slow", slow)
            client.implement("refuse", refuse)
            target = b.server.to_conn(client.connection_id or "")
            assert await target.request("double", 21) == 42

            with pytest.raises(meshline.SocketTimeoutError):
                await target.request("slow", "timed out", timeout=0.5)
            with trio.fail_after(30):
                await wait_until(lambda: "timed out" in cancelled)

            with trio.move_on_after(0.5):
                await target.request("slow", "caller gave up", timeout=60)
            with trio.fail_after(30):
                await wait_until(lambda: "caller gave up" in cancelled)

            with pytest.raises(meshline.CallFailedError) as failed:
                await target.request("refuse", 7)
            assert failed.value.code == "nope"
            assert failed.value.message == "not today"
            assert failed.value.details == {"why": 7}
            assert failed.value.application

            gone = client.connection_id or ""
        # The connection is closed: its node says so at once (well within the timeout).
        with trio.fail_after(30):
            with pytest.raises(meshline.ConnectionNotFoundError):
                await b.server.to_conn(gone).request("double", 1, timeout=3600)
            with pytest.raises(meshline.ConnectionNotFoundError):
                await b.server.to_conn("999.x.1").request("double", 1, timeout=3600)


async def test_a_request_fails_at_once_when_the_connection_drops_mid_request(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    async with cluster_of(open_transport, unique, 2) as (a, b):
        async with client_of(a) as client:
            started = trio.Event()

            async def hang(data: Any) -> Any:
                started.set()
                await trio.sleep_forever()

            client.implement("hang", hang)
            conn_id = client.connection_id or ""
            async with trio.open_nursery() as nursery:

                async def close_when_started() -> None:
                    await started.wait()
                    conn = a.server.connection(conn_id)
                    assert conn is not None
                    conn.close_nowait(meshline.CloseCode.RECONNECT)

                nursery.start_soon(close_when_started)
                with trio.fail_after(30), pytest.raises(meshline.SocketClosedError):
                    await b.server.to_conn(conn_id).request("hang", None, timeout=3600)


# --- Hooks ------------------------------------------------------------------------------


class Hooks:
    """Every hook call of every node, in one list: (kind, subject)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def options(self, **extra: Any) -> dict[str, Any]:
        calls = self.calls

        def online(user_id: str) -> None:
            calls.append(("online", user_id))

        async def offline(user_id: str) -> None:
            await trio.lowlevel.checkpoint()
            calls.append(("offline", user_id))

        def connected(conn: meshline.Connection) -> None:
            calls.append(("connected", conn.id))

        def disconnected(conn: meshline.Connection, reason: DisconnectReason) -> None:
            calls.append(("disconnected", conn.id))

        return {
            "on_user_online": online,
            "on_user_offline": offline,
            "on_client_connected": connected,
            "on_client_disconnected": disconnected,
            **extra,
        }

    def of(self, kind: str) -> list[str]:
        return [subject for called, subject in self.calls if called == kind]

    async def until(self, kind: str, subject: str) -> None:
        with trio.fail_after(30):
            await wait_until(lambda: subject in self.of(kind))


async def test_user_hooks_fire_once_for_the_cluster(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    hooks = Hooks()
    async with cluster_of(open_transport, unique, 2, **hooks.options()) as (a, b):
        async with client_of(a, user="ada") as phone:
            await hooks.until("online", "ada")
            async with client_of(b, user="ada") as laptop:
                await settled([a, b], lambda server: len(server.cluster.by_user("ada")) == 2)
                await hooks.until("connected", laptop.connection_id or "")
            await hooks.until("disconnected", laptop.connection_id or "")
            await settled([a, b], lambda server: len(server.cluster.by_user("ada")) == 1)
            assert hooks.of("offline") == []  # one device left: still online
            phone_id = phone.connection_id or ""
        await hooks.until("offline", "ada")
        await hooks.until("disconnected", phone_id)
        # Later transitions would have shown up by the time the users are settled.
        async with client_of(b, user="bob"):
            await hooks.until("online", "bob")
        await hooks.until("offline", "bob")
        assert hooks.of("online") == ["ada", "bob"]
        assert hooks.of("offline") == ["ada", "bob"]


async def test_a_user_back_within_the_grace_period_is_never_offline(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    hooks = Hooks()
    options = hooks.options(offline_grace=30.0)
    async with cluster_of(open_transport, unique, 2, **options) as (a, b):
        async with client_of(a, user="ada", client_id="ada-1"):
            await hooks.until("online", "ada")
        await settled([a, b], lambda server: server.cluster.in_grace("ada"))
        assert b.server.cluster.is_online("ada") is False  # no connection: not listed
        # Back, from another device, on the other node, within the grace period.
        async with client_of(b, user="ada", client_id="ada-2"):
            await settled([a, b], lambda server: not server.cluster.in_grace("ada"))
        await settled([a, b], lambda server: server.cluster.in_grace("ada"))
        assert hooks.of("offline") == []
        assert hooks.of("online") == ["ada"]


async def test_a_client_back_within_the_grace_period_did_not_leave(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    hooks = Hooks()
    async with cluster_of(open_transport, unique, 2, **hooks.options(offline_grace=1.0)) as (
        a,
        b,
    ):
        async with client_of(a, client_id="phone") as first:
            first_id = first.connection_id or ""
        async with client_of(b, client_id="phone") as again:
            # The first connection's grace period ends while the client is back.
            with trio.fail_after(30):
                await wait_until(lambda: a.server.cluster.returns == 1)
            again_id = again.connection_id or ""
        await hooks.until("disconnected", again_id)
        assert first_id not in hooks.of("disconnected")
        assert hooks.of("disconnected") == [again_id]


async def test_a_superseded_connection_is_no_departure(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    hooks = Hooks()
    async with cluster_of(open_transport, unique, 2, **hooks.options()) as (a, b):
        async with client_of(a, client_id="roamer") as old:
            old_id = old.connection_id or ""
            await hooks.until("connected", old_id)
            async with client_of(b, client_id="roamer") as new:
                await hooks.until("connected", new.connection_id or "")
                with trio.fail_after(30):
                    await wait_until(lambda: (old_id, DisconnectReason.SUPERSEDED) in a.ended)
                new_id = new.connection_id or ""
            await hooks.until("disconnected", new_id)
        assert hooks.of("disconnected") == [new_id]


async def test_the_users_of_a_dead_node_go_offline(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    hooks = Hooks()
    async with cluster_of(open_transport, unique, 2, **hooks.options()) as (a, b):
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(client_of(a, user="lost"))
            await stack.enter_async_context(client_of(b, user="kept"))
            await hooks.until("online", "lost")
            await hooks.until("online", "kept")
            a.faults.cut()
            await hooks.until("offline", "lost")
            assert "kept" not in hooks.of("offline")
            a.scope.cancel()


async def test_metadata_updates_and_broadcasts(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    async with cluster_of(open_transport, unique, 2) as (a, b):
        heard: list[tuple[Any, int]] = []
        b.server.register_broadcast_handler(
            "news", lambda data, sender: heard.append((data, sender))
        )
        await a.server.broadcast("news", {"n": 1})
        with trio.fail_after(30):
            await wait_until(lambda: heard == [({"n": 1}, a.id)])
        async with client_of(a, client_id="c") as client:
            assert a.server.update_client_metadata("c", {"status": "away"})
            await settled(
                [b],
                lambda server: (
                    (found := server.cluster.client("c")) is not None
                    and found.fields == {"status": "away"}
                ),
            )
            assert not b.server.update_client_metadata("c", {"x": 1})  # not held by b
            with pytest.raises(meshline.PayloadError):
                a.server.update_client_metadata("c", {"bad": object()})
            with pytest.raises(InvalidArgumentError):
                a.server.update_client_metadata("c", ["not", "a", "mapping"])  # type: ignore[arg-type]
            # Nothing bad was kept: the next write of the registration keeps the fields.
            conn = a.server.connection(client.connection_id or "")
            assert conn is not None
            conn.join("later")
            await settled([b], lambda server: bool(server.cluster.room("later")))
            assert (found := b.server.cluster.client("c")) is not None
            assert found.fields == {"status": "away"}


# --- Clients with several URLs, over real WebSockets ------------------------------------


async def test_a_client_with_several_urls_moves_to_a_survivor_when_its_node_dies(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    key = unique("urls")
    async with trio.open_nursery() as nursery:

        async def node(
            task_status: trio.TaskStatus[tuple[SocketServer, trio.CancelScope, FaultyTransport]],
        ) -> None:
            with trio.CancelScope() as scope:
                async with open_transport() as inner:
                    faults = FaultyTransport(inner)
                    async with meshline.open_socket_server(
                        roles=[ROLE],
                        authenticate=by_query,
                        mesh=MeshOptions(faults, key, node={"ttl": 2}),
                        shutdown=meshline.ShutdownOptions(code=meshline.CloseCode.GOING_AWAY),
                    ) as server:
                        task_status.started((server, scope, faults))
                        await trio.sleep_forever()

        a, a_scope, a_faults = await nursery.start(node)
        b, _, _ = await nursery.start(node)
        urls = [a.url, b.url]
        reconnect = meshline.ReconnectOptions(base=0.05, cap=0.2)
        async with meshline.open_socket_client(
            urls, client_id="wanderer", query={"user": "wen"}, reconnect=reconnect
        ) as client:
            with trio.fail_after(30):
                await wait_until(
                    lambda: (
                        (found := b.cluster.client("wanderer")) is not None
                        and found.node_id == a.node_id
                    )
                )
            # Node A dies: its mesh connection is cut (it cannot unregister anyone),
            # then its sockets close (1001, in the reconnect band).
            a_faults.cut()
            a_scope.cancel()
            with trio.fail_after(30):
                await wait_until(
                    lambda: (
                        (found := b.cluster.client("wanderer")) is not None
                        and found.node_id == b.node_id
                        and client.state is meshline.ClientState.CONNECTED
                    )
                )
            inbox = Inbox(client)
            await b.to_user("wen").emit("note", "found you")
            assert await inbox.wait_for(1) == ["found you"]
        nursery.cancel_scope.cancel()
