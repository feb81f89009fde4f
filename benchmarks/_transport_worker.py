"""One measurement for ``benchmarks/transport.py``, run in its own process.

Usage: ``python _transport_worker.py IMPL CASE URL COUNT`` where IMPL is ``nats-py``
(plain asyncio, the baseline) or ``meshline``, and CASE is ``publish`` or ``request``.
Prints one JSON object: ``{"rate": <operations per second>, ...}``.

Both implementations do the same work: a publisher (or 100 requesters) on one
connection and a subscriber (or responder) on another, against the same server.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

PAYLOAD = b"x" * 64
REQUESTERS = 100
SUBJECT = "bench.data"


def run_nats_py(case: str, url: str, count: int) -> dict[str, float]:
    import asyncio

    import nats

    async def publish() -> dict[str, float]:
        sub_nc = await nats.connect(url)
        pub_nc = await nats.connect(url)
        received = 0
        done = asyncio.Event()

        async def on_message(msg: object) -> None:
            nonlocal received
            received += 1
            if received >= count:
                done.set()

        await sub_nc.subscribe(SUBJECT, cb=on_message, pending_msgs_limit=count + 1)
        await sub_nc.flush()
        start = time.perf_counter()
        for _ in range(count):
            await pub_nc.publish(SUBJECT, PAYLOAD)
        await pub_nc.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 60)
        elapsed = time.perf_counter() - start
        await sub_nc.close()
        await pub_nc.close()
        return {"rate": received / elapsed, "received": received}

    async def request() -> dict[str, float]:
        server_nc = await nats.connect(url)
        client_nc = await nats.connect(url)

        async def respond(msg: object) -> None:
            await server_nc.publish(msg.reply, msg.data)  # type: ignore[attr-defined]

        await server_nc.subscribe(SUBJECT, cb=respond)
        await server_nc.flush()
        per_task = count // REQUESTERS

        async def requester() -> None:
            for _ in range(per_task):
                await client_nc.request(SUBJECT, PAYLOAD, timeout=10)

        start = time.perf_counter()
        await asyncio.gather(*(requester() for _ in range(REQUESTERS)))
        elapsed = time.perf_counter() - start
        await server_nc.close()
        await client_nc.close()
        return {"rate": per_task * REQUESTERS / elapsed}

    return asyncio.run(publish() if case == "publish" else request())


def run_meshline(case: str, url: str, count: int) -> dict[str, float]:
    import trio

    import meshline

    async def publish() -> dict[str, float]:
        async with (
            meshline.open_nats_transport(url) as sub_transport,
            meshline.open_nats_transport(url) as pub_transport,
            sub_transport.subscribe(SUBJECT, limit=count + 1) as subscription,
        ):
            received = 0
            start = time.perf_counter()

            async def consume() -> None:
                nonlocal received
                async for _ in subscription:
                    received += 1
                    if received >= count:
                        return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                for _ in range(count):
                    await pub_transport.publish(SUBJECT, PAYLOAD)
                with trio.move_on_after(60):
                    while received < count:
                        await trio.sleep(0.001)
                nursery.cancel_scope.cancel()
            elapsed = time.perf_counter() - start
            return {"rate": received / elapsed, "received": received}

    async def request() -> dict[str, float]:
        async with (
            meshline.open_nats_transport(url) as server,
            meshline.open_nats_transport(url) as client,
            server.subscribe(SUBJECT) as subscription,
        ):

            async def respond() -> None:
                async for msg in subscription:
                    assert msg.reply is not None
                    await server.publish(msg.reply, msg.data)

            per_task = count // REQUESTERS

            async def requester() -> None:
                for _ in range(per_task):
                    await client.request(SUBJECT, PAYLOAD, timeout=10)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(respond)
                start = time.perf_counter()
                async with trio.open_nursery() as requesters:
                    for _ in range(REQUESTERS):
                        requesters.start_soon(requester)
                elapsed = time.perf_counter() - start
                nursery.cancel_scope.cancel()
            return {"rate": per_task * REQUESTERS / elapsed}

    return trio.run(publish if case == "publish" else request)


def main() -> None:
    impl, case, url, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    runner = run_nats_py if impl == "nats-py" else run_meshline
    print(json.dumps(runner(case, url, count)))


if __name__ == "__main__":
    main()
