"""Benchmark: meshline's socket layer on one node, against bare trio-websocket.

Every figure has its baseline measured in the same run, in the same way: a server
process and one or more client processes (``_sockets_worker.py``), fresh for each
measurement, on loopback. The baseline is trio-websocket on both sides with the
same payloads encoded the same way (msgpack through msgspec), so each ratio
measures meshline's protocol and machinery, not the encoder.

* **Call round trips**: 100 clients in one process, each calling ``echo`` in a
  loop (the next call as soon as the answer came); after a warm-up, the round
  trips completed in a measured window, per second. meshline:
  ``SocketClient.call`` against a role whose handler returns its input (decoded as
  ``Any``), server options at their defaults. Baseline: each client sends the
  msgpack-encoded payload and waits for the answer; the server decodes each
  message and sends it back re-encoded. ``call_ratio`` = meshline calls/s /
  baseline round trips/s.
* **Room emit** on one node to 1,000 connections, held by 2 client processes: the
  server emits N events (about 170 bytes of data each; 100 by default), one emit
  per scheduling turn, and every client counts what it receives; deliveries per
  second = events received by all clients / (last arrival - first emit), both
  read from ``time.monotonic()`` (one clock for every process). meshline:
  ``server.room(name).emit`` to a room every connection joined in ``on_connect``
  (encoded once per emit, queued to each member's outbox, sent by each
  connection's writer task), received by ``SocketClient.on`` handlers. Baseline:
  one task encodes each event once and awaits ``send_message`` to each
  connection in turn; clients decode every message. ``fanout_ratio`` = meshline
  deliveries/s / baseline deliveries/s. A delivery that never arrives fails the
  run.
* **Idle connections**: 10,000 connections from 4 client processes (at most 64
  connection attempts in flight per process), with the server's heartbeat on at
  its default interval of 25 s. Server memory per connection = (server RSS with
  every connection open and every one having answered a heartbeat ping, after
  ``gc.collect()``) - (RSS listening with none, after ``gc.collect()``), divided
  by the connections. Baseline, for context: as many bare trio-websocket
  connections (no heartbeat: trio-websocket has none at the protocol level).
  ``bytes_per_conn`` = meshline's. Also shown: the objects the garbage collector
  tracks per connection, the server's CPU share while they idle and its CPU time
  per heartbeat ping sent (over 5 s, or one interval if shorter), and how long
  the clients took to connect.

Alongside the rates, the table shows the CPU time each side spent per round trip
or per delivery (user + system, read from ``/proc`` for the server and by each
client process for itself, over the measured window), and how much of it went to
Python's cyclic garbage collector (``gc.callbacks``): the ratios are end-to-end,
and these say where the difference comes from.

Each figure is the median over rounds (3 by default); each round runs baseline
and meshline back to back; each ratio is the median of meshline's runs over the
median of the baseline's. ``--quick`` runs one round, with 2,000 idle connections
from 2 processes (heartbeat every 2 s, so that every one answers a ping soon),
50 events and shorter windows, in under a minute; ``--tiny`` runs every path in
seconds (for ``tests/test_sockets_benchmark.py``). A measurement that fails (a
call error, a lost delivery, a connection that dropped or never connected, a
crashed worker) prints ``FAILED``, and one over its time limit ``> N s``, with
details on stderr; never a blank.

``--profile DIR`` runs every worker under ``py-spy record -f raw`` and leaves one
profile per process in DIR (figures taken this way are slower, and not for
quoting; py-spy charges garbage collection to whatever Python line allocated).
``--json FILE`` writes every run's figures. ``--sections call,fanout,idle`` runs
a subset (a section left out reads ``nan``). ``--lock FILE`` is for a shared
machine: each measurement (one side of one section in one round) waits until FILE
does not exist and no pytest runs, creates FILE, and removes it when done, so
that other work runs between measurements, never during one.

The last line is ``call_ratio=<float> fanout_ratio=<float> bytes_per_conn=<int>``:
a ratio is ``nan`` when either side failed or was not measured, ``bytes_per_conn``
-1. Targets (issue 11): call_ratio >= 0.8, fanout_ratio >= 0.8,
bytes_per_conn <= 30,000.

The worker uses meshline's public names only: ``open_socket_server``,
``HeartbeatOptions``, ``Role``, ``Connection``, ``DisconnectReason`` and
``open_socket_client``.

Usage: ``python benchmarks/sockets.py [--quick | --tiny] [--rounds N] [--json FILE]
[--profile DIR] [--sections LIST] [--lock FILE]``
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from _runner import (
    TURNS,
    Worker,
    WorkerFailed,
    cell,
    median,
    report,
    runs_cell,
)

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_sockets_worker.py"
LIBRARY = HERE.parent / "meshline"
IMPLS = ("baseline", "meshline")


@attrs.frozen
class Profile:
    name: str
    rounds: int
    call_clients: int
    call_warmup: float
    call_duration: float
    fanout_connections: int
    fanout_processes: int
    fanout_events: int
    idle_connections: int
    idle_processes: int
    heartbeat: float
    """The server's heartbeat interval in the idle measurement, seconds."""


FULL = Profile(
    "full",
    rounds=3,
    call_clients=100,
    call_warmup=1.0,
    call_duration=5.0,
    fanout_connections=1_000,
    fanout_processes=2,
    fanout_events=100,
    idle_connections=10_000,
    idle_processes=4,
    heartbeat=25.0,
)
QUICK = Profile(
    "quick",
    rounds=1,
    call_clients=100,
    call_warmup=0.5,
    call_duration=2.0,
    fanout_connections=1_000,
    fanout_processes=2,
    fanout_events=50,
    idle_connections=2_000,
    idle_processes=2,
    heartbeat=2.0,
)
TINY = Profile(
    "tiny",
    rounds=1,
    call_clients=10,
    call_warmup=0.2,
    call_duration=0.5,
    fanout_connections=20,
    fanout_processes=2,
    fanout_events=10,
    idle_connections=40,
    idle_processes=2,
    heartbeat=0.5,
)
"""For ``tests/test_sockets_benchmark.py``: every code path, in seconds."""

IDLE_SAMPLE = 5.0
"""Seconds over which the idle server's CPU time and heartbeat pings are counted
(at most one heartbeat interval)."""
STALL = 10.0
"""Seconds a fanout client waits for the next event before giving up on the rest."""
START_LIMIT = 60.0
"""Seconds a worker may take to start (imports) and answer its first line."""


def library_fingerprint() -> str:
    """A short hash of meshline's sources (others may change them during a run)."""
    digest = hashlib.sha256()
    for path in sorted(LIBRARY.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def connect_limit(connections: int) -> float:
    """Seconds ``connections`` may take to connect (about 10x what they take here)."""
    return 30 + connections / 100


# --------------------------------------------------------------------- workers


def run_measurement(label: str, body: Callable[[list[Worker]], dict[str, Any]]) -> dict[str, Any]:
    """Run ``body`` with a list it fills with the workers it starts; stop them all
    afterwards. A failure becomes ``{"error": ...}`` (or ``{"timeout": s}``) and is
    reported on stderr with the workers' last lines."""
    workers: list[Worker] = []
    try:
        with TURNS.turn("sockets"):
            return body(workers)
    except WorkerFailed as exc:
        report(f"{label}: {'over its time limit' if exc.timeout else 'FAILED'}: {exc}", workers)
        if exc.timeout is not None:
            return {"timeout": exc.timeout}
        return {"error": str(exc)}
    finally:
        for worker in workers:
            worker.stop()


def start_server(
    workers: list[Worker], name: str, impl: str, scenario: str, options: dict[str, Any]
) -> tuple[Worker, str, int]:
    server = Worker(name, WORKER, "server", impl, scenario, json.dumps(options))
    workers.append(server)
    hello = server.read(START_LIMIT)
    return server, f"ws://127.0.0.1:{hello['port']}/", int(hello["rss"])


def split(total: int, parts: int) -> list[int]:
    parts = max(1, min(parts, total))
    return [total // parts + (index < total % parts) for index in range(parts)]


def check_no_disconnects(answer: dict[str, Any], what: str) -> None:
    if answer.get("disconnects"):
        raise WorkerFailed(f"{what}: connections dropped: {answer['disconnects']}")


# --------------------------------------------------------------------- measurements


def measure_calls(profile: Profile, impl: str, tag: str) -> dict[str, Any]:
    def body(workers: list[Worker]) -> dict[str, Any]:
        server, url, _ = start_server(workers, f"call-{impl}-server{tag}", impl, "call", {})
        options = {
            "count": profile.call_clients,
            "warmup": profile.call_warmup,
            "duration": profile.call_duration,
        }
        clients = Worker(
            f"call-{impl}-clients{tag}", WORKER, "clients", impl, "call", url, json.dumps(options)
        )
        workers.append(clients)
        limit = START_LIMIT + connect_limit(profile.call_clients) + profile.call_warmup
        clients.read(limit)  # the window opens
        server_cpu = server.cpu_seconds()
        server.send("stats")
        server.read(10)
        result = clients.read(profile.call_duration + 30)
        server_cpu = server.cpu_seconds() - server_cpu
        server.send("stats")
        collector = server.read(10)
        if result["errors"]:
            raise WorkerFailed(
                f"{result['errors']} caller(s) failed; first: {result['first_error']}"
            )
        server.send("wait 0 0")
        check_no_disconnects(server.read(10), "call")
        calls = result["calls"]
        return {
            "rate": result["rate"],
            "calls": calls,
            "seconds": result["seconds"],
            "server_us": 1e6 * server_cpu / calls if calls else math.nan,
            "client_us": 1e6 * result["cpu_s"] / calls if calls else math.nan,
            "server_gc_us": 1e6 * collector["gc_s"] / calls if calls else math.nan,
            "server_gc_collections": collector["gc_by_generation"],
            "client_gc_us": 1e6 * result["gc_s"] / calls if calls else math.nan,
            "client_gc_collections": result["gc_by_generation"],
        }

    return run_measurement(f"call round trips, {impl}", body)


def measure_fanout(profile: Profile, impl: str, tag: str) -> dict[str, Any]:
    def body(workers: list[Worker]) -> dict[str, Any]:
        server, url, _ = start_server(workers, f"fanout-{impl}-server{tag}", impl, "fanout", {})
        options = {"events": profile.fanout_events, "stall": STALL}
        clients = []
        for index, count in enumerate(split(profile.fanout_connections, profile.fanout_processes)):
            worker = Worker(
                f"fanout-{impl}-clients{index}{tag}",
                WORKER,
                "clients",
                impl,
                "fanout",
                url,
                json.dumps({**options, "count": count}),
            )
            workers.append(worker)
            clients.append(worker)
        limit = START_LIMIT + connect_limit(profile.fanout_connections)
        for worker in clients:
            worker.read(limit)
        server.send(f"wait {profile.fanout_connections} 30")
        ready = server.read(40)
        if not ready["reached"]:
            raise WorkerFailed(f"only {ready['connections']} connections reached the server")
        server.send("stats")
        server.read(10)
        cpu = [worker.cpu_seconds() for worker in (server, *clients)]
        server.send(f"fanout {profile.fanout_events}")
        emitted = server.read(600)
        expected = profile.fanout_connections * profile.fanout_events
        if emitted["queued"] != expected:
            raise WorkerFailed(f"the server queued {emitted['queued']} of {expected} deliveries")
        results = [worker.read(600) for worker in clients]
        cpu = [
            worker.cpu_seconds() - before
            for worker, before in zip((server, *clients), cpu, strict=True)
        ]
        server.send("stats")
        collector = server.read(10)
        received = sum(result["received"] for result in results)
        expected = sum(result["expected"] for result in results)
        last = max(result["last"] for result in results)
        span = last - emitted["t0"]
        figures = {
            "rate": received / span if span > 0 else math.nan,
            "received": received,
            "expected": expected,
            "span_s": span,
            "emit_s": emitted["emit_s"],
            "queued": emitted["queued"],
            "client_dropped": sum(result["client_dropped"] for result in results),
            "server_us": 1e6 * cpu[0] / received if received else math.nan,
            "client_us": 1e6 * sum(cpu[1:]) / received if received else math.nan,
            "server_gc_us": 1e6 * collector["gc_s"] / received if received else math.nan,
            "server_gc_collections": collector["gc_by_generation"],
            "client_gc_us": 1e6 * sum(r["gc_s"] for r in results) / received
            if received
            else math.nan,
        }
        check_no_disconnects(emitted, "fanout")
        if received != expected:
            raise WorkerFailed(
                f"{expected - received} of {expected} deliveries never arrived ({figures})"
            )
        return figures

    return run_measurement(f"room emit, {impl}", body)


def measure_idle(profile: Profile, impl: str, tag: str) -> dict[str, Any]:
    def body(workers: list[Worker]) -> dict[str, Any]:
        total = profile.idle_connections
        options = {"heartbeat": profile.heartbeat} if impl == "meshline" else {}
        server, url, rss_before = start_server(
            workers, f"idle-{impl}-server{tag}", impl, "idle", options
        )
        began = time.monotonic()
        clients = []
        for index, count in enumerate(split(total, profile.idle_processes)):
            worker = Worker(
                f"idle-{impl}-clients{index}{tag}",
                WORKER,
                "clients",
                impl,
                "idle",
                url,
                json.dumps({"count": count}),
            )
            workers.append(worker)
            clients.append(worker)
        for worker in clients:
            worker.read(START_LIMIT + connect_limit(total))
        connected_s = time.monotonic() - began
        server.send(f"wait {total} 30")
        ready = server.read(40)
        if not ready["reached"]:
            raise WorkerFailed(f"only {ready['connections']} of {total} connections are open")
        # meshline: hold until every connection answered a ping (or 3 intervals).
        hold = 3 * profile.heartbeat + 5 if impl == "meshline" else 0
        sample = min(profile.heartbeat, IDLE_SAMPLE)
        server.send(f"idle {total} {hold} {sample}")
        answer = server.read(hold + sample + 60)
        check_no_disconnects(answer, "idle")
        if answer["connections"] != total:
            raise WorkerFailed(f"{answer['connections']} of {total} connections still open")
        if impl == "meshline" and answer["ponged"] != total:
            raise WorkerFailed(f"only {answer['ponged']} of {total} connections answered a ping")
        return {
            "bytes_per_conn": (answer["rss"] - rss_before) / total,
            "rss_before": rss_before,
            "rss_after": answer["rss"],
            "connections": total,
            "ponged": answer["ponged"],
            "connect_s": connected_s,
            "held_s": answer["held_s"],
            "gc_objects_per_conn": answer["gc_objects"] / total,
            "idle_cpu_percent": 100 * answer["sample_cpu_s"] / answer["sample_s"],
            "pings_in_sample": answer["sample_pings"],
            "server_us_per_ping": 1e6 * answer["sample_cpu_s"] / answer["sample_pings"]
            if answer["sample_pings"]
            else math.nan,
            "server_gc_us_per_ping": 1e6 * answer["sample_gc_s"] / answer["sample_pings"]
            if answer["sample_pings"]
            else math.nan,
        }

    return run_measurement(f"idle connections, {impl}", body)


SECTIONS: dict[str, Callable[[Profile, str, str], dict[str, Any]]] = {
    "call": measure_calls,
    "fanout": measure_fanout,
    "idle": measure_idle,
}


def run_benchmark(
    profile: Profile, sections: list[str]
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        section: {impl: [] for impl in IMPLS} for section in SECTIONS
    }
    for round_number in range(profile.rounds):
        for section in sections:
            measure = SECTIONS[section]
            for impl in IMPLS:
                results[section][impl].append(measure(profile, impl, f"-r{round_number}"))
    return results


# --------------------------------------------------------------------- figures


def per_second(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:,.0f}/s"


def in_bytes(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:,.0f} B"


def micros(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:,.1f} us"


def seconds(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.2f} s"


def ratio(ours: float, base: float) -> float:
    if not (math.isfinite(ours) and math.isfinite(base)) or base <= 0:
        return math.nan
    return ours / base


def summarize(
    profile: Profile, results: dict[str, dict[str, list[dict[str, Any]]]]
) -> dict[str, Any]:
    """Print the table; return the figures of the last line."""
    rows: list[tuple[str, str, str, str]] = []

    def section(label: str, name: str, field: str, show: Callable[[float], str]) -> float:
        runs = results[name]
        ours, base = median(runs["meshline"], field), median(runs["baseline"], field)
        value = ratio(ours, base)
        rows.append(
            (
                label,
                cell(runs["meshline"], field, show),
                cell(runs["baseline"], field, show),
                "-" if math.isnan(value) else f"{value:.3f}",
            )
        )
        for impl in IMPLS:
            rows.append((f"  {impl} runs", runs_cell(runs[impl], field, show), "", ""))
        return value

    call_ratio = section(
        f"call round trips ({profile.call_clients} clients)", "call", "rate", per_second
    )
    section("  server CPU per round trip", "call", "server_us", micros)
    section("    of which in the garbage collector", "call", "server_gc_us", micros)
    section("  client CPU per round trip", "call", "client_us", micros)
    section("    of which in the garbage collector", "call", "client_gc_us", micros)
    fanout_ratio = section(
        f"room emit deliveries ({profile.fanout_connections:,} connections, "
        f"{profile.fanout_events} events)",
        "fanout",
        "rate",
        per_second,
    )
    section("  server CPU per delivery", "fanout", "server_us", micros)
    section("    of which in the garbage collector", "fanout", "server_gc_us", micros)
    section("  clients' CPU per delivery", "fanout", "client_us", micros)
    section("    of which in the garbage collector", "fanout", "client_gc_us", micros)
    section(
        f"idle: server RSS per connection ({profile.idle_connections:,}, heartbeat "
        f"{profile.heartbeat:g} s)",
        "idle",
        "bytes_per_conn",
        in_bytes,
    )
    section(
        "  objects the garbage collector tracks, per connection",
        "idle",
        "gc_objects_per_conn",
        lambda v: "-" if not math.isfinite(v) else f"{v:,.0f}",
    )
    section(
        "  server CPU while they idle",
        "idle",
        "idle_cpu_percent",
        lambda v: "-" if not math.isfinite(v) else f"{v:.1f}%",
    )
    section("  server CPU per heartbeat (ping out, pong in)", "idle", "server_us_per_ping", micros)
    section("    of which in the garbage collector", "idle", "server_gc_us_per_ping", micros)
    section("  time to connect them all", "idle", "connect_s", seconds)

    width = max(len(row[0]) for row in rows)
    print(f"{'':<{width}}  {'meshline':>14}  {'baseline':>14}  {'ratio':>6}")
    for label, ours, base, value in rows:
        if base or value:
            print(f"{label:<{width}}  {ours:>14}  {base:>14}  {value:>6}")
        else:
            print(f"{label:<{width}}  {ours}")
    memory = median(results["idle"]["meshline"], "bytes_per_conn")
    return {
        "call_ratio": call_ratio,
        "fanout_ratio": fanout_ratio,
        "bytes_per_conn": round(memory) if math.isfinite(memory) else -1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one round, smaller; under a minute")
    size.add_argument("--tiny", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per figure")
    parser.add_argument("--json", type=Path, help="write every run's figures to this file")
    parser.add_argument("--profile", type=Path, help="run the workers under py-spy, into DIR")
    parser.add_argument(
        "--lock",
        type=Path,
        help="take this file for each measurement in turn (wait while it exists or pytest runs)",
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma-separated subset of call,fanout,idle"
    )
    args = parser.parse_args()
    sections = [name for name in args.sections.split(",") if name]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}")

    TURNS.path = args.lock
    if TURNS.path is not None:  # so that a terminated run still removes the lock
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    profile = TINY if args.tiny else QUICK if args.quick else FULL
    if args.rounds:
        profile = attrs.evolve(profile, rounds=args.rounds)
    Worker.log_dir = Path(tempfile.mkdtemp(prefix="meshline-sockets-"))
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        Worker.profile_dir = args.profile.resolve()
    meta = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "meshline_sources": library_fingerprint(),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "profile": profile.name,
        "rounds": profile.rounds,
    }
    began = time.monotonic()
    results = run_benchmark(profile, sections)
    print(
        f"profile {profile.name}, {profile.rounds} round(s), meshline sources "
        f"{meta['meshline_sources']}, {meta['machine']}, {time.monotonic() - began:.0f} s; "
        f"worker logs in {Worker.log_dir}"
        + (f"; py-spy profiles in {Worker.profile_dir} (figures slowed)" if args.profile else "")
    )
    last = summarize(profile, results)
    output = {**meta, "options": attrs.asdict(profile), "results": results, "summary": last}
    if library_fingerprint() != meta["meshline_sources"]:
        print("WARNING: meshline's sources changed during the run; figures may mix versions")
        output["sources_changed"] = True
    if args.json:
        args.json.write_text(json.dumps(output, indent=1))
    print(
        f"call_ratio={last['call_ratio']:.3f} fanout_ratio={last['fanout_ratio']:.3f} "
        f"bytes_per_conn={last['bytes_per_conn']}"
    )


if __name__ == "__main__":
    main()
