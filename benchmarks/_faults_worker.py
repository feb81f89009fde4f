"""One round of one scenario for ``benchmarks/faults.py``, in its own process.

Usage: ``python _faults_worker.py SCENARIO NODES CLIENTS TTL LOG_DIR``.

Starts a fresh nats-server, ``NODES`` node processes with ``CLIENTS`` clients each
(``tests/fault_service_process.py``, driven by ``tests/fault_cluster.py``), injects
the fault and prints one JSON object: the scenario's result fields, plus
``scenario``, ``log_dir`` and ``server_log`` (the server's last lines). SCENARIO is
``restart-0.5``, ``restart-5``, ``stall`` (SIGSTOP for 1.5 x TTL), ``kill`` (SIGKILL
of a node that does not lead) or ``kill-leader``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshline.testing import NatsServer
from tests.fault_cluster import (
    kill_scenario,
    open_fault_cluster,
    restart_scenario,
    stall_scenario,
)

SCENARIOS = ("restart-0.5", "restart-5", "stall", "kill", "kill-leader")


async def run(scenario: str, nodes: int, clients: int, ttl: int, log_dir: Path) -> dict[str, Any]:
    """Run ``scenario`` once against a server of its own; return its result as a dict."""
    with NatsServer() as server:
        key = f"faults{time.time_ns()}"
        async with open_fault_cluster(
            server, key, log_dir=log_dir, nodes=nodes, clients=clients, ttl=ttl
        ) as cluster:
            result: Any
            if scenario.startswith("restart-"):
                result = await restart_scenario(cluster, float(scenario.split("-", 1)[1]))
            elif scenario == "stall":
                result = await stall_scenario(cluster, 1.5 * ttl)
            elif scenario == "kill":
                result = await kill_scenario(cluster, victim_role="follower")
            elif scenario == "kill-leader":
                result = await kill_scenario(cluster, victim_role="leader")
            else:
                raise SystemExit(f"unknown scenario {scenario!r}; one of {SCENARIOS}")
            outcome: dict[str, Any] = attrs.asdict(result)
            outcome["hook_reports"] = len(cluster.reports)
        outcome["server_log"] = server.log_tail(15)
    outcome["scenario"] = scenario
    outcome["log_dir"] = str(log_dir)
    return outcome


def main() -> None:
    scenario, nodes, clients, ttl, log_dir = sys.argv[1:6]
    outcome = trio.run(run, scenario, int(nodes), int(clients), int(ttl), Path(log_dir))
    print(json.dumps(outcome))


if __name__ == "__main__":
    main()
