"""One measurement for ``benchmarks/registry.py``, run in its own process.

Usage: ``python _registry_worker.py IMPL CASE URL COUNT``. IMPL is ``nats-py``
(plain asyncio KV, the baseline) or ``meshline``. CASE is ``writes`` (register,
update and unregister throughput; nats-py does create, update and delete) or
``reads`` (fill COUNT registrations, then time local reads; meshline only).
Prints one JSON object.

Writes use 50 concurrent writers on one connection, each on keys of its own.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

WRITERS = 50
METADATA = {"user_id": "user-1", "role": "admin"}


def run_nats_py(url: str, count: int) -> dict[str, float]:
    import asyncio

    import msgspec
    import nats
    from nats.js.api import KeyValueConfig

    async def main() -> dict[str, float]:
        nc = await nats.connect(url)
        js = nc.jetstream()
        kv = await js.create_key_value(KeyValueConfig(bucket=f"base{time.time_ns()}", history=1))
        per_writer = count // WRITERS
        value = msgspec.msgpack.encode(["client", 1, 0, msgspec.msgpack.encode(METADATA)])
        revisions: dict[str, int] = {}

        async def phase(action: str) -> float:
            async def writer(index: int) -> None:
                for item in range(per_writer):
                    key = f"c.w{index}-{item}"
                    if action == "register":
                        revisions[key] = await kv.create(key, value)
                    elif action == "update":
                        revisions[key] = await kv.update(key, value, last=revisions[key])
                    else:
                        await kv.delete(key, last=revisions[key])

            start = time.perf_counter()
            await asyncio.gather(*(writer(index) for index in range(WRITERS)))
            return per_writer * WRITERS / (time.perf_counter() - start)

        rates = {action: await phase(action) for action in ("register", "update", "unregister")}
        await nc.close()
        return rates

    return asyncio.run(main())


def run_meshline(case: str, url: str, count: int) -> dict[str, float]:
    import trio

    import meshline

    async def writes() -> dict[str, float]:
        async with (
            meshline.open_nats_transport(url) as transport,
            meshline.open_kv_registry_backend(transport, f"bench{time.time_ns()}") as backend,
        ):
            registry: meshline.ClientRegistry[dict[str, str]] = meshline.ClientRegistry(1, backend)
            per_writer = count // WRITERS

            async def phase(action: str) -> float:
                async def writer(index: int) -> None:
                    for item in range(per_writer):
                        client_id = f"w{index}-{item}"
                        if action == "register":
                            await registry.register(client_id, METADATA)
                        elif action == "update":
                            await registry.update_metadata(client_id, METADATA)
                        else:
                            await registry.unregister(client_id)

                start = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for index in range(WRITERS):
                        nursery.start_soon(writer, index)
                return per_writer * WRITERS / (time.perf_counter() - start)

            return {action: await phase(action) for action in ("register", "update", "unregister")}

    async def reads() -> dict[str, float]:
        async with (
            meshline.open_nats_transport(url) as transport,
            meshline.open_kv_registry_backend(transport, f"reads{time.time_ns()}") as backend,
        ):
            registry: meshline.ClientRegistry[dict[str, str]] = meshline.ClientRegistry(1, backend)
            filled = time.perf_counter()

            async def fill(start: int) -> None:
                for index in range(start, count, 200):
                    await registry.register(f"client-{index}", METADATA)

            async with trio.open_nursery() as nursery:
                for start in range(200):
                    nursery.start_soon(fill, start)
            fill_rate = count / (time.perf_counter() - filled)

            async def timed(read, rounds: int) -> float:  # type: ignore[no-untyped-def]
                samples = []
                for index in range(rounds):
                    began = time.perf_counter()
                    await read(index)
                    samples.append(time.perf_counter() - began)
                return statistics.median(samples) * 1e6

            get_us = await timed(lambda i: registry.get_client(f"client-{i * 7 % count}"), 2000)
            count_us = await timed(lambda i: registry.count_clients_for_node(1), 2000)
            list_us = await timed(lambda i: registry.list_clients(), 5)
            return {
                "fill_rate": fill_rate,
                "get_p50_us": get_us,
                "count_p50_us": count_us,
                "list_p50_us": list_us,
            }

    return trio.run(writes if case == "writes" else reads)


def main() -> None:
    impl, case, url, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    result = run_nats_py(url, count) if impl == "nats-py" else run_meshline(case, url, count)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
