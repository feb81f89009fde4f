"""One measurement for ``benchmarks/scale.py``, run in its own process (meshline side).

Usage: ``python _scale_worker.py COMMAND URL KEY ARGS...``; prints one JSON object as
its last line. Commands:

* ``fill URL KEY LIVE PER_NODE``: put ``LIVE`` registrations into the registry bucket
  of mesh ``KEY``, ``PER_NODE`` per node (node ids 1, 2, ...).
* ``churn URL KEY CHURNED``: add ``CHURNED`` registrations of node
  :data:`CHURN_NODE`, then unregister each of them through a :class:`ClientRegistry`
  (256 at a time), as clients that came and went.
* ``open URL KEY LIVE PER_NODE``: open a fresh replica of the bucket on a new
  connection; time it, measure the process's RSS before and after, and time local
  queries.
* ``cleanup URL KEY COUNT``: put ``COUNT`` registrations of node :data:`DEAD_NODE`,
  then open a fresh backend and time ``cleanup_node`` of that node from another
  node's :class:`ClientRegistry`.
* ``rate URL KEY FIRST_NODE NODES PER_NODE WRITERS``: ``NODES`` nodes in this
  process, each with a connection, a backend and a :class:`ClientRegistry` of its
  own, register ``PER_NODE`` clients each with ``WRITERS`` concurrent tasks. Prints
  ``ready`` when every node is open and starts on a line from stdin.

Filling goes around the registry for speed: one registration is made through the
registry (a :class:`ClientRegistry` on the KV backend), the bucket and the bytes it
wrote are read back through the transport's public KV interface, and the other
registrations are written with ``KeyValue.create`` as copies of those bytes with the
client id and node id swapped in. The copy is checked by decoding; if the bytes are
not msgpack with those two values in them, every registration goes through the
registry instead (slower, same result). Only public meshline names are used.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import msgspec
import trio

import meshline
from meshline.testing import FaultyTransport

METADATA = {"user_id": "user-1", "role": "admin"}
TEMPLATE_NODE = 987_654_321
"""A node id no real node here has; written as a msgpack uint32 like every node id
used below (all are >= 2**16), so that a swapped-in id keeps the byte length."""
FIRST_NODE = 100_000
"""Node ids of filled registrations start here (node ``n`` is ``FIRST_NODE + n``)."""
CHURN_NODE = 99_999
DEAD_NODE = 99_998
CLEANER_NODE = 99_997
ID_DIGITS = 9
FILL_WRITERS = 256
CHURN_WRITERS = 256


def client_id(kind: str, index: int) -> str:
    """Client ids of one length, so the msgpack string header is the same for all."""
    return f"{kind}-{index:0{ID_DIGITS}d}"


def node_of(index: int, per_node: int) -> int:
    return FIRST_NODE + index // per_node


def rss_bytes() -> int:
    """The resident set size of this process, now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _BucketSpy(FaultyTransport):
    """Passes everything to the inner transport, remembering which buckets were
    opened (so the registry's bucket can be found through public names only)."""

    def __init__(self, inner: meshline.Transport) -> None:
        super().__init__(inner)
        self.buckets: list[str] = []

    async def key_value(self, bucket: str, *args: Any, **kwargs: Any) -> meshline.KeyValue:
        self.buckets.append(bucket)
        return await self.inner.key_value(bucket, *args, **kwargs)


class Writer:
    """Writes registrations of the mesh ``key`` straight into its bucket."""

    def __init__(
        self, kv: meshline.KeyValue, bucket: str, prefix: str, splice: list[bytes] | None
    ) -> None:
        self.kv = kv
        self.bucket = bucket
        self.prefix = prefix
        self.splice = splice
        """The template's bytes cut around the client id and the node id; None when
        the copy could not be verified (then the registry writes everything)."""

    def value(self, client: str, node: int) -> bytes:
        assert self.splice is not None
        head, middle, tail = self.splice
        encoded_id = msgspec.msgpack.encode(client)
        encoded_node = msgspec.msgpack.encode(node)
        return head + encoded_id + middle + encoded_node + tail


def _cut(raw: bytes, template_id: str) -> list[bytes] | None:
    """Cut ``raw`` around the encoded template client id and node id; None unless
    each occurs exactly once, in that order."""
    encoded_id = msgspec.msgpack.encode(template_id)
    encoded_node = msgspec.msgpack.encode(TEMPLATE_NODE)
    if raw.count(encoded_id) != 1 or raw.count(encoded_node) != 1:
        return None
    head, rest = raw.split(encoded_id)
    if encoded_node not in rest:
        return None
    middle, tail = rest.split(encoded_node)
    return [head, middle, tail]


def _swapped(value: Any, template_id: str, client: str, node: int) -> Any:
    if isinstance(value, list):
        return [_swapped(item, template_id, client, node) for item in value]
    if isinstance(value, dict):
        return {k: _swapped(v, template_id, client, node) for k, v in value.items()}
    if value == template_id:
        return client
    if value == TEMPLATE_NODE and not isinstance(value, bool):
        return node
    return value


async def _template(transport: meshline.Transport, key: str, kind: str) -> Writer:
    spy = _BucketSpy(transport)
    template_id = client_id(kind, 10**ID_DIGITS - 1)
    try:
        async with meshline.open_kv_registry_backend(spy, key) as backend:
            registry: meshline.ClientRegistry[dict[str, str]] = meshline.ClientRegistry(
                TEMPLATE_NODE, backend
            )
            await registry.register(template_id, METADATA)
            bucket = spy.buckets[-1]
            kv = await transport.key_value(bucket)
            token = meshline.encode_token(template_id)
            keys = [name for name in await kv.keys() if name.endswith(token)]
            entry = await kv.get(keys[0]) if len(keys) == 1 else None
            await registry.unregister(template_id)
    finally:
        await spy.aclose()
    if entry is None:
        return Writer(kv, bucket, "", None)
    prefix = keys[0][: -len(token)]
    splice = _cut(entry.value, template_id)
    writer = Writer(kv, bucket, prefix, splice)
    if splice is not None:
        # The copy must decode to what the registry would have written.
        probe, node = client_id(kind, 12345), FIRST_NODE + 7
        expected = _swapped(msgspec.msgpack.decode(entry.value), template_id, probe, node)
        if msgspec.msgpack.decode(writer.value(probe, node)) != expected:
            writer.splice = None
    return writer


async def fill(
    transport: meshline.Transport,
    key: str,
    kind: str,
    count: int,
    node_for: Callable[[int], int],
) -> dict[str, Any]:
    """Write ``count`` registrations ``client_id(kind, i)`` on ``node_for(i)``."""
    writer = await _template(transport, key, kind)
    began = time.perf_counter()
    if writer.splice is not None:

        async def write(start: int) -> None:
            for index in range(start, count, FILL_WRITERS):
                client = client_id(kind, index)
                await writer.kv.create(
                    writer.prefix + meshline.encode_token(client),
                    writer.value(client, node_for(index)),
                )

        method = "direct"
        async with trio.open_nursery() as nursery:
            for start in range(FILL_WRITERS):
                nursery.start_soon(write, start)
    else:
        method = "registry"
        async with meshline.open_kv_registry_backend(transport, key) as backend:
            registries: dict[int, meshline.ClientRegistry[dict[str, str]]] = {}

            async def register(start: int) -> None:
                for index in range(start, count, FILL_WRITERS):
                    node = node_for(index)
                    if node not in registries:
                        registries[node] = meshline.ClientRegistry(node, backend)
                    await registries[node].register(client_id(kind, index), METADATA)

            async with trio.open_nursery() as nursery:
                for start in range(FILL_WRITERS):
                    nursery.start_soon(register, start)
    elapsed = time.perf_counter() - began
    return {
        "bucket": writer.bucket,
        "method": method,
        "filled": count,
        "fill_s": elapsed,
        "fill_rate": count / elapsed,
    }


async def timed(read: Callable[[int], Awaitable[object]], rounds: int) -> float:
    """The median time of ``read(i)`` over ``rounds`` calls, in microseconds."""
    samples = []
    for index in range(rounds):
        began = time.perf_counter()
        await read(index)
        samples.append(time.perf_counter() - began)
    return statistics.median(samples) * 1e6


# --------------------------------------------------------------------- commands


async def cmd_fill(url: str, key: str, live: int, per_node: int) -> dict[str, Any]:
    async with meshline.open_nats_transport(url) as transport:
        return await fill(transport, key, "live", live, lambda i: node_of(i, per_node))


async def cmd_churn(url: str, key: str, churned: int) -> dict[str, Any]:
    async with meshline.open_nats_transport(url) as transport:
        result = await fill(transport, key, "gone", churned, lambda i: CHURN_NODE)
        async with meshline.open_kv_registry_backend(transport, key) as backend:
            registry: meshline.ClientRegistry[dict[str, str]] = meshline.ClientRegistry(
                CHURN_NODE, backend
            )
            began = time.perf_counter()
            removed = 0

            async def unregister(start: int) -> None:
                nonlocal removed
                for index in range(start, churned, CHURN_WRITERS):
                    if await registry.unregister(client_id("gone", index)):
                        removed += 1

            async with trio.open_nursery() as nursery:
                for start in range(CHURN_WRITERS):
                    nursery.start_soon(unregister, start)
            elapsed = time.perf_counter() - began
    result.update(unregistered=removed, unregister_s=elapsed, unregister_rate=removed / elapsed)
    result["churn_finished_at"] = time.time()
    return result


async def cmd_open(url: str, key: str, live: int, per_node: int) -> dict[str, Any]:
    async with meshline.open_nats_transport(url) as transport:
        gc.collect()
        before = rss_bytes()
        began = time.perf_counter()
        async with meshline.open_kv_registry_backend(transport, key) as backend:
            open_s = time.perf_counter() - began
            gc.collect()
            after = rss_bytes()
            peak = peak_rss_bytes()
            registry: meshline.ClientRegistry[dict[str, str]] = meshline.ClientRegistry(
                CLEANER_NODE, backend
            )
            nodes = max(1, -(-live // per_node))
            loaded = sum(
                [await registry.count_clients_for_node(FIRST_NODE + n) for n in range(nodes)]
            )
            get_us = await timed(
                lambda i: registry.get_client(client_id("live", i * 7919 % live)), 2000
            )
            count_us = await timed(
                lambda i: registry.count_clients_for_node(FIRST_NODE + i % nodes), 2000
            )
            list_node_us = await timed(
                lambda i: registry.list_clients_for_node(FIRST_NODE + i % nodes), 50
            )
            list_all_us = await timed(lambda i: registry.list_clients(), 3)
    return {
        "open_s": open_s,
        "loaded": loaded,
        "rss_before": before,
        "rss_delta": after - before,
        "peak_delta": max(peak, after) - before,
        "peak_bytes_per_client": (max(peak, after) - before) / max(live, 1),
        "bytes_per_client": (after - before) / max(live, 1),
        "get_us": get_us,
        "count_us": count_us,
        "list_node_us": list_node_us,
        "list_all_us": list_all_us,
    }


async def cmd_cleanup(url: str, key: str, count: int) -> dict[str, Any]:
    async with meshline.open_nats_transport(url) as transport:
        result = await fill(transport, key, "dead", count, lambda i: DEAD_NODE)
        async with meshline.open_kv_registry_backend(transport, key) as backend:
            registry: meshline.ClientRegistry[dict[str, str]] = meshline.ClientRegistry(
                CLEANER_NODE, backend
            )
            before = await registry.count_clients_for_node(DEAD_NODE)
            began = time.perf_counter()
            removed = await registry.cleanup_node(DEAD_NODE)
            elapsed = time.perf_counter() - began
            left = await registry.count_clients_for_node(DEAD_NODE)
    result.update(before=before, removed=len(removed), left=left, cleanup_s=elapsed)
    return result


async def cmd_rate(
    url: str, key: str, first: int, nodes: int, per_node: int, writers: int
) -> dict[str, Any]:
    async with trio.open_nursery() as nursery:
        registries: list[meshline.ClientRegistry[dict[str, str]]] = []
        done = trio.Event()

        async def node(index: int, task_status: trio.TaskStatus[None]) -> None:
            async with (
                meshline.open_nats_transport(url) as transport,
                meshline.open_kv_registry_backend(transport, key) as backend,
            ):
                registries.append(meshline.ClientRegistry(first + index, backend))
                task_status.started()
                await done.wait()

        for index in range(nodes):
            await nursery.start(node, index)
        print("ready", flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        began_wall, began = time.time(), time.perf_counter()

        async def register(registry: meshline.ClientRegistry[dict[str, str]], start: int) -> None:
            for index in range(start, per_node, writers):
                await registry.register(client_id(f"r{registry.node_id}", index), METADATA)

        async with trio.open_nursery() as writers_nursery:
            for registry in registries:
                for start in range(writers):
                    writers_nursery.start_soon(register, registry, start)
        elapsed = time.perf_counter() - began
        done.set()
    return {
        "registered": nodes * per_node,
        "began": began_wall,
        "ended": began_wall + elapsed,
        "rate": nodes * per_node / elapsed,
    }


COMMANDS: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
    "fill": cmd_fill,
    "churn": cmd_churn,
    "open": cmd_open,
    "cleanup": cmd_cleanup,
    "rate": cmd_rate,
}


def _arguments(values: list[str]) -> Iterator[str | int]:
    for value in values:
        yield int(value) if value.isdigit() else value


def main() -> None:
    command, *values = sys.argv[1:]
    result = trio.run(COMMANDS[command], *_arguments(values))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
