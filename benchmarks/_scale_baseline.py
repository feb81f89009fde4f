"""The plain nats-py baselines of ``benchmarks/scale.py``, each run in its own process.

meshline is never imported here: importing it may change asyncio's event loop policy
(trio-asyncio), and these baselines run on plain asyncio.

Usage: ``python _scale_baseline.py COMMAND URL ARGS...``; prints one JSON object as
its last line. Commands:

* ``read URL BUCKET``: read every entry of ``BUCKET`` into a dict, as a replica
  would (nats-py's ``watchall`` until its end-of-snapshot marker); reports the time
  and how many values and delete or purge markers it saw.
* ``delete URL COUNT``: create a bucket, fill it with ``COUNT`` keys, then time
  deleting them all, 64 at a time, each conditional on its revision (what a
  cleanup does).
* ``create URL BUCKET FIRST CONNECTIONS PER_CONNECTION WRITERS``: ``CONNECTIONS``
  connections (numbered from ``FIRST``, so that processes write keys of their own)
  create ``PER_CONNECTION`` keys each with ``WRITERS`` concurrent tasks
  (``kv.create``). Prints ``ready`` once connected, starts on a line from stdin.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import msgspec
import nats
from nats.js.api import KeyValueConfig

VALUE = msgspec.msgpack.encode(
    ["client-000000000", 100_000, 0, msgspec.msgpack.encode({"user_id": "user-1", "role": "admin"})]
)
DELETES_IN_FLIGHT = 64


async def read(url: str, bucket: str) -> dict[str, Any]:
    nc = await nats.connect(url)
    try:
        began = time.perf_counter()
        kv = await nc.jetstream().key_value(bucket)
        status = await kv.status()
        # With one value kept per key, the snapshot holds one entry per message.
        expected = status.values if status.history == 1 else 0
        watcher = await kv.watchall()
        replica: dict[str, bytes] = {}
        markers = seen = 0
        ended = False
        while not (ended and seen >= expected):
            entry = await watcher.updates(timeout=60)
            if entry is None:
                # nats-py may mark the snapshot's end early (when the server sent
                # the snapshot before answering for the consumer): the rest comes.
                ended = True
                continue
            seen += 1
            if entry.operation in ("DEL", "PURGE"):
                markers += 1
                replica.pop(entry.key, None)
            else:
                replica[entry.key] = entry.value
        elapsed = time.perf_counter() - began
        await watcher.stop()
        return {"read_s": elapsed, "values": len(replica), "markers": markers}
    finally:
        await nc.close()


async def delete(url: str, count: int) -> dict[str, Any]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(KeyValueConfig(bucket=f"base{time.time_ns()}", history=1))
        revisions: dict[str, int] = {}

        async def create(start: int) -> None:
            for index in range(start, count, 256):
                key = f"c.k{index}"
                revisions[key] = await kv.create(key, VALUE)

        await asyncio.gather(*(create(start) for start in range(256)))
        keys = list(revisions)
        began = time.perf_counter()

        async def remove(start: int) -> None:
            for key in keys[start::DELETES_IN_FLIGHT]:
                await kv.delete(key, last=revisions[key])

        await asyncio.gather(*(remove(start) for start in range(DELETES_IN_FLIGHT)))
        return {"delete_s": time.perf_counter() - began, "deleted": len(keys)}
    finally:
        await nc.close()


async def create(
    url: str, bucket: str, first: int, connections: int, per_connection: int, writers: int
) -> dict[str, Any]:
    ncs = [await nats.connect(url) for _ in range(connections)]
    try:
        kvs = []
        for nc in ncs:
            js = nc.jetstream()
            kvs.append(await js.create_key_value(KeyValueConfig(bucket=bucket, history=1)))
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        began_wall, began = time.time(), time.perf_counter()

        async def write(number: int, kv: Any, start: int) -> None:
            for index in range(start, per_connection, writers):
                await kv.create(f"c.n{number}-{index}", VALUE)

        await asyncio.gather(
            *(
                write(number, kv, start)
                for number, kv in enumerate(kvs, first)
                for start in range(writers)
            )
        )
        elapsed = time.perf_counter() - began
        return {
            "registered": connections * per_connection,
            "began": began_wall,
            "ended": began_wall + elapsed,
            "rate": connections * per_connection / elapsed,
        }
    finally:
        for nc in ncs:
            await nc.close()


def main() -> None:
    command, url, *rest = sys.argv[1:]
    if command == "read":
        result = asyncio.run(read(url, rest[0]))
    elif command == "delete":
        result = asyncio.run(delete(url, int(rest[0])))
    elif command == "create":
        bucket, first, connections, per_connection, writers = rest
        result = asyncio.run(
            create(url, bucket, int(first), int(connections), int(per_connection), int(writers))
        )
    else:
        raise SystemExit(f"unknown command {command!r}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
