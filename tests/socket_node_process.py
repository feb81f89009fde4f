"""A socket server on the mesh in a process of its own:
``python socket_node_process.py NATS_URL KEY [TTL]`` (TTL: the mesh node's
``ttl``, in seconds; meshline's default without it).

It listens on a free loopback port and prints JSON lines: first
``{"event": "ready", "node": id, "url": url}``, then one per hook call
(``online``, ``offline``, ``orphaned`` with the client ids, ``disconnected``).
It reads JSON commands on stdin and answers each with one JSON line:
``{"do": "views"}`` (its cluster view: ``count``, ``clients`` (client id: node
id), ``per_node`` (node id: connections), ``online``, ``room``, ``received``),
``{"do": "emit_user", "user", "data"}``,
``{"do": "emit_room", "room", "data"}``, ``{"do": "kick", "connection"}`` and
``{"do": "request", "connection", "data", "timeout"}``.
"""

from __future__ import annotations

import collections
import json
import sys
from typing import Any

import trio

import meshline


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def admit(request: meshline.SocketRequest) -> meshline.Admission:
    return meshline.Admission("member", user_id=request.query.get("user"))


async def serve_commands(server: meshline.SocketServer) -> None:
    lines = trio.wrap_file(sys.stdin)
    async for line in lines:
        command = json.loads(line)
        what = command["do"]
        try:
            if what == "views":
                cluster = server.cluster
                say(
                    answer="views",
                    count=cluster.count(),
                    clients={c.client_id: c.node_id for c in cluster.connections()},
                    per_node=dict(collections.Counter(c.node_id for c in cluster.connections())),
                    online=sorted(
                        {c.user_id for c in cluster.connections() if c.user_id is not None}
                    ),
                    room={c.client_id for c in cluster.room("hall")}.__len__(),
                    received=cluster.received,
                )
            elif what == "emit_user":
                await server.to_user(command["user"]).emit("note", command["data"])
                say(answer="sent")
            elif what == "emit_room":
                await server.to_room(command["room"]).emit("note", command["data"])
                say(answer="sent")
            elif what == "kick":
                await server.to_conn(command["connection"]).close()
                say(answer="sent")
            elif what == "request":
                result = await server.to_conn(command["connection"]).request(
                    "ask", command["data"], timeout=command["timeout"]
                )
                say(answer="result", result=result)
        except meshline.MeshlineError as exc:
            say(answer="error", type=type(exc).__name__, message=str(exc))


async def main(url: str, key: str, ttl: int | None) -> None:
    def on_connect(conn: meshline.Connection) -> None:
        conn.join("hall")

    async with (
        meshline.open_nats_transport(url) as transport,
        meshline.open_socket_server(
            roles=[meshline.Role("member")],
            authenticate=admit,
            mesh=meshline.MeshOptions(transport, key, node={} if ttl is None else {"ttl": ttl}),
            on_connect=on_connect,
            on_user_online=lambda user: say(event="online", user=user),
            on_user_offline=lambda user: say(event="offline", user=user),
            on_orphaned=lambda node, conns: say(
                event="orphaned", node=node, clients=sorted(c.client_id for c in conns)
            ),
            on_client_disconnected=lambda conn, reason: say(
                event="disconnected", client=conn.client_id, reason=str(reason)
            ),
        ) as server,
    ):
        say(event="ready", node=server.node_id, url=server.url)
        await serve_commands(server)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
