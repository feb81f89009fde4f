"""Benchmark: meshline's NATS transport against plain nats-py on asyncio.

Measures, against one nats-server started here:

* publish -> subscribe throughput of 64-byte messages;
* request/reply throughput with 100 concurrent requesters.

Every measurement runs in a fresh process (importing trio_asyncio changes asyncio's
loop policy for the whole process, so the asyncio baseline must not share one with
meshline). Runs alternate between the two, and the figures are medians over rounds.
The last two lines are ``publish_ratio=<float>`` and ``request_ratio=<float>``:
meshline's median divided by nats-py's.

Usage: ``python benchmarks/transport.py [--quick] [--rounds N]``
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _runner import run_worker

from meshline.testing import NatsServer

WORKER = Path(__file__).with_name("_transport_worker.py")


def measure(impl: str, case: str, url: str, count: int) -> float:
    return float(run_worker(WORKER, impl, case, url, count)["rate"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts; under 40 s")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per figure")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    counts = {
        "publish": 100_000 if args.quick else 300_000,
        "request": 10_000 if args.quick else 30_000,
    }

    results: dict[tuple[str, str], list[float]] = {}
    with NatsServer() as server:
        for _ in range(rounds):
            for case, count in counts.items():
                for impl in ("nats-py", "meshline"):
                    rate = measure(impl, case, server.url, count)
                    results.setdefault((impl, case), []).append(rate)

    print(f"{'case':<10} {'impl':<10} {'median/s':>12}  runs")
    ratios = {}
    for case in counts:
        medians = {}
        for impl in ("nats-py", "meshline"):
            runs = results[(impl, case)]
            medians[impl] = statistics.median(runs)
            shown = ", ".join(f"{run:,.0f}" for run in runs)
            print(f"{case:<10} {impl:<10} {medians[impl]:>12,.0f}  [{shown}]")
        ratios[case] = medians["meshline"] / medians["nats-py"]
    print(f"publish_ratio={ratios['publish']:.3f}")
    print(f"request_ratio={ratios['request']:.3f}")


if __name__ == "__main__":
    main()
