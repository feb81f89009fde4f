"""A mesh node in a process of its own, for crash tests: ``python node_process.py URL KEY``.

It prints one JSON line with its node id once it has joined, then serves until
killed. Handlers: ``pid`` answers the process id; ``stall`` blocks until cancelled
and then broadcasts ``stall-cancelled``.
"""

from __future__ import annotations

import json
import os
import sys

import trio

import meshline


async def main(url: str, key: str) -> None:
    async with (
        meshline.open_nats_transport(url) as transport,
        meshline.open_node(transport, key) as node,
    ):

        async def pid(data: object, sender: int) -> int:
            return os.getpid()

        async def stall(data: object, sender: int) -> None:
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await node.broadcast("stall-cancelled", sender)

        node.register_handler("pid", pid)
        node.register_handler("stall", stall)
        print(json.dumps({"id": node.id}), flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2])
