"""One process of ``benchmarks/fanout.py``: a meshline node, or a group of clients.

Usage::

    python _fanout_worker.py server NATS_URL KEY OPTIONS_JSON
    python _fanout_worker.py clients IMPL URL OPTIONS_JSON

``server`` runs one meshline node: a socket server on the mesh ``KEY`` (every
connection joins the room :data:`ROOM` in ``on_connect``; ``authenticate`` takes
the user id from the ``user`` query parameter), and beside it, on the same NATS
transport, a plain mesh node (:func:`meshline.open_node`, key ``KEY`` + ``n``) that
answers ``echo`` node requests: the request baseline. It also runs the request
ceilings: a bare trio-websocket server (``serve_websocket``) and a bare trio TCP
server (``trio.serve_tcp``), each echoing what it receives, with nothing of
meshline in the way. Its first line is ``{"port": P, "node_id": id,
"baseline_node_id": id, "echo_ports": {"websocket": P, "tcp": P}}``. OPTIONS:
``nodes`` (how many nodes the cluster has: ``wait`` waits until it sees them
all).

``clients`` opens ``count`` clients (OPTIONS: ``count``, ``prefix``, ``watchers``) to URL, at most
:data:`~_sockets_worker.CONNECTING` connection attempts at a time. Client ``i``
has client id and user id ``PREFIX + str(i)``. IMPL ``meshline``: meshline's own
client (``open_socket_client``, ``reconnect=None``), with a handler per event
name (``client.on``) and ``client.implement("echo", ...)`` answering the
server's requests with their data; its first ``watchers`` clients connect with
``watch=1`` in the query (their node puts them in the room :data:`WATCHED`) and
watch that room (``client.watch``), counting every member a change brings in as
an event named :data:`PRESENCE`. IMPL ``socketio``: bare clients, wsproto (the
WebSocket machine trio-websocket and so meshline's client use) over a trio TCP
stream, speaking Engine.IO 4 and Socket.IO 5 (the protocols python-socketio
serves): each opens ``/socket.io/?EIO=4&transport=websocket``, connects to the
namespace ``/`` with ``{"user": id}`` as its auth data, answers pings, and
decodes every event with ``json.loads``, in one task that reads, parses and
counts: in Python, less per event than meshline's client does (no reader task
and channel, no handler task, no typed decoding). Its first line is
``{"connected": n}``.

Each process reads commands, one a line, from stdin, and writes JSON objects, one
a line, to stdout (the driver ignores other lines there). Closing its stdin ends it
at once (``os._exit``). Times are
``time.monotonic()``: one clock for every process on the machine.

Server commands:

* ``stats``: ``{"cpu_s": ..., "gc_s": seconds in the garbage collector since the
  last stats, "gc_by_generation": [...]}``;
* ``wait TOTAL TIMEOUT``: wait until this node's replica counts TOTAL connections
  on live nodes, sees every node of the cluster alive (both meshes), and listens
  to the subjects of the room and of every local user; answer ``{"reached":
  bool, ...}``;
* ``room EVENT COUNT``: ``await server.to_room(ROOM).emit(EVENT, PAYLOAD)``
  COUNT times; answer ``{"t0": time of the first emit, "emit_s": ...}``;
  ``watchers EVENT COUNT``: the same to the room :data:`WATCHED`;
* ``join COUNT``: COUNT of this node's connections that do not watch join the
  room :data:`WATCHED`, one by one; same answer (each join reaches every
  watcher as a presence diff);
* ``users EVENT ROUNDS PREFIX COUNT``: ROUNDS times, for ``i`` in ``range(COUNT)``,
  ``await server.to_user(PREFIX + str(i)).emit(EVENT, PAYLOAD)``; same answer;
* ``requests CONCURRENCY WARMUP DURATION``: CONCURRENCY tasks, each sending
  ``server.to_conn(id).request("echo", PAYLOAD, timeout=10)`` in a loop to one of
  the connections other nodes hold (task ``i`` to the ``i``-th, round robin) and
  checking that the answer equals the payload; answers ``{"window": "open"}``
  after WARMUP seconds, then, DURATION seconds later, ``{"rate": requests/s,
  "requests": n, "errors": n, ...}``;
* ``node_requests PEER CONCURRENCY WARMUP DURATION``: the same with
  ``baseline_node.request(PEER, "echo", PAYLOAD, timeout=10)``.

Client commands:

* ``expect EVENT PER_CLIENT STALL`` answers ``{"armed": EVENT}`` at once, then,
  once every client received PER_CLIENT events named EVENT since (or nothing
  came for STALL seconds), ``{"received": n, "expected": n, "first": t, "last":
  t, "cpu_s": this process's CPU seconds meanwhile, "gc_s": ..., "closed":
  connections that ended}``;
* ``echo KIND PORT CONCURRENCY WARMUP DURATION``: opens CONCURRENCY bare
  connections (KIND ``websocket``: ``trio_websocket.open_websocket_url``; ``tcp``:
  ``trio.open_tcp_stream``) to the echo server on PORT, and runs round trips
  like ``requests`` does: each task sends :data:`ECHO_BLOB` (the request's
  payload, as msgpack) and awaits it back, in a loop; same answers.

meshline is used through its public names only (imported inside the functions
that need them, so that the baseline's client processes never import it).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import trio
import trio_websocket
from _sockets_worker import (
    PAYLOAD,
    Commands,
    Connector,
    GcClock,
    raise_fd_limit,
    say,
    until,
)

ROOM = "bench"
WATCHED = "watched"
"""The room whose members are the watching clients, and which they watch."""
PRESENCE = "presence"
"""What a watching client counts, once per member a presence change brings in."""
EVENTS = ("warm", "tick", "user", "seen")
"""The event names clients count (the driver warms up with ``warm``)."""
ECHO = "echo"
ECHO_BLOB = msgspec.msgpack.encode(PAYLOAD)
"""What a bare echo round trip carries (``echo`` client command)."""
REQUEST_TIMEOUT = 10.0
FIRST_EVENT_LIMIT = 60.0
"""Seconds a client process waits for its first expected event."""


def user_room(user_id: str) -> str:
    """The python-socketio room standing for a user (its usual idiom)."""
    return f"user:{user_id}"


# --------------------------------------------------------------------- meshline node


async def meshline_server(url: str, key: str, options: dict[str, Any]) -> None:
    import meshline

    nodes = int(options["nodes"])
    disconnects: collections.Counter[str] = collections.Counter()

    def authenticate(request: meshline.SocketRequest) -> meshline.Admission:
        watcher = request.query.get("watch") == "1"
        return meshline.Admission("member", user_id=request.query.get("user"), context=watcher)

    def on_connect(conn: meshline.Connection) -> None:
        conn.join(ROOM)
        if conn.context:
            conn.join(WATCHED)

    def on_disconnect(conn: meshline.Connection, reason: meshline.DisconnectReason) -> None:
        disconnects[reason.value] += 1

    async def echo(data: Any, sender: int) -> Any:
        return data

    async with (
        trio.open_nursery() as echo_servers,
        meshline.open_nats_transport(url) as transport,
    ):
        echo_ports = await start_echo_servers(echo_servers)
        async with meshline.open_node(transport, f"{key}n") as baseline_node:
            baseline_node.register_handler(ECHO, echo)
            async with meshline.open_socket_server(
                roles=[meshline.Role("member")],
                authenticate=authenticate,
                host="127.0.0.1",
                port=0,
                mesh=meshline.MeshOptions(transport, key),
                on_connect=on_connect,
                on_disconnect=on_disconnect,
            ) as server:
                say(
                    {
                        "port": server.port,
                        "node_id": server.node_id,
                        "baseline_node_id": baseline_node.id,
                        "echo_ports": echo_ports,
                    }
                )

                def ready(total: int) -> bool:
                    cluster = server.cluster
                    if cluster.count() < total or len(cluster.nodes()) < nodes:
                        return False
                    if len(baseline_node.alive_nodes()) < nodes:
                        return False
                    local = list(server.local.connections.values())
                    if local and not cluster.listening("room", ROOM):
                        return False
                    return all(
                        conn.user_id is None or cluster.listening("user", conn.user_id)
                        for conn in local
                    )

                def remote_connections() -> list[str]:
                    return sorted(
                        conn.connection_id
                        for conn in server.cluster.connections()
                        if conn.node_id != server.node_id
                    )

                async def emit_room(room: str, event: str, count: int) -> None:
                    target = server.to_room(room)
                    for _ in range(count):
                        await target.emit(event, PAYLOAD)

                async def join_watched(count: int) -> None:
                    joining = [
                        conn for conn in server.local.connections.values() if not conn.context
                    ][:count]
                    if len(joining) < count:
                        raise SystemExit(f"only {len(joining)} connections can join {WATCHED}")
                    for conn in joining:
                        conn.join(WATCHED)
                        await trio.lowlevel.checkpoint()

                async def emit_users(event: str, rounds: int, prefix: str, count: int) -> None:
                    targets = [server.to_user(f"{prefix}{index}") for index in range(count)]
                    for _ in range(rounds):
                        for target in targets:
                            await target.emit(event, PAYLOAD)

                def socket_requester(index: int) -> Callable[[], Awaitable[Any]]:
                    targets = remote_connections()
                    if not targets:
                        raise SystemExit("no connection on another node to send requests to")
                    target = server.to_conn(targets[index % len(targets)])
                    return lambda: target.request(ECHO, PAYLOAD, timeout=REQUEST_TIMEOUT)

                def node_requester(peer: int) -> Callable[[int], Callable[[], Awaitable[Any]]]:
                    def make(index: int) -> Callable[[], Awaitable[Any]]:
                        return lambda: baseline_node.request(
                            peer, ECHO, PAYLOAD, timeout=REQUEST_TIMEOUT
                        )

                    return make

                async def extra() -> dict[str, Any]:
                    return {
                        "disconnects": dict(disconnects),
                        "local": len(server.local),
                        "cluster_count": server.cluster.count(),
                        "cluster_dropped": server.cluster.dropped,
                        "cluster_received": server.cluster.received,
                    }

                await command_loop(
                    ready=ready,
                    emit_room=emit_room,
                    join_watched=join_watched,
                    emit_users=emit_users,
                    socket_requester=socket_requester,
                    node_requester=node_requester,
                    extra=extra,
                )


async def start_echo_servers(nursery: trio.Nursery) -> dict[str, int]:
    """Start the bare echo servers (see the module); return their ports."""

    async def echo_websocket(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            while True:
                await ws.send_message(await ws.get_message())

    async def echo_tcp(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for data in stream:
                await stream.send_all(data)

    websocket = await nursery.start(
        trio_websocket.serve_websocket, echo_websocket, "127.0.0.1", 0, None
    )
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, host="127.0.0.1"), echo_tcp, 0
    )
    return {"websocket": websocket.port, "tcp": listeners[0].socket.getsockname()[1]}


async def command_loop(
    *,
    ready: Callable[[int], bool],
    emit_room: Callable[[str, str, int], Awaitable[None]],
    join_watched: Callable[[int], Awaitable[None]],
    emit_users: Callable[[str, int, str, int], Awaitable[None]],
    socket_requester: Callable[[int], Callable[[], Awaitable[Any]]],
    node_requester: Callable[[int], Callable[[int], Callable[[], Awaitable[Any]]]],
    extra: Callable[[], Awaitable[dict[str, Any]]],
) -> None:
    commands = Commands()
    gc_clock = GcClock()
    while True:
        words = await commands.next()
        if not words:
            continue
        name = words[0]
        if name == "stats":
            say({"cpu_s": time.process_time(), **gc_clock.take()})
        elif name == "wait":
            total, timeout = int(words[1]), float(words[2])
            began = time.monotonic()
            reached = await until(lambda wanted=total: ready(wanted), timeout, 0.05)
            say({"reached": reached, "waited_s": time.monotonic() - began, **await extra()})
        elif name in ("room", "watchers"):
            event, count = words[1], int(words[2])
            t0 = time.monotonic()
            await emit_room(ROOM if name == "room" else WATCHED, event, count)
            say({"t0": t0, "emit_s": time.monotonic() - t0, **await extra()})
        elif name == "join":
            count = int(words[1])
            t0 = time.monotonic()
            await join_watched(count)
            say({"t0": t0, "emit_s": time.monotonic() - t0, **await extra()})
        elif name == "users":
            event, rounds, prefix, count = words[1], int(words[2]), words[3], int(words[4])
            t0 = time.monotonic()
            await emit_users(event, rounds, prefix, count)
            say({"t0": t0, "emit_s": time.monotonic() - t0, **await extra()})
        elif name == "requests":
            concurrency, warmup, duration = int(words[1]), float(words[2]), float(words[3])
            say(await run_requests(socket_requester, concurrency, warmup, duration, gc_clock))
        elif name == "node_requests":
            peer = int(words[1])
            concurrency, warmup, duration = int(words[2]), float(words[3]), float(words[4])
            say(await run_requests(node_requester(peer), concurrency, warmup, duration, gc_clock))
        else:
            raise SystemExit(f"unknown command {words!r}")


async def run_requests(
    requester: Callable[[int], Callable[[], Awaitable[Any]]],
    concurrency: int,
    warmup: float,
    duration: float,
    gc_clock: GcClock,
) -> dict[str, Any]:
    """``concurrency`` tasks each awaiting its request in a loop; the requests
    completed in a window of ``duration`` s after ``warmup`` s, per second."""
    done = 0
    errors: list[str] = []

    async def loop(send: Callable[[], Awaitable[Any]]) -> None:
        nonlocal done
        while True:
            try:
                answer = await send()
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                await trio.sleep(0.01)
                continue
            if answer != PAYLOAD:
                errors.append(f"echo answered {answer!r}")
            done += 1

    senders = [requester(index) for index in range(concurrency)]
    async with trio.open_nursery() as nursery:
        for send in senders:
            nursery.start_soon(loop, send)
        await trio.sleep(warmup)
        say({"window": "open"})
        before, began, cpu = done, time.monotonic(), time.process_time()
        gc_clock.take()
        await trio.sleep(duration)
        after, ended, cpu = done, time.monotonic(), time.process_time() - cpu
        collected = gc_clock.take()
        nursery.cancel_scope.cancel()
    return {
        "rate": (after - before) / (ended - began),
        "requests": after - before,
        "seconds": ended - began,
        "cpu_s": cpu,
        **collected,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


# --------------------------------------------------------------------- clients


class Counters:
    """Events received per name, with the first and last arrival times."""

    def __init__(self) -> None:
        self.received: collections.Counter[str] = collections.Counter()
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.closed = 0

    def arrived(self, event: str) -> None:
        now = time.monotonic()
        self.received[event] += 1
        self.last[event] = now
        self.first.setdefault(event, now)

    def reset(self, event: str) -> None:
        self.received[event] = 0
        self.first.pop(event, None)
        self.last.pop(event, None)


def meshline_opener(
    url: str, prefix: str, counters: Counters, watchers: int
) -> Callable[[int, trio.TaskStatus[Any]], Awaitable[None]]:
    from meshline import PresenceChange, open_socket_client

    def echo(data: Any) -> Any:
        return data

    def presence_changed(change: PresenceChange) -> None:
        for _ in change.joined:
            counters.arrived(PRESENCE)

    async def open_one(index: int, task_status: trio.TaskStatus[Any]) -> None:
        name = f"{prefix}{index}"
        watcher = index < watchers
        query = {"user": name, "watch": "1"} if watcher else {"user": name}
        async with open_socket_client(url, client_id=name, query=query, reconnect=None) as client:
            for event in EVENTS:
                client.on(event, lambda data, event=event: counters.arrived(event))
            client.implement(ECHO, echo)
            if watcher:
                await client.watch(WATCHED, on_change=presence_changed)
            task_status.started(client)
            await trio.sleep_forever()

    return open_one


def socketio_opener(
    url: str, prefix: str, counters: Counters, watchers: int
) -> Callable[[int, trio.TaskStatus[Any]], Awaitable[None]]:
    """Bare clients: wsproto over a trio TCP stream, one task per connection that
    reads, parses and counts (no channel, no task switch per message)."""
    from urllib.parse import urlsplit

    from wsproto import ConnectionType, WSConnection
    from wsproto.events import (
        CloseConnection,
        Ping,
        RejectConnection,
        Request,
        TextMessage,
    )

    address = urlsplit(url)
    host, port = address.hostname or "127.0.0.1", address.port or 80
    target = "/socket.io/?EIO=4&transport=websocket"
    loads = json.loads

    async def open_one(index: int, task_status: trio.TaskStatus[Any]) -> None:
        stream = await trio.open_tcp_stream(host, port)
        ws = WSConnection(ConnectionType.CLIENT)
        partial: list[str] = []

        async def send(text: str) -> None:
            await stream.send_all(ws.send(TextMessage(data=text)))

        async def messages() -> AsyncIterator[str]:
            """Whole text messages, once the upgrade is accepted; WebSocket pings
            answered on the way."""
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, TextMessage):
                        partial.append(event.data)
                        if event.message_finished:
                            yield "".join(partial)
                            partial.clear()
                    elif isinstance(event, Ping):
                        await stream.send_all(ws.send(event.response()))
                    elif isinstance(event, RejectConnection):
                        raise RuntimeError("the WebSocket upgrade was refused")
                    elif isinstance(event, CloseConnection):
                        return

        async with stream:
            await stream.send_all(ws.send(Request(host=f"{host}:{port}", target=target)))
            incoming = messages()
            opened = await anext(incoming)
            if not opened.startswith("0"):
                raise RuntimeError(f"no Engine.IO open packet: {opened!r}")
            await send("40" + json.dumps({"user": f"{prefix}{index}"}))
            async for message in incoming:  # the namespace's CONNECT answer
                if message == "2":
                    await send("3")
                elif message.startswith("40"):
                    break
                else:
                    raise RuntimeError(f"namespace connect refused: {message!r}")
            task_status.started(ws)
            try:
                async for message in incoming:
                    if message.startswith("42"):
                        counters.arrived(loads(message[2:])[0])
                    elif message == "2":
                        await send("3")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                counters.closed += 1

    return open_one


async def clients(impl: str, url: str, options: dict[str, Any]) -> None:
    count, prefix = int(options["count"]), str(options["prefix"])
    watchers = int(options.get("watchers", 0))
    counters = Counters()
    opener = meshline_opener if impl == "meshline" else socketio_opener
    async with trio.open_nursery() as nursery:
        handles = await Connector(nursery).open_all(count, opener(url, prefix, counters, watchers))
        say({"connected": len(handles)})
        commands = Commands()
        gc_clock = GcClock()
        while True:
            words = await commands.next()
            if not words:
                continue
            if words[0] == "echo":
                kind, port = words[1], int(words[2])
                concurrency, warmup, duration = int(words[3]), float(words[4]), float(words[5])
                async with open_echo_connections(kind, port, concurrency) as senders:
                    say(
                        await run_requests(
                            senders.__getitem__, concurrency, warmup, duration, gc_clock
                        )
                    )
                continue
            if words[0] != "expect":
                raise SystemExit(f"unknown command {words!r}")
            event, per_client, stall = words[1], int(words[2]), float(words[3])
            counters.reset(event)
            gc_clock.take()
            cpu = time.process_time()
            say({"armed": event})
            armed = watchers if event in (PRESENCE, "seen") else len(handles)
            expected = per_client * armed
            seen, progressed = 0, time.monotonic()
            while counters.received[event] < expected:
                await trio.sleep(0.02)
                now = time.monotonic()
                if counters.received[event] != seen:
                    seen, progressed = counters.received[event], now
                elif now - progressed > (stall if seen else FIRST_EVENT_LIMIT):
                    break
            dropped = sum(getattr(handle, "dropped_events", 0) for handle in handles)
            if impl == "meshline":  # meshline clients end in a final state, not a count
                counters.closed = sum(handle.state.is_final for handle in handles)
            say(
                {
                    "received": counters.received[event],
                    "expected": expected,
                    "first": counters.first.get(event, 0.0),
                    "last": counters.last.get(event, 0.0),
                    "cpu_s": time.process_time() - cpu,
                    **gc_clock.take(),
                    "dropped": dropped,
                    "closed": counters.closed,
                }
            )


@contextlib.asynccontextmanager
async def open_echo_connections(
    kind: str, port: int, count: int
) -> AsyncIterator[list[Callable[[], Awaitable[Any]]]]:
    """``count`` bare connections to an echo server (see ``echo``), as senders of
    one round trip each, answering :data:`PAYLOAD` when the echo is right."""
    senders: list[Callable[[], Awaitable[Any]]] = []
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(count):
            if kind == "websocket":
                ws = await stack.enter_async_context(
                    trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/")
                )

                async def round_trip(ws: trio_websocket.WebSocketConnection = ws) -> Any:
                    await ws.send_message(ECHO_BLOB)
                    return PAYLOAD if await ws.get_message() == ECHO_BLOB else "wrong echo"

            else:
                stream = await stack.enter_async_context(
                    await trio.open_tcp_stream("127.0.0.1", port)
                )

                async def round_trip(stream: trio.SocketStream = stream) -> Any:
                    await stream.send_all(ECHO_BLOB)
                    received = b""
                    while len(received) < len(ECHO_BLOB):
                        received += await stream.receive_some()
                    return PAYLOAD if received == ECHO_BLOB else "wrong echo"

            senders.append(round_trip)
        yield senders


def main() -> None:
    raise_fd_limit()
    if sys.argv[1] == "server":
        url, key, options = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
        trio.run(meshline_server, url, key, options)
    else:
        impl, url, options = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
        trio.run(clients, impl, url, options)


if __name__ == "__main__":
    main()
