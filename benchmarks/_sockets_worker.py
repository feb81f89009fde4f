"""One side of one measurement for ``benchmarks/sockets.py``, run in its own process.

Usage::

    python _sockets_worker.py server IMPL SCENARIO OPTIONS_JSON
    python _sockets_worker.py clients IMPL SCENARIO URL OPTIONS_JSON

IMPL is ``meshline`` (meshline's socket server and client) or ``baseline`` (bare
trio-websocket on both sides, payloads encoded with msgpack through msgspec, as
meshline's frames are). SCENARIO is ``call``, ``fanout`` or ``idle``.

Each process writes JSON objects, one a line, to stdout, and reads commands, one a
line, from stdin. Closing its stdin ends it (at once: ``os._exit``, so that tearing
down thousands of connections never counts against a run, and so that a process
run under py-spy ends and writes its profile).

Server (first line ``{"port": P, "rss": bytes}``, the RSS after a ``gc.collect()``
with the server listening and no connection yet); commands:

* ``stats``: answer ``{"cpu_s": process CPU seconds so far, "gc_s": seconds in the
  garbage collector since the last ``stats``, "gc_by_generation": [n0, n1, n2]}``;
* ``wait N``: wait until N connections are open (meshline: visible in
  ``server.local``; baseline: accepted), answer ``{"connections": n, ...}``;
* ``fanout EVENTS``: emit ``EVENTS`` events to every connection, one emit per
  scheduling turn (meshline: ``server.room(ROOM).emit``, every connection joined
  the room in ``on_connect``; baseline: one task encodes each event once and
  awaits ``ws.send_message`` to each connection in turn); answer
  ``{"t0": monotonic time of the first emit, "emit_s": ..., "queued": ...}``;
* ``idle N TIMEOUT SAMPLE``: with N connections open, wait (meshline) until every
  one has answered a heartbeat ping, up to TIMEOUT s; then measure the server's
  CPU time over SAMPLE s and the heartbeat pings it sent meanwhile (connections
  whose ``last_ping_at`` falls in the sample); then ``gc.collect()`` and answer
  ``{"rss": bytes, "connections": n, "ponged": n, "gc_objects": n,
  "sample_cpu_s": s, "sample_s": s, "sample_pings": n, "sample_gc_s": s, ...}``.

Clients (OPTIONS: ``count``, and per scenario ``warmup``/``duration`` or
``events``/``stall``): ``call`` makes ``count`` clients each call in a loop, prints
``{"window": "open"}`` when the measured window opens after the warm-up (so that
the driver can read the server's CPU time then) and ``{"rate": round trips/s,
"cpu_s": this process's CPU seconds in the window, ...}`` when it closes;
``fanout`` prints ``{"connected": count}`` once connected, then ``{"received": n,
"first": t, "last": t, ...}`` once every client received ``events`` events (or
nothing came for ``stall`` seconds); ``idle`` prints ``{"connected": count}`` and
holds its connections until stdin closes. Clients connect at most
:data:`CONNECTING` at a time per process.

Times are ``time.monotonic()``, which is one clock for every process on the
machine (CLOCK_MONOTONIC on Linux), so the driver can compare them.

meshline is used through its public names only: ``open_socket_server``,
``HeartbeatOptions``, ``Role``, ``Connection``, ``DisconnectReason`` and
``open_socket_client`` (imported inside the functions that need them, so that the
baseline's processes never import meshline).
"""

from __future__ import annotations

import collections
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio
import trio.lowlevel
import trio_websocket

PAYLOAD: dict[str, Any] = {
    "user": "user-12345",
    "room": "bench",
    "text": "The quick brown fox jumps over the lazy dog, twice over: " * 2,
    "seq": 123456,
    "tags": ["a", "b", "c"],
}
"""The call argument and the event data: a small map of about 170 bytes in msgpack."""

ROOM = "bench"
EVENT = "tick"
CALL = "echo"
CONNECTING = 64
"""Connection attempts in flight at once, per client process."""
FIRST_EVENT_LIMIT = 120.0
"""Seconds a fanout client waits for its first event (the others are connecting)."""

encode = msgspec.msgpack.Encoder().encode
decode = msgspec.msgpack.Decoder().decode


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def settled_rss() -> int:
    gc.collect()
    gc.collect()
    return rss_bytes()


class GcClock:
    """Time spent in the cyclic garbage collector, by generation (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]
        self._began = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            generation = info["generation"]
            self.seconds[generation] += time.perf_counter() - self._began
            self.collections[generation] += 1

    def take(self) -> dict[str, Any]:
        """What was counted since the last take, and start again."""
        taken = {"gc_s": sum(self.seconds), "gc_by_generation": list(self.collections)}
        self.seconds = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]
        return taken


def say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Commands:
    """Lines from stdin; EOF ends the process at once."""

    def __init__(self) -> None:
        self._stream = trio.lowlevel.FdStream(os.dup(0))
        self._buffer = b""

    async def next(self) -> list[str]:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some(4096)
            if not chunk:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode().split()


async def until(predicate: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` passes (False)."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(step)
        return True
    return False


# --------------------------------------------------------------------- servers


class ServerSide:
    """What the command loop needs from either server."""

    def open_count(self) -> int:
        raise NotImplementedError

    async def fanout(self, events: int) -> dict[str, Any]:
        raise NotImplementedError

    def heartbeat_answered(self) -> int:
        return 0

    def pings_between(self, start: float, end: float) -> int:
        """Connections whose last heartbeat ping went out between these wall times."""
        return 0

    def extra(self) -> dict[str, Any]:
        return {}


async def command_loop(side: ServerSide, port: int) -> None:
    commands = Commands()
    say({"port": port, "rss": settled_rss()})
    gc_clock = GcClock()
    while True:
        words = await commands.next()
        if not words:
            continue
        if words[0] == "wait":
            wanted = int(words[1])
            timeout = float(words[2]) if len(words) > 2 else 600.0
            began = time.monotonic()
            reached = await until(lambda n=wanted: side.open_count() >= n, timeout, 0.05)
            say(
                {
                    "connections": side.open_count(),
                    "reached": reached,
                    "waited_s": time.monotonic() - began,
                    **side.extra(),
                }
            )
        elif words[0] == "stats":
            say({"cpu_s": time.process_time(), **gc_clock.take()})
        elif words[0] == "fanout":
            say({**await side.fanout(int(words[1])), **side.extra()})
        elif words[0] == "idle":
            wanted, timeout, sample = int(words[1]), float(words[2]), float(words[3])
            began = time.monotonic()
            await until(lambda n=wanted: side.heartbeat_answered() >= n, timeout, 0.1)
            held = time.monotonic() - began
            cpu, wall, clock = time.process_time(), time.monotonic(), time.time()
            gc_clock.take()
            await trio.sleep(sample)
            collected = gc_clock.take()
            cpu, wall = time.process_time() - cpu, time.monotonic() - wall
            pings = side.pings_between(clock, time.time())
            rss = settled_rss()
            say(
                {
                    "rss": rss,
                    "connections": side.open_count(),
                    "ponged": side.heartbeat_answered(),
                    "held_s": held,
                    "sample_cpu_s": cpu,
                    "sample_s": wall,
                    "sample_pings": pings,
                    "sample_gc_s": collected["gc_s"],
                    "gc_objects": len(gc.get_objects()),
                    **side.extra(),
                }
            )
        else:
            raise SystemExit(f"unknown command {words!r}")


async def meshline_server(scenario: str, options: dict[str, Any]) -> None:
    from meshline import (
        Connection,
        DisconnectReason,
        HeartbeatOptions,
        Role,
        open_socket_server,
    )

    role = Role("bench")

    @role.call(CALL)
    async def echo(conn: Connection, data: Any) -> Any:
        return data

    disconnects: collections.Counter[str] = collections.Counter()

    def on_connect(conn: Connection) -> None:
        if scenario == "fanout":
            conn.join(ROOM)

    def on_disconnect(conn: Connection, reason: DisconnectReason) -> None:
        disconnects[reason.value] += 1

    interval = options.get("heartbeat")
    heartbeat = HeartbeatOptions() if interval is None else HeartbeatOptions(interval=interval)

    async with open_socket_server(
        roles=[role],
        heartbeat=heartbeat,
        on_connect=on_connect,
        on_disconnect=on_disconnect,
    ) as server:

        class Side(ServerSide):
            def open_count(self) -> int:
                return len(server.local)

            async def fanout(self, events: int) -> dict[str, Any]:
                room = server.room(ROOM)
                queued = 0
                t0 = time.monotonic()
                for _ in range(events):
                    queued += room.emit(EVENT, PAYLOAD)
                    await trio.lowlevel.checkpoint()
                return {"t0": t0, "emit_s": time.monotonic() - t0, "queued": queued}

            def heartbeat_answered(self) -> int:
                return sum(
                    conn.last_pong_at is not None for conn in server.local.connections.values()
                )

            def pings_between(self, start: float, end: float) -> int:
                return sum(
                    start <= (conn.last_ping_at or 0.0) <= end
                    for conn in server.local.connections.values()
                )

            def extra(self) -> dict[str, Any]:
                return {"disconnects": dict(disconnects)}

        await command_loop(Side(), server.port)


async def baseline_server(scenario: str, options: dict[str, Any]) -> None:
    connections: set[trio_websocket.WebSocketConnection] = set()
    closed = 0

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        nonlocal closed
        ws = await request.accept()
        connections.add(ws)
        try:
            if scenario == "call":
                while True:
                    message = await ws.get_message()
                    await ws.send_message(encode(decode(message)))
            else:
                while True:  # hold the connection; read whatever comes
                    await ws.get_message()
        except trio_websocket.ConnectionClosed:
            closed += 1
        finally:
            connections.discard(ws)

    class Side(ServerSide):
        def open_count(self) -> int:
            return len(connections)

        async def fanout(self, events: int) -> dict[str, Any]:
            queued = 0
            targets = list(connections)
            t0 = time.monotonic()
            for _ in range(events):
                message = encode({"event": EVENT, "data": PAYLOAD})
                for ws in targets:
                    try:
                        await ws.send_message(message)
                        queued += 1
                    except trio_websocket.ConnectionClosed:
                        pass
            return {"t0": t0, "emit_s": time.monotonic() - t0, "queued": queued}

        def extra(self) -> dict[str, Any]:
            return {"disconnects": {"closed": closed} if closed else {}}

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
        await command_loop(Side(), server.port)


# --------------------------------------------------------------------- clients


class Connector:
    """Opens connections, :data:`CONNECTING` at a time, each in a task of its own
    that holds it until the process ends."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.limiter = trio.CapacityLimiter(CONNECTING)
        self.failures: list[str] = []

    async def open_all(
        self, count: int, open_one: Callable[[int, trio.TaskStatus[Any]], Awaitable[None]]
    ) -> list[Any]:
        opened: list[Any] = []

        async def one(index: int) -> None:
            async with self.limiter:
                try:
                    handle = await self.nursery.start(open_one, index)
                except Exception as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                    return
            opened.append(handle)

        async with trio.open_nursery() as connecting:
            for index in range(count):
                connecting.start_soon(one, index)
        if self.failures:
            raise SystemExit(
                f"{len(self.failures)} of {count} connections failed; first: {self.failures[0]}"
            )
        return opened


def meshline_opener(url: str) -> Callable[[int, trio.TaskStatus[Any]], Awaitable[None]]:
    from meshline import open_socket_client

    async def open_one(index: int, task_status: trio.TaskStatus[Any]) -> None:
        async with open_socket_client(
            url, client_id=f"bench-{os.getpid()}-{index}", reconnect=None
        ) as client:
            task_status.started(client)
            await trio.sleep_forever()

    return open_one


def baseline_opener(url: str) -> Callable[[int, trio.TaskStatus[Any]], Awaitable[None]]:
    async def open_one(index: int, task_status: trio.TaskStatus[Any]) -> None:
        async with trio_websocket.open_websocket_url(url) as ws:
            task_status.started(ws)
            await trio.sleep_forever()

    return open_one


async def clients(impl: str, scenario: str, url: str, options: dict[str, Any]) -> None:
    count = int(options["count"])
    opener = meshline_opener(url) if impl == "meshline" else baseline_opener(url)
    async with trio.open_nursery() as nursery:
        connector = Connector(nursery)
        handles = await connector.open_all(count, opener)
        gc_clock = GcClock()
        if scenario == "call":
            say(await run_calls(impl, handles, options, gc_clock))
        elif scenario == "fanout":
            say({"connected": len(handles)})
            gc_clock.take()
            say({**await receive_events(impl, handles, options), **gc_clock.take()})
        else:
            say({"connected": len(handles)})
        await Commands().next()  # hold everything until stdin closes
        nursery.cancel_scope.cancel()


async def run_calls(
    impl: str, handles: list[Any], options: dict[str, Any], gc_clock: GcClock
) -> dict[str, Any]:
    warmup, duration = float(options["warmup"]), float(options["duration"])
    done = 0
    errors: list[str] = []

    async def meshline_caller(client: Any) -> None:
        nonlocal done
        while True:
            result = await client.call(CALL, PAYLOAD)
            if result != PAYLOAD:
                raise AssertionError(f"echo answered {result!r}")
            done += 1

    async def baseline_caller(ws: trio_websocket.WebSocketConnection) -> None:
        nonlocal done
        while True:
            await ws.send_message(encode(PAYLOAD))
            result = decode(await ws.get_message())
            if result != PAYLOAD:
                raise AssertionError(f"echo answered {result!r}")
            done += 1

    caller = meshline_caller if impl == "meshline" else baseline_caller

    async def guarded(handle: Any) -> None:
        try:
            await caller(handle)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    async with trio.open_nursery() as nursery:
        for handle in handles:
            nursery.start_soon(guarded, handle)
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
        "calls": after - before,
        "seconds": ended - began,
        "cpu_s": cpu,
        **collected,
        "clients": len(handles),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


async def receive_events(impl: str, handles: list[Any], options: dict[str, Any]) -> dict[str, Any]:
    events, stall = int(options["events"]), float(options["stall"])
    expected = events * len(handles)
    received = 0
    first = last = 0.0
    all_in = trio.Event()

    def arrived(data: Any) -> None:
        nonlocal received, first, last
        last = time.monotonic()
        if not received:
            first = last
        received += 1
        if received == expected:
            all_in.set()

    async with trio.open_nursery() as nursery:
        if impl == "meshline":
            for client in handles:
                client.on(EVENT, arrived)
        else:

            async def read(ws: trio_websocket.WebSocketConnection) -> None:
                try:
                    while True:
                        arrived(decode(await ws.get_message())["data"])
                except trio_websocket.ConnectionClosed:
                    pass

            for ws in handles:
                nursery.start_soon(read, ws)
        seen, progressed = 0, time.monotonic()
        while not all_in.is_set():
            with trio.move_on_after(0.05):
                await all_in.wait()
            now = time.monotonic()
            if received != seen:
                seen, progressed = received, now
            elif now - progressed > (stall if received else FIRST_EVENT_LIMIT):
                break
        nursery.cancel_scope.cancel()
    dropped = sum(getattr(client, "dropped_events", 0) for client in handles)
    return {
        "received": received,
        "expected": expected,
        "first": first,
        "last": last,
        "client_dropped": dropped,
    }


def main() -> None:
    raise_fd_limit()
    role, impl, scenario = sys.argv[1], sys.argv[2], sys.argv[3]
    if role == "server":
        options = json.loads(sys.argv[4])
        run = meshline_server if impl == "meshline" else baseline_server
        trio.run(run, scenario, options)
    else:
        url, options = sys.argv[4], json.loads(sys.argv[5])
        trio.run(clients, impl, scenario, url, options)


if __name__ == "__main__":
    main()
