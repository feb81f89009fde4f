"""Benchmark: mesh node request/reply and broadcast fan-out, against plain nats-py.

Measures, against one nats-server started here:

* node request/reply throughput with 100 concurrent requesters (``Node.request`` to
  a handler on another node, each node on its own connection), against nats-py's
  own request/reply on asyncio;
* broadcast fan-out: deliveries per second when one node broadcasts to 1, 2, 4 and
  8 receiving nodes, next to plain nats-py publishing to as many subscribers.

Every measurement runs in a fresh process (see ``benchmarks/transport.py`` for
why), alternating implementations; figures are medians over rounds. The last line is
``request_ratio=<float>``: meshline's median divided by nats-py's.

Usage: ``python benchmarks/node.py [--quick] [--rounds N]``
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _runner import run_worker

from meshline.testing import NatsServer

WORKER = Path(__file__).with_name("_node_worker.py")
IMPLS = ("nats-py", "meshline")
FANOUT = (1, 2, 4, 8)


def measure(impl: str, case: str, url: str, count: int, nodes: int = 1) -> float:
    return float(run_worker(WORKER, impl, case, url, count, nodes)["rate"])


def show(label: str, runs: dict[str, list[float]]) -> dict[str, float]:
    medians = {impl: statistics.median(runs[impl]) for impl in IMPLS}
    cells = "  ".join(
        f"{medians[impl]:>10,.0f} [{', '.join(f'{r:,.0f}' for r in runs[impl])}]" for impl in IMPLS
    )
    ratio = medians["meshline"] / medians["nats-py"]
    print(f"{label:<14} {cells}  ratio {ratio:.3f}")
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts; under 40 s")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per figure")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    request_count = 5_000 if args.quick else 30_000
    fanout_count = 5_000 if args.quick else 30_000

    requests: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    fanouts: dict[int, dict[str, list[float]]] = {n: {impl: [] for impl in IMPLS} for n in FANOUT}
    with NatsServer() as server:
        for _ in range(rounds):
            for impl in IMPLS:
                requests[impl].append(measure(impl, "request", server.url, request_count))
            for nodes in FANOUT:
                for impl in IMPLS:
                    rate = measure(impl, "fanout", server.url, fanout_count, nodes)
                    fanouts[nodes][impl].append(rate)

    print(f"{'case':<14} {'nats-py median/s [runs]':>24}  {'meshline median/s [runs]':>24}")
    request_medians = show("request", requests)
    for nodes in FANOUT:
        show(f"fanout x{nodes}", fanouts[nodes])
    print(f"request_ratio={request_medians['meshline'] / request_medians['nats-py']:.3f}")


if __name__ == "__main__":
    main()
