"""Replicated buckets and failover on a 3-server NATS cluster (issue 10, item 4).

The bucket options (``replicas``, ``storage``) are validated alike on both
transports; on NATS, a bucket gets 3 replicas by default on a cluster of 3 and 1 on
a single server, and an existing bucket is raised, never lowered.

The failover test runs 3 client-service nodes, each connected to a different server
of the cluster (with all three URLs), with 1,000 clients each, kills the server
leading the registry's stream, and expects nothing lost: every view whole, every
node on a surviving server, invokes and node requests answered, and the killed
server caught up once restarted.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio

import meshline
from meshline._registry._kv import registry_bucket
from meshline._service._service import SERVICE_NAMESPACE
from meshline.testing import NatsServer

from .conftest import OpenTransport

# ---------------------------------------------------------------- bucket options


@pytest.mark.parametrize(
    ("options", "wrong"),
    [
        ({"replicas": 0}, "replicas"),
        ({"replicas": 6}, "replicas"),
        ({"replicas": True}, "replicas"),
        ({"replicas": 2.0}, "replicas"),
        ({"storage": "disk"}, "storage"),
        ({"storage": ""}, "storage"),
    ],
)
async def test_bad_bucket_options_are_refused_on_both_transports(
    open_transport: OpenTransport, unique: Callable[[str], str], options: Any, wrong: str
) -> None:
    async with open_transport() as transport:
        with pytest.raises(meshline.InvalidArgumentError, match=wrong):
            await transport.key_value(unique("opts"), **options)


async def test_good_bucket_options_open_a_working_bucket(
    open_transport: OpenTransport, unique: Callable[[str], str]
) -> None:
    async with open_transport() as transport:
        kv = await transport.key_value(unique("opts"), replicas=1, storage="memory")
        revision = await kv.put("k", b"v")
        entry = await kv.get("k")
        assert entry is not None and (entry.value, entry.revision) == (b"v", revision)


async def test_bad_transport_defaults_are_refused_before_connecting() -> None:
    # No server listens at this address: the arguments are checked first.
    for options in ({"kv_replicas": 0}, {"kv_storage": "tape"}):
        with pytest.raises(meshline.InvalidArgumentError):
            async with meshline.open_nats_transport("nats://127.0.0.1:1", **options):
                pass
    with pytest.raises(meshline.InvalidArgumentError):
        async with meshline.open_nats_transport([]):
            pass


def stream_config(servers: Sequence[NatsServer], bucket: str) -> dict[str, Any]:
    """The configuration of ``bucket``'s stream, from whichever server holds it."""
    for server in servers:
        if server.running:
            details = server.stream_details().get(f"KV_{bucket}")
            if details is not None:
                config: dict[str, Any] = details["config"]
                return config
    raise AssertionError(f"no server holds KV_{bucket}")


async def test_a_single_server_gets_one_replica_and_refuses_three(
    private_nats_server: NatsServer,
) -> None:
    async with meshline.open_nats_transport(private_nats_server.url) as transport:
        await transport.key_value("automatic")
        assert stream_config([private_nats_server], "automatic")["num_replicas"] == 1
        with pytest.raises(meshline.TransportError, match="3 replicas"):
            await transport.key_value("three", replicas=3)


def stream_leader(servers: Sequence[NatsServer], stream: str) -> NatsServer:
    """The server leading ``stream``, as the running servers that hold it report."""
    for server in servers:
        if server.running:
            details = server.stream_details().get(stream)
            if details is not None:
                name = details.get("cluster", {}).get("leader")
                for leader in servers:
                    if leader.name == name:
                        return leader
    raise AssertionError(f"no leader known for {stream}")


async def open_bucket(transport: meshline.Transport, bucket: str, **options: Any) -> None:
    """Open a bucket, retrying while clustered JetStream settles after the start."""
    with trio.fail_after(30):
        while True:
            try:
                await transport.key_value(bucket, **options)
                return
            except meshline.TransportError:
                await trio.sleep(0.2)


async def test_a_cluster_of_three_gets_three_replicas_raised_never_lowered(
    nats_servers3: list[NatsServer], caplog: pytest.LogCaptureFixture
) -> None:
    urls = [server.url for server in nats_servers3]
    async with meshline.open_nats_transport(urls) as transport:
        await open_bucket(transport, "automatic")
        assert stream_config(nats_servers3, "automatic")["num_replicas"] == 3
        await open_bucket(transport, "single", replicas=1, storage="memory")
        assert stream_config(nats_servers3, "single")["num_replicas"] == 1

        # Asking for fewer keeps the replicas; asking for more raises them in place.
        await transport.key_value("automatic", replicas=1)
        assert stream_config(nats_servers3, "automatic")["num_replicas"] == 3
        kv = await transport.key_value("single", replicas=1, storage="memory")
        await kv.put("k", b"kept")
        with caplog.at_level(logging.WARNING, logger="meshline.transport"):
            kv = await transport.key_value("single", replicas=3)
        config = stream_config(nats_servers3, "single")
        assert (config["num_replicas"], config["storage"]) == (3, "memory")
        assert any("memory storage" in record.getMessage() for record in caplog.records)
        entry = await kv.get("k")
        assert entry is not None and entry.value == b"kept"

    # A transport's defaults apply to the buckets it creates.
    async with meshline.open_nats_transport(urls, kv_replicas=1, kv_storage="memory") as other:
        await other.key_value("defaults")
        config = stream_config(nats_servers3, "defaults")
        assert (config["num_replicas"], config["storage"]) == (1, "memory")


# ---------------------------------------------------------------- failover

NODES = 3
CLIENTS_PER_NODE = 1_000
KEY = "failover"
PING = "failover.ping"
DEADLINE = 90.0
"""Seconds any one phase may take before the test fails."""


@attrs.define
class ServiceNode:
    """One client-service node, homed on one server of the cluster."""

    service: meshline.ClientService[Any]
    transport: meshline.Transport
    home: NatsServer
    events: list[tuple[float, meshline.ConnectionEvent]]
    orphaned: list[tuple[int, int]]
    """``(dead node, clients)`` for each orphan report this node made as leader."""
    restored: list[int]
    """How many clients each restored report named."""

    @property
    def id(self) -> int:
        return self.service.instance_id

    def reconnected_to(self, since: float) -> list[str]:
        """The URLs this node reconnected to since ``since`` (monotonic time)."""
        return [
            event.detail
            for at, event in self.events
            if at >= since and event.kind is meshline.ConnectionEventKind.RECONNECTED
        ]


async def client_invoke(client_id: str, kind: str, data: Any, timeout: float) -> Any:
    await trio.lowlevel.checkpoint()
    return [client_id, data]


@asynccontextmanager
async def open_service_node(
    home: NatsServer, servers: Sequence[NatsServer], replicas: int | None
) -> AsyncIterator[ServiceNode]:
    """A service node connected first to ``home``, failing over to the others."""
    urls = [home.url] + [server.url for server in servers if server is not home]
    events: list[tuple[float, meshline.ConnectionEvent]] = []
    orphaned: list[tuple[int, int]] = []
    restored: list[int] = []

    def on_orphaned(node_id: int, clients: list[meshline.RegisteredClient[Any]]) -> None:
        orphaned.append((node_id, len(clients)))

    def on_restored(node_id: int, clients: list[meshline.RegisteredClient[Any]]) -> None:
        restored.append(len(clients))

    async with meshline.open_nats_transport(
        urls, dont_randomize=True, kv_replicas=replicas, name=f"node-{home.name}"
    ) as transport:
        transport.add_connection_listener(lambda event: events.append((time.monotonic(), event)))
        # Clustered JetStream may still be settling its meta leader right after start.
        await open_bucket(transport, registry_bucket(KEY, SERVICE_NAMESPACE))
        async with meshline.open_client_service(
            transport,
            KEY,
            client_invoke=client_invoke,
            on_orphaned=on_orphaned,
            on_restored=on_restored,
        ) as service:

            async def ping(data: Any, sender: int) -> Any:
                await trio.lowlevel.checkpoint()
                return [service.instance_id, data]

            service.node.register_handler(PING, ping)
            yield ServiceNode(service, transport, home, events, orphaned, restored)


async def client_ids(node: ServiceNode) -> set[str]:
    return {client.client_id for client in await node.service.client_registry.list_clients()}


async def register_all(node: ServiceNode, ids: Sequence[str]) -> None:
    async with trio.open_nursery() as nursery:
        for start in range(0, len(ids), 100):

            async def register(batch: Sequence[str]) -> None:
                for client_id in batch:
                    await node.service.register_client(client_id, {})

            nursery.start_soon(register, ids[start : start + 100])


def registry_keys(client_ids: set[str]) -> set[str]:
    """The registry's KV keys for ``client_ids``."""
    return {"c." + meshline.encode_token(client_id) for client_id in client_ids}


async def fresh_keys(url: str, bucket: str) -> set[str]:
    """The registry's keys as a fresh reader connected to ``url`` sees them."""
    async with meshline.open_nats_transport(url, dont_randomize=True) as transport:
        kv = await transport.key_value(bucket)
        return set(await kv.keys())


async def count_present(url: str, bucket: str, keys: Sequence[str]) -> int:
    """How many of ``keys`` a fresh reader connected to ``url`` finds with ``get``."""
    async with meshline.open_nats_transport(url, dont_randomize=True) as transport:
        kv = await transport.key_value(bucket)
        return sum([await kv.get(key) is not None for key in keys])


async def resumed(nodes: Sequence[ServiceNode], clients: dict[int, str]) -> bool:
    """Whether every node reaches every other node: a node request, and an invoke
    of one of its clients."""
    try:
        for node in nodes:
            for other in nodes:
                if other is node:
                    continue
                answer = await node.service.node.request(other.id, PING, "hi", timeout=2)
                assert answer == [other.id, "hi"]
                client_id = clients[other.id]
                result = await node.service.invoke(client_id, "echo", 7, timeout=2)
                assert result == [client_id, 7]
    except (meshline.MeshlineError, AssertionError) as exc:
        logging.getLogger(__name__).info("not resumed yet: %r", exc)
        return False
    return True


async def wait_for(check: Callable[[], Any], what: str) -> float:
    """Poll the async ``check`` until it returns True; the seconds it took."""
    started = time.monotonic()
    with trio.move_on_after(DEADLINE) as scope:
        while not await check():
            await trio.sleep(0.1)
    if scope.cancelled_caught:
        raise AssertionError(f"not within {DEADLINE} s: {what}")
    return time.monotonic() - started


async def run_failover(servers: list[NatsServer], replicas: int | None) -> dict[str, float]:
    """The failover scenario; returns the figures measured (seconds)."""
    bucket = registry_bucket(KEY, SERVICE_NAMESPACE)
    stream = f"KV_{bucket}"
    figures: dict[str, float] = {}
    async with (
        open_service_node(servers[0], servers, replicas) as first,
        open_service_node(servers[1], servers, replicas) as second,
        open_service_node(servers[2], servers, replicas) as third,
        trio.open_nursery() as sampler,
    ):
        nodes = [first, second, third]
        ids = {
            node.id: [f"client-{index}-{n}" for n in range(CLIENTS_PER_NODE)]
            for index, node in enumerate(nodes)
        }
        everyone = {client_id for batch in ids.values() for client_id in batch}
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(register_all, node, ids[node.id])
        figures["register_s"] = time.monotonic() - started

        async def views_whole() -> bool:
            for node in nodes:
                if not node.transport.connected or node.service.node.alive_nodes() != set(ids):
                    return False
                if await client_ids(node) != everyone:
                    return False
            return True

        await wait_for(views_whole, "every view holds every client before the kill")
        if replicas is None:
            assert stream_config(servers, bucket)["num_replicas"] == 3

        # Kill the server that leads the registry's stream.
        leader = stream_leader(servers, stream)
        fewest_alive = [NODES]

        async def watch_views() -> None:
            while True:
                fewest_alive[0] = min(
                    fewest_alive[0], *(len(node.service.node.alive_nodes()) for node in nodes)
                )
                await trio.sleep(0.05)

        sampler.start_soon(watch_views)
        survivors = [server for server in servers if server is not leader]
        killed_at = time.monotonic()
        leader.kill()

        def on_survivors() -> bool:
            survivor_urls = {server.url for server in survivors}
            for node in nodes:
                moved = node.reconnected_to(killed_at)
                if node.home is leader and not moved:
                    return False
                if not set(moved) <= survivor_urls:
                    raise AssertionError(f"node {node.id} reconnected to {moved}")
            return True

        async def reconnected() -> bool:
            await trio.lowlevel.checkpoint()
            return on_survivors()

        figures["reconnect_s"] = await wait_for(reconnected, "the cut node reconnects")
        figures["views_whole_s"] = figures["reconnect_s"] + await wait_for(
            views_whole, "every view holds every client after the kill"
        )

        async def invokes_resume() -> bool:
            return await resumed(nodes, {node.id: ids[node.id][0] for node in nodes})

        await wait_for(invokes_resume, "invokes and node requests resume")
        figures["resumed_s"] = time.monotonic() - killed_at

        # Nothing was lost at the server either: a fresh reader on a survivor sees
        # every registration, and new ones land.
        async def fresh_whole() -> bool:
            try:
                with trio.fail_after(15):
                    keys = await fresh_keys(survivors[0].url, bucket)
            except (meshline.TransportError, trio.TooSlowError) as exc:
                logging.getLogger(__name__).info("fresh read failed: %r", exc)
                return False
            return keys == registry_keys(everyone)

        await wait_for(fresh_whole, "a fresh reader on a survivor sees every client")
        figures["fresh_read_s"] = time.monotonic() - killed_at
        late = {node.id: f"late-{node.id}" for node in nodes}
        with trio.fail_after(DEADLINE):
            for node in nodes:
                while True:
                    try:
                        await node.service.register_client(late[node.id], {})
                        break
                    except meshline.TransportError:
                        await trio.sleep(0.2)
        everyone = everyone | set(late.values())
        await wait_for(views_whole, "every view holds the late registrations")
        figures["late_whole_s"] = time.monotonic() - killed_at

        # The killed server comes back on its port and store, and catches up.
        restarted_at = time.monotonic()
        leader.start()

        async def caught_up() -> bool:
            await trio.lowlevel.checkpoint()
            mine = leader.stream_details().get(stream)
            if mine is None:
                return False
            current = mine.get("cluster", {}).get("leader")
            holder = [server for server in servers if server.name == current]
            if not holder:
                return False
            theirs = holder[0].stream_details()[stream]["state"]
            state = mine["state"]
            return bool(
                state["last_seq"] == theirs["last_seq"] and state["messages"] == theirs["messages"]
            )

        await wait_for(caught_up, "the restarted server's copy of the registry catches up")
        figures["catch_up_s"] = time.monotonic() - restarted_at
        # Equal stream states in /jsz do not mean the restarted server lists every
        # key yet (CI saw 41 of 3,003 missing from one listing, each there when read
        # one by one): wait for its listing to be whole, and say what is missing if
        # it never is.
        expected = registry_keys(everyone)
        seen: set[str] = set()

        async def listing_whole() -> bool:
            nonlocal seen
            seen = await fresh_keys(leader.url, bucket)
            return seen == expected

        with contextlib.suppress(AssertionError):
            await wait_for(listing_whole, "the restarted server lists every registration")
        figures["listing_whole_s"] = time.monotonic() - restarted_at
        if seen != expected:
            missing = sorted(expected - seen)
            found = await count_present(leader.url, bucket, missing)
            raise AssertionError(
                f"through the restarted server: {len(missing)} registrations missing from "
                f"the keys (e.g. {missing[:3]}), {len(seen - expected)} unexpected; "
                f"{found} of the missing are there when read one by one; the stream's "
                f"leader is {stream_leader(servers, stream).name}, restarted {leader.name}"
            )
        await wait_for(views_whole, "every view still whole after the restart")
        # No live node was declared dead, so no registration was ever removed.
        assert [node.orphaned for node in nodes] == [[], [], []]
        figures["restored_clients"] = sum(sum(node.restored) for node in nodes)
        figures["fewest_alive_seen"] = min(fewest_alive)
        sampler.cancel_scope.cancel()
    return figures


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_killing_the_registry_leader_loses_nothing(
    nats_servers3: list[NatsServer],
) -> None:
    figures = await run_failover(nats_servers3, replicas=None)
    print("failover figures:", " ".join(f"{k}={v:.2f}" for k, v in figures.items()))
