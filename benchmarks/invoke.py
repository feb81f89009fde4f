"""Benchmark: client-service invoke against plain nats-py request/reply on asyncio.

Measures, against one nats-server started here, with 100 concurrent callers:

* remote invoke: the client is registered on another service node, so each call is
  a registry lookup (local) plus a node request to the owner, which runs
  ``client_invoke``;
* local invoke: the client is on the caller's node, so no network is involved;
* the baseline: nats-py's own request/reply on asyncio, two connections.

Every measurement runs in a fresh process; figures are medians over rounds. The
last line is ``remote_invoke_ratio=<float>``: remote invokes per second divided by
the baseline's requests per second.

Usage: ``python benchmarks/invoke.py [--quick] [--rounds N]``
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _runner import run_worker

from meshline.testing import NatsServer

WORKER = Path(__file__).with_name("_invoke_worker.py")
CASES = (("nats-py", "request"), ("meshline", "remote"), ("meshline", "local"))


def measure(impl: str, case: str, url: str, count: int) -> float:
    return float(run_worker(WORKER, impl, case, url, count)["rate"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts; under 40 s")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per figure")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    count = 5_000 if args.quick else 30_000

    runs: dict[tuple[str, str], list[float]] = {case: [] for case in CASES}
    with NatsServer() as server:
        for _ in range(rounds):
            for impl, case in CASES:
                runs[impl, case].append(measure(impl, case, server.url, count))

    medians = {case: statistics.median(values) for case, values in runs.items()}
    baseline = medians["nats-py", "request"]
    print(f"{'case':<22} {'median/s':>10}  ratio  runs")
    for (impl, case), values in runs.items():
        shown = ", ".join(f"{value:,.0f}" for value in values)
        median = medians[impl, case]
        print(f"{impl + ' ' + case:<22} {median:>10,.0f}  {median / baseline:.3f}  [{shown}]")
    print(f"remote_invoke_ratio={medians['meshline', 'remote'] / baseline:.3f}")


if __name__ == "__main__":
    main()
