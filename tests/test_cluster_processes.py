"""Cluster sockets across processes: three socket servers in processes of their own on
one real NATS server, with real WebSocket clients in another process.

One scenario, step by step: a user with two devices on two nodes, a room spanning the
nodes, requests across nodes (answered, timed out, cancelled, unknown), a kick, a
client moving from one node to another, and a SIGKILLed node whose clients either
move to the survivors (they were given every URL) or are reported orphaned, once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from meshline.testing import NatsServer
from tests.json_processes import POLL, Process, spawn

HERE = Path(__file__).parent

pytestmark = pytest.mark.slow


async def test_three_node_processes_with_clients_in_another(nats_server: NatsServer) -> None:
    key = f"procs-{os.getpid()}"
    async with trio.open_nursery() as nursery:
        async with (
            spawn(nursery, str(HERE / "socket_node_process.py"), nats_server.url, key, "1") as n1,
            spawn(nursery, str(HERE / "socket_node_process.py"), nats_server.url, key, "1") as n2,
            spawn(nursery, str(HERE / "socket_node_process.py"), nats_server.url, key, "1") as n3,
        ):
            nodes = [n1, n2, n3]
            for node in nodes:
                await node.until(lambda node=node: bool(node.events("ready")))
            ids = [node.events("ready")[0]["node"] for node in nodes]
            urls = [node.events("ready")[0]["url"] for node in nodes]
            spec = {
                "clients": [
                    # ada's phone lists every node; her laptop only node 2.
                    {"id": "ada-phone", "user": "ada", "urls": urls},
                    {"id": "ada-laptop", "user": "ada", "urls": [urls[1]]},
                    # bob knows node 1 only: when it dies, he is orphaned.
                    {"id": "bob", "user": "bob", "urls": [urls[0]]},
                    {"id": "cy", "user": "cy", "urls": [urls[2]]},
                ]
            }
            async with spawn(
                nursery, str(HERE / "socket_client_process.py"), json.dumps(spec)
            ) as c:

                def connection_of(client: str) -> str:
                    return str(
                        [e for e in c.events("connected") if e["client"] == client][-1][
                            "connection"
                        ]
                    )

                await c.until(lambda: len({e["client"] for e in c.events("connected")}) == 4)

                async def views(node: Process) -> dict[str, Any]:
                    return await node.ask(do="views")

                async def settled(node: Process, check: Callable[[dict[str, Any]], bool]) -> None:
                    with trio.fail_after(30):
                        while not check(await views(node)):
                            await trio.sleep(POLL)

                for node in nodes:
                    await settled(node, lambda v: v["count"] == 4)
                where = (await views(n3))["clients"]
                assert where == {
                    "ada-phone": ids[0],
                    "ada-laptop": ids[1],
                    "bob": ids[0],
                    "cy": ids[2],
                }

                # to_user reaches both of ada's devices, on two nodes, from a third.
                await n3.ask(do="emit_user", user="ada", data="hi ada")
                await c.until(
                    lambda: (
                        {e["client"] for e in c.events("note") if e["data"] == "hi ada"}
                        == {"ada-phone", "ada-laptop"}
                    )
                )

                # A room spanning the nodes: every member hears it.
                await n2.ask(do="emit_room", room="hall", data="all hands")
                await c.until(
                    lambda: len([e for e in c.events("note") if e["data"] == "all hands"]) == 4
                )

                # Requests across nodes.
                answer = await n3.ask(
                    do="request", connection=connection_of("ada-laptop"), data="ping", timeout=10
                )
                assert answer == {"answer": "result", "result": "ada-laptop says ping"}
                answer = await n3.ask(
                    do="request", connection=connection_of("ada-laptop"), data="hang", timeout=0.5
                )
                assert answer["type"] == "SocketTimeoutError"
                await c.until(
                    lambda: any(e["client"] == "ada-laptop" for e in c.events("cancelled"))
                )
                answer = await n3.ask(
                    do="request", connection=f"{ids[1]}.gone.1", data="x", timeout=3600
                )
                assert answer["type"] == "ConnectionNotFoundError"

                # A kick across nodes is terminal: cy does not come back.
                await n1.ask(do="kick", connection=connection_of("cy"))
                await c.until(lambda: any(e["client"] == "cy" for e in c.events("ended")))
                await settled(n1, lambda v: "cy" not in v["clients"])

                # SIGKILL node 1: the phone moves to a survivor; bob is orphaned, once.
                n1.kill()
                await settled(
                    n2,
                    lambda v: (
                        v["clients"].get("ada-phone") in (ids[1], ids[2])
                        and "bob" not in v["clients"]
                    ),
                )
                survivors = [n2, n3]
                for node in survivors:
                    await settled(node, lambda v: set(v["clients"]) == {"ada-phone", "ada-laptop"})
                await n2.until(
                    lambda: bool([e for node in survivors for e in node.events("orphaned")])
                )
                orphaned = [e for node in survivors for e in node.events("orphaned")]
                assert [(e["node"], e["clients"]) for e in orphaned] == [(ids[0], ["bob"])]

                # The user hooks end in the truth: ada online all along, bob and cy offline.
                said: list[tuple[str, str]] = []

                def hooks_settled() -> bool:
                    said.clear()
                    for node in nodes:
                        for line in node.lines:
                            if line.get("event") in ("online", "offline"):
                                said.append((line["event"], line["user"]))
                    online: set[str] = set()
                    for kind, user in said:
                        (online.add if kind == "online" else online.discard)(user)
                    return online == {"ada"}

                await n2.until(hooks_settled)
                assert ("offline", "ada") not in said
