"""Benchmark: how meshline's costs grow with the number of clients, on real NATS.

One table, against nats-servers started here (a fresh one per section):

* **fresh open**: a new connection opens the registry's KV backend (its replica) on a
  bucket of N live clients, and on the same bucket after N more clients registered
  and unregistered (*churned*; opened right after the churn, while the purge
  markers it left are still in the stream; the table says how many there were).
  Baseline: plain nats-py reading the same bucket into a dict.
* **memory per client**: the RSS the replica adds to the process that opened it,
  divided by N (after a ``gc.collect()``), and the peak RSS during the open;
  measured in the fresh process of each open.
* **local queries** on that replica: ``get_client``, ``count_clients_for_node`` and
  ``list_clients_for_node`` (1,000 clients per node), and ``list_clients``.
* **cleanup** of a dead node with N clients: ``ClientRegistry.cleanup_node`` from
  another node's freshly opened backend. Baseline: nats-py deleting as many keys,
  64 at a time, each conditional on its revision.
* **registrations per second** with 1, 4 and 16 nodes in up to 4 processes, each
  node with a connection, a backend and a ``ClientRegistry`` of its own and 32
  concurrent registering tasks; the total rate over the cluster. Baseline: as many
  nats-py connections in as many processes, doing ``kv.create``.

Buckets are filled around the registry, for speed: one registration is made through
it, and the rest are copies of its bytes written with ``KeyValue.create`` (see
``_scale_worker.py``, which falls back to registering everything when it cannot
copy). Churned clients are unregistered through a ``ClientRegistry``.

Each figure is the median over rounds, each round in a fresh process. A measurement
that fails or exceeds its time limit prints as ``FAILED`` or ``> N s`` (details on
stderr), never as a blank. ``--quick`` measures 10k and 100k clients (baselines at
10k only), cleanups of 1k and 10k, and fewer registrations, in about a minute.

``--json FILE`` writes every figure; ``--svg FILE`` draws the growth curves (log-log:
open time against clients, live and churned; cleanup time against clients) from
them, or ``--plot FILE.json --svg FILE`` from an earlier run's output.

``--simulate`` runs, instead, the simulation on the memory transport (100 nodes x
1,000 clients; see ``_scale_simulate.py``): startup, one crash, detection, cleanup
and convergence, in virtual time on Trio's MockClock and in wall time.

The last line of a benchmark run is
``fresh_open_100k_churned_s=<float> cleanup_10k_s=<float> bytes_per_client=<int>``:
the median fresh open of 100k live + 100k churned clients, the median cleanup of a
dead node's 10k clients, and the RSS per client at 100k (the larger of the live and
the churned bucket's). A time is ``inf`` when that measurement failed or timed out,
``nan`` when it was not measured; bytes_per_client is -1 when it was not measured.
Targets (issue 10): <= 3, <= 1, <= 500.

Usage: ``python benchmarks/scale.py [--quick] [--rounds N] [--json FILE] [--svg FILE]``,
``python benchmarks/scale.py --plot FILE.json --svg FILE``,
``python benchmarks/scale.py --simulate [--quick] [--nodes N] [--clients N]``
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
from _scale_plot import render_svg

from meshline.testing import NatsServer

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_scale_worker.py"
BASELINE = HERE / "_scale_baseline.py"
SIMULATION = HERE / "_scale_simulate.py"
LIBRARY = HERE.parent / "meshline"

PER_NODE = 1_000
"""Live clients per node id in the filled buckets (what a node's list returns)."""
WRITERS_PER_NODE = 32
PROCESSES = 4
OPEN_LIMIT = 300.0
"""Seconds a fresh open (with its queries) may take before it counts as failed."""


@attrs.frozen
class Profile:
    name: str
    open_sizes: tuple[int, ...]
    baseline_open_sizes: tuple[int, ...]
    cleanup_sizes: tuple[int, ...]
    rate_nodes: tuple[int, ...]
    rate_total: int
    """Registrations per rate measurement, spread over its nodes."""
    rounds: int


FULL = Profile(
    "full",
    open_sizes=(10_000, 100_000, 1_000_000),
    baseline_open_sizes=(10_000, 100_000, 1_000_000),
    cleanup_sizes=(1_000, 10_000, 100_000),
    rate_nodes=(1, 4, 16),
    rate_total=32_000,
    rounds=3,
)
TINY = Profile(
    "tiny",
    open_sizes=(300,),
    baseline_open_sizes=(300,),
    cleanup_sizes=(200,),
    rate_nodes=(1, 2),
    rate_total=400,
    rounds=1,
)
"""For ``tests/test_scale_benchmark.py``: every code path, in seconds."""
QUICK = Profile(
    "quick",
    open_sizes=(10_000, 100_000),
    baseline_open_sizes=(10_000,),
    cleanup_sizes=(1_000, 10_000),
    rate_nodes=(1, 4, 16),
    rate_total=9_600,
    rounds=1,
)


def library_fingerprint() -> str:
    """A short hash of meshline's sources (others may change them during a run)."""
    digest = hashlib.sha256()
    for path in sorted(LIBRARY.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def attempt(script: Path, *arguments: object, timeout: float) -> dict[str, Any]:
    """Run ``script`` with ``arguments`` and return the JSON object it printed last;
    on failure ``{"error": ...}``, on timeout ``{"timeout": seconds}``."""
    began = time.perf_counter()
    try:
        completed = subprocess.run(
            [sys.executable, str(script), *map(str, arguments)],
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=HERE,
        )
        result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        report(f"{script.name} {arguments[0]}: over its limit of {timeout:g} s", [])
        return {"timeout": timeout}
    except subprocess.CalledProcessError as exc:
        lines = (exc.stderr or "").strip().splitlines()[-15:]
        report(f"{script.name} {' '.join(map(str, arguments))}: FAILED", lines)
        return {"error": lines[-1] if lines else f"exit status {exc.returncode}"}
    except (json.JSONDecodeError, IndexError):
        report(f"{script.name} {arguments[0]}: printed no result", [])
        return {"error": "no result"}
    result["elapsed_s"] = time.perf_counter() - began
    return result


def report(headline: str, lines: Sequence[str]) -> None:
    print(headline, file=sys.stderr)
    for line in lines:
        print(f"    {line}", file=sys.stderr)


def attempt_together(commands: list[list[object]], timeout: float) -> list[dict[str, Any]]:
    """Start ``commands`` (script, arguments...) at once, wait until each printed
    ``ready``, then tell all to go; return their results (or errors)."""
    processes = [
        subprocess.Popen(
            [sys.executable, *map(str, command)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=HERE,
        )
        for command in commands
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            line = process.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a worker did not get ready: {line.strip()!r}")
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        results = []
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            if process.returncode:
                lines = err.strip().splitlines()[-15:]
                report(f"{commands[0][0]} {commands[0][1]}: FAILED", lines)
                results.append({"error": lines[-1] if lines else "failed"})
            else:
                results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    except subprocess.TimeoutExpired:
        report(f"{commands[0][1]} with {len(commands)} processes: over {timeout:g} s", [])
        return [{"timeout": timeout}]
    except RuntimeError as exc:
        stderr = ""
        for process in processes:
            process.kill()
            stderr += process.communicate()[1]
        report(str(exc), stderr.strip().splitlines()[-15:])
        return [{"error": str(exc)}]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def fill_limit(clients: int) -> float:
    """Seconds a fill of ``clients`` may take (about 5x what it takes here)."""
    return 60 + clients / 2_000


def fresh_key(prefix: str) -> str:
    return f"{prefix}{time.time_ns()}"


# --------------------------------------------------------------------- sections


def measure_open(profile: Profile, url: str, size: int) -> dict[str, Any]:
    """Fill a bucket with ``size`` clients, open it; churn as many, open it again."""
    key = fresh_key("open")
    result: dict[str, Any] = {"clients": size}
    fill = attempt(WORKER, "fill", url, key, size, PER_NODE, timeout=fill_limit(size))
    result["fill"] = fill
    if "bucket" not in fill:
        result["live"] = result["churned"] = {"runs": [fill]}
        return result
    for state in ("live", "churned"):
        if state == "churned":
            churn = attempt(WORKER, "churn", url, key, size, timeout=3 * fill_limit(size))
            result["churn"] = churn
            if "unregistered" not in churn:
                result["churned"] = {"runs": [churn]}
                break
        runs = [
            attempt(WORKER, "open", url, key, size, PER_NODE, timeout=OPEN_LIMIT)
            for _ in range(profile.rounds)
        ]
        entry: dict[str, Any] = {"runs": runs}
        if size in profile.baseline_open_sizes:
            entry["baseline"] = attempt(BASELINE, "read", url, fill["bucket"], timeout=OPEN_LIMIT)
        result[state] = entry
    return result


def measure_cleanup(profile: Profile, url: str, size: int) -> dict[str, Any]:
    runs = [
        attempt(WORKER, "cleanup", url, fresh_key("dead"), size, timeout=fill_limit(size) + 120)
        for _ in range(profile.rounds)
    ]
    baseline = attempt(BASELINE, "delete", url, size, timeout=fill_limit(size) + 120)
    return {"clients": size, "runs": runs, "baseline": baseline}


def spread(nodes: int) -> list[int]:
    """Nodes per process: ``nodes`` over at most :data:`PROCESSES` processes."""
    processes = min(nodes, PROCESSES)
    return [nodes // processes + (index < nodes % processes) for index in range(processes)]


def total_rate(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine the processes of one rate measurement."""
    for result in results:
        if "rate" not in result:
            return result
    registered = sum(result["registered"] for result in results)
    span = max(r["ended"] for r in results) - min(r["began"] for r in results)
    return {"registered": registered, "rate": registered / span, "span_s": span}


def measure_rate(profile: Profile, url: str, nodes: int) -> dict[str, Any]:
    per_node = profile.rate_total // nodes
    runs, baselines = [], []
    for _ in range(profile.rounds):
        key = fresh_key("rate")
        commands: list[list[object]] = []
        first = 1
        for count in spread(nodes):
            commands.append(
                [WORKER.name, "rate", url, key, first, count, per_node, WRITERS_PER_NODE]
            )
            first += count
        runs.append(total_rate(attempt_together(commands, timeout=300)))
        bucket = fresh_key("base")
        commands = []
        first = 1
        for count in spread(nodes):
            commands.append(
                [BASELINE.name, "create", url, bucket, first, count, per_node, WRITERS_PER_NODE]
            )
            first += count
        baselines.append(total_rate(attempt_together(commands, timeout=300)))
    return {"nodes": nodes, "per_node": per_node, "runs": runs, "baselines": baselines}


def run_benchmark(profile: Profile) -> dict[str, Any]:
    results: dict[str, Any] = {"open": [], "cleanup": [], "rate": []}
    with NatsServer() as server:
        for size in profile.open_sizes:
            results["open"].append(measure_open(profile, server.url, size))
    with NatsServer() as server:
        for size in profile.cleanup_sizes:
            results["cleanup"].append(measure_cleanup(profile, server.url, size))
    with NatsServer() as server:
        for nodes in profile.rate_nodes:
            results["rate"].append(measure_rate(profile, server.url, nodes))
    return results


# --------------------------------------------------------------------- figures


def median(runs: list[dict[str, Any]], field: str) -> float:
    """The median of ``field`` over the runs that have it: ``inf`` if any run failed
    or timed out, ``nan`` if there are no runs."""
    if not runs:
        return math.nan
    if any(field not in run for run in runs):
        return math.inf
    return float(statistics.median(run[field] for run in runs))


def failure(runs: list[dict[str, Any]]) -> str | None:
    """How the first failed run failed, as a table cell; None if none failed."""
    for run in runs:
        if "timeout" in run:
            return f"> {run['timeout']:g} s"
        if "error" in run:
            return "FAILED"
    return None


def fmt_seconds(value: float) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "FAILED"
    return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"


def fmt_us(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return "-"
    if value >= 10_000:
        return f"{value / 1000:.0f} ms"
    if value >= 1_000:
        return f"{value / 1000:.1f} ms"
    return f"{value:.1f} us"


def fmt_ratio(ours: float, base: float) -> str:
    if not (math.isfinite(ours) and math.isfinite(base)) or base == 0:
        return "-"
    return f"{ours / base:.2f}"


def short(count: int) -> str:
    if count >= 1_000_000 and count % 1_000_000 == 0:
        return f"{count // 1_000_000}M"
    if count >= 1_000 and count % 1_000 == 0:
        return f"{count // 1_000}k"
    return str(count)


class Table:
    """Rows of a label and cells, printed in aligned columns."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, list[str]]] = []

    def header(self, label: str, cells: list[str]) -> None:
        self.rows.append(("", []))
        self.rows.append((label, cells))

    def row(self, label: str, cells: list[str]) -> None:
        self.rows.append(("  " + label, cells))

    def print(self) -> None:
        width = max(len(label) for label, _ in self.rows)
        cell = max((len(c) for _, cells in self.rows for c in cells), default=8)
        for label, cells in self.rows[1:]:
            line = f"{label:<{width}}  " + "  ".join(f"{c:>{cell}}" for c in cells)
            print(line.rstrip())


def cell_or_failure(value: str, runs: list[dict[str, Any]]) -> str:
    return failure(runs) or value


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Print the table; return the figures of the last line."""
    table = Table()
    opens = results["open"]
    table.header("clients (live; churned adds as many gone)", [short(o["clients"]) for o in opens])

    def open_cells(state: str, field: str, show: Callable[[float], str]) -> list[str]:
        cells = []
        for entry in opens:
            runs = entry.get(state, {}).get("runs", [])
            cells.append(cell_or_failure(show(median(runs, field)), runs))
        return cells

    def baseline_cells(state: str, field: str, show: Callable[[float], str]) -> list[str]:
        cells = []
        for entry in opens:
            base = entry.get(state, {}).get("baseline")
            cells.append(
                "-" if base is None else cell_or_failure(show(median([base], field)), [base])
            )
        return cells

    def ratio_cells(state: str) -> list[str]:
        cells = []
        for entry in opens:
            data = entry.get(state, {})
            base = data.get("baseline")
            ours = median(data.get("runs", []), "open_s")
            cells.append("-" if base is None else fmt_ratio(ours, median([base], "read_s")))
        return cells

    def count(value: float) -> str:
        return "-" if not math.isfinite(value) else f"{value:,.0f}"

    for state in ("live", "churned"):
        table.row(f"fresh open, {state}", open_cells(state, "open_s", fmt_seconds))
        table.row("  nats-py reads the bucket", baseline_cells(state, "read_s", fmt_seconds))
        table.row("  ratio (meshline / nats-py)", ratio_cells(state))
        if state == "churned":
            table.row("  markers in the stream", baseline_cells(state, "markers", count))
            cells = []
            for entry in opens:
                churn = entry.get("churn", {})
                rate = churn.get("unregister_rate")
                cells.append("-" if rate is None else f"{rate:,.0f}/s")
            table.row("  unregister rate while churning", cells)
        table.row("  clients loaded", open_cells(state, "loaded", count))
        table.row(
            "  RSS per client", open_cells(state, "bytes_per_client", lambda v: f"{v:,.0f} B")
        )
        table.row(
            "  peak RSS per client while opening",
            open_cells(state, "peak_bytes_per_client", lambda v: f"{v:,.0f} B"),
        )
    table.row("get_client", open_cells("live", "get_us", fmt_us))
    table.row("count_clients_for_node", open_cells("live", "count_us", fmt_us))
    table.row(
        f"list_clients_for_node (up to {PER_NODE:,})", open_cells("live", "list_node_us", fmt_us)
    )
    table.row("list_clients (all)", open_cells("live", "list_all_us", fmt_us))

    cleanups = results["cleanup"]
    table.header("clients of the dead node", [short(c["clients"]) for c in cleanups])
    table.row(
        "cleanup_node",
        [cell_or_failure(fmt_seconds(median(c["runs"], "cleanup_s")), c["runs"]) for c in cleanups],
    )
    table.row(
        "  removed (of as many)",
        [cell_or_failure(f"{median(c['runs'], 'removed'):,.0f}", c["runs"]) for c in cleanups],
    )
    table.row(
        "  nats-py deletes, 64 in flight",
        [
            cell_or_failure(fmt_seconds(median([c["baseline"]], "delete_s")), [c["baseline"]])
            for c in cleanups
        ],
    )
    table.row(
        "  ratio (meshline / nats-py)",
        [
            fmt_ratio(median(c["runs"], "cleanup_s"), median([c["baseline"]], "delete_s"))
            for c in cleanups
        ],
    )

    rates = results["rate"]
    table.header(f"nodes (in up to {PROCESSES} processes)", [str(r["nodes"]) for r in rates])

    def rate_cell(runs: list[dict[str, Any]]) -> str:
        return cell_or_failure(f"{median(runs, 'rate'):,.0f}/s", runs)

    table.row("registrations (all nodes)", [rate_cell(r["runs"]) for r in rates])
    table.row("  nats-py kv.create", [rate_cell(r["baselines"]) for r in rates])
    table.row(
        "  ratio (meshline / nats-py)",
        [fmt_ratio(median(r["runs"], "rate"), median(r["baselines"], "rate")) for r in rates],
    )
    table.print()

    def at(entries: list[dict[str, Any]], size: int) -> dict[str, Any] | None:
        return next((entry for entry in entries if entry["clients"] == size), None)

    hundred_k = at(opens, 100_000)
    ten_k = at(cleanups, 10_000)
    fresh = median(hundred_k["churned"]["runs"], "open_s") if hundred_k else math.nan
    cleanup = median(ten_k["runs"], "cleanup_s") if ten_k else math.nan
    memory = -1
    if hundred_k:
        values = [median(hundred_k[s]["runs"], "bytes_per_client") for s in ("live", "churned")]
        finite = [value for value in values if math.isfinite(value)]
        if finite:
            memory = round(max(finite))
    return {
        "fresh_open_100k_churned_s": fresh,
        "cleanup_10k_s": cleanup,
        "bytes_per_client": memory,
    }


# --------------------------------------------------------------------- simulation


def run_simulation(nodes: int, clients: int, ttl: int) -> dict[str, Any]:
    print(f"simulating {nodes} nodes x {clients:,} clients on the memory transport ...")
    result = attempt(SIMULATION, nodes, clients, ttl, timeout=3600)
    if "startup" not in result:
        print("the simulation FAILED (see above)")
        return result
    print(
        f"{nodes} nodes x {clients:,} clients, ttl={ttl} s, {result['clock']}; "
        f"node {result['crashed']} crashed (leader: node {result['leader']})"
    )
    print(f"{'phase':<10} {'virtual':>9} {'wall':>9}")
    for phase in ("startup", "detect", "cleanup", "converge"):
        figures = result.get(phase)
        if figures is None:
            print(f"{phase:<10} {'never':>9}")
            continue
        print(f"{phase:<10} {figures['virtual_s']:>8.2f}s {figures['wall_s']:>8.2f}s")
    print(
        f"orphaned={result['orphaned']} (of {clients:,}) "
        f"false_orphans={result['false_orphans']} replica_reloads={result['replica_reloads']}"
    )
    for phase, records in result["log_records"].items():
        for message, count in records.items():
            print(f"  log, {phase}: {count} x {message}")
    return result


# --------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes; about a minute")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per figure")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--svg", type=Path, help="draw the growth curves into this file")
    parser.add_argument("--plot", type=Path, help="only draw --svg from this JSON output")
    parser.add_argument("--simulate", action="store_true", help="run the simulation instead")
    parser.add_argument("--nodes", type=int, default=None, help="simulated nodes (100)")
    parser.add_argument("--clients", type=int, default=1_000, help="clients per simulated node")
    parser.add_argument("--ttl", type=int, default=2, help="simulated nodes' ttl")
    args = parser.parse_args()

    if args.plot is not None:
        if args.svg is None:
            parser.error("--plot needs --svg")
        args.svg.write_text(render_svg(json.loads(args.plot.read_text())))
        print(f"wrote {args.svg}")
        return

    meta = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "meshline_sources": library_fingerprint(),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
    }
    if args.simulate:
        nodes = args.nodes or (20 if args.quick else 100)
        output: dict[str, Any] = {
            **meta,
            "simulation": run_simulation(nodes, args.clients, args.ttl),
        }
        if args.json:
            args.json.write_text(json.dumps(output, indent=1))
        return

    profile = TINY if args.tiny else QUICK if args.quick else FULL
    if args.rounds:
        profile = attrs.evolve(profile, rounds=args.rounds)
    results = run_benchmark(profile)
    meta["profile"] = profile.name
    meta["rounds"] = profile.rounds
    methods = sorted({entry["fill"].get("method", "?") for entry in results["open"]})
    print(
        f"profile {profile.name}, {profile.rounds} round(s), meshline sources "
        f"{meta['meshline_sources']}, {meta['machine']}; buckets filled by "
        f"{' and '.join(methods)} writes"
    )
    last = summarize(results)
    output = {**meta, **results, "summary": last}
    if library_fingerprint() != meta["meshline_sources"]:
        print("WARNING: meshline's sources changed during the run; figures may mix versions")
        output["sources_changed"] = True
    if args.json:
        args.json.write_text(json.dumps(output, indent=1))
    if args.svg:
        args.svg.write_text(render_svg(output))
    print(
        f"fresh_open_100k_churned_s={last['fresh_open_100k_churned_s']:.3f} "
        f"cleanup_10k_s={last['cleanup_10k_s']:.3f} bytes_per_client={last['bytes_per_client']}"
    )


if __name__ == "__main__":
    main()
