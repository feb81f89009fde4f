"""One measurement for ``benchmarks/invoke.py``, run in its own process.

Usage: ``python _invoke_worker.py IMPL CASE URL COUNT``. IMPL ``nats-py`` runs the
baseline (nats-py request/reply on asyncio, from ``_transport_worker``); IMPL
``meshline`` runs CASE ``remote`` (100 concurrent callers on one service node invoke
a client registered on another) or ``local`` (the client is on the caller's node).
Prints one JSON object: ``{"rate": <invokes per second>}``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from _transport_worker import PAYLOAD, REQUESTERS
from _transport_worker import run_nats_py as run_request_baseline


def run_meshline(case: str, url: str, count: int) -> dict[str, float]:
    from contextlib import AsyncExitStack

    import trio

    import meshline

    async def echo(client_id: str, kind: str, data: Any, timeout: float) -> Any:
        return data

    async def main() -> dict[str, float]:
        async with AsyncExitStack() as stack:
            services = []
            key = f"bench{time.time_ns()}"
            for _ in range(2):
                transport = await stack.enter_async_context(meshline.open_nats_transport(url))
                service = meshline.open_client_service(
                    transport,
                    key,
                    client_invoke=echo,
                    buffer=count + 1,
                )
                opened = await stack.enter_async_context(service)
                services.append(opened)
            caller, owner = services
            holder = caller if case == "local" else owner
            await holder.register_client("client-1", {})
            with trio.fail_after(10):
                while await caller.client_registry.get_client("client-1") is None:
                    await trio.sleep(0.01)
            per_task = count // REQUESTERS

            async def invoker() -> None:
                for _ in range(per_task):
                    await caller.invoke("client-1", "echo", PAYLOAD, timeout=10)

            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(REQUESTERS):
                    nursery.start_soon(invoker)
            return {"rate": per_task * REQUESTERS / (time.perf_counter() - start)}

    return trio.run(main)


def main() -> None:
    impl, case, url, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if impl == "nats-py":
        result = run_request_baseline("request", url, count)
    else:
        result = run_meshline(case, url, count)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
