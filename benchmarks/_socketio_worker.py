"""One python-socketio node for ``benchmarks/fanout.py``: the baseline, in its own process.

Usage: ``python _socketio_worker.py REDIS_URL OPTIONS_JSON``

``socketio.AsyncServer(async_mode="aiohttp",
client_manager=socketio.AsyncRedisManager(REDIS_URL))``, every other option at its
default, attached to an aiohttp application served on 127.0.0.1 (port chosen by
the OS). The ``connect`` handler puts each connection in the room :data:`ROOM`
and in the room ``user:<id>`` of the user its auth data names (python-socketio
has no user addressing: a room per user is its usual idiom).

The first line is ``{"port": P}``. Then, as ``_fanout_worker.py server`` does,
commands from stdin, answers on stdout, one a line (closing stdin ends the
process at once):

* ``stats``: ``{"cpu_s": ..., "gc_s": ..., "gc_by_generation": [...]}``;
* ``wait LOCAL TIMEOUT``: wait until LOCAL connections are connected here;
  answer ``{"reached": bool, ...}`` (the driver checks Redis for both nodes'
  subscriptions itself);
* ``room EVENT COUNT``: ``await sio.emit(EVENT, PAYLOAD, to=ROOM)`` COUNT times;
  answer ``{"t0": time of the first emit, "emit_s": ...}``;
* ``users EVENT ROUNDS PREFIX COUNT``: ROUNDS times, for ``i`` in ``range(COUNT)``,
  ``await sio.emit(EVENT, PAYLOAD, to="user:" + PREFIX + str(i))``; same answer.

It imports no meshline and no trio_asyncio: plain asyncio, as python-socketio's
users run it.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import sys
import time
from typing import Any

from _fanout_worker import ROOM, user_room
from _sockets_worker import PAYLOAD, GcClock, raise_fd_limit, say


async def commands() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def main(redis_url: str, options: dict[str, Any]) -> None:
    import socketio
    from aiohttp import web

    sio = socketio.AsyncServer(
        async_mode="aiohttp", client_manager=socketio.AsyncRedisManager(redis_url)
    )
    connected: set[str] = set()
    disconnects: collections.Counter[str] = collections.Counter()

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
        user = auth.get("user") if isinstance(auth, dict) else None
        await sio.enter_room(sid, ROOM)
        if user is not None:
            await sio.enter_room(sid, user_room(str(user)))
        connected.add(sid)

    @sio.event
    async def disconnect(sid: str, reason: Any = None) -> None:
        connected.discard(sid)
        disconnects[str(reason)] += 1

    app = web.Application()
    sio.attach(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    say({"port": port})

    def extra() -> dict[str, Any]:
        return {"disconnects": dict(disconnects), "local": len(connected)}

    reader = await commands()
    gc_clock = GcClock()
    while True:
        line = await reader.readline()
        if not line:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        words = line.decode().split()
        if not words:
            continue
        name = words[0]
        if name == "stats":
            say({"cpu_s": time.process_time(), **gc_clock.take()})
        elif name == "wait":
            wanted, timeout = int(words[1]), float(words[2])
            began = time.monotonic()
            while len(connected) < wanted and time.monotonic() - began < timeout:
                await asyncio.sleep(0.05)
            say(
                {
                    "reached": len(connected) >= wanted,
                    "waited_s": time.monotonic() - began,
                    **extra(),
                }
            )
        elif name == "room":
            event, count = words[1], int(words[2])
            t0 = time.monotonic()
            for _ in range(count):
                await sio.emit(event, PAYLOAD, to=ROOM)
            say({"t0": t0, "emit_s": time.monotonic() - t0, **extra()})
        elif name == "users":
            event, rounds, prefix, count = words[1], int(words[2]), words[3], int(words[4])
            rooms = [user_room(f"{prefix}{index}") for index in range(count)]
            t0 = time.monotonic()
            for _ in range(rounds):
                for room in rooms:
                    await sio.emit(event, PAYLOAD, to=room)
            say({"t0": t0, "emit_s": time.monotonic() - t0, **extra()})
        else:
            raise SystemExit(f"unknown command {words!r}")


if __name__ == "__main__":
    raise_fd_limit()
    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
