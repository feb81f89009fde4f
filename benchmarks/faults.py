"""Benchmark: how presence comes through faults, measured from outside the nodes.

Three client-service nodes run in processes of their own (``tests/fault_service_
process.py``) against a fresh nats-server; the driver (``tests/fault_cluster.py``)
asks every node for its view every 50 ms and collects the nodes' ``on_orphaned`` /
``on_restored`` calls. Scenarios, each round in a fresh worker process with a fresh
server:

* ``restart-0.5`` / ``restart-5``: the server is SIGKILLed and started again on the
  same port and store after 0.5 s / 5 s.
* ``stall``: a node that does not lead is SIGSTOPped for 1.5 x ttl, then SIGCONTed.
* ``kill`` / ``kill-leader``: a node that does not lead / the leader is SIGKILLed.

For each it prints (medians over rounds for times, totals for counts):

* ``recovery``: seconds from the server's return (or the SIGCONT) until every view
  was whole (connected, every node alive, every client visible) for good;
* ``false``: ``on_orphaned`` entries for clients whose node never died or stalled;
* ``lost``: held clients missing from some view once the cluster settled;
* for the kills, ``detect``: seconds from the SIGKILL until every other view dropped
  the node, and ``orphans``: until the leader had reported all its clients orphaned.

Targets (issue 9): 0 false orphans and 0 lost across both restarts; views whole
within ttl + 1 s of the server's return; a SIGKILLed node detected within 3 s.

The last line is ``false_orphans=<int> lost=<int> restart_recovery_s=<float>``:
totals over every scenario and round, and the worse of the two restarts' median
recovery (``inf`` if a restart never recovered).

Usage: ``python benchmarks/faults.py [--quick] [--rounds N]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("_faults_worker.py")
LIBRARY = Path(__file__).resolve().parents[1] / "meshline"
SCENARIOS = ("restart-0.5", "restart-5", "stall", "kill", "kill-leader")
NODES = 3
TTL = 2


def library_fingerprint() -> str:
    """A short hash of meshline's sources, to tell whether they changed during a run
    (the library under test is imported afresh by every node process)."""
    digest = hashlib.sha256()
    for path in sorted(LIBRARY.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def run_round(scenario: str, clients: int, log_dir: Path) -> dict[str, Any]:
    """Run one round in a fresh worker; on failure, return ``{"error": ...}``."""
    try:
        completed = subprocess.run(
            [sys.executable, str(WORKER), scenario, str(NODES), str(clients), str(TTL), log_dir],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=WORKER.parent,
        )
    except subprocess.CalledProcessError as exc:
        return {"error": (exc.stderr or "").strip().splitlines()[-20:], "log_dir": str(log_dir)}
    except subprocess.TimeoutExpired:
        return {"error": ["the worker timed out after 300 s"], "log_dir": str(log_dir)}
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def median_of(outcomes: list[dict[str, Any]], field: str) -> float:
    """The median of ``field`` over ``outcomes``: NaN where the scenario does not
    measure it, infinity where it never happened (the value is None)."""
    values = [outcome[field] for outcome in outcomes if field in outcome]
    if not values:
        return math.nan
    return statistics.median(math.inf if value is None else value for value in values)


def seconds(value: float) -> str:
    return "never" if math.isinf(value) else ("-" if math.isnan(value) else f"{value:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 clients per node, 1 round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per scenario")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated subset to run"
    )
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    clients = 200 if args.quick else 1000
    scenarios = [name for name in args.scenarios.split(",") if name]
    log_root = Path(tempfile.mkdtemp(prefix="meshline-faults-"))

    fingerprint = library_fingerprint()
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in scenarios}
    for round_number in range(rounds):
        for scenario in scenarios:
            log_dir = log_root / f"{scenario}-{round_number}"
            outcome = run_round(scenario, clients, log_dir)
            results[scenario].append(outcome)
            if "error" in outcome:
                print(f"{scenario} round {round_number}: FAILED", file=sys.stderr)
                print("\n".join(outcome["error"]), file=sys.stderr)

    print(
        f"{NODES} nodes x {clients} clients, ttl={TTL} s, {rounds} round(s), "
        f"meshline sources {fingerprint}; logs in {log_root}"
    )
    header = f"{'scenario':<12} {'recovery':>8} {'detect':>7} {'orphans':>7} "
    print(header + f"{'false':>6} {'lost':>5} {'restored':>8} {'dip':>6} settled crashed")
    false_orphans = lost = 0
    restart_medians: list[float] = []
    for scenario, outcomes in results.items():
        good = [outcome for outcome in outcomes if "error" not in outcome]
        failed = len(outcomes) - len(good)
        recovery = median_of(good, "recovery_s")
        detect = median_of(good, "views_detect_s")
        orphans = median_of(good, "orphan_report_s")
        false = sum(int(outcome.get("false_orphans", 0)) for outcome in good)
        gone = sum(int(outcome.get("lost", 0)) for outcome in good)
        restored = sum(int(outcome.get("restored", 0)) for outcome in good)
        dip = max((int(outcome.get("worst_missing", 0)) for outcome in good), default=0)
        settled = sum(bool(outcome.get("settled")) for outcome in good)
        crashed = sum(int(outcome.get("crashed", 0)) for outcome in good)
        false_orphans += false
        lost += gone
        if scenario.startswith("restart-"):
            restart_medians.append(recovery if good else math.inf)  # a failed run counts
        print(
            f"{scenario:<12} {seconds(recovery):>8} {seconds(detect):>7} {seconds(orphans):>7} "
            f"{false:>6} {gone:>5} {restored:>8} {dip:>6} {settled}/{len(good)}"
            f"{f' (+{failed} failed)' if failed else ''} {crashed:>7}"
        )
        for outcome in good:
            extra = {k: v for k, v in outcome.items() if k not in ("server_log", "log_dir")}
            print(f"  {json.dumps(extra)}")
    if library_fingerprint() != fingerprint:
        print("WARNING: meshline's sources changed during the run; figures may mix versions")
    restart_recovery = max(restart_medians, default=math.nan)
    print(f"false_orphans={false_orphans} lost={lost} restart_recovery_s={restart_recovery:.3f}")


if __name__ == "__main__":
    main()
