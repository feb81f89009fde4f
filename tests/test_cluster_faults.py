"""Cluster sockets when writes are slow, lost or seen late, and when hooks misbehave.

Each test reproduces a scenario an independent review found, with a registry backend
that widens the race (a :class:`~meshline.MemoryRegistryBackend` subclass shared by
the nodes): a registration that lands late, a reply that is lost, a replica that
lags the store. Each runs on the memory transport and on NATS.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio

import meshline
from meshline import ClientRecord, MemoryRegistryBackend, MeshOptions

from .node_helpers import OpenTransport, wait_until
from .test_cluster_sockets import ROLE, Hooks, by_query, client_of, cluster_of, settled


@asynccontextmanager
async def server_on(
    transport: meshline.Transport, key: str, backend: Any, **options: Any
) -> AsyncIterator[meshline.SocketServer]:
    async with meshline.open_socket_server(
        roles=[ROLE],
        authenticate=by_query,
        listen=False,
        mesh=MeshOptions(transport, key, backend=backend, node={"ttl": 2}, reassert_interval=0.5),
        **options,
    ) as server:
        yield server


async def until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(60):
        await wait_until(predicate)


class SlowRegistrations(MemoryRegistryBackend):
    """Registrations from ``slow_node`` land after ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.slow_node: int | None = None
        self.gate = trio.Event()
        self.landed_late = False

    async def register(self, client_id: str, node_id: int, metadata: bytes, **kw: Any) -> Any:
        if node_id == self.slow_node:
            await self.gate.wait()
            result = await super().register(client_id, node_id, metadata, **kw)
            self.landed_late = True
            return result
        return await super().register(client_id, node_id, metadata, **kw)


async def test_a_late_registration_of_an_older_connection_never_kicks_the_newer_one(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    backend = SlowRegistrations()
    key = unique("late")
    async with open_transport() as ta, open_transport() as tb:
        async with server_on(ta, key, backend) as a, server_on(tb, key, backend) as b:
            await until(lambda: {a.node_id, b.node_id} <= b.cluster.nodes())
            backend.slow_node = a.node_id
            # The client connects to A (its registration is held up), drops...
            async with open_memory_client_of(a, "c"):
                pass
            # ...and comes back on B, whose registration lands first.
            async with open_memory_client_of(b, "c") as again:
                await until(
                    lambda: (
                        (found := b.cluster.client("c")) is not None and found.node_id == b.node_id
                    )
                )
                backend.gate.set()  # A's old registration lands now, over B's
                await until(lambda: backend.landed_late)
                # B's connection is the client's newest: it stays, and is registered.
                await until(
                    lambda: (
                        (record := backend.lookup("c")) is not None
                        and record.node_id == b.node_id
                        and (found := b.cluster.client("c")) is not None
                        and found.connection_id == again.connection_id
                    )
                )
                assert again.state is meshline.ClientState.CONNECTED


@asynccontextmanager
async def open_memory_client_of(
    server: meshline.SocketServer, client_id: str, **options: Any
) -> AsyncIterator[meshline.SocketClient]:
    async with meshline.testing.open_memory_client(
        server, client_id=client_id, reconnect=None, **options
    ) as client:
        yield client


class LostReply(MemoryRegistryBackend):
    """The next register lands, but its caller hears a transport error."""

    def __init__(self) -> None:
        super().__init__()
        self.lose_next = False

    async def register(self, client_id: str, node_id: int, metadata: bytes, **kw: Any) -> Any:
        result = await super().register(client_id, node_id, metadata, **kw)
        if self.lose_next:
            self.lose_next = False
            raise meshline.TransportError("the reply was lost")
        return result


async def test_a_registration_whose_reply_was_lost_leaves_with_its_connection(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    backend = LostReply()
    async with open_transport() as transport, server_on(transport, unique("lost"), backend) as a:
        backend.lose_next = True
        async with open_memory_client_of(a, "c", query={"user": "ghost"}):
            await until(lambda: backend.lookup("c") is not None)
        # Closed before the write was retried: the registration goes all the same.
        await until(lambda: backend.lookup("c") is None)
        await until(lambda: not a.cluster.is_online("ghost"))


class LaggingReplica(MemoryRegistryBackend):
    """The store loses a record (the leader's fenced cleanup after a false death)
    before this node's view hears of it, as a lagging KV replica would."""

    def __init__(self) -> None:
        super().__init__()
        self.unseen: dict[str, ClientRecord] = {}

    def remove_unseen(self, client_id: str) -> None:
        self.unseen[client_id] = self._records.pop(client_id)

    def catch_up(self) -> None:
        for client_id in list(self.unseen):
            del self.unseen[client_id]
            self._listeners.notify(client_id, None)

    def lookup(self, client_id: str) -> ClientRecord | None:
        return self.unseen.get(client_id) or super().lookup(client_id)


async def test_a_failed_update_seen_through_a_lagging_replica_writes_the_registration_again(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    backend = LaggingReplica()
    async with open_transport() as transport, server_on(transport, unique("lag"), backend) as a:
        async with open_memory_client_of(a, "c") as client:
            await until(lambda: a.cluster.client("c") is not None)
            backend.remove_unseen("c")
            conn = a.connection(client.connection_id or "")
            assert conn is not None
            conn.join("room")  # an update: it fails, the record being gone
            await until(lambda: super(LaggingReplica, backend).lookup("c") is not None)
            backend.catch_up()
            await until(
                lambda: (found := a.cluster.client("c")) is not None and "room" in found.rooms
            )


@pytest.mark.parametrize("transport_kind", ["memory"])  # on MockClock: 5 s take none
async def test_a_hanging_describe_hook_holds_up_no_other_registration(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    async def describe(conn: meshline.Connection) -> dict[str, Any]:
        if conn.user_id == "slow":
            await trio.sleep_forever()
        return {"fast": True}

    async with cluster_of(open_transport, unique, 1, describe=describe) as (a,):
        async with AsyncExitStack() as stack:
            for n in range(20):  # more than the presence workers
                await stack.enter_async_context(client_of(a, user="slow", client_id=f"s{n}"))
            async with client_of(a, user="ada", client_id="ada"):
                await settled([a], lambda server: server.cluster.client("ada") is not None)
                # The slow ones are registered too, without fields, once describe gave up.
                await settled([a], lambda server: len(server.cluster.by_user("slow")) == 20)
                assert all(conn.fields == {} for conn in a.server.cluster.by_user("slow"))


async def test_fields_set_while_describe_runs_are_kept(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    release = trio.Event()

    async def describe(conn: meshline.Connection) -> dict[str, Any]:
        await release.wait()
        return {"device": "phone"}

    async with cluster_of(open_transport, unique, 1, describe=describe) as (a,):
        async with client_of(a, client_id="c"):
            assert a.server.update_client_metadata("c", {"status": "away"})
            release.set()
            await settled(
                [a],
                lambda server: (
                    (found := server.cluster.client("c")) is not None
                    and found.fields == {"status": "away"}
                ),
            )


async def test_a_hanging_client_hook_holds_up_no_user_hook(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    online: list[str] = []

    async def connected(conn: meshline.Connection) -> None:
        await trio.sleep_forever()

    async with cluster_of(
        open_transport, unique, 1, on_client_connected=connected, on_user_online=online.append
    ) as (a,):
        async with client_of(a, user="ada", client_id="ada"):
            await until(lambda: "ada" in online)


async def test_a_client_moving_between_nodes_never_flaps_its_user(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    hooks = Hooks()
    async with cluster_of(open_transport, unique, 2, **hooks.options()) as (a, b):
        async with client_of(a, user="ada", client_id="roamer") as old:
            await hooks.until("online", "ada")
            async with client_of(b, user="ada", client_id="roamer") as new:
                await until(lambda: old.state is meshline.ClientState.FAILED)
                await settled(
                    [a, b],
                    lambda server: (
                        [c.connection_id for c in server.cluster.by_user("ada")]
                        == [new.connection_id]
                    ),
                )
                # A later user's report comes after anything the move caused.
                async with client_of(a, user="bob"):
                    await hooks.until("online", "bob")
                    assert hooks.of("offline") == []
                assert hooks.of("online") == ["ada", "bob"]


async def test_a_client_reconnecting_on_the_same_node_never_flaps_its_user(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    hooks = Hooks()
    async with cluster_of(open_transport, unique, 1, **hooks.options()) as (a,):
        async with client_of(a, user="ada", client_id="twin") as first:
            await hooks.until("online", "ada")
            async with client_of(a, user="ada", client_id="twin") as second:
                await until(lambda: first.state is meshline.ClientState.FAILED)
                await settled(
                    [a],
                    lambda server: (
                        (found := server.cluster.client("twin")) is not None
                        and found.connection_id == second.connection_id
                    ),
                )
                async with client_of(a, user="bob"):
                    await hooks.until("online", "bob")
                    assert hooks.of("offline") == []


# --- From a second review ------------------------------------------------------------------


async def test_requests_across_nodes_without_a_timeout(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    async with cluster_of(open_transport, unique, 2, call_timeout=None) as (a, b):
        async with client_of(a) as client:
            client.implement("double", lambda data: data * 2)
            target = b.server.to_conn(client.connection_id or "")
            assert await target.request("double", 21, timeout=math.inf) == 42
            assert await target.request("double", 4) == 8  # call_timeout None: none


async def test_a_second_connection_being_described_never_flaps_its_user(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    hooks = Hooks()

    async def describe(conn: meshline.Connection) -> dict[str, Any]:
        await trio.sleep(0.5)
        return {"x": 1}

    async with cluster_of(open_transport, unique, 1, describe=describe, **hooks.options()) as (a,):
        async with client_of(a, user="ada", client_id="twin") as first:
            await hooks.until("online", "ada")
            async with client_of(a, user="ada", client_id="twin") as second:
                await until(lambda: first.state is meshline.ClientState.FAILED)
                await settled(
                    [a],
                    lambda server: (
                        (found := server.cluster.client("twin")) is not None
                        and found.connection_id == second.connection_id
                    ),
                )
                async with client_of(a, user="bob"):
                    await hooks.until("online", "bob")
                    assert hooks.of("offline") == []


async def test_a_client_back_and_gone_again_within_the_grace_period_left_once(
    open_transport: OpenTransport, unique: Callable[[str], str], clock: Any
) -> None:
    hooks = Hooks()
    async with cluster_of(open_transport, unique, 2, **hooks.options(offline_grace=1.0)) as (
        a,
        b,
    ):
        async with client_of(a, client_id="flaky") as first:
            await hooks.until("connected", first.connection_id or "")
        async with client_of(b, client_id="flaky") as second:
            await hooks.until("connected", second.connection_id or "")
            second_id = second.connection_id or ""
        await hooks.until("disconnected", second_id)
        # A later departure's report comes after anything the first one would cause.
        async with client_of(a, client_id="other") as other:
            other_id = other.connection_id or ""
            await hooks.until("connected", other_id)
        await hooks.until("disconnected", other_id)
        assert hooks.of("disconnected") == [second_id, other_id]
