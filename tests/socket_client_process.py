"""Socket clients in a process of their own: ``python socket_client_process.py SPEC``.

``SPEC`` is JSON: ``{"clients": [{"id", "user", "urls"}, ...]}``. Each client
reconnects quickly (to the next URL of its list) and answers the request ``ask``
with ``"<id> says <data>"``, or hangs on ``"hang"`` until cancelled (then prints
``{"event": "cancelled", "client"}``). The process prints JSON lines:
``{"event": "connected", "client", "connection", "url"}`` on every (re)connection,
``{"event": "note", "client", "data"}`` for every ``note`` event and
``{"event": "ended", "client", "state"}`` when a client stops for good.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import trio

import meshline


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def run_client(spec: dict[str, Any]) -> None:
    client_id = spec["id"]
    reconnect = meshline.ReconnectOptions(base=0.05, cap=0.2)

    async def ask(data: Any) -> str:
        if data == "hang":
            try:
                await trio.sleep_forever()
            finally:
                say(event="cancelled", client=client_id)
        return f"{client_id} says {data}"

    async with meshline.open_socket_client(
        spec["urls"], client_id=client_id, query={"user": spec["user"]}, reconnect=reconnect
    ) as client:
        client.on("note", lambda data: say(event="note", client=client_id, data=data))
        client.implement("ask", ask)
        async with client.state_changes() as changes:
            say(event="connected", client=client_id, connection=client.connection_id)
            async for change in changes:
                if change.state is meshline.ClientState.CONNECTED:
                    say(event="connected", client=client_id, connection=client.connection_id)
                elif change.state in (meshline.ClientState.FAILED, meshline.ClientState.CLOSED):
                    say(event="ended", client=client_id, state=change.state.value)
                    return


async def main(spec: str) -> None:
    async with trio.open_nursery() as nursery:
        for client in json.loads(spec)["clients"]:
            nursery.start_soon(run_client, client)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
