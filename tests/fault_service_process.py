"""A client-service node in a process of its own, for fault injection.

Usage::

    python fault_service_process.py URL KEY COUNT PREFIX [--ttl 2] [--reassert-interval 10]

The process joins the client service ``KEY`` on the NATS server at ``URL`` as a new
node, registers ``COUNT`` clients called ``PREFIX0`` ... ``PREFIX<COUNT-1>``, then
serves until it is killed, told to quit, or its stdin closes (so it never outlives
the process that drives it).

It speaks a line protocol: one JSON object per line on stdout (flushed at once),
one command per line on stdin. ``tests/fault_cluster.py`` is the driver.

Lines it prints, told apart by ``"event"``:

- ``ready``, once all clients are registered: ``id`` (the node id), ``pid``,
  ``registered``.
- ``orphaned`` / ``restored``, for every call of the service's ``on_orphaned`` /
  ``on_restored`` hook: ``node_id`` (the hook's first argument), ``clients`` (the
  client ids), ``incarnations`` (those recorded in the clients, sorted), ``t`` (the
  wall clock, ``time.time()``, when the hook was called).
- ``status``, the answer to a ``status`` command: ``seq`` (echoed), ``t`` (wall
  clock when the view was read), ``id``, ``connected`` (the transport's state),
  ``trustworthy`` (whether the node's view may declare nodes dead; null if the
  library has no ``Node.view_is_trustworthy``), ``leader``
  (``is_leader``), ``leader_id``, ``incarnation``, ``alive`` (the node ids alive in
  its view), ``counts`` (visible clients per alive node, as a JSON object keyed by
  node id). With ``full``, ``counts`` comes from ``client_registry.list_clients()``
  and the line also carries ``clients``: every visible client as ``[id, node_id]``.
  Without it, ``counts`` comes from ``count_clients_for_node`` for each alive node,
  which is cheap enough to ask for every 50 ms.

Commands: ``status SEQ`` or ``status SEQ full``; ``quit`` (leave the service
gracefully, which unregisters this node's clients).

Logging goes to stderr at WARNING, so the library's warnings (reconnects, stale
views, restored registrations) land in whatever file the driver gives as stderr.
Every hook call is also logged there, to line the two up.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import trio

import meshline

logger = logging.getLogger("fault_service_process")

REGISTER_CONCURRENCY = 64
"""Registrations in flight at once while the node starts."""


def emit(message: dict[str, Any]) -> None:
    """Print ``message`` as one JSON line and flush it.

    This blocks the event loop if the driver stops reading; the driver always reads.
    """
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def client_ids(prefix: str, count: int) -> list[str]:
    """The ids of the clients a process started with ``prefix`` and ``count`` holds."""
    return [f"{prefix}{index}" for index in range(count)]


def _hook(kind: str) -> Callable[[int, list[meshline.RegisteredClient[Any]]], None]:
    """A hook that reports each call as a ``kind`` line and logs it."""

    def report(node_id: int, clients: list[meshline.RegisteredClient[Any]]) -> None:
        now = time.time()
        ids = [client.client_id for client in clients]
        incarnations = sorted({client.incarnation for client in clients})
        logger.warning("hook %s: node %d, %d clients", kind, node_id, len(ids))
        emit(
            {
                "event": kind,
                "node_id": node_id,
                "clients": ids,
                "incarnations": incarnations,
                "t": now,
            }
        )

    return report


async def _status(
    service: meshline.ClientService[Any],
    transport: meshline.Transport,
    seq: int,
    full: bool,
) -> dict[str, Any]:
    """Read this node's view into a ``status`` line."""
    node = service.node
    registry = service.client_registry
    alive = sorted(node.alive_nodes())
    message: dict[str, Any] = {
        "event": "status",
        "seq": seq,
        "id": service.instance_id,
        "connected": bool(getattr(transport, "connected", True)),
        "trustworthy": getattr(node, "view_is_trustworthy", None),
        "leader": node.is_leader,
        "leader_id": node.leader_id,
        "incarnation": getattr(node, "incarnation", None),
        "alive": alive,
    }
    if full:
        clients = await registry.list_clients()
        counts: dict[int, int] = {}
        for client in clients:
            counts[client.node_id] = counts.get(client.node_id, 0) + 1
        message["clients"] = [[client.client_id, client.node_id] for client in clients]
    else:
        counts = {node_id: await registry.count_clients_for_node(node_id) for node_id in alive}
    message["counts"] = {str(node_id): count for node_id, count in counts.items()}
    message["t"] = time.time()
    return message


async def _serve_commands(
    service: meshline.ClientService[Any], transport: meshline.Transport
) -> None:
    """Answer commands from stdin; return on ``quit`` or at the end of input."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    pending = b""
    async with stdin:
        while True:
            chunk = await stdin.receive_some(65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                words = line.decode().split()
                if not words:
                    continue
                if words[0] == "quit":
                    return
                if words[0] == "status" and len(words) >= 2:
                    full = "full" in words[2:]
                    emit(await _status(service, transport, int(words[1]), full))
                else:
                    logger.warning("unknown command %r", line)


async def _register_all(service: meshline.ClientService[Any], ids: list[str]) -> None:
    """Register every client in ``ids``, a bounded number at a time."""
    limiter = trio.CapacityLimiter(REGISTER_CONCURRENCY)

    async def register(client_id: str) -> None:
        async with limiter:
            await service.register_client(client_id, {"pid": os.getpid()})

    async with trio.open_nursery() as nursery:
        for client_id in ids:
            nursery.start_soon(register, client_id)


async def _answer_invoke(client_id: str, kind: str, data: Any, timeout: float) -> Any:
    """Answer any invoke with this process's pid: the scenarios only watch presence."""
    return {"pid": os.getpid(), "client": client_id}


async def main(arguments: argparse.Namespace) -> None:
    """Join, register, report ready, then serve commands until told to stop."""
    ids = client_ids(arguments.prefix, arguments.count)
    async with (
        meshline.open_nats_transport(arguments.url) as transport,
        meshline.open_client_service(
            transport,
            arguments.key,
            client_invoke=_answer_invoke,
            on_orphaned=_hook("orphaned"),
            on_restored=_hook("restored"),
            reassert_interval=arguments.reassert_interval,
            ttl=arguments.ttl,
        ) as service,
    ):
        await _register_all(service, ids)
        emit(
            {
                "event": "ready",
                "id": service.instance_id,
                "pid": os.getpid(),
                "registered": len(ids),
            }
        )
        await _serve_commands(service, transport)


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("key")
    parser.add_argument("count", type=int)
    parser.add_argument("prefix")
    parser.add_argument("--ttl", type=int, default=2)
    parser.add_argument("--reassert-interval", type=float, default=10.0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s.%(msecs)03d pid=%(process)d %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    trio.run(main, parse_arguments(sys.argv[1:]))
