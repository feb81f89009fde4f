"""``meshline demo``: transports and mesh nodes at work against an embedded NATS server."""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from ._errors import KeyExistsError, NodeNotAliveError, NoRespondersError, RevisionMismatchError
from ._names import encode_token
from ._nats import open_nats_transport
from ._node import Node, open_node
from ._server import NatsServer
from ._transport import KVOperation, Transport


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


def demo(url: str | None = None) -> None:
    """Run the demo against ``url``, or against an embedded nats-server."""
    if url is not None:
        trio.run(run_demo, url)
        return
    with NatsServer() as server:
        say(f"embedded nats-server with JetStream at {server.url}")
        trio.run(run_demo, server.url)
    say("\ndone; the embedded server is stopped")
