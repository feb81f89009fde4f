"""``meshline demo``: transports and mesh nodes at work against an embedded NATS server,
then the socket layer on its own (a server, clients, a slow reader, a silent client),
then two socket servers as one cluster (users on both, a kick, a request across nodes,
a node crash with its clients moving to the survivor)."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import trio
import trio.lowlevel
import trio_websocket

from ._cluster._link import MeshOptions
from ._errors import (
    ClientNotFoundError,
    KeyExistsError,
    NodeNotAliveError,
    NoRespondersError,
    RevisionMismatchError,
    TransportError,
)
from ._mesh._node import Node, open_node
from ._registry._core import RegisteredClient
from ._service._service import ClientService, open_client_service
from ._sockets._backoff import ReconnectOptions
from ._sockets._client import ClientState, open_socket_client
from ._sockets._connection import Connection, DisconnectReason
from ._sockets._frames import JSON_SUBPROTOCOL
from ._sockets._roles import Role
from ._sockets._server import (
    Admission,
    BackpressureOptions,
    HeartbeatOptions,
    SocketRequest,
    SocketServer,
    open_socket_server,
)
from ._transport._names import encode_token
from ._transport._nats import open_nats_transport
from ._transport._seam import KVOperation, Transport
from .testing._faults import FaultyTransport
from .testing._server import NatsServer
from .testing._sockets import open_test_client, open_test_socket_server


def say(text: str) -> None:
    print(text, flush=True)


async def show_publish(alpha: Transport, beta: Transport, gamma: Transport) -> None:
    say("\n== publish / subscribe ==")
    user = "ana.maria > *ops*"  # a hostile id: dots, wildcards, spaces
    subject = f"demo.user.{encode_token(user, 'user id')}"
    say(f"user id {user!r} travels as subject {subject!r}")
    async with beta.subscribe("demo.user.*") as on_beta, gamma.subscribe(subject) as on_gamma:
        await alpha.publish(subject, b"hello from alpha")
        for name, subscription in (("beta", on_beta), ("gamma", on_gamma)):
            message = await subscription.receive()
            say(f"  {name} got {message.data!r} on {message.subject}")


async def show_requests(alpha: Transport, beta: Transport) -> None:
    say("\n== request / reply ==")
    async with trio.open_nursery() as nursery:

        async def serve(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async with beta.subscribe("demo.upper") as subscription:
                task_status.started()
                async for message in subscription:
                    assert message.reply is not None
                    await beta.publish(message.reply, message.data.upper())

        await nursery.start(serve)
        started = time.perf_counter()
        replies = []

        async def ask(index: int) -> None:
            reply = await alpha.request("demo.upper", f"job {index}".encode(), timeout=5)
            replies.append(reply.data)

        async with trio.open_nursery() as askers:
            for index in range(1000):
                askers.start_soon(ask, index)
        elapsed = time.perf_counter() - started
        say(f"  1000 concurrent requests answered by beta in {elapsed * 1000:.0f} ms")
        say(f"  e.g. {sorted(replies)[0]!r}")
        nursery.cancel_scope.cancel()
    try:
        await alpha.request("demo.nobody", b"?", timeout=30)
    except NoRespondersError as exc:
        say(f"  a request nobody serves fails at once: {exc}")


async def show_kv(alpha: Transport, beta: Transport) -> None:
    say("\n== KV bucket: CAS and per-key TTL ==")
    kv_alpha = await alpha.key_value("meshline-demo")
    kv_beta = await beta.key_value("meshline-demo")
    for key in await kv_alpha.keys():
        await kv_alpha.purge(key)
    revision = await kv_alpha.create("leader", b"alpha", ttl=2)
    say(f"  alpha created 'leader' (revision {revision}, TTL 2 s)")
    try:
        await kv_beta.create("leader", b"beta")
    except KeyExistsError:
        say("  beta's create lost: the key exists")
    revision = await kv_alpha.update("leader", b"alpha", revision=revision, ttl=2)
    say(f"  alpha refreshed its lease (revision {revision})")
    try:
        await kv_beta.update("leader", b"beta", revision=revision - 1)
    except RevisionMismatchError:
        say("  beta's update with a stale revision was refused")
    async with kv_beta.watch() as watch:
        say(f"  beta watches; snapshot: {[(e.key, e.value) for e in watch.snapshot]}")
        say("  alpha stops refreshing; waiting for the TTL to run out ...")
        started = trio.current_time()
        async for entry in watch:
            if entry.key == "leader" and entry.operation is KVOperation.PURGE:
                waited = trio.current_time() - started
                say(f"  beta saw 'leader' expire after {waited:.1f} s")
                break
    revision = await kv_beta.create("leader", b"beta", ttl=2)
    say(f"  beta took over at once (revision {revision})")
    await kv_beta.delete("leader", revision=revision)


async def poll(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds, checking every few milliseconds."""
    with trio.fail_after(timeout):
        while True:
            if condition():
                return
            await trio.sleep(0.005)


async def show_nodes(transports: dict[str, Transport]) -> None:
    say("\n== mesh nodes: ids, leader lease, requests, broadcast, failover ==")
    key = "demo mesh: any key works"
    nodes: dict[str, Node] = {}
    scopes: dict[str, trio.CancelScope] = {}
    heard: list[str] = []

    async def run_node(name: str, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as scope:
            async with open_node(transports[name], key) as node:
                nodes[name], scopes[name] = node, scope

                async def whoami(data: str, sender: int) -> str:
                    return f"{name} (node {node.id}) greets {data}"

                node.register_handler("whoami", whoami)
                node.register_broadcast_handler(
                    "news",
                    lambda data, sender: heard.append(f"{name} heard {data!r} from {sender}"),
                )
                task_status.started()
                await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        for name in transports:
            await nursery.start(run_node, name)
        alpha = nodes["alpha"]
        await poll(lambda: len(alpha.alive_nodes()) == 3)
        for name, node in nodes.items():
            role = "leader" if node.is_leader else "follower"
            say(f"  {name} is node {node.id}, {role}; sees {sorted(node.alive_nodes())}")
        gamma = nodes["gamma"]
        say(f"  alpha asks gamma: {await alpha.request(gamma.id, 'whoami', 'alpha')!r}")
        await gamma.broadcast("news", "gamma is up")
        await poll(lambda: len(heard) == 3)
        for line in sorted(heard):
            say(f"  {line}")
        leader_name = next(name for name, node in nodes.items() if node.is_leader)
        leader_id = nodes[leader_name].id
        survivors = {name: node for name, node in nodes.items() if name != leader_name}
        say(f"  stopping the leader, {leader_name} (node {leader_id}) ...")
        started = trio.current_time()
        scopes[leader_name].cancel()
        await poll(lambda: any(node.is_leader for node in survivors.values()))
        new_leader = next(name for name, node in survivors.items() if node.is_leader)
        waited = (trio.current_time() - started) * 1000
        say(f"  {new_leader} (node {nodes[new_leader].id}) took the lease after {waited:.0f} ms")
        for name, node in survivors.items():
            say(f"  {name} now sees {sorted(node.alive_nodes())}")
        asker = next(iter(survivors.values()))
        await poll(lambda: not asker.is_alive(leader_id))
        try:
            await asker.request(leader_id, "whoami", "anyone")
        except NodeNotAliveError as exc:
            say(f"  a request to the stopped node fails at once: {exc}")
        nursery.cancel_scope.cancel()


async def picture(service: ClientService[Any]) -> None:
    """One line of the cluster as ``service`` sees it: nodes, leader, clients."""
    node = service.node
    clients: dict[int, list[str]] = {node_id: [] for node_id in sorted(node.alive_nodes())}
    for client in await service.client_registry.list_clients():
        clients.setdefault(client.node_id, []).append(client.client_id)
    parts = []
    for node_id, names in sorted(clients.items()):
        crown = "*" if node_id == node.leader_id else ""
        parts.append(f"node {node_id}{crown}: {', '.join(sorted(names)) or '-'}")
    say("  [cluster] " + " | ".join(parts) + "   (* = leader)")


async def show_service(url: str) -> None:
    say("\n== client service: clients on three nodes, invoke, broadcast, a crash ==")
    homes = {"alpha": ["alice", "bob"], "beta": ["carol", "dave"], "gamma": ["erin", "frank"]}
    services: dict[str, ClientService[Any]] = {}
    transports: dict[str, Transport] = {}
    orphan_reports: list[str] = []
    heard: list[str] = []

    def on_orphaned(node_id: int, clients: list[RegisteredClient[Any]]) -> None:
        names = sorted(client.client_id for client in clients)
        orphan_reports.append(f"node {node_id} died; orphaned clients: {names}")

    async def run(name: str, task_status: trio.TaskStatus[None]) -> None:
        async def client_invoke(client_id: str, kind: str, data: Any, timeout: float) -> str:
            return f"{client_id} (on {name}) got {kind}: {data}"

        try:
            async with open_nats_transport(url, name=f"service-{name}") as transport:
                transports[name] = transport
                async with open_client_service(
                    transport, "demo", client_invoke=client_invoke, on_orphaned=on_orphaned
                ) as service:
                    services[name] = service
                    service.register_broadcast_handler(
                        "maintenance", lambda data, sender: heard.append(f"{name} heard {data!r}")
                    )
                    for client_id in homes[name]:
                        await service.register_client(client_id, {"home": name})
                    task_status.started()
                    await trio.sleep_forever()
        except* TransportError:
            pass  # the crash below: its connection was cut

    async with trio.open_nursery() as nursery:
        for name in homes:
            await nursery.start(run, name)
        alpha, beta = services["alpha"], services["beta"]
        await poll(lambda: len(alpha.node.alive_nodes()) == 3)
        with trio.fail_after(10):
            while True:
                if len(await alpha.client_registry.list_clients()) == 6:
                    break
                await trio.sleep(0.01)
        await picture(alpha)
        for client_id in ("carol", "frank", "alice"):
            say(f"  alpha invokes {client_id}: {await alpha.invoke(client_id, 'notify', 'hi')!r}")
        await beta.broadcast("maintenance", "at 02:00")
        await poll(lambda: len(heard) == 3)
        say(f"  beta broadcast; {', '.join(sorted(heard))}")
        gamma_id = services["gamma"].instance_id
        say(f"  gamma (node {gamma_id}) crashes: its connection is cut, nothing cleaned up")
        started = trio.current_time()
        await transports["gamma"].aclose()
        registration = await beta.register_client("frank", {"home": "beta"})
        say(
            "  frank reconnects to beta at once"
            f" (register says it left node {registration.superseded})"
        )
        await poll(lambda: bool(orphan_reports))
        waited = trio.current_time() - started
        say(f"  the leader, {waited:.1f} s later: {orphan_reports[0]}")
        try:
            await alpha.invoke("erin", "notify", "are you there?")
        except ClientNotFoundError as exc:
            say(f"  invoking erin now: {exc}")
        say(f"  alpha invokes frank: {await alpha.invoke('frank', 'notify', 'welcome back')!r}")
        await picture(alpha)
        nursery.cancel_scope.cancel()


# --- Sockets ----------------------------------------------------------------------

HEARTBEAT = HeartbeatOptions(interval=0.25, max_missed=1)
"""Short, so that the silent client is reaped within the demo: half a second of
silence (interval * (max_missed + 1)); the real default is 25 s and 2."""
MAX_BUFFERED = 256 * 1024
BLOB = "x" * 16 * 1024


def demo_role() -> Role:
    user = Role("user")

    @user.call("add", input=list[int], output=int)
    async def add(conn: Connection, numbers: list[int]) -> int:
        return sum(numbers)

    @user.call("join", input=str)
    async def join(conn: Connection, room: str) -> None:
        conn.join(room)

    @user.on("typing")
    def typing(conn: Connection, data: Any) -> None:
        pass

    return user


async def raw_client(
    nursery: trio.Nursery, server: SocketServer, client_id: str
) -> tuple[trio_websocket.WebSocketConnection, Connection]:
    """A bare trio-websocket client that says hello (in JSON) and reads nothing;
    and its connection on the server."""
    ws = await trio_websocket.connect_websocket_url(
        nursery, server.url, subprotocols=[JSON_SUBPROTOCOL]
    )
    await ws.send_message(json.dumps({"t": "hello", "client_id": client_id}))
    found: list[Connection] = []

    def visible() -> bool:
        found[:] = [c for c in server.local.connections.values() if c.client_id == client_id]
        return bool(found)

    await poll(visible)
    return ws, found[0]


async def show_slow_reader(server: SocketServer, gone: dict[str, trio.Event]) -> None:
    async with trio.open_nursery() as nursery:
        ws, conn = await raw_client(nursery, server, "slow")

        async def keep_talking() -> None:
            # It still sends (so the heartbeat does not reap it); it only stops reading.
            try:
                while True:
                    await ws.send_message(json.dumps({"t": "event", "name": "typing"}))
                    await trio.sleep(HEARTBEAT.interval / 2)
            except trio_websocket.ConnectionClosed:
                pass  # the server dropped it

        nursery.start_soon(keep_talking)
        emitted = 0
        with trio.fail_after(30):
            while conn.is_open:
                conn.emit("blob", BLOB)
                emitted += 1
                await trio.lowlevel.checkpoint()
            await gone["slow"].wait()
        say(
            f"  'slow' stopped reading; the server emitted {emitted} events of 16 KiB to it"
            f" and, once more than {MAX_BUFFERED // 1024} KiB waited in its queue (the socket"
            f" buffers held the rest), closed it with {conn.close_code} ({conn.disconnect_reason})"
        )
        nursery.cancel_scope.cancel()
    await trio.aclose_forcefully(ws)


async def show_silent_client(server: SocketServer, gone: dict[str, trio.Event]) -> None:
    async with trio.open_nursery() as nursery:
        ws, conn = await raw_client(nursery, server, "silent")
        started = trio.current_time()
        with trio.fail_after(30):
            await gone["silent"].wait()
        waited = trio.current_time() - started
        silence = HEARTBEAT.interval * (HEARTBEAT.max_missed + 1)
        say(
            f"  'silent' sent its hello and nothing since: after {silence:g} s of silence it"
            f" was reaped with {conn.close_code} ({conn.disconnect_reason}); gone"
            f" {waited:.1f} s after it connected, the close it did not take included"
        )
        nursery.cancel_scope.cancel()
    await trio.aclose_forcefully(ws)


async def show_sockets() -> None:
    say("\n== sockets: a server, three clients, a slow reader, a silent client (no NATS) ==")
    gone: defaultdict[str, trio.Event] = defaultdict(trio.Event)

    def on_disconnect(conn: Connection, reason: DisconnectReason) -> None:
        say(f"  [server] on_disconnect {conn.client_id!r}: {reason}, close code {conn.close_code}")
        gone[conn.client_id].set()

    async with open_test_socket_server(
        roles=[demo_role()],
        heartbeat=HEARTBEAT,
        backpressure=BackpressureOptions(max_buffered_bytes=MAX_BUFFERED),
        close_timeout=0.5,
        client_requests={"confirm": (str, bool)},
        client_events={"news": str, "blob": str},
        on_disconnect=on_disconnect,
    ) as server:
        say(
            f"  server on {server.url} (node {server.node_id}): pings every"
            f" {HEARTBEAT.interval:g} s, closes a client with more than"
            f" {MAX_BUFFERED // 1024} KiB waiting"
        )
        async with (
            open_test_client(server, client_id="ana") as ana,
            open_test_client(server, client_id="bo") as bo,
            open_test_client(server, client_id="cy") as cy,
        ):
            ids = ", ".join(f"{c.client_id} as {c.connection_id}" for c in (ana, bo, cy))
            say(f"  three clients connected: {ids}")
            say(f"  ana calls add([1, 2, 3]): {await ana.call('add', [1, 2, 3])!r}")

            heard: list[str] = []

            def listen(name: str) -> Callable[[Any], None]:
                return lambda data: heard.append(f"{name} got {data!r}")

            for name, client in (("ana", ana), ("bo", bo), ("cy", cy)):
                client.on("news", listen(name))
            await ana.call("join", "lobby")
            await bo.call("join", "lobby")
            members = server.room("lobby").emit("news", "lunch at noon")
            await poll(lambda: len(heard) == members)
            say(f"  room 'lobby' emit to {members} members: {', '.join(sorted(heard))}")

            cy.implement("confirm", lambda question: question == "deploy now?")
            cy_conn = server.connection(cy.connection_id or "")
            assert cy_conn is not None
            answer = await cy_conn.request("confirm", "deploy now?", timeout=5)
            say(f"  the server asks cy 'deploy now?'; cy answers {answer!r}")

            await show_slow_reader(server, gone)
            await show_silent_client(server, gone)
            say("  ana, bo and cy leave:")
    say("  the socket server is stopped")


async def show_cluster_sockets(url: str) -> None:
    say("\n== cluster sockets: two socket servers on one mesh, clients with both URLs ==")
    ttl = 1

    def admit(request: SocketRequest) -> Admission:
        return Admission("user", user_id=request.query.get("user"))

    said: list[tuple[str, str]] = []

    def hook(kind: str, node: str) -> Callable[[str], None]:
        def report(user: str) -> None:
            said.append((kind, user))
            say(f"  [hooks] {user} is {kind} (said by {node}, the leader)")

        return report

    def hooks(node: str) -> dict[str, Any]:
        return {
            "on_user_online": hook("online", node),
            "on_user_offline": hook("offline", node),
            "on_orphaned": lambda node_id, conns: say(
                f"  [hooks] node {node_id} died; orphaned: {sorted(c.client_id for c in conns)}"
            ),
        }

    async def serve(
        name: str, task_status: trio.TaskStatus[tuple[SocketServer, Callable[[], None]]]
    ) -> None:
        with trio.CancelScope() as scope:
            async with open_nats_transport(url, name=name) as inner:
                transport = FaultyTransport(inner)

                def crash() -> None:
                    transport.cut()  # as if the process died: nothing is cleaned up
                    scope.cancel()

                async with open_socket_server(
                    roles=[demo_role()],
                    authenticate=admit,
                    mesh=MeshOptions(transport, "demo-sockets", node={"ttl": ttl}),
                    client_requests={"confirm": (str, bool)},
                    client_events={"news": str},
                    **hooks(name),
                ) as server:
                    task_status.started((server, crash))
                    await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        east, crash_east = await nursery.start(serve, "east")
        west, _ = await nursery.start(serve, "west")
        await poll(lambda: {east.node_id, west.node_id} <= west.cluster.nodes())
        say(
            f"  east is node {east.node_id} on {east.url},"
            f" west is node {west.node_id} on {west.url}"
        )
        urls = [east.url, west.url]
        again = ReconnectOptions(base=0.1, cap=0.5)
        async with (
            open_socket_client(urls, client_id="phone", query={"user": "ana"}) as phone,
            open_socket_client(
                urls[::-1], client_id="laptop", query={"user": "ana"}, reconnect=again
            ) as laptop,
            open_socket_client(urls, client_id="bo", query={"user": "bo"}) as bo,
        ):
            await poll(lambda: west.cluster.count() == 3)
            where = {c.client_id: c.node_id for c in west.cluster.connections()}
            say(f"  west sees every connection: {dict(sorted(where.items()))}")
            heard: list[str] = []
            phone.on("news", lambda data: heard.append(f"phone got {data!r}"))
            laptop.on("news", lambda data: heard.append(f"laptop got {data!r}"))
            await west.to_user("ana").emit("news", "dinner at eight")
            await poll(lambda: len(heard) == 2)
            say(f"  west emits to user ana, on both nodes: {', '.join(sorted(heard))}")

            laptop.implement("confirm", lambda question: question == "sync now?")
            answer = await east.to_conn(laptop.connection_id or "").request("confirm", "sync now?")
            say(f"  east asks ana's laptop (on west) 'sync now?': {answer!r}")

            await west.to_conn(bo.connection_id or "").close(reason="spam")
            await poll(lambda: bo.state is ClientState.FAILED)
            say("  west kicks bo, who is on east: bo's client stops for good (4501, terminal)")
            await poll(lambda: ("offline", "bo") in said)

            phone_was = phone.connection_id
            crash_east()
            say("  east crashes")
            await poll(
                lambda: phone.state is ClientState.CONNECTED and phone.connection_id != phone_was,
                20,
            )
            await poll(
                lambda: (
                    (c := west.cluster.client("phone")) is not None and c.node_id == west.node_id
                ),
                20,
            )
            say(
                f"  ana's phone moved to west with the same client id; west sees"
                f" {sorted(c.client_id for c in west.cluster.by_user('ana'))} for ana"
                f" and {west.cluster.count()} connections in all"
            )
            say("  ana and the laptop leave:")
        await poll(lambda: ("offline", "ana") in said, 20)
        nursery.cancel_scope.cancel()
    say("  the cluster is stopped")


async def run_demo(url: str) -> None:
    async with (
        open_nats_transport(url, name="alpha") as alpha,
        open_nats_transport(url, name="beta") as beta,
        open_nats_transport(url, name="gamma") as gamma,
    ):
        say("three transports connected: alpha, beta, gamma")
        await show_publish(alpha, beta, gamma)
        await show_requests(alpha, beta)
        await show_kv(alpha, beta)
        await show_nodes({"alpha": alpha, "beta": beta, "gamma": gamma})
    await show_service(url)
    await show_sockets()
    await show_cluster_sockets(url)


def demo(url: str | None = None) -> None:
    """Run the demo against ``url``, or against an embedded nats-server."""
    if url is not None:
        trio.run(run_demo, url)
        return
    with NatsServer() as server:
        say(f"embedded nats-server with JetStream at {server.url}")
        trio.run(run_demo, server.url)
    say("\ndone; the embedded server is stopped")
