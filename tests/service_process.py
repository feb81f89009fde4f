"""A client-service node in a process of its own: ``python service_process.py URL KEY CLIENT...``.

It registers the given clients, prints one JSON line with its node id, then serves
until killed. ``client_invoke`` answers ``{"pid", "client", "echo"}``; type ``fail``
raises ``KeyError``; type ``stall`` blocks until cancelled and then broadcasts
``stall-cancelled`` with the client id.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import trio

import meshline


async def main(url: str, key: str, clients: list[str]) -> None:
    service_box: list[meshline.ClientService[Any]] = []

    async def client_invoke(client_id: str, kind: str, data: Any, timeout: float) -> Any:
        if kind == "fail":
            raise KeyError(data)
        if kind == "stall":
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await service_box[0].broadcast("stall-cancelled", client_id)
        return {"pid": os.getpid(), "client": client_id, "echo": data}

    async with (
        meshline.open_nats_transport(url) as transport,
        meshline.open_client_service(transport, key, client_invoke=client_invoke) as service,
    ):
        service_box.append(service)
        for client_id in clients:
            await service.register_client(client_id, {"pid": os.getpid()})
        print(json.dumps({"id": service.instance_id}), flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3:])
