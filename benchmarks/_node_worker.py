"""One measurement for ``benchmarks/node.py``, run in its own process.

Usage: ``python _node_worker.py IMPL CASE URL COUNT [NODES]``. IMPL is ``nats-py``
(plain asyncio, the baseline) or ``meshline``; CASE is ``request`` or ``fanout``.
Prints one JSON object: ``{"rate": <operations per second>, ...}``.

* ``request``: 100 concurrent requesters on one connection, one responder on
  another, echoing a small payload. The nats-py side is the transport benchmark's
  own baseline; for meshline, two nodes and ``Node.request``.
* ``fanout``: one sender publishes COUNT broadcasts and NODES receivers, each on a
  connection of its own, count what they get. The rate is deliveries per second.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

from _transport_worker import PAYLOAD, REQUESTERS
from _transport_worker import run_nats_py as transport_baseline

SUBJECT = "bench.node"


def run_nats_py(case: str, url: str, count: int, nodes: int) -> dict[str, float]:
    import asyncio

    import nats

    async def fanout() -> dict[str, float]:
        receivers = [await nats.connect(url) for _ in range(nodes)]
        sender = await nats.connect(url)
        received = 0
        done = asyncio.Event()

        async def on_message(msg: object) -> None:
            nonlocal received
            received += 1
            if received >= count * nodes:
                done.set()

        for nc in receivers:
            await nc.subscribe(SUBJECT, cb=on_message, pending_msgs_limit=count + 1)
            await nc.flush()
        start = time.perf_counter()
        for _ in range(count):
            await sender.publish(SUBJECT, PAYLOAD)
        await sender.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 60)
        elapsed = time.perf_counter() - start
        for nc in [*receivers, sender]:
            await nc.close()
        return {"rate": received / elapsed, "received": received}

    if case == "request":
        return transport_baseline("request", url, count)
    return asyncio.run(fanout())


def run_meshline(case: str, url: str, count: int, nodes: int) -> dict[str, float]:
    from contextlib import AsyncExitStack

    import trio

    import meshline

    async def open_nodes(stack: AsyncExitStack, how_many: int) -> list[meshline.Node]:
        opened = []
        for _ in range(how_many):
            transport = await stack.enter_async_context(meshline.open_nats_transport(url))
            # Buffers as deep as the baseline's pending_msgs_limit: neither side drops.
            node = meshline.open_node(transport, "bench", buffer=count + 1)
            opened.append(await stack.enter_async_context(node))
        return opened

    async def request() -> dict[str, float]:
        async with AsyncExitStack() as stack:
            caller, target = await open_nodes(stack, 2)

            async def echo(data: bytes, sender: int) -> bytes:
                return data

            target.register_handler("echo", echo)
            per_task = count // REQUESTERS

            async def requester() -> None:
                for _ in range(per_task):
                    await caller.request(target.id, "echo", PAYLOAD, timeout=10)

            start = time.perf_counter()
            async with trio.open_nursery() as requesters:
                for _ in range(REQUESTERS):
                    requesters.start_soon(requester)
            elapsed = time.perf_counter() - start
            return {"rate": per_task * REQUESTERS / elapsed}

    async def fanout() -> dict[str, float]:
        async with AsyncExitStack() as stack:
            sender, *receivers = await open_nodes(stack, nodes + 1)
            received = 0

            def on_broadcast(data: bytes, sender_id: int) -> None:
                nonlocal received
                received += 1

            for node in receivers:
                node.register_broadcast_handler("tick", on_broadcast)
            start = time.perf_counter()
            for _ in range(count):
                await sender.broadcast("tick", PAYLOAD, skip_self=True)
            with trio.move_on_after(60):
                while received < count * nodes:
                    await trio.sleep(0.001)
            elapsed = time.perf_counter() - start
            dropped = sum(node.dropped for node in receivers)
            return {"rate": received / elapsed, "received": received, "dropped": dropped}

    return trio.run(request if case == "request" else fanout)


def main() -> None:
    impl, case, url, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    nodes = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    runner = run_nats_py if impl == "nats-py" else run_meshline
    print(json.dumps(runner(case, url, count, nodes)))


if __name__ == "__main__":
    main()
