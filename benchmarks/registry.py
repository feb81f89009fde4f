"""Benchmark: the KV client registry against plain nats-py KV on asyncio.

Measures, against one nats-server started here:

* register, update_metadata and unregister throughput of ``ClientRegistry`` on the
  KV backend (50 concurrent writers), against nats-py's own ``kv.create``,
  ``kv.update`` and ``kv.delete`` (with revisions) doing the same writes;
* the latency of local reads (``get_client``, ``count_clients_for_node``,
  ``list_clients``) with 10k and 100k registered clients, filled through the
  registry itself.

Every measurement runs in a fresh process; figures are medians over rounds. The
last line is ``register_ratio=<float>``: meshline's median register rate divided by
nats-py's median create rate.

Usage: ``python benchmarks/registry.py [--quick] [--rounds N]``
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _runner import run_worker

from meshline.testing import NatsServer

WORKER = Path(__file__).with_name("_registry_worker.py")
ACTIONS = ("register", "update", "unregister")


def measure(impl: str, case: str, url: str, count: int) -> dict[str, float]:
    return run_worker(WORKER, impl, case, url, count, timeout=600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds; under 40 s")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per figure")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    writes = 2_000 if args.quick else 10_000
    sizes = (10_000, 100_000)
    read_rounds = 1 if args.quick else 3

    write_runs: dict[str, dict[str, list[float]]] = {"nats-py": {}, "meshline": {}}
    read_runs: dict[int, dict[str, list[float]]] = {size: {} for size in sizes}
    with NatsServer() as server:
        for _ in range(rounds):
            for impl in write_runs:
                for action, rate in measure(impl, "writes", server.url, writes).items():
                    write_runs[impl].setdefault(action, []).append(rate)
        for size in sizes:
            for _ in range(read_rounds):
                for name, value in measure("meshline", "reads", server.url, size).items():
                    read_runs[size].setdefault(name, []).append(value)

    print(f"{'write':<12} {'nats-py/s':>10} {'meshline/s':>11}  ratio")
    ratios = {}
    for action in ACTIONS:
        base = statistics.median(write_runs["nats-py"][action])
        ours = statistics.median(write_runs["meshline"][action])
        ratios[action] = ours / base
        print(f"{action:<12} {base:>10,.0f} {ours:>11,.0f}  {ratios[action]:.3f}")
    print(f"\n{'clients':>8} {'fill/s':>8} {'get p50':>9} {'count p50':>10} {'list p50':>10}")
    for size in sizes:
        runs = read_runs[size]
        median = {name: statistics.median(values) for name, values in runs.items()}
        print(
            f"{size:>8,} {median['fill_rate']:>8,.0f} {median['get_p50_us']:>7.1f}us"
            f" {median['count_p50_us']:>8.1f}us {median['list_p50_us'] / 1000:>8.1f}ms"
        )
    print(f"register_ratio={ratios['register']:.3f}")


if __name__ == "__main__":
    main()
