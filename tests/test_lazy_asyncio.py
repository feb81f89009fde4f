"""meshline leaves asyncio alone until NATS is used, and the memory hub's route
cache stays bounded (issue 10, item 5).

trio-asyncio patches asyncio for the whole process when it is imported, so the
import checks run in a fresh interpreter each.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import trio

import meshline
from meshline._transport._memory import ROUTE_CACHE_SIZE
from meshline.testing import NatsServer

MEMORY_APP = """
import asyncio
import sys

policy = asyncio.get_event_loop_policy()
patched = (
    asyncio.get_event_loop_policy,
    asyncio.set_event_loop_policy,
    asyncio.new_event_loop,
    asyncio.get_event_loop,
    asyncio.get_running_loop,
)

import trio

import meshline
import meshline.testing


def untouched(where):
    assert "trio_asyncio" not in sys.modules, f"trio_asyncio imported {where}"
    assert asyncio.get_event_loop_policy() is policy, f"policy replaced {where}"
    now = (
        asyncio.get_event_loop_policy,
        asyncio.set_event_loop_policy,
        asyncio.new_event_loop,
        asyncio.get_event_loop,
        asyncio.get_running_loop,
    )
    assert now == patched, f"asyncio patched {where}"


untouched("by importing meshline")


async def app():
    hub = meshline.MemoryHub()
    async with (
        meshline.open_memory_transport(hub) as left,
        meshline.open_memory_transport(hub) as right,
    ):
        async with meshline.open_node(left, "app") as one, meshline.open_node(right, "app") as two:

            async def echo(data, sender):
                return data

            two.register_handler("echo", echo)
            with trio.fail_after(10):
                while not one.is_alive(two.id):
                    await trio.sleep(0.01)
                assert await one.request(two.id, "echo", "hi") == "hi"
        kv = await left.key_value("bucket", replicas=3, storage="memory")
        await kv.put("k", b"v")
        assert (await (await right.key_value("bucket")).get("k")).value == b"v"


trio.run(app)
untouched("by a memory-transport app")


async def loop_module():
    return type(asyncio.get_running_loop()).__module__


assert asyncio.run(loop_module()).startswith("asyncio."), "asyncio.run is not plain asyncio"
print("memory ok")
"""

NATS_APP = """
import sys

import trio

import meshline

assert "trio_asyncio" not in sys.modules


async def app(url):
    async with meshline.open_nats_transport(url) as transport:
        async with transport.subscribe("lazy.check") as subscription:
            await transport.publish("lazy.check", b"hello")
            with trio.fail_after(10):
                assert (await subscription.receive()).data == b"hello"
        kv = await transport.key_value("lazy")
        await kv.put("k", b"v")
        assert (await kv.get("k")).value == b"v"


trio.run(app, sys.argv[1])
assert "trio_asyncio" in sys.modules
print("nats ok")
"""


def run_python(code: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_importing_meshline_and_a_memory_app_leave_asyncio_alone() -> None:
    assert "memory ok" in run_python(MEMORY_APP)


def test_opening_a_nats_transport_still_works(nats_server: NatsServer) -> None:
    assert "nats ok" in run_python(NATS_APP, nats_server.url)


async def test_the_route_cache_stays_bounded() -> None:
    hub = meshline.MemoryHub()
    requests = 2 * ROUTE_CACHE_SIZE + 1_000
    async with (
        meshline.open_memory_transport(hub) as server,
        meshline.open_memory_transport(hub) as client,
        server.subscribe("svc.echo") as subscription,
        trio.open_nursery() as nursery,
    ):

        async def answer() -> None:
            async for message in subscription:
                assert message.reply is not None
                await server.publish(message.reply, message.data)

        nursery.start_soon(answer)
        for index in range(requests):
            data = str(index).encode()
            assert (await client.request("svc.echo", data, timeout=10)).data == data
        # Every request's reply went to an inbox subject of its own.
        assert len(hub._routes) <= ROUTE_CACHE_SIZE
        nursery.cancel_scope.cancel()
